"""Compiled CPU kernels for the integer model's elementwise work (numba): the same arithmetic as
the torch operations they replace in `integer_model`, in the same order, one pass over the data
instead of one dispatch per operation.

Why the results are the same bits as the torch path on any machine:
- integer arithmetic (int64 shifts, products, floor divisions, sums) is exact;
- sums of integer-valued float64 below 2^53 are exact in any order;
- every other float64 operation is one IEEE-754 basic operation (+, -, *, /, sqrt, rounding to
  nearest even, min/max), correctly rounded, so the same bits on every instruction set: numba
  compiles without fast-math, so no two of them are fused into a multiply-add (tested).

The linear layers' products (`mm`: exact) stay with torch. What is here replaces the runs of
small operations between them (a linear layer's rescaling, the LayerNorm, the attention's table
softmax, and the output distributions' integer frequencies), whose cost at decoding's small
batches was dispatch, not arithmetic, and the decoding step's attention products over int16
caches, read in place where torch's `bmm` needed them widened to float64 first (their rows on
torch's threads: `in_parallel`).

Compiled on first use (a few seconds, once per machine) and cached on disk (numba's
`cache=True`). Where numba is not installed, on other devices, and with
IMAGETRANSFORMER_KERNELS=0, the integer model runs its torch operations instead (`on`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is in the codec extra
    numba = None


# IMAGETRANSFORMER_KERNELS=0: torch operations throughout (the same results; tests compare them)
ENABLED = numba is not None and os.environ.get("IMAGETRANSFORMER_KERNELS", "1") != "0"


def on(tensor: torch.Tensor) -> bool:
    """Whether the kernels do the work on `tensor`: numba installed, and a CPU tensor."""
    return ENABLED and tensor.device.type == "cpu"


def _jit(function):
    """Compiled without fast-math (IEEE operations one by one), cached on disk, releasing
    the GIL; the plain Python function where numba is missing (never called then)."""
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True)(function)


# The network ------------------------------------------------------------------------------------
@_jit
def rescale(x, bias, scale, lo, hi):
    """A linear layer after its product x [n, k] (in place): (x + bias) * scale, rounded to the
    nearest integer (halves to even), clamped to [lo, hi]."""
    n, k = x.shape
    for i in range(n):
        for j in range(k):
            v = np.rint((x[i, j] + bias[j]) * scale[j])
            x[i, j] = min(max(v, lo), hi)


@_jit
def layer_norm(x, gain, bias, eps, limit, out):
    """LayerNorm of integer rows x [n, d] into `out`: `integer_model.LayerNorm` operation by
    operation."""
    n, d = x.shape
    fd = float(d)
    inv_d = 1.0 / fd
    for i in range(n):
        total = 0.0
        squares = 0.0
        for j in range(d):
            total += x[i, j]
            squares += x[i, j] * x[i, j]
        spread = max(squares * fd - total * total, 0.0) + eps
        inverse = (1.0 / math.sqrt(spread)) * fd
        mean = total * inv_d
        for j in range(d):
            v = np.rint((x[i, j] - mean) * inverse * gain[j] + bias[j])
            out[i, j] = min(max(v, -limit), limit)


@_jit
def table_softmax(z, mask, scores, cap, table, e, totals):
    """Attention weights e [r, m] of scores z [r, m] (`Attention.attend`): each row's distance
    below its largest times `scores`, capped, truncated to an index into `table`; `mask`
    [k, m] (row i reads mask[i % k]; k = 0: none) adds 0 or -inf first. `totals` [r]: each
    row's sum (exact: integers)."""
    r, m = z.shape
    masks = mask.shape[0]
    for i in range(r):
        top = -np.inf
        for j in range(m):
            v = z[i, j]
            if masks:
                v += mask[i % masks, j]
            e[i, j] = v
            top = max(top, v)
        total = 0.0
        for j in range(m):
            weight = table[int(min((top - e[i, j]) * scores, cap))]
            e[i, j] = weight
            total += weight
        totals[i] = total


