"""Data sets as uint8 images (in memory, or memory-mapped for ImageNet/CelebA): one entry point.

Every built-in set is one ``DataSet`` record in ``REGISTRY`` below: its name, its loader, its
native shape, whether it decodes at the asked size, and how to recognise a path of its files.
Adding a source (e.g. imagenet, celeba) means one module with a loader and one record; the rest
of the package only ever sees ``ImageDataset``. A path no record recognises is a folder of images
(``folder.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import celeba, cifar10, folder, imagenet, mnist5k
from .dataset import ImageDataset
from .resize import check_options, conform

__all__ = [
    "ALL",
    "DATASET_NAMES",
    "REGISTRY",
    "FOLDER_SIDE",
    "DataSet",
    "ImageDataset",
    "default_root",
    "is_image_folder",
    "load_dataset",
    "loaded_shape",
]

SPLITS = ("train", "test")
ALL = "all"  # every image of an image folder (its train/ and test/ sub-folders together)
FOLDER_SIDE = 32  # the side an image folder is read at unless --image-size says otherwise
DATA_ROOT_ENV = "IMAGETRANSFORMER_DATA"


@dataclass(frozen=True)
class DataSet:
    """One built-in set.

    `load(split, root, download, image_size)` reads it by name from the data root: at its native
    size, or at `image_size` when `sized` (the set decodes its originals straight to the asked
    size: CelebA has no native size, its 138x138 face crop is area-resized, so resizing its
    default-size copy afterwards would blur it). `native_shape` is [C, H, W] as loaded (CelebA:
    at its default size). `is_path` recognises a file or folder of the set given as a path,
    which `load_path(path, split, image_size)` reads; `path_text` names such a path in messages
    and `path_hint` says what one holds.
    """

    name: str
    load: Callable[[str, Path, bool, int | None], ImageDataset]
    native_shape: tuple[int, int, int]
    sized: bool = False
    is_path: Callable[[Path], bool] | None = None
    load_path: Callable[[Path, str, int | None], ImageDataset] | None = None
    path_text: str = ""
    path_hint: str = ""


def _imagenet(name: str, first: bool) -> DataSet:
    """A Downsampled ImageNet record; the first one also reads any path of either release."""
    side = int(name[len("imagenet") :][:2])
    by_name = imagenet.loader(name)
    return DataSet(
        name,
        lambda split, root, download, size: by_name(split, root, download),
        (3, side, side),
        is_path=imagenet.is_imagenet_path if first else None,
        load_path=(lambda path, split, size: imagenet.load_path(path, split)) if first else None,
        path_text="a Downsampled ImageNet file" if first else "",
        path_hint="a Downsampled ImageNet train_32x32.tar or val_data.npz" if first else "",
    )


REGISTRY: tuple[DataSet, ...] = (
    DataSet(
        mnist5k.NAME,
        lambda split, root, download, size: mnist5k.load(split),
        (1, 28, 28),
    ),
    DataSet(
        cifar10.NAME,
        lambda split, root, download, size: cifar10.load(split, root, download),
        (3, 32, 32),
        is_path=cifar10.is_cifar_path,
        load_path=lambda path, split, size: cifar10.load_path(path, split),
        path_text="a CIFAR-10 archive",
        path_hint=f"a CIFAR-10 {cifar10.ARCHIVE}",
    ),
    # memory-mapped, see memmap.py
    *(_imagenet(name, first=i == 0) for i, name in enumerate(imagenet.NAMES)),
    DataSet(
        celeba.NAME,
        celeba.load,
        (3, celeba.DEFAULT_SIZE, celeba.DEFAULT_SIZE),
        sized=True,
        is_path=celeba.is_celeba_path,
        load_path=celeba.load_path,
        path_text="a CelebA folder",
        path_hint=f"a CelebA folder (holding {celeba.IMAGE_DIR}/ and {celeba.PARTITION_FILES[0]})",
    ),
)
DATASETS: dict[str, DataSet] = {record.name: record for record in REGISTRY}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
# [C, H, W] of every built-in set as loaded (CelebA: at its default size)
NATIVE_SHAPES: dict[str, tuple[int, int, int]] = {r.name: r.native_shape for r in REGISTRY}
_PATH_KINDS = tuple(record for record in REGISTRY if record.is_path is not None)


def loaded_shape(
    name: str, image_size: int | None = None, channels: int | None = None
) -> tuple[int, int, int]:
    """The [C, H, W] that `load_dataset(name, image_size=, channels=)` gives, without loading."""
    c, h, w = DATASETS[name].native_shape
    side = h if image_size is None and h == w else (image_size or max(h, w))
    return (c if channels is None else channels, side, side)


def default_root() -> Path:
    """Where downloadable sets live: $IMAGETRANSFORMER_DATA, else ~/.cache/imagetransformer."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imagetransformer"


