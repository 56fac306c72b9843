"""Model properties: causality, backend agreement, exact likelihoods, clear errors."""

import math

import pytest
import torch

from imagetransformer import ImageTransformer, UserError
from imagetransformer.evaluation import classify
from imagetransformer.layout import images_to_raster
from imagetransformer.model import NEAR_INIT, timing_signal
from imagetransformer.tools.score import marginal_bits_per_subpixel

from .helpers import ATTENTION_CONFIGS, tiny_config

KINDS = list(ATTENTION_CONFIGS)


def random_images(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *config.image_shape), generator=g, dtype=torch.uint8)


def change_step(images, model, step):
    """A copy of `images` with the intensity generated at `step` changed."""
    raster = images_to_raster(images).long()
    t = int(model.generation_order[step])
    raster[:, t] = (raster[:, t] + 97) % 256
    c, h, w = images.shape[1:]
    return raster.view(-1, h, w, c).permute(0, 3, 1, 2).to(torch.uint8)


SIGNALS = [None, "above_signal", "near_signal"]  # values of earlier rows in the decoder's input


def _signal(name: str | None) -> dict:
    return {name: True} if name else {}


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("backend", ["dense", "blocked"])
@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind, backend, signal):
    config = tiny_config(kind, backend=backend, **_signal(signal))
    model = ImageTransformer(config).eval()
    images = random_images(config)
    base = model.logits_in_generation_order(images)
    n = config.num_positions
    for step in [0, 1, 5, 17, n // 2, n - 2, n - 1]:
        changed = model.logits_in_generation_order(change_step(images, model, step))
        assert torch.allclose(changed[:, : step + 1], base[:, : step + 1], atol=1e-6, rtol=0)
        if step < n - 1:
            assert not torch.allclose(changed[:, step + 1], base[:, step + 1], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_causality_of_the_anchored_mixture(kind):
    """mixture_anchor reads the decoded pixel to the left (above in the first column): a
    pixel's parameters still depend on earlier pixels only, and on its anchor."""
    config = tiny_config(kind, output="dmol", mixture_anchor=True)
    model = ImageTransformer(config).eval()
    images = random_images(config)
    base = model.logits_in_generation_order(images)
    n = config.num_positions
    w = config.image_shape[2]
    for step in [0, 1, 5, n // 2, n - 2, n - 1]:
        pixel = int(model.generation_order[step])  # one position per pixel
        changed = images.clone()
        changed[:, :, pixel // w, pixel % w] += 97  # every channel, wrapping round 256
        after = model.logits_in_generation_order(changed)
        assert torch.allclose(after[:, : step + 1], base[:, : step + 1], atol=1e-6, rtol=0)
        if step < n - 1:
            assert not torch.allclose(after[:, step + 1 :], base[:, step + 1 :], atol=1e-4)


def test_the_anchor_moves_every_mean_by_the_pixel_to_the_left():
    """Head outputs of a model with the anchor minus the same weights without it: the left
    pixel's value on the [-1, 1] scale in every component's means (the one above in the first
    column, nothing for the first pixel), and nothing in the other parameters."""
    config = tiny_config("local_1d", output="dmol", num_mixtures=2, mixture_anchor=True)
    model = ImageTransformer(config).eval()
    plain = ImageTransformer(tiny_config("local_1d", output="dmol", num_mixtures=2)).eval()
    plain.load_state_dict(model.state_dict())
    images = random_images(config)
    moved = model.logits_in_generation_order(images) - plain.logits_in_generation_order(images)
    unit = images.float() * (2 / 255) - 1  # [B, C, H, W]
    expected = torch.zeros_like(unit)
    expected[..., 1:] = unit[..., :-1]  # the pixel to the left
    expected[..., 1:, 0] = unit[..., :-1, 0]  # the first column: the one above
    locs = moved[..., 2:8].unflatten(-1, (2, 3))  # [B, N, K, C], raster order for local_1d
    want = expected.flatten(2).transpose(1, 2)[:, :, None, :].expand_as(locs)
    assert torch.allclose(locs, want, atol=1e-6)
    assert torch.equal(moved[..., :2], torch.zeros_like(moved[..., :2]))
    assert torch.equal(moved[..., 8:], torch.zeros_like(moved[..., 8:]))
    with pytest.raises(UserError, match="output=dmol"):
        tiny_config(mixture_anchor=True)


@pytest.mark.parametrize(
    "kind,shape,extra",
    [
        ("global", (3, 4, 6), {}),
        ("local_1d", (3, 4, 6), {}),
        ("local_1d", (1, 5, 7), {}),  # 35 positions: the last block is partial
        # memory of whole blocks (windows of blocks side by side) and not (strided windows)
        ("local_1d", (1, 5, 7), dict(block_length=4, memory_length=8)),
        ("local_1d", (1, 5, 7), dict(block_length=4, memory_length=6)),
        ("local_2d", (3, 4, 6), {}),
        ("local_2d", (1, 4, 12), {}),
        # keys too scattered for a band: the gathering path
        ("local_2d", (1, 8, 16), dict(query_shape=(1, 2), memory_flange=(3, 2))),
    ],
)
def test_blocked_equals_dense_forward_and_gradients(kind, shape, extra):
    config = tiny_config(kind, image_shape=shape, num_heads=4, **extra)
    model = ImageTransformer(config)
    if kind == "local_2d" and extra:
        assert model.pattern.banded_layout is None
    if kind == "local_1d":
        assert model.pattern.banded_layout is not None
    images = random_images(config, batch=3)
    results = {}
    for backend in ("dense", "blocked"):
        model.zero_grad()
        logits = model.use_backend(backend)(images)
        (logits.square().mean() + model.loss(images)).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[backend] = (logits.detach(), grads)
    assert torch.allclose(results["dense"][0], results["blocked"][0], atol=1e-5)
    for name, grad in results["dense"][1].items():
        assert torch.allclose(grad, results["blocked"][1][name], atol=1e-5), name


def test_local_1d_with_full_memory_is_global():
    g_config = tiny_config("global")
    l_config = tiny_config("local_1d", block_length=8, memory_length=g_config.num_positions)
    global_model = ImageTransformer(g_config).eval()
    local_model = ImageTransformer(l_config).eval()
    local_model.load_state_dict(global_model.state_dict())
    images = random_images(g_config)
    assert torch.allclose(global_model(images), local_model(images), atol=1e-5)


def test_zero_output_layer_gives_exactly_8_bits():
    model = ImageTransformer(tiny_config()).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    bpd = model.bits_per_dim(random_images(model.config, batch=4))
    assert torch.equal(bpd, torch.full((4,), 8.0))


def test_softmax_over_256_values_sums_to_one():
    model = ImageTransformer(tiny_config()).eval()
    logits = model(random_images(model.config))
    assert logits.shape == (2, 3, 4, 6, 256)
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(2, 3, 4, 6), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bits_per_dim_is_mean_negative_log2_prob(kind):
    model = ImageTransformer(tiny_config(kind)).eval()
    images = random_images(model.config, batch=3)
    logits = model(images).double()
    log_z = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, images.long().unsqueeze(-1)).squeeze(-1)
    expected = ((log_z - picked) / math.log(2)).flatten(1).mean(1)
    assert torch.allclose(model.bits_per_dim(images).double(), expected, atol=1e-5)


def test_generation_order_and_mask_exposed():
    model = ImageTransformer(tiny_config("local_2d"))
    order = model.generation_order
    assert order.dtype == torch.long
    assert torch.equal(order.sort().values, torch.arange(72))
    mask = model.attention_mask()
    assert mask.shape == (72, 72) and mask.dtype == torch.bool


def test_timing_signal_axes():
    rows = torch.tensor([0, 0, 3])
    cols = torch.tensor([0, 5, 0])
    signal = timing_signal(rows, cols, 16)
    assert signal.shape == (3, 16)
    assert torch.equal(signal[0, :8], signal[1, :8])  # same row: same first half
    assert torch.equal(signal[0, 8:], signal[2, 8:])  # same column: same second half
    assert torch.allclose(signal[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert math.isclose(signal[2, 0].item(), math.sin(3.0), rel_tol=1e-6)


def test_initialisation_follows_variance_scaling():
    model = ImageTransformer(tiny_config(d_model=32, ffn_size=64))
    w = model.blocks[0].ffn[0].weight  # [64, 32]
    limit = math.sqrt(3 * 0.2 / ((32 + 64) / 2))
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
    assert torch.equal(model.blocks[0].ffn[0].bias, torch.zeros(64))


def test_class_embedding_starts_at_zero_then_changes_logits():
    model = ImageTransformer(tiny_config(num_classes=3)).eval()
    images = random_images(model.config)
    # at init the label changes nothing: the model starts as an unconditional one
    assert torch.equal(model.class_embed.weight, torch.zeros(3, 16))
    assert torch.equal(model(images, torch.tensor([0, 0])), model(images, torch.tensor([2, 2])))
    torch.nn.init.normal_(model.class_embed.weight)  # as after training
    a = model(images, torch.tensor([0, 0]))
    b = model(images, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)


def test_class_init_scales_the_variance_scaling_init():
    """class_init=s: s times tensor2tensor's init of the class table; the other weights are
    drawn as with zeros (the default), so only the table differs."""
    torch.manual_seed(0)
    zero = ImageTransformer(tiny_config(num_classes=3))
    torch.manual_seed(0)
    half = ImageTransformer(tiny_config(num_classes=3, class_init=0.5))
    limit = math.sqrt(3 * 0.2 / ((3 + 16) / 2))
    table = half.class_embed.weight
    assert 0.9 * limit * 0.5 < table.abs().max() <= limit * 0.5
    others = {k: v for k, v in zero.state_dict().items() if k != "class_embed.weight"}
    assert all(torch.equal(v, half.state_dict()[k]) for k, v in others.items())


def test_class_scale_multiplies_the_class_row():
    """class_scale=s adds s times the label's row (0: sqrt(d_model), the reference's)."""
    model = ImageTransformer(tiny_config(num_classes=3))
    torch.nn.init.normal_(model.class_embed.weight)
    labels = torch.tensor([2, 0])
    rows = model.class_embed.weight[labels][:, None]
    assert torch.allclose(model.class_signal(labels), rows * math.sqrt(16))
    model.config.class_scale = 1.0
    assert torch.equal(model.class_signal(labels), rows)


def test_a_conditional_model_starts_with_its_unconditional_twins_weights():
    """The zero class table draws no random numbers, so at one seed the two runs differ by
    the label alone."""
    torch.manual_seed(0)
    twin = ImageTransformer(tiny_config()).state_dict()
    torch.manual_seed(0)
    cond = ImageTransformer(tiny_config(num_classes=3, class_dropout=0.1)).state_dict()
    assert torch.equal(cond.pop("class_embed.weight"), torch.zeros(4, 16))
    assert cond.keys() == twin.keys()
    assert all(torch.equal(v, twin[k]) for k, v in cond.items())


@pytest.mark.parametrize("norm_first", [False, True])
def test_save_and_load_pretrained(tmp_path, norm_first):
    model = ImageTransformer(tiny_config("local_2d", norm_first=norm_first, pos="learned")).eval()
    model.save_pretrained(tmp_path)
    loaded = ImageTransformer.from_pretrained(tmp_path).eval()
    images = random_images(model.config)
    assert torch.equal(model(images), loaded(images))


def test_mismatched_weights_are_refused(tmp_path):
    ImageTransformer(tiny_config(d_model=16)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(tiny_config(d_model=32).to_json())
    with pytest.raises(UserError, match="does not match"):
        ImageTransformer.from_pretrained(tmp_path)


def test_bad_inputs_have_clear_errors():
    model = ImageTransformer(tiny_config())
    with pytest.raises(UserError, match=r"\[B, 3, 4, 6\]"):
        model(torch.zeros(2, 1, 4, 6, dtype=torch.uint8))
    with pytest.raises(UserError, match="uint8"):
        model(torch.zeros(2, 3, 4, 6))
    with pytest.raises(UserError, match="unconditional"):
        model(torch.zeros(2, 3, 4, 6, dtype=torch.uint8), torch.tensor([0, 1]))
    conditional = ImageTransformer(tiny_config(num_classes=2))
    with pytest.raises(UserError, match="pass labels"):
        conditional(torch.zeros(2, 3, 4, 6, dtype=torch.uint8))
    with pytest.raises(UserError, match="0..1"):
        conditional(torch.zeros(2, 3, 4, 6, dtype=torch.uint8), torch.tensor([0, 5]))


def test_classify_is_bayes_rule():
    model = ImageTransformer(tiny_config(num_classes=3)).eval()
    images = random_images(model.config, batch=2)
    log_prior = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    posterior = classify(model, images, log_prior)
    assert posterior.shape == (2, 3)
    assert torch.allclose(posterior.exp().sum(1), torch.ones(2, dtype=torch.float64))
    log_px = torch.stack(
        [-model.nll(images, torch.tensor([y, y])).double().flatten(1).sum(1) for y in range(3)], 1
    )
    expected = torch.log_softmax(log_px + log_prior.double(), dim=1)
    assert torch.allclose(posterior, expected, atol=1e-6)
    with pytest.raises(UserError, match="class-conditional"):
        classify(ImageTransformer(tiny_config()), images)


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("output", ["cat", "dmol"])
@pytest.mark.parametrize("kind", KINDS)
def test_decoding_step_scores_a_known_image_as_the_full_forward(kind, output, signal):
    """Feeding an image's own values step by step gives the full forward's distribution at
    every step: what a lossless codec needs (encoder and decoder see the same numbers). The
    mixture's runs anchor their means on the pixel to the left (mixture_anchor)."""
    anchor = dict(mixture_anchor=True) if output == "dmol" and signal is None else {}
    config = tiny_config(kind, output=output, num_classes=3, **_signal(signal), **anchor)
    model = ImageTransformer(config).eval()
    images, labels = random_images(config, batch=2, seed=4), torch.tensor([2, 0])
    full = model.logits_in_generation_order(images, labels)
    values = model.to_steps(images)
    assert torch.equal(model.from_steps(values), images)
    with model.evaluating():
        state = model.start_decoding(2, labels)
        for step in range(config.num_positions):
            previous = values[:, step - 1] if step else None
            params = model.decode_step(state, step, previous)
            assert torch.allclose(params, full[:, step], atol=1e-5), step
        with pytest.raises(ValueError, match="expected step"):
            model.decode_step(state, 0, None)


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_class_signal(kind):
    """class_signal="every_block": the input's class signal (class_embed[y] * sqrt(d_model)) is
    added again to the residual stream before every block after the first; the same weights
    as the input-only model, a different function; causal; the decoding step agrees."""
    config = tiny_config(kind, num_classes=3, num_layers=3, class_signal="every_block")
    model = ImageTransformer(config).eval()
    torch.nn.init.normal_(model.class_embed.weight)  # as after training
    images, labels = random_images(config, batch=2, seed=5), torch.tensor([1, 2])
    full = model.logits_in_generation_order(images, labels)
    # the definition, written out (what an integer twin of the decoder computes)
    with torch.no_grad():
        seq = model.to_steps(images)
        emb = model.embed(seq, torch.arange(seq.shape[1]))
        c = model.class_embed(labels)[:, None] * math.sqrt(config.d_model)
        x = torch.nn.functional.pad(emb[:, :-1], (0, 0, 1, 0)) + model.position_signal() + c
        for i, block in enumerate(model.blocks):
            x = block(x + c if i else x, model.pattern)
        assert torch.allclose(model.head(model.final_norm(x)), full, atol=1e-5)
    once = ImageTransformer(tiny_config(kind, num_classes=3, num_layers=3)).eval()
    once.load_state_dict(model.state_dict())  # no new weights
    assert not torch.allclose(once.logits_in_generation_order(images, labels), full, atol=1e-3)
    n = config.num_positions
    for step in [0, 7, n // 2, n - 2]:
        changed = model.logits_in_generation_order(change_step(images, model, step), labels)
        assert torch.allclose(changed[:, : step + 1], full[:, : step + 1], atol=1e-6, rtol=0)
    values = model.to_steps(images)
    with model.evaluating():
        state = model.start_decoding(2, labels)
        for step in range(n):
            params = model.decode_step(state, step, values[:, step - 1] if step else None)
            assert torch.allclose(params, full[:, step], atol=1e-5), step


def test_likelihoods_are_exact_in_train_mode():
    """Dropout is off inside bits_per_dim and classify, whatever mode the model is in."""
    config = tiny_config("local_1d", dropout=0.5, num_classes=2)
    model = ImageTransformer(config)
    images = random_images(config, batch=3)
    model.eval()
    bpd, posterior = model.bits_per_dim(images, torch.tensor([0, 1, 1])), classify(model, images)
    model.train()
    assert torch.equal(model.bits_per_dim(images, torch.tensor([0, 1, 1])), bpd)
    assert torch.equal(classify(model, images), posterior)
    assert model.training  # the mode is given back


def test_use_backend_switches_every_attention_module():
    model = ImageTransformer(tiny_config("local_2d"))
    images = random_images(model.config)
    blocked = model.use_backend("blocked")(images)
    assert model.config.backend == "blocked"
    assert torch.allclose(model.use_backend("dense")(images), blocked, atol=1e-5)
    with pytest.raises(UserError, match="unknown backend"):
        model.use_backend("fast")


@pytest.mark.parametrize("output", ["cat", "dmol"])
@pytest.mark.parametrize("kind", KINDS)
def test_bits_per_subpixel_average_to_bits_per_dim(kind, output):
    config = tiny_config(kind, output=output, dropout=0.3)
    model = ImageTransformer(config)  # train mode: the figures must not depend on it
    images = random_images(config, batch=3, seed=5)
    per_subpixel = model.bits_per_subpixel(images)
    assert per_subpixel.shape == (3, *config.image_shape) and per_subpixel.dtype == torch.float32
    assert (per_subpixel > 0).all()
    mean = per_subpixel.double().flatten(1).mean(1)
    assert torch.allclose(mean, model.bits_per_dim(images).double(), rtol=0, atol=1e-6)


def test_dmol_channel_bits_are_the_chain_rule_of_the_mixture():
    """Red gets -log2 of the mixture's marginal of red; red + green the marginal of both."""
    config = tiny_config("local_1d", output="dmol", image_shape=(3, 2, 3), num_mixtures=3)
    model = ImageTransformer(config).eval()
    images = random_images(config, batch=2, seed=6)
    bits = model.bits_per_subpixel(images).double()
    with torch.no_grad():
        params = model(images)
        dist = model.distribution
        logits, _, _, _ = dist.split(params)
        per_channel = dist.component_log_probs(params, images.long()).double()
        log_pi = torch.log_softmax(logits.double(), -1)
        red = -torch.logsumexp(log_pi + per_channel[..., 0], -1) / math.log(2)
        red_green = -torch.logsumexp(log_pi + per_channel[..., :2].sum(-1), -1) / math.log(2)
    assert torch.allclose(bits[:, 0], red, atol=1e-5)
    assert torch.allclose(bits[:, 0] + bits[:, 1], red_green, atol=1e-5)


def test_marginal_bits_of_a_conditional_model_sum_to_the_mixture_over_classes():
    """Without labels a class-conditional model scores p(x) = sum_y p(y) p(x | y), spread over
    the steps by the posterior over classes given the earlier steps."""
    config = tiny_config("local_2d", num_classes=3)
    model = ImageTransformer(config).eval()
    torch.nn.init.normal_(model.class_embed.weight, std=0.5)  # classes that matter
    images = random_images(config, batch=2, seed=7)
    prior = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    marginal = marginal_bits_per_subpixel(model, images, log_prior=prior).double().flatten(1).sum(1)
    per_class = torch.stack(
        [
            -model.bits_per_dim(images, torch.full((2,), y)).double() * images[0].numel()
            for y in range(3)
        ],
        dim=1,
    )  # log2 p(x | y)
    expected = -torch.logsumexp((per_class * math.log(2)) + prior, 1) / math.log(2)
    assert torch.allclose(marginal, expected, atol=1e-3)
    assert not torch.allclose(marginal, -per_class[:, 0], atol=1e-2)


def test_bits_per_subpixel_of_a_superres_model_are_given_the_downsampled_copy():
    config = tiny_config("local_1d", image_shape=(3, 4, 4), task="superres", scale=2)
    model = ImageTransformer(config).eval()
    images = random_images(config, batch=2, seed=8)
    bits = model.bits_per_subpixel(images)
    assert torch.allclose(bits.double().flatten(1).mean(1), model.bits_per_dim(images).double())
    black = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    assert not torch.allclose(model.bits_per_subpixel(images, low_res=black), bits)


@pytest.mark.parametrize("output", ["cat", "dmol"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_above_signal_is_the_value_one_row_up(kind, output):
    """Changing one value changes the above signal exactly at the position below it."""
    config = tiny_config(kind, output=output, above_signal=True)
    model = ImageTransformer(config).eval()
    images = random_images(config)
    rows, cols = config.grid_shape
    seq = model.to_steps(images)
    base = model.above_signal(seq[:, model._above.clamp(min=0)], model._above)
    raster = model.generation_order
    assert bool((base[:, raster < cols] == 0).all())  # the first row has nothing above
    step = int(torch.nonzero(raster == cols + 1)[0])  # second row, second column
    changed = seq.clone()
    changed[:, step] = (changed[:, step] + 97) % 256
    after = model.above_signal(changed[:, model._above.clamp(min=0)], model._above)
    moved = (after - base).abs().amax(dim=(0, 2)) > 0
    assert moved.nonzero().flatten().tolist() == [int(torch.nonzero(raster == 2 * cols + 1)[0])]


@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_the_near_signal_reads_the_four_neighbours(output):
    """In raster order, changing the value at (y, x) changes the near signal exactly at the
    positions that have it as a neighbour: (y+1, x+1), (y+1, x-1), (y+2, x) and (y, x+2), the
    same channel position; in local_2d's order only those generated after it."""
    for kind in ("local_1d", "local_2d"):
        config = tiny_config(kind, image_shape=(3, 6, 6), output=output, near_signal=True)
        model = ImageTransformer(config).eval()
        for near in model.near_embeds:  # they start at a tenth of the init of the others
            fan_out, fan_in = near.weight.shape
            limit = (3 * 0.2 / ((fan_in + fan_out) / 2)) ** 0.5
            assert 0 < near.weight.abs().max() <= NEAR_INIT * limit
        seq = model.to_steps(random_images(config))
        rows, cols = config.grid_shape
        per_pixel = cols // 6
        raster = model.generation_order
        y, x, channel = 2, 3, per_pixel - 1
        step = int(torch.nonzero(raster == y * cols + x * per_pixel + channel)[0])
        changed = seq.clone()
        changed[:, step] = (changed[:, step] + 97) % 256
        base, after = model.near_signal(seq, model._near), model.near_signal(changed, model._near)
        moved = set(((after - base).abs().amax(dim=(0, 2)) > 0).nonzero().flatten().tolist())
        expected = set()
        for dy, dx in ((1, 1), (1, -1), (2, 0), (0, 2)):
            there = int(
                torch.nonzero(raster == (y + dy) * cols + (x + dx) * per_pixel + channel)[0]
            )
            if there > step:
                expected.add(there)
        assert moved == expected and (len(expected) == 4 or kind == "local_2d")
