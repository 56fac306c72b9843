"""PSNR, SSIM and low-resolution consistency, checked against values worked out independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagetransformer.errors import UserError
from imagetransformer.layout import area_downsample
from imagetransformer.metrics import consistency, psnr, ssim


def _random(shape: tuple[int, ...], seed: int, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def _noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (images.double() + noise).round().clamp(0, 255).to(torch.uint8)


def _smooth(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Gradients with some texture: an image SSIM can tell structure in."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = 100 + 60 * torch.sin(x / 3.0) + 40 * torch.cos(y / 5.0)
    images = torch.stack([base + 10 * k for k in range(b * c)]).reshape(b, c, h, w)
    return images.round().clamp(0, 255).to(torch.uint8)


def _reference_ssim(x: np.ndarray, y: np.ndarray, size: int, sigma: float = 1.5) -> float:
    """Wang et al. SSIM of one image pair [C, H, W], written out: a loop over every valid
    window position, two-pass weighted moments, the Gaussian built from math.exp."""
    centre = (size - 1) / 2
    g = [math.exp(-((i - centre) ** 2) / (2 * sigma**2)) for i in range(size)]
    weights = np.array([[gi * gj for gj in g] for gi in g]) / sum(g) ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    channels, h, w = x.shape
    for c in range(channels):
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                px = x[c, i : i + size, j : j + size].astype(np.float64)
                py = y[c, i : i + size, j : j + size].astype(np.float64)
                mx, my = (weights * px).sum(), (weights * py).sum()
                vx = (weights * (px - mx) ** 2).sum()
                vy = (weights * (py - my) ** 2).sum()
                cov = (weights * (px - mx) * (py - my)).sum()
                num = (2 * mx * my + c1) * (2 * cov + c2)
                values.append(num / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


# ---------------------------------------------------------------- psnr


def test_identical_images() -> None:
    images = _random((3, 3, 16, 16), seed=0)
    for value in (psnr(images, images.clone()), ssim(images, images.clone())):
        assert value.dtype == torch.float64 and value.shape == (3,)
    assert torch.isinf(psnr(images, images)).all() and (psnr(images, images) > 0).all()
    assert torch.allclose(ssim(images, images), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_psnr_of_constant_offsets() -> None:
    truth = _random((2, 3, 8, 8), seed=1, high=246)
    samples = truth.clone()
    samples[0] += 5
    samples[1] += 10
    expected = [10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / 100)]
    assert torch.allclose(psnr(samples, truth), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(psnr(samples, truth), psnr(truth, samples))


def test_psnr_mse_over_all_values() -> None:
    truth = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    samples = torch.tensor([[[[0, 0], [0, 20]]]], dtype=torch.uint8)  # MSE = 400 / 4
    assert psnr(samples, truth).item() == pytest.approx(10 * math.log10(255**2 / 100))


# ---------------------------------------------------------------- ssim


@pytest.mark.parametrize(
    ("shape", "window"),
    [((12, 12), 11), ((13, 16), 11), ((7, 9), 7), ((6, 6), 5), ((1, 4), 1)],
)
def test_ssim_matches_written_out_reference(shape: tuple[int, int], window: int) -> None:
    """Sides under 11 shrink the window to the largest odd size that fits."""
    truth = _random((2, 3, *shape), seed=2)
    samples = torch.stack([_noisy(truth[0], 30, seed=3), _random((3, *shape), seed=4)])
    got = ssim(samples, truth)
    for k in range(2):
        expected = _reference_ssim(samples[k].numpy(), truth[k].numpy(), window)
        assert abs(got[k].item() - expected) < 1e-10


def test_ssim_grayscale_matches_reference() -> None:
    truth = _smooth(1, 1, 12, 14)
    samples = _noisy(truth, 12, seed=5)
    expected = _reference_ssim(samples[0].numpy(), truth[0].numpy(), 11)
    assert abs(ssim(samples, truth).item() - expected) < 1e-10


def test_ssim_falls_as_noise_grows() -> None:
    truth = _smooth(2, 3, 32, 32)
    values = [ssim(_noisy(truth, sigma, seed=6), truth) for sigma in (2, 8, 25, 60)]
    for better, worse in zip(values, values[1:], strict=False):
        assert (better > worse).all()
    assert (values[0] < 1).all() and (values[-1] > -1).all()


def test_ssim_symmetric() -> None:
    a, b = _smooth(2, 3, 20, 24), _random((2, 3, 20, 24), seed=7)
    assert torch.allclose(ssim(a, b), ssim(b, a), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- consistency


def test_consistency_zero_for_own_source() -> None:
    samples = _random((3, 3, 16, 16), seed=8)
    for scale in (1, 2, 4):
        value = consistency(area_downsample(samples, scale), samples, scale)
        assert value.dtype == torch.float64 and value.shape == (3,)
        assert torch.equal(value, torch.zeros(3, dtype=torch.float64))


def test_consistency_hand_computed() -> None:
    # image 0: two blocks 0,4,8,12 -> mean 6 each; against 9 and 6: (3 + 0) / 2 = 1.5
    # image 1: blocks (1,2,2,2) -> 1.75 rounds to 2, and (10,10,10,11) -> 10.25 rounds to 10;
    #          against 0 and 16: (|2 - 0| + |10 - 16|) / 2 = 4
    samples = torch.tensor(
        [
            [[[0, 4, 0, 4], [8, 12, 8, 12]]],
            [[[1, 2, 10, 10], [2, 2, 10, 11]]],
        ],
        dtype=torch.uint8,
    )
    low_res = torch.tensor([[[[9, 6]]], [[[0, 16]]]], dtype=torch.uint8)
    expected = torch.tensor([1.5, 4.0], dtype=torch.float64)
    assert torch.equal(consistency(low_res, samples, 2), expected)


# ---------------------------------------------------------------- errors


def test_metrics_refuse_bad_inputs() -> None:
    images = _random((2, 3, 8, 8), seed=9)
    for metric in (psnr, ssim):
        with pytest.raises(UserError, match=r"differ in shape"):
            metric(images, images[:, :, :4])
        with pytest.raises(UserError, match=r"uint8.*float32"):
            metric(images.float(), images)
        with pytest.raises(UserError, match=r"uint8.*ndarray"):
            metric(images, images.numpy())
        with pytest.raises(UserError, match=r"\[B, C, H, W\]"):
            metric(images[0], images[0])
    low_res = area_downsample(images, 2)
    with pytest.raises(UserError, match=r"needs samples \[2, 3, 12, 12\]"):
        consistency(low_res, images, 3)
    with pytest.raises(UserError, match="low_res must be a uint8"):
        consistency(low_res.double(), images, 2)
    with pytest.raises(UserError, match="scale must be a positive integer"):
        consistency(low_res, images, 0)
