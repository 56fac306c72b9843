"""The study's web page: a rater reads a short instruction, then judges pairs one click at a
time; every answer is committed to the study's SQLite file before the next pair is sent.

Routes: `/` (the page), `/static/NAME` (its script and style), `/stimulus/ADDRESS` (an image of
a rater's pair, at an address of that rater, pair and side only; sent without dates or names),
`/api/study`, `/api/raters` (POST: a new rater and their assignment), `/api/next?rater=`,
`/api/answer` (POST JSON {rater, pair, choice}, at most 4 KB).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import UserError
from ..study.stimuli import Manifest
from ..study.store import AnswerStore, Refused, Shown
from .server import SecurityHeaders, asset_routes, limited_body, page, quiet_disconnect

_NO_STORE = {"Cache-Control": "no-store"}
_MAX_BODY = 4096  # an answer is a few dozen bytes
_BODY_SECONDS = 5.0  # ... and arrives with its headers
_HOW = 'send JSON {"rater": ..., "pair": ..., "choice": "left"|"right"}'


def _refusal(message: str, status: int, close: bool = False) -> JSONResponse:
    headers = {**_NO_STORE, **({"Connection": "close"} if close else {})}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(UserError):
    status = 413

    def __init__(self) -> None:
        super().__init__(f"the answer is over the {_MAX_BODY}-byte limit: {_HOW}")


class Addresses:
    """Each rater's own address for each image of each of their pairs, so that two raters'
    addresses never tell that they were shown the same file (the real image of a source image
    is the same file in every pair of it). An address is an HMAC of (rater, pair, side) under
    a secret of this server process: the same while the server runs (a reloaded page finds its
    images), new after a restart, and useless to guess. The server keeps the latest `keep`
    addresses it gave out, each mapped to its stimulus token."""

    def __init__(self, keep: int = 100_000) -> None:
        self.keep = keep
        self._secret = secrets.token_bytes(32)
        self._tokens: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def address(self, rater: str, shown: Shown, side: str) -> str:
        token = shown.left if side == "left" else shown.right
        message = "\0".join((rater, shown.pair.id, side)).encode()
        address = hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]
        with self._lock:
            self._tokens[address] = token
            self._tokens.move_to_end(address)
            while len(self._tokens) > self.keep:
                self._tokens.popitem(last=False)
        return address

    def token(self, address: str) -> str | None:
        with self._lock:
            return self._tokens.get(address)


def study_app(study_dir: str | Path) -> Starlette:
    """The ASGI app of one study folder (its manifest is checked when the app is made)."""
    study_dir = Path(study_dir)
    manifest = Manifest.read(study_dir)
    store = AnswerStore(study_dir, manifest)
    addresses = Addresses()
    info = {
        "images_per_rater": len(manifest.images),
        "display_scale": manifest.display_scale,
        "display_method": "nearest-neighbour",
        "image_size": list(manifest.image_shape[1:]),
    }

    def study(request: Request) -> Response:
        return JSONResponse(info, headers=_NO_STORE)

    def pair_json(rater: str, shown: Shown | None, done: int, total: int) -> dict:
        if shown is None:
            return {"finished": True, "done": done, "total": total}
        return {
            "finished": False,
            "pair": shown.pair.id,
            "left": f"/stimulus/{addresses.address(rater, shown, 'left')}",
            "right": f"/stimulus/{addresses.address(rater, shown, 'right')}",
            "done": done,
            "total": total,
        }

    def stimulus(request: Request) -> Response:
        token = addresses.token(request.path_params["address"])
        if token is None:
            return PlainTextResponse("Not Found", status_code=404)
        body = Manifest.stimulus_path(study_dir, token).read_bytes()
        return Response(body, media_type="image/png", headers={"Cache-Control": "private"})

    def new_rater(request: Request) -> Response:
        token = store.new_rater()
        return JSONResponse({"rater": token}, headers=_NO_STORE)

    def next_pair(request: Request) -> Response:
        rater = request.query_params.get("rater", "")
        try:
            shown = store.next_pair(rater)
            done, total = store.progress(rater)
        except Refused as err:
            return _refusal(str(err), err.status)
        return JSONResponse(pair_json(rater, shown, done, total), headers=_NO_STORE)

    async def answer(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return _refusal(f"the answer is {kind or 'untyped'}: {_HOW}", 415, close=True)
        try:
            body = await limited_body(request, _MAX_BODY, _TooLarge, _BODY_SECONDS).body()
        except UserError as err:
            return _refusal(str(err), getattr(err, "status", 400), close=True)
        try:
            given = json.loads(body)
            rater, pair, choice = given["rater"], given["pair"], given["choice"]
        except (ValueError, KeyError, TypeError):
            return _refusal(_HOW, 400)

        def commit_then_next() -> dict:
            store.answer(rater, pair, choice)  # committed before anything is sent back
            shown = store.next_pair(rater)
            return pair_json(rater, shown, *store.progress(rater))

        try:
            return JSONResponse(await run_in_threadpool(commit_then_next), headers=_NO_STORE)
        except Refused as err:
            return _refusal(str(err), err.status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    return Starlette(
        routes=[
            Route("/", page("study.html"), methods=["GET"]),
            *asset_routes("study"),
            Route("/stimulus/{address}", stimulus, methods=["GET"]),
            Route("/api/study", study, methods=["GET"]),
            Route("/api/raters", new_rater, methods=["POST"]),
            Route("/api/next", next_pair, methods=["GET"]),
            Route("/api/answer", answer, methods=["POST"]),
        ],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={ClientDisconnect: quiet_disconnect},
        lifespan=lifespan,
    )


__all__ = ["Addresses", "study_app"]
