"""Does a moving average of the weights (Polyak averaging) lower test bits/dim, and at what decay?

Trains one run of a preset (default: the CPU default `mnist_1d`, its full 2,000 steps) and keeps
several exponential moving averages of its weights side by side (the same steps, the same data),
then scores the raw weights and every average on the whole test split. Training is unchanged by
the averages, so the raw weights are exactly the run without EMA.

    .venv/bin/python benchmarks/ema.py [--preset mnist_1d] [--decays 0.99 0.995 0.999 0.9995]

Prints one table (and `--json PATH`); the figures are bits/dim, deterministic on a given CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from imagetransformer.evaluation import evaluate
from imagetransformer.run import Run
from imagetransformer.training import Trainer, ema_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist_1d")
    parser.add_argument("--decays", type=float, nargs="+", default=[0.99, 0.995, 0.999, 0.9995])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        run = Run.new(Path(folder) / "run", args.preset, [*args.set, "ema_decay=0"])
        train, test = run.load_split("train"), run.load_split("test")
        trainer = Trainer(run, train, test, progress=True)
        averages = {
            d: AveragedModel(trainer.model, multi_avg_fn=ema_update(d)) for d in args.decays
        }
        plain_step = trainer._train_step

        def step_and_average() -> dict[str, float]:
            metrics = plain_step()
            for average in averages.values():
                average.update_parameters(trainer.model)
            return metrics

        trainer._train_step = step_and_average
        trainer.start_new()
        started = time.perf_counter()
        raw = trainer.fit(log=False)["bits_per_dim"]
        minutes = (time.perf_counter() - started) / 60
        rows = {"raw weights": raw}
        for decay, average in averages.items():
            rows[f"EMA {decay}"] = evaluate(average.module, test)["bits_per_dim"]

    cpu = platform.processor() or platform.machine()
    print(
        f"\n{args.preset}, {run.info.train.max_steps} steps ({minutes:.1f} min), "
        f"test bits/dim over {len(test)} images; torch {torch.__version__}, {cpu}"
    )
    print("| weights | test bits/dim | vs raw |\n|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.4f} | {value - raw:+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "bits_per_dim": rows}))


if __name__ == "__main__":
    main()
