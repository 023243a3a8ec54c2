"""``GET /metrics``: the engine's counters in Prometheus's text exposition format.

A custom collector renders the engine's status (``EngineView.status()``: the counters of
``autovpn.stats`` and of the parts), which the control API gathers when a scraper asks, and
nothing else: the hot path makes no Prometheus call at all, and an engine nobody scrapes pays
nothing for this.  The status of ``autovpn server --workers N``'s supervisor is gathered from
its workers (``autovpn.workers``): the same families, summed, and a few per worker
(``autovpn_worker_*``, label ``worker``).

Names follow Prometheus's conventions: ``autovpn_`` prefix, counters end in ``_total``,
units in the name (``_bytes``, ``_seconds``), one family per measure with the group in a
label.  Domains are the top ``autovpn.stats.TOP_DOMAINS`` only (bounded label values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "EngineCollector", "exposition"]

#: The text format's media type (``prometheus_client.CONTENT_TYPE_LATEST`` without charset).
CONTENT_TYPE = "text/plain; version=0.0.4"

#: The groups of ``autovpn.stats`` and the label that names a member of each.
_GROUPS = (
    ("listeners", "listener"),
    ("routes", "route"),
    ("servers", "server"),
    ("users", "user"),
    ("domains", "domain"),
)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


class EngineCollector(Collector):
    """Renders ``status`` (the ``GET /status`` object), set before each scrape (``exposition``:
    the status may have to be awaited, which a collector cannot do)."""

    def __init__(self) -> None:
        self.status: Mapping[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        st = self.status
        info = GaugeMetricFamily(
            "autovpn_info", "the engine's version and routing mode", labels=["version", "mode"]
        )
        info.add_metric([str(st.get("version", "")), str(st.get("mode", ""))], 1)
        yield info
        stats = st.get("stats")
        if isinstance(stats, dict):
            yield from self._groups(stats)
            yield from self._health(stats)
        yield from self._dns(_dict(st.get("dns")))
        yield from self._tunnel(st.get("tunnel"))
        yield from self._server(st.get("server"))
        yield from self._udp(st.get("udp_relays"))
        yield from self._workers(st.get("workers"))

    @staticmethod
    def _groups(stats: Mapping[str, Any]) -> Iterator[Metric]:
        for key, label in _GROUPS:
            members = _dict(stats.get(key))
            what = f"per {label}"
            opened = GaugeMetricFamily(
                f"autovpn_{label}_connections_open", f"connections open, {what}", labels=[label]
            )
            total = CounterMetricFamily(
                f"autovpn_{label}_connections", f"connections made, {what}", labels=[label]
            )
            moved = CounterMetricFamily(
                f"autovpn_{label}_bytes",
                f"bytes relayed, {what} (up: from the client)",
                labels=[label, "direction"],
            )
            failed = CounterMetricFamily(
                f"autovpn_{label}_failures",
                f"connections that failed, {what}, by reason",
                labels=[label, "reason"],
            )
            for name, figures in members.items():
                opened.add_metric([name], figures["open"])
                total.add_metric([name], figures["total"])
                moved.add_metric([name, "up"], figures["bytes_up"])
                moved.add_metric([name, "down"], figures["bytes_down"])
                for reason, count in figures["failures"].items():
                    failed.add_metric([name, reason], count)
            yield from (opened, total, moved, failed)

    @staticmethod
    def _health(stats: Mapping[str, Any]) -> Iterator[Metric]:
        health = _dict(stats.get("health"))
        rtt = GaugeMetricFamily(
            "autovpn_tunnel_rtt_seconds",
            "round-trip time of the tunnel's own pings, at the last health sample",
            labels=["server"],
        )
        loss = GaugeMetricFamily(
            "autovpn_tunnel_ping_loss_ratio",
            "pings unanswered between the last two health samples (0-1)",
            labels=["server"],
        )
        for server, history in health.items():
            if not history:
                continue
            last = history[-1]
            if last["rtt_ms"] is not None:
                rtt.add_metric([server], last["rtt_ms"] / 1000)
            if last["loss"] is not None:
                loss.add_metric([server], last["loss"])
        yield from (rtt, loss)

    @staticmethod
    def _dns(dns: Mapping[str, Any]) -> Iterator[Metric]:
        queries = CounterMetricFamily(
            "autovpn_dns_queries", "DNS queries sent, by resolver", labels=["resolver"]
        )
        for resolver, count in _dict(dns.get("queries")).items():
            queries.add_metric([resolver], count)
        yield queries
        hits = dns.get("cache_hits", 0)
        yield CounterMetricFamily(
            "autovpn_dns_cache_hits", "lookups the DNS cache answered", value=hits
        )
        yield GaugeMetricFamily(
            "autovpn_dns_cache_entries", "names in the DNS cache", value=dns.get("cache_entries", 0)
        )

    @staticmethod
    def _tunnel(tunnel: object) -> Iterator[Metric]:
        if not isinstance(tunnel, dict):
            return
        server = [str(tunnel["server"])]
        up = GaugeMetricFamily(
            "autovpn_tunnel_up", "1 when a tunnel connection takes new streams", labels=["server"]
        )
        up.add_metric(server, 1 if tunnel["up"] else 0)
        connects = CounterMetricFamily(
            "autovpn_tunnel_connects", "tunnel connections made", labels=["server"]
        )
        connects.add_metric(server, tunnel["connects"])
        dropped = CounterMetricFamily(
            "autovpn_tunnel_datagrams_dropped",
            "UDP datagrams the tunnel client dropped (down or congested)",
            labels=["server"],
        )
        dropped.add_metric(server, tunnel["datagrams_dropped"])
        yield from (up, connects, dropped)

    @staticmethod
    def _server(server: object) -> Iterator[Metric]:
        if not isinstance(server, dict):
            return
        yield GaugeMetricFamily(
            "autovpn_server_tunnel_connections",
            "tunnel connections to this server",
            value=server["connections"],
        )
        yield CounterMetricFamily(
            "autovpn_server_streams_opened",
            "streams the server dialled",
            value=server["streams_opened"],
        )
        yield CounterMetricFamily(
            "autovpn_server_streams_failed",
            "streams the server could not dial",
            value=server["streams_failed"],
        )
        yield CounterMetricFamily(
            "autovpn_server_upgrades_refused",
            "tunnel upgrades refused (credentials, path, replay)",
            value=server["upgrades_refused"],
        )

    @staticmethod
    def _udp(relays: object) -> Iterator[Metric]:
        if not isinstance(relays, list):
            return
        datagrams = CounterMetricFamily(
            "autovpn_udp_datagrams",
            "datagrams through the UDP relays (in: from local peers, out: back to them)",
            labels=["relay", "direction"],
        )
        dropped = CounterMetricFamily(
            "autovpn_udp_dropped", "datagrams a UDP relay dropped", labels=["relay"]
        )
        for relay in relays:
            name = str(relay.get("listen", ""))
            datagrams.add_metric([name, "in"], relay.get("received", 0))
            datagrams.add_metric([name, "out"], relay.get("replies", 0))
            dropped.add_metric([name], relay.get("dropped", 0))
        yield from (datagrams, dropped)


    @staticmethod
    def _workers(workers: object) -> Iterator[Metric]:
        """A supervisor's workers, by index (``worker``; not the pid, which a restart
        changes).  A worker's own counters start again at 0 when it is restarted, which
        ``rate()`` takes for a counter reset of that series; the families above are the sums,
        which keep an exited worker's last counts (``workers.FleetTotals``)."""
        if not isinstance(workers, list):
            return
        up = GaugeMetricFamily(
            "autovpn_worker_up", "1 when the worker answered the supervisor", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "autovpn_worker_restarts", "times the supervisor started the worker again",
            labels=["worker"],
        )
        conns = GaugeMetricFamily(
            "autovpn_worker_tunnel_connections",
            "tunnel connections to the worker",
            labels=["worker"],
        )
        opened = CounterMetricFamily(
            "autovpn_worker_streams_opened",
            "streams the worker dialled, since it started",
            labels=["worker"],
        )
        moved = CounterMetricFamily(
            "autovpn_worker_bytes",
            "bytes the worker relayed, since it started (up: from the clients)",
            labels=["worker", "direction"],
        )
        for worker in workers:
            name = [str(worker.get("index", ""))]
            server = worker.get("server")
            up.add_metric(name, 0 if "error" in worker or server is None else 1)
            restarts.add_metric(name, worker.get("restarts", 0))
            if isinstance(server, dict):
                conns.add_metric(name, server.get("connections", 0))
                opened.add_metric(name, server.get("streams_opened", 0))
            if "bytes_up" in worker:
                moved.add_metric([*name, "up"], worker["bytes_up"])
                moved.add_metric([*name, "down"], worker["bytes_down"])
        yield from (up, restarts, conns, opened, moved)


def exposition() -> Callable[[Mapping[str, Any]], bytes]:
    """A function that renders a status as the exposition text, with its own registry (never
    the process-wide one: an embedding program's metrics are its own)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = EngineCollector()
    registry.register(collector)

    def render(status: Mapping[str, Any]) -> bytes:
        # Synchronous from here to the end: no other scrape can set another status meanwhile.
        collector.status = status
        try:
            return generate_latest(registry)
        finally:
            collector.status = {}

    return render
