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
import itertools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import UserError
from ..evaluation import classify
from ..files import WriteError
from ..layout import area_downsample
from ..model import ImageTransformer
from ..runs_io import open_model, open_run
from .integer_model import CALIBRATION_IMAGES, IntegerModel, quantize, symbol_bits

MAGIC = b"ITC\x00"
VERSION = 4
FINGERPRINT_BYTES = 8
RAW, PNG = "raw", "png"
MAX_DECODED_BYTES = 2**36  # a header that claims more images is corrupted
PNG_MIN_BYTES = 57  # signature, IHDR, an IDAT and IEND: no PNG file is smaller
OLDER_VERSIONS = {  # which release reads the files of an older format version
    1: "imagetransformer before 2026-12, up to commit 1af6293",
    2: "imagetransformer of 2026-12-02, up to commit 277ef49 (integer model 1)",
    3: "imagetransformer of 2026-12-06, up to commit d77f120",
}
# version 3 coded a mixture-of-logistics channel as one 256-way symbol; categorical files are
# coded as in version 4, so this release still reads them
SAME_FOR_CATEGORICAL = 3


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
    version: int = VERSION

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
        if version in OLDER_VERSIONS and version != SAME_FOR_CATEGORICAL:
            raise older_version(source, version)
        if version not in (VERSION, SAME_FOR_CATEGORICAL):
            raise UserError(
                f"{source} has format version {version}; this tool reads version {VERSION}: "
                "use the imagetransformer release that wrote it"
            )
        print_ = reader.take(FINGERPRINT_BYTES, "the header")
        c, h, w, count, group, stored = (reader.varint("the header") for _ in range(6))
        if group < 1 or stored > count or not (c in (1, 3) and 0 < h * w < 2**28):
            raise UserError(f"{source} is corrupted (its header is not valid)")
        header = cls(print_, (c, h, w), count, group, version=version)
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


def older_version(source: str, version: int) -> UserError:
    return UserError(
        f"{source} was written by format version {version} ({OLDER_VERSIONS[version]}): "
        f"decompress it with that release; this one reads version {VERSION}"
    )


def read_header(data: bytes, source: str = "the file") -> Header:
    return Header.read(Reader(data, source))


# Coding ----------------------------------------------------------------------------------------
class _Coders:
    """The coders of several groups coded side by side (`sizes` images each, in order): each
    call codes one array of symbols per group, encoding or decoding."""

    def __init__(self, coders: list, sizes: list[int], encode: bool) -> None:
        self.constriction = _constriction()
        self.coders, self.encode = coders, encode
        self.rows = [slice(a, b) for a, b in itertools.pairwise(np.cumsum([0, *sizes]))]
        self.n = sum(sizes)

    def code(self, symbols, freqs=None, k: int = 256, shape: tuple[int, ...] = ()):
        """Code the symbols [n, *shape] of the n images. Decoding (`symbols` None): one each
        under its integer frequencies `freqs` [n, 256], or (None) under the uniform
        distribution over 0..k-1. Encoding: `symbols` under the uniform distribution (labels
        and low-resolution inputs; `_encode_group` codes the model's tables directly). Returns
        the symbols (int64, on the CPU) and 0.0 for their bits, as `Code` asks (nothing reads
        them here)."""
        if self.encode and (symbols is None or freqs is not None):
            raise ValueError("encoding codes given symbols under the uniform distribution")
        if freqs is None:
            model, tables = self.constriction.stream.model.Uniform(k), None
        else:
            model = self.constriction.stream.model.Categorical(perfect=False)
            tables = freqs.cpu().numpy().astype(np.float64)  # integers < 2^24: exact
        array = np.empty((self.n, *shape), dtype=np.int64)
        if symbols is not None:
            array = symbols.cpu().numpy().astype(np.int64).reshape(array.shape)
        for rows, coder in zip(self.rows, self.coders, strict=True):
            if self.encode:
                coder.encode(array[rows].reshape(-1).astype(np.int32), model)
            else:
                given = array[rows].size if tables is None else tables[rows]
                array[rows] = coder.decode(model, given).reshape(array[rows].shape)
        return torch.from_numpy(array), 0.0


