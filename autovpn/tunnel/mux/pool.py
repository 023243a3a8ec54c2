"""Several servers of our own protocol: failover, fail-back, and retries across them.

``ServerPool`` keeps one ``TunnelClient`` per server, each with its own connections, reconnects
and keepalive (the health check: a server is *up* while one of its connections answers).  The
choice of a server, the retries on the next one, failing fast when none is up and the mode
fallback are ``autovpn.tunnel.failover``'s, shared with the wstunnel protocol's client; what
this module adds is our protocol's own: streams, DNS streams and UDP flows.

A stream that fails because of the tunnel (its connection was lost or stalled, the server did
not answer, or refused it while closing) is tried again on the next server, or on a new
connection to the same one; but never when its early data may already have reached the
destination.  A stream refused for a limit of its connection is tried only where another
connection or server can take it, else it fails at once with the reason.  A failure that
comes from the destination (refused by the target, unreachable, policy) is final.

UDP flows follow the best server: a flow whose server went down is opened again on the new one
with its next datagram (the far end sees a new source, which WireGuard takes in its stride).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Unpack

from autovpn.tunnel.failover import Member, ServerSet, SetOptions
from autovpn.tunnel.mux.client import (
    ClientSettings,
    StreamUpstream,
    TunnelClient,
    socket_stream,
)
from autovpn.tunnel.mux.connection import StreamEndpoint
from autovpn.wire.frames import StreamKind

log = logging.getLogger("autovpn.tunnel.pool")


@dataclass(frozen=True, slots=True)
class PoolServer:
    """One server of the pool: its client settings, priority (lower first) and weight."""

    settings: ClientSettings
    priority: int = 1
    weight: int = 1


class _Flow:
    """A UDP flow of the pool: its reply handler, and the server flow it is on now."""

    __slots__ = ("handler", "client", "inner")

    def __init__(self, handler: Callable[[str, int, bytes], None]) -> None:
        self.handler = handler
        self.client: TunnelClient | None = None
        self.inner = 0


class ServerPool(ServerSet[TunnelClient]):
    """Streams, DNS streams and datagrams over the best of several tunnel servers.

    Use as ``async with ServerPool(servers) as pool``.
    """

    def __init__(self, servers: Sequence[PoolServer], **options: Unpack[SetOptions]) -> None:
        super().__init__(
            [Member(TunnelClient(s.settings), s.priority, s.weight) for s in servers], **options
        )
        self.datagrams_dropped = 0  # no server up for the datagram (the clients count theirs)
        self._flows: dict[int, _Flow] = {}
        self._next_flow = 1

    # -- streams -------------------------------------------------------------------------------

    async def open_stream(
        self, host: str, port: int, early: bytes = b"", kind: StreamKind = StreamKind.TCP
    ) -> StreamEndpoint:
        """Open a stream on the best server; a tunnel failure is tried again on the next one
        (``retries`` attempts in all).  Raises StreamError or TunnelUnavailable."""

        async def open_on(client: TunnelClient) -> StreamEndpoint:
            return await client.open_stream(host, port, early, kind)

        return await self.open_retrying(host, port, open_on, early)

    def elsewhere(self, client: TunnelClient) -> bool:
        """Another connection of ``client``'s, or another server, could take a stream that
        ``client``'s connection refused for a limit."""
        return client.live > 1 or super().elsewhere(client)

    async def open_upstream(self, host: str, port: int, early: bytes = b"") -> StreamUpstream:
        """``open_stream`` for the dialer: the result relays a local socket once attached."""
        return StreamUpstream(await self.open_stream(host, port, early))

    async def open_socket_stream(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream as asyncio streams (the split resolver's DNS over TCP)."""
        return await socket_stream(await self.open_stream(host, port))

    # -- UDP flows -----------------------------------------------------------------------------

    def open_flow(self, on_reply: Callable[[str, int, bytes], None]) -> int:
        """A new UDP flow; ``on_reply(host, port, data)`` gets the datagrams coming back."""
        flow = self._next_flow
        self._next_flow += 1
        self._flows[flow] = _Flow(on_reply)
        return flow

    def close_flow(self, flow: int) -> None:
        f = self._flows.pop(flow, None)
        if f is not None and f.client is not None:
            f.client.close_flow(f.inner)

    def send_datagram(self, flow: int, host: str, port: int, data: bytes) -> bool:
        """Send one datagram of ``flow`` on the best server (the flow moves there when its own
        is no longer up, or when a server of a better priority is back); False when dropped."""
        f = self._flows.get(flow)
        if f is None:
            return False
        client = self._flow_server(f.client)
        if client is None:
            self.datagrams_dropped += 1
            return False
        if client is not f.client:
            if f.client is not None:
                log.info(
                    "udp flow %d moves from %s to %s",
                    flow,
                    f.client.settings.server,
                    client.settings.server,
                )
                f.client.close_flow(f.inner)
            f.client = client
            f.inner = client.open_flow(f.handler)
        return client.send_datagram(f.inner, host, port, data)

    def _flow_server(self, current: TunnelClient | None) -> TunnelClient | None:
        """The flow's server stays as long as it is up and of the best priority up."""
        if current is not None and current.up:
            top = min(m.priority for m in self.members if m.client.up)
            if next(m.priority for m in self.members if m.client is current) == top:
                return current
        return self.best()

    # -- status --------------------------------------------------------------------------------

    def servers_status(self) -> list[dict[str, object]]:
        """Each server's state, for ``/status`` and ``autovpn status``."""
        out: list[dict[str, object]] = []
        for m in self.members:
            c = m.client
            out.append(
                {
                    **self.member_status(m),
                    "address": c.address or None,
                    "connects": c.connects,
                    "failures": c.failures,
                    "streams_opened": c.streams_opened,
                    "connections": [
                        {
                            "streams": len(conn.streams),
                            "rtt_ms": None if conn.rtt is None else round(conn.rtt * 1000, 2),
                            "bytes_in": conn.bytes_in,
                            "bytes_out": conn.bytes_out,
                        }
                        for conn in c.connections
                    ],
                }
            )
        return out
