"""wstunnel reverse tunnels (``-R``), both ends (docs/wstunnel-protocol.md section 5.6).

Server: a ``Reverse*`` request names a bind address.  The listener for that address is shared
by every request naming it (``port_mapping`` applied); the request is held unanswered until the
listener accepts a connection, which is then answered 101 and relayed.  Accepted connections
wait in a queue of 10.  A listener with no waiting request for ``idle_timeout`` closes, together
with the connections nobody picked up (issues #262, #417); one whose last waiting request ended
because its connection was lost closes at once, where wstunnel waits the idle timeout: nobody
is coming back for it, and an anonymous client could leave listeners behind by the hundred.
A client (its certificate's CN, else its address) opens at most ``per_client`` listeners
(``server.max_reverse_listeners_per_client``).  Dynamic kinds run a SOCKS5 (or HTTP
CONNECT) handshake on the accepted connection and name its destination in the 101's ``cookie``
JWT.

Client: ``ReverseRunner`` keeps one request pending per ``-R``; on a 101 it connects to the
local target (the static one, or the cookie's for dynamic kinds), relays, and immediately sends
the next request; errors back off from 1 s up to the configured cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from autovpn.config import MAX_REVERSE_LISTENERS_PER_CLIENT, ListenSpec
from autovpn.errors import ConfigError, RemoteProtocolError, StreamError
from autovpn.net import reset_transport
from autovpn.tunnel.wstunnel.relay import LocalSide
from autovpn.tunnel.wstunnel.restrictions import Verdict
from autovpn.wire import socks5, wstunnel
from autovpn.wire.auth import Credentials
from autovpn.wire.wstunnel import Claims, Kind, LocalProtocol, TunnelRequest, WstunnelRejected

if TYPE_CHECKING:
    from autovpn.tunnel.mux.server import TunnelServer
    from autovpn.tunnel.wstunnel.servers import WstunnelServers

log = logging.getLogger("autovpn.tunnel.wstunnel")

QUEUE_SIZE: Final = 10
SOCKS_HANDSHAKE_TIMEOUT: Final = 10.0


@dataclass(slots=True)
class Accepted:
    transport: asyncio.Transport
    early: bytes
    cookie: str | None


class _Held(asyncio.Protocol):
    """An accepted connection waiting for a tunnel: its bytes are kept (reading paused)."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lost = False
        self.got_data = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.got_data.set()
        if self.transport is not None and len(self.buffer) > 64 * 1024:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.got_data.set()


