"""Training-step speed and peak memory of the attention backends, side by side.

Each (image size, attention type, backend) runs in its own subprocess so that peak memory is
that process's own: peak RSS during the timed steps minus RSS before the first step. Prints a
markdown table with images/s and memory, and the ratios of each local backend against `dense`.

    python benchmarks/bench_train.py            # 3x32x32 and 3x64x64, local_1d and local_2d
    python benchmarks/bench_train.py --quick    # 3x32x32 only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

# The paper's block sizes (SPEC.md section 7) on a model small enough for a CPU.
ATTENTION = {
    "local_1d": dict(attention="local_1d", block_length=256, memory_length=256),
    "local_2d": dict(attention="local_2d", query_shape=(8, 16), memory_flange=(8, 32)),
}
MODEL = dict(d_model=128, num_heads=2, ffn_size=512, num_layers=1, dropout=0.0)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(size: int, kind: str, backend: str, batch: int, steps: int) -> dict:
    from imagetransformer import ImageTransformer, ImageTransformerConfig

    torch.manual_seed(0)
    config = ImageTransformerConfig(
        image_shape=(3, size, size), backend=backend, **MODEL, **ATTENTION[kind]
    )
    model = ImageTransformer(config)
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    _ = model.pattern.blocked_layout  # build the pattern once, outside the timing
    before = _rss_mib()

    def step() -> None:
        loss = model.loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {
        "positions": 3 * size * size,
        "attention": kind,
        "backend": backend,
        "batch": batch,
        "seconds_per_step": seconds,
        "images_per_s": batch / seconds,
        "peak_mib": _rss_mib() - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3x32x32 only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    if args.one:
        size, kind, backend, batch, steps = json.loads(args.one)
        print(json.dumps(run_one(size, kind, backend, batch, steps)))
        return
    sizes = [(32, 4, 3)] if args.quick else [(32, 4, 3), (64, 1, 2)]
    rows = []
    for size, batch, steps in sizes:
        for kind in ATTENTION:
            for backend in ("dense", "blocked"):
                spec = json.dumps([size, kind, backend, batch, steps])
                out = subprocess.run(
                    [sys.executable, __file__, "--one", spec],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  measured {rows[-1]}", file=sys.stderr)
    print(f"# Training step: blocked vs dense ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}. Model: {MODEL}, fp32, forward + backward + Adam.\n"
    )
    print(
        "| positions | attention | batch | backend | images/s | peak MiB | speed-up "
        "| memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        dense = next(
            r
            for r in rows
            if r["backend"] == "dense"
            and r["positions"] == row["positions"]
            and r["attention"] == row["attention"]
        )
        speed = row["images_per_s"] / dense["images_per_s"]
        memory = dense["peak_mib"] / max(row["peak_mib"], 1.0)
        print(
            f"| {row['positions']} | {row['attention']} | {row['batch']} | {row['backend']} | "
            f"{row['images_per_s']:.2f} | {row['peak_mib']:.0f} | {speed:.2f}x | {memory:.2f}x |"
        )


if __name__ == "__main__":
    main()
