"""`imagetransformer eval`: exact bits/dim of a run on a split, the generative classifier's
accuracy, and super-resolution sample scores."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import UserError
from ..evaluation import class_log_prior, classification_accuracy, evaluate
from ..superres import TEMPERATURES, evaluate_superres, psnr_summary
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="exact bits/dim of a run on a data split")
    p.add_argument("run_dir")
    common.add_split(p)
    p.add_argument("--data", help="data set (default: the one the run trained on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--classify",
        action="store_true",
        help="also report the accuracy of the generative classifier (class-conditional models)",
    )
    p.add_argument(
        "--sr-images",
        type=int,
        default=16,
        help="super-resolution runs: images upscaled for PSNR/SSIM/consistency (0: skip)",
    )
    p.add_argument(
        "--temperatures",
        default=",".join(map(str, TEMPERATURES)),
        help="super-resolution runs: sampling temperatures (the paper's: 0.8,0.9,1.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the super-resolution samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    common.add_data_options(p)
    common.add_precision(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = common.model_and_split(args)
    model, dataset = data.model, data.dataset
    started = time.perf_counter()
    result = evaluate(
        model,
        dataset,
        batch_size=args.batch_size,
        max_images=args.limit,
        progress=not args.json,
        precision=args.precision,
    )
    if args.classify:
        if model.config.num_classes == 0:
            raise UserError("--classify needs a class-conditional model (num_classes > 0)")
        train_labels = data.options.load(data.spec, "train").labels if data.run else None
        result["classification"] = classification_accuracy(
            model,
            dataset,
            class_log_prior(train_labels, model.config.num_classes),
            batch_size=args.batch_size,
            max_images=args.limit,
        )
    if model.config.task == "superres" and args.sr_images > 0:
        result["superres"] = evaluate_superres(
            model,
            dataset,
            max_images=args.sr_images,
            temperatures=_temperatures(args.temperatures),
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.json,
        )
    result.update(split=data.split, data=data.spec, seconds=round(time.perf_counter() - started, 2))
    if args.json:
        print(json.dumps(result))
        return 0
    per_channel = ", ".join(f"{v:.4f}" for v in result.get("bits_per_dim_per_channel", []))
    print(
        f"{data.what}: {result['bits_per_dim']:.4f} bits/dim over "
        f"{result['images']} images" + (f" (per channel: {per_channel})" if per_channel else "")
    )
    if "superres" in result:
        _, h, w = model.config.low_res_shape
        print(
            f"(bits/dim of each image given its {h}x{w} area-downsampled copy); one sample "
            f"per image for {result['superres']['images']} images:"
        )
        print(psnr_summary(result["superres"]))
    if args.classify:
        c = result["classification"]
        print(
            f"generative classifier: accuracy {c['accuracy']:.4f} over {c['images']} images "
            f"({c['num_classes']} classes, chance {c['chance']:.4f})"
        )
    return 0


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--temperatures takes numbers like 0.8,0.9,1.0, got {text!r}") from None
    if not values or min(values) < 0:
        raise UserError(f"--temperatures takes numbers >= 0 like 0.8,0.9,1.0, got {text!r}")
    return values
