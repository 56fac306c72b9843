"""Shared image geometry, so every source crops and resizes the same way."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .dataset import ImageDataset


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then resize: BOX (area average) down, BICUBIC up.

    Area averaging avoids aliasing when shrinking; bicubic is smoother than box when growing.
    """
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side > size:
        image = image.resize((size, size), Image.BOX)
    elif side < size:
        image = image.resize((size, size), Image.BICUBIC)
    return image


def pil_mode(channels: int) -> str:
    """PIL mode for a channel count; rejects anything the models cannot take."""
    check_options(None, channels)
    return "L" if channels == 1 else "RGB"


def check_options(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def conform(ds: ImageDataset, image_size: int | None, channels: int | None) -> ImageDataset:
    """Bring a fixed-geometry built-in set to the requested size/channels (no-op if it matches).

    Lets a config ask for e.g. 3-channel 32x32 MNIST without a special case in the model.
    """
    check_options(image_size, channels)
    c, h, w = ds.shape
    want_c = c if channels is None else channels
    want_s = h if image_size is None and h == w else (image_size or max(h, w))
    if (want_c, want_s, want_s) == (c, h, w):
        return ds
    mode = pil_mode(want_c)
    out = torch.empty((len(ds), want_c, want_s, want_s), dtype=torch.uint8)
    for i, img in enumerate(ds.images.numpy()):
        pil = Image.fromarray(img[0] if c == 1 else img.transpose(1, 2, 0))
        arr = np.array(square_resize(pil.convert(mode), want_s))
        out[i] = torch.from_numpy(arr[None] if want_c == 1 else arr.transpose(2, 0, 1))
    return ImageDataset(out, ds.labels, ds.num_classes, ds.name)
