"""Sampling speed: the cached sampler against the re-running reference sampler, side by side.

The reference re-runs the whole network on the partial image at every step, so each of its steps
costs the same: it is timed on its first `--reference-steps` steps and extrapolated linearly to
all N steps (stated in the output). The cached sampler is timed over the whole image.

    python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from imagetransformer import ImageTransformer, ImageTransformerConfig
from imagetransformer.sampling import sample, sample_reference

SMALL = dict(d_model=64, num_heads=4, ffn_size=256, num_layers=4, dropout=0.0, norm_first=True)
CASES = {
    "1x28x28 (mnist_1d)": dict(
        image_shape=(1, 28, 28), attention="local_1d", block_length=56, memory_length=56, **SMALL
    ),
    "3x32x32 (local_1d, l=256)": dict(
        image_shape=(3, 32, 32), attention="local_1d", block_length=256, memory_length=256, **SMALL
    ),
}


def time_cached(model: ImageTransformer, batch: int) -> float:
    started = time.perf_counter()
    sample(model, batch, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def time_reference(model: ImageTransformer, batch: int, steps: int) -> float:
    """Seconds for a whole image, extrapolated from the first `steps` steps."""
    n = model.config.num_positions
    prefix = torch.zeros(batch, *model.config.image_shape, dtype=torch.uint8)
    keep = n - steps  # sample only the last `steps` positions: each step costs one full forward
    started = time.perf_counter()
    sample_reference(
        model, batch, prefix=prefix, keep=keep, generator=torch.Generator().manual_seed(0)
    )
    return (time.perf_counter() - started) * n / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-steps", type=int, default=24)
    args = parser.parse_args()
    print(f"# Sampling: cached vs re-running reference ({time.strftime('%Y-%m-%d')})\n")
    print(
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; model {SMALL}, fp32. The reference is timed on "
        f"{args.reference_steps} steps and scaled to all N (its steps all cost one full "
        "forward).\n"
    )
    print("| image | batch | cached s/image | reference s/image | speed-up |")
    print("|---|---|---|---|---|")
    for name, params in CASES.items():
        torch.manual_seed(0)
        model = ImageTransformer(ImageTransformerConfig(**params)).eval()
        for batch in (1, 16):
            cached = time_cached(model, batch)
            reference = time_reference(model, batch, args.reference_steps)
            print(
                f"| {name} | {batch} | {cached / batch:.3f} | {reference / batch:.2f} | "
                f"{reference / cached:.1f}x |"
            )


if __name__ == "__main__":
    main()
