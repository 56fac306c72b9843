"""CIFAR-10 from the original python-pickle release, read safely and without extracting.

The batches are pickles, and unpickling runs code named in the file; a restricted unpickler
allows only what a real batch holds, so a tampered download cannot execute anything.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import UserError
from .dataset import ImageDataset

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray

NAME = "cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
_TAR_ERRORS = (OSError, tarfile.TarError, EOFError, zlib.error)
SPLIT_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def load(split: str, root: Path, download: bool = False) -> ImageDataset:
    """Load a split from <root>/cifar10/, downloading the archive first if asked to."""
    folder = root / NAME
    if (folder / BATCH_DIR).is_dir():
        return load_path(folder / BATCH_DIR, split)
    if not (folder / ARCHIVE).is_file():
        if not download:
            raise UserError(
                f"CIFAR-10 not found: looked for {folder / ARCHIVE} and {folder / BATCH_DIR}; "
                f"pass --download to fetch it, or put {ARCHIVE} there "
                "(or point the data root / IMAGETRANSFORMER_DATA at another folder)"
            )
        download_archive(folder / ARCHIVE)
    return load_path(folder / ARCHIVE, split)


def is_cifar_path(path: Path) -> bool:
    """True for a CIFAR-10 .tar.gz, a cifar-10-batches-py folder, or a folder holding either."""
    if path.is_file():
        return path.name.endswith((".tar.gz", ".tgz")) and _archive_has_batches(path)
    if not path.is_dir():
        return False
    return _is_batch_dir(path) or (path / BATCH_DIR).is_dir() or (path / ARCHIVE).is_file()


def load_path(path: Path, split: str) -> ImageDataset:
    """Load a split from an archive, a batch folder, or a folder that contains one of them."""
    if path.is_dir() and not _is_batch_dir(path):
        path = path / BATCH_DIR if (path / BATCH_DIR).is_dir() else path / ARCHIVE
    wanted = SPLIT_BATCHES[split]
    found: dict[str, dict[Any, Any]] = {}
    for name, stream in _batch_streams(path, wanted):
        found[name] = _read_batch(stream, f"{path}:{name}")
    missing = [n for n in wanted if n not in found]
    if missing:
        raise UserError(
            f"{path} lacks CIFAR-10 batch(es) {', '.join(missing)}: it is incomplete; "
            f"delete it and re-download with --download"
        )
    images = np.concatenate([found[n]["data"] for n in wanted]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([found[n]["labels"] for n in wanted])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), 10, NAME)


def download_archive(dest: Path) -> None:
    """Download to a temp file beside dest, check the MD5, then rename into place atomically.

    A crash or a bad download never leaves a partial or wrong file where loading would find it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _fetch(URL, tmp)
        except OSError as e:
            raise UserError(
                f"downloading {URL} failed ({e}): check the network, or download it by hand "
                f"and put it at {dest}"
            ) from None
        digest = _md5(tmp)
        if digest != MD5:
            raise UserError(
                f"downloaded {URL} has MD5 {digest}, expected {MD5}: refusing it; retry, "
                f"or download it by hand and put it at {dest}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch(url: str, path: Path) -> None:
    """Stream url into path (the only network access; tests replace it)."""
    print(f"downloading {url} ...", flush=True)
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_batch_dir(path: Path) -> bool:
    return (path / "data_batch_1").is_file() or (path / "test_batch").is_file()


def _archive_has_batches(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if Path(member.name).name in ("data_batch_1", "test_batch"):
                    return True
    except _TAR_ERRORS:
        return False
    return False


def _batch_streams(path: Path, wanted: tuple[str, ...]) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield (batch name, readable stream) for the wanted batches, in one pass over a tar."""
    if path.is_dir():
        for name in wanted:
            if (path / name).is_file():
                with open(path / name, "rb") as f:
                    yield name, f
        return
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a CIFAR-10 .tar.gz or {BATCH_DIR} folder")
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # sequential: a .gz cannot seek cheaply
                name = Path(member.name).name
                if member.isfile() and name in wanted:
                    f = tar.extractfile(member)
                    if f is not None:
                        yield name, io.BytesIO(f.read())
    except _TAR_ERRORS as e:
        raise UserError(
            f"cannot read the archive {path} ({e}): it is damaged or not a tar.gz; "
            "delete it and re-download with --download"
        ) from None


def _read_batch(stream: IO[bytes], where: str) -> dict[str, Any]:
    """Unpickle one batch with the restricted unpickler and check it has the CIFAR-10 layout."""
    try:
        raw = _BatchUnpickler(stream, encoding="bytes").load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise UserError(
            f"cannot unpickle {where} ({e!r}): the file is damaged; "
            "delete it and re-download with --download"
        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{where} is not a CIFAR-10 batch (not a dict): use the python version")
    raw = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    data, labels = raw.get("data"), raw.get("labels")
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise UserError(
            f"{where} has no uint8 [N, 3072] 'data' array: it is not a CIFAR-10 "
            "python batch; use cifar-10-python.tar.gz"
        )
    if not _valid_labels(labels, data.shape[0]):
        raise UserError(
            f"{where} has no valid 'labels' list (N ints in 0..9): "
            "it is not a CIFAR-10 python batch; use cifar-10-python.tar.gz"
        )
    return {"data": data, "labels": np.asarray(labels, dtype=np.int64)}


def _valid_labels(labels: Any, n: int) -> bool:
    return (
        isinstance(labels, list)
        and len(labels) == n
        and all(type(x) is int and 0 <= x <= 9 for x in labels)
    )


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles of bytes call (_codecs.encode), limited to that one use."""
    normalized = str(encoding).lower().replace("-", "").replace("_", "")
    if not isinstance(text, str) or normalized not in ("latin1", "iso88591"):
        raise UserError(
            "CIFAR-10 loader refuses this _codecs.encode call: "
            "the file is not a CIFAR-10 batch; use the original archive"
        )
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = _multiarray.scalar


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR-10 batch needs (numpy arrays); refuses all others."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UserError(
                f"CIFAR-10 loader refuses to unpickle {module}.{name}: the file is not a "
                "CIFAR-10 batch (or was tampered with); use the original cifar-10-python.tar.gz"
            ) from None
