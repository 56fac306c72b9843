"""Image-quality metrics for super-resolution samples, one value per image.

All take uint8 images [B, C, H, W] (the package's image format, so no scaling convention can
differ between callers) and return float64 [B]: per-image values let a caller report means,
spreads or the best of several samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UserError
from .layout import area_downsample

__all__ = ["consistency", "psnr", "ssim"]

MAX_VALUE = 255.0  # data range of uint8 intensities
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(255^2 / MSE), MSE over all of an image's
    values; +inf for identical images (MSE 0), which is the honest limit, not a cap."""
    x, y = _pair(samples, truth, "psnr")
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(MAX_VALUE**2 / mse)


def ssim(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), as in their reference code: an 11x11 Gaussian
    window of sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, local statistics weighted by the
    window (no N/(N-1) correction), the map taken over the valid region only (no padding, so
    borders are not biased by made-up pixels), then averaged over the map and the channels.

    For images with a side under 11 the window shrinks to the largest odd size that fits, with
    the same sigma, so tiny images still get a value (not comparable to 11x11 values).
    """
    x, y = _pair(samples, truth, "ssim")
    channels = x.shape[1]
    size = min(SSIM_WINDOW, _largest_odd(min(x.shape[-2:])))
    window = _gaussian_window(size, SSIM_SIGMA, x).expand(channels, 1, size, size)

    def local_mean(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=channels)  # per channel, valid region

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x.square()
    var_y = local_mean(y * y) - mu_y.square()
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * MAX_VALUE) ** 2, (SSIM_K2 * MAX_VALUE) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def consistency(low_res: torch.Tensor, samples: torch.Tensor, scale: int) -> torch.Tensor:
    """Mean absolute difference (intensity units, 0..255) between low_res and the samples
    area-downsampled by scale: how far a super-resolved sample strays from its own input,
    whatever its detail. 0 means it downsamples back to exactly the input."""
    _check_image(low_res, "consistency", "low_res")
    _check_image(samples, "consistency", "samples")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise UserError(f"consistency: scale must be a positive integer, got {scale!r}")
    b, c, h, w = low_res.shape
    if tuple(samples.shape) != (b, c, h * scale, w * scale):
        raise UserError(
            f"consistency: samples are {list(samples.shape)} but low_res {list(low_res.shape)} "
            f"at scale {scale} needs samples {[b, c, h * scale, w * scale]}: pass the matching "
            "scale, or low-resolution inputs and samples of the same batch"
        )
    down = area_downsample(samples, scale).double()
    return (down - low_res.to(down.device).double()).abs().mean(dim=(1, 2, 3))


def _pair(samples: torch.Tensor, truth: torch.Tensor, what: str) -> tuple[torch.Tensor, ...]:
    """Both as float64 on the samples' device, after refusing what would give silent nonsense."""
    _check_image(samples, what, "samples")
    _check_image(truth, what, "truth")
    if samples.shape != truth.shape:
        raise UserError(
            f"{what}: samples {list(samples.shape)} and truth {list(truth.shape)} differ in "
            "shape: compare each sample with its own ground-truth image, at the same size"
        )
    return samples.double(), truth.to(samples.device).double()


def _check_image(x: object, what: str, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        kind = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(
            f"{what}: {name} must be a uint8 image tensor (intensities 0..255), got {kind}: "
            "convert with .round().clamp(0, 255).to(torch.uint8) if it holds intensities"
        )
    if x.dim() != 4 or min(x.shape[1:]) < 1:
        raise UserError(f"{what}: {name} must be images [B, C, H, W], got {list(x.shape)}")


def _largest_odd(n: int) -> int:
    return n if n % 2 else n - 1


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 2-D Gaussian [1, 1, size, size]: outer product of a normalised 1-D one."""
    x = torch.arange(size, dtype=torch.float64, device=like.device) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]
