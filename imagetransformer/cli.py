"""The `imagetransformer` command: thin verbs over the library (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import BACKENDS, apply_overrides
from .errors import UserError
from .precision import PRECISIONS, autocast
from .presets import (
    DEFAULT_PRESET,
    describe_presets,
    load_preset,
    load_train_preset,
    preset_data,
)

DEVICE_HELP = (
    "auto picks CUDA when present, else the CPU. On a CPU, fp32 eager with the blocked "
    "backend is the fastest mode we measured (bf16 autocast is ~10x slower without bf16 "
    "hardware; torch.compile gave no gain)."
)


PRECISION_HELP = (
    "compute precision through autocast (bits/dim is always reduced in float32); fp32 is the "
    "default because bf16 autocast was ~10x slower on a CPU without bf16 hardware"
)


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available; use --device cpu")
    return torch.device(name)


def _load_split(spec: str, split: str, args_or_info):
    from .data import load_dataset

    image_size = getattr(args_or_info, "image_size", None)
    channels = getattr(args_or_info, "channels", None)
    download = getattr(args_or_info, "download", False)
    return load_dataset(spec, split, image_size=image_size, channels=channels, download=download)


# train -----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import read_config
    from .training import RESUMABLE_OVERRIDES, RunInfo, Trainer

    if args.precision:
        args.set.append(f"precision={args.precision}")
    if args.compile:
        args.set.append("compile=true")
    if args.attention_backend:
        args.set.append(f"backend={args.attention_backend}")
    if args.grad_accum is not None:
        args.set.append(f"grad_accum={args.grad_accum}")
    if args.task is not None:
        args.set.append(f"task={args.task}")
    if args.scale is not None:
        args.set.append(f"scale={args.scale}")
    preset = args.preset or DEFAULT_PRESET
    out = Path(args.out) if args.out else _default_run_dir(preset, args.resume)
    if args.resume:
        config = read_config(out)
        info = RunInfo.read(out)
        for text in args.set:
            key = text.split("=", 1)[0].strip()
            if key not in RESUMABLE_OVERRIDES:
                raise UserError(
                    f"--set {key}=... cannot change on --resume (it would change the model or the "
                    f"steps already taken); allowed: {', '.join(RESUMABLE_OVERRIDES)}"
                )
        for option, given, recorded in (
            ("--data", args.data, info.data),
            ("--preset", args.preset, info.preset),
        ):
            if given is not None and given != recorded:
                raise UserError(
                    f"{out} was trained with {option} {recorded}; resume without {option} "
                    f"{given}, or start a new run with another --out"
                )
        config, train_cfg = apply_overrides(config, info.train, args.set)
        info.train = train_cfg
    else:
        config, train_cfg = apply_overrides(
            load_preset(preset), load_train_preset(preset), args.set
        )
        info = RunInfo(
            train=train_cfg,
            data=args.data or preset_data(preset),
            preset=preset,
            image_size=args.image_size,
            channels=args.channels,
        )
    train_set = _load_split(info.data, "train", _merge(info, args))
    test_set = _load_split(info.data, "test", _merge(info, args))
    context, device = distributed.setup(_device(args.device))
    trainer = Trainer(
        out,
        config,
        info,
        train_set,
        test_set,
        device=device,
        progress=not args.quiet,
        context=context,
    )
    say = print if context.is_main else (lambda *a, **k: None)
    try:
        if args.resume:
            trainer.resume()
            trainer.record_run_info()
            say(f"resuming {out} at step {trainer.step}/{info.train.max_steps}")
        else:
            trainer.start_new()
        n_params = trainer.model.num_parameters()
        procs = f", {context.world_size} processes" if context.active else ""
        say(
            f"training {info.preset or 'model'} ({n_params / 1e6:.2f}M parameters, "
            f"{config.attention}, {'x'.join(map(str, config.image_shape))}"
            f"{f', super-resolution x{config.scale}' if config.task == 'superres' else ''}"
            f"{', mixture of logistics' if config.per_pixel else ''}) on {info.data}: "
            f"{len(train_set)} train / {len(test_set)} test images, device {device}{procs}, "
            f"run folder {out}"
        )
        started = time.perf_counter()
        result = trainer.fit()
        minutes = (time.perf_counter() - started) / 60
        say(
            f"done: step {trainer.step}, {minutes:.1f} min; test bits/dim "
            f"{result.get('bits_per_dim', float('nan')):.4f}; samples {result.get('samples', '-')}"
        )
    finally:
        distributed.teardown(context)
    return 0


def _default_run_dir(preset: str, resume: bool) -> Path:
    """runs/PRESET, or the first free runs/PRESET-N so that a second run never clobbers one."""
    base = Path("runs") / preset
    if resume:
        return base
    candidate, n = base, 1
    while (candidate / "checkpoint.pt").exists():
        n += 1
        candidate = base.with_name(f"{preset}-{n}")
    return candidate


def _merge(info, args):
    """Data options of a resumed run come from run.json unless given again."""
    return argparse.Namespace(
        image_size=args.image_size if args.image_size is not None else info.image_size,
        channels=args.channels if args.channels is not None else info.channels,
        download=args.download,
    )


# eval ------------------------------------------------------------------------------------------
def _open_run(run_dir: str, device: torch.device):
    from .model import ImageTransformer

    model = ImageTransformer.from_pretrained(run_dir, map_location=device)
    model.eval()
    return model


def cmd_eval(args: argparse.Namespace) -> int:
    from .training import RunInfo, evaluate

    if args.batch_size < 1 or args.limit < 0:
        raise UserError("--batch-size must be at least 1 and --limit at least 0")
    device = _device(args.device)
    model = _open_run(args.run_dir, device)
    run = Path(args.run_dir)
    info = RunInfo.read(run) if (run / "run.json").is_file() else None
    spec = args.data or (info.data if info else None)
    if spec is None:
        raise UserError(f"{run} has no run.json: pass --data NAME|PATH")
    data_opts = _merge(info, args) if info else args
    dataset = _load_split(spec, args.split, data_opts)
    if tuple(dataset.shape) != tuple(model.config.image_shape):
        raise UserError(
            f"{spec} holds {'x'.join(map(str, dataset.shape))} images but the model takes "
            f"{'x'.join(map(str, model.config.image_shape))}: pass --image-size/--channels"
        )
    started = time.perf_counter()
    result = evaluate(
        model,
        dataset,
        batch_size=args.batch_size,
        max_images=args.limit,
        progress=not args.json,
        precision=args.precision,
    )
    if args.classify:
        result["classification"] = _classify(model, dataset, spec, info, args)
    if model.config.task == "superres" and args.sr_images > 0:
        from .superres import evaluate_superres

        result["superres"] = evaluate_superres(
            model,
            dataset,
            max_images=args.sr_images,
            temperatures=_temperatures(args.temperatures),
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.json,
        )
    result.update(split=args.split, data=spec, seconds=round(time.perf_counter() - started, 2))
    if args.json:
        print(json.dumps(result))
    else:
        per_channel = ", ".join(f"{v:.4f}" for v in result.get("bits_per_dim_per_channel", []))
        print(
            f"{spec} {args.split}: {result['bits_per_dim']:.4f} bits/dim over "
            f"{result['images']} images" + (f" (per channel: {per_channel})" if per_channel else "")
        )
        if "superres" in result:
            from .superres import psnr_summary

            c, h, w = model.config.low_res_shape
            print(
                f"(bits/dim of each image given its {h}x{w} area-downsampled copy); one sample "
                f"per image for {result['superres']['images']} images:"
            )
            print(psnr_summary(result["superres"]))
        if args.classify:
            c = result["classification"]
            print(
                f"generative classifier: accuracy {c['accuracy']:.4f} over {c['images']} images "
                f"({c['num_classes']} classes, chance {c['chance']:.4f})"
            )
    return 0


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--temperatures takes numbers like 0.8,0.9,1.0, got {text!r}") from None
    if not values or min(values) < 0:
        raise UserError(f"--temperatures takes numbers >= 0 like 0.8,0.9,1.0, got {text!r}")
    return values


def _classify(model, dataset, spec: str, info, args) -> dict:
    """Accuracy of argmax_y log p(y | x), with the class prior of the training split."""
    if dataset.labels is None:
        raise UserError(f"{spec} has no labels: --classify needs a labelled split")
    k = model.config.num_classes
    log_prior = None
    if info is not None:
        train_labels = _load_split(spec, "train", _merge(info, args)).labels
        if train_labels is not None:
            counts = torch.bincount(train_labels, minlength=k).double().clamp_min(1e-9)
            log_prior = torch.log(counts / counts.sum())
    n = len(dataset) if args.limit <= 0 else min(args.limit, len(dataset))
    correct = 0
    for start in range(0, n, args.batch_size):
        images, labels = dataset.batch(torch.arange(start, min(start + args.batch_size, n)))
        device = model.head.weight.device
        predicted = model.classify(images.to(device), log_prior).argmax(dim=1).cpu()
        correct += int((predicted == labels).sum())
    return {"accuracy": correct / n, "images": n, "num_classes": k, "chance": 1 / k}


# sample ----------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from .grid import save_grid

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError("--top-k must be >= 0 (0: off) and --top-p in (0, 1] (1: off)")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    device = _device(args.device)
    model = _open_run(args.run_dir, device)
    labels = None
    if model.config.num_classes:
        if args.label is None:
            labels = torch.arange(args.n, device=device) % model.config.num_classes
        else:
            labels = torch.full((args.n,), args.label, device=device)
    elif args.label is not None:
        raise UserError("--label given but this model is unconditional (num_classes=0)")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    with autocast(device, args.precision):
        images = model.sample(
            args.n,
            temperature=args.temperature,
            labels=labels,
            generator=generator,
            progress=True,
            top_k=args.top_k,
            top_p=args.top_p,
        )
    seconds = time.perf_counter() - started
    path = save_grid(images.cpu(), args.out)
    print(f"wrote {path} ({args.n} samples, {seconds:.1f} s)")
    if args.npy:
        np.save(args.npy, images.cpu().numpy())
        print(f"wrote {args.npy} (uint8 {list(images.shape)})")
    return 0


# complete --------------------------------------------------------------------------------------
def _read_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as uint8 [C, H, W] in the model's shape (centre crop, area resize)."""
    from PIL import Image, UnidentifiedImageError

    from .data.resize import pil_mode, square_resize

    c, h, w = shape
    if h != w:
        raise UserError(f"--image needs a square model, this one takes {h}x{w} images")
    try:
        with Image.open(path) as image:
            image = square_resize(image.convert(pil_mode(c)), h)
            array = np.asarray(image, dtype=np.uint8).reshape(h, w, c)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path} ({err}); give a PNG or JPEG file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def cmd_complete(args: argparse.Namespace) -> int:
    from .grid import save_grid
    from .training import RunInfo

    if args.n < 1 or args.count < 1:
        raise UserError("--n and --count must be at least 1")
    device = _device(args.device)
    model = _open_run(args.run_dir, device)
    shape = tuple(model.config.image_shape)
    labels = None
    if args.image:
        originals = _read_image(args.image, shape)[None]
    else:
        run = Path(args.run_dir)
        info = RunInfo.read(run)
        dataset = _load_split(info.data, args.from_split, _merge(info, args))
        picked = torch.arange(min(args.count, len(dataset)))
        originals, labels = dataset.batch(picked)
    if model.config.num_classes == 0:
        labels = None
    elif labels is None:
        raise UserError("this model is class-conditional: use --from-split (labels come along)")
    keep = model.keep_positions(args.keep)
    repeated = originals.repeat_interleave(args.n, dim=0).to(device)
    labels = None if labels is None else labels.repeat_interleave(args.n).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completions = model.complete(
        repeated,
        keep,
        temperature=args.temperature,
        labels=labels,
        generator=generator,
        progress=True,
    ).cpu()
    masked_in = torch.where(model.kept_mask(keep), originals, 128).to(torch.uint8)
    rows = [
        torch.cat(
            [originals[i : i + 1], masked_in[i : i + 1], completions[i * args.n : (i + 1) * args.n]]
        )
        for i in range(originals.shape[0])
    ]
    path = save_grid(torch.cat(rows), args.out, nrow=args.n + 2)
    print(
        f"wrote {path}: each row is the original, the kept part ({keep} of "
        f"{model.config.num_positions} positions, the rest grey) and {args.n} completions"
    )
    return 0


