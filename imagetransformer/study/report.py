"""What a study found: per condition and temperature, how often raters picked the model's sample
as the real photo (the fool rate; 50% means the two cannot be told apart), with a 95% Wilson
score interval, which stays inside [0, 1] and is honest for small counts and rates near 0."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes, atomic_write_text
from ..plotting import pyplot
from .stimuli import Manifest
from .store import Answer

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
CSV_COLUMNS = (
    "rater",
    "pair",
    "condition",
    "temperature",
    "image",
    "real_side",
    "choice",
    "picked_sample",
    "shown_at",
    "answered_at",
    "seconds",
)


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion; (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(manifest: Manifest, answers: Sequence[Answer]) -> dict[str, Any]:
    """Rows per (condition, temperature) in the study's order, then one per condition over its
    temperatures: answers, raters, fooled, fool rate and its interval."""
    rows = []
    groups = [(c, t) for c, t in manifest.cells] + [(c.name, None) for c in manifest.conditions]
    for condition, temperature in groups:
        chosen = [
            a
            for a in answers
            if a.condition == condition and (temperature is None or a.temperature == temperature)
        ]
        fooled = sum(a.picked_sample for a in chosen)
        low, high = wilson_interval(fooled, len(chosen))
        rows.append(
            {
                "condition": condition,
                "temperature": temperature if temperature is not None else "all",
                "answers": len(chosen),
                "raters": len({a.rater for a in chosen}),
                "fooled": fooled,
                "fool_rate": fooled / len(chosen) if chosen else None,
                "ci95": [low, high],
            }
        )
    return {
        "answers": len(answers),
        "raters": len({a.rater for a in answers}),
        "images": len(manifest.images),
        "conditions": [c.name for c in manifest.conditions],
        "temperatures": manifest.temperatures,
        "rows": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table for the terminal."""
    lines = [
        f"{summary['answers']} answers from {summary['raters']} raters "
        f"({summary['images']} images; fool rate = share of choices that picked the sample; "
        "50% = indistinguishable)",
        f"{'condition':<20} {'T':>5} {'answers':>8} {'raters':>7} {'fool rate':>10}  95% Wilson",
    ]
    for row in summary["rows"]:
        rate = "-" if row["fool_rate"] is None else f"{100 * row['fool_rate']:.1f}%"
        low, high = row["ci95"]
        lines.append(
            f"{row['condition']:<20} {row['temperature']!s:>5} {row['answers']:>8} "
            f"{row['raters']:>7} {rate:>10}  [{100 * low:.1f}%, {100 * high:.1f}%]"
        )
    return "\n".join(lines)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def write_csv(answers: Sequence[Answer], path: str | Path) -> Path:
    """Every answer, one row each, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for a in answers:
        writer.writerow(
            [
                a.rater,
                a.pair,
                a.condition,
                a.temperature,
                a.image,
                a.real_side,
                a.choice,
                int(a.picked_sample),
                _iso(a.shown_at),
                _iso(a.answered_at),
                f"{a.answered_at - a.shown_at:.3f}",
            ]
        )
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def write_plot(summary: dict[str, Any], path: str | Path) -> Path:
    """Fool rate against temperature, one line per condition with its 95% intervals (the
    `plots` extra)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for condition in summary["conditions"]:
        rows = [
            r
            for r in summary["rows"]
            if r["condition"] == condition and r["temperature"] != "all" and r["answers"]
        ]
        if not rows:
            continue
        x = [r["temperature"] for r in rows]
        y = [r["fool_rate"] for r in rows]
        below = [r["fool_rate"] - r["ci95"][0] for r in rows]
        above = [r["ci95"][1] - r["fool_rate"] for r in rows]
        axes.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, label=condition)
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="indistinguishable")
    axes.set_xlabel("temperature")
    axes.set_ylabel("fool rate (95% Wilson interval)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


__all__ = ["format_table", "summarise", "wilson_interval", "write_csv", "write_plot"]
