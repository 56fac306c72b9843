"""Sampling: the cached sampler equals the re-running reference; draws follow the softmax."""

import pytest
import torch

from imagetransformer import ImageTransformer
from imagetransformer.sampling import can_guide, default_guidance, sample, sample_reference

from .helpers import ATTENTION_CONFIGS, tiny_config


@pytest.mark.parametrize("signal", ["input", "every_block"])
@pytest.mark.parametrize("kind", list(ATTENTION_CONFIGS))
def test_cached_sampler_matches_reference(kind, signal):
    config = tiny_config(kind, image_shape=(3, 4, 6), num_classes=2, class_signal=signal)
    model = ImageTransformer(config)
    torch.nn.init.normal_(model.class_embed.weight)  # it starts at zero: make it matter
    labels = torch.tensor([0, 1])
    cached, cached_logits = sample(
        model, 2, labels=labels, generator=torch.Generator().manual_seed(3), return_logits=True
    )
    ref, ref_logits = sample_reference(
        model, 2, labels=labels, generator=torch.Generator().manual_seed(3), return_logits=True
    )
    assert cached.dtype == torch.uint8 and cached.shape == (2, 3, 4, 6)
    assert torch.equal(cached, ref)
    assert torch.allclose(cached_logits, ref_logits, atol=1e-5)
    # and the logits are those of the full model on the finished images
    full = model.eval().logits_in_generation_order(cached, labels)
    assert torch.allclose(full, cached_logits, atol=1e-5)


@pytest.mark.parametrize("kind", ["local_1d", "local_2d"])
def test_prefix_is_kept_and_samplers_agree(kind):
    model = ImageTransformer(tiny_config(kind, image_shape=(1, 4, 12)))
    prefix = torch.randint(0, 256, (3, 1, 4, 12), dtype=torch.uint8)
    keep = 24  # the first two rows (and, for local_2d, the first block row)
    out = sample(model, 3, prefix=prefix, keep=keep, generator=torch.Generator().manual_seed(0))
    ref = sample_reference(
        model, 3, prefix=prefix, keep=keep, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, ref)
    kept = model.generation_order[:keep]
    assert torch.equal(out.flatten(1)[:, kept], prefix.flatten(1)[:, kept])


def test_draws_follow_the_softmax_and_temperature():
    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8))).eval()
    torch.nn.init.zeros_(model.head.weight)
    probs = torch.zeros(256)
    probs[[3, 100, 200]] = torch.tensor([0.5, 0.3, 0.2])
    with torch.no_grad():
        model.head.bias.copy_(torch.log(probs.clamp_min(1e-30)))
    images = model.sample(40, generator=torch.Generator().manual_seed(0))
    values = images.flatten().long()
    freq = torch.bincount(values, minlength=256).float() / values.numel()  # 2,560 draws
    assert set(values.unique().tolist()) <= {3, 100, 200}
    assert torch.allclose(freq[[3, 100, 200]], probs[[3, 100, 200]], atol=0.04)
    cold = model.sample(40, temperature=0.25, generator=torch.Generator().manual_seed(0))
    assert (cold == 3).float().mean() > 0.84  # p = 0.5^4 / (0.5^4 + 0.3^4 + 0.2^4) = 0.866
    greedy = model.sample(2, temperature=0.0)
    assert (greedy == 3).all()


def test_top_k_and_nucleus_filtering():
    from imagetransformer.outputs import Categorical

    draw = Categorical((1, 1, 1)).draw
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 252)
    logits = torch.log(probs.clamp_min(1e-30)).expand(4000, 256)
    g = torch.Generator().manual_seed(0)
    top2 = draw(logits, 1.0, g, top_k=2)
    assert set(top2.unique().tolist()) == {0, 1}
    assert (top2 == 0).float().mean() == pytest.approx(0.5 / 0.8, abs=0.03)
    nucleus = draw(logits, 1.0, g, top_p=0.9)  # 0.5 + 0.3 < 0.9 <= 0.95: keeps three values
    assert set(nucleus.unique().tolist()) == {0, 1, 2}
    assert set(draw(logits, 1.0, g, top_p=0.4).unique().tolist()) == {0}


