"""One attention module with interchangeable backends that compute the same function.

Backends read the rule from an `AttentionPattern`; none re-derives it:
- `dense`: full attention under the [N, N] mask, the reference (quadratic).
- `blocked`: per query block, gather only the keys the rule can admit, attend, scatter back:
  cost N x (block + memory).
- `flex`: torch's `flex_attention` under a BlockMask built from the pattern's `mask_mod`
  (compiled into one fused kernel on CUDA; falls back to `blocked` where it cannot run).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .pattern import AttentionPattern
from .precision import compute_dtype

try:
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError as error:  # torch < 2.5
    _flex_attention = create_block_mask = None
    _FLEX_IMPORT_ERROR = f"torch {torch.__version__} has no flex_attention ({error})"
else:
    _FLEX_IMPORT_ERROR = None

_WARNED: set[str] = set()
_COMPILED_FLEX = None
# flex_attention refuses inputs that require grad on these devices (no backward kernel)
_FLEX_NO_BACKWARD = ("cpu", "mps")
_FLEX_DEVICES = ("cuda", "cpu", "xpu", "hpu", "mps")


def _on_device(pattern: AttentionPattern, form: str, device: torch.device):
    """Pattern tensors moved to `device` once and kept on the (shared, immutable) pattern."""
    cache = pattern.device_forms
    key = (form, device)
    if key not in cache:
        if form == "dense":
            value = pattern.dense_mask().to(device)
        elif form.startswith("step_slots"):  # additive, in the queries' dtype (see `step`)
            allowed = pattern.step_slot_mask.to(device)
            dtype = getattr(torch, form.split(":")[1])
            value = torch.zeros(allowed.shape, dtype=dtype, device=device)
            value.masked_fill_(~allowed, float("-inf"))
        elif form == "flex":
            n = pattern.num_positions
            value = create_block_mask(pattern.mask_mod(device), None, None, n, n, device=device)
        elif form == "banded":
            offset, width, mask = pattern.banded_layout
            value = (offset, width, mask.to(device))
        else:
            key_index, mask = pattern.blocked_layout
            value = (key_index.to(device), mask.to(device))
        cache[key] = value
    return cache[key]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention per query block: q [B, h, nb, Q, dh], k, v [B, h, nb, K, dh], boolean
    mask [nb, Q, K].

    Heads and batch are folded into one leading axis and the mask is given a leading axis of 1:
    in that 4D form PyTorch's fused CPU kernel (flash attention for CPU) accepts the mask, and
    it was ~2x faster than the math path and never holds the scores (benchmarks/).
    """
    b = q.shape[0]
    fold = "b h nb n d -> (b h) nb n d"
    out = F.scaled_dot_product_attention(
        rearrange(q, fold), rearrange(k, fold), rearrange(v, fold), attn_mask=mask[None]
    )
    return rearrange(out, "(b h) nb n d -> b h nb n d", b=b)


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
        offset, width, mask = _on_device(pattern, "banded", q.device)
        k_b, v_b = (_band(x, offset, width, q_block, num_blocks) for x in (k, v))
    else:
        key_index, mask = _on_device(pattern, "blocked", q.device)
        k_b, v_b = k[:, :, key_index], v[:, :, key_index]
    out = _attend(qb, k_b, v_b, mask)
    return rearrange(out, "b h nb q d -> b h (nb q) d")[:, :, :n]


BAND_BLOCKS = 3  # the widest band (in query blocks) built from blocks side by side


def _band(x: torch.Tensor, offset: int, width: int, q_block: int, num_blocks: int):
    """[B, h, nb, width, dh]: block b's window of steps [b*Q - offset, b*Q - offset + width)
    of x [B, h, N, dh] (zeros outside). When offset and width are whole blocks, at most
    `BAND_BLOCKS` of them (local_1d with a memory of one or two blocks), the windows are whole
    blocks side by side: a copy of `width / Q` times x, whose backward is slices and adds.
    Otherwise a strided view (`unfold`), which copies nothing but whose backward scatters:
    wider bands (local_2d's 9 blocks) were slower and held 1.5x the memory as copies
    (benchmarks/RESULTS.md)."""
    if offset % q_block or width % q_block or width > BAND_BLOCKS * q_block:
        pad_end = num_blocks * q_block - x.shape[2]
        windows = F.pad(x, (0, 0, offset, pad_end)).unfold(2, width, q_block)
        return windows.transpose(-1, -2)
    parts = width // q_block
    length = (num_blocks - 1 + parts) * q_block
    padded = F.pad(x, (0, 0, offset, length - offset - x.shape[2]))
    blocks = rearrange(padded, "b h (nb q) d -> b h nb q d", q=q_block)
    return torch.cat([blocks[:, :, j : j + num_blocks] for j in range(parts)], dim=3)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _flex_unavailable(device: torch.device) -> str | None:
    """Why flex_attention cannot run on `device`, or None when it can."""
    if _FLEX_IMPORT_ERROR is not None:
        return _FLEX_IMPORT_ERROR
    if device.type not in _FLEX_DEVICES:
        return f"flex_attention does not support {device.type} tensors"
    return None


