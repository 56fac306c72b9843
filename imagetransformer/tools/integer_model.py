"""The integer model: the decoding step in arithmetic whose every result is the same on every
machine, for `compress` / `decompress` (docs/file-format.md, "The integer model").

A range coder needs the encoder and the decoder to compute bit-identical probabilities. The float
network does not: its results differ in the last bits between CPU kernels (AVX2, AVX-512, MKL
settings), thread counts, batch groupings and devices. This module derives from a trained model
an integer twin of its decoding step (after Balle, Johnston and Minnen, "Integer networks for
data compression with latent-variable models", ICLR 2019):

- weights quantised per output channel (at most 16 bits), activations in fixed point (24 bits
  on the residual stream and LayerNorm outputs, 16 bits for queries, keys, values, attention
  outputs and hidden units), with power-of-two scales calibrated on a few training images;
- matrix products on integer-valued float64 tensors whose every partial sum stays below 2^53
  (checked from the bit widths when the model is made), so any summation order, kernel, thread
  count or device gives the same exact integers; everything else in int64;
- rescaling by integer multipliers and rounding shifts; the exponentials of the softmaxes, the
  logistic CDF and tanh of the mixture output, and the inverse scale exp(-log s) by lookup tables
  made once, stored with the model (no machine recomputes them); LayerNorm's square root as an
  exact integer square root;
- each step's distribution as integer frequencies that sum to 2^24 - 256; the coder adds one to
  every symbol, so symbol x has probability exactly (f_x + 1) / 2^24 (see `FREQ_FREE`).

The tables and weights are kept as named integer tensors (`Store`): the same object is made by
`quantize` and read back by `IntegerModel.load`, and its SHA-256 (`fingerprint`) names it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
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
from ..model import above_steps, covering_pixel
from ..outputs import LOG_SCALE_MIN, output_distribution
from ..pattern import AttentionPattern

FORMAT = "imagetransformer integer model 1"
EXACT = 2**53  # float64 holds every integer of smaller magnitude exactly
WEIGHT_MAX = 2**15 - 1  # weights: at most 16 bits, per output channel
RES_MAX = 2**23 - 1  # the residual stream and LayerNorm outputs: 24 bits
ACT_MAX = 2**15 - 1  # queries, keys, values, attention outputs, hidden units: 16 bits
MARGIN = 2.0  # headroom over the largest activation seen in calibration
CALIBRATION_IMAGES = 64

FREQ_BITS = 24  # constriction's default precision: frequencies in units of 2^-24
# what `frequencies` sums to: constriction gives every one of the 256 symbols one unit more,
# which makes its scale exactly 1 and symbol x's probability exactly (f_x + 1) / 2^24
FREQ_FREE = (1 << FREQ_BITS) - 256

ATT_FRAC, ATT_BITS = 10, 20  # attention softmax: exponents in 2^-10 of a bit, weights < 2^20
OUT_FRAC, OUT_BITS = 12, 24  # output logits in 2^-12 of a bit, their exponentials < 2^24
LN_FRAC = 24  # LayerNorm's normalised values in 2^-24
HEAD_MAX = 2**40

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
MIX_BITS = 24  # mixture weights renormalised to about 2^24


# Integer helpers -------------------------------------------------------------------------------
def rshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """x / 2^shift rounded (halves up), in integers."""
    return (x + (1 << (shift - 1))) >> shift if shift > 0 else x


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) of int64 v in [0, 2^62), exactly: the float estimate is within one of it
    (v rounds to 53 bits, the square root is correctly rounded), and one correction each way
    makes it exact on any machine."""
    r = torch.sqrt(v.double()).long()
    r = torch.where(r * r > v, r - 1, r)
    return torch.where((r + 1) * (r + 1) <= v, r + 1, r)


def exp2_neg(t: torch.Tensor, table: torch.Tensor, frac: int) -> torch.Tensor:
    """2^(bits - t / 2^frac) for int64 t >= 0, from `table` (2^frac entries: the fractional
    part) and a shift (the integer part)."""
    return table[t & ((1 << frac) - 1)] >> (t >> frac)


def bit_length_of(bound: float) -> int:
    return int(math.ceil(bound)).bit_length()


