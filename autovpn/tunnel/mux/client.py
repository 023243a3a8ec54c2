"""The tunnel client: a small pool of mux connections to one server, kept up by reconnects.

``TunnelClient.open_stream(host, port)`` picks the live connection with the fewest streams
(among equals, each in turn), opens a stream and waits for the server's OPEN_OK (or its RESET,
raised as StreamError with the reason the listener maps to a SOCKS5 reply or HTTP status).
Names travel to the server unresolved, so the client never leaks DNS for tunnelled names.

Connect errors are told apart: a *permanent* one (the server refused the secret, its
certificate is not trusted, it speaks another protocol version) is retried only after
``permanent_backoff`` (minutes), and meanwhile new streams fail at once with the reason
(``TunnelUnavailable.permanent``); a transient one (unreachable, reset, timed out) is retried
with exponential backoff, cut short when a stream is waiting (``kick``).  A server name that
resolves to several addresses is tried address by address (backup IPs), the last one that
worked first.  Several servers are the business of ``autovpn.tunnel.mux.pool``.

A connection whose server has not answered for two keepalive intervals is *stalled*
(``MuxConnection._keepalive``): new streams skip it, and while no healthy connection is left
they fail at once with "tunnel stalled: ..." instead of waiting for an answer that is not
coming.  That knowledge outlives the connection: after the keepalive timeout closes it, new
streams keep failing fast until a new connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, cast

from autovpn.config import IDLE_TIMEOUT, ReverseSpec, ServerURL
from autovpn.errors import (
    RemoteProtocolError,
    ResetReason,
    StreamError,
    TunnelUnavailable,
)
from autovpn.eventloop import HeapTrimmer
from autovpn.net import resolve_target
from autovpn.stats import Flow
from autovpn.tunnel.failover import Attempting, Attempts
from autovpn.tunnel.failures import Failing, certificate_reason
from autovpn.tunnel.mux.connection import DEFAULT_WINDOW, MuxConnection, StreamEndpoint
from autovpn.tunnel.mux.reverse import ReverseClient
from autovpn.tunnel.tls import client_context
from autovpn.wire import frames, handshake, http1
from autovpn.wire.frames import StreamKind

log = logging.getLogger("autovpn.tunnel.client")

#: What one connection attempt may raise; anything else is a bug and propagates.
CONNECT_ERRORS: Final = (OSError, TimeoutError, RemoteProtocolError, ssl.SSLError)
#: The WebSocket close code of a server that refused our AUTH frame (docs/protocol.md).
CLOSE_AUTH_REFUSED: Final = 1008
SECRET_REFUSED: Final = "server refused the secret (check --secret-file and --user)"


def permanent_reason(exc: BaseException) -> str:
    """Why retrying ``exc`` soon cannot help, as one line that says what to do; "" when it is
    transient (unreachable, reset, timed out, a proxy in front answering 502...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_reason(exc)
    if isinstance(exc, handshake.HandshakeError):
        if exc.status in (401, 403):
            return SECRET_REFUSED
        if exc.status == 400:
            return (
                "server refused the handshake: it may run an older autovpn (update it) or"
                " another protocol"
            )
        if exc.status == 404:
            return "server has no tunnel at this path (check --http-upgrade-path-prefix)"
    return ""


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@dataclass(slots=True)
class ClientSettings:
    server: ServerURL
    user: str
    secret: bytes = field(repr=False)  # never in a repr: they end up in logs and tracebacks
    ssl_context: ssl.SSLContext | None = None
    sni: str | None = None  # --tls-sni-override
    path_prefix: str = handshake.DEFAULT_PATH_PREFIX
    host_header: str | None = None
    pool_size: int = 1
    window: int = DEFAULT_WINDOW
    connect_timeout: float = 10.0
    open_timeout: float = 15.0
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    #: A stream that relayed nothing either way this long is reset (0: never).
    idle_timeout: float = IDLE_TIMEOUT
    max_backoff: float = 5.0
    #: After a permanent error (see ``permanent_reason``): minutes, not seconds.
    permanent_backoff: float = 300.0
    #: The server name's addresses (backup IPs), in the order to try; None: the system's
    #: resolver (``getaddrinfo``), as for any name we connect to ourselves.  IP literals are
    #: never resolved.
    resolve: Callable[[str, int], Awaitable[list[str]]] | None = None
    extra_headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    reverse: tuple[ReverseSpec, ...] = ()  # -R: listeners to ask the server for


class _ClientHandshake(asyncio.Protocol):
    """Sends the upgrade request and reads the answer; then hands the transport to the mux."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._parser = http1.ResponseHeadParser(handshake.RESPONSE_LIMITS)
        self._key = os.urandom(16)
        self._nonce = os.urandom(16)
        s = settings
        self.host = s.host_header or (
            s.server.host if s.server.port in (80, 443) else f"{s.server.host}:{s.server.port}"
        )
        self.path = handshake.tunnel_path(s.path_prefix)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[tuple[handshake.ClientResult, bytes]] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        s = self._settings
        self.transport.write(
            handshake.build_request(
                host=self.host,
                path=self.path,
                user=s.user,
                secret=s.secret,
                now=int(time.time()),
                nonce=self._nonce,
                ws_key=self._key,
                extra_headers=s.extra_headers,
            )
        )

    def auth_frame(self, challenge: str) -> bytes:
        """The AUTH frame answering the server's ``challenge`` (our first mux frame)."""
        s = self._settings
        nonce = handshake.b64url(self._nonce)
        proof = handshake.compute_proof(s.secret, s.user, nonce, challenge, self.host, self.path)
        return handshake.auth_frame(proof)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            head = self._parser.receive_data(data)
            if head is None:
                return
            rest = self._parser.trailing_data
            result = handshake.check_response(head, self._key)
        except RemoteProtocolError as exc:
            self.done.set_exception(exc)
            return
        if self.transport is not None:
            self.transport.pause_reading()
        self.done.set_result((result, rest))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                ConnectionError(f"connection closed during the upgrade: {exc or 'EOF'}")
            )


