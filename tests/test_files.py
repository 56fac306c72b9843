"""Files written by the package get the permissions a plain open() gives: 0o666 minus the umask."""

import os
import stat

import numpy as np
import pytest

from imagetransformer.data.memmap import labels_path, sidecar_path, write_cache
from imagetransformer.files import temp_file_beside


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
