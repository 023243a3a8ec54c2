"""``-L udp://`` with ``--protocol wstunnel``: the UDP relay towards a stock wstunnel server.

wstunnel carries UDP as one WebSocket per local peer, one datagram per binary frame, with a
``Udp`` JWT claim (docs/wstunnel-protocol.md 2.3, 3.2).  Each local peer address gets its own
tunnel, opened on its first datagram; datagrams that arrive while it opens wait in a short queue
(the rest are dropped and counted, as a congested network would).  The local port stays bound
across tunnel failures: the next datagram opens a new tunnel, so WireGuard recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from autovpn.errors import RemoteProtocolError, StreamError
from autovpn.proxy.udp_relay import BoundRelaySocket
from autovpn.tunnel.wstunnel.relay import UdpWsSide
from autovpn.tunnel.wstunnel.servers import WstunnelServers
from autovpn.wire import wstunnel
from autovpn.wire.wstunnel import Kind, LocalProtocol

log = logging.getLogger("autovpn.udp")

PENDING_PER_PEER = 64  # datagrams queued while a peer's tunnel opens

Address = tuple[str, int]


class _PeerPort(asyncio.DatagramTransport):
    """The relay's socket as seen by one peer's tunnel: replies go to that peer."""

    def __init__(self, relay: WstunnelUdpRelay, peer: Address) -> None:
        super().__init__()
        self.relay = relay
        self.peer = peer

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self.relay.transport is not None:
            self.relay.stats.replies += 1
            self.relay.transport.sendto(data, self.peer)

    def is_closing(self) -> bool:
        return self.relay.transport is None

    def close(self) -> None:
        self.relay.forget(self.peer)

    def abort(self) -> None:
        self.relay.forget(self.peer)


class WstunnelUdpRelay(BoundRelaySocket):
    via = "(wstunnel protocol)"

    def __init__(
        self,
        host: str,
        port: int,
        target_host: str,
        target_port: int,
        client: WstunnelServers,
        idle_timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, target_host, target_port)
        self.client = client
        # wstunnel's timeout claim: the server closes an idle tunnel (0: never).
        self.protocol = LocalProtocol(
            Kind.UDP, timeout=wstunnel.Duration(int(idle_timeout)) if idle_timeout else None
        )
        self._tunnels: dict[Address, UdpWsSide] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for ws in list(self._tunnels.values()):
            ws.finish()
        self._tunnels.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.stats.received += 1
        peer = (str(addr[0]), int(addr[1]))
        ws = self._tunnels.get(peer)
        if ws is not None and not ws.closed:
            ws.send_data(data)
            self.stats.sent += 1
            return
        pending = self._pending.get(peer)
        if pending is None:
            self._pending[peer] = [data]
            task = asyncio.get_running_loop().create_task(self._open(peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif len(pending) < PENDING_PER_PEER:
            pending.append(data)
        else:
            self.stats.dropped += 1

    async def _open(self, peer: Address) -> None:
        try:
            ws, _ = await self.client.open_tunnel(
                self.protocol, self.target[0], self.target[1], side=UdpWsSide
            )
        except (OSError, TimeoutError, RemoteProtocolError, StreamError) as exc:
            dropped = len(self._pending.pop(peer, ()))
            self.stats.dropped += dropped
            log.info("udp relay: no wstunnel tunnel for %s:%d: %s", *peer, exc)
            return
        assert isinstance(ws, UdpWsSide)
        self._tunnels[peer] = ws
        ws.attach_datagram(_PeerPort(self, peer))
        for data in self._pending.pop(peer, ()):
            ws.send_data(data)
            self.stats.sent += 1

    def forget(self, peer: Address) -> None:
        self._tunnels.pop(peer, None)
