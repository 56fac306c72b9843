"""`imagetransformer ood`: tell in-distribution images from others by exact likelihood, raw and
with the two known fixes (input complexity; likelihood ratio with a background model)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_bytes
from ..run import check_data_fits
from ..tools.ood import (
    SYNTHETIC,
    detection_metrics,
    ood_scores,
    png_bits_per_dim,
    roc_curve,
    synthetic_set,
)
from ..tools.score import score
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ood", help="out-of-distribution detection: AUROC, AUPR, FPR@95")
    p.add_argument("run_dir")
    p.add_argument(
        "--in", dest="in_data", help="in-distribution data (default: the run's own data)"
    )
    p.add_argument(
        "--out",
        dest="out_data",
        required=True,
        help=f"out-of-distribution data: a data set or path, or one made from the --in set: "
        f"{', '.join(SYNTHETIC)}",
    )
    common.add_split(p)
    p.add_argument("--background", help="run folder of a background model (likelihood ratio)")
    p.add_argument("--report", help="folder for per-image scores and ROC curves")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of each set")
    p.add_argument("--batch-size", type=int, default=32)
    common.add_data_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.limit < 0:
        raise UserError("--batch-size must be at least 1 and --limit at least 0")
    device = common.device(args.device)
    model = common.open_model(args.run_dir, device)
    background = common.open_model(args.background, device) if args.background else None
    shape = tuple(model.config.image_shape)
    in_spec, options, the_run = common.data_for_run(args, args.in_data, shape)
    in_split = common.choose_split(args.split, in_spec, the_run)
    in_set = common.load_split(in_spec, options, in_split, the_run)
    in_what = common.describe_split(in_spec, in_split)
    if args.limit:
        in_set = _first(in_set, args.limit)
    if args.out_data in SYNTHETIC:
        out_set = synthetic_set(args.out_data, in_set)
        out_what = f"{args.out_data} (made from the in-distribution images)"
    else:
        out_split = common.choose_split(args.split, args.out_data, the_run)
        out_options = common.fit_folder(options, args.out_data, shape)
        out_set = common.load_split(args.out_data, out_options, out_split, the_run)
        out_what = common.describe_split(args.out_data, out_split)
        if args.limit:
            out_set = _first(out_set, args.limit)
    for dataset in (in_set, out_set):
        check_data_fits(model.config, dataset, training=False)
    bits, png, bg = {}, {}, {}
    for name, dataset in (("in", in_set), ("out", out_set)):
        bits[name] = _bits_per_dim(model, dataset, args.batch_size)
        png[name] = png_bits_per_dim(dataset.images)
        bg[name] = _bits_per_dim(background, dataset, args.batch_size) if background else None
    scores = {name: ood_scores(bits[name], png[name], bg[name]) for name in bits}
    metrics = {s: detection_metrics(scores["in"][s], scores["out"][s]) for s in scores["in"]}
    print(
        f"in: {in_what}, {len(in_set)} images, {bits['in'].mean():.3f} bits/dim; "
        f"out: {out_what}, {len(out_set)} images, {bits['out'].mean():.3f} bits/dim"
    )
    print("| score | AUROC | AUPR (in) | FPR at 95% TPR |\n|---|---|---|---|")
    for name, m in metrics.items():
        print(f"| {name} | {m['auroc']:.3f} | {m['aupr']:.3f} | {m['fpr_at_95_tpr']:.3f} |")
    report = Path(args.report) if args.report else Path(args.run_dir) / "ood"
    written = _write_report(report, bits, png, bg, scores, metrics)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _first(dataset, n: int):
    return type(dataset)(
        dataset.images[:n],
        dataset.labels[:n] if dataset.labels is not None else None,
        dataset.num_classes if dataset.labels is not None else None,
        dataset.name,
    )


def _bits_per_dim(model, dataset, batch_size: int) -> torch.Tensor:
    marginal = model.config.num_classes > 0  # OOD data has no labels of the model's classes
    return score(model, dataset, batch_size=batch_size, marginal=marginal).bits_per_dim


def _write_report(report: Path, bits, png, bg, scores, metrics) -> list[Path]:
    report.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    names = list(scores["in"])
    writer.writerow(["set", "image", "bits_per_dim", "png_bits_per_dim", "background_bits_per_dim"]
                    + [n.replace(" ", "_").replace("/", "_per_") for n in names])  # fmt: skip
    for part in ("in", "out"):
        for i in range(len(bits[part])):
            background = "" if bg[part] is None else f"{float(bg[part][i]):.6f}"
            writer.writerow(
                [part, i, f"{float(bits[part][i]):.6f}", f"{float(png[part][i]):.6f}", background]
                + [f"{float(scores[part][n][i]):.6f}" for n in names]
            )
    written = [report / "ood_scores.csv"]
    atomic_write_bytes(written[0], text.getvalue().encode())
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name in names:
        fpr, tpr = roc_curve(scores["in"][name], scores["out"][name])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {metrics[name]['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate (out-of-distribution accepted)")
    ax.set_ylabel("true-positive rate (in-distribution accepted)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(report / "roc.png", buffer.getvalue())
    return [*written, report / "roc.png"]
