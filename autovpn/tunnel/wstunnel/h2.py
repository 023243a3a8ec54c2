"""wstunnel's HTTP/2 transport on the server (docs/wstunnel-protocol.md section 4): ``POST
/<prefix>/events`` with the JWT in ``cookie``, over h2c with prior knowledge or TLS with ALPN
``h2``.

The HTTP/2 framing is the ``h2`` package (sans-I/O).  Each request stream is one tunnel: the
same checks as the WebSocket transport (minus the upgrade headers), the destination dialled
before answering, then ``200`` with the request's ``content-type`` and a streaming body both
ways.  Every DATA chunk from the target goes out as it is read, within the peer's flow-control
window (the target is paused while the window is shut); received DATA is acknowledged once
written.  END_STREAM ends the tunnel, as Close does on WebSocket; RST_STREAM, or the HTTP/2
connection lost, resets the target socket (an error must not look like a clean end there).

Each stream is a ``Flow`` of the statistics as a WebSocket tunnel is (``server.py``); the
target socket counts the bytes it reads and is written, and its end ends the record.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from autovpn.errors import RemoteProtocolError
from autovpn.net import reset_transport
from autovpn.stats import RESULT_OK, Flow
from autovpn.wire import wstunnel
from autovpn.wire.http1 import RequestHead
from autovpn.wire.wstunnel import Kind, WstunnelRejected, refusal_reason

if TYPE_CHECKING:
    from autovpn.tunnel.wstunnel.server import WstunnelService

log = logging.getLogger("autovpn.tunnel.wstunnel")

PREFACE_LINE: Final = "PRI * HTTP/2.0"
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The receive window of a whole HTTP/2 connection.  A stream's data is acknowledged only once
#: its destination's socket took it, so a slow destination holds its stream's window (64 KiB,
#: the protocol's default) unacknowledged: a connection window of the same 64 KiB would then
#: stop every other stream of the connection too.  h2's default of 100 streams at 64 KiB each
#: fits in this.
CONNECTION_WINDOW: Final = 16 << 20


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _Target(asyncio.Protocol):
    """The destination socket of one HTTP/2 tunnel stream."""

    def __init__(self, conn: H2Tunnels, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.eof = False
        self.ended = False
        self.held: list[bytes] = []
        self.write_paused = False
        self.unacked = 0  # bytes of received DATA written here, not yet acknowledged
        #: Bytes read from the destination and written to it (``autovpn.stats.Metered``).
        self.nread = 0
        self.nwritten = 0
        #: The tunnel's record, ended with the destination socket; ``result``: how it ended.
        self.flow: Flow | None = None
        self.result = RESULT_OK

    def counts(self) -> tuple[int, int]:
        return self.nread, self.nwritten

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.nwritten += len(data)
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # until the 200 is sent

    def data_received(self, data: bytes) -> None:
        self.nread += len(data)
        self.pending += data
        self.conn.pump(self)

    def eof_received(self) -> bool:
        self.eof = True
        self.conn.pump(self)
        return False

    def pause_writing(self) -> None:
        self.write_paused = True  # the destination reads slower than its stream sends

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.acknowledge(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            if self.result == RESULT_OK:
                self.result = type(exc).__name__
            self.conn.reset(self.stream_id)
        else:
            self.conn.pump(self)
        if self.flow is not None:
            self.flow.end(self.result)


class H2Tunnels(asyncio.Protocol):
    """One HTTP/2 connection from a wstunnel client; each stream is a tunnel."""

    def __init__(self, service: WstunnelService, peer: str, client_cn: str | None) -> None:
        self.service = service
        self.peer = peer
        self.client_cn = client_cn
        config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.targets: dict[int, _Target] = {}
        self.early: dict[int, list[bytes]] = {}
        #: Flow-controlled bytes of ``early`` (padding included): acknowledged when written.
        self.early_size: dict[int, int] = {}
        self.closed = False

    def start(self, transport: asyncio.Transport, data: bytes) -> None:
        self.transport = transport
        transport.set_protocol(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(
            CONNECTION_WINDOW - self.h2.inbound_flow_control_window
        )
        self.data_received(data)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("wstunnel h2 peer %s: %s", self.peer, exc)
            self._flush()
            self.abort()
            return
        for event in events:
            self._event(event)
        self._flush()

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.early[event.stream_id] = []
            self.early_size[event.stream_id] = 0
            headers = [(_text(k), _text(v)) for k, v in event.headers]
            self.service.spawn_h2(self._open(event.stream_id, headers))
        elif isinstance(event, h2.events.DataReceived):
            # Acknowledged (the peer may send more) only once the destination's socket took
            # it: before, a destination that read nothing let a client fill our memory.
            sid, size = event.stream_id, event.flow_controlled_length
            target = self.targets.get(sid)
            if target is not None and target.transport is not None:
                target.write(event.data)
                target.unacked += size
                if not target.write_paused:
                    self.acknowledge(target)
            elif sid in self.early:  # held for the destination, acknowledged once written
                self.early[sid].append(event.data)
                self.early_size[sid] += size
            else:  # a stream that is over: nothing holds its bytes
                self._acknowledge(size, sid)
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            target = self.targets.pop(event.stream_id, None)
            self._drop_early(event.stream_id)
            if target is not None and target.transport is not None:
                target.ended = True
                if isinstance(event, h2.events.StreamEnded):
                    target.transport.close()  # no half-close: the tunnel ends (section 3.6)
                    self._end(event.stream_id)
                else:  # the client reset the stream: the transfer failed
                    target.result = "stream_reset"
                    reset_transport(target.transport)
        elif isinstance(event, h2.events.WindowUpdated):
            for target in list(self.targets.values()):
                if event.stream_id in (0, target.stream_id):
                    self.pump(target)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.abort()

    async def _open(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        plain = tuple((k, v) for k, v in headers if not k.startswith(":"))
        head = RequestHead(
            pseudo.get(":method", "POST"), pseudo.get(":path", ""), "HTTP/1.1", plain
        )
        target = _Target(self, stream_id)
        flow: Flow | None = None
        try:
            req = wstunnel.check_request(head, client_cn=self.client_cn, require_upgrade=False)
            who, _ = self.service.authorize(req, self.client_cn, self.peer)
            if req.claims.protocol.kind is not Kind.TCP:
                raise WstunnelRejected("only Tcp tunnels over HTTP/2 here", "not_served")
            # The destination socket's end ends the record (``_Target.connection_lost``);
            # a refusal ends it first, with its reason.
            flow = target.flow = self.service.start_flow(req, who, self.peer)
            if flow is not None:
                flow.meter = target
            await self.service._dial(req, cast(Any, target), self.peer)
        except RemoteProtocolError as exc:
            if flow is None:
                self.service.count_refusal(self.peer, exc)
                log.info("wstunnel h2 peer %s refused: %s", self.peer, exc)
            else:  # the access log line says it, once
                self.service.refused += 1
                flow.end(refusal_reason(exc), str(exc))
            status = exc.status if isinstance(exc, WstunnelRejected) else 400
            self._refuse(stream_id, status)
            return
        except asyncio.CancelledError:
            if flow is not None:
                flow.end("client_gone")
            raise
        except Exception as exc:  # a bug, or input we did not foresee: refuse, keep serving
            if flow is None:
                self.service.count_refusal(self.peer, exc)
            else:
                self.service.refused += 1
                flow.end(type(exc).__name__, str(exc))
            log.warning(
                "wstunnel h2 peer %s refused: unexpected %s: %s",
                self.peer,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),  # a traceback only when debugging
            )
            if target.transport is not None:
                target.transport.abort()
            self._refuse(stream_id)
            return
        if self.closed or stream_id not in self.early:
            target.result = "client_gone"
            if target.transport is not None:
                target.transport.close()
            elif flow is not None:
                flow.end("client_gone")
            return
        self.service.accepted += 1
        self.targets[stream_id] = target
        response = [(":status", "200")]
        content_type = dict(plain).get("content-type")
        if content_type:
            response.append(("content-type", content_type))
        self.h2.send_headers(stream_id, response)
        assert target.transport is not None
        for data in self.early.pop(stream_id, []):
            target.write(data)
        target.unacked += self.early_size.pop(stream_id, 0)
        if not target.write_paused:
            self.acknowledge(target)
        target.transport.resume_reading()
        self._flush()

    def acknowledge(self, target: _Target) -> None:
        """Grant back what ``target``'s socket took (its socket is not paused)."""
        if target.unacked and not self.closed:
            size, target.unacked = target.unacked, 0
            self._acknowledge(size, target.stream_id)
            self._flush()

    def _acknowledge(self, size: int, stream_id: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            pass  # the stream is gone: nothing to grant it

    def _drop_early(self, stream_id: int) -> None:
        """A stream refused or ended before its destination took its bytes: the connection's
        window gets them back (the stream's own is moot)."""
        self.early.pop(stream_id, None)
        size = self.early_size.pop(stream_id, 0)
        if size:
            self._acknowledge(size, stream_id)

    def _refuse(self, stream_id: int, status: int = 400) -> None:
        """wstunnel's 400 ``Invalid request``, or our 403 to a request nobody vouches for."""
        if self.closed:
            return
        self._drop_early(stream_id)
        body = b"Forbidden" if status == 403 else b"Invalid request"
        try:
            self.h2.send_headers(
                stream_id, [(":status", str(status)), ("content-length", str(len(body)))]
            )
            self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def pump(self, target: _Target) -> None:
        """Send what the target read, within the flow-control windows."""
        if self.closed or target.ended or target.stream_id not in self.targets:
            return
        sid = target.stream_id
        while target.pending:
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = bytes(target.pending[:window])
            del target.pending[:window]
            self.h2.send_data(sid, chunk)
        if target.transport is not None and not target.eof:
            if target.pending:
                target.transport.pause_reading()
            else:
                target.transport.resume_reading()
        if target.eof and not target.pending:
            self.targets.pop(sid, None)
            target.ended = True
            self._end(sid)
        self._flush()

    def _end(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def reset(self, stream_id: int) -> None:
        self.targets.pop(stream_id, None)
        try:
            self.h2.reset_stream(stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._drop_targets()

    def _drop_targets(self) -> None:
        targets, self.targets = self.targets, {}
        for target in targets.values():
            if target.result == RESULT_OK:
                target.result = "tunnel_lost"
            if target.transport is not None:
                reset_transport(target.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_targets()
        self.service.h2_connections.discard(self)
        if self.transport is not None:
            self.service.server.clients.release(self.transport)  # counted since its accept
        self.service.server.trimmer.released()
