"""`imagetransformer study create|serve|report`: the paper's human evaluation of
super-resolution (raters pick the real photo of a pair; the fool rate is how often they pick
the model's sample)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from ..study.report import format_table, summarise, write_csv, write_plot
from ..study.stimuli import Condition, Manifest, check_condition_name, create_study
from ..study.store import read_answers
from ..superres import TEMPERATURES
from . import common


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="human study of super-resolution samples")
    verbs = p.add_subparsers(dest="study_command", required=True)

    create = verbs.add_parser("create", help="draw the stimuli once and write a study folder")
    create.add_argument(
        "runs",
        nargs="+",
        metavar="[NAME=]SR_RUN",
        help="super-resolution run folders, each a condition (named after its folder unless "
        "given as NAME=RUN_DIR)",
    )
    create.add_argument("--data", help="data set or path (default: the first run's own)")
    common.add_split(create)
    create.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=list(TEMPERATURES),
        help="one sample per image at each (default: the paper's 0.8 0.9 1.0)",
    )
    create.add_argument("--images", type=int, default=50, help="images drawn from the split")
    create.add_argument("--seed", type=int, default=0, help="which images, and the samples")
    create.add_argument("--batch-size", type=int, default=16)
    create.add_argument("--out", required=True, help="the study folder (new or empty)")
    common.add_data_options(create)
    create.set_defaults(func=run_create)

    serve = verbs.add_parser("serve", help="serve the study to raters (local web app)")
    serve.add_argument("study_dir")
    common.add_server_options(serve)
    serve.set_defaults(func=run_serve)

    report = verbs.add_parser("report", help="fool rates with 95%% Wilson intervals, a CSV")
    report.add_argument("study_dir")
    report.add_argument("--json", action="store_true", help="print the summary as JSON")
    report.add_argument("--csv", help="where to write every answer (default STUDY_DIR/answers.csv)")
    report.add_argument("--plot", help="also plot fool rate against temperature to this PNG")
    report.set_defaults(func=run_report)


def _conditions(specs: list[str]) -> list[tuple[str, str]]:
    """(name, run folder) of each RUN_DIR (named after the folder) or NAME=RUN_DIR."""
    named = []
    for spec in specs:
        name, _, path = ("", "", spec) if Path(spec).is_dir() else spec.partition("=")
        if not path:  # no '=' and no such folder: open_model says so
            name, path = "", spec
        named.append((check_condition_name(name or Path(path).resolve().name), path))
    return named


def run_create(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    device = common.device(args.device)
    runs = []
    conditions = _conditions(args.runs)
    for name, path in conditions:
        model = common.open_model(path, device)
        if model.config.task != "superres":
            raise UserError(
                f"{path} is not a super-resolution run (task={model.config.task}): a study "
                "compares upscaled samples with the truth (train one with --preset mnist_sr)"
            )
        the_run = common.open_run(path)
        preset = the_run.info.preset if the_run else None
        runs.append((Condition(name, str(Path(path).resolve()), model.config.scale, preset), model))
    args.run_dir = conditions[0][1]  # whose data and conversion the study takes by default
    shape = tuple(runs[0][1].config.image_shape)
    spec, options, the_run = common.data_for_run(args, args.data, shape)
    split = common.choose_split(args.split, spec, the_run)
    dataset = common.load_split(spec, options, split, the_run)
    for condition, model in runs:
        try:
            common.check_data_fits(model.config, dataset, training=False)
        except UserError as err:
            raise UserError(f"condition {condition.name}: {err}") from None
    manifest = create_study(
        args.out,
        runs,
        dataset,
        data=spec,
        split=split,
        temperatures=args.temperatures,
        count=args.images,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
    )
    print(
        f"wrote {args.out}: {len(manifest.images)} images of {common.describe_split(spec, split)}, "
        f"{len(manifest.pairs)} pairs ({len(runs)} condition{'s' * (len(runs) > 1)} x "
        f"{len(manifest.temperatures)} temperatures); each rater judges one pair per image "
        f"(serve it with: imagetransformer study serve {args.out})"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from ..web.server import require_web, run_server

    require_web()
    from ..web.study import study_app

    run_server(study_app(args.study_dir), args.host, args.port, f"the study {args.study_dir}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    manifest = Manifest.read(args.study_dir)
    answers = read_answers(args.study_dir, manifest)
    summary = summarise(manifest, answers)
    csv_path = write_csv(answers, args.csv or Path(args.study_dir) / "answers.csv")
    written = [str(csv_path)]
    if args.plot:
        written.append(str(write_plot(summary, args.plot)))
    if args.json:
        print(json.dumps({**summary, "written": written}))
    else:
        print(format_table(summary))
        print("wrote " + ", ".join(written))
    return 0
