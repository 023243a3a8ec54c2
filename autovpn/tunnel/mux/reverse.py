"""Reverse tunnels in the native protocol (``-R tcp://[BIND:]PORT:HOST:PORT``).

The client asks the server to listen: it opens a *control stream*, an OPEN of kind
``REVERSE_TCP`` whose address is the bind address on the server.  The server binds (if its
reverse-bind policy allows the address) and answers OPEN_OK, or RESET with the reason.  Each
connection the server accepts there becomes a stream the *server* opens (an even id), an OPEN of
kind ``REVERSE_TCP`` carrying the same bind address; the client checks that it registered that
address, connects to its own target ``HOST:PORT`` and answers OPEN_OK, after which the stream
is an ordinary one (flow control, half-close, reset).

The listener lives as long as its control stream: when the client resets it or the tunnel
connection drops, the server closes the listener; the client registers again on its next
connection.  A client (a user, over all its connections) holds at most
``MAX_REVERSE_LISTENERS_PER_CLIENT`` listeners (``server.max_reverse_listeners_per_client``);
past that a control stream is refused with REFUSED_STREAM.  Server-side sockets are relayed by
the same ``StreamEndpoint`` as every stream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable

from autovpn.config import DEFAULT_REVERSE_BINDS, MAX_REVERSE_LISTENERS_PER_CLIENT, ReverseSpec
from autovpn.errors import ResetReason
from autovpn.net import reset_reason_for
from autovpn.tunnel.mux.connection import MuxConnection, StreamEndpoint, open_ok
from autovpn.wire import frames

log = logging.getLogger("autovpn.tunnel.reverse")


async def dial_into(ep: StreamEndpoint, host: str, port: int, within: float) -> None:
    """Connect ``ep`` to host:port; on failure reset its stream with the matching reason."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            await loop.create_connection(lambda: ep, host, port)
    except (OSError, TimeoutError) as exc:
        log.info("reverse stream to %s:%d failed: %s", host, port, exc)
        if not ep.done:
            ep.done = True
            ep.conn.reset_stream(ep.sid, reset_reason_for(exc), str(exc) or type(exc).__name__)


# -- server side ------------------------------------------------------------------------------


class _ControlStream(StreamEndpoint):
    """The server's end of a control stream: owns the listener, closes it when it ends."""

    __slots__ = ("server", "_release")

    def __init__(self, conn: MuxConnection, sid: int, release: Callable[[], None]) -> None:
        super().__init__(conn, sid)
        self.server: asyncio.Server | None = None
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Give the client's listener slot back, once."""
        if self._release is not None:
            self._release()
            self._release = None

    def on_data(self, piece: bytes | memoryview) -> None:
        pass  # nothing travels on a control stream

    def on_fin(self) -> None:
        self.on_reset(ResetReason.CANCELLED, "control stream closed", from_peer=True)
        self.conn.reset_stream(self.sid, ResetReason.CANCELLED, "reverse listener closed")

    def on_reset(self, reason: ResetReason, message: str, from_peer: bool) -> None:
        super().on_reset(reason, message, from_peer)
        if self.server is not None:
            log.info("reverse listener %s closed (%s)", _sockname(self.server), reason.name)
            self.server.close()
            self.server = None
        self.release()


def _sockname(server: asyncio.Server) -> str:
    if not server.sockets:
        return "?"
    name = server.sockets[0].getsockname()
    return f"{name[0]}:{name[1]}"


