"""UDP on the local side: the fixed relay (WireGuard's Endpoint) and SOCKS5 UDP ASSOCIATE.

Both carry each datagram in one tunnel DATAGRAM frame, never merged or split, never queued
behind stream flow control: when the tunnel cannot take a datagram right now it is dropped and
counted, as a congested network would (WireGuard and DNS retransmit; a queue would only add
latency).  The local sockets stay bound across tunnel reconnects, so a WireGuard peer pointed at
the relay recovers with its next handshake, without a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from autovpn.limits import address_key
from autovpn.net import resolve_target
from autovpn.ports import bind_error
from autovpn.routing.router import Action, Router
from autovpn.udp_io import BatchFlusher, DatagramBatch, enlarge_buffers, gso_socket
from autovpn.wire import socks5

log = logging.getLogger("autovpn.udp")

Address = tuple[str, int]


class DatagramTunnel(Protocol):
    def open_flow(self, on_reply: Callable[[str, int, bytes], None]) -> int: ...
    def close_flow(self, flow: int) -> None: ...
    def send_datagram(self, flow: int, host: str, port: int, data: bytes) -> bool: ...


@dataclass(slots=True)
class UdpRelayStats:
    received: int = 0  # datagrams from local peers
    sent: int = 0  # handed to the tunnel (or sent directly)
    replies: int = 0  # datagrams delivered back to local peers
    dropped: int = 0  # tunnel down or congested, routing REJECT, oversized
    malformed: int = 0  # bad SOCKS5 UDP headers
    fragments: int = 0  # SOCKS5 datagrams with FRAG != 0 (unsupported, RFC 1928 section 7)
    foreign: int = 0  # datagrams from an address that does not own the association


class _PeerFlow:
    """A local peer's tunnel flow, updated in place for every datagram."""

    __slots__ = ("addr", "flow", "last_active", "replies")

    def __init__(self, addr: tuple[str | int, ...]) -> None:
        self.addr = addr  # as the event loop gave it, so IPv6 keeps its scope
        self.flow = 0
        self.last_active = 0.0
        self.replies: DatagramBatch | None = None  # made with the first reply


