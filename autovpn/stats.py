"""Traffic statistics: what the engine counts, kept where the relays can reach it.

The proxy and tunnel layers write here and the control API (``monitor/``) reads, so this is a
base-layer module: it imports nothing of autovpn's.

Cost model.  Counting is per connection and per read, never per byte in Python:

- the relays already count the bytes of each read in an integer slot of their protocol
  (``Pipe.nread``, ``StreamEndpoint.nread``/``nwritten``, the wstunnel side's
  ``bytes_in``/``bytes_out``); a ``Flow`` reads them through its ``meter`` only when asked
  (a scrape, the status page, the flow's end);
- a connection costs one ``Flow`` object, made when the route is decided and ended once,
  when its client side is lost (``Flow.end``); the aggregates (per listener, route, server,
  user, domain) are not touched then: ended flows are counted BATCH at a time
  (``Stats.count_ended``), summed per line (listener, route, server, user) first, so that
  those groups are looked up once per batch, not once per connection;
- a tunnel server's streams are counted per user without a record per stream while the
  access log is off (``StreamTally``), and added to the groups when they are read;
- the live bytes of open connections are added to the aggregates at read time
  (``Stats.snapshot``), so an open connection's traffic shows before it ends.

``stats = false`` in the configuration (or ``AUTOVPN_STATS=0``) makes no ``Flow`` at all:
the relays still add their per-read integers, nothing else happens.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "RESULT_OK",
    "Flow",
    "HealthSample",
    "Stats",
    "Totals",
]

access_log = logging.getLogger("autovpn.access")
_INFO = logging.INFO  # a global, not an attribute look-up per connection

RESULT_OK = "ok"
#: The listener name of a tunnel server's streams.
TUNNEL = "tunnel"
#: Domains tracked before the least used are dropped (the top list keeps the busiest).
TOP_DOMAINS = 200
#: Health history: one sample every HEALTH_INTERVAL seconds, HEALTH_SAMPLES of them (10 min).
HEALTH_INTERVAL = 10.0
HEALTH_SAMPLES = 60
#: Ended connections counted together (``Stats.count_ended``).
BATCH = 256
#: Failures remembered for ``autovpn status --watch`` and the dashboard.
RECENT_FAILURES = 20


@dataclass(slots=True)
class Totals:
    """The ended connections of one group (a listener, a route, a server, a user, a domain):
    how many, their bytes, and the failures by reason.  ``Stats.snapshot`` adds the open ones."""

    total: int = 0
    up: int = 0
    down: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def add(self, total: int, up: int, down: int, failures: dict[str, int] | None = None) -> None:
        self.total += total
        self.up += up
        self.down += down
        if failures:
            mine = self.failures
            for reason, count in failures.items():
                mine[reason] = mine.get(reason, 0) + count

    def to_json(self, live: tuple[int, int, int] = (0, 0, 0)) -> dict[str, object]:
        """``live``: the open connections of the group, their bytes up and down so far."""
        return {
            "open": live[0],
            "total": self.total + live[0],
            "bytes_up": self.up + live[1],
            "bytes_down": self.down + live[2],
            "failures": dict(self.failures),
        }


class Metered(Protocol):
    """A relay that counts its bytes per read: ``counts()`` is (read from the client's side,
    written to it) or, for a server's stream (``Flow.reverse``), the other way round."""

    def counts(self) -> tuple[int, int]: ...


