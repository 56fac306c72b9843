"""A user's image file in a model's shape: what `complete --image`, `upscale --image` and the
playground's uploads share, so that each reads, crops and resizes an image the same way
(centre crop, area resize: `data.resize.square_resize`)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import ImageTransformerConfig
from .data.resize import pil_mode, square_resize
from .errors import UserError
from .layout import area_downsample

_PALETTE_MODES = ("P", "PA")
_CHANNEL_NAMES = {1: "grayscale", 3: "colour (RGB)"}


def open_image(
    source: str | Path | BinaryIO,
    name: str,
    formats: tuple[str, ...] | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """The decoded image of a file (a path or a binary file object), or a UserError naming
    `name` and the fix. `formats` limits the decoders PIL may use (None: any); `max_pixels`
    refuses larger images before they are decoded."""
    kinds = _kinds(formats)
    try:
        with Image.open(source, formats=formats) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise UserError(
                    f"{name} is {image.width}x{image.height} pixels, more than the "
                    f"{max_pixels:,} taken: shrink it first (it is resized to the model's size)"
                )
            return image.copy()  # decoded; the file is closed on leaving
    except UnidentifiedImageError:
        raise UserError(f"cannot read {name}: it is not a {kinds} image") from None
    except Image.DecompressionBombError as err:
        raise UserError(f"cannot read {name} ({err}): shrink it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UserError(f"cannot read {name} ({err}); give a {kinds} file") from None


def channel_count(image: Image.Image) -> int:
    """1 for a grayscale mode (L, LA, 1, I, I;16, F), 3 for a colour one (RGB, RGBA, ...); a
    palette image has the channels of its palette."""
    mode = image.palette.mode if image.mode in _PALETTE_MODES and image.palette else image.mode
    return 1 if Image.getmodebase(mode) == "L" else 3


def check_channels(image: Image.Image, channels: int, name: str) -> None:
    """Refuse an image whose channels are not the model's, rather than convert it silently.

    A colour image that holds only greys is taken by a grayscale model: converting it loses
    nothing, and some formats (WebP; palettes) always decode as colour."""
    found = channel_count(image)
    if found == channels or (channels == 1 and _only_greys(image)):
        return
    raise UserError(
        f"{name} is {_CHANNEL_NAMES[found]} ({found} channel{'s' * (found > 1)}, mode "
        f"{image.mode}) but this model takes {_CHANNEL_NAMES[channels]} images ({channels} "
        f"channel{'s' * (channels > 1)}): convert it to {_CHANNEL_NAMES[channels]} first"
    )


def _only_greys(image: Image.Image) -> bool:
    rgb = np.asarray(image.convert("RGB"))
    return bool((rgb == rgb[..., :1]).all())


def fit_image(image: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [C, H, W] of `shape`: converted to C channels, centre-cropped, area-resized."""
    c, h, w = shape
    if h != w:
        raise UserError(f"an image file needs a square model, this one takes {h}x{w} images")
    resized = square_resize(image.convert(pil_mode(c)), h)
    array = np.asarray(resized, dtype=np.uint8).reshape(h, w, c)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def upscale_input(
    image: Image.Image, config: ImageTransformerConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input [1, C, h, w] of a super-resolution model for a given image, and the truth
    [1, C, H, W] when known: an image of the output size is area-downsampled (and is the
    truth); any other is cropped and resized to the input size."""
    c, h, w = config.image_shape
    if image.size == (w, h):
        truth = fit_image(image, config.image_shape)[None]
        return area_downsample(truth, config.scale), truth
    return fit_image(image, config.low_res_shape)[None], None


def _kinds(formats: tuple[str, ...] | None) -> str:
    """How the readable formats are named to a user (any format: the common ones)."""
    if formats is None:
        return "PNG or JPEG"
    names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


__all__ = ["channel_count", "check_channels", "fit_image", "open_image", "upscale_input"]
