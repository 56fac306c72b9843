"""Training: the schedule, learning that lowers bits/dim, exact resumption, safe checkpoints."""

import math

import pytest
import torch

from imagetransformer import ImageTransformer, TrainConfig, UserError
from imagetransformer.data import ImageDataset, load_dataset
from imagetransformer.evaluation import classify, evaluate
from imagetransformer.run import Run, RunInfo
from imagetransformer.training import Trainer, batch_indices, learning_rate, make_optimizer

from .helpers import tiny_config


@pytest.fixture(scope="module")
def digits8():
    """mnist5k downscaled to 8x8: real digits, tiny positions."""
    train = load_dataset("mnist5k", "train", image_size=8)
    test = load_dataset("mnist5k", "test", image_size=8)
    return train, test


def test_noam_peak_and_decay():
    cfg = TrainConfig(learning_rate=0.2, warmup_steps=100, max_steps=1000)
    lrs = [learning_rate(s, cfg, 64) for s in range(1000)]
    assert math.isclose(max(lrs), 0.2 * 10 / math.sqrt(64 * 100), rel_tol=1e-9)
    assert lrs.index(max(lrs)) == 99  # (s + 1) = w
    assert lrs[10] < lrs[50] < lrs[99] and lrs[200] > lrs[800]
    assert math.isclose(lrs[399] / lrs[99], 0.5, rel_tol=1e-9)  # inverse square root


def test_cosine_schedule_reaches_zero():
    cfg = TrainConfig(learning_rate=0.2, warmup_steps=10, max_steps=100, lr_schedule="cosine")
    assert math.isclose(learning_rate(9, cfg, 64), 0.2 * 10 / math.sqrt(640))
    assert learning_rate(99, cfg, 64) == pytest.approx(0.0, abs=1e-12)


def test_linear_schedule_falls_in_a_straight_line_to_zero():
    """The same warm-up and peak as cosine, then equal steps down: halfway through the decay
    half the peak (as cosine), a quarter of the way 0.75 of it (cosine: 0.85)."""
    cfg = TrainConfig(learning_rate=0.2, warmup_steps=10, max_steps=110, lr_schedule="linear")
    peak = 0.2 * 10 / math.sqrt(640)
    assert math.isclose(learning_rate(9, cfg, 64), peak)
    assert math.isclose(learning_rate(34, cfg, 64), 0.75 * peak)
    assert math.isclose(learning_rate(59, cfg, 64), 0.5 * peak)
    assert learning_rate(109, cfg, 64) == pytest.approx(0.0, abs=1e-12)
    drops = [learning_rate(s, cfg, 64) - learning_rate(s + 1, cfg, 64) for s in range(10, 108)]
    assert max(drops) - min(drops) < 1e-12


def test_batch_order_is_a_function_of_seed_and_step():
    """Each epoch visits every image at most once, in a new order per epoch and per seed; and a
    step's batch depends on (seed, step) alone, not on the global RNG or the steps before it, so
    a resumed run draws the batches an unbroken one would."""
    n, size = 22, 5  # 4 batches per epoch; 2 images wait for the next epoch
    epochs = [
        torch.cat([batch_indices(4 * e + s, n, size, seed=1) for s in range(4)]) for e in (0, 1, 2)
    ]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 20 and 0 <= int(epoch.min()) <= int(epoch.max()) < n
    assert not torch.equal(epochs[0], epochs[1])
    assert not torch.equal(batch_indices(0, n, size, 1), batch_indices(0, n, size, 2))
    with torch.random.fork_rng():
        torch.manual_seed(999)
        torch.rand(7)  # another global RNG state, as after some other work
        before = torch.get_rng_state()
        resumed = batch_indices(9, n, size, seed=1)  # step 9 alone: epoch 2, its second batch
        assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    assert torch.equal(resumed, epochs[2][5:10])
    larger = batch_indices(0, 3, 7, seed=1)  # a batch larger than the data: the order repeats
    assert sorted(torch.bincount(larger).tolist()) == [2, 2, 3]


def _trainer(tmp_path, name, train, test, model_overrides=None, **train_overrides):
    params = dict(
        batch_size=8,
        max_steps=20,
        learning_rate=0.5,
        warmup_steps=10,
        eval_every=0,
        checkpoint_every=5,
        sample_count=0,
        seed=3,
    )
    params.update(train_overrides)
    info = RunInfo(train=TrainConfig(**params), data="mnist5k", image_size=8)
    config = tiny_config(
        "local_1d", image_shape=(1, 8, 8), **{"dropout": 0.1, **(model_overrides or {})}
    )
    return Trainer(Run(tmp_path / name, config, info), train, test, progress=False)


def test_learning_lowers_bits_per_dim(tmp_path, digits8):
    train, test = digits8
    small_test = ImageDataset(test.images[:200], test.labels[:200], 10, "test200")
    trainer = _trainer(
        tmp_path,
        "learn",
        train,
        small_test,
        max_steps=300,
        batch_size=16,
        checkpoint_every=1000,
        lr_schedule="cosine",
    )
    trainer.start_new()
    before = trainer.evaluate()["bits_per_dim"]
    after = trainer.fit(log=False)["bits_per_dim"]
    assert before > 7.5
    # measured: 3.61 after 300 steps (8x8 area-averaged digits, d=16, 2 layers)
    assert after < 4.0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_resume_equals_uninterrupted_run(tmp_path, digits8, weight_decay):
    train, _ = digits8
    straight = _trainer(tmp_path, "straight", train, None, weight_decay=weight_decay)
    straight.start_new()
    straight.fit(log=False)

    first = _trainer(tmp_path, "broken", train, None, max_steps=7, weight_decay=weight_decay)
    first.start_new()
    first.fit(log=False)
    resumed = _trainer(tmp_path, "broken", train, None, max_steps=20, weight_decay=weight_decay)
    resumed.resume()
    assert resumed.step == 7
    resumed.fit(log=False)
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, digits8):
    train, _ = digits8
    trainer = _trainer(tmp_path, "run", train, None, max_steps=2)
    trainer.start_new()
    trainer.fit(log=False)
    other = Trainer(
        Run(
            tmp_path / "run",
            tiny_config("local_1d", image_shape=(1, 8, 8), d_model=32),
            trainer.run.info,
        ),
        train,
        None,
        progress=False,
    )
    with pytest.raises(UserError, match="different model config"):
        other.resume()
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # the older copy would stand in
        (tmp_path / "run" / name).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint.pt is corrupt"):
        _trainer(tmp_path, "run", train, None).resume()
    with pytest.raises(UserError, match="already holds a run"):
        _trainer(tmp_path, "run", train, None).start_new()


