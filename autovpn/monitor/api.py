"""The control API: a small HTTP/1.1 server on loopback that the CLI and browsers talk to.

    GET  /status                  engine state (JSON)
    POST /mode                    {"mode": "smart"} (or ?mode=smart): switch at run time
    GET  /route?host=H&port=P[&resolve=1]   explain a routing decision (JSON)
    POST /resolve?list=proxy|direct|all[&concurrency=N]   batch-resolve a list; the answer
                                  streams one JSON line per name, then a summary line
    GET  /                        the dashboard (``static/``), with its page token (``guard.py``)
    GET  /metrics                 the counters in Prometheus's text format (``monitor/metrics.py``)
    GET  /proxy.pac               the PAC file for the current mode
    GET  /global.pac /smart.pac /direct.pac

PAC files carry an ETag (a hash of the text) and Last-Modified (when the text was generated);
``If-None-Match`` / ``If-Modified-Since`` get a 304.  A PAC is generated again only when its
key changes: the mode, the router object (rules are replaced as a whole), or the ports the
engine actually bound.  Browsers fetch the PAC often (Chromium twice per launch), and a smart
PAC with the default lists is tens of kilobytes of JSON.

The API listens on loopback only (``config.parse_control`` refuses anything else), and
``guard.check_request`` decides on every request, PAC files included, before anything else:
the Host must be a loopback address, ``localhost`` or a ``control_hosts`` name with the bound
port (DNS rebinding), a browser's Origin must be our own (CSRF), and every state-changing
request (``POST /mode``, ``POST /resolve``) carries ``Authorization: Bearer TOKEN``.  The
token is new at each start and written (mode 0600) next to the engine's record in the state
directory (``engines/<role>-<host>-<port>.token``, ``monitor/engines.py``); it is never
logged.  If the configured port is taken the API binds the next free one with ``auto_port``,
else an ephemeral port; it logs which, and its record (its URL) is where the CLI finds it.

The server is aiohttp's (``aiohttp.web``), with our limits (``MAX_LINE``, ``MAX_HEADERS``,
``MAX_BODY``); the guard is its middleware, so it runs before every route, unknown paths
included.  Only the engine imports this module: the CLI talks to it with the standard
library (``monitor/client.py``), since importing aiohttp alone costs about 250 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientConnectionResetError, ClientSession, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web import Response, StreamResponse
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from autovpn import logs
from autovpn.monitor.engines import (
    ENGINES_DIR,
    EngineRecord,
    record_stem,
    remove_record,
    write_record,
)
from autovpn.monitor.guard import ControlPolicy, check_request
from autovpn.monitor.metrics import CONTENT_TYPE as METRICS_TYPE
from autovpn.monitor.metrics import exposition
from autovpn.ports import AUTO_PORT_TRIES, bind_error, port_holder, port_in_use
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.routing.dns import Resolution, SplitResolver
from autovpn.routing.pac import render_pac, unportable_regexes
from autovpn.routing.router import Action, Mode, Router

__all__ = [
    "EngineView",
    "ControlAPI",
    "PacCache",
    "Reply",
    "request",
    "stream_lines",
]


class EngineView(Protocol):
    """What the control API needs of the engine.  ``autovpn.engine.Engine`` is one; the API
    depends on this, not on the engine, which is what builds the API (no import circle)."""

    @property
    def router(self) -> Router: ...
    @property
    def resolver(self) -> SplitResolver: ...
    @property
    def listeners(self) -> Sequence[ProxyListener]: ...
    @property
    def mode(self) -> Mode: ...
    def set_mode(self, mode: Mode | str) -> None: ...
    def status(self) -> dict[str, object] | Awaitable[dict[str, object]]:
        """The engine's state; awaitable where it must be gathered (a server's workers)."""
        ...

    def list_names(self, which: str = "proxy") -> list[str]: ...
    async def explain(
        self, host: str, port: int, *, resolve: bool = False
    ) -> dict[str, object]: ...

log = logging.getLogger("autovpn.api")

#: The longest request line or header line (aiohttp's max_line_size and max_field_size);
#: longer ones are answered 431.
MAX_LINE = 8 * 1024
MAX_HEADERS = 64  # header lines in one request
MAX_BODY = 64 * 1024  # POST bodies are tiny JSON objects
READ_TIMEOUT = 10.0  # an idle keep-alive connection is closed after this long
PAC_TYPE = "application/x-ns-proxy-autoconfig"
#: The dashboard's files, shipped in the package (package-data): no build step, no CDN.
STATIC = {
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
#: The dashboard loads only its own files and talks only to its own origin; no page may
#: frame it (a framed mode switch could be clicked by a user who thinks it is another page).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes:
    return importlib.resources.files("autovpn.monitor").joinpath("static", name).read_bytes()


class _HttpError(Exception):
    def __init__(
        self, status: HTTPStatus, message: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message or status.phrase)
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class PacFile:
    text: bytes
    etag: str
    last_modified: float


class PacCache:
    """PAC texts keyed by what they depend on; ``generations`` counts real renders."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._files: dict[tuple[object, ...], PacFile] = {}
        self.generations = 0
        self.clock = clock
        self._told: set[int] = set()  # routers whose unportable regexes were logged

    def get(self, engine: EngineView, mode: Mode) -> PacFile:
        http_port, socks_port = _proxy_ports(engine)
        router = engine.router
        # The router's mode matters only for /proxy.pac (``mode`` is resolved before this), but
        # the default action is part of the smart text.
        key = (mode, id(router), router.default, http_port, socks_port)
        pac = self._files.get(key)
        if pac is None:
            if mode is Mode.SMART and id(router) not in self._told:
                self._told.add(id(router))
                _tell_unportable(router)
            text = render_pac(router, mode, http_port=http_port, socks_port=socks_port).encode()
            etag = '"' + hashlib.sha256(text).hexdigest()[:32] + '"'
            pac = PacFile(text, etag, float(int(self.clock())))
            # Only the latest text per mode is kept: old keys cannot come back into use
            # without rendering the same text again.
            for old in [k for k in self._files if k[0] is mode]:
                del self._files[old]
            self._files[key] = pac
            self.generations += 1
        return pac


