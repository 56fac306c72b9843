"""`imagetransformer complete`: keep the first part of images in generation order, sample the
rest."""

from __future__ import annotations

import argparse

import torch

from ..defaults import COMPLETE, SEED
from ..errors import UserError
from ..grid import save_grid
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("complete", help="keep the top of images, sample the rest")
    p.add_argument("run_dir")
    common.add_image_source(p, "an image file (resized to the model's size)")
    p.add_argument(
        "--keep",
        type=float,
        default=COMPLETE.keep,
        help="fraction kept, in whole rows (whole block rows for local_2d)",
    )
    p.add_argument("--n", type=int, default=COMPLETE.n, help="completions per image")
    p.add_argument("--temperature", type=float, default=COMPLETE.temperature)
    p.add_argument("--seed", type=int, default=SEED)
    common.add_guidance(p)
    p.add_argument("--out", default="completions.png")
    common.add_data_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.check_sampling_options(args.n, args.temperature, args.count)
    device = common.device(args.device)
    model = common.open_model(args.run_dir, device)
    labels = None
    if args.image:
        originals = common.read_image(args.image, tuple(model.config.image_shape))[None]
    else:
        originals, labels = common.images_from_split(args)
    if model.config.num_classes == 0:
        labels = None
    elif labels is None:
        raise UserError("this model is class-conditional: use --from-split (labels come along)")
    keep = model.keep_positions(args.keep)
    repeated = originals.repeat_interleave(args.n, dim=0).to(device)
    labels = None if labels is None else labels.repeat_interleave(args.n).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completions = model.complete(
        repeated,
        keep,
        temperature=args.temperature,
        labels=labels,
        generator=generator,
        progress=True,
        guidance=common.guidance(args, model),
    ).cpu()
    masked_in = torch.where(model.kept_mask(keep), originals, 128).to(torch.uint8)
    rows = [
        torch.cat(
            [originals[i : i + 1], masked_in[i : i + 1], completions[i * args.n : (i + 1) * args.n]]
        )
        for i in range(originals.shape[0])
    ]
    path = save_grid(torch.cat(rows), args.out, nrow=args.n + 2)
    print(
        f"wrote {path}: each row is the original, the kept part ({keep} of "
        f"{model.config.num_positions} positions, the rest grey) and {args.n} completions"
    )
    return 0
