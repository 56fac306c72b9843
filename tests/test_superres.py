"""Super-resolution (docs/model.md, Conditioning: Super-resolution): an encoder over the
low-resolution image, a decoder that attends to it; causality, conditioning, samplers and
learning."""

import pytest
import torch

from imagetransformer import ImageTransformer, UserError
from imagetransformer.data import load_dataset
from imagetransformer.layout import area_downsample
from imagetransformer.sampling import sample, sample_reference

from .helpers import ATTENTION_CONFIGS, tiny_config


def sr_config(kind="local_1d", image_shape=(3, 4, 8), **extra):
    attention = dict(ATTENTION_CONFIGS[kind])
    if kind == "local_2d":
        attention.update(query_shape=(2, 6), memory_flange=(1, 3))
    params = dict(task="superres", scale=2, encoder_layers=2, **attention)
    params.update(extra)
    return tiny_config(kind, image_shape=image_shape, **params)


def images_and_low_res(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, *config.image_shape), generator=g, dtype=torch.uint8)
    return images, area_downsample(images, config.scale)


@pytest.mark.parametrize("kind", list(ATTENTION_CONFIGS))
def test_decoder_stays_causal_with_the_encoder_attached(kind):
    model = ImageTransformer(sr_config(kind)).eval()
    images, low_res = images_and_low_res(model.config)
    base = model.logits_in_generation_order(images, low_res=low_res)
    n = model.config.num_positions
    c, h, w = model.config.image_shape
    for step in [0, 7, n // 2, n - 1]:
        t = int(model.generation_order[step])  # raster index y*(W*C) + C*x + c
        changed = images.clone()
        changed[:, t % c, t // (w * c), (t % (w * c)) // c] ^= 0x33
        out = model.logits_in_generation_order(changed, low_res=low_res)
        assert torch.allclose(out[:, : step + 1], base[:, : step + 1], atol=1e-6, rtol=0)
        if step < n - 1:
            assert not torch.allclose(out[:, step + 1], base[:, step + 1], atol=1e-4)


def test_the_low_resolution_input_changes_every_prediction():
    model = ImageTransformer(sr_config()).eval()
    images, low_res = images_and_low_res(model.config)
    base = model.logits_in_generation_order(images, low_res=low_res)
    other = low_res.clone()
    other[:, :, 0, 0] ^= 0x40  # one low-resolution pixel
    out = model.logits_in_generation_order(images, low_res=other)
    assert (out - base).abs().amax(dim=-1).min() > 1e-6  # every position, step 0 included
    # by default the images' own downsampled copy is the input
    assert torch.equal(model.logits_in_generation_order(images), base)


def _output_settings(kind: str, output: str) -> dict:
    extra = dict(output="dmol", num_mixtures=2) if output == "dmol" else {}
    if output == "dmol" and kind == "local_2d":
        extra.update(query_shape=(2, 2), memory_flange=(1, 1))
    return extra


def _samplers_agree(model: ImageTransformer, low_res: torch.Tensor) -> torch.Tensor:
    """The cached sampler's images equal the reference sampler's (same seed); returns them."""
    cached, logits = sample(
        model, 2, low_res=low_res, generator=torch.Generator().manual_seed(2), return_logits=True
    )
    ref, ref_logits = sample_reference(
        model, 2, low_res=low_res, generator=torch.Generator().manual_seed(2), return_logits=True
    )
    assert torch.equal(cached, ref)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    return cached


@pytest.mark.parametrize(
    "kind,output", [("local_1d", "cat"), ("local_2d", "cat"), ("global", "dmol")]
)
def test_cached_sampler_matches_reference_given_the_low_resolution_image(kind, output):
    model = ImageTransformer(sr_config(kind, **_output_settings(kind, output)))
    _, low_res = images_and_low_res(model.config)
    cached = _samplers_agree(model, low_res)
    assert cached.shape == (2, 3, 4, 8)
    assert torch.equal(model.upscale(low_res, generator=torch.Generator().manual_seed(2)), cached)


def test_backends_agree_with_cross_attention():
    model = ImageTransformer(sr_config("local_2d", num_heads=4))
    images, low_res = images_and_low_res(model.config, batch=3)
    grads = {}
    for backend in ("dense", "blocked"):
        model.zero_grad()
        model.use_backend(backend)(images, low_res=low_res).square().mean().backward()
        grads[backend] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for name, grad in grads["dense"].items():
        assert torch.allclose(grad, grads["blocked"][name], atol=1e-5), name
    assert any("cross_attn" in name for name in grads["dense"])


def test_bad_low_resolution_inputs_are_refused_clearly():
    model = ImageTransformer(sr_config())
    with pytest.raises(UserError, match=r"upscales \[B, 3, 2, 4\]"):
        model.sample(1, low_res=torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(UserError, match="uint8"):
        model.upscale(torch.zeros(1, 3, 2, 4))
    with pytest.raises(UserError, match="needs low_res"):
        model.sample(1)
    plain = ImageTransformer(tiny_config())
    with pytest.raises(UserError, match="no low-resolution input"):
        plain.sample(1, low_res=torch.zeros(1, 3, 2, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match="scale"):
        sr_config(scale=3)


def _train(config, images, steps, seed=0):
    torch.manual_seed(seed)
    model = ImageTransformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (16,), generator=g)]
        optimizer.zero_grad()
        model.loss(batch).backward()
        optimizer.step()
    return model.eval()


def test_a_small_superres_model_beats_the_unconditional_one():
    """8x8 digits from their 4x4 area averages: measured 2.93 against 3.06 bits/dim."""
    train = load_dataset("mnist5k", "train", image_size=8).images[:1000]
    test = load_dataset("mnist5k", "test", image_size=8).images[:200]
    common = dict(
        image_shape=(1, 8, 8),
        d_model=32,
        num_heads=2,
        ffn_size=64,
        num_layers=2,
        dropout=0.0,
        block_length=16,
        memory_length=16,
        norm_first=True,
    )
    plain = _train(tiny_config("local_1d", **common), train, steps=300)
    superres = _train(
        tiny_config("local_1d", task="superres", scale=2, encoder_layers=1, **common),
        train,
        steps=300,
    )
    with torch.no_grad():
        plain_bpd = plain.bits_per_dim(test).mean().item()
        superres_bpd = superres.bits_per_dim(test).mean().item()  # given the 4x4 input
    assert superres_bpd < plain_bpd - 0.06, (plain_bpd, superres_bpd)


def test_completion_of_a_superres_model_uses_the_images_own_input():
    model = ImageTransformer(sr_config())
    images, low_res = images_and_low_res(model.config, batch=2)
    keep = model.keep_positions(0.5)
    out = model.complete(images, keep, generator=torch.Generator().manual_seed(0))
    same = model.sample(
        2, prefix=images, keep=keep, low_res=low_res, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, same)
    assert torch.equal(out[:, :, :2], images[:, :, :2])


def _with_signals(kind="local_1d", **extra) -> ImageTransformer:
    """A model with the given low-resolution signals, their weights made non-zero (they start
    at 0)."""
    model = ImageTransformer(sr_config(kind, **extra))
    generator = torch.Generator().manual_seed(4)
    for layer in (model.low_res_embed, model.low_res_upsample, model.low_res_remainder):
        if layer is not None:
            torch.nn.init.normal_(layer.weight, std=0.5, generator=generator)
    return model


def _with_low_res_signal(kind="local_1d", **extra) -> ImageTransformer:
    return _with_signals(kind, low_res_signal=True, **extra)


@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_the_low_resolution_signal_is_the_pixel_covering_each_position(output):
    extra = dict(output="dmol", num_mixtures=2) if output == "dmol" else {}
    model = _with_low_res_signal(**extra).eval()
    _, low_res = images_and_low_res(model.config)
    c, h, w = model.config.image_shape
    per_pixel = 1 if output == "dmol" else c
    signal = model.low_res_signal(low_res)
    other = low_res.clone()
    other[:, :, 1, 2] ^= 0x40  # the pixel covering output rows 2-3, columns 4-5 (scale 2)
    changed = (model.low_res_signal(other) - signal).abs().amax(dim=(0, 2)) > 0  # [N]
    raster = model.generation_order  # the raster position predicted at each step
    pixel = raster // per_pixel
    covered = ((pixel // w) // 2 == 1) & ((pixel % w) // 2 == 2)
    assert torch.equal(changed, covered) and int(covered.sum()) == 4 * per_pixel
    # the paper's model is where it starts: a zero embedding adds nothing
    plain = ImageTransformer(sr_config(low_res_signal=True, **extra))
    assert plain.low_res_signal(low_res).abs().max() == 0


@pytest.mark.parametrize(
    "kind,output", [("local_1d", "cat"), ("local_2d", "cat"), ("global", "dmol")]
)
def test_with_the_low_resolution_signal_decoding_stays_causal_and_exact(kind, output):
    model = _with_low_res_signal(kind, **_output_settings(kind, output)).eval()
    images, low_res = images_and_low_res(model.config)
    base = model.logits_in_generation_order(images, low_res=low_res)
    changed = images.clone()
    changed[:, :, -1, -1] ^= 0x33  # the last pixel: nothing generated before it may change
    last = model.generation_order.tolist().index(model.config.num_positions - 1)
    out = model.logits_in_generation_order(changed, low_res=low_res)
    first = min(
        last,
        *[
            model.generation_order.tolist().index(model.config.num_positions - 1 - k)
            for k in range(model.distribution.positions_per_pixel(3))
        ],
    )
    assert torch.allclose(out[:, : first + 1], base[:, : first + 1], atol=1e-6, rtol=0)
    _samplers_agree(model, low_res)


def test_the_low_resolution_signal_needs_a_superres_model():
    with pytest.raises(UserError, match="low_res_signal needs a super-resolution model"):
        tiny_config(low_res_signal=True)


@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_the_upsampling_reads_the_3x3_pixels_around_the_covering_one(output):
    """Each position's signal is its place's map of the 3x3 low-resolution neighbourhood of
    the pixel covering it (edges repeated): changing one low-resolution pixel changes the
    positions of its own block and of the eight around it, and nothing else."""
    extra = dict(output="dmol", num_mixtures=2) if output == "dmol" else {}
    model = _with_signals(image_shape=(3, 8, 8), low_res_upsample=True, **extra).eval()
    _, low_res = images_and_low_res(model.config)
    c, h, w = model.config.image_shape
    per_pixel = 1 if output == "dmol" else c
    signal = model.low_res_signal(low_res)
    other = low_res.clone()
    other[:, :, 1, 2] ^= 0x40  # low-resolution row 1, column 2 (scale 2: a 4x4 input)
    changed = (model.low_res_signal(other) - signal).abs().amax(dim=(0, 2)) > 0  # [N]
    pixel = model.generation_order // per_pixel  # the pixel predicted at each step
    low_y, low_x = (pixel // w) // 2, (pixel % w) // 2
    near = ((low_y - 1).abs() <= 1) & ((low_x - 2).abs() <= 1)
    assert torch.equal(changed, near) and int(near.sum()) == 9 * 4 * per_pixel
    # one position by hand: the raster position of pixel (0, 1), its last channel
    step = model.generation_order.tolist().index(1 * per_pixel + per_pixel - 1)
    x = torch.nn.functional.pad(low_res.float() / 127.5 - 1, (1, 1, 1, 1), mode="replicate")
    around = x[:, :, 0:3, 0:3].flatten(1)  # the 3x3 around low-resolution pixel (0, 0)
    place = 1 * per_pixel + per_pixel - 1  # place (0, 1) in its 2x2 block, that channel
    weight = model.low_res_upsample.weight.unflatten(0, (-1, model.config.d_model))[place]
    expected = around @ weight.T * model.config.d_model**0.5
    assert torch.allclose(signal[:, step], expected, atol=1e-5)
    plain = ImageTransformer(sr_config(low_res_upsample=True, **extra))  # starts at zero
    assert plain.low_res_signal(low_res).abs().max() == 0


@pytest.mark.parametrize("kind,output", [("local_1d", "cat"), ("local_2d", "dmol")])
def test_with_the_upsampling_samplers_agree(kind, output):
    settings = _output_settings(kind, output)
    model = _with_signals(kind, low_res_signal=True, low_res_upsample=True, **settings).eval()
    _, low_res = images_and_low_res(model.config)
    _samplers_agree(model, low_res)


def test_the_upsampling_needs_a_superres_model():
    with pytest.raises(UserError, match="low_res_upsample needs a super-resolution model"):
        tiny_config(low_res_upsample=True)


def _remainder_by_hand(model: ImageTransformer, images: torch.Tensor, low_res: torch.Tensor):
    """[B, N, *value_shape]: per step, s^2 times the covering low-resolution value less the
    values of the same block and channel generated before the step, over how many of the
    block's values are still to come (rounded half up), from a loop over the raster."""
    c, h, w = model.config.image_shape
    s = model.config.scale
    cat = model.config.output == "cat"
    seq = model.to_steps(images).long()
    order = model.generation_order.tolist()
    expected = torch.zeros(seq.shape, dtype=torch.long)
    for step, raster in enumerate(order):
        pixel, channel = (raster // c, raster % c) if cat else (raster, None)
        y, x = pixel // w, pixel % w
        block = [
            j
            for j, other in enumerate(order)
            if ((other // c if cat else other) // w) // s == y // s
            and ((other // c if cat else other) % w) // s == x // s
            and (not cat or other % c == channel)
        ]
        before = [j for j in block if j < step]
        covering = low_res[:, :, y // s, x // s].long()  # [B, C]
        total = s * s * (covering[:, channel] if cat else covering)
        remainder = total - sum((seq[:, j] for j in before), torch.zeros_like(total))
        k = s * s - len(before)
        expected[:, step] = torch.div(2 * remainder + k, 2 * k, rounding_mode="floor")
    return expected


@pytest.mark.parametrize(
    "kind,output", [("local_1d", "cat"), ("local_2d", "cat"), ("local_1d", "dmol")]
)
def test_the_remainder_is_what_the_rest_of_the_block_must_average(kind, output):
    """The remainder signal reads the row of (s^2 x the low-resolution value - the block's
    values so far) / (values to come); the last value of a block is then known to within the
    rounding of the area mean (s^2 / 2)."""
    model = _with_signals(kind, low_res_remainder=True, **_output_settings(kind, output))
    images, low_res = images_and_low_res(model.config, seed=3)
    seq = model.to_steps(images)
    steps = torch.arange(model.config.num_positions)
    rows = model.remainder_rows(model.remainder_base(low_res), seq, steps)
    offset, s = 2, model.config.scale  # (s^2 + 1) // 2 for s = 2
    width = 256 + 2 * offset
    means = rows % width - offset
    expected = _remainder_by_hand(model, images, low_res)
    assert torch.equal(means, expected.clamp(-offset, 255 + offset))
    last = model._to_come == 1
    assert bool(((means[:, last] - seq[:, last].long()).abs() <= s * s // 2).all())
    channel = rows // width  # each value's own channel
    if output == "cat":
        raster = model.generation_order
        assert torch.equal(channel, (raster % 3).expand_as(channel))
    else:
        assert torch.equal(channel, torch.arange(3).expand_as(channel))


@pytest.mark.parametrize(
    "kind,output", [("local_1d", "cat"), ("local_2d", "dmol"), ("global", "cat")]
)
def test_with_the_remainder_decoding_stays_causal_and_samplers_agree(kind, output):
    model = _with_signals(kind, low_res_remainder=True, **_output_settings(kind, output)).eval()
    images, low_res = images_and_low_res(model.config)
    base = model.logits_in_generation_order(images, low_res=low_res)
    n = model.config.num_positions
    for step in (0, n // 2, n - 1):  # the values from `step` on change: what comes before not
        changed = model.to_steps(images).clone()
        changed[:, step:] = (changed[:, step:] + 77) % 256
        out = model.logits_in_generation_order(model.from_steps(changed), low_res=low_res)
        assert torch.allclose(out[:, : step + 1], base[:, : step + 1], atol=1e-5, rtol=0)
        if step < n - 1:
            assert not torch.allclose(out[:, step + 1 :], base[:, step + 1 :], atol=1e-3)
    _samplers_agree(model, low_res)
    settings = _output_settings(kind, output)
    plain = ImageTransformer(sr_config(kind, low_res_remainder=True, **settings))  # zero at first
    signal = plain.remainder_signal(plain.remainder_base(low_res), changed, torch.arange(n))
    assert signal.abs().max() == 0


def test_the_remainder_needs_a_superres_model():
    with pytest.raises(UserError, match="low_res_remainder needs a super-resolution model"):
        tiny_config(low_res_remainder=True)


def _allowed_by_hand(low_res_value: int, earlier_sum: int, to_come: int, area: int) -> set[int]:
    """The values v for which some rest of the block (to_come - 1 values in 0..255) gives a
    sum whose rounded mean, as area_downsample rounds it, is the low-resolution value."""
    sums = torch.arange(0, 255 * area + 1, dtype=torch.float64)
    hits = (sums / area).round() == low_res_value
    allowed = set()
    for v in range(256):
        first = earlier_sum + v
        if bool(hits[first : first + 255 * (to_come - 1) + 1].any()):
            allowed.add(v)
    return allowed


@pytest.mark.parametrize(
    "kind,image_shape,scale", [("local_1d", (3, 4, 8), 2), ("local_2d", (1, 6, 6), 3)]
)
def test_the_bounds_keep_exactly_the_values_the_block_can_still_average_with(
    kind, image_shape, scale
):
    """With low_res_bounds a step's finite logits are the values from which the rest of its
    block can still round to the low-resolution value (by brute force over the sums; s^2 = 4
    has halfway sums, which round to even, s^2 = 9 has none); the truth is always one."""
    model = _with_signals(kind, image_shape=image_shape, scale=scale, low_res_bounds=True)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (3, *image_shape), generator=g, dtype=torch.uint8)
    images[0] = (images[0] // 64) * 64  # block sums at and near the halfway points
    images[1, :, : scale * 2] = 0  # blocks of black, whose value must stay small
    low_res = area_downsample(images, scale)
    with torch.no_grad():
        logits = model.logits_in_generation_order(images, low_res=low_res)
    seq = model.to_steps(images).long()
    assert bool(logits.gather(-1, seq[..., None]).isfinite().all())
    c, _, w = image_shape
    area = scale * scale
    for b in range(len(images)):
        for step in range(0, model.config.num_positions, 5):
            raster = int(model.generation_order[step])
            pixel, channel = raster // c, raster % c
            y, x = pixel // w, pixel % w
            earlier = [int(j) for j in model._earlier[step] if j >= 0]
            allowed = _allowed_by_hand(
                int(low_res[b, channel, y // scale, x // scale]),
                sum(int(seq[b, j]) for j in earlier),
                area - len(earlier),
                area,
            )
            finite = set(torch.nonzero(logits[b, step].isfinite())[:, 0].tolist())
            assert finite == allowed, (b, step)


def test_with_the_bounds_every_sample_downsamples_to_its_input():
    """An untrained model with the bounds samples, at any temperature and by either sampler,
    images whose area means are the input exactly; the bounds only take probability from
    values the truth never has, so the truth costs no more than without them."""
    model = _with_signals(low_res_upsample=True, low_res_bounds=True).eval()
    images, low_res = images_and_low_res(model.config, seed=6)
    for temperature in (1.0, 0.8):
        drawn = model.upscale(low_res, temperature=temperature)
        assert torch.equal(area_downsample(drawn, model.config.scale), low_res)
    drawn = _samplers_agree(model, low_res)
    assert torch.equal(area_downsample(drawn, model.config.scale), low_res)
    model.config.low_res_bounds = False
    unbounded = model.bits_per_dim(images, low_res=low_res)
    model.config.low_res_bounds = True
    bounded = model.bits_per_dim(images, low_res=low_res)
    assert bool((bounded < unbounded).all())


def test_the_bounds_need_a_categorical_superres_model():
    with pytest.raises(UserError, match="low_res_bounds needs a super-resolution model"):
        tiny_config(low_res_bounds=True)
    with pytest.raises(UserError, match="low_res_bounds needs the categorical output"):
        sr_config(low_res_bounds=True, output="dmol", num_mixtures=2)
