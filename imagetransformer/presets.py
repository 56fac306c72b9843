"""Named configs: the paper's (docs/model.md, "Presets") and small ones that train on a CPU
in minutes.

A preset is one `Preset` record: a model config, the training recipe that goes with it, a
line that describes it, and the data it trains on by default (with the conversion that makes
that data fit the model, e.g. `tiny` reads mnist5k at 8x8). A new preset is one entry in
`PRESETS`; a test checks each against its default data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ImageTransformerConfig, TrainConfig
from .errors import UserError


@dataclass(frozen=True)
class PresetData:
    """The data set a preset trains on unless --data says otherwise, and its conversion."""

    name: str = "mnist5k"
    image_size: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class FewImages:
    """Model settings a preset takes when it trains on fewer than `below` images, unless
    `--set` names them: for settings that measured better on a few photos and worse on many
    (docs/results.md, A small folder of one's own photos)."""

    below: int
    model: dict[str, Any]


@dataclass(frozen=True)
class Preset:
    """A named model config (`ImageTransformerConfig` fields), its recipe (`TrainConfig` fields),
    a one-line description and its default data."""

    model: dict[str, Any]
    train: dict[str, Any]
    description: str
    data: PresetData = field(default_factory=PresetData)
    few_images: FewImages | None = None

    @property
    def runs_on_cpu(self) -> bool:
        """Made to train on a CPU in minutes (listed first in hints)."""
        return "CPU" in self.description


_CIFAR = (3, 32, 32)
# The reference (tensor2tensor's image_transformer_base) does not clip gradients; the paper
# presets follow it. The CPU presets clip at 1.0 (docs/model.md, Departures: gradient clipping).
_PAPER_TRAIN = dict(grad_clip=0.0)
_PAPER_1D = dict(image_shape=_CIFAR, attention="local_1d", ffn_size=2048, d_model=512)

_MNIST_1D = dict(
    image_shape=(1, 28, 28),
    attention="local_1d",
    num_layers=4,
    d_model=64,
    num_heads=4,
    ffn_size=256,
    dropout=0.0,
    block_length=56,
    memory_length=56,
    norm_first=True,
)
_MNIST_TRAIN = dict(
    batch_size=8,
    learning_rate=0.08,
    warmup_steps=300,
    max_steps=2000,
    lr_schedule="cosine",
    eval_every=600,
    checkpoint_every=300,
)
# the paper's celeba_sr_2d / celeba_sr_1d (docs/model.md, Presets); the decoder's attention
# is added per preset
_PAPER_SR = dict(
    image_shape=_CIFAR,
    task="superres",
    scale=4,
    encoder_layers=4,
    num_layers=8,
    d_model=512,
    ffn_size=2048,
    num_heads=8,
    dropout=0.1,
)

PRESETS: dict[str, Preset] = {
    "cifar10_1d": Preset(
        dict(_PAPER_1D, num_layers=12, num_heads=4, dropout=0.3, block_length=256),
        dict(_PAPER_TRAIN, batch_size=4, learning_rate=0.5, warmup_steps=4000, max_steps=500_000),
        "paper: CIFAR-10, local 1D, 12 layers (imagetransformer_cifar10_base)",
        data=PresetData("cifar10"),
    ),
    "cifar10_2d": Preset(
        dict(
            _PAPER_1D,
            attention="local_2d",
            num_layers=8,
            num_heads=8,
            dropout=0.3,
            query_shape=(8, 16),
            memory_flange=(8, 32),
        ),
        dict(_PAPER_TRAIN, batch_size=4, learning_rate=0.1, warmup_steps=4000, max_steps=500_000),
        "CIFAR-10, local 2D, 8 layers, the reference's q3 block sizes",
        data=PresetData("cifar10"),
    ),
    "cifar10_cond": Preset(
        dict(_PAPER_1D, num_layers=8, num_heads=8, dropout=0.3, block_length=256, num_classes=10),
        dict(_PAPER_TRAIN, batch_size=4, learning_rate=0.1, warmup_steps=4000, max_steps=500_000),
        "paper: CIFAR-10 class-conditional, local 1D, 8 layers",
        data=PresetData("cifar10"),
    ),
    "imagenet32_1d": Preset(
        dict(_PAPER_1D, num_layers=12, num_heads=4, dropout=0.1, block_length=256),
        dict(_PAPER_TRAIN, batch_size=4, learning_rate=0.5, warmup_steps=4000, max_steps=1_000_000),
        "paper: ImageNet 32x32, local 1D, 12 layers (imagetransformer_imagenet32_base)",
        data=PresetData("imagenet32"),
    ),
    "imagenet64_1d": Preset(
        dict(
            _PAPER_1D,
            image_shape=(3, 64, 64),
            num_layers=8,
            num_heads=8,
            dropout=0.1,
            block_length=512,
        ),
        dict(_PAPER_TRAIN, batch_size=1, learning_rate=0.1, warmup_steps=4000, max_steps=1_000_000),
        "paper: ImageNet 64x64, local 1D, 8 layers (imagetransformer1d_base_8l_64by64)",
        data=PresetData("imagenet64"),
    ),
    "mnist_1d": Preset(
        _MNIST_1D,
        _MNIST_TRAIN,
        "CPU default: mnist5k, local 1D (2-row blocks + 2-row memory), 4 layers d=64, "
        "~10 min on 2 cores",
    ),
    "mnist_2d": Preset(
        dict(
            image_shape=(1, 28, 28),
            attention="local_2d",
            num_layers=4,
            d_model=64,
            num_heads=4,
            ffn_size=256,
            dropout=0.0,
            query_shape=(4, 14),
            memory_flange=(4, 7),
            norm_first=True,
        ),
        dict(
            batch_size=8,
            learning_rate=0.08,
            warmup_steps=300,
            max_steps=1500,
            lr_schedule="cosine",
            eval_every=500,
            checkpoint_every=250,
        ),
        "mnist5k, local 2D (4x14 query blocks, 4x7 flanges), 4 layers d=64",
    ),
    "mnist_1d_cond": Preset(
        dict(_MNIST_1D, num_classes=10, class_dropout=0.05, class_scale=2.0),
        _MNIST_TRAIN,
        "CPU: mnist5k class-conditional (the default model plus a class embedding, times 2 "
        "rather than sqrt(d); one label in 20 dropped, so that samples are guided by the "
        "class), 2000 steps as the default, ~5 min on 2 cores",
    ),
    "mnist_1d_dmol": Preset(
        dict(_MNIST_1D, output="dmol", num_mixtures=10),
        dict(_MNIST_TRAIN, max_steps=1500),
        "CPU: mnist5k with the mixture-of-logistics output (one position per pixel)",
    ),
    "mnist_sr": Preset(
        dict(
            _MNIST_1D,
            task="superres",
            scale=4,
            encoder_layers=2,
            num_heads=1,
            low_res_signal=True,
            low_res_upsample=True,
            low_res_bounds=True,
        ),
        dict(_MNIST_TRAIN, max_steps=2900),
        "CPU: super-resolution 7x7 -> 28x28 on mnist5k (encoder 2 layers, decoder as mnist_1d "
        "with one head, the covering low-resolution pixel and a learned upsampling in the "
        "decoder input, values bounded so that samples shrink to the input exactly)",
    ),
    "cifar10_1d_dmol": Preset(
        dict(
            image_shape=_CIFAR,
            attention="local_1d",
            num_layers=12,
            d_model=256,
            ffn_size=512,
            num_heads=8,
            dropout=0.1,
            block_length=256,
            output="dmol",
            num_mixtures=10,
            pos="learned",
        ),
        dict(_PAPER_TRAIN, batch_size=8, learning_rate=0.1, warmup_steps=4000, max_steps=500_000),
        "paper: CIFAR-10, mixture of logistics over 1,024 pixels "
        "(imagetransformer_cifar10_base_dmol)",
        data=PresetData("cifar10"),
    ),
    **{
        f"{data}_sr_{kind}": Preset(
            dict(_PAPER_SR, **decoder),
            dict(
                _PAPER_TRAIN, batch_size=2, learning_rate=0.2, warmup_steps=12000, max_steps=500_000
            ),
            f"{'paper' if data == 'celeba' else 'paper recipe'}: {name} super-resolution "
            f"8x8 -> 32x32, encoder global 4 / decoder {label} 8 layers ({reference})",
            data=PresetData(data),
        )
        for data, name in (("celeba", "CelebA"), ("cifar10", "CIFAR-10"))
        for kind, decoder, label, reference in (
            (
                "2d",
                dict(attention="local_2d", query_shape=(8, 16), memory_flange=(8, 32)),
                "local 2D",
                "img2img_transformer2d_q3",
            ),
            (
                "1d",
                dict(attention="local_1d", block_length=128),
                "local 1D",
                "img2img_transformer_b3",
            ),
        )
    },
    "rgb32": Preset(
        dict(
            image_shape=_CIFAR,
            attention="local_1d",
            num_layers=4,
            d_model=64,
            num_heads=1,
            ffn_size=256,
            dropout=0.0,
            output="dmol",
            num_mixtures=10,
            block_length=64,
            memory_length=64,
            norm_first=True,
            above_signal=True,
            mixture_anchor=True,
        ),
        dict(
            batch_size=8,
            learning_rate=0.03,
            warmup_steps=150,
            max_steps=3450,
            lr_schedule="cosine",
            eval_every=1000,
            eval_images=200,
            checkpoint_every=250,
            hflip=True,
            weight_decay=0.5,
        ),
        "CPU: 3x32x32 colour photos (default data cifar10, or a folder), mixture of logistics "
        "per pixel anchored on the pixel to the left, local 1D over 2-row blocks with 2 rows of "
        "memory, the value above in the input, 4 layers d=64 with one head, weight decay 0.5, "
        "~10 min on 2 cores; with fewer than 3,000 training images also the four nearby "
        "values (near_signal)",
        data=PresetData("cifar10"),
        few_images=FewImages(3000, dict(near_signal=True)),
    ),
    "tiny": Preset(
        dict(
            image_shape=(1, 8, 8),
            attention="local_1d",
            num_layers=2,
            d_model=32,
            num_heads=2,
            ffn_size=64,
            dropout=0.0,
            block_length=16,
            norm_first=True,
        ),
        dict(
            batch_size=8,
            learning_rate=0.5,
            warmup_steps=20,
            max_steps=100,
            eval_every=50,
            checkpoint_every=50,
        ),
        "a toy for tests and smoke runs (8x8 grayscale)",
        data=PresetData("mnist5k", image_size=8),
    ),
}

DEFAULT_PRESET = "mnist_1d"


def preset_data(name: str) -> str:
    """The default data set of preset `name`."""
    return preset_data_options(name).name


def preset_data_options(name: str) -> PresetData:
    """The default data set of preset `name` and the conversion that makes it fit."""
    return _lookup(name).data


def presets_for_shape(shape: tuple[int, int, int]) -> list[str]:
    """Presets whose images are `shape` [C, H, W]: the CPU ones first (a size-mismatch hint)."""
    names = [n for n in preset_names() if tuple(PRESETS[n].model["image_shape"]) == tuple(shape)]
    return sorted(names, key=lambda n: (not PRESETS[n].runs_on_cpu, n))[:4]


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _lookup(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return PRESETS[name]


def load_preset(name: str) -> ImageTransformerConfig:
    """The model config of preset `name`."""
    return ImageTransformerConfig(**_lookup(name).model)


def few_images_of(name: str) -> FewImages | None:
    """What preset `name` changes when it trains on few images (None: nothing)."""
    return _lookup(name).few_images


def load_train_preset(name: str) -> TrainConfig:
    """The training recipe of preset `name`."""
    return TrainConfig(**_lookup(name).train)


def describe_presets() -> list[tuple[str, str]]:
    return [(name, PRESETS[name].description) for name in preset_names()]


__all__ = [
    "PRESETS",
    "DEFAULT_PRESET",
    "Preset",
    "PresetData",
    "load_preset",
    "load_train_preset",
    "preset_data",
]
