"""What each page of the playground asks of the model: its parameters checked (a wrong one is
refused in one line that names the range), and the sampler call a job runs, made as the
`sample`, `complete` and `upscale` verbs make theirs, so a seed gives the same images here as
there."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..defaults import BY_VERB, COMPLETE, SEED
from ..errors import UserError
from ..model import ImageTransformer
from ..sampling import check_guidance, default_guidance, sample_labels
from .generation import Generation

MAX_N = 64
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 20.0  # the largest classifier-free guidance weight a page may ask for
# n and temperature (and keep) of each page when not given: its command-line verb's defaults
DEFAULTS = {verb: draws.as_dict() for verb, draws in BY_VERB.items()}


def pages(model: ImageTransformer) -> list[str]:
    """The pages that apply: a super-resolution model draws images for a low-resolution input
    only, so it upscales (and completes) instead of sampling."""
    if model.config.task == "superres":
        return ["upscale", "complete"]
    return ["sample", "complete"]


def check_page(model: ImageTransformer, name: str) -> None:
    """Refuse an unknown page, or one that does not apply to the model, naming the one that
    does."""
    if name not in DEFAULTS:
        raise UserError(f"page must be sample, complete or upscale, got {name!r}")
    if name == "sample" and model.config.task == "superres":
        raise UserError(
            "this super-resolution model draws images for a low-resolution input: upscale one "
            "(page=upscale)"
        )
    if name == "upscale" and model.config.task != "superres":
        raise UserError(
            f"this model does not upscale (task={model.config.task}); train one with --task "
            "superres"
        )


def integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """Whole number `name` of the query, `default` when not given, refused outside low..high."""
    text = params.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"{name} must be a whole number from {low} to {high}, got {_shown(text)}")
    return value


def number(
    params: Mapping[str, str], name: str, default: float, low: float, high: float = math.inf
) -> float:
    """Finite number `name` of the query, `default` when not given, refused outside low..high."""
    text = params.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        within = f"at least {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
        raise UserError(f"{name} must be a number {within}, got {_shown(text)}")
    return value


@dataclass(frozen=True)
class Draws:
    """How many images to draw, how and from which seed."""

    n: int
    temperature: float
    seed: int

    @classmethod
    def parse(cls, params: Mapping[str, str], page: str) -> Draws:
        defaults = DEFAULTS[page]
        return cls(
            n=integer(params, "n", defaults["n"], 1, MAX_N),
            temperature=number(params, "temperature", defaults["temperature"], 0.0),
            seed=integer(params, "seed", SEED, 0, MAX_SEED),
        )

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def chosen_class(params: Mapping[str, str], model: ImageTransformer) -> int | None:
    """The class asked for (`label`), None when not given; refused for an unconditional
    model or out of range."""
    k = model.config.num_classes
    if not params.get("label", "").strip():
        return None
    if k == 0:
        raise UserError("a class was given but this model is unconditional (num_classes=0)")
    return integer(params, "label", 0, 0, k - 1)


def guidance_of(params: Mapping[str, str], model: ImageTransformer) -> float:
    """The classifier-free guidance weight asked for (`guidance`), else the one the verbs use
    for this model; refused for a model without a "no class" label."""
    guidance = number(params, "guidance", default_guidance(model), 0.0, MAX_GUIDANCE)
    check_guidance(model, guidance)
    return guidance


def sample(model: ImageTransformer, params: Mapping[str, str]) -> Generation:
    """`imagetransformer sample`: n images; a conditional model draws the asked class, or
    every class in turn."""
    draws = Draws.parse(params, "sample")
    device = _device(model)
    labels = sample_labels(model.config.num_classes, draws.n, chosen_class(params, model), device)
    guidance = guidance_of(params, model)

    def draw(on_step) -> torch.Tensor:
        return model.sample(
            draws.n,
            temperature=draws.temperature,
            labels=labels,
            generator=draws.generator(device),
            on_step=on_step,
            guidance=guidance,
        )

    return Generation(model, draw)


def complete(
    model: ImageTransformer,
    params: Mapping[str, str],
    image: torch.Tensor,
    label: int | None,
) -> Generation:
    """`imagetransformer complete`: n completions of `image` [C, H, W], keeping the first
    `keep` of it; a conditional model takes the asked class, else `label` (the image's own)."""
    draws = Draws.parse(params, "complete")
    keep = model.keep_positions(number(params, "keep", COMPLETE.keep, 0.0, 1.0))
    asked = chosen_class(params, model)
    label = label if asked is None else asked
    if model.config.num_classes and label is None:
        raise UserError("this model is class-conditional: pick the class of the uploaded image")
    device = _device(model)
    labels = sample_labels(model.config.num_classes, draws.n, label, device)
    repeated = image[None].repeat_interleave(draws.n, dim=0).to(device)
    guidance = guidance_of(params, model)

    def draw(on_step) -> torch.Tensor:
        return model.complete(
            repeated,
            keep,
            temperature=draws.temperature,
            labels=labels,
            generator=draws.generator(device),
            on_step=on_step,
            guidance=guidance,
        )

    return Generation(model, draw)


def upscale(
    model: ImageTransformer, params: Mapping[str, str], low_res: torch.Tensor
) -> Generation:
    """`imagetransformer upscale`: n high-resolution samples for `low_res` [C, h, w]."""
    draws = Draws.parse(params, "upscale")
    device = _device(model)
    repeated = low_res[None].repeat_interleave(draws.n, dim=0).to(device)

    def draw(on_step) -> torch.Tensor:
        return model.upscale(
            repeated,
            temperature=draws.temperature,
            generator=draws.generator(device),
            on_step=on_step,
        )

    return Generation(model, draw)


def _device(model: ImageTransformer) -> torch.device:
    return model.head.weight.device


def _shown(text: str, limit: int = 24) -> str:
    """A given value quoted in a message, cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


__all__ = [
    "DEFAULTS",
    "MAX_N",
    "Draws",
    "check_page",
    "complete",
    "pages",
    "sample",
    "upscale",
]
