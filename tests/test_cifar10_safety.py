"""CIFAR-10 loader against crafted batches: forged sizes, BUILD on globals, wrong layouts.

Files are written in the real containers (a .tar.gz holding cifar-10-batches-py/<batch>, and
the extracted folder); pickles are either written by pickle.dump or assembled opcode by opcode
the way Python 2's cPickle wrote the original release (protocol 2, byte-string keys).
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from imagetransformer.data import cifar10
from imagetransformer.errors import UserError

ROW = 3072
ROWS = 20
CONTAINERS = ("tar", "dir")

# ---------------------------------------------------------------- pickle assembly


def _int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    return b"\x8a" + bytes([8]) + i.to_bytes(8, "little", signed=True)  # LONG1


def _str(b: bytes) -> bytes:
    """A Python 2 str (loaded as bytes with encoding='bytes')."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<I", len(b)) + b


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _list(items: list[bytes]) -> bytes:
    return b"](" + b"".join(items) + b"e"


def _dtype(name: bytes = b"u1", state: bytes | None = None) -> bytes:
    """numpy.dtype('u1', 0, 1) then BUILD with the state numpy writes for uint8."""
    if state is None:
        state = _tuple(_int(3), _str(b"|"), b"N", b"N", b"N", _int(-1), _int(-1), _int(0))
    return _glob("numpy", "dtype") + _tuple(_str(name), _int(0), _int(1)) + b"R" + state + b"b"


def _reconstructed(
    shape: tuple[int, ...], raw: bytes, dtype: bytes | None = None, fortran: bytes = b"\x89"
) -> bytes:
    """An array the way numpy pickles one: _reconstruct(ndarray, (0,), 'b') + BUILD state."""
    state = _tuple(_int(1), _tuple(*map(_int, shape)), dtype or _dtype(), fortran, _str(raw))
    return _reconstruct_head() + state + b"b"


def _reconstruct_head() -> bytes:
    args = _tuple(_glob("numpy", "ndarray"), _tuple(_int(0)), _str(b"b"))
    return _glob("numpy.core.multiarray", "_reconstruct") + args + b"R"


def _ndarray_call(shape: tuple[int, ...], buffer: bytes, strides: tuple[int, ...]) -> bytes:
    """The forgery: numpy.ndarray(shape, dtype, buffer, offset, strides) called directly."""
    args = _tuple(
        _tuple(*map(_int, shape)), _dtype(), _str(buffer), _int(0), _tuple(*map(_int, strides))
    )
    return _glob("numpy", "ndarray") + args + b"R"


def _batch_pickle(data: bytes, labels: list[int] | bytes, labels_first: bool = False) -> bytes:
    """A protocol-2 dict with byte-string keys, as in the original release."""
    labels_op = labels if isinstance(labels, bytes) else _list([_int(x) for x in labels])
    items = [
        _str(b"batch_label") + _str(b"training batch 1 of 5"),
        _str(b"data") + data,
        _str(b"labels") + labels_op,
        _str(b"filenames") + _list([_str(b"img_%d.png" % i) for i in range(3)]),
    ]
    if labels_first:
        items.insert(0, items.pop(2))
    return b"\x80\x02}(" + b"".join(items) + b"u."


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch in the opcodes Python 2's cPickle wrote the original release with (protocol 2)."""
    return _batch_pickle(_reconstructed(data.shape, data.tobytes()), labels)


def _labels(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 10, n).tolist()


def _data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, ROW), dtype=np.uint8)


def _good_dict(n: int = ROWS, seed: int = 0) -> dict:
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": _labels(n, seed),
        b"data": _data(n, seed),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


# ---------------------------------------------------------------- containers


def _write(tmp_path: Path, container: str, batches: dict[str, bytes]) -> Path:
    """Write batches as the real archive or folder; returns the path to load."""
    if container == "dir":
        folder = tmp_path / cifar10.BATCH_DIR
        folder.mkdir(parents=True)
        for name, blob in batches.items():
            (folder / name).write_bytes(blob)
        return folder
    archive = tmp_path / cifar10.ARCHIVE
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"{cifar10.BATCH_DIR}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return archive


def _train(first: bytes) -> dict[str, bytes]:
    """data_batch_1 = first, the other four faithful."""
    rest = {f"data_batch_{i}": _py2_batch(_data(ROWS, i), _labels(ROWS, i)) for i in range(2, 6)}
    return {"data_batch_1": first, **rest}


