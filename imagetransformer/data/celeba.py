"""CelebA (aligned faces), read from its original distribution layout, as in the Image Transformer.

The set is a folder holding ``img_align_celeba/`` (JPEGs ``000001.jpg`` ..., each 178 wide by
218 high) and ``list_eval_partition.txt`` (lines ``000001.jpg 0``; 0 train, 1 valid, 2 test),
or the Kaggle copy's ``list_eval_partition.csv`` (header ``image_id,partition``; its images may
sit one folder deeper, in ``img_align_celeba/img_align_celeba/``). Our ``train`` split is
partition 0 and ``test`` is partition 2; partition 1 (valid) is not used, as the package has
only train and test splits.

Preprocessing follows tensor2tensor's CelebA problems, which the paper's CelebA results use:
crop 40 px from top and bottom and 20 px from left and right (218x178 -> the 138x138 face),
then area-resize to ``image_size`` (PIL BOX; BOX also makes any size above 138). Each size is
decoded from the JPEGs, never resized from another size's copy, into its own memory-mapped
uint8 cache beside the data (see memmap.py), so 200k JPEGs are decoded once per size.

CelebA is only shared through Google Drive and Baidu, so there is no download.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from .dataset import ImageDataset
from .memmap import RowWriter, open_cache, write_cache
from .resize import check_options

NAME = "celeba"
PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGE_DIR = "img_align_celeba"
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")  # official, Kaggle
CSV_HEADER = ["image_id", "partition"]
DEFAULT_SIZE = 32
ALIGNED_SIZE = (178, 218)  # (width, height) of every aligned image
CROP_BOX = (20, 40, 158, 178)  # PIL (left, top, right, bottom): the 138x138 face, as tensor2tensor
PARTITION = {"train": 0, "test": 2}  # our split -> CelebA partition; 1 (valid) is unused
_CHUNK = 256  # images decoded in parallel, then written to the cache, at a time
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load(
    split: str, root: Path, download: bool = False, image_size: int | None = None
) -> ImageDataset:
    """The registry's loader (`DataSet.load`): the set in <root>/celeba/, else in root itself
    (no download)."""
    folder = root / NAME
    if _celeba_folder(folder) is None and _celeba_folder(root) is not None:
        folder = root
    if _celeba_folder(folder) is None:
        raise _not_found(folder)
    return load_path(folder, split, image_size)


def is_celeba_path(path: Path) -> bool:
    """True for a folder holding img_align_celeba/ or a partition file, or for that image folder."""
    return _celeba_folder(path) is not None


def load_path(path: Path, split: str, image_size: int | None = None) -> ImageDataset:
    """Load a split at ``image_size`` (default 32) from a CelebA folder or its image folder."""
    check_options(image_size, None)
    size = DEFAULT_SIZE if image_size is None else image_size
    folder = _celeba_folder(path)
    if folder is None:
        raise _not_found(path)
    partition = _partition_file(folder)
    images = _image_dir(folder)
    names = _read_partition(partition)[PARTITION[split]]
    if not names:
        raise UserError(
            f"{partition} lists no image in partition {PARTITION[split]} ({split}): it is not "
            f"CelebA's evaluation partition; download it again from {PAGE}"
        )
    cache = folder / f"{NAME}{size}_{split}.u8"
    signature = _signature(folder, partition, images, size)
    ds = open_cache(cache, signature, NAME, None)
    if ds is not None:
        return ds
    _check_present(images, names, partition)
    tqdm.write(f"decoding {len(names)} CelebA images in {images} into {cache} (once per size)")

    def fill(write: RowWriter) -> None:
        _decode_all(images, names, size, write)

    return write_cache(cache, signature, (len(names), 3, size, size), fill, NAME, None)


# ------------------------------------------------------------- finding the files


def _celeba_folder(path: Path) -> Path | None:
    """The CelebA folder a path names (it, or the folder above img_align_celeba/), or None."""
    if not path.is_dir():
        return None
    if (path / IMAGE_DIR).is_dir() or _find_partition(path) is not None:
        return path
    if path.name == IMAGE_DIR and _find_partition(path.parent) is not None:
        return path.parent
    return None


def _find_partition(folder: Path) -> Path | None:
    return next((folder / f for f in PARTITION_FILES if (folder / f).is_file()), None)


def _partition_file(folder: Path) -> Path:
    found = _find_partition(folder)
    if found is None:
        raise UserError(
            f"CelebA partition file missing: {folder} has no {PARTITION_FILES[0]} (nor the "
            f"Kaggle {PARTITION_FILES[1]}); download {PARTITION_FILES[0]} (in Eval/) from the "
            f"official CelebA page, {PAGE}, and put it in {folder}"
        )
    return found


def _image_dir(folder: Path) -> Path:
    """img_align_celeba/, or the img_align_celeba/img_align_celeba/ the Kaggle zip unpacks to."""
    images = folder / IMAGE_DIR
    if (images / IMAGE_DIR).is_dir():
        return images / IMAGE_DIR
    if not images.is_dir():
        raise UserError(
            f"CelebA images missing: {images}/ does not exist; download img_align_celeba.zip "
            f"(Align&Cropped Images, the JPEG version) from the official CelebA page, {PAGE}, "
            f"and unzip it in {folder}"
        )
    return images


def _not_found(folder: Path) -> UserError:
    return UserError(
        f"CelebA not found: looked for {folder / IMAGE_DIR}/ and {folder / PARTITION_FILES[0]}; "
        "it is only shared through Google Drive, so --download cannot fetch it: "
        "download img_align_celeba.zip (Align&Cropped Images) and Eval/"
        f"{PARTITION_FILES[0]} from the official CelebA page, {PAGE}, unzip the images into "
        f"{folder / IMAGE_DIR}/ and put the partition file beside it "
        "(or point the data root / IMAGETRANSFORMER_DATA at the folder above it)"
    )


# ------------------------------------------------------------- the partition file


def _read_partition(path: Path) -> dict[int, list[str]]:
    """Image names by partition 0/1/2, in file order; any malformed line names the fix."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM would break the csv header
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}): download it again from {PAGE}") from None
    rows = _csv_rows(path, text) if path.suffix == ".csv" else _txt_rows(text)
    parts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    seen: set[str] = set()
    for line, fields in rows:
        name, part = _parse_row(path, line, fields)
        if name in seen:
            raise UserError(f"{path} line {line} lists {name} twice: download it again from {PAGE}")
        seen.add(name)
        parts[part].append(name)
    return parts