@torch.inference_mode()  # no autograd bookkeeping: 7-10% of decoding
def _decode_groups(
    model: IntegerModel, coders: _Coders
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode the images of several groups side by side, step by step with the integer model:
    first each image's label (class-conditional models, uniform over the classes) and
    low-resolution input (super-resolution models, uniform: its raw bytes), then every step's
    values, in the order `_encode_group` coded them. Returns the values in generation order
    [n, N, *value] and the labels."""
    n, device, config = coders.n, model.device, model.config
    labels = low_res = None
    if config.num_classes:
        labels, _ = coders.code(None, k=config.num_classes)
    if model.encoder is not None:
        low_res, _ = coders.code(None, shape=config.low_res_shape)
        low_res = low_res.to(torch.uint8)
    steps = config.num_positions
    values = torch.zeros(n, steps, *model.distribution.value_shape, dtype=torch.long)
    values = values.to(device)
    state = model.start(n, labels, low_res)
    for step in range(steps):
        head = model.step(state, step, values[:, step - 1] if step else None)
        coding = model.coding(head, state.outside)
        value = values[:, step].view(n, -1)
        for channel in range(coding.channels):
            symbols, _ = coding.code(channel, coders.code, None)
            value[:, channel] = symbols.to(device)
    return values, labels


@torch.inference_mode()  # no autograd bookkeeping
def _group_tables(
    model: IntegerModel, images: torch.Tensor, labels: torch.Tensor | None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The coding tables of the images' values (symbols [s, n] and int32 frequencies [s, n, k]
    on the CPU, in coding order; all at once, as the encoder knows every value) and each
    image's exact cost in bits [n], its label or low-resolution input included."""
    config = model.config
    side = 0.0
    if config.num_classes:
        side += math.log2(config.num_classes)
    if model.encoder is not None:
        side += 8 * math.prod(config.low_res_shape)
    bits = torch.full((len(images),), side, dtype=torch.float64)
    tables = []
    for symbols, freqs in model.coding_tables(images, labels):
        costs = symbol_bits(freqs.flatten(0, 1), symbols.flatten()).view(symbols.shape)
        bits += costs.sum(0).cpu()
        tables.append((symbols.cpu(), freqs.cpu().to(torch.int32)))  # < 2^24
    return tables, bits


def _encode_group(
    model: IntegerModel,
    coder,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    tables: list[tuple[torch.Tensor, torch.Tensor]],
    keep: torch.Tensor,
) -> None:
    """Code the images `keep` of a group into `coder`, in the order `_decode_groups` reads
    them: their labels, low-resolution inputs, then each step's symbols from `tables`."""
    config = model.config
    coders = _Coders([coder], [len(keep)], encode=True)
    if config.num_classes:
        coders.code(labels[keep], k=config.num_classes)
    if model.encoder is not None:
        low_res = area_downsample(images[keep], config.scale)
        coders.code(low_res, shape=config.low_res_shape)
    categorical = coders.constriction.stream.model.Categorical(perfect=False)
    for symbols, freqs in tables:
        chosen = symbols[:, keep].reshape(-1).numpy().astype(np.int32)
        table = freqs[:, keep].reshape(len(chosen), -1).numpy().astype(np.float64)
        coder.encode(chosen, categorical, table)


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


def _check_labels(model: IntegerModel, labels, count: int) -> torch.Tensor | None:
    k = model.config.num_classes
    if not k:
        if labels is not None:
            raise UserError("labels were given but the model is unconditional")
        return None
    if k > 256:
        raise UserError(f"compress codes models of at most 256 classes, not {k}")
    labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
    if labels is None or len(labels) != count or labels.min() < 0 or labels.max() >= k:
        raise UserError(f"a class-conditional model needs {count} labels in 0..{k - 1}")
    return labels


def best_labels(model: ImageTransformer, images: torch.Tensor, batch_size: int = 64):
    """The likeliest class of each image under a class-conditional float model (the label the
    file then stores): the one it codes the image with in the fewest bits."""
    chunks = [
        classify(model, images[start : start + batch_size].to(model.head.weight.device)).argmax(1)
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).cpu()


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
    batch_size: int = 64,
    progress: bool = False,
    fallback: bool = True,
    labels: torch.Tensor | None = None,
) -> Compressed:
    """uint8 images [N, C, H, W] (the model's shape) -> the bytes of an .itc file.

    Images are coded in groups of `batch_size`, one coder stream per group. Each group's coding
    tables come from one teacher-forced pass of the integer model (the same integers as the
    decoder's step-by-step pass), which also gives each image's exact cost: an image that would
    cost more than the cheaper of its raw bytes and a PNG of it is stored that way instead,
    unless `fallback` is off. A class-conditional model codes each image with its label from
    `labels` [N] (stored in the file; see `best_labels`), a super-resolution model with the
    image's own area-downsampled copy (stored raw in the file)."""
    _check_shape(model, images)
    labels = _check_labels(model, labels, len(images))
    queue = _constriction().stream.queue
    c, h, w = model.config.image_shape
    header = Header(model.fingerprint[:FINGERPRINT_BYTES], (c, h, w), len(images), batch_size)
    arrays = images.numpy()
    stored_payloads: dict[int, bytes] = {}

    def store_if_cheaper(i: int, cost: float) -> bool:
        if not fallback or cost / 8 <= min(arrays[i].size, PNG_MIN_BYTES):
            return False  # no stored form can be cheaper
        mode, payload = _stored_form(arrays[i])
        if cost / 8 <= len(payload):
            return False
        stored_payloads[i] = payload
        header.stored[i] = (mode, len(payload))
        return True

    streams, model_bits = [], 0.0
    with _bar(len(images), "compress", progress) as bar:
        for start in range(0, len(images), batch_size):
            members = list(range(start, min(start + batch_size, len(images))))
            chosen = None if labels is None else labels[members]
            tables, bits = _group_tables(model, images[members], chosen)
            costs = bits.tolist()
            keep = [j for j, i in enumerate(members) if not store_if_cheaper(i, costs[j])]
            if keep:
                coder = queue.RangeEncoder()
                kept = torch.tensor(keep)
                _encode_group(model, coder, images[members], chosen, tables, kept)
                streams.append(_words(coder))
                model_bits += float(bits[kept].sum())
            bar.update(len(members))
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
    batch_size: int = 64,
    progress: bool = False,
    with_labels: bool = False,
):
    """The bytes of an .itc file -> uint8 images [N, C, H, W], checked against the file's CRC
    (`with_labels`: and the labels a class-conditional model coded them with, [N], -1 for an
    image stored otherwise). `batch_size`: about how many images to decode side by side (whole
    coder streams; any value gives the same images). Refuses, in one line that names `source`
    and the likely cause, a file of another format or version, of another model, truncated or
    corrupted."""
    reader = Reader(data, source)
    header = Header.read(reader)
    if header.fingerprint != model.fingerprint[:FINGERPRINT_BYTES]:
        raise UserError(
            f"{source} was made with another model (integer model {header.fingerprint.hex()}, "
            f"not {model.fingerprint[:FINGERPRINT_BYTES].hex()}): decompress it with the run "
            "that compressed it"
        )
    if header.version == SAME_FOR_CATEGORICAL and model.config.output != "cat":
        raise older_version(source, header.version)
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
    if header.count * c * h * w > MAX_DECODED_BYTES:
        raise UserError(f"{source} is corrupted (it claims {header.count} images)")
    images = torch.zeros(header.count, c, h, w, dtype=torch.uint8)
    labels = torch.full((header.count,), -1, dtype=torch.long)
    for i, payload in stored.items():
        images[i] = _unstore(header.stored[i][0], payload, header.shape, source, i)
    per_batch = max(1, batch_size // header.group)
    queue = _constriction().stream.queue
    with _bar(header.count, "decompress", progress) as bar:
        bar.update(len(stored))
        for first in range(0, len(groups), per_batch):
            batch = groups[first : first + per_batch]
            decoders = [
                queue.RangeDecoder(s.astype(np.uint32)) for s in streams[first:][: len(batch)]
            ]
            coders = _Coders(decoders, [len(m) for m in batch], encode=False)
            try:
                values, decoded_labels = _decode_groups(model, coders)
            except (AssertionError, ValueError, RuntimeError, OverflowError) as err:
                # constriction: data that is not valid for the model, a coder out of data
                raise UserError(
                    f"{source} is corrupted: its coder stream does not decode ({type(err).__name__}"
                    "); nothing was written"
                ) from None
            members = [i for m in batch for i in m]
            images[members] = model.from_steps(values).cpu()
            if decoded_labels is not None:
                labels[members] = decoded_labels
            bar.update(len(members))
    if zlib.crc32(images.numpy().tobytes()) != crc:
        raise UserError(
            f"{source} is corrupted: it does not decode to what was compressed (CRC mismatch); "
            "nothing was written"
        )
    return (images, labels) if with_labels else images


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


def calibration_images(run_dir: str | Path, model: ImageTransformer):
    """A few training images of the run (the first of its train split) and their labels; a
    folder without its data (or a bare model folder) falls back to seeded samples of the model
    (a super-resolution model: to seeded noise)."""
    config = model.config
    the_run = open_run(run_dir)
    if the_run is not None:
        try:
            data = the_run.load_split("train")
            images = data.images[:CALIBRATION_IMAGES]
            labels = None if data.labels is None else data.labels[:CALIBRATION_IMAGES]
            fits = tuple(images.shape[1:]) == tuple(config.image_shape) and len(images)
            if fits and (labels is not None or not config.num_classes):
                return images, labels
        except (UserError, OSError):
            pass
    generator = torch.Generator().manual_seed(0)
    if config.task == "superres":
        shape = (16, *config.image_shape)
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8), None
    labels = torch.arange(16) % config.num_classes if config.num_classes else None
    return model.sample(16, labels=labels, generator=generator).cpu(), labels


