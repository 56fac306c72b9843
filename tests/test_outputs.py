"""The mixture-of-logistics output (docs/model.md, Heads: dmol): normalization, exactness,
sampling."""

import math

import pytest
import torch

from imagetransformer import ImageTransformer, UserError
from imagetransformer.outputs import LogisticMixture, discretized_logistic_log_prob
from imagetransformer.sampling import sample, sample_reference

from .helpers import ATTENTION_CONFIGS, tiny_config


def random_params(dist: LogisticMixture, n: int, seed: int = 0) -> torch.Tensor:
    """Parameters of moderate spread: means inside [-1, 1], scales from ~0.02 to ~0.5."""
    g = torch.Generator().manual_seed(seed)
    k, c = dist.num_mixtures, dist.channels
    logits = torch.randn(n, k, generator=g)
    locs = torch.rand(n, k * c, generator=g) * 1.6 - 0.8
    log_scales = torch.rand(n, k * c, generator=g) * 3.2 - 4.0
    coeffs = torch.randn(n, k * dist.num_coeffs, generator=g)
    return torch.cat([logits, locs, log_scales, coeffs], dim=-1)


def test_parameter_count_follows_the_spec():
    assert LogisticMixture((3, 8, 8), 10).num_params == 100  # 10K for RGB
    assert LogisticMixture((1, 8, 8), 10).num_params == 30  # 3K for grayscale


@pytest.mark.parametrize("channels", [1, 3])
def test_every_channel_sums_to_one_given_the_earlier_channels(channels):
    dist = LogisticMixture((channels, 1, 1), num_mixtures=4)
    g = torch.Generator().manual_seed(1)
    for trial in range(3):
        params = random_params(dist, 1, seed=trial).expand(256, -1)[:, None, None, :]
        fixed = torch.randint(0, 256, (channels,), generator=g)
        for c in range(channels):
            images = fixed.repeat(256, 1)
            images[:, c] = torch.arange(256)  # channel c over all values, earlier ones fixed
            log_p = dist.component_log_probs(params, images[:, :, None, None])  # [256,1,1,K,C]
            total = torch.logsumexp(log_p[:, 0, 0, :, c].double(), dim=0)  # per component
            assert torch.allclose(total, torch.zeros_like(total), atol=1e-5), (c, total)


def test_grayscale_mixture_sums_to_one_over_the_256_values():
    dist = LogisticMixture((1, 1, 1), num_mixtures=5)
    for seed in range(3):
        params = random_params(dist, 1, seed=seed).expand(256, -1)[:, None, None, :]
        nll = dist.nll(params, torch.arange(256).view(256, 1, 1, 1))
        assert torch.exp(-nll.double()).sum().item() == pytest.approx(1.0, abs=1e-5)


def _reference_log_prob(x: float, mean: float, scale: float) -> float:
    """The bin's probability as a float64 CDF difference (edges open), written out; right of
    the mean as a difference of survival functions, so that it does not cancel."""
    z_low = -math.inf if x < -0.999 else (x - 1 / 255 - mean) / scale
    z_high = math.inf if x > 0.999 else (x + 1 / 255 - mean) / scale
    if x > mean:  # 1 - cdf(z) = sigmoid(-z)
        return math.log(_sigmoid(-z_low) - _sigmoid(-z_high))
    return math.log(_sigmoid(z_high) - _sigmoid(z_low))


