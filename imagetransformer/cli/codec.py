"""`imagetransformer compress` / `decompress` / `quantize`: lossless image files coded with the
model's integer twin, which decode on any machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..data.folder import EXTENSIONS
from ..data.resize import check_options, pil_mode, square_resize
from ..errors import UserError
from ..files import atomic_write_bytes
from . import common

# the codec (and numba, which its integer model's kernels need) is imported by these verbs only:
# every other command starts without it


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compress", help="compress images losslessly with a model")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("-o", "--output", required=True, help="the .itc file to write")
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images coded side by side, sharing one coder stream (larger: a little smaller file)",
    )
    p.add_argument(
        "--image-size", type=int, help="resize images to this side first (default: the model's)"
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="convert to 1 or 3 channels first (default: the model's)",
    )
    common.add_device(p)
    p.set_defaults(func=run_compress)
    d = subparsers.add_parser("decompress", help="decode an .itc file back to PNG images")
    d.add_argument("run_dir")
    d.add_argument("file", help="the .itc file")
    d.add_argument("-o", "--output", required=True, help="folder for the decoded PNG images")
    d.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="about how many images to decode side by side (any value gives the same images)",
    )
    common.add_device(d)
    d.set_defaults(func=run_decompress)
    q = subparsers.add_parser(
        "quantize",
        help="make the integer model compress and decompress code with (compress makes it "
        "on first use)",
    )
    q.add_argument("run_dir")
    q.set_defaults(func=run_quantize)


def _note_without_kernels(device: torch.device) -> None:
    """Say so when the integer model must run torch operations on the CPU (numba missing)."""
    from ..tools import integer_kernels

    if device.type == "cpu" and integer_kernels.numba is None:
        print(
            "note: numba is not installed, so the integer model runs torch operations: the same "
            "files in 1.4-2x the time (pip install 'imagetransformer[codec]')",
            file=sys.stderr,
        )


def run_compress(args: argparse.Namespace) -> int:
    from ..tools.codec import best_labels, compress, quantized

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    check_options(args.image_size, args.channels)
    device = common.device(args.device)
    model = common.open_model(args.run_dir, torch.device("cpu"))
    paths = _image_paths(args.images)
    images, converted = _read(
        paths, args.image_size, args.channels, tuple(model.config.image_shape)
    )
    integer = quantized(args.run_dir, device, load=lambda: model)
    labels = best_labels(model, images) if model.config.num_classes else None
    result = compress(
        integer,
        images,
        batch_size=args.batch_size,
        progress=True,
        labels=labels,
    )
    atomic_write_bytes(args.output, result.data)
    stored = f"; {result.stored} stored as PNG or raw (cheaper so)" if result.stored else ""
    print(
        f"wrote {args.output}: {result.images} images, {len(result.data)} bytes, "
        f"{result.bits_per_dim:.4f} bits/dim (headers included){stored}"
    )
    if converted:
        shape = "x".join(map(str, model.config.image_shape))
        print(
            f"note: {converted} of the {len(paths)} images were converted to {shape} first; "
            "decompress gives back the converted images, not those files"
        )
    _note_without_kernels(device)
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    from ..tools.codec import decompress, png_bytes, quantized_for_file, read_header

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    try:
        data = Path(args.file).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {args.file} ({err.strerror or err})") from None
    header = read_header(data, args.file)
    device = common.device(args.device)
    integer = quantized_for_file(args.run_dir, header, args.file, device)
    # checked before anything is written
    images = decompress(integer, data, args.file, batch_size=args.batch_size, progress=True)
    out = Path(args.output)
    for i, image in enumerate(images.numpy()):
        atomic_write_bytes(out / f"image_{i:05d}.png", png_bytes(image, smallest=False))
    print(f"wrote {len(images)} images to {out}")
    _note_without_kernels(device)
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from ..tools.codec import quantized

    integer = quantized(args.run_dir, torch.device("cpu"))
    print(f"{args.run_dir}: integer model {integer.fingerprint.hex()[:16]} is ready")
    return 0


def _image_paths(given: list[str]) -> list[Path]:
    paths: list[Path] = []
    for text in given:
        path = Path(text)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path} not found: give image files or folders of them")
    if not paths:
        raise UserError("no images found: give image files or folders of them")
    return paths


def _read(paths, image_size, channels, shape) -> tuple[torch.Tensor, int]:
    """Each file converted as a folder is read for a model: to --image-size and --channels,
    by default the model's side and channels (a square model); then checked against the
    model's shape. Returns the images and how many of them the conversion changed."""
    c, h, w = shape
    channels = channels or c
    image_size = image_size or (h if h == w else None)
    mode = pil_mode(channels)
    images, converted = [], 0
    for path in paths:
        try:
            with Image.open(path) as image:
                resized = image_size is not None and image.size != (image_size, image_size)
                native = image.mode == mode and not resized
                image = image.convert(mode)
                if image_size:
                    image = square_resize(image, image_size)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {path} ({err}); give a PNG or JPEG file") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape != (c, h, w):
            raise UserError(
                f"{path} is {'x'.join(map(str, array.shape))} but the model takes {c}x{h}x{w}: "
                f"convert with --image-size {h} --channels {c}"
            )
        converted += not native
        images.append(torch.from_numpy(array.copy()))
    return torch.stack(images), converted
