"""What several verbs share: device, precision and data options, which images a verb with a
model reads, reading images."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data import ALL, ImageDataset, is_image_folder
from ..data.folder import holds_out
from ..defaults import GUIDANCE
from ..errors import UserError
from ..images import fit_image, open_image
from ..model import ImageTransformer
from ..precision import PRECISIONS
from ..run import SPLITS, DataOptions, Run, check_data_fits, load_run_split
from ..runs_io import open_model, open_run  # the library's; the verbs call them from here
from ..sampling import default_guidance

DEVICE_HELP = (
    "auto picks CUDA when present, else the CPU. On a CPU the defaults (fp32, eager, blocked "
    "attention) are the fastest mode measured (docs/results.md, Speed)."
)
PRECISION_HELP = (
    "compute precision through autocast (bits/dim is always reduced in float32); fp32 unless the "
    "run says otherwise: bf16 autocast was slower on the CPUs measured (docs/results.md, Speed)"
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


def add_guidance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance weight w: draw from p(x|y)^(1+w) / p(x)^w (models "
        f"trained with class_dropout; default {GUIDANCE:g} for them; 0: off)",
    )


def guidance(args: argparse.Namespace, model: ImageTransformer) -> float:
    """The guidance weight asked for, else the model's default (`default_guidance`)."""
    return default_guidance(model) if args.guidance is None else args.guidance


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
    return DataOptions(args.image_size, args.channels, args.download, getattr(args, "crops", None))


def data_for_run(
    args: argparse.Namespace, given: str | None, shape: tuple[int, int, int] | None = None
) -> tuple[str, DataOptions, Run | None]:
    """The data set to read (`given`, else the run's own) and how to convert it (as the run was
    trained, with --image-size/--channels taking precedence); and the run, if recorded. With
    the model's `shape`, an image folder is read at that shape unless the flags say otherwise
    (`fit_folder`)."""
    the_run = open_run(args.run_dir)
    spec = given or (the_run.info.data if the_run else None)
    if spec is None:
        raise UserError(f"{args.run_dir} has no run.json: name the data set (--data NAME|PATH)")
    options = data_options(args)
    options = the_run.info.data_options(options) if the_run else options
    return spec, fit_folder(options, spec, shape), the_run


def fit_folder(options: DataOptions, spec: str, shape: tuple[int, int, int] | None) -> DataOptions:
    """`options` for reading `spec` into a model of `shape` [C, H, W]: an image folder is read
    at the model's side and channels where neither the flags nor the run say otherwise (instead
    of the 3x32x32 a folder defaults to); any other set as it is."""
    if shape is None or not is_image_folder(spec):
        return options
    c, h, w = shape
    return replace(
        options,
        image_size=options.image_size if options.image_size is not None or h != w else h,
        channels=options.channels if options.channels is not None else c,
    )


@dataclass
class ModelData:
    """What `eval` and `score` start from: a model and the images to read with it."""

    model: ImageTransformer
    dataset: ImageDataset
    spec: str
    options: DataOptions
    split: str
    run: Run | None

    @property
    def what(self) -> str:
        """Which images these are, for the verb's report (`describe_split`)."""
        return describe_split(self.spec, self.split)


def model_and_split(args: argparse.Namespace) -> ModelData:
    """The run's model and the asked split (`--split`, see `choose_split`) of `--data` (default
    the run's own), converted as the run was trained (an image folder: to the model's shape)
    and checked against the model."""
    if args.batch_size < 1 or args.limit < 0:
        raise UserError("--batch-size must be at least 1 and --limit at least 0")
    model = open_model(args.run_dir, device(args.device))
    shape = tuple(model.config.image_shape)
    spec, options, the_run = data_for_run(args, args.data, shape)
    split = choose_split(args.split, spec, the_run)
    dataset = load_split(spec, options, split, the_run)
    check_data_fits(model.config, dataset, training=False)
    return ModelData(model, dataset, spec, options, split, the_run)


def choose_split(asked: str | None, spec: str, the_run: Run | None) -> str:
    """`asked` when given; else every image of an image folder named on the command line, and
    the test split of the run's own data or of any other set."""
    if asked is not None:
        return asked
    if the_run is not None and _same_data(spec, the_run.info.data):
        return "test"
    return ALL if is_image_folder(spec) else "test"


def _same_data(spec: str, recorded: str) -> bool:
    """True when `spec` names the data set `recorded` (the same name, or the same path)."""
    if spec.strip().lower() == recorded.strip().lower():
        return True
    given, own = Path(spec).expanduser(), Path(recorded).expanduser()
    return given.exists() and own.exists() and given.resolve() == own.resolve()


def describe_split(spec: str, split: str) -> str:
    """Which images of `spec` split `split` is, in a report's words."""
    if split == ALL:
        return f"{spec} (all images)"
    if split == "test" and is_image_folder(spec) and holds_out(Path(spec).expanduser()):
        return f"{spec} test split (the 10% the folder holds out; --split all reads every image)"
    return f"{spec} {split} split"


def load_split(spec: str, options: DataOptions, split: str, the_run: Run | None) -> ImageDataset:
    """Split `split` of `spec`; `train` and `validation` as `the_run` divided its train split
    (a bare model folder held out nothing); `all`: every image of an image folder."""
    if split == ALL:
        return options.load(spec, ALL)
    fraction = the_run.info.train.validation_fraction if the_run is not None else 0.0
    return load_run_split(options, spec, split, fraction)


def add_split(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split",
        choices=(*SPLITS, ALL),
        help="validation: the part of train a run holds out to choose its weights; all: every "
        "image of an image folder (default: all of an image folder you name, else test)",
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
