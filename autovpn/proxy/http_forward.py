"""Forwarding absolute-form HTTP/1.1 requests (``GET http://host/path``) with keep-alive.

Theory of operation
-------------------
After the first request head, ``HttpHandshake`` hands the client's transport to an
``HttpForwarder``, which then carries every exchange of that client connection::

    HEAD ──▶ DIALING ──▶ EXCHANGE ──▶ HEAD ...       (any ──▶ CLOSED; CONNECT ──▶ the relay)
      └────────(same origin, still open)──▶ EXCHANGE

- HEAD: read the next request head (``HttpHeadParser``).  Proxy credentials are checked on
  every request (RFC 9110 §11.7.1: Proxy-Authorization is per request, never forwarded).
- DIALING: ``Dialer.connect`` routes and connects; the client is not read meanwhile.  The
  origin connection of the previous exchange is reused when the host and port are the same
  and the origin kept it open (RFC 9112 §9.3).
- EXCHANGE: the rewritten head (``rewrite_for_origin``) goes to the origin, then the request
  body, delimited by its ``BodyTracker`` (RFC 9112 §6.3).  Concurrently the response head is
  parsed (``http1.ResponseHeadParser``; interim 1xx heads are passed on), rewritten without
  hop-by-hop fields (RFC 9110 §7.6.1) and the body passed on by its own framing.  Bytes after
  the request body are the next request: the client is not read again until the response is
  complete (pipelining-safe; what one read brought is kept, at most one read's worth).

The origin side is reached through ``UpstreamPort``, a virtual transport handed to
``Upstream.attach``: the upstream (a direct ``Pipe`` or a tunnel ``StreamEndpoint``) treats it
as the client's socket, so forwarding reuses every upstream's own relaying and flow control
unchanged, and CONNECT keeps attaching the real socket.  Backpressure goes both ways through
the ordinary protocol calls: the upstream calls ``pause_reading`` on the port when it cannot
take more (tunnel credit exhausted, origin socket above its high-water mark) and we stop
reading the client; the client transport calls our ``pause_writing`` when it is above its
high-water mark and we pass ``pause_writing`` on to the upstream, which stops reading the
origin (direct) or stops granting window (tunnel).  Nothing here buffers a body.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any, cast

from autovpn.errors import StreamError
from autovpn.net import reset_transport
from autovpn.proxy.dialer import Upstream
from autovpn.proxy.handshake import ListenerSide
from autovpn.wire import http1, http_proxy
from autovpn.wire.auth import parse_basic_proxy_authorization
from autovpn.wire.http1 import BodyFramer, BodyKind, BodyTracker, HttpError, ResponseHead
from autovpn.wire.http_proxy import HttpRequestHead

log = logging.getLogger("autovpn.proxy")

#: How long a keep-alive client connection may sit between requests (or inside a head).
KEEPALIVE_TIMEOUT = 120.0
#: Rewritten heads up to this size ride in the tunnel's OPEN frame (saves a round trip).
MAX_EARLY_HEAD = 16 * 1024

# Response fields never removed even when Connection names them (they frame the body).
_FRAMING = frozenset({"content-length", "transfer-encoding"})


#: Requests that may be sent again when a reused connection dies first (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def authorization_problem(listener: ListenerSide, head: HttpRequestHead) -> str | None:
    """None if ``head`` may use the proxy, else why not (for the log)."""
    creds = listener.credentials
    if not creds:
        return None
    offered = parse_basic_proxy_authorization(head.headers)
    if offered is None:
        return "proxy authentication missing"
    if not creds.check(*offered):
        return "proxy authentication failed"
    return None


def error_response(status: int, detail: str = "") -> bytes:
    """An error reply: the status only, never internal detail (STYLE principle 4).  ``detail``
    is a line about our own tunnel (``StreamError.public``: "tunnel down: server refused the
    secret ..."), which the local user may read; it never describes the far side."""
    if not detail:
        return HttpError("", status).reply  # body: "502 Bad Gateway\n"
    line = " ".join(detail.split())  # one line, whatever the reason held
    return http1.response(
        status,
        headers=[("Content-Type", "text/plain; charset=utf-8")],
        body=f"{status} {line}\n".encode(),
    )


def stream_error_response(exc: StreamError) -> bytes:
    """The reply for a stream that could not be opened."""
    return error_response(exc.reason.http_status, exc.public)


def origin_keeps_alive(head: ResponseHead) -> bool:
    """Whether the origin leaves its connection open after this response (RFC 9112 §9.3)."""
    options = http1.list_tokens(head.get_all("connection"))
    if "close" in options:
        return False
    return head.version == "HTTP/1.1" or "keep-alive" in options


def rewrite_response_head(head: ResponseHead, *, connection: str | None) -> bytes:
    """The response head for the client: hop-by-hop fields (RFC 9110 §7.6.1) and fields the
    origin's Connection names removed, except the framing ones (the body passes unchanged),
    then ``Connection: <connection>`` if given.  Version and status as received."""
    options = set(http1.list_tokens(head.get_all("connection")))
    removed = (http_proxy.HOP_BY_HOP | options) - _FRAMING
    fields = [(n, v) for n, v in head.headers if n.lower() not in removed]
    if connection is not None:
        fields.append(("Connection", connection))
    return http1.render(head.start_line, fields)


class UpstreamPort(asyncio.Transport):
    """A virtual transport standing for the client's socket, handed to ``Upstream.attach``.

    Upstream → us: ``write``/``write_eof``/``close``/``abort`` (origin bytes, origin EOF) and
    ``pause_reading``/``resume_reading`` (the upstream's backpressure on us).  Us → upstream:
    ``send``/``shutdown`` and ``pause_writing``/``resume_writing`` on its protocol.
    """

    __slots__ = ("_owner", "_protocol", "_closing", "_lost", "full", "key", "reusable")

    def __init__(self, owner: HttpForwarder, key: tuple[str, int]) -> None:
        super().__init__()
        self._owner: HttpForwarder | None = owner
        self._protocol: asyncio.BaseProtocol | None = None
        self._closing = False
        self._lost = False
        self.full = False  # the upstream asked us to stop sending (pause_reading)
        self.key = key
        self.reusable = False

    # -- the upstream's view: a transport ------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._owner is not None and data:
            self._owner.origin_data(self, data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._owner is not None:
            self._owner.origin_eof(self, error=False)

    def close(self) -> None:
        self._finish(error=False)

    def abort(self) -> None:
        self._finish(error=True)

    def pause_reading(self) -> None:
        if not self.full:
            self.full = True
            if self._owner is not None:
                self._owner.update_reading()

    def resume_reading(self) -> None:
        if self.full:
            self.full = False
            if self._owner is not None:
                self._owner.update_reading()

    def is_reading(self) -> bool:
        return not self.full

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def _finish(self, *, error: bool) -> None:
        if self._closing:
            return
        self._closing = True
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.origin_eof(self, error=error)
        asyncio.get_running_loop().call_soon(self._lose)

    # -- our view: the upstream's protocol -----------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Hand client bytes to the upstream, as if read from the client's socket."""
        protocol = self._protocol
        if protocol is None or self._closing:
            return
        if isinstance(protocol, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view and not self._closing:
                buf = memoryview(protocol.get_buffer(len(view)))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                protocol.buffer_updated(n)
                view = view[n:]
        else:
            cast(asyncio.Protocol, protocol).data_received(bytes(data))

    def pause_writing(self) -> None:
        if self._protocol is not None and not self._closing:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._protocol is not None and not self._closing:
            self._protocol.resume_writing()

    def shutdown(self) -> None:
        """We are done with this upstream: it closes its side (the origin socket, the stream).

        Deferred to the next loop iteration, since the upstream may be calling us right now."""
        if self._closing:
            return
        self._closing = True
        self._owner = None
        asyncio.get_running_loop().call_soon(self._lose)

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            if self._protocol is not None:
                self._protocol.connection_lost(None)


class Phase(enum.Enum):
    HEAD = "head"  # reading the next request head
    DIALING = "dialing"  # connecting to the origin; the client is not read
    EXCHANGE = "exchange"  # request body and/or response in flight
    CLOSED = "closed"


class HttpForwarder(asyncio.Protocol):
    """The client transport's protocol for absolute-form forwarding (see module docstring)."""

    def __init__(self, listener: ListenerSide, transport: asyncio.Transport, peer: str) -> None:
        self.listener = listener
        self.transport = transport
        self.peer = peer
        self.phase = Phase.HEAD
        self.requests = 0  # exchanges started on this client connection
        self.dials = 0  # origin connections opened for them
        self._loop = asyncio.get_running_loop()
        self._reading = False  # HttpHandshake paused the transport before the hand-over
        self._write_paused = False
        self._pending = bytearray()  # client bytes not consumed yet (the next request)
        self._parser: http_proxy.HttpHeadParser | None = None
        self._request: HttpRequestHead | None = None
        self._req_body: BodyTracker | None = None
        self._resp_parser: http1.ResponseHeadParser | None = None
        self._resp_body: BodyTracker | None = None
        self._resp_started = False  # bytes of the final response went to the client
        self._origin_keeps = False
        self._reused = False  # the current exchange runs on a reused origin connection
        self._answered = False  # the origin has sent something for the current exchange
        self._close_after = False
        self._client_eof = False
        self._port: UpstreamPort | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ended: asyncio.Future[None] = self._loop.create_future()

    # -- entry ---------------------------------------------------------------------------------

    def start(self, head: HttpRequestHead, trailing: bytes) -> None:
        """Take over after ``HttpHandshake`` parsed (and authorized) the first head."""
        self.listener.spawn(self._guard(), f"http-forward-{self.peer}")
        self._pending += trailing
        self._handle_head(head)

    async def _guard(self) -> None:
        """Ties this connection to its listener: closing the listener aborts it."""
        try:
            await self._ended
        except asyncio.CancelledError:
            if self.phase is not Phase.CLOSED:
                self.phase = Phase.CLOSED
                self._cancel_timer()
                self._drop_port()
                reset_transport(self.transport)
            raise

    # -- client transport callbacks ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        body = self._req_body
        if self.phase is Phase.EXCHANGE and body is not None and not body.done:
            self._forward_request_body(data)
        else:
            self._pending += data
            if self.phase is Phase.HEAD:
                self._read_head()
        self.update_reading()

    def eof_received(self) -> bool:
        self._client_eof = True
        body = self._req_body
        answering = (self.phase is Phase.EXCHANGE and body is not None and body.done) or (
            self.phase is Phase.DIALING and self._request is not None
        )
        if answering:
            self._close_after = True  # half-closed after a request: still answer it
            self.update_reading()
            return True
        if self.phase is Phase.HEAD and self._parser is not None:
            log.info("http client %s: closed in the middle of a request head", self.peer)
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self._drop_port()
        if not self._ended.done():
            self._ended.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._port is not None:
            self._port.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._port is not None:
            self._port.resume_writing()

    def update_reading(self) -> None:
        """Read the client only while a head or a request body may arrive and the upstream
        takes more."""
        want = self.phase is Phase.HEAD and len(self._pending) <= http_proxy.CLIENT_LIMITS.max_head
        if self.phase is Phase.EXCHANGE:
            body, port = self._req_body, self._port
            want = body is not None and not body.done and port is not None and not port.full
        if want != self._reading and not self.transport.is_closing():
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- requests ------------------------------------------------------------------------------

    def _read_head(self) -> None:
        if not self._pending:
            return
        if self._parser is None:
            self._parser = http_proxy.HttpHeadParser()
            self._start_timer()
        data, self._pending = self._pending, bytearray()
        try:
            head = self._parser.receive_data(data)
        except HttpError as exc:
            self._fail(exc.reply, f"HTTP error: {exc}")
            return
        if head is None:
            return
        self._pending += self._parser.trailing_data
        self._parser = None
        problem = authorization_problem(self.listener, head)
        if problem is not None:
            self._fail(http_proxy.proxy_auth_required(), problem)
            return
        self._handle_head(head)

    def _handle_head(self, head: HttpRequestHead) -> None:
        self._cancel_timer()
        if head.is_connect:
            self.phase = Phase.DIALING
            self._drop_port()
            self.update_reading()
            self.listener.spawn(self._connect(head), f"http-connect-{self.peer}")
            return
        if head.form is not http_proxy.TargetForm.ABSOLUTE:
            self._fail(error_response(400), "request is not in absolute form")
            return
        try:
            framer = BodyFramer.for_request(head)
        except HttpError as exc:
            self._fail(exc.reply, f"HTTP error: {exc}")
            return
        self._request = head
        self._close_after = not http_proxy.client_wants_keep_alive(head)
        self.requests += 1
        port = self._port
        if port is not None and port.key == (head.host, head.port) and port.reusable:
            port.reusable = False
            log.debug("http %s %s:%d reuses its origin connection", self.peer, *port.key)
            self._begin_exchange(framer, head_sent=False)
            self._reused = self._port is port
            return
        self._drop_port()
        self.phase = Phase.DIALING
        self.update_reading()
        self.listener.spawn(self._dial(head, framer), f"http-{self.peer}")

    async def _upstream(self, head: HttpRequestHead, early: bytes) -> Upstream | None:
        """Route and connect for ``head``; on failure answer the client and return None."""
        try:
            upstream, _ = await self.listener.dialer.connect(
                head.host, head.port, early, client=self.peer, via="http"
            )
        except StreamError as exc:
            self._fail(stream_error_response(exc), f"{head.host}:{head.port}: {exc}")
            return None
        except Exception:  # a bug: answer, log it, and keep serving everyone else
            log.exception("http client %s: dialling %s:%d failed", self.peer, head.host, head.port)
            self._fail(error_response(502), "internal error")
            return None
        return upstream

    async def _dial(self, head: HttpRequestHead, framer: BodyFramer) -> None:
        rewritten = http_proxy.rewrite_for_origin(head)
        early = rewritten if len(rewritten) <= MAX_EARLY_HEAD else b""
        upstream = await self._upstream(head, early)
        if upstream is None:
            return
        self.dials += 1
        port = UpstreamPort(self, (head.host, head.port))
        if self.phase is not Phase.DIALING:  # the client went away meanwhile
            upstream.attach(port)
            port.shutdown()
            return
        self._port = port
        self._prepare_exchange()
        # Attaching may deliver what the origin already answered to the early head.
        upstream.attach(port)
        if self._write_paused:
            port.pause_writing()
        if self._port is port:
            self._send_request(framer, head_sent=bool(early))

    def _prepare_exchange(self) -> None:
        self.phase = Phase.EXCHANGE
        self._reused = False
        self._answered = False
        self._resp_parser = http1.ResponseHeadParser(http_proxy.ORIGIN_LIMITS)
        self._resp_body = None
        self._resp_started = False
        self._req_body = None

    def _begin_exchange(self, framer: BodyFramer, *, head_sent: bool) -> None:
        self._prepare_exchange()
        self._send_request(framer, head_sent=head_sent)

    def _send_request(self, framer: BodyFramer, *, head_sent: bool) -> None:
        assert self._request is not None and self._port is not None
        if not head_sent:
            self._port.send(http_proxy.rewrite_for_origin(self._request))
        self._req_body = body = framer.tracker()
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._forward_request_body(data)
        if self.phase is not Phase.EXCHANGE:
            return
        if self._client_eof and not body.done:
            self._fail(error_response(400), "client closed before the request body was complete")
            return
        if self._resp_parser is None and self._resp_body is None:
            # The response was complete before the request went out (an early head).
            if not body.done:
                self._close_after = True
            self._exchange_done()
            return
        self.update_reading()

    def _forward_request_body(self, data: bytes) -> None:
        body, port = self._req_body, self._port
        assert body is not None and port is not None
        try:
            n = body.feed(data)
        except HttpError as exc:
            self._fail(b"" if self._resp_started else exc.reply, f"HTTP error: {exc}")
            return
        if n:
            port.send(memoryview(data)[:n] if n < len(data) else data)
        if n < len(data):
            self._pending += memoryview(data)[n:]

    async def _connect(self, head: HttpRequestHead) -> None:
        """CONNECT on a connection that forwarded requests before: from here, the relay."""
        early, self._pending = bytes(self._pending), bytearray()
        upstream = await self._upstream(head, early)
        if upstream is None:
            return
        if self.phase is not Phase.DIALING or self.transport.is_closing():
            port = UpstreamPort(self, (head.host, head.port))
            upstream.attach(port)
            port.shutdown()
            return
        self.phase = Phase.CLOSED  # not ours any more
        self.transport.write(http_proxy.CONNECTION_ESTABLISHED)
        upstream.attach(self.transport)
        if not self._ended.done():
            self._ended.set_result(None)

    # -- responses -----------------------------------------------------------------------------

    def origin_data(self, port: UpstreamPort, data: bytes | bytearray | memoryview) -> None:
        if port is not self._port or self.phase is not Phase.EXCHANGE:
            # Bytes from an idle origin connection: it cannot be reused.
            log.debug("http %s: unexpected bytes from idle origin %s:%d", self.peer, *port.key)
            if port is self._port:
                self._drop_port()
            else:
                port.shutdown()
            return
        self._answered = True
        while data:
            if self._resp_body is None:
                data = self._response_head(data)
                if self._resp_body is None:
                    return
            n = self._resp_body.feed(data)
            if n:
                self.transport.write(data if n == len(data) else bytes(memoryview(data)[:n]))
            if self._resp_body.done:
                if n < len(data):
                    log.info("http %s: origin sent bytes after its response", self.peer)
                    self._origin_keeps = False
                self._response_done()
                return
            data = b""

    def _response_head(self, data: bytes | bytearray | memoryview) -> bytes:
        """Parse response head(s); returns the bytes after the final head."""
        assert self._request is not None
        while True:
            parser = self._resp_parser
            if parser is None:  # more bytes after a complete response
                self._origin_keeps = False
                return b""
            try:
                head = parser.receive_data(data)
            except HttpError as exc:
                self._origin_failed(exc.reply, f"bad response from origin: {exc}")
                return b""
            if head is None:
                return b""
            data = parser.trailing_data
            if 100 <= head.status < 200 and head.status != 101:
                # Interim response (RFC 9110 §15.2): pass it on, the final one follows.
                self.transport.write(rewrite_response_head(head, connection=None))
                self._resp_parser = http1.ResponseHeadParser(http_proxy.ORIGIN_LIMITS)
                continue
            try:
                if head.status == 101:  # we never forward Upgrade, so this is not ours
                    raise HttpError("unrequested 101 Switching Protocols", 502)
                framer = BodyFramer.for_response(head, self._request.method)
            except HttpError as exc:
                self._origin_failed(exc.reply, f"bad response from origin: {exc}")
                return b""
            self._resp_parser = None
            self._origin_keeps = origin_keeps_alive(head) and framer.kind is not (
                BodyKind.CLOSE_DELIMITED
            )
            body = self._req_body
            if framer.kind is BodyKind.CLOSE_DELIMITED or (body is not None and not body.done):
                # The end can only be shown by closing, or the request is still arriving and
                # the origin will not read the rest of it: close after this response.
                self._close_after = True
            if self._close_after:
                connection: str | None = "close"
            elif head.version == "HTTP/1.0" or self._request.version == "HTTP/1.0":
                connection = "keep-alive"
            else:
                connection = None
            self.transport.write(rewrite_response_head(head, connection=connection))
            self._resp_started = True
            self._resp_body = framer.tracker()
            return bytes(data)

    def origin_eof(self, port: UpstreamPort, *, error: bool) -> None:
        if port is not self._port:
            return
        port.reusable = False
        self._origin_keeps = False
        if self.phase is not Phase.EXCHANGE:
            self._drop_port()
            return
        if self._resp_body is None:
            if self._resp_parser is not None:
                if self._may_retry():
                    # RFC 9112 section 9.3.1: a persistent connection the origin closed just
                    # as we reused it; an idempotent request without a body is sent again on
                    # a new connection instead of failing the client.
                    assert self._request is not None
                    log.debug("http %s: reused origin connection closed; retrying", self.peer)
                    self._drop_port()
                    self.phase = Phase.DIALING
                    self.update_reading()
                    framer = BodyFramer.for_request(self._request)
                    self.listener.spawn(self._dial(self._request, framer), f"http-{self.peer}")
                    return
                self._origin_failed(error_response(502), "origin closed before its response")
            return  # else the response was complete; _send_request ends the exchange
        if error:
            self._abort("origin connection failed in the middle of the response")
            return
        try:
            self._resp_body.receive_eof()
        except HttpError as exc:
            self._abort(f"response cut short: {exc}")
            return
        self._response_done()

    def _response_done(self) -> None:
        self._resp_body = None
        body = self._req_body
        if body is None:
            return  # answered while attaching, before the request went out: _send_request ends it
        if not body.done:
            self._close_after = True
        self._exchange_done()

    def _exchange_done(self) -> None:
        if self._port is not None:
            if self._origin_keeps and not self._close_after:
                self._port.reusable = True
            else:
                self._drop_port()
        if self._close_after:
            self._close()
            return
        self._request = None
        self._req_body = None
        self._resp_parser = None
        self.phase = Phase.HEAD
        self._start_timer()
        self._read_head()
        self.update_reading()

    def _may_retry(self) -> bool:
        request = self._request
        return (
            self._reused
            and not self._answered
            and request is not None
            and request.method in IDEMPOTENT_METHODS
            and BodyFramer.for_request(request).kind is BodyKind.NONE
        )

    # -- endings -------------------------------------------------------------------------------

    def _origin_failed(self, reply: bytes, why: str) -> None:
        self._fail(b"" if self._resp_started else reply, why)

    def _fail(self, reply: bytes, why: str) -> None:
        self.listener.failed += 1
        log.info("http client %s: %s", self.peer, why)
        if reply and not self.transport.is_closing():
            self.transport.write(reply)
        self._close()

    def _abort(self, why: str) -> None:
        """The response cannot be completed: a reset (RST, not abort's FIN), so the client
        cannot take the truncated body for a complete one."""
        log.info("http client %s: %s", self.peer, why)
        self.phase = Phase.CLOSED
        self._drop_port()
        reset_transport(self.transport)

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self._drop_port()
        if not self.transport.is_closing():
            self.transport.close()

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            port.shutdown()

    def _start_timer(self) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(KEEPALIVE_TIMEOUT, self._timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> None:
        self._timer = None
        if self.phase is Phase.HEAD:
            log.debug("http client %s: idle keep-alive connection closed", self.peer)
            self._close()
