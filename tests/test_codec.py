"""Lossless compression with the integer model: bit-exact round trips, files that decode the
same under other CPU kernels, thread counts and batch sizes, sizes near the model's bits and
never above storing the image, and one-line refusals of damaged files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagetransformer import ImageTransformer, UserError
from imagetransformer.cli import main
from imagetransformer.data import load_dataset
from imagetransformer.evaluation import classify
from imagetransformer.files import WriteError
from imagetransformer.tools import integer_kernels
from imagetransformer.tools.codec import (
    FINGERPRINT_BYTES,
    best_labels,
    cache_path,
    compress,
    decompress,
    png_bytes,
    quantized,
    quantized_for_file,
    read_header,
)
from imagetransformer.tools.integer_model import IntegerModel, quantize

from .helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

HEADER_BYTES = 30  # magic, version, fingerprint, five small varints and the CRC, rounded up
STREAM_BYTES = 13  # a stream's length varint, its coder's last words and padding
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of the tiny preset trained 40 steps with these `--set` options, once per module."""
    runs: dict[tuple[str, ...], Path] = {}

    def train(*options: str) -> Path:
        if options not in runs:
            out = tmp_path_factory.mktemp("codec") / "run"
            argv = ["train", "--preset", "tiny", "--quiet", "--out", str(out)]
            for option in ("max_steps=40", "eval_every=0", "sample_count=0", *options):
                argv += ["--set", option]
            assert main(argv) == 0
            runs[options] = out
        return runs[options]

    return train


@pytest.fixture(scope="module")
def run(trained) -> Path:
    return trained()


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset("mnist5k", "test", image_size=8).images[:64]


@pytest.mark.parametrize("signal", [None, "above_signal", "near_signal"], ids=str)
@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_round_trip_is_bit_exact_on_random_and_unlikely_images(output, signal):
    config = tiny_config("local_2d", output=output, **({signal: True} if signal else {}))
    model = ImageTransformer(config).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 4, 6), generator=g, dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    integer = quantize(model, images)
    packed = compress(integer, images, batch_size=2, fallback=False)
    assert packed.stored == 0
    assert torch.equal(decompress(integer, packed.data), images)
    assert torch.equal(decompress(integer, packed.data, batch_size=64), images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("output", ["cat", "dmol"])
def test_files_cross_between_the_cpu_and_a_gpu(output):
    """A file written on the CPU decodes on a GPU and the reverse; both write the same bytes
    (the teacher-forced pass on either) and decode step by step to the same images."""
    model = ImageTransformer(tiny_config("local_2d", output=output, above_signal=True)).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (5, 3, 4, 6), generator=g, dtype=torch.uint8)
    integer = quantize(model, images)
    gpu = integer.to("cuda")
    on_cpu = compress(integer, images, batch_size=3, fallback=False)
    on_gpu = compress(gpu, images, batch_size=3, fallback=False)
    assert on_gpu.data == on_cpu.data
    assert torch.equal(decompress(gpu, on_cpu.data, batch_size=2), images)
    assert torch.equal(decompress(integer, on_gpu.data), images)


SIDE_CASES = {
    "class-conditional": dict(num_classes=3),
    "super-resolution": dict(
        task="superres",
        scale=2,
        image_shape=(3, 4, 6),
        encoder_layers=1,
        low_res_signal=True,
        low_res_upsample=True,
        low_res_remainder=True,
    ),
}


def test_a_model_with_bounds_codes_only_values_its_blocks_can_take():
    """With low_res_bounds the coder gives the values out of a block's reach one unit each
    (constriction's floor): the file round trips, and costs less than the same weights
    without the bounds."""
    options = dict(SIDE_CASES["super-resolution"], low_res_bounds=True)
    model = ImageTransformer(tiny_config("local_1d", output="cat", **options)).eval()
    torch.nn.init.normal_(model.low_res_upsample.weight, std=0.3)
    images = torch.randint(0, 256, (4, 3, 4, 6), generator=torch.Generator().manual_seed(3))
    images = images.to(torch.uint8)
    bounded = quantize(model, images)
    state = bounded.start(4, low_res=bounded.low_res_of(images, None))
    values = bounded.to_steps(images)
    for step in range(bounded.config.num_positions):  # out of reach: frequency exactly 0
        head = bounded.step(state, step, values[:, step - 1] if step else None)
        if state.outside is not None and bool(state.outside.any()):
            freqs = bounded.coding(head, state.outside).freqs
            assert int(freqs[state.outside].max()) == 0
            assert bool((freqs[~state.outside] >= 0).all())
    packed = compress(bounded, images, batch_size=3, fallback=False)
    assert torch.equal(decompress(bounded, packed.data, batch_size=2), images)
    model.config.low_res_bounds = False
    plain = quantize(model, images)
    assert packed.model_bits < compress(plain, images, fallback=False).model_bits


