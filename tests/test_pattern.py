"""The attention rule: an independent reading of docs/model.md (Attention) against `pattern.py`."""

import itertools

import pytest
import torch

from imagetransformer.pattern import AttentionPattern


def spec_generation_order(kind, rows, cols, query_shape):
    if kind != "local_2d":
        return list(range(rows * cols))
    qh, qw = query_shape
    order = []
    for br in range(rows // qh):
        for bc in range(cols // qw):
            for r in range(br * qh, (br + 1) * qh):
                for c in range(bc * qw, (bc + 1) * qw):
                    order.append(r * cols + c)
    return order


def spec_mask(
    kind, rows, cols, block_length=4, memory_length=4, query_shape=(2, 3), memory_flange=(1, 2)
):
    """docs/model.md's global, local_1d and local_2d rules written out with loops over cells,
    sharing no code with the package."""
    order = spec_generation_order(kind, rows, cols, query_shape)
    n = rows * cols
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        if j > i:
            continue
        if kind == "global":
            mask[i, j] = True
        elif kind == "local_1d":
            mask[i, j] = j >= (i // block_length) * block_length - memory_length
        else:
            (qh, qw), (fh, fw) = query_shape, memory_flange
            r, c = divmod(order[i], cols)
            rk, ck = divmod(order[j], cols)
            r0, c0 = r - r % qh, c - c % qw
            in_block = r0 <= rk < r0 + qh and c0 <= ck < c0 + qw
            top = r0 - fh <= rk < r0 and c0 - fw <= ck < c0 + qw + fw
            left = r0 <= rk < r0 + qh and c0 - fw <= ck < c0
            mask[i, j] = in_block or top or left
    return mask


CASES = [
    ("global", 3, 5, {}),
    ("local_1d", 3, 6, dict(block_length=4, memory_length=4)),
    ("local_1d", 4, 6, dict(block_length=5, memory_length=2)),  # N not a multiple of l
    ("local_1d", 2, 6, dict(block_length=3, memory_length=0)),
    ("local_2d", 4, 6, dict(query_shape=(2, 3), memory_flange=(1, 2))),
    ("local_2d", 6, 12, dict(query_shape=(2, 3), memory_flange=(2, 3))),
    ("local_2d", 6, 8, dict(query_shape=(3, 4), memory_flange=(4, 1))),
]


@pytest.mark.parametrize("kind,rows,cols,params", CASES)
def test_mask_matches_spec(kind, rows, cols, params):
    pattern = AttentionPattern.create(kind, rows, cols, **params)
    expected_order = spec_generation_order(kind, rows, cols, params.get("query_shape", (2, 3)))
    assert pattern.generation_order.tolist() == expected_order
    assert torch.equal(pattern.dense_mask(), spec_mask(kind, rows, cols, **params))


@pytest.mark.parametrize("kind,rows,cols,params", CASES)
def test_blocked_layout_is_the_dense_mask(kind, rows, cols, params):
    """Scattering the per-block key masks back must give exactly the dense mask."""
    pattern = AttentionPattern.create(kind, rows, cols, **params)
    key_index, key_mask = pattern.blocked_layout
    n, q = pattern.num_positions, pattern.query_block
    rebuilt = torch.zeros(n, n, dtype=torch.bool)
    for b in range(key_index.shape[0]):
        for offset in range(q):
            i = b * q + offset
            if i < n:
                rebuilt[i, key_index[b][key_mask[b, offset]]] = True
    assert torch.equal(rebuilt, pattern.dense_mask())


def test_generation_order_is_a_permutation():
    pattern = AttentionPattern.create("local_2d", 8, 12, query_shape=(4, 3), memory_flange=(2, 3))
    order = pattern.generation_order
    assert torch.equal(order.sort().values, torch.arange(96))
    # first block is rows 0-3, columns 0-2, in raster order inside the block
    assert order[:12].tolist() == [r * 12 + c for r in range(4) for c in range(3)]


def test_local_keys_are_bounded():
    """Local attention reads at most block + memory keys: the point of local attention."""
    pattern = AttentionPattern.create("local_1d", 32, 96, block_length=256, memory_length=256)
    key_index, _ = pattern.blocked_layout
    assert key_index.shape[1] == 512
    assert pattern.max_keys() == 512
    p2 = AttentionPattern.create("local_2d", 32, 96, query_shape=(8, 16), memory_flange=(8, 32))
    assert p2.blocked_layout[0].shape[1] <= 8 * 16 + 8 * (16 + 64) + 8 * 32


def test_every_query_sees_itself():
    for kind, rows, cols, params in CASES:
        mask = AttentionPattern.create(kind, rows, cols, **params).dense_mask()
        assert mask.diagonal().all()
        assert not mask.triu(1).any()


def test_band_form_only_where_keys_are_one_short_run():
    """Blocks whose keys form one short run of steps read a strided window; others gather."""
    band = AttentionPattern.create("local_1d", 4, 6, block_length=5, memory_length=3).banded_layout
    assert band is not None and band[:2] == (3, 8)
    # a tall, narrow flange over a wide image: the run would be ~10x the gathered keys
    sparse = AttentionPattern.create("local_2d", 8, 64, query_shape=(1, 2), memory_flange=(3, 2))
    assert sparse.banded_layout is None


def test_cache_span_is_the_attention_reach():
    """The sampler keeps only the steps later queries can still read."""
    assert (
        AttentionPattern.create("local_1d", 28, 28, block_length=56, memory_length=56).cache_span
        == 112
    )
    assert AttentionPattern.create("global", 4, 6).cache_span == 24
    p2 = AttentionPattern.create("local_2d", 32, 96, query_shape=(8, 16), memory_flange=(8, 32))
    assert p2.cache_span < 32 * 96 / 2
    for kind, rows, cols, params in CASES:  # no step reads a key older than the span
        pattern = AttentionPattern.create(kind, rows, cols, **params)
        steps = torch.arange(pattern.num_positions)
        age = (steps[:, None] - steps[None, :]).masked_fill(~pattern.dense_mask(), -1)
        assert age.max() < pattern.cache_span


def test_step_slot_mask_is_the_dense_mask_on_the_ring_buffer():
    """Step i reads slot s exactly when the key of the latest step with slot s is allowed."""
    for kind, rows, cols, params in CASES:
        pattern = AttentionPattern.create(kind, rows, cols, **params)
        n, span = pattern.num_positions, pattern.cache_span
        dense = pattern.dense_mask()
        expected = torch.zeros(n, span, dtype=torch.bool)
        for i in range(n):
            for j in range(max(0, i - span + 1), i + 1):  # what the ring holds at step i
                expected[i, j % span] = dense[i, j]
        assert torch.equal(pattern.step_slot_mask, expected), kind