def _compiled_flex():
    """`torch.compile(flex_attention)`, created on first use (compiling takes a while)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(_flex_attention)
    return _COMPILED_FLEX


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern
) -> torch.Tensor:
    """Same function as `dense_attention`, through torch's `flex_attention` and a BlockMask.

    The BlockMask comes from `pattern.mask_mod` (i.e. `allowed`), built once per pattern and
    device. On CUDA the call is `torch.compile`d: one fused kernel that skips masked-out
    blocks, forward and backward. Elsewhere it runs eagerly: in torch 2.13 the compiled CPU
    kernel took 10-30 s to build and gave wrong outputs for local_2d masks, and the eager form
    computes the full scores matrix (correct, dense cost).

    Falls back to `blocked` (one warning each) where flex_attention cannot run: torch without
    it, an unsupported device, and gradients on the CPU (or MPS): flex_attention has no
    backward there and refuses inputs that require grad. Under `torch.no_grad()` it runs on
    the CPU.
    """
    reason = _flex_unavailable(q.device)
    if reason is not None:
        _warn_once(f"{reason}; using the blocked backend")
        return blocked_attention(q, k, v, pattern)
    if q.device.type in _FLEX_NO_BACKWARD:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            _warn_once(
                f"flex_attention has no backward on the {q.device.type.upper()}; "
                "using the blocked backend"
            )
            return blocked_attention(q, k, v, pattern)
        q, k, v = q.detach(), k.detach(), v.detach()  # no graph is recorded here anyway
    block_mask = _on_device(pattern, "flex", q.device)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager on purpose (see above): no "use compile" advice
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_attention(q, k, v, block_mask=block_mask)


BACKENDS = {"dense": dense_attention, "blocked": blocked_attention, "flex": flex_attention}


def _prepare_blocked(pattern: AttentionPattern, device: torch.device) -> None:
    _on_device(pattern, "banded" if pattern.banded_layout is not None else "blocked", device)


def prepare_backend(name: str, pattern: AttentionPattern, device: torch.device | str) -> str:
    """Build now, outside any trace, every device form that backend `name` reads on `device`
    (mask, key layout, BlockMask, the compiled flex_attention); returns the resolved name.

    Call it before `torch.compile`: a first trace that builds the forms itself traces the
    pattern's layout loops (graph breaks) and guards on their absence, so the second step
    fails the guard and compiles forward and backward again.
    """
    device = torch.device(device)
    name = resolve_backend(name, pattern, device)
    if name == "dense":
        _on_device(pattern, "dense", device)
    elif name == "flex" and _flex_unavailable(device) is None:
        _on_device(pattern, "flex", device)
        if device.type == "cuda":
            _compiled_flex()
        if device.type in _FLEX_NO_BACKWARD:  # training there falls back to `blocked`
            _prepare_blocked(pattern, device)
    else:
        _prepare_blocked(pattern, device)
    return name


def resolve_backend(name: str, pattern: AttentionPattern, device: torch.device | str) -> str:
    """`auto`: `dense` for a rule that skips no keys (global attention); otherwise `flex` on
    CUDA when flex_attention is available (a fused kernel that skips masked blocks), `blocked`
    elsewhere."""
    if name != "auto":
        return name
    if not pattern.skips_keys:
        return "dense"
    device = torch.device(device)
    if device.type == "cuda" and _flex_unavailable(device) is None:
        return "flex"
    return "blocked"


class KVCache:
    """Keys and values of the last `span` generation steps, in a ring (slot = step % span).

    `span` is the pattern's `cache_span`: no step reads a key older than that, so memory and
    per-step cost follow the attention's reach (block + memory), not the image size.

    The ring is held in the dtype the steps compute in (`dtype`: autocast's when the cache is
    made under it), and the stacked projection weights are cast once per dtype and kept
    (`weight`): under bf16 autocast no step casts the cache or re-casts the weights.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        span: int,
        head_dim: int,
        like: torch.Tensor,
        qkv_weight: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch, heads, span, head_dim)
        self.span = span
        dtype = like.dtype if dtype is None else dtype
        self.keys = like.new_zeros(shape, dtype=dtype)
        self.values = like.new_zeros(shape, dtype=dtype)
        # the query, key and value projections stacked: one matmul per step, not three
        self.qkv_weight = qkv_weight
        self._cast_weights: dict[torch.dtype, torch.Tensor] = {}

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The stacked projection weights in `dtype`, cast on first use only."""
        if self.qkv_weight.dtype == dtype:
            return self.qkv_weight
        if dtype not in self._cast_weights:
            self._cast_weights[dtype] = self.qkv_weight.to(dtype)
        return self._cast_weights[dtype]

    def store(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one step's keys and values [B, h, dh]; a ring of another dtype (steps that
        compute in another precision than the one it was made for) is converted once."""
        if self.keys.dtype != keys.dtype:
            self.keys, self.values = self.keys.to(keys.dtype), self.values.to(keys.dtype)
        self.keys[:, :, slot] = keys
        self.values[:, :, slot] = values


