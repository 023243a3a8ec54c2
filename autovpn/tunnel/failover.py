"""Several tunnel servers, either protocol: which one takes a new connection, and failover.

``ServerSet`` holds one *client* per server and knows only what ``ServerHealth`` says of each:
whether it is up, why not, whether it refused us for good, whether a connection attempt is under
way.  How a client learns that is its protocol's business: our mux client
(``autovpn.tunnel.mux.client``) by its connections and their pings, the wstunnel-protocol
client (``autovpn.tunnel.wstunnel.client``) by the success or failure of its connects, since
each of its tunnels is a connection of its own.  Both protocols' pools
(``autovpn.tunnel.mux.pool``, ``autovpn.tunnel.wstunnel.servers``) build on this, so a user
gets the same choice, the same failover and the same messages from either.

- **Choice.** A new connection goes to a server that is up: the lowest ``priority`` first;
  among servers of equal priority, spread by ``weight``.  When the best one comes back, new
  connections go to it again (fail-back); open ones stay where they are.
- **Retries.** A connection that fails because of the tunnel (``StreamError.tunnel``: the
  server was unreachable or lost, did not answer, or refused it while closing) is tried again
  on the next server, or on a new connection to the same one, up to ``retries`` attempts in
  all, with a short backoff when the same server is the only choice left; but never when its
  early data may already have reached the destination (``retry_kind``).  A connection refused
  for a limit of the server's connection is tried only where another connection or server can
  take it (``ServerSet.elsewhere``), else it fails at once with the reason.  A failure that
  comes from the destination is final: another server would only dial the same target again.
- **Fail fast.** When no server is up, a new connection waits only for a connection attempt
  under way or one it starts itself (``kick``), bounded by the connect timeout; once those
  failed it fails at once with ``TunnelUnavailable`` saying why, and a server that refused us
  for good (the secret, the certificate) makes it fail at once without waiting at all.
- **Mode fallback** (``fallback_direct_after`` seconds, 0: off): once every server has been
  down that long, ``fallback_direct`` is true, and smart mode's *default* route goes direct
  (``autovpn.proxy.dialer``) until a server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final, Generic, Protocol, Self, TypedDict, TypeVar, Unpack

from autovpn.config import ServerURL
from autovpn.errors import ResetReason, StreamError, TunnelUnavailable

log = logging.getLogger("autovpn.tunnel.pool")

#: How often the set looks at its servers' states (for the log and the mode fallback; the
#: choice of a server for a connection looks at them each time).
WATCH_INTERVAL = 0.5
#: A connection waiting for a server that is down cuts its reconnect backoff short, but
#: attempts start no closer together than this: a burst of requests is not a burst of connects.
DEMAND_RETRY_GAP: Final = 0.5


class ServerSettings(Protocol):
    """What the set reads of a client's settings."""

    @property
    def server(self) -> ServerURL: ...

    @property
    def connect_timeout(self) -> float: ...


class ServerHealth(Protocol):
    """One server's client, as the set sees it."""

    #: Called by the client whenever its state may have changed (up, lost, an attempt ended).
    on_change: Callable[[], None] | None

    @property
    def settings(self) -> ServerSettings: ...

    @property
    def up(self) -> bool:
        """It can take new connections."""

    @property
    def state(self) -> str:
        """``up``, ``connecting`` (``reason`` says what failed last), ``stalled`` or ``down``
        (it refused us for good: ``permanent`` says why)."""

    @property
    def reason(self) -> str:
        """Why it takes no connection now ("" when it is up)."""

    @property
    def permanent(self) -> str:
        """Why it refused us for good (the secret, the certificate), or ""."""

    @property
    def trying(self) -> int:
        """Connection attempts under way."""

    @property
    def attempts_done(self) -> int:
        """Connection attempts that ended, either way."""

    def kick(self) -> bool:
        """A connection is waiting for this server: attempt now.  True when an attempt is
        under way or about to start."""

    def stall_reason(self) -> str:
        """Why the server is known not to answer (waiting would be in vain), or ""."""

    def start(self) -> None: ...

    async def close(self) -> None: ...