# upscale ---------------------------------------------------------------------------------------
def cmd_upscale(args: argparse.Namespace) -> int:
    from .grid import save_grid
    from .layout import area_downsample
    from .superres import superres_rows
    from .training import RunInfo

    if args.n < 1 or args.count < 1:
        raise UserError("--n and --count must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    device = _device(args.device)
    model = _open_run(args.run_dir, device)
    config = model.config
    if config.task != "superres":
        raise UserError(
            f"{args.run_dir} is not a super-resolution run (task={config.task}); train one with "
            "--task superres (e.g. --preset mnist_sr)"
        )
    truth = None
    if args.image:
        low_res, truth = _read_low_res(args.image, config)
    else:
        info = RunInfo.read(Path(args.run_dir))
        dataset = _load_split(info.data, args.from_split, _merge(info, args))
        truth, _ = dataset.batch(torch.arange(min(args.count, len(dataset))))
        low_res = area_downsample(truth, config.scale)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    samples = model.upscale(
        low_res.repeat_interleave(args.n, dim=0).to(device),
        temperature=args.temperature,
        generator=generator,
        progress=True,
    ).cpu()
    images, per_row = superres_rows(low_res, samples, config.scale, truth)
    path = save_grid(images, args.out, nrow=per_row)
    seconds = time.perf_counter() - started
    shown = "input (pixels repeated), samples" + (", truth" if truth is not None else "")
    print(f"wrote {path}: each row is {shown} ({samples.shape[0]} samples, {seconds:.1f} s)")
    if args.npy:
        np.save(args.npy, samples.numpy())
        print(f"wrote {args.npy} (uint8 {list(samples.shape)})")
    return 0


def _read_low_res(path: str, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input of `upscale --image`: an image of the input size is used as it is; one of the
    output size is area-downsampled (and shown as the truth); others are cropped and resized."""
    from PIL import Image, UnidentifiedImageError

    from .layout import area_downsample

    c, h, w = config.image_shape
    try:
        with Image.open(path) as image:
            size = image.size
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path} ({err}); give a PNG or JPEG file") from None
    if size == (w, h):
        truth = _read_image(path, config.image_shape)[None]
        return area_downsample(truth, config.scale), truth
    return _read_image(path, config.low_res_shape)[None], None


def cmd_presets(args: argparse.Namespace) -> int:
    for name, description in describe_presets():
        config = load_preset(name)
        shape = "x".join(map(str, config.image_shape))
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:16s} {shape:8s} {description}{mark}")
    return 0


# parser ----------------------------------------------------------------------------------------
def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help=DEVICE_HELP
    )


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", default="fp32", choices=tuple(PRECISIONS), help=PRECISION_HELP
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """How data is read (every verb that loads a data set) and where the model runs."""
    parser.add_argument("--image-size", type=int, help="resize images to this side")
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels"
    )
    parser.add_argument("--download", action="store_true", help="download the data set if missing")
    _add_device(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagetransformer",
        description="Image Transformer: train, evaluate (exact bits/dim) and sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (or --resume a run)")
    train.add_argument("--preset", help=f"default: {DEFAULT_PRESET}")
    train.add_argument(
        "--data",
        help="mnist5k (offline; the default of the mnist and tiny presets), cifar10, celeba, "
        "imagenet32, imagenet64 (the other presets' defaults), imagenet32_labelled, or a path "
        "(image folder, CIFAR-10 archive, CelebA folder, Downsampled ImageNet file)",
    )
    train.add_argument("--out", help="run folder (default: runs/PRESET, or runs/PRESET-N if taken)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model or training setting, e.g. --set num_layers=6",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_data_options(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        help="how attention is computed (same function): auto = dense for global attention, "
        "flex on CUDA, blocked elsewhere; flex has no backward on the CPU (falls back to blocked)",
    )
    train.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per step (global batch = batch_size x processes x this)",
    )
    train.add_argument("--precision", choices=tuple(PRECISIONS), help=PRECISION_HELP)
    train.add_argument(
        "--task",
        choices=("generate", "superres"),
        help="superres: learn p(image | its area-downsampled copy) with an encoder-decoder",
    )
    train.add_argument(
        "--scale", type=int, help="superres: the input is the image shrunk by this factor"
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward (no speed-up measured on CPU; try it on GPUs)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="exact bits/dim of a run on a data split")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=("train", "test"))
    ev.add_argument("--data", help="data set (default: the one the run trained on)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument(
        "--classify",
        action="store_true",
        help="also report the accuracy of the generative classifier (class-conditional models)",
    )
    ev.add_argument(
        "--sr-images",
        type=int,
        default=16,
        help="super-resolution runs: images upscaled for PSNR/SSIM/consistency (0: skip)",
    )
    ev.add_argument(
        "--temperatures",
        default="0.8,0.9,1.0",
        help="super-resolution runs: sampling temperatures (the paper's: 0.8,0.9,1.0)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the super-resolution samples")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    _add_data_options(ev)
    _add_precision(ev)
    ev.set_defaults(func=cmd_eval)

    sa = sub.add_parser("sample", help="sample images into a PNG grid")
    sa.add_argument("run_dir")
    sa.add_argument("--n", type=int, default=16)
    sa.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    sa.add_argument("--top-k", type=int, default=0, help="keep the k likeliest values (0: off)")
    sa.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--label", type=int, help="class to sample (class-conditional models)")
    sa.add_argument("--out", default="samples.png", help="PNG grid path")
    sa.add_argument("--npy", help="also save the uint8 array [n, C, H, W] here")
    _add_device(sa)
    _add_precision(sa)
    sa.set_defaults(func=cmd_sample)

    co = sub.add_parser("complete", help="keep the top of images, sample the rest")
    co.add_argument("run_dir")
    source = co.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file (resized to the model's size)")
    source.add_argument("--from-split", choices=("train", "test"), help="images of the run's data")
    co.add_argument("--count", type=int, default=4, help="images taken from --from-split")
    co.add_argument(
        "--keep",
        type=float,
        default=0.5,
        help="fraction kept, in whole rows (whole block rows for local_2d)",
    )
    co.add_argument("--n", type=int, default=4, help="completions per image")
    co.add_argument("--temperature", type=float, default=1.0)
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--out", default="completions.png")
    _add_data_options(co)
    co.set_defaults(func=cmd_complete)

    up = sub.add_parser("upscale", help="super-resolution: sample high-resolution images")
    up.add_argument("run_dir")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--image",
        help="a low-resolution image (an image of the output size is downsampled first)",
    )
    source.add_argument("--from-split", choices=("train", "test"), help="images of the run's data")
    up.add_argument("--count", type=int, default=4, help="images taken from --from-split")
    up.add_argument("--n", type=int, default=4, help="samples per input")
    up.add_argument("--temperature", type=float, default=0.9, help="0 = greedy")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--out", default="upscaled.png", help="PNG grid path")
    up.add_argument("--npy", help="also save the uint8 samples [count*n, C, H, W] here")
    _add_data_options(up)
    up.set_defaults(func=cmd_upscale)

    pr = sub.add_parser("presets", help="list the presets")
    pr.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"imagetransformer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nimagetransformer: interrupted; the last checkpoint is kept (train --resume "
            "continues from it)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
