"""UDP on the tunnel server: DATAGRAM frames in, datagrams to their targets, replies back.

Each (tunnel connection, flow id) is one session.  A session keeps one connected UDP socket per
target it has sent to (a WireGuard flow has one; a SOCKS5 association may have a few), so replies
come back tagged with the address they came from, and ICMP errors (port unreachable) reach us
through ``error_received`` to be counted, not raised.  Sessions end when the client closes the
flow (an empty DATAGRAM), after ``idle_timeout``, or with their tunnel connection.

Targets pass the same destination policy as TCP streams, checked on the resolved address.
Nothing here blocks or queues without bound: datagrams that arrive while a name is being
resolved wait in a short queue, and the rest are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import cast

from autovpn.errors import RemoteProtocolError
from autovpn.limits import peer_key
from autovpn.net import SystemResolver, resolve_target
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.connection import MuxConnection
from autovpn.udp_io import BatchFlusher, DatagramBatch, enlarge_buffers, gso_socket
from autovpn.wire import frames

log = logging.getLogger("autovpn.tunnel.udp")

MAX_TARGETS_PER_FLOW = 64
MAX_FLOWS_PER_CONNECTION = 4096
#: Datagrams kept per target while its socket opens (bounded: at most ~16 MiB of 64 KiB ones).
PENDING_WHILE_RESOLVING = 256
#: Bytes held for all targets still opening, server-wide: a client sending to many slow names
#: gets its datagrams dropped past this, not buffered.
MAX_PENDING_BYTES = 8 << 20
#: Seconds a target that could not be opened (policy, DNS) stays failed before a retry.
RETRY_FAILED_TARGET = 2.0


@dataclass(slots=True)
class UdpStats:
    datagrams_in: int = 0  # from clients, through the tunnel
    datagrams_out: int = 0  # replies sent back through the tunnel
    dropped: int = 0  # policy, queue full, malformed, too many flows
    icmp_errors: int = 0  # errors reported by the kernel for a target (port unreachable...)
    refused: int = 0  # targets the policy refused


class _TargetSocket(asyncio.DatagramProtocol):
    __slots__ = ("session", "host", "port", "address", "transport", "pending", "batch")

    def __init__(self, session: _Session, host: str, port: int, address: bytes) -> None:
        self.session = session
        self.host = host
        self.port = port
        self.address = address  # host and port as DATAGRAM frames encode them
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] | None = []  # datagrams waiting for resolution/connect
        self.batch: DatagramBatch | None = None  # sends, once the socket is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        enlarge_buffers(transport)  # replies come in bursts too (a WireGuard server's window)
        self.batch = DatagramBatch(
            self.transport, gso_socket(transport), self.session.flows.flusher
        )

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.session.reply(self.address, data)

    def error_received(self, exc: Exception) -> None:
        self.session.flows.stats.icmp_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.close_batch()

    def close_batch(self) -> None:
        if self.batch is not None:
            if self.batch.sock is not None:
                self.batch.sock.close()
            self.batch = None


@dataclass(slots=True)
class _Session:
    flows: UdpFlows
    conn: MuxConnection
    flow: int
    targets: dict[tuple[str, int], _TargetSocket] = field(default_factory=dict)
    last_active: float = 0.0
    #: The target of the flow's latest datagram and its encoded address: the next datagram
    #: usually goes to the same one (always, for WireGuard), and is then sent without parsing
    #: its address or looking the target up.
    last_target: _TargetSocket | None = None
    last_address: bytes = b""

    def reply(self, address: bytes, data: bytes) -> None:
        conn = self.conn
        self.last_active = self.flows.loop.time()
        if conn.closed or conn.writing_paused or len(data) > frames.MAX_DATAGRAM_PAYLOAD:
            self.flows.stats.dropped += 1
            return
        self.flows.stats.datagrams_out += 1
        conn.send_datagram(self.flow, address, data)

    def close(self) -> None:
        for target in self.targets.values():
            if target.transport is not None:
                target.transport.close()
            target.close_batch()
        self.targets.clear()


class UdpFlows:
    """All UDP sessions of one tunnel server."""

    def __init__(
        self,
        policy: DestinationPolicy,
        idle_timeout: float = 180.0,
        *,
        lookups: SystemResolver | None = None,
    ) -> None:
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.lookups = lookups  # the server's: target names are counted per client address
        self.stats = UdpStats()
        self.loop = asyncio.get_running_loop()
        self._sessions: dict[tuple[MuxConnection, int], _Session] = {}
        self._per_conn: dict[MuxConnection, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending_bytes = 0  # datagrams held while their targets open, all sessions
        self._sweeper: asyncio.TimerHandle | None = None
        #: Sends each target's datagrams of one tunnel read together (udp_io: UDP GSO).
        self.flusher = BatchFlusher(self.loop)

    def on_datagram(self, conn: MuxConnection, flow: int, payload: bytes) -> None:
        key = (conn, flow)
        session = self._sessions.get(key)
        if session is not None:
            target = session.last_target
            # The encoded address is prefix-free (its type fixes its length), so startswith
            # is an exact match.
            if (
                target is not None
                and target.batch is not None
                and payload.startswith(session.last_address)
            ):
                self.stats.datagrams_in += 1
                session.last_active = self.loop.time()
                target.batch.send(payload[len(session.last_address) :])
                return
        if not payload:  # the client closed the flow
            session = self._sessions.pop(key, None)
            if session is not None:
                self._forget(session)
            return
        self.stats.datagrams_in += 1
        try:
            host, port, end = frames.decode_address(payload)
        except RemoteProtocolError:
            self.stats.dropped += 1
            return
        data = payload[end:]
        if session is None:
            if self._per_conn.get(conn, 0) >= MAX_FLOWS_PER_CONNECTION:
                self.stats.dropped += 1
                return
            session = _Session(self, conn, flow)
            self._sessions[key] = session
            self._per_conn[conn] = self._per_conn.get(conn, 0) + 1
            self._arm_sweeper()
        session.last_active = self.loop.time()
        target = session.targets.get((host, port))
        if target is None:
            if len(session.targets) >= MAX_TARGETS_PER_FLOW or not 0 < port < 65536:
                self.stats.dropped += 1
                return
            target = _TargetSocket(session, host, port, payload[:end])
            session.targets[(host, port)] = target
            task = self.loop.create_task(self._open(target), name=f"udp-{host}:{port}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if target.batch is not None and target.pending is None:  # open, its queue sent
            session.last_target = target
            session.last_address = target.address
            target.batch.send(data)
        elif (
            target.pending is not None
            and len(target.pending) < PENDING_WHILE_RESOLVING
            and self._pending_bytes + len(data) <= MAX_PENDING_BYTES
        ):
            target.pending.append(data)
            self._pending_bytes += len(data)
        else:
            self.stats.dropped += 1

    async def _open(self, target: _TargetSocket) -> None:
        host, port = target.host, target.port
        try:
            addresses = await resolve_target(
                host,
                port,
                udp=True,
                resolver=self.lookups,
                client=peer_key(target.session.conn.peer),
            )
            if not self.policy.host_allowed(host, port):
                addresses = [a for a in addresses if self.policy.address_allowed(a, port)]
            if not addresses:
                self.stats.refused += 1
                log.warning("policy refused UDP target %s:%d", host, port)
                raise OSError("destination not allowed")
            await self.loop.create_datagram_endpoint(
                lambda: target, remote_addr=(addresses[0], port)
            )
        except (OSError, ValueError) as exc:  # ValueError: a name getaddrinfo cannot encode
            log.info("UDP target %s:%d unavailable: %s", host, port, exc)
            self.stats.dropped += len(target.pending or ())
            self._pending_bytes -= sum(len(d) for d in target.pending or ())
            target.pending = None
            # Forget the target after a pause, so a later datagram tries again (a DNS failure
            # may pass); until then its datagrams are dropped rather than each retrying.
            self.loop.call_later(RETRY_FAILED_TARGET, self._forget_target, target)
            return
        pending, target.pending = target.pending or [], None
        self._pending_bytes -= sum(len(d) for d in pending)
        if target.session.targets.get((host, port)) is not target:  # session closed meanwhile
            if target.transport is not None:
                target.transport.close()
            return
        assert target.transport is not None
        for data in pending:
            target.transport.sendto(data)

    @staticmethod
    def _forget_target(target: _TargetSocket) -> None:
        targets = target.session.targets
        if targets.get((target.host, target.port)) is target and target.transport is None:
            del targets[(target.host, target.port)]

    def connection_lost(self, conn: MuxConnection) -> None:
        for key in [k for k in self._sessions if k[0] is conn]:
            self._forget(self._sessions.pop(key))
        self._per_conn.pop(conn, None)

    def _forget(self, session: _Session) -> None:
        session.close()
        left = self._per_conn.get(session.conn, 1) - 1
        if left > 0:
            self._per_conn[session.conn] = left
        else:
            self._per_conn.pop(session.conn, None)

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and self.idle_timeout > 0:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.idle_timeout
        for key, session in list(self._sessions.items()):
            if session.last_active < deadline:
                del self._sessions[key]
                self._forget(session)
        if self._sessions:
            self._arm_sweeper()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self.flusher.cancel()
        self._pending_bytes = 0
        self._per_conn.clear()
