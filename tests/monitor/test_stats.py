"""The engine's traffic statistics, with real traffic through a real engine: per listener,
route, server, user and domain, live bytes of open connections, failures by reason, the
access log line of each connection, tunnel health from the tunnel's own pings; and the
bounded parts (top domains) and the off switch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from autovpn.config import RoutingConfig
from autovpn.engine import Engine
from autovpn.routing.router import Mode
from autovpn.stats import RESULT_OK, Stats, ratio
from tests.conftest import (
    Certs,
    echo_handler,
    engine_config,
    eventually,
    run,
    socks_open,
    socks_port,
    tcp_server,
)


def stats_config(certs: Certs, **kw: Any) -> Any:
    cfg = engine_config(certs, mode=Mode.GLOBAL)
    cfg.routing = RoutingConfig(
        rules=["domain:blocked.test=reject"], default_lists=False, hosts_file=None, dns_local=[]
    )
    cfg.control = None
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


async def echo_through(eng: Engine, echo: int, size: int) -> None:
    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
    writer.write(b"x" * size)
    await reader.readexactly(size)
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("access_log", [True, False], ids=["access-log", "no-access-log"])
def test_connections_are_counted_per_listener_route_server_user_and_domain(
    certs: Certs, caplog: pytest.LogCaptureFixture, access_log: bool
) -> None:
    """With the access log on, every connection has its record (``Flow``) on both sides; off,
    a server counts its streams per user without one (``StreamTally``): the same figures."""
    caplog.set_level(logging.INFO if access_log else logging.WARNING, logger="autovpn.access")

    async def main() -> None:
        async with Engine(stats_config(certs)) as eng, tcp_server(echo_handler) as echo:
            stats = eng.stats
            assert stats is not None and eng.tunnel is not None
            server = str(eng.tunnel.settings.server)
            # An open connection's bytes show before it ends.
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
            writer.write(b"y" * 5000)
            await reader.readexactly(5000)
            snap: Any = stats.snapshot()
            assert snap["routes"]["proxy"]["open"] == 1
            assert snap["routes"]["proxy"]["bytes_up"] == 5000
            (conn,) = snap["connections"]
            assert conn["host"] == "127.0.0.1" and conn["route"] == "proxy"
            assert conn["server"] == server and conn["bytes_down"] == 5000
            user_now = snap["users"]["default"]
            assert (user_now["open"], user_now["bytes_up"], user_now["bytes_down"]) == (
                1,
                5000,
                5000,
            )
            writer.close()
            await writer.wait_closed()
            await echo_through(eng, echo, 1000)
            eng.set_mode(Mode.SMART)  # a loopback target goes direct, blocked.test is refused
            await echo_through(eng, echo, 3000)
            with pytest.raises(Exception, match="NOT_ALLOWED"):
                await socks_open(socks_port(eng), "blocked.test", 80)
            await eventually(lambda: not stats.open)

            snap = stats.snapshot()
            socks = snap["listeners"]["socks5"]
            assert socks["total"] == 4 and socks["open"] == 0
            assert socks["failures"] == {"rejected": 1}
            proxy, direct = snap["routes"]["proxy"], snap["routes"]["direct"]
            assert (proxy["total"], proxy["bytes_up"], proxy["bytes_down"]) == (2, 6000, 6000)
            assert (direct["total"], direct["bytes_up"], direct["bytes_down"]) == (1, 3000, 3000)
            assert snap["routes"]["reject"]["failures"] == {"rejected": 1}
            assert snap["servers"] == {server: proxy}
            # The server side counts its user's streams (the bytes the client sent, up).
            user = snap["users"]["default"]
            assert (user["total"], user["bytes_up"], user["bytes_down"]) == (2, 6000, 6000)
            assert snap["listeners"]["tunnel"]["total"] == 2
            assert snap["domains"]["127.0.0.1"]["total"] == 3
            assert snap["domains"]["blocked.test"]["failures"] == {"rejected": 1}
            (failure,) = snap["recent_failures"]
            assert failure["target"] == "blocked.test:80" and failure["reason"] == "rejected"
            # /status carries the same.
            assert eng.status()["stats"] == stats.snapshot()

    run(main())
    lines = [r for r in caplog.records if r.name == "autovpn.access"]
    if not access_log:
        assert lines == []
        return
    # One line per connection (the client's four, the server's two), at its end.
    ok = [r for r in lines if getattr(r, "access", {}).get("result") == RESULT_OK]
    assert len(lines) == 6 and len(ok) == 5
    fields = [r.access for r in lines if r.access["route"] == "direct"]  # type: ignore[attr-defined]
    assert len(fields) == 1
    assert fields[0]["bytes_up"] == 3000 and fields[0]["bytes_down"] == 3000
    assert fields[0]["listener"] == "socks5" and fields[0]["client"].startswith("127.0.0.1:")
    assert fields[0]["duration"] >= 0 and "local" in fields[0]["rule"]
    text = [r.getMessage() for r in lines]
    assert any("-> 127.0.0.1:" in t and " direct " in t and "up=3000 down=3000" in t for t in text)
    assert any("blocked.test:80 reject" in t and "rejected (rejected by" in t for t in text)


def test_tunnel_health_has_the_rtt_and_loss_of_the_tunnels_own_pings(certs: Certs) -> None:
    async def main() -> None:
        async with Engine(stats_config(certs)) as eng:
            assert eng.stats is not None and eng.tunnel is not None
            (conn,) = eng.tunnel.connections
            server = str(eng.tunnel.settings.server)
            await eventually(lambda: server in eng.stats.health)  # type: ignore[union-attr]
            eng.sample_health()  # the baseline, after the engine's own first sample
            conn.ping()
            await eventually(lambda: conn.pings_answered >= 1)
            eng.sample_health()
            history = eng.stats.health[server]
            last = history[-1]
            assert last.state == "up" and last.rtt_ms is not None and last.rtt_ms > 0
            assert last.loss == 0.0 and last.datagram_loss is None
            eng.sample_health()
            assert history[-1].loss is None  # nothing sent since
            # Pings that go unanswered: the server's side of the connection stops reading.
            (server_side,) = eng.server.connections  # type: ignore[union-attr]
            assert server_side.transport is not None
            server_side.transport.pause_reading()
            conn.ping()
            conn.ping()
            await asyncio.sleep(0.2)
            eng.sample_health()
            assert history[-1].loss == 1.0
            server_side.transport.resume_reading()
            await eventually(lambda: conn.pings_answered >= 3)
            for _ in range(70):
                eng.sample_health()
            assert len(history) == 60  # ten minutes at 10 s resolution

    run(main())


def test_stats_can_be_turned_off(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main(cfg: Any) -> None:
        async with Engine(cfg) as eng, tcp_server(echo_handler) as echo:
            assert eng.stats is None and eng.server is not None and eng.server.stats is None
            await echo_through(eng, echo, 1000)
            assert eng.status()["stats"] is None
            eng.sample_health()  # no-op

    run(main(stats_config(certs, stats=False)))
    monkeypatch.setenv("AUTOVPN_STATS", "0")
    run(main(stats_config(certs)))


def test_top_domains_are_bounded_and_keep_the_busiest() -> None:
    class Relay:
        def counts(self) -> tuple[int, int]:
            return 7, 9

    stats = Stats(top_domains=10)
    busy = stats.start(listener="socks5", client="c", host="Busy.test", port=443, route="proxy")
    busy.meter = Relay()
    for i in range(500):
        stats.start(
            listener="socks5", client="c", host=f"d{i}.test", port=443, route="direct"
        ).end()
    snap: Any = stats.snapshot()
    assert len(stats.domains.items) <= 20  # at most twice the top size between prunes
    assert len(snap["domains"]) == 10
    # The open connection's domain is on top, with its bytes so far, pruned or not.
    assert next(iter(snap["domains"])) == "busy.test"
    assert snap["domains"]["busy.test"] == {
        "open": 1, "total": 1, "bytes_up": 7, "bytes_down": 9, "failures": {}
    }
    busy.end("connection_refused")
    busy.end(RESULT_OK)  # the first end counts
    assert stats.routes.items["proxy"].failures == {"connection_refused": 1}
    stats.count_ended()
    assert stats.routes.items["direct"].total == 500
    assert (stats.routes.items["proxy"].up, stats.routes.items["proxy"].down) == (7, 9)
    assert not stats.open and not stats.ended
    assert ratio(1, 4) == 0.25 and ratio(0, 0) is None and ratio(5, 4) == 1.0



def test_a_proxied_connection_counts_for_the_server_the_pool_chose(certs: Certs) -> None:
    """Two servers, the first unreachable: the pool sends the stream to the second, and the
    statistics name that one (the flow learns its server when the stream is open)."""
    from autovpn.config import ServerEntry, ServerURL
    from tests.conftest import free_port

    async def main() -> None:
        cfg = stats_config(certs)
        assert cfg.client is not None
        dead = ServerURL(True, "127.0.0.1", free_port())
        cfg.client.servers = [ServerEntry(dead, 1), ServerEntry(ServerURL(True, "127.0.0.1", 0), 2)]
        async with Engine(cfg) as eng, tcp_server(echo_handler) as echo:
            assert eng.stats is not None and eng.server is not None
            await echo_through(eng, echo, 1000)
            await eventually(lambda: not eng.stats.open)  # type: ignore[union-attr]
            live = f"wss://127.0.0.1:{eng.server.port}"
            snap: Any = eng.stats.snapshot()
            assert set(snap["servers"]) == {live}
            assert snap["servers"][live]["bytes_up"] == 1000
            eng.sample_health()
            assert {str(dead), live} <= set(eng.stats.health)
            assert eng.stats.health[live][-1].state == "up"
            assert eng.stats.health[str(dead)][-1].state != "up"

    run(main())
