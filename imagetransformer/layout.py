"""Image <-> sequence (SPEC.md 1.1): one position per channel intensity, channel fastest.

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


def raster_cells(image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid row and column (column = C*x + c) of every raster position."""
    c, h, w = image_shape
    t = torch.arange(c * h * w)
    return t // (w * c), t % (w * c)


def raster_to_yxc(image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Pixel row y, column x and channel c of every raster position."""
    c, h, w = image_shape
    t = torch.arange(c * h * w)
    return t // (w * c), (t % (w * c)) // c, t % c
