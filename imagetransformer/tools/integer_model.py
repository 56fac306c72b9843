"""The integer model: the decoding step in arithmetic whose every result is the same on every
machine, for `compress` / `decompress` (docs/file-format.md, "The integer model").

A range coder needs the encoder and the decoder to compute bit-identical probabilities. The float
network does not: its results differ in the last bits between CPU kernels (AVX2, AVX-512, MKL
settings), thread counts, batch groupings and devices. This module derives from a trained model
an integer twin of its decoding step (after Balle, Johnston and Minnen, "Integer networks for
data compression with latent-variable models", ICLR 2019):

- weights quantised per output channel (at most 16 bits), activations integers (24 bits on the
  residual stream and LayerNorm outputs, fewer for wide models; 16 bits for queries, keys,
  values, attention outputs and hidden units), with power-of-two scales calibrated on a few
  training images;
- every activation a float64 tensor holding integers, and every operation on them either a sum
  or matrix product of integers whose partial sums stay below 2^53 (checked from the bit widths
  when the model is made: exact in any order, on any kernel or device), or one IEEE-754 basic
  operation element by element (+, -, *, /, sqrt, rounding, clamping: correctly rounded, so the
  same bits everywhere; no fused multiply-add, no exp or log, no reduction of non-integers), or
  a lookup in a table made once and stored with the model: the softmaxes' 2^(-t), the logistic
  CDF, tanh and exp(-log s) of the mixture output;
- each coded symbol's distribution as integer frequencies that sum to 2^24 less one per symbol
  (a categorical step: one symbol of 256; a mixture's channel: two of 16, the range of 16
  values and the value in it); the coder adds one to every symbol, so symbol x has probability
  exactly (f_x + 1) / 2^24 (see `free_units`).

The float64 form is for speed: one matrix product, one multiply, one rounding and one clamp per
linear layer, where int64 arithmetic took ten operations. On the CPU the elementwise runs, the
attention over the cached keys and values, and the coding tables go through compiled kernels
(`integer_kernels`) that do the same operations in one pass each. The decoding caches hold the
keys and values (16-bit integers) as int16, which the kernels read in place; without them
(torch operations throughout) a step widens its window to float64 for `bmm`, so there the
caches are float64 where those windows fit well within the CPU's last-level cache
(`cache_dtype`). Either gives the same results; only the speed differs.

The weights, tables and rescaling constants are kept as named int64 and float64 tensors
(`Store`): the same object is made by `quantize` and read back by `IntegerModel.load`, and its
SHA-256 (`fingerprint`) names it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ..config import ImageTransformerConfig
from ..errors import UserError
from ..files import atomic_write_bytes
from ..layout import area_downsample, images_to_raster, raster_channel
from ..model import (
    NEAR_OFFSETS,
    above_steps,
    anchor_steps,
    block_remainder_layout,
    block_totals,
    covering_pixel,
    neighbour_steps,
    outside_bounds,
    place_in_block,
    remainder_channels,
    remainder_tokens,
    value_bounds,
)
from ..outputs import LOG_SCALE_MIN, output_distribution
from ..pattern import AttentionPattern
from . import integer_kernels as kernels

FORMAT = "imagetransformer integer model 2"
EXACT = 2**53  # float64 holds every integer of smaller magnitude exactly
WEIGHT_MAX = 2**15 - 1  # weights: at most 16 bits, per output channel
ACT_MAX = 2**15 - 1  # queries, keys, values, attention outputs, hidden units: 16 bits
MARGIN = 2.0  # headroom over the largest activation seen in calibration
CALIBRATION_IMAGES = 64

FREQ_BITS = 24  # constriction's default precision: frequencies in units of 2^-24
# what `frequencies` sums to: constriction gives every one of the 256 symbols one unit more,
# which makes its scale exactly 1 and symbol x's probability exactly (f_x + 1) / 2^24
FREQ_FREE = (1 << FREQ_BITS) - 256

ATT_FRAC, ATT_BITS = 10, 20  # attention softmax: exponents in 2^-10 of a bit, weights < 2^20
OUT_FRAC, OUT_BITS = 12, 24  # output logits in 2^-12 of a bit, their exponentials < 2^24
HEAD_MAX = 2**40
QUERY_BLOCK = 64  # queries read together in a teacher-forced pass (any number: the same results)
FORWARD_VALUES = 1 << 23  # the widest activation of a teacher-forced pass at most (64 MB)

# the mixture of logistics (dmol)
LOC_FRAC, LOC_MAX = 16, 16 << 16  # means on the [-1, 1] scale in 2^-16, within +-16
LS_FRAC, LS_HI = 10, 7  # log-scales in 2^-10, within [LOG_SCALE_MIN, 7]
LS_LO = int(LOG_SCALE_MIN)
INV_FRAC = 20  # exp(-log scale) in 2^-20
COEF_IN_FRAC, COEF_RANGE = 12, 6  # the coefficients before tanh in 2^-12, within +-6
COEF_FRAC = 16  # tanh of them in 2^-16
U_FRAC = LOC_FRAC + INV_FRAC  # the logistic's argument (edge - mean) / scale in 2^-36
SIG_STEP, SIG_RANGE = 8, 24  # the CDF table: every 2^-8 over [-24, 24], interpolated linearly
CDF_BITS = 28  # a component's CDF in 2^-28
# an edge beyond the ends: (2^31 - LOC_MAX) times the smallest inverse scale is past the table's
# range (CDF exactly 0 or 2^28), and 2^31 + LOC_MAX times the largest below 2^63 (no overflow)
BEYOND_EDGES = 1 << 31
MIX_BITS = 24  # mixture weights renormalised to about 2^24


# Integer helpers -------------------------------------------------------------------------------
def rshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x / 2^shift rounded (halves up), in integers."""
    return (x + (1 << (shift - 1))) >> shift if shift > 0 else x