class Attention(nn.Module):
    """Multi-head attention (no biases, scale (d/h)^-0.5): masked by an `AttentionPattern`, or
    unmasked (encoder, encoder-decoder)."""

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
        self,
        x: torch.Tensor,
        pattern: AttentionPattern | None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, N, d] in generation order.

        With a `pattern`, masked self-attention by its rule, computed by `self.backend`. Without
        one, unmasked: every query sees every key, as in the super-resolution encoder and
        encoder-decoder attention; `memory` [B, M, d] then supplies the keys and values.
        """
        source = x if memory is None else memory
        q = self._heads(self.query(x))
        k, v = self._heads(self.key(source)), self._heads(self.value(source))
        if pattern is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            name = resolve_backend(self.backend, pattern, x.device)
            out = BACKENDS[name](q, k, v, pattern)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an encoder output, computed once per sampling run."""
        return self._heads(self.key(memory)), self._heads(self.value(memory))

    def attend_memory(
        self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Unmasked attention of x [B, n, d] over precomputed `memory_keys_values`."""
        out = F.scaled_dot_product_attention(self._heads(self.query(x)), *keys_values)
        return self.out(rearrange(out, "b h n d -> b n (h d)"))

    def new_cache(self, batch: int, pattern: AttentionPattern, like: torch.Tensor) -> KVCache:
        """A cache for one sampling run (the weights must not change during it), in the
        dtype the steps will compute in: autocast's if it is on for `like`'s device."""
        stacked = torch.cat([self.query.weight, self.key.weight, self.value.weight]).detach()
        dtype = compute_dtype(like.device, like.dtype)
        cache = KVCache(
            batch, self.num_heads, pattern.cache_span, self.head_dim, like, stacked, dtype
        )
        cache.weight(dtype)
        return cache

    def step(
        self, x: torch.Tensor, step: int, pattern: AttentionPattern, cache: KVCache
    ) -> torch.Tensor:
        """One generation step: x [B, 1, d] at `step`; reads only the keys the rule admits."""
        batch, heads = x.shape[0], self.num_heads
        weight = cache.weight(compute_dtype(x.device, x.dtype))
        # [B, 1, 3d] -> three [B, h, 1, dh]: plain views (einops costs more than the math here)
        q, k, v = F.linear(x, weight).view(batch, 3, heads, 1, -1).unbind(1)
        cache.store(step % cache.span, k[:, :, 0], v[:, :, 0])
        # a float mask made once: the boolean one was converted on every call
        masks = _on_device(pattern, f"step_slots:{str(q.dtype).split('.')[1]}", x.device)
        out = F.scaled_dot_product_attention(
            q, cache.keys, cache.values, attn_mask=masks[step][None, :]
        )
        return self.out(out.transpose(1, 2).reshape(batch, 1, -1))
