"""Downsampled ImageNet at 32x32 and 64x64, read from the original distribution files.

Two different releases exist, with different images, so they are different names:
- ``imagenet32``/``imagenet64``: van den Oord et al. 2016 (PixelRNN), unlabelled; the set the
  Image Transformer paper and most generative-model papers report bits/dim on. Tar archives of
  PNGs (``train_32x32.tar``, ``valid_32x32.tar``) or the folders they extract to.
- ``imagenet32_labelled``/``imagenet64_labelled``: Chrabaszcz et al. 2017, 1000 classes; npz
  batches ``train_data_batch_1`` .. ``_10`` and ``val_data``.

Both need an image-net.org login, so there is no download. On first load a split is converted
into a raw uint8 cache file beside the data and memory-mapped from then on (see memmap.py):
1.28M images are never decoded twice nor held in RAM twice.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from .dataset import ImageDataset
from .memmap import MemmapImageDataset, RowWriter, open_cache, write_cache

NAMES = ("imagenet32", "imagenet64", "imagenet32_labelled", "imagenet64_labelled")
NUM_CLASSES = 1000
TRAIN_BATCHES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
VAL_BATCH = "val_data"
_PNG_SPLIT = {"train": "train", "test": "valid"}  # our split -> archive prefix
_PNG_NAME = re.compile(r"(train|valid)_(32|64)x\2(\.tar)?")
_NPZ_NAME = re.compile(r"(train_data_batch_\d+|val_data)(\.npz)?")
_SIDE_BY_ROW = {3 * s * s: s for s in (32, 64)}
_CHUNK_BYTES = 64 << 20  # npz rows are copied to the cache this many bytes at a time
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, zipfile.BadZipFile)


def loader(name: str) -> Callable[[str, Path, bool], ImageDataset]:
    """The loader of the registry's record `name`: files under <root>/<name>/ (download is
    impossible)."""
    side = int(name[len("imagenet") :][:2])

    def load(split: str, root: Path, download: bool = False) -> ImageDataset:
        if name.endswith("_labelled"):
            return _load_npz(root / name, split, side)
        return _load_png(root / name, split, side)

    return load


def is_imagenet_path(path: Path) -> bool:
    """True for a tar/folder/npz batch of either release, or a folder that holds them."""
    return _locate(path) is not None


def load_path(path: Path, split: str) -> ImageDataset:
    """Load a split given any of its files or their folder; the split picks the sibling file."""
    found = _locate(path)
    if found is None:
        raise UserError(
            f"{path} holds no Downsampled ImageNet files: give train_32x32.tar (or its "
            "folder, or the 64x64 ones) or a train_data_batch_1[.npz] / val_data[.npz] batch"
        )
    kind, folder, side = found
    if kind == "png":
        if side == 0:
            raise UserError(
                f"{folder} holds both the 32x32 and the 64x64 archives: give the path of the "
                "one you want, e.g. its train_64x64.tar"
            )
        return _load_png(folder, split, side)
    return _load_npz(folder, split, None)


def _locate(path: Path) -> tuple[str, Path, int] | None:
    """(kind "png"/"npz", data folder, side; 0 = both sides present) for a path, or None."""
    match = _PNG_NAME.fullmatch(path.name)
    if match and (path.is_file() or path.is_dir()):
        return "png", path.parent, int(match[2])
    if _NPZ_NAME.fullmatch(path.name) and path.is_file():
        return "npz", path.parent, 0
    if not path.is_dir():
        return None
    sides = [s for s in (32, 64) if any(_png_source(path, split, s) for split in _PNG_SPLIT)]
    if sides:
        return "png", path, sides[0] if len(sides) == 1 else 0
    if _find_batch(path, TRAIN_BATCHES[0]) or _find_batch(path, VAL_BATCH):
        return "npz", path, 0
    return None


# ------------------------------------------------------------- van den Oord: tar of PNGs


def _load_png(folder: Path, split: str, side: int) -> ImageDataset:
    name = f"imagenet{side}"
    source = _png_source(folder, split, side)
    if source is None:
        stem = f"{_PNG_SPLIT[split]}_{side}x{side}"
        raise UserError(
            f"ImageNet {side}x{side} (van den Oord et al., unlabelled) {split} split not found: "
            f"looked for {folder / stem}.tar and {folder / stem}/; it needs an image-net.org "
            f"login, so --download cannot fetch it: download train_{side}x{side}.tar and "
            f"valid_{side}x{side}.tar "
            f"from image-net.org (Downsampled ImageNet) and put them in {folder} "
            "(or point the data root / IMAGETRANSFORMER_DATA at the folder above it)"
        )
    files = _png_files(source) if source.is_dir() else None
    signature = _signature(folder, [source], count=None if files is None else len(files))
    cache = folder / f"{name}_{split}.u8"
    ds = open_cache(cache, signature, name, None)
    if ds is not None:
        return ds
    tqdm.write(f"decoding {source} into {cache} (once; later loads map it)")
    if files is not None:
        return _cache_folder(source, files, side, cache, signature, name)
    return _cache_tar(source, side, cache, signature, name)


def _png_source(folder: Path, split: str, side: int) -> Path | None:
    """The split's tar, else its extracted folder; None when neither is there."""
    stem = f"{_PNG_SPLIT[split]}_{side}x{side}"
    if (folder / f"{stem}.tar").is_file():
        return folder / f"{stem}.tar"
    return folder / stem if (folder / stem).is_dir() else None


