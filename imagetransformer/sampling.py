"""Sampling in generation order (SPEC.md section 6).

`sample` is the cached sampler: one position per step through every layer, keys and values kept
in a per-layer cache, each step reading only the keys its pattern admits. `sample_reference`
re-runs the whole network on the partial image at every step, as tensor2tensor does; it exists
so tests can check that both give the same images.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .outputs import Categorical

draw = Categorical.draw  # one intensity per row of categorical logits [B, 256]


def _prepare(model, n: int, labels, prefix: torch.Tensor | None, keep: int, low_res, filtering):
    device = model.head.weight.device
    if model.config.per_pixel and filtering:
        raise UserError("top-k / nucleus filtering applies to the categorical output only")
    labels = model.check_labels(labels, n)
    low_res = model.check_low_res(low_res, None, n)
    dist = model.distribution
    n_pos = model.config.num_positions
    per_position = (model.config.image_shape[0],) if model.config.per_pixel else ()
    values = torch.zeros(n, n_pos, *per_position, dtype=torch.long, device=device)
    if keep:
        if prefix is None:
            raise UserError("keep > 0 needs the prefix images whose first steps are kept")
        given = model.check_images(prefix.to(device))
        if given.shape[0] != n:
            raise UserError(f"prefix holds {given.shape[0]} images, expected {n}")
        values[:, :keep] = dist.to_sequence(given)[:, model.generation_order[:keep]]
    return labels, low_res, values


def _finish(model, values: torch.Tensor) -> torch.Tensor:
    return model.distribution.to_images(values[:, model._inverse_order]).to(torch.uint8)


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
    low_res: torch.Tensor | None = None,
):
    """Cached sampling of `n` images; the first `keep` generation steps are copied from `prefix`.

    Returns uint8 images [n, C, H, W] (and the [n, N, P] head outputs in generation order when
    `return_logits`, for tests). A super-resolution model runs its encoder once on `low_res`;
    each block's encoder-decoder keys and values are computed once too.
    """
    was_training = model.training
    model.eval()
    labels, low_res, values = _prepare(
        model, n, labels, prefix, keep, low_res, top_k > 0 or top_p < 1.0
    )
    n_pos = values.shape[1]
    like = model.head.weight
    caches = [block.attn.new_cache(n, model.pattern, like) for block in model.blocks]
    if model.encoder is not None:
        memory = model.encoder(low_res)
        memory_kvs = [block.cross_attn.memory_keys_values(memory) for block in model.blocks]
    else:
        memory_kvs = [None] * len(model.blocks)
    position = model._position_signal()
    conditioning = model._conditioning(labels)
    all_logits = like.new_zeros(n, n_pos, like.shape[0]) if return_logits else None
    x = like.new_zeros(n, 1, model.config.d_model)
    for step in tqdm(range(n_pos), desc="sampling", disable=not progress, leave=False):
        if step > 0:
            prev = torch.full((n, 1), step - 1, device=values.device)
            x = model._embed_steps(values[:, step - 1 : step], prev)
        h = x + position[step] + conditioning
        for block, cache, memory_kv in zip(model.blocks, caches, memory_kvs, strict=True):
            h = block.step(h, step, model.pattern, cache, memory_kv)
        logits = model.head(model.final_norm(h))[:, 0]
        if return_logits:
            all_logits[:, step] = logits
        if step >= keep:
            values[:, step] = model.distribution.draw(logits, temperature, generator, top_k, top_p)
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
    low_res: torch.Tensor | None = None,
):
    """The re-running sampler: the full network on the partial image at every step (slow)."""
    was_training = model.training
    model.eval()
    labels, low_res, values = _prepare(
        model, n, labels, prefix, keep, low_res, top_k > 0 or top_p < 1.0
    )
    n_pos = values.shape[1]
    like = model.head.weight
    all_logits = like.new_zeros(n, n_pos, like.shape[0]) if return_logits else None
    # kept steps need a forward pass only when their logits are asked for
    for step in range(0 if return_logits else keep, n_pos):
        images = _finish(model, values)
        logits = model.logits_in_generation_order(images, labels, low_res=low_res)[:, step]
        if return_logits:
            all_logits[:, step] = logits
        if step >= keep:
            values[:, step] = model.distribution.draw(logits, temperature, generator, top_k, top_p)
    model.train(was_training)
    images = _finish(model, values)
    return (images, all_logits) if return_logits else images