def _tell_unportable(router: Router) -> None:
    """One line per regex rule the smart PAC cannot evaluate in a browser (its file says it
    too, in a comment): the user may want to write it in the syntax both share."""
    for rule in unportable_regexes(router):
        log.warning(
            "PAC: regex %r (%s) has no JavaScript equivalent: %s",
            rule.value,
            rule.source,
            "left out of the PAC (the engine still applies it)"
            if rule.action is Action.DIRECT
            else "the PAC sends every host that reaches it to the engine, which applies it",
        )


def _proxy_ports(engine: EngineView) -> tuple[int, int]:
    http = next((lst for lst in engine.listeners if lst.kind is ListenerKind.HTTP), None)
    socks = next((lst for lst in engine.listeners if lst.kind is ListenerKind.SOCKS5), None)
    if http is None or socks is None:
        raise _HttpError(
            HTTPStatus.SERVICE_UNAVAILABLE, "a PAC needs both an HTTP and a SOCKS5 listener"
        )
    return http.bound_port, socks.bound_port


def _fresh(headers: Mapping[str, str], pac: PacFile) -> bool:
    """RFC 9110 section 13.1.2 / 13.1.3: If-None-Match wins over If-Modified-Since."""
    inm = headers.get("if-none-match")
    if inm is not None:
        tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
        return "*" in tags or pac.etag in tags
    ims = headers.get("if-modified-since")
    if ims is not None:
        try:
            return parsedate_to_datetime(ims).timestamp() >= pac.last_modified
        except (TypeError, ValueError):
            return False
    return False


