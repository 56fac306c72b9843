"""The Image Transformer (docs/model.md): embedding, position signals, blocks, head.

The model works in generation order: images are flattened to raster positions (one per channel
intensity, or one per pixel for the mixture-of-logistics output), permuted once into the
pattern's generation order, embedded, shifted by one and run through the blocks; the head's
outputs are permuted back to image layout at the end. A super-resolution model adds an encoder
over the low-resolution image and encoder-decoder attention in every block.

Two ways through the same network: `forward` scores whole images at once (training, bits/dim),
and the decoding step (`start_decoding`, `decode_step`) runs one generation step at a time with
a key/value cache (the samplers; anything that needs the distribution of step i given the
values of the earlier steps).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention, KVCache, prepare_backend
from .checkpoint import WEIGHTS_FILE, load_state_checked, read_pretrained, save_pretrained
from .config import BACKEND_CHOICES, ImageTransformerConfig
from .errors import UserError
from .layout import area_downsample, images_to_raster, raster_channel, raster_to_yxc
from .outputs import OUTPUT_TYPES, output_distribution
from .pattern import AttentionPattern

LN_EPS = 1e-6


def timing_signal(rows: torch.Tensor, cols: torch.Tensor, d_model: int) -> torch.Tensor:
    """Two-axis sinusoids: d/2 features for the row, d/2 for the column.

    Each axis uses `n = d/4` timescales `exp(-k ln(1e4) / (n-1))`, as [sin, cos].
    """
    n = d_model // 4
    inv = torch.exp(-torch.arange(n, dtype=torch.float64) * math.log(1e4) / max(n - 1, 1))
    parts = []
    for axis in (rows, cols):
        angle = axis.double()[:, None] * inv[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1).float()


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_size: int) -> None:
        super().__init__(nn.Linear(d_model, ffn_size), nn.ReLU(), nn.Linear(ffn_size, d_model))


class Block(nn.Module):
    """Masked self-attention, (super-resolution) encoder-decoder attention, feed-forward; each
    with dropout, a residual and LayerNorm.

    Post-norm (`x = LN(x + f(x))`) as in the paper; pre-norm (`x = x + f(LN(x))`) on request.
    """

    def __init__(self, config: ImageTransformerConfig, cross_attention: bool = False) -> None:
        super().__init__()
        d = config.d_model
        self.norm_first = config.norm_first
        self.attn = Attention(d, config.num_heads, config.backend)
        self.ffn = FeedForward(d, config.ffn_size)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.cross_attn = Attention(d, config.num_heads) if cross_attention else None
        self.norm_cross = nn.LayerNorm(d, eps=LN_EPS) if cross_attention else None
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, f) -> torch.Tensor:
        if self.norm_first:
            return x + self.dropout(f(norm(x)))
        return norm(x + self.dropout(f(x)))

    def _sublayers(self, x: torch.Tensor, attend, attend_memory) -> torch.Tensor:
        x = self._residual(x, self.norm1, attend)
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross, attend_memory)
        return self._residual(x, self.norm2, self.ffn)

    def forward(
        self,
        x: torch.Tensor,
        pattern: AttentionPattern | None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`pattern` None: unmasked self-attention (the encoder); `memory`: the encoder output
        that encoder-decoder attention reads."""
        return self._sublayers(
            x,
            lambda h: self.attn(h, pattern),
            lambda h: self.cross_attn(h, None, memory=memory),
        )

    def step(
        self,
        x: torch.Tensor,
        step: int,
        pattern: AttentionPattern,
        cache: KVCache,
        memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self._sublayers(
            x,
            lambda h: self.attn.step(h, step, pattern, cache),
            lambda h: self.cross_attn.attend_memory(h, memory_kv),
        )


def encoder_cells(config: ImageTransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each low-resolution intensity sits on the decoder's position grid.

    A low-resolution pixel covers an s x s block of the output; it gets the (fractional) row
    and column of that block's centre in the decoder's own units (column C*x + c when every
    channel is a position, x when a pixel is one). Query and key then carry timing signals of
    one coordinate system, so "attend to the input pixel above me" is a matter of matching
    phases; with separate grids a small model trained briefly did not learn the alignment at
    all (no gain over an unconditional model).
    """
    s = config.scale
    c = config.image_shape[0]
    y, x, channel = raster_to_yxc(config.low_res_shape)
    rows = y * s + (s - 1) / 2
    centre_x = x * s + (s - 1) / 2
    per_pixel = OUTPUT_TYPES[config.output].positions_per_pixel(c)
    return rows, per_pixel * centre_x + channel % per_pixel


# the near signal's neighbours of a position: (rows, pixels) away, the same channel position
NEAR_OFFSETS = ((-1, -1), (-1, 1), (-2, 0), (0, -2))
NEAR_INIT = 0.1  # the near embeddings start at this times the init of the others


def above_steps(config: ImageTransformerConfig, order: torch.Tensor) -> torch.Tensor:
    """[N]: for each generation step, the step that generated the value directly above the one
    it predicts (same column of the position grid, one row up), or -1 in the first row. Every
    attention type's order generates a row's values after the row above them."""
    above = neighbour_steps(config, order, (-1, 0))
    assert bool((above >= 0).sum() == config.num_positions - config.grid_shape[1])
    return above


def fan_avg_limit(weight: torch.Tensor) -> float:
    """The bound of tensor2tensor's uniform init of a [fan_out, fan_in] weight: variance
    scaling, fan_avg, scale 0.2."""
    fan_out, fan_in = weight.shape
    return math.sqrt(3 * 0.2 / ((fan_in + fan_out) / 2))


def anchor_steps(config: ImageTransformerConfig, order: torch.Tensor) -> torch.Tensor:
    """[N]: for each generation step, the step of the pixel its mixture's means are offsets
    from (`mixture_anchor`): the pixel to the left, or the one above in the first column; -1
    for the first pixel. Both come earlier in every attention type's order."""
    left = neighbour_steps(config, order, (0, -1))
    return torch.where(left >= 0, left, neighbour_steps(config, order, (-1, 0)))


def neighbour_steps(
    config: ImageTransformerConfig, order: torch.Tensor, offset: tuple[int, int]
) -> torch.Tensor:
    """[N]: for each generation step, the step that generated the value `offset` (rows, pixels)
    away from the one it predicts (the same channel position within the pixel), or -1 where
    that lies outside the image or comes later in the generation order."""
    rows, cols = config.grid_shape
    per_pixel = cols // config.image_shape[2]
    raster = order.long()
    y, x = raster // cols, (raster % cols) // per_pixel
    y2, x2 = y + offset[0], x + offset[1]
    inside = (y2 >= 0) & (x2 >= 0) & (x2 < config.image_shape[2])
    neighbour = (y2 * cols + x2 * per_pixel + raster % per_pixel).clamp(0, len(order) - 1)
    steps = torch.argsort(order)[neighbour]
    return torch.where(inside & (steps < torch.arange(len(order))), steps, -1)


def covering_pixel(config: ImageTransformerConfig) -> torch.Tensor:
    """[N] for every raster position of the output: the index (in raster order) of the
    low-resolution pixel whose s x s block holds it."""
    c, h, w = config.image_shape
    s = config.scale
    per_pixel = OUTPUT_TYPES[config.output].positions_per_pixel(c)
    pixel = torch.arange(h * w * per_pixel) // per_pixel
    y, x = pixel // w, pixel % w
    return (y // s) * (w // s) + x // s


def place_in_block(config: ImageTransformerConfig) -> torch.Tensor:
    """[N] for every raster position of the output: which of the s * s places of its
    low-resolution block it takes, times the positions per pixel, plus its own (a channel
    for the categorical output): the index of its map in the learned upsampling."""
    c, h, w = config.image_shape
    s = config.scale
    per_pixel = OUTPUT_TYPES[config.output].positions_per_pixel(c)
    raster = torch.arange(h * w * per_pixel)
    pixel = raster // per_pixel
    y, x = pixel // w, pixel % w
    return ((y % s) * s + x % s) * per_pixel + raster % per_pixel


def block_remainder_layout(
    config: ImageTransformerConfig, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every generation step: [N, s*s - 1] the earlier steps whose values lie in the same
    low-resolution block (the same channel position within the pixel; -1 pads), and [N] how
    many of the block's values are still to come, the step's own included."""
    per_pixel = OUTPUT_TYPES[config.output].positions_per_pixel(config.image_shape[0])
    raster = order.long()
    group = covering_pixel(config)[raster] * per_pixel + raster % per_pixel
    area = config.scale**2
    members = torch.argsort(group, stable=True).view(-1, area)  # each block's steps, in order
    earlier = torch.full((len(order), area - 1), -1, dtype=torch.long)
    to_come = torch.empty(len(order), dtype=torch.long)
    for rank in range(area):
        earlier[members[:, rank], :rank] = members[:, :rank]
        to_come[members[:, rank]] = area - rank
    return earlier, to_come


def remainder_tokens(
    base: torch.Tensor,
    earlier_values: torch.Tensor,
    to_come: torch.Tensor,
    channel: torch.Tensor,
    scale: int,
) -> torch.Tensor:
    """Rows of the remainder table for S steps: `base` [B, S, *value_shape] is s^2 times the
    low-resolution value, `earlier_values` [B, S, s^2 - 1, *value_shape] the block's values
    generated before (0 where none), `to_come` [S] how many remain (this one included) and
    `channel` the channel of each value ([S] or [C]). The mean the remaining values must have,
    rounded half up and clamped to [-s^2/2, 255 + s^2/2] (where the rounding of the area mean
    can put it), in integer arithmetic, so the integer model reads the same rows."""
    offset = remainder_offset(scale)
    remainder = base - earlier_values.sum(2)
    k = to_come.view(-1, *([1] * (remainder.dim() - 2)))
    mean = torch.div(2 * remainder + k, 2 * k, rounding_mode="floor")
    return mean.clamp(-offset, 255 + offset) + offset + (256 + 2 * offset) * channel


def value_bounds(
    total: torch.Tensor, earlier_sum: torch.Tensor, to_come: torch.Tensor, scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and the greatest value [B, S] that S steps may take and still leave their
    blocks able to average to their low-resolution values: `total` [B, S] is s^2 times that
    value, `earlier_sum` [B, S] the sum of the block's values generated before and `to_come`
    [S] how many remain, the step's own included. The low-resolution value is the block's mean
    rounded half to even (`area_downsample`), so the block sums to within s^2 // 2 of `total`,
    one less on either side where s^2 is even and the value odd (a sum halfway between two
    values rounds to the even one). Integer arithmetic, so the integer model reads the same
    bounds."""
    area = scale * scale
    odd = torch.div(total, area, rounding_mode="floor") % 2 == 1
    slack = area // 2 - (odd & (area % 2 == 0)).long()
    low = total - slack - earlier_sum - 255 * (to_come - 1)
    high = total + slack - earlier_sum
    return low.clamp(0, 255), high.clamp(0, 255)


def outside_bounds(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[..., 256] True for the values outside [low, high] of each step (`low`, `high` [...]).
    An empty range, which only values the bounds already gave no probability lead to, marks
    nothing, so that every distribution stays defined."""
    values = torch.arange(256, device=low.device)
    outside = (values < low[..., None]) | (values > high[..., None])
    return outside & (low <= high)[..., None]


def block_totals(
    distribution, low_res: torch.Tensor, scale: int, order: torch.Tensor
) -> torch.Tensor:
    """[B, N, *value_shape]: s^2 times the low-resolution value covering each generation
    step's value (its own channel): what the step's block sums to, up to rounding."""
    covering = low_res.long().repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return scale * scale * distribution.to_sequence(covering)[:, order]


def remainder_channels(config: ImageTransformerConfig, order: torch.Tensor) -> torch.Tensor:
    """The channel of each generation step's value ([N], categorical: one value per step), or
    of each of a pixel's values ([C], dmol): which channel's rows of the remainder table a
    value reads."""
    if output_distribution(config).value_shape:  # a pixel's C values per step
        return torch.arange(config.image_shape[0])
    return raster_channel(config.image_shape)[order]


def remainder_offset(scale: int) -> int:
    """How far outside 0..255 the remainder's mean can fall for consistent inputs."""
    return (scale * scale + 1) // 2


def value_signal(embed: nn.Module, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B, S, d]: `embed` of `values` [B, S, *value_shape] generated at `steps` [S]; a step of
    -1 (no such value) adds nothing."""
    emb = embed(values.long(), steps.clamp(min=0))
    return emb * (steps >= 0)[:, None].to(emb.dtype)


class Encoder(nn.Module):
    """The super-resolution encoder: the low-resolution image embedded with its own table (one
    position per channel intensity), timing signals placed on the output grid (see
    `encoder_cells`), unmasked self-attention blocks."""

    def __init__(self, config: ImageTransformerConfig) -> None:
        super().__init__()
        shape = config.low_res_shape
        d = config.d_model
        self.d_model = d
        self.register_buffer("_channel", raster_channel(shape), persistent=False)
        self.register_buffer("_timing", timing_signal(*encoder_cells(config), d), persistent=False)
        self.embed = nn.Embedding(256 * shape[0], d)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.encoder_layers))
        self.final_norm = nn.LayerNorm(d, eps=LN_EPS) if config.norm_first else nn.Identity()

    def forward(self, low_res: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, h, w] -> [B, C*h*w, d]."""
        tokens = self._channel * 256 + images_to_raster(low_res.long())
        x = self.embed(tokens) * math.sqrt(self.d_model) + self._timing
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, None)
        return self.final_norm(x)


def _in_range(labels: torch.Tensor, k: int) -> bool:
    """Whether every label lies in 0..k-1 (one host read; no labels pass)."""
    return labels.numel() == 0 or bool((labels.min() >= 0) & (labels.max() < k))


class ImageTransformer(nn.Module):
    """The Image Transformer over uint8 images [B, C, H, W].

    Decoder-only for p(x) and p(x | class); with `task="superres"` an encoder reads the
    low-resolution image and every block attends to it: p(x | area-downsampled x).
    """

    def __init__(self, config: ImageTransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.pattern = AttentionPattern.from_config(config)
        order = self.pattern.generation_order
        self.register_buffer("generation_order", order.clone(), persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)
        self.distribution = output_distribution(config)
        self.embed = self.distribution.embedding(d, order.clone())
        rows, cols = self.pattern.cells
        if config.pos == "timing":
            self.register_buffer("_timing", timing_signal(rows, cols, d), persistent=False)
        else:
            grid_rows, grid_cols = config.grid_shape
            self.row_embed = nn.Embedding(grid_rows, d)
            self.col_embed = nn.Embedding(grid_cols, d)
            self.register_buffer("_rows", rows.clone(), persistent=False)
            self.register_buffer("_cols", cols.clone(), persistent=False)
        self.class_embed = None
        if config.num_classes:  # one more row for "no class" when labels are dropped
            rows = config.num_classes + bool(config.class_dropout)  # built without a draw
            self.class_embed = nn.Embedding.from_pretrained(torch.zeros(rows, d), freeze=False)
        self.input_dropout = nn.Dropout(config.dropout)
        superres = config.task == "superres"
        self.encoder = Encoder(config) if superres else None
        self.above_embed = None
        if config.above_signal:
            self.above_embed = self.distribution.embedding(d, order.clone())
            self.register_buffer("_above", above_steps(config, order), persistent=False)
        self.near_embeds = None
        if config.near_signal:
            embeds = (self.distribution.embedding(d, order.clone()) for _ in NEAR_OFFSETS)
            self.near_embeds = nn.ModuleList(embeds)
            near = [neighbour_steps(config, order, offset) for offset in NEAR_OFFSETS]
            self.register_buffer("_near", torch.stack(near), persistent=False)  # [K, N]
        if config.mixture_anchor:
            self.register_buffer("_anchor", anchor_steps(config, order), persistent=False)
        self.low_res_embed = None
        if superres and config.low_res_signal:
            self.low_res_embed = nn.Embedding(256 * config.image_shape[0], d)
        if superres and (config.low_res_signal or config.low_res_upsample):
            self.register_buffer("_covering", covering_pixel(config)[order], persistent=False)
        self.low_res_remainder = None
        if config.reads_block_values:  # the block's earlier values and how many are still to come
            earlier, to_come = block_remainder_layout(config, order)
            self.register_buffer("_earlier", earlier, persistent=False)
            self.register_buffer("_to_come", to_come, persistent=False)
        if superres and config.low_res_remainder:
            rows = 256 + 2 * remainder_offset(config.scale)
            self.low_res_remainder = nn.Embedding(rows * config.image_shape[0], d)
            channel = remainder_channels(config, order)
            self.register_buffer("_remainder_channel", channel, persistent=False)
        self.low_res_upsample = None
        if superres and config.low_res_upsample:
            places = config.scale**2 * self.distribution.positions_per_pixel(config.image_shape[0])
            self.low_res_upsample = nn.Linear(9 * config.image_shape[0], places * d, bias=False)
            self.register_buffer("_place", place_in_block(config)[order], persistent=False)
        self.blocks = nn.ModuleList(
            Block(config, cross_attention=superres) for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(d, eps=LN_EPS) if config.norm_first else nn.Identity()
        self.head = nn.Linear(d, self.distribution.num_params, bias=self.distribution.head_bias)
        self.reset_parameters()

    # Initialisation ----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """tensor2tensor's init: uniform variance scaling, fan_avg, scale 0.2, zero biases.

        One departure: the class embedding starts at zero (`class_init` times this init; 0 by
        default), so a conditional model starts as its unconditional twin and learns what the
        label adds. With the reference's random init (`class_init=1`: a random vector as large
        as the position signal, added everywhere) the 1,000-step mnist_1d_cond model was 0.026
        bits/dim behind its unconditional twin; from zero it matches it (1.019 both). At 2,000
        steps: docs/model.md, Departures: Class embedding init. A class embedding that starts
        at zero draws no random numbers, so at the same seed every other weight starts exactly
        as the twin's: the two runs differ by the label alone, and their bits/dim compare
        without the noise of another init.
        """
        for module in self.modules():
            if module is self.class_embed:
                continue  # drawn last (or zeroed, without a draw), so no other weight moves
            if isinstance(module, (nn.Linear, nn.Embedding)):
                limit = fan_avg_limit(module.weight)
                nn.init.uniform_(module.weight, -limit, limit)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.class_embed is not None:  # class_init times the init above; 0: no draw
            nn.init.zeros_(self.class_embed.weight)
            if self.config.class_init:
                limit = self.config.class_init * fan_avg_limit(self.class_embed.weight)
                nn.init.uniform_(self.class_embed.weight, -limit, limit)
        if self.low_res_embed is not None:  # starts as the paper's model, as the class signal
            nn.init.zeros_(self.low_res_embed.weight)
        if self.low_res_upsample is not None:
            nn.init.zeros_(self.low_res_upsample.weight)
        if self.low_res_remainder is not None:
            nn.init.zeros_(self.low_res_remainder.weight)
        if self.near_embeds is not None:  # a small start: the base model plus a little
            with torch.no_grad():
                for embed in self.near_embeds:
                    embed.weight.mul_(NEAR_INIT)

    # Inputs ------------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Refuse images of the wrong type, shape or range with a message that names the fix."""
        expected = tuple(self.config.image_shape)
        if not isinstance(images, torch.Tensor):
            raise UserError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(
                f"this model takes images [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(config.image_shape), got {list(images.shape)}: resize the images or train a "
                f"model with --set image_shape={','.join(str(v) for v in images.shape[-3:])}"
            )
        if images.is_floating_point() or images.dtype == torch.bool:
            raise UserError(
                f"images must hold integer intensities 0..255 (uint8), got dtype {images.dtype}"
            )
        if images.dtype != torch.uint8 and (images.min() < 0 or images.max() > 255):
            raise UserError("image intensities must lie in 0..255")
        return images.long()

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (`num_classes`) in a model trained with
        `class_dropout`; None in any other model."""
        return self.config.num_classes if self.config.class_dropout else None

    def check_labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Labels [batch] on the model's device; a model trained with `class_dropout` also
        takes `null_label` ("no class": the image's distribution over all classes)."""
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise UserError(
                    "this model is unconditional (num_classes=0) but labels were given; "
                    "drop the labels or train with --set num_classes=K"
                )
            return None
        if labels is None:
            raise UserError(f"this model is class-conditional ({k} classes): pass labels")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        allowed = k + (self.null_label is not None)
        if labels.numel() != batch or (
            self._read_labels(labels) and not _in_range(labels, allowed)
        ):
            raise UserError(f"labels must be {batch} integers in 0..{allowed - 1}")
        return labels.to(self.head.weight.device)

    def drop_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """In training with `class_dropout`: each label replaced by `null_label` with that
        probability (from torch's generator, as dropout's masks, so resume stays exact)."""
        if labels is None or not self.training or not self.config.class_dropout:
            return labels
        dropped = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
        return labels.masked_fill(dropped, self.null_label)

    def _read_labels(self, labels: torch.Tensor) -> bool:
        """Whether `check_labels` reads the labels' values to check their range: not inside a
        compiled graph (a data-dependent branch breaks it), and not for labels on an
        accelerator in training mode (a host sync every step; the trainer's labels come from a
        data set, which checks them as it loads). Elsewhere (evaluation, sampling, any CPU
        call) a label out of range is refused in one line, not by an indexing error."""
        if torch.compiler.is_compiling():
            return False
        return labels.device.type == "cpu" or not self.training

    def check_low_res(self, low_res: torch.Tensor | None, images: torch.Tensor | None, batch: int):
        """The super-resolution input: given, or made from `images` by area averaging."""
        if self.encoder is None:
            if low_res is not None:
                raise UserError(
                    "this model has no low-resolution input (task=generate); train one with "
                    "--task superres"
                )
            return None
        c, h, w = self.config.low_res_shape
        if low_res is None:
            if images is None:
                raise UserError(f"this super-resolution model needs low_res [B, {c}, {h}, {w}]")
            return area_downsample(images, self.config.scale)
        if not isinstance(low_res, torch.Tensor) or low_res.dtype != torch.uint8:
            raise UserError("low_res must be a uint8 tensor of intensities 0..255")
        if low_res.dim() == 3:
            low_res = low_res[None].expand(batch, -1, -1, -1)
        if tuple(low_res.shape) != (batch, c, h, w):
            raise UserError(
                f"this model upscales [B, {c}, {h}, {w}] images by {self.config.scale}, got "
                f"low_res {list(low_res.shape)}: resize the input to {h}x{w}"
            )
        return low_res.to(self.head.weight.device)

    def position_signal(self) -> torch.Tensor:
        """[N, d]: the position signal added at each generation step (the cell it predicts)."""
        if self.config.pos == "timing":
            return self._timing
        return self.row_embed(self._rows) + self.col_embed(self._cols)

    def class_signal(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        """[B, 1, d]: the class embedding added at every position (0 when unconditional)."""
        if self.class_embed is None or labels is None:
            return 0.0
        return (self.class_embed(labels) * self.config.class_multiplier)[:, None, :]

    def block_signal(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """[B, 1, d]: what is added to the residual stream before every block after the first:
        the class signal again with `class_signal="every_block"` (the same table and scale as
        at the input), else None."""
        if self.config.class_signal != "every_block" or labels is None:
            return None
        return self.class_signal(labels)

    def low_res_signal(self, low_res: torch.Tensor | None) -> torch.Tensor | float:
        """[B, N, d]: at each generation step, the embedding of the low-resolution pixel that
        covers the position it predicts (the sum over its channels); 0 without one."""
        if low_res is None:
            return 0.0
        signal = self.low_res_upsample_signal(low_res)
        if self.low_res_embed is None:
            return signal
        c = low_res.shape[1]
        pixels = rearrange(low_res.long(), "b c h w -> b (h w) c")
        tokens = pixels + 256 * torch.arange(c, device=low_res.device)
        per_pixel = self.low_res_embed(tokens).sum(2) * math.sqrt(self.config.d_model)
        return per_pixel[:, self._covering] + signal

    def low_res_upsample_signal(self, low_res: torch.Tensor) -> torch.Tensor | float:
        """[B, N, d]: with `low_res_upsample`, a learned upsampling of the low-resolution image
        to every generation step: the 3x3 low-resolution pixels around the one covering the
        position (edges repeated, intensities scaled to [-1, 1]) through the linear map of the
        position's place in that block; 0 without it."""
        if self.low_res_upsample is None:
            return 0.0
        d = self.config.d_model
        x = F.pad(low_res.float() / 127.5 - 1.0, (1, 1, 1, 1), mode="replicate")
        around = F.unfold(x, 3).transpose(1, 2)  # [B, h*w, C*9]
        maps = self.low_res_upsample(around).unflatten(-1, (-1, d))  # [B, h*w, places, d]
        return maps[:, self._covering, self._place] * math.sqrt(d)

    def remainder_base(self, low_res: torch.Tensor | None) -> torch.Tensor | None:
        """[B, N, *value_shape]: s^2 times the low-resolution value covering each step's value
        (its own channel), in generation order; None without `low_res_remainder` and
        `low_res_bounds`."""
        if not self.config.reads_block_values or low_res is None:
            return None
        return block_totals(self.distribution, low_res, self.config.scale, self.generation_order)

    def remainder_signal(
        self, base: torch.Tensor | None, values: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor | float:
        """[B, S, d]: with `low_res_remainder`, at steps `steps` [S], the embedding of the mean
        that the values of the step's low-resolution block still to come must have, read from
        `values` [B, N', *value_shape] (every value generated so far, or all of them) and
        `base` [B, S, *value_shape] (`remainder_base` at those steps); 0 without it."""
        if self.low_res_remainder is None or base is None:
            return 0.0
        emb = self.low_res_remainder(self.remainder_rows(base, values, steps))
        if self.config.output != "cat":
            emb = emb.sum(2)  # the pixel's channels
        return emb * math.sqrt(self.config.d_model)

    def remainder_rows(
        self, base: torch.Tensor, values: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """[B, S, *value_shape]: the rows of the remainder table that `remainder_signal` reads
        (see `remainder_tokens`)."""
        found = self.earlier_values(values, steps)
        channel = self._remainder_channel
        if not self.distribution.value_shape:  # one value per step: its own channel
            channel = channel[steps]
        return remainder_tokens(base, found, self._to_come[steps], channel, self.config.scale)

    def earlier_values(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """[B, S, s^2 - 1, *value_shape]: for S steps, the values of their blocks generated
        before them, read from `values` [B, N', *value_shape] (0 where there are fewer)."""
        earlier = self._earlier[steps]  # [S, s^2 - 1]
        found = values[:, earlier.clamp(min=0)].long()
        return found * (earlier >= 0).view(*earlier.shape, *([1] * (found.dim() - 3)))

    def bounded(
        self,
        logits: torch.Tensor,
        base: torch.Tensor | None,
        values: torch.Tensor,
        steps: torch.Tensor,
    ) -> torch.Tensor:
        """With `low_res_bounds`: `logits` [B, S, 256] of S steps with -inf for every value that
        would leave the step's block unable to average to its low-resolution value
        (`value_bounds`), read from `values` [B, N', ...] generated so far and `base` [B, S]
        (`remainder_base` at those steps). Without it, or without a low-resolution input, the
        logits as they are."""
        if not self.config.low_res_bounds or base is None:
            return logits
        earlier_sum = self.earlier_values(values, steps).sum(2)
        low, high = value_bounds(base, earlier_sum, self._to_come[steps], self.config.scale)
        return logits.masked_fill(outside_bounds(low, high), float("-inf"))

    def anchored(self, params: torch.Tensor, values: torch.Tensor, steps: torch.Tensor):
        """With `mixture_anchor`: the head outputs [B, S, P] of S steps with the decoded anchor
        pixel (`anchor_steps`, on the [-1, 1] scale) added to every component's channel means,
        read from `values` [B, N', C] generated so far. Without it, `params` as they are."""
        if not self.config.mixture_anchor:
            return params
        anchor = self._anchor[steps]
        pixel = values[:, anchor.clamp(min=0)].to(params.dtype) * (2 / 255) - 1  # [B, S, C]
        pixel = pixel * (anchor >= 0).view(1, -1, 1)
        k, c = self.config.num_mixtures, self.config.image_shape[0]
        locs = params[..., k : k + k * c].unflatten(-1, (k, c)) + pixel[:, :, None, :]
        return torch.cat([params[..., :k], locs.flatten(-2), params[..., k + k * c :]], -1)

    def above_signal(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """[B, S, d]: the embedding of the values directly above S positions (`values` [B, S,
        *value_shape], generated at `steps` [S]; step -1, the first row, adds nothing)."""
        return value_signal(self.above_embed, values, steps)

    def near_signal(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor | float:
        """[B, S, d]: the sum of the near signal's embeddings of S positions' neighbours (see
        `NEAR_OFFSETS`), read from `values` [B, N', *value_shape] (every value generated so
        far, or all of them) at `steps` [K, S]; 0 without the near signal."""
        if self.near_embeds is None:
            return 0.0
        signal = 0.0
        for embed, at in zip(self.near_embeds, steps, strict=True):
            signal = signal + value_signal(embed, values[:, at.clamp(min=0)], at)
        return signal

    def conditioning(
        self, labels: torch.Tensor | None, low_res: torch.Tensor | None
    ) -> torch.Tensor | float:
        """What the decoder's input gets besides the previous value and the position: the class
        signal [B, 1, d] and the low-resolution signal [B, N, d] (0 when neither applies)."""
        return self.class_signal(labels) + self.low_res_signal(low_res)

    def to_steps(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] -> their values in generation order [B, N, *value_shape]."""
        values = self.check_images(images)
        return self.distribution.to_sequence(values)[:, self.generation_order]

    def from_steps(self, values: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_steps`: values in generation order -> uint8 images."""
        return self.distribution.to_images(values[:, self.inverse_order]).to(torch.uint8)

    # Forward -----------------------------------------------------------------------------------
    def logits_in_generation_order(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, N, P] head outputs; entry i predicts the element generated at step i."""
        seq = self.to_steps(images)
        batch = seq.shape[0]
        labels = self.drop_labels(self.check_labels(labels, batch))
        low_res = self.check_low_res(low_res, images, batch)
        memory = self.encoder(low_res) if self.encoder is not None else None
        steps = torch.arange(seq.shape[1], device=seq.device)
        emb = self.embed(seq, steps)
        x = F.pad(emb[:, :-1], (0, 0, 1, 0))  # shift: step i sees the element of step i-1
        x = x + self.position_signal() + self.conditioning(labels, low_res)
        if self.above_embed is not None:
            x = x + self.above_signal(seq[:, self._above.clamp(min=0)], self._above)
        if self.near_embeds is not None:
            x = x + self.near_signal(seq, self._near)
        base = self.remainder_base(low_res)
        if self.low_res_remainder is not None:
            x = x + self.remainder_signal(base, seq, steps)
        x = self.input_dropout(x)
        again = self.block_signal(labels)
        for i, block in enumerate(self.blocks):
            if i and again is not None:
                x = x + again
            x = block(x, self.pattern, memory)
        out = self.bounded(self.head(self.final_norm(x)), base, seq, steps)
        return self.anchored(out, seq, steps)

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head outputs in image layout for uint8 images [B, C, H, W]: logits [B, C, H, W, 256]
        (cat) or mixture parameters [B, H, W, P] (dmol).

        A super-resolution model conditions on `low_res` [B, C, H/s, W/s], by default the
        images' own area-downsampled copy (what training and bits/dim use). Attention is
        computed by `config.backend` (see `use_backend`).
        """
        params = self.logits_in_generation_order(images, labels, low_res)
        return self.distribution.params_to_images(params[:, self.inverse_order])

    def prepare_attention(self) -> ImageTransformer:
        """Build the attention's device forms (masks, key layouts, BlockMask) for the model's
        device now, outside any trace; returns the model. Call it before `torch.compile`, and
        again after moving the model or switching backends (see `attention.prepare_backend`:
        otherwise the first trace builds them and the second step compiles everything again).
        """
        device = self.head.weight.device
        for block in self.blocks:
            prepare_backend(block.attn.backend, self.pattern, device)
        return self

    def use_backend(self, name: str) -> ImageTransformer:
        """Compute attention with backend `name` from now on (every backend computes the same
        function); returns the model."""
        if name not in BACKEND_CHOICES:
            raise UserError(
                f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_CHOICES)}"
            )
        self.config.backend = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = name
        return self

    # Likelihood: the one definition of the loss ------------------------------------------------
    def nll(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Negative log-likelihood in nats, float32: of every sub-pixel [B, C, H, W] (cat), or
        of every pixel [B, H, W] (dmol: its channels are scored jointly). Label smoothing, a
        training option, changes the figure; it is never used to report one."""
        params = self.forward(images, labels, low_res=low_res)
        return self.distribution.nll(params, images.long(), label_smoothing)

    def loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss: mean nats per sub-pixel (optionally label-smoothed)."""
        return self.nll(images, labels, label_smoothing, low_res).sum() / images.numel()

    def bits_per_dim(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact bits/dim of each image, [B] float32, whatever mode the model is in (dropout
        is off while it runs)."""
        with self.evaluating():
            nats = self.nll(images, labels, low_res=low_res).double().flatten(1).sum(1)
        return (nats / math.prod(self.config.image_shape) / math.log(2)).float()

    def bits_per_subpixel(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bits of every channel intensity [B, C, H, W], float32: how surprising each sub-pixel
        is given everything generated before it. Their mean over C, H, W is `bits_per_dim`.

        The mixture-of-logistics output spreads a pixel's bits over its channels by the chain
        rule of the mixture (`LogisticMixture.nll_per_subpixel`). A class-conditional model
        needs the labels; `tools.score.marginal_bits_per_subpixel` scores p(x) summed over the
        classes. Exact whatever mode the model is in.
        """
        with self.evaluating():
            params = self.forward(images, labels, low_res=low_res)
            nats = self.distribution.nll_per_subpixel(params, images.long())
        return (nats / math.log(2)).float()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[ImageTransformer]:
        """Eval mode (no dropout) and no gradients inside; the previous mode is restored."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            self.train(was_training)

    # Decoding step by step ---------------------------------------------------------------------
    def start_decoding(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
    ) -> DecodingState:
        """The state of a step-by-step decoding of `n` images: empty key/value caches sized by
        the attention's reach, the class signal, and (super-resolution) the encoder run once
        with every block's encoder keys and values. Call in eval mode under `torch.no_grad()`
        (`evaluating()`); the weights must not change until the last step."""
        labels = self.check_labels(labels, n)
        low_res = self.check_low_res(low_res, None, n)
        like = self.head.weight
        caches = [block.attn.new_cache(n, self.pattern, like) for block in self.blocks]
        if self.encoder is not None:
            memory = self.encoder(low_res)
            memory_kvs = [block.cross_attn.memory_keys_values(memory) for block in self.blocks]
        else:
            memory_kvs = [None] * len(self.blocks)
        values = None
        config = self.config
        signals = self.above_embed is not None or self.near_embeds is not None
        if signals or config.reads_block_values or config.mixture_anchor:  # values read again
            value_shape = self.distribution.value_shape
            values = torch.zeros(
                (n, self.config.num_positions, *value_shape), dtype=torch.long, device=like.device
            )
        return DecodingState(
            n,
            caches,
            memory_kvs,
            self.position_signal(),
            self.conditioning(labels, low_res),
            values=values,
            block_signal=self.block_signal(labels),
            remainder_base=self.remainder_base(low_res),
        )

    def decode_step(
        self, state: DecodingState, step: int, previous: torch.Tensor | None
    ) -> torch.Tensor:
        """The head outputs [n, P] that give the distribution of generation step `step`.

        `previous` [n, *value_shape] holds the values of step `step - 1` (None at step 0).
        Steps must come in order, 0, 1, 2, ...: each one writes its keys and values into the
        caches. The result equals `logits_in_generation_order(images)[:, step]` for any images
        whose first `step` values are those fed (up to float rounding; tested).
        """
        if step != state.next_step:
            raise ValueError(f"decode_step expected step {state.next_step}, got {step}")
        if step == 0:
            x = state.position.new_zeros(state.batch, 1, self.config.d_model)
        else:
            if previous is None:
                raise ValueError(f"decode_step {step} needs the values of step {step - 1}")
            prev = torch.full((state.batch, 1), step - 1, device=previous.device)
            x = self.embed(previous[:, None].long(), prev)
            if state.values is not None:
                state.values[:, step - 1] = previous.long()
        if self.above_embed is not None:
            above = self._above[step : step + 1]
            x = x + self.above_signal(state.values[:, above.clamp(min=0)], above)
        if self.near_embeds is not None:
            x = x + self.near_signal(state.values, self._near[:, step : step + 1])
        base = None if state.remainder_base is None else state.remainder_base[:, step : step + 1]
        at = None  # the step as a tensor, made only where a later signal reads earlier values
        if base is not None or self.config.mixture_anchor:
            at = torch.tensor([step], device=x.device)
        if self.low_res_remainder is not None and base is not None:
            x = x + self.remainder_signal(base, state.values, at)
        conditioning = state.conditioning
        if isinstance(conditioning, torch.Tensor) and conditioning.shape[1] > 1:
            conditioning = conditioning[:, step : step + 1]  # it differs from step to step
        h = x + state.position[step] + conditioning
        for i, (block, cache, memory_kv) in enumerate(
            zip(self.blocks, state.caches, state.memory_kvs, strict=True)
        ):
            if i and state.block_signal is not None:
                h = h + state.block_signal
            h = block.step(h, step, self.pattern, cache, memory_kv)
        state.next_step = step + 1
        out = self.bounded(self.head(self.final_norm(h)), base, state.values, at)
        return self.anchored(out, state.values, at)[:, 0]

    def attention_mask(self) -> torch.Tensor:
        """The boolean [N, N] mask in generation order: query step i may see key step j."""
        return self.pattern.dense_mask()

    # Sampling ----------------------------------------------------------------------------------
    def sample(self, n: int, temperature: float = 1.0, **options) -> torch.Tensor:
        """n uint8 images [n, C, H, W], one position per step in `generation_order`: the
        cached sampler, `sampling.sample(self, n, temperature=..., **options)`, whose
        docstring lists the options (labels, generator, top_k, top_p, prefix and keep,
        low_res, progress, on_step)."""
        from .sampling import sample

        return sample(self, n, temperature=temperature, **options)

    def keep_positions(self, fraction: float) -> int:
        """How many generation steps make up the first `fraction` of the image, in whole rows.

        Raster orders keep whole pixel rows (the top of the image); `local_2d` keeps whole
        block rows, so that what is kept is exactly a prefix of the generation order.
        """
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"the kept fraction must be in [0, 1], got {fraction}")
        rows, cols = self.config.grid_shape
        unit = self.pattern.keep_rows
        return round(fraction * rows / unit) * unit * cols

    def upscale(self, low_res: torch.Tensor, temperature: float = 1.0, **options) -> torch.Tensor:
        """Super-resolution: one sample [B, C, H, W] per low-resolution image [B, C, h, w].

        `options` are those of `sample` (generator, progress); repeat the input to draw several.
        """
        if self.encoder is None:
            raise UserError("upscale needs a super-resolution model (task=superres)")
        if not isinstance(low_res, torch.Tensor) or low_res.dim() != 4:
            raise UserError("low_res must be a uint8 tensor [B, C, h, w]")
        return self.sample(low_res.shape[0], temperature, low_res=low_res, **options)

    def kept_mask(self, keep_positions: int) -> torch.Tensor:
        """Which intensities the first `keep_positions` generation steps fix: bool [C, H, W]."""
        kept = torch.zeros(self.config.num_positions, dtype=torch.bool)
        kept[self.generation_order[:keep_positions].cpu()] = True
        return self.distribution.kept_mask(kept)

    def complete(
        self, images: torch.Tensor, keep_positions: int, temperature: float = 1.0, **options
    ) -> torch.Tensor:
        """Keep the first `keep_positions` generation steps of `images`, sample the rest.

        The kept intensities come back bit for bit; see `keep_positions` for a fraction.
        `options` are those of `sample` (labels, generator, progress, top_k, top_p, low_res,
        guidance); a super-resolution model is given the images' own downsampled copies unless
        `low_res` is.
        """
        n_pos = self.config.num_positions
        if not 0 <= keep_positions <= n_pos:
            raise UserError(f"keep_positions must be in 0..{n_pos}, got {keep_positions}")
        if self.encoder is not None and options.get("low_res") is None:
            options["low_res"] = area_downsample(
                self.check_images(images).to(torch.uint8), self.config.scale
            )
        return self.sample(
            images.shape[0], temperature, prefix=images, keep=keep_positions, **options
        )

    # Saving ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (atomically) into `directory`."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> ImageTransformer:
        """Rebuild a model from `config.json` and `model.safetensors` in `directory`."""
        config, state = read_pretrained(directory)
        model = cls(config)
        load_state_checked(model, state, Path(directory) / WEIGHTS_FILE)
        return model.to(map_location)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class DecodingState:
    """What step-by-step decoding carries between steps (made by `start_decoding`): the caller
    holds it, as with `past_key_values` in Hugging Face's `generate`."""

    batch: int
    caches: list[KVCache]
    memory_kvs: list[tuple[torch.Tensor, torch.Tensor] | None]
    position: torch.Tensor  # [N, d]
    conditioning: torch.Tensor | float  # [n, 1, d] class or [n, N, d] low-res signal, or 0
    values: torch.Tensor | None = None  # [n, N, *value_shape] the values so far (above_signal)
    block_signal: torch.Tensor | None = None  # [n, 1, d] added before blocks 2.. (every_block)
    next_step: int = 0
    # [n, N, *value_shape]: s^2 times each step's low-resolution value (low_res_remainder, _bounds)
    remainder_base: torch.Tensor | None = None