@pytest.mark.parametrize("case", SIDE_CASES)
def test_labels_and_low_resolution_inputs_are_stored_and_counted(case):
    """A class-conditional model's file holds each image's label (log2 K bits), a
    super-resolution model's the low-resolution image (8 bits a value); both round trip."""
    model = ImageTransformer(tiny_config("local_1d", output="dmol", **SIDE_CASES[case])).eval()
    images = (torch.randint(0, 4, (5, 3, 4, 6)) * 85).to(torch.uint8)
    labels = torch.tensor([2, 0, 1, 1, 0]) if model.config.num_classes else None
    integer = quantize(model, images, labels)
    packed = compress(integer, images, batch_size=2, fallback=False, labels=labels)
    assert torch.equal(decompress(integer, packed.data, batch_size=4), images)
    side = math.log2(3) if labels is not None else 8 * math.prod(model.config.low_res_shape)
    expected = float(integer.bits(images, labels).sum()) + len(images) * side
    assert packed.model_bits == pytest.approx(expected, rel=1e-9)


def test_a_class_conditional_model_folder_codes_with_the_likeliest_labels(tmp_path, capsys):
    """compress with a bare class-conditional model folder (no run.json: calibrated on seeded
    samples) stores for each image the label the float model finds likeliest."""
    model = ImageTransformer(tiny_config("local_1d", image_shape=(1, 4, 6), num_classes=3))
    torch.nn.init.normal_(model.class_embed.weight, std=0.3)
    with torch.no_grad():
        model.head.bias[0] += 8  # mostly black: such images cost it less than their raw bytes
    model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "pictures"
    folder.mkdir()
    images = torch.zeros(3, 1, 4, 6, dtype=torch.uint8)
    images[:, 0, 1, 2:4] = torch.tensor([[85, 170], [255, 85], [170, 170]], dtype=torch.uint8)
    for i, image in enumerate(images.numpy()):
        Image.fromarray(image[0]).save(folder / f"{i}.png")
    packed = tmp_path / "pictures.itc"
    assert main(["compress", str(tmp_path / "model"), str(folder), "-o", str(packed)]) == 0
    out = tmp_path / "decoded"
    assert main(["decompress", str(tmp_path / "model"), str(packed), "-o", str(out)]) == 0
    for i, image in enumerate(images.numpy()):
        assert np.array_equal(np.asarray(Image.open(out / f"image_{i:05d}.png")), image[0])
    integer = quantized(tmp_path / "model", torch.device("cpu"), note=lambda _: None)
    _, labels = decompress(integer, packed.read_bytes(), with_labels=True)
    assert torch.equal(labels, classify(model.eval(), images).argmax(1))
    assert torch.equal(best_labels(model, images), labels)


def test_digits_compress_near_their_bits_per_dim(run, digits):
    """The file's bits/dim is within 2% of the float model's exact bits/dim plus the fixed
    costs (header, one coder stream per batch); the integer model's own bits within 0.1%."""
    model = ImageTransformer.from_pretrained(run)
    integer = quantized(run, torch.device("cpu"), note=lambda _: None)
    packed = compress(integer, digits, batch_size=32)
    assert packed.stored == 0
    assert torch.equal(decompress(integer, packed.data), digits)
    exact = float(model.bits_per_dim(digits).mean())
    assert abs(packed.model_bits / digits.numel() - exact) < 1e-3 * exact
    overhead = (HEADER_BYTES + 2 * STREAM_BYTES) * 8 / digits.numel()
    assert exact < packed.bits_per_dim < 1.02 * exact + overhead


