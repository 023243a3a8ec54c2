"""The control API: a small HTTP/1.1 server on loopback that the CLI and browsers talk to.

    GET  /status                  engine state (JSON)
    POST /mode                    {"mode": "smart"} (or ?mode=smart): switch at run time
    GET  /route?host=H&port=P[&resolve=1]   explain a routing decision (JSON)
    POST /resolve?list=proxy|direct|all[&concurrency=N]   batch-resolve a list; the answer
                                  streams one JSON line per name, then a summary line
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

Requests are read with named limits (``MAX_HEAD``, ``MAX_BODY``); every response closes the
connection (the clients are one-shot: the CLI, a PAC fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from autovpn.monitor.engines import (
    ENGINES_DIR,
    EngineRecord,
    record_stem,
    remove_record,
    write_record,
)
from autovpn.monitor.guard import ControlPolicy, check_request, is_pac_path
from autovpn.ports import AUTO_PORT_TRIES, bind_error, port_holder, port_in_use
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.routing.dns import Resolution, SplitResolver
from autovpn.routing.pac import render_pac
from autovpn.routing.router import Mode, Router
from autovpn.wire import http1

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

MAX_HEAD = 16 * 1024  # request line + headers
MAX_HEADERS = 100  # header lines of a request
MAX_BODY = 64 * 1024  # POST bodies are tiny JSON objects
READ_TIMEOUT = 10.0
#: Requests: a head over ``MAX_HEAD`` is a 431, its request line included; a bad one a 400.
_REQUEST_LIMITS = http1.HeadLimits(
    max_line=MAX_HEAD,
    max_headers=MAX_HEADERS,
    max_head=MAX_HEAD,
    line_name="MAX_HEAD",
    start_line_status=431,
)
#: Answers, read by ``request`` and ``stream_lines`` with the same bounds.
_RESPONSE_LIMITS = replace(
    _REQUEST_LIMITS, error_status=502, start_line_status=502, too_large_status=502
)
PAC_TYPE = "application/x-ns-proxy-autoconfig"


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

    def get(self, engine: EngineView, mode: Mode) -> PacFile:
        http_port, socks_port = _proxy_ports(engine)
        router = engine.router
        # The router's mode matters only for /proxy.pac (``mode`` is resolved before this), but
        # the default action is part of the smart text.
        key = (mode, id(router), router.default, http_port, socks_port)
        pac = self._files.get(key)
        if pac is None:
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


def _proxy_ports(engine: EngineView) -> tuple[int, int]:
    http = next((lst for lst in engine.listeners if lst.kind is ListenerKind.HTTP), None)
    socks = next((lst for lst in engine.listeners if lst.kind is ListenerKind.SOCKS5), None)
    if http is None or socks is None:
        raise _HttpError(
            HTTPStatus.SERVICE_UNAVAILABLE, "a PAC needs both an HTTP and a SOCKS5 listener"
        )
    return http.bound_port, socks.bound_port


def _fresh(headers: dict[str, str], pac: PacFile) -> bool:
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
        self.policy: ControlPolicy | None = None
        #: This engine's record in the state directory while it runs (``monitor/engines.py``).
        self.record: EngineRecord | None = None
        self.pacs = PacCache()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # owned here: cancelled by close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}"

    async def _bind(self) -> asyncio.Server:
        """The configured port; if taken, the next free ones with ``auto_port``, then any
        port (the engine's record in the state directory says which, for the CLI)."""
        tries = AUTO_PORT_TRIES if self.auto_port and self.port else 1
        for port in range(self.port, min(self.port + tries, 65536)):
            try:
                server = await asyncio.start_server(self._handle, self.host, port, limit=MAX_HEAD)
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
        server = await asyncio.start_server(self._handle, self.host, 0, limit=MAX_HEAD)
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
        self._server = await self._bind()
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
            for w in list(self._writers):
                w.close()
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self.record is not None:
            # Only our own files: a record is never another engine's (its port is ours).
            remove_record(self.record, self.token)
            self.record = None

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    method, target, headers, body = await self._read_request(reader)
                await self._dispatch(method, target, headers, body, writer)
            except _HttpError as exc:
                # One line: what a person or a log sees first says why.
                body = (json.dumps({"error": str(exc)}) + "\n").encode()
                self._send(writer, exc.status, body, "application/json", exc.headers)
            await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes]:
        parser = http1.RequestHeadParser(_REQUEST_LIMITS)
        try:
            head = None
            while head is None:
                data = await reader.read(MAX_HEAD)
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)  # gone mid-head: no answer
                head = parser.receive_data(data)
            if not head.version.startswith("HTTP/1."):
                raise _HttpError(HTTPStatus.BAD_REQUEST, "bad request line")
            if head.get_all("transfer-encoding"):
                raise _HttpError(HTTPStatus.NOT_IMPLEMENTED, "chunked request bodies")
            length = http1.BodyFramer.for_request(head).content_length
        except http1.HttpError as exc:
            raise _HttpError(HTTPStatus(exc.status), str(exc)) from None
        if length > MAX_BODY:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        body = parser.trailing_data[:length]  # what came with the head
        if len(body) < length:
            body += await reader.readexactly(length - len(body))
        headers = {name.lower(): value for name, value in head.headers}
        return head.method, head.target, headers, body

    def _send(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
        *,
        head_only: bool = False,
    ) -> None:
        fields = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-cache",
            "Connection": "close",
            **(extra or {}),
        }
        head = http1.render(f"HTTP/1.1 {status.value} {status.phrase}", fields.items())
        writer.write(head + (b"" if head_only else body))

    def _send_json(self, writer: asyncio.StreamWriter, status: HTTPStatus, obj: object) -> None:
        body = (json.dumps(obj, indent=1) + "\n").encode()
        self._send(writer, status, body, "application/json")

    async def _dispatch(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        # Every route, the PAC files included: a rebinding page must not read them either.
        if self.policy is None:
            raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the control API is starting")
        refusal = check_request(self.policy, method, path, headers)
        if refusal is not None:
            raise _HttpError(refusal.status, refusal.reason, refusal.headers)
        if is_pac_path(path):
            if method not in ("GET", "HEAD"):
                raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED)
            name = path[1:-4]
            mode = self.engine.mode if name == "proxy" else Mode(name)
            pac = self.pacs.get(self.engine, mode)
            cache = {
                "ETag": pac.etag,
                "Last-Modified": formatdate(pac.last_modified, usegmt=True),
            }
            if _fresh(headers, pac):
                fields = [*cache.items(), ("Connection", "close")]
                writer.write(http1.render("HTTP/1.1 304 Not Modified", fields))
                return
            self._send(writer, HTTPStatus.OK, pac.text, PAC_TYPE, cache, head_only=method == "HEAD")
            return
        if path == "/status":
            self._require(method, "GET")
            status = self.engine.status()
            if inspect.isawaitable(status):
                status = await status
            self._send_json(writer, HTTPStatus.OK, status)
        elif path == "/mode":
            if method == "GET":
                self._send_json(writer, HTTPStatus.OK, {"mode": self.engine.mode.value})
                return
            self._require(method, "POST")
            value: Any = query.get("mode")
            if value is None:
                try:
                    value = json.loads(body or b"{}").get("mode")
                except (ValueError, AttributeError):
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "body must be JSON") from None
            try:
                mode = Mode(value)
            except ValueError:
                raise _HttpError(
                    HTTPStatus.BAD_REQUEST, "mode must be global, smart or direct"
                ) from None
            previous = self.engine.mode
            self.engine.set_mode(mode)
            self._send_json(writer, HTTPStatus.OK, {"mode": mode.value, "previous": previous.value})
        elif path == "/route":
            self._require(method, "GET")
            host = query.get("host")
            port = query.get("port", "443")
            if not host or not port.isdecimal() or not 0 < int(port) < 65536:
                raise _HttpError(HTTPStatus.BAD_REQUEST, "give host= and a port= in 1-65535")
            resolve = query.get("resolve") in ("1", "true", "yes")
            explained = await self.engine.explain(host, int(port), resolve=resolve)
            self._send_json(writer, HTTPStatus.OK, explained)
        elif path == "/resolve":
            self._require(method, "POST")
            await self._resolve(query, writer)
        else:
            raise _HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    @staticmethod
    def _require(method: str, allowed: str) -> None:
        if method != allowed:
            raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {allowed}")

    async def _resolve(self, query: dict[str, str], writer: asyncio.StreamWriter) -> None:
        which = query.get("list", "proxy")
        if which not in ("proxy", "direct", "all"):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "list must be proxy, direct or all")
        conc = query.get("concurrency", "")
        if conc and (not conc.isdecimal() or not 1 <= int(conc) <= 1000):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "concurrency must be 1-1000")
        names = self.engine.list_names(which)
        # Streamed: no Content-Length, the body ends when the connection closes.
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
            + json.dumps({"total": len(names)}).encode()
            + b"\n"
        )
        start = time.perf_counter()
        failed = 0

        async def progress(name: str, result: object) -> None:
            nonlocal failed
            if isinstance(result, Resolution):
                line = {"name": name, "addresses": list(result.addresses)}
            else:
                failed += 1
                line = {"name": name, "error": str(result)}
            if writer.is_closing():
                return  # the client left; the batch still warms the cache
            writer.write(json.dumps(line).encode() + b"\n")
            try:
                await writer.drain()  # backpressure: a slow reader slows the batch
            except ConnectionError:
                writer.close()

        await self.engine.resolver.resolve_many(
            names, concurrency=int(conc) if conc else None, progress=progress
        )
        summary = {
            "done": len(names),
            "failed": failed,
            "seconds": round(time.perf_counter() - start, 3),
        }
        writer.write(json.dumps(summary).encode() + b"\n")


