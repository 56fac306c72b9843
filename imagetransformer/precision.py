"""Mixed precision through autocast: one place that maps `fp32|bf16|fp16` to a context.

Likelihoods are always reduced in float32 (see `outputs.py`), whatever the compute
precision. On CPUs without bf16 hardware, bf16 autocast was ~10x slower than fp32 (measured on
the development machine), so fp32 stays the default everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "mps" and precision == "bf16":
        raise UserError("bf16 autocast is not supported on MPS; use --precision fp16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (its gradients underflow without one); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype that matrix products on `device` compute in here: autocast's when it is on
    for that device type, else `default`."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default
