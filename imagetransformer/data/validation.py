"""The validation split: a fixed, seeded part of a training split, held out to choose weights.

Model selection must never look at the test split (it is only reported), so a run that keeps
its best weights needs images of its own to judge them on. They come out of the training split
by a seeded draw that does not depend on the run's seed, so runs that differ only in their
seed are chosen on the same images; for a folder without train/ and test/ sub-folders that is a
fraction of the images left after the automatic test split. Random crops of one photo are
held out together, whole photos at a time, so that validation judges images the model has seen
no part of; a folder of too few photos for that holds out a strip of every photo instead, which
no training crop touches (`folder.validation_strips`).
"""

from __future__ import annotations

import torch

from .dataset import DatasetView, ImageDataset

VALIDATION_SEED = 2018  # fixed: the validation images do not follow the run's seed
VALIDATION_MAX = 10_000  # enough to rank weights to ~0.01 bits/dim; ImageNet keeps the rest


def validation_size(n: int, fraction: float) -> int:
    """How many of `n` training images are held out: `fraction` of them (at least one, at most
    VALIDATION_MAX), none when fraction is 0 or fewer than two images are left to train on."""
    if fraction <= 0 or n < 3:
        return 0
    return min(VALIDATION_MAX, max(1, int(n * fraction)))


def split_validation(
    train: ImageDataset, fraction: float
) -> tuple[ImageDataset, ImageDataset | None]:
    """(the images left to train on, the validation images), both in their original order."""
    held = getattr(train, "held", None)
    if held is not None and fraction > 0:  # crops of each photo's validation strip
        return (
            DatasetView(train, (~held).nonzero().flatten()),
            DatasetView(train, held.nonzero().flatten(), name=f"{train.name} (validation)"),
        )
    n = len(train)
    k = validation_size(n, fraction)
    if k == 0:
        return train, None
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    groups = getattr(train, "groups", None)
    if groups is None:
        order = torch.randperm(n, generator=generator)
        held, kept = order[:k].sort().values, order[k:].sort().values
    else:  # crops of one photo stay together: whole photos are held out, at least one kept
        names = groups.unique()
        chosen, count = [], 0
        for g in names[torch.randperm(len(names), generator=generator)].tolist()[:-1]:
            if count >= k:
                break
            chosen.append(g)
            count += int((groups == g).sum())
        if not chosen:
            return train, None
        mask = torch.isin(groups, torch.tensor(chosen))
        held, kept = mask.nonzero().flatten(), (~mask).nonzero().flatten()
    return DatasetView(train, kept), DatasetView(train, held, name=f"{train.name} (validation)")
