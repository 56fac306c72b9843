"""Named configs: the paper's (SPEC.md section 7) and small ones that train on a CPU in minutes.

A preset is a model config plus the training recipe that goes with it.
"""

from __future__ import annotations

from .config import ImageTransformerConfig, TrainConfig
from .errors import UserError

_CIFAR = (3, 32, 32)
_PAPER_1D = dict(image_shape=_CIFAR, attention="local_1d", ffn_size=2048, d_model=512)

# name: (model config kwargs, train config kwargs, one-line description)
PRESETS: dict[str, tuple[dict, dict, str]] = {
    "cifar10_1d": (
        dict(_PAPER_1D, num_layers=12, num_heads=4, dropout=0.3, block_length=256),
        dict(batch_size=4, learning_rate=0.5, warmup_steps=4000, max_steps=500_000),
        "paper: CIFAR-10, local 1D, 12 layers (imagetransformer_cifar10_base)",
    ),
    "cifar10_2d": (
        dict(
            _PAPER_1D,
            attention="local_2d",
            num_layers=8,
            num_heads=8,
            dropout=0.3,
            query_shape=(8, 16),
            memory_flange=(8, 32),
        ),
        dict(batch_size=4, learning_rate=0.1, warmup_steps=4000, max_steps=500_000),
        "CIFAR-10, local 2D, 8 layers, the reference's q3 block sizes",
    ),
    "cifar10_cond": (
        dict(_PAPER_1D, num_layers=8, num_heads=8, dropout=0.3, block_length=256, num_classes=10),
        dict(batch_size=4, learning_rate=0.1, warmup_steps=4000, max_steps=500_000),
        "paper: CIFAR-10 class-conditional, local 1D, 8 layers",
    ),
    "imagenet32_1d": (
        dict(_PAPER_1D, num_layers=12, num_heads=4, dropout=0.1, block_length=256),
        dict(batch_size=4, learning_rate=0.5, warmup_steps=4000, max_steps=1_000_000),
        "paper: ImageNet 32x32, local 1D, 12 layers (imagetransformer_imagenet32_base)",
    ),
    "imagenet64_1d": (
        dict(
            _PAPER_1D,
            image_shape=(3, 64, 64),
            num_layers=8,
            num_heads=8,
            dropout=0.1,
            block_length=512,
        ),
        dict(batch_size=1, learning_rate=0.1, warmup_steps=4000, max_steps=1_000_000),
        "paper: ImageNet 64x64, local 1D, 8 layers (imagetransformer1d_base_8l_64by64)",
    ),
    "mnist_1d": (
        dict(
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
        ),
        dict(
            batch_size=8,
            learning_rate=0.08,
            warmup_steps=300,
            max_steps=2000,
            lr_schedule="cosine",
            eval_every=600,
            checkpoint_every=300,
        ),
        "CPU default: mnist5k, local 1D (2-row blocks + 2-row memory), 4 layers d=64, "
        "~10 min on 2 cores",
    ),
    "mnist_2d": (
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
    "tiny": (
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
    ),
}

DEFAULT_PRESET = "mnist_1d"


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _lookup(name: str) -> tuple[dict, dict, str]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return PRESETS[name]


def load_preset(name: str) -> ImageTransformerConfig:
    """The model config of preset `name`."""
    return ImageTransformerConfig(**_lookup(name)[0])


def load_train_preset(name: str) -> TrainConfig:
    """The training recipe of preset `name`."""
    return TrainConfig(**_lookup(name)[1])


def describe_presets() -> list[tuple[str, str]]:
    return [(name, PRESETS[name][2]) for name in preset_names()]


__all__ = ["PRESETS", "DEFAULT_PRESET", "load_preset", "load_train_preset"]
