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
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from autovpn.config import IDLE_TIMEOUT
from autovpn.errors import InvalidHostName, ResetReason, StreamError
from autovpn.idle import IdleSweep
from autovpn.net import check_host_name, reset_reason_for
from autovpn.proxy.relay import Pipe, abort_all, link
from autovpn.routing.router import Action, Decision, Router
from autovpn.routing.rules import normalize_host, parse_ip
from autovpn.routing.scoring import ScoreBook, interleave_families
from autovpn.stats import Flow, Stats

if TYPE_CHECKING:
    from autovpn.routing.dns import SplitResolver

log = logging.getLogger("autovpn.access")
route_log = logging.getLogger("autovpn.route")


class Upstream(Protocol):
    def attach(self, transport: asyncio.Transport) -> None: ...


class MeteredUpstream(Upstream, Protocol):
    def bind(self, flow: Flow) -> None:
        """Count the relay's bytes in ``flow`` and end it when the relay ends (a tunnel's
        upstream also names the server it went to)."""


class _DirectUpstream:
    __slots__ = ("local",)

    def __init__(self, local: Pipe) -> None:
        self.local = local

    def bind(self, flow: Flow) -> None:
        local = self.local
        remote = local.peer
        assert remote is not None
        local.flow = remote.flow = flow
        flow.meter = local  # up: what the client's side read; down: the target's side

    def attach(self, transport: asyncio.Transport) -> None:
        transport.set_protocol(self.local)
        self.local.attach(transport)
        transport.resume_reading()