class _Handler(RequestHandler):
    """aiohttp's connection protocol, with our answer to a request it cannot parse.

    aiohttp answers every parse error 400 with a text body and logs it with its traceback;
    a head over the limits (``MAX_LINE``) is 431 Request Header Fields Too Large here (RFC
    6585 section 5), and every refusal is one JSON line, like the API's other errors.  The
    offending line is not logged: it may be anything a local program sent, a token included.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if isinstance(exc, LineTooLong):
            status, message = 431, f"a request head line over {MAX_LINE} bytes"
        elif isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message:
            status, message = 431, f"over {MAX_HEADERS} header lines"
        elif isinstance(exc, HttpProcessingError):
            message = "bad request: " + (exc.message.split(":", 1)[0] or "not HTTP")
        elif status >= 500:
            log.error("control API: %s %s failed", request.method, request.path, exc_info=exc)
            message = "internal error (the engine's log says more)"
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had begun; the connection is dropped")
        reply = _json_error(status, message or HTTPStatus(status).phrase)
        reply.force_close()
        return reply


def _json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    # One line: what a person or a log sees first says why.
    return web.json_response(
        {"error": message}, status=status, headers=dict(headers or {}), dumps=_dumps_line
    )


def _dumps_line(obj: object) -> str:
    return json.dumps(obj) + "\n"


def _dumps_indented(obj: object) -> str:
    return json.dumps(obj, indent=1) + "\n"


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> StreamResponse:
    """Every route, the PAC files and unknown paths included: a rebinding page must not read
    them either.  Bodies are capped first (the old server read them before answering)."""
    api = request.app[_POLICY]
    length = request.content_length
    if length is not None and length > MAX_BODY:
        too_big = _json_error(413, f"body over {MAX_BODY} bytes")
        too_big.force_close()  # its body is not read: the connection cannot carry on
        return too_big
    if api.policy is None:
        return _json_error(503, "the control API is starting")
    refusal = check_request(api.policy, request.method, request.path, request.headers)
    if refusal is not None:
        refused = _json_error(refusal.status, refusal.reason, refusal.headers)
        refused.force_close()  # a refused peer (a rebinding page, say) gets no keep-alive
        return refused
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else ""
        if exc.status == 404:
            reason = f"no such endpoint: {request.path}"
        elif exc.status == 405:
            reason = f"use {headers.get('Allow', 'another method')}"
        elif exc.status == 413:
            reason = f"body over {MAX_BODY} bytes"
        return _json_error(exc.status, reason or HTTPStatus(exc.status).phrase, headers)
    response.headers.setdefault("Cache-Control", "no-cache")
    return response


class ControlAPI:
    def __init__(
        self,
        engine: EngineView,
        address: str,
        state: Path | None = None,
        hosts: Iterable[str] = (),
        *,
        role: str = "embedded",
        auto_port: bool = False,
    ) -> None:
        host, _, port = address.rpartition(":")
        self.engine = engine
        self.host = host.strip("[]")
        self.port = int(port)
        self.bound_port = 0
        self.state = state
        self.hosts = tuple(hosts)  # config ``control_hosts``: names accepted in Host
        self.role = role  # the engine's: client, server or embedded (in its record's name)
        self.auto_port = auto_port
        # New at every start, so a token read from an old file stops working; never logged.
        self.token = secrets.token_urlsafe(32)
        #: The dashboard's token, embedded in ``GET /``: it may switch the mode from our own
        #: origin, nothing else (``guard.py`` says why that is safe).  New at every start.
        self.page_token = secrets.token_urlsafe(32)
        logs.redact(self.token, self.page_token)
        self.policy: ControlPolicy | None = None
        #: This engine's record in the state directory while it runs (``monitor/engines.py``).
        self.record: EngineRecord | None = None
        self.pacs = PacCache()
        self._exposition = exposition()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def _status_now(self) -> dict[str, object]:
        """The engine's status; awaited where it is gathered (a supervisor asks its workers:
        /status and /metrics then answer their sums)."""
        status = self.engine.status()
        if inspect.isawaitable(status):
            status = await status
        return status

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}"

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
        app[_POLICY] = self
        r = app.router
        r.add_get("/status", self._status, allow_head=False)
        r.add_get("/metrics", self._metrics)
        r.add_get("/", self._dashboard)
        for path in STATIC:
            r.add_get(path, self._static_file)
        r.add_route("GET", "/mode", self._get_mode)
        r.add_route("POST", "/mode", self._post_mode)
        r.add_get("/route", self._route, allow_head=False)
        r.add_post("/resolve", self._resolve)
        for name in ("proxy", "global", "smart", "direct"):
            r.add_get(f"/{name}.pac", self._pac)
        return app

    async def _bind(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Server:
        """The configured port; if taken, the next free ones with ``auto_port``, then any
        port (the engine's record in the state directory says which, for the CLI)."""
        loop = asyncio.get_running_loop()
        tries = AUTO_PORT_TRIES if self.auto_port and self.port else 1
        for port in range(self.port, min(self.port + tries, 65536)):
            try:
                server = await loop.create_server(factory, self.host, port)
            except OSError as exc:
                if not port_in_use(exc) or self.port == 0:
                    raise bind_error("control API", self.host, port, exc) from exc
                continue
            if port != self.port:
                log.warning(
                    "control API: %s:%d is taken (by %s); auto_port: using port %d instead",
                    self.host,
                    self.port,
                    port_holder(self.port) or "another program",
                    port,
                )
            return server
        server = await loop.create_server(factory, self.host, 0)
        log.warning(
            "control API: %s:%d is taken (by %s)%s; listening on port %d instead (the CLI finds"
            " it through the state directory)",
            self.host,
            self.port,
            port_holder(self.port) or "another program",
            f", and so are the next {tries - 1}" if tries > 1 else "",
            server.sockets[0].getsockname()[1],
        )
        return server

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # No access log of aiohttp's: the CLI polls, and a request line may carry a token.
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        manager = runner.server
        assert manager is not None

        # aiohttp's annotation wants a Logger; None is how it turns the access log off.
        quiet: dict[str, Any] = {"access_log": None}

        def factory() -> asyncio.Protocol:
            return _Handler(
                manager,
                loop=loop,
                **quiet,
                max_line_size=MAX_LINE,
                max_field_size=MAX_LINE,
                max_headers=MAX_HEADERS,
                keepalive_timeout=READ_TIMEOUT,
            )

        self._server = await self._bind(factory)
        self.bound_port = self._server.sockets[0].getsockname()[1]
        token_file = None
        if self.state is not None:
            stem = record_stem(self.role, self.host, self.bound_port)
            token_file = self.state / ENGINES_DIR / f"{stem}.token"
        # Set before the loop runs again: no request is served without a policy.
        self.policy = ControlPolicy.build(
            self.bound_port,
            self.token,
            token_file=str(token_file) if token_file is not None else None,
            bound_host=self.host,
            hosts=self.hosts,
            page_token=self.page_token,
        )
        if self.state is not None:
            try:
                self.record = write_record(
                    self.state, self.role, self.host, self.bound_port, self.url, self.token
                )
            except OSError as exc:
                log.warning(
                    "control API: cannot write this engine's record in %s (%s): the CLI will"
                    " not find it, and mode switches and batch resolves through the API will"
                    " be refused",
                    self.state / ENGINES_DIR,
                    exc,
                )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._runner is not None:
            # Open keep-alive connections and requests in progress (a streamed resolve) end.
            await self._runner.shutdown()
            await self._runner.cleanup()
            self._runner = None
        if self.record is not None:
            # Only our own files: a record is never another engine's (its port is ours).
            remove_record(self.record, self.token)
            self.record = None

    # -- routes ----------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> Response:
        return web.json_response(await self._status_now(), dumps=_dumps_indented)

    async def _dashboard(self, request: web.Request) -> Response:
        page = _static("dashboard.html").replace(b"{{PAGE_TOKEN}}", self.page_token.encode())
        headers = {
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",  # it carries the page token
            **PAGE_HEADERS,
        }
        return Response(body=page, headers=headers)

    async def _static_file(self, request: web.Request) -> Response:
        name, content_type = STATIC[request.path]
        return Response(
            body=_static(name), headers={"Content-Type": content_type, **PAGE_HEADERS}
        )

    async def _metrics(self, request: web.Request) -> Response:
        # Read-only, no token (a scraper has none): the Host guard still applies.
        body = self._exposition(await self._status_now())
        return Response(body=body, headers={"Content-Type": METRICS_TYPE})

    async def _get_mode(self, request: web.Request) -> Response:
        return web.json_response({"mode": self.engine.mode.value}, dumps=_dumps_indented)

    async def _post_mode(self, request: web.Request) -> Response:
        value: Any = request.query.get("mode")
        if value is None:
            body = await request.read()
            try:
                value = json.loads(body or b"{}").get("mode")
            except (ValueError, AttributeError):
                return _json_error(400, "body must be JSON")
        try:
            mode = Mode(value)
        except ValueError:
            return _json_error(400, "mode must be global, smart or direct")
        previous = self.engine.mode
        self.engine.set_mode(mode)
        return web.json_response(
            {"mode": mode.value, "previous": previous.value}, dumps=_dumps_indented
        )

    async def _route(self, request: web.Request) -> Response:
        host = request.query.get("host")
        port = request.query.get("port", "443")
        if not host or not port.isdecimal() or not 0 < int(port) < 65536:
            return _json_error(400, "give host= and a port= in 1-65535")
        resolve = request.query.get("resolve") in ("1", "true", "yes")
        explained = await self.engine.explain(host, int(port), resolve=resolve)
        return web.json_response(explained, dumps=_dumps_indented)

    async def _pac(self, request: web.Request) -> Response:
        name = request.path[1:-4]
        mode = self.engine.mode if name == "proxy" else Mode(name)
        try:
            pac = self.pacs.get(self.engine, mode)
        except _HttpError as exc:
            return _json_error(exc.status, str(exc))
        cache = {"ETag": pac.etag, "Last-Modified": formatdate(pac.last_modified, usegmt=True)}
        if _fresh(request.headers, pac):
            return Response(status=304, headers=cache)
        return Response(body=pac.text, headers={"Content-Type": PAC_TYPE, **cache})

    async def _resolve(self, request: web.Request) -> StreamResponse:
        which = request.query.get("list", "proxy")
        if which not in ("proxy", "direct", "all"):
            return _json_error(400, "list must be proxy, direct or all")
        conc = request.query.get("concurrency", "")
        if conc and (not conc.isdecimal() or not 1 <= int(conc) <= 1000):
            return _json_error(400, "concurrency must be 1-1000")
        names = self.engine.list_names(which)
        # Streamed (chunked): one JSON line per name as it resolves, then a summary line.
        response = StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        await response.write(json.dumps({"total": len(names)}).encode() + b"\n")
        start = time.perf_counter()
        failed = 0
        gone = False

        async def progress(name: str, result: object) -> None:
            nonlocal failed, gone
            if isinstance(result, Resolution):
                line = {"name": name, "addresses": list(result.addresses)}
            else:
                failed += 1
                line = {"name": name, "error": str(result)}
            if gone:
                return  # the client left; the batch still warms the cache
            try:
                # backpressure: a slow reader slows the batch
                await response.write(json.dumps(line).encode() + b"\n")
            except (ConnectionError, ClientConnectionResetError):
                gone = True

        await self.engine.resolver.resolve_many(
            names, concurrency=int(conc) if conc else None, progress=progress
        )
        summary = {
            "done": len(names),
            "failed": failed,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if not gone:
            with contextlib.suppress(ConnectionError, ClientConnectionResetError):
                await response.write(json.dumps(summary).encode() + b"\n")
                await response.write_eof()
        return response


_POLICY = web.AppKey("control_api", ControlAPI)


# -- a client for tests and tools in asyncio code (the CLI has monitor/client.py) ----------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _auth(token: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    if token is None:
        return dict(headers or {})
    return {"Authorization": f"Bearer {token}", **(headers or {})}


async def request(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    token: str | None = None,
) -> Reply:
    """One request to a control API at ``url`` (``http://127.0.0.1:9090``); the caller
    bounds the time (``asyncio.timeout``).  ``token``: the engine's control token, which
    state-changing requests need (``EngineRecord.read_token``)."""
    async with (
        ClientSession(skip_auto_headers=("User-Agent", "Content-Type")) as session,
        session.request(
            method, url + path, data=body or None, headers=_auth(token, headers)
        ) as response,
    ):
        data = await response.read()
        got = {k.lower(): v for k, v in response.headers.items()}
        return Reply(response.status, got, data)


async def stream_lines(
    url: str,
    method: str,
    path: str,
    on_line: Callable[[Any], None],
    *,
    token: str | None = None,
) -> int:
    """A streamed JSON-lines answer (``POST /resolve``): ``on_line`` gets each parsed line.
    Returns the HTTP status; an error body is passed to ``on_line`` as one object."""
    async with (
        ClientSession() as session,
        session.request(method, url + path, headers=_auth(token, None)) as response,
    ):
        if response.status != 200:
            on_line(json.loads(await response.read() or b"{}"))
            return response.status
        while line := await response.content.readline():
            on_line(json.loads(line))
        return response.status
