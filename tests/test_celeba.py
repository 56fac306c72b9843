"""CelebA: a tiny copy in the original layout, cropped and area-resized into a memmap cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer.data import DATASET_NAMES, load_dataset
from imagetransformer.data.memmap import MemmapImageDataset
from imagetransformer.errors import UserError

PARTITIONS = [0, 0, 1, 2, 0, 2]  # 000001..000006: train 1,2,5; valid 3 (unused); test 4,6
SPLIT_ROWS = {"train": [0, 1, 4], "test": [3, 5]}
PAGE = "mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

# ---------------------------------------------------------------- builders


def _name(i: int) -> str:
    return f"{i + 1:06d}.jpg"


def _faces(n: int, seed: int) -> np.ndarray:
    """Random aligned-size images, uint8 [n, 218, 178, 3]: distinct, so misplaced rows show."""
    return np.random.default_rng(seed).integers(0, 256, (n, 218, 178, 3), dtype=np.uint8)


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=100, subsampling=0)


def _write_partition(folder: Path, parts: list[int], csv: bool = False) -> Path:
    if csv:
        path = folder / "list_eval_partition.csv"
        lines = ["image_id,partition"] + [f"{_name(i)},{p}" for i, p in enumerate(parts)]
    else:
        path = folder / "list_eval_partition.txt"
        lines = [f"{_name(i)} {p}" for i, p in enumerate(parts)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_celeba(
    folder: Path, images: np.ndarray, csv: bool = False, image_dir: Path | None = None
) -> np.ndarray:
    """The official layout (Kaggle's with csv); returns the decoded JPEGs [n, 218, 178, 3]."""
    image_dir = image_dir or folder / "img_align_celeba"
    image_dir.mkdir(parents=True)
    for i, image in enumerate(images):
        _write_jpeg(image_dir / _name(i), image)
    _write_partition(folder, PARTITIONS[: len(images)], csv)
    return np.stack([np.asarray(Image.open(image_dir / _name(i))) for i in range(len(images))])


def _expected(decoded: np.ndarray, rows: list[int], size: int) -> np.ndarray:
    """The reference preprocessing, written out: crop rows 40..178, cols 20..158, BOX-resize."""
    out = []
    for face in decoded[rows, 40:178, 20:158]:
        out.append(np.asarray(Image.fromarray(face).resize((size, size), Image.BOX)))
    return np.stack(out).transpose(0, 3, 1, 2)


@pytest.fixture
def celeba(tmp_path: Path) -> np.ndarray:
    return _write_celeba(tmp_path / "celeba", _faces(6, seed=1))


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("opened an image although the cache is valid")

    monkeypatch.setattr(Image, "open", refuse)


# ---------------------------------------------------------------- loading


def test_name_registered() -> None:
    assert "celeba" in DATASET_NAMES


@pytest.mark.parametrize("split", ["train", "test"])
def test_splits(tmp_path: Path, celeba: np.ndarray, split: str) -> None:
    ds = load_dataset("celeba", split, root=tmp_path)
    rows = SPLIT_ROWS[split]
    assert isinstance(ds, MemmapImageDataset) and ds.name == "celeba"
    assert len(ds) == len(rows) and ds.shape == (3, 32, 32)
    assert ds.labels is None and ds.num_classes is None and ds.class_counts() is None
    assert ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), _expected(celeba, rows, 32))
    cache = tmp_path / "celeba" / f"celeba32_{split}.u8"
    assert cache.stat().st_size == len(rows) * 3 * 32 * 32
    images, labels = ds.batch(torch.tensor([1, 0]))
    assert labels is None and np.array_equal(images.numpy(), ds.images.numpy()[[1, 0]])


def test_crop_at_its_own_size_is_exact(tmp_path: Path, celeba: np.ndarray) -> None:
    """At 138 BOX is the identity, so this pins the crop window, orientation and channels."""
    ds = load_dataset("celeba", "test", root=tmp_path, image_size=138)
    expected = celeba[[3, 5], 40:178, 20:158].transpose(0, 3, 1, 2)
    assert ds.shape == (3, 138, 138) and np.array_equal(ds.images.numpy(), expected)


@pytest.mark.parametrize("size", [32, 138])
def test_crop_keeps_the_centre_only(tmp_path: Path, size: int) -> None:
    """A coloured 138x138 centre in a black border: one border pixel taken would show as dark."""
    image = np.zeros((1, 218, 178, 3), dtype=np.uint8)
    image[0, 40:178, 20:158] = (200, 120, 40)
    _write_celeba(tmp_path / "celeba", image)
    ds = load_dataset("celeba", "train", root=tmp_path, image_size=size)
    assert ds.shape == (3, size, size)
    result = ds.images.numpy()[0].astype(int)
    for channel, value in enumerate((200, 120, 40)):  # JPEG ringing stays within a few levels
        assert np.abs(result[channel] - value).max() <= 4