@_jit
def divide_round(num, totals):
    """num [r, k] / totals [r], rounded (halves to even), in place."""
    r, k = num.shape
    for i in range(r):
        for j in range(k):
            num[i, j] = np.rint(num[i, j] / totals[i])


# The output distributions -------------------------------------------------------------------------
@_jit
def frequencies_row(weights, shift, free, out):
    """`integer_model.frequencies` of one row."""
    k = weights.shape[0]
    total = 0
    first = 0
    for j in range(k):
        w = weights[j] >> shift
        total += w
        if w > weights[first] >> shift:
            first = j
    given = 0
    for j in range(k):
        f = ((weights[j] >> shift) * free) // total if total > 0 else free // k
        out[j] = f
        given += f
    out[first] += free - given


@_jit
def softmax_row(logits, table, frac, cap, out):
    """`integer_model.softmax_weights` of one row."""
    top = logits[0]
    for j in range(logits.shape[0]):
        top = max(top, logits[j])
    for j in range(logits.shape[0]):
        t = min(top - logits[j], cap)
        out[j] = table[t & ((1 << frac) - 1)] >> (t >> frac)


@_jit
def categorical(head, table, frac, cap, shift, free, out):
    """Integer frequencies [n, 256] of integer logits [n, 256] (`CategoricalCoding`)."""
    weights = np.empty(head.shape[1], np.int64)
    for i in range(head.shape[0]):
        softmax_row(head[i], table, frac, cap, weights)
        frequencies_row(weights, shift, free, out[i])


@_jit
def mixture_start(head, k, c, clamps, inverse_scale, tanh, exp2, frac, cap, mix_bits, locs, inv,
                  coeffs, weights):  # fmt: skip
    """`MixtureCoding.__init__` over integer head outputs [n, P]; `clamps`: the bounds of the
    means, the log-scales and the coefficients' arguments (LOC_MAX, LS_LO, LS_HI, COEF_RANGE,
    each in its units)."""
    loc_max, ls_lo, ls_hi, coef_range = clamps[0], clamps[1], clamps[2], clamps[3]
    pairs = c * (c - 1) // 2
    for i in range(head.shape[0]):
        for m in range(k):
            for ch in range(c):
                locs[i, m, ch] = min(max(head[i, k + m * c + ch], -loc_max), loc_max)
                s = min(max(head[i, k + k * c + m * c + ch], ls_lo), ls_hi)
                inv[i, m, ch] = inverse_scale[s - ls_lo]
            for p in range(pairs):
                a = min(max(head[i, k + 2 * k * c + m * pairs + p], -coef_range), coef_range)
                coeffs[i, m, p] = tanh[a + coef_range]
        softmax_row(head[i, :k], exp2, frac, cap, weights[i])
        renormalise_row(weights[i], mix_bits)


@_jit
def renormalise_row(weights, mix_bits):
    """`integer_model.renormalise` of one row, in place."""
    total = 0
    for m in range(weights.shape[0]):
        total += weights[m]
    q = max(total >> mix_bits, 1)
    for m in range(weights.shape[0]):
        weights[m] = weights[m] // q


@_jit
def logistic_cdf(u, table, slope, span, index_shift, frac_shift):
    """`integer_model.logistic_cdf` of one argument."""
    s = min(max(u, -span), span) + span
    index = s >> index_shift
    frac = (s >> frac_shift) & 0xFFFF
    return table[index] + ((slope[index] * frac + (1 << 15)) >> 16)