class Flow:
    """One proxied connection (or one tunnelled stream on the server), from the routing
    decision to its end.  ``meter`` returns the relay's (up, down) byte counts: up is what the
    client sent, down what it received.

    Making one is all a connection costs at its start (the groups are looked up at its end,
    once): a few microseconds per connection, in the client and in the server."""

    __slots__ = (
        "stats",
        "listener",
        "client",
        "host",
        "port",
        "route",
        "rule",
        "server",
        "user",
        "start",
        "meter",
        "reverse",
        "up",
        "down",
        "result",
        "detail",
        "ended",
    )

    def __init__(
        self,
        stats: Stats,
        listener: str,
        client: str,
        host: str,
        port: int,
        route: str,
        rule: str,
        server: str,
        user: str,
    ) -> None:
        self.stats = stats
        self.listener = listener
        self.client = client
        self.host = host
        self.port = port
        self.route = route
        self.rule = rule
        self.server = server
        self.user = user
        self.start = time.time()
        #: The relay (a reference, not a closure: a closure per connection was measurably
        #: slower); ``reverse`` when its counts are (down, up).
        self.meter: Metered | None = None
        self.reverse = False
        self.ended = False
        # up, down, result, detail: set by ``end``.

    def bytes(self) -> tuple[int, int]:
        if self.ended:
            return self.up, self.down
        meter = self.meter
        if meter is None:
            return 0, 0
        a, b = meter.counts()
        return (b, a) if self.reverse else (a, b)

    def end(self, result: str = RESULT_OK, detail: str = "") -> None:
        """The connection is over (``result``: ``ok`` or why it failed, a short name that the
        failures are counted by; ``detail``: the message, for the access log only).  Only the
        first call counts: both sides of a relay may report their end."""
        self.finish(None, result, detail)

    def finish(self, relay: Metered | None, result: str = RESULT_OK, detail: str = "") -> None:
        """``end``, as a relay that holds a ``Recorder`` calls it (the body is here, not in
        ``end``: the relays' call is the common one, and it saves a call per connection)."""
        if self.ended:
            return
        meter = self.meter
        if meter is None:
            self.up = self.down = 0
        else:
            a, b = meter.counts()
            if self.reverse:
                self.up, self.down = b, a
            else:
                self.up, self.down = a, b
            self.meter = None  # the relay's objects are not kept alive by the record
        self.ended = True
        self.result = result
        self.detail = detail
        stats = self.stats
        stats.open.discard(self)
        if result == RESULT_OK:
            # Counted later, with others (``Stats.count_ended``): a batch finds the totals in
            # the cache and looks each group up once per batch, not once per connection.
            ended = stats.ended
            ended.append(self)
            if len(ended) >= BATCH:
                stats.count_ended()
            if access_log.isEnabledFor(_INFO):
                stats._log_access(self, time.time())
        else:  # counted now: a failure shows at once (and in the recent failures)
            stats._count(self)

    def keys(self) -> tuple[str, str, str, str, str]:
        """The groups it counts in: listener, route, server, user, domain ("": none).  A
        tunnel server's streams (no route) count per listener and user only: in an engine that
        is client and server at once, the client's flow already counts route and domain."""
        domain = self.host.lower() if self.route else ""
        return self.listener, self.route, self.server, self.user, domain

    def to_json(self, now: float) -> dict[str, object]:
        up, down = self.bytes()
        return {
            "listener": self.listener,
            "client": self.client,
            "host": self.host,
            "port": self.port,
            "route": self.route,
            "rule": self.rule,
            "server": self.server,
            "user": self.user,
            "bytes_up": up,
            "bytes_down": down,
            "seconds": round(now - self.start, 3),
        }


class Recorder(Protocol):
    """What a tunnel stream's relay tells at its end: a ``Flow``, or a ``StreamTally``."""

    def finish(self, relay: Metered, result: str = RESULT_OK, detail: str = "") -> None: ...