class StreamUpstream:
    """Hands a local socket to a tunnel stream (see autovpn.proxy.dialer.Upstream)."""

    __slots__ = ("ep",)

    def __init__(self, ep: StreamEndpoint) -> None:
        self.ep = ep

    def bind(self, flow: Flow) -> None:
        """Count this stream's bytes in ``flow``, end it with the stream, and name the server
        the pool chose (the flow's totals are counted at its end)."""
        ep = self.ep
        ep.flow = flow
        flow.meter = ep
        flow.server = ep.conn.peer

    def attach(self, transport: asyncio.Transport) -> None:
        transport.set_protocol(self.ep)
        self.ep.attach(transport)
        if not self.ep.reading_paused:
            transport.resume_reading()


class TunnelClient(Attempting):
    """A pool of tunnel connections.  Use as ``async with TunnelClient(settings) as client``."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.connections: list[MuxConnection] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.connects = 0
        self.failures = 0
        self.streams_opened = 0
        self.last_error = ""
        #: Why the server refused us for good (see ``permanent_reason``), until a connection
        #: is up again; new streams fail at once meanwhile.
        self.permanent = ""
        #: Connection attempts under way and done, and the pause between them (``kick``).
        self.attempts = Attempts()
        self.address = ""  # the address of the last connection that came up (backup IPs)
        #: Called whenever the state may have changed (up, lost, an attempt ended).
        self.on_change: Callable[[], None] | None = None
        self.failing = Failing()  # the run of failed connection attempts, for last_error
        #: Gives back what a burst of streams freed, once they are gone (``HeapTrimmer``).
        self.trimmer = HeapTrimmer()
        # When the last byte came on a connection the keepalive timeout closed, until a new
        # connection is up: the server is known not to answer (see _pick).
        self._silent_since: float | None = None
        # UDP flows (docs/protocol.md, DATAGRAM): flow id -> reply handler, and the connection
        # each flow currently uses.  A flow outlives its connection: after a reconnect its next
        # datagram goes out on a live one and the server starts a new session for it.
        self._flows: dict[int, Callable[[str, int, bytes], None]] = {}
        self._flow_conn: dict[int, MuxConnection] = {}
        self._next_flow = 1
        self.datagrams_dropped = 0
        self._turn = 0  # where _least_loaded starts looking among equally loaded connections
        self.reverse = (
            ReverseClient(settings.reverse, settings.connect_timeout) if settings.reverse else None
        )

    async def __aenter__(self) -> TunnelClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        for i in range(max(1, self.settings.pool_size)):
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._keep_up(), name=f"tunnel-pool-{i}")
            )

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        connections = list(self.connections)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await asyncio.gather(*(conn.shutdown() for conn in connections))
        self.trimmer.close()

    async def wait_up(self, within: float) -> bool:
        """Wait until a tunnel connection is up; False if none came ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while not self.up:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    @property
    def up(self) -> bool:
        """A connection can take new streams (not closed, draining or stalled)."""
        return any(not (c.closed or c.draining or c.stalled) for c in self.connections)

    @property
    def live(self) -> int:
        """Connections that can take new streams."""
        return sum(1 for c in self.connections if not (c.closed or c.draining or c.stalled))

    @property
    def state(self) -> str:
        """``up``, ``stalled`` (it stopped answering), ``down`` (it refused us for good:
        ``permanent`` says why) or ``connecting`` (``last_error`` says what failed last)."""
        if self.up:
            return "up"
        if self.permanent:
            return "down"
        if self.stall_reason():
            return "stalled"
        return "connecting"

    @property
    def reason(self) -> str:
        """Why it takes no stream now ("" when it is up)."""
        if self.up:
            return ""
        return self.permanent or self.stall_reason() or self.last_error

    def kick(self) -> bool:
        """A stream is waiting for this server: start the next connection attempt now (or
        DEMAND_RETRY_GAP after the last one) instead of at the end of its backoff.  True when
        an attempt is under way or about to start; False when none will be soon (a permanent
        error, or every connection is up but stalled)."""
        if self._closing or self.permanent:
            return False
        return self.attempts.kick()

    def _signal(self) -> None:
        self._changed.set()
        if self.on_change is not None:
            self.on_change()

    def stall_reason(self) -> str:
        """Why the server is known not to answer, or "" (see the module docstring)."""
        stalled = [c for c in self.connections if c.stalled and not c.closed]
        if stalled:
            return min(stalled, key=lambda c: c.last_recv).stall_reason()
        since = self._silent_since
        if since is None or any(c.last_recv > since for c in self.connections):
            return ""
        quiet = asyncio.get_running_loop().time() - since
        return f"tunnel stalled: no reply from server {self.settings.server} for {quiet:.0f} s"

    async def addresses(self) -> list[str]:
        """The server's addresses in the order to try: the one that worked last first."""
        s = self.settings
        host = s.server.host
        try:
            async with asyncio.timeout(s.connect_timeout):
                found = await resolve_target(host, s.server.port, lookup=s.resolve)
        except OSError as exc:
            raise OSError(exc.errno, f"{host} does not resolve: {_error_text(exc)}") from exc
        ordered = list(dict.fromkeys(found))
        if self.address in ordered:
            ordered.remove(self.address)
            ordered.insert(0, self.address)
        if not ordered:
            raise OSError(f"{host} resolves to no address")
        return ordered

    async def connect_once(self) -> MuxConnection:
        """Open one tunnel connection (TCP, TLS, upgrade), trying the server's addresses in
        turn (backup IPs).  Raises what the last address raised: OSError, TimeoutError,
        HandshakeError, ssl.SSLError; a permanent error at once (every address of the server
        would say the same)."""
        failed: list[str] = []
        last: BaseException | None = None
        for address in await self.addresses():
            try:
                mux = await self._connect_to(address)
            except CONNECT_ERRORS as exc:
                if permanent_reason(exc):
                    raise
                last = exc
                failed.append(f"{address}: {_error_text(exc)}")
                log.debug("tunnel to %s via %s failed: %s", self.settings.server, address, exc)
                continue
            self.address = address
            return mux
        assert last is not None
        if len(failed) == 1:
            raise last
        raise OSError(f"all {len(failed)} addresses failed: " + "; ".join(failed)) from last

    async def _connect_to(self, address: str) -> MuxConnection:
        s = self.settings
        loop = asyncio.get_running_loop()
        ctx = s.ssl_context if s.server.tls else None
        if s.server.tls and ctx is None:
            ctx = client_context()
        async with asyncio.timeout(s.connect_timeout):
            transport, proto = await loop.create_connection(
                lambda: _ClientHandshake(s),
                address,
                s.server.port,
                ssl=ctx,
                server_hostname=(s.sni or s.server.host) if ctx is not None else None,
            )
            try:
                result, rest = await proto.done
            except BaseException:
                transport.abort()
                raise
        mux = MuxConnection(
            client=True,
            unmasked=result.unmasked,
            window=s.window,
            keepalive_interval=s.keepalive_interval,
            keepalive_timeout=s.keepalive_timeout,
            on_lost=self._lost,
            on_datagram=self._on_datagram,
            on_open=self.reverse.on_open if self.reverse is not None else None,
            peer=str(s.server),
            trimmer=self.trimmer,
            idle_timeout=s.idle_timeout,
        )
        transport.set_protocol(mux)
        mux.connection_made(transport)
        # AUTH goes out first, in the same write as whatever streams open during this loop
        # iteration: the server checks it before their OPENs, so answering the challenge adds
        # no round trip to the connection's first stream.
        mux.send_frame(proto.auth_frame(result.challenge))
        if rest:
            mux.receive(rest)
        transport.resume_reading()
        return mux

    async def _keep_up(self) -> None:
        backoff = 0.1
        while not self._closing:
            with self.attempts.attempt():
                try:
                    mux: MuxConnection | BaseException = await self.connect_once()
                except CONNECT_ERRORS as exc:
                    mux = exc
            if isinstance(mux, BaseException):
                delay = self._failed(mux, backoff)
                if not self.permanent:
                    backoff = min(backoff * 2, self.settings.max_backoff)
                await self.attempts.pause(delay)
                continue
            backoff = 0.1
            self.connects += 1
            self.failures = 0
            self.permanent = ""
            self.failing.ended()
            self._silent_since = None
            log.info("tunnel connection to %s is up", self.settings.server)
            self.connections.append(mux)
            if self.reverse is not None:
                self.reverse.register_on(mux)
            self._signal()
            if not await self._hold(mux):
                if self.reverse is not None:
                    self.reverse.release_on(mux)
                # GOAWAY: its streams finish there, and the connection stays listed (``_lost``
                # takes it out) while a new one is opened for new streams at once.  Streams
                # the server refused for the GOAWAY are tried again on the new one (the pool).
                log.info(
                    "tunnel connection to %s is closing (GOAWAY); opening another",
                    self.settings.server,
                )
                self._signal()
                continue
            if self._closing:
                break
            if mux.close_code == CLOSE_AUTH_REFUSED:
                # The 101 came, then the server closed on our AUTH frame: the secret.
                self.permanent = self.last_error = SECRET_REFUSED
                log.error(
                    "tunnel to %s: %s; retrying in %.0f s",
                    self.settings.server,
                    SECRET_REFUSED,
                    self.settings.permanent_backoff,
                )
                self._signal()
                await self.attempts.pause(self.settings.permanent_backoff)
                continue
            log.warning("tunnel connection to %s lost; reconnecting", self.settings.server)
            self._signal()

    async def _hold(self, mux: MuxConnection) -> bool:
        """Wait until ``mux`` is lost (True) or starts draining (False: it stays up for the
        streams it has).  Cancelled (the client closes): it is ``close``'s to shut down."""
        if mux.draining and not mux.closed:
            return False
        drain: asyncio.Future[None] = mux.loop.create_future()

        def drained() -> None:
            if not drain.done():
                drain.set_result(None)

        mux.on_drain = drained
        try:
            # asyncio.wait cancels neither future: cancelling us must not cancel ``lost``.
            await asyncio.wait([mux.lost, drain], return_when=asyncio.FIRST_COMPLETED)
        finally:
            mux.on_drain = None
            drain.cancel()
        if not mux.lost.done():
            return False
        if mux in self.connections:
            self.connections.remove(mux)
        if not self._closing:
            mux.abort()
        return True

    def _failed(self, exc: BaseException, backoff: float) -> float:
        """Record a failed attempt; the delay before the next."""
        self.failures += 1
        self.last_error = self.failing.failed(exc, self.settings.server)
        reason = permanent_reason(exc)
        if reason:
            delay = self.settings.permanent_backoff
            if reason != self.permanent:
                # The error's own words, unless the reason already is them (certificates).
                detail = "" if self.last_error.startswith(reason) else f" ({self.last_error})"
                log.error(
                    "tunnel to %s: %s; retrying in %.0f s%s",
                    self.settings.server,
                    reason,
                    delay,
                    detail,
                )
            self.permanent = reason
        else:
            delay = backoff
            self.permanent = ""
            level = (
                logging.WARNING
                if self.failures in (1, 10) or self.failures % 100 == 0
                else logging.DEBUG
            )
            log.log(
                level,
                "tunnel to %s failed: %s (retrying in %.1f s)",
                self.settings.server,
                self.last_error,
                delay,
            )
        self._signal()
        return delay

    # -- UDP flows ---------------------------------------------------------------------------

    def open_flow(self, on_reply: Callable[[str, int, bytes], None]) -> int:
        """A new UDP flow; ``on_reply(host, port, data)`` gets the datagrams coming back."""
        flow = self._next_flow
        self._next_flow = (self._next_flow + 2) & 0xFFFFFFFF or 1
        self._flows[flow] = on_reply
        return flow

    def close_flow(self, flow: int) -> None:
        self._flows.pop(flow, None)
        conn = self._flow_conn.pop(flow, None)
        if conn is not None and not conn.closed:
            conn.send_frame(frames.frame(frames.FrameType.DATAGRAM, flow))  # empty: flow ends

    def send_datagram(self, flow: int, host: str, port: int, data: bytes) -> bool:
        """Send one datagram on ``flow``; False (and counted) when it had to be dropped.

        Datagrams are never queued behind stream flow control or a stalled connection: with
        no live connection, or one whose write buffer is above its high-water mark, they are
        dropped, as a congested network would.
        """
        conn = self._flow_conn.get(flow)
        if conn is None or conn.closed or conn.stalled:
            live = [c for c in self.connections if not (c.closed or c.draining or c.stalled)]
            if not live:
                self.datagrams_dropped += 1
                return False
            conn = self._least_loaded(live)
            self._flow_conn[flow] = conn
        if conn.writing_paused or len(data) > frames.MAX_DATAGRAM_PAYLOAD:
            self.datagrams_dropped += 1
            return False
        conn.send_datagram(flow, frames.encode_address(host, port), data)
        return True

    def _on_datagram(self, conn: MuxConnection, flow: int, payload: bytes) -> None:
        handler = self._flows.get(flow)
        if handler is None or not payload:
            return
        try:
            host, port, end = frames.decode_address(payload)
        except RemoteProtocolError:
            self.datagrams_dropped += 1
            return
        handler(host, port, payload[end:])

    def _lost(self, mux: MuxConnection) -> None:
        if mux in self.connections:
            self.connections.remove(mux)
        if self.on_change is not None and not self._closing:
            self.on_change()
        # The latest news from the server wins: silence, or an answer after the silence.
        since = self._silent_since
        if mux.timed_out and not self._closing:
            self._silent_since = mux.last_recv if since is None else max(since, mux.last_recv)
        elif since is not None and mux.last_recv > since:
            self._silent_since = None

    def _least_loaded(self, live: list[MuxConnection]) -> MuxConnection:
        """The live connection with the fewest open streams; among equals, the next one in
        turn.  Without the turn, streams that end before the next one opens (short requests)
        would all ride the first connection, and behind ``autovpn server --workers N`` one
        worker would do all the work (the pool's connections land on different workers)."""
        n = len(live)
        if n == 1:
            return live[0]
        self._turn = start = (self._turn + 1) % n
        best = live[start]
        fewest = len(best.streams)
        for i in range(1, n):
            c = live[(start + i) % n]
            if len(c.streams) < fewest:
                best, fewest = c, len(c.streams)
        return best

    async def _pick(self) -> MuxConnection:
        live = [c for c in self.connections if not (c.closed or c.draining or c.stalled)]
        if live:  # the common case, without touching the loop
            return self._least_loaded(live)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        while True:
            live = [c for c in self.connections if not (c.closed or c.draining or c.stalled)]
            if live:
                return self._least_loaded(live)
            if self.permanent:
                raise TunnelUnavailable(
                    f"{self.settings.server}: {self.permanent}",
                    public=f"tunnel down: {self.permanent}",
                    permanent=True,
                )
            stalled = self.stall_reason()
            if stalled:
                # Waiting could only end at the keepalive timeout or the connect timeout.
                raise TunnelUnavailable(stalled)
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                raise TunnelUnavailable(
                    f"no tunnel connection to {self.settings.server}"
                    + (f": {self.last_error}" if self.last_error else "")
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    async def open_socket_stream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A tunnel stream as asyncio streams (the split resolver's DNS over TCP, a
        ``routing.dns.StreamOpener``): the stream is attached to one end of a socket pair and
        the caller gets asyncio streams on the other (real sockets, nothing faked)."""
        return await socket_stream(await self.open_stream(host, port))

    async def open_upstream(self, host: str, port: int, early: bytes = b"") -> StreamUpstream:
        """``open_stream`` for the dialer: the result relays a local socket once attached."""
        return StreamUpstream(await self.open_stream(host, port, early))

    async def open_stream(
        self, host: str, port: int, early: bytes = b"", kind: StreamKind = StreamKind.TCP
    ) -> StreamEndpoint:
        """Open a stream to host:port through the tunnel; returns once the server connected.

        Raises StreamError (with the server's reason) or TunnelUnavailable.
        """
        conn = await self._pick()
        ep = StreamEndpoint(conn)
        ep.opened = opened = conn.loop.create_future()
        # Early data beyond what OPEN may carry waits for OPEN_OK like any read past credit.
        early, ep.unsent = early[: frames.MAX_EARLY_DATA], early[frames.MAX_EARLY_DATA :]
        try:
            conn.open_stream(ep, host, port, early, kind)
        except ValueError as exc:  # a name that cannot be encoded (over 255 bytes as IDNA)
            raise StreamError(ResetReason.HOST_UNREACHABLE, str(exc)) from None
        # A timer on the future, not ``asyncio.timeout``: that context manager costs ~4 µs
        # (it looks up the current task and the running loop), once per stream.
        timer = conn.loop.call_later(self.settings.open_timeout, _expire, opened)
        try:
            await opened
        except TimeoutError:
            ep.on_reset(ResetReason.TIMED_OUT, "no answer from the tunnel server", False)
            conn.reset_stream(ep.sid, ResetReason.CANCELLED, "open timed out")
            raise StreamError(
                ResetReason.TIMED_OUT,
                "tunnel server did not answer",
                tunnel=True,
                sent=ep.sid < conn.written_below,
            ) from None
        except asyncio.CancelledError:
            if not ep.done:
                ep.done = True
                conn.reset_stream(ep.sid, ResetReason.CANCELLED, "cancelled")
            raise
        finally:
            timer.cancel()
        self.streams_opened += 1
        return ep


async def socket_stream(ep: StreamEndpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An open stream as asyncio streams: attached to one end of a socket pair, the caller
    gets the other (real sockets, nothing faked)."""
    ours, theirs = socket.socketpair()
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: ep, theirs)
    except BaseException:
        ours.close()
        theirs.close()
        ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED, "dns stream not attached")
        raise
    return await asyncio.open_connection(sock=ours)


def _expire(opened: asyncio.Future[None]) -> None:
    if not opened.done():
        opened.set_exception(TimeoutError())