class _Listener:
    def __init__(
        self, owner: ReverseListeners, key: tuple[str, str, int], kind: Kind, client: str
    ) -> None:
        self.owner = owner
        self.key = key
        self.kind = kind
        self.client = client  # who opened it: it counts against that client's limit
        self.queue: asyncio.Queue[Accepted] = asyncio.Queue(QUEUE_SIZE)
        self.server: asyncio.Server | None = None
        self.waiting = 0
        self.closed = False
        self._idle: asyncio.TimerHandle | None = None
        self.credentials: tuple[str, str] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, host, port = self.key
        if self.kind is Kind.REVERSE_UNIX:
            self.server = await loop.create_unix_server(lambda: _Held(self), host)
        else:
            self.server = await loop.create_server(lambda: _Held(self), host, port)
        log.info("wstunnel reverse listener %s on %s:%d", self.kind.value, host, port)

    def accepted(self, held: _Held) -> None:
        self.owner.spawn(self._prepare(held))

    async def _prepare(self, held: _Held) -> None:
        assert held.transport is not None
        cookie: str | None = None
        try:
            if self.kind is Kind.REVERSE_SOCKS5:
                cookie = await self._socks5(held)
        except (RemoteProtocolError, TimeoutError, OSError) as exc:
            log.info("reverse %s: handshake failed: %s", self.kind.value, exc)
            held.transport.abort()
            return
        held.transport.pause_reading()
        # From here a SOCKS5 client was told it succeeded: failing it is a reset, not an EOF.
        if self.closed:  # closed during the SOCKS5 handshake: nobody will take it
            reset_transport(held.transport)
            return
        item = Accepted(held.transport, bytes(held.buffer), cookie)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            reset_transport(held.transport)

    async def _socks5(self, held: _Held) -> str:
        assert held.transport is not None
        creds = None
        if self.credentials is not None:
            creds = Credentials({self.credentials[0]: self.credentials[1]})
        parser = socks5.Socks5ServerHandshake(creds)
        async with asyncio.timeout(SOCKS_HANDSHAKE_TIMEOUT):
            while True:
                await held.got_data.wait()
                held.got_data.clear()
                if held.lost:
                    raise ConnectionError("SOCKS5 client left")
                data, held.buffer = bytes(held.buffer), bytearray()
                try:
                    request = parser.receive_data(data)
                except socks5.Socks5Error as exc:
                    held.transport.write(exc.reply)
                    raise RemoteProtocolError(str(exc)) from None
                out = parser.data_to_send()
                if out:
                    held.transport.write(out)
                if request is not None:
                    break
        if request.command is not socks5.Command.CONNECT:
            held.transport.write(socks5.encode_reply(socks5.Reply.COMMAND_NOT_SUPPORTED))
            raise RemoteProtocolError("only CONNECT over a reverse SOCKS5 tunnel")
        held.buffer = bytearray(parser.trailing_data)
        held.transport.write(socks5.encode_reply(socks5.Reply.SUCCEEDED))
        claims = wstunnel.cookie_claims(request.host, request.port)
        return claims.encode()

    def waiter_added(self) -> None:
        self.waiting += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def waiter_gone(self, abandoned: bool) -> None:
        """A request stopped waiting: served (``abandoned`` False: its client re-arms with its
        next request, so the listener waits ``idle_timeout`` for it), or its connection was
        lost (True: when it was the last, nobody is coming back for this listener)."""
        self.waiting -= 1
        if self.waiting == 0:
            if abandoned:
                self.close("its clients left")
            elif self._idle is None:
                self._idle = asyncio.get_running_loop().call_later(
                    self.owner.idle_timeout, self.close
                )

    def close(self, why: str = "idle") -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.owner.listeners.get(self.key) is self:
            del self.owner.listeners[self.key]
            self.owner.release(self.client)
        self.closed = True
        while not self.queue.empty():
            reset_transport(self.queue.get_nowait().transport)
        if self.server is not None:
            self.server.close()
            self.owner.closing.append(self.server)
            self.server = None
            log.info("wstunnel reverse listener %s:%d closed (%s)", self.key[1], self.key[2], why)


class ReverseListeners:
    """The server's reverse-tunnel listeners, shared by bind address."""

    def __init__(
        self, idle_timeout: float, per_client: int = MAX_REVERSE_LISTENERS_PER_CLIENT
    ) -> None:
        self.idle_timeout = idle_timeout
        self.per_client = per_client
        self.listeners: dict[tuple[str, str, int], _Listener] = {}
        #: Open listeners per client that opened them, for ``per_client``.
        self.held: dict[str, int] = {}
        self.closing: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, client: str) -> None:
        left = self.held.get(client, 0) - 1
        if left > 0:
            self.held[client] = left
        else:
            self.held.pop(client, None)

    async def wait(
        self,
        req: TunnelRequest,
        verdict: Verdict,
        local: LocalSide,
        server: TunnelServer,
        client: str,
    ) -> tuple[asyncio.Transport, str | None, bytes]:
        """Hold the request until the listener accepts a connection; a failure is a 400.

        ``client`` names the requester for the per-client limit on new listeners; joining a
        listener that is open already costs nothing."""
        p = req.claims.protocol
        if p.kind not in (Kind.REVERSE_TCP, Kind.REVERSE_SOCKS5, Kind.REVERSE_UNIX):
            raise WstunnelRejected(f"reverse {p.kind.value} tunnels are not served")
        if p.kind is Kind.REVERSE_UNIX:
            key = (p.kind.value, p.path, 0)
        else:
            key = (p.kind.value, req.host, verdict.bind_port(req.claims.port))
        listener = self.listeners.get(key)
        if listener is None:
            if self.held.get(client, 0) >= self.per_client:
                log.warning(
                    "wstunnel reverse listener %s:%d refused: %s holds %d already "
                    "(server.max_reverse_listeners_per_client)",
                    key[1],
                    key[2],
                    client,
                    self.per_client,
                )
                raise WstunnelRejected(f"too many reverse listeners for {client}")
            # Registered before binding, so a concurrent request for the same address waits
            # for this bind instead of racing it.
            listener = _Listener(self, key, p.kind, client)
            listener.credentials = p.credentials
            self.listeners[key] = listener
            self.held[client] = self.held.get(client, 0) + 1
            try:
                await listener.start()
            except (OSError, asyncio.CancelledError) as exc:
                # Cancelled: the request that binds left; the others waiting for this bind
                # are refused rather than left waiting on a listener nobody registered.
                why = "its request left" if isinstance(exc, asyncio.CancelledError) else exc
                failure = WstunnelRejected(f"cannot listen on {key[1]}:{key[2]}: {why}")
                listener.close("not bound")
                listener.ready.set_exception(failure)
                listener.ready.exception()  # retrieved: the other waiters re-raise it
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise failure from None
            listener.ready.set_result(None)
        else:
            await asyncio.shield(listener.ready)
        listener.waiter_added()
        try:
            item = await listener.queue.get()
        except asyncio.CancelledError:  # the request's connection was lost (or we are closing)
            listener.waiter_gone(abandoned=True)
            raise
        listener.waiter_gone(abandoned=False)
        item.transport.set_protocol(local)
        local.transport = item.transport
        return item.transport, item.cookie, item.early

    async def close(self) -> None:
        for listener in list(self.listeners.values()):
            listener.close("server closing")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self.closing:
            await srv.wait_closed()
        self.closing.clear()