DECODE_ELSEWHERE = """
import sys, torch
from imagetransformer.cli import main
from imagetransformer import ImageTransformer
from imagetransformer.tools.codec import calibration_images, quantized
from imagetransformer.files import WriteError
from imagetransformer.tools.integer_model import IntegerModel, quantize
from tests.test_codec import frequency_digest
run, images, itc, out, batch = sys.argv[1:]
integer = quantized(run, torch.device("cpu"), note=lambda _: None)
digest = frequency_digest(integer, torch.load(images), int(batch))
model = ImageTransformer.from_pretrained(run)
made_here = quantize(model, *calibration_images(run, model)).fingerprint.hex()
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), digest, made_here)
sys.exit(main(["decompress", run, itc, "-o", out, "--batch-size", batch]))
"""


def frequency_digest(integer, images: torch.Tensor, batch: int) -> str:
    """SHA-256 of every frequency table of every image, computed `batch` images at a time."""
    tables = [[] for _ in images]
    for start in range(0, len(images), batch):
        for _, freqs in integer.coded_tables(images[start : start + batch]):
            for i, row in enumerate(freqs):
                tables[start + i].append(row)
    data = b"".join(torch.stack(t).numpy().tobytes() for t in tables)
    return hashlib.sha256(data).hexdigest()


LIMITED_TO_AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _settings() -> list[tuple[str, str, int, dict]]:
    """(ATEN_CPU_CAPABILITY, threads, decoding batch size, more of the environment): each torch
    kernel set this CPU has; the compiled kernels for a generic x86-64 and for AVX2
    (NUMBA_CPU_NAME) as well as for this CPU; MKL and oneDNN limited to AVX2, MKL to SSE4.2;
    and torch operations throughout (IMAGETRANSFORMER_KERNELS=0)."""
    settings = [
        ("default", "1", 1, {"NUMBA_CPU_NAME": "generic"}),
        ("avx2", "2", 7, {"NUMBA_CPU_NAME": "haswell", **LIMITED_TO_AVX2}),
        ("default", "2", 5, {"IMAGETRANSFORMER_KERNELS": "0", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    ]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "avx512f" in cpuinfo.read_text():
        settings.append(("avx512", "1", 64, {}))
    return settings


# the runs checked under other kernels: the tiny preset under every setting; with above_signal
# (both outputs) and with the anchored mixture under the default kernels, one image at a time
KERNEL_RUNS = {
    "tiny": (),
    "above_signal cat": ("above_signal=true",),
    "above_signal dmol": ("above_signal=true", "output=dmol"),
    "mixture_anchor dmol": ("mixture_anchor=true", "output=dmol"),
}


@pytest.mark.parametrize("case", KERNEL_RUNS)
def test_a_file_decodes_bit_for_bit_under_other_kernels_threads_and_batches(
    case, trained, digits, tmp_path
):
    """Written here (this CPU's kernels, one thread, groups of 4), decoded in fresh processes
    with other CPU kernels (torch's ATEN_CPU_CAPABILITY, the compiled kernels' target CPU, MKL's
    instruction sets, or torch operations throughout), thread counts and batch sizes: the same
    images, and the integer model's frequency tables of every step identical (by SHA-256).
    Quantizing the run there gives the same integer model (power-of-two scales)."""
    run = trained(*KERNEL_RUNS[case])
    settings = _settings() if case == "tiny" else _settings()[:1]
    images = digits[:12]
    integer = quantized(run, torch.device("cpu"), note=lambda _: None)
    assert integer.config.above_signal == case.startswith("above_signal")
    packed = compress(integer, images, batch_size=4)
    assert packed.stored == 0  # every image goes through the coder
    itc = tmp_path / "digits.itc"
    itc.write_bytes(packed.data)
    torch.save(images, tmp_path / "images.pt")
    reference = frequency_digest(integer, images, 4)
    for capability, threads, batch, more in settings:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS=threads, **more)
        env.pop("MKL_NUM_THREADS", None)  # a caller's limit would hold the child to its count
        out = tmp_path / f"out_{capability}_{threads}_{batch}"
        command = [sys.executable, "-c", DECODE_ELSEWHERE, str(run), str(tmp_path / "images.pt")]
        command += [str(itc), str(out), str(batch)]
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        kernels, used_threads, digest, made_there = done.stdout.split()[:4]
        assert kernels == capability.upper() and used_threads == threads
        assert digest == reference
        assert made_there == integer.fingerprint.hex()  # the run makes the same model there
        decoded = [np.asarray(Image.open(out / f"image_{i:05d}.png")) for i in range(12)]
        assert all(np.array_equal(d, x[0]) for d, x in zip(decoded, images.numpy(), strict=True))


def test_never_worse_than_storing_the_image(run, digits):
    """Noise costs the digits model more than its raw bytes: such images are stored raw (or as
    PNG), the digits beside them are still coded, and the file costs no more than the cheaper
    stored form of every image plus a few bytes."""
    integer = quantized(run, torch.device("cpu"), note=lambda _: None)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (6, 1, 8, 8), generator=g, dtype=torch.uint8)
    images = torch.cat([digits[:3], noise[:3], digits[3:4], noise[3:]])
    packed = compress(integer, images, batch_size=4)
    assert packed.stored == 6
    assert torch.equal(decompress(integer, packed.data), images)
    # stored are exactly the images whose exact cost coded exceeds their cheaper stored form
    costs = integer.bits(images)
    for i in range(len(images)):
        stored = i in read_header(packed.data).stored
        assert stored == (float(costs[i]) / 8 > min(64, len(png_bytes(images[i].numpy()))))
    only_noise = compress(integer, noise, batch_size=4)
    cheapest = sum(min(x.numel(), len(png_bytes(x.numpy()))) for x in noise)
    assert len(only_noise.data) <= cheapest + HEADER_BYTES + 2 * len(noise)
    assert torch.equal(decompress(integer, only_noise.data), noise)


