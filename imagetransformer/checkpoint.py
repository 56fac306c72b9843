"""Atomic saving and checked loading of weights, configs and training state.

Every write goes through `files.py` (re-exported here: `atomic_write_bytes`,
`atomic_write_text`): a fsynced temporary file renamed over the target, then a fsynced folder,
with the permissions a plain `open()` gives. A failed write raises a `files.WriteError` that
names the file and says what is intact; a training checkpoint's adds that `--resume` continues
from the intact one.

Training checkpoints keep one older copy, `checkpoint.prev.pt`, beside `checkpoint.pt`:
`load_checkpoint` falls back to it when `checkpoint.pt` is missing or corrupt.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .config import ImageTransformerConfig
from .errors import UserError
from .files import (  # noqa: F401 (atomic writes and current_umask: re-exported API)
    WriteError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    fsync_dir,
)
from .files import replace as _replace
from .files import write_temp as _write_temp

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"

# What a failed write of a training checkpoint adds: the intact one is there to be resumed.
RESUME_ADVICE = "`imagetransformer train --resume` continues from it"


# Pretrained weights ----------------------------------------------------------------------------
def save_pretrained(
    model: Any, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write `config.json` (from `model.config`) and `model.safetensors` into `directory`.

    `model` is anything with `.config` and `.state_dict()`; `state_dict`, when given, is saved
    instead of `model.state_dict()` (e.g. averaged EMA weights of the same model).
    """
    directory = Path(directory)
    if state_dict is None:
        state_dict = model.state_dict()
    atomic_write_text(directory / CONFIG_FILE, model.config.to_json() + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
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


def read_pretrained(
    directory: str | Path,
) -> tuple[ImageTransformerConfig, dict[str, torch.Tensor]]:
    """Read `config.json` and `model.safetensors` from `directory` (CPU tensors).

    Build the model with `ImageTransformer(config)` and check the weights into it with
    `load_state_checked(model, state, WEIGHTS_FILE path)`.
    """
    config = read_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: the run has not saved weights yet")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        state = safetensors_load(data)
    except (SafetensorError, Exception) as err:
        raise UserError(
            f"{path} is corrupt or not a safetensors file ({err}); retrain or "
            "restore it from a backup"
        ) from None
    return config, state


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


# Training checkpoints --------------------------------------------------------------------------
class _ChecksumError(Exception):
    """A member of a checkpoint archive does not match its stored CRC-32 (torch.load won't say)."""


def previous_checkpoint_path(path: str | Path) -> Path:
    """Where the older copy of the checkpoint `path` lives: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _check_archive(path: Path) -> None:
    """Raise if `path`, a torch zip archive, is truncated or has a member with a bad CRC-32."""
    if not zipfile.is_zipfile(path):
        raise zipfile.BadZipFile("not a zip archive")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise _ChecksumError(f"checksum mismatch in {bad}")


def _is_sound(path: Path) -> bool:
    try:
        _check_archive(path)
    except Exception:
        return False
    return True


def _keep_as_previous(path: Path, previous: Path) -> None:
    """Atomically make `previous` a copy of `path`, leaving `path` in place throughout.

    A hard link costs no space or time; where the filesystem has none, the bytes are copied into a
    fsynced temporary file that is then renamed over `previous`.
    """
    link = previous.with_name(f".{previous.name}.{os.urandom(6).hex()}.tmp")
    try:
        os.link(path, link)
    except OSError:
        with open(path, "rb") as src:
            tmp = _write_temp(previous, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        _replace(tmp, previous)
    else:
        _replace(link, previous)


def save_checkpoint(
    path: str | Path, state: dict[str, Any], previous_step: int | None = None
) -> None:
    """Atomically write a training checkpoint (tensors, numbers, strings, dicts, lists only).

    The checkpoint already at `path` is kept as `checkpoint.prev.pt` beside it. Order: the new
    checkpoint is written and fsynced to a temporary file; the current one is hard-linked (or
    copied) to the previous-copy name, atomically; the temporary file is renamed over `path`. So a
    good checkpoint exists under one of the two names at every instant, and `path` never
    disappears. A current file that is already corrupt is not rotated, so it cannot replace a
    good previous copy.

    `previous_step` is the step of the checkpoint already on disk (None: unknown or none). On a
    failed write (e.g. a full disk) a `UserError` says that this checkpoint is intact, and no
    temporary file is left behind.
    """
    path = Path(path)
    previous = previous_checkpoint_path(path)
    if previous_step is None:
        intact = "the previous checkpoint, if any, is intact"
    else:
        intact = f"the checkpoint of step {previous_step} is intact"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    try:
        tmp = _write_temp(path, lambda f: f.write(data))
    except OSError as err:
        raise WriteError.of(path, err, intact).advise(RESUME_ADVICE) from err
    try:
        if _is_sound(path):
            _keep_as_previous(path, previous)
            fsync_dir(path.parent)  # the older copy is durable before the current one changes
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError.of(previous, err, intact).advise(RESUME_ADVICE) from err
        raise
    try:
        _replace(tmp, path)
    except OSError as err:
        raise WriteError.of(path, err, intact).advise(RESUME_ADVICE) from err
    fsync_dir(path.parent)


def _read_checkpoint(path: Path) -> Any:
    """torch.load with `weights_only=True` (no code runs from the file), after a CRC check."""
    if zipfile.is_zipfile(path):  # torch.load does not verify the archive's checksums
        _check_archive(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _why(err: Exception) -> str:
    return str(err) if isinstance(err, _ChecksumError) else type(err).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with `weights_only=True`: no code runs from the file.

    When `path` is missing or corrupt and its older copy (`checkpoint.prev.pt`) loads, that copy
    is returned, with a warning that names both files and its step.
    """
    path = Path(path)
    previous = previous_checkpoint_path(path)
    error: Exception | None = None
    if path.is_file():
        try:
            return _read_checkpoint(path)
        except Exception as err:  # torch raises several types for truncated or foreign files
            error = err
    problem = "missing" if error is None else f"corrupt ({_why(error)})"
    if not previous.is_file():
        if error is None:
            raise UserError(f"no checkpoint at {path}: nothing to resume; start without --resume")
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint of this tool ({_why(error)}); "
            "delete it to start over, or restore a good copy"
        )
    try:
        state = _read_checkpoint(previous)
    except Exception as err:
        raise UserError(
            f"checkpoint {path} is {problem} and its older copy {previous} is corrupt or not a "
            f"checkpoint of this tool ({_why(err)}); delete both to start over, or restore a "
            "good copy"
        ) from None
    step = state.get("step", "unknown") if isinstance(state, dict) else "unknown"
    warnings.warn(
        f"checkpoint {path} is {problem}; loading the older copy {previous} (step {step}) instead",
        stacklevel=2,
    )
    return state