# -- the client side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReverseSpec:
    """``-R tcp://[BIND:]PORT:HOST:PORT``, ``socks5://[BIND:]PORT``, ``unix://PATH:HOST:PORT``."""

    protocol: LocalProtocol
    bind_host: str
    bind_port: int
    target_host: str | None
    target_port: int | None

    @classmethod
    def parse(cls, text: str) -> ReverseSpec:

        scheme = text.partition("://")[0]
        if scheme == "unix":
            spec = ListenSpec.parse(text, "-R")
            return cls(
                LocalProtocol(Kind.REVERSE_UNIX, path=spec.host),
                "[::]",
                0,
                spec.target_host,
                spec.target_port,
            )
        if scheme not in ("tcp", "socks5"):
            raise ConfigError("-R", f"{text!r}: supported here: tcp://, socks5://, unix://")
        spec = ListenSpec.parse(text, "-R")
        bind = spec.host if wstunnel.is_ip(spec.host) else "127.0.0.1"
        if scheme == "tcp":
            return cls(
                LocalProtocol(Kind.REVERSE_TCP), bind, spec.port, spec.target_host, spec.target_port
            )
        timeout = spec.option("timeout_sec")
        return cls(
            LocalProtocol(
                Kind.REVERSE_SOCKS5,
                timeout=wstunnel.Duration(int(timeout) if timeout else 30),
                credentials=spec.users[0] if spec.users else None,
            ),
            bind,
            spec.port,
            None,
            None,
        )


def _same(local: LocalSide) -> LocalSide:
    return local


class ReverseRunner:
    """Keeps one reverse request pending for ``spec`` until closed."""

    def __init__(self, client: WstunnelServers, spec: ReverseSpec, max_backoff: float = 1.0):
        self.client = client
        self.spec = spec
        self.max_backoff = max_backoff
        self.served = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wstunnel-reverse")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 1.0
        s = self.spec
        while True:
            try:
                ws, answer = await self.client.open_tunnel(
                    s.protocol, s.bind_host, s.bind_port, answer_timeout=None
                )
            except (StreamError, OSError, TimeoutError, RemoteProtocolError) as exc:
                log.info("reverse tunnel %s:%d: %s", s.bind_host, s.bind_port, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 1.0
            host, port = s.target_host, s.target_port
            if answer.cookie is not None:
                try:
                    claims = Claims.decode(answer.cookie)
                    host, port = wstunnel.parse_host(claims.host), claims.port
                except ValueError as exc:
                    log.warning("reverse tunnel: bad cookie JWT: %s", exc)
                    ws.abort()
                    continue
            if host is None or port is None:
                ws.abort()
                continue
            try:
                transport, _ = await loop.create_connection(
                    functools.partial(_same, ws.local), host, port
                )
            except OSError as exc:
                log.info("reverse tunnel: cannot reach %s:%d: %s", host, port, exc)
                ws.abort()
                continue
            self.served += 1
            ws.attach_local(transport)
