"""What both web apps share: the extra's import check, fixed-list static assets, response
headers, the guard against DNS rebinding and cross-site requests, request bodies read with a
size cap and a time limit, and running uvicorn on a socket bound here (so a busy port is one
clear line) with idle connections closed and SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.routing import Route
    from starlette.types import Message

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # always answered: this machine's names
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")  # --host values that listen on every address
IDLE_TIMEOUT_S = 5  # a connection with no whole request line and headers this long is closed
BODY_IDLE_S = 5.0  # a request body that stalls this long is refused (408)
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


def _host_name(header: str) -> str:
    """The host of a Host header, lower case and without its port; IPv6 stays in brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


def _is_address(name: str) -> bool:
    """Whether `name` is an IP address (IPv6 in brackets or not), not a DNS name."""
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: answer only requests that name this server, and only its own page's
    requests where they change state or start work.

    DNS rebinding: a hostile page whose name is made to resolve to this machine is same-origin
    with this server for the browser, but its requests carry its own name in `Host`; only the
    names the server was started for are answered (127.0.0.1, localhost, [::1] and `--host`;
    when `--host` listens on every address, also any IP address and this machine's name, which
    a hostile page cannot be served under). Cross-site: a request that is not a GET or HEAD, or
    that is under `/api/` (new raters, pairs, answers, generations, uploads), is refused when
    its `Origin` is not this server's own or its `Sec-Fetch-Site` says another site sent it.
    Clients that send neither (curl, scripts) are not browsers acting for a page, and pass.
    """

    def __init__(self, app, host: str) -> None:
        self.app = app
        bound = host.strip().lower()
        if ":" in bound and not bound.startswith("["):
            bound = f"[{bound}]"
        self.any_address = bound in _WILDCARDS
        extra = _machine_names() if self.any_address else [bound]
        self.names = [name for name in dict.fromkeys([*LOCAL_HOSTS, *extra]) if name]

    def allows(self, name: str) -> bool:
        return name in self.names or (self.any_address and _is_address(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = _host_name(host)
        port = (scope.get("server") or ("", DEFAULT_PORT))[1]
        if not self.allows(name):
            shown = ", ".join(self.names) + (" or an IP address" if self.any_address else "")
            return await _refuse(
                send,
                421,
                f"this server answers to {shown}, not to {name or 'a request without Host'!r}: "
                f"open http://127.0.0.1:{port}/ (or start it with --host {name or 'NAME'})",
            )
        checked = scope["method"] not in ("GET", "HEAD") or scope["path"].startswith("/api/")
        own = f"{scope.get('scheme', 'http')}://{host}".lower()
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        if checked and (
            (origin is not None and origin.lower() != own)
            or (site is not None and site not in ("same-origin", "none"))
        ):
            return await _refuse(
                send,
                403,
                f"refused a request from another site ({origin or site}): this server takes "
                f"requests from its own page only, {own}/",
            )
        await self.app(scope, receive, send)


def _machine_names() -> list[str]:
    names = []
    for find in (socket.gethostname, socket.getfqdn):
        try:
            names.append(find().lower())
        except OSError:
            pass
    return names


async def _refuse(send, status: int, message: str) -> None:
    """Send a refusal, JSON `{"error": one line}`, and close the connection."""
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTimeout(UserError):
    """Refused: the request body stopped arriving."""

    status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the request body did not arrive in time (nothing for {seconds:g} s, or not all of "
            "it in time): check the connection and send it again"
        )


def limited_body(
    request: Request,
    limit: int,
    too_large: Callable[[], Exception],
    seconds: float,
    idle: float = BODY_IDLE_S,
) -> Request:
    """`request`, its body refused as soon as it says or shows that it is over `limit` bytes
    (`too_large()` is raised), or when it stalls for `idle` seconds or is not all there
    `seconds` after this call (BodyTimeout). A client that goes away mid-body raises
    Starlette's ClientDisconnect, which `quiet_disconnect` answers without a traceback."""
    from starlette.requests import Request

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    return Request(request.scope, _limited(request.receive, limit, too_large, seconds, idle))


def _limited(
    receive: Callable[[], Awaitable[Message]],
    limit: int,
    too_large: Callable[[], Exception],
    seconds: float,
    idle: float,
) -> Callable[[], Awaitable[Message]]:
    seen = 0
    deadline = time.monotonic() + seconds

    async def receive_limited() -> Message:
        nonlocal seen
        wait = min(idle, deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(receive(), max(wait, 0.0))
        except asyncio.TimeoutError:
            raise BodyTimeout(min(idle, seconds)) from None
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large()
        return message

    return receive_limited


async def quiet_disconnect(request: Request, err: Exception):
    """The handler of Starlette's ClientDisconnect: the client is gone, nothing to log."""
    from starlette.responses import Response

    return Response(status_code=400, headers={"Connection": "close"})


def _protocol():
    """uvicorn's h11 protocol, but a connection is closed when it has not sent a whole request
    line and headers `IDLE_TIMEOUT_S` after it opened or after its last response: idle and
    trickling (slowloris) connections do not stay open. uvicorn's own keep-alive timer is reset
    by every byte received, so it closes neither."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _idle_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._idle_timer = self.loop.call_later(IDLE_TIMEOUT_S, self._idle_too_long)

        def _disarm(self) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _idle_too_long(self) -> None:
            self._idle_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request line and headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._arm()
            super().on_response_complete()

    return Protocol


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
    """Serve `app` behind `Guard` until Ctrl-C or SIGTERM (the same: a clean stop, one line,
    exit 0), saying where (the real port when --port 0).

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
    config = uvicorn.Config(
        Guard(app, host),
        http=_protocol(),
        timeout_keep_alive=IDLE_TIMEOUT_S,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    # uvicorn catches SIGINT and SIGTERM, stops, then raises the signal again with the handler
    # that was there before: for SIGTERM that was "die" (exit -15, no last line). With Ctrl-C's
    # handler in its place, both end as a KeyboardInterrupt, caught here.
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, terminate)
    print(f"stopped serving {what}", flush=True)


__all__ = [
    "BODY_IDLE_S",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "IDLE_TIMEOUT_S",
    "LOCAL_HOSTS",
    "BodyTimeout",
    "Guard",
    "SecurityHeaders",
    "asset_routes",
    "limited_body",
    "quiet_disconnect",
    "page",
    "require_web",
    "run_server",
    "static_assets",
]
