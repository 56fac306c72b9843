"""Out-of-distribution detection from exact likelihoods (`imagetransformer ood`).

Raw likelihood fails as an OOD score: models give simple images higher likelihood than their
own training data (Nalisnick et al., ICLR 2019). Two published fixes need no labels:
- input complexity (Serra et al., ICLR 2020): the model's bits/dim minus a general-purpose
  lossless codec's bits/dim for the same image (PNG through Pillow here);
- likelihood ratio (Ren et al., NeurIPS 2019): the model's log-likelihood minus that of a
  background model trained on the same data with a fraction of intensities replaced by noise
  (`--set input_noise=0.2`), which cancels what both models find easy.
Every score here is oriented "higher = more in-distribution"; the in-distribution set is the
positive class of AUROC, AUPR and the false-positive rate at 95% true-positive rate.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from ..data import ImageDataset
from ..errors import UserError

SYNTHETIC = ("constant", "inverted", "noise", "shifted")
SHIFT = 4  # pixels right and down for the "shifted" set


def png_bits_per_dim(images: torch.Tensor) -> torch.Tensor:
    """Bits/dim of each uint8 image [N, C, H, W] as its own PNG file (Pillow, optimize, level 9;
    the file's headers included, as a codec's output would be stored)."""
    out = torch.empty(len(images), dtype=torch.float64)
    for i, image in enumerate(images.numpy()):
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(
            buffer, format="PNG", optimize=True, compress_level=9
        )
        out[i] = 8 * len(buffer.getvalue()) / image.size
    return out


def synthetic_set(kind: str, like: ImageDataset, seed: int = 0) -> ImageDataset:
    """An out-of-distribution set made from `like` (same size and count): constant images (every
    pixel one value, values spread over 0..255), inverted ones (255 - x), uniform noise, or
    images shifted `SHIFT` pixels right and down (zeros fill the gap)."""
    images = like.images
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        values = torch.linspace(0, 255, n).round().to(torch.uint8)
        made = values.view(n, 1, 1, 1).expand_as(images).contiguous()
    elif kind == "inverted":
        made = 255 - images
    elif kind == "noise":
        made = torch.randint(0, 256, images.shape, generator=g, dtype=torch.uint8)
    elif kind == "shifted":
        made = torch.zeros_like(images)
        made[:, :, SHIFT:, SHIFT:] = images[:, :, :-SHIFT, :-SHIFT]
    else:
        raise UserError(f"unknown synthetic set {kind!r}; choose one of: {', '.join(SYNTHETIC)}")
    return ImageDataset(made, None, None, f"{kind}({like.name})")


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / n_p n_n)."""
    scores = np.concatenate([positives, negatives])
    ranks = _average_ranks(scores)
    n_pos, n_neg = len(positives), len(negatives)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def aupr(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Average precision with the positives as the class to find: sum over the distinct
    thresholds (high to low) of the recall gained times the precision there."""
    scores = np.concatenate([positives, negatives])
    is_pos = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_group = np.r_[scores[1:] != scores[:-1], True]  # one threshold per distinct score
    tp = np.cumsum(is_pos)[last_of_group]
    seen = (np.arange(1, len(scores) + 1))[last_of_group]
    recall_gain = np.diff(np.r_[0.0, tp]) / len(positives)
    return float(np.sum(recall_gain * tp / seen))


def fpr_at_tpr(positives: np.ndarray, negatives: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of negatives accepted by the highest threshold that keeps `tpr` of the
    positives (score >= threshold)."""
    ranked = np.sort(positives)[::-1]
    threshold = ranked[max(0, math.ceil(tpr * len(ranked)) - 1)]
    return float(np.mean(negatives >= threshold))


def detection_metrics(positives: np.ndarray, negatives: np.ndarray) -> dict[str, float]:
    return {
        "auroc": auroc(positives, negatives),
        "aupr": aupr(positives, negatives),
        "fpr_at_95_tpr": fpr_at_tpr(positives, negatives),
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they share."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_curve(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    scores = np.concatenate([positives, negatives])
    is_pos = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_group = np.r_[scores[1:] != scores[:-1], True]
    tpr = np.cumsum(is_pos)[last_of_group] / len(positives)
    fpr = np.cumsum(1 - is_pos)[last_of_group] / len(negatives)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def ood_scores(
    bits: torch.Tensor, png_bits: torch.Tensor, background_bits: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """Each score per image, higher = more in-distribution, from bits/dim of the model, of PNG
    and (optionally) of the background model."""
    scores = {
        "bits/dim": -bits.numpy(),
        "input complexity": -(bits - png_bits).numpy(),
    }
    if background_bits is not None:
        scores["likelihood ratio"] = (background_bits - bits).numpy()
    return scores