# -- the client side (used by the CLI) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r}: expected http://HOST:PORT")
    return parts.hostname, parts.port


def _auth(token: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    if token is None:
        return dict(headers or {})
    return {"Authorization": f"Bearer {token}", **(headers or {})}


async def _open_request(
    url: str, method: str, path: str, body: bytes, headers: dict[str, str] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
    host, port = _split_url(url)
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
    try:
        name = f"[{host}]" if ":" in host else host  # an IPv6 address in Host has brackets
        fields = {"Host": f"{name}:{port}", "Content-Length": str(len(body)), **(headers or {})}
        writer.write(http1.render(f"{method} {path} HTTP/1.1", fields.items()) + body)
        parser = http1.ResponseHeadParser(_RESPONSE_LIMITS)
        head = None
        while head is None:
            # Line by line, so that the body stays in the reader for the caller.
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            head = parser.receive_data(line)
        got = {name.lower(): value for name, value in head.headers}
        return reader, writer, head.status, got
    except BaseException:
        writer.close()
        raise


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
    headers = _auth(token, headers)
    reader, writer, status, got = await _open_request(url, method, path, body, headers)
    try:
        n = got.get("content-length")
        if method == "HEAD" or status in (204, 304):
            data = b""  # RFC 9110 section 6.4.1: no content, whatever the headers say
        elif n is not None:
            data = await reader.readexactly(int(n))
        else:
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Reply(status, got, data)


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
    reader, writer, status, got = await _open_request(url, method, path, b"", _auth(token, None))
    try:
        if status != 200:
            n = got.get("content-length")
            data = await (reader.readexactly(int(n)) if n is not None else reader.read())
            on_line(json.loads(data or b"{}"))
            return status
        while line := await reader.readline():
            on_line(json.loads(line))
        return status
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
