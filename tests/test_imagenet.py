"""Downsampled ImageNet: tiny archives in both original formats, decoded into a memmap cache."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer.data import DATASET_NAMES, imagenet, load_dataset
from imagetransformer.data.memmap import MemmapImageDataset
from imagetransformer.errors import UserError

# ---------------------------------------------------------------- builders


def _images(n: int, side: int, seed: int) -> np.ndarray:
    """Random uint8 [n, 3, side, side]: every pixel differs, so misplacements show."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, images: np.ndarray, mtime_ns: int | None = None) -> None:
    """The van den Oord layout: <stem>/0000001.png ..., here stored in reverse name order."""
    stem = path.name.removesuffix(".tar")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in reversed(range(len(images))):
            data = _png(images[i])
            info = tarfile.TarInfo(f"{stem}/{i + 1:07d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _write_folder(path: Path, images: np.ndarray) -> None:
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        (path / f"{i + 1:07d}.png").write_bytes(_png(image))


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The Chrabaszcz layout: channel-major rows, 1-based labels, plus an unused 'mean'."""
    data = images.reshape(len(images), -1)
    mean = data.mean(axis=0)
    with open(path, "wb") as f:  # an open file keeps the exact name, with or without .npz
        np.savez(f, data=data, labels=labels.tolist(), mean=mean)


def _write_labelled(folder: Path, side: int = 32, suffix: str = ".npz") -> dict[str, np.ndarray]:
    """10 train batches (1, 2, 1, 1, ... images) and val_data; returns the expected arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = [1, 2] + [1] * 8
    train, train_labels = [], []
    for k, n in enumerate(counts, start=1):
        images, labels = _images(n, side, seed=k), np.arange(n) * 7 + k
        _write_npz(folder / f"train_data_batch_{k}{suffix}", images, labels)
        train.append(images)
        train_labels.append(labels)
    val, val_labels = _images(3, side, seed=99), np.array([1, 1000, 500])
    _write_npz(folder / f"val_data{suffix}", val, val_labels)
    return {
        "train": np.concatenate(train),
        "train_labels": np.concatenate(train_labels) - 1,
        "test": val,
        "test_labels": val_labels - 1,
    }


@pytest.fixture
def png_root(tmp_path: Path) -> dict[str, np.ndarray]:
    train, valid = _images(7, 32, seed=1), _images(3, 32, seed=2)
    _write_tar(tmp_path / "imagenet32" / "train_32x32.tar", train)
    _write_tar(tmp_path / "imagenet32" / "valid_32x32.tar", valid)
    return {"train": train, "test": valid}


def _forbid_png_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> np.ndarray:
        raise AssertionError("decoded a PNG although the cache is valid")

    monkeypatch.setattr(imagenet, "_decode_png", refuse)


# ---------------------------------------------------------------- van den Oord tar of PNGs


def test_names_registered() -> None:
    for name in ("imagenet32", "imagenet64", "imagenet32_labelled", "imagenet64_labelled"):
        assert name in DATASET_NAMES


@pytest.mark.parametrize("split", ["train", "test"])
def test_png_tar_split(tmp_path: Path, png_root: dict[str, np.ndarray], split: str) -> None:
    ds = load_dataset("imagenet32", split, root=tmp_path)
    expected = png_root[split]
    assert isinstance(ds, MemmapImageDataset) and ds.name == "imagenet32"
    assert len(ds) == len(expected) and ds.shape == (3, 32, 32)
    assert ds.labels is None and ds.num_classes is None and ds.class_counts() is None
    assert ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), expected)  # sorted by name, not archive order
    cache = tmp_path / "imagenet32" / f"imagenet32_{split}.u8"
    assert cache.stat().st_size == expected.size


def test_png_batch_and_getitem(tmp_path: Path, png_root: dict[str, np.ndarray]) -> None:
    ds = load_dataset("imagenet32", "train", root=tmp_path)
    images, labels = ds.batch(torch.tensor([5, 0, 5]))
    assert labels is None and images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    assert np.array_equal(images.numpy(), png_root["train"][[5, 0, 5]])
    image, label = ds[2]
    assert label == -1 and np.array_equal(image.numpy(), png_root["train"][2])
    image[:] = 0  # a copy: the cache and later reads are untouched
    assert np.array_equal(ds[2][0].numpy(), png_root["train"][2])


