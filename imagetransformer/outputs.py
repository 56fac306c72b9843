"""Output distributions (docs/model.md, "Heads"): what a position is, how it is embedded,
scored and drawn.

`OutputDistribution` is the written interface; the model, the trainer and the samplers only use
it and never ask which one they hold:
- `Categorical` ("cat"): one position per sub-pixel, a 256-way softmax over its intensity.
- `LogisticMixture` ("dmol"): one position per pixel, a discretized mixture of logistics over
  its C channels (PixelCNN++), the later channels' means depending on the earlier ones.
A third output type is one subclass here, registered in `OUTPUT_TYPES` (the config's `output`).

A *sequence* is the raster-ordered form the model reads: `[B, N, *value_shape]` values (`[B, N]`
intensities for "cat", `[B, N, C]` pixels for "dmol"). *Parameters* are the head's outputs per
position.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import UserError
from .layout import images_to_raster, raster_to_images

HALF_BIN = 1.0 / 255.0  # half the width of one intensity bin on the [-1, 1] scale
LOG_SCALE_MIN = -7.0
TINY_BIN = 1e-5  # below this CDF difference PixelCNN++ uses the density at the bin centre


class OutputDistribution(ABC):
    """What one position holds and how its head outputs (parameters) are scored and drawn."""

    name: ClassVar[str]
    supports_filtering: ClassVar[bool] = False  # top-k / nucleus filtering in `draw`
    supports_guidance: ClassVar[bool] = False  # classifier-free guidance (`guide`)
    supports_label_smoothing: ClassVar[bool] = False
    scores_channels: ClassVar[bool] = False  # `nll` gives one term per channel intensity
    head_bias: ClassVar[bool] = True  # whether the head's linear layer has a bias

    def __init__(self, image_shape: tuple[int, int, int], num_params: int) -> None:
        self.image_shape = tuple(image_shape)
        self.num_params = num_params

    @classmethod
    def from_config(cls, config) -> OutputDistribution:
        return cls(config.image_shape)

    @staticmethod
    @abstractmethod
    def positions_per_pixel(channels: int) -> int:
        """Positions (grid columns) one pixel takes: the position grid is H x W*this."""

    @property
    @abstractmethod
    def value_shape(self) -> tuple[int, ...]:
        """The shape of the value at one position: () for an intensity, (C,) for a pixel."""

    @abstractmethod
    def embedding(self, d_model: int, generation_order: torch.Tensor) -> nn.Module:
        """The input embedding: a module mapping values [B, S, *value_shape] generated at steps
        [S] to [B, S, d_model]."""

    @abstractmethod
    def to_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/long [B, C, H, W] -> values [B, N, *value_shape] in raster order."""

    @abstractmethod
    def to_images(self, seq: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_sequence`."""

    @abstractmethod
    def params_to_images(self, params: torch.Tensor) -> torch.Tensor:
        """Parameters [B, N, P] in raster order laid out as the image."""

    @abstractmethod
    def nll(
        self, params: torch.Tensor, images: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Nats of every scored element in float32, from `params_to_images` parameters."""

    @abstractmethod
    def nll_per_subpixel(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Nats of every channel intensity [B, C, H, W], float64, summing to the image's `nll`:
        the surprise of each sub-pixel given everything generated before it."""

    @abstractmethod
    def draw(
        self,
        params: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """One value [B, *value_shape] per row of parameters [B, P]; temperature 0: the mode."""

    @abstractmethod
    def value_probabilities(
        self, params: torch.Tensor, value: torch.Tensor, channel: int
    ) -> torch.Tensor:
        """P(symbol `channel` of a position = v) for v in 0..255, float64 [B, 256], given the
        head's parameters [B, P] and the position's earlier symbols (`value[:, :channel]`):
        what an entropy coder needs, symbol by symbol."""

    @property
    def symbols_per_position(self) -> int:
        """Symbols (intensities) coded at one position, one after the other."""
        return math.prod(self.value_shape)

    def check_sampling(self, top_k: int, top_p: float) -> None:
        """Refuse filtering options this output cannot honour (before sampling starts)."""
        if (top_k or top_p < 1.0) and not self.supports_filtering:
            raise UserError(
                f"top-k / nucleus filtering applies to the categorical output only, not {self.name}"
            )

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
        """Classifier-free guidance: parameters [B, P] of the distribution proportional to
        p(v | y)^(1+weight) / p(v)^weight, from the class-conditional `cond` and the
        "no class" `uncond` outputs of one step."""
        raise UserError(f"guidance applies to the categorical output only, not {self.name}")

    def check_label_smoothing(self, label_smoothing: float) -> None:
        if label_smoothing and not self.supports_label_smoothing:
            raise UserError(
                f"label smoothing (label_smoothing) applies to the categorical output only; "
                f"drop it for {self.name}"
            )

    def kept_mask(self, kept: torch.Tensor) -> torch.Tensor:
        """Raster positions kept (bool [N]) -> the intensities they fix, bool [C, H, W]."""
        per_value = kept.view(1, -1, *(1 for _ in self.value_shape))
        return self.to_images(per_value.expand(1, -1, *self.value_shape))[0]


class IntensityEmbedding(nn.Embedding):
    """One row per (channel, intensity): channel c with value v uses row 256*c + v, times
    sqrt(d) (one position per sub-pixel)."""

    def __init__(self, channels: int, d_model: int, generation_order: torch.Tensor) -> None:
        super().__init__(256 * channels, d_model)
        # the channel of the position generated at each step (raster index t has channel t % C)
        self.register_buffer("step_channel", generation_order % channels, persistent=False)

    def forward(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        tokens = self.step_channel[steps] * 256 + values
        return super().forward(tokens) * math.sqrt(self.embedding_dim)


class PixelEmbedding(nn.Linear):
    """A pixel's C intensities rescaled to [-1, 1], a linear layer (the 1 x C convolution) and
    ReLU (one position per pixel)."""

    def __init__(self, channels: int, d_model: int) -> None:
        super().__init__(channels, d_model)

    def forward(self, values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(to_unit_interval(values)))


class Categorical(OutputDistribution):
    """256-way softmax per sub-pixel; positions are channel intensities."""

    name = "cat"
    supports_filtering = True
    supports_guidance = True
    supports_label_smoothing = True
    scores_channels = True

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        super().__init__(image_shape, num_params=256)

    @staticmethod
    def positions_per_pixel(channels: int) -> int:
        return channels

    @property
    def value_shape(self) -> tuple[int, ...]:
        return ()

    def embedding(self, d_model: int, generation_order: torch.Tensor) -> nn.Module:
        return IntensityEmbedding(self.image_shape[0], d_model, generation_order)

    def to_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W*C], channel fastest."""
        return images_to_raster(images)

    def to_images(self, seq: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_sequence`; trailing axes (e.g. logits) ride along."""
        return raster_to_images(seq, self.image_shape)

    def params_to_images(self, params: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, 256] -> [B, C, H, W, 256]."""
        return self.to_images(params)

    def nll(
        self, params: torch.Tensor, images: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Nats of every sub-pixel [B, C, H, W] from logits [B, C, H, W, 256], in float32."""
        targets = images.long()
        return F.cross_entropy(
            params.float().flatten(0, -2),
            targets.flatten(),
            reduction="none",
            label_smoothing=label_smoothing,
        ).view(targets.shape)

    def nll_per_subpixel(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Every sub-pixel is its own position: its nats as `nll` gives them."""
        return self.nll(params, images).double()

    def value_probabilities(
        self, params: torch.Tensor, value: torch.Tensor, channel: int
    ) -> torch.Tensor:
        return torch.softmax(params.double(), dim=-1)

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
        """Log-probabilities mixed in log space: (1 + w) log p(v | y) - w log p(v)."""
        cond, uncond = cond.float().log_softmax(-1), uncond.float().log_softmax(-1)
        return (1.0 + weight) * cond - weight * uncond

    def draw(
        self,
        params: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """One intensity per row of logits [B, 256]; temperature 0 means argmax.

        `top_k` keeps the k most likely values, `top_p` the smallest set whose probability
        reaches p (nucleus sampling); the rest get probability 0 before renormalising.
        """
        if temperature <= 0:
            return params.argmax(dim=-1)
        logits = params.float() / temperature
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def to_unit_interval(values: torch.Tensor) -> torch.Tensor:
    """Intensities 0..255 -> bin centres in [-1, 1] (`v / 127.5 - 1`), float32."""
    return values.float() / 127.5 - 1.0


def discretized_logistic_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(bin of x) under a logistic(mean, exp(log_scale)), x a bin centre in [-1, 1].

    The bin of 0 reaches to -inf and that of 255 to +inf, so the 256 bins hold all the mass;
    where the CDF difference is below 1e-5 (float32 cancellation) the density at the centre
    times the bin width stands in, as in PixelCNN++.
    """
    centered = x - mean
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (centered + HALF_BIN)
    min_in = inv_scale * (centered - HALF_BIN)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): bin of 0
    log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): bin of 255
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * centered
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    inner = torch.where(
        cdf_delta > TINY_BIN,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid - math.log(127.5),
    )
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner)
    )


class LogisticMixture(OutputDistribution):
    """Discretized mixture of K logistics per pixel (after PixelCNN++).

    Parameters per pixel, in this order: K mixture logits, K x C locations, K x C log-scales,
    K x C(C-1)/2 channel coefficients (`a, b, c` for RGB: mu_G += a x_R, mu_B += b x_R + c x_G).
    """

    name = "dmol"
    head_bias = False  # a linear layer without bias to the mixture parameters, as the reference

    def __init__(self, image_shape: tuple[int, int, int], num_mixtures: int = 10) -> None:
        c = image_shape[0]
        self.channels = c
        self.num_mixtures = num_mixtures
        self.num_coeffs = c * (c - 1) // 2
        super().__init__(image_shape, num_params=num_mixtures * (1 + 2 * c + self.num_coeffs))

    @classmethod
    def from_config(cls, config) -> LogisticMixture:
        return cls(config.image_shape, config.num_mixtures)

    @staticmethod
    def positions_per_pixel(channels: int) -> int:
        return 1

    @property
    def value_shape(self) -> tuple[int, ...]:
        return (self.channels,)

    def embedding(self, d_model: int, generation_order: torch.Tensor) -> nn.Module:
        return PixelEmbedding(self.channels, d_model)

    def to_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W, C]: one position per pixel, raster order."""
        return rearrange(images, "b c h w -> b (h w) c")

    def to_images(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, H*W, C] values -> [B, C, H, W]."""
        _, h, w = self.image_shape
        return rearrange(seq, "b (h w) c -> b c h w", h=h, w=w)

    def params_to_images(self, params: torch.Tensor) -> torch.Tensor:
        """[B, H*W, P] -> [B, H, W, P]: per-pixel parameters laid out as the image."""
        _, h, w = self.image_shape
        return rearrange(params, "b (h w) p -> b h w p", h=h, w=w)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mixture logits [..., K], locations and log-scales [..., K, C], coefficients
        [..., K, C(C-1)/2] (tanh), from [..., P] in float32."""
        k, c = self.num_mixtures, self.channels
        params = params.float()
        logits = params[..., :k]
        locs = params[..., k : k + k * c].unflatten(-1, (k, c))
        log_scales = params[..., k + k * c : k + 2 * k * c].unflatten(-1, (k, c))
        coeffs = torch.tanh(params[..., k + 2 * k * c :]).unflatten(-1, (k, self.num_coeffs))
        return logits, locs, log_scales.clamp(min=LOG_SCALE_MIN), coeffs

    def coupled_mean(
        self, locs: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, c: int
    ) -> torch.Tensor:
        """The mean of channel `c`: its location plus the coupling to the earlier channels
        `x[..., :c]` on the [-1, 1] scale (locs [..., C], coeffs [..., C(C-1)/2], x [..., C])."""
        first = c * (c - 1) // 2  # coefficients of (c, 0), (c, 1), ... follow those of c - 1
        mean = locs[..., c]
        for earlier in range(c):
            mean = mean + coeffs[..., first + earlier] * x[..., earlier]
        return mean

    def channel_means(
        self, locs: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Means [..., K, C] of every component, coupled to the pixel's true values `x` [..., C]."""
        x = x[..., None, :]  # the same pixel for every component
        return torch.stack(
            [self.coupled_mean(locs, coeffs, x, c) for c in range(self.channels)], dim=-1
        )

    def component_log_probs(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """log p_k(x_c | x_<c) of every component k and channel c: [B, H, W, K, C].

        For each k and c this is a normalized distribution over the 256 values of channel c
        (given the earlier channels): the test of the likelihood's normalization reads it.
        """
        _, locs, log_scales, coeffs = self.split(params)
        x = to_unit_interval(rearrange(images, "b c h w -> b h w c"))
        means = self.channel_means(locs, coeffs, x)
        return discretized_logistic_log_prob(x[..., None, :], means, log_scales)

    def nll(
        self, params: torch.Tensor, images: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Nats of every pixel [B, H, W] (all its channels) from parameters [B, H, W, P]."""
        self.check_label_smoothing(label_smoothing)
        logits, _, _, _ = self.split(params)
        joint = torch.log_softmax(logits, dim=-1) + self.component_log_probs(params, images).sum(-1)
        return -torch.logsumexp(joint, dim=-1)

    def nll_per_subpixel(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """A pixel's nats spread over its channels by the chain rule of the mixture itself:
        channel c gets -log p(x_c | x_<c) = -log p(x_<=c) + log p(x_<c), where
        p(x_<=c) = sum_k pi_k prod_{c' <= c} p_k(x_c'). Exact: the channels add up to `nll`
        (red carries the mixture's marginal, green and blue what is left)."""
        logits, _, _, _ = self.split(params)
        log_pi = torch.log_softmax(logits.double(), dim=-1)  # [B, H, W, K]
        per_channel = self.component_log_probs(params, images).double()  # [B, H, W, K, C]
        prefix = torch.logsumexp(log_pi[..., None] + per_channel.cumsum(-1), dim=-2)  # [B,H,W,C]
        conditional = prefix - F.pad(prefix[..., :-1], (1, 0))
        return -rearrange(conditional, "b h w c -> b c h w")

    def value_probabilities(
        self, params: torch.Tensor, value: torch.Tensor, channel: int
    ) -> torch.Tensor:
        """Channel `channel` of a pixel given its earlier channels: the components weighted by
        their posterior given those channels, each coupled to them."""
        logits, locs, log_scales, coeffs = self.split(params)  # [B, K], [B, K, C], ...
        x = to_unit_interval(value)[:, None, :]  # [B, 1, C]: the same pixel for every component
        log_w = torch.log_softmax(logits, dim=-1).double()
        for earlier in range(channel):
            mean = self.coupled_mean(locs, coeffs, x, earlier)
            log_w = (
                log_w
                + discretized_logistic_log_prob(
                    x[..., earlier], mean, log_scales[..., earlier]
                ).double()
            )
        mean = self.coupled_mean(locs, coeffs, x, channel)[..., None]  # [B, K, 1]
        grid = to_unit_interval(torch.arange(256, device=params.device))  # [256]
        per_value = discretized_logistic_log_prob(grid, mean, log_scales[..., channel, None])
        joint = torch.log_softmax(log_w, dim=-1)[..., None] + per_value.double()
        return torch.exp(torch.logsumexp(joint, dim=1))

    def draw(
        self,
        params: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """One pixel [B, C] of intensities from parameters [B, P].

        Picks a component (Gumbel-max over logits / T), then each channel in turn from its
        logistic with scale x T, coupled to the earlier channels' *drawn 8-bit values*: exactly
        the distribution the likelihood scores. Temperature 0: the likeliest component's modes.
        """
        self.check_sampling(top_k, top_p)
        logits, locs, log_scales, coeffs = self.split(params)
        batch = params.shape[0]
        if temperature <= 0:
            component = logits.argmax(dim=-1)
        else:
            u = _uniform((batch, self.num_mixtures), params.device, generator)
            component = (logits / temperature - torch.log(-torch.log(u))).argmax(dim=-1)
        rows = torch.arange(batch, device=params.device)
        locs, log_scales = locs[rows, component], log_scales[rows, component]
        coeffs = coeffs[rows, component]
        noise = (
            torch.zeros(batch, self.channels, device=params.device)
            if temperature <= 0
            else _logistic_noise((batch, self.channels), params.device, generator)
        )
        values = torch.zeros(batch, self.channels, dtype=torch.long, device=params.device)
        x = torch.zeros(batch, self.channels, device=params.device)
        for c in range(self.channels):
            mean = self.coupled_mean(locs, coeffs, x, c)  # x holds the channels drawn so far
            scale = torch.exp(log_scales[:, c]) * max(temperature, 0.0)
            sample = (mean + scale * noise[:, c]).clamp(-1.0, 1.0)
            values[:, c] = torch.round((sample + 1.0) * 127.5).clamp(0, 255).long()
            x[:, c] = to_unit_interval(values[:, c])
        return values


def _uniform(shape: tuple[int, ...], device, generator) -> torch.Tensor:
    u = torch.rand(shape, device=device, generator=generator)
    return u.clamp(1e-5, 1.0 - 1e-5)


def _logistic_noise(shape: tuple[int, ...], device, generator) -> torch.Tensor:
    u = _uniform(shape, device, generator)
    return torch.log(u) - torch.log1p(-u)


# name -> class: the one place that lists the output types (the config's `output`)
OUTPUT_TYPES: dict[str, type[OutputDistribution]] = {
    cls.name: cls for cls in (Categorical, LogisticMixture)
}


def output_distribution(config) -> OutputDistribution:
    """The distribution named by `config.output`."""
    return OUTPUT_TYPES[config.output].from_config(config)
