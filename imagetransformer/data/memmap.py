"""Image sets too big for RAM: one raw uint8 file on disk, memory-mapped instead of read.

1.28M ImageNet images take 3.9 GB at 32x32 and 15.7 GB at 64x64. Decoding them into a tensor
on every start would cost minutes and that much RAM per process; a raw [N, C, H, W] cache file,
written once and mapped, loads in milliseconds and lets the OS page cache hold what is used.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write, fsync_dir, temp_file_beside
from .dataset import ImageDataset, _check_labels

CACHE_VERSION = 1
Shape = tuple[int, int, int, int]
# write(first_row, uint8 rows [k, C, H, W]): puts rows at their final place in the cache file.
RowWriter = Callable[[int, np.ndarray], None]
# fill(write) -> labels [N] (or None): produces every row once, in any order.
Fill = Callable[[RowWriter], np.ndarray | None]


class MemmapImageDataset(ImageDataset):
    """An ImageDataset whose uint8 [N, C, H, W] images stay in a read-only file mapping.

    It subclasses ImageDataset so the trainer, conform() and type hints take it unchanged, but
    skips that constructor, which needs every image in one in-memory tensor. batch() and
    __getitem__ copy out only the rows asked for. ``images`` is a lazily made, copy-free tensor
    over a private copy-on-write mapping of the same file: reads share the page cache, and an
    in-place write changes only this process's copy of those pages, never the file (a tensor
    over the read-only mapping would crash the process on a write instead). Labels are small
    and held in memory.
    """

    def __init__(
        self,
        path: Path,
        shape: Shape,
        labels: torch.Tensor | None,
        num_classes: int | None,
        name: str,
    ) -> None:
        n, c, h, w = (int(s) for s in shape)
        if c not in (1, 3) or min(n, h, w) < 1:
            raise ValueError(f"images must be [N>0, 1 or 3, H, W], got shape {tuple(shape)}")
        if labels is not None:
            labels = _check_labels(labels, n, num_classes)
            if num_classes is None:
                num_classes = int(labels.max()) + 1
        elif num_classes is not None:
            raise ValueError("num_classes given for an unlabelled dataset")
        self.path = Path(path)
        self._shape: Shape = (n, c, h, w)
        self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self._shape)
        self._view: torch.Tensor | None = None
        self.labels = labels
        self.num_classes = num_classes
        self.name = name

    @property  # a plain attribute in ImageDataset; made lazily here
    def images(self) -> torch.Tensor:
        """All images as one tensor, without copying them (see the class docstring)."""
        if self._view is None:
            private = np.memmap(self.path, dtype=np.uint8, mode="c", shape=self._shape)
            self._view = torch.from_numpy(private)
        return self._view

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image: the model is built from this."""
        return self._shape[1:]

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[i])
        return torch.from_numpy(np.array(self._array[i])), label

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather rows from the mapping: only the pages of these images are read."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        rows = np.asarray(self._array[indices.numpy()])  # fancy indexing copies just these
        labels = None if self.labels is None else self.labels[indices]
        return torch.from_numpy(rows), labels

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the path, not the mapping: pickling an np.memmap would copy every image."""
        return {**self.__dict__, "_array": None, "_view": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self._shape)

    def __repr__(self) -> str:
        n, c, h, w = self._shape
        classes = "unlabelled" if self.num_classes is None else f"{self.num_classes} classes"
        return f"MemmapImageDataset({self.name!r}, {n} x [{c}, {h}, {w}], {classes}, {self.path})"


def labels_path(images_path: Path) -> Path:
    return images_path.with_name(images_path.stem + "_labels.npy")


def sidecar_path(images_path: Path) -> Path:
    return images_path.with_suffix(".json")


def open_cache(
    path: Path, source: dict[str, Any], name: str, num_classes: int | None
) -> MemmapImageDataset | None:
    """The cached set if its sidecar vouches for ``source`` (the inputs' sizes/mtimes), else None.

    None (rebuild) covers every way a cache can be stale or partial: no sidecar, a sidecar for
    other inputs or an older format, or a data/labels file of the wrong size.
    """
    meta = _read_json(sidecar_path(path))
    if meta is None or meta.get("version") != CACHE_VERSION or meta.get("source") != _json(source):
        return None
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(_positive_int(s) for s in shape)):
        return None
    try:
        if path.stat().st_size != math.prod(shape):
            return None
        labels = None
        if meta.get("labelled"):
            array = np.load(labels_path(path), allow_pickle=False)
            if array.shape != (shape[0],) or array.dtype.kind not in "iu":
                return None
            labels = torch.from_numpy(array.astype(np.int64))
        return MemmapImageDataset(path, tuple(shape), labels, num_classes, name)
    except (OSError, ValueError):  # unreadable, or labels out of range: rebuild
        return None


def write_cache(
    path: Path,
    source: dict[str, Any],
    shape: Shape,
    fill: Fill,
    name: str,
    num_classes: int | None,
) -> MemmapImageDataset:
    """Build the cache through temp files renamed into place, then open it.

    The sidecar is removed first and written last, so a crash or a full disk mid-way never
    leaves files that a later load would trust.
    """
    need = math.prod(shape)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(path, prefix=path.name + ".", suffix=".part")
    except OSError as e:
        raise _write_error(path, need, e) from None
    try:
        with os.fdopen(fd, "r+b") as f:
            _reserve(f, need, path)
            writer = _Rows(f, shape, path)
            labels = fill(writer)
            if writer.written != shape[0]:
                raise ValueError(f"fill wrote {writer.written} of {shape[0]} rows")
            _flush(f, path, need)
        _install(path, tmp, labels, source, shape)
    finally:
        tmp.unlink(missing_ok=True)
    ds = open_cache(path, source, name, num_classes)
    if ds is None:
        raise UserError(f"the cache {path} did not read back after writing: delete it and retry")
    return ds


class _Rows:
    """The RowWriter for one cache file: seeks, so rows may arrive in any order (tar order)."""

    def __init__(self, f: IO[bytes], shape: Shape, path: Path) -> None:
        self.f, self.shape, self.path = f, shape, path
        self.row_bytes = math.prod(shape[1:])
        self.written = 0

    def __call__(self, start: int, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows must be uint8 [k, *{self.shape[1:]}], got {rows.shape}")
        if start < 0 or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {start}..{start + len(rows)} outside 0..{self.shape[0]}")
        try:
            self.f.seek(start * self.row_bytes)
            self.f.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        except OSError as e:
            raise _write_error(self.path, math.prod(self.shape), e) from None
        self.written += len(rows)


def _reserve(f: IO[bytes], size: int, path: Path) -> None:
    """Claim the disk space now, so a full disk fails at once, not after an hour of decoding."""
    try:
        if hasattr(os, "posix_fallocate"):  # not on macOS or Windows
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                return
            except OSError as e:  # some file systems cannot; a plain resize still works
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        f.truncate(size)
    except OSError as e:
        raise _write_error(path, size, e) from None


def _flush(f: IO[bytes], path: Path, size: int) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())  # the rename below must not publish data still in flight
    except OSError as e:
        raise _write_error(path, size, e) from None


def _install(
    path: Path, tmp: Path, labels: np.ndarray | None, source: dict[str, Any], shape: Shape
) -> None:
    """Rename the finished files into place; the sidecar goes last, as the mark of validity."""
    meta = {"version": CACHE_VERSION, "shape": list(shape), "labelled": labels is not None}
    meta["source"] = _json(source)
    try:
        sidecar_path(path).unlink(missing_ok=True)
        if labels is not None:
            atomic_write(labels_path(path), lambda f: np.save(f, labels, allow_pickle=False))
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the images are in place before the sidecar vouches for them
        atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(meta).encode()))
    except OSError as e:
        raise _write_error(path, math.prod(shape), e) from None


def _write_error(path: Path, size: int, e: OSError) -> UserError:
    return UserError(
        f"cannot write the decoded-image cache {path} ({e}): it needs {size / 1e9:.2f} GB in "
        f"{path.parent}; free space there or make it writable, or move the data files to a "
        "writable folder with room and load them from there"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _json(value: Any) -> Any:
    """What value reads back as from JSON (tuples become lists), for comparing with a sidecar."""
    return json.loads(json.dumps(value))


def _positive_int(x: Any) -> bool:
    return type(x) is int and x > 0