def _sigmoid(z: float) -> float:
    if z == math.inf:
        return 1.0
    if z == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def test_likelihood_matches_an_independent_float64_computation():
    dist = LogisticMixture((3, 1, 1), num_mixtures=2)
    params = random_params(dist, 6, seed=3)
    # pixels drawn from the model itself: likely bins, where PixelCNN++'s guard (tiny bins
    # only) is not in play and the CDF difference is exact (edges: see the sums-to-one tests)
    images = dist.draw(params, 1.0, torch.Generator().manual_seed(4))[:, :, None, None]
    ours = dist.nll(params[:, None, None, :], images)[:, 0, 0]
    logits, locs, log_scales, coeffs = (t.double() for t in dist.split(params))
    for i in range(6):
        x = (images[i, :, 0, 0].double() / 127.5 - 1).tolist()
        terms = []
        for k in range(2):
            a, b, c = coeffs[i, k].tolist()
            means = [
                locs[i, k, 0].item(),
                locs[i, k, 1].item() + a * x[0],
                locs[i, k, 2].item() + b * x[0] + c * x[1],
            ]
            log_p = sum(
                _reference_log_prob(x[ch], means[ch], math.exp(log_scales[i, k, ch].item()))
                for ch in range(3)
            )
            terms.append(torch.log_softmax(logits[i], 0)[k].item() + log_p)
        expected = -math.log(sum(math.exp(t) for t in terms))
        assert ours[i].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_tiny_bins_use_the_density_guard():
    # a very sharp logistic far from x: the CDF difference underflows in float32
    x, mean, log_scale = torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([-7.0])
    log_p = discretized_logistic_log_prob(x, mean, log_scale)
    s = math.exp(-7.0)
    z = (0.5 + 0.5) / s
    density = -z - math.log(s) - 2 * math.log1p(math.exp(-z))
    assert torch.isfinite(log_p).all()
    assert log_p.item() == pytest.approx(density - math.log(127.5), rel=1e-4)


def test_draws_follow_the_discretized_mixture():
    dist = LogisticMixture((3, 1, 1), num_mixtures=2)
    params = random_params(dist, 1, seed=8)
    n = 20000
    draws = dist.draw(params.expand(n, -1), 1.0, torch.Generator().manual_seed(0))
    assert draws.shape == (n, 3) and draws.min() >= 0 and draws.max() <= 255
    # the red marginal: p(R) = sum over k of pi_k p_k(R)
    values = torch.arange(256)
    pixels = torch.zeros(256, 3, 1, 1, dtype=torch.long)
    pixels[:, 0, 0, 0] = values
    log_p = dist.component_log_probs(params.expand(256, -1)[:, None, None, :], pixels)
    pi = torch.softmax(dist.split(params)[0][0], 0)
    p_red = (pi[None] * log_p[:, 0, 0, :, 0].exp()).sum(1)
    freq = torch.bincount(draws[:, 0], minlength=256).float() / n
    assert _ks_distance(freq, p_red) < 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov, 1%
    # green given the most frequent red value follows the coupled conditional
    red = int(torch.bincount(draws[:, 0]).argmax())
    picked = draws[draws[:, 0] == red]
    pixels = torch.zeros(256, 3, 1, 1, dtype=torch.long)
    pixels[:, 0], pixels[:, 1, 0, 0] = red, values
    log_p = dist.component_log_probs(params.expand(256, -1)[:, None, None, :], pixels)
    posterior = pi * log_p[0, 0, 0, :, 0].exp()  # p(k | R)
    p_green = (posterior / posterior.sum() * log_p[:, 0, 0, :, 1].exp()).sum(1)
    freq = torch.bincount(picked[:, 1], minlength=256).float() / picked.shape[0]
    assert picked.shape[0] > 300
    assert _ks_distance(freq, p_green) < 1.63 / math.sqrt(picked.shape[0])


def _ks_distance(freq: torch.Tensor, probs: torch.Tensor) -> float:
    return (freq.double().cumsum(0) - probs.double().cumsum(0)).abs().max().item()


def test_temperature_sharpens_and_zero_is_deterministic():
    dist = LogisticMixture((1, 1, 1), num_mixtures=3)
    params = random_params(dist, 1, seed=2).expand(4000, -1)
    warm = dist.draw(params, 1.0, torch.Generator().manual_seed(0)).float()
    cold = dist.draw(params, 0.3, torch.Generator().manual_seed(0)).float()
    assert cold.std() < warm.std()
    zero = dist.draw(params[:3], 0.0, None)
    assert torch.equal(zero, dist.draw(params[:3], 0.0, None)) and (zero == zero[0]).all()
    with pytest.raises(UserError, match="categorical"):
        dist.draw(params[:1], 1.0, None, top_k=5)


