"""torch.compile paths, traced on the CPU with Dynamo's counting backend (no code generation):
compiled training compiles once, a class-conditional loss is one graph, compiled blocks share
one compilation."""

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from imagetransformer import ImageTransformer, TrainConfig, UserError
from imagetransformer.data import load_dataset
from imagetransformer.run import Run, RunInfo
from imagetransformer.training import Trainer, TrainingLoss

from .helpers import tiny_config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("mnist5k", "train", image_size=8)


def _images(batch=2, shape=(3, 4, 6)):
    return torch.randint(0, 256, (batch, *shape), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


@pytest.mark.parametrize(
    "backend, num_classes, memory", [("blocked", 0, 7), ("dense", 0, 6), ("blocked", 10, 5)]
)
def test_compiled_training_compiles_once(
    tmp_path, monkeypatch, digits8, backend, num_classes, memory
):
    """`train --compile`: N steps, with sampling and validation between them, are one
    compilation. Before, the first trace built the attention's layout (15 graphs for
    `blocked`) and the second step failed its guard on the missing form (2 for `dense`)."""
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    info = RunInfo(
        train=TrainConfig(batch_size=4, max_steps=4, eval_every=0, sample_count=0, compile=True),
        data="mnist5k",
        image_size=8,
    )
    # a pattern no other test uses (patterns are shared): its device forms start empty
    config = tiny_config(
        "local_1d",
        image_shape=(1, 8, 8),
        block_length=16,
        memory_length=memory,
        backend=backend,
        num_classes=num_classes,
    )
    trainer = Trainer(Run(tmp_path / "run", config, info), digits8, None, progress=False)
    for step in range(3):
        trainer._train_step()
        if step == 0:  # what a trainer does between steps adds forms the training graph ignores
            trainer.eval_model.sample(1, labels=0 if num_classes else None)
            images, labels = digits8.batch(torch.arange(2))
            trainer.eval_model.bits_per_dim(images, labels if num_classes else None)
    assert counter.frame_count == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_class_conditional_loss_is_one_graph():
    """The label check reads no values inside a compiled graph (before: 7 graphs, 6 breaks)."""
    model = ImageTransformer(tiny_config(num_classes=3)).prepare_attention()
    explained = torch._dynamo.explain(TrainingLoss(model))(_images(), torch.tensor([0, 2]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_labels_are_checked_where_a_read_is_free_or_once_per_call():
    """Out-of-range labels are refused in one line on the CPU, and in evaluation and sampling
    anywhere; labels on an accelerator in training mode (the trainer's) are not read."""
    model = ImageTransformer(tiny_config(num_classes=3))
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(UserError, match=r"labels must be 2 integers in 0\.\.2"):
            model.loss(_images(), torch.tensor([0, 3]))
        with pytest.raises(UserError, match=r"0\.\.2"):
            model.loss(_images(), [-1, 0])
    on_device = torch.tensor([0, 5], device="meta")  # stands for labels on a GPU
    assert not model.train()._read_labels(on_device)
    assert model.eval()._read_labels(on_device)
    with pytest.raises(UserError, match=r"0\.\.2"):
        model.sample(1, labels=torch.tensor([4]))


def test_compiled_blocks_share_one_compilation():
    """The blocks are identical modules: compiling each one compiles once for all (what
    benchmarks/gpu.py does instead of compiling the whole loss), forward and backward."""
    counter = CompileCounter()
    model = ImageTransformer(tiny_config(num_layers=3, backend="blocked")).prepare_attention()
    reference = model.loss(_images())
    reference.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.blocks:
        block.compile(backend=counter)
    for _ in range(2):
        model.zero_grad()
        loss = model.loss(_images())
        loss.backward()
    assert counter.frame_count == 1
    assert torch.allclose(loss, reference)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
