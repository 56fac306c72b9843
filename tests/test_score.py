"""`imagetransformer score`: per-image and per-sub-pixel bits, on a tiny run of 8x8 digits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer
from imagetransformer.cli import main
from imagetransformer.data import load_dataset
from imagetransformer.tools.score import score

TINY = ["--preset", "tiny", "--quiet", "--set", "eval_every=0", "--set", "sample_count=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score") / "run"
    assert main(["train", *TINY, "--set", "max_steps=3", "--out", str(out)]) == 0
    return out


def test_score_writes_the_report_and_agrees_with_eval(run, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    code = main(["score", str(run), "--limit", "40", "--batch-size", "16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("scores.csv", "summary.json", "heatmaps.png", "histogram.png"):
        assert (out / name).is_file(), name
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and rows[0]["label"] != ""
    bpd = np.array([float(r["bits_per_dim"]) for r in rows])
    assert np.allclose(bpd, [float(r["bits_per_dim_grey"]) for r in rows])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 40
    assert summary["mean_bits_per_dim"] == pytest.approx(bpd.mean(), abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(run), "--limit", "40", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert summary["mean_bits_per_dim"] == pytest.approx(evaluated["bits_per_dim"], abs=1e-5)
    with Image.open(out / "heatmaps.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100


def _digit_folder(folder: Path, n: int, side: int = 8) -> torch.Tensor:
    """`n` grey digit PNGs of `side` x `side` in `folder`; returns them [n, 1, side, side]."""
    folder.mkdir()
    digits = load_dataset("mnist5k", "test", image_size=side).images[:n]
    for i, image in enumerate(digits.numpy()):
        Image.fromarray(image[0]).save(folder / f"digit_{i:03d}.png")
    return digits


def _scored(out: Path) -> list[dict]:
    with open(out / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_a_named_folder_is_scored_whole_at_the_models_shape(run, tmp_path, capsys) -> None:
    """A folder of 30 images of the model's shape (1x8x8): no flags, and every image is scored,
    not the 3 of the folder's automatic test split; the output says which images and how many."""
    folder = tmp_path / "digits"
    digits = _digit_folder(folder, 30)
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["score", str(run), "--data", str(folder), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = _scored(out)
    assert sorted(r["image"] for r in rows) == [f"digit_{i:03d}.png" for i in range(30)]
    assert f"{folder} (all images): 30 images" in stdout
    # the same bits as the library gives for those very pixels
    model = ImageTransformer.from_pretrained(run).eval()
    expected = model.bits_per_dim(digits).numpy()
    assert np.allclose([float(r["bits_per_dim"]) for r in rows], expected, atol=1e-4)
    # --split test asks for the folder's held-out tenth, and says that is what it is
    assert main(["score", str(run), "--data", str(folder), "--split", "test",
                 "--out", str(out)]) == 0  # fmt: skip
    stdout = capsys.readouterr().out
    assert len(_scored(out)) == 3 and "the 10% the folder holds out" in stdout


def test_a_folder_defaults_to_the_models_shape_unless_told(run, tmp_path, capsys) -> None:
    """32x32 colour photos are read as the model's 1x8x8; a flag that does not fit is refused,
    naming the conversion that does."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "r"
    assert main(["score", str(run), "--data", str(folder), "--out", str(out)]) == 0
    assert len(_scored(out)) == 3
    capsys.readouterr()
    code = main(["score", str(run), "--data", str(folder), "--image-size", "16", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1x16x16" in err[0] and "--image-size 8 --channels 1" in err[0]


def test_the_runs_own_data_is_its_test_split_and_all_is_for_folders(run, tmp_path, capsys):
    """Without --data, score reads the run's test split (and says so); --split validation is the
    part of train the run held out; --split all of a built-in set is refused in one line."""
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["score", str(run), "--limit", "5", "--out", str(out)]) == 0
    assert "mnist5k test split: 5 images" in capsys.readouterr().out
    argv = ["score", str(run), "--limit", "5", "--out", str(out)]
    assert main([*argv, "--split", "validation"]) == 0
    assert "mnist5k validation split: 5 images" in capsys.readouterr().out
    assert main(["score", str(run), "--split", "all", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mnist5k comes in train and test splits" in err[0]


def test_score_of_a_conditional_model_given_labels_or_marginal() -> None:
    from .helpers import tiny_config

    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8), num_classes=10))
    data = load_dataset("mnist5k", "test", image_size=8)
    given = score(model, data, max_images=6)
    marginal = score(model, data, max_images=6, marginal=True)
    assert given.bits.shape == marginal.bits.shape == (6, 1, 8, 8)
    # a class embedding that starts at zero: the classes do not differ yet
    assert torch.allclose(given.bits_per_dim, marginal.bits_per_dim, atol=1e-4)
    unlabelled = type(data)(data.images[:6], None, None, "unlabelled")
    with pytest.raises(Exception, match="--marginal"):
        score(model, unlabelled)


def test_score_names_the_files_of_a_folder(run, tmp_path) -> None:
    folder = tmp_path / "digits"
    _digit_folder(folder, 4)
    out = tmp_path / "report"
    assert main(["score", str(run), "--data", str(folder), "--out", str(out)]) == 0
    names = [row["image"] for row in _scored(out)]
    assert names == [f"digit_{i:03d}.png" for i in range(4)]


def test_a_full_disk_while_writing_the_report_is_one_line_for_score(
    run, tmp_path, monkeypatch, capsys
) -> None:
    """The message names the file and the fix, and no training advice (`train --resume`)."""
    import errno

    from imagetransformer import files

    def write_temp(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_temp", write_temp)
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["score", str(run), "--limit", "4", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "No space left" in err[0] and str(out / "scores.csv") in err[0]
    assert "resume" not in err[0] and "free space" in err[0]
