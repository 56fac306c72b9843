"""Sampling in generation order (SPEC.md section 6).

`sample` is the cached sampler: one position per step through every layer, keys and values kept
in a per-layer cache, each step reading only the keys its pattern admits. `sample_reference`
re-runs the whole network on the partial image at every step, as tensor2tensor does; it exists
so tests can check that both give the same images.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .layout import images_to_raster, raster_to_images


def draw(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """One intensity per row of `logits` [B, 256]; temperature 0 means argmax.

    `top_k` keeps the k most likely values, `top_p` the smallest set whose probability reaches
    p (nucleus sampling); the rest get probability 0 before renormalising. 0 and 1.0: off.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _prepare(model, n: int, labels, prefix: torch.Tensor | None, keep: int):
    device = model.head.weight.device
    labels = model.check_labels(labels, n)
    n_pos = model.config.num_positions
    values = torch.zeros(n, n_pos, dtype=torch.long, device=device)
    if keep:
        given = model.check_images(prefix.to(device))
        if given.shape[0] != n:
            raise ValueError(f"prefix holds {given.shape[0]} images, expected {n}")
        values[:, :keep] = images_to_raster(given)[:, model.generation_order[:keep]]
    return labels, values


def _finish(model, values: torch.Tensor) -> torch.Tensor:
    raster = values[:, model._inverse_order]
    return raster_to_images(raster, model.config.image_shape).to(torch.uint8)


@torch.no_grad()
def sample(
    model,
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
):
    """Cached sampling of `n` images; the first `keep` generation steps are copied from `prefix`.

    Returns uint8 images [n, C, H, W] (and the [n, N, 256] logits in generation order when
    `return_logits`, for tests).
    """
    was_training = model.training
    model.eval()
    labels, values = _prepare(model, n, labels, prefix, keep)
    n_pos = values.shape[1]
    like = model.head.weight
    caches = [block.attn.new_cache(n, model.pattern, like) for block in model.blocks]
    position = model._position_signal()
    conditioning = model._conditioning(labels)
    all_logits = like.new_zeros(n, n_pos, 256) if return_logits else None
    x = like.new_zeros(n, 1, model.config.d_model)
    for step in tqdm(range(n_pos), desc="sampling", disable=not progress, leave=False):
        if step > 0:
            prev = torch.full((n, 1), step - 1, device=values.device)
            x = model._embed_steps(values[:, step - 1 : step], prev)
        h = x + position[step] + conditioning
        for block, cache in zip(model.blocks, caches, strict=True):
            h = block.step(h, step, model.pattern, cache)
        logits = model.head(model.final_norm(h))[:, 0]
        if return_logits:
            all_logits[:, step] = logits
        if step >= keep:
            values[:, step] = draw(logits, temperature, generator, top_k, top_p)
    model.train(was_training)
    images = _finish(model, values)
    return (images, all_logits) if return_logits else images


@torch.no_grad()
def sample_reference(
    model,
    n: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    keep: int = 0,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """The re-running sampler: the full network on the partial image at every step (slow)."""
    was_training = model.training
    model.eval()
    labels, values = _prepare(model, n, labels, prefix, keep)
    n_pos = values.shape[1]
    all_logits = model.head.weight.new_zeros(n, n_pos, 256) if return_logits else None
    # kept steps need a forward pass only when their logits are asked for
    for step in range(0 if return_logits else keep, n_pos):
        images = _finish(model, values)
        logits = model.logits_in_generation_order(images, labels)[:, step]
        if return_logits:
            all_logits[:, step] = logits
        if step >= keep:
            values[:, step] = draw(logits, temperature, generator, top_k, top_p)
    model.train(was_training)
    images = _finish(model, values)
    return (images, all_logits) if return_logits else images