class Attempts:
    """One server's connection attempts: how many are under way and done, and the pause
    before the next, which a connection waiting for the server may cut short (``kick``)."""

    __slots__ = ("trying", "done", "_pausing", "_wake", "_last_end")

    def __init__(self) -> None:
        self.trying = 0  # attempts under way
        self.done = 0  # attempts that ended, either way
        self._pausing = 0  # tasks waiting out a backoff
        self._wake = asyncio.Event()
        self._last_end = 0.0

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """Around one attempt: counted while under way, and when it ended."""
        self.trying += 1
        try:
            yield
        finally:
            self.trying -= 1
            self.done += 1
            self._last_end = asyncio.get_running_loop().time()

    def kick(self) -> bool:
        """Start the next attempt now (or DEMAND_RETRY_GAP after the last one) instead of at
        the end of its backoff.  True when an attempt is under way or about to start."""
        if self.trying:
            return True
        if self._pausing:
            self._wake.set()
            return True
        return False

    async def pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next attempt, or less if ``kick`` asks."""
        loop = asyncio.get_running_loop()
        self._pausing += 1
        try:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                    # A connection is waiting: go now, but keep the attempts apart.
                    await asyncio.sleep(self._last_end + DEMAND_RETRY_GAP - loop.time())
        finally:
            self._pausing -= 1


class Attempting:
    """The attempt counters of ``ServerHealth``, for a client that keeps ``attempts``."""

    attempts: Attempts

    @property
    def trying(self) -> int:
        """Connection attempts under way."""
        return self.attempts.trying

    @property
    def attempts_done(self) -> int:
        """Connection attempts that ended, either way."""
        return self.attempts.done


class SetOptions(TypedDict, total=False):
    """``ServerSet``'s settings, passed on by each protocol's set as they are."""

    retries: int  # attempts per connection, on the next server after a tunnel failure
    retry_backoff: float  # before trying the same server again: doubles with each attempt
    fallback_direct_after: float  # seconds with every server down before smart mode goes direct
    rng: random.Random  # chooses among servers of equal priority (tests pass a seeded one)


C = TypeVar("C", bound=ServerHealth)
T = TypeVar("T")


class Member(Generic[C]):
    """One server of the set: its client, priority (lower first) and weight."""

    __slots__ = ("client", "priority", "weight", "last_state", "was_up")

    def __init__(self, client: C, priority: int = 1, weight: int = 1) -> None:
        self.client = client
        self.priority = priority
        self.weight = max(1, weight)
        self.last_state = "connecting"
        self.was_up = False


def retry_kind(exc: StreamError, early: bytes) -> str:
    """Why opening the connection again may succeed without delivering anything twice, or ""
    when the failure is final:

    - ``draining``: the server refused it because the connection is closing (GOAWAY); a new
      connection, or another server, takes it.
    - ``limit``: the server refused it for a limit of that connection (streams open, opens
      pending); another connection or server may take it, the same one would refuse again.
    - ``tunnel``: the tunnel failed (lost, stalled, no answer) and nothing of the client's can
      have reached the destination: the open never left us, or it carried no early data.

    A tunnel failure after an open with early data left is final: the server may have dialled
    and delivered those bytes before the failure, and a second open would deliver them again
    (a request sent twice).  So is a failure of the destination itself (refused, unreachable,
    the server's policy): another server would only dial the same target again.
    """
    if exc.reason is ResetReason.REFUSED_STREAM and not exc.tunnel:
        return "draining" if exc.draining else "limit"
    if exc.tunnel and (not exc.sent or not early):
        return "tunnel"
    return ""


class ServerSet(Generic[C]):
    """The servers of one client, each with its own client ``C``; see the module docstring."""

    def __init__(self, members: Sequence[Member[C]], **options: Unpack[SetOptions]) -> None:
        if not members:
            raise ValueError("a server pool needs at least one server")
        self.members = list(members)
        self.clients = [m.client for m in self.members]
        self.retries = max(1, options.get("retries", 3))
        self.retry_backoff = options.get("retry_backoff", 0.1)
        self.fallback_direct_after = options.get("fallback_direct_after", 0.0)
        #: Every server has been down for ``fallback_direct_after`` seconds (see the module).
        self.fallback_direct = False
        self.retried = 0  # opens tried again on another server (or the same, later)
        self._rng = options.get("rng") or random.Random()
        self._changed = asyncio.Event()
        self._down_since: float | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Self:
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
        """A server can take new connections."""
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

    def best(self, avoid: Sequence[C] = ()) -> C | None:
        """The server for a new connection: up, not in ``avoid`` if another is up, the lowest
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

    async def choose(self, avoid: Sequence[C] = ()) -> C:
        """``best``, or wait for a server that is coming up (see "Fail fast" above)."""
        best = self.best(avoid)
        if best is not None:  # the common case, without touching the loop
            return best
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(c.settings.connect_timeout for c in self.clients)
        seen = {id(c): c.attempts_done for c in self.clients}
        while True:
            best = self.best(avoid)
            if best is not None:
                return best
            # Wait only for attempts under way, or the one this connection starts itself: once
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
        """Why no server takes a connection now, for the log and (one line) the local
        client."""
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

    def elsewhere(self, client: C) -> bool:
        """Another server (or, in a protocol that has several, another connection of
        ``client``'s) could take a connection ``client`` refused for a limit."""
        return any(c.up for c in self.clients if c is not client)

    async def open_retrying(
        self,
        host: str,
        port: int,
        open_on: Callable[[C], Awaitable[T]],
        early: bytes = b"",
    ) -> T:
        """``open_on(server)`` on the best server; a tunnel failure is tried again on the next
        one (``retries`` attempts in all).  ``early``: the client's first bytes, when the open
        carries them (see ``retry_kind``).  Raises StreamError or TunnelUnavailable."""
        tried: list[C] = []
        for attempt in range(1, self.retries + 1):
            client = await self.choose(tried)
            try:
                return await open_on(client)
            except StreamError as exc:
                retry = retry_kind(exc, early)
                if not retry and exc.tunnel and early:
                    raise StreamError(
                        exc.reason,
                        f"{exc}; not tried again: its first {len(early)} bytes may have reached"
                        f" {host}:{port} already",
                        tunnel=True,
                        public=exc.public,
                    ) from exc
                if retry == "limit" and not self.elsewhere(client):
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
                    "connection to %s:%d failed on %s (%s); attempt %d of %d%s",
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
                best = self.best()
                log.warning(
                    "tunnel server %s is %s (%s); new connections go to %s",
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

    def member_status(self, m: Member[C]) -> dict[str, object]:
        """What every server's line of ``autovpn status`` has; each protocol adds its own."""
        c = m.client
        return {
            "url": str(c.settings.server),
            "priority": m.priority,
            "weight": m.weight,
            "state": c.state,
            "reason": c.reason or None,
        }
