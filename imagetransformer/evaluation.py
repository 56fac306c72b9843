"""What a trained model is judged by: exact bits/dim over a split, and the generative classifier.

Both are built on the model's one likelihood (`ImageTransformer.nll`); sample-quality scores of
super-resolution runs live in `superres.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import ImageDataset
from .errors import UserError
from .model import ImageTransformer
from .precision import autocast


def evaluate(
    model: ImageTransformer,
    dataset: ImageDataset,
    batch_size: int = 64,
    max_images: int = 0,
    progress: bool = False,
    precision: str = "fp32",
    context: distributed.Context = distributed.SINGLE,
) -> dict[str, Any]:
    """Exact bits/dim over the split (or its first `max_images`), plus per-channel bits/dim.

    The network may run in bf16/fp16 (`precision`); the likelihood is taken in float32 and sums
    are accumulated in float64, so the figure does not depend on the batch size. Processes of a
    distributed run each score their share and the sums are reduced exactly.
    """
    device = model.head.weight.device
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    conditional = model.config.num_classes > 0
    per_channel_scores = model.distribution.scores_channels
    channels = model.config.image_shape[0]
    per_channel = torch.zeros(channels, dtype=torch.float64)
    total = torch.zeros(1, dtype=torch.float64)
    mine = torch.arange(context.rank, n, context.world_size)  # each process its own share
    bar = tqdm(range(0, len(mine), batch_size), desc="eval", disable=not progress, leave=False)
    with model.evaluating():
        for start in bar:
            images, labels = dataset.batch(mine[start : start + batch_size])
            images = images.to(device)
            labels = labels.to(device) if conditional and labels is not None else None
            with autocast(device, precision):
                nll = model.nll(images, labels)  # nats, float32
            total += nll.double().sum().cpu()
            if per_channel_scores:  # [B, C, H, W]
                per_channel += nll.double().sum(dim=(0, 2, 3)).cpu()
    sums = distributed.all_reduce_sum(torch.cat([total, per_channel]).to(device), context).cpu()
    total, per_channel = sums[0], sums[1:]
    dims = n * math.prod(model.config.image_shape[1:])
    result = {"bits_per_dim": float(total / (dims * channels) / math.log(2)), "images": n}
    if per_channel_scores:
        result["bits_per_dim_per_channel"] = (per_channel / dims / math.log(2)).tolist()
    return result


def class_log_prior(labels: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """log p(y) from a split's label frequencies (None without labels: a uniform prior)."""
    if labels is None:
        return None
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1e-9)
    return torch.log(counts / counts.sum())


def classify(
    model: ImageTransformer, images: torch.Tensor, log_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(y | x) for every class, [B, K]: Bayes' rule over the class-conditional model.

    `log_prior` [K] is log p(y), e.g. the training set's class frequencies (default: uniform).
    One forward pass per class; log p(x | y) is summed over all sub-pixels. Exact whatever mode
    the model is in.
    """
    k = model.config.num_classes
    if k == 0:
        raise UserError("classify needs a class-conditional model (num_classes > 0)")
    values = model.check_images(images)
    batch = values.shape[0]
    with model.evaluating():
        log_px_given_y = torch.stack(
            [
                -model.nll(images, torch.full((batch,), y, device=values.device))
                .double()
                .flatten(1)
                .sum(1)
                for y in range(k)
            ],
            dim=1,
        )
    if log_prior is None:
        log_prior = torch.full((k,), -math.log(k), dtype=torch.float64)
    joint = log_px_given_y + log_prior.to(log_px_given_y.device, torch.float64)
    return joint - torch.logsumexp(joint, dim=1, keepdim=True)


def classification_accuracy(
    model: ImageTransformer,
    dataset: ImageDataset,
    log_prior: torch.Tensor | None = None,
    batch_size: int = 64,
    max_images: int = 0,
) -> dict[str, Any]:
    """Accuracy of argmax_y log p(y | x) (Bayes' rule over the class-conditional model)."""
    if dataset.labels is None:
        raise UserError(f"{dataset.name} has no labels: classification needs a labelled split")
    k = model.config.num_classes
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    device = model.head.weight.device
    correct = 0
    for start in range(0, n, batch_size):
        images, labels = dataset.batch(torch.arange(start, min(start + batch_size, n)))
        predicted = classify(model, images.to(device), log_prior).argmax(dim=1).cpu()
        correct += int((predicted == labels).sum())
    return {"accuracy": correct / n, "images": n, "num_classes": k, "chance": 1 / k}