@_jit
def mixture_tables(locs, inv, coeffs, x, weights, channel, coef_frac, edges, high, cdf,
                   masses, freqs):  # fmt: skip
    """One channel's 16 masses per component [n, K, 16] and the mixture's integer frequencies
    [n, 16] (`MixtureCoding.code`): of the 16 ranges of 16 values (`high` None: edges every 16
    bound) or of the 16 values of range `high` [n]. `edges`: `IntegerModel.bound_edges`; `cdf`:
    (table, slope, span, index shift, fraction shift, shift, free) as `logistic_cdf` and
    `frequencies_row` take them."""
    table, slope, span, index_shift, frac_shift, shift, free = cdf
    n, k = weights.shape
    first = channel * (channel - 1) // 2
    mixed = np.empty(16, np.int64)
    for i in range(n):
        base, stride = (0, 16) if high is None else (16 * high[i], 1)
        mixed[:] = 0
        for m in range(k):
            mean = locs[i, m, channel]
            for e in range(channel):
                mean += (coeffs[i, m, first + e] * x[i, e] + (1 << (coef_frac - 1))) >> coef_frac
            s = inv[i, m, channel]
            below = logistic_cdf((edges[base] - mean) * s, table, slope, span, index_shift,
                                 frac_shift)  # fmt: skip
            for j in range(16):
                edge = edges[base + (j + 1) * stride]
                above = logistic_cdf((edge - mean) * s, table, slope, span, index_shift,
                                     frac_shift)  # fmt: skip
                masses[i, m, j] = above - below
                mixed[j] += weights[i, m] * (above - below)
                below = above
        frequencies_row(mixed, shift, free, freqs[i])


@_jit
def mixture_update(masses, high, low, weights, x, channel, unit_values, mix_bits, values):
    """After a channel's value high * 16 + low [n]: each component weighed by its mass of it
    (plus one) and renormalised, the value kept for the later channels' means."""
    for i in range(weights.shape[0]):
        for m in range(weights.shape[1]):
            weights[i, m] = weights[i, m] * (masses[i, m, low[i]] + 1)
        renormalise_row(weights[i], mix_bits)
        values[i] = high[i] * 16 + low[i]
        x[i, channel] = unit_values[values[i]]


# Attention over int16 caches ----------------------------------------------------------------------
def _jit_rows(function):
    """As `_jit`, with the rows of a `prange` loop run on several threads (`in_parallel`)."""
    if numba is None:  # pragma: no cover
        return function
    return numba.njit(cache=True, nogil=True, parallel=True)(function)


def in_parallel(kernel, *args) -> None:
    """Run a parallel kernel on as many threads as torch uses, and leave torch's count as it
    was. numba's `omp` threading layer shares OpenMP's threads with torch (awake after torch's
    operations, so fast: numba's own `workqueue` pool took 1.7x as long to decode the digits),
    and starting it sets OpenMP's thread count to the number of cores."""
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@_jit_rows
def cached_scores(q, cache, start, length, z):
    """z [b h, length] = q [b h, dh] (int32) . the keys of the ring buffer `cache` [slots, 2,
    b, h, dh] (int16) at slots start..start + length: `bmm` of the widened window, in int64
    (exact; the compiler vectorises integer sums as it may not float ones), without widening."""
    h, dh = cache.shape[3], cache.shape[4]
    for row in numba.prange(q.shape[0]):
        image, head = row // h, row % h
        for slot in range(length):
            acc = 0
            for j in range(dh):
                acc += np.int64(q[row, j]) * np.int64(cache[start + slot, 0, image, head, j])
            z[row, slot] = acc


@_jit_rows
def cached_values(e, cache, start, num):
    """num [b h, dh] = e [b h, length] . the values of `cache` at slots start..start + length:
    the weighted values' `bmm` of `Attention.attend` (its division: `divide_round`), each
    output its own float64 sum of exact integer products in slot order."""
    length = e.shape[1]
    h, dh = cache.shape[3], cache.shape[4]
    for row in numba.prange(e.shape[0]):
        image, head = row // h, row % h
        for j in range(dh):
            num[row, j] = 0.0
        for slot in range(length):
            weight = e[row, slot]
            for j in range(dh):
                num[row, j] += weight * cache[start + slot, 1, image, head, j]