def sqrt_rounded(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of float64 `x`, the same bits on every machine. Not
    `torch.sqrt` on the CPU: it calls MKL's vector library, whose last bit depends on the
    instruction set MKL picks (0.7% of random inputs off the correctly rounded root with its
    AVX-512 code, 1.5% with AVX2); numpy's is IEEE-754's correctly rounded one, as CUDA's
    float64 sqrt is."""
    if x.device.type != "cpu":
        return torch.sqrt(x)
    return torch.from_numpy(np.sqrt(x.numpy()))


def host(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory (what the compiled kernels take)."""
    return tensor.numpy()


def exp2_neg(t: torch.Tensor, table: torch.Tensor, frac: int) -> torch.Tensor:
    """2^(bits - t / 2^frac) for int64 t >= 0, from `table` (2^frac entries: the fractional
    part) and a shift (the integer part)."""
    fraction = (t & ((1 << frac) - 1)).view(-1)
    return table.index_select(0, fraction).view(t.shape) >> (t >> frac)


@functools.cache
def last_level_cache_bytes() -> int:
    """The size of CPU 0's largest cache level as Linux reports it (sysfs), 0 where unknown."""
    best_level, size = 0, 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if level > best_level and text[:-1].isdigit() and text[-1] in units:
            best_level, size = level, int(text[:-1]) * units[text[-1]]
    return size


def cache_dtype(window_bytes: int, device: torch.device) -> torch.dtype:
    """The dtype of the decoding caches (keys and values: 16-bit integers, exact in either):
    int16 where the compiled kernels read them in place (CPUs with numba) and on other devices;
    on a CPU without the kernels, float64 where `window_bytes`, what one step reads of all of
    them as float64, fits in a quarter of the CPU's last-level cache (torch's products then
    read them in place, where int16 windows are widened each step). A speed choice only: the
    results are the same."""
    if device.type == "cpu" and not kernels.ENABLED:
        return torch.float64 if 4 * window_bytes <= last_level_cache_bytes() else torch.int16
    return torch.int16


def free_units(symbols: int) -> int:
    """What a table of `symbols` frequencies sums to: 2^24 less one unit per symbol, which
    constriction adds back (`FREQ_FREE` for 256 symbols)."""
    return (1 << FREQ_BITS) - symbols


def symbol_bits(freqs: torch.Tensor, symbols: torch.Tensor) -> torch.Tensor:
    """The exact bits [n] of coding `symbols` [n] under integer frequencies `freqs` [n, k]:
    -log2((f + 1) / 2^24), float64."""
    picked = freqs.gather(-1, symbols.view(-1, 1))[:, 0]
    return FREQ_BITS - torch.log2((picked + 1).double())


def shift_for(bound_bits: int) -> int:
    """The shift of weights below 2^bound_bits that makes weight * 2^24 < 2^62."""
    return max(0, bound_bits + FREQ_BITS - 62)


def frequencies(weights: torch.Tensor, bound_bits: int) -> torch.Tensor:
    """Integer frequencies [..., k] summing to `free_units(k)`, proportional to non-negative
    int64 `weights` [..., k] whose rows sum to less than 2^bound_bits. What rounding leaves
    over goes to the first of the largest weights. A row of zeros (a range of values no
    component gives mass) gets the uniform table."""
    free = free_units(weights.shape[-1])
    weights = weights >> shift_for(bound_bits)
    total = weights.sum(-1, keepdim=True)
    freqs = torch.div(weights * free, total.clamp(min=1), rounding_mode="floor")
    freqs = torch.where(total > 0, freqs, free // weights.shape[-1])  # nothing known: uniform
    rest = free - freqs.sum(-1, keepdim=True)
    first = weights.argmax(-1, keepdim=True)  # documented: the first of equal maxima
    return freqs.scatter_add(-1, first, rest)


def pow2_scale(max_abs: float, qmax: int) -> float:
    """The power of two s with max_abs * MARGIN <= qmax * s: a scale that does not move with the
    last bits of the calibration's float results (except at a power of two)."""
    need = max(max_abs, 1e-30) * MARGIN / qmax
    mantissa, exponent = math.frexp(need)  # need = mantissa * 2^exponent, mantissa in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


# The store: named integers and constants -----------------------------------------------------
def canonical_config(config_json: str) -> str:
    """The config's fields that differ from their defaults (sorted, compact JSON): what the
    fingerprint covers. A later release that adds a field, at a default that keeps models as
    they were, then gives a model remade from the same weights the same name, so the files it
    coded still decode without the cached model."""
    defaults = json.loads(ImageTransformerConfig().to_json())
    fields = json.loads(config_json)
    kept = {k: v for k, v in fields.items() if k not in defaults or v != defaults[k]}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


@dataclass
class Store:
    """What an integer model is made of: int64 tensors (weights, tables), float64 tensors (the
    constants of the rescalings, stored bit for bit so that no machine computes them again) and
    integers, by name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)

    def put(self, name: str, values) -> None:
        """Integers (floats are rounded to the nearest)."""
        array = np.asarray(values)
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.abs(array).max(initial=0) >= 2**62:
                raise UserError(f"integer model: {name} is not finite or out of range")
            array = np.rint(array)
        self._set(name, torch.from_numpy(np.array(array, dtype=np.int64)))

    def put_float(self, name: str, values) -> None:
        """float64 constants, kept bit for bit."""
        array = np.array(values, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise UserError(f"integer model: {name} is not finite")
        self._set(name, torch.from_numpy(array))

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.tensors:
            raise ValueError(f"integer model: {name} is set twice")
        self.tensors[name] = tensor

    def put_int(self, name: str, value: int) -> None:
        if name in self.ints:
            raise ValueError(f"integer model: {name} is set twice")
        self.ints[name] = int(value)

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        return self.tensors[name].to(device)

    def values(self, name: str, device: torch.device) -> torch.Tensor:
        """A tensor as float64 (integers below 2^53 stay exact): what the arithmetic runs on."""
        return self.tensors[name].to(device, torch.float64)

    def fingerprint(self, config_json: str) -> bytes:
        digest = hashlib.sha256(FORMAT.encode())
        digest.update(config_json.encode())
        digest.update(json.dumps(self.ints, sort_keys=True).encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{str(tensor.dtype)}".encode())
            kind = "<f8" if tensor.dtype == torch.float64 else "<i8"
            digest.update(tensor.numpy().astype(kind).tobytes())
        return digest.digest()


def residual_max(d_model: int) -> int:
    """The residual stream's largest magnitude: 24 bits, fewer for wide models, so that a
    LayerNorm's sum of d squares stays below 2^53 (exact in any order)."""
    bits = min(23, (52 - (d_model - 1).bit_length()) // 2)
    return (1 << bits) - 1


class Linear:
    """An integer linear layer: the exact matrix product of integers plus the integer bias
    (float64, every partial sum below 2^53), times a per-channel constant to the output's
    units, rounded and clamped. Four operations, each exact or one correctly rounded IEEE-754
    operation."""

    @staticmethod
    def make(
        store: Store,
        name: str,
        layer: nn.Linear,
        in_unit: float,
        in_max: int,
        out_unit,
        lo: int,
        hi: int,
    ) -> None:
        weight = layer.weight.detach().cpu().double().numpy()
        fan_in = weight.shape[1]
        w_max = min(WEIGHT_MAX, (EXACT // 4) // (in_max * fan_in))  # products < 2^51
        if w_max < 127:
            raise UserError(
                f"integer model: {name} is too wide for exact float64 products ({fan_in} inputs)"
            )
        largest = np.abs(weight).max(axis=1)
        w_scale = np.where(largest > 0, largest, 1.0) / w_max
        store.put(f"{name}.weight", np.clip(np.rint(weight / w_scale[:, None]), -w_max, w_max))
        acc_unit = in_unit * w_scale
        bias = np.zeros(weight.shape[0])
        if layer.bias is not None:
            bias = layer.bias.detach().cpu().double().numpy()
        store.put(f"{name}.bias", np.clip(np.rint(bias / acc_unit), -(EXACT // 4), EXACT // 4))
        store.put_float(f"{name}.scale", acc_unit / np.asarray(out_unit, dtype=np.float64))
        store.put_int(f"{name}.lo", lo)
        store.put_int(f"{name}.hi", hi)

    def __init__(self, store: Store, name: str, device: torch.device) -> None:
        # [in, out], contiguous: what `mm` reads fastest
        self.weight_t = store.values(f"{name}.weight", device).t().contiguous()
        self.bias = store.values(f"{name}.bias", device)
        self.scale = store.get(f"{name}.scale", device)
        self.lo, self.hi = store.ints[f"{name}.lo"], store.ints[f"{name}.hi"]

    def rows(self, part: slice) -> Linear:
        """The layer of some of the outputs (the query, or the keys and values, of a stacked
        projection)."""
        other = object.__new__(Linear)
        other.weight_t, other.bias = self.weight_t[:, part].contiguous(), self.bias[part]
        other.scale, other.lo, other.hi = self.scale[part], self.lo, self.hi
        return other

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # mm, then the bias in place: addmm first copies the bias into every row
        if x.dim() == 2:  # a decoding step: no reshapes (each a dispatch)
            product = torch.mm(x, self.weight_t)
        else:
            product = torch.mm(x.reshape(-1, x.shape[-1]), self.weight_t)
            product = product.view(*x.shape[:-1], -1)
        if kernels.on(product):  # one pass: the same four operations element by element
            rows = host(product.view(-1, product.shape[-1]))
            kernels.rescale(rows, host(self.bias), host(self.scale), self.lo, self.hi)
            return product
        return product.add_(self.bias).mul_(self.scale).round_().clamp_(self.lo, self.hi)


class LayerNorm:
    """LayerNorm of integers: the sum and the sum of squares exact, the variance, its square
    root and the per-channel gain and bias each one correctly rounded float64 operation, the
    result rounded to the output's integers."""

    @staticmethod
    def make(store: Store, name: str, norm: nn.LayerNorm, unit: float, res_max: int) -> None:
        d = norm.normalized_shape[0]
        if d * res_max * res_max >= EXACT:
            raise UserError(f"integer model: {name} is too wide for an exact sum of squares")
        store.put_float(f"{name}.gain", norm.weight.detach().cpu().double().numpy() / unit)
        store.put_float(f"{name}.bias", norm.bias.detach().cpu().double().numpy() / unit)
        # d^2 (var + eps) in the input's units: eps d^2 / unit^2
        store.put_float(f"{name}.eps", [norm.eps * d * d / (unit * unit)])
        store.put_int(f"{name}.max", res_max)

    def __init__(self, store: Store, name: str, device: torch.device) -> None:
        self.gain = store.get(f"{name}.gain", device)
        self.bias = store.get(f"{name}.bias", device)
        self.eps = store.get(f"{name}.eps", device)
        self.max = store.ints[f"{name}.max"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if kernels.on(x) and x.is_contiguous():  # one pass, the same operations
            out = torch.empty_like(x)
            eps = float(self.eps[0])
            rows, into = host(x.view(-1, d)), host(out.view(-1, d))
            kernels.layer_norm(rows, host(self.gain), host(self.bias), eps, self.max, into)
            return out
        total = x.sum(-1, keepdim=True)
        squares = (x * x).sum(-1, keepdim=True)
        spread = (squares * d).sub_(total * total).clamp_(min=0).add_(self.eps)  # d^2 (var+eps)
        inverse = sqrt_rounded(spread).reciprocal_().mul_(d)  # 1 / sqrt(var + eps)
        centred = x - total * (1.0 / d)
        normalised = centred.mul_(inverse).mul_(self.gain).add_(self.bias)
        return normalised.round_().clamp_(-self.max, self.max)


def exp2_table(frac: int, bits: int) -> np.ndarray:
    return np.rint(2.0**bits * np.exp2(-np.arange(1 << frac) / 2.0**frac))


def attention_table() -> np.ndarray:
    """2^ATT_BITS 2^(-t / 2^ATT_FRAC) for every t up to the cap, whose entry is 0 (the weight
    of a key the rule does not admit)."""
    cap = (ATT_BITS + 1) << ATT_FRAC
    table = np.rint(2.0**ATT_BITS * np.exp2(-np.arange(cap + 1) / 2.0**ATT_FRAC))
    table[cap] = 0
    return table


class Attention:
    """Attention of integers: queries, keys and values by one stacked integer linear layer,
    scores by an exact product, the softmax by a table of 2^(-t) over the score's distance t
    below each query's largest (in 2^-10 of a bit), the weighted mean of the values by an exact
    product and one rounded division. One generation step over the key/value ring buffer
    (`step`), unmasked over a whole sequence (`full`: the super-resolution encoder) or over an
    encoder's keys and values (`over`: encoder-decoder attention)."""

    @staticmethod
    def make(
        store: Store, name: str, attn: nn.Module, unit: float, res_max: int, scales: dict
    ) -> None:
        d = attn.query.weight.shape[0]
        stacked = nn.Linear(d, 3 * d, bias=False)
        parts = [attn.query.weight, attn.key.weight, attn.value.weight]
        stacked.weight = nn.Parameter(torch.cat(parts).detach())
        units = np.repeat([scales["q"], scales["k"], scales["v"]], d)
        Linear.make(store, f"{name}.qkv", stacked, unit, res_max, units, -ACT_MAX, ACT_MAX)
        Linear.make(store, f"{name}.out", attn.out, scales["v"], ACT_MAX, unit, -res_max, res_max)
        m = scales["q"] * scales["k"] / math.sqrt(attn.head_dim) * math.log2(math.e)
        store.put_float(f"{name}.scores", [m * 2**ATT_FRAC])

    def __init__(self, store: Store, name: str, device: torch.device, heads: int) -> None:
        self.heads = heads
        self.qkv = Linear(store, f"{name}.qkv", device)
        d = self.qkv.out_features // 3
        self.q, self.kv = self.qkv.rows(slice(0, d)), self.qkv.rows(slice(d, 3 * d))
        self.out = Linear(store, f"{name}.out", device)
        self.scores = float(store.tensors[f"{name}.scores"][0])
        self.cap = (ATT_BITS + 1) << ATT_FRAC
        self.table = store.values("exp2_attention", device)
        self.no_mask = torch.zeros(0, 0, dtype=torch.float64)  # the kernel's "no mask"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, d] -> [..., h, n, dh]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, h, n, dh] of a sequence [b, n, d]."""
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def weights(self, z: torch.Tensor, mask: torch.Tensor | None):
        """The compiled table softmax of scores z [..., m] (`mask`: [m] or [n, m] as in
        `attend`): the keys' integer weights like z, and their exact sums [...]."""
        m = z.shape[-1]
        masks = self.no_mask if mask is None else mask.view(-1, m)
        e, totals = torch.empty_like(z), z.new_empty(z.shape[:-1])
        kernels.table_softmax(
            host(z.view(-1, m)), host(masks), self.scores, self.cap, host(self.table),
            host(e.view(-1, m)), host(totals.view(-1)),
        )  # fmt: skip
        return e, totals

    def attend(self, q, keys, values, mask: torch.Tensor | None) -> torch.Tensor:
        """Queries [b, h, n, dh] over keys and values [b, h, m, dh]; `mask` [n or 1, m] 0 or
        -inf (None: all keys) -> [b, h, n, dh]. Or each [b h, ...]: `bmm` without `matmul`'s
        reshapes (a decoding step)."""
        product = torch.bmm if q.dim() == 3 else torch.matmul
        z = product(q, keys.transpose(-1, -2))  # [b, h, n, m]: exact, < 2^53
        if kernels.on(z):  # the operations below in two passes
            e, totals = self.weights(z, mask)
            num = product(e, values)
            kernels.divide_round(host(num.view(-1, num.shape[-1])), host(totals.view(-1)))
            return num
        if mask is not None:
            z = z.add_(mask)
        below = (z.amax(-1, keepdim=True) - z).mul_(self.scores).clamp_(max=self.cap)
        index = below.int()  # at most the cap: int32 converts and gathers faster than int64
        # < 2^20; keys not admitted (and far below): 0. index_select: 3x faster than [index]
        e = self.table.index_select(0, index.view(-1)).view(index.shape)
        num = product(e, values)  # exact, < 2^53
        return num.div_(e.sum(-1, keepdim=True)).round_()  # the top key's weight: >= 2^20

    def step(self, x: torch.Tensor, step: int, cache: torch.Tensor, window: KeyWindow):
        """x [b, d] at generation step `step`: its key and value go into the doubled ring
        buffer `cache` [2 span, 2, b, h, dh] (at slot and slot + span; float64 or int16, see
        `cache_dtype`), and its query reads the window of the newest keys that holds every key
        the step may read: int16 caches in place by the compiled kernels on the CPU (scores,
        table softmax, weighted values: `attend`'s operations), otherwise widened to float64
        for `attend`. Slots first: a step writes two contiguous blocks and reads one, where
        slots inside scattered its writes over every image and head."""
        qkv = self.qkv(x).view(x.shape[0], 3, self.heads, -1)
        span = cache.shape[0] // 2
        kv = qkv[:, 1:].transpose(0, 1)
        cache[step % span].copy_(kv)
        cache[step % span + span].copy_(kv)
        mask = None if window.reads_all else window.mask
        if kernels.on(cache) and cache.dtype == torch.int16:  # read in place by the kernels
            q = qkv[:, 0].reshape(-1, qkv.shape[-1])
            z = q.new_empty(q.shape[0], window.length)
            whole = host(q.to(torch.int32))  # 16-bit integers
            kernels.in_parallel(
                kernels.cached_scores, whole, host(cache), window.start, window.length, host(z)
            )
            e, totals = self.weights(z, mask)
            o = torch.empty_like(q)
            kernels.in_parallel(kernels.cached_values, host(e), host(cache), window.start, host(o))
            kernels.divide_round(host(o), host(totals))
            return self.out(o.view(x.shape[0], -1))
        held = cache.narrow(0, window.start, window.length)  # [L, 2, b, h, dh]
        if held.dtype != torch.float64:  # int16: widened; float64: read in place
            held = held.double()
        keys, values = held.permute(1, 2, 3, 0, 4).flatten(1, 2).unbind(0)  # [b h, L, dh]
        o = self.attend(qkv[:, 0].reshape(-1, 1, qkv.shape[-1]), keys, values, mask)
        return self.out(o.view(x.shape[0], -1))

    def full(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(part) for part in self.qkv(x).chunk(3, dim=-1))
        return self.out(self.attend(q, k, v, None).transpose(-2, -3).flatten(-2))

    def causal(self, x: torch.Tensor, blocks: list[QueryBlock]) -> torch.Tensor:
        """x [n, N, d], every step of a known sequence at once: each block of queries over the
        keys its steps may read. The keys a step may not read weigh exactly 0 and add exact
        zeros, so each row is what `step` computes for that step."""
        q, k, v = (self._heads(part) for part in self.qkv(x).chunk(3, dim=-1))
        out = torch.empty_like(q)
        for block in blocks:
            rows, keys = block.queries, block.keys
            out[:, :, rows] = self.attend(q[:, :, rows], k[:, :, keys], v[:, :, keys], block.mask)
        return self.out(out.transpose(-2, -3).flatten(-2))

    def over(self, x: torch.Tensor, keys_values) -> torch.Tensor:
        """x [n, d] (one step) or [n, N, d] (every step) over an encoder's keys and values."""
        if x.dim() == 3:
            q = self._heads(self.q(x))
            return self.out(self.attend(q, *keys_values, None).transpose(-2, -3).flatten(-2))
        q = self.q(x).view(x.shape[0], self.heads, 1, -1)
        return self.out(self.attend(q, *keys_values, None).reshape(x.shape[0], -1))


@dataclass
class KeyWindow:
    """What one generation step's query reads: `length` consecutive slots of the doubled ring
    buffer from `start` (the newest `length` steps, which hold every key the step may read),
    and the mask over them (0: may read, -inf: may not). Only those keys are read, where a ring
    buffer under a mask reads all `span` slots: about three quarters of them for local 1D
    attention, half for global attention."""

    start: int
    length: int
    mask: torch.Tensor
    reads_all: bool = False  # the mask is all zeros: attention can leave it out

    @staticmethod
    def all(pattern: AttentionPattern, device: torch.device) -> list[KeyWindow]:
        allowed = pattern.step_slot_mask  # [N, span]
        n, span = allowed.shape
        steps, slots = torch.arange(n)[:, None], torch.arange(span)[None]
        held = steps - (steps - slots) % span  # the step each slot holds at step i
        oldest = torch.where(allowed, held, n).amin(1).tolist()
        windows = []
        for step, first in enumerate(oldest):
            order = torch.arange(first, step + 1) % span
            mask = torch.zeros(len(order), dtype=torch.float64)
            mask.masked_fill_(~allowed[step, order], -math.inf)
            every = bool(allowed[step, order].all())  # adding a mask of zeros changes nothing
            windows.append(KeyWindow(first % span, step + 1 - first, mask.to(device), every))
        return windows


@dataclass
class QueryBlock:
    """Consecutive steps' queries read together when the whole sequence is known: the keys of
    the steps from the oldest that any of them may read to the last of them, and the mask
    [queries, keys] (0: may read, -inf: may not), each row the step's `KeyWindow` in place."""

    queries: slice
    keys: slice
    mask: torch.Tensor

    @staticmethod
    def all(windows: list[KeyWindow], size: int, device: torch.device) -> list[QueryBlock]:
        blocks = []
        for start in range(0, len(windows), size):
            stop = min(start + size, len(windows))
            first = min(step + 1 - windows[step].length for step in range(start, stop))
            mask = torch.full((stop - start, stop - first), -math.inf, dtype=torch.float64)
            for step in range(start, stop):
                window = windows[step]
                oldest = step + 1 - window.length - first
                mask[step - start, oldest : oldest + window.length] = window.mask.cpu()
            blocks.append(QueryBlock(slice(start, stop), slice(first, stop), mask.to(device)))
        return blocks


class Block:
    """Self-attention, (super-resolution) encoder-decoder attention and the feed-forward layer,
    each with its residual and LayerNorm, pre- or post-norm as the float block."""

    def __init__(self, store: Store, name: str, device: torch.device, config) -> None:
        self.norm_first = config.norm_first
        heads = config.num_heads
        self.max = store.ints["res_max"]
        self.attn = Attention(store, f"{name}.attn", device, heads)
        self.norm1 = LayerNorm(store, f"{name}.norm1", device)
        self.norm2 = LayerNorm(store, f"{name}.norm2", device)
        self.ffn1 = Linear(store, f"{name}.ffn1", device)
        self.ffn2 = Linear(store, f"{name}.ffn2", device)
        self.cross = None
        if f"{name}.cross_attn.scores" in store.tensors:
            self.cross = Attention(store, f"{name}.cross_attn", device, heads)
            self.norm_cross = LayerNorm(store, f"{name}.norm_cross", device)

    @staticmethod
    def make(
        store: Store, name: str, block: nn.Module, unit: float, res_max: int, scales: dict
    ) -> None:
        Attention.make(store, f"{name}.attn", block.attn, unit, res_max, scales["attn"])
        LayerNorm.make(store, f"{name}.norm1", block.norm1, unit, res_max)
        LayerNorm.make(store, f"{name}.norm2", block.norm2, unit, res_max)
        hidden = scales["hidden"]
        Linear.make(store, f"{name}.ffn1", block.ffn[0], unit, res_max, hidden, 0, ACT_MAX)
        Linear.make(store, f"{name}.ffn2", block.ffn[2], hidden, ACT_MAX, unit, -res_max, res_max)
        if block.cross_attn is not None:
            cross = scales["cross"]
            Attention.make(store, f"{name}.cross_attn", block.cross_attn, unit, res_max, cross)
            LayerNorm.make(store, f"{name}.norm_cross", block.norm_cross, unit, res_max)

    def run(self, x: torch.Tensor, attend, attend_memory=None) -> torch.Tensor:
        sublayers = [(self.norm1, attend)]
        if self.cross is not None:
            sublayers.append((self.norm_cross, attend_memory))
        sublayers.append((self.norm2, lambda h: self.ffn2(self.ffn1(h))))
        for norm, f in sublayers:
            if self.norm_first:
                x = (x + f(norm(x))).clamp_(-self.max, self.max)
            else:
                x = norm((x + f(x)).clamp_(-self.max, self.max))
        return x

    def step(self, x, step, cache, window, memory_kv=None):
        return self.run(
            x,
            lambda h: self.attn.step(h, step, cache, window),
            lambda h: self.cross.over(h, memory_kv),
        )

    def sequence(self, x, blocks: list[QueryBlock], memory_kv=None):
        """Every step of a known sequence x [n, N, d] at once."""
        return self.run(
            x,
            lambda h: self.attn.causal(h, blocks),
            lambda h: self.cross.over(h, memory_kv),
        )


# Output distributions in integers ------------------------------------------------------------
# How one symbol is coded: (the symbols [n] to encode, or None to decode them; their integer
# frequencies [n, k]) -> (the symbols [n], their exact bits [n])
Code = Callable[[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CategoricalCoding:
    """The 256-way softmax of one step's logits as integer frequencies (one symbol per step)."""

    channels = 1

    def __init__(
        self, model: IntegerModel, head: torch.Tensor, outside: torch.Tensor | None = None
    ) -> None:
        if outside is not None:  # low_res_bounds: values out of reach get no weight (their
            # distance below the top is at least the table's cap, whose 2^(-t) is 0)
            head = head.masked_fill(outside, head.min() - ((OUT_BITS + 1) << OUT_FRAC))
        if kernels.on(head):  # the same integers in one pass
            self.freqs = torch.empty(head.shape, dtype=torch.long)
            kernels.categorical(
                host(head.contiguous()), host(model.exp2_output), OUT_FRAC,
                (OUT_BITS + 1) << OUT_FRAC, shift_for(OUT_BITS + 9), free_units(head.shape[1]),
                host(self.freqs),
            )  # fmt: skip
            return
        weights = softmax_weights(head, model.exp2_output)
        self.freqs = frequencies(weights, OUT_BITS + 9)

    def code(self, channel: int, code: Code, known: torch.Tensor | None):
        """The step's value [n] and its bits [n], by one symbol under the step's table."""
        return code(known, self.freqs)


def softmax_weights(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """exp(logit - max) * 2^24 of logits in 2^-12 of a bit, by the table (the max gets 2^24)."""
    top = logits.amax(-1, keepdim=True)
    t = (top - logits).clamp(max=(OUT_BITS + 1) << OUT_FRAC)
    return exp2_neg(t, table, OUT_FRAC)


def renormalise(weights: torch.Tensor) -> torch.Tensor:
    """Mixture weights [n, K] scaled down so that they sum to at most 2^(MIX_BITS + 1)."""
    q = (weights.sum(-1, keepdim=True) >> MIX_BITS).clamp(min=1)
    return torch.div(weights, q, rounding_mode="floor")


class MixtureCoding:
    """A pixel's channels in turn under the discretized mixture of logistics: each component's
    CDF at bin edges from the interpolated logistic table (so each component's masses are
    non-negative integers summing to 2^28), weighted by the components' posterior given the
    channels already coded, each coupled to them (as `LogisticMixture`)."""

    def __init__(self, model: IntegerModel, head: torch.Tensor) -> None:
        self.model = model
        k, c = model.num_mixtures, model.channels
        self.channels = c
        n = head.shape[0]
        self.x = torch.zeros(n, c, dtype=torch.long, device=head.device)  # 2^-16
        self.compiled = kernels.on(head)
        if self.compiled:  # the same integers in one pass (`kernels.mixture_start`)
            self.locs = torch.empty(n, k, c, dtype=torch.long)
            self.inv_scales = torch.empty(n, k, c, dtype=torch.long)
            self.coeffs = torch.empty(n, k, max(1, c * (c - 1) // 2), dtype=torch.long)
            self.weights = torch.empty(n, k, dtype=torch.long)
            clamps = np.array(
                [LOC_MAX, LS_LO << LS_FRAC, LS_HI << LS_FRAC, COEF_RANGE << COEF_IN_FRAC]
            )
            kernels.mixture_start(
                host(head.contiguous()), k, c, clamps, host(model.inverse_scale),
                host(model.tanh), host(model.exp2_output), OUT_FRAC,
                (OUT_BITS + 1) << OUT_FRAC, MIX_BITS, host(self.locs), host(self.inv_scales),
                host(self.coeffs), host(self.weights),
            )  # fmt: skip
            return
        locs = head[:, k : k + k * c].view(n, k, c)
        self.locs = locs.clamp(-LOC_MAX, LOC_MAX)
        log_scales = head[:, k + k * c : k + 2 * k * c].view(n, k, c)
        log_scales = log_scales.clamp(LS_LO << LS_FRAC, LS_HI << LS_FRAC)
        self.inv_scales = model.inverse_scale[log_scales - (LS_LO << LS_FRAC)]  # 2^-20
        raw = head[:, k + 2 * k * c :].view(n, k, -1)
        raw = raw.clamp(-COEF_RANGE << COEF_IN_FRAC, COEF_RANGE << COEF_IN_FRAC)
        self.coeffs = model.tanh[raw + (COEF_RANGE << COEF_IN_FRAC)]  # 2^-16
        self.weights = renormalise(softmax_weights(head[:, :k], model.exp2_output))

    def mean(self, channel: int) -> torch.Tensor:
        """[n, K]: each component's mean of channel `channel`, coupled to the earlier ones."""
        first = channel * (channel - 1) // 2
        mean = self.locs[..., channel]
        for earlier in range(channel):
            coupling = self.coeffs[..., first + earlier] * self.x[:, None, earlier]
            mean = mean + rshift(coupling, COEF_FRAC)
        return mean

    def component_masses(self, mean: torch.Tensor, inverse: torch.Tensor, edges: torch.Tensor):
        """[n, K, 16]: each component's masses of the 16 ranges between 17 boundaries whose
        edges (`IntegerModel.bound_edges` of boundaries in 0..256) are `edges` [n or 1, 17], of
        components with means `mean` [n, K] and inverse scales `inverse` [n, K, 1]."""
        u = (edges.unsqueeze(1) - mean.unsqueeze(-1)).mul_(inverse)
        cdf = logistic_cdf(u, self.model.sigmoid, self.model.sigmoid_slope)  # [n, K, 17]
        return torch.diff(cdf, dim=-1)

    def mixed(self, masses: torch.Tensor) -> torch.Tensor:
        """Integer frequencies [n, 16] of the mixture of the components' `masses`."""
        weighted = torch.bmm(self.weights.unsqueeze(1), masses).squeeze(1)  # [n, 16]: int64
        return frequencies(weighted, MIX_BITS + 1 + CDF_BITS)

    def code(self, channel: int, code: Code, known: torch.Tensor | None):
        """Channel `channel`'s value [n] and its bits [n], by two symbols: which of the 16
        ranges of 16 values it is in, then which value of that range. Each component's CDF is
        needed at 34 boundaries this way (17 and 17), where one 256-way table needs all 255;
        the two symbols' probabilities multiply to the value's (bar rounding). Then the
        components are weighed by their mass of it (plus one, so that no value leaves all of
        them at zero), and the later channels coupled to it."""
        if self.compiled:
            return self._code_compiled(channel, code, known)
        model, device = self.model, self.weights.device
        mean, inverse = self.mean(channel), self.inv_scales[..., channel].unsqueeze(-1)
        coarse = self.mixed(self.component_masses(mean, inverse, model.range_edges))
        high, high_bits = code(None if known is None else known >> 4, coarse)
        high = high.to(device)
        bounds = (16 * high).unsqueeze(1) + model.value_bounds  # [n, 17] in 0..256
        edges = model.bound_edges.index_select(0, bounds.view(-1)).view(bounds.shape)
        masses = self.component_masses(mean, inverse, edges)
        low, low_bits = code(None if known is None else known & 15, self.mixed(masses))
        low = low.to(device)
        values = high * 16 + low
        index = low.view(-1, 1, 1).expand(-1, masses.shape[1], 1)
        mass = masses.gather(-1, index).squeeze(-1)
        self.weights = renormalise(self.weights * (mass + 1))
        self.x[:, channel] = model.unit_values.index_select(0, values)
        return values, high_bits + low_bits

    def _code_compiled(self, channel: int, code: Code, known: torch.Tensor | None):
        """`code` in three kernels: the ranges' table, their values' table, the weights."""
        model, n = self.model, self.weights.shape[0]
        masses = torch.empty(n, self.weights.shape[1], 16, dtype=torch.long)
        cdf = (
            host(model.sigmoid), host(model.sigmoid_slope), SIG_RANGE << U_FRAC,
            U_FRAC - SIG_STEP, U_FRAC - SIG_STEP - 16, shift_for(MIX_BITS + 1 + CDF_BITS),
            free_units(16),
        )  # fmt: skip
        state = (host(self.locs), host(self.inv_scales), host(self.coeffs), host(self.x))
        weights, edges = host(self.weights), host(model.bound_edges)

        def table(high: np.ndarray | None) -> torch.Tensor:
            freqs = torch.empty(n, 16, dtype=torch.long)
            kernels.mixture_tables(
                *state, weights, channel, COEF_FRAC, edges, high, cdf, host(masses), host(freqs)
            )
            return freqs

        high, high_bits = code(None if known is None else known >> 4, table(None))
        high = high.to(torch.long).contiguous()
        low, low_bits = code(None if known is None else known & 15, table(host(high)))
        low = low.to(torch.long).contiguous()
        values = torch.empty(n, dtype=torch.long)
        kernels.mixture_update(
            host(masses), host(high), host(low), weights, host(self.x), channel,
            host(model.unit_values), MIX_BITS, host(values),
        )  # fmt: skip
        return values, high_bits + low_bits


def logistic_cdf(u: torch.Tensor, table: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """sigmoid(u) * 2^28 for u in 2^-36, by linear interpolation in a table every 2^-8 over
    [-24, 24] (`slope`: the differences of its neighbours); non-decreasing in u, as the table
    is. index_select, not [index]: three times faster here."""
    span = SIG_RANGE << U_FRAC
    s = u.clamp(-span, span).add_(span)
    index = (s >> (U_FRAC - SIG_STEP)).view(-1)
    frac = (s >> (U_FRAC - SIG_STEP - 16)).bitwise_and_(0xFFFF)
    low = table.index_select(0, index).view(s.shape)
    rise = slope.index_select(0, index).view(s.shape).mul_(frac)
    return low.add_(rshift(rise, 16))


def logistic_table() -> np.ndarray:
    steps = 2 * SIG_RANGE << SIG_STEP
    u = np.arange(steps + 2) / 2.0**SIG_STEP - SIG_RANGE
    return np.rint(2.0**CDF_BITS / (1.0 + np.exp(-u)))


def fixed_unit_values(numerators) -> list[int]:
    """round(a * 2^16 / 255) for integers a, exactly (the [-1, 1] scale: v -> (2v - 255)/255)."""
    return [(2 * a * (1 << LOC_FRAC) + 255) // 510 for a in numerators]


# The model -------------------------------------------------------------------------------------
@dataclass
class DecodingState:
    batch: int
    caches: list[torch.Tensor]  # per block: keys and values [2 span, 2, n, h, dh] (KeyWindow)
    memory_kvs: list  # per block: the encoder's keys and values (super-resolution), or None
    conditioning: torch.Tensor | None  # [n, 1 or N, d]: the class and low-resolution signals
    values: torch.Tensor | None = None  # [n, N, *value_shape]: the values so far (above_signal)
    block_signal: torch.Tensor | None = None  # [n, d]: added before every later block
    next_step: int = 0
    # [n, N, *value_shape]: s^2 times each step's low-resolution value (low_res_remainder, _bounds)
    remainder_base: torch.Tensor | None = None
    outside: torch.Tensor | None = None  # [n, 256]: the values the step may not take (_bounds)


def table_of(
    store: Store, name: str, weight: torch.Tensor, scale: float, unit: float, res_max: int
) -> None:
    """An embedding table times `scale`, in the residual stream's units."""
    store.put(name, (weight.detach().double() * scale / unit).clamp(-res_max, res_max))


class Embedding:
    """An input embedding of values in integers (the decoder's input and the above signal): a
    table row per (channel, intensity) times sqrt(d) (cat), or the integer linear layer and
    ReLU over the pixel's intensities on the [-1, 1] scale, 2v - 255 in units of 1/255 (dmol);
    in the residual stream's units."""

    @staticmethod
    def make(
        store: Store, name: str, embedding: nn.Module, config, unit: float, res_max: int
    ) -> None:
        if config.output == "cat":
            table_of(store, name, embedding.weight, math.sqrt(config.d_model), unit, res_max)
        else:
            Linear.make(store, name, embedding, 1 / 255, 255, unit, 0, res_max)

    def __init__(self, store: Store, name: str, device: torch.device, config, order) -> None:
        self.table = self.linear = None
        if config.output == "cat":
            self.table = store.values(name, device)
            self.step_channel = (order % config.image_shape[0]).to(device)
        else:
            self.linear = Linear(store, name, device)

    def __call__(self, values: torch.Tensor, step: int) -> torch.Tensor:
        """[n, d]: the embedding of `values` ([n] intensities or [n, C] pixels) generated at
        step `step`."""
        if self.table is not None:
            return self.table[self.step_channel[step] * 256 + values.long()]
        return self.linear((2 * values - 255).double())


class Encoder:
    """The super-resolution encoder in integers: the low-resolution image embedded with its
    table and timing signal, unmasked attention blocks, the final LayerNorm (pre-norm)."""

    @staticmethod
    def make(
        store: Store, encoder: nn.Module, unit: float, res_max: int, scales: list[dict]
    ) -> None:
        root_d = math.sqrt(encoder.d_model)
        table_of(store, "encoder.embed", encoder.embed.weight, root_d, unit, res_max)
        table_of(store, "encoder.position", encoder._timing, 1.0, unit, res_max)
        for i, block in enumerate(encoder.blocks):
            Block.make(store, f"encoder.blocks.{i}", block, unit, res_max, scales[i])
        if isinstance(encoder.final_norm, nn.LayerNorm):
            LayerNorm.make(store, "encoder.final_norm", encoder.final_norm, unit, res_max)

    def __init__(self, store: Store, device: torch.device, config) -> None:
        self.channel = raster_channel(config.low_res_shape).to(device)
        self.embed = store.values("encoder.embed", device)
        self.position = store.values("encoder.position", device)
        self.max = store.ints["res_max"]
        layers = range(config.encoder_layers)
        self.blocks = [Block(store, f"encoder.blocks.{i}", device, config) for i in layers]
        self.final_norm = None
        if "encoder.final_norm.gain" in store.tensors:
            self.final_norm = LayerNorm(store, "encoder.final_norm", device)

    def __call__(self, low_res: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, h, w] -> [n, C*h*w, d]."""
        tokens = self.channel * 256 + images_to_raster(low_res.long())
        x = (self.embed[tokens] + self.position).clamp_(-self.max, self.max)
        for block in self.blocks:
            x = block.run(x, block.attn.full)
        return x if self.final_norm is None else self.final_norm(x)


class IntegerModel:
    """An integer twin of an `ImageTransformer`'s decoding step (both outputs; unconditional,
    class-conditional and super-resolution models, with or without the above signal). `start`
    and `step` give the head's integer outputs step by step (decoding); `teacher_forced` gives
    the same integers for every step of known images at once (encoding); `coding` turns them
    into the integer frequencies of each channel in turn."""

    def __init__(
        self,
        config: ImageTransformerConfig,
        store: Store,
        device: torch.device | str = "cpu",
        config_json: str | None = None,
    ) -> None:
        self.config = config
        # the config as written when the model was made: what the fingerprint covers (a later
        # release that adds a config field must not change the name of a model or its files)
        self.config_json = config_json or config.to_json()
        self.store = store
        self.device = device = torch.device(device)
        self.pattern = AttentionPattern.from_config(config)
        self.distribution = output_distribution(config)
        self.generation_order = self.pattern.generation_order.to(device)
        self.inverse_order = torch.argsort(self.pattern.generation_order).to(device)
        self.windows = KeyWindow.all(self.pattern, device)
        self.cache_dtype: torch.dtype | None = None  # the caches' dtype; None: `cache_dtype`
        self.max = store.ints["res_max"]
        self.channels = config.image_shape[0]
        self.num_mixtures = config.num_mixtures
        self.position = store.values("position", device)
        order = self.generation_order
        self.embed = Embedding(store, "embed", device, config, order)
        self.above_embed = None
        if config.above_signal:
            self.above_embed = Embedding(store, "above_embed", device, config, order)
            # per step, the step of the value directly above (-1: the first row), on the host
            self.above = above_steps(config, self.pattern.generation_order).tolist()
        self.near_embeds, self.near = [], []
        if getattr(config, "near_signal", False):  # and per step, each neighbour's step
            names = (f"near_embeds.{i}" for i in range(len(NEAR_OFFSETS)))
            self.near_embeds = [Embedding(store, name, device, config, order) for name in names]
            near = (neighbour_steps(config, self.pattern.generation_order, o) for o in NEAR_OFFSETS)
            self.near = [steps.tolist() for steps in near]
        self.blocks = [
            Block(store, f"blocks.{i}", device, config) for i in range(config.num_layers)
        ]
        self.final_norm = LayerNorm(store, "final_norm", device) if config.norm_first else None
        self.head = Linear(store, "head", device)
        self.class_table = store.values("class_embed", device) if config.num_classes else None
        # the class signal again before every later block (`class_signal="every_block"`)
        self.class_every_block = getattr(config, "class_signal", "input") == "every_block"
        self.encoder = Encoder(store, device, config) if config.task == "superres" else None
        self.low_res_table = self.low_res_upsample = None
        order = self.pattern.generation_order
        if "low_res_embed" in store.tensors:
            self.low_res_table = store.values("low_res_embed", device)
        if "low_res_upsample.weight" in store.tensors:
            self.low_res_upsample = Linear(store, "low_res_upsample", device)
            self.place = place_in_block(config)[order].to(device)
        if self.low_res_table is not None or self.low_res_upsample is not None:
            self.covering = covering_pixel(config)[order].to(device)
        self.remainder_table = None
        if config.reads_block_values:  # the block's earlier values, as the float model reads them
            earlier, to_come = block_remainder_layout(config, order)
            self.earlier = [row[row >= 0].to(device) for row in earlier]
            self.to_come = to_come.to(device)
        if "low_res_remainder" in store.tensors:  # the block's remainder, as the float model
            self.remainder_table = store.values("low_res_remainder", device)
            self.remainder_channel = remainder_channels(config, order).to(device)
        self.exp2_output = store.get("exp2_output", device)
        if config.output == "dmol":
            self.inverse_scale = store.get("inverse_scale", device)
            self.tanh = store.get("tanh", device)
            self.sigmoid = store.get("logistic_cdf", device)
            self.sigmoid_slope = self.sigmoid[1:] - self.sigmoid[:-1]
            # the boundaries of the 16 ranges of 16 values, and of the values within a range
            self.value_bounds = torch.arange(17, device=device)
            # the edge below each value b in 0..256, beyond the ends far enough out that every
            # component's CDF there is exactly 0 (b = 0) or 2^28 (b = 256) (tested)
            edges = store.get("edges", device)
            far = torch.tensor([BEYOND_EDGES], device=device)
            self.bound_edges = torch.cat([-far, edges, far])
            self.range_edges = self.bound_edges[16 * self.value_bounds][None]  # [1, 17]
            self.unit_values = store.get("unit_values", device)
        self.anchor = None
        if config.mixture_anchor:  # the pixel each step's means are offsets from
            self.anchor = anchor_steps(config, self.pattern.generation_order).tolist()
        self._fingerprint: bytes | None = None

    # identity and files
    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the config's fields that differ from their defaults
        (`canonical_config`), the integers and every table: what a file names. A model loaded
        under its older name (`older_fingerprint`) keeps it."""
        if self._fingerprint is None:
            self._fingerprint = self.store.fingerprint(canonical_config(self.config_json))
        return self._fingerprint

    @property
    def older_fingerprint(self) -> bytes:
        """The name releases before `canonical_config` gave the same model: over the config
        exactly as written, every field included."""
        return self.store.fingerprint(self.config_json)

    def take_name(self, prefix: bytes) -> bool:
        """Whether a file that names its model by `prefix` (the first bytes of a fingerprint)
        names this one, by its name or its older one; if by the older, the model takes it."""
        if self.fingerprint.startswith(prefix):
            return True
        older = self.older_fingerprint
        if older.startswith(prefix):
            self._fingerprint = older
            return True
        return False

    def to(self, device: torch.device | str) -> IntegerModel:
        moved = IntegerModel(self.config, self.store, device, self.config_json)
        moved._fingerprint = self._fingerprint  # an older name it took goes with it
        return moved

    def to_bytes(self, source: str = "") -> bytes:
        tensors = {}
        for name, tensor in self.store.tensors.items():
            small = tensor.dtype == torch.int64 and (
                tensor.abs().max() < 2**31 if tensor.numel() else True
            )
            tensors[name] = tensor.to(torch.int32) if small else tensor
        metadata = {
            "format": FORMAT,
            "config": self.config_json,
            "ints": json.dumps(self.store.ints, sort_keys=True),
            "source": source,
            "fingerprint": self.fingerprint.hex(),
        }
        return safetensors_save({k: v.contiguous() for k, v in tensors.items()}, metadata)

    def save(self, path: str | Path, source: str = "") -> None:
        atomic_write_bytes(path, self.to_bytes(source))

    @staticmethod
    def read_source(path: str | Path) -> tuple[str, str]:
        """(fingerprint hex, source hex) recorded in a saved integer model's header."""
        metadata = _read_metadata(Path(path))
        return metadata.get("fingerprint", ""), metadata.get("source", "")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> IntegerModel:
        path = Path(path)
        try:
            data = path.read_bytes()
            metadata = _read_metadata(path)
            if metadata.get("format") != FORMAT:
                raise UserError(
                    f"{path} is an integer model of another format ({metadata.get('format')}, "
                    f"this release reads {FORMAT}): files it coded decode with the release that "
                    "made them; delete it, and compress makes a new one"
                )
            tensors = {
                k: v if v.dtype == torch.float64 else v.to(torch.int64)
                for k, v in safetensors_load(data).items()
            }
            config = ImageTransformerConfig.from_json(metadata["config"])
            store = Store(tensors, {k: int(v) for k, v in json.loads(metadata["ints"]).items()})
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as err:
            raise UserError(
                f"{path} is not a readable integer model ({type(err).__name__}: {err}); "
                "delete it and compress again to make it anew"
            ) from None
        model = cls(config, store, device, metadata["config"])
        try:
            named = bytes.fromhex(str(metadata.get("fingerprint", "")))
        except ValueError:
            named = b""
        if len(named) != hashlib.sha256().digest_size or not model.take_name(named):
            raise UserError(
                f"{path} is damaged (its contents do not match its fingerprint); delete it"
            )
        return model

    # decoding
    def to_steps(self, images: torch.Tensor) -> torch.Tensor:
        seq = self.distribution.to_sequence(images.to(self.device).long())
        return seq[:, self.generation_order]

    def from_steps(self, values: torch.Tensor) -> torch.Tensor:
        return self.distribution.to_images(values[:, self.inverse_order]).to(torch.uint8)

    def start(
        self, n: int, labels: torch.Tensor | None = None, low_res: torch.Tensor | None = None
    ) -> DecodingState:
        """The state of a step-by-step decoding of `n` images: empty ring buffers, the class
        signal of `labels` [n] (class-conditional models) and the encoder run once over
        `low_res` uint8 [n, C, h, w] (super-resolution models)."""
        c = self.config
        span, head_dim = self.pattern.cache_span, c.d_model // c.num_heads
        shape = (2 * span, 2, n, c.num_heads, head_dim)  # each slot twice: keys and values
        window_bytes = len(self.blocks) * math.prod(shape) // 2 * 8
        dtype = self.cache_dtype or cache_dtype(window_bytes, self.device)
        caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.blocks]
        if (labels is None) != (self.class_table is None):
            raise UserError("labels go with class-conditional models, and only with them")
        if (low_res is None) != (self.encoder is None):
            raise UserError("low_res goes with super-resolution models, and only with them")
        conditioning = block_signal = None
        if labels is not None:
            conditioning = self.class_table[labels.to(self.device).long()][:, None]
            if self.class_every_block:
                block_signal = conditioning[:, 0]
        memory_kvs = [None] * len(self.blocks)
        if low_res is not None:
            low_res = low_res.to(self.device)
            memory = self.encoder(low_res)
            memory_kvs = [block.cross.keys_values(memory) for block in self.blocks]
            if self.low_res_table is not None:
                pixels = rearrange(low_res.long(), "b c h w -> b (h w) c")
                tokens = pixels + 256 * torch.arange(pixels.shape[-1], device=self.device)
                signal = self.low_res_table[tokens].sum(2)[:, self.covering]  # [n, N, d]
                conditioning = signal if conditioning is None else conditioning + signal
            if self.low_res_upsample is not None:
                signal = self.upsample(low_res)
                conditioning = signal if conditioning is None else conditioning + signal
        values = base = None
        if c.reads_block_values and low_res is not None:
            base = block_totals(self.distribution, low_res, c.scale, self.generation_order)
        again = self.above_embed is not None or self.near_embeds or self.anchor is not None
        if again or base is not None:  # earlier values are read again
            shape = (n, c.num_positions, *self.distribution.value_shape)
            values = torch.zeros(shape, dtype=torch.long, device=self.device)
        return DecodingState(
            n, caches, memory_kvs, conditioning, values, block_signal, remainder_base=base
        )

    def remainder(self, state: DecodingState, step: int) -> torch.Tensor:
        """[n, d]: the remainder signal of step `step` (`low_res_remainder`): the row of the
        float model's table, chosen by the same integer arithmetic."""
        found = state.values[:, self.earlier[step]]  # [n, k, *value_shape]
        channel = self.remainder_channel
        if not self.distribution.value_shape:  # one value per step: its own channel
            channel = channel[step : step + 1]
        base = state.remainder_base[:, step : step + 1]
        to_come = self.to_come[step : step + 1]
        rows = remainder_tokens(base, found[:, None], to_come, channel, self.config.scale)[:, 0]
        signal = self.remainder_table[rows]  # [n, d] or [n, C, d]
        return signal if signal.dim() == 2 else signal.sum(1)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """[n, N, d]: the learned upsampling (`low_res_upsample`) in integers: the 3x3
        neighbourhood (edges repeated) of intensities 2v - 255 through each place's map."""
        x = F.pad(2 * low_res.double() - 255, (1, 1, 1, 1), mode="replicate")
        around = F.unfold(x, 3).transpose(1, 2)  # [n, h*w, C*9]: copies, no arithmetic
        maps = self.low_res_upsample(around).unflatten(-1, (-1, self.config.d_model))
        return maps[:, self.covering, self.place]

    def step(self, state: DecodingState, step: int, previous: torch.Tensor | None):
        """The head's integer outputs [n, P] for generation step `step` given the values of step
        `step - 1` ([n] intensities or [n, C] pixels; None at step 0)."""
        if step != state.next_step:
            raise ValueError(f"step expected {state.next_step}, got {step}")
        x = self.step_input(state, step, previous)
        window = self.windows[step]
        for i, (block, cache, memory_kv) in enumerate(
            zip(self.blocks, state.caches, state.memory_kvs, strict=True)
        ):
            if i and state.block_signal is not None:
                x = (x + state.block_signal).clamp_(-self.max, self.max)
            x = block.step(x, step, cache, window, memory_kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        state.next_step = step + 1
        state.outside = self.outside(state, step)
        return self.anchored(self.head(x), state, step)

    def step_input(self, state: DecodingState, step: int, previous: torch.Tensor | None):
        """[n, d]: what enters the first block at step `step`: the position, the previous
        value's embedding and the signals of earlier values and of the conditioning."""
        x = self.position[step].expand(state.batch, -1)
        if step > 0:
            x = x + self.embed(previous, step - 1)
            if state.values is not None:
                state.values[:, step - 1] = previous.long()
        if self.above_embed is not None and self.above[step] >= 0:
            above = self.above[step]
            x = x + self.above_embed(state.values[:, above], above)
        for embed, steps in zip(self.near_embeds, self.near, strict=True):
            if steps[step] >= 0:
                x = x + embed(state.values[:, steps[step]], steps[step])
        if state.conditioning is not None:
            cond = state.conditioning
            x = x + cond[:, step if cond.shape[1] > 1 else 0]
        if self.remainder_table is not None and state.remainder_base is not None:
            x = x + self.remainder(state, step)
        return x.clamp(-self.max, self.max)

    @functools.cached_property
    def query_blocks(self) -> list[QueryBlock]:
        return QueryBlock.all(self.windows, QUERY_BLOCK, self.device)

    def teacher_forced(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's integer outputs [n, N, P] of every step of `images` at once, and (with
        low_res_bounds) the values each step may not take [n, N, 256], else None: what `step`
        gives step by step fed the true values, the same integers (tested), from a few
        operations a layer instead of a few a layer and step. What encoding can use, as all the
        values are known; decoding has to go step by step."""
        values = self.to_steps(images)
        n, steps = values.shape[:2]
        state = self.start(n, labels, self.low_res_of(images, low_res))
        if state.values is not None:  # the signals read earlier values: all known
            state.values.copy_(values)
        previous = [None, *values[:, :-1].unbind(1)]
        x = torch.stack([self.step_input(state, s, previous[s]) for s in range(steps)], 1)
        for i, (block, memory_kv) in enumerate(zip(self.blocks, state.memory_kvs, strict=True)):
            if i and state.block_signal is not None:
                x = (x + state.block_signal[:, None]).clamp_(-self.max, self.max)
            x = block.sequence(x, self.query_blocks, memory_kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        head = self.head(x)
        if self.anchor is not None:
            head = torch.stack([self.anchored(head[:, s], state, s) for s in range(steps)], 1)
        outside = None
        if self.config.low_res_bounds and state.remainder_base is not None:
            outside = torch.stack([self.outside(state, s) for s in range(steps)], 1)
        return head, outside

    def coding_tables(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        rows: int = 1 << 15,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(symbols [s, n], integer frequencies [s, n, k]) of every symbol the coder codes for
        `images`' values, in coding order (a step's symbols in turn, each for every image),
        about `rows` rows at a time: what `coded_tables` yields symbol by symbol, from one
        teacher-forced pass."""
        values = self.to_steps(images)
        n, steps = values.shape[:2]
        c = self.config
        widest = max(c.ffn_size, 3 * c.d_model, self.head.out_features)
        per = max(1, FORWARD_VALUES // (steps * widest))  # images a pass: bounded memory
        head = outside = None  # filled in place: no second copy of the passes' outputs
        for i in range(0, n, per):
            part_head, part_outside = self.teacher_forced(
                images[i : i + per],
                None if labels is None else labels[i : i + per],
                None if low_res is None else low_res[i : i + per],
            )
            if head is None:
                head = part_head.new_empty((n, *part_head.shape[1:]))
                if part_outside is not None:
                    outside = part_outside.new_empty((n, *part_outside.shape[1:]))
            head[i : i + per] = part_head
            if outside is not None:
                outside[i : i + per] = part_outside
        chunk = max(1, rows // n)
        for start in range(0, steps, chunk):
            part = slice(start, min(start + chunk, steps))
            rows_of = [t if t is None else t[:, part].transpose(0, 1) for t in (head, outside)]
            yield self._tables(*rows_of, values[:, part].transpose(0, 1))

    def _tables(self, head: torch.Tensor, outside: torch.Tensor | None, values: torch.Tensor):
        """(symbols [s * parts, n], frequencies [s * parts, n, k]) of a few steps' values
        [s, n, ...] under their head outputs [s, n, P] (and `outside` [s, n, 256])."""
        s, n = values.shape[:2]
        outside = None if outside is None else outside.reshape(s * n, -1)
        coding = self.coding(head.reshape(s * n, -1), outside)
        known = values.reshape(s * n, -1)
        symbols, tables = [], []

        def record(chosen: torch.Tensor, freqs: torch.Tensor):
            symbols.append(chosen.view(s, n))
            tables.append(freqs.view(s, n, -1))
            return chosen, symbol_bits(freqs, chosen)

        for channel in range(coding.channels):
            coding.code(channel, record, known[:, channel])
        return torch.stack(symbols, 1).flatten(0, 1), torch.stack(tables, 1).flatten(0, 1)

    def anchored(self, head: torch.Tensor, state: DecodingState, step: int) -> torch.Tensor:
        """With `mixture_anchor`: the head outputs [n, P] with the decoded anchor pixel's
        values (2^-16 units of the [-1, 1] scale, the float model's `anchored` in integers)
        added to every component's channel means."""
        if self.anchor is None or self.anchor[step] < 0:
            return head
        k, c = self.num_mixtures, self.channels
        pixel = self.unit_values[state.values[:, self.anchor[step]]].to(head.dtype)  # [n, C]
        locs = head[:, k : k + k * c].view(-1, k, c) + pixel[:, None]
        return torch.cat([head[:, :k], locs.flatten(1), head[:, k + k * c :]], 1)

    def outside(self, state: DecodingState, step: int) -> torch.Tensor | None:
        """[n, 256]: with `low_res_bounds`, the values step `step` may not take (the float
        model's `value_bounds`, by the same integer arithmetic); None without."""
        if not self.config.low_res_bounds or state.remainder_base is None:
            return None
        earlier_sum = state.values[:, self.earlier[step]].sum(1)
        to_come = self.to_come[step]
        total = state.remainder_base[:, step]
        return outside_bounds(*value_bounds(total, earlier_sum, to_come, self.config.scale))

    def coding(self, head: torch.Tensor, outside: torch.Tensor | None = None):
        """The integer frequencies of the rows whose head outputs (float64 integers) are
        `head` [n, P], and with low_res_bounds the values they may not take `outside` [n, 256]
        (`DecodingState.outside` after a step)."""
        head = head.long()
        if self.config.output == "cat":
            return CategoricalCoding(self, head, outside)
        return MixtureCoding(self, head)

    def coded_tables(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(symbols [n], integer frequencies [n, k]) of every symbol the coder codes for
        `images`' values, in coding order, with the true values fed back (what the encoder
        computes). A super-resolution model is given the images' own area-downsampled copies
        unless `low_res` is."""
        values = self.to_steps(images)
        n = values.shape[0]
        state = self.start(n, labels, self.low_res_of(images, low_res))
        tables: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(symbols: torch.Tensor, freqs: torch.Tensor):
            tables.append((symbols, freqs))
            return symbols, symbol_bits(freqs, symbols)

        for step in range(self.config.num_positions):
            head = self.step(state, step, values[:, step - 1] if step else None)
            coding = self.coding(head, state.outside)
            value = values[:, step].view(n, -1)
            for channel in range(coding.channels):
                coding.code(channel, record, value[:, channel])
                yield from tables
                tables.clear()

    def low_res_of(self, images: torch.Tensor, low_res: torch.Tensor | None):
        if self.encoder is None or low_res is not None:
            return low_res
        return area_downsample(images, self.config.scale)

    def bits(self, images: torch.Tensor, labels=None, low_res=None) -> torch.Tensor:
        """Exact bits [n] each image costs under the integer model (float64 of exact ratios),
        given its label or low-resolution input where the model takes one."""
        total = torch.zeros(images.shape[0], dtype=torch.float64, device=self.device)
        for symbols, freqs in self.coding_tables(images, labels, low_res):
            total += symbol_bits(freqs.flatten(0, 1), symbols.flatten()).view(symbols.shape).sum(0)
        return total


def _read_metadata(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 2**26:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable integer model ({err}); delete it") from None
    return header.get("__metadata__", {})


# Making one from a float model ---------------------------------------------------------------
def calibrate(model, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Largest magnitude of every activation the integer model quantises, over a full forward
    pass of the float model on `images` (and `labels`): `res` (every residual stream, LayerNorm
    input and output, the encoder's output), and per block (`3`, `encoder.3`) its queries, keys,
    values (`.q`, `.k`, `.v`), hidden units (`.hidden`) and encoder-decoder attention's
    (`.cross.q`, ...)."""
    seen: dict[str, float] = {}

    def note(name: str, tensor: torch.Tensor) -> None:
        seen[name] = max(seen.get(name, 0.0), float(tensor.detach().abs().max()))

    hooks = []

    def watch_output(module, name):
        hooks.append(module.register_forward_hook(lambda m, i, o: note(name, o)))

    def watch_input(module, name):
        hooks.append(module.register_forward_pre_hook(lambda m, i: note(name, i[0])))

    stacks = [("", model.blocks)]
    if model.encoder is not None:
        stacks.append(("encoder.", model.encoder.blocks))
        watch_output(model.encoder, "res")
    for prefix, blocks in stacks:
        for i, block in enumerate(blocks):
            name = f"{prefix}{i}"
            watch_input(block, "res")
            watch_output(block, "res")
            norms = [block.norm1, block.norm2]
            attentions = [(block.attn, name)]
            if block.cross_attn is not None:
                norms.append(block.norm_cross)
                attentions.append((block.cross_attn, f"{name}.cross"))
            for norm in norms:
                watch_input(norm, "res")
                watch_output(norm, "res")
            for attn, where in attentions:
                for part in ("query", "key", "value"):
                    watch_output(getattr(attn, part), f"{where}.{part[0]}")
            watch_input(block.ffn[2], f"{name}.hidden")
    if model.config.norm_first:
        watch_output(model.final_norm, "res")
    try:
        with model.evaluating():
            for start in range(0, len(images), 16):
                chunk = None if labels is None else labels[start : start + 16]
                model.logits_in_generation_order(images[start : start + 16], chunk)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def quantize(model, images: torch.Tensor, labels: torch.Tensor | None = None) -> IntegerModel:
    """The integer model of float `model`, its activation scales calibrated on `images` (a few
    training images, uint8 [B, C, H, W]; with their `labels` for a class-conditional model)."""
    config = model.config
    model = model.cpu() if next(model.parameters()).device.type != "cpu" else model
    if config.num_classes and labels is None:
        raise UserError("a class-conditional model is calibrated on labelled images")
    n = min(len(images), CALIBRATION_IMAGES)
    labels = None if labels is None or not config.num_classes else labels[:n].cpu()
    seen = calibrate(model, images[:n].cpu(), labels)
    d = config.d_model
    res_max = residual_max(d)
    unit = pow2_scale(seen["res"], res_max)

    def block_scales(name: str) -> dict:
        scales = {"hidden": pow2_scale(seen[f"{name}.hidden"], ACT_MAX)}
        for attn in ("", ".cross"):
            if f"{name}{attn}.q" in seen:
                key = "cross" if attn else "attn"
                scales[key] = {a: pow2_scale(seen[f"{name}{attn}.{a}"], ACT_MAX) for a in "qkv"}
        return scales

    store = Store()
    store.put_int("res_max", res_max)
    root_d = math.sqrt(d)
    with torch.no_grad():
        table_of(store, "position", model.position_signal(), 1.0, unit, res_max)
        Embedding.make(store, "embed", model.embed, config, unit, res_max)
        if model.above_embed is not None:
            Embedding.make(store, "above_embed", model.above_embed, config, unit, res_max)
        for i, embed in enumerate(model.near_embeds or []):
            Embedding.make(store, f"near_embeds.{i}", embed, config, unit, res_max)
        if model.class_embed is not None:
            scale = config.class_multiplier
            table_of(store, "class_embed", model.class_embed.weight, scale, unit, res_max)
        if model.low_res_embed is not None:
            table_of(store, "low_res_embed", model.low_res_embed.weight, root_d, unit, res_max)
        if model.low_res_remainder is not None:
            weight = model.low_res_remainder.weight
            table_of(store, "low_res_remainder", weight, root_d, unit, res_max)
        if model.low_res_upsample is not None:  # inputs 2v - 255 in units of 1/255, times sqrt(d)
            upsample = model.low_res_upsample
            Linear.make(
                store, "low_res_upsample", upsample, 1 / 255, 255, unit / root_d, -res_max, res_max
            )
        if model.encoder is not None:
            scales = [block_scales(f"encoder.{i}") for i in range(config.encoder_layers)]
            Encoder.make(store, model.encoder, unit, res_max, scales)
        for i, block in enumerate(model.blocks):
            Block.make(store, f"blocks.{i}", block, unit, res_max, block_scales(str(i)))
        if config.norm_first:
            LayerNorm.make(store, "final_norm", model.final_norm, unit, res_max)
        Linear.make(
            store, "head", model.head, unit, res_max, head_units(config), -HEAD_MAX, HEAD_MAX
        )
    store.put("exp2_attention", attention_table())
    store.put("exp2_output", exp2_table(OUT_FRAC, OUT_BITS))
    if config.output == "dmol":
        log_scales = np.arange((LS_HI - LS_LO) << LS_FRAC | 1) / 2.0**LS_FRAC + LS_LO
        store.put("inverse_scale", np.exp(-log_scales) * 2.0**INV_FRAC)
        raw = np.arange(2 * COEF_RANGE << COEF_IN_FRAC | 1) / 2.0**COEF_IN_FRAC - COEF_RANGE
        store.put("tanh", np.tanh(raw) * 2.0**COEF_FRAC)
        store.put("logistic_cdf", logistic_table())
        store.put("edges", fixed_unit_values(range(-254, 255, 2)))  # (2j - 256), j = 1..255
        store.put("unit_values", fixed_unit_values(range(-255, 256, 2)))  # (2v - 255)
    check_exact(config)
    return IntegerModel(config, store)


def head_units(config: ImageTransformerConfig) -> np.ndarray:
    """What one integer unit of each head output is worth: logits in 2^-12 of a bit (in nats,
    2^-12 ln 2), then for dmol the means, log-scales and coefficients in their fixed points."""
    logit = 2.0**-OUT_FRAC * math.log(2)
    if config.output == "cat":
        return np.full(256, logit)
    k, c = config.num_mixtures, config.image_shape[0]
    parts = [
        np.full(k, logit),
        np.full(k * c, 2.0**-LOC_FRAC),
        np.full(k * c, 2.0**-LS_FRAC),
        np.full(k * c * (c - 1) // 2, 2.0**-COEF_IN_FRAC),
    ]
    return np.concatenate(parts)


def check_exact(config: ImageTransformerConfig) -> None:
    """The bounds that make the float64 products exact, from the bit widths: q.k over a head,
    and the attention weights (< 2^21) times values over the most keys a query reads (the ring
    buffer, or the super-resolution encoder's positions)."""
    keys = AttentionPattern.from_config(config).cache_span
    if config.task == "superres":
        keys = max(keys, math.prod(config.low_res_shape))
    head_dim = config.d_model // config.num_heads
    if ACT_MAX**2 * head_dim >= EXACT or keys * (1 << ATT_BITS) * ACT_MAX >= EXACT:
        raise UserError(
            f"integer model: attention over {keys} keys of {head_dim} dimensions does not fit "
            "exact float64 products"
        )
