"""Atomic saving and checked loading of weights, configs and training state.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed
over the target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .config import ImageTransformerConfig
from .errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_pretrained(model, directory: str | Path) -> None:
    directory = Path(directory)
    atomic_write_text(directory / CONFIG_FILE, model.config.to_json() + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, safetensors_save(state))


def read_config(directory: str | Path) -> ImageTransformerConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: pass a run directory made by `imagetransformer train` "
            "or a folder written by model.save_pretrained()"
        )
    try:
        return ImageTransformerConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path} is not a valid model config ({err})") from None


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu"):
    from .model import ImageTransformer

    config = read_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: the run has not saved weights yet")
    try:
        state = safetensors_load(path.read_bytes())
    except (SafetensorError, Exception) as err:
        raise UserError(
            f"{path} is corrupt or not a safetensors file ({err}); retrain or "
            "restore it from a backup"
        ) from None
    model = ImageTransformer(config)
    load_state_checked(model, state, path)
    return model.to(map_location)


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load weights, refusing by name any that do not fit this config."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:4])}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:4])}")
        if wrong:
            details.append(
                "shape mismatch "
                + ", ".join(
                    f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in wrong[:4]
                )
            )
        raise UserError(
            f"{source} does not match this model config ({'; '.join(details)}): it was saved "
            "from a different config; use the config.json it was saved with"
        )
    model.load_state_dict(state)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (tensors, numbers, strings, dicts, lists only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with `weights_only=True`: no code runs from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: nothing to resume; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint of this tool "
            f"({type(err).__name__}); delete it to start over, or restore a good copy"
        ) from None
