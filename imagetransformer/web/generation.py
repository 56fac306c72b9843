"""A generation watched as it grows: a worker thread runs the sampler, turns the partial values
into a picture every couple of pixel rows and hands it to the event loop; cancelling the job
(its page went away) stops the sampler at its next step.

The sampler runs off the event loop so that the server keeps answering while it works, and each
job has its own thread so that two pages generate at once; `Jobs` caps how many run together,
since each one more slows every other down.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..grid import grid_png
from ..model import ImageTransformer

StepCallback = Callable[[int, torch.Tensor], None]
ROWS_PER_FRAME = 2  # a frame every two pixel rows' worth of steps, and the final one
NOT_YET = 128  # the grey of what is not generated yet (as `complete` shows what it samples)
OUTCOMES = ("done", "error", "cancelled")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """What a job runs: `draw(on_step)` calls one of the model's samplers, passing `on_step`
    through, and returns its uint8 images [n, C, H, W]."""

    model: ImageTransformer
    draw: Callable[[StepCallback], torch.Tensor]


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job: `frame`, then `done`, `error` or `cancelled` (the last
    one)."""

    kind: str
    data: dict[str, Any]

    @property
    def last(self) -> bool:
        return self.kind != "frame"

    def encode(self) -> str:
        return f"event: {self.kind}\ndata: {json.dumps(self.data)}\n\n"


class Busy(UserError):
    """Refused: as many jobs run as the server allows."""

    status = 503


class _Cancelled(Exception):
    """Raised from the sampler's `on_step` to stop a cancelled job."""


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def frame_interval(model: ImageTransformer) -> int:
    """Steps between frames: `ROWS_PER_FRAME` pixel rows of generation steps."""
    rows = model.config.image_shape[1]
    return max(1, model.config.num_positions // rows * ROWS_PER_FRAME)


def partial_images(model: ImageTransformer, steps_done: int, values: torch.Tensor) -> torch.Tensor:
    """The images the first `steps_done` steps of `values` make, the rest grey."""
    images = model.from_steps(values).cpu()
    return torch.where(model.kept_mask(steps_done), images, NOT_YET).to(torch.uint8)


class Job:
    """One generation on its own worker thread. Its events arrive on `events`, a queue of the
    event loop that made the job; `cancel` stops the sampler within one step."""

    def __init__(
        self,
        generation: Generation,
        loop: asyncio.AbstractEventLoop,
        finished: Callable[[Job, str], None],
    ) -> None:
        self.generation = generation
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.total = generation.model.config.num_positions
        self.steps_done = 0
        self._every = frame_interval(generation.model)
        self._loop = loop
        self._finished = finished
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._work, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _on_step(self, steps_done: int, values: torch.Tensor) -> None:
        if self._cancelled.is_set():
            raise _Cancelled
        self.steps_done = steps_done
        if steps_done % self._every == 0 and steps_done < self.total:
            self._send_frame(partial_images(self.generation.model, steps_done, values))

    def _send_frame(self, images: torch.Tensor) -> None:
        image = png_data_url(grid_png(images))
        self._send("frame", {"step": self.steps_done, "total": self.total, "image": image})

    def _work(self) -> None:
        started = time.perf_counter()
        outcome = "error"
        try:
            images = self.generation.draw(self._on_step)
            self._send_frame(images.cpu())
            self._send("done", {"seconds": round(time.perf_counter() - started, 3)})
            outcome = "done"
        except _Cancelled:  # the page is gone, or the server stops: the stream may end
            self._send("cancelled", {"steps": self.steps_done})
            outcome = "cancelled"
        except UserError as err:
            self._send("error", {"message": str(err)})
        except Exception as err:  # a bug, or out of memory: one line for the page, all in the log
            log.exception("a generation failed")
            self._send("error", {"message": f"the generation failed ({type(err).__name__}: {err})"})
        finally:
            self._finished(self, outcome)

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, data))
        except RuntimeError:  # the event loop has closed: the server is stopping
            self.cancel()


class Jobs:
    """The jobs that run, at most `limit` at once, and how those that ended did."""

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._running: set[Job] = set()
        self._ended = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()

    def start(self, generation: Generation) -> Job:
        """A started job for `generation`, or Busy. Call on the event loop."""
        job = Job(generation, asyncio.get_running_loop(), self._finished)
        with self._lock:
            if len(self._running) >= self.limit:
                raise Busy(
                    f"{self.limit} generations are running already, the most this server runs "
                    "at once: wait for one to finish, or stop one"
                )
            self._running.add(job)
        job.start()
        return job

    def cancel_all(self) -> None:
        """Stop every running job (the server is stopping)."""
        with self._lock:
            running = list(self._running)
        for job in running:
            job.cancel()

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._running), "limit": self.limit, **self._ended}

    def _finished(self, job: Job, outcome: str) -> None:
        with self._lock:
            self._running.discard(job)
            self._ended[outcome] += 1


__all__ = ["Busy", "Event", "Generation", "Job", "Jobs", "frame_interval", "partial_images"]