def _path_kind(path: Path) -> DataSet | None:
    """The built-in set whose files `path` holds, or None (a folder of images, or nothing)."""
    for record in _PATH_KINDS:
        assert record.is_path is not None
        if record.is_path(path):
            return record
    return None


def is_image_folder(spec: str | os.PathLike[str]) -> bool:
    """True when `load_dataset(spec)` reads a folder of images (not a built-in set's name, nor
    the files of one)."""
    spec = str(spec)
    if spec.strip().lower() in DATASETS:
        return False
    path = Path(spec).expanduser()
    return path.is_dir() and _path_kind(path) is None


def load_dataset(
    spec: str,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    crops: int = 0,
    strip: float = 0.0,
) -> ImageDataset:
    """Load one split of a built-in set (by name) or a path (image folder, CIFAR-10/ImageNet
    file, CelebA folder).

    A built-in name wins over a same-named folder in the working directory; write ``./name``
    to mean the folder. ``image_size``/``channels`` resize/convert built-ins when given; image
    folders default to 32 and 3; CelebA is decoded at ``image_size`` (default 32). Split
    ``all`` is every image of an image folder (train/ and test/ together, or all of a folder
    that has no such sub-folders); the other sets come in train and test splits only.
    ``crops`` > 0 cuts that many random crops at random scales from every image of a folder,
    instead of one resized copy (refused for the other sets); ``strip`` of them from a strip
    of each photo that no other crop touches (the validation crops of a folder of few photos).
    """
    if split not in (*SPLITS, ALL):
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    check_options(image_size, channels)
    if crops < 0:
        raise UserError(f"crops must be >= 0 (0: one resized copy per image), got {crops}")
    if crops and not is_image_folder(spec):
        raise UserError(
            f"--crops cuts crops from a folder of images, and {spec} is not one: drop --crops"
        )
    spec = str(spec)
    name = spec.strip().lower()
    record = DATASETS.get(name)
    if record is not None:
        _refuse_all(split, name)
        data_root = Path(root).expanduser() if root is not None else default_root()
        ds = record.load(split, data_root, download, image_size if record.sized else None)
        return conform(ds, image_size, channels)
    path = Path(spec).expanduser()
    if not path.exists():
        kinds = [r.path_text for r in _PATH_KINDS]
        raise UserError(
            f"unknown data set {spec!r}: use one of {', '.join(DATASET_NAMES)}, "
            "or the path of an image folder (optionally with train/ and test/ sub-folders) "
            f"or of {', '.join(kinds[:-1])} or {kinds[-1]}"
        )
    record = _path_kind(path)
    if record is not None:
        assert record.load_path is not None
        _refuse_all(split, str(path))
        ds = record.load_path(path, split, image_size if record.sized else None)
        return conform(ds, image_size, channels)
    if path.is_dir():
        return folder.load(path, split, image_size or FOLDER_SIDE, channels or 3, crops, strip)
    raise UserError(
        f"{path} is not a data set: give a folder of images, "
        + "".join(f"{r.path_hint}, " for r in _PATH_KINDS)
        + f"or one of {', '.join(DATASET_NAMES)}"
    )


def _refuse_all(split: str, spec: str) -> None:
    if split == ALL:
        raise UserError(
            f"split {ALL} reads every image of an image folder; {spec} comes in train and test "
            "splits: use --split train or --split test"
        )
