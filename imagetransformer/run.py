"""The run folder, the unit a user handles: creating, opening, resuming and describing a run.

A run folder holds `config.json` and `model.safetensors` (what `from_pretrained` reads; the
averaged weights when the run keeps an EMA), `run.json` (data, preset, recipe, processes),
`checkpoint.pt` and `checkpoint.prev.pt` (weights, optimizer, step, RNG states), `log.jsonl`,
TensorBoard events and `samples/`. This module decides what a run is and which changes a resume
may make; `training.Trainer` runs the loop over it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    atomic_write_text,
    read_config,
)
from .config import ImageTransformerConfig, TrainConfig, apply_overrides, parse_override
from .data import FOLDER_SIDE, ImageDataset, folder, is_image_folder, load_dataset
from .data.validation import split_validation
from .errors import UserError
from .presets import (
    DEFAULT_PRESET,
    few_images_of,
    load_preset,
    load_train_preset,
    preset_data_options,
    presets_for_shape,
)

RUN_FILE = "run.json"
VALIDATION = "validation"  # the split held out of train to choose weights on
SPLITS = ("train", VALIDATION, "test")
LOG_FILE = "log.jsonl"
SAMPLES_DIR = "samples"
# Settings a resumed run may change: they steer the loop, not the function being learned.
# batch_size and grad_accum only so that the global batch stays (`check_batch_layout`): that is
# how a run moves to another number of processes.
RESUMABLE_SETTINGS = (
    "max_steps",
    "eval_every",
    "eval_images",
    "checkpoint_every",
    "sample_every",
    "sample_count",
    "log_every",
    "precision",
    "compile",
    "batch_size",
    "grad_accum",
    "backend",  # a model setting, but every backend computes the same function
    "ema_decay",  # the average follows the steps; it does not change them
)
# model settings that do not change the function, so a checkpoint may be resumed with others
FUNCTION_NEUTRAL = ("backend",)


@dataclass
class DataOptions:
    """How a data set is read: the same conversion for every verb that loads images."""

    image_size: int | None = None
    channels: int | None = None
    download: bool = False
    crops: int | None = None  # random crops per image of a folder (None or 0: one resized copy)
    # the fraction of each photo's train crops cut from its validation strip (0: no strips)
    strip: float = 0.0

    def load(self, spec: str, split: str) -> ImageDataset:
        return load_dataset(
            spec,
            split,
            image_size=self.image_size,
            channels=self.channels,
            download=self.download,
            crops=self.crops or 0,
            strip=self.strip if split == "train" else 0.0,
        )


def with_automatic_crops(data: str | None, options: DataOptions) -> tuple[DataOptions, str | None]:
    """`options` for training on `data`, with random crops when it is a folder of photos much
    larger than the model and `--crops` was not given (`folder.automatic_crops`), and the line
    that says so (None when nothing was chosen)."""
    if data is None or options.crops is not None or not is_image_folder(data):
        return options, None
    size = options.image_size or FOLDER_SIDE
    crops, side = folder.automatic_crops(Path(data).expanduser(), size)
    if not crops:
        return options, None
    return replace(options, crops=crops), (
        f"{data}: its images are large for a {size}x{size} model (median short side {side} "
        f"px): training on {crops} random crops of each at random scales (--crops 0: one "
        "resized copy of each; --crops N: N of each)"
    )


def validation_strips_line(fraction: float) -> str:
    """What a run whose validation crops come from strips of its photos says once."""
    return (
        f"validation: crops of the last {fraction:.0%} of each photo's long side, which no "
        f"training crop touches (too few photos to hold out {folder.WHOLE_PHOTOS} whole ones; "
        "--set validation_fraction=0: train on all of every photo)"
    )


@dataclass
class RunInfo:
    """What a run folder records besides the model config: the data and the recipe."""

    train: TrainConfig
    data: str = "mnist5k"
    preset: str | None = None
    image_size: int | None = None
    channels: int | None = None
    crops: int | None = None
    # validation crops come from a strip of every photo (folder.validation_strips); recorded so
    # that runs started before strips existed keep holding out whole photos
    validation_strips: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None  # processes of the latest (re)start; None: not recorded
    # the step and validation bits/dim of the weights in model.safetensors (None: the latest)
    selected: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "train": self.train.to_dict(),
                "data": self.data,
                "preset": self.preset,
                "image_size": self.image_size,
                "channels": self.channels,
                "crops": self.crops,
                "validation_strips": self.validation_strips,
                "world_size": self.world_size,
                "selected": self.selected,
                **self.extra,
            },
            indent=2,
        )

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise UserError(f"{path} not found: {run_dir} is not a run folder of this tool")
        try:
            data = json.loads(path.read_text())
            return cls(
                train=TrainConfig.from_dict(data.pop("train")),
                data=data.pop("data"),
                preset=data.pop("preset", None),
                image_size=data.pop("image_size", None),
                channels=data.pop("channels", None),
                crops=data.pop("crops", None),
                validation_strips=bool(data.pop("validation_strips", False)),
                world_size=data.pop("world_size", None),
                selected=data.pop("selected", None),
                extra=data,
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(
                f"{path} is not a valid run record ({type(err).__name__}: {err}); restore it, "
                "or start a new run with another --out"
            ) from None

    def data_options(self, given: DataOptions | None = None) -> DataOptions:
        """The recorded data conversion, with anything `given` again taking precedence."""
        given = given or DataOptions()
        return DataOptions(
            image_size=given.image_size if given.image_size is not None else self.image_size,
            channels=given.channels if given.channels is not None else self.channels,
            download=given.download,
            crops=given.crops if given.crops is not None else self.crops,
            strip=self.train.validation_fraction if self.validation_strips else 0.0,
        )


@dataclass
class Run:
    """A run folder and what it records: the model config and the run info."""

    path: Path
    config: ImageTransformerConfig
    info: RunInfo

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # Files -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists() or (self.path / PREVIOUS_CHECKPOINT_FILE).exists()

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    def sample_path(self, step: int) -> Path:
        return self.path / SAMPLES_DIR / f"step_{step:07d}.png"

    # Creating and opening ----------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        path: str | Path | None,
        preset: str | None = None,
        overrides: list[str] | None = None,
        data: str | None = None,
        options: DataOptions | None = None,
    ) -> Run:
        """A run to start: the preset's model and recipe with `--set` overrides applied.

        Nothing is written yet (`write_start` does that, on the main process).
        """
        preset = preset or DEFAULT_PRESET
        config, train = apply_overrides(
            load_preset(preset), load_train_preset(preset), overrides or []
        )
        options = options or DataOptions()
        default = preset_data_options(preset)
        if data is None:  # the preset's own data, converted as the preset needs unless told
            data = default.name
            options = DataOptions(
                image_size=options.image_size or default.image_size,
                channels=options.channels or default.channels,
                download=options.download,
                crops=options.crops,
            )
        info = RunInfo(
            train=train,
            data=data,
            preset=preset,
            image_size=options.image_size,
            channels=options.channels,
            crops=options.crops,
            validation_strips=is_image_folder(data)
            and folder.validation_strips(
                Path(data).expanduser(), options.crops or 0, train.validation_fraction
            ),
        )
        return cls(Path(path) if path else default_run_dir(preset), config, info)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run folder (config.json and run.json)."""
        path = Path(path)
        return cls(path, read_config(path), RunInfo.read(path))

    @classmethod
    def resume(
        cls,
        path: str | Path,
        overrides: list[str] | None = None,
        data: str | None = None,
        preset: str | None = None,
        crops: int | None = None,
    ) -> Run:
        """An existing run to continue, with the settings a resume may change.

        Refuses by name a setting that would change the model or the steps already taken, and
        a `--data`/`--preset`/`--crops` other than the recorded one.
        """
        run = cls.open(path)
        for text in overrides or []:
            key = text.split("=", 1)[0].strip()
            if key not in RESUMABLE_SETTINGS:
                raise UserError(
                    f"--set {key}=... cannot change on --resume (it would change the model or the "
                    f"steps already taken); allowed: {', '.join(RESUMABLE_SETTINGS)}"
                )
        for option, given, recorded in (
            ("--data", data, run.info.data),
            ("--preset", preset, run.info.preset),
            ("--crops", crops, run.info.crops or 0),
        ):
            if given is not None and given != recorded:
                raise UserError(
                    f"{run.path} was trained with {option} {recorded}; resume without {option} "
                    f"{given}, or start a new run with another --out"
                )
        run.config, run.info.train = apply_overrides(run.config, run.info.train, overrides or [])
        return run

    def write_start(self, context: distributed.Context = distributed.SINGLE) -> None:
        """Create the folder with config.json and run.json; refuse one that holds a run."""
        if self.has_checkpoint:
            raise UserError(
                f"{self.path} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        distributed.barrier(context)  # every rank has looked before rank 0 writes
        if context.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / CONFIG_FILE, self.config.to_json() + "\n")
        self.record_info(context)

    def record_info(self, context: distributed.Context = distributed.SINGLE) -> None:
        """Write run.json (data, preset, recipe, processes): a resume may have changed them."""
        self.info.world_size = context.world_size
        if context.is_main:
            atomic_write_text(self.path / RUN_FILE, self.info.to_json() + "\n")

    # Data --------------------------------------------------------------------------------------
    def load_split(
        self, split: str, options: DataOptions | None = None, data: str | None = None
    ) -> ImageDataset:
        """A split of the run's data (or of `data`), converted as the run was trained.

        `train` is what the run trains on: the data's train split less the validation images
        (`validation`), which the run holds out to choose its weights.
        """
        return load_run_split(
            self.info.data_options(options),
            data or self.info.data,
            split,
            self.info.train.validation_fraction,
        )

    def load_training_splits(
        self, options: DataOptions | None = None
    ) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
        """(train, validation or None, test) of the run's data, as the run trains on them."""
        options = self.info.data_options(options)
        whole = options.load(self.info.data, "train")
        train, validation = split_validation(whole, self.info.train.validation_fraction)
        return train, validation, options.load(self.info.data, "test")

    def take_few_images_settings(self, train_images: int, overrides: list[str]) -> str | None:
        """Apply the settings the preset takes on fewer training images than it is made for
        (`Preset.few_images`) that `overrides` (--set) leave alone; before the run starts.
        Returns the line that says what changed, or None."""
        few = few_images_of(self.info.preset)
        if few is None or train_images >= few.below:
            return None
        given = {parse_override(text)[0] for text in overrides}
        taken = {key: value for key, value in few.model.items() if key not in given}
        if not taken:
            return None
        shown = [f"{key}={json.dumps(value)}" for key, value in taken.items()]
        self.config, self.info.train = apply_overrides(self.config, self.info.train, shown)
        undo = [
            f"--set {key}={json.dumps(not value) if isinstance(value, bool) else '...'}"
            for key, value in taken.items()
        ]
        return (
            f"{self.info.preset} on {train_images:,} training images (fewer than "
            f"{few.below:,}): {', '.join(shown)}, as the preset does for few images "
            f"({' '.join(undo)} to choose otherwise)"
        )

    def check_data(self, dataset: ImageDataset, training: bool = False) -> None:
        """Refuse a data set the model cannot read, naming the flags or preset that fix it."""
        check_data_fits(self.config, dataset, training)

    # Resuming ----------------------------------------------------------------------------------
    def check_state(self, state: dict[str, Any], context: distributed.Context) -> None:
        """Refuse a checkpoint written for another model, or a resume that changes the batch."""
        saved = dict(state.get("model_config") or {})
        current = self.config.to_dict()
        for key in FUNCTION_NEUTRAL:
            saved.pop(key, None)
            current.pop(key, None)
        if saved != current:
            raise UserError(
                f"{self.checkpoint_path} was written for a different model config than "
                f"{self.path / CONFIG_FILE}; resume without model --set overrides, or start a "
                "new run with --out"
            )
        check_batch_layout(state, self.info.train, context, self.checkpoint_path)

    # Describing --------------------------------------------------------------------------------
    def describe(
        self, num_parameters: int, train_size: int, validation_size: int, test_size: int, device
    ) -> str:
        """The opening line of a training run."""
        config = self.config
        extras = ""
        if config.task == "superres":
            extras += f", super-resolution x{config.scale}"
        if config.output != "cat":
            extras += f", output {config.output}"
        return (
            f"training {self.info.preset or 'model'} ({num_parameters / 1e6:.2f}M parameters, "
            f"{config.attention}, {'x'.join(map(str, config.image_shape))}{extras}) on "
            f"{self.info.data}: {train_size} train / {validation_size} validation / {test_size} "
            f"test images, device {device}, "
            f"run folder {self.path}"
        )


