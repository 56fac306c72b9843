"""The GPU benchmark script runs its code paths (on the CPU, tiny) and refuses a CPU-only run;
the web benchmark runs on tiny runs."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


# runs the script as `python3 benchmarks/gpu.py` would, then lists the modules it loaded
_RUN_AND_LIST_MODULES = """
import importlib.metadata, json, runpy, sys
script, modules, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = script
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code
roots = {name.split(".")[0] for name in list(sys.modules)} - set(sys.stdlib_module_names)
owners = importlib.metadata.packages_distributions()
with open(modules, "w") as file:
    json.dump({root: owners.get(root, []) for root in roots}, file)
sys.exit(code)
"""

# what the lent GPU machine's python3 holds besides torch (and what torch itself requires)
_GPU_MACHINE_PACKAGES = {"torch", "einops", "safetensors", "tqdm", "pillow", "numpy"}


def _name(distribution: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", distribution.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _with_requirements(names: set[str]) -> set[str]:
    import importlib.metadata

    seen, todo = set(), [_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def _gpu_benchmark(tmp_path, *args: str):
    out, modules = tmp_path / "out" / "gpu.json", tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, str(SCRIPT), str(modules)]
        + ["--cpu-smoke", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads(out.read_text()), json.loads(modules.read_text())


def test_gpu_benchmark_smoke_runs_every_part(tmp_path):
    done, results, modules = _gpu_benchmark(tmp_path)
    # --cpu-smoke does not ask the 3-step loss to fall: 1 would mean a part failed
    assert done.returncode == 0, done.stderr
    assert "failed" not in json.dumps(results["parts"]).lower(), results
    assert results["complete"] is True and results["incomplete"] == results["failed"] == []
    assert "| part |" in done.stdout
    parts = results["parts"]
    assert all(part["status"] == "ok" for part in parts.values()), parts
    # the backend that ran, not "auto"; compiled blocks: one compilation for both
    assert results["settings"]["train_backend"] == "blocked"
    assert parts["throughput/flex_compiled"]["graphs_compiled"] == 1
    check = parts["check/flex_vs_dense"]
    assert check["match"] is True and check["gradients_compared"] > 10
    assert all(parts[f"sample/{p}"]["warmup_s"] > 0 for p in ("bf16", "fp32"))
    # `python3 benchmarks/gpu.py` on the GPU machine: nothing beyond what its python3 holds
    allowed = _with_requirements(_GPU_MACHINE_PACKAGES) | {"imagetransformer"}
    loaded = {_name(d) for owners in modules.values() for d in owners}
    assert loaded <= allowed, loaded - allowed


def test_gpu_benchmark_is_incomplete_when_a_part_is_cut_off(tmp_path):
    """A part stopped by its budget (train: 100,000 steps in 3 s) or skipped (a budget under
    3 s) leaves the run incomplete, exit status 1, though nothing failed."""
    done, results, _ = _gpu_benchmark(
        tmp_path, "--steps", "100000", "--budget", "train=3", "--budget", "eval=1"
    )
    assert done.returncode == 1, done.stderr
    assert results["complete"] is False and results["failed"] == []
    assert results["incomplete"] == ["train", "eval"]
    assert results["parts"]["train"]["status"].startswith("stopped early")
    assert results["parts"]["eval"]["status"].startswith("skipped")
    assert "parts without their figure: train, eval" in done.stderr


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
