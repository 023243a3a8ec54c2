"""The tunnel server: accepts upgraded connections and dials the targets their streams name.

Each accepted TCP connection starts in ``_ServerHandshake``.  It is counted against its client's
address at once (``max_connections_per_address``), before its TLS handshake, which the
handshake then runs itself (``loop.start_tls``): a peer that opens TLS handshakes and never ends
them holds connections of its own address's allowance, not of everyone's.  It then reads one
HTTP head and answers it: the tunnel path with good credentials gets 101 and the transport
passes to a ``MuxConnection``; anything else gets a plain, uninformative answer (404 for other
paths, 401/403 for credentials, 400 for a broken upgrade) and is closed.

Targets are resolved here, on the server, then checked against the destination policy address
by address (so a name cannot smuggle a loopback target past it) and tried in order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from autovpn.config import (
    DEFAULT_AUTH_FAILURE_LIMIT,
    DEFAULT_AUTH_FAILURE_WINDOW,
    DEFAULT_REVERSE_BINDS,
    IDLE_TIMEOUT,
    MAX_REVERSE_LISTENERS_PER_CLIENT,
    SERVER_HANDSHAKE_TIMEOUT,
)
from autovpn.errors import AuthenticationFailed, RemoteProtocolError, ResetReason
from autovpn.eventloop import HeapTrimmer
from autovpn.ifaddrs import HostAddresses
from autovpn.limits import (
    MAX_PENDING_OPENS,
    MAX_STREAMS_PER_CONNECTION,
    SERVER_MAX_CONNECTIONS_PER_ADDRESS,
    ConnectionsPerAddress,
    peer_key,
)
from autovpn.net import (
    LOOKUP_TIMEOUT,
    MAX_LOOKUPS_PER_ADDRESS,
    SystemResolver,
    reset_reason_for,
    resolve_target,
)
from autovpn.policy import DestinationPolicy
from autovpn.ports import bind_error
from autovpn.stats import TUNNEL, Flow, Stats
from autovpn.tunnel.auth_limit import AuthFailureLimiter
from autovpn.tunnel.mux.connection import DEFAULT_WINDOW, MuxConnection, StreamEndpoint, open_ok
from autovpn.tunnel.mux.reverse import ReverseListeners
from autovpn.tunnel.mux.udp import UdpFlows
from autovpn.wire import handshake, http1
from autovpn.wire.frames import StreamKind

log = logging.getLogger("autovpn.tunnel.server")

T = TypeVar("T")

#: A peer has this long for each step of its handshake: TLS, then the upgrade request, then the
#: AUTH frame after the 101 (``[server] handshake_timeout``; wstunnel peers have the first two).
#: Bytes do not extend it, so idle and slowloris connections are closed while others are served.
HANDSHAKE_TIMEOUT = SERVER_HANDSHAKE_TIMEOUT


@dataclass(slots=True)
class ServerSettings:
    host: str
    port: int
    users: dict[str, bytes] = field(repr=False)  # the secrets: never in a repr
    ssl_context: ssl.SSLContext | None = None
    path_prefix: str = handshake.DEFAULT_PATH_PREFIX
    policy: DestinationPolicy = field(default_factory=DestinationPolicy)
    window: int = DEFAULT_WINDOW
    connect_timeout: float = 10.0
    #: For each step of the handshake (TLS, upgrade request, AUTH): see HANDSHAKE_TIMEOUT.
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    udp_idle_timeout: float = 180.0
    #: A stream (or wstunnel tunnel) that relayed nothing either way this long is reset.
    idle_timeout: float = IDLE_TIMEOUT
    #: Addresses native reverse tunnels (-R) may bind on the server: loopback unless opened.
    reverse_binds: tuple[str, ...] = DEFAULT_REVERSE_BINDS
    #: Reverse listeners one client may hold (native users and wstunnel clients alike).
    max_reverse_listeners_per_client: int = MAX_REVERSE_LISTENERS_PER_CLIENT
    #: Authentication failures (either protocol) one address may have within
    #: ``auth_failure_window`` seconds; then it is refused at once (429) that long.  0: off.
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT
    auth_failure_window: float = DEFAULT_AUTH_FAILURE_WINDOW
    #: A worker of ``autovpn server --workers N`` listens on the sockets its supervisor opened
    #: (descriptors, one per address of ``host``; autovpn/reuseport.py) instead of binding.
    listen_fds: tuple[int, ...] = ()
    #: Streams one tunnel connection may have open; OPENs past it get REFUSED_STREAM.
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    #: Streams of one tunnel connection being resolved or dialled at once; more: REFUSED_STREAM.
    max_pending_opens: int = MAX_PENDING_OPENS
    #: TCP connections one client address may hold (handshakes, tunnels, wstunnel tunnels).
    max_connections_per_address: int = SERVER_MAX_CONNECTIONS_PER_ADDRESS
    #: Seconds a destination name's lookup may take (the system resolver: net.SystemResolver).
    lookup_timeout: float = LOOKUP_TIMEOUT
    #: Lookups one client address may have in the lookup threads at once; more wait their turn.
    max_lookups_per_address: int = MAX_LOOKUPS_PER_ADDRESS
    #: Resolves target names (default: the system's getaddrinfo; like it, raises OSError on
    #: failure); tests point it at a loopback DNS server so that no test name reaches the
    #: system resolver.
    resolve: Callable[[str, int], Awaitable[list[str]]] | None = None


def too_many_failures(wait: float) -> bytes:
    """The answer to an address refused for its authentication failures (``auth_limit``)."""
    body = b"429 Too Many Requests\n"
    headers = [("Content-Type", "text/plain"), ("Retry-After", str(math.ceil(wait)))]
    return http1.response(429, None, headers, body)


class _ServerHandshake(asyncio.Protocol):
    def __init__(self, server: TunnelServer) -> None:
        self._server = server
        self._parser = http1.RequestHeadParser(handshake.REQUEST_LIMITS)
        #: The transport the upgrade is read from (the TLS one, once its handshake is over).
        self.transport: asyncio.Transport | None = None
        #: The transport the per-address count holds for this connection (see ``_tls``).
        self._counted: asyncio.BaseTransport | None = None
        #: TLS bytes read before ``_handover`` gave the connection to the TLS layer.
        self._ciphertext: bytearray | None = None
        #: Decrypted bytes that arrived between the TLS handshake's end and ``_tls`` resuming.
        self._early: bytearray | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The accepted TCP connection, TLS or not (the server has no ssl= of its own).
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        # Counted until the connection ends, whoever owns it by then: the mux and wstunnel
        # release it when their connection is lost.  Counted from the accept, so that TLS
        # handshakes in progress are bounded per address like every other connection.
        # (uvloop's transports are not asyncio.Transport subclasses, only alike.)
        tcp = cast(asyncio.Transport, transport)
        if not self._server.clients.admit(tcp, str(peer[0]) if peer else "?"):
            tcp.abort()  # past server.max_connections_per_address (logged there)
            return
        self._counted = tcp
        context = self._server.settings.ssl_context
        if context is None:
            self._upgrade_from(tcp)
        else:
            self._tls(tcp, context)

    def _tls(self, tcp: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Run the TLS handshake (``start_tls``, within ``handshake_timeout``); then the
        upgrade request (``_tls_done``).

        asyncio's own ``create_server(ssl=...)`` calls ``connection_made`` only once the
        handshake is over, too late to count the connection while its handshake is in
        progress; so the server accepts plain TCP and starts TLS here, one task per
        connection (next to a handshake's public-key operations: +30 µs of 550,
        docs/benchmarks.md).  The client's first bytes may be read before that task runs
        (uvloop starts reading right after ``connection_made``): ``data_received`` keeps
        them and pauses reading, and ``_handover`` gives them to the TLS layer."""
        loop = asyncio.get_running_loop()
        self._ciphertext = bytearray()
        task = self._server.track(
            loop.create_task(
                loop.start_tls(
                    tcp,
                    self,
                    context,
                    server_side=True,
                    ssl_handshake_timeout=self._server.settings.handshake_timeout,
                )
            )
        )
        # Callbacks run in the order they were scheduled: the task's first step comes first,
        # and in it start_tls does all of this before it waits: pause reading, install its
        # protocol, schedule that protocol's connection_made and the resume of reading.  So
        # the bytes ``_handover`` gives it come before any the resumed transport reads.
        loop.call_soon(self._handover, tcp, task)
        task.add_done_callback(functools.partial(self._tls_done, tcp))

    def _handover(
        self, tcp: asyncio.Transport, task: asyncio.Task[asyncio.Transport | None]
    ) -> None:
        ciphertext, self._ciphertext = self._ciphertext, None
        self._early = bytearray()
        layer = tcp.get_protocol()
        if ciphertext and layer is not self and not task.done():
            _feed(layer, bytes(ciphertext))

    def _tls_done(
        self, tcp: asyncio.Transport, task: asyncio.Task[asyncio.Transport | None]
    ) -> None:
        if task.cancelled():  # the server closes
            tcp.abort()
            self._release()
            return
        exc = task.exception()
        if exc is not None:  # a failed or timed-out handshake, a peer that left (start_tls
            # closed the connection): an ordinary event, so not above debug.
            log.debug("tunnel peer %s: TLS handshake failed: %r", self._peer, exc)
            self._release()
            return
        upgraded = task.result()
        if upgraded is None or upgraded.is_closing() or self._counted is None:
            self._release()  # it ended before this callback ran
            return
        self._server.clients.replace(tcp, upgraded)  # its next owners release this one
        self._counted = upgraded
        early, self._early = self._early, None
        self._upgrade_from(upgraded)
        if early:
            self.data_received(bytes(early))

    def _upgrade_from(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(
            self._server.settings.handshake_timeout, self._timeout
        )

    def _release(self) -> None:
        if self._counted is not None:
            self._server.clients.release(self._counted)
            self._counted = None

    def _timeout(self) -> None:
        log.info(
            "tunnel peer %s: no upgrade request within %g s (server.handshake_timeout)",
            self._peer,
            self._server.settings.handshake_timeout,
        )
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            if self._ciphertext is not None and self._counted is not None:
                # Read before ``_handover`` gave the connection to TLS: kept for it, and no
                # more read meanwhile (start_tls resumes reading).
                self._ciphertext += data
                cast(asyncio.Transport, self._counted).pause_reading()
            elif self._early is not None:  # TLS is up, and ``_tls_done`` has not run yet
                self._early += data
            return
        if self._parser.state in (http1.ParserState.DONE, http1.ParserState.FAILED):
            return  # answered and closing: what still arrives is not read
        try:
            head = self._parser.receive_data(data)
            if head is None:
                return
            rest = self._parser.trailing_data
            wait = self._server.auth_blocked(self._peer)
            if wait:
                # Refused before any secret or MAC is looked at; not logged one by one (the
                # line that started the block said it), so a flood does not flood the log.
                self._server.refused += 1
                self.transport.write(too_many_failures(wait))
                self.transport.close()
                self._cancel_timer()
                return
            if head.start_line == "PRI * HTTP/2.0":
                # An HTTP/2 preface (h2c prior knowledge, or ALPN h2): only an alternative
                # protocol (wstunnel's HTTP/2 transport) can serve it.
                for alternative in self._server.alternatives:
                    if alternative(head, self.transport, rest, self._peer):
                        self._cancel_timer()
                        return
            _, path = handshake.request_target(head)
            if path != handshake.tunnel_path(self._server.settings.path_prefix):
                for alternative in self._server.alternatives:
                    if alternative(head, self.transport, rest, self._peer):
                        # Another protocol (wstunnel) took the connection over.
                        self._cancel_timer()
                        return
                raise handshake.HandshakeError(
                    # Not the path itself: a wstunnel client's may carry a secret (-P SECRET).
                    f"request for an unknown path ({len(path)} characters)",
                    404,
                    reply=handshake.plain_response(404, "Not Found"),
                )
            accepted = handshake.accept_request(
                head,
                path=path,
                users=self._server.settings.users,
                replay=self._server.replay,
                now=time.time(),
                challenge=os.urandom(handshake.CHALLENGE_SIZE),
            )
        except RemoteProtocolError as exc:
            level = logging.WARNING if isinstance(exc, AuthenticationFailed) else logging.INFO
            log.log(level, "tunnel peer %s refused: %s", self._peer, exc)
            self._server.refused += 1
            if isinstance(exc, AuthenticationFailed):
                self._server.auth_failed(self._peer)
            if isinstance(exc, http1.HttpError):
                # A head we cannot read: the same bare answer as the handshake's refusals.
                self.transport.write(handshake.plain_response(exc.status))
            elif exc.reply:
                self.transport.write(exc.reply)
            elif not isinstance(exc, handshake.HandshakeError):
                self.transport.write(handshake.plain_response(400, "Bad Request"))
            self.transport.close()
            self._cancel_timer()
            return
        self._cancel_timer()
        self.transport.write(accepted.response)
        # Not "connected" yet: the mux dispatches nothing before the AUTH frame passed.
        mux = self._server.make_mux(accepted, self._peer, self.transport)
        self.transport.set_protocol(mux)
        mux.connection_made(self.transport)
        if rest:
            mux.receive(rest)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._ciphertext = self._early = None
        self._release()
        self._server.trimmer.released()  # refused, timed out or gone before its upgrade


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to ``protocol`` as its transport would (TLS layers are buffered)."""
    if isinstance(protocol, asyncio.BufferedProtocol) or hasattr(protocol, "get_buffer"):
        buffered = cast(asyncio.BufferedProtocol, protocol)
        view = memoryview(data)
        while view:
            buffer = memoryview(buffered.get_buffer(len(view)))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            buffered.buffer_updated(n)
            view = view[n:]
    else:
        cast(asyncio.Protocol, protocol).data_received(data)


class TunnelServer:
    """Serves the tunnel on one address.  ``async with TunnelServer(settings) as server``."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        if settings.policy.local_addresses is None:
            # The policy is sans-I/O: the server gives it this host's own addresses, read from
            # the interfaces, so a target on the host's public address is refused like loopback.
            settings.policy.local_addresses = HostAddresses()
        self.replay = handshake.ReplayCache()
        self.connections: set[MuxConnection] = set()
        self.refused = 0
        self.streams_opened = 0
        self.streams_failed = 0
        #: Per-user counters (``autovpn.stats``), when the engine keeps statistics.
        self.stats: Stats | None = None
        #: One per listening socket (one, or one per address of a worker's listen host).
        self._servers: list[asyncio.Server] = []
        self._dials: set[asyncio.Task[None]] = set()
        #: TLS handshakes in progress (``_ServerHandshake._tls``), cancelled on close.
        self._handshakes: set[asyncio.Task[Any]] = set()
        #: Dials in progress per tunnel connection (``settings.max_pending_opens``).
        self._opening: dict[MuxConnection, int] = {}
        #: TCP connections per client address (``settings.max_connections_per_address``):
        #: admitted when accepted, released by whoever owns the connection when it ends.
        self.clients = ConnectionsPerAddress(
            settings.max_connections_per_address, "server.max_connections_per_address"
        )
        #: Destination names of every user (native streams and UDP targets, wstunnel tunnels)
        #: are looked up here: bounded per lookup and per client address (net.SystemResolver).
        self.lookups = SystemResolver(settings.lookup_timeout, settings.max_lookups_per_address)
        #: UDP sessions (DATAGRAM frames); made in ``start`` (it needs the running loop).
        self.udp: UdpFlows | None = None
        self.reverse = ReverseListeners(
            settings.reverse_binds, settings.max_reverse_listeners_per_client
        )
        self.auth_failures = AuthFailureLimiter(
            settings.auth_failure_limit, settings.auth_failure_window
        )
        #: The user each tunnel connection authenticated as (reverse listeners are per user).
        self._users: dict[MuxConnection, str] = {}
        #: Gives back to the system what ended connections freed (see HeapTrimmer).
        self.trimmer = HeapTrimmer()
        #: Other protocols served on the same port (wstunnel): each is offered every request
        #: whose path is not our tunnel path, with the transport and the bytes after the head,
        #: and returns True when it took the connection over (it then owns the transport).
        self.alternatives: list[
            Callable[[http1.RequestHead, asyncio.Transport, bytes, str], bool]
        ] = []

    async def __aenter__(self) -> TunnelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        assert self._servers and self._servers[0].sockets
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    def _connection_lost(self, conn: MuxConnection) -> None:
        self.connections.discard(conn)
        self._users.pop(conn, None)
        if self.udp is not None:
            self.udp.connection_lost(conn)
        self.trimmer.released()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self.udp = UdpFlows(s.policy, s.udp_idle_timeout, lookups=self.lookups)
        try:
            if s.listen_fds:
                for fd in s.listen_fds:
                    self._servers.append(
                        await loop.create_server(
                            lambda: _ServerHandshake(self),
                            sock=socket.socket(fileno=fd),
                            backlog=1024,
                        )
                    )
            else:
                self._servers.append(
                    await loop.create_server(
                        lambda: _ServerHandshake(self), s.host, s.port, backlog=1024
                    )
                )
        except OSError as exc:
            raise bind_error("tunnel server", s.host, s.port, exc) from exc
        log.info(
            "tunnel server listening on %s://%s:%d%s",
            "wss" if s.ssl_context else "ws",
            s.host,
            self.port,
            # A prefix other than the default is a secret of sorts (-P): not in the log.
            handshake.tunnel_path(s.path_prefix)
            if s.path_prefix == handshake.DEFAULT_PATH_PREFIX
            else " (with its path prefix)",
        )

    async def close(self) -> None:
        for listening in self._servers:
            listening.close()
        connections = list(self.connections)
        for conn in connections:
            conn.goaway()
        for task in [*self._dials, *self._handshakes]:
            task.cancel()
        if self._dials or self._handshakes:
            await asyncio.gather(*self._dials, *self._handshakes, return_exceptions=True)
        if self.udp is not None:
            await self.udp.close()
        await asyncio.gather(*(conn.shutdown() for conn in connections))
        servers, self._servers = self._servers, []
        for listening in servers:
            await listening.wait_closed()
        self.trimmer.close()

    def track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """A connection's TLS handshake: the server cancels it when it closes."""
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        return task

    def auth_blocked(self, peer: str) -> float:
        """Seconds the address of ``peer`` (``host:port``) is still refused for, or 0."""
        host, _, _ = peer.rpartition(":")
        return self.auth_failures.blocked(host or peer, time.monotonic())

    def auth_failed(self, peer: str) -> None:
        """Count an authentication failure of ``peer``'s address (either protocol)."""
        host, _, _ = peer.rpartition(":")
        if self.auth_failures.failed(host or peer, time.monotonic()):
            limiter = self.auth_failures
            log.warning(
                "tunnel peer %s: %d authentication failures within %g s: its address is "
                "refused at once for %g s (server.auth_failure_limit)",
                peer,
                limiter.limit,
                limiter.window,
                limiter.window,
            )

    def make_mux(
        self,
        accepted: handshake.Accepted,
        peer: str,
        transport: asyncio.BaseTransport | None = None,
    ) -> MuxConnection:
        """The mux for a connection just sent ``accepted.response`` (the 101).

        It stays unauthenticated until the client's first frame, an AUTH answering the 101's
        challenge, passed ``handshake.check_auth``; a connection that sends anything else, or
        nothing within ``settings.handshake_timeout``, is refused (logged once) before any
        stream or flow.
        """
        s = self.settings
        deadline: asyncio.TimerHandle | None = None
        release = self.clients.releaser(transport) if transport is not None else None

        def authenticate(ftype: int, flags: int, sid: int, payload: bytes | memoryview) -> None:
            if deadline is not None:
                deadline.cancel()
            try:
                handshake.check_auth(accepted, ftype, sid, payload)
            except AuthenticationFailed as exc:
                log.warning("tunnel peer %s refused: %s", peer, exc)
                self.refused += 1
                self.auth_failed(peer)
                raise
            log.info("tunnel peer %s: user %s connected", peer, accepted.user)

        def lost(conn: MuxConnection) -> None:
            if deadline is not None:
                deadline.cancel()
            if release is not None:
                release()
            self._connection_lost(conn)

        mux = MuxConnection(
            client=False,
            unmasked=accepted.unmasked,
            window=s.window,
            keepalive_interval=s.keepalive_interval,
            keepalive_timeout=s.keepalive_timeout,
            on_open=self._on_open,
            on_datagram=self.udp.on_datagram if self.udp is not None else None,
            on_lost=lost,
            authenticate=authenticate,
            peer=f"{peer} ({accepted.user})",
            max_streams=s.max_streams_per_connection,
            trimmer=self.trimmer,
            idle_timeout=s.idle_timeout,
        )
        deadline = mux.loop.call_later(s.handshake_timeout, self._no_auth, mux, peer)
        self.connections.add(mux)
        self._users[mux] = accepted.user
        return mux

    def _no_auth(self, mux: MuxConnection, peer: str) -> None:
        log.warning(
            "tunnel peer %s refused: no AUTH frame within %g s of the 101",
            peer,
            self.settings.handshake_timeout,
        )
        self.refused += 1
        self.auth_failed(peer)
        mux.abort()

    def _on_open(
        self,
        conn: MuxConnection,
        sid: int,
        window: int,
        kind: StreamKind,
        host: str,
        port: int,
        early: bytes,
    ) -> None:
        if kind == StreamKind.REVERSE_TCP:
            self.reverse.open_control(conn, sid, host, port, self._users.get(conn, conn.peer))
            return
        if kind != StreamKind.TCP:
            conn.reset_stream(sid, ResetReason.PROTOCOL_ERROR, "stream kind not supported")
            return
        opening = self._opening.get(conn, 0)
        if opening >= self.settings.max_pending_opens:
            # Each dial holds a task and maybe a socket for up to the connect timeout: a
            # client that opens streams to unreachable targets must not pile them up.
            self.streams_failed += 1
            conn.reset_stream(
                sid, ResetReason.REFUSED_STREAM, f"{opening} opens in progress, the limit"
            )
            return
        ep = StreamEndpoint(conn, sid, send_credit=window)
        ep.early = early
        ep.recv_unacked = len(early)  # early data counts against our window like DATA
        ep.recv_budget -= len(early)
        ep.on_connect = open_ok
        stats = self.stats
        if stats is not None:
            user = self._users.get(conn, "?")
            if stats.logs_access():  # a line per stream: it needs the stream's own record
                flow = ep.flow = stats.start(
                    listener=TUNNEL, client=conn.peer, host=host, port=port, route="", user=user
                )
                flow.meter = ep
                flow.reverse = True  # up is what the client sends: written to the target
            else:  # counted per user, without a record per stream
                tally = ep.flow = stats.tally(user)
                tally.open.add(ep)
        conn.streams[sid] = ep
        task = conn.loop.create_task(self._dial(ep, host, port), name=f"dial-{host}:{port}")
        self._dials.add(task)
        self._opening[conn] = opening + 1
        task.add_done_callback(lambda done: self._dial_done(done, conn))

    def _dial_done(self, task: asyncio.Task[None], conn: MuxConnection) -> None:
        self._dials.discard(task)
        left = self._opening.pop(conn, 1) - 1
        if left > 0:
            self._opening[conn] = left

    async def _dial(self, ep: StreamEndpoint, host: str, port: int) -> None:
        conn = ep.conn
        policy = self.settings.policy
        loop = conn.loop
        try:
            if not 0 < port < 65536:
                raise _Refused(ResetReason.NOT_ALLOWED, f"port {port} out of range")
            addresses = await self._resolve(host, port, conn)
            if not policy.host_allowed(host, port):
                allowed = [a for a in addresses if policy.address_allowed(a, port)]
                if not allowed:
                    log.warning(
                        "policy refused %s:%d (%s) for %s",
                        host,
                        port,
                        ", ".join(addresses),
                        conn.peer,
                    )
                    raise _Refused(ResetReason.NOT_ALLOWED, "destination not allowed")
                addresses = allowed
            last: BaseException | None = None
            for address in addresses:
                if ep.done:
                    return
                try:
                    async with asyncio.timeout(self.settings.connect_timeout):
                        await loop.create_connection(lambda: ep, address, port)
                    self.streams_opened += 1
                    return
                except (OSError, TimeoutError) as exc:
                    last = exc
            assert last is not None
            raise last
        except _Refused as exc:
            reason, message = exc.reason, str(exc)
        except (OSError, TimeoutError) as exc:
            reason, message = reset_reason_for(exc), str(exc) or type(exc).__name__
            if not isinstance(ep.flow, Flow):  # else the access log line says it, once
                log.info("dial %s:%d for %s failed: %s", host, port, conn.peer, message)
        except Exception as exc:  # a bug (say in a resolver hook) must not leave it unanswered
            log.exception("dial %s:%d for %s failed unexpectedly", host, port, conn.peer)
            reason, message = ResetReason.GENERAL_FAILURE, type(exc).__name__
        self.streams_failed += 1
        if ep.flow is not None:
            ep.flow.finish(ep, reason.name.lower(), message)
        if not ep.done:
            ep.done = True
            conn.reset_stream(ep.sid, reason, message)

    async def _resolve(self, host: str, port: int, conn: MuxConnection) -> list[str]:
        return await resolve_target(
            host,
            port,
            lookup=self.settings.resolve,
            resolver=self.lookups,
            client=peer_key(conn.peer),
        )


class _Refused(Exception):
    def __init__(self, reason: ResetReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
