"""Per-image and per-pixel bits: how surprising each image, and each sub-pixel of it, is to a
model (`imagetransformer score`).

Built on `ImageTransformer.bits_per_subpixel`, so the figures are the model's exact likelihood:
an image's bits/dim is the mean of its sub-pixels' bits, and per-channel figures are means over
one channel.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageDataset
from ..errors import UserError
from ..files import atomic_write_bytes
from ..model import ImageTransformer
from ..plotting import pyplot

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HEATMAP_ROWS = 4  # most and least surprising images shown each


@dataclass
class Scores:
    """The scores of a split: bits [N, C, H, W] of every sub-pixel, and what they belong to."""

    bits: torch.Tensor
    labels: torch.Tensor | None
    images: torch.Tensor
    ids: list[str]

    @property
    def bits_per_dim(self) -> torch.Tensor:
        return self.bits.double().flatten(1).mean(1)

    @property
    def bits_per_channel(self) -> torch.Tensor:
        return self.bits.double().mean(dim=(2, 3))

    def summary(self) -> dict[str, Any]:
        bpd = self.bits_per_dim
        return {
            "images": len(bpd),
            "mean_bits_per_dim": float(bpd.mean()),
            "median_bits_per_dim": float(bpd.median()),
            "std_bits_per_dim": float(bpd.std()) if len(bpd) > 1 else 0.0,
            "quantiles": {str(q): float(torch.quantile(bpd, q)) for q in QUANTILES},
            "mean_bits_per_channel": self.bits_per_channel.mean(0).tolist(),
        }


def marginal_bits_per_subpixel(
    model: ImageTransformer,
    images: torch.Tensor,
    low_res: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bits [B, C, H, W] of every sub-pixel under a class-conditional model's marginal
    p(x) = sum_y p(y) p(x | y), `log_prior` [K] (default uniform): step by step,
    -log2 p(x_i | x_<i) with the classes weighted by their posterior given the earlier steps.
    Their sum over an image is -log2 p(x)."""
    k = model.config.num_classes
    if k == 0:
        return model.bits_per_subpixel(images, low_res=low_res)
    batch = model.check_images(images).shape[0]
    if log_prior is None:
        log_prior = torch.full((k,), -math.log(k), dtype=torch.float64)
    log_prior = log_prior.to(images.device, torch.float64)
    distribution = model.distribution
    cumulative = []  # log p(x_<=t | y) along generation order, per class
    for y in range(k):
        label = torch.full((batch,), y, device=images.device)
        nats = model.bits_per_subpixel(images, label, low_res).double() * math.log(2)
        in_order = distribution.to_sequence(nats)[:, model.generation_order].flatten(1)
        cumulative.append(log_prior[y] - in_order.cumsum(1))
    marginal = torch.logsumexp(torch.stack(cumulative), dim=0)  # log p(x_<=t)
    steps = -(marginal - torch.nn.functional.pad(marginal[:, :-1], (1, 0)))
    values = steps.view(batch, model.config.num_positions, *distribution.value_shape)
    return (distribution.to_images(values[:, model.inverse_order]) / math.log(2)).float()


def score(
    model: ImageTransformer,
    dataset: ImageDataset,
    batch_size: int = 32,
    marginal: bool = False,
    log_prior: torch.Tensor | None = None,
    max_images: int = 0,
    progress: bool = False,
) -> Scores:
    """Bits of every sub-pixel of the split's images (or its first `max_images`).

    A class-conditional model is given each image's label, or with `marginal` scores p(x)
    summed over the classes under `log_prior` (needed when the data has no labels).
    """
    conditional = model.config.num_classes > 0
    if conditional and not marginal and dataset.labels is None:
        raise UserError(
            f"the model is class-conditional but {dataset.name} has no labels: pass --marginal "
            "to score p(x) summed over the classes"
        )
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    device = model.head.weight.device
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc="score", disable=not progress, leave=False):
        images, labels = dataset.batch(torch.arange(start, min(start + batch_size, n)))
        if conditional and marginal:
            bits = marginal_bits_per_subpixel(model, images.to(device), log_prior=log_prior)
        else:
            given = labels.to(device) if conditional else None
            bits = model.bits_per_subpixel(images.to(device), given)
        chunks.append(bits.cpu())
    labels = dataset.labels[:n] if dataset.labels is not None else None
    ids = dataset.ids[:n] if dataset.ids is not None else [str(i) for i in range(n)]
    return Scores(torch.cat(chunks), labels, dataset.images[:n], ids)


def write_report(scores: Scores, out: Path) -> list[Path]:
    """scores.csv, summary.json, and (with matplotlib) heatmaps.png and histogram.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_write_csv(scores, out / "scores.csv"), out / "summary.json"]
    atomic_write_bytes(
        out / "summary.json", json.dumps(scores.summary(), indent=2).encode() + b"\n"
    )
    pyplot(f"wrote {written[0]} and {written[1]}; ")
    written.append(_heatmaps(scores, out / "heatmaps.png"))
    written.append(_histogram(scores, out / "histogram.png"))
    return written


def _write_csv(scores: Scores, path: Path) -> Path:
    channels = scores.bits.shape[1]
    names = ["R", "G", "B"] if channels == 3 else ["grey"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image", "label", "bits_per_dim", *[f"bits_per_dim_{c}" for c in names]])
    per_channel = scores.bits_per_channel
    for i, (name, bpd) in enumerate(zip(scores.ids, scores.bits_per_dim, strict=True)):
        label = "" if scores.labels is None else int(scores.labels[i])
        writer.writerow([name, label, f"{bpd:.6f}", *[f"{v:.6f}" for v in per_channel[i].tolist()]])
    atomic_write_bytes(path, text.getvalue().encode())
    return path


def _heatmaps(scores: Scores, path: Path) -> Path:
    """The most and the least surprising images, each beside its bits per sub-pixel."""
    import matplotlib.pyplot as plt

    order = torch.argsort(scores.bits_per_dim, descending=True)
    k = min(HEATMAP_ROWS, len(order))
    picked = [*order[:k].tolist(), *order[-k:].tolist()] if len(order) > k else order.tolist()
    maps = scores.bits[picked].mean(1)  # a pixel's bits averaged over its channels
    top = float(maps.max()) if len(picked) else 8.0
    fig, axes = plt.subplots(len(picked), 2, figsize=(5, 2.3 * len(picked)), squeeze=False)
    for row, i in enumerate(picked):
        image = scores.images[i].permute(1, 2, 0).numpy()
        grey = image.shape[-1] == 1
        axes[row, 0].imshow(image[..., 0] if grey else image, cmap="gray" if grey else None)
        kind = "most" if row < k and len(order) > k else "least"
        axes[row, 0].set_title(
            f"image {scores.ids[i]}: {float(scores.bits_per_dim[i]):.3f} bits/dim ({kind})",
            fontsize=7,
        )
        shown = axes[row, 1].imshow(maps[row].numpy(), cmap="magma", vmin=0, vmax=top)
        fig.colorbar(shown, ax=axes[row, 1], label="bits per sub-pixel")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return _save_figure(fig, path)


def _histogram(scores: Scores, path: Path) -> Path:
    import matplotlib.pyplot as plt

    bpd = scores.bits_per_dim.numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(bpd, bins=max(10, min(60, int(math.sqrt(len(bpd))) * 2)), color="#4c72b0")
    ax.axvline(float(np.median(bpd)), color="black", linestyle="--", label="median")
    ax.set_xlabel("bits/dim of an image")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
