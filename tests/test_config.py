"""Model/training configs: JSON round trips, --set overrides, validation messages, presets."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from imagetransformer.config import ImageTransformerConfig, TrainConfig, apply_overrides
from imagetransformer.errors import UserError
from imagetransformer.presets import (
    DEFAULT_PRESET,
    PRESETS,
    load_preset,
    load_train_preset,
    preset_data,
    preset_names,
)

ALL_PRESETS = sorted(PRESETS)


# ---------------------------------------------------------------- JSON round trips


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_model_config_json_round_trip(name: str) -> None:
    config = load_preset(name)
    text = config.to_json()
    json.loads(text)  # plain JSON, no Python reprs
    again = ImageTransformerConfig.from_json(text)
    assert again == config
    assert again.to_json() == text
    for field in ("image_shape", "query_shape", "memory_flange"):
        assert isinstance(getattr(again, field), tuple), field
        assert getattr(again, field) == getattr(config, field)
    assert ImageTransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_train_config_round_trip(name: str) -> None:
    train = load_train_preset(name)
    data = train.to_dict()
    assert TrainConfig.from_dict(data) == train
    assert TrainConfig.from_dict(json.loads(json.dumps(data))) == train


def test_from_dict_refuses_unknown_keys() -> None:
    data = load_preset("tiny").to_dict()
    data["num_layerz"] = 3
    with pytest.raises(UserError, match="num_layerz"):
        ImageTransformerConfig.from_dict(data)
    with pytest.raises(UserError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_class_options_default_to_the_old_model_and_round_trip() -> None:
    """A config saved before class_signal existed loads as the input-only model it was."""
    data = load_preset("mnist_1d_cond").to_dict()
    del data["class_signal"], data["class_init"], data["class_dropout"], data["class_scale"]
    old = ImageTransformerConfig.from_dict(data)
    assert (old.class_signal, old.class_init, old.class_dropout) == ("input", 0.0, 0.0)
    assert old.class_scale == 0.0 and old.class_multiplier == math.sqrt(old.d_model)
    model, train = apply_overrides(*_tiny(), ["num_classes=10", "class_signal=every_block"])
    assert ImageTransformerConfig.from_json(model.to_json()) == model
    assert model.class_signal == "every_block"
    with pytest.raises(UserError, match="num_classes"):
        apply_overrides(*_tiny(), ["class_signal=every_block"])
    with pytest.raises(UserError, match="every_block"):
        apply_overrides(*_tiny(), ["num_classes=10", "class_signal=everywhere"])
    with pytest.raises(UserError, match="class_init"):
        apply_overrides(*_tiny(), ["num_classes=10", "class_init=-1"])
    with pytest.raises(UserError, match="class_scale must be >= 0"):
        apply_overrides(*_tiny(), ["num_classes=10", "class_scale=-1"])
    with pytest.raises(UserError, match="class_dropout must be in"):
        apply_overrides(*_tiny(), ["num_classes=10", "class_dropout=1"])
    with pytest.raises(UserError, match="num_classes"):
        apply_overrides(*_tiny(), ["class_dropout=0.1"])


# ---------------------------------------------------------------- apply_overrides


def _tiny() -> tuple[ImageTransformerConfig, TrainConfig]:
    return load_preset("tiny"), load_train_preset("tiny")


def test_overrides_coerce_types_and_route_keys() -> None:
    model, train = _tiny()
    new_model, new_train = apply_overrides(
        model,
        train,
        [
            "num_layers=3",
            "dropout=0.25",
            "norm_first=false",
            "memory_length=8",
            "learning_rate=1e-3",
            "max_steps=7",
            "lr_schedule=cosine",
        ],
    )
    assert new_model.num_layers == 3 and type(new_model.num_layers) is int
    assert new_model.dropout == 0.25 and type(new_model.dropout) is float
    assert new_model.norm_first is False
    assert new_model.memory_length == 8 and type(new_model.memory_length) is int
    assert new_train.learning_rate == 1e-3 and type(new_train.learning_rate) is float
    assert new_train.max_steps == 7 and type(new_train.max_steps) is int
    assert new_train.lr_schedule == "cosine"
    # Each key went to the dataclass that owns it and nothing else moved.
    assert (
        dataclasses.replace(
            new_model, num_layers=2, dropout=0.0, norm_first=True, memory_length=None
        )
        == model
    )
    assert (
        dataclasses.replace(new_train, learning_rate=0.5, max_steps=100, lr_schedule="noam")
        == train
    )
    # The inputs are not modified.
    assert (model, train) == _tiny()


def test_overrides_bools_tuples_and_none() -> None:
    model, train = _tiny()
    off_model = dataclasses.replace(model, norm_first=False)
    on, _ = apply_overrides(off_model, train, ["norm_first=true"])
    assert on.norm_first is True
    off, _ = apply_overrides(model, train, ["norm_first=False"])
    assert off.norm_first is False

    two_d, _ = apply_overrides(
        model,
        train,
        ["attention=local_2d", "query_shape=4,8", "memory_flange=[2, 4]"],
    )
    assert two_d.attention == "local_2d"
    assert two_d.query_shape == (4, 8) and isinstance(two_d.query_shape, tuple)
    assert two_d.memory_flange == (2, 4) and isinstance(two_d.memory_flange, tuple)

    big, _ = apply_overrides(model, train, ["image_shape=3,16,16"])
    assert big.image_shape == (3, 16, 16) and isinstance(big.image_shape, tuple)

    with_memory = dataclasses.replace(model, memory_length=8)
    cleared, _ = apply_overrides(with_memory, train, ["memory_length=none"])
    assert cleared.memory_length is None
    assert cleared.effective_memory_length == cleared.block_length


def test_override_unknown_key_lists_known_settings() -> None:
    model, train = _tiny()
    with pytest.raises(UserError) as err:
        apply_overrides(model, train, ["num_layer=3"])
    message = str(err.value)
    assert "num_layer" in message and "num_layers" in message and "max_steps" in message


@pytest.mark.parametrize(
    "override",
    [
        "num_layers=abc",
        "num_layers=2.5",
        "dropout=lots",
        "norm_first=maybe",
        "query_shape=a,b",
        "max_steps=ten",
        "learning_rate=fast",
        "num_layers",  # no '='
    ],
)
def test_override_bad_value_is_a_user_error(override: str) -> None:
    model, train = _tiny()
    key = override.split("=")[0]
    with pytest.raises(UserError, match=re.escape(key)):
        apply_overrides(model, train, [override])


@pytest.mark.parametrize(
    "override", ["num_layers=none", "dropout=null", "max_steps=none", "attention=none"]
)
def test_none_is_refused_for_fields_that_are_not_optional(override: str) -> None:
    """Only memory_length may be None; elsewhere `none` must be a UserError, not a TypeError."""
    model, train = _tiny()
    with pytest.raises(UserError):
        apply_overrides(model, train, [override])


def test_override_that_breaks_validation_is_a_user_error() -> None:
    model, train = _tiny()
    with pytest.raises(UserError, match="num_heads"):
        apply_overrides(model, train, ["num_heads=3"])  # d_model 32
    with pytest.raises(UserError, match="learning_rate"):
        apply_overrides(model, train, ["learning_rate=0"])


# ---------------------------------------------------------------- validation messages


def _config(**changes) -> ImageTransformerConfig:
    base = dict(load_preset("tiny").to_dict())
    base.update(changes)
    return ImageTransformerConfig(**base)


def test_d_model_not_divisible_by_heads() -> None:
    with pytest.raises(UserError) as err:
        _config(d_model=36, num_heads=8)
    message = str(err.value)
    assert "d_model (36)" in message and "num_heads (8)" in message and "change" in message


def test_timing_signal_needs_d_model_multiple_of_4() -> None:
    with pytest.raises(UserError) as err:
        _config(d_model=18, num_heads=2, pos="timing")
    assert "divisible by 4" in str(err.value) and "pos=learned" in str(err.value)
    assert _config(d_model=18, num_heads=2, pos="learned").d_model == 18  # the fix it names


def test_unknown_attention_type_lists_choices() -> None:
    with pytest.raises(UserError) as err:
        _config(attention="sparse")
    message = str(err.value)
    assert "sparse" in message
    for choice in ("global", "local_1d", "local_2d"):
        assert choice in message


@pytest.mark.parametrize(
    "image_shape, query_shape",
    [((1, 8, 8), (3, 3)), ((3, 8, 8), (8, 16)), ((1, 28, 28), (8, 16))],
)
def test_local_2d_query_shape_must_tile_and_the_suggestion_works(image_shape, query_shape) -> None:
    with pytest.raises(UserError) as err:
        _config(
            image_shape=image_shape,
            attention="local_2d",
            query_shape=query_shape,
            memory_flange=(1, 1),
        )
    message = str(err.value)
    assert "query_shape" in message
    suggestion = re.search(r"--set query_shape=(\d+),(\d+)", message)
    assert suggestion, message
    suggested = (int(suggestion.group(1)), int(suggestion.group(2)))
    fixed = _config(
        image_shape=image_shape, attention="local_2d", query_shape=suggested, memory_flange=(1, 1)
    )
    rows, cols = fixed.grid_shape
    assert rows % suggested[0] == 0 and cols % suggested[1] == 0


@pytest.mark.parametrize("image_shape", [(2, 8, 8), (4, 8, 8), (0, 8, 8)])
def test_channels_must_be_1_or_3(image_shape) -> None:
    with pytest.raises(UserError) as err:
        _config(image_shape=image_shape)
    assert "C = 1 or 3" in str(err.value) and "image_shape=" in str(err.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(dropout: float) -> None:
    with pytest.raises(UserError, match=r"dropout must be in \[0, 1\)"):
        _config(dropout=dropout)


def test_train_config_checks() -> None:
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    with pytest.raises(UserError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(UserError, match="weight_decay"):
        TrainConfig(weight_decay=-0.1)


# ---------------------------------------------------------------- presets (docs/model.md, Presets)

# name: image_shape, attention, L, d, F, h, dropout, blocks, batch, lr base, warm-up, classes
PAPER_TABLE = {
    "cifar10_1d": ((3, 32, 32), "local_1d", 12, 512, 2048, 4, 0.3, 256, 4, 0.5, 4000, 0),
    "cifar10_2d": (
        (3, 32, 32),
        "local_2d",
        8,
        512,
        2048,
        8,
        0.3,
        ((8, 16), (8, 32)),
        4,
        0.1,
        4000,
        0,
    ),
    "cifar10_cond": ((3, 32, 32), "local_1d", 8, 512, 2048, 8, 0.3, 256, 4, 0.1, 4000, 10),
    "imagenet32_1d": ((3, 32, 32), "local_1d", 12, 512, 2048, 4, 0.1, 256, 4, 0.5, 4000, 0),
    "imagenet64_1d": ((3, 64, 64), "local_1d", 8, 512, 2048, 8, 0.1, 512, 1, 0.1, 4000, 0),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_presets_match_spec_table(name: str) -> None:
    shape, attention, layers, d, f, h, dropout, blocks, batch, lr, warmup, classes = PAPER_TABLE[
        name
    ]
    config, train = load_preset(name), load_train_preset(name)
    assert config.image_shape == shape
    assert config.attention == attention
    assert (config.num_layers, config.d_model, config.ffn_size, config.num_heads) == (
        layers,
        d,
        f,
        h,
    )
    assert config.dropout == pytest.approx(dropout)
    if attention == "local_2d":
        assert (config.query_shape, config.memory_flange) == blocks
    else:
        assert config.block_length == blocks
        assert config.effective_memory_length == blocks
    assert config.num_classes == classes
    assert config.output == "cat"
    assert train.batch_size == batch
    assert train.learning_rate == pytest.approx(lr)
    assert train.warmup_steps == warmup


def test_cpu_presets_exist_and_are_small() -> None:
    for name, shape in (("mnist_1d", (1, 28, 28)), ("mnist_2d", (1, 28, 28)), ("tiny", (1, 8, 8))):
        config = load_preset(name)
        assert config.image_shape == shape
        assert config.d_model <= 64
    assert load_preset("mnist_2d").attention == "local_2d"
    assert DEFAULT_PRESET in PRESETS
    assert set(PAPER_TABLE) | {"mnist_1d", "mnist_2d", "tiny"} <= set(preset_names())


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(UserError) as err:
        load_preset("cifar100_1d")
    assert "cifar100_1d" in str(err.value)
    for name in ALL_PRESETS:
        assert name in str(err.value)
    with pytest.raises(UserError):
        load_train_preset("cifar100_1d")


# ---------------------------------------------------------------- the issue-5 presets and settings


@pytest.mark.parametrize(
    "name, attention, blocks",
    [
        ("celeba_sr_2d", "local_2d", ((8, 16), (8, 32))),
        ("celeba_sr_1d", "local_1d", 128),
        ("cifar10_sr_2d", "local_2d", ((8, 16), (8, 32))),
        ("cifar10_sr_1d", "local_1d", 128),
    ],
)
def test_superres_presets_match_spec_table(name, attention, blocks) -> None:
    config, train = load_preset(name), load_train_preset(name)
    assert (config.task, config.scale, config.encoder_layers) == ("superres", 4, 4)
    assert config.image_shape == (3, 32, 32) and config.low_res_shape == (3, 8, 8)
    assert config.attention == attention
    shape = (config.num_layers, config.d_model, config.ffn_size, config.num_heads)
    assert shape == (8, 512, 2048, 8) and config.dropout == pytest.approx(0.1)
    if attention == "local_2d":
        assert (config.query_shape, config.memory_flange) == blocks
    else:
        assert config.block_length == blocks
    assert (train.batch_size, train.learning_rate, train.warmup_steps) == (2, 0.2, 12000)
    assert preset_data(name) == name.split("_")[0]


def test_dmol_preset_matches_spec_table() -> None:
    config, train = load_preset("cifar10_1d_dmol"), load_train_preset("cifar10_1d_dmol")
    assert (config.output, config.num_mixtures, config.pos) == ("dmol", 10, "learned")
    assert config.num_positions == 1024 and config.grid_shape == (32, 32)
    shape = (config.num_layers, config.d_model, config.ffn_size, config.num_heads)
    assert shape == (12, 256, 512, 8) and config.dropout == pytest.approx(0.1)
    assert (config.attention, config.block_length) == ("local_1d", 256)
    assert (train.batch_size, train.learning_rate, train.warmup_steps) == (8, 0.1, 4000)


def test_preset_data_defaults() -> None:
    assert preset_data("mnist_1d") == preset_data("tiny") == "mnist5k"
    assert preset_data("cifar10_1d") == "cifar10" and preset_data("imagenet64_1d") == "imagenet64"


def test_dmol_and_superres_checks_name_the_fix() -> None:
    with pytest.raises(UserError, match="width: one position per pixel"):
        ImageTransformerConfig(
            image_shape=(3, 8, 8), output="dmol", attention="local_2d", query_shape=(3, 3)
        )
    with pytest.raises(UserError, match="scale=4"):
        ImageTransformerConfig(image_shape=(1, 28, 28), task="superres", scale=5)
    with pytest.raises(UserError, match="not on classes"):
        ImageTransformerConfig(task="superres", num_classes=10)
    with pytest.raises(UserError, match="encoder_layers"):
        ImageTransformerConfig(task="superres", encoder_layers=0)
    with pytest.raises(UserError, match="num_mixtures"):
        ImageTransformerConfig(output="dmol", num_mixtures=0)
    with pytest.raises(UserError, match="task"):
        ImageTransformerConfig(task="denoise")


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_presets_do_not_clip_gradients_like_the_reference(name: str) -> None:
    assert load_train_preset(name).grad_clip == 0.0