def test_smooth_images_an_untrained_model_codes_badly_are_stored_as_png():
    model = ImageTransformer(tiny_config("local_1d", image_shape=(3, 8, 8))).eval()
    ramp = torch.arange(8, dtype=torch.uint8) * 16
    images = torch.stack([ramp.expand(3, 8, 8), ramp.view(8, 1).expand(3, 8, 8)])
    integer = quantize(model, images)
    packed = compress(integer, images)
    assert read_header(packed.data).stored == {
        i: ("png", len(png_bytes(x.numpy()))) for i, x in enumerate(images)
    }
    assert torch.equal(decompress(integer, packed.data), images)


def test_refusals_name_the_problem(run, trained, digits):
    integer = quantized(run, torch.device("cpu"), note=lambda _: None)
    data = compress(integer, digits[:4]).data
    other = quantize(ImageTransformer(tiny_config("local_1d", image_shape=(1, 8, 8))), digits)
    version_1 = b"ITC\x00" + struct.pack("<H", 1) + bytes(32) + struct.pack("<HHHII", 1, 8, 8, 1, 1)
    version_2 = data[:4] + struct.pack("<H", 2) + data[6:]
    # version 3 coded a mixture's values as one symbol each: refused for mixture models, read
    # for categorical ones (coded then as now)
    mixture = quantized(trained("output=dmol"), torch.device("cpu"), note=lambda _: None)
    mixture_data = compress(mixture, digits[:2]).data
    mixture_version_3 = mixture_data[:4] + struct.pack("<H", 3) + mixture_data[6:]
    version_3 = data[:4] + struct.pack("<H", 3) + data[6:]
    assert torch.equal(decompress(integer, version_3), digits[:4])
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # inside the coder stream: it decodes to something else
    start = len(read_header(data).to_bytes()) + 1  # the stream's words, after its length
    invalid = data[:start] + b"\xff" * (len(data) - start - 4) + data[-4:]
    cases = {
        "another model": (other, data),
        "truncated": (integer, data[:-3]),
        "magic": (integer, b"XXXX" + data[4:]),
        "version 99": (integer, data[:4] + struct.pack("<H", 99) + data[6:]),
        "format version 1 \\(imagetransformer before 2026-12": (integer, version_1),
        "format version 2 \\(imagetransformer of 2026-12-02": (integer, version_2),
        "format version 3 \\(imagetransformer of 2026-12-06": (mixture, mixture_version_3),
        "bytes too many": (integer, data + b"\x00"),
        "CRC mismatch": (integer, bytes(corrupted)),
        "coder stream does not decode": (integer, invalid),
    }
    for needle, (model, blob) in cases.items():
        with pytest.raises(UserError, match=needle) as caught:
            decompress(model, blob, source="some.itc")
        assert "some.itc" in str(caught.value) and "\n" not in str(caught.value)