def load_run_split(
    options: DataOptions, spec: str, split: str, validation_fraction: float
) -> ImageDataset:
    """Split `split` of data set `spec` as a run that holds out `validation_fraction` of the
    train split sees it: `train` without the validation images, `validation`, or `test`."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "test":
        return options.load(spec, split)
    train, validation = split_validation(options.load(spec, "train"), validation_fraction)
    if split == "train":
        return train
    if validation is None:
        raise UserError(
            f"no validation images: the run holds out none (validation_fraction="
            f"{validation_fraction}) of {spec}'s train split; use --split train or test"
        )
    return validation


def default_run_dir(preset: str, resume: bool = False) -> Path:
    """runs/PRESET, or the first free runs/PRESET-N so that a second run never clobbers one."""
    base = Path("runs") / preset
    if resume:
        return base
    candidate, n = base, 1
    while (candidate / CHECKPOINT_FILE).exists():
        n += 1
        candidate = base.with_name(f"{preset}-{n}")
    return candidate


def check_batch_layout(
    state: dict[str, Any], cfg: TrainConfig, context: distributed.Context, path: Path
) -> None:
    """Refuse a resume whose global batch differs; warn if only its split does.

    Step s trains on chunk s of a permutation cut into global batches, so with the same global
    batch every step sees the same images whatever the number of processes; another global
    batch would change the data of every step still to come. Checkpoints from before
    `world_size` was saved count as written by this many processes.
    """
    saved = state.get("train_config") or {}
    was = (
        int(saved.get("batch_size", cfg.batch_size)),
        int(state.get("world_size", context.world_size)),
        int(saved.get("grad_accum", 1)),
    )
    now = (cfg.batch_size, context.world_size, cfg.grad_accum)
    if was == now:
        return
    recorded, current = math.prod(was), math.prod(now)
    if current != recorded:
        raise UserError(
            f"{path} was trained on a global batch of {recorded} images per step "
            f"(batch_size {was[0]} x {was[1]} processes x grad_accum {was[2]}) but this "
            f"resume would take {current} (batch_size {now[0]} x {now[1]} processes x "
            f"grad_accum {now[2]}): {_layout_fix(recorded, cfg.batch_size, context.world_size)}"
        )
    if context.is_main:
        warnings.warn(
            f"resuming with batch_size {now[0]} x {now[1]} processes x grad_accum {now[2]} "
            f"instead of {was[0]} x {was[1]} x {was[2]}: each step sees the same "
            f"{recorded} images, but dropout draws (and float rounding) differ from an "
            "unbroken run",
            stacklevel=3,
        )


def _layout_fix(global_batch: int, batch_size: int, world_size: int) -> str:
    """How to reach `global_batch` with `world_size` processes: the advice of a refused resume."""
    goal = f"so that batch_size x processes x grad_accum is {global_batch} again"
    if global_batch % (batch_size * world_size) == 0:
        accum = global_batch // (batch_size * world_size)
        return f"set grad_accum={accum} (--grad-accum {accum}) {goal}"
    if global_batch % world_size == 0:
        size = global_batch // world_size
        return (
            f"set batch_size={size} and grad_accum=1 (--set batch_size={size} --grad-accum 1) "
            + goal
        )
    return (
        f"use a number of processes that divides {global_batch}, and set batch_size and "
        f"grad_accum {goal}"
    )


def check_data_fits(
    config: ImageTransformerConfig, dataset: ImageDataset, training: bool = True
) -> None:
    """Refuse images of another shape, or labels the model cannot take, naming the fix: for a
    new run a preset made for that shape, for a trained model the conversion flags."""
    if tuple(dataset.shape) != tuple(config.image_shape):
        shape = "x".join(map(str, dataset.shape))
        model_shape = "x".join(map(str, config.image_shape))
        c, h, w = config.image_shape
        if training:
            fits = presets_for_shape(tuple(dataset.shape))
            hint = f" (--preset {' / '.join(fits)})" if fits else ""
            fix = (
                f"pick a preset made for {shape} images{hint}, or --set "
                f"image_shape={','.join(map(str, dataset.shape))}, or convert the data with "
                f"--image-size {h} --channels {c}"
            )
        else:
            fix = f"convert the images with --image-size {h} --channels {c}"
        raise UserError(
            f"data set {dataset.name} holds {shape} images but the model takes {model_shape}: "
            + fix
        )
    if config.num_classes:
        if dataset.labels is None:
            raise UserError(
                f"the model is class-conditional (num_classes={config.num_classes}) but "
                f"{dataset.name} has no labels: use a labelled set or --set num_classes=0"
            )
        if (dataset.num_classes or 0) > config.num_classes:
            raise UserError(
                f"{dataset.name} has {dataset.num_classes} classes but the model has "
                f"num_classes={config.num_classes}: --set num_classes={dataset.num_classes}"
            )
