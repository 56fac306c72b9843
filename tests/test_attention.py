"""Attention backends compute one function: dense, blocked and flex (flex_attention under a
BlockMask built from the pattern's rule)."""

import warnings

import pytest
import torch

from imagetransformer import ImageTransformer
from imagetransformer import attention as attention_module
from imagetransformer.attention import resolve_backend
from imagetransformer.pattern import AttentionPattern

from .helpers import tiny_config

flex = pytest.importorskip("torch.nn.attention.flex_attention")

CASES = [
    ("global", (3, 4, 6), {}),
    ("local_1d", (3, 4, 6), {}),
    ("local_1d", (1, 5, 7), {}),  # 35 positions: the last block of 8 is partial
    ("local_2d", (3, 4, 6), {}),
    ("local_2d", (1, 8, 16), dict(query_shape=(1, 2), memory_flange=(3, 2))),
]


def random_images(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *config.image_shape), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("kind,shape,extra", CASES)
def test_flex_equals_dense_without_grad(kind, shape, extra):
    model = ImageTransformer(tiny_config(kind, image_shape=shape, num_heads=4, **extra)).eval()
    images = random_images(model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # flex really runs: no fallback warning
        flex_logits = model.use_backend("flex")(images)
        dense_logits = model.use_backend("dense")(images)
    assert torch.allclose(flex_logits, dense_logits, atol=1e-5)


@pytest.mark.parametrize("kind,shape,extra", CASES)
def test_mask_mod_and_block_mask_are_the_rule(kind, shape, extra):
    pattern = ImageTransformer(tiny_config(kind, image_shape=shape, **extra)).pattern
    n = pattern.num_positions
    mask = flex.create_mask(pattern.mask_mod(), None, None, n, n, device="cpu")
    assert torch.equal(mask[0, 0], pattern.dense_mask())
    cached = attention_module._on_device(pattern, "flex", torch.device("cpu"))
    small = flex.create_block_mask(pattern.mask_mod(), None, None, n, n, "cpu", BLOCK_SIZE=8)
    for block_mask in (cached, small):
        # blockwise: a block is visited exactly when some pair inside it is allowed
        size = block_mask.BLOCK_SIZE[0]
        blocks = -(-n // size)
        padded = torch.zeros(blocks * size, blocks * size, dtype=torch.bool)
        padded[:n, :n] = pattern.dense_mask()
        any_allowed = padded.view(blocks, size, blocks, size).any(3).any(1)
        assert torch.equal(block_mask.to_dense()[0, 0].bool(), any_allowed)


def test_mask_mod_on_a_block_mask_with_small_blocks():
    """Blocks smaller than N, so the BlockMask really skips some: still exactly the rule."""
    pattern = AttentionPattern.create("local_2d", 8, 16, query_shape=(2, 4), memory_flange=(2, 4))
    n = pattern.num_positions
    block_mask = flex.create_block_mask(pattern.mask_mod(), None, None, n, n, "cpu", BLOCK_SIZE=16)
    assert block_mask.sparsity() > 0
    q, k, v = torch.randn(3, 2, 3, n, 8).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention's "use torch.compile" advice
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=pattern.dense_mask()
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_cpu_with_grad_falls_back_to_blocked(monkeypatch):
    monkeypatch.setattr(attention_module, "_WARNED", set())
    model = ImageTransformer(tiny_config("local_2d", num_heads=4))
    images = random_images(model.config)
    with pytest.warns(UserWarning, match="no backward on the CPU; using the blocked backend"):
        logits = model.use_backend("flex")(images)
    logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.use_backend("dense")(images).square().mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        model.use_backend("flex")(images)


def test_unavailable_flex_falls_back_to_blocked(monkeypatch):
    monkeypatch.setattr(attention_module, "_WARNED", set())
    monkeypatch.setattr(attention_module, "_FLEX_IMPORT_ERROR", "no flex_attention here")
    model = ImageTransformer(tiny_config("local_1d")).eval()
    images = random_images(model.config)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no flex_attention here; using the blocked"):
            out = model.use_backend("flex")(images)
        assert torch.allclose(out, model.use_backend("blocked")(images), atol=1e-6)
    pattern = model.pattern
    assert resolve_backend("auto", pattern, "cuda") == "blocked"


def test_auto_backend_choice():
    local = AttentionPattern.create("local_1d", 4, 18, 8, 8)
    glob = AttentionPattern.create("global", 4, 18)
    assert resolve_backend("auto", local, torch.device("cpu")) == "blocked"
    assert resolve_backend("auto", glob, "cpu") == "dense"
    assert resolve_backend("auto", local, "cuda") == "flex"
    assert resolve_backend("auto", glob, "cuda") == "dense"
    assert resolve_backend("flex", local, "cpu") == "flex"


def test_a_flex_config_builds_a_model_that_computes_through_flex(monkeypatch):
    """backend="flex" in a config (as config.json stores it) makes the model call
    flex_attention, and the function is the dense backend's."""
    import json

    from imagetransformer import ImageTransformerConfig

    config = tiny_config("local_2d", num_heads=4, backend="flex")
    restored = ImageTransformerConfig.from_dict(json.loads(config.to_json()))
    model = ImageTransformer(restored).eval()
    calls = []
    real_flex = attention_module._flex_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real_flex(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_flex_attention", counted)
    images = random_images(model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to another backend
        logits = model(images)
    assert len(calls) == model.config.num_layers
    assert torch.allclose(logits, model.use_backend("dense")(images), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,shape,extra", CASES)
def test_cuda_flex_equals_dense_forward_and_gradients(kind, shape, extra):
    # head_dim 16: the fused kernel's smallest comfortable head size
    config = tiny_config(kind, image_shape=shape, d_model=64, num_heads=4, **extra)
    model = ImageTransformer(config).cuda()
    images = random_images(config, batch=3).cuda()
    results = {}
    for backend in ("dense", "flex"):
        model.zero_grad()
        logits = model.use_backend(backend)(images)
        (logits.square().mean() + model.loss(images)).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[backend] = (logits.detach(), grads)
    assert torch.allclose(results["dense"][0], results["flex"][0], atol=1e-4)
    for name, grad in results["dense"][1].items():
        assert torch.allclose(grad, results["flex"][1][name], atol=1e-4), name