def test_png_cache_reused(
    tmp_path: Path, png_root: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    load_dataset("imagenet32", "train", root=tmp_path)
    _forbid_png_decoding(monkeypatch)
    ds = load_dataset("imagenet32", "train", root=tmp_path)
    assert np.array_equal(ds.batch(torch.arange(7))[0].numpy(), png_root["train"])


def test_png_stale_cache_rebuilt(tmp_path: Path, png_root: dict[str, np.ndarray]) -> None:
    load_dataset("imagenet32", "train", root=tmp_path)
    archive = tmp_path / "imagenet32" / "train_32x32.tar"
    changed = _images(4, 32, seed=5)
    _write_tar(archive, changed, mtime_ns=archive.stat().st_mtime_ns + 10**9)
    ds = load_dataset("imagenet32", "train", root=tmp_path)
    assert len(ds) == 4 and np.array_equal(ds.images.numpy(), changed)


def test_png_extracted_folders_by_path(tmp_path: Path) -> None:
    train, valid = _images(2, 32, seed=3), _images(2, 32, seed=4)
    _write_folder(tmp_path / "train_32x32", train)
    _write_folder(tmp_path / "valid_32x32", valid)
    ds = load_dataset(str(tmp_path / "train_32x32"), "test")  # the split picks the sibling
    assert ds.name == "imagenet32" and np.array_equal(ds.images.numpy(), valid)
    assert (tmp_path / "imagenet32_test.u8").is_file()
    assert np.array_equal(load_dataset(str(tmp_path), "train").images.numpy(), train)


def test_png_tar_by_path(tmp_path: Path, png_root: dict[str, np.ndarray]) -> None:
    ds = load_dataset(str(tmp_path / "imagenet32" / "train_32x32.tar"), "test")
    assert np.array_equal(ds.images.numpy(), png_root["test"])


def test_png_missing_names_path_and_source(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset("imagenet32", "test", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "imagenet32" / "valid_32x32.tar") in message
    assert "train_32x32.tar" in message and "image-net.org" in message


def test_png_wrong_size_rejected(tmp_path: Path) -> None:
    _write_tar(tmp_path / "imagenet32" / "train_32x32.tar", _images(1, 16, seed=0))
    with pytest.raises(UserError, match="16x16, not 32x32"):
        load_dataset("imagenet32", "train", root=tmp_path)


def test_memmap_dataset_pickles_without_images(
    tmp_path: Path, png_root: dict[str, np.ndarray]
) -> None:
    ds = load_dataset("imagenet32", "train", root=tmp_path)
    data = pickle.dumps(ds)
    assert len(data) < png_root["train"].nbytes
    assert np.array_equal(pickle.loads(data).batch(torch.tensor([1]))[0][0], png_root["train"][1])


# ---------------------------------------------------------------- Chrabaszcz npz batches


@pytest.mark.parametrize("suffix", [".npz", ""])
def test_npz_splits(tmp_path: Path, suffix: str) -> None:
    expected = _write_labelled(tmp_path / "imagenet32_labelled", suffix=suffix)
    for split in ("train", "test"):
        ds = load_dataset("imagenet32_labelled", split, root=tmp_path)
        assert isinstance(ds, MemmapImageDataset) and ds.name == "imagenet32_labelled"
        assert ds.shape == (3, 32, 32) and ds.num_classes == 1000
        assert np.array_equal(ds.images.numpy(), expected[split])
        assert ds.labels is not None and ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == expected[f"{split}_labels"].tolist()
    assert ds.labels.tolist() == [0, 999, 499]  # 1-based in the files
    assert ds.class_counts().shape == (1000,)
    images, labels = ds.batch(torch.tensor([2, 1]))
    assert np.array_equal(images.numpy(), expected["test"][[2, 1]])
    assert labels.tolist() == [499, 999]


def test_npz_rows_are_channel_major(tmp_path: Path) -> None:
    """Row layout: all R (row-major), then all G, then all B."""
    folder = tmp_path / "imagenet32_labelled"
    _write_labelled(folder)
    row = np.zeros(3 * 32 * 32, dtype=np.uint8)
    row[0], row[32 * 32], row[2 * 32 * 32 + 32 * 1 + 2] = 11, 22, 33  # R(0,0) G(0,0) B(1,2)
    with open(folder / "val_data.npz", "wb") as f:
        np.savez(f, data=row[None], labels=[3])
    ds = load_dataset("imagenet32_labelled", "test", root=tmp_path)
    image = ds[0][0]
    assert (image[0, 0, 0], image[1, 0, 0], image[2, 1, 2]) == (11, 22, 33)
    assert int(image.sum()) == 66 and ds[0][1] == 2


def test_npz_cache_reused_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imagenet32_labelled"
    _write_labelled(folder)
    load_dataset("imagenet32_labelled", "test", root=tmp_path)
    assert (folder / "imagenet32_labelled_test.u8").is_file()
    assert (folder / "imagenet32_labelled_test_labels.npy").is_file()

    def refuse(*args: object) -> None:
        raise AssertionError("re-converted although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(imagenet, "_copy_batch", refuse)
        assert len(load_dataset("imagenet32_labelled", "test", root=tmp_path)) == 3
    images = _images(2, 32, seed=7)
    _write_npz(folder / "val_data.npz", images, np.array([5, 6]))
    ds = load_dataset("imagenet32_labelled", "test", root=tmp_path)
    assert np.array_equal(ds.images.numpy(), images) and ds.labels.tolist() == [4, 5]


def test_npz_in_unzipped_subfolder_and_by_path(tmp_path: Path) -> None:
    expected = _write_labelled(tmp_path / "imagenet32_labelled" / "Imagenet32_val_npz")
    ds = load_dataset("imagenet32_labelled", "test", root=tmp_path)
    assert np.array_equal(ds.images.numpy(), expected["test"])
    direct = load_dataset(str(tmp_path / "imagenet32_labelled" / "Imagenet32_val_npz"), "train")
    assert direct.name == "imagenet32_labelled" and len(direct) == 11


def test_npz_missing_batch_named(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet32_labelled"
    _write_labelled(folder)
    (folder / "train_data_batch_7.npz").unlink()
    with pytest.raises(UserError, match="train_data_batch_7") as err:
        load_dataset("imagenet32_labelled", "train", root=tmp_path)
    assert str(folder) in str(err.value) and "image-net.org" in str(err.value)
    with pytest.raises(UserError, match=r"val_data.*image-net\.org"):
        load_dataset("imagenet32_labelled", "test", root=tmp_path / "elsewhere")


def test_npz_bad_labels_and_pickle_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "imagenet32_labelled"
    _write_labelled(folder)
    _write_npz(folder / "val_data.npz", _images(1, 32, seed=0), np.array([0]))  # 0-based
    with pytest.raises(UserError, match="1..1000"):
        load_dataset("imagenet32_labelled", "test", root=tmp_path)
    (folder / "val_data.npz").unlink()
    (folder / "val_data").write_bytes(pickle.dumps({"data": 0}))
    with pytest.raises(UserError, match="pickle release"):
        load_dataset("imagenet32_labelled", "test", root=tmp_path)


# ---------------------------------------------------------------- 64x64


def test_64_variants(tmp_path: Path) -> None:
    valid = _images(2, 64, seed=8)
    _write_tar(tmp_path / "imagenet64" / "valid_64x64.tar", valid)
    ds = load_dataset("imagenet64", "test", root=tmp_path)
    assert ds.shape == (3, 64, 64) and np.array_equal(ds.images.numpy(), valid)
    expected = _write_labelled(tmp_path / "imagenet64_labelled", side=64)
    ds = load_dataset("imagenet64_labelled", "test", root=tmp_path)
    assert ds.shape == (3, 64, 64) and np.array_equal(ds.images.numpy(), expected["test"])
    by_path = load_dataset(str(tmp_path / "imagenet64_labelled" / "val_data.npz"), "test")
    assert by_path.name == "imagenet64_labelled"
    small = load_dataset("imagenet64_labelled", "test", root=tmp_path, image_size=32)
    assert small.shape == (3, 32, 32) and small.labels.tolist() == expected["test_labels"].tolist()
    misplaced = tmp_path / "imagenet32_labelled"
    misplaced.mkdir()
    _write_npz(misplaced / "val_data.npz", valid, np.array([1, 2]))
    with pytest.raises(UserError, match="imagenet64_labelled/"):
        load_dataset("imagenet32_labelled", "test", root=tmp_path)