def _cached(run_dir: str | Path, source: str, device: torch.device) -> IntegerModel | None:
    """The integer model cached in the run folder that was made from the weights `source`,
    under its current name (one cached under its older name is renamed), or None."""
    for path in sorted(Path(run_dir).glob(CACHE_PATTERN)):
        try:
            if IntegerModel.read_source(path)[1] != source:
                continue
            integer = IntegerModel.load(path, device)
        except UserError:
            continue
        if integer.fingerprint == integer.older_fingerprint:  # the same model, its new name
            integer = IntegerModel(integer.config, integer.store, device, integer.config_json)
        return integer
    return None


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
    integer = _cached(run_dir, source, device)
    if integer is not None and cache_path(run_dir, integer.fingerprint).is_file():
        return integer
    made = integer is None  # else cached only under its older name: saved under the new one
    if integer is None:
        integer = quantize(model, *calibration_images(run_dir, model))
    path = cache_path(run_dir, integer.fingerprint)
    try:
        integer.save(path, source)
    except WriteError as err:
        note(f"note: the integer model is not cached ({err}); decompress makes it again")
    else:
        if made:
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
    if not integer.take_name(header.fingerprint):  # its name, or its name before (older files)
        raise UserError(
            f"{source} was made with the integer model {header.fingerprint.hex()} "
            f"({path.name}), which {run_dir} does not hold: copy that file from the run folder "
            "that compressed it, or decompress with that run"
        )
    return integer
