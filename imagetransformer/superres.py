"""Super-resolution runs: sample quality against the truth, and pictures of input | samples | truth.

The likelihood side (bits/dim of the high-resolution image given its area-downsampled copy) is
the ordinary `evaluate`; this module adds what only a conditional sampler can be judged by:
PSNR, SSIM and consistency of samples at the paper's temperatures (0.8, 0.9, 1.0).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import repeat
from tqdm.auto import tqdm

from .data.dataset import ImageDataset
from .layout import area_downsample
from .metrics import consistency, psnr, ssim

TEMPERATURES = (0.8, 0.9, 1.0)
PSNR_CAP_DB = 100.0  # a sample equal to the truth has infinite PSNR; capped so means stay finite


def upsample_nearest(low_res: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 [B, C, h, w] -> [B, C, h*s, w*s], each pixel repeated: how the input is shown."""
    return repeat(low_res, "b c h w -> b c (h sh) (w sw)", sh=scale, sw=scale)


@torch.no_grad()
def evaluate_superres(
    model,
    dataset: ImageDataset,
    max_images: int = 16,
    temperatures: tuple[float, ...] = TEMPERATURES,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """One sample per image of the split's first `max_images`, at each temperature: mean PSNR
    (dB, capped at 100), SSIM and consistency (mean |input - downsampled sample|, 0..255)."""
    device = model.head.weight.device
    n = min(max_images, len(dataset))
    scale = model.config.scale
    sums = {t: {"psnr_db": 0.0, "ssim": 0.0, "consistency": 0.0} for t in temperatures}
    generator = torch.Generator(device=device).manual_seed(seed)
    steps = [(t, start) for t in temperatures for start in range(0, n, batch_size)]
    for temperature, start in tqdm(steps, desc="upscale", disable=not progress, leave=False):
        truth, _ = dataset.batch(torch.arange(start, min(start + batch_size, n)))
        low_res = area_downsample(truth, scale)
        samples = model.upscale(
            low_res.to(device), temperature=temperature, generator=generator
        ).cpu()
        scores = sums[temperature]
        scores["psnr_db"] += float(psnr(samples, truth).clamp(max=PSNR_CAP_DB).sum())
        scores["ssim"] += float(ssim(samples, truth).sum())
        scores["consistency"] += float(consistency(low_res, samples, scale).sum())
    return {
        "images": n,
        "by_temperature": {
            str(t): {name: value / n for name, value in scores.items()}
            for t, scores in sums.items()
        },
    }


def superres_rows(
    low_res: torch.Tensor, samples: torch.Tensor, scale: int, truth: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Images for a grid and its row length: per input, the input (pixels repeated), its
    samples (`samples` holds them input by input) and, when known, the truth."""
    per_input = samples.shape[0] // low_res.shape[0]
    shown = upsample_nearest(low_res, scale)
    rows = []
    for i in range(low_res.shape[0]):
        row = [shown[i : i + 1], samples[i * per_input : (i + 1) * per_input]]
        if truth is not None:
            row.append(truth[i : i + 1])
        rows.append(torch.cat(row))
    return torch.cat(rows), per_input + 1 + (truth is not None)


def psnr_summary(result: dict[str, Any]) -> str:
    """One line per temperature, for the command line."""
    lines = []
    for t, s in result["by_temperature"].items():
        lines.append(
            f"  T={t}: PSNR {s['psnr_db']:.2f} dB, SSIM {s['ssim']:.4f}, "
            f"consistency {s['consistency']:.2f} (mean |input - downsampled sample|, 0..255)"
        )
    return "\n".join(lines)


__all__ = ["TEMPERATURES", "evaluate_superres", "psnr_summary", "superres_rows", "upsample_nearest"]