class BoundRelaySocket(asyncio.DatagramProtocol):
    """What every fixed UDP relay shares: a local socket bound to host:port, forwarding to one
    target, with big buffers, and its counters."""

    via = "through the tunnel"

    def __init__(self, host: str, port: int, target_host: str, target_port: int) -> None:
        self.host = host
        self.port = port
        self.target = (target_host, target_port)
        self.stats = UdpRelayStats()
        self.transport: asyncio.DatagramTransport | None = None

    @property
    def bound_port(self) -> int:
        assert self.transport is not None
        port: int = self.transport.get_extra_info("sockname")[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        except OSError as exc:
            raise bind_error("udp relay", self.host, self.port, exc, udp=True) from exc
        enlarge_buffers(self.transport)
        log.info(
            "udp relay on %s:%d -> %s:%d %s", self.host, self.bound_port, *self.target, self.via
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)


class UdpRelay(BoundRelaySocket):
    """``udp://BIND:PORT:HOST:PORT``: each local peer address becomes one tunnel flow to
    HOST:PORT; replies go back to that peer.  ``idle_timeout`` 0 means sessions never expire."""

    _loop: asyncio.AbstractEventLoop  # set in connection_made, before any datagram

    def __init__(
        self,
        host: str,
        port: int,
        target_host: str,
        target_port: int,
        tunnel: DatagramTunnel,
        idle_timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, target_host, target_port)
        self.tunnel = tunnel
        self.idle_timeout = idle_timeout
        self._sessions: dict[tuple[str | int, ...], _PeerFlow] = {}  # by the loop's peer address
        self._sweeper: asyncio.TimerHandle | None = None
        self._flusher: BatchFlusher | None = None
        self._gso: socket.socket | None = None  # replies go out in GSO runs (udp_io)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for session in self._sessions.values():
            self.tunnel.close_flow(session.flow)
        self._sessions.clear()
        if self._flusher is not None:
            self._flusher.cancel()
        if self._gso is not None:
            self._gso.close()
            self._gso = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._loop = asyncio.get_running_loop()
        self._flusher = BatchFlusher(self._loop)
        self._gso = gso_socket(transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        stats = self.stats
        stats.received += 1
        # The event loop's address tuple is the key as it is: (host, port) for IPv4, and for
        # IPv6 the same 4-tuple (flowinfo, scope) for every datagram of one peer.  Normalising
        # it, like allocating a new session tuple per datagram, was measurable per datagram.
        session = self._sessions.get(addr)
        if session is None:
            session = self._sessions[addr] = self._new_session(addr)
        # self._loop, not asyncio.get_running_loop(): on 3.11 that costs a getpid() syscall,
        # 5.6% of the relay's CPU per datagram (py-spy).
        session.last_active = self._loop.time()
        if self.tunnel.send_datagram(session.flow, self.target[0], self.target[1], data):
            stats.sent += 1
        else:
            stats.dropped += 1

    def _new_session(self, addr: tuple[str | int, ...]) -> _PeerFlow:
        session = _PeerFlow(addr)
        session.flow = self.tunnel.open_flow(lambda host, port, data: self._reply(session, data))
        self._arm_sweeper()
        return session

    def _reply(self, session: _PeerFlow, data: bytes) -> None:
        if self.transport is None or self._flusher is None:
            return
        self.stats.replies += 1
        batch = session.replies
        if batch is None:
            batch = session.replies = DatagramBatch(
                self.transport, self._gso, self._flusher, session.addr
            )
        batch.send(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp relay: %s", exc)

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and self.idle_timeout > 0:
            self._sweeper = asyncio.get_running_loop().call_later(
                max(self.idle_timeout / 2, 0.5), self._sweep
            )

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = asyncio.get_running_loop().time() - self.idle_timeout
        for peer, session in list(self._sessions.items()):
            if session.last_active < deadline:
                del self._sessions[peer]
                self.tunnel.close_flow(session.flow)
        if self._sessions:
            self._arm_sweeper()


class Socks5UdpAssociation(asyncio.DatagramProtocol):
    """One SOCKS5 UDP ASSOCIATE (RFC 1928 section 7).

    Only the client that asked may use it: datagrams from another IP (or from another port,
    once the client's port is known) are dropped and counted.  Each datagram is routed on its
    own: PROXY through one tunnel flow, DIRECT from a local socket, REJECT dropped.
    """

    def __init__(
        self,
        bind_host: str,
        client: Address,
        router: Router,
        tunnel: DatagramTunnel | None,
        stats: UdpRelayStats | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.client_host = client[0]
        self.client_port = client[1] or None  # learnt from the first datagram when 0
        self.router = router
        self.tunnel = tunnel
        self.stats = stats if stats is not None else UdpRelayStats()  # shared per listener
        self.transport: asyncio.DatagramTransport | None = None
        self._flow: int | None = None
        self._direct: dict[int, asyncio.DatagramTransport] = {}  # family -> socket
        self._resolving: set[asyncio.Task[None]] = set()

    async def start(self) -> Address:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.bind_host, 0))
        assert self.transport is not None
        enlarge_buffers(self.transport)
        sockname = self.transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        if self._flow is not None and self.tunnel is not None:
            self.tunnel.close_flow(self._flow)
            self._flow = None
        for task in self._resolving:
            task.cancel()
        for direct in self._direct.values():
            direct.close()
        self._direct.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        stats = self.stats
        stats.received += 1
        host, port = str(addr[0]), int(addr[1])
        if _same_ip(host, self.client_host) is False or (
            self.client_port is not None and port != self.client_port
        ):
            stats.foreign += 1
            return
        if self.client_port is None:
            self.client_port = port
        try:
            datagram = socks5.parse_udp_datagram(data)
        except socks5.Socks5Error:
            stats.malformed += 1
            return
        if datagram.frag != 0:
            stats.fragments += 1
            return
        decision = self.router.decide(datagram.host, datagram.port)
        if decision.action is Action.PROXY and self.tunnel is not None:
            if self._flow is None:
                self._flow = self.tunnel.open_flow(self._reply)
            if self.tunnel.send_datagram(
                self._flow, datagram.host, datagram.port, datagram.payload
            ):
                stats.sent += 1
            else:
                stats.dropped += 1
        elif decision.action is Action.DIRECT:
            self._send_direct(datagram.host, datagram.port, datagram.payload)
        else:
            stats.dropped += 1

    def _reply(self, host: str, port: int, data: bytes) -> None:
        if self.transport is None or self.client_port is None:
            return
        self.stats.replies += 1
        self.transport.sendto(
            socks5.encode_udp_datagram(host, port, data), (self.client_host, self.client_port)
        )

    def _send_direct(self, host: str, port: int, payload: bytes) -> None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            task = asyncio.get_running_loop().create_task(
                self._resolve_and_send(host, port, payload)
            )
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)
            return
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        direct = self._direct.get(family)
        if direct is None:
            task = asyncio.get_running_loop().create_task(
                self._open_direct(family, (str(ip), port), payload)
            )
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)
            return
        direct.sendto(payload, (str(ip), port))
        self.stats.sent += 1

    async def _resolve_and_send(self, host: str, port: int, payload: bytes) -> None:
        try:
            # resolve_target: a name getaddrinfo cannot even encode is an OSError there too.
            # Counted against the local client's address: its lookups wait for its own turns.
            addresses = await resolve_target(
                host, port, udp=True, client=address_key(str(self.client_host))
            )
        except OSError:
            self.stats.dropped += 1
            return
        self._send_direct(addresses[0], port, payload)

    async def _open_direct(self, family: int, target: Address, payload: bytes) -> None:
        if family not in self._direct:
            association = self

            class _Direct(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                    association._reply(str(addr[0]), int(addr[1]), data)

            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                _Direct,
                family=family,
                local_addr=("0.0.0.0" if family == socket.AF_INET else "::", 0),
            )
            self._direct[family] = transport
        self._direct[family].sendto(payload, target)
        self.stats.sent += 1


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b