def test_compress_and_decompress_commands(run, digits, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(digits[:6].numpy()):
        Image.fromarray(image[0]).save(folder / f"{i}.png")
    packed = tmp_path / "digits.itc"
    assert main(["compress", str(run), str(folder), "-o", str(packed)]) == 0
    out = tmp_path / "decoded"
    assert main(["decompress", str(run), str(packed), "-o", str(out)]) == 0
    decoded = [np.asarray(Image.open(out / f"image_{i:05d}.png")) for i in range(6)]
    assert all(np.array_equal(d, x[0]) for d, x in zip(decoded, digits[:6].numpy(), strict=True))
    # damaged files: one clear line each, nothing written
    good = packed.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    version_1 = good[:4] + struct.pack("<H", 1) + good[6:]
    for blob, needle in [(good[:-4], "truncated"), (flipped, "corrupted"), (version_1, "1")]:
        packed.write_bytes(bytes(blob))
        capsys.readouterr()
        assert main(["decompress", str(run), str(packed), "-o", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and str(packed) in err[0], err
        assert not (tmp_path / "none").exists()
    # images of the model's shape: nothing converted, nothing said about it
    assert main(["compress", str(run), str(folder), "-o", str(packed)]) == 0
    assert "converted" not in capsys.readouterr().out


def test_without_numba_the_same_file_and_a_note(run, digits, tmp_path, capsys, monkeypatch):
    """Without numba (the codec extra), the integer model runs its torch operations: the file
    is byte for byte the same, decodes with the kernels, and each command says once how to get
    the faster path."""
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(digits[:3].numpy()):
        Image.fromarray(image[0]).save(folder / f"{i}.png")
    fast, slow = tmp_path / "fast.itc", tmp_path / "slow.itc"
    assert main(["compress", str(run), str(folder), "-o", str(fast)]) == 0
    assert "numba" not in capsys.readouterr().err
    monkeypatch.setattr(integer_kernels, "numba", None)
    monkeypatch.setattr(integer_kernels, "ENABLED", False)
    assert main(["compress", str(run), str(folder), "-o", str(slow)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "numba is not installed" in err[0] and "[codec]" in err[0]
    assert slow.read_bytes() == fast.read_bytes()
    monkeypatch.undo()
    assert main(["decompress", str(run), str(slow), "-o", str(tmp_path / "out")]) == 0
    decoded = [np.asarray(Image.open(tmp_path / "out" / f"image_{i:05d}.png")) for i in range(3)]
    assert all(np.array_equal(d, x[0]) for d, x in zip(decoded, digits[:3].numpy(), strict=True))


def test_the_integer_model_is_made_once_and_found_by_the_file(run, digits, tmp_path, capsys):
    """compress caches the integer model in the run folder (made once per weights); a copy of
    the run without that file makes the same one again; a file keeps decoding with the model
    it names after the run's weights change; without that model it is refused in one line."""
    quantized(run, torch.device("cpu"), note=lambda _: None)  # the run holds its own, whatever ran
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("codec-*", "checkpoint*"))
    capsys.readouterr()
    assert main(["quantize", str(copy)]) == 0
    assert "made the integer model" in capsys.readouterr().out
    cached = sorted(copy.glob("codec-*.safetensors"))
    assert [p.name for p in cached] == [p.name for p in run.glob("codec-*.safetensors")]
    assert main(["quantize", str(copy)]) == 0
    assert "made the integer model" not in capsys.readouterr().out
    folder = tmp_path / "digits"
    folder.mkdir()
    Image.fromarray(digits[0, 0].numpy()).save(folder / "0.png")
    packed = tmp_path / "one.itc"
    assert main(["compress", str(copy), str(folder), "-o", str(packed)]) == 0
    model = ImageTransformer.from_pretrained(copy)
    with torch.no_grad():
        model.head.bias += 0.5  # the run trains on
    model.save_pretrained(copy)
    assert main(["decompress", str(copy), str(packed), "-o", str(tmp_path / "a")]) == 0
    alone = tmp_path / "only-the-integer-model"  # what travels: the file and this one file
    alone.mkdir()
    shutil.copyfile(cached[0], alone / cached[0].name)
    assert main(["decompress", str(alone), str(packed), "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "image_00000.png").read_bytes() == (
        tmp_path / "a" / "image_00000.png"
    ).read_bytes()
    cached[0].unlink()
    capsys.readouterr()
    assert main(["decompress", str(copy), str(packed), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and cached[0].name in err[0] and "copy that file" in err[0]


def test_files_naming_the_older_model_name_decode_and_new_files_take_the_new(run, digits, tmp_path):
    """A file coded by a model cached under its older name (the whole config) decodes with that
    cached model, and without it from the run's weights alone; compressing again caches the
    model under its current name, which new files carry."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("codec-*", "checkpoint*"))
    integer = quantized(copy, torch.device("cpu"), note=lambda _: None)
    current = cache_path(copy, integer.fingerprint)
    source = IntegerModel.read_source(current)[1]
    older = IntegerModel(integer.config, integer.store, config_json=integer.config_json)
    older.take_name(integer.older_fingerprint)
    current.unlink()
    older.save(cache_path(copy, older.fingerprint), source)  # as an earlier release cached it
    packed = compress(quantized(copy, torch.device("cpu"), note=lambda _: None), digits[:4]).data
    renamed = integer.fingerprint[:FINGERPRINT_BYTES]  # the new file names the current name
    assert read_header(packed).fingerprint == renamed
    assert current.is_file()
    packed_older = compress(older, digits[:4]).data
    for path in copy.glob("codec-*.safetensors"):
        path.unlink()  # only the run's weights are left
    for data in (packed_older, packed):
        model = quantized_for_file(copy, read_header(data), "the file", torch.device("cpu"))
        assert torch.equal(decompress(model, data), digits[:4])


def test_a_run_folder_that_cannot_be_written_still_compresses(
    run, digits, tmp_path, monkeypatch, capsys
):
    """Where the integer model cannot be cached (a read-only run folder), compress says so and
    codes anyway; decompress makes the same model again from the run's weights."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("codec-*", "checkpoint*"))

    def refuse(self, path, source=""):
        raise WriteError(f"could not write {path} (Read-only file system)", Path(path))

    monkeypatch.setattr(IntegerModel, "save", refuse)
    folder = tmp_path / "digits"
    folder.mkdir()
    Image.fromarray(digits[0, 0].numpy()).save(folder / "0.png")
    packed = tmp_path / "one.itc"
    assert main(["compress", str(copy), str(folder), "-o", str(packed)]) == 0
    assert "not cached" in capsys.readouterr().out
    assert main(["decompress", str(copy), str(packed), "-o", str(tmp_path / "out")]) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out" / "image_00000.png")), digits[0, 0]
    )
    assert not list(copy.glob("codec-*"))


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


def test_the_codec_benchmark_compares_formats_and_speeds(run, tmp_path, capsys):
    """benchmarks/codec.py on a tiny run: the codec's file gives the images back and costs about
    the model's bits/dim; PNG and WebP are measured on the same images; the speed ratios are
    there."""
    spec = importlib.util.spec_from_file_location("codec_bench", ROOT / "benchmarks" / "codec.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "codec.json"
    bench.main([str(run), "--images", "12", "--batch-size", "5", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "WebP lossless" in printed and "decompress / sample" in printed
    (row,) = json.loads(out.read_text())["runs"]
    assert row["images"] == 12 and row["batch_size"] == 5
    assert 0 < row["bytes_over_model"] < HEADER_BYTES + 3 * STREAM_BYTES + 8  # 3 streams
    assert row["PNG"]["bits_per_dim"] > 0 and row["WebP lossless"]["bits_per_dim"] > 0
    assert row["decompress_over_sample"] > 0 and row["compress_over_decompress"] > 0
    if integer_kernels.ENABLED:  # the integer model's ways of decoding, side by side
        bench.main([str(run), "--paths", "1", "--batch-size", "3", "--json", str(out)])
        assert "torch operations, float64 caches" in capsys.readouterr().out
        (row,) = json.loads(out.read_text())["runs"]
        assert row["images"] == 3 and set(row["seconds"]) == {*bench.PATHS, "sample"}
        assert integer_kernels.ENABLED  # left as it was
