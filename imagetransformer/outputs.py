"""Output distributions (SPEC.md 1.1-1.2 and 4): what a position is, and how it is scored and drawn.

Two representations share one interface, so the model, the trainer and the samplers never ask
which one they hold:
- `Categorical` ("cat"): one position per sub-pixel, a 256-way softmax over its intensity.
- `LogisticMixture` ("dmol"): one position per pixel, a discretized mixture of logistics over
  its C channels (PixelCNN++), the later channels' means depending on the earlier ones.

A *sequence* is the raster-ordered form the model reads: `[B, N]` intensities for "cat",
`[B, N, C]` for "dmol". *Parameters* are the head's outputs per position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import UserError
from .layout import images_to_raster, raster_to_images

HALF_BIN = 1.0 / 255.0  # half the width of one intensity bin on the [-1, 1] scale
LOG_SCALE_MIN = -7.0
TINY_BIN = 1e-5  # below this CDF difference PixelCNN++ uses the density at the bin centre


class Categorical:
    """256-way softmax per sub-pixel (SPEC.md 4.1); positions are channel intensities."""

    name = "cat"

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        self.image_shape = tuple(image_shape)
        self.num_params = 256

    def to_sequence(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H*W*C], channel fastest."""
        return images_to_raster(images)

    def to_images(self, seq: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_sequence`; trailing axes (e.g. logits) ride along."""
        return raster_to_images(seq, self.image_shape)

    params_to_images = to_images  # logits [B, N, 256] -> [B, C, H, W, 256]

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

    @staticmethod
    def draw(
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


class LogisticMixture:
    """Discretized mixture of K logistics per pixel (SPEC.md 1.2 and 4.2, after PixelCNN++).

    Parameters per pixel, in this order: K mixture logits, K x C locations, K x C log-scales,
    K x C(C-1)/2 channel coefficients (`a, b, c` for RGB: mu_G += a x_R, mu_B += b x_R + c x_G).
    """

    name = "dmol"

    def __init__(self, image_shape: tuple[int, int, int], num_mixtures: int = 10) -> None:
        self.image_shape = tuple(image_shape)
        self.channels = self.image_shape[0]
        self.num_mixtures = num_mixtures
        k, c = num_mixtures, self.channels
        self.num_coeffs = c * (c - 1) // 2
        self.num_params = k * (1 + 2 * c + self.num_coeffs)

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

    def channel_means(
        self, locs: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Means [..., K, C]: each channel's location plus the coupling to the earlier channels
        `x` [..., C] (the pixel's true values on the [-1, 1] scale)."""
        means = [locs[..., 0]]
        pair = 0
        for c in range(1, self.channels):
            mean = locs[..., c]
            for earlier in range(c):
                mean = mean + coeffs[..., pair] * x[..., None, earlier]
                pair += 1
            means.append(mean)
        return torch.stack(means, dim=-1)

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
        if label_smoothing:
            raise UserError("label smoothing applies to the categorical output only, not dmol")
        logits, _, _, _ = self.split(params)
        joint = torch.log_softmax(logits, dim=-1) + self.component_log_probs(params, images).sum(-1)
        return -torch.logsumexp(joint, dim=-1)

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
        if top_k or top_p < 1.0:
            raise UserError("top-k / nucleus filtering applies to the categorical output only")
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
        pair = 0
        for c in range(self.channels):
            mean = locs[:, c]
            for earlier in range(c):
                mean = mean + coeffs[:, pair] * x[:, earlier]
                pair += 1
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


def output_distribution(config) -> Categorical | LogisticMixture:
    """The distribution named by `config.output`."""
    if config.output == "dmol":
        return LogisticMixture(config.image_shape, config.num_mixtures)
    return Categorical(config.image_shape)
