"""The Image Transformer (SPEC.md sections 1, 3, 4.1): embedding, position signals, blocks, head.

The model works in generation order: images are flattened to raster positions, permuted once
into the pattern's generation order, embedded, shifted by one and run through the blocks; the
logits are permuted back to [B, C, H, W, 256] at the end.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache
from .config import ImageTransformerConfig
from .errors import UserError
from .layout import images_to_raster, raster_channel, raster_to_images
from .pattern import AttentionPattern

LN_EPS = 1e-6


def timing_signal(rows: torch.Tensor, cols: torch.Tensor, d_model: int) -> torch.Tensor:
    """Two-axis sinusoids (SPEC.md 1.4): d/2 features for the row, d/2 for the column.

    Each axis uses `n = d/4` timescales `exp(-k ln(1e4) / (n-1))`, as [sin, cos].
    """
    n = d_model // 4
    inv = torch.exp(-torch.arange(n, dtype=torch.float64) * math.log(1e4) / max(n - 1, 1))
    parts = []
    for axis in (rows, cols):
        angle = axis.double()[:, None] * inv[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=-1).float()


def sub_pixel_nll(
    logits: torch.Tensor, images: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy in nats of each sub-pixel: logits [B, C, H, W, 256], images [B, C, H, W].

    Computed in float32 whatever the logits' dtype; `label_smoothing` is for training only.
    """
    targets = images.long()
    return F.cross_entropy(
        logits.float().flatten(0, -2),
        targets.flatten(),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(targets.shape)


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_size: int) -> None:
        super().__init__(nn.Linear(d_model, ffn_size), nn.ReLU(), nn.Linear(ffn_size, d_model))


class Block(nn.Module):
    """Masked self-attention then feed-forward, each with dropout, a residual and LayerNorm.

    Post-norm (`x = LN(x + f(x))`) as in the paper; pre-norm (`x = x + f(LN(x))`) on request.
    """

    def __init__(self, config: ImageTransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm_first = config.norm_first
        self.attn = Attention(d, config.num_heads, config.backend)
        self.ffn = FeedForward(d, config.ffn_size)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def _sublayers(self, x: torch.Tensor, attend) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(attend(self.norm1(x)))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(attend(x)))
        return self.norm2(x + self.dropout(self.ffn(x)))

    def forward(
        self, x: torch.Tensor, pattern: AttentionPattern, backend: str | None = None
    ) -> torch.Tensor:
        return self._sublayers(x, lambda h: self.attn(h, pattern, backend))

    def step(
        self, x: torch.Tensor, step: int, pattern: AttentionPattern, cache: KVCache
    ) -> torch.Tensor:
        return self._sublayers(x, lambda h: self.attn.step(h, step, pattern, cache))


