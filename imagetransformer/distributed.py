"""Multi-process training on PyTorch's own machinery: torchrun sets the environment, DDP syncs.

`torchrun --nproc_per_node N -m imagetransformer train ...` starts N copies; each calls
`setup()`, which joins the process group (NCCL on CUDA, gloo on CPU) from torchrun's variables.
Without them everything runs as a single process and nothing here does any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, checkpoints and sample grids."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = Context()


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group that torchrun describes, if any; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank), device


def all_reduce_sum(tensor: torch.Tensor, context: Context) -> torch.Tensor:
    """Sum `tensor` over all processes (in place); a no-op for a single process."""
    if context.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any, context: Context) -> list[Any] | None:
    """Every process's `obj`, in rank order, on the main process (None elsewhere).

    For per-process state that only rank 0 writes to disk (the RNG states of a checkpoint).
    Every process must call it: it is a collective.
    """
    if not context.active:
        return [obj]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def barrier(context: Context) -> None:
    if context.active:
        dist.barrier()


def teardown(context: Context, synchronize: bool = False) -> None:
    """Leave the process group. `synchronize` (the normal end of a job): first wait until every
    process is here, so that none destroys the group while another still has a collective in
    flight (with gloo that aborted a worker now and then). On an error path, leave at once: the
    other processes may never arrive, and torchrun stops them when this one exits."""
    if context.active and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