def _cache_folder(
    source: Path, files: list[str], side: int, cache: Path, signature: dict[str, Any], name: str
) -> MemmapImageDataset:
    if not files:
        raise UserError(f"{source} holds no .png files: re-extract its tar archive")

    def fill(write: RowWriter) -> None:
        for i, file in enumerate(tqdm(files, desc=f"decoding {name}", unit="img")):
            try:
                data = (source / file).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {source / file} ({e}): re-extract it") from None
            write(i, _decode_png(data, side, str(source / file))[None])

    return write_cache(cache, signature, (len(files), 3, side, side), fill, name, None)


def _cache_tar(
    archive: Path, side: int, cache: Path, signature: dict[str, Any], name: str
) -> MemmapImageDataset:
    """Two streaming passes: list the PNG members, then decode each into its sorted-name row.

    Rows follow member names, not archive order, so the order is the same however the tar was
    made; reading stays sequential and only one PNG is in memory at a time.
    """
    with _read_tar(archive) as tar:
        members = [m for m in tar if m.isfile() and _is_png(m.name)]
        if not members:
            raise UserError(f"{archive} holds no .png files: not the PNG archive; re-download it")
        order = sorted(range(len(members)), key=lambda i: members[i].name)
        row = [0] * len(members)
        for r, i in enumerate(order):
            row[i] = r

        def fill(write: RowWriter) -> None:
            bar = tqdm(
                zip(members, row, strict=True),
                total=len(members),
                desc=f"decoding {name}",
                unit="img",
            )
            for member, r in bar:
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                write(r, _decode_png(data, side, f"{archive}:{member.name}")[None])

        shape = (len(members), 3, side, side)
        return write_cache(cache, signature, shape, fill, name, None)


def _decode_png(data: bytes, side: int, where: str) -> np.ndarray:
    """One PNG as uint8 [3, side, side]; anything else means a damaged or wrong archive."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (side, side):
                raise UserError(
                    f"{where} is {image.size[0]}x{image.size[1]}, not {side}x{side}: "
                    f"this is not the {side}x{side} archive; use the matching one"
                )
            arr = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot decode {where} ({e}): the data is damaged; re-download it"
        ) from None
    return arr.transpose(2, 0, 1)


def _png_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _is_png(e.name) and e.is_file())


def _is_png(member: str) -> bool:
    base = member.rsplit("/", 1)[-1]
    return base.lower().endswith(".png") and not base.startswith(".")  # skip macOS ._ files


@contextmanager
def _read_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """tarfile.open whose read errors, on opening or later, become a UserError naming the fix."""
    try:
        with tarfile.open(path, "r:*") as tar:
            yield tar
    except _READ_ERRORS as e:
        raise UserError(
            f"cannot read {path} ({e}): it is damaged or not a tar; re-download"
        ) from None


# ------------------------------------------------------------- Chrabaszcz: npz batches


def _load_npz(folder: Path, split: str, side: int | None) -> ImageDataset:
    """side None: take it from the files (a direct path); else they must have that side."""
    wanted = TRAIN_BATCHES if split == "train" else (VAL_BATCH,)
    files = [_find_batch(folder, b) for b in wanted]
    missing = [b for b, f in zip(wanted, files, strict=True) if f is None]
    if missing:
        what = f"ImageNet {side}x{side}" if side else "Downsampled ImageNet"
        raise UserError(
            f"{what} (Chrabaszcz et al., labelled) {split} split incomplete: {folder} (or a "
            f"folder in it) lacks {', '.join(missing)} (.npz or no suffix); it needs an "
            "image-net.org login, so --download cannot fetch it: download the npz version "
            f"from image-net.org (Downsampled ImageNet), unzip it and put the files in {folder}"
        )
    paths = [f for f in files if f is not None]
    rows = [_data_rows(p) for p in paths]
    sides = {s for _, s in rows}
    if len(sides) > 1:
        raise UserError(f"{folder} mixes 32x32 and 64x64 batches: keep each size in its own folder")
    found = sides.pop()
    if side is not None and found != side:
        raise UserError(
            f"{folder} holds {found}x{found} batches, but imagenet{side}_labelled is "
            f"{side}x{side}: move them to imagenet{found}_labelled/ beside it"
        )
    side = found
    name = f"imagenet{side}_labelled"
    cache = folder / f"{name}_{split}.u8"
    signature = _signature(folder, paths)
    ds = open_cache(cache, signature, name, NUM_CLASSES)
    if ds is not None:
        return ds
    tqdm.write(f"converting {len(paths)} npz batch(es) in {folder} into {cache} (once)")
    total = sum(n for n, _ in rows)

    def fill(write: RowWriter) -> np.ndarray:
        labels, start = [], 0
        with tqdm(total=total, desc=f"converting {name}", unit="img") as bar:
            for path, (n, _) in zip(paths, rows, strict=True):
                _copy_batch(path, start, side, write, bar.update)
                labels.append(_batch_labels(path, n))
                start += n
        return np.concatenate(labels)

    return write_cache(cache, signature, (total, 3, side, side), fill, name, NUM_CLASSES)


def _find_batch(folder: Path, stem: str) -> Path | None:
    """stem or stem.npz in folder, else in a folder inside it (as the zips unpack)."""
    if not folder.is_dir():
        return None
    for where in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        for name in (f"{stem}.npz", stem):
            if (where / name).is_file():
                return where / name
    return None


def _data_rows(path: Path) -> tuple[int, int]:
    """(images, side) from the 'data' array's header, without decompressing the array."""
    with _npz_member(path, "data") as f:
        n, row = _npy_header(f, path)
    side = _SIDE_BY_ROW.get(row)
    if side is None:
        raise UserError(
            f"{path} rows hold {row} bytes, not 3x32x32 or 3x64x64: it is not a "
            "Downsampled ImageNet batch; re-download the npz version"
        )
    return n, side


