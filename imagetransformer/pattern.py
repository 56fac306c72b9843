"""The attention rule (docs/model.md, "Attention"), in one place, in every form a consumer needs.

Every attention type is one class: a generation order (a permutation of raster positions) and a
predicate `allowed(q, k)` over positions *in generation order*. Everything else (the dense mask,
the gathered key blocks of the `blocked` backend, the `mask_mod` of the `flex` backend, the
ring-buffer slots a sampling step reads) is derived here from `allowed`, so no backend re-derives
the rule. A new attention type is one subclass registered in `PATTERNS`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from einops import rearrange

from .errors import UserError

if TYPE_CHECKING:
    from .config import ImageTransformerConfig


class AttentionPattern(ABC):
    """Generation order and key-visibility rule of one attention type on one position grid.

    `rows x cols` is the position grid: H x W*C for the categorical layout. Queries are grouped
    into blocks of `query_block` consecutive positions in generation order; the `blocked`
    backend and the sampler work per block. Build one with `create(kind, rows, cols, ...)` or
    `from_config(config)`.
    """

    kind: ClassVar[str]
    # whether the rule skips keys at all: a backend that skips masked blocks gains nothing if not
    skips_keys: ClassVar[bool] = True

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.num_positions = rows * cols
        self._cells_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # the forms below moved to a device, filled by the attention backends on first use
        self.device_forms: dict[tuple[str, torch.device], object] = {}

    # Construction ------------------------------------------------------------------------------
    @staticmethod
    def create(kind: str, rows: int, cols: int, *args, **kwargs) -> AttentionPattern:
        """The pattern of attention type `kind` ("global", "local_1d", "local_2d") on a grid."""
        if kind not in PATTERNS:
            raise UserError(f"unknown attention {kind!r}; choose one of: {', '.join(PATTERNS)}")
        return PATTERNS[kind](rows, cols, *args, **kwargs)

    @staticmethod
    def from_config(config: ImageTransformerConfig) -> AttentionPattern:
        """The (shared, cached) pattern of a model config."""
        rows, cols = config.grid_shape
        params = PATTERNS[config.attention].params(config)
        return _cached_pattern(config.attention, rows, cols, params)

    @classmethod
    @abstractmethod
    def params(cls, config: ImageTransformerConfig) -> tuple:
        """This type's constructor arguments after (rows, cols), read from a config."""

    @classmethod
    def check_config(cls, config: ImageTransformerConfig) -> None:
        """Refuse settings this type cannot honour, with a message that names the fix."""
        return None

    # Order and cells ---------------------------------------------------------------------------
    @functools.cached_property
    def generation_order(self) -> torch.Tensor:
        """Entry i is the raster index generated at step i (raster order unless overridden)."""
        return torch.arange(self.num_positions)

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
    @abstractmethod
    def query_block(self) -> int:
        """Queries per block: the unit the `blocked` backend gathers keys for."""

    @property
    def keep_rows(self) -> int:
        """Grid rows a kept prefix must come in (completion): whole rows of generated cells."""
        return 1

    # The rule ----------------------------------------------------------------------------------
    @abstractmethod
    def allowed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cells: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """May query step `q` attend to key step `k`? Broadcasts; both in generation order.

        Position k holds the element generated at step k-1 (the shift of docs/model.md), so
        `k <= q` is exactly causal. Written with elementwise ops and indexing into the `cells`
        table only, so it also runs under `vmap` and inside flex_attention's traced `mask_mod`.
        `cells`: that table on `q`'s device (default: `cells_on(q.device)`).
        """

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
        cells = self.cells_on(device)
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

        Block b then reads steps `[b*Q - offset, b*Q - offset + width)`: a window (of whole
        blocks, or strided) instead of a gather, which is cheaper forward and backward. Returns
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


class GlobalPattern(AttentionPattern):
    """Every earlier position: `k <= q`. Quadratic; the reference for tests."""

    kind = "global"
    skips_keys = False

    @classmethod
    def params(cls, config: ImageTransformerConfig) -> tuple:
        return ()

    @property
    def query_block(self) -> int:
        return min(256, self.num_positions)

    def allowed(self, q, k, cells=None):
        return k <= q