def _txt_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    for line, row in enumerate(text.splitlines(), start=1):
        if row.strip():
            yield line, row.split()


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header != CSV_HEADER:
        raise UserError(
            f"{path} starts with {','.join(header)!r}, not {','.join(CSV_HEADER)!r}: it is not "
            f"the Kaggle CelebA partition file; use {PARTITION_FILES[0]} from {PAGE}"
        )
    for line, row in enumerate(reader, start=2):
        if any(f.strip() for f in row):
            yield line, [f.strip() for f in row]


def _parse_row(path: Path, line: int, fields: list[str]) -> tuple[str, int]:
    """(image name, partition) of one row; a path in the name could escape the image folder."""
    ok = len(fields) == 2 and fields[1] in ("0", "1", "2")
    if not ok or fields[0] != Path(fields[0]).name or fields[0] in (".", ".."):
        raise UserError(
            f"{path} line {line} is {' '.join(fields)!r}, not '<image>.jpg <0|1|2>': it is not "
            f"CelebA's list_eval_partition; download it again from {PAGE}"
        )
    return fields[0], int(fields[1])


# ------------------------------------------------------------- decoding


def _check_present(images: Path, names: list[str], partition: Path) -> None:
    """Fail before decoding for minutes: one listing of the folder, not a stat per image."""
    with os.scandir(images) as entries:
        present = {e.name for e in entries}
    missing = [n for n in names if n not in present]
    if missing:
        shown = ", ".join(str(images / n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"CelebA image(s) listed in {partition} missing: {shown}{more}; unzip "
            f"img_align_celeba.zip again (from {PAGE}) or use its matching partition file"
        )


def _decode_all(images: Path, names: list[str], size: int, write: RowWriter) -> None:
    """Decode in threads (PIL releases the GIL while decoding), write rows in file order."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(names), desc="decoding celeba") as bar:
        for start in range(0, len(names), _CHUNK):
            chunk = [images / n for n in names[start : start + _CHUNK]]
            write(start, np.stack(list(pool.map(lambda p: _decode(p, size), chunk))))
            bar.update(len(chunk))


def _decode(path: Path, size: int) -> np.ndarray:
    """One aligned CelebA JPEG as uint8 [3, size, size]: the 138x138 face, area-resized."""
    try:
        with Image.open(path) as image:
            if image.size != ALIGNED_SIZE:
                w, h = image.size
                raise UserError(
                    f"{path} is {w}x{h} (width x height), not 178x218: CelebA needs the aligned "
                    f"images of img_align_celeba.zip (not the in-the-wild or resized ones); "
                    f"download them from {PAGE}"
                )
            face = image.convert("RGB").crop(CROP_BOX).resize((size, size), Image.BOX)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: unzip img_align_celeba.zip again") from None
    except _DECODE_ERRORS as e:
        raise UserError(
            f"cannot decode {path} ({e}): it is damaged; unzip img_align_celeba.zip again"
        ) from None
    return np.asarray(face).transpose(2, 0, 1)


def _signature(folder: Path, partition: Path, images: Path, size: int) -> dict[str, Any]:
    """What a cache was built from: the partition file, the image folder's mtime (it changes
    when images are added, removed or renamed; stat-ing 200k files per load would be slow),
    and the preprocessing."""
    entries = []
    for path in (partition, images):
        stat = path.stat()
        size_or_kind = stat.st_size if path.is_file() else "dir"
        entries.append([path.relative_to(folder).as_posix(), size_or_kind, stat.st_mtime_ns])
    return {"files": entries, "crop": list(CROP_BOX), "size": size, "resample": "box"}
