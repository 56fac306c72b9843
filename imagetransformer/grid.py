"""Sample grids as PNG: small images scaled up with nearest-neighbour so they stay crisp."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write_bytes


def make_grid(
    images: torch.Tensor, nrow: int | None = None, pad: int = 2, min_side: int = 96
) -> Image.Image:
    """Tile uint8 images [n, C, H, W] into one picture; each image is scaled to >= min_side."""
    images = images.detach().cpu()
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 images [n, C, H, W], got {images.dtype} {list(images.shape)}"
        )
    n, c, h, w = images.shape
    scale = max(1, math.ceil(min_side / max(h, w)))
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((ncol_rows * cell_h + pad, nrow * cell_w + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        if c == 1:
            array = np.repeat(array, 3, axis=2)
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
        r, col = divmod(i, nrow)
        top, left = pad + r * cell_h, pad + col * cell_w
        canvas[top : top + h * scale, left : left + w * scale] = array
    return Image.fromarray(canvas)


def grid_png(images: torch.Tensor, nrow: int | None = None) -> bytes:
    """The PNG file of `make_grid(images, nrow)`."""
    buffer = io.BytesIO()
    make_grid(images, nrow=nrow).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 images [n, C, H, W] atomically."""
    atomic_write_bytes(path, grid_png(images, nrow))
    return Path(path)
