"""CIFAR-10 from the original python-pickle release, read safely and without extracting.

The batches are pickles, and unpickling runs code named in the file; a restricted unpickler
allows only what a real batch holds (a dict of byte strings, a list of labels and one uint8
[N, 3072] array rebuilt the way numpy pickles it), so a tampered download cannot execute
anything, change any object outside the batch, or make numpy allocate from a forged size.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import UserError
from ..files import temp_file_beside
from .dataset import ImageDataset

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
    fd, tmp = temp_file_beside(dest, prefix=dest.name + ".", suffix=".part")
    os.close(fd)
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
                _check_size(path / name, (path / name).stat().st_size)
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
                    _check_size(f"{path}:{name}", member.size)
                    f = tar.extractfile(member)
                    if f is not None:
                        yield name, io.BytesIO(f.read())
    except _TAR_ERRORS as e:
        raise UserError(
            f"cannot read the archive {path} ({e}): it is damaged or not a tar.gz; "
            "delete it and re-download with --download"
        ) from None


def _check_size(where: object, size: int) -> None:
    """Refuse a batch far larger than a real one before reading it (a .gz can expand hugely)."""
    if size > MAX_BATCH_BYTES:
        raise UserError(
            f"{where} is {size:,} bytes, far more than a CIFAR-10 batch (about 31 MB): "
            "it is not the original file; delete it and re-download with --download"
        )


def _read_batch(stream: IO[bytes], where: str) -> dict[str, Any]:
    """Unpickle one batch with the restricted unpickler and check it has the CIFAR-10 layout."""
    try:
        raw = _BatchUnpickler(stream, where).load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise UserError(
            f"cannot unpickle {where} ({_short(e)}): the file is damaged; "
            "delete it and re-download with --download"
        ) from None
    if not isinstance(raw, dict):
        raise _not_cifar(where, "holds no dict")
    raw = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    data, labels = raw.get("data"), raw.get("labels")
    if not (
        type(data) is np.ndarray
        and data.dtype == np.uint8
        and data.ndim == 2
        and 1 <= data.shape[0] <= MAX_ROWS
        and data.shape[1] == ROW_BYTES
        and data.flags.c_contiguous
        and data.strides == (ROW_BYTES, 1)
    ):
        raise _not_cifar(where, "has no uint8 [N, 3072] 'data' array (N <= 10000)")
    if not _valid_labels(labels, data.shape[0]):
        raise _not_cifar(
            where, f"has no valid 'labels' list ({data.shape[0]} ints in 0..9, one per image)"
        )
    if not data.flags.owndata:  # shape checked above: the copy is at most one real batch
        data = data.copy(order="C")
    return {"data": data, "labels": np.asarray(labels, dtype=np.int64)}


def _valid_labels(labels: Any, n: int) -> bool:
    return (
        type(labels) is list
        and len(labels) == n
        and all(type(x) is int and 0 <= x <= 9 for x in labels)
    )


def _not_cifar(where: str, problem: str) -> UserError:
    return UserError(
        f"{where} {problem}: it is not a CIFAR-10 python batch (or it was tampered with); "
        "delete it and re-download cifar-10-python.tar.gz with --download"
    )


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join((value if isinstance(value, str) else repr(value)).split())  # one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- the restricted unpickler
#
# A real batch is a protocol-2 pickle of a dict holding byte strings, a list of small ints and
# one uint8 array, which numpy pickles as
#     _reconstruct(ndarray, (0,), b"b")  then BUILD with (1, shape, dtype, False, raw bytes)
#     dtype("u1", False, True)           then BUILD with (3, "|", None, None, None, -1, -1, 0)
# The unpickler below is the pure-Python one with a reduced opcode table: globals resolve to
# inert tokens, REDUCE calls only the checked constructors below (and bytes() for b""), BUILD
# applies only to the arrays and dtypes those made (once each, after checking the state against
# the real layout), and no opcode can call anything else. So a crafted file can neither run
# code, nor change any object outside the batch, nor make numpy allocate from a size it merely
# claims: an array is filled only from bytes already read, exactly rows * 3072 of them.

MAX_ROWS = 10_000  # images in one real batch; tests write smaller ones
ROW_BYTES = 3 * 32 * 32
MAX_BATCH_BYTES = 64 << 20  # a real batch file is about 31 MB
# Each pickle operation can create an object (an empty dict is 1 byte of pickle, 64 of memory):
# a budget keeps a small file from asking for gigabytes. A real batch takes about 30,000 (90,000
# when re-pickled by Python 3 at protocol 2).
MAX_OPCODES = 250_000


class _Global:
    """What find_class hands out: a name, not the object, so a pickle cannot call or mutate it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT = _Global("numpy._core.multiarray._reconstruct")
