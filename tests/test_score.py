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


def test_score_refuses_images_that_do_not_fit(run, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    code = main(["score", str(run), "--data", str(folder), "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image-size 8 --channels 1" in err[0]
    assert main(["score", str(run), "--data", str(folder), "--image-size", "8", "--channels",
                 "1", "--out", str(tmp_path / "r")]) == 0  # fmt: skip


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
    folder.mkdir()
    digits = load_dataset("mnist5k", "test", image_size=8).images[:4]
    for i, image in enumerate(digits.numpy()):
        Image.fromarray(image[0]).save(folder / f"digit_{i}.png")
    out = tmp_path / "report"
    argv = ["score", str(run), "--data", str(folder), "--channels", "1", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "scores.csv") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    assert names and all(n.startswith("digit_") and n.endswith(".png") for n in names)
