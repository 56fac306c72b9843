"""Data sets as uint8 images (in memory, or memory-mapped for ImageNet/CelebA): one entry point.

Adding a source (e.g. imagenet, celeba) means one module with a loader and one entry in
``_BUILTIN`` below; the rest of the package only ever sees ``ImageDataset``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from . import celeba, cifar10, folder, imagenet, mnist5k
from .dataset import ImageDataset
from .resize import check_options, conform

__all__ = ["DATASET_NAMES", "ImageDataset", "default_root", "load_dataset", "loaded_shape"]

SPLITS = ("train", "test")
DATA_ROOT_ENV = "IMAGETRANSFORMER_DATA"

# name -> loader(split, root, download); each returns the set at its native size.
_BUILTIN: dict[str, Callable[[str, Path, bool], ImageDataset]] = {
    mnist5k.NAME: lambda split, root, download: mnist5k.load(split),
    cifar10.NAME: cifar10.load,
    **{name: imagenet.loader(name) for name in imagenet.NAMES},  # memory-mapped, see memmap.py
    celeba.NAME: celeba.load,  # at its default size; load_dataset uses _SIZED below
}
# Loaders that decode the originals straight to the asked image_size, also taking it: CelebA
# has no native size (its 138x138 face crop is area-resized), so resizing its default-size
# copy afterwards would blur it.
_SIZED: dict[str, Callable[[str, Path, bool, int | None], ImageDataset]] = {
    celeba.NAME: celeba.load,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILTIN)
# [C, H, W] of every built-in set as loaded (CelebA: at its default size)
NATIVE_SHAPES: dict[str, tuple[int, int, int]] = {
    mnist5k.NAME: (1, 28, 28),
    cifar10.NAME: (3, 32, 32),
    celeba.NAME: (3, celeba.DEFAULT_SIZE, celeba.DEFAULT_SIZE),
    **{name: (3, int(name[8:10]), int(name[8:10])) for name in imagenet.NAMES},
}


def loaded_shape(
    name: str, image_size: int | None = None, channels: int | None = None
) -> tuple[int, int, int]:
    """The [C, H, W] that `load_dataset(name, image_size=, channels=)` gives, without loading."""
    c, h, w = NATIVE_SHAPES[name]
    side = h if image_size is None and h == w else (image_size or max(h, w))
    return (c if channels is None else channels, side, side)


def default_root() -> Path:
    """Where downloadable sets live: $IMAGETRANSFORMER_DATA, else ~/.cache/imagetransformer."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imagetransformer"


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load one split of a built-in set (by name) or a path (image folder, CIFAR-10/ImageNet
    file, CelebA folder).

    A built-in name wins over a same-named folder in the working directory; write ``./name``
    to mean the folder. ``image_size``/``channels`` resize/convert built-ins when given; image
    folders default to 32 and 3; CelebA is decoded at ``image_size`` (default 32).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    check_options(image_size, channels)
    spec = str(spec)
    name = spec.strip().lower()
    loader = _BUILTIN.get(name)
    if loader is not None:
        data_root = Path(root).expanduser() if root is not None else default_root()
        sized = _SIZED.get(name)
        if sized is not None:
            ds = sized(split, data_root, download, image_size)
        else:
            ds = loader(split, data_root, download)
        return conform(ds, image_size, channels)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"unknown data set {spec!r}: use one of {', '.join(DATASET_NAMES)}, "
            "or the path of an image folder (optionally with train/ and test/ sub-folders) "
            "or of a CIFAR-10 archive, a Downsampled ImageNet file or a CelebA folder"
        )
    if cifar10.is_cifar_path(path):
        return conform(cifar10.load_path(path, split), image_size, channels)
    if imagenet.is_imagenet_path(path):
        return conform(imagenet.load_path(path, split), image_size, channels)
    if celeba.is_celeba_path(path):
        return conform(celeba.load_path(path, split, image_size), image_size, channels)
    if path.is_dir():
        return folder.load(path, split, image_size or 32, channels or 3)
    raise UserError(
        f"{path} is not a data set: give a folder of images, a CIFAR-10 "
        f"{cifar10.ARCHIVE}, a Downsampled ImageNet train_32x32.tar or val_data.npz, "
        f"a CelebA folder (holding {celeba.IMAGE_DIR}/ and {celeba.PARTITION_FILES[0]}), "
        f"or one of {', '.join(DATASET_NAMES)}"
    )
