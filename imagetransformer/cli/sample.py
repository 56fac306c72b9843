"""`imagetransformer sample`: draw images from a trained model into a PNG grid."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..defaults import SAMPLE, SEED
from ..errors import UserError
from ..grid import save_grid
from ..precision import autocast
from ..sampling import sample_labels
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample images into a PNG grid")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=SAMPLE.n)
    p.add_argument("--temperature", type=float, default=SAMPLE.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest values (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--label", type=int, help="class to sample (class-conditional models)")
    common.add_guidance(p)
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--npy", help="also save the uint8 array [n, C, H, W] here")
    common.add_device(p)
    common.add_precision(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError("--top-k must be >= 0 (0: off) and --top-p in (0, 1] (1: off)")
    common.check_sampling_options(args.n, args.temperature)
    device = common.device(args.device)
    model = common.open_model(args.run_dir, device)
    if args.label is not None and not model.config.num_classes:
        raise UserError("--label given but this model is unconditional (num_classes=0)")
    labels = sample_labels(model.config.num_classes, args.n, args.label, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    with autocast(device, args.precision):
        images = model.sample(
            args.n,
            temperature=args.temperature,
            labels=labels,
            generator=generator,
            progress=True,
            top_k=args.top_k,
            top_p=args.top_p,
            guidance=common.guidance(args, model),
        )
    seconds = time.perf_counter() - started
    path = save_grid(images.cpu(), args.out)
    print(f"wrote {path} ({args.n} samples, {seconds:.1f} s)")
    if args.npy:
        np.save(args.npy, images.cpu().numpy())
        print(f"wrote {args.npy} (uint8 {list(images.shape)})")
    return 0