def test_complete_keeps_whole_rows_or_block_rows():
    one_d = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 12)))
    assert one_d.keep_positions(0.5) == 4 * 12  # top 4 pixel rows
    two_d = ImageTransformer(
        tiny_config("local_2d", image_shape=(1, 8, 12), query_shape=(4, 6), memory_flange=(2, 3))
    )
    assert two_d.keep_positions(0.5) == 48  # one whole block row: a prefix of the order
    assert two_d.keep_positions(0.3) == 48 and two_d.keep_positions(0.2) == 0
    images = torch.randint(0, 256, (2, 1, 8, 12), dtype=torch.uint8)
    out = two_d.complete(images, 48, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :4], images[:, :, :4])  # the top block row, bit for bit


def _guided_model(kind: str = "local_1d", **overrides) -> ImageTransformer:
    config = tiny_config(kind, image_shape=(1, 4, 6), num_classes=3, class_dropout=0.5, **overrides)
    model = ImageTransformer(config)
    torch.nn.init.normal_(model.class_embed.weight)  # it starts at zero: make it matter
    return model


@pytest.mark.parametrize("kind", list(ATTENTION_CONFIGS))
def test_guided_sampler_draws_from_the_guided_distribution(kind):
    """Each guided step's logits are (1 + w) log p(v | y) - w log p(v | no class), with both
    terms those of the full model on the finished images."""
    model = _guided_model(kind)
    labels = torch.tensor([0, 2])
    images, logits = sample(
        model,
        2,
        labels=labels,
        guidance=1.5,
        generator=torch.Generator().manual_seed(1),
        return_logits=True,
    )
    with torch.no_grad():
        cond = model.eval().logits_in_generation_order(images, labels).log_softmax(-1)
        uncond = model.logits_in_generation_order(images, torch.tensor([3, 3])).log_softmax(-1)
    assert torch.allclose(logits, 2.5 * cond - 1.5 * uncond, atol=1e-4)
    plain = sample(model, 2, labels=labels, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(images, plain)


def test_guidance_is_refused_where_it_cannot_apply():
    from imagetransformer import UserError

    with pytest.raises(UserError, match="class_dropout"):
        sample(
            ImageTransformer(tiny_config(num_classes=2)),
            2,
            labels=torch.tensor([0, 1]),
            guidance=1.0,
        )
    with pytest.raises(UserError, match="class_dropout"):
        sample(ImageTransformer(tiny_config()), 2, guidance=1.0)
    with pytest.raises(UserError, match="categorical output only"):
        sample(
            _guided_model(output="dmol", num_mixtures=2), 1, labels=torch.tensor([0]), guidance=1.0
        )
    with pytest.raises(UserError, match="guidance must be >= 0"):
        sample(_guided_model(), 1, labels=torch.tensor([0]), guidance=-1.0)
    # a class-dropout model whose output cannot be guided samples plain p(x | y) by default
    dmol = _guided_model(output="dmol", num_mixtures=2).eval()
    assert not can_guide(dmol) and default_guidance(dmol) == 0.0
    assert sample(dmol, 1, labels=torch.tensor([0]), guidance=default_guidance(dmol)).shape[0] == 1


def test_class_dropout_drops_labels_in_training_only():
    """About class_dropout of the training labels become "no class" (label num_classes, which
    the model also takes on purpose); evaluation never drops."""
    from imagetransformer import UserError
    from imagetransformer.defaults import GUIDANCE
    from imagetransformer.sampling import default_guidance

    model = _guided_model()
    assert model.null_label == 3 and model.class_embed.num_embeddings == 4
    assert default_guidance(model) == GUIDANCE > 0  # `sample` guides such a model by default
    assert default_guidance(ImageTransformer(tiny_config(num_classes=3))) == 0
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.train().drop_labels(labels)
    assert set(dropped.unique().tolist()) == {0, 3}
    assert (dropped == 3).float().mean() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(model.eval().drop_labels(labels), labels)
    model.check_labels(torch.tensor([3]), 1)  # "no class" is a label this model takes
    with pytest.raises(UserError, match=r"integers in 0\.\.3"):
        model.check_labels(torch.tensor([4]), 1)
    with pytest.raises(UserError, match=r"integers in 0\.\.2"):
        ImageTransformer(tiny_config(num_classes=3)).check_labels(torch.tensor([3]), 1)
