"""What a user sees of a trained model beyond its bits/dim: held-out bits/dim against PNG and
WebP, streaks in colour samples, whether super-resolution uses its input, whether
class-conditional samples follow their labels.

Each part reads runs trained by the README's commands; from a fresh clone (after `make setup`):

    # colour: photos32 (benchmarks/photos32.py --fetch --out /tmp/photos32), and a small folder
    # of 6 of its training photos (about 1,200 crops), both tested on photos32's test photos
    .venv/bin/python benchmarks/quality.py small-folder /tmp/photos32 --out /tmp/small6
    .venv/bin/imagetransformer train --preset rgb32 --data /tmp/photos32 --out runs/rgb32
    .venv/bin/imagetransformer train --preset rgb32 --data /tmp/small6 --out runs/small6
    .venv/bin/python benchmarks/quality.py colour runs/rgb32 runs/small6
    .venv/bin/python benchmarks/quality.py curve runs/small6 --out docs/curve_small_folder.png
    # super-resolution and class-conditional runs on mnist5k
    .venv/bin/imagetransformer train --preset mnist_sr --out runs/mnist_sr
    .venv/bin/python benchmarks/quality.py superres runs/mnist_sr
    # class-conditional samples, unguided and guided (docs/model.md, Class dropout and
    # guidance), judged by an independently seeded conditional run without class dropout
    .venv/bin/imagetransformer train --preset mnist_1d_cond --out runs/cond
    .venv/bin/imagetransformer train --preset mnist_1d_cond --set class_dropout=0 \
        --set class_scale=0 --set seed=1 --out runs/cond-judge
    .venv/bin/python benchmarks/quality.py labels runs/cond runs/cond-judge --guidance 0 1 3

Every part prints a Markdown table (add `--json PATH` for the figures). Definitions:
- **per-image codecs**: each test image as its own PNG (Pillow, optimize, level 9) and WebP
  lossless (quality 100, method 6) file, 8 * bytes / dims, averaged over images, as
  `photos32.py --codecs` reports them.
- **streak ratio**: mean |vertical neighbour difference| / mean |horizontal neighbour
  difference| over all pixels of 64 samples at temperature 1.0, beside the same ratio of the
  real test images. Horizontal streaks (rows that repeat a colour) push it far above the real
  one.
- **super-resolution**: one sample per input of the first 64 test digits: consistency (mean
  |area-downsample(sample) - input|, 0..255) at T=0.9 and PSNR against the truth at T=0.8,
  beside bicubic upsampling (Pillow) of the same inputs; test bits/dim given the input.
- **label accuracy**: 100 samples per class at T=1.0 from one run, classified by the
  generative classifier (Bayes' rule, uniform prior) of a second run trained with another
  seed, so that the judge has not seen the samples' own model.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagetransformer import ImageTransformer  # noqa: E402
from imagetransformer.evaluation import classification_accuracy, classify, evaluate  # noqa: E402
from imagetransformer.layout import area_downsample  # noqa: E402
from imagetransformer.metrics import consistency, psnr  # noqa: E402
from imagetransformer.run import Run  # noqa: E402
from imagetransformer.sampling import default_guidance  # noqa: E402

SMALL_FOLDER_PHOTOS = (  # 6 everyday photos a user might have: a portrait, a cat, a cup, ...
    "skimage-data-astronaut",
    "skimage-data-chelsea",
    "skimage-data-coffee",
    "skimage-data-rocket",
    "sklearn-datasets-images-china",
    "sklearn-datasets-images-flower",
)


def streak_ratio(images: torch.Tensor) -> float:
    """Mean |vertical neighbour difference| over mean |horizontal neighbour difference|."""
    x = images.double()
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return float(vertical / horizontal)


def codec_bits(images: torch.Tensor) -> dict[str, float]:
    """Per-image PNG and WebP-lossless bits/dim, averaged over the images."""
    totals = {"png": 0.0, "webp": 0.0}
    for image in images:
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        for name, options in (
            ("png", dict(format="PNG", optimize=True, compress_level=9)),
            ("webp", dict(format="WEBP", lossless=True, quality=100, method=6)),
        ):
            buffer = io.BytesIO()
            pil.save(buffer, **options)
            totals[name] += 8 * buffer.tell() / image.numel()
    return {name: total / len(images) for name, total in totals.items()}


def _model(run_dir: str) -> tuple[ImageTransformer, Run]:
    return ImageTransformer.from_pretrained(run_dir).eval(), Run.open(run_dir)


def small_folder(args: argparse.Namespace) -> dict:
    """Copy the crops of 6 photos32 training photos (train/) and photos32's test crops
    (test/) into a new folder: a small folder of one's own photos, tested on other photos."""
    source, out = Path(args.photos32), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or choose another --out")
    for split in ("train", "test"):
        (out / split).mkdir(parents=True)
    count = 0
    for photo in SMALL_FOLDER_PHOTOS:
        crops = sorted((source / "train").glob(f"{photo}_s*.png"))
        if not crops:
            raise SystemExit(f"no crops of {photo} in {source}/train: build photos32 first")
        for crop in crops:
            shutil.copyfile(crop, out / "train" / crop.name)
        count += len(crops)
    tests = sorted((source / "test").glob("*.png"))
    for crop in tests:
        shutil.copyfile(crop, out / "test" / crop.name)
    print(
        f"wrote {out}: {count} train crops of {len(SMALL_FOLDER_PHOTOS)} photos, {len(tests)} test"
    )
    return {"train": count, "test": len(tests)}


