"""Training under signals and divergence: SIGTERM and Ctrl-C finish the step in progress and
write its checkpoint; a run whose loss or gradients stop being finite stops, keeping the last
good checkpoint."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagetransformer.cli import main

TINY = ["--preset", "tiny", "--image-size", "8", "--quiet", "--set", "sample_count=0"]


def _train(out: Path, *extra: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", *TINY, "--out", str(out), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def _log_steps(run: Path) -> int:
    path = run / "log.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0)


def _signal_after(command: list[str], run: Path, steps: int, sent: int, env: dict, wait: float):
    """Start `command`, send `sent` once the run has logged `steps` steps; (code, out, err)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + wait
        while _log_steps(run) < steps and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(sent)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, out, err


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_its_checkpoint_and_resume_is_exact(sent, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "imagetransformer", "train", *TINY, "--out", str(run)]
    command += ["--set", "max_steps=100000", "--set", "checkpoint_every=100000"]
    command += ["--set", "eval_every=0", "--set", "log_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code, out, err = _signal_after(command, run, 15, sent, env, wait=120)
    assert code == 128 + sent, (out, err)
    stopped = _checkpoint(run)["step"]
    assert stopped >= 15
    name = signal.Signals(sent).name
    lines = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert lines == [
        f"stopped by {name} at step {stopped}: its checkpoint is written; continue with: "
        f"imagetransformer train --out {run} --resume"
    ]
    assert "Traceback" not in err

    target = stopped + 5
    code, _, err = _train(run, "--resume", "--set", f"max_steps={target}")
    assert code == 0, err
    straight = tmp_path / "straight"
    code, _, err = _train(
        straight,
        "--set",
        f"max_steps={target}",
        "--set",
        "checkpoint_every=100000",
        "--set",
        "eval_every=0",
    )
    assert code == 0, err
    a, b = _checkpoint(run), _checkpoint(straight)
    assert a["step"] == b["step"] == target
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    code, out, err = _train(
        run,
        "--set",
        "learning_rate=30",  # a 100-step warm-up to a far too high rate: a few good steps
        "--set",
        "warmup_steps=100",
        "--set",
        "grad_clip=0",
        "--set",
        "eval_every=0",
        "--set",
        "max_steps=300",
        "--set",
        "checkpoint_every=2",
        "--set",
        "log_every=1",
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "training diverged at step" in lines[0], err
    assert "(learning rate " in lines[0] and "--set learning_rate" in lines[0]
    assert "Traceback" not in err
    checkpoint = _checkpoint(run)
    assert 0 < checkpoint["step"] < 300
    assert f"diverged at step {checkpoint['step']} " in lines[0]  # stopped at once
    assert f"checkpoint of step {checkpoint['step']} is kept" in lines[0]
    for state in (checkpoint["model"], load_file(run / "model.safetensors")):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    for line in (run / "log.jsonl").read_text().splitlines():  # strict JSON throughout
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))


def test_a_run_that_is_not_finite_at_once_says_no_checkpoint_was_written(tmp_path):
    code, _, err = _train(tmp_path / "run", "--set", "learning_rate=1e6", "--set", "grad_clip=0")
    assert code == 2 and "diverged at step" in err and "is not finite" in err
    assert "no checkpoint was written" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sigterm_under_torchrun_stops_every_process_after_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the step, rank 0 writes it."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", "-m", "imagetransformer", "train", *TINY]
    command += ["--out", str(run), "--device", "cpu", "--set", "max_steps=100000"]
    command += ["--set", "checkpoint_every=100000", "--set", "eval_every=0"]
    command += ["--set", "log_every=1", "--set", "batch_size=4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    _, out, err = _signal_after(command, run, 10, signal.SIGTERM, env, wait=300)
    checkpoint = _checkpoint(run)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] >= 10
    lines = [line for line in out.splitlines() if line.startswith("stopped by")]
    assert lines == [
        f"stopped by SIGTERM at step {checkpoint['step']}: its checkpoint is written; "
        f"continue with: imagetransformer train --out {run} --resume"
    ], (out, err)
    # one process continues it on the same global batch (4 x 2 processes = 4 x grad_accum 2)
    code, _, err = _train(
        run, "--resume", "--set", f"max_steps={checkpoint['step'] + 2}", "--grad-accum", "2"
    )
    assert code == 0, err
    assert _checkpoint(run)["step"] == checkpoint["step"] + 2


def test_a_training_step_never_waits_for_the_device():
    """No host read (.item(), float(), int(), bool() of a tensor) inside the step: on a GPU each
    would stall the queue every step; figures are read at log steps only."""
    import ast
    import inspect
    import textwrap

    from imagetransformer.training import DivergenceWatch, Trainer

    for function in (Trainer._train_step, DivergenceWatch.record):
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            method = isinstance(node.func, ast.Attribute) and node.func.attr in ("item", "tolist")
            builtin = (
                isinstance(node.func, ast.Name)
                and node.func.id in ("float", "int", "bool")
                and not all(isinstance(arg, ast.Constant) for arg in node.args)  # float("inf")
            )
            assert not (method or builtin), (
                f"{function.__qualname__} reads a value from the device: {ast.unparse(node)}"
            )