class Local1DPattern(AttentionPattern):
    """Raster order cut into query blocks of `block_length` positions; a query sees its own
    block up to itself and the `memory_length` positions before the block."""

    kind = "local_1d"

    def __init__(self, rows: int, cols: int, block_length: int = 256, memory_length: int = 256):
        super().__init__(rows, cols)
        self.block_length = block_length
        self.memory_length = memory_length

    @classmethod
    def params(cls, config: ImageTransformerConfig) -> tuple:
        return (config.block_length, config.effective_memory_length)

    @property
    def query_block(self) -> int:
        return min(self.block_length, self.num_positions)

    def allowed(self, q, k, cells=None):
        block_start = torch.div(q, self.block_length, rounding_mode="floor") * self.block_length
        return (k <= q) & (k >= block_start - self.memory_length)


class Local2DPattern(AttentionPattern):
    """Query rectangles of `query_shape` cells generated in block-raster order; a query sees
    its own block up to itself, a flange above (reaching `memory_flange` cells up, left and
    right) and a flange to the left (docs/model.md, "local_2d")."""

    kind = "local_2d"

    def __init__(
        self,
        rows: int,
        cols: int,
        query_shape: tuple[int, int] = (8, 16),
        memory_flange: tuple[int, int] = (8, 32),
    ) -> None:
        super().__init__(rows, cols)
        self.query_shape = tuple(query_shape)
        self.memory_flange = tuple(memory_flange)
        if rows % query_shape[0] or cols % query_shape[1]:
            raise ValueError(f"query_shape {query_shape} does not tile a {rows}x{cols} grid")

    @classmethod
    def params(cls, config: ImageTransformerConfig) -> tuple:
        return (tuple(config.query_shape), tuple(config.memory_flange))

    @classmethod
    def check_config(cls, config: ImageTransformerConfig) -> None:
        rows, cols = config.grid_shape
        qh, qw = config.query_shape
        fh, fw = config.memory_flange
        if qh < 1 or qw < 1 or fh < 0 or fw < 0:
            raise UserError(
                f"query_shape must be positive and memory_flange non-negative, got "
                f"{list(config.query_shape)} and {list(config.memory_flange)}"
            )
        if rows % qh or cols % qw:
            c, h, w = config.image_shape
            per_pixel = cols == w
            raise UserError(
                f"local_2d query_shape {list(config.query_shape)} does not tile the position "
                f"grid of a {c}x{h}x{w} image ({rows} rows x {cols} columns = "
                f"{'width: one position per pixel' if per_pixel else 'width x channels'}"
                f"): pick a query_shape whose rows divide {rows} and whose columns "
                f"divide {cols}, e.g. --set query_shape={_divisor_near(rows, qh)},"
                f"{_divisor_near(cols, qw)}"
            )

    @functools.cached_property
    def generation_order(self) -> torch.Tensor:
        qh, qw = self.query_shape
        grid = torch.arange(self.num_positions).view(self.rows, self.cols)
        return rearrange(grid, "(br qh) (bc qw) -> (br bc qh qw)", qh=qh, qw=qw).contiguous()

    @property
    def query_block(self) -> int:
        return self.query_shape[0] * self.query_shape[1]

    @property
    def keep_rows(self) -> int:
        return self.query_shape[0]

    def allowed(self, q, k, cells=None):
        row, col = self.cells_on(q.device) if cells is None else cells
        qh, qw = self.query_shape
        fh, fw = self.memory_flange
        r0 = torch.div(row[q], qh, rounding_mode="floor") * qh
        c0 = torch.div(col[q], qw, rounding_mode="floor") * qw
        rk, ck = row[k], col[k]
        top = (rk >= r0 - fh) & (rk < r0) & (ck >= c0 - fw) & (ck < c0 + qw + fw)
        same_rows = (rk >= r0) & (rk < r0 + qh) & (ck >= c0 - fw) & (ck < c0 + qw)
        return (k <= q) & (top | same_rows)


# name -> class: the one place that lists the attention types
PATTERNS: dict[str, type[AttentionPattern]] = {
    cls.kind: cls for cls in (GlobalPattern, Local1DPattern, Local2DPattern)
}


def _divisor_near(n: int, target: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(math.log(k / max(target, 1))), k))


@functools.lru_cache(maxsize=32)
def _cached_pattern(kind: str, rows: int, cols: int, params: tuple) -> AttentionPattern:
    return PATTERNS[kind](rows, cols, *params)
