"""Lossless compression with the model: bit-exact round trips, and clear refusals of files made
with another model, truncated, corrupted or of another version."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer, UserError
from imagetransformer.cli import main
from imagetransformer.data import load_dataset
from imagetransformer.tools.codec import compress, decompress

from .helpers import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codec") / "run"
    argv = ["train", "--preset", "tiny", "--quiet", "--set", "max_steps=40"]
    assert main([*argv, "--set", "eval_every=0", "--set", "sample_count=0", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_round_trip_is_bit_exact_on_random_and_unlikely_images(output):
    model = ImageTransformer(tiny_config("local_2d", output=output)).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 4, 6), generator=g, dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    packed = compress(model, images, batch_size=2)
    assert torch.equal(decompress(model, packed.data), images)


def test_digits_compress_near_their_bits_per_dim(run):
    model = ImageTransformer.from_pretrained(run)
    digits = load_dataset("mnist5k", "test", image_size=8).images[:64]
    packed = compress(model, digits, batch_size=32)
    assert torch.equal(decompress(model, packed.data), digits)
    exact = float(model.bits_per_dim(digits).mean())
    # on top of the model's bits: the header (52 bytes), a length and a CRC per image (8 bytes)
    # and whole 32-bit words (at most 4 bytes, plus the range coder's 32 bits of state)
    overhead = (52 + 64 * (8 + 4 + 4)) * 8 / digits.numel()
    assert exact < packed.bits_per_dim < exact + overhead


def test_refusals_name_the_problem(run):
    model = ImageTransformer.from_pretrained(run)
    digits = load_dataset("mnist5k", "test", image_size=8).images[:4]
    data = compress(model, digits).data
    other = ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8))).eval()
    cases = {
        "another model": (other, data),
        "truncated": (model, data[:-3]),
        "magic": (model, b"XXXX" + data[4:]),
        "version": (model, data[:4] + struct.pack("<H", 99) + data[6:]),
    }
    for needle, (m, blob) in cases.items():
        with pytest.raises(UserError, match=needle):
            decompress(m, blob)
    corrupted = bytearray(data)
    corrupted[-5] ^= 0xFF  # inside the last image's payload: it decodes to something else
    with pytest.raises(UserError, match="corrupted"):
        decompress(model, bytes(corrupted))


def test_compress_and_decompress_commands(run, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    digits = load_dataset("mnist5k", "test", image_size=8).images[:6]
    for i, image in enumerate(digits.numpy()):
        Image.fromarray(image[0]).save(folder / f"{i}.png")
    packed = tmp_path / "digits.itc"
    assert main(["compress", str(run), str(folder), "-o", str(packed)]) == 0
    out = tmp_path / "decoded"
    assert main(["decompress", str(run), str(packed), "-o", str(out)]) == 0
    decoded = [np.asarray(Image.open(out / f"image_{i:05d}.png")) for i in range(6)]
    assert all(np.array_equal(d, img[0]) for d, img in zip(decoded, digits.numpy(), strict=True))
    # a damaged file: one clear line, nothing written
    packed.write_bytes(packed.read_bytes()[:-4])
    capsys.readouterr()
    assert main(["decompress", str(run), str(packed), "-o", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0] and not (tmp_path / "none").exists()
    # images of the model's shape: nothing converted, nothing said about it
    assert main(["compress", str(run), str(folder), "-o", str(packed)]) == 0
    assert "converted" not in capsys.readouterr().out


def test_compress_reads_images_at_the_models_shape_and_says_so(run, tmp_path, capsys):
    """Without flags, a 16x16 colour image is read as the grey 8x8 the model takes (the same
    conversion as `score` makes of a folder), and the output says the decoded images are the
    converted ones; a flag that does not fit is refused, naming the one that does."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(colour).save(folder / "a_colour.png")
    grey = load_dataset("mnist5k", "test", image_size=8).images[0, 0].numpy()
    Image.fromarray(grey).save(folder / "b_grey.png")
    packed = tmp_path / "mixed.itc"
    capsys.readouterr()
    assert main(["compress", str(run), str(folder), "-o", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "1 of the 2 images were converted to 1x8x8" in out
    decoded = tmp_path / "decoded"
    assert main(["decompress", str(run), str(packed), "-o", str(decoded)]) == 0
    as_read = load_dataset(str(folder), "all", image_size=8, channels=1).images
    for i, expected in enumerate(as_read.numpy()):
        assert np.array_equal(np.asarray(Image.open(decoded / f"image_{i:05d}.png")), expected[0])
    capsys.readouterr()
    argv = ["compress", str(run), str(folder), "--channels", "3", "-o", str(packed)]
    assert main(argv) == 2
    assert "--image-size 8 --channels 1" in capsys.readouterr().err