@torch.no_grad()
def colour(args: argparse.Namespace) -> dict:
    rows = {}
    for run_dir in args.runs:
        model, run = _model(run_dir)
        test = run.load_split("test")
        images = test.batch(torch.arange(len(test)))[0]
        result = evaluate(model, test)
        samples = model.sample(64, temperature=1.0, generator=torch.Generator().manual_seed(0))
        codecs = codec_bits(images)
        rows[run_dir] = {
            "data": run.info.data,
            "test_images": len(test),
            "bits_per_dim": result["bits_per_dim"],
            "png": codecs["png"],
            "webp": codecs["webp"],
            "selected_step": (run.info.selected or {}).get("step"),
            "streak_ratio_samples": streak_ratio(samples),
            "streak_ratio_real": streak_ratio(images),
        }
    columns = ["run", "data", "test images", "bits/dim", "PNG", "WebP", "selected step"]
    print("| " + " | ".join([*columns, "streaks (samples / real)"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['data']} | {r['test_images']} | {r['bits_per_dim']:.3f} | "
            f"{r['png']:.3f} | {r['webp']:.3f} | {r['selected_step']} | "
            f"{r['streak_ratio_samples']:.2f} / {r['streak_ratio_real']:.2f} |"
        )
    return rows


def bicubic(low_res: torch.Tensor, scale: int) -> torch.Tensor:
    out = []
    for image in low_res:
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        big = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.BICUBIC)
        arr = np.array(big)
        out.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))
    return torch.stack(out)


@torch.no_grad()
def superres(args: argparse.Namespace) -> dict:
    rows = {}
    for run_dir in args.runs:
        model, run = _model(run_dir)
        test = run.load_split("test")
        truth = test.batch(torch.arange(min(args.count, len(test))))[0]
        s = model.config.scale
        low_res = area_downsample(truth, s)
        generator = torch.Generator().manual_seed(0)
        at = {t: model.upscale(low_res, temperature=t, generator=generator) for t in (0.8, 0.9)}
        baseline = bicubic(low_res, s)
        rows[run_dir] = {
            "bits_per_dim": evaluate(model, test)["bits_per_dim"],
            "consistency_t0.9": float(consistency(low_res, at[0.9], s).mean()),
            "psnr_t0.8": float(psnr(at[0.8], truth).clamp(max=100).mean()),
            "bicubic_consistency": float(consistency(low_res, baseline, s).mean()),
            "bicubic_psnr": float(psnr(baseline, truth).clamp(max=100).mean()),
            "images": len(truth),
        }
    columns = ["run", "test bits/dim given the input", "consistency T=0.9 (bicubic)"]
    print("| " + " | ".join([*columns, "PSNR T=0.8 dB (bicubic)"]) + " |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['bits_per_dim']:.4f} | {r['consistency_t0.9']:.2f} "
            f"({r['bicubic_consistency']:.2f}) | {r['psnr_t0.8']:.2f} ({r['bicubic_psnr']:.2f}) |"
        )
    return rows


