"""What several verbs share: device, precision and data options, which data a verb reads,
reading images."""

from __future__ import annotations

import argparse

import torch

from ..data import ImageDataset
from ..errors import UserError
from ..images import fit_image, open_image
from ..precision import PRECISIONS
from ..run import SPLITS, DataOptions, Run, check_data_fits, load_run_split
from ..runs_io import open_model, open_run  # the library's; the verbs call them from here

DEVICE_HELP = (
    "auto picks CUDA when present, else the CPU. On a CPU, fp32 eager with the blocked "
    "backend is the fastest mode we measured (bf16 autocast is ~10x slower without bf16 "
    "hardware and 1.3-1.6x slower with it, for the CPU presets; torch.compile gave no gain)."
)
PRECISION_HELP = (
    "compute precision through autocast (bits/dim is always reduced in float32); fp32 is the "
    "default because bf16 autocast was slower on every CPU measured (~10x without bf16 "
    "hardware, 1.3-1.6x with AVX-512 bf16)"
)


def device(name: str) -> torch.device:
    """The device named on the command line, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available; use --device cpu")
    return torch.device(name)


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help=DEVICE_HELP
    )


def add_precision(parser: argparse.ArgumentParser, default: str | None = "fp32") -> None:
    parser.add_argument(
        "--precision", default=default, choices=tuple(PRECISIONS), help=PRECISION_HELP
    )


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """How data is read (every verb that loads a data set) and where the model runs."""
    parser.add_argument("--image-size", type=int, help="resize images to this side")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels"
    )
    parser.add_argument("--download", action="store_true", help="download the data set if missing")
    add_device(parser)


def add_image_source(parser: argparse.ArgumentParser, image_help: str) -> None:
    """--image FILE or --from-split SPLIT (its first --count images): the inputs of a verb that
    works on given images."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help=image_help)
    source.add_argument("--from-split", choices=SPLITS, help="images of the run's data")
    parser.add_argument("--count", type=int, default=4, help="images taken from --from-split")


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(args.image_size, args.channels, args.download)


def data_for_run(
    args: argparse.Namespace, given: str | None
) -> tuple[str, DataOptions, Run | None]:
    """The data set to read (`given`, else the run's own) and how to convert it (as the run was
    trained, with --image-size/--channels taking precedence); and the run, if recorded."""
    the_run = open_run(args.run_dir)
    spec = given or (the_run.info.data if the_run else None)
    if spec is None:
        raise UserError(f"{args.run_dir} has no run.json: name the data set (--data NAME|PATH)")
    options = data_options(args)
    return spec, (the_run.info.data_options(options) if the_run else options), the_run


def model_and_split(args: argparse.Namespace):
    """What `eval` and `score` start from: the run's model and the asked split (`--data`,
    default the run's own), converted as the run was trained and checked against the model.
    Returns (model, dataset, data spec, data options, run or None)."""
    if args.batch_size < 1 or args.limit < 0:
        raise UserError("--batch-size must be at least 1 and --limit at least 0")
    model = open_model(args.run_dir, device(args.device))
    spec, options, the_run = data_for_run(args, args.data)
    dataset = load_split(spec, options, args.split, the_run)
    check_data_fits(model.config, dataset, training=False)
    return model, dataset, spec, options, the_run


def load_split(spec: str, options: DataOptions, split: str, the_run: Run | None) -> ImageDataset:
    """Split `split` of `spec`; `train` and `validation` as `the_run` divided its train split
    (a bare model folder held out nothing)."""
    fraction = the_run.info.train.validation_fraction if the_run is not None else 0.0
    return load_run_split(options, spec, split, fraction)


def add_split(parser: argparse.ArgumentParser, default: str = "test") -> None:
    parser.add_argument(
        "--split",
        default=default,
        choices=SPLITS,
        help="validation: the part of train a run holds out to choose its weights "
        f"(default {default})",
    )


def images_from_split(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `--count` images (and labels) of `--from-split` of the run's data."""
    the_run = open_run(args.run_dir)
    if the_run is None:
        raise UserError(f"{args.run_dir} has no run.json: use --image PATH")
    dataset = the_run.load_split(args.from_split, data_options(args))
    return dataset.batch(torch.arange(min(args.count, len(dataset))))


def check_sampling_options(n: int, temperature: float, count: int = 1) -> None:
    """Refuse sample counts below one and negative temperatures."""
    if n < 1 or count < 1:
        raise UserError("--n and --count must be at least 1")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")


def read_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as uint8 [C, H, W] in the model's shape (centre crop, area resize)."""
    c, h, w = shape
    if h != w:
        raise UserError(f"--image needs a square model, this one takes {h}x{w} images")
    return fit_image(open_image(path, f"image {path}"), shape)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--host and --port of a local web app: this machine only, unless told otherwise."""
    from ..web.server import DEFAULT_HOST, DEFAULT_PORT

    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (the URL is printed)"
    )
