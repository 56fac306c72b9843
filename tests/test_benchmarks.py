"""The GPU benchmark script runs its code paths (on the CPU, tiny) and refuses a CPU-only run."""

import json
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
    assert done.returncode in (0, 1), done.stderr  # 1: the 3-step loss may not fall
    assert "Traceback" not in done.stderr
    results = json.loads(out.read_text())
    assert "failed" not in json.dumps(results).lower(), results
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
