"""The `imagetransformer` command: one module per verb, each parsing, calling the library and
printing. A new verb is a module with `add_parser(subparsers)` listed in `VERBS`."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import codec, complete, evaluate, ood, presets, sample, score, serve, study, train, upscale

VERBS = (train, evaluate, sample, complete, upscale, score, ood, codec, serve, study, presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagetransformer",
        description="Image Transformer: train, evaluate (exact bits/dim) and sample.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"imagetransformer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = (
            "; the last checkpoint is kept (train --resume continues from it)"
            if args.command == "train"
            else ""
        )
        print(f"\nimagetransformer: interrupted{kept}", file=sys.stderr)
        return 130


__all__ = ["VERBS", "build_parser", "main"]
