"""``GET /metrics``: Prometheus's text format, read back with prometheus_client's own parser
after real traffic; no token needed, the Host guard applies; ``autovpn status --json`` names
its URL."""

from __future__ import annotations

import asyncio
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

from autovpn.engine import Engine
from autovpn.monitor.api import request
from tests.conftest import Certs, echo_handler, eventually, run, tcp_server
from tests.monitor.test_stats import echo_through, stats_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_metrics_expose_the_engines_counters_to_a_scraper(certs: Certs) -> None:
    async def main() -> None:
        cfg = stats_config(certs)
        cfg.control = "127.0.0.1:0"
        async with Engine(cfg) as eng, tcp_server(echo_handler) as echo:
            assert eng.api is not None and eng.tunnel is not None and eng.stats is not None
            await echo_through(eng, echo, 1000)
            await eventually(lambda: not eng.stats.open)  # type: ignore[union-attr]
            r = await request(eng.api.url, "GET", "/metrics")  # no token: read-only
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            got = samples(r.body.decode())
            server = str(eng.tunnel.settings.server)
            assert got[key("autovpn_info", mode="global", version="0.1.0")] == 1
            assert got[key("autovpn_listener_connections_total", listener="socks5")] == 1
            assert got[key("autovpn_route_bytes_total", direction="up", route="proxy")] == 1000
            assert got[key("autovpn_server_bytes_total", direction="down", server=server)] == 1000
            assert got[key("autovpn_user_connections_total", user="default")] == 1
            assert got[key("autovpn_domain_connections_open", domain="127.0.0.1")] == 0
            assert got[key("autovpn_tunnel_up", server=server)] == 1
            assert got[key("autovpn_server_streams_opened_total")] == 1
            assert key("autovpn_dns_queries_total", resolver="public") in got
            # A DNS-rebinding page cannot read it either.
            port = eng.api.bound_port
            bad = await request(
                eng.api.url, "GET", "/metrics", headers={"Host": f"evil.example:{port}"}
            )
            assert bad.status == 421
            # autovpn status --json names the URL a scraper should use.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "autovpn", "status", "--json", "--control", eng.api.url,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            assert json.loads(out)["metrics"] == f"{eng.api.url}/metrics"

    run(main())
