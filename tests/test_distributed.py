"""DDP on 2 CPU processes (gloo) takes the same steps as 1 process on the same global batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from imagetransformer import TrainConfig, distributed
from imagetransformer.data import ImageDataset
from imagetransformer.training import RunInfo, Trainer

from .helpers import tiny_config


def _blobs(n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageDataset(images, None, None, f"blobs{seed}")


def _train(run_dir: str, batch_size: int, grad_accum: int) -> None:
    context, device = distributed.setup(torch.device("cpu"))
    cfg = TrainConfig(
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=3,
        warmup_steps=2,
        learning_rate=0.01,
        checkpoint_every=3,
        sample_count=0,
        eval_every=0,
        seed=5,
    )
    trainer = Trainer(
        run_dir,
        tiny_config("local_1d", image_shape=(1, 8, 8)),
        RunInfo(train=cfg),
        _blobs(40, 0),
        _blobs(13, 1),
        progress=False,
        context=context,
    )
    try:
        trainer.start_new()
        result = trainer.fit(log=False)
        if context.is_main:
            with open(os.path.join(run_dir, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        distributed.teardown(context)


def _worker(rank: int, world_size: int, port: int, run_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    _train(run_dir, batch_size=4, grad_accum=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    two = tmp_path / "two"
    mp.spawn(_worker, args=(2, _free_port(), str(two)), nprocs=2, join=True)
    one = tmp_path / "one"
    _train(str(one), batch_size=8, grad_accum=1)
    accum = tmp_path / "accum"
    _train(str(accum), batch_size=4, grad_accum=2)

    reference = load_file(one / "model.safetensors")
    for run in (two, accum):
        weights = load_file(run / "model.safetensors")
        for name, value in reference.items():
            assert torch.allclose(weights[name], value, atol=1e-5), (run.name, name)
    # evaluation is reduced exactly across processes (13 test images: uneven shares)
    bpd = {
        run.name: json.loads((run / "result.json").read_text())["bits_per_dim"]
        for run in (one, two)
    }
    assert bpd["two"] == pytest.approx(bpd["one"], abs=1e-5)
    assert json.loads((two / "result.json").read_text())["images"] == 13