class ReverseListeners:
    """The server's side: binds listeners for clients' control streams."""

    def __init__(
        self,
        allowed_binds: Iterable[str] = DEFAULT_REVERSE_BINDS,
        per_client: int = MAX_REVERSE_LISTENERS_PER_CLIENT,
    ) -> None:
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_binds]
        self.per_client = per_client
        self.bound = 0
        self.refused = 0
        #: Listeners (bound or binding) per client, for ``per_client``.
        self.held: dict[str, int] = {}

    def bind_allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # bind addresses are IP literals
        return any(ip in net for net in self.allowed if net.version == ip.version)

    def open_control(
        self, conn: MuxConnection, sid: int, host: str, port: int, client: str
    ) -> None:
        """A control stream from ``client`` (the user it authenticated as)."""
        if self.held.get(client, 0) >= self.per_client:
            self.refused += 1
            log.warning(
                "reverse bind %s:%d refused for %s: %s holds %d reverse listeners already "
                "(server.max_reverse_listeners_per_client)",
                host,
                port,
                conn.peer,
                client,
                self.per_client,
            )
            conn.reset_stream(
                sid,
                ResetReason.REFUSED_STREAM,
                f"too many reverse listeners (at most {self.per_client} per client)",
            )
            return
        if not self.bind_allowed(host) or not 0 < port < 65536:
            self.refused += 1
            log.warning(
                "reverse bind %s:%d refused for %s (allowed: %s)",
                host,
                port,
                conn.peer,
                ", ".join(str(n) for n in self.allowed) or "none",
            )
            conn.reset_stream(sid, ResetReason.NOT_ALLOWED, "reverse bind not allowed")
            return
        self.held[client] = self.held.get(client, 0) + 1

        def release() -> None:
            left = self.held[client] - 1
            if left:
                self.held[client] = left
            else:
                del self.held[client]

        control = _ControlStream(conn, sid, release)
        conn.streams[sid] = control
        task = asyncio.get_running_loop().create_task(self._bind(control, host, port))
        conn.track(task)

    async def _bind(self, control: _ControlStream, host: str, port: int) -> None:
        conn = control.conn

        def accepted() -> StreamEndpoint:
            ep = StreamEndpoint(conn)
            # The accepted socket waits (no credit) until the client connected its end.
            conn.open_stream(ep, host, port, kind=frames.StreamKind.REVERSE_TCP)
            return ep

        try:
            server = await asyncio.get_running_loop().create_server(accepted, host, port)
        except OSError as exc:
            log.warning("reverse bind %s:%d for %s failed: %s", host, port, conn.peer, exc)
            control.release()
            if not control.done:
                control.done = True
                conn.reset_stream(
                    control.sid,
                    ResetReason.GENERAL_FAILURE,
                    f"cannot listen: {exc.strerror or exc}",
                )
            return
        if control.done:  # the client or the tunnel went away meanwhile
            server.close()
            return
        control.server = server
        self.bound += 1
        log.info("reverse listener %s for %s", _sockname(server), conn.peer)
        conn.send_frame(
            frames.frame(frames.FrameType.OPEN_OK, control.sid, frames.U32.pack(conn.window))
        )


# -- client side ------------------------------------------------------------------------------


class _ClientControl(StreamEndpoint):
    """The client's end of a control stream: says when the server refused or dropped it."""

    __slots__ = ("spec",)

    def __init__(self, conn: MuxConnection, spec: ReverseSpec) -> None:
        super().__init__(conn)
        self.spec = spec

    def on_open_ok(self, window: int) -> None:
        super().on_open_ok(window)
        log.info("reverse tunnel up: %s", self.spec)

    def on_data(self, piece: bytes | memoryview) -> None:
        pass

    def on_reset(self, reason: ResetReason, message: str, from_peer: bool) -> None:
        if not self.done and not self.conn.closed:
            log.warning(
                "reverse tunnel %s refused by the server: %s",
                self.spec,
                message or reason.name.lower(),
            )
        super().on_reset(reason, message, from_peer)


class ReverseClient:
    """The client's side: registers every ``ReverseSpec`` on a live tunnel connection and
    connects the streams the server opens for them."""

    def __init__(self, specs: Iterable[ReverseSpec], connect_timeout: float = 10.0) -> None:
        self.specs = list(specs)
        self.connect_timeout = connect_timeout
        self._active: dict[ReverseSpec, tuple[MuxConnection, StreamEndpoint]] = {}
        self.streams = 0

    def register_on(self, conn: MuxConnection) -> None:
        """Open a control stream for each spec that has none on a live connection."""
        for spec in self.specs:
            current = self._active.get(spec)
            if (
                current is not None
                and not (current[0].closed or current[0].draining)
                and not current[1].done
            ):
                continue  # registered on a connection that stays (a draining one does not)
            control = _ClientControl(conn, spec)
            conn.open_stream(
                control, spec.bind_host, spec.bind_port, kind=frames.StreamKind.REVERSE_TCP
            )
            self._active[spec] = (conn, control)
            log.info("reverse tunnel requested: %s", spec)

    def release_on(self, conn: MuxConnection) -> None:
        """``conn`` is draining: close its reverse listeners (their open streams carry on),
        so that the next connection can bind them again."""
        for spec, (c, control) in list(self._active.items()):
            if c is conn and not control.done:
                control.done = True
                conn.reset_stream(control.sid, ResetReason.CANCELLED, "connection draining")
                del self._active[spec]

    def on_open(
        self,
        conn: MuxConnection,
        sid: int,
        window: int,
        kind: frames.StreamKind,
        host: str,
        port: int,
        early: bytes,
    ) -> None:
        """An OPEN from the server: a connection arrived on one of our reverse listeners."""
        spec = next(
            (
                s
                for s, (c, _) in self._active.items()
                if c is conn and (s.bind_host, s.bind_port) == (host, port)
            ),
            None,
        )
        if kind != frames.StreamKind.REVERSE_TCP or spec is None:
            # The server may only open streams we asked for: never dial where it says.
            conn.reset_stream(sid, ResetReason.NOT_ALLOWED, "no such reverse tunnel")
            return
        self.streams += 1
        ep = StreamEndpoint(conn, sid, send_credit=window)
        ep.on_connect = open_ok
        conn.streams[sid] = ep
        task = asyncio.get_running_loop().create_task(
            dial_into(ep, spec.target_host, spec.target_port, self.connect_timeout)
        )
        conn.track(task)
