"""`imagetransformer presets`: list the named configs."""

from __future__ import annotations

import argparse

from ..presets import DEFAULT_PRESET, describe_presets, load_preset


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name, description in describe_presets():
        config = load_preset(name)
        shape = "x".join(map(str, config.image_shape))
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:16s} {shape:8s} {description}{mark}")
    return 0