def _copy_batch(
    path: Path, start: int, side: int, write: RowWriter, progress: Callable[[int], Any]
) -> None:
    """Stream 'data' rows into the cache in chunks: a 64x64 batch is 1.6 GB uncompressed.

    Rows are channel-major (all R, then G, then B, each row-major), i.e. already [3, S, S].
    """
    row = 3 * side * side
    per_chunk = max(1, _CHUNK_BYTES // row)
    with _npz_member(path, "data") as f:
        n, _ = _npy_header(f, path)
        done = 0
        while done < n:
            k = min(per_chunk, n - done)
            buf = _read_or_fail(f, k * row, path)
            write(start + done, np.frombuffer(buf, dtype=np.uint8).reshape(k, 3, side, side))
            done += k
            progress(k)


def _batch_labels(path: Path, n: int) -> np.ndarray:
    """The 1-based labels 1..1000 of the release, as 0-based int16."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = np.asarray(npz["labels"])
    except KeyError:
        raise UserError(f"{path} has no 'labels' array: re-download the npz version") from None
    except (*_READ_ERRORS, ValueError) as e:
        raise UserError(f"cannot read the labels in {path} ({e}): re-download it") from None
    if labels.dtype.kind not in "iu" or labels.reshape(-1).shape != (n,):
        raise UserError(f"{path} 'labels' is not {n} integers: re-download the npz version")
    labels = labels.reshape(-1)
    if labels.min() < 1 or labels.max() > NUM_CLASSES:
        raise UserError(
            f"{path} labels span {labels.min()}..{labels.max()}, not 1..{NUM_CLASSES} as in the "
            "original release: use the unmodified npz files"
        )
    return (labels - 1).astype(np.int16)


@contextmanager
def _npz_member(path: Path, key: str) -> Iterator[IO[bytes]]:
    """One array of an npz as a stream (no decompressing it all); errors name the fix."""
    try:
        archive = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise UserError(
            f"cannot open {path} as npz ({e}): it may be the older pickle release; "
            "download the npz version from image-net.org (Downsampled ImageNet)"
        ) from None
    with archive:
        try:
            stream = archive.open(f"{key}.npy")
        except KeyError:
            raise UserError(
                f"{path} has no '{key}' array: it is not a Downsampled ImageNet batch; "
                "re-download the npz version"
            ) from None
        try:
            with stream:
                yield stream
        except _READ_ERRORS as e:
            raise UserError(f"cannot read {path} ({e}): it is damaged; re-download it") from None


def _npy_header(f: IO[bytes], path: Path) -> tuple[int, int]:
    """(rows, bytes per row) of a C-order uint8 2-D .npy stream; leaves f at the first row."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise UserError(f"{path} 'data' is not a valid .npy array ({e}): re-download it") from None
    if dtype != np.uint8 or len(shape) != 2 or (fortran and shape[0] > 1):
        raise UserError(
            f"{path} 'data' is {dtype} {shape}{' Fortran-order' if fortran else ''}, not uint8 "
            "rows [N, 3*S*S]: it is not a Downsampled ImageNet batch; re-download it"
        )
    return int(shape[0]), int(shape[1])


def _read_or_fail(f: IO[bytes], size: int, path: Path) -> bytes:
    buf = f.read(size)
    if len(buf) != size:
        raise UserError(f"{path} ends early: it is truncated; re-download it")
    return buf


# ------------------------------------------------------------- shared


def _signature(folder: Path, sources: list[Path], count: int | None = None) -> dict[str, Any]:
    """What the cache was built from: names (relative, so the folder may move), sizes, mtimes.

    An extracted folder (the one source then) is summarised by ``count``, its PNG count, and
    its mtime (changes when files are added, removed or renamed), not by stat-ing 1.28M files
    on every load.
    """
    entries = []
    for path in sources:
        stat = path.stat()
        size = stat.st_size if count is None else count
        entries.append([_relative(path, folder), size, stat.st_mtime_ns])
    return {"files": entries}


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)
