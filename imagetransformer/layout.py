"""Image <-> sequence (docs/model.md, Representation): one position per channel intensity,
channel fastest.

An image [C, H, W] becomes a grid of H rows and W*C columns; raster index
`t = y*(W*C) + C*x + c`. Everything else in the package talks in raster indices or grid cells.
"""

from __future__ import annotations

import torch
from einops import rearrange


def images_to_raster(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W*C], channel fastest (PyTorch holds channels first)."""
    return rearrange(images, "b c h w -> b (h w c)")


def raster_to_images(seq: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """[B, H*W*C, ...] -> [B, C, H, W, ...], the inverse of `images_to_raster`."""
    c, h, w = image_shape
    return rearrange(seq, "b (h w c) ... -> b c h w ...", h=h, w=w, c=c)


def raster_channel(image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The channel of every raster position: [N] in 0..C-1."""
    c, h, w = image_shape
    return torch.arange(c * h * w) % c


def raster_to_yxc(image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Pixel row y, column x and channel c of every raster position."""
    c, h, w = image_shape
    t = torch.arange(c * h * w)
    return t // (w * c), (t % (w * c)) // c, t % c


def area_downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> uint8 [B, C, H/scale, W/scale]: the mean of each scale x scale
    block, rounded: super-resolution inputs are made by area averaging (docs/model.md,
    Conditioning).

    Sides must be multiples of `scale`. Rounding (not truncation) keeps the low-resolution
    image unbiased; the mean is taken in float64, so the result is exact.
    """
    if scale < 1 or images.shape[-1] % scale or images.shape[-2] % scale:
        raise ValueError(f"image sides {list(images.shape[-2:])} are not multiples of {scale}")
    blocks = rearrange(images.double(), "b c (h sh) (w sw) -> b c h w (sh sw)", sh=scale, sw=scale)
    return blocks.mean(dim=-1).round().clamp(0, 255).to(torch.uint8)
