"""What both web apps share: the extra's import check, fixed-list static assets, response
headers, and running uvicorn on a socket bound here (so a busy port is one clear line)."""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from starlette.routing import Route

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Pages load scripts and styles from this server only; images may also be data: URLs (frames).
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
}


def require_web() -> None:
    """Refuse, in one line, to serve without the `web` extra."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"the web app needs the web extra ({err.name} is missing): "
            "pip install 'imagetransformer[web]'"
        ) from None


def static_assets(app: str) -> dict[str, Path]:
    """The files an app may send, by name: its own in `static/` (`APP.html`, `APP.js`, ...)."""
    return {
        path.name: path
        for path in sorted(STATIC_DIR.iterdir())
        if path.is_file()
        and path.stem == app
        and path.suffix in _MEDIA_TYPES
        and re.fullmatch(r"[\w.-]+", path.name)
    }


def asset_routes(app: str) -> list[Route]:
    """`/static/NAME` for the names of `static_assets(app)` only, read once; anything else,
    another app's files included, is 404."""
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    assets = {
        name: (path.read_bytes(), _MEDIA_TYPES[path.suffix])
        for name, path in static_assets(app).items()
    }

    async def asset(request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return PlainTextResponse("Not Found", status_code=404)
        body, media_type = found
        return Response(body, media_type=media_type)

    return [Route("/static/{name}", asset, methods=["GET"])]


def page(name: str):
    """An endpoint that sends the HTML page `static/NAME`."""
    from starlette.responses import HTMLResponse

    body = (STATIC_DIR / name).read_bytes()

    async def endpoint(request) -> HTMLResponse:
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    return endpoint


class SecurityHeaders:
    """ASGI middleware: every response gets the headers above (no sniffing, no framing,
    same-origin assets), streaming ones included."""

    def __init__(self, app) -> None:
        self.app = app
        self.extra = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.extra if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line that says why not and what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"cannot resolve --host {host} ({err}); use e.g. 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror}); pick another --port "
            "(0 picks a free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(app, host: str, port: int, what: str, on_stop: Callable[[], None] | None = None):
    """Serve `app` until Ctrl-C or SIGTERM, saying where (the real port when --port 0).

    `on_stop` runs as soon as the stop is asked for: uvicorn waits for open responses to end,
    so an app with long streams ends them there.
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if on_stop is not None:
                on_stop()
            super().handle_exit(sig, frame)

    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {host} makes {what} reachable from other machines", file=sys.stderr)
    print(f"serving {what} at http://{shown}:{bound_port}/ (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the caught Ctrl-C again once it has stopped
        pass
    print(f"stopped serving {what}", flush=True)


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "SecurityHeaders",
    "asset_routes",
    "page",
    "require_web",
    "run_server",
    "static_assets",
]
