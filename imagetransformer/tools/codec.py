"""Lossless image compression with the model (`imagetransformer compress` / `decompress`).

Range coding (`constriction`) driven by the model's exact distribution at every generation step:
the encoder runs the decoding step on the true values, the decoder on the values it has just
decoded, so both see bit-identical probabilities as long as they run the same model on the same
kind of machine with the same batch grouping (stored in the file). Each distribution is handed
to constriction as float64 probabilities, which it quantises deterministically to integer
frequencies with every symbol nonzero. The file format is in docs/file-format.md.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..model import ImageTransformer

MAGIC = b"ITC\x00"
VERSION = 1
_HEADER = struct.Struct("<4sH32sHHHII")  # magic, version, fingerprint, C, H, W, count, batch
_ENTRY = struct.Struct("<II")  # per image: payload length in 32-bit words, CRC-32 of its bytes


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
    """SHA-256 of the model's config and weights: a file decodes only with its own model."""
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def _check_model(model: ImageTransformer) -> None:
    if model.config.num_classes or model.config.task != "generate":
        raise UserError(
            "compress works with unconditional models only (a class-conditional or "
            "super-resolution model would also need its label or low-resolution input)"
        )


def _code(model: ImageTransformer, batch: torch.Tensor | None, coders: list, encode: bool, n: int):
    """Run the decoding step over `n` images, coding every symbol with `coders` (one per image);
    encoding reads the symbols from `batch`, decoding writes them. Returns the values."""
    constriction = _constriction()
    categorical = constriction.stream.model.Categorical
    dist = model.distribution
    device = model.head.weight.device
    steps = model.config.num_positions
    if encode:
        values = model.to_steps(batch.to(device))
    else:
        values = torch.zeros(n, steps, *dist.value_shape, dtype=torch.long, device=device)
    with model.evaluating():
        state = model.start_decoding(n)
        for step in range(steps):
            params = model.decode_step(state, step, values[:, step - 1] if step else None)
            value = values[:, step].view(n, -1)  # [n, symbols]: the position's symbols
            for channel in range(dist.symbols_per_position):
                probs = dist.value_probabilities(params, value.view_as(values[:, step]), channel)
                probs = probs.cpu().numpy()
                for i, coder in enumerate(coders):
                    model_i = categorical(probs[i], perfect=False)
                    if encode:
                        coder.encode(int(value[i, channel]), model_i)
                    else:
                        value[i, channel] = int(coder.decode(model_i))
    return values


@dataclass
class Compressed:
    data: bytes
    images: int
    bits_per_dim: float


def compress(model: ImageTransformer, images: torch.Tensor, batch_size: int = 16) -> Compressed:
    """uint8 images [N, C, H, W] (the model's shape) -> the bytes of an .itc file."""
    _check_model(model)
    model.check_images(images)
    queue = _constriction().stream.queue
    c, h, w = model.config.image_shape
    entries, payloads = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        coders = [queue.RangeEncoder() for _ in range(len(chunk))]
        _code(model, chunk, coders, encode=True, n=len(chunk))
        for image, coder in zip(chunk, coders, strict=True):
            words = coder.get_compressed().astype("<u4")
            payloads.append(words.tobytes())
            entries.append(_ENTRY.pack(len(words), zlib.crc32(image.numpy().tobytes())))
    header = _HEADER.pack(MAGIC, VERSION, fingerprint(model), c, h, w, len(images), batch_size)
    data = header + b"".join(entries) + b"".join(payloads)
    dims = max(1, images.numel())
    return Compressed(data, len(images), 8 * len(data) / dims)


def decompress(model: ImageTransformer, data: bytes, source: str = "the file") -> torch.Tensor:
    """The bytes of an .itc file -> uint8 images [N, C, H, W], each checked against its CRC.
    Refuses, by name, a file of another format or version, another model, or one that is
    truncated or corrupted."""
    _check_model(model)
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise UserError(f"{source} is not an .itc file of this tool (bad magic bytes)")
    magic, version, print_, c, h, w, count, batch = _HEADER.unpack_from(data)
    if version != VERSION:
        raise UserError(
            f"{source} has format version {version}; this tool reads version {VERSION}: use the "
            "imagetransformer release that wrote it"
        )
    if print_ != fingerprint(model) or (c, h, w) != tuple(model.config.image_shape):
        raise UserError(
            f"{source} was made with another model (fingerprint or image shape differ): "
            "decompress it with the run that compressed it"
        )
    table_end = _HEADER.size + count * _ENTRY.size
    if batch < 1 or len(data) < table_end:
        raise UserError(f"{source} is truncated or corrupted (its table of images is cut off)")
    entries = [_ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size) for i in range(count)]
    if len(data) != table_end + 4 * sum(words for words, _ in entries):
        raise UserError(f"{source} is truncated or corrupted (its length does not match)")
    queue = _constriction().stream.queue
    offset, decoded = table_end, []
    for start in range(0, count, batch):
        coders = []
        for words, _ in entries[start : start + batch]:
            payload = np.frombuffer(data, dtype="<u4", count=words, offset=offset)
            coders.append(queue.RangeDecoder(payload.astype(np.uint32)))
            offset += 4 * words
        values = _code(model, None, coders, encode=False, n=len(coders))
        decoded.append(model.from_steps(values).cpu())
    images = torch.cat(decoded) if decoded else torch.zeros(0, c, h, w, dtype=torch.uint8)
    for i, (image, (_, crc)) in enumerate(zip(images, entries, strict=True)):
        if zlib.crc32(image.numpy().tobytes()) != crc:
            raise UserError(
                f"{source} is corrupted: image {i} does not decode to what was compressed "
                "(CRC mismatch); nothing was written"
            )
    return images
