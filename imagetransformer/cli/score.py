"""`imagetransformer score`: per-image and per-sub-pixel bits of a data set under a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import class_log_prior
from ..tools.score import score, write_report
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="bits of every image and sub-pixel, with plots")
    p.add_argument("run_dir")
    p.add_argument("--data", help="data set or path (default: the one the run trained on)")
    common.add_split(p)
    p.add_argument("--out", help="report folder (default: RUN_DIR/scores)")
    p.add_argument(
        "--marginal",
        action="store_true",
        help="class-conditional models: score p(x) summed over the classes instead of p(x | y)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    common.add_data_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = common.model_and_split(args)
    model, dataset, the_run = data.model, data.dataset, data.run
    log_prior = None
    if args.marginal and model.config.num_classes and the_run is not None:
        train_labels = data.options.load(the_run.info.data, "train").labels
        log_prior = class_log_prior(train_labels, model.config.num_classes)
    scores = score(
        model,
        dataset,
        batch_size=args.batch_size,
        marginal=args.marginal,
        log_prior=log_prior,
        max_images=args.limit,
        progress=True,
    )
    out = Path(args.out) if args.out else Path(args.run_dir) / "scores"
    summary = scores.summary()
    written = write_report(scores, out)
    print(
        f"{data.what}: {summary['images']} images, mean {summary['mean_bits_per_dim']:.4f} bits/dim"
        f" (median {summary['median_bits_per_dim']:.4f}); wrote "
        + ", ".join(str(p) for p in written)
    )
    return 0