class ImageTransformer(nn.Module):
    """Decoder-only Image Transformer over uint8 images [B, C, H, W] (categorical output)."""

    def __init__(self, config: ImageTransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c, _, _ = config.image_shape
        d = config.d_model
        self.pattern = AttentionPattern.from_config(config)
        order = self.pattern.generation_order
        self.register_buffer("generation_order", order.clone(), persistent=False)
        self.register_buffer("_inverse_order", torch.argsort(order), persistent=False)
        self.register_buffer(
            "_step_channel", raster_channel(config.image_shape)[order].clone(), persistent=False
        )
        self.embed = nn.Embedding(256 * c, d)
        rows, cols = self.pattern.cells
        if config.pos == "timing":
            self.register_buffer("_timing", timing_signal(rows, cols, d), persistent=False)
        else:
            grid_rows, grid_cols = config.grid_shape
            self.row_embed = nn.Embedding(grid_rows, d)
            self.col_embed = nn.Embedding(grid_cols, d)
            self.register_buffer("_rows", rows.clone(), persistent=False)
            self.register_buffer("_cols", cols.clone(), persistent=False)
        self.class_embed = nn.Embedding(config.num_classes, d) if config.num_classes else None
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=LN_EPS) if config.norm_first else nn.Identity()
        self.head = nn.Linear(d, 256)
        self.reset_parameters()

    # Initialisation ----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """tensor2tensor's init: uniform variance scaling, fan_avg, scale 0.2, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                fan_out, fan_in = module.weight.shape
                limit = math.sqrt(3 * 0.2 / ((fan_in + fan_out) / 2))
                nn.init.uniform_(module.weight, -limit, limit)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

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

    def check_labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
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
        labels = torch.as_tensor(labels, device=self.head.weight.device).long().reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.numel() != batch or labels.min() < 0 or labels.max() >= k:
            raise UserError(f"labels must be {batch} integers in 0..{k - 1}")
        return labels

    def _position_signal(self) -> torch.Tensor:
        if self.config.pos == "timing":
            return self._timing
        return self.row_embed(self._rows) + self.col_embed(self._cols)

    def _embed_steps(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Embedding of intensities `values` generated at `steps`, scaled by sqrt(d)."""
        tokens = self._step_channel[steps] * 256 + values
        return self.embed(tokens) * math.sqrt(self.config.d_model)

    def _conditioning(self, labels: torch.Tensor | None) -> torch.Tensor | float:
        if self.class_embed is None or labels is None:
            return 0.0
        return (self.class_embed(labels) * math.sqrt(self.config.d_model))[:, None, :]

    # Forward -----------------------------------------------------------------------------------
    def logits_in_generation_order(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """[B, N, 256] logits; entry i predicts the element generated at step i."""
        values = self.check_images(images)
        labels = self.check_labels(labels, values.shape[0])
        seq = images_to_raster(values)[:, self.generation_order]
        steps = torch.arange(seq.shape[1], device=seq.device)
        emb = self._embed_steps(seq, steps)
        x = F.pad(emb[:, :-1], (0, 0, 1, 0))  # shift: step i sees the element of step i-1
        x = x + self._position_signal() + self._conditioning(labels)
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, self.pattern, backend)
        return self.head(self.final_norm(x))

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Logits [B, C, H, W, 256] for uint8 images [B, C, H, W]."""
        logits = self.logits_in_generation_order(images, labels, backend)
        return raster_to_images(logits[:, self._inverse_order], self.config.image_shape)

    # Likelihood --------------------------------------------------------------------------------
    def nll(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Negative log-likelihood in nats of every sub-pixel, [B, C, H, W], in float32."""
        return sub_pixel_nll(self.forward(images, labels), images, label_smoothing)

    def loss(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Training loss: mean nats per sub-pixel (optionally label-smoothed)."""
        return self.nll(images, labels, label_smoothing).mean()

    def bits_per_dim(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact bits/dim of each image, [B] float32 (no smoothing; call in eval mode)."""
        return (self.nll(images, labels) / math.log(2)).flatten(1).mean(dim=1)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | x) for every class, [B, K]: Bayes' rule over the class-conditional model.

        `log_prior` [K] is log p(y), e.g. the training set's class frequencies (default:
        uniform). One forward pass per class; log p(x | y) is summed over all sub-pixels.
        """
        k = self.config.num_classes
        if k == 0:
            raise UserError("classify needs a class-conditional model (num_classes > 0)")
        values = self.check_images(images)
        batch = values.shape[0]
        log_px_given_y = torch.stack(
            [
                -self.nll(images, torch.full((batch,), y, device=values.device))
                .double()
                .flatten(1)
                .sum(1)
                for y in range(k)
            ],
            dim=1,
        )
        if log_prior is None:
            log_prior = torch.full((k,), -math.log(k), dtype=torch.float64)
        joint = log_px_given_y + log_prior.to(log_px_given_y.device, torch.float64)
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    def attention_mask(self) -> torch.Tensor:
        """The boolean [N, N] mask in generation order: query step i may see key step j."""
        return self.pattern.dense_mask()

    # Sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        top_k: int = 0,
        top_p: float = 1.0,
        prefix: torch.Tensor | None = None,
        keep: int = 0,
    ) -> torch.Tensor:
        """n uint8 images [n, C, H, W], one position per step in `generation_order`.

        `temperature` divides the logits; `top_k` / `top_p` optionally filter them (0 / 1.0: off).
        With `prefix` (uint8 [n, C, H, W]) the first `keep` generation steps are copied from it
        (completion, see `complete`).
        """
        from .sampling import sample

        return sample(
            self,
            n,
            temperature=temperature,
            labels=labels,
            prefix=prefix,
            keep=keep,
            generator=generator,
            progress=progress,
            top_k=top_k,
            top_p=top_p,
        )

    def keep_positions(self, fraction: float) -> int:
        """How many generation steps make up the first `fraction` of the image, in whole rows.

        Raster orders keep whole pixel rows (the top of the image); `local_2d` keeps whole
        block rows, so that what is kept is exactly a prefix of the generation order.
        """
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"the kept fraction must be in [0, 1], got {fraction}")
        rows, cols = self.config.grid_shape
        unit = self.config.query_shape[0] if self.config.attention == "local_2d" else 1
        return round(fraction * rows / unit) * unit * cols

    def complete(
        self, images: torch.Tensor, keep_positions: int, temperature: float = 1.0, **options
    ) -> torch.Tensor:
        """Keep the first `keep_positions` generation steps of `images`, sample the rest.

        The kept intensities come back bit for bit; see `keep_positions` for a fraction.
        `options` are those of `sample` (labels, generator, progress, top_k, top_p).
        """
        n_pos = self.config.num_positions
        if not 0 <= keep_positions <= n_pos:
            raise UserError(f"keep_positions must be in 0..{n_pos}, got {keep_positions}")
        return self.sample(
            images.shape[0], temperature, prefix=images, keep=keep_positions, **options
        )

    # Saving ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.json` and `model.safetensors` (atomically) into `directory`."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> ImageTransformer:
        """Rebuild a model from `config.json` and `model.safetensors` in `directory`."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, map_location)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