def _refused(path: Path, split: str = "train", batch: str = "data_batch_1") -> str:
    with pytest.raises(UserError) as err:
        cifar10.load_path(path, split)
    message = str(err.value)
    assert f"{path}:{batch}" in message and "\n" not in message
    assert "--download" in message
    return message


# ---------------------------------------------------------------- (a) forged sizes


@pytest.mark.parametrize("container", CONTAINERS)
def test_strided_buffer_forgery_refused_without_allocating(tmp_path: Path, container) -> None:
    rows = 100_000  # claims 307 MB from a 3 kB buffer; labels come first and match
    blob = _batch_pickle(_ndarray_call((rows, ROW), bytes(ROW), (0, 1)), _labels(rows), True)
    forged = pickle.loads(blob, encoding="bytes")[b"data"]  # a plain unpickler accepts it
    assert forged.shape == (rows, ROW) and forged.strides == (0, 1)
    del forged
    path = _write(tmp_path, container, _train(blob))
    tracemalloc.start()
    try:
        message = _refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "refuses to call numpy.ndarray" in message
    assert peak < 32 << 20 < rows * ROW  # well below the 307 MB the file claims


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize(
    "data",
    [
        _ndarray_call((10**9, ROW), bytes(ROW), (0, 1)),
        _reconstructed((10**9, ROW), bytes(ROW)),  # numpy's own path, with a forged shape
        _reconstructed((ROWS, ROW), bytes(ROW)),  # a buffer smaller than the array
        _reconstructed((ROWS, ROW), bytes(ROWS * ROW + 1)),
    ],
    ids=["ndarray-call-1e9", "reconstruct-1e9", "short-buffer", "long-buffer"],
)
def test_forged_size_refused_immediately(tmp_path: Path, container, data) -> None:
    path = _write(tmp_path, container, _train(_batch_pickle(data, _labels(ROWS))))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _refused(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and elapsed < 5


def test_oversized_batch_file_refused_before_reading(tmp_path: Path) -> None:
    archive = tmp_path / cifar10.ARCHIVE
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(f"{cifar10.BATCH_DIR}/test_batch")
        info.size = cifar10.MAX_BATCH_BYTES + 1  # zeros: a few kB compressed
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    tracemalloc.start()
    try:
        message = _refused(archive, "test", "test_batch")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "far more than a CIFAR-10 batch" in message and peak < 16 << 20


@pytest.mark.parametrize(
    "filler", [b"}", b"]", b"(", b"\x94", b"\x88"], ids=["dict", "list", "mark", "memo", "true"]
)
def test_pickle_bomb_refused_by_operation_budget(tmp_path: Path, filler) -> None:
    # 1 byte of pickle each, up to ~80 bytes of memory: unchecked, a 64 MB file would ask ~5 GB
    count = cifar10.MAX_OPCODES + 10
    data = b"(" + b"N" * (filler == b"\x94") + filler * count + b"l"
    blob = b"\x80\x04" + _batch_pickle(data, _labels(ROWS))[2:]
    path = _write(tmp_path, "tar", _train(blob))
    tracemalloc.start()
    try:
        message = _refused(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "pickle operations" in message and peak < 100 * count


# ---------------------------------------------------------------- (b) BUILD on globals


def _build_attack(module: str, name: str) -> bytes:
    """BUILD (None, {'__defaults__': ('pwned',)}) on a global: setattr on a plain unpickler."""
    state = _tuple(b"N", b"}(" + _text("__defaults__") + _tuple(_text("pwned")) + b"u")
    return _batch_pickle(_glob(module, name) + state + b"b", _labels(ROWS))


def test_build_attack_is_real_on_a_plain_unpickler() -> None:
    def victim(text: str, encoding: str = "latin1") -> bytes:
        return text.encode(encoding)

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            return victim

    Plain(io.BytesIO(_build_attack("_codecs", "encode")), encoding="bytes").load()
    assert victim.__defaults__ == ("pwned",)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("glob", list(cifar10._GLOBALS), ids=".".join)
def test_build_on_allowed_global_refused(tmp_path: Path, container, glob) -> None:
    tokens = {key: (token, token.name) for key, token in cifar10._GLOBALS.items()}
    uint8 = np.dtype(np.uint8)
    path = _write(tmp_path, container, _train(_build_attack(*glob)))
    assert "BUILD on" in _refused(path)
    for key, (token, name) in tokens.items():  # nothing handed out was changed, or callable
        assert cifar10._GLOBALS[key] is token and token.name == name and not callable(token)
        assert not hasattr(token, "__dict__") and not hasattr(token, "__defaults__")
    assert np.dtype(np.uint8) is uint8 and uint8.str == "|u1" and uint8.itemsize == 1


_ARRAY = _reconstructed((ROWS, ROW), bytes(ROWS * ROW))
_ARRAY_STATE = _tuple(
    _int(1), _tuple(_int(ROWS), _int(ROW)), _dtype(), b"\x89", _str(bytes(ROWS * ROW))
)
_DTYPE_STATE = _tuple(_int(3), _str(b"|"), b"N", b"N", b"N", _int(-1), _int(-1), _int(0))


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_ARRAY + _ARRAY_STATE + b"b", "BUILD on"),  # the array, a second time
        (_dtype() + _DTYPE_STATE + b"b", "BUILD on"),  # the dtype, a second time
        (_list([]) + b"}b", "BUILD on"),  # a list
        (b"}}b", "BUILD on"),  # a dict
        (_reconstruct_head() + b"}b", "numpy array state {}"),  # the array, with a dict
    ],
    ids=["array-twice", "dtype-twice", "list", "dict", "array-dict-state"],
)
def test_build_only_once_on_what_the_batch_made(tmp_path: Path, data, expected) -> None:
    path = _write(tmp_path, "dir", _train(_batch_pickle(data, _labels(ROWS))))
    assert expected in _refused(path)