def test_evaluation_does_not_depend_on_batch_size(digits8):
    from imagetransformer import ImageTransformer

    _, test = digits8
    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8)))
    a = evaluate(model, test, batch_size=7, max_images=50)
    b = evaluate(model, test, batch_size=50, max_images=50)
    assert a["images"] == 50
    assert a["bits_per_dim"] == pytest.approx(b["bits_per_dim"], abs=1e-6)
    assert a["bits_per_dim_per_channel"] == pytest.approx([a["bits_per_dim"]], abs=1e-9)


def test_data_that_does_not_fit_the_model_is_refused(tmp_path, digits8):
    train, _ = digits8
    info = RunInfo(train=TrainConfig())
    with pytest.raises(UserError, match="1x8x8 images but the model takes 3x4x6"):
        Trainer(Run(tmp_path / "x", tiny_config(), info), train, None, progress=False)


def test_conditional_model_classifies_and_is_no_worse(tmp_path, digits8):
    """p(x | y) on 8x8 digits: a generative classifier far above chance, bits/dim no worse."""
    train, test = digits8
    held_out = ImageDataset(test.images[:200], test.labels[:200], 10, "test200")
    results = {}
    for classes in (0, 10):
        trainer = _trainer(
            tmp_path,
            f"c{classes}",
            train,
            held_out,
            model_overrides=dict(dropout=0.0, num_classes=classes),
            max_steps=300,
            batch_size=16,
            learning_rate=0.05,
            warmup_steps=30,
            checkpoint_every=1000,
            lr_schedule="cosine",
        )
        trainer.start_new()
        results[classes] = trainer.fit(log=False)["bits_per_dim"]
        model = trainer.model
    prior = torch.log(torch.bincount(train.labels, minlength=10).double() / len(train))
    accuracy = (classify(model, held_out.images, prior).argmax(1) == held_out.labels).double()
    # measured: accuracy 0.51 (chance 0.1); bits/dim 3.037 conditional vs 3.064 unconditional
    assert accuracy.mean() > 0.35
    assert results[10] <= results[0]


def test_moving_average_is_evaluated_saved_and_resumed(tmp_path, digits8):
    """With ema_decay the checkpoint holds raw and averaged weights, model.safetensors the
    average, and a resumed run ends with the same average as an unbroken one."""
    from safetensors.torch import load_file

    train, test = digits8
    straight = _trainer(tmp_path, "straight", train, test, max_steps=12, ema_decay=0.9)
    straight.start_new()
    result = straight.fit(log=False)
    averaged = straight.ema.module
    saved = load_file(tmp_path / "straight" / "model.safetensors")
    for name, value in averaged.state_dict().items():
        assert torch.equal(saved[name], value), name
    raw = dict(straight.model.named_parameters())
    assert any(not torch.equal(p, raw[n]) for n, p in averaged.named_parameters())
    assert result["bits_per_dim"] == pytest.approx(evaluate(averaged, test)["bits_per_dim"])
    assert result["bits_per_dim_raw_weights"] == pytest.approx(
        evaluate(straight.model, test)["bits_per_dim"]
    )
    checkpoint = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert {"model", "ema"} <= set(checkpoint)

    first = _trainer(tmp_path, "broken", train, test, max_steps=5, ema_decay=0.9)
    first.start_new()
    first.fit(log=False)
    resumed = _trainer(tmp_path, "broken", train, test, max_steps=12, ema_decay=0.9)
    resumed.resume()
    resumed.fit(log=False)
    for (name, a), (_, b) in zip(
        averaged.named_parameters(), resumed.ema.module.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_weight_decay_shrinks_matrices_only():
    """weight_decay 0 keeps the paper's Adam; above 0, AdamW decays the weight matrices and
    embedding tables by lr * decay per step, never the biases or LayerNorm gains."""
    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8)))
    assert type(make_optimizer(model)) is torch.optim.Adam
    optimizer = make_optimizer(model, weight_decay=0.5)
    assert type(optimizer) is torch.optim.AdamW
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (0.95 if p.dim() >= 2 else 1.0)
        assert torch.allclose(p, expected, atol=1e-7), name
    assert any(p.dim() < 2 for p in model.parameters())


def test_moving_average_warms_up():
    """The decay grows as (1 + n) / (10 + n): early weights fade fast in a short run."""
    from imagetransformer.training import ema_update

    average, current = [torch.zeros(3)], [torch.ones(3)]
    ema_update(0.999)(average, current, torch.tensor(1))
    assert torch.allclose(average[0], torch.full((3,), 1 - 2 / 11))
    average = [torch.zeros(3)]
    ema_update(0.5)(average, current, torch.tensor(1000))
    assert torch.allclose(average[0], torch.full((3,), 0.5))