def dmol_config(kind="local_1d", **extra):
    attention = dict(ATTENTION_CONFIGS[kind])
    if kind == "local_2d":
        attention.update(query_shape=(2, 2), memory_flange=(1, 1))
    return tiny_config(
        kind, image_shape=(3, 4, 6), output="dmol", num_mixtures=3, **attention, **extra
    )


@pytest.mark.parametrize("kind", list(ATTENTION_CONFIGS))
def test_dmol_model_is_causal_per_pixel(kind):
    model = ImageTransformer(dmol_config(kind)).eval()
    images = torch.randint(0, 256, (2, 3, 4, 6), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    base = model.logits_in_generation_order(images)
    assert base.shape == (2, 24, model.distribution.num_params)
    n = model.config.num_positions
    for step in [0, 3, n // 2, n - 1]:
        pixel = int(model.generation_order[step])
        changed = images.clone()
        changed[:, 1, pixel // 6, pixel % 6] ^= 0x55  # one channel of that pixel
        out = model.logits_in_generation_order(changed)
        assert torch.allclose(out[:, : step + 1], base[:, : step + 1], atol=1e-6, rtol=0)
        if step < n - 1:
            assert not torch.allclose(out[:, step + 1], base[:, step + 1], atol=1e-4)


@pytest.mark.parametrize("kind", list(ATTENTION_CONFIGS))
def test_dmol_cached_sampler_matches_reference(kind):
    model = ImageTransformer(dmol_config(kind))
    cached, logits = sample(
        model, 2, generator=torch.Generator().manual_seed(1), return_logits=True
    )
    ref, ref_logits = sample_reference(
        model, 2, generator=torch.Generator().manual_seed(1), return_logits=True
    )
    assert cached.shape == (2, 3, 4, 6) and cached.dtype == torch.uint8
    assert torch.equal(cached, ref)
    assert torch.allclose(logits, ref_logits, atol=1e-5)


def test_dmol_bits_per_dim_and_completion():
    model = ImageTransformer(dmol_config(backend="dense")).eval()
    images = torch.randint(0, 256, (3, 3, 4, 6), dtype=torch.uint8)
    nll = model.nll(images)
    assert nll.shape == (3, 4, 6)  # one joint term per pixel
    bpd = model.bits_per_dim(images)
    assert torch.allclose(bpd, nll.flatten(1).sum(1) / (72 * math.log(2)))
    keep = model.keep_positions(0.5)
    assert keep == 12  # two of four pixel rows
    out = model.complete(images, keep, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :2], images[:, :, :2])
    assert model.kept_mask(keep)[:, :2].all() and not model.kept_mask(keep)[:, 2:].any()


def test_dmol_training_lowers_bits_per_dim():
    torch.manual_seed(0)
    config = tiny_config("local_1d", image_shape=(3, 4, 4), output="dmol", num_mixtures=2)
    model = ImageTransformer(config)
    # smooth images: channels correlated, neighbours close
    base = torch.linspace(40, 200, 4)[None, :] + torch.linspace(0, 30, 4)[:, None]
    g = torch.Generator().manual_seed(0)
    images = (base[None, None] + torch.randint(-8, 9, (32, 3, 4, 4), generator=g)).clamp(0, 255)
    images = images.to(torch.uint8)
    before = model.bits_per_dim(images).mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(images).backward()
        optimizer.step()
    after = model.eval().bits_per_dim(images).mean().item()
    assert after < before - 1.0, (before, after)


def test_dmol_refuses_label_smoothing_and_top_k():
    model = ImageTransformer(dmol_config())
    images = torch.zeros(1, 3, 4, 6, dtype=torch.uint8)
    with pytest.raises(UserError, match="label smoothing"):
        model.loss(images, label_smoothing=0.1)
    with pytest.raises(UserError, match="categorical"):
        model.sample(1, top_k=3)
