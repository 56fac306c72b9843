"""Model and training configs: dataclasses with JSON round-trip and checks that name the fix.

Two dataclasses, because a saved model needs only the first: `ImageTransformerConfig` (what
`from_pretrained` rebuilds) and `TrainConfig` (how a run trains it). The choices of attention
type, output type, backend and precision come from the modules that implement them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from .attention import BACKENDS
from .errors import UserError
from .outputs import OUTPUT_TYPES
from .pattern import PATTERNS
from .precision import PRECISIONS

ATTENTION_TYPES = tuple(PATTERNS)
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: the fastest that runs here (attention.py)
POSITION_SIGNALS = ("timing", "learned")
OUTPUTS = tuple(OUTPUT_TYPES)
TASKS = ("generate", "superres")
# the settings that only a super-resolution model has (docs/model.md, Departures)
SUPERRES_OPTIONS = ("low_res_signal", "low_res_upsample", "low_res_remainder", "low_res_bounds")
# where a class-conditional model adds its class embedding: the decoder's input only, or the
# input of every block (docs/model.md, Departures: the class signal)
CLASS_SIGNALS = ("input", "every_block")


def _as_pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    try:
        a, b = value
        return (int(a), int(b))
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a pair of integers like [8, 16], got {value!r}") from None


@dataclass
class ImageTransformerConfig:
    """Everything that decides the model's function (docs/model.md)."""

    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W
    num_layers: int = 4
    d_model: int = 64
    num_heads: int = 4
    ffn_size: int = 256
    dropout: float = 0.1
    attention: str = "local_1d"
    block_length: int = 256  # local_1d query block, in positions
    memory_length: int | None = None  # local_1d keys before the block; None means block_length
    query_shape: tuple[int, int] = (8, 16)  # local_2d query block, in grid cells (rows, columns)
    memory_flange: tuple[int, int] = (8, 32)  # local_2d flange, in grid cells
    backend: str = "auto"  # how attention is computed; every backend gives the same function
    pos: str = "timing"
    norm_first: bool = False  # post-norm as in the paper; pre-norm trains small models better
    num_classes: int = 0  # 0: unconditional
    # the class table's init: this times tensor2tensor's variance-scaling init (0: zeros)
    class_init: float = 0.0
    # what the class table's row is multiplied by: 0 means sqrt(d_model), as the reference and
    # the input embeddings; with Adam a smaller multiplier is a smaller step for the class signal
    class_scale: float = 0.0
    # input: the class embedding is added to the decoder's input (as the paper); every_block:
    # the same embedding is added again to the residual stream before every later block
    class_signal: str = "input"
    # fraction of training labels replaced by "no class", an extra row of the class table
    # (label num_classes): the model also learns p(x), and samplers can guide by the class
    class_dropout: float = 0.0
    output: str = "cat"  # cat: 256-way softmax per sub-pixel; dmol: logistic mixture per pixel
    num_mixtures: int = 10  # dmol components
    task: str = "generate"  # generate: p(x) or p(x | y); superres: p(x | area-downsampled x)
    scale: int = 4  # superres: the low-resolution input is the image shrunk by this factor
    encoder_layers: int = 4  # superres: unmasked self-attention blocks over the input
    # superres: add an embedding of the low-resolution pixel that covers each output position
    # to the decoder's input at that position (docs/model.md, Departures)
    low_res_signal: bool = False
    # superres: also add a learned upsampling of the 3x3 low-resolution pixels around the
    # covering one, a linear map per place within the s x s block (docs/model.md, Departures)
    low_res_upsample: bool = False
    # superres: also add an embedding of what the block's pixels still to come must average
    # (s^2 times the low-resolution value less the block's values generated so far, over how
    # many remain), per channel (docs/model.md, Departures)
    low_res_remainder: bool = False
    # superres: give no probability to a value that would leave its block unable to average
    # to the low-resolution value (categorical output), so every sample downsamples to its
    # input exactly (docs/model.md, Departures)
    low_res_bounds: bool = False
    # add an embedding of the value directly above each position (same column and channel, one
    # row up, generated earlier in every attention type's order) to the decoder's input there
    above_signal: bool = False
    # add embeddings of the values above-left and above-right (one row up, one pixel to either
    # side) and two rows up and two pixels left, each where the order generates it earlier
    near_signal: bool = False
    # dmol: each component's channel means as offsets from the decoded pixel to the left (above
    # it in the first column; none for the first pixel), as a lossless predictor codes the
    # residual: smooth regions need no exact value carried through the network
    mixture_anchor: bool = False

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(v) for v in self.image_shape)  # type: ignore[assignment]
        self.query_shape = _as_pair(self.query_shape, "query_shape")
        self.memory_flange = _as_pair(self.memory_flange, "memory_flange")
        self.validate()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Rows and columns of the position grid: H rows of W x (positions per pixel): one
        column per channel of each pixel (cat), or per pixel (dmol)."""
        c, h, w = self.image_shape
        return h, w * OUTPUT_TYPES[self.output].positions_per_pixel(c)

    @property
    def low_res_shape(self) -> tuple[int, int, int]:
        """The super-resolution input [C, H/scale, W/scale]."""
        c, h, w = self.image_shape
        return c, h // self.scale, w // self.scale

    @property
    def reads_block_values(self) -> bool:
        """Whether each step reads the values of its low-resolution block generated before it
        (super-resolution with `low_res_remainder` or `low_res_bounds`)."""
        return self.task == "superres" and (self.low_res_remainder or self.low_res_bounds)

    @property
    def num_positions(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    @property
    def effective_memory_length(self) -> int:
        return self.block_length if self.memory_length is None else self.memory_length

    def validate(self) -> None:
        if len(self.image_shape) != 3 or self.image_shape[0] not in (1, 3):
            raise UserError(
                f"image_shape must be [C, H, W] with C = 1 or 3, got {list(self.image_shape)}; "
                "set e.g. --set image_shape=3,32,32"
            )
        if min(self.image_shape) < 1:
            raise UserError(f"image_shape must be positive, got {list(self.image_shape)}")
        _choice("attention", self.attention, ATTENTION_TYPES)
        _choice("backend", self.backend, BACKEND_CHOICES)
        _choice("pos", self.pos, POSITION_SIGNALS)
        _choice("output", self.output, OUTPUTS)
        _choice("task", self.task, TASKS)
        _choice("class_signal", self.class_signal, CLASS_SIGNALS)
        if self.class_signal != "input" and not self.num_classes:
            raise UserError(
                f"class_signal={self.class_signal} needs a class-conditional model "
                "(--set num_classes=K)"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise UserError(f"class_dropout must be in [0, 1) (0: off), got {self.class_dropout}")
        if self.class_dropout and not self.num_classes:
            raise UserError("class_dropout needs a class-conditional model (--set num_classes=K)")
        if self.num_mixtures < 1:
            raise UserError(f"num_mixtures must be at least 1, got {self.num_mixtures}")
        if self.mixture_anchor and self.output != "dmol":
            raise UserError(
                "mixture_anchor places the mixture of logistics' means: it needs --set output=dmol"
            )
        if self.task == "superres":
            self._validate_superres()
        else:
            for name in SUPERRES_OPTIONS:
                if getattr(self, name):
                    raise UserError(f"{name} needs a super-resolution model (--task superres)")
        for name in ("num_layers", "d_model", "num_heads", "ffn_size", "block_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise UserError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                "change one of them"
            )
        if self.pos == "timing" and (self.d_model % 4 or self.d_model < 8):
            raise UserError(
                f"the timing position signal needs d_model divisible by 4 and at least 8, "
                f"got {self.d_model}; change d_model or use --set pos=learned"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.memory_length is not None and self.memory_length < 0:
            raise UserError(f"memory_length must be >= 0, got {self.memory_length}")
        if self.class_init < 0:
            raise UserError(f"class_init must be >= 0 (0 = zeros), got {self.class_init}")
        if self.class_scale < 0:
            raise UserError(f"class_scale must be >= 0 (0 = sqrt(d_model)), got {self.class_scale}")
        if self.num_classes < 0:
            raise UserError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        PATTERNS[self.attention].check_config(self)

    def _validate_superres(self) -> None:
        _, h, w = self.image_shape
        if self.d_model % 4:
            raise UserError(
                f"the super-resolution encoder's timing signal needs d_model divisible by 4, "
                f"got {self.d_model}"
            )
        if self.scale < 2 or h % self.scale or w % self.scale:
            raise UserError(
                f"superres scale must be at least 2 and divide the image sides ({h}x{w}), got "
                f"{self.scale}; e.g. --set scale=4 for 32x32 from 8x8"
            )
        if self.encoder_layers < 1:
            raise UserError(f"superres needs encoder_layers >= 1, got {self.encoder_layers}")
        if self.num_classes:
            raise UserError(
                "a superres model is conditioned on its low-resolution input, not on classes: "
                "drop num_classes"
            )
        if self.low_res_bounds and self.output != "cat":
            raise UserError(
                "low_res_bounds needs the categorical output (one value per step); the mixture "
                "of logistics scores a pixel's channels jointly: drop one of them"
            )

    # JSON round-trip ---------------------------------------------------------------------------
    @property
    def class_multiplier(self) -> float:
        """What the class table's row is multiplied by (`class_scale`, 0: sqrt(d_model))."""
        return self.class_scale or math.sqrt(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageTransformerConfig:
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageTransformerConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class TrainConfig:
    """How a run trains (docs/model.md, "Training"): optimiser, schedule, batch, cadence."""

    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per step: global batch = batch_size x processes x this
    max_steps: int = 1000
    learning_rate: float = 0.1  # the noam "base"; peak lr = base * 10 / sqrt(d_model * warmup)
    warmup_steps: int = 4000
    # noam (paper); cosine or linear: the same warm-up, then a cosine or straight decay to 0
    lr_schedule: str = "noam"
    grad_clip: float = 1.0  # max global gradient norm; 0 disables (the paper presets: 0)
    ema_decay: float = 0.0  # moving average of the weights, evaluated and saved; 0 disables
    input_noise: float = 0.0  # fraction of training intensities replaced by uniform noise
    label_smoothing: float = 0.0  # training loss only; evaluation never smooths
    # decoupled weight decay (AdamW) of the weight matrices and embedding tables; 0: Adam
    weight_decay: float = 0.0
    seed: int = 0
    # fraction of the training images held out to choose the weights on (0: none, keep the last)
    validation_fraction: float = 0.1
    hflip: bool = False  # mirror each training image left-right with probability 1/2
    eval_every: int = 500  # steps between validation evaluations (0: only at the end)
    eval_images: int = 0  # validation images per evaluation (0: the whole split)
    checkpoint_every: int = 200  # steps between atomic checkpoints
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    sample_count: int = 16
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast); bits/dim is reduced in float32
    compile: bool = False  # torch.compile the training forward (no gain measured on CPU)

    def __post_init__(self) -> None:
        if self.grad_accum < 1:
            raise UserError(f"grad_accum must be at least 1, got {self.grad_accum}")
        if self.batch_size < 1 or self.max_steps < 0 or self.warmup_steps < 1:
            raise UserError(
                "batch_size and warmup_steps must be at least 1 and max_steps at least 0, got "
                f"{self.batch_size}, {self.warmup_steps}, {self.max_steps}"
            )
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 step, got {getattr(self, name)}")
        if min(self.eval_every, self.eval_images, self.sample_every, self.sample_count) < 0:
            raise UserError("eval_every, eval_images, sample_every and sample_count must be >= 0")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}")
        _choice("lr_schedule", self.lr_schedule, ("noam", "cosine", "linear"))
        _choice("precision", self.precision, tuple(PRECISIONS))
        if not 0.0 <= self.input_noise < 1.0:
            raise UserError(f"input_noise must be in [0, 1) (0: off), got {self.input_noise}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0 (0: off), got {self.weight_decay}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(
                f"validation_fraction must be in [0, 1) (0: no validation split), got "
                f"{self.validation_fraction}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        # runs recorded before validation splits existed trained on the whole train split
        return _from_dict(cls, {"validation_fraction": 0.0, **data})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")


def _to_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"unknown {cls.__name__} keys: {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    return cls(**data)


def parse_override(text: str) -> tuple[str, str]:
    """Split a `--set key=value` argument."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _coerce(value: str, current: Any, f: dataclasses.Field) -> Any:
    """Turn a command-line string into the type of an existing config field."""
    text = value.strip()
    try:
        if isinstance(current, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, tuple):
            return tuple(int(v) for v in text.strip("[]()").split(",") if v.strip())
        if text.lower() in ("none", "null"):
            if "None" not in str(f.type):
                raise ValueError(text)
            return None
        if isinstance(current, int) or "int" in str(f.type):
            return int(text)
        if isinstance(current, float) or "float" in str(f.type):
            return float(text)
        return text
    except ValueError:
        raise UserError(f"cannot read {f.name}={value!r} as {type(current).__name__}") from None


def apply_overrides(
    model: ImageTransformerConfig, train: TrainConfig, overrides: list[str]
) -> tuple[ImageTransformerConfig, TrainConfig]:
    """Apply `key=value` strings to whichever config owns the key; unknown keys are refused."""
    model_changes: dict[str, Any] = {}
    train_changes: dict[str, Any] = {}
    model_fields = {f.name: f for f in fields(model)}
    train_fields = {f.name: f for f in fields(train)}
    for text in overrides:
        key, value = parse_override(text)
        if key in model_fields:
            model_changes[key] = _coerce(value, getattr(model, key), model_fields[key])
        elif key in train_fields:
            train_changes[key] = _coerce(value, getattr(train, key), train_fields[key])
        else:
            known = sorted(model_fields) + sorted(train_fields)
            raise UserError(f"unknown setting {key!r} in --set; known settings: {', '.join(known)}")
    return dataclasses.replace(model, **model_changes), dataclasses.replace(train, **train_changes)


__all__ = [
    "ImageTransformerConfig",
    "TrainConfig",
    "apply_overrides",
    "ATTENTION_TYPES",
    "BACKEND_CHOICES",
]
