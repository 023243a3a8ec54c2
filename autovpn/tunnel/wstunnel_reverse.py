"""Server-side listeners of wstunnel reverse tunnels (wstunnel.md section 5.6)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from autovpn.tunnel.restrictions import Verdict
from autovpn.tunnel.wstunnel import TunnelRequest, WstunnelRejected
from autovpn.tunnel.wstunnel_relay import LocalSide

if TYPE_CHECKING:
    from autovpn.tunnel.server import TunnelServer


class ReverseListeners:
    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout

    async def wait(
        self, req: TunnelRequest, verdict: Verdict, local: LocalSide, server: TunnelServer
    ) -> tuple[asyncio.Transport, str | None]:
        raise WstunnelRejected("reverse tunnels are not served yet")

    async def close(self) -> None:
        return None
