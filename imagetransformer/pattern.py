"""The attention rule (SPEC.md section 2), in one place, in every form a consumer needs.

Every attention type is two things: a generation order (a permutation of raster positions) and
a predicate `allowed(q, k)` over positions *in generation order*. Everything else here (the
dense mask, the gathered key blocks of the `blocked` backend, the `mask_mod` of the `flex`
backend, the keys a sampling step reads) is derived from `allowed`, so no backend re-derives
the rule.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange

from .config import ImageTransformerConfig


class AttentionPattern:
    """Generation order and key-visibility rule for one attention type on one position grid.

    `rows x cols` is the position grid: H x W*C for the categorical layout. Queries are grouped
    into blocks of `query_block` consecutive positions in generation order; the `blocked`
    backend and the sampler work per block.
    """

    def __init__(
        self,
        kind: str,
        rows: int,
        cols: int,
        block_length: int = 256,
        memory_length: int = 256,
        query_shape: tuple[int, int] = (8, 16),
        memory_flange: tuple[int, int] = (8, 32),
    ) -> None:
        self.kind = kind
        self.rows, self.cols = rows, cols
        self.num_positions = rows * cols
        self.block_length = block_length
        self.memory_length = memory_length
        self.query_shape = tuple(query_shape)
        self.memory_flange = tuple(memory_flange)
        self._cells_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # the forms below moved to a device, filled by the attention backends on first use
        self.device_forms: dict[tuple[str, torch.device], object] = {}
        if kind == "local_2d" and (rows % query_shape[0] or cols % query_shape[1]):
            raise ValueError(f"query_shape {query_shape} does not tile a {rows}x{cols} grid")

    @classmethod
    def from_config(cls, config: ImageTransformerConfig) -> AttentionPattern:
        rows, cols = config.grid_shape
        return _cached_pattern(
            config.attention,
            rows,
            cols,
            config.block_length,
            config.effective_memory_length,
            tuple(config.query_shape),
            tuple(config.memory_flange),
        )

    # Order and cells ---------------------------------------------------------------------------
    @functools.cached_property
    def generation_order(self) -> torch.Tensor:
        """Entry i is the raster index generated at step i."""
        raster = torch.arange(self.num_positions)
        if self.kind != "local_2d":
            return raster
        qh, qw = self.query_shape
        grid = raster.view(self.rows, self.cols)
        return rearrange(grid, "(br qh) (bc qw) -> (br bc qh qw)", qh=qh, qw=qw).contiguous()

    @functools.cached_property
    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid row and column of the cell at each generation step."""
        order = self.generation_order
        return order // self.cols, order % self.cols

    def cells_on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """`cells` on `device`, moved once and reused (a captured tensor must share the device
        of the indices that read it, e.g. inside a compiled flex_attention kernel)."""
        device = torch.device(device)
        if device not in self._cells_by_device:
            self._cells_by_device[device] = tuple(t.to(device) for t in self.cells)
        return self._cells_by_device[device]

    @property
    def query_block(self) -> int:
        """Queries per block: the unit the `blocked` backend gathers keys for."""
        if self.kind == "local_1d":
            return min(self.block_length, self.num_positions)
        if self.kind == "local_2d":
            return self.query_shape[0] * self.query_shape[1]
        return min(256, self.num_positions)

    # The rule ----------------------------------------------------------------------------------
    def allowed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cells: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """May query step `q` attend to key step `k`? Broadcasts; both in generation order.

        With the shift of SPEC.md 1.3, position k holds the element generated at step k-1, so
        `k <= q` is exactly causal. Written with elementwise ops and indexing into the `cells`
        table only, so it also runs under `vmap` and inside flex_attention's traced `mask_mod`
        (see `mask_mod`). `cells`: that table on `q`'s device (default: `cells_on(q.device)`).
        """
        causal = k <= q
        if self.kind == "global":
            return causal
        if self.kind == "local_1d":
            block_start = torch.div(q, self.block_length, rounding_mode="floor") * self.block_length
            return causal & (k >= block_start - self.memory_length)
        row, col = self.cells_on(q.device) if cells is None else cells
        qh, qw = self.query_shape
        fh, fw = self.memory_flange
        r0 = torch.div(row[q], qh, rounding_mode="floor") * qh
        c0 = torch.div(col[q], qw, rounding_mode="floor") * qw
        rk, ck = row[k], col[k]
        top = (rk >= r0 - fh) & (rk < r0) & (ck >= c0 - fw) & (ck < c0 + qw + fw)
        same_rows = (rk >= r0) & (rk < r0 + qh) & (ck >= c0 - fw) & (ck < c0 + qw)
        return causal & (top | same_rows)

    # Forms for consumers -----------------------------------------------------------------------
    def dense_mask(self) -> torch.Tensor:
        """The [N, N] boolean mask in generation order (the `dense` backend, tests)."""
        steps = torch.arange(self.num_positions)
        return self.allowed(steps[:, None], steps[None, :])

    def mask_mod(self, device: torch.device | str = "cpu"):
        """`allowed` as a flex_attention `mask_mod(b, h, q_idx, kv_idx)` for indices on `device`.

        The cells table is resolved here, once, and captured, so tracing the closure does no
        device moves or cache look-ups. Indices are clamped into `[0, N)`: a kernel may call the
        mask on the padding of a partial last block, which it then discards anyway, and the
        clamp keeps that call's table reads in bounds. Over `[0, N) x [0, N)` this is exactly
        `allowed`.
        """
        cells = self.cells_on(device) if self.kind == "local_2d" else None
        last = self.num_positions - 1

        def mask_mod(b, h, q_idx, kv_idx):
            return self.allowed(q_idx.clamp(max=last), kv_idx.clamp(max=last), cells)

        return mask_mod

    @functools.cached_property
    def blocked_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block: the key steps it may read and the mask of each query over them.

        Returns `key_index [blocks, K]` (ascending, padded with 0) and `key_mask
        [blocks, Q, K]`. K is the largest number of distinct keys any block reaches, so the
        cost is N x K instead of N x N. Padding queries past the end see key 0 only, so no
        row is empty (their outputs are dropped).
        """
        n, q_block = self.num_positions, self.query_block
        num_blocks = -(-n // q_block)
        key_sets = []
        chunk = max(1, (1 << 22) // max(1, q_block * n))
        for first in range(0, num_blocks, chunk):
            blocks = torch.arange(first, min(first + chunk, num_blocks))
            queries = (blocks[:, None] * q_block + torch.arange(q_block)).clamp(max=n - 1)
            keys = torch.arange(min(n, int(blocks[-1] + 1) * q_block))
            reach = self.allowed(queries[:, :, None], keys[None, None, :]).any(dim=1)
            key_sets.extend(keys[row] for row in reach)
        width = max(len(ks) for ks in key_sets)
        key_index = torch.zeros(num_blocks, width, dtype=torch.long)
        valid = torch.zeros(num_blocks, width, dtype=torch.bool)
        for b, ks in enumerate(key_sets):
            key_index[b, : len(ks)] = ks
            valid[b, : len(ks)] = True
        queries = torch.arange(num_blocks * q_block).view(num_blocks, q_block)
        inside = queries < n
        key_mask = self.allowed(queries.clamp(max=n - 1)[:, :, None], key_index[:, None, :])
        key_mask &= valid[:, None, :] & inside[:, :, None]
        key_mask[:, :, 0] |= ~inside
        return key_index, key_mask

    @functools.cached_property
    def banded_layout(self) -> tuple[int, int, torch.Tensor] | None:
        """The blocked layout as a band, when each block's keys are one short run of steps.

        Block b then reads steps `[b*Q - offset, b*Q - offset + width)`: a strided window
        (`unfold`) instead of a gather, which is cheaper forward and backward. Returns
        `(offset, width, key_mask [blocks, Q, width])`, or None when a band would be much wider
        than the gathered keys (local_2d flanges, global).
        """
        key_index, key_mask = self.blocked_layout
        n, q_block = self.num_positions, self.query_block
        num_blocks = key_index.shape[0]
        starts = torch.arange(num_blocks) * q_block
        reached = key_mask.any(dim=1)
        lowest = torch.where(reached, key_index, n).min(dim=1).values
        highest = torch.where(reached, key_index, -1).max(dim=1).values
        offset = int((starts - lowest).max())
        width = int((highest - (starts - offset)).max()) + 1
        if width > 1.25 * key_index.shape[1]:
            return None
        keys = starts[:, None] - offset + torch.arange(width)
        queries = starts[:, None] + torch.arange(q_block)
        inside = queries < n
        band_mask = self.allowed(
            queries.clamp(max=n - 1)[:, :, None], keys.clamp(0, n - 1)[:, None, :]
        )
        band_mask &= ((keys >= 0) & (keys < n))[:, None, :] & inside[:, :, None]
        band_mask[:, :, offset] |= ~inside  # padding queries see their block's first step only
        return offset, width, band_mask

    @functools.cached_property
    def cache_span(self) -> int:
        """How many most recent steps a sampler must keep: every key any step reads is newer.

        A ring buffer of this many slots (slot = step % span) is enough for incremental
        decoding: block + memory for local_1d, about the flange's extent for local_2d, N for
        global attention.
        """
        key_index, key_mask = self.blocked_layout
        n, q_block = self.num_positions, self.query_block
        reached = key_mask.any(dim=1)
        lowest = torch.where(reached, key_index, n).min(dim=1).values
        last_query = (torch.arange(key_index.shape[0]) * q_block + q_block - 1).clamp(max=n - 1)
        return int((last_query - lowest).max()) + 1

    @functools.cached_property
    def step_slot_mask(self) -> torch.Tensor:
        """[N, cache_span] bool: which ring-buffer slots (slot = step % span) step i may read.

        The sampler attends over the whole ring buffer under this mask instead of gathering the
        allowed keys: attention does not care about key order, and a gather per layer and step
        cost more than the attention itself.
        """
        key_index, key_mask = self.blocked_layout
        span, q_block, n = self.cache_span, self.query_block, self.num_positions
        steps = torch.arange(n)
        block, offset = steps // q_block, steps % q_block
        slots = (key_index % span)[block]  # [N, K]
        allowed = key_mask[block, offset]  # [N, K]
        counts = torch.zeros(n, span, dtype=torch.int32)
        counts.scatter_add_(1, slots, allowed.to(torch.int32))  # padded keys may share a slot
        return counts > 0

    def max_keys(self) -> int:
        """Largest number of keys any single query may see (tests, docs)."""
        _, key_mask = self.blocked_layout
        return int(key_mask.sum(-1).max())


@functools.lru_cache(maxsize=32)
def _cached_pattern(
    kind: str,
    rows: int,
    cols: int,
    block_length: int,
    memory_length: int,
    query_shape: tuple[int, int],
    memory_flange: tuple[int, int],
) -> AttentionPattern:
    return AttentionPattern(
        kind, rows, cols, block_length, memory_length, query_shape, memory_flange
    )
