"""The `imagetransformer` command, run in-process on the tiny preset (8x8 mnist5k)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer
from imagetransformer.cli import main
from imagetransformer.presets import DEFAULT_PRESET, PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--image-size", "8", "--quiet"]
QUICK = ["--set", "eval_every=0", "--set", "sample_count=4", "--set", "log_every=1"]


def _train(out: Path, *extra: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", *TINY, "--out", str(out), *QUICK, *extra])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints at steps 3 and 6); copy it before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code, stdout, stderr = _train(out, "--set", "max_steps=6", "--set", "checkpoint_every=3")
    assert code == 0, stderr
    assert "done: step 6" in stdout
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _steps(run: Path, kind: str = "train") -> list[int]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [rec["step"] for rec in map(json.loads, lines) if rec["kind"] == kind]


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- train, resume, eval, sample


def test_train_writes_a_complete_run_folder(trained: Path) -> None:
    for name in ("config.json", "run.json", "model.safetensors", "checkpoint.pt", "log.jsonl"):
        assert (trained / name).is_file(), name
    assert _checkpoint(trained)["step"] == 6
    assert _steps(trained) == [1, 2, 3, 4, 5, 6]
    assert _steps(trained, "test") == [6]  # eval_every=0: only the final evaluation
    assert (trained / "samples" / "step_0000006.png").is_file()
    run_info = json.loads((trained / "run.json").read_text())
    assert run_info["preset"] == "tiny" and run_info["image_size"] == 8


def test_resume_eval_sample(trained: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run = _copy(trained, tmp_path)

    assert main(["train", "--resume", "--out", str(run), "--set", "max_steps=10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} at step 6/10" in out
    assert "done: step 10" in out
    assert _checkpoint(run)["step"] == 10
    assert _steps(run) == list(range(1, 11))  # continued from 6, no step taken twice
    state = _checkpoint(run)
    assert state["train_config"]["max_steps"] == 10

    assert main(["eval", str(run), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert 0 < result["bits_per_dim"] < 8.5
    assert len(result["bits_per_dim_per_channel"]) == 1
    assert result["bits_per_dim_per_channel"][0] == pytest.approx(result["bits_per_dim"])
    assert result["split"] == "test" and result["images"] > 0
    # The final training evaluation saw the same weights and the same split.
    final = [
        rec
        for rec in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if rec["kind"] == "test"
    ][-1]
    assert final["step"] == 10
    assert final["bits_per_dim"] == pytest.approx(result["bits_per_dim"], rel=1e-6)

    assert main(["sample", str(run), "--n", "4", "--out", "grid.png", "--npy", "s.npy"]) == 0
    out = capsys.readouterr().out
    assert "grid.png" in out and "s.npy" in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG"
        assert grid.width > 2 * 8 and grid.height > 2 * 8  # 2x2 grid, scaled up
    samples = np.load(tmp_path / "s.npy")
    assert samples.dtype == np.uint8
    assert samples.shape == (4, 1, 8, 8)


def test_resume_takes_the_same_steps_as_an_unbroken_run(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    resumed = _copy(trained, tmp_path)
    code, _, err = _train(resumed, "--resume", "--set", "max_steps=9")
    assert code == 0, err
    code, _, err = _train(
        tmp_path / "straight", "--set", "max_steps=9", "--set", "checkpoint_every=3"
    )
    assert code == 0, err
    # the latest weights (model.safetensors holds the selected ones: the resumed run also
    # evaluated at step 6, where the first part ended, so it may have chosen those)
    a = _checkpoint(resumed)["model"]
    b = _checkpoint(tmp_path / "straight")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_records_the_new_max_steps(trained, tmp_path, monkeypatch, capsys) -> None:
    """run.json must carry the max_steps a resume set, or the next --resume reads the old one."""
    monkeypatch.chdir(tmp_path)
    run = _copy(trained, tmp_path)
    assert (
        main(
            [
                "train",
                "--resume",
                "--out",
                str(run),
                "--set",
                "max_steps=7",
                "--set",
                "sample_count=0",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert _checkpoint(run)["step"] == 7
    assert json.loads((run / "run.json").read_text())["train"]["max_steps"] == 7


def test_from_pretrained_on_a_run_folder(trained: Path) -> None:
    model = ImageTransformer.from_pretrained(trained)
    assert model.config.image_shape == (1, 8, 8)
    assert json.loads((trained / "config.json").read_text()) == model.config.to_dict()
    weights = _checkpoint(trained)["model"]
    own = model.state_dict()
    assert own.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(own[key], value), key
    model.eval()
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        nll = model.nll(images)
    assert nll.shape == (2, 1, 8, 8) and torch.isfinite(nll).all()


# ---------------------------------------------------------------- errors


def _assert_user_error(code: int, capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("imagetransformer: error:"), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--preset", "nope"], ["'nope'", "tiny"]),
        (
            ["--preset", "tiny", "--image-size", "8", "--data", "no_such_set"],
            ["no_such_set", "mnist5k"],
        ),
        (
            [
                "--preset",
                "tiny",
                "--image-size",
                "8",
                "--set",
                "attention=local_2d",
                "--set",
                "query_shape=3,3",
            ],
            ["query_shape", "--set query_shape="],
        ),
        (["--preset", "mnist_1d", "--image-size", "8"], ["1x8x8", "1x28x28"]),
        (["--preset", "tiny", "--set", "no_such_key=1"], ["no_such_key"]),
        (["--preset", "tiny", "--set", "num_layers=two"], ["num_layers"]),
        (
            ["--preset", "tiny", "--image-size", "8", "--set", "output=dmol"]
            + ["--set", "label_smoothing=0.1"],
            ["label_smoothing", "dmol"],
        ),
        (["--preset", "tiny", "--task", "superres", "--scale", "3"], ["scale", "8x8"]),
        (
            ["--preset", "tiny", "--image-size", "8", "--task", "superres", "--scale", "2"]
            + ["--set", "low_res_bounds=true", "--set", "label_smoothing=0.1"],
            ["label_smoothing", "low_res_bounds"],
        ),
    ],
    ids=[
        "preset",
        "data",
        "query_shape",
        "data_shape",
        "set_key",
        "set_value",
        "dmol",
        "sr",
        "bounds",
    ],
)
def test_train_errors(argv, needles, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", *argv, "--set", "max_steps=1", "--quiet"])
    _assert_user_error(code, capsys, *needles)
    assert not (tmp_path / "runs").exists()  # nothing written for a refused run


def test_train_into_an_existing_run_needs_resume(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    before = (trained / "checkpoint.pt").read_bytes()
    code = main(["train", *TINY, "--out", str(trained), "--set", "max_steps=1"])
    _assert_user_error(code, capsys, "--resume")
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_resume_an_empty_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code = main(["train", "--resume", "--out", "empty", "--quiet"])
    _assert_user_error(code, capsys, "not found")


def test_resume_refuses_model_changes(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--resume", "--out", str(trained), "--set", "d_model=64", "--quiet"])
    _assert_user_error(code, capsys, "d_model", "max_steps")
    assert _checkpoint(trained)["step"] == 6


def test_resume_may_switch_the_attention_backend(trained, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(trained, tmp_path)
    argv = ["train", "--resume", "--out", str(run), "--quiet", "--set", "max_steps=7"]
    assert main([*argv, "--attention-backend", "dense"]) == 0  # same function, other kernel
    assert _checkpoint(run)["step"] == 7


def test_resume_refuses_a_corrupt_checkpoint(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run = _copy(trained, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # the older copy would stand in
        (run / name).write_bytes(b"\x00garbage, not a zip archive" * 10)
    weights = (run / "model.safetensors").read_bytes()
    code = main(["train", "--resume", "--out", str(run), "--set", "max_steps=8", "--quiet"])
    _assert_user_error(code, capsys, "checkpoint.pt", "corrupt")
    assert (run / "model.safetensors").read_bytes() == weights


def test_eval_refuses_a_corrupt_weights_file(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run = _copy(trained, tmp_path)
    (run / "model.safetensors").write_bytes(b"\xff" * 64)
    code = main(["eval", str(run), "--json"])
    _assert_user_error(code, capsys, "model.safetensors")


def test_eval_on_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("hello")
    code = main(["eval", "photos"])
    _assert_user_error(code, capsys, "config.json")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--n", "0"], "--n"),
        (["--label", "3"], "unconditional"),
        (["--guidance", "1"], "class_dropout"),
    ],
)
def test_sample_errors(extra, needle, trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["sample", str(trained), *extra, "--out", "g.png"])
    _assert_user_error(code, capsys, needle)
    assert not (tmp_path / "g.png").exists()


def test_eval_refuses_a_zero_batch_size(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["eval", str(trained), "--json", "--batch-size", "0"])
    _assert_user_error(code, capsys, "--batch-size")


@pytest.mark.parametrize("setting", ["checkpoint_every=0", "log_every=0"])
def test_zero_cadence_settings_do_not_crash(setting, tmp_path, monkeypatch, capsys) -> None:
    """Either a one-line error up front, or 0 means 'only at the end' like eval_every=0."""
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            *TINY,
            "--out",
            "run",
            "--set",
            "max_steps=2",
            "--set",
            "eval_every=0",
            "--set",
            "sample_count=0",
            "--set",
            setting,
        ]
    )
    if code == 2:
        _assert_user_error(code, capsys, setting.split("=")[0])
    else:
        assert code == 0
        assert _checkpoint(tmp_path / "run")["step"] == 2


def test_argparse_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--channels", "2"])
    assert exit_info.value.code == 2
    assert "imagetransformer" in capsys.readouterr().err


# ---------------------------------------------------------------- presets, entry points


def test_presets_lists_every_preset(capsys) -> None:
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = [line.split()[0] for line in lines]
    assert sorted(listed) == sorted(PRESETS)
    default = [line for line in lines if line.split()[0] == DEFAULT_PRESET]
    assert "(default)" in default[0]
    assert any(line.split()[0] == "tiny" and "1x8x8" in line for line in lines)


def test_console_script_and_module_help() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = Path(sys.executable).with_name("imagetransformer")
    commands = [[sys.executable, "-m", "imagetransformer", "--help"]]
    commands.append([str(script), "--help"] if script.exists() else ["imagetransformer", "--help"])
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        for verb in ("train", "eval", "sample", "presets"):
            assert verb in done.stdout


def test_train_on_an_image_folder(tmp_path, monkeypatch, capsys) -> None:
    """`--data PATH`: class sub-folders become labels, images are resized to --image-size."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "pics" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "pics" / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "pics"),
        "--image-size",
        "8",
        "--channels",
        "1",
        "--quiet",
        "--out",
        "run",
        *QUICK,
        "--set",
        "max_steps=2",
        "--set",
        "num_classes=2",
    ]
    assert main(argv) == 0
    assert "on " + str(tmp_path / "pics") in capsys.readouterr().out
    assert main(["eval", "run", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 1  # 10% of 12 images, rounded down, at least one
    assert 0 < result["bits_per_dim"] < 9


def test_eval_in_bf16_agrees_with_fp32(trained: Path, capsys) -> None:
    figures = {}
    for precision in ("fp32", "bf16"):
        assert main(["eval", str(trained), "--json", "--precision", precision]) == 0
        figures[precision] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(figures["bf16"]["bits_per_dim"] - figures["fp32"]["bits_per_dim"]) < 0.01


def test_complete_from_split_and_from_a_file(trained: Path, tmp_path, capsys) -> None:
    out = tmp_path / "completions.png"
    argv = [
        "complete",
        str(trained),
        "--from-split",
        "test",
        "--count",
        "2",
        "--n",
        "3",
        "--image-size",
        "8",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "3 completions" in capsys.readouterr().out
    with Image.open(out) as grid:  # 2 rows of original, masked, 3 completions
        assert grid.width > grid.height * 2
    picture = tmp_path / "digit.png"
    Image.fromarray(np.full((20, 20), 200, dtype=np.uint8)).save(picture)
    assert main(["complete", str(trained), "--image", str(picture), "--out", str(out)]) == 0
    code = main(["complete", str(trained), "--image", str(tmp_path / "none.png")])
    assert code == 2 and "cannot read image" in capsys.readouterr().err


def test_eval_classify_and_guided_sampling_on_a_conditional_run(tmp_path, capsys) -> None:
    """A class-conditional run trained with class_dropout classifies over its 10 classes (not
    the "no class" row) and samples with guidance."""
    code, _, stderr = _train(
        tmp_path / "cond",
        *("--set", "max_steps=3", "--set", "num_classes=10", "--set", "class_dropout=0.1"),
    )
    assert code == 0, stderr
    grid = tmp_path / "guided.png"
    args = ["sample", str(tmp_path / "cond"), "--n", "2", "--label", "3", "--guidance", "1"]
    assert main([*args, "--out", str(grid)]) == 0 and grid.exists()
    completed = tmp_path / "completed.png"
    args = ["complete", str(tmp_path / "cond"), "--from-split", "test", "--count", "1"]
    assert main([*args, "--n", "2", "--guidance", "2", "--out", str(completed)]) == 0
    assert completed.exists()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "cond"), "--json", "--classify", "--limit", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    c = result["classification"]
    assert c["images"] == 20 and c["num_classes"] == 10 and c["chance"] == 0.1
    assert 0.0 <= c["accuracy"] <= 1.0
    assert main(["eval", str(tmp_path / "cond"), "--classify", "--limit", "8"]) == 0
    assert "generative classifier: accuracy" in capsys.readouterr().out


def test_superres_train_eval_upscale(trained: Path, tmp_path, capsys) -> None:
    run = tmp_path / "sr"
    code, stdout, stderr = _train(
        run,
        "--set",
        "max_steps=3",
        "--task",
        "superres",
        "--scale",
        "2",
        "--set",
        "encoder_layers=1",
    )
    assert code == 0, stderr
    assert json.loads((run / "config.json").read_text())["task"] == "superres"
    argv = ["eval", str(run), "--json", "--limit", "8", "--sr-images", "3", "--image-size", "8"]
    assert main([*argv, "--temperatures", "0.8,1.0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["superres"]["images"] == 3
    for t in ("0.8", "1.0"):
        scores = result["superres"]["by_temperature"][t]
        assert 0 < scores["psnr_db"] <= 100 and -1 <= scores["ssim"] <= 1
        assert 0 <= scores["consistency"] <= 255
    out = tmp_path / "up.png"
    argv = ["upscale", str(run), "--from-split", "test", "--count", "2", "--n", "3"]
    assert (
        main([*argv, "--image-size", "8", "--out", str(out), "--npy", str(tmp_path / "s.npy")]) == 0
    )
    assert "samples, truth" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npy").shape == (6, 1, 8, 8)
    with Image.open(out) as grid:  # rows: input, 3 samples, truth
        assert grid.width > grid.height * 2
    low = tmp_path / "low.png"
    Image.fromarray(np.full((4, 4), 90, dtype=np.uint8)).save(low)
    assert main(["upscale", str(run), "--image", str(low), "--n", "2", "--out", str(out)]) == 0
    assert "truth" not in capsys.readouterr().out
    code = main(["upscale", str(trained), "--image", str(low)])
    _assert_user_error(code, capsys, "not a super-resolution run", "--task superres")


# ---------------------------------------------------------------- hardening


def test_resume_before_the_first_checkpoint_starts_again(tmp_path, monkeypatch, capsys) -> None:
    """A run killed before its first checkpoint holds config and logs: --resume restarts it."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "early"
    assert _train(run, "--set", "max_steps=2")[0] == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "model.safetensors"):
        (run / name).unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint yet" in out and "step 0" in out
    assert _checkpoint(run)["step"] == 2


def test_a_full_disk_at_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    """The checkpoint of the last good step survives, and the message says how to go on."""
    import errno

    from imagetransformer import checkpoint

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "full"
    real_write_temp = checkpoint._write_temp

    def write_temp(path, write):
        if path.name == "checkpoint.pt" and path.exists():  # the first one fits, then the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_temp(path, write)

    monkeypatch.setattr(checkpoint, "_write_temp", write_temp)
    code, stdout, stderr = _train(run, "--set", "max_steps=6", "--set", "checkpoint_every=2")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    for needle in ("No space left", "step 2 is intact", "--resume"):
        assert needle in lines[0], lines[0]
    assert _checkpoint(run)["step"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_its_default_data(name) -> None:
    """`train --preset NAME` needs no other flag: the preset's data, converted as the preset
    says, has the preset's image shape."""
    from imagetransformer.data import loaded_shape
    from imagetransformer.presets import load_preset, preset_data_options

    data = preset_data_options(name)
    shape = loaded_shape(data.name, data.image_size, data.channels)
    assert shape == tuple(load_preset(name).image_shape)


def test_presets_on_embedded_data_build_their_trainer() -> None:
    """For the presets whose data ships with the package, the real data as the run reads it is
    what the real trainer's model takes: it gives those images finite bits (an untrained model:
    near a uniform guess's 8), and images of another shape are refused, naming the fix."""
    from imagetransformer.data import ImageDataset
    from imagetransformer.errors import UserError
    from imagetransformer.presets import preset_data_options
    from imagetransformer.run import Run
    from imagetransformer.training import Trainer

    for name in sorted(PRESETS):
        if preset_data_options(name).name != "mnist5k":
            continue
        run = Run.new(None, name)
        train, test = run.load_split("train"), run.load_split("test")
        model = Trainer(run, train, test, progress=False).model
        assert train.shape == test.shape == tuple(model.config.image_shape), name
        images, labels = train.batch(torch.arange(2))
        bits = model.bits_per_dim(images, labels if model.config.num_classes else None)
        assert bool(torch.isfinite(bits).all()) and 0 < float(bits.max()) < 12, (name, bits)
        c, h, w = train.shape
        colour = ImageDataset(torch.zeros(4, 4 - c, h, w, dtype=torch.uint8), None, None, "other")
        refusal = f"holds {4 - c}x{h}x{w} images but the model takes {c}x{h}x{w}: pick a preset"
        with pytest.raises(UserError, match=refusal):
            Trainer(run, colour, test, progress=False)


def test_train_tiny_with_just_the_preset(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", "--quiet", "--set", "max_steps=2", *QUICK])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())["image_size"] == 8


def test_size_mismatch_suggests_a_preset(tmp_path, monkeypatch, capsys) -> None:
    """Colour 32x32 images under the default (grey 28x28) preset: the message names rgb32."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    code = main(["train", "--data", str(folder), "--quiet", "--set", "max_steps=1"])
    _assert_user_error(code, capsys, "3x32x32", "rgb32", "--image-size 28 --channels 1")


def test_rgb32_on_a_few_photos_adds_the_near_signal_unless_told(tmp_path, capsys) -> None:
    """rgb32 trained on fewer images than `Preset.few_images` names turns near_signal on, says
    so in one line and records it in config.json; --set near_signal=false keeps it off, and a
    resume keeps what the run recorded."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    quick = ["--quiet", "--set", "max_steps=1", "--set", "eval_images=2", *QUICK]
    quick += ["--set", "sample_count=0"]
    args = ["train", "--preset", "rgb32", "--data", str(folder), *quick]
    assert main([*args, "--out", str(tmp_path / "few")]) == 0
    out = capsys.readouterr().out
    assert "near_signal=true, as the preset does for few images" in out
    assert "--set near_signal=false" in out
    assert json.loads((tmp_path / "few" / "config.json").read_text())["near_signal"] is True
    told = ["--out", str(tmp_path / "told"), "--set", "near_signal=false"]
    assert main([*args, *told]) == 0
    assert "few images" not in capsys.readouterr().out
    assert json.loads((tmp_path / "told" / "config.json").read_text())["near_signal"] is False
    resume = ["train", "--out", str(tmp_path / "few"), "--resume", "--set", "max_steps=2"]
    assert main([*resume, "--quiet"]) == 0
    assert "few images" not in capsys.readouterr().out
    assert json.loads((tmp_path / "few" / "config.json").read_text())["near_signal"] is True


def test_few_images_settings_apply_below_the_preset_threshold_only() -> None:
    from imagetransformer.presets import few_images_of
    from imagetransformer.run import Run

    below = few_images_of("rgb32").below
    for images, expected in ((below - 1, True), (below, False)):
        run = Run.new("unused", "rgb32", [], "photos")
        took = run.take_few_images_settings(images, [])
        assert run.config.near_signal is expected and (took is not None) is expected
    assert few_images_of("mnist_1d") is None
    run = Run.new("unused", "mnist_1d", [])
    assert run.take_few_images_settings(10, []) is None and not run.config.near_signal


def test_resume_may_start_a_moving_average(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "avg"
    assert _train(run, "--set", "max_steps=2")[0] == 0
    argv = ["train", "--resume", "--out", str(run), "--quiet", "--set", "max_steps=4"]
    assert main([*argv, "--set", "ema_decay=0.9"]) == 0
    state = _checkpoint(run)
    assert state["step"] == 4 and "ema" in state
    assert "raw weights" in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["train", "score"])
def test_ctrl_c_says_resume_only_for_train(verb, monkeypatch, capsys) -> None:
    """Interrupting a verb is one line; only training has a checkpoint to resume from."""
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"imagetransformer.cli.{verb}"), "run", interrupted)
    assert main([verb, "RUN"] if verb == "score" else [verb]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagetransformer: interrupted") and "\n" not in err
    assert ("train --resume" in err) == (verb == "train")