@torch.no_grad()
def labels(args: argparse.Namespace) -> dict:
    model, run = _model(args.run)
    judge, _ = _model(args.judge)
    k = model.config.num_classes
    if not k or judge.config.num_classes != k:
        raise SystemExit("both runs must be class-conditional with the same classes")
    test = run.load_split("test")
    result = {
        "bits_per_dim": evaluate(model, test)["bits_per_dim"],
        "judge_test_accuracy": classification_accuracy(judge, test)["accuracy"],
        "by_guidance": {},
    }
    print(
        "| run | judge | guidance | label accuracy | judge's accuracy on real test digits "
        "| test bits/dim |"
    )
    print("|---|---|---|---|---|---|")
    for guidance in args.guidance or [default_guidance(model)]:
        correct = torch.zeros(k)
        generator = torch.Generator().manual_seed(0)
        for label in range(k):
            wanted = torch.full((args.per_class,), label)
            samples = model.sample(
                args.per_class, 1.0, labels=wanted, generator=generator, guidance=guidance
            )
            for start in range(0, args.per_class, 64):
                predicted = classify(judge, samples[start : start + 64]).argmax(dim=1)
                correct[label] += int((predicted == label).sum())
        accuracy = float(correct.sum() / (k * args.per_class))
        result["by_guidance"][guidance] = {
            "label_accuracy": accuracy,
            "per_class": (correct / args.per_class).tolist(),
        }
        print(
            f"| {args.run} | {args.judge} | {guidance:g} | {accuracy:.1%} | "
            f"{result['judge_test_accuracy']:.1%} | {result['bits_per_dim']:.4f} |"
        )
    return result


def curve(args: argparse.Namespace) -> dict:
    """Train bits/dim (the mean over each stretch between evaluations) against validation
    bits/dim, from a run's log.jsonl; the selected step marked."""
    from imagetransformer.plotting import pyplot

    run = Run.open(args.run)
    records = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    train = [(r["step"], r["bits_per_dim"]) for r in records if r["kind"] == "train"]
    validation = [(r["step"], r["bits_per_dim"]) for r in records if r["kind"] == "validation"]
    test = [(r["step"], r["bits_per_dim"]) for r in records if r["kind"] == "test"]
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=120)
    steps, values = zip(*train, strict=True)
    window = max(1, len(values) // 40)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    axes.plot(steps[window - 1 :], smooth, label="train (running mean)", color="tab:blue")
    axes.plot(*zip(*validation, strict=True), "o-", label="validation", color="tab:orange")
    if test:
        axes.plot(*test[-1], "s", label="test (selected weights)", color="tab:green")
    if run.info.selected:
        axes.axvline(run.info.selected["step"], color="grey", ls=":", label="selected step")
    axes.set_xlabel("step")
    axes.set_ylabel("bits/dim")
    axes.set_title(args.title or f"{run.info.preset} on {Path(run.info.data).name}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return {"train": train, "validation": validation, "test": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures to this file")
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("small-folder", help="build the small folder from photos32")
    p.add_argument("photos32")
    p.add_argument("--out", required=True)
    p.set_defaults(func=small_folder)
    p = sub.add_parser("colour", help="held-out bits/dim against PNG/WebP, and streaks")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=colour)
    p = sub.add_parser("superres", help="does super-resolution use its input")
    p.add_argument("runs", nargs="+")
    p.add_argument("--count", type=int, default=64)
    p.set_defaults(func=superres)
    p = sub.add_parser("labels", help="do class-conditional samples follow their labels")
    p.add_argument("run")
    p.add_argument("judge")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        help="classifier-free guidance weights to measure (runs trained with class_dropout; "
        "default: the weight `sample` uses for the run)",
    )
    p.set_defaults(func=labels)
    p = sub.add_parser("curve", help="learning curve: train against validation bits/dim")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--title")
    p.set_defaults(func=curve)
    args = parser.parse_args()
    result = args.func(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
