"""Routing benchmarks: decisions per second, and PAC evaluation time per host in pacparser.

``run_routing_bench()`` returns ``(name, value)`` rows:

* ``decide/s, default lists``: ``Router.decide`` in smart mode with the shipped lists;
* ``decide/s, +dnsmasq-china-list``: the same with the ~110k-domain list loaded as a direct list
  (skipped when ../shared/data is absent) -- lookup cost must stay flat as lists grow;
* ``pacparser us/host, 10k rules``: one ``FindProxyForURL`` call in pacparser (QuickJS) on a
  smart PAC generated from 10,000 domain rules (skipped without pacparser);
* ``batch resolve ms, ... tunnel``: ``SplitResolver.resolve_many`` over the shipped proxy
  list (~335 names, 50 in flight), A and AAAA for each name, DNS over TCP through a real tunnel
  (embedded wss server on loopback) to a loopback DNS server that answers after 50 ms; and the
  same batch again, all from the cache.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from autovpn.routing.lists import parse_plain
from autovpn.routing.pac import render_pac
from autovpn.routing.router import Action, ListSpec, Mode, Router

SHARED_DATA = Path(
    os.environ.get("AUTOVPN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
CHINA_LIST = SHARED_DATA / "dnsmasq-china-list" / "accelerated-domains.china.conf"


def _hosts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    known = ["www.google.com", "i.ytimg.com", "www.baidu.com", "img.alicdn.com", "github.com"]
    out = []
    for i in range(n):
        if i % 2:
            out.append(rng.choice(known))
        else:
            labels = ["".join(rng.choices("abcdefghijklmnop", k=6)) for _ in range(3)]
            out.append(".".join(labels) + rng.choice([".com", ".net", ".cn", ".org"]))
    return out


def _decisions_per_second(router: Router, hosts: list[str], seconds: float = 0.5) -> float:
    done = 0
    start = time.perf_counter()
    while True:
        for h in hosts:
            router.decide(h, 443)
        done += len(hosts)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def run_routing_bench() -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    hosts = _hosts(2000)
    rows.append(("decide/s, no lists", _decisions_per_second(Router(Mode.SMART), hosts)))
    smart = Router.from_config(mode=Mode.SMART)
    rows.append(("decide/s, default lists", _decisions_per_second(smart, hosts)))
    if CHINA_LIST.exists():
        big = Router.from_config(lists=[ListSpec(CHINA_LIST, Action.DIRECT)])
        rows.append(("decide/s, +dnsmasq-china-list", _decisions_per_second(big, hosts)))
    try:
        import pacparser
    except ImportError:
        return rows
    text = "\n".join(f"d{i}.example{i % 97}.com" for i in range(10_000))
    router = Router(Mode.SMART, list_rules=parse_plain(text).rules, default=Action.DIRECT)
    pacparser.init()
    try:
        pacparser.parse_pac_string(render_pac(router, http_port=8080, socks_port=1080))
        sample = _hosts(500, seed=2) + [f"x.d{i}.example{i % 97}.com" for i in range(500)]
        start = time.perf_counter()
        for h in sample:
            pacparser.find_proxy(f"https://{h}/", h)
        per_host = (time.perf_counter() - start) / len(sample)
    finally:
        pacparser.cleanup()
    rows.append(("pacparser us/host, 10k rules", per_host * 1e6))
    return rows + batch_resolution_rows()


async def _batch_resolution(latency: float = 0.05) -> list[tuple[str, float]]:
    from autovpn.engine import Engine, embedded_config
    from autovpn.routing.dns import SplitResolver
    from autovpn.routing.lists import load_default_lists
    from autovpn.routing.upstream import Upstream
    from tests.routing.dnsserver import dns_server  # the same loopback server the tests use

    names = sorted({r.value.lstrip(".") for r in load_default_lists().proxy.rules})
    with tempfile.TemporaryDirectory(prefix="autovpn-bench-") as state:
        cfg = embedded_config(Path(state))
        assert cfg.client is not None
        cfg.client.listen = []
        cfg.control = None
        async with dns_server(latency=latency) as public, Engine(cfg) as engine:
            assert engine.tunnel is not None
            resolver = SplitResolver(
                Router.from_config(mode=Mode.SMART),
                public=[Upstream("127.0.0.1", public.port)],
                opener=engine.tunnel.open_socket_stream,
            )
            start = time.perf_counter()
            results = await resolver.resolve_many(names, concurrency=50)
            cold = time.perf_counter() - start
            failed = sum(isinstance(r, Exception) for r in results.values())
            if failed:
                raise RuntimeError(f"{failed} of {len(names)} names failed")
            start = time.perf_counter()
            await resolver.resolve_many(names, concurrency=50)
            warm = time.perf_counter() - start
    return [
        (f"batch resolve ms, {len(names)} proxied, 50 ms, tunnel", cold * 1e3),
        (f"batch resolve ms, {len(names)} again, cache", warm * 1e3),
    ]


def batch_resolution_rows() -> list[tuple[str, float]]:
    """Run the batch benchmark on its own event loop (in a thread if one is running here)."""
    from autovpn.eventloop import run

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run(_batch_resolution())
    out: list[tuple[str, float]] = []
    thread = threading.Thread(target=lambda: out.extend(run(_batch_resolution())))
    thread.start()
    thread.join()
    return out


if __name__ == "__main__":
    for name, value in run_routing_bench():
        print(f"{name:40} {value:14,.1f}")
