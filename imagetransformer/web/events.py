"""A job's events as a server-sent event stream, whose end cancels the job: the page that asked
for the images closed, stopped or lost its connection, and nobody will see the rest.

A comment goes out every `KEEP_ALIVE_S` while the job works between frames, so a connection
that died without a word is noticed at the next write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .generation import Job

KEEP_ALIVE_S = 1.0


async def _events(job: Job) -> AsyncIterator[str]:
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), KEEP_ALIVE_S)
        except asyncio.TimeoutError:
            yield ": working\n\n"
            continue
        yield event.encode()
        if event.last:
            return


class EventStream(StreamingResponse):
    """The events of `job`, `text/event-stream`; however the response ends (all sent, the
    client gone, the server stopping), the job is cancelled."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            _events(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


__all__ = ["KEEP_ALIVE_S", "EventStream"]
