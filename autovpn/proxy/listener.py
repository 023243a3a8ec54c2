"""The local listeners: SOCKS5 and HTTP proxy, thin asyncio layers over the sans-I/O parsers.

A connection starts in a handshake protocol that feeds bytes to the parser.  Once the target is
known, reading pauses, the ``Dialer`` routes and connects, the listener answers its client (the
SOCKS5 reply or the CONNECT status) and hands the socket to the upstream, which relays it from
then on.  Every handshake task belongs to its ``ProxyListener`` and is cancelled with it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

from autovpn.config import LISTENER_HANDSHAKE_TIMEOUT
from autovpn.errors import ConfigError, ResetReason, StreamError
from autovpn.net import is_loopback
from autovpn.ports import bind_error
from autovpn.proxy.dialer import Dialer, Upstream, discard
from autovpn.proxy.udp_relay import DatagramTunnel, Socks5UdpAssociation, UdpRelayStats
from autovpn.wire import socks5
from autovpn.wire.auth import Credentials

log = logging.getLogger("autovpn.proxy")

#: A client has this long from its accept until its request is read and its target connected
#: (``[client] handshake_timeout``).  Bytes do not extend it, so idle and slowloris connections
#: are closed while others are served.
HANDSHAKE_TIMEOUT = LISTENER_HANDSHAKE_TIMEOUT


class ListenerKind(enum.Enum):
    SOCKS5 = "socks5"
    HTTP = "http"


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
            factory = lambda: _Socks5Handshake(self)  # noqa: E731
        else:
            from autovpn.proxy.http_listener import HttpHandshake

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
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class HandshakeBase(asyncio.Protocol):
    def __init__(self, listener: ProxyListener) -> None:
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

    def fail(self, reply: bytes, why: str) -> None:
        self.listener.failed += 1
        self.stop_timer()
        log.info("%s client %s: %s", self.listener.kind.value, self.peer, why)
        if self.transport is not None and not self.transport.is_closing():
            if reply:
                self.transport.write(reply)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_timer()

    async def dial(
        self, host: str, port: int, early: bytes, failure: Callable[[ResetReason], bytes]
    ) -> Upstream | None:
        """Route and connect for this client; on failure answer ``failure(reason)`` and return
        None.  An upstream whose client left meanwhile is discarded, never leaked."""
        assert self.transport is not None
        try:
            upstream, _ = await self.listener.dialer.connect(
                host, port, early, client=self.peer, via=self.listener.kind.value
            )
        except StreamError as exc:
            self.fail(failure(exc.reason), f"{host}:{port}: {exc}")
            return None
        except Exception:  # a bug must not leave the client waiting for the timeout
            log.exception(
                "%s client %s: dialling %s:%d failed",
                self.listener.kind.value,
                self.peer,
                host,
                port,
            )
            self.fail(failure(ResetReason.GENERAL_FAILURE), f"{host}:{port}: internal error")
            return None
        self.stop_timer()
        if self.transport.is_closing():
            discard(upstream)
            return None
        return upstream


class _Socks5Handshake(HandshakeBase):
    def __init__(self, listener: ProxyListener) -> None:
        super().__init__(listener)
        self._parser = socks5.Socks5ServerHandshake(listener.credentials or None)
        self._done = False

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        assert self.transport is not None
        try:
            request = self._parser.receive_data(data)
        except socks5.Socks5Error as exc:
            self._done = True
            # A pipelined greeting + bad auth: the method selection precedes the error reply.
            self.fail(self._parser.data_to_send() + exc.reply, f"SOCKS5 error: {exc}")
            return
        out = self._parser.data_to_send()
        if out:
            self.transport.write(out)
        if request is None:
            return
        self._done = True
        self.transport.pause_reading()
        self.listener.spawn(self._serve(request), f"socks5-{self.peer}")

    async def _serve(self, request: socks5.Socks5Request) -> None:
        assert self.transport is not None
        if request.command is socks5.Command.UDP_ASSOCIATE:
            await self._associate(request)
            return
        if request.command is not socks5.Command.CONNECT:
            self.fail(
                socks5.encode_reply(socks5.Reply.COMMAND_NOT_SUPPORTED),
                f"command {request.command.name} not supported",
            )
            return
        upstream = await self.dial(
            request.host,
            request.port,
            self._parser.trailing_data,
            lambda reason: socks5.encode_reply(reason.socks5_reply),
        )
        if upstream is not None:
            self.transport.write(socks5.encode_reply(socks5.Reply.SUCCEEDED))
            upstream.attach(self.transport)

    async def _associate(self, request: socks5.Socks5Request) -> None:
        """UDP ASSOCIATE (RFC 1928 section 7): a relay socket for this client, alive as long
        as this TCP connection is."""
        assert self.transport is not None
        dialer = self.listener.dialer
        peer = self.transport.get_extra_info("peername")
        tunnel = dialer.tunnel if hasattr(dialer.tunnel, "open_flow") else None
        association = Socks5UdpAssociation(
            self.listener.host,
            (str(peer[0]), request.port),
            dialer.router,
            cast(DatagramTunnel | None, tunnel),
            self.listener.udp_stats,
        )
        try:
            host, port = await association.start()
        except OSError as exc:
            association.close()
            self.fail(socks5.encode_reply(socks5.Reply.GENERAL_FAILURE), f"UDP bind: {exc}")
            return
        self.stop_timer()
        if self.transport.is_closing():
            association.close()
            return
        log.info("socks5 client %s: UDP association on %s:%d", self.peer, host, port)
        self.transport.write(socks5.encode_reply(socks5.Reply.SUCCEEDED, host, port))
        self.transport.set_protocol(_AssociationControl(association))
        self.transport.resume_reading()


class _AssociationControl(asyncio.Protocol):
    """The TCP connection of a UDP association: its end ends the association (section 7)."""

    def __init__(self, association: Socks5UdpAssociation) -> None:
        self.association = association

    def data_received(self, data: bytes) -> None:
        pass  # nothing is expected on the control connection; ignore it

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.close()