class StreamTally:
    """A tunnel server's streams of one user, counted without a record per stream: used while
    the access log is off, when no line needs a stream's own record.  The relays of its open
    streams are kept (``open``) for their bytes so far; at its end a stream's counts are added
    here, and from here to the user's totals and the ``tunnel`` listener's when the figures
    are read (``Stats.count_ended``): a stream's end touches this one object only."""

    __slots__ = ("stats", "user", "open", "total", "up", "down", "failures")

    def __init__(self, stats: Stats, user: str) -> None:
        self.stats = stats
        self.user = user
        self.open: set[Metered] = set()
        # The ended streams not yet added to the groups (``fold``).
        self.total = self.up = self.down = 0
        self.failures: dict[str, int] = {}

    def finish(self, relay: Metered, result: str = RESULT_OK, detail: str = "") -> None:
        open_ = self.open
        if relay not in open_:
            return  # only the first call counts
        open_.discard(relay)
        down, up = relay.counts()  # a server's relay reads the target: its reads go down
        self.total += 1
        self.up += up
        self.down += down
        if result != RESULT_OK:
            self.failures[result] = self.failures.get(result, 0) + 1
            self.stats._remember_failure(time.time(), TUNNEL, f"user {self.user}", result)

    def fold(self) -> None:
        """Add the ended streams counted here to the user's totals and the ``tunnel``
        listener's."""
        if not self.total:
            return
        stats = self.stats
        for totals in (stats.listeners.get(TUNNEL), stats.users.get(self.user)):
            totals.add(self.total, self.up, self.down, self.failures)
        self.total = self.up = self.down = 0
        if self.failures:
            self.failures = {}


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One tunnel server at one moment: ``state`` up/stalled/down, the RTT of the tunnel's
    own pings (ms, None before the first answer), and ``loss`` (0-1: pings unanswered, or for
    UDP relays datagrams dropped, since the previous sample; None when nothing was sent)."""

    time: float
    state: str
    rtt_ms: float | None
    loss: float | None
    datagram_loss: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "state": self.state,
            "rtt_ms": self.rtt_ms,
            "loss": self.loss,
            "datagram_loss": self.datagram_loss,
        }


class _Groups:
    """Totals by name, bounded: past twice ``limit`` names the least used half is dropped
    (an open connection's name comes back with it at read time: see ``Stats.snapshot``)."""

    __slots__ = ("items", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.items: dict[str, Totals] = {}
        self.limit = limit

    def get(self, name: str) -> Totals:
        totals = self.items.get(name)
        if totals is None:  # rare: the first connection of a name
            if self.limit is not None and len(self.items) >= 2 * self.limit:
                self._prune()
            totals = self.items[name] = Totals()
        return totals

    def _prune(self) -> None:
        assert self.limit is not None
        ranked = sorted(self.items.items(), key=lambda kv: kv[1].total, reverse=True)
        self.items = dict(ranked[: self.limit])


class Stats:
    """The engine's counters.  ``start`` a ``Flow`` per connection; read with ``snapshot``."""

    def __init__(self, *, top_domains: int = TOP_DOMAINS) -> None:
        self.started = time.time()
        self.listeners = _Groups()
        self.routes = _Groups()
        self.servers = _Groups()
        self.users = _Groups()
        self.domains = _Groups(top_domains)
        self.top_domains = top_domains
        self.open: set[Flow] = set()
        #: Ended flows not counted yet (``count_ended``; at most BATCH of them).
        self.ended: list[Flow] = []
        self.recent_failures: deque[dict[str, object]] = deque(maxlen=RECENT_FAILURES)
        #: Tunnel health per server: the last HEALTH_SAMPLES samples (see ``HealthSample``).
        self.health: dict[str, deque[HealthSample]] = {}
        #: Any flow with a route seen: this engine is a client (its table shows those).
        self.routed = False
        #: A tunnel server's streams per user, while the access log is off (``tally``).
        self.tallies: dict[str, StreamTally] = {}

    # -- writing -------------------------------------------------------------------------------

    def start(
        self,
        *,
        listener: str,
        client: str,
        host: str,
        port: int,
        route: str,
        rule: str = "",
        server: str = "",
        user: str = "",
    ) -> Flow:
        flow = Flow(self, listener, client, host, port, route, rule, server, user)
        self.open.add(flow)
        if route:
            self.routed = True
        return flow

    def logs_access(self) -> bool:
        """Whether the access log is on: a connection then needs its own record (``Flow``)."""
        return access_log.isEnabledFor(_INFO)

    def tally(self, user: str) -> StreamTally:
        """The per-user counter of a tunnel server's streams (see ``StreamTally``)."""
        tally = self.tallies.get(user)
        if tally is None:
            tally = self.tallies[user] = StreamTally(self, user)
        return tally

    def _groups(self) -> tuple[_Groups, ...]:
        return self.listeners, self.routes, self.servers, self.users, self.domains

    def count_ended(self) -> None:
        """Count the ended flows waiting in ``ended`` (every BATCH ends, and before a read) and
        the tunnel server's streams counted per user (``StreamTally``).

        The flows of a batch are summed per line first (listener, route, server, user: a
        client has a handful of them), and each line's sums are added to its four groups once;
        a flow's domain is counted directly (the hosts of a batch are mostly distinct)."""
        ended = self.ended
        if ended:
            self.ended = []
            lines: dict[tuple[str, str, str, str], list[int]] = {}
            domains = self.domains
            items = domains.items
            for flow in ended:
                up, down = flow.up, flow.down
                key = (flow.listener, flow.route, flow.server, flow.user)
                line = lines.get(key)
                if line is None:
                    lines[key] = [1, up, down]
                else:
                    line[0] += 1
                    line[1] += up
                    line[2] += down
                if flow.route:  # a tunnel server's streams count no domain (see ``keys``)
                    name = flow.host.lower()
                    totals = items.get(name)
                    if totals is None:  # a new name: ``get`` makes it (and may drop the least used)
                        totals = domains.get(name)
                        items = domains.items
                    totals.total += 1
                    totals.up += up
                    totals.down += down
            groups = (self.listeners, self.routes, self.servers, self.users)
            for names, (total, up, down) in lines.items():
                for group, name in zip(groups, names, strict=True):
                    if name:
                        group.get(name).add(total, up, down)
        for tally in self.tallies.values():
            tally.fold()

    def _count(self, flow: Flow) -> None:
        up, down, result = flow.up, flow.down, flow.result
        failed = result != RESULT_OK
        for groups, name in zip(self._groups(), flow.keys(), strict=True):
            if name:
                totals = groups.get(name)
                totals.total += 1
                totals.up += up
                totals.down += down
                if failed:
                    totals.failures[result] = totals.failures.get(result, 0) + 1
        if failed:
            self._remember_failure(
                time.time(), flow.listener, f"{flow.host}:{flow.port}", flow.result
            )
        if access_log.isEnabledFor(_INFO):
            self._log_access(flow, time.time())

    def failure(self, listener: str, client: str, reason: str) -> None:
        """A connection that failed before it had a destination (handshake, credentials)."""
        totals = self.listeners.get(listener)
        totals.failures[reason] = totals.failures.get(reason, 0) + 1
        self._remember_failure(time.time(), listener, client, reason)

    def _remember_failure(self, now: float, listener: str, what: str, reason: str) -> None:
        self.recent_failures.append(
            {"time": round(now, 3), "listener": listener, "target": what, "reason": reason}
        )

    def sample_health(self, server: str, sample: HealthSample) -> None:
        history = self.health.get(server)
        if history is None:
            history = self.health[server] = deque(maxlen=HEALTH_SAMPLES)
        history.append(sample)

    @staticmethod
    def _log_access(flow: Flow, now: float) -> None:
        duration = round(now - flow.start, 3)
        fields = {
            "client": flow.client,
            "host": flow.host,
            "port": flow.port,
            "route": flow.route,
            "rule": flow.rule,
            "server": flow.server,
            "user": flow.user,
            "listener": flow.listener,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration": duration,
            "result": flow.result,
            "detail": flow.detail,
        }
        where = [flow.route] if flow.route else []
        if flow.rule:
            where.append(f"rule={flow.rule!r}")
        if flow.server:
            where.append(f"server={flow.server}")
        if flow.user:
            where.append(f"user={flow.user}")
        # The record is made here rather than by ``access_log.info``, which would look for
        # its caller in the stack (``findCaller``) for every line: a tenth of a line's cost.
        record = access_log.makeRecord(
            access_log.name,
            _INFO,
            __file__,
            _ACCESS_LINE,
            "%s %s -> %s:%d %s up=%d down=%d %.3fs %s%s",
            (
                flow.listener,
                flow.client,
                flow.host,
                flow.port,
                " ".join(where),
                flow.up,
                flow.down,
                duration,
                flow.result,
                f" ({flow.detail})" if flow.detail else "",
            ),
            None,
            "_log_access",
            {"access": fields},
        )
        access_log.handle(record)

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self, *, connections: int = 50) -> dict[str, object]:
        """Everything, JSON-ready: the groups with the open flows added (their count and
        bytes so far), the top domains, the ``connections`` busiest open flows, recent
        failures, tunnel health."""
        self.count_ended()
        now = time.time()
        flows = list(self.open)
        live = [f.bytes() for f in flows]
        kinds = ("listeners", "routes", "servers", "users", "domains")
        extra: list[dict[str, tuple[int, int, int]]] = [{} for _ in kinds]
        for flow, (up, down) in zip(flows, live, strict=True):
            for sums, name in zip(extra, flow.keys(), strict=True):
                if name:
                    was = sums.get(name, (0, 0, 0))
                    sums[name] = (was[0] + 1, was[1] + up, was[2] + down)
        for tally in self.tallies.values():
            for relay in tally.open:
                down, up = relay.counts()
                for sums, name in ((extra[0], TUNNEL), (extra[3], tally.user)):
                    was = sums.get(name, (0, 0, 0))
                    sums[name] = (was[0] + 1, was[1] + up, was[2] + down)
        out: dict[str, dict[str, dict[str, object]]] = {}
        for kind, groups, sums in zip(kinds, self._groups(), extra, strict=True):
            names = list(groups.items) + [n for n in sums if n not in groups.items]
            out[kind] = {
                name: groups.items.get(name, Totals()).to_json(sums.get(name, (0, 0, 0)))
                for name in names
            }

        def traffic(item: tuple[str, dict[str, object]]) -> tuple[int, int]:
            figures = item[1]
            up, down, total = figures["bytes_up"], figures["bytes_down"], figures["total"]
            assert isinstance(up, int) and isinstance(down, int) and isinstance(total, int)
            return up + down, total

        top = sorted(out["domains"].items(), key=traffic, reverse=True)[: self.top_domains]
        # An engine that is client and server at once sees each connection twice: its
        # table shows the client's side (with the route), a server's its users' streams.
        shown = [
            (sum(b), f) for f, b in zip(flows, live, strict=True) if f.route or not self.routed
        ]
        shown.sort(key=lambda item: item[0], reverse=True)
        return {
            "since": round(self.started, 3),
            "listeners": out["listeners"],
            "routes": out["routes"],
            "servers": out["servers"],
            "users": out["users"],
            "domains": dict(top),
            "open": len(shown),
            "connections": [f.to_json(now) for _, f in shown[:connections]],
            "recent_failures": list(self.recent_failures),
            "health": {
                server: [s.to_json() for s in history] for server, history in self.health.items()
            },
        }


#: Where an access line comes from (a record's ``lineno``).
_ACCESS_LINE = Stats._log_access.__code__.co_firstlineno


def ratio(lost: int, sent: int) -> float | None:
    """``lost / sent`` in 0-1, or None when nothing was sent."""
    if sent <= 0:
        return None
    return round(min(max(lost / sent, 0.0), 1.0), 4)
