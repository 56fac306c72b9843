"""`imagetransformer serve`: the playground, a local web page to sample, complete and upscale
with a trained model while watching the images grow."""

from __future__ import annotations

import argparse

from ..web.server import require_web
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="the playground: a local web page around a model")
    p.add_argument("run_dir")
    common.add_server_options(p)
    common.add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_web()
    from ..web.playground import playground_app
    from ..web.server import run_server

    app = playground_app(args.run_dir, common.device(args.device))
    what = f"the playground of {args.run_dir}"
    run_server(app, args.host, args.port, what, on_stop=app.state.jobs.cancel_all)
    return 0
