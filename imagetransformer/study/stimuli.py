"""A study's stimuli, made once and stored: for every chosen image, the truth and one upscaled
sample per condition (a named super-resolution run) and temperature, each sample drawn from the
image's own low-resolution copy. The manifest (`study.json`) says which file is which; the files
themselves have random names, carry no metadata and are written in a random order, so neither a
name, a URL nor a file date tells a rater which image is real.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from random import Random

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.dataset import ImageDataset
from ..errors import UserError
from ..files import atomic_write_text, current_umask
from ..layout import area_downsample

MANIFEST_FILE = "study.json"
STIMULI_DIR = "stimuli"
FORMAT = "imagetransformer-study"
VERSION = 1
DISPLAY_SIDE = 256  # stimuli are shown enlarged by a whole factor to at least this many pixels
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class Pair:
    """One judgement: the truth of `image` beside its sample from `condition` at `temperature`;
    `real` and `sample` are the tokens of their files."""

    id: str
    image: int
    condition: str
    temperature: float
    real: str
    sample: str


@dataclass(frozen=True)
class Condition:
    """A named super-resolution run whose samples are judged."""

    name: str
    run: str
    scale: int
    preset: str | None = None


@dataclass
class Manifest:
    """What `study.json` records: data, images, conditions, temperatures, display and pairs."""

    data: str
    split: str
    image_shape: tuple[int, int, int]
    images: list[int]
    temperatures: list[float]
    conditions: list[Condition]
    pairs: list[Pair]
    display_scale: int
    seed: int = 0
    created: str = ""
    _by_id: dict[str, Pair] = field(init=False, repr=False)
    _by_cell: dict[tuple[int, str, float], Pair] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.pairs}
        self._by_cell = {(p.image, p.condition, p.temperature): p for p in self.pairs}

    # Lookups -----------------------------------------------------------------------------------
    def has_pair(self, pair_id: str) -> bool:
        return pair_id in self._by_id

    def pair(self, pair_id: str) -> Pair:
        return self._by_id[pair_id]

    @property
    def cells(self) -> list[tuple[str, float]]:
        """Every (condition, temperature) the study compares, in a fixed order."""
        return [(c.name, t) for c in self.conditions for t in self.temperatures]

    def tokens(self) -> set[str]:
        """The tokens of every stimulus file."""
        return {p.real for p in self.pairs} | {p.sample for p in self.pairs}

    def assignment(self, rater_number: int) -> list[Pair]:
        """The pairs of the rater with this number: one per image (seeing a real image twice
        would tell it apart), the cell rotated by image and rater so that every cell is judged
        about equally often by every rater and every pair by about 1/len(cells) of them."""
        cells = self.cells
        return [
            self._by_cell[(image, *cells[(rank + rater_number) % len(cells)])]
            for rank, image in enumerate(self.images)
        ]

    # Files -------------------------------------------------------------------------------------
    @staticmethod
    def stimulus_path(study_dir: str | Path, token: str) -> Path:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"not a stimulus token: {token!r}")
        return Path(study_dir) / STIMULI_DIR / f"{token}.png"

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "created": self.created,
                "data": self.data,
                "split": self.split,
                "image_shape": list(self.image_shape),
                "images": self.images,
                "temperatures": self.temperatures,
                "conditions": [asdict(c) for c in self.conditions],
                "display": {"scale": self.display_scale, "method": "nearest-neighbour"},
                "seed": self.seed,
                "pairs": [asdict(p) for p in self.pairs],
            },
            indent=1,
        )

    @classmethod
    def read(cls, study_dir: str | Path) -> Manifest:
        """The manifest of a study folder; a missing, corrupt or foreign one is refused by name,
        and so is a folder whose stimulus files are not all there."""
        path = Path(study_dir) / MANIFEST_FILE
        if not path.is_file():
            raise UserError(
                f"{path} not found: {study_dir} is not a study folder (make one with "
                "imagetransformer study create)"
            )
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}; this tool reads {VERSION}")
            manifest = cls(
                data=data["data"],
                split=data["split"],
                image_shape=tuple(int(x) for x in data["image_shape"]),
                images=[int(i) for i in data["images"]],
                temperatures=[float(t) for t in data["temperatures"]],
                conditions=[Condition(**c) for c in data["conditions"]],
                pairs=[Pair(**p) for p in data["pairs"]],
                display_scale=int(data["display"]["scale"]),
                seed=int(data.get("seed", 0)),
                created=str(data.get("created", "")),
            )
            for token in manifest.tokens():
                cls.stimulus_path(study_dir, token)  # checks the token's form
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(
                f"{path} is not a valid study manifest ({err}); restore it from a copy or "
                "create the study again"
            ) from None
        missing = [t for t in manifest.tokens() if not cls.stimulus_path(study_dir, t).is_file()]
        if missing:
            raise UserError(
                f"{Path(study_dir) / STIMULI_DIR} lacks {len(missing)} of the study's images "
                f"(e.g. {missing[0]}.png); restore the folder or create the study again"
            )
        return manifest


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 [C, H, W] as a PNG with no metadata, the same way for real and generated images."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def display_scale(image_shape: Sequence[int]) -> int:
    """The whole factor that shows an image at DISPLAY_SIDE pixels or more."""
    return max(1, math.ceil(DISPLAY_SIDE / max(image_shape[1:])))


def check_condition_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(
            f"condition name {name!r} must be 1-64 letters, digits, '_', '-' or '.' "
            "(give runs as NAME=RUN_DIR)"
        )
    return name


@torch.no_grad()
def create_study(
    out: str | Path,
    runs: Sequence[tuple[Condition, torch.nn.Module]],
    dataset: ImageDataset,
    data: str,
    split: str,
    temperatures: Sequence[float],
    count: int,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> Manifest:
    """Draw the stimuli and write the study folder `out` (a new or empty folder).

    `runs` are the conditions with their super-resolution models, all for `dataset`'s image
    shape. `count` images are drawn at random (seeded) from the split; every condition and
    temperature gets one sample per image. The folder appears complete or not at all.
    """
    out = Path(out)
    _check_target(out)
    names = [c.name for c, _ in runs]
    if len(set(names)) != len(names):
        raise UserError(f"condition names must differ, got {names}: give runs as NAME=RUN_DIR")
    if (
        not temperatures
        or any(t < 0 for t in temperatures)
        or len(set(temperatures)) != len(temperatures)
    ):
        raise UserError(f"--temperatures must be distinct values >= 0, got {list(temperatures)}")
    if not 1 <= count <= len(dataset):
        raise UserError(f"--images must be in 1..{len(dataset)} (the split's size), got {count}")
    chosen = sorted(Random(seed).sample(range(len(dataset)), count))
    truth, _ = dataset.batch(torch.tensor(chosen))

    files: dict[str, bytes] = {}
    real = {}
    for index, image in zip(chosen, truth, strict=True):
        real[index] = secrets.token_hex(12)
        files[real[index]] = png_bytes(image)
    pairs = []
    jobs = [(c, m, t) for c, m in runs for t in temperatures]
    bar = tqdm(total=len(jobs) * count, desc="stimuli", disable=not progress, leave=False)
    for condition, model, temperature in jobs:
        device = model.head.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        for start in range(0, count, batch_size):
            high = truth[start : start + batch_size]
            low = area_downsample(high, condition.scale).to(device)
            samples = model.upscale(low, temperature=temperature, generator=generator).cpu()
            for index, sample in zip(chosen[start : start + batch_size], samples, strict=True):
                token = secrets.token_hex(12)
                files[token] = png_bytes(sample)
                pairs.append(
                    Pair(
                        secrets.token_hex(8), index, condition.name, temperature, real[index], token
                    )
                )
            bar.update(high.shape[0])
    bar.close()
    manifest = Manifest(
        data=data,
        split=split,
        image_shape=tuple(dataset.shape),
        images=chosen,
        temperatures=[float(t) for t in temperatures],
        conditions=[c for c, _ in runs],
        pairs=pairs,
        display_scale=display_scale(dataset.shape),
        seed=seed,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _write_folder(out, manifest, files, Random(secrets.randbits(64)))
    return manifest


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} exists and is not an empty folder: a study's stimuli are made once; "
            "pick a new --out"
        )


def _write_folder(out: Path, manifest: Manifest, files: dict[str, bytes], rng: Random) -> None:
    """Write everything into a hidden folder beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        os.chmod(partial, 0o777 & ~current_umask())  # mkdtemp's folder is private
        (partial / STIMULI_DIR).mkdir()
        order = list(files)
        rng.shuffle(order)  # file times say nothing about which file is real
        for token in order:
            (partial / STIMULI_DIR / f"{token}.png").write_bytes(files[token])
        atomic_write_text(partial / MANIFEST_FILE, manifest.to_json() + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        partial.rename(out)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(
            f"cannot write the study folder {out} ({err}); nothing was written"
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


__all__ = [
    "MANIFEST_FILE",
    "Condition",
    "Manifest",
    "Pair",
    "check_condition_name",
    "create_study",
    "png_bytes",
]