class _ClosedTransport(asyncio.Transport):
    """Stands for a client socket that went away before its upstream could be attached."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def discard(upstream: Upstream) -> None:
    """End an upstream that was connected for a client that is gone (no leak on either side:
    a tunnel stream is reset, a direct connection closed)."""
    closed = _ClosedTransport()
    upstream.attach(closed)
    if closed.protocol is not None:
        closed.protocol.connection_lost(None)


class TunnelOpener(Protocol):
    """What the dialer needs of a tunnel: our mux client, or the wstunnel-protocol client."""

    async def open_upstream(self, host: str, port: int, early: bytes = b"") -> MeteredUpstream: ...


def _retry_direct(exc: StreamError) -> bool:
    """Whether a failed DIRECT connect is worth another attempt: a refusal or an unreachable
    network may pass (a restarting service, an interface coming up); a timeout already waited
    the whole connect timeout on every address, and a name that does not resolve will not."""
    cause = exc.__cause__
    return isinstance(cause, OSError) and not isinstance(
        cause, TimeoutError | socket.gaierror | InvalidHostName
    )


class Dialer:
    """Routes and connects.  ``tunnel`` may be None when no server is configured.

    With a ``resolver``, a DIRECT name is resolved by the split resolver (never the system's
    ``getaddrinfo``, which would not honour the routing) and its addresses are raced in the
    ``scores`` order (``happy_eyeballs``); IP literals are dialled as before.  A failed DIRECT
    connect is tried again (``retries`` attempts in all, with backoff); the tunnel retries its
    own opens on the next server (``autovpn.tunnel.mux.pool``).

    ``fallback_direct``: true while smart mode's default route should go DIRECT because every
    tunnel server is down (``client.fallback_direct_after``); never for a rule or a list.

    A DIRECT relay in which no byte moved either way for ``idle_timeout`` seconds is reset
    (``autovpn.idle``; 0: never); tunnelled streams have their tunnel's own sweep.

    With ``stats``, each connection is a ``Flow`` (``autovpn.stats``) from the routing decision
    to its end, whose end writes the access log line.  Without, the access log has the
    decision only.
    """

    def __init__(
        self,
        router: Router,
        tunnel: TunnelOpener | None,
        connect_timeout: float = 10.0,
        *,
        resolver: SplitResolver | None = None,
        scores: ScoreBook | None = None,
        attempt_delay: float = 0.25,
        retries: int = 1,
        retry_backoff: float = 0.1,
        fallback_direct: Callable[[], bool] | None = None,
        stats: Stats | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.router = router
        self.stats = stats
        self.tunnel = tunnel
        self.connect_timeout = connect_timeout
        self.resolver = resolver
        self.scores = scores
        self.attempt_delay = attempt_delay
        self.retries = max(1, retries)
        self.retry_backoff = retry_backoff
        self.fallback_direct = fallback_direct
        self.counts = {Action.DIRECT: 0, Action.PROXY: 0, Action.REJECT: 0}
        self.pipes: set[Pipe] = set()  # live DIRECT relays, ended by ``close``
        self.idle = IdleSweep(idle_timeout, lambda: self.pipes, "direct connections")

    async def connect(
        self, host: str, port: int, early: bytes = b"", *, client: str = "", via: str = ""
    ) -> tuple[Upstream, Decision]:
        # A name no resolver can take (a label over 63 characters...) is refused here, with
        # HOST_UNREACHABLE, rather than sent through the tunnel or to getaddrinfo.
        check_host_name(host)
        decision = self.router.decide(host, port)
        action = decision.action
        if action is Action.PROXY and self.tunnel is None:
            action = Action.REJECT
            decision = Decision(Action.REJECT, decision.reason + "; no tunnel configured")
        elif (
            action is Action.PROXY
            and decision.source == "default"
            and self.fallback_direct is not None
            and self.fallback_direct()
        ):
            action = Action.DIRECT
            decision = Decision(
                Action.DIRECT,
                decision.reason + "; every tunnel server is down: direct (fallback_direct_after)",
                source=decision.source,
                mode=decision.mode,
            )
        self.counts[decision.action] += 1
        route = action.value  # once: an enum's value is a property, not a plain attribute
        # The decision as it is made: the access log's line without statistics, a debug line
        # with them (the access line, with bytes and result, is written at the end).
        (log if self.stats is None else route_log).log(
            logging.INFO if self.stats is None else logging.DEBUG,
            "%s %s %s:%d -> %s (%s)",
            via,
            client,
            host,
            port,
            route,
            decision.reason,
        )
        if self.stats is None:
            return await self._open(action, decision, host, port, early), decision
        flow = self.stats.start(
            listener=via or "?",
            client=client,
            host=host,
            port=port,
            route=route,
            rule=decision.reason,
        )
        try:
            upstream = await self._open(action, decision, host, port, early)
        except StreamError as exc:
            flow.end("rejected" if action is Action.REJECT else exc.reason.name.lower(), str(exc))
            raise
        except BaseException as exc:
            flow.end(type(exc).__name__)
            raise
        upstream.bind(flow)
        return upstream, decision

    async def _open(
        self, action: Action, decision: Decision, host: str, port: int, early: bytes
    ) -> MeteredUpstream:
        if action is Action.REJECT:
            raise StreamError(ResetReason.NOT_ALLOWED, f"rejected by routing: {decision.reason}")
        if action is Action.PROXY:
            assert self.tunnel is not None
            return await self.tunnel.open_upstream(host, port, early)
        return await self._direct(host, port, early)

    def close(self) -> None:
        """End the DIRECT relays (tunnelled streams end with their tunnel)."""
        self.idle.close()
        abort_all(self.pipes)

    async def _direct(self, host: str, port: int, early: bytes) -> _DirectUpstream:
        for attempt in range(1, self.retries + 1):
            try:
                return await self._direct_once(host, port, early)
            except StreamError as exc:
                if attempt == self.retries or not _retry_direct(exc):
                    raise
                delay = self.retry_backoff * 2 ** (attempt - 1)
                log.debug("direct %s:%d failed (%s); again in %.1f s", host, port, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _direct_once(self, host: str, port: int, early: bytes) -> _DirectUpstream:
        loop = asyncio.get_running_loop()
        local, remote = Pipe(), Pipe(self.pipes)
        link(local, remote)
        self.idle.start()  # armed once, by the first connection
        remote.early = early
        literal = parse_ip(normalize_host(host)) is not None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.resolver is None or literal:
                    if isinstance(loop, asyncio.BaseEventLoop):
                        # Happy Eyeballs (RFC 8305) across the resolved addresses.
                        await loop.create_connection(
                            lambda: remote, host, port, happy_eyeballs_delay=0.25, interleave=1
                        )
                    else:  # uvloop's create_connection has no Happy Eyeballs arguments
                        await loop.create_connection(lambda: remote, host, port)
                else:
                    resolution = await self.resolver.resolve(host, port)
                    addrs = (
                        self.scores.order(resolution.addresses, time.time())
                        if self.scores is not None
                        else interleave_families(resolution.addresses)
                    )
                    sock = await happy_eyeballs(
                        addrs, port, delay=self.attempt_delay, scores=self.scores
                    )
                    try:
                        await loop.create_connection(lambda: remote, sock=sock)
                    except BaseException:
                        sock.close()
                        raise
        except BaseException as exc:
            # Never connected: no connection_lost will take it out of the live relays.
            self.pipes.discard(remote)
            if remote.transport is not None:  # connected, then cancelled: no one to relay
                remote.transport.abort()
            if isinstance(exc, OSError | TimeoutError):
                raise StreamError(reset_reason_for(exc), str(exc) or type(exc).__name__) from exc
            raise
        return _DirectUpstream(local)


async def happy_eyeballs(
    addresses: Sequence[str],
    port: int,
    *,
    delay: float = 0.25,
    scores: ScoreBook | None = None,
) -> socket.socket:
    """Connect to the first of ``addresses`` (already in the order to try) that answers, RFC
    8305 section 5: start the next attempt when the current one fails or after ``delay``
    (250 ms, the RFC's recommended Connection Attempt Delay), whichever comes first; the first
    success wins and every other attempt is cancelled and closed.  Each attempt's outcome and
    connect time go to ``scores``.  Raises the OSError of the failed attempts.

    Every attempt task is owned here: none outlives the call, also when it is cancelled.
    """
    loop = asyncio.get_running_loop()

    async def attempt(addr: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            start = loop.time()
            await loop.sock_connect(sock, (addr, port))
        except BaseException as exc:
            sock.close()
            if scores is not None and isinstance(exc, OSError):
                scores.record_failure(addr, time.time())
            raise
        if scores is not None:
            scores.record_success(addr, loop.time() - start, time.time())
        return sock

    todo = list(addresses)
    pending: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    winner: socket.socket | None = None
    try:
        while winner is None:
            if todo:
                addr = todo.pop(0)
                pending.add(loop.create_task(attempt(addr), name=f"happy-eyeballs {addr}"))
            if not pending:
                break
            done, _ = await asyncio.wait(
                pending, timeout=delay if todo else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                pending.discard(task)
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result().close()
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            try:
                loser = await task
            except BaseException:  # cancelled or failed: its socket is already closed
                continue
            if loser is not winner:
                loser.close()
    if winner is not None:
        return winner
    if not errors:
        raise OSError("no address to connect to")
    if len(errors) == 1 and isinstance(errors[0], OSError):
        raise errors[0]
    first = errors[0]
    raise OSError(
        first.errno if isinstance(first, OSError) else None,
        f"all {len(errors)} addresses failed: " + "; ".join(str(e) for e in errors),
    )
