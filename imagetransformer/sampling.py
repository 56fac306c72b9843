"""Sampling in generation order (docs/model.md, "Sampling"), built on the model's public
decoding step only.

`sample` is the cached sampler: `model.start_decoding` then one `model.decode_step` per
generation step, each reading only the keys its pattern admits from a per-layer ring buffer.
`sample_reference` re-runs the whole network on the partial image at every step, as
tensor2tensor does; it exists so tests can check that both give the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .defaults import GUIDANCE
from .errors import UserError

if TYPE_CHECKING:
    from .model import ImageTransformer


def _prepare(
    model: ImageTransformer,
    n: int,
    prefix: torch.Tensor | None,
    keep: int,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Values [n, N, *value_shape] in generation order, the first `keep` steps from `prefix`."""
    model.distribution.check_sampling(top_k, top_p)
    device = model.head.weight.device
    shape = (n, model.config.num_positions, *model.distribution.value_shape)
    values = torch.zeros(shape, dtype=torch.long, device=device)
    if keep:
        if prefix is None:
            raise UserError("keep > 0 needs the prefix images whose first steps are kept")
        given = model.to_steps(prefix.to(device))
        if given.shape[0] != n:
            raise UserError(f"prefix holds {given.shape[0]} images, expected {n}")
        values[:, :keep] = given[:, :keep]
    return values


def sample(
    model: ImageTransformer,
    n: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    keep: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_logits: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    low_res: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    guidance: float = 0.0,
):
    """Cached sampling of `n` images; the first `keep` generation steps are copied from `prefix`.

    Returns uint8 images [n, C, H, W] (and the [n, N, P] head outputs in generation order when
    `return_logits`, for tests). A super-resolution model runs its encoder once on `low_res`.
    `on_step(steps_done, values)` is called after every step with the values so far in
    generation order (`model.from_steps` makes images of them): how a caller watches the image
    grow, or stops the sampler by raising. `guidance` w > 0 (models trained with
    `class_dropout`) draws every step from p(v | y)^(1+w) / p(v)^w, decoding each image twice,
    with its label and with "no class" (classifier-free guidance).
    """
    with model.evaluating():
        values = _prepare(model, n, prefix, keep, top_k, top_p)
        copies = 1
        if guidance:
            labels, low_res = _guided_inputs(model, n, labels, low_res, guidance)
            copies = 2
        state = model.start_decoding(copies * n, labels, low_res)
        n_pos = values.shape[1]
        all_logits = None
        for step in tqdm(range(n_pos), desc="sampling", disable=not progress, leave=False):
            previous = values[:, step - 1] if step > 0 else None
            if previous is not None and guidance:  # both copies are fed the same value
                previous = torch.cat([previous, previous])
            logits = model.decode_step(state, step, previous)
            if guidance:
                logits = model.distribution.guide(logits[:n], logits[n:], guidance)
            if return_logits:
                if all_logits is None:
                    all_logits = logits.new_zeros(n, n_pos, logits.shape[-1])
                all_logits[:, step] = logits
            if step >= keep:
                values[:, step] = model.distribution.draw(
                    logits, temperature, generator, top_k, top_p
                )
            if on_step is not None:
                on_step(step + 1, values)
        images = model.from_steps(values)
    return (images, all_logits) if return_logits else images


def can_guide(model: ImageTransformer) -> bool:
    """Whether classifier-free guidance applies: a model trained with class_dropout (it has a
    "no class" label) whose output can be guided (the categorical one)."""
    return model.null_label is not None and model.distribution.supports_guidance


def default_guidance(model: ImageTransformer) -> float:
    """The guidance `sample` uses unless told: `defaults.GUIDANCE` where guidance applies
    (`can_guide`), 0 for any other model."""
    return GUIDANCE if can_guide(model) else 0.0


def check_guidance(model: ImageTransformer, guidance: float) -> None:
    """Refuse a guidance weight below 0, or above 0 for a model without a "no class" label."""
    if guidance < 0:
        raise UserError(f"guidance must be >= 0 (0: off), got {guidance}")
    if guidance and model.null_label is None:
        raise UserError(
            "guidance needs a class-conditional model trained with class_dropout > 0 "
            "(--set class_dropout=0.1)"
        )
    if guidance and not model.distribution.supports_guidance:
        raise UserError(
            f"guidance applies to the categorical output only, not {model.distribution.name}: "
            "use --guidance 0"
        )


def _guided_inputs(
    model: ImageTransformer,
    n: int,
    labels: torch.Tensor | None,
    low_res: torch.Tensor | None,
    guidance: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The labels and low-resolution inputs of the 2n images a guided sampler decodes: the n
    given labels, then n times "no class"."""
    check_guidance(model, guidance)
    labels = model.check_labels(labels, n)
    labels = torch.cat([labels, torch.full_like(labels, model.null_label)])
    if low_res is not None:
        low_res = torch.cat([low_res, low_res])
    return labels, low_res


def sample_reference(
    model: ImageTransformer,
    n: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    keep: int = 0,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    low_res: torch.Tensor | None = None,
):
    """The re-running sampler: the full network on the partial image at every step (slow)."""
    with model.evaluating():
        values = _prepare(model, n, prefix, keep, top_k, top_p)
        labels = model.check_labels(labels, n)
        low_res = model.check_low_res(low_res, None, n)
        n_pos = values.shape[1]
        like = model.head.weight
        all_logits = like.new_zeros(n, n_pos, like.shape[0]) if return_logits else None
        # kept steps need a forward pass only when their logits are asked for
        for step in range(0 if return_logits else keep, n_pos):
            images = model.from_steps(values)
            logits = model.logits_in_generation_order(images, labels, low_res=low_res)[:, step]
            if return_logits:
                all_logits[:, step] = logits
            if step >= keep:
                values[:, step] = model.distribution.draw(
                    logits, temperature, generator, top_k, top_p
                )
        images = model.from_steps(values)
    return (images, all_logits) if return_logits else images


def sample_labels(
    num_classes: int, n: int, label: int | None, where: torch.device
) -> torch.Tensor | None:
    """The classes of `n` samples: none for an unconditional model, else `label` for all of
    them or, when it is None, every class in turn."""
    if not num_classes:
        return None
    if label is None:
        return torch.arange(n, device=where) % num_classes
    return torch.full((n,), label, device=where)
