"""Mixed precision: bf16 evaluation agrees with fp32; bf16/fp16 training steps work on CPU."""

import pytest
import torch

from imagetransformer import ImageTransformer, TrainConfig, UserError
from imagetransformer.data import ImageDataset
from imagetransformer.evaluation import evaluate
from imagetransformer.precision import autocast
from imagetransformer.run import Run, RunInfo
from imagetransformer.training import Trainer

from .helpers import tiny_config


def _digits(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 8, 8, generator=g) > 0.7).to(torch.uint8) * 255
    return ImageDataset(images, None, None, "blobs")


def test_bf16_evaluation_agrees_with_fp32():
    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8)))
    with torch.no_grad():  # a confident model: large logits make precision matter
        model.head.weight.mul_(30)
    data = _digits()
    fp32 = evaluate(model, data, batch_size=16)["bits_per_dim"]
    bf16 = evaluate(model, data, batch_size=16, precision="bf16")["bits_per_dim"]
    assert 1.0 < fp32 < 20
    assert abs(bf16 - fp32) < 0.01


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps(tmp_path, precision):
    cfg = TrainConfig(
        batch_size=4,
        max_steps=3,
        warmup_steps=2,
        checkpoint_every=3,
        sample_count=0,
        eval_every=0,
        precision=precision,
    )
    trainer = Trainer(
        Run(tmp_path / precision, tiny_config("local_1d", image_shape=(1, 8, 8)), RunInfo(cfg)),
        _digits(),
        None,
        progress=False,
    )
    trainer.start_new()
    trainer.fit(log=False)
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.model.head.weight.dtype == torch.float32  # master weights stay fp32
    state = torch.load(tmp_path / precision / "checkpoint.pt", weights_only=True)
    assert "scaler" in state


def test_unknown_precision_is_refused():
    with pytest.raises(UserError, match="precision"):
        autocast(torch.device("cpu"), "fp8")
    with pytest.raises(UserError, match="precision"):
        TrainConfig(precision="fp8")


def test_cached_sampling_under_bf16_autocast_follows_the_model():
    """Under bf16 autocast the cached sampler's logits at every step are those of the whole
    network run on the images it drew, to bf16's precision: its key/value cache holds the
    keys the full pass computes, whatever dtype autocast gives them."""
    from imagetransformer.sampling import sample

    for kind in ("local_1d", "local_2d"):
        model = ImageTransformer(tiny_config(kind)).eval()
        with torch.no_grad():
            model.head.weight.mul_(10)  # logits of a few units: a wrong cache shows
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            images, logits = sample(model, 2, generator=generator, return_logits=True)
        assert logits.dtype == torch.bfloat16  # autocast did apply
        with torch.no_grad():
            exact = model.logits_in_generation_order(images)  # fp32, the whole network
        assert exact.abs().max() > 2
        assert torch.allclose(logits.float(), exact, atol=0.1), kind


def test_bf16_decoding_keeps_its_caches_and_weights_in_bf16():
    """Under bf16 autocast the key/value rings are bf16 from the start and the stacked
    projection weights are cast once per run: no step casts a whole cache or those weights
    (before, every layer cast its fp32 cache to bf16 twice per step and re-cast the weights)."""
    model = ImageTransformer(tiny_config("local_1d")).eval()
    d = model.config.d_model
    with torch.no_grad():
        fp32 = model.start_decoding(2)
        assert {c.keys.dtype for c in fp32.caches} == {c.values.dtype for c in fp32.caches}
        assert fp32.caches[0].keys.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = model.start_decoding(2)
            model.decode_step(state, 0, None)
            before = [
                (c.keys.data_ptr(), c.weight(torch.bfloat16).data_ptr()) for c in state.caches
            ]
            previous = torch.zeros(2, dtype=torch.long)
            with torch.profiler.profile(record_shapes=True) as profile:
                for step in (1, 2, 3):
                    model.decode_step(state, step, previous)
    cache_shape = list(state.caches[0].keys.shape)
    casts = [
        e.input_shapes[0]
        for e in profile.events()
        if e.name in ("aten::_to_copy", "aten::copy_") and e.input_shapes
    ]
    assert cache_shape not in casts and [3 * d, d] not in casts, casts
    for cache, (keys, weight) in zip(state.caches, before, strict=True):
        assert cache.keys.dtype == cache.values.dtype == torch.bfloat16
        assert cache.weight(torch.bfloat16).dtype == torch.bfloat16
        assert (cache.keys.data_ptr(), cache.weight(torch.bfloat16).data_ptr()) == (keys, weight)