def test_each_size_has_its_own_cache(
    tmp_path: Path, celeba: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_dataset("celeba", "train", root=tmp_path)
    small = load_dataset("celeba", "train", root=tmp_path, image_size=8)
    assert small.shape == (3, 8, 8)
    assert np.array_equal(small.images.numpy(), _expected(celeba, SPLIT_ROWS["train"], 8))
    assert (tmp_path / "celeba" / "celeba8_train.u8").is_file()
    _forbid_decoding(monkeypatch)
    for size in (8, 32):
        assert load_dataset("celeba", "train", root=tmp_path, image_size=size).shape[1] == size


def test_cache_reused(tmp_path: Path, celeba: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset("celeba", "test", root=tmp_path).images.numpy().copy()
    _forbid_decoding(monkeypatch)
    again = load_dataset("celeba", "test", root=tmp_path)
    assert isinstance(again, MemmapImageDataset) and np.array_equal(again.images.numpy(), first)


def test_changed_partition_rebuilds_cache(tmp_path: Path, celeba: np.ndarray) -> None:
    load_dataset("celeba", "train", root=tmp_path)
    path = _write_partition(tmp_path / "celeba", [0, 0, 0, 2, 0, 2])  # valid 3 -> train
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))
    ds = load_dataset("celeba", "train", root=tmp_path)
    assert np.array_equal(ds.images.numpy(), _expected(celeba, [0, 1, 2, 4], 32))


def test_channels_option(tmp_path: Path, celeba: np.ndarray) -> None:
    ds = load_dataset("celeba", "test", root=tmp_path, image_size=16, channels=1)
    assert ds.shape == (1, 16, 16) and len(ds) == 2


def test_data_root_from_environment(
    tmp_path: Path, celeba: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGETRANSFORMER_DATA", str(tmp_path))
    assert len(load_dataset("celeba", "train")) == 3


def test_by_path_and_root_itself(tmp_path: Path, celeba: np.ndarray) -> None:
    folder = tmp_path / "celeba"
    ds = load_dataset(str(folder), "test")
    assert ds.name == "celeba" and np.array_equal(ds.images.numpy(), _expected(celeba, [3, 5], 32))
    by_images = load_dataset(str(folder / "img_align_celeba"), "train", image_size=16)
    assert by_images.shape == (3, 16, 16) and len(by_images) == 3
    assert len(load_dataset("celeba", "train", root=folder)) == 3  # root = the folder itself


def test_kaggle_csv_variant(tmp_path: Path) -> None:
    """Kaggle's copy: a csv with a header, images one folder deeper."""
    folder = tmp_path / "celeba"
    nested = folder / "img_align_celeba" / "img_align_celeba"
    decoded = _write_celeba(folder, _faces(6, seed=2), csv=True, image_dir=nested)
    assert not (folder / "list_eval_partition.txt").exists()
    for split, rows in SPLIT_ROWS.items():
        ds = load_dataset("celeba", split, root=tmp_path)
        assert np.array_equal(ds.images.numpy(), _expected(decoded, rows, 32))
    assert len(load_dataset(str(folder), "test")) == 2


# ---------------------------------------------------------------- errors


def test_missing_folder_says_where_and_from_where(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("celeba", "train", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in message
    assert "list_eval_partition.txt" in message and PAGE in message


def test_missing_partition_file(tmp_path: Path, celeba: np.ndarray) -> None:
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match="list_eval_partition.txt") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(tmp_path / "celeba") in str(err.value) and PAGE in str(err.value)


def test_missing_image_folder(tmp_path: Path) -> None:
    (tmp_path / "celeba").mkdir()
    _write_partition(tmp_path / "celeba", PARTITIONS)
    with pytest.raises(UserError, match="img_align_celeba.zip") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(tmp_path / "celeba" / "img_align_celeba") in str(err.value)


@pytest.mark.parametrize(
    "line", ["000001.jpg 7", "000001.jpg", "000001.jpg 0 1", "../secret.jpg 0", "000002.jpg 0"]
)
def test_malformed_partition_file(tmp_path: Path, celeba: np.ndarray, line: str) -> None:
    path = tmp_path / "celeba" / "list_eval_partition.txt"
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(UserError, match="line 7") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(path) in str(err.value)


def test_csv_with_wrong_header(tmp_path: Path) -> None:
    folder = tmp_path / "celeba"
    _write_celeba(folder, _faces(2, seed=3), csv=True)
    path = folder / "list_eval_partition.csv"
    path.write_text(path.read_text().replace("image_id,partition", "name,split"))
    with pytest.raises(UserError, match="image_id,partition") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(path) in str(err.value)


def test_split_missing_from_partition_file(tmp_path: Path) -> None:
    _write_celeba(tmp_path / "celeba", _faces(3, seed=4))  # partitions 0, 0, 1: no test image
    with pytest.raises(UserError, match=r"no image in partition 2 \(test\)"):
        load_dataset("celeba", "test", root=tmp_path)


def test_listed_image_missing(tmp_path: Path, celeba: np.ndarray) -> None:
    missing = tmp_path / "celeba" / "img_align_celeba" / "000005.jpg"
    missing.unlink()
    with pytest.raises(UserError, match="missing") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(missing) in str(err.value)
    assert len(load_dataset("celeba", "test", root=tmp_path)) == 2  # the other split is whole


def test_wrong_image_size(tmp_path: Path, celeba: np.ndarray) -> None:
    wrong = tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"
    _write_jpeg(wrong, np.zeros((178, 218, 3), dtype=np.uint8))  # transposed
    with pytest.raises(UserError, match="218x178 .*not 178x218") as err:
        load_dataset("celeba", "train", root=tmp_path)
    assert str(wrong) in str(err.value)
    assert not list((tmp_path / "celeba").glob("celeba32_train*"))  # no half-made cache


def test_damaged_image(tmp_path: Path, celeba: np.ndarray) -> None:
    damaged = tmp_path / "celeba" / "img_align_celeba" / "000004.jpg"
    damaged.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot decode") as err:
        load_dataset("celeba", "test", root=tmp_path)
    assert str(damaged) in str(err.value)
