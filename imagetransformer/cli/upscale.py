"""`imagetransformer upscale`: sample high-resolution images for low-resolution inputs."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..defaults import SEED, UPSCALE
from ..errors import UserError
from ..grid import save_grid
from ..images import open_image, upscale_input
from ..layout import area_downsample
from ..superres import superres_rows
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("upscale", help="super-resolution: sample high-resolution images")
    p.add_argument("run_dir")
    common.add_image_source(
        p, "a low-resolution image (an image of the output size is downsampled first)"
    )
    p.add_argument("--n", type=int, default=UPSCALE.n, help="samples per input")
    p.add_argument("--temperature", type=float, default=UPSCALE.temperature, help="0 = greedy")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default="upscaled.png", help="PNG grid path")
    p.add_argument("--npy", help="also save the uint8 samples [count*n, C, H, W] here")
    common.add_data_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    common.check_sampling_options(args.n, args.temperature, args.count)
    device = common.device(args.device)
    model = common.open_model(args.run_dir, device)
    config = model.config
    if config.task != "superres":
        raise UserError(
            f"{args.run_dir} is not a super-resolution run (task={config.task}); train one with "
            "--task superres (e.g. --preset mnist_sr)"
        )
    truth = None
    if args.image:
        low_res, truth = upscale_input(open_image(args.image, f"image {args.image}"), config)
    else:
        truth, _ = common.images_from_split(args)
        low_res = area_downsample(truth, config.scale)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    samples = model.upscale(
        low_res.repeat_interleave(args.n, dim=0).to(device),
        temperature=args.temperature,
        generator=generator,
        progress=True,
    ).cpu()
    images, per_row = superres_rows(low_res, samples, config.scale, truth)
    path = save_grid(images, args.out, nrow=per_row)
    seconds = time.perf_counter() - started
    shown = "input (pixels repeated), samples" + (", truth" if truth is not None else "")
    print(f"wrote {path}: each row is {shown} ({samples.shape[0]} samples, {seconds:.1f} s)")
    if args.npy:
        np.save(args.npy, samples.numpy())
        print(f"wrote {args.npy} (uint8 {list(samples.shape)})")
    return 0
