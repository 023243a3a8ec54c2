"""Opens the upstream side of a local connection, as the router decides.

The listeners parse their handshake, then call ``Dialer.connect(host, port)``.  It asks the
router once, and returns an ``Upstream`` that is already connected (through the tunnel or
directly) or raises ``StreamError`` whose reason the listener turns into the right SOCKS5 reply
or HTTP status.  The listener answers its client, then calls ``upstream.attach(transport)``:
from then on the client's socket is relayed and the listener is out of the path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from autovpn.errors import ResetReason, StreamError
from autovpn.net import reset_reason_for
from autovpn.proxy.relay import Pipe, link
from autovpn.routing.router import Action, Decision, Router

log = logging.getLogger("autovpn.access")


class Upstream(Protocol):
    def attach(self, transport: asyncio.Transport) -> None: ...


class _DirectUpstream:
    __slots__ = ("local",)

    def __init__(self, local: Pipe) -> None:
        self.local = local

    def attach(self, transport: asyncio.Transport) -> None:
        transport.set_protocol(self.local)
        self.local.attach(transport)
        transport.resume_reading()


class TunnelOpener(Protocol):
    """What the dialer needs of a tunnel: our mux client, or the wstunnel-protocol client."""

    async def open_upstream(self, host: str, port: int, early: bytes = b"") -> Upstream: ...


class Dialer:
    """Routes and connects.  ``tunnel`` may be None when no server is configured."""

    def __init__(
        self, router: Router, tunnel: TunnelOpener | None, connect_timeout: float = 10.0
    ) -> None:
        self.router = router
        self.tunnel = tunnel
        self.connect_timeout = connect_timeout
        self.counts = {Action.DIRECT: 0, Action.PROXY: 0, Action.REJECT: 0}

    async def connect(
        self, host: str, port: int, early: bytes = b"", *, client: str = "", via: str = ""
    ) -> tuple[Upstream, Decision]:
        decision = self.router.decide(host, port)
        self.counts[decision.action] += 1
        action = decision.action
        if action is Action.PROXY and self.tunnel is None:
            action = Action.REJECT
            decision = Decision(Action.REJECT, decision.reason + "; no tunnel configured")
        log.info("%s %s %s:%d -> %s (%s)", via, client, host, port, action.value, decision.reason)
        if action is Action.REJECT:
            raise StreamError(ResetReason.NOT_ALLOWED, f"rejected by routing: {decision.reason}")
        if action is Action.PROXY:
            assert self.tunnel is not None
            return await self.tunnel.open_upstream(host, port, early), decision
        return await self._direct(host, port, early), decision

    async def _direct(self, host: str, port: int, early: bytes) -> Upstream:
        loop = asyncio.get_running_loop()
        local, remote = Pipe(), Pipe()
        link(local, remote)
        remote.early = early
        try:
            async with asyncio.timeout(self.connect_timeout):
                # Happy Eyeballs (RFC 8305) across the resolved addresses.
                await loop.create_connection(
                    lambda: remote, host, port, happy_eyeballs_delay=0.25, interleave=1
                )
        except (OSError, TimeoutError) as exc:
            raise StreamError(reset_reason_for(exc), str(exc) or type(exc).__name__) from exc
        return _DirectUpstream(local)