def frequencies(weights: torch.Tensor, bound_bits: int) -> torch.Tensor:
    """Integer frequencies [..., 256] summing to `FREQ_FREE`, proportional to non-negative int64
    `weights` [..., 256] whose rows sum to less than 2^bound_bits (and are not all zero). What
    rounding leaves over goes to the first of the largest weights."""
    weights = weights >> max(0, bound_bits + FREQ_BITS - 62)  # so that w * FREQ_FREE < 2^62
    total = weights.sum(-1, keepdim=True)
    freqs = torch.div(weights * FREQ_FREE, total.clamp(min=1), rounding_mode="floor")
    freqs = torch.where(total > 0, freqs, FREQ_FREE // 256)  # cannot happen; kept exact anyway
    rest = FREQ_FREE - freqs.sum(-1, keepdim=True)
    index = torch.arange(weights.shape[-1], device=weights.device)
    largest = weights == weights.amax(-1, keepdim=True)
    first = torch.where(largest, index, weights.shape[-1]).amin(-1, keepdim=True)
    return freqs.scatter_add(-1, first, rest)


def pow2_scale(max_abs: float, qmax: int) -> float:
    """The power of two s with max_abs * MARGIN <= qmax * s: a scale that does not move with the
    last bits of the calibration's float results (except at a power of two)."""
    need = max(max_abs, 1e-30) * MARGIN / qmax
    mantissa, exponent = math.frexp(need)  # need = mantissa * 2^exponent, mantissa in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


# The store: named integers -------------------------------------------------------------------
@dataclass
class Store:
    """What an integer model is made of: int64 tensors and integers, by name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)

    def put(self, name: str, values) -> None:
        if name in self.tensors:
            raise ValueError(f"integer model: {name} is set twice")
        array = np.asarray(values)
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or np.abs(array).max(initial=0) >= 2**62:
                raise UserError(f"integer model: {name} is not finite or out of range")
            array = np.rint(array)
        self.tensors[name] = torch.from_numpy(np.array(array, dtype=np.int64))

    def put_int(self, name: str, value: int) -> None:
        if name in self.ints:
            raise ValueError(f"integer model: {name} is set twice")
        self.ints[name] = int(value)

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        return self.tensors[name].to(device)

    def fingerprint(self, config_json: str) -> bytes:
        digest = hashlib.sha256(FORMAT.encode())
        digest.update(config_json.encode())
        digest.update(json.dumps(self.ints, sort_keys=True).encode())
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().astype("<i8").tobytes())
        return digest.digest()


class Rescale:
    """y = round(x * m[o]) for int64 x with |x| <= bound, in integers: x is first shifted to 31
    bits, then multiplied by a 31-bit multiplier and shifted back (every product < 2^62)."""

    @staticmethod
    def make(store: Store, name: str, m, bound: float) -> None:
        m = np.asarray(m, dtype=np.float64)
        pre = max(0, bit_length_of(bound) - 31)
        top = float(np.max(m)) * 2.0**pre
        exponent = math.frexp(top)[1] if top > 0 else -31  # top < 2^exponent
        shift = min(62, 31 - exponent)
        if shift < 1:
            raise UserError(f"integer model: the rescaling of {name} does not fit 64 bits")
        store.put(f"{name}.mult", np.rint(m * 2.0 ** (pre + shift)))
        store.put_int(f"{name}.pre", pre)
        store.put_int(f"{name}.shift", shift)

    def __init__(self, store: Store, name: str, device: torch.device) -> None:
        self.mult = store.get(f"{name}.mult", device)
        self.pre = store.ints[f"{name}.pre"]
        self.shift = store.ints[f"{name}.shift"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rshift(rshift(x, self.pre) * self.mult, self.shift)


class Linear:
    """An integer linear layer: float64 matrix product of integers (exact), int64 bias, rescale
    to the output's units, clamp."""

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
        w_max = min(WEIGHT_MAX, (EXACT // 2) // (in_max * fan_in))  # partial sums < 2^52
        if w_max < 127:
            raise UserError(
                f"integer model: {name} is too wide for exact float64 products ({fan_in} inputs)"
            )
        largest = np.abs(weight).max(axis=1)
        w_scale = np.where(largest > 0, largest, 1.0) / w_max
        store.put(f"{name}.weight", np.clip(np.rint(weight / w_scale[:, None]), -w_max, w_max))
        acc_unit = in_unit * w_scale
        bound = float(in_max) * fan_in * w_max
        if layer.bias is not None:
            bias = np.rint(layer.bias.detach().cpu().double().numpy() / acc_unit)
            bias = np.clip(bias, -(EXACT // 2), EXACT // 2)
            store.put(f"{name}.bias", bias)
            bound += float(np.abs(bias).max(initial=0))
        Rescale.make(store, name, acc_unit / np.asarray(out_unit, dtype=np.float64), bound)
        store.put_int(f"{name}.lo", lo)
        store.put_int(f"{name}.hi", hi)

    def __init__(self, store: Store, name: str, device: torch.device) -> None:
        self.weight = store.get(f"{name}.weight", device).double()  # exact: |w| < 2^15
        bias = store.tensors.get(f"{name}.bias")
        self.bias = None if bias is None else bias.to(device)
        self.rescale = Rescale(store, name, device)
        self.lo, self.hi = store.ints[f"{name}.lo"], store.ints[f"{name}.hi"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = F.linear(x.double(), self.weight).long()
        if self.bias is not None:
            acc = acc + self.bias
        return self.rescale(acc).clamp(self.lo, self.hi)


class LayerNorm:
    """LayerNorm in integers: u = d x - sum(x) (exact), its norm by an exact integer square root,
    u * sqrt(d) / norm in 2^-24, then gain and bias per channel and a rescale."""

    @staticmethod
    def make(store: Store, name: str, norm: nn.LayerNorm, unit: float) -> None:
        d = norm.normalized_shape[0]
        log_d = (d - 1).bit_length()
        u_bits = (2 * d * RES_MAX).bit_length()
        shift = max(0, u_bits - (61 - log_d) // 2)  # so that d * u^2 < 2^62
        gain = norm.weight.detach().cpu().double().numpy()
        bias = norm.bias.detach().cpu().double().numpy()
        g_scale = max(float(np.abs(gain).max()), 1e-30) / WEIGHT_MAX
        acc_unit = g_scale * 2.0**-LN_FRAC
        store.put(f"{name}.gain", np.rint(gain / g_scale))
        bias_q = np.clip(np.rint(bias / acc_unit), -(2**52), 2**52)
        store.put(f"{name}.bias", bias_q)
        eps = norm.eps * float(d) ** 3 / (unit * unit * 4.0**shift)
        store.put_int(f"{name}.eps", int(min(max(round(eps), 1), 2**60)))
        store.put_int(f"{name}.sqrt_d", round(math.sqrt(d) * 2**LN_FRAC))
        store.put_int(f"{name}.u_shift", shift)
        bound = (math.sqrt(d) * 2**LN_FRAC + 1) * WEIGHT_MAX + float(np.abs(bias_q).max())
        Rescale.make(store, name, acc_unit / unit, bound)

    def __init__(self, store: Store, name: str, device: torch.device) -> None:
        self.gain = store.get(f"{name}.gain", device)
        self.bias = store.get(f"{name}.bias", device)
        self.eps = store.ints[f"{name}.eps"]
        self.sqrt_d = store.ints[f"{name}.sqrt_d"]
        self.u_shift = store.ints[f"{name}.u_shift"]
        self.rescale = Rescale(store, name, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        u = rshift(d * x - x.sum(-1, keepdim=True), self.u_shift)
        norm = isqrt((u * u).sum(-1, keepdim=True) + self.eps)
        normalised = torch.div(u * self.sqrt_d, norm, rounding_mode="floor")
        return self.rescale(normalised * self.gain + self.bias).clamp(-RES_MAX, RES_MAX)


def exp2_table(frac: int, bits: int) -> np.ndarray:
    return np.rint(2.0**bits * np.exp2(-np.arange(1 << frac) / 2.0**frac))


class Attention:
    """Attention in integers: integer scores, softmax by an exponential table relative to each
    query's largest admitted score, the weighted mean of the values by one exact product and a
    rounded division. One generation step over the key/value ring buffer (`step`), unmasked over
    a whole sequence (`full`: the super-resolution encoder) or over an encoder's keys and values
    (`over`: encoder-decoder attention)."""

    @staticmethod
    def make(store: Store, name: str, attn: nn.Module, unit: float, scales: dict) -> None:
        d = attn.query.weight.shape[0]
        stacked = nn.Linear(d, 2 * d, bias=False)
        stacked.weight = nn.Parameter(torch.cat([attn.key.weight, attn.value.weight]).detach())
        units = np.repeat([scales["k"], scales["v"]], d)
        Linear.make(store, f"{name}.q", attn.query, unit, RES_MAX, scales["q"], -ACT_MAX, ACT_MAX)
        Linear.make(store, f"{name}.kv", stacked, unit, RES_MAX, units, -ACT_MAX, ACT_MAX)
        Linear.make(store, f"{name}.out", attn.out, scales["v"], ACT_MAX, unit, -RES_MAX, RES_MAX)
        head_dim = attn.head_dim
        m = scales["q"] * scales["k"] / math.sqrt(head_dim) * math.log2(math.e) * 2**ATT_FRAC
        cap = min(math.ceil(((ATT_BITS + 1) << ATT_FRAC) / m) + 1, 2 * ACT_MAX**2 * head_dim)
        store.put_int(f"{name}.cap", cap)
        Rescale.make(store, f"{name}.scores", m, cap)

    def __init__(self, store: Store, name: str, device: torch.device, heads: int) -> None:
        self.heads = heads
        self.q = Linear(store, f"{name}.q", device)
        self.kv = Linear(store, f"{name}.kv", device)
        self.out = Linear(store, f"{name}.out", device)
        self.cap = store.ints[f"{name}.cap"]
        self.scores = Rescale(store, f"{name}.scores", device)
        self.table = store.get("exp2_attention", device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, d] -> [..., h, n, dh]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [b, h, n, dh] (float64 holding integers) of a sequence [b, n, d]."""
        k, v = self.kv(source).double().chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(self, x, keys, values, allowed: torch.Tensor | None) -> torch.Tensor:
        """Queries of x [b, n, d] over keys and values [b, h, m, dh]; `allowed` [n or 1, m]
        (None: all) -> [b, n, d]."""
        q = self._heads(self.q(x)).double()
        z = torch.matmul(q, keys.transpose(-1, -2)).long()  # [b, h, n, m]: exact, < 2^53
        if allowed is not None:
            z = torch.where(allowed, z, -(2**62))  # below any score; top - z stays in range
        top = z.amax(-1, keepdim=True)
        t = self.scores((top - z).clamp(0, self.cap)).clamp(max=(ATT_BITS + 1) << ATT_FRAC)
        e = exp2_neg(t, self.table, ATT_FRAC)  # < 2^20, masked keys 0 (t capped)
        if allowed is not None:
            e = torch.where(allowed, e, 0)
        num = torch.matmul(e.double(), values).long()  # [b, h, n, dh]: exact, < 2^53
        den = e.sum(-1, keepdim=True)  # >= 2^20: the largest score's weight
        o = torch.div(2 * num + den, 2 * den, rounding_mode="floor")  # round(num / den)
        return self.out(o.transpose(-2, -3).flatten(-2))

    def step(self, x: torch.Tensor, step: int, cache: Cache, allowed: torch.Tensor):
        """x [b, d] at generation step `step`: its key and value go into the ring buffer."""
        k, v = self.keys_values(x[:, None])
        slot = step % cache.keys.shape[2]
        cache.keys[:, :, slot] = k[:, :, 0]
        cache.values[:, :, slot] = v[:, :, 0]
        return self.attend(x[:, None], cache.keys, cache.values, allowed[None])[:, 0]

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.keys_values(x), None)

    def over(self, x: torch.Tensor, keys_values) -> torch.Tensor:
        return self.attend(x[:, None], *keys_values, None)[:, 0]


@dataclass
class Cache:
    keys: torch.Tensor  # [n, h, span, dh] float64 holding integers
    values: torch.Tensor


class Block:
    """Self-attention, (super-resolution) encoder-decoder attention and the feed-forward layer,
    each with its residual and LayerNorm, pre- or post-norm as the float block."""

    def __init__(self, store: Store, name: str, device: torch.device, config) -> None:
        self.norm_first = config.norm_first
        heads = config.num_heads
        self.attn = Attention(store, f"{name}.attn", device, heads)
        self.norm1 = LayerNorm(store, f"{name}.norm1", device)
        self.norm2 = LayerNorm(store, f"{name}.norm2", device)
        self.ffn1 = Linear(store, f"{name}.ffn1", device)
        self.ffn2 = Linear(store, f"{name}.ffn2", device)
        self.cross = None
        if f"{name}.cross_attn.cap" in store.ints:
            self.cross = Attention(store, f"{name}.cross_attn", device, heads)
            self.norm_cross = LayerNorm(store, f"{name}.norm_cross", device)

    @staticmethod
    def make(store: Store, name: str, block: nn.Module, unit: float, scales: dict) -> None:
        Attention.make(store, f"{name}.attn", block.attn, unit, scales["attn"])
        LayerNorm.make(store, f"{name}.norm1", block.norm1, unit)
        LayerNorm.make(store, f"{name}.norm2", block.norm2, unit)
        hidden = scales["hidden"]
        Linear.make(store, f"{name}.ffn1", block.ffn[0], unit, RES_MAX, hidden, 0, ACT_MAX)
        Linear.make(store, f"{name}.ffn2", block.ffn[2], hidden, ACT_MAX, unit, -RES_MAX, RES_MAX)
        if block.cross_attn is not None:
            Attention.make(store, f"{name}.cross_attn", block.cross_attn, unit, scales["cross"])
            LayerNorm.make(store, f"{name}.norm_cross", block.norm_cross, unit)

    def run(self, x: torch.Tensor, attend, attend_memory=None) -> torch.Tensor:
        sublayers = [(self.norm1, attend)]
        if self.cross is not None:
            sublayers.append((self.norm_cross, attend_memory))
        sublayers.append((self.norm2, lambda h: self.ffn2(self.ffn1(h))))
        for norm, f in sublayers:
            x = residual_add(x, f(norm(x))) if self.norm_first else norm(residual_add(x, f(x)))
        return x

    def step(self, x, step, cache, allowed, memory_kv=None):
        return self.run(
            x,
            lambda h: self.attn.step(h, step, cache, allowed),
            lambda h: self.cross.over(h, memory_kv),
        )


def residual_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x + y).clamp(-RES_MAX, RES_MAX)


# Output distributions in integers ------------------------------------------------------------
class CategoricalCoding:
    """The 256-way softmax of one step's logits as integer frequencies (one symbol per step)."""

    channels = 1

    def __init__(self, model: IntegerModel, head: torch.Tensor) -> None:
        weights = softmax_weights(head, model.exp2_output)
        self.freqs = frequencies(weights, OUT_BITS + 9)

    def frequencies(self, channel: int) -> torch.Tensor:
        return self.freqs

    def observe(self, channel: int, values: torch.Tensor) -> None:
        pass


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
    CDF at the 255 inner bin edges from the interpolated logistic table (so each component's
    masses are non-negative integers summing to 2^28), weighted by the components' posterior
    given the channels already coded, each coupled to them (as `LogisticMixture`)."""

    def __init__(self, model: IntegerModel, head: torch.Tensor) -> None:
        self.model = model
        k, c = model.num_mixtures, model.channels
        self.channels = c
        n = head.shape[0]
        locs = head[:, k : k + k * c].view(n, k, c)
        self.locs = locs.clamp(-LOC_MAX, LOC_MAX)
        log_scales = head[:, k + k * c : k + 2 * k * c].view(n, k, c)
        log_scales = log_scales.clamp(LS_LO << LS_FRAC, LS_HI << LS_FRAC)
        self.inv_scales = model.inverse_scale[log_scales - (LS_LO << LS_FRAC)]  # 2^-20
        raw = head[:, k + 2 * k * c :].view(n, k, -1)
        raw = raw.clamp(-COEF_RANGE << COEF_IN_FRAC, COEF_RANGE << COEF_IN_FRAC)
        self.coeffs = model.tanh[raw + (COEF_RANGE << COEF_IN_FRAC)]  # 2^-16
        self.weights = renormalise(softmax_weights(head[:, :k], model.exp2_output))
        self.x = torch.zeros(n, c, dtype=torch.long, device=head.device)  # 2^-16
        self.masses = None

    def component_masses(self, channel: int) -> torch.Tensor:
        """[n, K, 256]: each component's masses of channel `channel`'s values."""
        first = channel * (channel - 1) // 2
        mean = self.locs[..., channel]
        for earlier in range(channel):
            coupling = self.coeffs[..., first + earlier] * self.x[:, None, earlier]
            mean = mean + rshift(coupling, COEF_FRAC)
        u = (self.model.edges - mean[..., None]) * self.inv_scales[..., channel, None]
        cdf = logistic_cdf(u, self.model.sigmoid)  # [n, K, 255] in 2^-28
        cdf = F.pad(F.pad(cdf, (1, 0), value=0), (0, 1), value=1 << CDF_BITS)
        return cdf[..., 1:] - cdf[..., :-1]

    def frequencies(self, channel: int) -> torch.Tensor:
        self.masses = self.component_masses(channel)
        mixed = (self.weights[..., None] * self.masses).sum(1)  # [n, 256], sums < 2^53
        return frequencies(mixed, MIX_BITS + 1 + CDF_BITS)

    def observe(self, channel: int, values: torch.Tensor) -> None:
        """Channel `channel` is `values` [n]: weigh the components by their mass of it (plus
        one, so that no value leaves all of them at zero) and couple the later channels."""
        index = values.view(-1, 1, 1).expand(-1, self.masses.shape[1], 1)
        mass = self.masses.gather(-1, index)[..., 0]
        self.weights = renormalise(self.weights * (mass + 1))
        self.x[:, channel] = self.model.unit_values[values]


def logistic_cdf(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sigmoid(u) * 2^28 for u in 2^-36, by linear interpolation in a table every 2^-8 over
    [-24, 24]; non-decreasing in u, as the table is."""
    span = SIG_RANGE << U_FRAC
    s = u.clamp(-span, span) + span
    index = s >> (U_FRAC - SIG_STEP)
    frac = (s >> (U_FRAC - SIG_STEP - 16)) & 0xFFFF
    low = table[index]
    return low + rshift((table[index + 1] - low) * frac, 16)


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
    caches: list[Cache]
    memory_kvs: list  # per block: the encoder's keys and values (super-resolution), or None
    conditioning: torch.Tensor | None  # [n, 1 or N, d]: the class and low-resolution signals
    values: torch.Tensor | None = None  # [n, N, *value_shape]: the values so far (above_signal)
    next_step: int = 0


def table_of(store: Store, name: str, weight: torch.Tensor, scale: float, unit: float) -> None:
    """An embedding table times `scale`, in the residual stream's units."""
    store.put(name, (weight.detach().double() * scale / unit).clamp(-RES_MAX, RES_MAX))


class Embedding:
    """An input embedding of values in integers (the decoder's input and the above signal): a
    table row per (channel, intensity) times sqrt(d) (cat), or the integer linear layer and
    ReLU over the pixel's intensities on the [-1, 1] scale, 2v - 255 in units of 1/255 (dmol);
    in the residual stream's units."""

    @staticmethod
    def make(store: Store, name: str, embedding: nn.Module, config, unit: float) -> None:
        if config.output == "cat":
            table_of(store, name, embedding.weight, math.sqrt(config.d_model), unit)
        else:
            Linear.make(store, name, embedding, 1 / 255, 255, unit, 0, RES_MAX)

    def __init__(self, store: Store, name: str, device: torch.device, config, order) -> None:
        self.table = self.linear = None
        if config.output == "cat":
            self.table = store.get(name, device)
            self.step_channel = (order % config.image_shape[0]).to(device)
        else:
            self.linear = Linear(store, name, device)

    def __call__(self, values: torch.Tensor, step: int) -> torch.Tensor:
        """[n, d]: the embedding of `values` ([n] intensities or [n, C] pixels) generated at
        step `step`."""
        if self.table is not None:
            return self.table[self.step_channel[step] * 256 + values.long()]
        return self.linear(2 * values.long() - 255)


class Encoder:
    """The super-resolution encoder in integers: the low-resolution image embedded with its
    table and timing signal, unmasked attention blocks, the final LayerNorm (pre-norm)."""

    @staticmethod
    def make(store: Store, encoder: nn.Module, unit: float, scales: list[dict]) -> None:
        table_of(store, "encoder.embed", encoder.embed.weight, math.sqrt(encoder.d_model), unit)
        table_of(store, "encoder.position", encoder._timing, 1.0, unit)
        for i, block in enumerate(encoder.blocks):
            Block.make(store, f"encoder.blocks.{i}", block, unit, scales[i])
        if isinstance(encoder.final_norm, nn.LayerNorm):
            LayerNorm.make(store, "encoder.final_norm", encoder.final_norm, unit)

    def __init__(self, store: Store, device: torch.device, config) -> None:
        self.channel = raster_channel(config.low_res_shape).to(device)
        self.embed = store.get("encoder.embed", device)
        self.position = store.get("encoder.position", device)
        layers = range(config.encoder_layers)
        self.blocks = [Block(store, f"encoder.blocks.{i}", device, config) for i in layers]
        self.final_norm = None
        if "encoder.final_norm.gain" in store.tensors:
            self.final_norm = LayerNorm(store, "encoder.final_norm", device)

    def __call__(self, low_res: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, h, w] -> [n, C*h*w, d]."""
        tokens = self.channel * 256 + images_to_raster(low_res.long())
        x = (self.embed[tokens] + self.position).clamp(-RES_MAX, RES_MAX)
        for block in self.blocks:
            x = block.run(x, block.attn.full)
        return x if self.final_norm is None else self.final_norm(x)


class IntegerModel:
    """An integer twin of an `ImageTransformer`'s decoding step (both outputs; unconditional,
    class-conditional and super-resolution models, with or without the above signal). `start`
    and `step` give the head's integer outputs step by step; `coding` turns them into the
    integer frequencies of each channel in turn."""

    def __init__(
        self, config: ImageTransformerConfig, store: Store, device: torch.device | str = "cpu"
    ) -> None:
        self.config = config
        self.store = store
        self.device = device = torch.device(device)
        self.pattern = AttentionPattern.from_config(config)
        self.distribution = output_distribution(config)
        self.generation_order = self.pattern.generation_order.to(device)
        self.inverse_order = torch.argsort(self.pattern.generation_order).to(device)
        self.allowed = self.pattern.step_slot_mask.to(device)
        self.channels = config.image_shape[0]
        self.num_mixtures = config.num_mixtures
        self.position = store.get("position", device)
        order = self.generation_order
        self.embed = Embedding(store, "embed", device, config, order)
        self.above_embed = None
        if config.above_signal:
            self.above_embed = Embedding(store, "above_embed", device, config, order)
            # per step, the step of the value directly above (-1: the first row), on the host
            self.above = above_steps(config, self.pattern.generation_order).tolist()
        self.blocks = [
            Block(store, f"blocks.{i}", device, config) for i in range(config.num_layers)
        ]
        self.final_norm = LayerNorm(store, "final_norm", device) if config.norm_first else None
        self.head = Linear(store, "head", device)
        self.class_table = store.get("class_embed", device) if config.num_classes else None
        self.encoder = Encoder(store, device, config) if config.task == "superres" else None
        self.low_res_table = None
        if "low_res_embed" in store.tensors:
            self.low_res_table = store.get("low_res_embed", device)
            self.covering = covering_pixel(config)[self.pattern.generation_order].to(device)
        self.exp2_output = store.get("exp2_output", device)
        if config.output == "dmol":
            self.inverse_scale = store.get("inverse_scale", device)
            self.tanh = store.get("tanh", device)
            self.sigmoid = store.get("logistic_cdf", device)
            self.edges = store.get("edges", device)
            self.unit_values = store.get("unit_values", device)
        self._fingerprint: bytes | None = None

    # identity and files
    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the config, the integers and every table: what a file names."""
        if self._fingerprint is None:
            self._fingerprint = self.store.fingerprint(self.config.to_json())
        return self._fingerprint

    def to(self, device: torch.device | str) -> IntegerModel:
        return IntegerModel(self.config, self.store, device)

    def to_bytes(self, source: str = "") -> bytes:
        tensors = {}
        for name, tensor in self.store.tensors.items():
            small = tensor.abs().max() < 2**31 if tensor.numel() else True
            tensors[name] = tensor.to(torch.int32) if small else tensor
        metadata = {
            "format": FORMAT,
            "config": self.config.to_json(),
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
            tensors = {k: v.to(torch.int64) for k, v in safetensors_load(data).items()}
            config = ImageTransformerConfig.from_json(metadata["config"])
            store = Store(tensors, {k: int(v) for k, v in json.loads(metadata["ints"]).items()})
        except (OSError, SafetensorError, KeyError, ValueError, TypeError) as err:
            raise UserError(
                f"{path} is not a readable integer model ({type(err).__name__}: {err}); "
                "delete it and compress again to make it anew"
            ) from None
        model = cls(config, store, device)
        if model.fingerprint.hex() != metadata.get("fingerprint"):
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
        shape = (n, c.num_heads, span, head_dim)

        def zeros():
            return torch.zeros(shape, dtype=torch.float64, device=self.device)

        caches = [Cache(zeros(), zeros()) for _ in self.blocks]
        if (labels is None) != (self.class_table is None):
            raise UserError("labels go with class-conditional models, and only with them")
        if (low_res is None) != (self.encoder is None):
            raise UserError("low_res goes with super-resolution models, and only with them")
        conditioning = None
        if labels is not None:
            conditioning = self.class_table[labels.to(self.device).long()][:, None]
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
        values = None
        if self.above_embed is not None:  # every value so far: the rows above are read again
            shape = (n, c.num_positions, *self.distribution.value_shape)
            values = torch.zeros(shape, dtype=torch.long, device=self.device)
        return DecodingState(n, caches, memory_kvs, conditioning, values)

    def step(self, state: DecodingState, step: int, previous: torch.Tensor | None):
        """The head's integer outputs [n, P] for generation step `step` given the values of step
        `step - 1` ([n] intensities or [n, C] pixels; None at step 0)."""
        if step != state.next_step:
            raise ValueError(f"step expected {state.next_step}, got {step}")
        x = self.position[step].expand(state.batch, -1)
        if step > 0:
            x = x + self.embed(previous, step - 1)
            if state.values is not None:
                state.values[:, step - 1] = previous.long()
        if self.above_embed is not None and self.above[step] >= 0:
            above = self.above[step]
            x = x + self.above_embed(state.values[:, above], above)
        if state.conditioning is not None:
            cond = state.conditioning
            x = x + cond[:, step if cond.shape[1] > 1 else 0]
        x = x.clamp(-RES_MAX, RES_MAX)
        allowed = self.allowed[step]
        for block, cache, memory_kv in zip(
            self.blocks, state.caches, state.memory_kvs, strict=True
        ):
            x = block.step(x, step, cache, allowed, memory_kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        state.next_step = step + 1
        return self.head(x)

    def coding(self, head: torch.Tensor):
        if self.config.output == "cat":
            return CategoricalCoding(self, head)
        return MixtureCoding(self, head)

    def frequencies_of(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(step, channel, integer frequencies [n, 256]) of every symbol of `images` in coding
        order, with the true values fed back (what the encoder computes). A super-resolution
        model is given the images' own area-downsampled copies unless `low_res` is."""
        values = self.to_steps(images)
        n = values.shape[0]
        state = self.start(n, labels, self.low_res_of(images, low_res))
        for step in range(self.config.num_positions):
            head = self.step(state, step, values[:, step - 1] if step else None)
            coding = self.coding(head)
            value = values[:, step].view(n, -1)
            for channel in range(coding.channels):
                yield step, channel, coding.frequencies(channel)
                coding.observe(channel, value[:, channel])

    def low_res_of(self, images: torch.Tensor, low_res: torch.Tensor | None):
        if self.encoder is None or low_res is not None:
            return low_res
        return area_downsample(images, self.config.scale)

    def bits(self, images: torch.Tensor, labels=None, low_res=None) -> torch.Tensor:
        """Exact bits [n] each image costs under the integer model (float64 of exact ratios),
        given its label or low-resolution input where the model takes one."""
        values = self.to_steps(images).reshape(images.shape[0], -1, self.channels_per_step)
        total = torch.zeros(images.shape[0], dtype=torch.float64, device=self.device)
        for step, channel, freqs in self.frequencies_of(images, labels, low_res):
            f = freqs.gather(-1, values[:, step, channel, None])[:, 0]
            total += FREQ_BITS - torch.log2((f + 1).double())
        return total

    @property
    def channels_per_step(self) -> int:
        return 1 if self.config.output == "cat" else self.channels


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
    unit = pow2_scale(seen["res"], RES_MAX)

    def block_scales(name: str) -> dict:
        scales = {"hidden": pow2_scale(seen[f"{name}.hidden"], ACT_MAX)}
        for attn in ("", ".cross"):
            if f"{name}{attn}.q" in seen:
                key = "cross" if attn else "attn"
                scales[key] = {a: pow2_scale(seen[f"{name}{attn}.{a}"], ACT_MAX) for a in "qkv"}
        return scales

    store = Store()
    d = config.d_model
    with torch.no_grad():
        table_of(store, "position", model.position_signal(), 1.0, unit)
        Embedding.make(store, "embed", model.embed, config, unit)
        if model.above_embed is not None:
            Embedding.make(store, "above_embed", model.above_embed, config, unit)
        if model.class_embed is not None:
            table_of(store, "class_embed", model.class_embed.weight, math.sqrt(d), unit)
        if model.low_res_embed is not None:
            table_of(store, "low_res_embed", model.low_res_embed.weight, math.sqrt(d), unit)
        if model.encoder is not None:
            layers = range(config.encoder_layers)
            Encoder.make(store, model.encoder, unit, [block_scales(f"encoder.{i}") for i in layers])
        for i, block in enumerate(model.blocks):
            Block.make(store, f"blocks.{i}", block, unit, block_scales(str(i)))
        if config.norm_first:
            LayerNorm.make(store, "final_norm", model.final_norm, unit)
        Linear.make(
            store, "head", model.head, unit, RES_MAX, head_units(config), -HEAD_MAX, HEAD_MAX
        )
    store.put("exp2_attention", exp2_table(ATT_FRAC, ATT_BITS))
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
