"""`imagetransformer train`: start a run from a preset, or continue one with --resume."""

from __future__ import annotations

import argparse
import time

from .. import distributed
from ..config import BACKEND_CHOICES, TASKS
from ..presets import DEFAULT_PRESET
from ..run import Run, default_run_dir, validation_strips_line, with_automatic_crops
from ..training import Stopped, Trainer
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (or --resume a run)")
    p.add_argument("--preset", help=f"default: {DEFAULT_PRESET}")
    p.add_argument(
        "--data",
        help="mnist5k (offline; the default of the mnist and tiny presets), cifar10, celeba, "
        "imagenet32, imagenet64 (the other presets' defaults), imagenet32_labelled, or a path "
        "(image folder, CIFAR-10 archive, CelebA folder, Downsampled ImageNet file)",
    )
    p.add_argument("--out", help="run folder (default: runs/PRESET, or runs/PRESET-N if taken)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model or training setting, e.g. --set num_layers=6",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--crops",
        type=int,
        help="a folder of photos larger than the model: cut this many random squares at random "
        "scales from every image instead of one resized copy each; validation holds out "
        "whole photos, or a strip of every photo when there are too few to spare",
    )
    common.add_data_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--attention-backend",
        choices=BACKEND_CHOICES,
        help="how attention is computed (same function): auto = dense for global attention, "
        "flex on CUDA, blocked elsewhere; flex has no backward on the CPU (falls back to blocked)",
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per step (global batch = batch_size x processes x this)",
    )
    common.add_precision(p, default=None)
    p.add_argument(
        "--task",
        choices=TASKS,
        help="superres: learn p(image | its area-downsampled copy) with an encoder-decoder",
    )
    p.add_argument(
        "--scale", type=int, help="superres: the input is the image shrunk by this factor"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward (off by default; no gain measured on a CPU: "
        "docs/results.md, Speed)",
    )
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> list[str]:
    """--set plus the flags that are shorthands for settings."""
    settings = list(args.set)
    for flag, key in (
        (args.precision, "precision"),
        ("true" if args.compile else None, "compile"),
        (args.attention_backend, "backend"),
        (args.grad_accum, "grad_accum"),
        (args.task, "task"),
        (args.scale, "scale"),
    ):
        if flag is not None:
            settings.append(f"{key}={flag}")
    return settings


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    options = common.data_options(args)
    crops_line = None
    if args.resume:
        out = args.out or default_run_dir(args.preset or DEFAULT_PRESET, resume=True)
        the_run = Run.resume(out, settings, data=args.data, preset=args.preset, crops=args.crops)
    else:
        options, crops_line = with_automatic_crops(args.data, options)
        the_run = Run.new(args.out, args.preset, settings, args.data, options)
    train_set, validation_set, test_set = the_run.load_training_splits(options)
    context, device = distributed.setup(common.device(args.device))
    say = print if context.is_main else (lambda *a, **k: None)
    if not args.resume and crops_line:
        say(crops_line)
    if not args.resume and the_run.info.validation_strips:
        say(validation_strips_line(the_run.info.train.validation_fraction))
    if not args.resume:  # a resumed run keeps the config it recorded
        took = the_run.take_few_images_settings(len(train_set), settings)
        if took:
            say(took)
    finished = False
    try:
        trainer = Trainer(
            the_run,
            train_set,
            test_set,
            device=device,
            progress=not args.quiet,
            context=context,
            validation_set=validation_set,
        )
        if args.resume and the_run.has_checkpoint:
            trainer.resume()
            trainer.record_run_info()
            say(f"resuming {the_run.path} at step {trainer.step}/{the_run.info.train.max_steps}")
        else:
            if args.resume:
                say(
                    f"{the_run.path} holds no checkpoint yet (stopped before the first one): "
                    "starting it again from step 0 with its recorded config"
                )
            trainer.start_new()
        procs = f", {context.world_size} processes" if context.active else ""
        size = trainer.model.num_parameters()
        held = len(validation_set) if validation_set is not None else 0
        say(the_run.describe(size, len(train_set), held, len(test_set), device) + procs)
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except Stopped as stop:
            finished = True  # every process stopped after the same step
            say(
                f"stopped by {stop.signal_name} at step {stop.step}: its checkpoint is written; "
                f"continue with: imagetransformer train --out {the_run.path} --resume"
            )
            return 128 + stop.signal_number
        minutes = (time.perf_counter() - started) / 60
        raw = result.get("bits_per_dim_raw_weights")
        averaged = f" (averaged weights; raw weights {raw:.4f})" if raw is not None else ""
        chosen = ""
        if "selected_step" in result:
            chosen = (
                f"; weights of step {result['selected_step']} (validation bits/dim "
                f"{result['validation_bits_per_dim']:.4f})"
            )
        say(
            f"done: step {trainer.step}, {minutes:.1f} min{chosen}; test bits/dim "
            f"{result.get('bits_per_dim', float('nan')):.4f}{averaged}; samples "
            f"{result.get('samples', '-')}"
        )
        finished = True
    finally:
        distributed.teardown(context, synchronize=finished)
    return 0