_NDARRAY = _Global("numpy.ndarray")
_DTYPE = _Global("numpy.dtype")
_ENCODE = _Global("_codecs.encode")
_BYTES = _Global("bytes")
_GLOBALS: dict[tuple[str, str], _Global] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy < 2 (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
    ("numpy", "ndarray"): _NDARRAY,  # only as _reconstruct's first argument
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _ENCODE,  # how Python 3 writes bytes at protocol 2
    ("__builtin__", "bytes"): _BYTES,  # ... and b"" (called without arguments)
    ("builtins", "bytes"): _BYTES,
}
_UINT8 = np.dtype(np.uint8)
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")

# Opcodes a batch never needs: they build objects from arbitrary classes (INST, OBJ, NEWOBJ*),
# reach other registries (PERSID, EXT*), use protocol-5 buffers, are protocol-0 text, or make
# sets (216 bytes of memory from 1 byte of pickle).
_REFUSED_OPCODES = (
    "INST OBJ NEWOBJ NEWOBJ_EX PERSID BINPERSID EXT1 EXT2 EXT4 BYTEARRAY8 NEXT_BUFFER "
    "READONLY_BUFFER INT LONG FLOAT STRING UNICODE GET PUT EMPTY_SET ADDITEMS FROZENSET"
).split()
_OPCODES = {op.name: ord(op.code) for op in pickletools.opcodes}


