"""Out-of-distribution detection: the metrics against hand-computed cases, the synthetic sets,
and the `ood` verb end to end on a tiny run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer.cli import main
from imagetransformer.data import load_dataset
from imagetransformer.tools.ood import (
    aupr,
    auroc,
    fpr_at_tpr,
    png_bits_per_dim,
    roc_curve,
    synthetic_set,
)


def test_metrics_on_a_hand_computed_case():
    positives = np.array([0.9, 0.8, 0.4, 0.4])
    negatives = np.array([0.7, 0.4, 0.1])
    # pairs (p > n) + half the ties: 0.9 and 0.8 beat all 3 (6); each 0.4 beats 0.1 and ties
    # 0.4 (2 x 1.5) -> 9 of 12
    assert auroc(positives, negatives) == pytest.approx(9 / 12)
    # thresholds 0.9, 0.8, 0.7, 0.4, 0.1: recall steps 1/4, 1/4, 0, 2/4, 0 at precision
    # 1/1, 2/2, -, 4/6 -> 1/4 + 1/4 + 2/4 * 4/6
    assert aupr(positives, negatives) == pytest.approx(0.25 + 0.25 + 0.5 * 4 / 6)
    # 95% of 4 positives -> the 4th highest (0.4) is the threshold; 0.7 and 0.4 pass: 2/3
    assert fpr_at_tpr(positives, negatives) == pytest.approx(2 / 3)
    fpr, tpr = roc_curve(positives, negatives)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(9 / 12)


def test_metrics_extremes():
    good, bad = np.array([2.0, 3.0]), np.array([0.0, 1.0])
    assert auroc(good, bad) == 1 and aupr(good, bad) == 1 and fpr_at_tpr(good, bad) == 0
    assert auroc(bad, good) == 0


def test_synthetic_sets_and_png_bits():
    digits = load_dataset("mnist5k", "test", image_size=8)
    first = type(digits)(digits.images[:10], None, None, "ten")
    constant = synthetic_set("constant", first).images
    assert (constant.flatten(1) == constant.flatten(1)[:, :1]).all()
    assert constant[0].max() == 0 and constant[-1].min() == 255
    assert torch.equal(synthetic_set("inverted", first).images, 255 - first.images)
    shifted = synthetic_set("shifted", first).images
    assert torch.equal(shifted[:, :, 4:, 4:], first.images[:, :, :-4, :-4])
    noise = png_bits_per_dim(synthetic_set("noise", first).images)
    flat = png_bits_per_dim(constant)
    assert (noise > 8).all() and (flat < noise).all()  # headers included: noise costs > 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ood")
    common = ["--preset", "tiny", "--quiet", "--set", "eval_every=0", "--set", "sample_count=0"]
    common += ["--set", "max_steps=30"]
    assert main(["train", *common, "--out", str(base / "model")]) == 0
    noisy = ["--set", "input_noise=0.2", "--out", str(base / "background")]
    assert main(["train", *common, *noisy]) == 0
    return base / "model", base / "background"


def test_ood_verb_reports_every_score(runs, tmp_path, capsys):
    model, background = runs
    report = tmp_path / "report"
    argv = ["ood", str(model), "--out", "noise", "--background", str(background)]
    assert main([*argv, "--limit", "50", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    for needle in ("bits/dim", "input complexity", "likelihood ratio", "AUROC"):
        assert needle in out
    with open(report / "ood_scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and {r["set"] for r in rows} == {"in", "out"}
    assert (report / "roc.png").is_file()


def test_ood_refuses_an_unknown_set(runs, capsys):
    model, _ = runs
    assert main(["ood", str(model), "--out", "no_such_set"]) == 2
    assert "no_such_set" in capsys.readouterr().err


def test_input_noise_perturbs_training_images():
    from imagetransformer.training import perturb

    torch.manual_seed(0)
    images = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    noisy = perturb(images, 0.2)
    changed = (noisy != images).float().mean()
    assert 0.15 < changed < 0.25  # 20% replaced, a few by 0 itself
    assert torch.equal(perturb(images, 0.0), images)


def test_black_images_fool_raw_likelihood_and_input_complexity_fixes_it(runs):
    """The phenomenon (Nalisnick et al.): a digits model finds an all-black image more likely
    than digits, so raw bits/dim calls it in-distribution; subtracting PNG's bits fixes it."""
    from imagetransformer import ImageTransformer
    from imagetransformer.tools.ood import ood_scores
    from imagetransformer.tools.score import score

    model = ImageTransformer.from_pretrained(runs[0])
    digits = load_dataset("mnist5k", "test", image_size=8)
    digits = type(digits)(digits.images[:100], None, None, "digits")
    black = type(digits)(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), None, None, "black")
    scores = {}
    for name, data in (("in", digits), ("out", black)):
        bits = score(model, data).bits_per_dim
        scores[name] = ood_scores(bits, png_bits_per_dim(data.images), None)
    raw = auroc(scores["in"]["bits/dim"], scores["out"]["bits/dim"])
    fixed = auroc(scores["in"]["input complexity"], scores["out"]["input complexity"])
    assert raw < 0.1 and fixed > 0.9, (raw, fixed)


def _digit_folder(folder: Path, n: int) -> None:
    """`n` grey 8x8 digit PNGs: images of the tiny model's own shape, 1x8x8."""
    folder.mkdir()
    for i, image in enumerate(load_dataset("mnist5k", "train", image_size=8).images[:n].numpy()):
        Image.fromarray(image[0]).save(folder / f"{i:02d}.png")


def _sets(report: Path) -> dict[str, int]:
    with open(report / "ood_scores.csv") as f:
        rows = list(csv.DictReader(f))
    return {part: sum(r["set"] == part for r in rows) for part in ("in", "out")}


def test_ood_reads_named_folders_whole_at_the_models_shape(runs, tmp_path, capsys):
    """A folder of images of the model's shape needs no flags, and every image of it is used
    (not its automatic test split); the output names the images and counts them."""
    model, _ = runs
    folder = tmp_path / "digits"
    _digit_folder(folder, 12)
    report = tmp_path / "report"
    capsys.readouterr()
    argv = ["ood", str(model), "--out", str(folder), "--limit", "20", "--report", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert _sets(report) == {"in": 20, "out": 12}
    assert "in: mnist5k test split, 20 images" in out
    assert f"out: {folder} (all images), 12 images" in out
    argv = ["ood", str(model), "--in", str(folder), "--out", "noise", "--report", str(report)]
    assert main(argv) == 0, capsys.readouterr().err
    assert _sets(report) == {"in": 12, "out": 12}
    assert f"in: {folder} (all images), 12 images" in capsys.readouterr().out
