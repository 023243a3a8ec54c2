"""The skeleton every local listener's connection starts in: a handshake protocol.

It owns the client's socket until the target is known: accounting, the handshake deadline
(``[client] handshake_timeout``; bytes do not extend it, so idle and slowloris clients are
closed while others are served), failing with a reply, and ``dial``: route and connect through
the listener's ``Dialer``.  ``socks5_listener.Socks5Handshake`` and
``http_listener.HttpHandshake`` feed their sans-I/O parsers from it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from autovpn.errors import ResetReason, StreamError
from autovpn.limits import ConnectionsPerAddress
from autovpn.proxy.dialer import Dialer, Upstream, discard
from autovpn.proxy.udp_relay import UdpRelayStats
from autovpn.wire.auth import Credentials

log = logging.getLogger("autovpn.proxy")


class ListenerKind(enum.Enum):
    SOCKS5 = "socks5"
    HTTP = "http"


class ListenerSide(Protocol):
    """What a connection needs of the listener that accepted it (``listener.ProxyListener``).

    Said here rather than by importing ``ProxyListener``: the listener picks the handshake
    class for its kind, so it imports the handshakes, and they must not import it back.
    """

    kind: ListenerKind
    host: str
    dialer: Dialer
    credentials: Credentials
    handshake_timeout: float
    clients: ConnectionsPerAddress
    handshaking: set[HandshakeBase]
    udp_stats: UdpRelayStats
    loop: asyncio.AbstractEventLoop
    accepted: int
    failed: int

    def watch_clients(self) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...


class HandshakeBase(asyncio.Protocol):
    def __init__(self, listener: ListenerSide) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.listener.accepted += 1
        # Counted until the socket closes, also after the relay took it over (the count
        # notices closed ones by itself: see ConnectionsPerAddress).
        if not self.listener.clients.admit(transport, str(peer[0]) if peer else "?"):
            self.listener.failed += 1
            self.transport.abort()  # past client.max_connections_per_address (logged there)
            return
        self.listener.watch_clients()
        self.listener.handshaking.add(self)
        self._timer = self.listener.loop.call_later(self.listener.handshake_timeout, self._timeout)

    def _timeout(self) -> None:
        log.info(
            "%s client %s: handshake not done within %g s (handshake_timeout)",
            self.listener.kind.value,
            self.peer,
            self.listener.handshake_timeout,
        )
        if self.transport is not None:
            self.transport.abort()

    def stop_timer(self) -> None:
        """The handshake is over (handed off, failed or gone)."""
        self.listener.handshaking.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fail(self, reply: bytes, why: str, reason: str | None = "handshake") -> None:
        """Answer ``reply`` and close.  ``reason``: the failure's name in the statistics
        (None when its connection's ``Flow`` already counted it)."""
        self.listener.failed += 1
        stats = self.listener.dialer.stats
        if stats is not None and reason is not None:
            stats.failure(self.listener.kind.value, self.peer, reason)
        self.stop_timer()
        log.info("%s client %s: %s", self.listener.kind.value, self.peer, why)
        if self.transport is not None and not self.transport.is_closing():
            if reply:
                self.transport.write(reply)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timer()
        if self.transport is not None:
            self.listener.clients.release(self.transport)

    async def dial(
        self, host: str, port: int, early: bytes, failure: Callable[[StreamError], bytes]
    ) -> Upstream | None:
        """Route and connect for this client; on failure answer ``failure(error)`` and return
        None.  An upstream whose client left meanwhile is discarded, never leaked."""
        assert self.transport is not None
        try:
            upstream, _ = await self.listener.dialer.connect(
                host, port, early, client=self.peer, via=self.listener.kind.value
            )
        except StreamError as exc:
            self.fail(failure(exc), f"{host}:{port}: {exc}", None)
            return None
        except Exception:  # a bug must not leave the client waiting for the timeout
            log.exception(
                "%s client %s: dialling %s:%d failed",
                self.listener.kind.value,
                self.peer,
                host,
                port,
            )
            self.fail(
                failure(StreamError(ResetReason.GENERAL_FAILURE)),
                f"{host}:{port}: internal error",
                None,
            )
            return None
        self.stop_timer()
        if self.transport.is_closing():
            discard(upstream)
            return None
        return upstream
