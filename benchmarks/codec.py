"""The lossless codec side by side with PNG, WebP lossless and JPEG XL lossless, and its speed
against sampling the same images with the float model.

From a fresh clone (after `make setup`); each run is the README's command for it:

    .venv/bin/imagetransformer train --out runs/mnist_1d            # what `make demo` trains
    .venv/bin/python benchmarks/photos32.py --fetch --out /tmp/photos32
    .venv/bin/imagetransformer train --preset rgb32 --data /tmp/photos32 --out runs/rgb32
    .venv/bin/pip install pillow-jxl-plugin                          # optional: JPEG XL
    .venv/bin/python benchmarks/codec.py runs/mnist_1d runs/rgb32

For each run, on its test split (or its first `--images`):
- **bits/dim**: 8 * bytes / dims. The codec: one `.itc` file of all the images (header, coder
  streams, CRC), beside the float model's exact bits/dim on the same images (`eval`); PNG
  (Pillow, optimize, level 9), WebP lossless (quality 100, method 6) and JPEG XL lossless
  (effort 7, when the plugin is installed): one file per image, as a user stores them.
- **speed**: images/s to compress and to decompress (the codec: with the integer model, at
  `--batch-size`), and the float model's cached sampler on as many images at the same batch
  size: the decoding that decompressing must do in any case. The ratio decompress / sample is
  what exactness costs. Timed after a first compress and decompress of 2 images ("first use":
  the integer model's compiled kernels load from numba's disk cache, or compile once per
  machine), which the last table shows.
Add `--json PATH` for the figures. Name the CPU and thread count beside them (printed first).

`--paths ROUNDS` measures instead how the integer model's ways of computing the same integers
compare: one group of `--batch-size` test images decoded with the compiled kernels and with
torch operations, over int16 and over float64 caches, and sampled, in turn, ROUNDS times in one
process (the best of each), as seconds and as ratios to sampling.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagetransformer import ImageTransformer  # noqa: E402
from imagetransformer.evaluation import evaluate  # noqa: E402
from imagetransformer.run import Run  # noqa: E402
from imagetransformer.sampling import sample  # noqa: E402
from imagetransformer.tools import integer_kernels  # noqa: E402
from imagetransformer.tools.codec import (  # noqa: E402
    best_labels,
    compress,
    decompress,
    quantized,
)

FORMATS = {
    "PNG": dict(format="PNG", optimize=True, compress_level=9),
    "WebP lossless": dict(format="WEBP", lossless=True, quality=100, method=6),
    "JPEG XL lossless": dict(format="JXL", lossless=True, effort=7),
}


def jxl_available() -> bool:
    try:
        import pillow_jxl  # noqa: F401  (registers the JXL format with Pillow)
    except ImportError:
        return False
    return True


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def image_codec(images: torch.Tensor, options: dict) -> dict:
    """One file per image: bits/dim (8 * bytes / dims over all images), images/s both ways."""
    arrays = [image.permute(1, 2, 0).numpy() for image in images]
    pils = [Image.fromarray(a[..., 0] if a.shape[2] == 1 else a) for a in arrays]
    start = time.perf_counter()
    files = []
    for pil in pils:
        buffer = io.BytesIO()
        pil.save(buffer, **options)
        files.append(buffer.getvalue())
    encode = time.perf_counter() - start
    start = time.perf_counter()
    for data, array in zip(files, arrays, strict=True):
        mode = "L" if array.shape[2] == 1 else "RGB"
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
        if decoded.reshape(array.shape).tobytes() != array.tobytes():
            raise SystemExit(f"{options['format']} did not give an image back bit for bit")
    decode = time.perf_counter() - start
    return {
        "bits_per_dim": 8 * sum(map(len, files)) / images.numel(),
        "compress_images_per_s": len(images) / encode,
        "decompress_images_per_s": len(images) / decode,
    }


@torch.no_grad()
def measure(run_dir: str, max_images: int, batch_size: int) -> dict:
    model = ImageTransformer.from_pretrained(run_dir).eval()
    run = Run.open(run_dir)
    test = run.load_split("test")
    n = min(len(test), max_images) if max_images else len(test)
    images, _ = test.batch(torch.arange(n))
    exact = evaluate(model, test, max_images=n)["bits_per_dim"]
    integer = quantized(run_dir, torch.device("cpu"), note=lambda _: None)
    labels = best_labels(model, images) if model.config.num_classes else None
    # first use: the compiled kernels load from numba's disk cache (or compile, once per machine)
    start = time.perf_counter()
    few = compress(integer, images[:2], labels=None if labels is None else labels[:2])
    decompress(integer, few.data)
    first_use_s = time.perf_counter() - start
    start = time.perf_counter()
    packed = compress(integer, images, batch_size=batch_size, labels=labels)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decompress(integer, packed.data, batch_size=batch_size)
    decompress_s = time.perf_counter() - start
    if not torch.equal(decoded, images):
        raise SystemExit(f"{run_dir}: the codec did not give the images back bit for bit")
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        count = min(batch_size, n - first)
        chosen = None if labels is None else labels[first : first + count]
        sample(model, count, labels=chosen, generator=generator)
    sample_s = time.perf_counter() - start
    dims = images.numel()
    row = {
        "run": run_dir,
        "data": run.info.data,
        "images": n,
        "shape": list(images.shape[1:]),
        "batch_size": batch_size,
        "model_bits_per_dim": exact,
        "codec": {
            "bits_per_dim": packed.bits_per_dim,
            "compress_images_per_s": n / compress_s,
            "decompress_images_per_s": n / decompress_s,
        },
        "file_bytes": len(packed.data),
        "bytes_over_model": len(packed.data) - exact * dims / 8,
        "stored_otherwise": packed.stored,
        "sample_images_per_s": n / sample_s,
        "decompress_over_sample": decompress_s / sample_s,
        "compress_over_decompress": compress_s / decompress_s,
        "first_use_s": first_use_s,
    }
    for name, options in FORMATS.items():
        if name.startswith("JPEG XL") and not jxl_available():
            continue
        row[name] = image_codec(images, options)
    return row


# the integer model's ways of decoding the same file: (compiled kernels, cache dtype)
PATHS = {
    "kernels, int16 caches": (True, torch.int16),
    "kernels, float64 caches": (True, torch.float64),
    "torch operations, float64 caches": (False, torch.float64),
    "torch operations, int16 caches": (False, torch.int16),
}


@torch.no_grad()
def compare_paths(run_dir: str, batch_size: int, rounds: int) -> dict:
    """One group of test images decoded with each path in turn and sampled, `rounds` times in
    one process (the best of each): seconds, and each over sampling. Every path must give the
    images back (they compute the same integers)."""
    model = ImageTransformer.from_pretrained(run_dir).eval()
    test = Run.open(run_dir).load_split("test")
    images, labels = test.batch(torch.arange(min(batch_size, len(test))))
    labels = labels if model.config.num_classes else None
    integer = quantized(run_dir, torch.device("cpu"), note=lambda _: None)
    data = compress(integer, images, labels=labels).data
    best, enabled = {}, integer_kernels.ENABLED
    try:
        for _ in range(rounds):
            for name, (kernels, dtype) in PATHS.items():
                integer_kernels.ENABLED, integer.cache_dtype = kernels, dtype
                start = time.perf_counter()
                if not torch.equal(decompress(integer, data), images):
                    raise SystemExit(f"{run_dir}: {name} did not give the images back")
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
            start = time.perf_counter()
            sample(model, len(images), labels=labels, generator=torch.Generator().manual_seed(0))
            best["sample"] = min(best.get("sample", math.inf), time.perf_counter() - start)
    finally:
        integer_kernels.ENABLED, integer.cache_dtype = enabled, None
    return {"run": run_dir, "images": len(images), "seconds": best}


def print_paths(rows: list[dict]) -> None:
    print("| run | images | " + " | ".join(PATHS) + " |")
    print("|---|---|" + "---|" * len(PATHS))
    for r in rows:
        s = r["seconds"]
        cells = [f"{s[name]:.2f} s ({s[name] / s['sample']:.2f}x)" for name in PATHS]
        print(f"| {r['run']} | {r['images']} | " + " | ".join(cells) + " |")
    print("(each: the best of the rounds, and over sampling as many images in the same rounds)")


def print_table(rows: list[dict]) -> None:
    print("| data (test images) | format | bits/dim | compress images/s | decompress images/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        where = f"{r['data']} ({r['images']})"
        c = r["codec"]
        print(
            f"| {where} | imagetransformer (model {r['model_bits_per_dim']:.4f}) | "
            f"{c['bits_per_dim']:.4f} | {c['compress_images_per_s']:.1f} | "
            f"{c['decompress_images_per_s']:.1f} |"
        )
        for name in FORMATS:
            if name in r:
                f = r[name]
                print(
                    f"| {where} | {name} | {f['bits_per_dim']:.4f} | "
                    f"{f['compress_images_per_s']:.0f} | {f['decompress_images_per_s']:.0f} |"
                )
    print()
    print(
        "| data | batch | file over the model | decompress / sample | compress / decompress "
        "| stored otherwise | first use, 2 images (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        over = r["codec"]["bits_per_dim"] / r["model_bits_per_dim"] - 1
        print(
            f"| {r['data']} | {r['batch_size']} | {100 * over:+.2f}% ({r['bytes_over_model']:.0f}"
            f" bytes) | {r['decompress_over_sample']:.2f}x | "
            f"{r['compress_over_decompress']:.2f}x | {r['stored_otherwise']} | "
            f"{r['first_use_s']:.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each is measured on its test split)")
    p.add_argument("--images", type=int, default=0, help="the first N test images (0: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images coded side by side")
    p.add_argument("--json", help="write the figures here too")
    p.add_argument(
        "--paths",
        type=int,
        metavar="ROUNDS",
        default=0,
        help="instead: decode one group with the compiled kernels and with torch operations, "
        "over int16 and float64 caches, and sample it, ROUNDS times in turn",
    )
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"{cpu_name()}, {threads} threads, torch {torch.__version__}")
    if not jxl_available():
        print("(JPEG XL left out: pip install pillow-jxl-plugin)")
    if args.paths:
        if not integer_kernels.ENABLED:
            raise SystemExit("--paths compares the compiled kernels: pip install numba")
        rows = [compare_paths(run, args.batch_size, args.paths) for run in args.runs]
        print_paths(rows)
    else:
        rows = [measure(run, args.images, args.batch_size) for run in args.runs]
        print_table(rows)
    if args.json:
        meta = {"cpu": cpu_name(), "threads": threads, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"machine": meta, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