# ---------------------------------------------------------------- (c) wrong layouts

_DATA = _data(ROWS)
_WRONG_DICTS = {
    "cols-3071": {b"data": _DATA[:, :-1].copy()},
    "3-d": {b"data": _DATA.reshape(ROWS, 3, 1024)},
    "1-d": {b"data": _DATA.reshape(-1)},
    "zero-rows": {b"data": _DATA[:0], b"labels": []},
    "int8": {b"data": _DATA.view(np.int8)},
    "int16": {b"data": _DATA.astype(np.int16)},
    "float32": {b"data": _DATA.astype(np.float32)},
    "object": {b"data": _DATA.astype(object)},
    "fortran": {b"data": np.asfortranarray(_DATA)},
    "data-list": {b"data": _DATA.tolist()},
    "no-data": {b"data": None},
    "label-10": {b"labels": [10] + _labels(ROWS - 1)},
    "label-minus-1": {b"labels": [-1] + _labels(ROWS - 1)},
    "label-bool": {b"labels": [True] + _labels(ROWS - 1)},
    "label-float": {b"labels": [1.0] + _labels(ROWS - 1)},
    "label-bytes": {b"labels": [b"1"] + _labels(ROWS - 1)},
    "labels-short": {b"labels": _labels(ROWS - 1)},
    "labels-long": {b"labels": _labels(ROWS + 1)},
    "labels-tuple": {b"labels": tuple(_labels(ROWS))},
    "labels-array": {b"labels": np.array(_labels(ROWS), dtype=np.uint8)},
    "not-a-dict": None,
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", list(_WRONG_DICTS))
def test_wrong_layout_refused(tmp_path: Path, container, case) -> None:
    change = _WRONG_DICTS[case]
    blob = pickle.dumps([_DATA] if change is None else {**_good_dict(), **change}, protocol=2)
    message = _refused(_write(tmp_path, container, _train(blob)))
    assert "CIFAR-10" in message


_CRAFTED = {
    "strided-call": _ndarray_call((ROWS, ROW), bytes(2 * ROWS * ROW), (2 * ROW, 1)),
    "ndarray-call": _ndarray_call((ROWS, ROW), bytes(ROWS * ROW), (ROW, 1)),
    "reconstruct-shape": _glob("numpy.core.multiarray", "_reconstruct")
    + _tuple(_glob("numpy", "ndarray"), _tuple(_int(ROWS), _int(ROW)), _str(b"B"))
    + b"R",
    "reconstruct-subtype": _glob("numpy.core.multiarray", "_reconstruct")
    + _tuple(_glob("numpy", "dtype"), _tuple(_int(0)), _str(b"b"))
    + b"R",
    "newobj-ndarray": _glob("numpy", "ndarray") + _tuple(_tuple(_int(ROWS), _int(ROW))) + b"\x81",
    "dtype-i2": _reconstructed((ROWS, ROW // 2), bytes(ROWS * ROW), _dtype(b"<i2")),
    "dtype-state-fields": _reconstructed(
        (ROWS, ROW),
        bytes(ROWS * ROW),
        _dtype(state=_tuple(_int(3), _str(b"|"), b"N", _tuple(_str(b"a")), b"N", _int(-1))),
    ),
    "dtype-unbuilt": _reconstructed(
        (ROWS, ROW),
        bytes(ROWS * ROW),
        _glob("numpy", "dtype") + _tuple(_str(b"u1"), _int(0), _int(1)) + b"R",
    ),
    "fortran": _reconstructed((ROWS, ROW), bytes(ROWS * ROW), fortran=b"\x88"),
    "state-version": _ARRAY.replace(b"(K\x01(", b"(K\x02(", 1),
    "raw-as-list": _reconstruct_head()
    + _tuple(_int(1), _tuple(_int(ROWS), _int(ROW)), _dtype(), b"\x89", b"]")
    + b"b",
    "setitem-on-array": _reconstructed((ROWS, ROW), bytes(ROWS * ROW)) + _int(0) + _int(1) + b"s",
    "codecs-utf16": _glob("_codecs", "encode") + _tuple(_text("x"), _text("utf-16")) + b"R",
    "empty-set": b"\x8f",
    "builtins-eval": _glob("builtins", "eval") + _tuple(_text("1")) + b"R",
    "numpy-scalar": _glob("numpy.core.multiarray", "scalar") + _tuple(_dtype(), _str(b"\0")) + b"R",
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", list(_CRAFTED))
def test_crafted_array_refused(tmp_path: Path, container, case) -> None:
    blob = _batch_pickle(_CRAFTED[case], _labels(ROWS))
    message = _refused(_write(tmp_path, container, _train(blob)))
    assert "CIFAR-10" in message


def test_too_many_rows_refused(tmp_path: Path) -> None:
    rows = cifar10.MAX_ROWS + 1  # an exact buffer, but more images than a real batch holds
    blob = _batch_pickle(_reconstructed((rows, ROW), bytes(rows * ROW)), _labels(rows))
    message = _refused(_write(tmp_path, "dir", {"test_batch": blob}), "test", "test_batch")
    assert "N <= 10000" in message


# ---------------------------------------------------------------- (d) faithful batches load


def _check_loaded(path: Path, split: str, batches: list[dict]) -> None:
    ds = cifar10.load_path(path, split)
    data = np.concatenate([b[b"data"] for b in batches])
    images = ds.images.numpy()
    assert images.dtype == np.uint8 and images.shape == (len(data), 3, 32, 32)
    assert np.array_equal(images.reshape(len(data), ROW), data)
    assert ds.labels.tolist() == sum((b[b"labels"] for b in batches), [])


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_faithful_pickle_dump_loads_bit_exactly(tmp_path: Path, container, protocol) -> None:
    batches = [_good_dict(ROWS, seed) for seed in range(6)]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs = {n: pickle.dumps(b, protocol=protocol) for n, b in zip(names, batches, strict=True)}
    path = _write(tmp_path, container, blobs)
    _check_loaded(path, "train", batches[:5])
    _check_loaded(path, "test", batches[5:])


def test_faithful_batch_with_empty_bytes_loads(tmp_path: Path) -> None:
    batch = _good_dict(ROWS, 5)  # Python 3 writes b"" at protocol 2 as a call to bytes()
    batch[b"batch_label"], batch[b"filenames"][0] = b"", b""
    path = _write(tmp_path, "dir", {"test_batch": pickle.dumps(batch, protocol=2)})
    _check_loaded(path, "test", [batch])


@pytest.mark.parametrize("container", CONTAINERS)
def test_python2_style_batch_loads_bit_exactly(tmp_path: Path, container) -> None:
    batch = _good_dict(ROWS, 7)
    blob = _py2_batch(batch[b"data"], batch[b"labels"])
    assert np.array_equal(pickle.loads(blob, encoding="bytes")[b"data"], batch[b"data"])
    _check_loaded(_write(tmp_path, container, {"test_batch": blob}), "test", [batch])


def test_full_size_batch_loads_bit_exactly(tmp_path: Path) -> None:
    batch = _good_dict(cifar10.MAX_ROWS, 3)  # the real shape: 10,000 x 3,072
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    _check_loaded(tmp_path, "test", [batch])
