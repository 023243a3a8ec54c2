"""Several wstunnel servers (``--protocol wstunnel wss://a wss://b``): failover and fail-back.

``WstunnelServers`` keeps one ``WstunnelClient`` per server and opens each tunnel on the best
one that is up, with the choice, retries, fail-fast waiting and mode fallback of
``autovpn.tunnel.failover``, which our own protocol's pool shares: the lowest ``priority``
first, spread by ``weight`` among equals; a tunnel whose server cannot be reached, was lost
during the upgrade, refused us (401, 403, 404, an untrusted certificate) or answered that it
cannot serve now (429, 5xx) is tried again on the next server, ``retries`` attempts in all.
A 400 is final: wstunnel answers every refusal with it, an unreachable destination included,
so another server would only dial the same target again.  A server's health is what its
connects say (``autovpn.tunnel.wstunnel.client``): no periodic probe while it is up, a probe
with back-off while it is not, so that new tunnels go back to it when it returns.

Reverse tunnels (``-R``) are asked of the best server too, each time the request is armed
again: a held request stays on its server until a connection comes or the server is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Unpack

from autovpn.tunnel.failover import Member, ServerSet, SetOptions
from autovpn.tunnel.wstunnel.client import (
    WstunnelClient,
    WstunnelClientSettings,
    WsUpstream,
)
from autovpn.tunnel.wstunnel.relay import WsSide
from autovpn.tunnel.wstunnel.reverse import ReverseRunner, ReverseSpec
from autovpn.wire import wstunnel
from autovpn.wire.wstunnel import LocalProtocol


@dataclass(frozen=True, slots=True)
class WstunnelServer:
    """One server: its client settings, priority (lower first) and weight."""

    settings: WstunnelClientSettings
    priority: int = 1
    weight: int = 1


class WstunnelServers(ServerSet[WstunnelClient]):
    """Tunnels over the best of several wstunnel servers (one server is the same with no
    choice).  Use as ``async with WstunnelServers(servers) as servers``."""

    def __init__(
        self,
        servers: Sequence[WstunnelServer],
        *,
        reverse: Sequence[str] = (),
        reverse_max_backoff: float = 1.0,
        **options: Unpack[SetOptions],
    ) -> None:
        super().__init__(
            [Member(WstunnelClient(s.settings), s.priority, s.weight) for s in servers], **options
        )
        self.reverse = [
            ReverseRunner(self, ReverseSpec.parse(r), reverse_max_backoff) for r in reverse
        ]

    def start(self) -> None:
        super().start()
        for runner in self.reverse:
            runner.start()

    async def close(self) -> None:
        for runner in self.reverse:
            await runner.close()
        await super().close()

    @property
    def opened(self) -> int:
        """Tunnels opened, on every server."""
        return sum(c.opened for c in self.clients)

    @property
    def tunnels(self) -> set[WsSide]:
        """The tunnels open now, on every server."""
        return set().union(*(c.tunnels for c in self.clients))

    async def open_tunnel(
        self,
        protocol: LocalProtocol,
        host: str,
        port: int,
        *,
        answer_timeout: float | None = 20.0,
        side: type[WsSide] = WsSide,
    ) -> tuple[WsSide, wstunnel.UpgradeAnswer]:
        """``WstunnelClient.open_tunnel`` on the best server, the next one on a failure of
        the server's.  Raises StreamError (TunnelUnavailable when no server is up)."""

        async def open_on(client: WstunnelClient) -> tuple[WsSide, wstunnel.UpgradeAnswer]:
            return await client.open_tunnel(
                protocol, host, port, answer_timeout=answer_timeout, side=side
            )

        return await self.open_retrying(host, port, open_on)

    async def open_upstream(
        self, host: str, port: int, early: bytes = b"", *, proxy_protocol: bool | None = None
    ) -> WsUpstream:
        """For the dialer and the forwards: a Tcp tunnel to host:port (``proxy_protocol``:
        ask for a PROXY v2 header, default each client's setting).  Raises StreamError."""

        async def open_on(client: WstunnelClient) -> WsUpstream:
            return await client.open_upstream(host, port, early, proxy_protocol=proxy_protocol)

        # No ``early`` for the retries: it is sent only once the server answered 101, so a
        # failed attempt cannot have delivered it.
        return await self.open_retrying(host, port, open_on)

    def servers_status(self) -> list[dict[str, object]]:
        """Each server's state, for ``/status`` and ``autovpn status``."""
        return [
            {
                **self.member_status(m),
                "address": None,
                "connects": m.client.connects,
                "failures": m.client.failures,
                "streams_opened": m.client.opened,
                "tunnels": len(m.client.tunnels),  # open now: one connection each
                "connections": [],  # no connection outlives its tunnel
            }
            for m in self.members
        ]
