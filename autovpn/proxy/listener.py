"""The local listeners: SOCKS5 and HTTP proxy, thin asyncio layers over the sans-I/O parsers.

A connection starts in a handshake protocol that feeds bytes to the parser.  Once the target is
known, reading pauses, the ``Dialer`` routes and connects, the listener answers its client (the
SOCKS5 reply or the CONNECT status) and hands the socket to the upstream, which relays it from
then on.  Every handshake task belongs to its ``ProxyListener`` and is cancelled with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from autovpn.config import LISTENER_HANDSHAKE_TIMEOUT
from autovpn.errors import ConfigError
from autovpn.eventloop import HeapTrimmer
from autovpn.limits import LISTENER_MAX_CONNECTIONS_PER_ADDRESS, ConnectionsPerAddress
from autovpn.net import is_loopback
from autovpn.ports import bind_error
from autovpn.proxy.dialer import Dialer
from autovpn.proxy.handshake import HandshakeBase, ListenerKind
from autovpn.proxy.http_listener import HttpHandshake
from autovpn.proxy.socks5_listener import Socks5Handshake
from autovpn.proxy.udp_relay import UdpRelayStats
from autovpn.wire.auth import Credentials

__all__ = ["ListenerKind", "ProxyListener"]

log = logging.getLogger("autovpn.proxy")

#: A client has this long from its accept until its request is read and its target connected
#: (``[client] handshake_timeout``).  Bytes do not extend it, so idle and slowloris connections
#: are closed while others are served.
HANDSHAKE_TIMEOUT = LISTENER_HANDSHAKE_TIMEOUT


#: Seconds between two checks of the per-address count for connections that have closed.
PRUNE_INTERVAL = 2.0
#: Closed connections let go of at one check that make it the end of a burst: trim the heap.
TRIM_AFTER_CONNECTIONS = 256


class ProxyListener:
    """One listening socket of one kind."""

    def __init__(
        self,
        kind: ListenerKind,
        host: str,
        port: int,
        dialer: Dialer,
        credentials: Credentials | None = None,
        *,
        allow_open: bool = False,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections_per_address: int = LISTENER_MAX_CONNECTIONS_PER_ADDRESS,
    ) -> None:
        if not is_loopback(host) and not credentials and not allow_open:
            raise ConfigError(
                f"listen {kind.value}://{host}:{port}",
                "refusing to serve a non-loopback address without credentials "
                "(add ?login=&password=, or --allow-open if you really mean it)",
            )
        self.kind = kind
        self.host = host
        self.port = port
        self.dialer = dialer
        self.credentials = credentials or Credentials()
        self.handshake_timeout = handshake_timeout
        #: Connections per client address, from accept until the socket closes.
        self.clients = ConnectionsPerAddress(
            max_connections_per_address, "client.max_connections_per_address"
        )
        self._prune: asyncio.TimerHandle | None = None
        #: Gives back what a burst of connections freed once the count let go of them.
        self.trimmer = HeapTrimmer()
        self.accepted = 0
        self.failed = 0
        self.udp_stats = UdpRelayStats()  # all UDP associations of this listener
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.handshaking: set[HandshakeBase] = set()
        self.loop: asyncio.AbstractEventLoop  # set by start(), before any connection

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol]
        if self.kind is ListenerKind.SOCKS5:
            factory = lambda: Socks5Handshake(self)  # noqa: E731
        else:
            factory = lambda: HttpHandshake(self)  # noqa: E731
        try:
            self._server = await loop.create_server(factory, self.host, self.port, backlog=1024)
        except OSError as exc:
            raise bind_error(f"{self.kind.value} listener", self.host, self.port, exc) from exc
        log.info("%s listener on %s:%d", self.kind.value, self.host, self.bound_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for handshake in list(self.handshaking):  # clients still in their handshake
            if handshake.transport is not None:
                handshake.transport.abort()
        self.handshaking.clear()
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None
        self.trimmer.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def watch_clients(self) -> None:
        """A connection was admitted: check the count for closed ones every PRUNE_INTERVAL
        while any is counted.  A relayed socket is closed by its relay, which does not tell
        us; until checked, a closed one still holds its transport (1.5 KiB with its peer
        name: 10,000 of them were 15 MiB) and counts for its address."""
        if self._prune is None and len(self.clients):
            self._prune = self.loop.call_later(PRUNE_INTERVAL, self._prune_clients)

    def _prune_clients(self) -> None:
        self._prune = None
        if self.clients.prune() >= TRIM_AFTER_CONNECTIONS:
            self.trimmer.released()  # the end of a burst: its transports are gone only now
        self.watch_clients()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
