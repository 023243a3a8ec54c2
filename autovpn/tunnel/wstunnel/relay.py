"""One wstunnel tunnel after the upgrade: a WebSocket transport relayed to one local socket.

Both ends use it: on the server the local socket is the destination, on the client it is the
application's socket.  ``wstunnel.Session`` holds the protocol rules; this module only moves
bytes.  Every local read becomes one binary frame (wstunnel section 3.1); frame payload pieces
are written to the local socket as they arrive, so a 32 MiB frame costs no 32 MiB buffer.

Backpressure both ways: when the local socket's write buffer passes its high-water mark the
WebSocket stops being read, and when the WebSocket's does, the local socket stops being read.
EOF on either side ends the whole tunnel (wstunnel has no half-close): local EOF sends
Close(1000) and waits (bounded) for the peer's Close; a peer Close is answered and ends it.

Only that exchange is a clean end.  A WebSocket lost without the peer's Close (the peer died,
its local socket failed: we then drop the connection rather than send Close), or a Close with
an error code, resets the local socket (``reset_transport``): the application must not take a
transfer cut short for a complete one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, cast

from autovpn.errors import RemoteProtocolError
from autovpn.eventloop import LoopBuffers
from autovpn.net import reset_transport
from autovpn.stats import RESULT_OK, Flow
from autovpn.wire.wstunnel import FrameSplitter, Session, SessionState

log = logging.getLogger("autovpn.tunnel.wstunnel")

#: Shared read buffer of every local socket: ``buffer_updated`` copies out of it at once.
#: 256 KiB frames (wstunnel grows its own up to 32 MiB; any size is valid for the peer).
_LOCAL_READ_BUFFER: Final = memoryview(bytearray(256 * 1024))
#: The WebSocket sides of one loop share a read buffer too: ``_receive`` writes or copies every
#: piece before it returns (the decoder keeps partial headers in its own buffer), so a tunnel
#: no longer holds 256 KiB of its own (connection.py does the same for the native mux).
_WS_READ_BUFFERS: Final = LoopBuffers(256 * 1024)
#: How long to wait for the peer's Close after ours before dropping the connection.
CLOSE_TIMEOUT: Final = 5.0
#: Close codes that end a tunnel normally (RFC 6455 section 7.4.1); 1005 is a Close without a
#: code.  Any other code (1002 protocol error, 1011 internal error...) is a failure.
CLEAN_CLOSE_CODES: Final = frozenset({1000, 1005})
WS_HIGH_WATER: Final = 4 << 20
WS_LOW_WATER: Final = 1 << 20


class WsSide(asyncio.BufferedProtocol):
    """The WebSocket side of one tunnel."""

    def __init__(
        self,
        session: Session,
        *,
        ping_interval: float = 30.0,
        peer: str = "",
        on_closed: Callable[[WsSide], None] | None = None,
    ) -> None:
        self.session = session
        self.peer = peer
        self.local = LocalSide(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: Payload bytes received and sent (the application's bytes, as the native mux
        #: counts them: no frame headers, pings or Close).
        self.bytes_in = 0
        self.bytes_out = 0
        #: The connection's record (``autovpn.stats``), ended when the tunnel closes.
        self.flow: Flow | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = _WS_READ_BUFFERS.get(self._loop)
        self._ping_interval = ping_interval
        self._ping_handle: asyncio.TimerHandle | None = None
        self._close_handle: asyncio.TimerHandle | None = None
        self._on_closed = on_closed
        self._held = b""
        self.done: asyncio.Future[None] = self._loop.create_future()
        #: Reads that brought data for the local socket (pings and pongs do not count): with
        #: ``bytes_out``, what the idle sweep watches (``autovpn.idle``).
        self.data_reads = 0
        self.idle_mark = -1
        self.idle_since = 0.0

    # -- set-up --------------------------------------------------------------------------------

    def start(self, transport: asyncio.Transport, rest: bytes = b"") -> None:
        """Take over ``transport`` (already upgraded); ``rest`` is what followed the head.

        The WebSocket is read only once the local socket is attached (``attach_local``), so
        nothing the peer sends early is lost.
        """
        transport.pause_reading()
        transport.set_protocol(self)
        self.connection_made(transport)
        self._held = rest

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WS_HIGH_WATER, low=WS_LOW_WATER)
        if self._ping_interval > 0 and self._ping_handle is None:
            self._ping_handle = self._loop.call_later(self._ping_interval, self._ping)

    def attach_local(self, transport: asyncio.Transport, early: bytes = b"") -> None:
        """Relay ``transport`` (a connected local socket); ``early`` leaves as the first frame."""
        transport.set_protocol(self.local)
        self.local.transport = transport
        if early:
            self.send_data(early)
        if self.local.early:  # read before the relay started (``LocalSide.buffer_updated``)
            self.send_data(bytes(self.local.early))
            self.local.early = bytearray()
        held, self._held = self._held, b""
        if held:
            self._receive(held)
        if self.closed or self.transport is None:
            transport.close()
            return
        if self.local.early_eof:
            self.local_eof()
        else:
            transport.resume_reading()
        if not self.transport.is_closing():
            self.transport.resume_reading()

    # -- WebSocket in --------------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """Payload bytes sent and received on the WebSocket (``autovpn.stats.Metered``)."""
        return self.bytes_out, self.bytes_in

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._receive(self._buffer[:nbytes])

    def _receive(self, data: bytes | memoryview) -> None:
        try:
            pieces = self.session.receive(data)
        except RemoteProtocolError as exc:
            log.info("wstunnel %s: protocol error: %s", self.peer, exc)
            self.session.close(1002)
            self._flush()
            self.abort()
            return
        local = self.local.transport
        if local is not None and not self.local.closed:
            for piece in pieces:  # usually one or two per read
                self.bytes_in += len(piece)
                local.write(bytes(piece))
        else:  # received, though nobody takes them any more
            self.bytes_in += sum(len(piece) for piece in pieces)
        if pieces:
            self.data_reads += 1
        self._flush()
        if self.session.state is SessionState.CLOSED:
            self.finish()

    def activity(self) -> int:
        """Data relayed either way (``autovpn.idle.Idler``): WebSocket pings, which keep an
        idle tunnel's WebSocket alive, are not activity of the relayed connection."""
        return self.bytes_out + self.data_reads

    def close_idle(self, quiet: float) -> None:
        """Nothing relayed for ``quiet`` seconds: drop the tunnel (the peer resets its side)
        and reset the local socket."""
        log.debug("wstunnel %s: idle for %.0f s (idle_timeout); closing", self.peer, quiet)
        self.abort()

    @property
    def ended_cleanly(self) -> bool:
        """The peer's Close arrived, with a code that says the tunnel ended normally."""
        session = self.session
        return session.state is SessionState.CLOSED and session.close_code in CLEAN_CLOSE_CODES

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # A TLS transport's protocol keeps our bound buffer methods: without this, this side,
        # its transport and the TLS layer's 256 KiB buffer wait for the cyclic GC (as in
        # MuxConnection.connection_lost).
        self.transport = None
        self._cancel_timers()
        if self.flow is not None:
            self.flow.end(RESULT_OK if self.ended_cleanly else "tunnel_lost")
        local = self.local.transport
        if local is not None and not self.local.closed:
            if self.ended_cleanly:
                local.close()
            else:  # lost without the peer's Close, EOF or not: the transfer may be cut short
                reset_transport(local)
        if not self.done.done():
            self.done.set_result(None)
        if self._on_closed is not None:
            self._on_closed(self)

    def pause_writing(self) -> None:
        if self.local.transport is not None:
            self.local.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.local.transport is not None and not self.local.closed:
            self.local.transport.resume_reading()

    # -- WebSocket out -------------------------------------------------------------------------

    def send_data(self, data: bytes) -> None:
        if self.transport is None or self.closed or self.session.state is not SessionState.OPEN:
            return
        self.bytes_out += len(data)
        self.transport.write(self.session.data_header(len(data)) + data)

    def _flush(self) -> None:
        out = self.session.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _ping(self) -> None:
        self._ping_handle = None
        if self.closed:
            return
        if not self.session.ping_tick():
            log.info("wstunnel %s: 3 pings unanswered; aborting", self.peer)
            self.abort()
            return
        self._flush()
        self._ping_handle = self._loop.call_later(self._ping_interval, self._ping)

    def local_eof(self) -> None:
        """The local side ended: Close(1000), then wait (bounded) for the peer's Close."""
        if self.closed:
            return
        if self.session.state is SessionState.CLOSED:
            self.finish()
            return
        self.session.close(1000)
        self._flush()
        if self._close_handle is None:
            self._close_handle = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def finish(self) -> None:
        """Both Close frames exchanged (or the tunnel is over): close after pending writes."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        local = self.local.transport
        if local is not None and not self.local.closed:
            if self.session.state is not SessionState.CLOSED or self.ended_cleanly:
                local.close()
            else:  # the peer's Close reports an error
                reset_transport(local)

    def abort(self) -> None:
        """The tunnel failed: drop the WebSocket (the peer sees no Close) and reset the local
        socket."""
        if self.transport is not None:
            self.transport.abort()
        local = self.local.transport
        if local is not None and not self.local.closed:
            reset_transport(local)

    def _cancel_timers(self) -> None:
        for handle in (self._ping_handle, self._close_handle):
            if handle is not None:
                handle.cancel()
        self._ping_handle = self._close_handle = None


class LocalSide(asyncio.BufferedProtocol):
    """The local socket of one tunnel: each read is one frame."""

    __slots__ = ("ws", "transport", "closed", "early", "early_eof")

    def __init__(self, ws: WsSide) -> None:
        self.ws = ws
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.early = bytearray()  # read before the WebSocket was started
        self.early_eof = False  # and the EOF that followed them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A destination dialled before the 101: hold its bytes (an SSH banner, say) in the
        # kernel until ``attach_local`` starts the relay (uvloop reads once anyway: see
        # ``buffer_updated``).
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _LOCAL_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.ws.transport is None:
            # uvloop reads once ``connection_made`` returns, although it paused reading: keep
            # the bytes (one read at most) for ``attach_local`` instead of dropping them.
            self.early += _LOCAL_READ_BUFFER[:nbytes]
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.ws.send_data(bytes(_LOCAL_READ_BUFFER[:nbytes]))

    def eof_received(self) -> bool:
        if self.ws.transport is None:
            self.early_eof = True  # after the early bytes, once the relay starts
        else:
            self.ws.local_eof()
        return True  # keep writing what the peer still sends until its Close

    def pause_writing(self) -> None:
        if self.ws.transport is not None:
            self.ws.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.ws.transport is not None and not self.ws.closed:
            self.ws.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and not self.ws.closed:
            self.ws.abort()
        else:
            self.ws.local_eof()


class UdpWsSide(WsSide):
    """The WebSocket side of a UDP tunnel: each data frame is one datagram, both ways.

    Not swept for idleness (``tcp_tunnels``): UDP tunnels have their own timeout."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self._splitter = FrameSplitter()
        self.udp: asyncio.DatagramTransport | None = None
        self.datagram_protocol = _UdpLocal(self)

    def _receive(self, data: bytes | memoryview) -> None:
        try:
            for frame in self._splitter.feed(data):
                pieces = self.session.receive(frame)
                if not pieces:
                    continue
                datagram = b"".join(bytes(p) for p in pieces)
                self.bytes_in += len(datagram)
                if self.udp is not None and not self.udp.is_closing():
                    self.udp.sendto(datagram)
        except RemoteProtocolError as exc:
            log.info("wstunnel %s: protocol error: %s", self.peer, exc)
            self.session.close(1002)
            self._flush()
            self.abort()
            return
        self._flush()
        if self.session.state is SessionState.CLOSED:
            self.finish()

    def attach_datagram(self, transport: asyncio.DatagramTransport) -> None:
        self.udp = transport
        held, self._held = self._held, b""
        if held:
            self._receive(held)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.udp is not None:
            self.udp.close()

    def finish(self) -> None:
        super().finish()
        if self.udp is not None:
            self.udp.close()

    def abort(self) -> None:
        super().abort()
        if self.udp is not None:
            self.udp.abort()


class _UdpLocal(asyncio.DatagramProtocol):
    def __init__(self, ws: UdpWsSide) -> None:
        self.ws = ws

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.ws.send_data(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("wstunnel %s: UDP error %s", self.ws.peer, exc)


def tcp_tunnels(tunnels: set[WsSide]) -> list[WsSide]:
    """The TCP relays among ``tunnels``, for an idle sweep (``autovpn.idle``)."""
    return [ws for ws in tunnels if type(ws) is not UdpWsSide and ws.transport is not None]
