"""DDP on 2 CPU processes (gloo) takes the same steps as 1 process on the same global batch.

Resuming under DDP is exact (each rank gets its own RNG state back), and a run may resume with
another number of processes as long as the global batch per step stays the same.
"""

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from imagetransformer import TrainConfig, distributed
from imagetransformer.checkpoint import load_checkpoint, save_checkpoint
from imagetransformer.data import ImageDataset
from imagetransformer.errors import UserError
from imagetransformer.run import Run, RunInfo
from imagetransformer.training import Trainer

from .helpers import tiny_config


def _blobs(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageDataset(images, None, None, f"blobs{seed}")


def _trainer(
    run_dir: str | Path,
    context: distributed.Context,
    batch_size: int,
    grad_accum: int,
    max_steps: int = 3,
    dropout: float = 0.0,
    test: bool = True,
) -> Trainer:
    cfg = TrainConfig(
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        warmup_steps=2,
        learning_rate=0.01,
        checkpoint_every=3,
        sample_count=0,
        eval_every=0,
        seed=5,
    )
    return Trainer(
        Run(run_dir, tiny_config("local_1d", image_shape=(1, 8, 8), dropout=dropout), RunInfo(cfg)),
        _blobs(40, 0),
        _blobs(13, 1) if test else None,
        progress=False,
        context=context,
    )


def _train(
    run_dir: str | Path,
    batch_size: int,
    grad_accum: int,
    context: distributed.Context = distributed.SINGLE,
) -> None:
    trainer = _trainer(run_dir, context, batch_size, grad_accum)
    trainer.start_new()
    result = trainer.fit(log=False)
    if context.is_main:
        with open(os.path.join(run_dir, "result.json"), "w") as f:
            json.dump(result, f)


def _two_process_runs(base: str) -> None:
    """Every 2-process run of this module, in one launch (starting processes is the slow part).

    "two": 3 steps. "straight": 4 steps with dropout; "broken": the same with a resume after
    step 2. Each rank reseeds by rank after start, so the ranks' dropout streams differ (as
    with per-rank seeding): handing every rank rank 0's state back would not be exact.
    "plain": 2 steps without dropout, for resuming with one process.
    """
    context, _ = distributed.setup(torch.device("cpu"))

    def run(name: str, max_steps: int, dropout: float, resume: bool = False) -> None:
        trainer = _trainer(os.path.join(base, name), context, 4, 1, max_steps, dropout, False)
        if resume:
            trainer.resume()  # the new Trainer has reseeded: only the checkpoint can help
            trainer.record_run_info()
        else:
            trainer.start_new()
            torch.manual_seed(100 + context.rank)
        trainer.fit(log=False)

    finished = False
    try:
        _train(os.path.join(base, "two"), 4, 1, context)
        run("straight", 4, 0.1)
        run("broken", 2, 0.1)
        run("broken", 4, 0.1, resume=True)
        run("plain", 2, 0.0)
        finished = True
    finally:
        distributed.teardown(context, synchronize=finished)


def _worker(rank: int, world_size: int, port: int, job: Callable[[str], None], arg: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    job(arg)
    # Leave without interpreter finalization: a gloo worker now and then aborted at exit
    # ("terminate called without an active exception") after its job had finished and its
    # process group was destroyed; the job's own failures still propagate above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(job: Callable[[str], None], arg: Path, nprocs: int = 2) -> None:
    mp.spawn(_worker, args=(nprocs, _free_port(), job, str(arg)), nprocs=nprocs, join=True)


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    reference = load_file(a / "model.safetensors")
    weights = load_file(b / "model.safetensors")
    for name, value in reference.items():
        assert torch.allclose(weights[name], value, atol=atol), (b.name, name)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ddp")
    _spawn(_two_process_runs, base)
    return base


def test_two_processes_match_one(two_process_runs, tmp_path):
    two = two_process_runs / "two"
    one = tmp_path / "one"
    _train(str(one), batch_size=8, grad_accum=1)
    accum = tmp_path / "accum"
    _train(str(accum), batch_size=4, grad_accum=2)

    for run in (two, accum):
        _assert_same_weights(one, run, atol=1e-5)
    # evaluation is reduced exactly across processes (13 test images: uneven shares)
    bpd = {
        run.name: json.loads((run / "result.json").read_text())["bits_per_dim"]
        for run in (one, two)
    }
    assert bpd["two"] == pytest.approx(bpd["one"], abs=1e-5)
    assert json.loads((two / "result.json").read_text())["images"] == 13


def test_two_process_resume_with_dropout_is_exact(two_process_runs):
    broken = two_process_runs / "broken"
    _assert_same_weights(two_process_runs / "straight", broken, atol=1e-6)
    state = load_checkpoint(broken / "checkpoint.pt")
    assert state["step"] == 4 and state["world_size"] == 2
    first, second = state["rng_cpu_ranks"]
    assert not torch.equal(first, second)  # each rank's own state was saved
    assert RunInfo.read(broken).world_size == 2


def test_resume_with_one_process_keeps_the_global_batch(two_process_runs, tmp_path):
    plain = two_process_runs / "plain"  # 2 processes x batch_size 4, stopped at step 2 of 4
    single = distributed.SINGLE
    with pytest.raises(UserError, match=r"global batch of 8 .* would take 4 .* grad_accum=2"):
        _trainer(plain, single, 4, 1, max_steps=4, test=False).resume()

    resumed = _trainer(plain, single, 4, 2, max_steps=4, test=False)
    with pytest.warns(UserWarning, match="same 8 images, but dropout draws"):
        resumed.resume()
    assert resumed.step == 2
    resumed.record_run_info()
    resumed.fit(log=False)
    assert load_checkpoint(plain / "checkpoint.pt")["world_size"] == 1
    assert RunInfo.read(plain).world_size == 1

    unbroken = _trainer(tmp_path / "one", single, 8, 1, max_steps=4, test=False)
    unbroken.start_new()
    unbroken.fit(log=False)
    _assert_same_weights(tmp_path / "one", plain, atol=1e-5)


def test_checkpoint_without_per_rank_rng_still_resumes(tmp_path):
    trainer = _trainer(tmp_path / "old", distributed.SINGLE, 4, 1, max_steps=1, test=False)
    trainer.start_new()
    trainer.fit(log=False)
    path = tmp_path / "old" / "checkpoint.pt"
    state = load_checkpoint(path)
    for key in ("rng_cpu_ranks", "world_size"):  # as written before they existed
        del state[key]
    save_checkpoint(path, state)
    resumed = _trainer(tmp_path / "old", distributed.SINGLE, 4, 1, max_steps=2, test=False)
    resumed.resume()
    assert torch.equal(torch.get_rng_state(), state["rng_cpu"])
    assert resumed.step == 1
