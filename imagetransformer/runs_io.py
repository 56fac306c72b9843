"""Opening what `train` writes: a run folder's model and its run record. The library's, so that
the command line and the web app both stand on it."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import ImageTransformer
from .run import RUN_FILE, Run


def open_model(run_dir: str | Path, where: torch.device) -> ImageTransformer:
    """The trained model of a run folder (or of a save_pretrained folder), in eval mode."""
    return ImageTransformer.from_pretrained(run_dir, map_location=where).eval()


def open_run(run_dir: str | Path) -> Run | None:
    """The run record of `run_dir`, or None for a bare save_pretrained folder."""
    run = Path(run_dir)
    return Run.open(run) if (run / RUN_FILE).is_file() else None