class _BatchUnpickler(pickle._Unpickler):  # the pure-Python one: its opcode table can be edited
    """Unpickles exactly what a CIFAR-10 batch holds, checking every call and BUILD; see above."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where
        self.unbuilt: dict[int, Any] = {}  # id -> array or dtype made here, awaiting its BUILD
        self.built_dtypes: dict[int, np.dtype] = {}
        self.opcodes_left = MAX_OPCODES

    def refuse(self, problem: str) -> UserError:
        return UserError(
            f"{self.where}: CIFAR-10 loader refuses {problem}: the file is not a CIFAR-10 batch "
            "(or was tampered with); delete it and re-download cifar-10-python.tar.gz "
            "with --download"
        )

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise self.refuse(f"to unpickle {_short(module)}.{_short(name)}") from None

    # -- calls

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if type(args) is not tuple:
            raise self.refuse(f"a call with arguments {_short(args)}")
        if func is _RECONSTRUCT:
            self.stack[-1] = self._reconstruct(args)
        elif func is _DTYPE:
            self.stack[-1] = self._dtype(args)
        elif func is _ENCODE:
            self.stack[-1] = self._encode(args)
        elif func is _BYTES and args == ():
            self.stack[-1] = b""
        else:  # numpy.ndarray(shape, dtype, buffer, offset, strides) lands here too
            raise self.refuse(f"to call {_short(func)}")

    def _reconstruct(self, args: tuple) -> np.ndarray:
        """numpy's own first step: an empty array that BUILD then fills."""
        if not (
            len(args) == 3
            and args[0] is _NDARRAY
            and type(args[1]) is tuple
            and len(args[1]) == 1
            and type(args[1][0]) is int
            and args[1][0] == 0
            and _is_one_of(args[2], "b", b"b")
        ):
            raise self.refuse(f"_reconstruct{_short(args)} (numpy writes (ndarray, (0,), 'b'))")
        array = np.empty(0, dtype=np.uint8)
        self.unbuilt[id(array)] = array
        return array

    def _dtype(self, args: tuple) -> np.dtype:
        if not (
            len(args) == 3
            and _is_one_of(args[0], "u1", b"u1")
            and _is_one_of(args[1], 0, 1)
            and _is_one_of(args[2], 0, 1)
        ):
            raise self.refuse(f"numpy.dtype{_short(args)}: CIFAR-10 data is uint8 ('u1')")
        dtype = np.dtype("u1", False, True)  # a private copy, never numpy's shared uint8
        self.unbuilt[id(dtype)] = dtype
        return dtype

    def _encode(self, args: tuple) -> bytes:
        if not (
            len(args) == 2
            and type(args[0]) is str
            and type(args[1]) is str
            and args[1].lower().replace("_", "-") in _LATIN1
        ):
            raise self.refuse(f"_codecs.encode{_short(args)}")
        return args[0].encode("latin1")

    # -- BUILD: only once, only on an array or dtype made above, only with the real layout

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if self.unbuilt.pop(id(inst), None) is not inst:
            raise self.refuse(
                f"BUILD on {_short(inst)} ({type(inst).__name__}): a batch only sets the state "
                "of the numpy arrays and dtypes it creates, once each"
            )
        if isinstance(inst, np.dtype):
            self._check_dtype_state(state)
            self.built_dtypes[id(inst)] = inst
        else:
            self._build_array(inst, state)

    def _check_dtype_state(self, state: Any) -> None:
        """The state numpy writes for uint8; it changes nothing, so it is checked, not applied."""
        if not (
            type(state) is tuple
            and len(state) in (8, 9)
            and _is_one_of(state[0], 3, 4)
            and _is_one_of(state[1], "|", b"|", "=", b"=", "<", b"<", ">", b">")
            and all(v is None for v in state[2:5])
            and all(type(v) is int for v in state[5:8])
            and (len(state) == 8 or state[8] is None)
        ):
            raise self.refuse(f"the numpy dtype state {_short(state)} (not uint8)")

    def _build_array(self, array: np.ndarray, state: Any) -> None:
        """Check the claimed shape against the limit and the bytes present, then fill."""
        if not (type(state) is tuple and len(state) == 5):
            raise self.refuse(f"the numpy array state {_short(state)}")
        version, shape, dtype, fortran, raw = state
        rows = shape[0] if type(shape) is tuple and len(shape) == 2 else None
        if not _is_one_of(version, 1):
            raise self.refuse(f"numpy array state version {_short(version)} (numpy writes 1)")
        if not (
            type(rows) is int
            and type(shape[1]) is int
            and 1 <= rows <= MAX_ROWS
            and shape[1] == ROW_BYTES
        ):
            raise self.refuse(
                f"a numpy array of shape {_short(shape)}: CIFAR-10 'data' is uint8 "
                f"[N, {ROW_BYTES}] with N <= {MAX_ROWS}"
            )
        if id(dtype) not in self.built_dtypes or self.built_dtypes[id(dtype)] is not dtype:
            raise self.refuse(
                f"a numpy array with dtype {_short(dtype)} not made by numpy.dtype('u1') and its "
                "BUILD in this file"
            )
        if not _is_one_of(fortran, False):
            raise self.refuse("a Fortran-ordered numpy array: CIFAR-10 data is C-contiguous")
        if not (type(raw) is bytes and len(raw) == rows * ROW_BYTES):
            size = len(raw) if type(raw) is bytes else type(raw).__name__
            raise self.refuse(
                f"a numpy array of shape {shape} stored in {size} bytes "
                f"(it needs exactly {rows * ROW_BYTES})"
            )
        array.__setstate__((1, (rows, ROW_BYTES), _UINT8, False, raw))

    # -- containers: only the built-in list and dict, never an object's own methods

    def _container(self, kind: type, opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) is not kind:
            raise self.refuse(f"{opcode} on {_short(target)} ({type(target).__name__})")
        return target

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._container(list, "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._container(list, "APPENDS").extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict, "SETITEM")[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]


def _is_one_of(value: Any, *options: Any) -> bool:
    """value equals an option and is a plain str, bytes, int or bool (never an array)."""
    return type(value) in (str, bytes, int, bool) and value in options


def _counted(load: Any) -> Any:
    def counted(self: _BatchUnpickler) -> None:
        self.opcodes_left -= 1
        if self.opcodes_left < 0:
            raise self.refuse(
                f"more than {MAX_OPCODES:,} pickle operations (a real batch needs about 30,000)"
            )
        load(self)

    return counted


def _refuse_opcode(name: str) -> Any:
    def load(self: _BatchUnpickler) -> None:
        raise self.refuse(f"the pickle opcode {name}, which no CIFAR-10 batch uses")

    return load


for _name in _REFUSED_OPCODES:
    _BatchUnpickler.dispatch[_OPCODES[_name]] = _refuse_opcode(_name)
for _name, _load in {
    "REDUCE": _BatchUnpickler._load_reduce,
    "BUILD": _BatchUnpickler._load_build,
    "APPEND": _BatchUnpickler._load_append,
    "APPENDS": _BatchUnpickler._load_appends,
    "SETITEM": _BatchUnpickler._load_setitem,
    "SETITEMS": _BatchUnpickler._load_setitems,
}.items():
    _BatchUnpickler.dispatch[_OPCODES[_name]] = _load
_BatchUnpickler.dispatch = {code: _counted(load) for code, load in _BatchUnpickler.dispatch.items()}
