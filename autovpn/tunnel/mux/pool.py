"""Several tunnel servers: failover, fail-back, and retries across them.

``ServerPool`` keeps one ``TunnelClient`` per server, each with its own connections, reconnects
and keepalive (the health check: a server is *up* while one of its connections answers).  New
streams go to the best server that is up: the lowest ``priority`` first; among servers of equal
priority, spread by ``weight``.  When a server dies its clients' streams fail over to the next
one; when it comes back, new streams go back to it (fail-back); open streams stay where they
are.

A stream that fails because of the tunnel (its connection was lost or stalled, the server did
not answer, or refused it while closing) is tried again on the next server, or on a new
connection to the same one, up to ``retries`` attempts in all, with a short backoff when the
same server is the only choice left; but never when its early data may already have reached
the destination (``_retry_kind``).  A stream refused for a limit of its connection is tried
only where another connection or server can take it, else it fails at once with the reason.
A failure that comes from the destination (refused by the target, unreachable, policy) is
final: another server would only dial the same target again.

When no server is up, a new stream waits only for a connection attempt that is under way or
that it starts itself (``TunnelClient.kick``), bounded by the connect timeout; once those
failed it fails at once with ``TunnelUnavailable`` saying why, and a server that refused us for
good (the secret, the certificate) makes it fail at once without waiting at all.

UDP flows follow the best server: a flow whose server went down is opened again on the new one
with its next datagram (the far end sees a new source, which WireGuard takes in its stride).

Optional mode fallback (``fallback_direct_after`` seconds, 0: off): once every server has been
down that long, ``fallback_direct`` is true, and smart mode's *default* route goes direct
(``autovpn.proxy.dialer``) until a server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autovpn.errors import ResetReason, StreamError, TunnelUnavailable
from autovpn.tunnel.mux.client import (
    ClientSettings,
    StreamUpstream,
    TunnelClient,
    socket_stream,
)
from autovpn.tunnel.mux.connection import StreamEndpoint
from autovpn.wire.frames import StreamKind

log = logging.getLogger("autovpn.tunnel.pool")

#: How often the pool looks at its servers' states (for the log and the mode fallback; the
#: choice of a server for a stream looks at them each time).
WATCH_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class PoolServer:
    """One server of the pool: its client settings, priority (lower first) and weight."""

    settings: ClientSettings
    priority: int = 1
    weight: int = 1


class _Member:
    __slots__ = ("client", "priority", "weight", "last_state", "was_up")

    def __init__(self, server: PoolServer) -> None:
        self.client = TunnelClient(server.settings)
        self.priority = server.priority
        self.weight = max(1, server.weight)
        self.last_state = "connecting"
        self.was_up = False


class _Flow:
    """A UDP flow of the pool: its reply handler, and the server flow it is on now."""

    __slots__ = ("handler", "client", "inner")

    def __init__(self, handler: Callable[[str, int, bytes], None]) -> None:
        self.handler = handler
        self.client: TunnelClient | None = None
        self.inner = 0


def _retry_kind(exc: StreamError, early: bytes) -> str:
    """Why opening the stream again may succeed without delivering anything twice, or ""
    when the failure is final:

    - ``draining``: the server refused it because the connection is closing (GOAWAY); a new
      connection, or another server, takes it.
    - ``limit``: the server refused it for a limit of that connection (streams open, opens
      pending); another connection or server may take it, the same one would refuse again.
    - ``tunnel``: the tunnel failed (lost, stalled, no answer) and nothing of the client's can
      have reached the destination: the OPEN never left us, or it carried no early data.

    A tunnel failure after an OPEN with early data left is final: the server may have dialled
    and delivered those bytes before the failure, and a second open would deliver them again
    (a request sent twice).  So is a failure of the destination itself (refused, unreachable,
    the server's policy): another server would only dial the same target again.
    """
    if exc.reason is ResetReason.REFUSED_STREAM and not exc.tunnel:
        return "draining" if exc.draining else "limit"
    if exc.tunnel and (not exc.sent or not early):
        return "tunnel"
    return ""


class ServerPool:
    """Streams, DNS streams and datagrams over the best of several tunnel servers.

    Use as ``async with ServerPool(servers) as pool``.  ``rng`` chooses among servers of equal
    priority (by weight); tests pass a seeded one.
    """

    def __init__(
        self,
        servers: Sequence[PoolServer],
        *,
        retries: int = 3,
        retry_backoff: float = 0.1,
        fallback_direct_after: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not servers:
            raise ValueError("a server pool needs at least one server")
        self.members = [_Member(s) for s in servers]
        self.clients = [m.client for m in self.members]
        self.retries = max(1, retries)
        self.retry_backoff = retry_backoff
        self.fallback_direct_after = fallback_direct_after
        #: Every server has been down for ``fallback_direct_after`` seconds (see the module).
        self.fallback_direct = False
        self.datagrams_dropped = 0  # no server up for the datagram (the clients count theirs)
        self.retried = 0  # stream opens tried again on another server (or the same, later)
        self._rng = rng or random.Random()
        self._changed = asyncio.Event()
        self._flows: dict[int, _Flow] = {}
        self._next_flow = 1
        self._down_since: float | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> ServerPool:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._down_since = loop.time()
        for m in self.members:
            m.client.on_change = self._on_change
            m.client.start()
        self._watch = loop.create_task(self._watch_loop(), name="server-pool-watch")

    async def close(self) -> None:
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await asyncio.gather(*(c.close() for c in self.clients))
        self._changed.set()

    @property
    def up(self) -> bool:
        """A server can take new streams."""
        return any(c.up for c in self.clients)

    async def wait_up(self, within: float) -> bool:
        """Wait until a server is up; False if none is ``within`` seconds (or every one
        refused us for good before that)."""
        try:
            async with asyncio.timeout(within):
                while not self.up:
                    if all(c.permanent for c in self.clients):
                        return False
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # -- choosing a server ---------------------------------------------------------------------

    def _best(self, avoid: Sequence[TunnelClient] = ()) -> TunnelClient | None:
        """The server for a new stream: up, not in ``avoid`` if another is up, the lowest
        priority, then by weight among equals."""
        up = [m for m in self.members if m.client.up]
        fresh = [m for m in up if m.client not in avoid] or up
        if not fresh:
            return None
        top = min(m.priority for m in fresh)
        group = [m for m in fresh if m.priority == top]
        if len(group) == 1:
            return group[0].client
        return self._rng.choices(group, weights=[m.weight for m in group])[0].client

    async def _choose(self, avoid: Sequence[TunnelClient] = ()) -> TunnelClient:
        best = self._best(avoid)
        if best is not None:  # the common case, without touching the loop
            return best
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(c.settings.connect_timeout for c in self.clients)
        seen = {id(c): c.attempts_done for c in self.clients}
        while True:
            best = self._best(avoid)
            if best is not None:
                return best
            # Wait only for attempts under way, or the one this stream starts itself: once
            # those failed, the answer is no (the backoff goes on in the background).
            coming = [
                c
                for c in self.clients
                if not c.stall_reason()
                and (c.trying or (c.attempts_done == seen[id(c)] and c.kick()))
            ]
            remaining = deadline - loop.time()
            if not coming or remaining <= 0 or self._closing:
                raise self.unavailable()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    def unavailable(self) -> TunnelUnavailable:
        """Why no server takes a stream now, for the log and (one line) the local client."""
        ordered = sorted(self.members, key=lambda m: m.priority)
        reasons = []
        for m in ordered:
            c = m.client
            why = c.reason or "not connected yet"
            server = str(c.settings.server)
            reasons.append(why if server in why else f"{server}: {why}")
        permanent = all(c.permanent for c in self.clients)
        if len(self.clients) == 1:
            public = f"tunnel down: {self.clients[0].permanent or reasons[0]}"
        else:
            public = "tunnel down: " + "; ".join(reasons)
        return TunnelUnavailable("; ".join(reasons), public=public, permanent=permanent)

    # -- streams -------------------------------------------------------------------------------

    async def open_stream(
        self, host: str, port: int, early: bytes = b"", kind: StreamKind = StreamKind.TCP
    ) -> StreamEndpoint:
        """Open a stream on the best server; a tunnel failure is tried again on the next one
        (``retries`` attempts in all).  Raises StreamError or TunnelUnavailable."""
        tried: list[TunnelClient] = []
        for attempt in range(1, self.retries + 1):
            client = await self._choose(tried)
            try:
                return await client.open_stream(host, port, early, kind)
            except StreamError as exc:
                retry = _retry_kind(exc, early)
                if not retry and exc.tunnel and early:
                    raise StreamError(
                        exc.reason,
                        f"{exc}; not tried again: its first {len(early)} bytes may have reached"
                        f" {host}:{port} already",
                        tunnel=True,
                        public=exc.public,
                    ) from exc
                if retry == "limit" and not (
                    client.live > 1 or any(c.up for c in self.clients if c is not client)
                ):
                    # One connection, one server: trying again would meet the same limit.
                    why = f"tunnel server {client.settings.server} refused the stream: {exc}"
                    raise StreamError(
                        exc.reason,
                        why + " (its max_streams_per_connection or max_pending_opens)",
                        public=why,
                    ) from exc
                if not retry or attempt == self.retries:
                    raise
                tried.append(client)
                self.retried += 1
                others = any(c.up and c not in tried for c in self.clients)
                log.info(
                    "stream to %s:%d failed on %s (%s); attempt %d of %d%s",
                    host,
                    port,
                    client.settings.server,
                    exc,
                    attempt + 1,
                    self.retries,
                    " on another server" if others else "",
                )
                if not others:  # the same server again, or one coming back: not at once
                    await asyncio.sleep(self.retry_backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # the loop returns or raises

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
        return self._best()

    # -- watching ------------------------------------------------------------------------------

    def _on_change(self) -> None:
        self._changed.set()

    async def _watch_loop(self) -> None:
        while True:
            self.watch()
            await asyncio.sleep(WATCH_INTERVAL)

    def watch(self) -> None:
        """Log the servers' state changes, and switch the mode fallback on and off."""
        loop = asyncio.get_running_loop()
        for m in self.members:
            state = m.client.state
            if state == m.last_state:
                continue
            previous, m.last_state = m.last_state, state
            server = m.client.settings.server
            if state == "up":
                if m.was_up:
                    log.warning("tunnel server %s is up again", server)
                else:
                    log.info("tunnel server %s is up", server)
                m.was_up = True
            elif previous == "up" and len(self.members) > 1:
                best = self._best()
                log.warning(
                    "tunnel server %s is %s (%s); new streams go to %s",
                    server,
                    state,
                    m.client.reason,
                    best.settings.server if best is not None else "no server: none is up",
                )
        if self.up:
            self._down_since = None
            if self.fallback_direct:
                self.fallback_direct = False
                log.warning(
                    "a tunnel server is up again: smart mode's default route goes through the"
                    " tunnel again"
                )
            return
        now = loop.time()
        if self._down_since is None:
            self._down_since = now
        after = self.fallback_direct_after
        if after > 0 and not self.fallback_direct and now - self._down_since >= after:
            self.fallback_direct = True
            log.warning(
                "every tunnel server has been down for %.0f s: smart mode's default route goes"
                " DIRECT until one is back (fallback_direct_after; rules and lists are kept)",
                now - self._down_since,
            )

    # -- status --------------------------------------------------------------------------------

    def servers_status(self) -> list[dict[str, object]]:
        """Each server's state, for ``/status`` and ``autovpn status``."""
        out: list[dict[str, object]] = []
        for m in self.members:
            c = m.client
            out.append(
                {
                    "url": str(c.settings.server),
                    "priority": m.priority,
                    "weight": m.weight,
                    "state": c.state,
                    "reason": c.reason or None,
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
