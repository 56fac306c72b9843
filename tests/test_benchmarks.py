"""The GPU benchmark script runs its code paths (on the CPU, tiny) and refuses a CPU-only run;
the web benchmark runs on tiny runs."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


def test_gpu_benchmark_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # --cpu-smoke does not ask the 3-step loss to fall: 1 would mean a part failed
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    results = json.loads(out.read_text())
    assert "failed" not in json.dumps(results).lower(), results
    assert results["complete"] is True
    assert "| part |" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_benchmark_refuses_a_cpu_only_machine(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0]


def _tiny_run(out: Path, *extra: str) -> Path:
    from imagetransformer.cli import main

    argv = ["train", "--preset", "tiny", "--image-size", "8", "--quiet", "--out", str(out)]
    quick = ["--set", "max_steps=2", "--set", "eval_every=0", "--set", "sample_count=0"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, *quick, *extra]) == 0
    return out


def test_web_benchmark_measures_both_servers_and_loses_no_answer(tmp_path):
    """benchmarks/web.py on tiny runs: every part runs, and its load and SIGKILL runs find
    every acknowledged answer stored exactly once."""
    run = _tiny_run(tmp_path / "run")
    sr_run = _tiny_run(tmp_path / "sr", "--task", "superres", "--scale", "2")
    script = SCRIPT.parent / "web.py"
    argv = ["--run", str(run), "--sr-run", str(sr_run), "--raters", "3", "--images", "4"]
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| `page=sample&n=16` (median of 3) |" in done.stdout
    assert "12 answers acknowledged" in done.stdout and "0 lost, 0 duplicated" in done.stdout
    assert "0 of them missing after it" in done.stdout


def test_quality_measures_streaks_and_codecs():
    """benchmarks/quality.py: horizontal streaks push the ratio up, vertical ones down; the
    codec figures are per image bits/dim; bicubic keeps a flat input flat."""
    import importlib.util
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (4, 3, 32, 1), generator=g, dtype=torch.uint8).expand(
        -1, -1, -1, 32
    )
    assert quality.streak_ratio(rows) > 10  # every row one colour: horizontal streaks
    assert quality.streak_ratio(rows.transpose(2, 3)) < 0.1
    noise = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert 0.9 < quality.streak_ratio(noise) < 1.1
    bits = quality.codec_bits(noise)
    assert 8.0 < bits["png"] < 9.5 and 8.0 < bits["webp"] < 9.5  # noise does not compress
    flat = torch.full((2, 1, 32, 32), 77, dtype=torch.uint8)
    assert quality.codec_bits(flat)["png"] < 1.0  # a flat image costs only its headers
    up = quality.bicubic(torch.full((1, 1, 7, 7), 77, dtype=torch.uint8), 4)
    assert up.shape == (1, 1, 28, 28) and bool((up == 77).all())
