"""Files written by the package: the permissions a plain open() gives (0o666 minus the umask),
durable atomic writes, and one failed-write message for every caller."""

import errno
import os
import stat

import numpy as np
import pytest

from imagetransformer.data.memmap import labels_path, sidecar_path, write_cache
from imagetransformer.files import WriteError, atomic_write_bytes, temp_file_beside


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_temp_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    fd, tmp = temp_file_beside(tmp_path / "x.bin", prefix=".x.", suffix=".tmp")
    os.close(fd)
    assert tmp.parent == tmp_path and _mode(tmp) == 0o666 & ~mask


def test_data_cache_files_are_readable_by_colleagues(tmp_path, umask):
    """The decoded-image cache of ImageNet/CelebA is shared: not mkstemp's private 0o600."""
    umask(0o022)
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)

    def fill(write):
        write(0, images)
        return np.array([1, 0])

    path = tmp_path / "cache.u8"
    ds = write_cache(path, {"source": "test"}, images.shape, fill, "test", 2)
    assert np.array_equal(ds.images.numpy(), images)
    for written in (path, labels_path(path), sidecar_path(path)):
        assert _mode(written) == 0o644, written


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_write_names_the_file_and_leaves_the_advice_to_the_caller(tmp_path, monkeypatch):
    """One message for every caller (score, ood, study, train): the file, the reason, what is
    intact and how to make room; no `train --resume` unless the caller adds it."""
    path = tmp_path / "scores.csv"
    atomic_write_bytes(path, b"old")
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(path, b"new")
    message = str(info.value)
    assert message.startswith(f"could not write {path} (No space left on device)")
    assert "intact" in message and f"free space on the disk of {tmp_path}" in message
    assert "resume" not in message and "\n" not in message
    advised = info.value.advise("run the command again")
    assert isinstance(advised, WriteError) and advised.path == path
    assert str(advised) == f"{message}, then run the command again"
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files via /proc")
def test_data_cache_files_and_their_folder_are_fsynced(tmp_path, monkeypatch):
    """The cache's images, labels and sidecar are each fsynced before they are renamed into
    place, and the folder after: a crash cannot leave a sidecar vouching for lost data."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    images = np.zeros((2, 1, 4, 4), dtype=np.uint8)

    def fill(write):
        write(0, images)
        return np.array([1, 0])

    path = tmp_path / "cache.u8"
    write_cache(path, {"source": "test"}, images.shape, fill, "test", 2)
    names = [os.path.basename(p) for p in synced]
    for written in (path, labels_path(path), sidecar_path(path)):
        assert any(n.startswith((f"{written.name}.", f".{written.name}.")) for n in names), names
    assert str(tmp_path) in synced
    assert synced.index(str(tmp_path)) < max(
        i for i, n in enumerate(names) if sidecar_path(path).name in n
    )
