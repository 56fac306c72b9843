"""Lossless image compression with the model (`imagetransformer compress` / `decompress`).

Range coding (`constriction`) driven by the integer model (`integer_model.py`): an integer twin
of the model's decoding step whose probabilities are bit-identical on every machine, kernel,
thread count, batch grouping and device, so a file written on one computer decodes on any
other. The encoder runs the integer step on the true values, the decoder on the values it has
just decoded. Each step's distribution is handed to constriction as integer frequencies that sum
to 2^24 - 256 (whole arrays per call, one table per image), which it turns, exactly, into
probabilities (f + 1) / 2^24. The images of a group share one coder stream; an image the model
would spend more on than its raw bytes or a PNG of it is stored that way instead. The file
format is in docs/file-format.md.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import UserError
from ..model import ImageTransformer
from ..runs_io import open_model, open_run
from .integer_model import FREQ_BITS, IntegerModel, quantize

MAGIC = b"ITC\x00"
VERSION = 2
FINGERPRINT_BYTES = 8
RAW, PNG = "raw", "png"
PNG_MIN_BYTES = 57  # signature, IHDR, an IDAT and IEND: no PNG file is smaller
VERSION_1 = (
    "written by format version 1 (imagetransformer before 2026-12, up to commit 1af6293): "
    "decompress it with that release; this one reads version 2"
)


def _constriction():
    try:
        import constriction
    except ImportError:
        raise UserError(
            "compress/decompress need the constriction package: pip install "
            "'imagetransformer[codec]' (or constriction)"
        ) from None
    return constriction


def fingerprint(model: ImageTransformer) -> bytes:
    """SHA-256 of the float model's config and weights: which weights an integer model was made
    from (the integer model's own fingerprint is what a file names)."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


# Varints and the header ------------------------------------------------------------------------
def put_varint(out: bytearray, value: int) -> None:
    """LEB128: 7 bits a byte, low bits first, the high bit set on all but the last byte."""
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


class Reader:
    """Reads a file's bytes in order; running past the end is a truncated file, said in one
    line that names it."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.source, self.pos = data, source, 0

    def truncated(self, what: str) -> UserError:
        return UserError(
            f"{self.source} is truncated or corrupted ({what} is cut off); nothing was written"
        )

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise self.truncated(what)
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def varint(self, what: str) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise UserError(f"{self.source} is corrupted (a bad number in {what})")


@dataclass
class Header:
    """What a file says before its payloads: the integer model's fingerprint, the image shape,
    the number of images, the images per coder stream and the images stored otherwise."""

    fingerprint: bytes
    shape: tuple[int, int, int]
    count: int
    group: int
    stored: dict[int, tuple[str, int]] = field(default_factory=dict)  # index -> (mode, bytes)

    def to_bytes(self) -> bytes:
        out = bytearray(MAGIC + VERSION.to_bytes(2, "little") + self.fingerprint)
        for value in (*self.shape, self.count, self.group, len(self.stored)):
            put_varint(out, value)
        previous = -1
        for index, (mode, size) in sorted(self.stored.items()):
            put_varint(out, index - previous - 1)
            put_varint(out, size if mode == PNG else 0)  # raw images have the image's size
            previous = index
        return bytes(out)

    @classmethod
    def read(cls, reader: Reader) -> Header:
        source = reader.source
        if reader.data[:4] != MAGIC:
            raise UserError(f"{source} is not an .itc file of this tool (bad magic bytes)")
        version = int.from_bytes(reader.take(6, "the header")[4:], "little")
        if version == 1:
            raise UserError(f"{source} was {VERSION_1}")
        if version != VERSION:
            raise UserError(
                f"{source} has format version {version}; this tool reads version {VERSION}: "
                "use the imagetransformer release that wrote it"
            )
        print_ = reader.take(FINGERPRINT_BYTES, "the header")
        c, h, w, count, group, stored = (reader.varint("the header") for _ in range(6))
        if group < 1 or stored > count or not (c in (1, 3) and 0 < h * w < 2**28):
            raise UserError(f"{source} is corrupted (its header is not valid)")
        header = cls(print_, (c, h, w), count, group)
        index = -1
        for _ in range(stored):
            index += reader.varint("the table of images") + 1
            size = reader.varint("the table of images")
            if index >= count:
                raise UserError(f"{source} is corrupted (its table of images is not valid)")
            header.stored[index] = (PNG, size) if size else (RAW, c * h * w)
        return header

    def groups(self) -> list[list[int]]:
        """The images of each coder stream: every `group` images in order, less those stored
        otherwise (a group left empty has no stream)."""
        out = []
        for start in range(0, self.count, self.group):
            members = [i for i in range(start, min(start + self.group, self.count))]
            members = [i for i in members if i not in self.stored]
            if members:
                out.append(members)
        return out


def read_header(data: bytes, source: str = "the file") -> Header:
    return Header.read(Reader(data, source))


# Coding ----------------------------------------------------------------------------------------
def _code_groups(
    model: IntegerModel,
    coders: list,
    sizes: list[int],
    images: torch.Tensor | None,
    encode: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the integer decoding step over the images of several groups side by side (`sizes`
    images each, one coder each), coding every symbol. Encoding reads the symbols from `images`;
    decoding writes them. Returns the values [n, N, *value] and the exact bits of each image."""
    constriction = _constriction()
    family = constriction.stream.model.Categorical(perfect=False)
    n = sum(sizes)
    bounds = np.cumsum([0, *sizes])
    steps = model.config.num_positions
    device = model.device
    if encode:
        values = model.to_steps(images)
    else:
        shape = (n, steps, *model.distribution.value_shape)
        values = torch.zeros(shape, dtype=torch.long, device=device)
    bits = torch.zeros(n, dtype=torch.float64)
    state = model.start(n)
    for step in range(steps):
        head = model.step(state, step, values[:, step - 1] if step else None)
        coding = model.coding(head)
        value = values[:, step].view(n, -1)
        for channel in range(coding.channels):
            freqs = coding.frequencies(channel).cpu()
            table = freqs.numpy().astype(np.float64)  # integers < 2^24: exact
            if encode:
                symbols = value[:, channel].cpu().numpy().astype(np.int32)
                for g, coder in enumerate(coders):
                    rows = slice(bounds[g], bounds[g + 1])
                    coder.encode(symbols[rows], family, table[rows])
            else:
                decoded = np.empty(n, dtype=np.int64)
                for g, coder in enumerate(coders):
                    rows = slice(bounds[g], bounds[g + 1])
                    decoded[rows] = coder.decode(family, table[rows])
                value[:, channel] = torch.from_numpy(decoded).to(device)
            picked = freqs.gather(-1, value[:, channel, None].cpu())[:, 0]
            bits += FREQ_BITS - torch.log2((picked + 1).double())
            coding.observe(channel, value[:, channel])
    return values, bits


def png_bytes(image: np.ndarray, smallest: bool = True) -> bytes:
    """One uint8 image [C, H, W] as a PNG file (`smallest`: Pillow's optimize, level 9)."""
    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    options = dict(optimize=True, compress_level=9) if smallest else {}
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _stored_form(image: np.ndarray) -> tuple[str, bytes]:
    """The cheaper of the raw bytes and a PNG file of an image."""
    png = png_bytes(image)
    return (PNG, png) if len(png) < image.size else (RAW, image.tobytes())


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar over the images, shown on a terminal and cleared when done."""
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress else True, leave=False)


def _words(coder) -> bytes:
    return coder.get_compressed().astype("<u4").tobytes()


@dataclass
class Compressed:
    data: bytes
    images: int
    bits_per_dim: float
    stored: int = 0  # images stored raw or as PNG instead of coded
    model_bits: float = 0.0  # exact bits of the coded images under the integer model


def _check_shape(model: IntegerModel, images: torch.Tensor) -> None:
    expected = tuple(model.config.image_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.dtype != torch.uint8:
        raise UserError(
            f"compress takes uint8 images [N, {', '.join(map(str, expected))}] (the model's "
            f"shape), got {images.dtype} {list(images.shape)}"
        )


def compress(
    model: IntegerModel,
    images: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
    fallback: bool = True,
) -> Compressed:
    """uint8 images [N, C, H, W] (the model's shape) -> the bytes of an .itc file.

    Images are coded in groups of `batch_size`, one coder stream per group. An image whose exact
    cost under the model exceeds the cheaper of its raw bytes and a PNG of it is stored that way
    instead (its group is coded again without it), unless `fallback` is off."""
    _check_shape(model, images)
    queue = _constriction().stream.queue
    c, h, w = model.config.image_shape
    header = Header(model.fingerprint[:FINGERPRINT_BYTES], (c, h, w), len(images), batch_size)
    arrays = images.numpy()
    stored_payloads: dict[int, bytes] = {}
    streams, model_bits = [], 0.0
    with _bar(len(images), "compress", progress) as bar:
        for start in range(0, len(images), batch_size):
            members = list(range(start, min(start + batch_size, len(images))))
            while members:
                coder = queue.RangeEncoder()
                _, bits = _code_groups(model, [coder], [len(members)], images[members], True)
                worse = []
                for i, cost in zip(members, bits.tolist(), strict=True):
                    if not fallback or cost / 8 <= min(arrays[i].size, PNG_MIN_BYTES):
                        continue  # no stored form can be cheaper
                    mode, payload = _stored_form(arrays[i])
                    if cost / 8 > len(payload):
                        worse.append(i)
                        stored_payloads[i] = payload
                        header.stored[i] = (mode, len(payload))
                if not worse:
                    streams.append(_words(coder))
                    model_bits += float(bits.sum())
                    break
                members = [i for i in members if i not in worse]
            bar.update(min(batch_size, len(images) - start))
    out = bytearray(header.to_bytes())
    for words in streams:
        put_varint(out, len(words) // 4)
        out += words
    for i in sorted(stored_payloads):
        out += stored_payloads[i]
    out += zlib.crc32(arrays.tobytes()).to_bytes(4, "little")
    data = bytes(out)
    dims = max(1, images.numel())
    return Compressed(data, len(images), 8 * len(data) / dims, len(stored_payloads), model_bits)


def decompress(
    model: IntegerModel,
    data: bytes,
    source: str = "the file",
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """The bytes of an .itc file -> uint8 images [N, C, H, W], checked against the file's CRC.
    `batch_size`: about how many images to decode side by side (whole coder streams; any value
    gives the same images). Refuses, in one line that names `source` and the likely cause, a file
    of another format or version, of another model, truncated or corrupted."""
    reader = Reader(data, source)
    header = Header.read(reader)
    if header.fingerprint != model.fingerprint[:FINGERPRINT_BYTES]:
        raise UserError(
            f"{source} was made with another model (integer model {header.fingerprint.hex()}, "
            f"not {model.fingerprint[:FINGERPRINT_BYTES].hex()}): decompress it with the run "
            "that compressed it"
        )
    if header.shape != tuple(model.config.image_shape):
        raise UserError(f"{source} holds images of another shape than the model's")
    groups = header.groups()
    streams = []
    for g in range(len(groups)):
        words = reader.varint(f"coder stream {g}")
        streams.append(np.frombuffer(reader.take(4 * words, f"coder stream {g}"), dtype="<u4"))
    stored = {i: reader.take(size, f"image {i}") for i, (_, size) in sorted(header.stored.items())}
    crc = int.from_bytes(reader.take(4, "the checksum"), "little")
    if reader.pos != len(data):
        raise UserError(f"{source} is corrupted ({len(data) - reader.pos} bytes too many)")
    c, h, w = header.shape
    images = torch.zeros(header.count, c, h, w, dtype=torch.uint8)
    for i, payload in stored.items():
        images[i] = _unstore(header.stored[i][0], payload, header.shape, source, i)
    per_batch = max(1, batch_size // header.group)
    queue = _constriction().stream.queue
    with _bar(header.count, "decompress", progress) as bar:
        bar.update(len(stored))
        for first in range(0, len(groups), per_batch):
            batch = groups[first : first + per_batch]
            coders = [
                queue.RangeDecoder(s.astype(np.uint32)) for s in streams[first:][: len(batch)]
            ]
            try:
                values, _ = _code_groups(model, coders, [len(m) for m in batch], None, False)
            except Exception as err:  # constriction: out of data, an invalid state
                raise UserError(
                    f"{source} is corrupted: its coder stream does not decode ({type(err).__name__}"
                    "); nothing was written"
                ) from None
            members = [i for m in batch for i in m]
            images[members] = model.from_steps(values).cpu()
            bar.update(len(members))
    if zlib.crc32(images.numpy().tobytes()) != crc:
        raise UserError(
            f"{source} is corrupted: it does not decode to what was compressed (CRC mismatch); "
            "nothing was written"
        )
    return images


def _unstore(mode: str, payload: bytes, shape, source: str, i: int) -> torch.Tensor:
    c, h, w = shape
    if mode == RAW:
        return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).reshape(c, h, w).copy())
    try:
        with Image.open(io.BytesIO(payload)) as image:
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{source} is corrupted (image {i}'s PNG does not read: {err})") from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape != (c, h, w):
        raise UserError(f"{source} is corrupted (image {i}'s PNG has another shape)")
    return torch.from_numpy(array.copy())


# The integer model of a run folder ---------------------------------------------------------------
CACHE_PATTERN = "codec-*.safetensors"


def cache_path(run_dir: str | Path, print_: bytes) -> Path:
    return Path(run_dir) / f"codec-{print_[:FINGERPRINT_BYTES].hex()}.safetensors"


def calibration_images(run_dir: str | Path, model: ImageTransformer) -> torch.Tensor:
    """A few training images of the run (the first of its train split); a folder without its
    data (or a bare model folder) falls back to samples of the model, seeded."""
    the_run = open_run(run_dir)
    if the_run is not None:
        try:
            images = the_run.load_split("train").images[:64]
            if tuple(images.shape[1:]) == tuple(model.config.image_shape) and len(images):
                return images
        except (UserError, OSError):
            pass
    return model.sample(16, generator=torch.Generator().manual_seed(0)).cpu()


def quantized(
    run_dir: str | Path,
    device: torch.device,
    load: Callable[[], ImageTransformer] | None = None,
    note: Callable[[str], None] = print,
) -> IntegerModel:
    """The integer model of the run's current weights: the cached file in the run folder made
    from these weights, else made now (calibrated on a few training images) and cached."""
    model = load() if load else open_model(run_dir, torch.device("cpu"))
    source = fingerprint(model).hex()
    for path in sorted(Path(run_dir).glob(CACHE_PATTERN)):
        try:
            if IntegerModel.read_source(path)[1] == source:
                return IntegerModel.load(path, device)
        except UserError:
            continue
    integer = quantize(model, calibration_images(run_dir, model))
    path = cache_path(run_dir, integer.fingerprint)
    integer.save(path, source)
    note(f"made the integer model of {run_dir} for exact coding: {path} (once per weights)")
    return integer.to(device)


def quantized_for_file(
    run_dir: str | Path, header: Header, source: str, device: torch.device
) -> IntegerModel:
    """The integer model a file names: its cached file in the run folder, or, where that is
    missing, the one the run's weights make (when it is the same)."""
    path = cache_path(run_dir, header.fingerprint)
    if path.is_file():
        return IntegerModel.load(path, device)
    integer = quantized(run_dir, device, note=lambda _: None)
    if integer.fingerprint[:FINGERPRINT_BYTES] != header.fingerprint:
        raise UserError(
            f"{source} was made with the integer model {header.fingerprint.hex()} "
            f"({path.name}), which {run_dir} does not hold: copy that file from the run folder "
            "that compressed it, or decompress with that run"
        )
    return integer
