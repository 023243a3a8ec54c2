"""One tunnel connection: many streams multiplexed over one WebSocket-over-TLS connection.

Theory of operation
-------------------
``MuxConnection`` is the asyncio protocol of the TLS transport after the upgrade.  Reads land
in one reused buffer (``BufferedProtocol``: measured +57-71% download and -40% CPU against
``data_received`` under TLS, because the SSL layer no longer allocates per record); the
WebSocket decoder and the mux decoder turn them into frames, and DATA pieces are written
straight to the stream's socket.

Writes are coalesced: frames produced during one event-loop iteration are joined into one
WebSocket frame and one ``transport.write`` at the end of the iteration (measured: 4,800-6,000
new streams/s against 3,900-5,100 with one write per frame), or at once past
``FLUSH_THRESHOLD`` so bulk data does not wait.

Flow control is per stream and credit-based (docs/protocol.md): a sender may have at most the
receiver's window in flight; the receiver grants more (WINDOW) only once the bytes have left
its own socket buffer.  A stalled reader therefore holds at most one window of memory and
never blocks the shared connection.  The connection itself is bounded by the TLS transport's
write-buffer water marks: above the high mark every stream that tries to send pauses reading
its socket, and resumes when the transport drains.

``StreamEndpoint`` is one stream's end: the mux state *and* the asyncio protocol of the socket
it relays (the SOCKS5 client's socket on the client, the target's socket on the server), so an
idle stream costs one small object.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Final, cast

from autovpn.config import IDLE_TIMEOUT
from autovpn.errors import AuthenticationFailed, RemoteProtocolError, ResetReason, StreamError
from autovpn.eventloop import HeapTrimmer, LoopBuffers
from autovpn.idle import IdleSweep
from autovpn.limits import MAX_STREAMS_PER_CONNECTION
from autovpn.net import reset_transport
from autovpn.stats import RESULT_OK, Recorder
from autovpn.wire import frames
from autovpn.wire.frames import (
    FLAG_ACK,
    TYPE_AUTH,
    TYPE_DATA,
    TYPE_DATAGRAM,
    TYPE_FIN,
    TYPE_GOAWAY,
    TYPE_OPEN,
    TYPE_OPEN_OK,
    TYPE_PING,
    TYPE_RESET,
    TYPE_WINDOW,
    FrameType,
)
from autovpn.wire.websocket import Opcode, WsDecoder, apply_mask, encode_close, encode_header

log = logging.getLogger("autovpn.tunnel")

#: Receive window granted to each stream.  One window of bytes may be buffered for a stalled
#: reader; big enough that one stream can fill a loopback link between grants.
DEFAULT_WINDOW: Final = 1 << 20
#: Size of the receive buffer that the tunnel connections of one event loop share.
TUNNEL_READ_BUFFER: Final = 256 * 1024
#: Joined output is written at once past this size, not at the end of the loop iteration.
FLUSH_THRESHOLD: Final = 256 * 1024
#: Payloads at least this big are written as they are instead of joined (see ``flush``).
BIG_PIECE: Final = 16 * 1024
#: TLS transport write-buffer water marks (connection-level backpressure).
TUNNEL_HIGH_WATER: Final = 4 << 20
TUNNEL_LOW_WATER: Final = 1 << 20
#: Read buffer shared by every local socket of the process.  ``buffer_updated`` copies out of
#: it synchronously, so one buffer serves all streams and an idle stream owns no buffer at all.
#: (uvloop may keep a view of unsent bytes after ``write``: we never write from this buffer.)
_LOCAL_READ_BUFFER: Final = memoryview(bytearray(256 * 1024))
#: ``receive`` is done with a read before it returns (the decoders keep partial frames in their
#: own buffers, DATA is copied or written at once), so every tunnel connection of a loop reads
#: into one buffer: a server's logged-in connection no longer holds 256 KiB of its own.
_TUNNEL_READ_BUFFERS: Final = LoopBuffers(TUNNEL_READ_BUFFER)
_HEADER_PACK: Final = frames.HEADER.pack
_BINARY: Final = int(Opcode.BINARY)  # a global int: an IntEnum lookup per frame costs ~80 ns
#: A connection whose streams fall to a quarter of a peak of at least this many asks its
#: ``HeapTrimmer`` to give the burst's memory back (10,000 streams held then closed left the
#: client 24 MiB above its baseline, for good).  Steady traffic never gets there.
TRIM_AFTER_STREAMS: Final = 256
#: The keepalive timer is armed this much past the mark it waits for: uvloop's timers have
#: millisecond resolution, and a tick that fires a hair early would only re-arm itself.
_TIMER_SLACK: Final = 0.002


class MuxConnection(asyncio.BufferedProtocol):
    """The mux over one upgraded WebSocket connection (client or server role)."""

    def __init__(
        self,
        *,
        client: bool,
        unmasked: bool,
        window: int = DEFAULT_WINDOW,
        keepalive_interval: float = 15.0,
        keepalive_timeout: float = 45.0,
        on_open: Callable[[MuxConnection, int, int, frames.StreamKind, str, int, bytes], None]
        | None = None,
        on_datagram: Callable[[MuxConnection, int, bytes], None] | None = None,
        on_lost: Callable[[MuxConnection], None] | None = None,
        authenticate: Callable[[int, int, int, bytes | memoryview], None] | None = None,
        peer: str = "",
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        trimmer: HeapTrimmer | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.client = client
        self.window = window
        #: Streams (both directions) past which the peer's OPENs are refused: each may buffer
        #: one window here, so this bounds what one connection can make us hold.
        self.max_streams = max_streams
        self.streams_refused = 0
        self._trimmer = trimmer
        self._streams_peak = 0  # the most streams seen since the last trim (``_stream_gone``)
        self.peer = peer
        self.streams: dict[int, StreamEndpoint] = {}
        self.writing_paused = False
        self.closed = False
        self.draining = False  # GOAWAY seen or sent: no new streams here
        #: Called once when the connection starts draining (the client opens another).
        self.on_drain: Callable[[], None] | None = None
        self.stalled = False  # the peer is suspect: no new streams here (see _keepalive)
        self.timed_out = False  # closed by the keepalive timeout, not by the peer or us
        self.close_code: int | None = None  # the peer's WebSocket close code, if it sent one
        self.rtt: float | None = None
        #: PINGs sent and answered: the loss figure of the tunnel's health (``autovpn.stats``).
        self.pings_sent = 0
        self.pings_answered = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._mask_outgoing = client and not unmasked
        self._ws = WsDecoder()
        self._mux = frames.MuxDecoder()
        self._pending: list[bytes] = [b""]  # slot 0 is reserved for the WebSocket header
        self._pending_size = 0
        self._big_pending = False  # a DATA payload of BIG_PIECE bytes or more is pending
        self._flush_handle: asyncio.Handle | None = None
        self._blocked: set[StreamEndpoint] = set()
        self._next_id = 1 if client else 2
        self._on_open = on_open
        self._on_datagram = on_datagram
        self._on_lost = on_lost
        #: The server's check of the client's first mux frame (the AUTH answering the 101's
        #: challenge).  Until it passed, no frame is dispatched; it raises AuthenticationFailed
        #: to refuse, having logged why.  None once passed (and on the client).
        self._authenticate = authenticate
        self.loop = asyncio.get_running_loop()
        self._buffer = _TUNNEL_READ_BUFFERS.get(self.loop)
        self._last_recv = self.loop.time()
        self._keepalive_interval = keepalive_interval
        self._keepalive_timeout = keepalive_timeout
        # Two quiet intervals mean the PING sent after the first went unanswered for a whole
        # interval: a peer that is alive answers within one round trip.
        self._stall_after = min(2 * keepalive_interval, keepalive_timeout)
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = self.loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()  # work for this connection's streams
        #: Streams whose sockets moved no byte for ``idle_timeout`` are reset (``autovpn.idle``).
        self.idle = IdleSweep(idle_timeout, self._relaying, "tunnel streams")
        #: Every stream id below this was in a write handed to the transport: its OPEN (and
        #: early data) may have reached the peer.  A stream at or above it never left us.
        self.written_below = self._next_id

    # -- asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER, low=TUNNEL_LOW_WATER)
        if self._keepalive_interval > 0:
            self._keepalive_handle = self.loop.call_later(self._keepalive_interval, self._keepalive)
        self.idle.start()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.receive(self._buffer[:nbytes])

    def receive(self, data: bytes | memoryview) -> None:
        """Feed bytes read from the tunnel (also used for bytes that followed the 101)."""
        self._last_recv = self.loop.time()
        if self.stalled:
            self._unstall()
        self.bytes_in += len(data)
        try:
            for opcode, payload in self._ws.feed(data):
                if opcode == _BINARY:
                    mux_frames = self._mux.feed(payload)
                    if self._authenticate is not None:  # once per read, not per frame
                        mux_frames = self._first_frames(mux_frames)
                    for frame in mux_frames:
                        try:
                            self._dispatch(*frame)
                        except RemoteProtocolError:
                            raise
                        except Exception:
                            # A bug around one stream (a hook, a socket in a bad state) must
                            # not take the connection and every other stream down with it.
                            log.exception(
                                "tunnel %s: error handling a frame for stream %d",
                                self.peer,
                                frame[2],
                            )
                            self._drop_stream(frame[2])
                elif opcode == Opcode.PING:
                    self._write_raw(Opcode.PONG, bytes(payload))
                elif opcode == Opcode.CLOSE:
                    if len(payload) >= 2:  # 1008 from a server: our AUTH was refused
                        self.close_code = int.from_bytes(payload[:2], "big")
                    if not self.closed:
                        self._write_raw(Opcode.CLOSE, encode_close(1000))
                    self.close()
                    return
        except AuthenticationFailed:
            # The hook logged the refusal; the peer learns no more than the close code.
            self._write_raw(Opcode.CLOSE, encode_close(1008))
            self.close()
        except RemoteProtocolError as exc:
            log.warning("tunnel %s: protocol error from peer: %s; closing", self.peer, exc)
            self._write_raw(Opcode.CLOSE, encode_close(1002, "protocol error"))
            self.close()

    def _first_frames(self, mux_frames: list[frames.Frame]) -> list[frames.Frame]:
        """Check the first frame of an unauthenticated connection; the rest may go on.

        Raising here leaves every frame behind the first undispatched: a replayed handshake's
        pipelined OPENs open nothing and dial nothing.
        """
        if not mux_frames:
            return mux_frames
        if self.closed:  # refused already: bytes read before the close took effect
            return []
        assert self._authenticate is not None
        self._authenticate(*mux_frames[0])
        self._authenticate = None
        return mux_frames[1:]

    def eof_received(self) -> bool:
        return False  # the tunnel has no half-close: EOF ends it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # Let go of the transport: a TLS transport's protocol keeps our bound get_buffer and
        # buffer_updated (uvloop's and asyncio's SSLProtocol), so mux -> transport -> SSL
        # protocol -> mux is a cycle that only the cyclic GC frees, and it runs too seldom: after
        # a burst of 2,000 handshakes, dead connections with their 256 KiB buffers (ours and
        # the TLS layer's) held the server at 8x its baseline RSS.  Without the edge, refcounting
        # frees it all right here.
        self.transport = None
        for task in self._tasks:
            task.cancel()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.idle.close()
        streams, self.streams = self.streams, {}
        for ep in streams.values():
            ep.on_reset(ResetReason.TUNNEL_LOST, "tunnel connection lost", from_peer=False)
        if not self.lost.done():
            self.lost.set_result(None)
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        blocked, self._blocked = self._blocked, set()
        for ep in blocked:
            ep.update_reading()

    # -- frames in ---------------------------------------------------------------------------

    def _dispatch(self, ftype: int, flags: int, sid: int, payload: bytes | memoryview) -> None:
        # Plain-int frame types, the frequent ones first (see frames.TYPE_DATA).
        if ftype == TYPE_DATA:
            ep = self.streams.get(sid)
            if ep is not None:
                ep.on_data(payload)
        elif ftype == TYPE_DATAGRAM:
            if self._on_datagram is not None:
                self._on_datagram(self, sid, bytes(payload))
        elif ftype == TYPE_WINDOW:
            ep = self.streams.get(sid)
            if ep is not None:
                ep.on_window(frames.decode_u32(payload, "WINDOW"))
        elif ftype == TYPE_OPEN:
            self._handle_open(sid, payload)
        elif ftype == TYPE_OPEN_OK:
            ep = self.streams.get(sid)
            if ep is not None:
                ep.on_open_ok(frames.decode_u32(payload, "OPEN_OK"))
        elif ftype == TYPE_FIN:
            ep = self.streams.get(sid)
            if ep is not None:
                ep.on_fin()
        elif ftype == TYPE_RESET:
            ep = self.streams.pop(sid, None)
            if ep is not None:
                self._stream_gone()
                reason, message = frames.decode_reset(payload)
                try:
                    why = ResetReason(reason)
                except ValueError:
                    why = ResetReason.GENERAL_FAILURE
                ep.on_reset(why, message, from_peer=True)
        elif ftype == TYPE_PING:
            if flags & FLAG_ACK:
                self.pings_answered += 1
                if self._ping_sent_at is not None:
                    self.rtt = time.perf_counter() - self._ping_sent_at
                    self._ping_sent_at = None
            else:
                self.send_frame(frames.frame(FrameType.PING, 0, bytes(payload), FLAG_ACK))
        elif ftype == TYPE_GOAWAY:
            self._drain()
        elif ftype == TYPE_AUTH:
            raise RemoteProtocolError("AUTH frame after the first frame, or sent by the server")

    def _handle_open(self, sid: int, payload: bytes | memoryview) -> None:
        # Streams the peer opens carry the peer's parity: odd from clients, even from servers.
        if self._on_open is None or (sid & 1) != (0 if self.client else 1) or sid in self.streams:
            self._send_reset(sid, ResetReason.PROTOCOL_ERROR, "unexpected OPEN")
            return
        try:
            window, kind, host, port, early = frames.decode_open(payload)
        except RemoteProtocolError as exc:
            log.warning("tunnel %s: bad OPEN for stream %d: %s", self.peer, sid, exc)
            self._send_reset(sid, ResetReason.PROTOCOL_ERROR, str(exc))
            return
        if self.draining:
            self._send_reset(sid, ResetReason.REFUSED_STREAM, "shutting down")
            return
        if len(self.streams) >= self.max_streams:
            if not self.streams_refused:  # once per connection: not one line per OPEN
                log.warning(
                    "tunnel %s: %d streams open, the limit (max_streams_per_connection);"
                    " refusing new ones until some end",
                    self.peer,
                    len(self.streams),
                )
            self.streams_refused += 1
            self._send_reset(
                sid, ResetReason.REFUSED_STREAM, f"more than {self.max_streams} streams open"
            )
            return
        self._on_open(self, sid, window, kind, host, port, early)

    # -- frames out --------------------------------------------------------------------------

    def send_frame(self, data: bytes) -> None:
        """Queue encoded mux bytes; they leave at the end of this loop iteration."""
        if self.closed:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_THRESHOLD:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def send_datagram(self, flow: int, address: bytes, data: bytes) -> None:
        """Queue one DATAGRAM frame: ``address`` is ``frames.encode_address``'s encoding."""
        if self.closed:
            return
        pending = self._pending
        pending.append(_HEADER_PACK(TYPE_DATAGRAM, 0, flow, len(address) + len(data)))
        pending.append(address)
        pending.append(data)
        self._pending_size += frames.HEADER_SIZE + len(address) + len(data)
        if self._pending_size >= FLUSH_THRESHOLD:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def send_data(self, sid: int, data: bytes) -> None:
        if self.closed:
            return
        if len(data) >= BIG_PIECE:
            self._big_pending = True
        pending = self._pending
        pending.append(frames.data_header(sid, len(data)))
        pending.append(data)
        self._pending_size += len(data) + frames.HEADER_SIZE
        if self._pending_size >= FLUSH_THRESHOLD:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        size = self._pending_size
        if size == 0 or self.transport is None or self.closed:
            return
        pending = self._pending
        self._pending = [b""]
        self._pending_size = 0
        self.bytes_out += size
        self.written_below = self._next_id  # every OPEN queued so far goes out in this write
        if self._mask_outgoing:
            mask = os.urandom(4)
            pending[0] = b""
            self.transport.write(
                encode_header(Opcode.BINARY, size, mask) + apply_mask(b"".join(pending), mask)
            )
            return
        pending[0] = encode_header(Opcode.BINARY, size)
        if not self._big_pending:
            self.transport.write(b"".join(pending))
            return
        # Bulk data: hand the big payloads to the transport as they are and join only the small
        # pieces between them.  Joining a 256 KiB payload was one full copy per byte (31-36% of
        # the sender's time was memmove, profiled with py-spy); the TLS layer encrypts each
        # piece of ``writelines`` separately, so small pieces are still joined to avoid tiny
        # TLS records.  The pieces are immutable bytes, so the transport may keep them.
        self._big_pending = False
        out: list[bytes] = []
        small: list[bytes] = []
        for piece in pending:
            if len(piece) >= BIG_PIECE:
                if small:
                    out.append(b"".join(small) if len(small) > 1 else small[0])
                    small = []
                out.append(piece)
            else:
                small.append(piece)
        if small:
            out.append(b"".join(small))
        self.transport.writelines(out)

    def _write_raw(self, opcode: int, payload: bytes) -> None:
        """A WebSocket control frame, after whatever mux bytes are pending."""
        if self.transport is None or self.transport.is_closing():
            return
        self.flush()
        mask = os.urandom(4) if self._mask_outgoing else None
        self.transport.write(
            encode_header(opcode, len(payload), mask)
            + (apply_mask(payload, mask) if mask is not None else payload)
        )

    # -- streams -------------------------------------------------------------------------------

    def open_stream(
        self,
        ep: StreamEndpoint,
        host: str,
        port: int,
        early: bytes = b"",
        kind: frames.StreamKind = frames.StreamKind.TCP,
    ) -> None:
        """Open a stream to host:port for ``ep``.  Raises ValueError for a target or early data
        that cannot be encoded (nothing is registered then)."""
        sid = self._next_id
        payload = frames.encode_open(self.window, kind, host, port, early)  # may raise
        self._next_id += 2
        ep.sid = sid
        ep.send_credit = -len(early)  # OPEN_OK grants the window minus what early data used
        self.streams[sid] = ep
        self.send_frame(frames.frame(FrameType.OPEN, sid, payload))
        if self._next_id >= 1 << 32:
            self.goaway()  # ids exhausted: new streams go to a new connection (section 4)

    def _relaying(self) -> list[StreamEndpoint]:
        """The streams relaying a socket (``IdleSweep``): not those still opening, nor the
        control streams of reverse listeners, which have no socket."""
        return [ep for ep in self.streams.values() if ep.transport is not None and not ep.done]

    def _drop_stream(self, sid: int) -> None:
        ep = self.streams.pop(sid, None)
        if sid:
            self.reset_stream(sid, ResetReason.GENERAL_FAILURE, "internal error")
        if ep is not None and ep.transport is not None:
            ep.done = True
            reset_transport(ep.transport)

    def track(self, task: asyncio.Task[None]) -> None:
        """Own ``task`` (say, dialling for a stream): it is cancelled if the connection dies."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def block(self, ep: StreamEndpoint) -> None:
        self._blocked.add(ep)

    def forget(self, sid: int) -> None:
        if self.streams.pop(sid, None) is not None:
            self._stream_gone()

    def reset_stream(self, sid: int, reason: ResetReason, message: str = "") -> None:
        if self.streams.pop(sid, None) is not None:
            self._stream_gone()
        self._send_reset(sid, reason, message)

    def _stream_gone(self) -> None:
        """A stream ended: after a burst (its peak, noted as streams end, fell to a quarter),
        the heap is trimmed once.  Two compares per stream otherwise."""
        n = len(self.streams)
        if not n:
            self._close_if_drained()
        if n >= self._streams_peak:
            self._streams_peak = n + 1
        elif self._streams_peak >= TRIM_AFTER_STREAMS and n <= self._streams_peak >> 2:
            self._streams_peak = n
            if self._trimmer is not None:
                self._trimmer.released()

    def _send_reset(self, sid: int, reason: ResetReason, message: str) -> None:
        self.send_frame(frames.frame(FrameType.RESET, sid, frames.encode_reset(reason, message)))

    def ping(self) -> None:
        if self._ping_sent_at is None:
            # perf_counter: uvloop's clock has millisecond steps, a LAN round trip less.
            self._ping_sent_at = time.perf_counter()
        self.pings_sent += 1
        self.send_frame(frames.frame(FrameType.PING, 0, os.urandom(8)))

    def goaway(self) -> None:
        self._drain()
        self.send_frame(frames.frame(FrameType.GOAWAY, 0))

    def _drain(self) -> None:
        if not self.draining:
            self.draining = True
            if self.on_drain is not None:
                self.on_drain()
            self._close_if_drained()

    def _close_if_drained(self) -> None:
        """A client's draining connection closes once its last stream ended: its pool has
        opened another for new streams, and the server would keep it up with pings."""
        if self.client and self.draining and not self.streams and not self.closed:
            self.loop.call_soon(self.close)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    async def shutdown(self, grace: float = 1.0) -> None:
        """Close, and wait (at most ``grace`` seconds) until the transport is really gone.

        A TLS close is asynchronous (close_notify goes out, the peer answers); returning
        before it finished would leave a half-closed transport behind a closed event loop.
        """
        self.close()
        if not self.lost.done():
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self.lost)
            except TimeoutError:
                self.abort()
                await asyncio.sleep(0)  # let the abort deliver connection_lost

    @property
    def last_recv(self) -> float:
        """When (``loop.time()``) the last byte arrived from the peer."""
        return self._last_recv

    def stall_reason(self) -> str:
        """Why new streams should not wait on this connection (meaningful while stalled)."""
        quiet = self.loop.time() - self._last_recv
        who = ("server " if self.client else "client ") + self.peer
        return f"tunnel stalled: no reply from {who.strip()} for {quiet:.0f} s"

    def _keepalive(self) -> None:
        """The keepalive tick: one timer per connection, re-armed here, never per frame.

        Silence counts from the last byte received: any frame proves the peer alive, not only
        the answer to a PING.  After ``keepalive_interval`` of silence a PING goes out.  After
        two intervals (that PING unanswered for a whole interval) the connection is *stalled*:
        the client's pool gives it no new streams, and the opens still waiting on it fail now
        rather than at the open timeout.  After ``keepalive_timeout`` it is dead and aborted,
        which resets every stream on it.  The next tick is armed at whichever of those marks
        the silence reaches first (or one interval on, for the RTT ping of a busy connection),
        so a dead peer is noticed at the timeout itself: a tick of fixed period noticed it up
        to one interval late (52.5 s measured for the documented 45 s).
        """
        now = self.loop.time()
        quiet = now - self._last_recv
        interval = self._keepalive_interval
        if quiet >= self._keepalive_timeout:
            log.warning("tunnel %s: nothing received for %.1f s; closing", self.peer, quiet)
            self.timed_out = True
            self.abort()
            return
        if quiet >= interval or self._ping_sent_at is None:
            self.ping()
        if quiet >= self._stall_after and not self.stalled:
            self._stall()
        if quiet < interval:
            at = self._last_recv + interval
        else:
            mark = self._keepalive_timeout if self.stalled else self._stall_after
            at = min(now + interval, self._last_recv + mark)
        self._keepalive_handle = self.loop.call_at(at + _TIMER_SLACK, self._keepalive)

    def _stall(self) -> None:
        self.stalled = True
        reason = self.stall_reason()
        # A server sees silent clients all day (phones that sleep): only the client warns.
        log.log(
            logging.WARNING if self.client else logging.INFO,
            "%s; no new streams on this connection until it answers",
            reason,
        )
        for sid, ep in list(self.streams.items()):
            if ep.opened is not None and not ep.opened.done():
                # The open cannot complete before the peer answers again: fail it now (the
                # listener answers its client) and tell the peer, should it wake up.
                ep.on_reset(ResetReason.TUNNEL_LOST, reason, from_peer=False)
                self._send_reset(sid, ResetReason.CANCELLED, "open abandoned: tunnel stalled")

    def _unstall(self) -> None:
        self.stalled = False
        log.info("tunnel %s: the peer answers again", self.peer)


class StreamEndpoint(asyncio.BufferedProtocol):
    """One end of a tunnelled stream, and the protocol of the socket it relays.

    On the client the socket is the application's (attached once the stream is open); on the
    server it is the target's (attached by ``create_connection``).
    """

    __slots__ = (
        "conn",
        "sid",
        "transport",
        "send_credit",
        "recv_budget",
        "recv_unacked",
        "reading_paused",
        "write_paused",
        "fin_in",
        "fin_out",
        "fin_pending",
        "done",
        "unsent",
        "held",
        "opened",
        "on_connect",
        "early",
        "nread",
        "nwritten",
        "flow",
        "idle_mark",
        "idle_since",
    )

    def __init__(self, conn: MuxConnection, sid: int = 0, send_credit: int = 0) -> None:
        self.conn = conn
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.send_credit = send_credit
        self.recv_budget = conn.window  # bytes the peer may still send before a WINDOW
        self.recv_unacked = 0  # bytes written to our socket but not yet granted back
        self.reading_paused = False
        self.write_paused = False
        self.fin_in = False
        self.fin_out = False
        self.fin_pending = False  # local EOF seen while unsent bytes wait for credit
        self.done = False
        self.unsent = b""  # read past our credit; sent first when credit returns
        self.held: list[bytes] | None = None  # DATA that arrived before a socket was attached
        self.opened: asyncio.Future[None] | None = None
        self.on_connect: Callable[[StreamEndpoint], None] | None = None
        self.early = b""
        self.nread = 0  # bytes read from our socket (one addition per read)
        self.nwritten = 0  # bytes of DATA written to our socket
        #: Where the stream's end is told (``autovpn.stats``: its ``Flow``, or on a server its
        #: user's ``StreamTally``).
        self.flow: Recorder | None = None
        self.idle_mark = -1  # for the connection's idle sweep (``autovpn.idle``)
        self.idle_since = 0.0

    # -- socket side (asyncio protocol) ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(cast(asyncio.Transport, transport))
        if self.on_connect is not None:
            self.on_connect(self)

    def attach(self, transport: asyncio.Transport) -> None:
        """Start relaying ``transport`` (also called after ``set_protocol`` on the client)."""
        self.transport = transport
        if self.early:
            transport.write(self.early)
            self.early = b""
        if self.held:
            transport.writelines(self.held)
            self.held = None
            self._grant()  # those bytes have left us: the peer may need the credit back
        if self.done:  # reset before its socket was attached
            reset_transport(transport)
            return
        if self.fin_in:
            self._write_eof()
        self.update_reading()

    def counts(self) -> tuple[int, int]:
        """Bytes read from our socket and written to it (``autovpn.stats.Metered``)."""
        return self.nread, self.nwritten

    def activity(self) -> int:
        """Bytes relayed either way (``autovpn.idle.Idler``): the counts already kept."""
        return self.nread + self.nwritten

    def close_idle(self, quiet: float) -> None:
        """Nothing relayed for ``quiet`` seconds: reset the stream here and at the peer,
        whose socket is reset too (a silent transfer may not be complete)."""
        why = f"idle for {quiet:.0f} s (idle_timeout)"
        self.conn.reset_stream(self.sid, ResetReason.TIMED_OUT, why)
        self.on_reset(ResetReason.TIMED_OUT, why, from_peer=False)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _LOCAL_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.done:
            return
        self.nread += nbytes
        data = bytes(_LOCAL_READ_BUFFER[:nbytes])
        if self.unsent or self.send_credit < nbytes:
            # Past our credit (a read that was in flight when we paused): keep the rest.
            data = self.unsent + data
            n = max(self.send_credit, 0)
            self.unsent = data[n:]
            data = data[:n]
            if not data:
                self.update_reading()
                return
        self.send_credit -= len(data)
        self.conn.send_data(self.sid, data)
        if self.send_credit <= 0 or self.conn.writing_paused or self.unsent:
            self.update_reading()

    def eof_received(self) -> bool:
        if not self.unsent:
            self._send_fin()
        else:
            self.fin_pending = True  # sent after the unsent bytes (see on_window)
        return True  # keep our write side open: half-close (RFC 9293 section 3.6)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._grant()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.flow is not None:
            self.flow.finish(self, RESULT_OK if exc is None else type(exc).__name__)
        if not self.done:
            self.done = True
            if not (self.fin_in and self.fin_out) and not self.conn.closed:
                # The far end resets its socket too (``on_reset``): a socket that failed here
                # must not look like a clean end there.
                why = f"socket failed: {exc}" if exc is not None else "socket closed"
                self.conn.reset_stream(self.sid, ResetReason.CANCELLED, why)
            else:
                self.conn.forget(self.sid)
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(StreamError(ResetReason.CANCELLED))

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.done:
            return
        pause = self.send_credit <= 0 or bool(self.unsent) or self.conn.writing_paused
        if self.conn.writing_paused:
            self.conn.block(self)
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # -- tunnel side -------------------------------------------------------------------------

    def on_data(self, piece: bytes | memoryview) -> None:
        n = len(piece)
        self.recv_budget -= n
        if self.recv_budget < 0 or self.fin_in:
            why = "DATA after FIN" if self.fin_in else "peer overran the stream window"
            self.on_reset(ResetReason.PROTOCOL_ERROR, why, False)
            self.conn.reset_stream(self.sid, ResetReason.PROTOCOL_ERROR, why)
            return
        self.recv_unacked += n
        self.nwritten += n
        if self.transport is not None:
            self.transport.write(bytes(piece))
            self._grant()
        else:
            if self.held is None:
                self.held = []
            self.held.append(bytes(piece))

    def _grant(self) -> None:
        # Grant credit back once a quarter window has left our socket buffer: fewer WINDOW
        # frames than per-read grants, and a stalled socket (write_paused) grants nothing.
        if self.write_paused or self.done or self.recv_unacked < self.conn.window >> 2:
            return
        n, self.recv_unacked = self.recv_unacked, 0
        self.recv_budget += n
        self.conn.send_frame(frames.frame(FrameType.WINDOW, self.sid, frames.U32.pack(n)))

    def on_window(self, increment: int) -> None:
        self.send_credit += increment
        if self.unsent and self.send_credit > 0:
            data, self.unsent = self.unsent[: self.send_credit], self.unsent[self.send_credit :]
            self.send_credit -= len(data)
            self.conn.send_data(self.sid, data)
            if not self.unsent and self.fin_pending:
                self.fin_pending = False
                self._send_fin()
        self.update_reading()

    def on_open_ok(self, window: int) -> None:
        # The window works like a first WINDOW: bytes read before it (``unsent``) go now.
        self.on_window(window)
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(None)

    def on_fin(self) -> None:
        self.fin_in = True
        if self.transport is not None:
            self._write_eof()

    def _write_eof(self) -> None:
        assert self.transport is not None
        if self.fin_out:
            self._finish()
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self._finish()

    def _send_fin(self) -> None:
        self.fin_out = True
        self.conn.send_frame(frames.frame(FrameType.FIN, self.sid))
        if self.fin_in:
            self._finish()

    def _finish(self) -> None:
        """Both directions ended cleanly: close once our writes have drained."""
        if not self.done:
            self.done = True
            self.conn.forget(self.sid)
            if self.transport is not None:
                self.transport.close()

    def on_reset(self, reason: ResetReason, message: str, from_peer: bool) -> None:
        if self.flow is not None:
            self.flow.finish(self, reason.name.lower())
        already = self.done
        self.done = True
        self.conn.forget(self.sid)
        if self.opened is not None and not self.opened.done():
            # Not from the peer: the tunnel itself failed (lost, stalled), not the target.
            conn = self.conn
            self.opened.set_exception(
                StreamError(
                    reason,
                    message or reason.name.lower(),
                    tunnel=not from_peer,
                    # Whether a retry could deliver the early data twice (autovpn.tunnel.mux
                    # .pool): not if the OPEN was still waiting for its write when we failed.
                    sent=self.sid < conn.written_below,
                    # GOAWAY comes before the refusals it causes: the connection is closing.
                    draining=from_peer and reason is ResetReason.REFUSED_STREAM and conn.draining,
                )
            )
        elif not already and self.transport is not None:
            # An error after the stream was open: a TCP reset (not abort's FIN), so the
            # application sees an error rather than a clean end of data it could mistake for
            # a complete response or upload.
            reset_transport(self.transport)


def open_ok(ep: StreamEndpoint) -> None:
    """The socket for ``ep`` is connected: tell the peer, before any byte is relayed."""
    if ep.done:  # the peer gave up while we were connecting
        if ep.transport is not None:
            reset_transport(ep.transport)  # early data may have gone out: not a clean end
        return
    ep.conn.send_frame(frames.frame(FrameType.OPEN_OK, ep.sid, frames.U32.pack(ep.conn.window)))
    ep.on_connect = None
