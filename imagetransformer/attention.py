"""One attention module with interchangeable backends that compute the same function.

Backends read the rule from an `AttentionPattern`; none re-derives it:
- `dense`: full attention under the [N, N] mask, the reference (quadratic).
- `blocked`: per query block, gather only the keys the rule can admit, attend, scatter back:
  cost N x (block + memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .pattern import AttentionPattern

_DEVICE_CACHE: dict[tuple, object] = {}


def _on_device(pattern: AttentionPattern, form: str, device: torch.device, dtype=torch.float32):
    """Pattern tensors moved to `device` once and reused (patterns are shared and immutable)."""
    key = (id(pattern), form, device, dtype)
    if key not in _DEVICE_CACHE:
        if form == "dense":
            value = pattern.dense_mask().to(device)
        elif form == "cache_slots":
            key_index, mask = pattern.blocked_layout
            value = ((key_index % pattern.cache_span).to(device), mask.to(device))
        elif form == "banded":
            offset, width, mask = pattern.banded_layout
            value = (offset, width, _additive(mask, dtype).to(device))
        else:
            key_index, mask = pattern.blocked_layout
            value = (key_index.to(device), _additive(mask, dtype).to(device))
        _DEVICE_CACHE[key] = value
    return _DEVICE_CACHE[key]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive bias (0 where allowed, -inf where not)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))


def _attend(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh) + bias) v, with k given transposed ([..., dh, K]).

    Written out rather than through SDPA: with an arbitrary mask SDPA takes its math path on
    the CPU anyway, and this form was ~20% faster there (benchmarks/).
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k_t) + bias
    return torch.matmul(scores.softmax(dim=-1), v)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern
) -> torch.Tensor:
    """q, k, v: [B, h, N, dh] in generation order."""
    mask = _on_device(pattern, "dense", q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern
) -> torch.Tensor:
    """Same function as `dense_attention`, computing only the keys each query block can see.

    When the keys of every block form one run of steps (local_1d) they are read as a strided
    window; otherwise (local_2d, whose flanges skip columns) they are gathered by index.
    """
    n, q_block = q.shape[2], pattern.query_block
    num_blocks = -(-n // q_block)
    pad_end = num_blocks * q_block - n
    qb = rearrange(F.pad(q, (0, 0, 0, pad_end)), "b h (nb q) d -> b h nb q d", q=q_block)
    if pattern.banded_layout is not None:
        offset, width, bias = _on_device(pattern, "banded", q.device, q.dtype)
        # windows of `width` steps every `q_block` steps: [B, h, nb, dh, width], no copy
        k_t = F.pad(k, (0, 0, offset, pad_end)).unfold(2, width, q_block)
        v_b = F.pad(v, (0, 0, offset, pad_end)).unfold(2, width, q_block).transpose(-1, -2)
    else:
        key_index, bias = _on_device(pattern, "blocked", q.device, q.dtype)
        k_t = k[:, :, key_index].transpose(-1, -2)
        v_b = v[:, :, key_index]
    out = _attend(qb, k_t, v_b, bias)
    return rearrange(out, "b h nb q d -> b h (nb q) d")[:, :, :n]


BACKENDS = {"dense": dense_attention, "blocked": blocked_attention}


def resolve_backend(name: str, pattern: AttentionPattern) -> str:
    """`auto`: `dense` for global attention (nothing to skip), `blocked` for local attention."""
    if name != "auto":
        return name
    return "dense" if pattern.kind == "global" else "blocked"


class KVCache:
    """Keys and values of the last `span` generation steps, in a ring (slot = step % span).

    `span` is the pattern's `cache_span`: no step reads a key older than that, so memory and
    per-step cost follow the attention's reach (block + memory), not the image size.
    """

    def __init__(self, batch: int, heads: int, span: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, span, head_dim)
        self.span = span
        self.keys = like.new_zeros(shape)
        self.values = like.new_zeros(shape)


class Attention(nn.Module):
    """Multi-head self-attention (no biases, scale (d/h)^-0.5) under an `AttentionPattern`."""

    def __init__(self, d_model: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.backend = backend
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def forward(
        self, x: torch.Tensor, pattern: AttentionPattern, backend: str | None = None
    ) -> torch.Tensor:
        """x: [B, N, d] in generation order."""
        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        name = resolve_backend(backend or self.backend, pattern)
        out = BACKENDS[name](q, k, v, pattern)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))

    def new_cache(self, batch: int, pattern: AttentionPattern, like: torch.Tensor) -> KVCache:
        return KVCache(batch, self.num_heads, pattern.cache_span, self.head_dim, like)

    def step(
        self, x: torch.Tensor, step: int, pattern: AttentionPattern, cache: KVCache
    ) -> torch.Tensor:
        """One generation step: x [B, 1, d] at `step`; reads only the keys the rule admits."""
        q, k, v = (self._heads(proj(x)) for proj in (self.query, self.key, self.value))
        slot = step % cache.span
        cache.keys[:, :, slot] = k[:, :, 0]
        cache.values[:, :, slot] = v[:, :, 0]
        slots, masks = _on_device(pattern, "cache_slots", x.device)
        block, offset = divmod(step, pattern.query_block)
        keys, values = cache.keys[:, :, slots[block]], cache.values[:, :, slots[block]]
        mask = masks[block, offset][None, :]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))
