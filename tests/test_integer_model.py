"""The integer model behind compress/decompress: its probabilities follow the float model's, its
frequencies are what the coder needs, its arithmetic is exact, and it is stored and named by
its contents."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from imagetransformer import ImageTransformer, UserError
from imagetransformer.tools import integer_kernels, integer_model
from imagetransformer.tools.integer_model import (
    FREQ_BITS,
    FREQ_FREE,
    IntegerModel,
    free_units,
    frequencies,
    quantize,
    rshift,
)

from .helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 4, (n, 3, 4, 6), generator=g) * 85  # a few levels: not noise
    return coarse.to(torch.uint8)


SUPERRES = dict(
    task="superres",
    scale=2,
    image_shape=(3, 4, 4),
    query_shape=(2, 2),
    memory_flange=(1, 2),
    encoder_layers=1,
    low_res_signal=True,
)
CASES = {
    "cat post-norm local_2d": ("local_2d", dict(output="cat")),
    "cat pre-norm global": ("global", dict(output="cat", norm_first=True)),
    "dmol pre-norm local_1d": ("local_1d", dict(output="dmol", norm_first=True)),
    "cat class-conditional": ("local_1d", dict(output="cat", num_classes=3)),
    "dmol super-resolution": ("local_2d", dict(output="dmol", **SUPERRES)),
    "cat above_signal local_2d": ("local_2d", dict(output="cat", above_signal=True)),
    "dmol above_signal local_1d": ("local_1d", dict(output="dmol", above_signal=True)),
    "dmol mixture_anchor local_2d": ("local_2d", dict(output="dmol", mixture_anchor=True)),
}


EVERY_BLOCK = "cat class_signal=every_block"
CASES[EVERY_BLOCK] = ("local_1d", dict(output="cat", num_classes=3, class_signal="every_block"))
CASES["cat super-resolution low_res_upsample"] = (
    "local_1d",
    dict(output="cat", **{**SUPERRES, "image_shape": (3, 4, 6), "low_res_upsample": True}),
)
CASES["cat near_signal local_2d"] = ("local_2d", dict(output="cat", near_signal=True))
CASES["dmol near_signal above_signal local_1d"] = (
    "local_1d",
    dict(output="dmol", near_signal=True, above_signal=True),
)
CASES["cat class_dropout class_scale"] = (
    "local_1d",
    dict(output="cat", num_classes=3, class_dropout=0.1, class_scale=1.0),
)
CASES["cat super-resolution low_res_remainder local_2d"] = (
    "local_2d",
    dict(output="cat", **{**SUPERRES, "image_shape": (3, 4, 6), "low_res_remainder": True}),
)
CASES["cat grey super-resolution low_res_remainder"] = (
    "local_1d",
    dict(output="cat", **{**SUPERRES, "image_shape": (1, 4, 6), "low_res_remainder": True}),
)
CASES["cat super-resolution low_res_bounds"] = (
    "local_1d",
    dict(output="cat", **{**SUPERRES, "image_shape": (3, 4, 6), "low_res_bounds": True}),
)
CASES["cat grey super-resolution low_res_bounds low_res_remainder"] = (
    "local_2d",
    dict(
        output="cat",
        **{**SUPERRES, "image_shape": (1, 4, 6), "low_res_bounds": True},
        low_res_remainder=True,
    ),
)
CASES["dmol grey local_2d"] = ("local_2d", dict(output="dmol", image_shape=(1, 4, 6)))
CASES["dmol super-resolution low_res_remainder"] = (
    "local_1d",
    dict(output="dmol", **{**SUPERRES, "low_res_remainder": True}),
)


def _case_model(case: str):
    """The model of `case` (its zero-initialised tables made to matter), its integer twin, and
    images and labels for it."""
    kind, options = CASES[case]
    model = ImageTransformer(tiny_config(kind, **options)).eval()
    tables = (model.class_embed, model.low_res_embed, model.low_res_upsample)
    for table in (*tables, model.low_res_remainder):
        if table is not None:
            torch.nn.init.normal_(table.weight, std=0.3)
    c, _, w = model.config.image_shape
    images = _images()[:, :c, :, :w].contiguous()
    labels = torch.tensor([0, 1, 2, 1]) if model.config.num_classes else None
    return model, quantize(model, images, labels), images, labels


@pytest.mark.parametrize("case", CASES)
def test_integer_bits_follow_the_float_model(case):
    """Each image's exact cost under the integer model is within 0.01% of the float model's
    (measured: about 2e-6 relative), given its label or low-resolution input where the model
    takes one. With above_signal, leaving the integer model's above signal out moves them by
    about 1e-3: the tolerance sees it."""
    model, integer, images, labels = _case_model(case)
    bits = integer.bits(images, labels)
    float_bits = model.bits_per_dim(images, labels).double() * images[0].numel()
    assert torch.allclose(bits, float_bits, rtol=1e-4)


@pytest.mark.parametrize("queries", [64, 5])
@pytest.mark.parametrize("case", CASES)
def test_the_teacher_forced_pass_gives_the_step_by_step_tables(case, queries):
    """Encoding computes every step at once (`coding_tables`: blocks of queries over the keys
    they may read, any block size, a few steps of tables at a time); decoding can only go step
    by step (`coded_tables`, the decoder's arithmetic). Every symbol and every frequency agree
    exactly, in the same order."""
    _, integer, images, labels = _case_model(case)
    integer.query_blocks = integer_model.QueryBlock.all(integer.windows, queries, integer.device)
    steps = [(s, f) for s, f in integer.coded_tables(images, labels)]
    chunks = list(integer.coding_tables(images, labels, rows=12))
    assert len(chunks) > 1
    symbols, freqs = torch.cat([s for s, _ in chunks]), torch.cat([f for _, f in chunks])
    assert torch.equal(symbols, torch.stack([s for s, _ in steps]))
    assert torch.equal(freqs, torch.stack([f for _, f in steps]))


@pytest.mark.parametrize("case", ["cat super-resolution low_res_bounds", "dmol pre-norm local_1d"])
def test_a_teacher_forced_pass_a_few_images_at_a_time_gives_the_same_tables(case, monkeypatch):
    """Encoding bounds its memory by running the teacher-forced pass over a few images at a
    time (one here): the decoder's symbols and frequencies, step by step, the values each step
    may not take (low_res_bounds) included."""
    _, integer, images, labels = _case_model(case)
    steps = list(integer.coded_tables(images, labels))
    monkeypatch.setattr(integer_model, "FORWARD_VALUES", 1)
    chunks = list(integer.coding_tables(images, labels, rows=12))
    symbols, freqs = torch.cat([s for s, _ in chunks]), torch.cat([f for _, f in chunks])
    assert torch.equal(symbols, torch.stack([s for s, _ in steps]))
    assert torch.equal(freqs, torch.stack([f for _, f in steps]))


@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_frequencies_are_what_the_coder_reads_exactly(output):
    """Every table is non-negative integers summing to 2^24 less one per symbol (256 values of
    a categorical step; 16 ranges, then 16 values of one, of a mixture's channel); constriction
    adds one to each, so the coded length is the exact cost the model computes, (f + 1) / 2^24
    (within the coder's final words)."""
    constriction = pytest.importorskip("constriction")
    model = ImageTransformer(tiny_config("local_1d", output=output)).eval()
    images = _images(3)
    integer = quantize(model, images)
    family = constriction.stream.model.Categorical(perfect=False)
    coder = constriction.stream.queue.RangeEncoder()
    sizes = set()
    for symbols, freqs in integer.coded_tables(images):
        assert freqs.dtype == torch.int64 and bool((freqs >= 0).all())
        assert bool((freqs.sum(-1) == free_units(freqs.shape[-1])).all())
        sizes.add(freqs.shape[-1])
        coder.encode(symbols.numpy().astype(np.int32), family, freqs.numpy().astype(np.float64))
    assert sizes == ({256} if output == "cat" else {16})
    exact = float(integer.bits(images).sum())
    coded = 32 * len(coder.get_compressed())
    assert exact <= coded <= exact + 64


def test_integer_helpers_are_exact():
    x = torch.tensor([-7, -6, -5, -4, 4, 5, 6, 7, 2**60 + 3])
    assert rshift(x, 2).tolist() == [(2 * v + 4) // 8 for v in x.tolist()]  # round(v / 4)
    far = [0] * 100 + [9] + [0] * 99 + [9] + [1] * 55  # equal maxima far apart
    weights = torch.tensor([[3, 0, 5, 5] + [0] * 252, [1] * 7 + [0] * 249, far])
    freqs = frequencies(weights, 12)
    assert freqs.sum(-1).tolist() == [FREQ_FREE] * 3
    assert freqs[0, 1] == 0 and freqs[0, 2] > freqs[0, 3]  # the leftover goes to the first max
    assert freqs[1, 0] > freqs[1, 1] and freqs[2, 100] > freqs[2, 200]
    assert FREQ_FREE + 256 == 1 << FREQ_BITS == free_units(16) + 16
    nothing = frequencies(torch.zeros(1, 16, dtype=torch.long), 12)  # a range without mass
    assert nothing.sum().item() == free_units(16) and nothing.amax() - nothing.amin() <= 15


def test_edges_beyond_the_ends_give_the_cdf_exactly_0_and_1():
    """The mixture's boundaries below value 0 and above 255 are edges far enough out that any
    component (any mean, any scale the head can give) has CDF exactly 0 and 2^28 there, with no
    int64 overflow: what masking them to 0 and 2^28 gave."""
    model = ImageTransformer(tiny_config("local_1d", output="dmol")).eval()
    integer = quantize(model, _images())
    means = torch.tensor([-integer_model.LOC_MAX, 0, integer_model.LOC_MAX])
    scales = integer.inverse_scale[[0, -1]]
    for edge, expected in ((integer.bound_edges[0], 0), (integer.bound_edges[-1], 1 << 28)):
        u = (edge - means[:, None]) * scales[None]
        assert bool((u.abs() < 2**62).all())
        cdf = integer_model.logistic_cdf(u, integer.sigmoid, integer.sigmoid_slope)
        assert cdf.tolist() == [[expected] * 2] * 3


def test_saved_integer_model_is_named_by_its_contents(tmp_path):
    """Saving and loading keeps the fingerprint; quantizing the same weights on the same images
    gives the same model; a damaged file is refused in one line."""
    model = ImageTransformer(tiny_config("local_2d", output="dmol")).eval()
    images = _images()
    integer = quantize(model, images)
    assert quantize(model, images).fingerprint == integer.fingerprint
    path = tmp_path / "codec.safetensors"
    integer.save(path, source="abc")
    loaded = IntegerModel.load(path)
    assert loaded.fingerprint == integer.fingerprint
    assert IntegerModel.read_source(path) == (integer.fingerprint.hex(), "abc")
    assert torch.equal(loaded.bits(images), integer.bits(images))
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x01  # a bit of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        IntegerModel.load(path)


def test_class_conditional_models_need_labels():
    model = ImageTransformer(tiny_config("local_1d", num_classes=3)).eval()
    with pytest.raises(UserError, match="labelled"):
        quantize(model, _images())
    integer = quantize(model, _images(), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(UserError, match="labels"):
        integer.bits(_images())


def test_a_config_field_at_its_default_leaves_the_name_as_it_was(tmp_path):
    """The fingerprint covers the config's fields that differ from their defaults: a model
    written before a (defaulted) field existed and the same model now have one name, so a
    later release remakes the name of the files it coded; a field off its default changes it."""
    model = ImageTransformer(tiny_config("local_1d")).eval()
    integer = quantize(model, _images())
    written = json.loads(integer.config_json)
    del written["above_signal"], written["class_scale"]  # as releases before them wrote it
    older = IntegerModel(integer.config, integer.store, config_json=json.dumps(written))
    assert older.fingerprint == integer.fingerprint
    written["dropout"] = 0.25
    other = IntegerModel(integer.config, integer.store, config_json=json.dumps(written))
    assert other.fingerprint != integer.fingerprint


def test_a_model_saved_under_its_older_name_keeps_it(tmp_path):
    """Models cached before the name left out defaulted fields carry the name over the whole
    config: loading accepts it and keeps it (the files they coded name it), and a damaged one
    is still refused."""
    model = ImageTransformer(tiny_config("local_1d")).eval()
    integer = quantize(model, _images())
    older = IntegerModel(integer.config, integer.store, config_json=integer.config_json)
    assert older.take_name(integer.older_fingerprint[:8])
    assert older.fingerprint == integer.older_fingerprint != integer.fingerprint
    path = tmp_path / "older.safetensors"
    older.save(path)
    loaded = IntegerModel.load(path)
    assert loaded.fingerprint == integer.older_fingerprint
    assert loaded.to("cpu").fingerprint == integer.older_fingerprint  # moved, still named so
    assert not loaded.take_name(b"\x00" * 8)
    assert torch.equal(loaded.bits(_images()), integer.bits(_images()))
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        IntegerModel.load(path)


def test_an_integer_model_of_another_format_is_refused_by_name(tmp_path, monkeypatch):
    model = ImageTransformer(tiny_config("local_1d")).eval()
    integer = quantize(model, _images())
    path = tmp_path / "codec-old.safetensors"
    monkeypatch.setattr(integer_model, "FORMAT", "imagetransformer integer model 1")
    integer.save(path)
    monkeypatch.undo()
    with pytest.raises(UserError, match="codec-old.safetensors is an integer model of another"):
        IntegerModel.load(path)


@pytest.mark.parametrize("kind", ["local_1d", "local_2d", "global"])
def test_each_step_reads_a_window_that_holds_exactly_its_keys(kind):
    """The window of the newest steps a step's query reads (in the doubled ring buffer) admits
    exactly the steps the attention rule admits, and is no longer than the ring buffer."""
    from imagetransformer.pattern import AttentionPattern
    from imagetransformer.tools.integer_model import KeyWindow

    pattern = AttentionPattern.from_config(tiny_config(kind))
    allowed = pattern.step_slot_mask
    span = allowed.shape[1]
    for step, window in enumerate(KeyWindow.all(pattern, torch.device("cpu"))):
        steps = range(step + 1 - window.length, step + 1)  # what its slots hold
        admitted = {j for j, m in zip(steps, window.mask.tolist(), strict=True) if m == 0}
        expected = {j for j in range(max(0, step + 1 - span), step + 1) if allowed[step, j % span]}
        assert admitted == expected and window.length <= span
        assert window.start == steps[0] % span and window.start + window.length <= 2 * span


@pytest.mark.parametrize("case", ["dmol pre-norm local_1d", "cat super-resolution low_res_bounds"])
def test_float64_and_int16_caches_code_the_same_tables(case):
    """The caches' dtype is a speed choice: int16 caches (widened each step) and float64 caches
    give every symbol the same integer frequencies."""
    kind, options = CASES[case]
    model = ImageTransformer(tiny_config(kind, **options)).eval()
    c, _, w = model.config.image_shape
    images = _images()[:, :c, :, :w].contiguous()
    integer = quantize(model, images)
    tables = {}
    for dtype in (torch.int16, torch.float64):
        integer.cache_dtype = dtype
        tables[dtype] = list(integer.coded_tables(images))
        assert (
            integer.start(2, low_res=integer.low_res_of(images[:2], None)).caches[0].dtype == dtype
        )
    assert len(tables[torch.int16]) == len(tables[torch.float64]) > 0
    for (s16, f16), (s64, f64) in zip(tables[torch.int16], tables[torch.float64], strict=True):
        assert torch.equal(s16, s64) and torch.equal(f16, f64)


def test_caches_are_int16_but_float64_where_torch_reads_windows_that_fit_the_cache(monkeypatch):
    from imagetransformer.tools.integer_model import cache_dtype, last_level_cache_bytes

    cpu = torch.device("cpu")
    monkeypatch.setattr(integer_kernels, "ENABLED", True)  # the kernels read int16 in place
    assert cache_dtype(8 << 10, cpu) == torch.int16
    monkeypatch.setattr(integer_kernels, "ENABLED", False)  # torch's products: by the cache
    monkeypatch.setattr(integer_model, "last_level_cache_bytes", lambda: 32 << 20)
    assert cache_dtype(8 << 20, cpu) == torch.float64
    assert cache_dtype(29 << 20, cpu) == torch.int16
    assert cache_dtype(1 << 10, torch.device("meta")) == torch.int16  # not a CPU: int16
    monkeypatch.setattr(integer_model, "last_level_cache_bytes", lambda: 0)  # unknown: int16
    assert cache_dtype(1 << 10, cpu) == torch.int16
    last_level_cache_bytes.cache_clear()
    assert last_level_cache_bytes() >= 0  # what this machine reports (0: nothing readable)


# The compiled kernels against the torch operations ----------------------------------------------
needs_kernels = pytest.mark.skipif(
    not integer_kernels.ENABLED, reason="numba is in the codec extra"
)


def _both_paths(monkeypatch, compute):
    """compute() with the compiled kernels, then with torch operations throughout."""
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(integer_kernels, "ENABLED", enabled)
        results.append(compute())
    return results


@needs_kernels
@pytest.mark.parametrize("case", CASES)
def test_compiled_kernels_code_what_the_torch_operations_code(case, monkeypatch):
    """The kernels fuse runs of the step's operations (linear rescaling, LayerNorm, attention
    softmax, frequencies): step by step and teacher-forced, every symbol and every frequency of
    every model kind is the same integer as the torch path's, and every head output."""
    _, integer, images, labels = _case_model(case)

    def tables():
        state = integer.start(len(images), labels, integer.low_res_of(images, None))
        values = integer.to_steps(images)
        heads = [integer.step(state, s, values[:, s - 1] if s else None) for s in range(4)]
        stepped = list(integer.coded_tables(images, labels))
        forced = list(integer.coding_tables(images, labels, rows=12))
        return heads, stepped, forced

    compiled, reference = _both_paths(monkeypatch, tables)
    for ours, theirs in zip(compiled, reference, strict=True):
        flat_ours = [t for item in ours for t in (item if isinstance(item, tuple) else (item,))]
        flat_theirs = [t for item in theirs for t in (item if isinstance(item, tuple) else (item,))]
        assert len(flat_ours) == len(flat_theirs) > 0
        assert all(torch.equal(a, b) for a, b in zip(flat_ours, flat_theirs, strict=True))


@needs_kernels
def test_compiled_kernels_match_on_extreme_integers(monkeypatch):
    """Random integers across the whole range each layer admits, exact halves for the
    roundings, masked keys, rows of equal logits and logits far apart: LayerNorm, linear
    layers, attention and both output distributions give the torch path's bits. A fused
    multiply-add anywhere (the LayerNorm's gain and bias) would change some of them."""
    model = ImageTransformer(tiny_config("local_1d", output="dmol", norm_first=True)).eval()
    integer = quantize(model, _images())
    block, g = integer.blocks[0], torch.Generator().manual_seed(3)
    top = integer.max
    x = torch.randint(-top, top + 1, (257, model.config.d_model), generator=g).double()
    x[0] = top  # a row of equal values: zero variance
    d = model.config.d_model
    odd = torch.randint(-1000, 1000, (64, d), generator=g).double() * 2 + 1
    q = torch.randint(-(2**15), 2**15, (8, 5, 3, 4), generator=g).double()
    keys = torch.randint(-(2**15), 2**15, (8, 5, 7, 4), generator=g).double()
    mask = torch.zeros(3, 7, dtype=torch.float64).masked_fill_(
        torch.rand(3, 7, generator=g) < 0.4, -math.inf
    )
    mask[:, 0] = 0  # every query reads one key at least
    width = integer.head.out_features
    head = torch.randint(-(2**40), 2**40, (300, width), generator=g)
    head[:100] //= 2**28  # nearer the clamps' insides
    logits = torch.randint(-(2**30), 2**30, (50, 256), generator=g)
    logits[0] = 7  # all equal
    known = torch.randint(0, 256, (300, 3), generator=g)

    def compute():
        halving = block.ffn1.rows(slice(0, d))  # (odd + even) / 2: halves to round
        halving.weight_t = torch.eye(d, dtype=torch.float64)
        halving.bias = torch.arange(d, dtype=torch.float64) * 2
        halving.scale = torch.full((d,), 0.5, dtype=torch.float64)
        linear = halving(odd.clone())
        norms = [block.norm1(x), integer.final_norm(x)]
        attended = block.attn.attend(q, keys, keys.flip(-1), mask)
        stepped = block.attn.attend(
            q.flatten(0, 1)[:, :1], keys.flatten(0, 1), keys.flatten(0, 1), mask[0]
        )
        cat = integer_model.CategoricalCoding(integer, logits).freqs
        coding, tables = integer_model.MixtureCoding(integer, head), []
        for channel in range(3):
            coding.code(
                channel, lambda s, f: (tables.append(f.clone()), (s, f[:, 0]))[1], known[:, channel]
            )
        return [linear, *norms, attended, stepped, cat, *tables, coding.weights]

    compiled, reference = _both_paths(monkeypatch, compute)
    for ours, theirs in zip(compiled, reference, strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_square_roots_are_correctly_rounded():
    """The LayerNorm's square root is IEEE-754's correctly rounded one (the same bits on every
    machine): each lies within half a unit in the last place of the exact root. torch.sqrt on
    the CPU is MKL's, whose last bit follows the instruction set MKL picks."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, 2**62, (4000,), generator=g).double() * torch.rand(
        4000, generator=g, dtype=torch.float64
    )
    roots = integer_model.sqrt_rounded(x.clone())
    for value, root in zip(x.tolist(), roots.tolist(), strict=True):
        below = Fraction(root) + (Fraction(math.nextafter(root, 0)) - Fraction(root)) / 2
        above = Fraction(root) + (Fraction(math.nextafter(root, math.inf)) - Fraction(root)) / 2
        assert below * below <= Fraction(value) <= above * above


@needs_kernels
def test_kernels_compile_without_fused_multiply_adds(monkeypatch):
    """Each kernel, compiled afresh for this CPU (the cached code cannot be inspected), has no
    fused multiply-add in its machine code and no fast-math flag: each float64 operation is
    rounded on its own, as torch and every other CPU round it. (Rounded integers seldom show a
    one-ulp difference, so comparing results alone would not find one.)"""
    numba = pytest.importorskip("numba")
    test_compiled_kernels_match_on_extreme_integers(monkeypatch)
    monkeypatch.setattr(integer_kernels, "ENABLED", True)
    _, integer, images, _ = _case_model("dmol pre-norm local_1d")
    list(integer.coded_tables(images))  # decoding steps over int16 caches: every kernel run
    fused = re.compile(r"\bv?f(n?m(add|sub)|madd)\w*", re.IGNORECASE)
    source = Path(integer_model.__file__).read_text()
    called = set(re.findall(r"kernels\.(\w+)", source))
    checked = 0
    for name in dir(integer_kernels):
        kernel = getattr(integer_kernels, name)
        if not isinstance(kernel, numba.core.registry.CPUDispatcher):
            continue
        if name in called:  # the rest run inside them, compiled into their code
            assert kernel.signatures, f"{name} was not run"
        assert not kernel.targetoptions.get("fastmath"), name
        options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
        fresh = numba.njit(**options)(kernel.py_func)
        for signature in kernel.signatures:
            fresh.compile(signature)
            assert not fused.search(fresh.inspect_asm(signature)), name
            llvm = fresh.inspect_llvm(signature)
            flags = "fast|contract|arcp|afn|reassoc|nnan|ninf|nsz"
            assert not re.search(rf"\bf(add|sub|mul|div) ({flags})", llvm), name
            checked += 1
    assert checked >= 10
