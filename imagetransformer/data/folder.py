"""A folder of your own images as a dataset: the way to train on data we do not ship.

Layout rules (checked in this order):
- ``train/`` and ``test/`` sub-folders are the splits; otherwise a fixed 10% is held out as test.
  Split ``all`` is every image: both sub-folders, or the whole folder with nothing held out.
- inside a split, sub-folders are classes (sorted names -> labels 0..K-1); loose images are
  unlabelled.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .dataset import ImageDataset
from .resize import pil_mode, square_resize

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_SEED = 0
_TEST_FRACTION = 10  # 1 in 10 held out when there is no train/test split on disk


def load(
    root: Path,
    split: str,
    image_size: int = 32,
    channels: int = 3,
    crops: int = 0,
    strip: float = 0.0,
) -> ImageDataset:
    """Decode, square-crop and resize the split's images (train, test or all) into one uint8
    tensor; with `crops`, cut that many random squares at random scales from every image
    instead (see `random_crops`), `strip` of them from a strip of each photo that the others
    never touch (`validation_strips`)."""
    mode = pil_mode(channels)  # validates channels before any decoding work
    files, labels, classes = split_files(root, split)
    num_classes = len(classes) if labels is not None else None
    ids = [f.relative_to(root).as_posix() for f in files]
    name = root.resolve().name or str(root)
    if crops:
        return _cropped(files, ids, labels, num_classes, name, mode, image_size, crops, strip)
    images = torch.stack([_decode(f, mode, image_size) for f in files])
    label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return ImageDataset(images, label_tensor, num_classes, name, ids)


def split_files(root: Path, split: str) -> tuple[list[Path], list[int] | None, list[str]]:
    """The image files of a split (train, test or all) in a fixed order, their labels (None
    without class sub-folders) and the class names."""
    has = [name for name in ("train", "test") if (root / name).is_dir()]
    if len(has) == 1:
        other = "test" if has == ["train"] else "train"
        raise UserError(
            f"{root} has a {has[0]}/ but no {other}/ sub-folder: add {other}/, "
            f"or move the images out of {has[0]}/ to hold out 10% automatically"
        )
    if has:
        classes = sorted(set(_class_dirs(root / "train")) | set(_class_dirs(root / "test")))
        files: list[Path] = []
        labels: list[int] | None = [] if classes else None  # _scan labels exactly then
        for part in ("train", "test") if split == "all" else (split,):
            found, found_labels = _scan(root / part, classes)
            if not found:
                raise UserError(f"{root / part} holds no images ({_ext_list()}): add some")
            files += found
            if labels is not None and found_labels is not None:
                labels += found_labels
    else:
        classes = _class_dirs(root)
        files, labels = _scan(root, classes)
        if split == "all":
            if not files:
                raise UserError(f"{root} holds no images ({_ext_list()}): add some")
        elif len(files) < 2:
            raise UserError(
                f"{root} holds {len(files)} image(s) ({_ext_list()}); at least 2 are needed to "
                "hold one out as test: add images, or give it train/ and test/ sub-folders"
            )
        else:
            keep = _holdout(len(files), split)
            files = [files[i] for i in keep]
            labels = None if labels is None else [labels[i] for i in keep]
    return files, labels, classes


def random_crops(image: Image.Image, size: int, count: int, key: str) -> list[np.ndarray]:
    """`count` squares of `image`, each of a side drawn log-uniformly between `size` (or the
    short side, if smaller) and the short side, at a uniform place, area-resized to `size`.

    A photo then gives close-ups and views of the whole alike. The draw is seeded by `key`
    (the file's path in its folder), so an image's crops do not depend on the other files.
    """
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    w, h = image.size
    short = min(w, h)
    low = min(size, short)
    out = []
    for _ in range(count):
        side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
        out.append(
            np.asarray(square_resize(image.crop((left, top, left + side, top + side)), size))
        )
    return out


# `train` cuts random crops by itself from a folder of photos much larger than the model
LARGE = 4  # ... when the median short side is at least this many model sides
CROP_BUDGET = 20_000  # crops of the whole train split at most (60 MB at 3x32x32)
MAX_CROPS = 200  # crops of one image at most


def automatic_crops(root: Path, size: int) -> tuple[int, int]:
    """(random crops per image, the median short side in pixels) of the folder's train split
    for a model of side `size`: 0 crops when its images are not at least `LARGE` times the
    model's side (one resized copy each then keeps what there is), else as many as the budget
    gives each image, at most `MAX_CROPS`: a folder of 40 holiday photos gives 8,000 crops
    where resized copies would give 36 images. Reads the files' headers, not their pixels."""
    try:
        files = split_files(root, "train")[0]
    except UserError:
        return 0, 0  # loading says what is wrong
    sides = []
    for path in files:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # loading names the file
    if not sides:
        return 0, 0
    median = int(np.median(sides))
    if median < LARGE * size:
        return 0, median
    return max(1, min(MAX_CROPS, CROP_BUDGET // len(files))), median


WHOLE_PHOTOS = 5  # validation holds out whole photos only when it gets at least this many


def validation_strips(root: Path, crops: int, fraction: float) -> bool:
    """Whether a run on crops of folder `root` takes its validation crops from a strip of
    every photo rather than from whole photos held out: when `fraction` of its training photos
    is fewer than `WHOLE_PHOTOS`. Holding out one photo of six cost such a folder a sixth of
    its views and 0.17 bits/dim on other photos (docs/model.md, Training: Augmentation)."""
    if not crops or fraction <= 0:
        return False
    try:
        photos = len(split_files(root, "train")[0])
    except UserError:
        return False  # loading says what is wrong
    return photos * fraction < WHOLE_PHOTOS


def strip_boxes(
    width: int, height: int, fraction: float, size: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """(training box, validation box) of a photo: the last `fraction` of its long side (at
    least `size` pixels) is the validation strip, the rest the training part; None when the
    training part would be narrower than `size` (the photo then only trains)."""
    long_side = max(width, height)
    cut = long_side - max(size, round(long_side * fraction))
    if min(cut, min(width, height)) < size:
        return None
    if width >= height:
        return (0, 0, cut, height), (cut, 0, width, height)
    return (0, 0, width, cut), (0, cut, width, height)


def _cropped(files, ids, labels, num_classes, name, mode, size, crops, strip) -> ImageDataset:
    """`crops` random crops of every file (one of a file no larger than the model's side: all
    its crops would be the same); `groups` says which file each one came from, so a validation
    split can hold out whole images rather than crops of training images. With `strip`, that
    fraction of each photo's crops comes from its validation strip (`strip_boxes`), marked in
    `held`, and the others from the rest of it."""
    arrays, crop_ids, groups, held = [], [], [], []
    for index, (path, key) in enumerate(zip(files, ids, strict=True)):
        image = _open(path, mode)
        count = crops if min(image.size) > size else 1  # a small image: itself, resized
        boxes = strip_boxes(*image.size, strip, size) if strip > 0 and count > 1 else None
        if boxes is None:
            arrays += random_crops(image, size, count, key)
            crop_ids += [f"{key}#crop{k}" for k in range(count)]
            held += [False] * count
        else:
            kept = count - max(1, round(count * strip))
            arrays += random_crops(image.crop(boxes[0]), size, kept, key)
            arrays += random_crops(image.crop(boxes[1]), size, count - kept, f"{key}#held")
            crop_ids += [f"{key}#crop{k}" for k in range(kept)]
            crop_ids += [f"{key}#held{k}" for k in range(count - kept)]
            held += [False] * kept + [True] * (count - kept)
        groups += [index] * count
    stacked = np.stack(arrays)
    images = torch.from_numpy(
        stacked[:, None].copy() if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2).copy()
    )
    label_tensor = None
    if labels is not None:
        label_tensor = torch.tensor(labels, dtype=torch.int64)[torch.tensor(groups)]
    dataset = ImageDataset(images, label_tensor, num_classes, name, crop_ids)
    dataset.groups = torch.tensor(groups, dtype=torch.int64)
    if any(held):
        dataset.held = torch.tensor(held)
    return dataset


def holds_out(root: Path) -> bool:
    """True when `root` has no train/ and test/ sub-folders, so its test split is the fixed
    10% held out of its images."""
    return not any((root / name).is_dir() for name in ("train", "test"))


def _class_dirs(folder: Path) -> list[str]:
    """Names of the visible sub-folders: each one is a class."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], list[int] | None]:
    """Image files in a sorted (deterministic) order, with labels when classes exist."""
    loose = _images_in(folder, recursive=False)
    if not classes:
        return loose, None
    if loose:
        raise UserError(
            f"{folder} mixes loose images ({loose[0].name}, ...) with class sub-folders "
            f"({', '.join(classes[:3])}, ...): move the loose images into a class folder"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_in(folder / name, recursive=True)
        files += found
        labels += [label] * len(found)
    return files, labels


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.suffix.lower() in EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _holdout(n: int, split: str) -> list[int]:
    """Fixed-seed choice of test images, so train and test never overlap across runs."""
    order = np.random.default_rng(_SEED).permutation(n)
    n_test = max(1, n // _TEST_FRACTION)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return sorted(int(i) for i in chosen)


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}): fix or delete that file") from None


def _decode(path: Path, mode: str, size: int) -> torch.Tensor:
    arr = np.asarray(square_resize(_open(path, mode), size))
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


def _ext_list() -> str:
    return "/".join(sorted(e.lstrip(".") for e in EXTENSIONS))
