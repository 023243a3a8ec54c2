"""Routing benchmarks: decisions per second, and PAC evaluation time per host in pacparser.

``run_routing_bench()`` returns ``(name, value)`` rows; every decision rate is the median of 3
runs of at least 0.3 s of CPU time each:

* ``decide/s cold, ...``: ``Router.decide`` in smart mode with the decision cache off, over
  100,000 distinct names, each decided once per pass: what a connection to a name not seen
  before costs.  Half of them are a new label under a domain of the lists, drawn uniformly
  from all the list's rules (with a big list, mostly a rule not used before: the worst
  case), half are unlisted;
* ``decide/s warm, ...``: the same lists with the decision cache on, over 2,000 names of which
  half are five popular hosts (every name is in the cache after the first pass);
* ``..., default lists``: the shipped lists; ``..., +dnsmasq-china-list``: the same with the
  ~110k-domain list loaded as a direct list (skipped when the shared data is absent): lookup
  cost must stay flat as lists grow;
* ``pacparser us/host, 10k rules``: one ``FindProxyForURL`` call in pacparser (QuickJS) on a
  smart PAC generated from 10,000 domain rules (skipped without pacparser);
* ``batch resolve ms, ... tunnel``: ``SplitResolver.resolve_many`` over the shipped proxy
  list (~335 names, 50 in flight), A and AAAA for each name, DNS over TCP through a real tunnel
  (embedded wss server on loopback) to a loopback DNS server that answers after 50 ms; and the
  same batch again, all from the cache.

``python -m benchmarks.routing_bench`` prints the decision rows (``--all``: every row).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import string
import sys
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
COLD_NAMES = 100_000
RUNS = 3


def _hosts(n: int, seed: int = 1) -> list[str]:
    """The warm mix: half five popular hosts, half random names (repeated across passes)."""
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


def _cold_hosts(router: Router, n: int = COLD_NAMES, seed: int = 3) -> list[str]:
    """``n`` distinct names: even ones a new label under a domain of the router's lists (any
    list rule, uniformly), odd ones 2-4 random labels under a common TLD (matched by none)."""
    rng = random.Random(seed)
    listed = sorted(
        {
            key.lstrip(".")
            for rs in router.list_tiers
            for table in (rs.full, rs.suffix)
            for key in table
        }
    )
    letters = string.ascii_lowercase + string.digits
    out: dict[str, None] = {}
    while len(out) < n:
        label = "".join(rng.choices(letters, k=rng.randint(3, 10)))
        if len(out) % 2 == 0 and listed:
            name = f"{label}.{rng.choice(listed)}"
        else:
            more = [
                "".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(1, 3))
            ]
            name = ".".join([label, *more, rng.choice(["com", "net", "org", "io", "cn"])])
        out[name] = None
    return list(out)


def _decisions_per_second(router: Router, hosts: list[str], seconds: float = 0.3) -> float:
    """The median rate of ``RUNS`` runs, each at least ``seconds`` of whole passes, per second
    of this process's CPU time: on a shared machine, wall time would also count the turns of
    other processes (the loop does no I/O, so the two are equal on an idle one)."""
    decide = router.decide
    rates = []
    for _ in range(RUNS):
        done = 0
        start = time.process_time()
        while True:
            for h in hosts:
                decide(h, 443)
            done += len(hosts)
            elapsed = time.process_time() - start
            if elapsed >= seconds:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)


def decision_rows() -> list[tuple[str, float]]:
    """Cold and warm decision rates: no lists, the default lists, +dnsmasq-china-list."""
    rows: list[tuple[str, float]] = []
    bare = Router(Mode.SMART, cache_size=0)
    rows.append(("decide/s cold, no lists", _decisions_per_second(bare, _cold_hosts(bare))))
    cases: list[tuple[str, list[ListSpec]]] = [("default lists", [])]
    if CHINA_LIST.exists():
        cases.append(("+dnsmasq-china-list", [ListSpec(CHINA_LIST, Action.DIRECT)]))
    warm_hosts = _hosts(2000)
    for name, lists in cases:
        cold = Router.from_config(mode=Mode.SMART, lists=lists, cache_size=0)
        rows.append((f"decide/s cold, {name}", _decisions_per_second(cold, _cold_hosts(cold))))
        warm = Router.from_config(mode=Mode.SMART, lists=lists)
        rows.append((f"decide/s warm, {name}", _decisions_per_second(warm, warm_hosts)))
    return rows


def run_routing_bench() -> list[tuple[str, float]]:
    rows = decision_rows()
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
    for name, value in run_routing_bench() if "--all" in sys.argv[1:] else decision_rows():
        print(f"{name:40} {value:14,.1f}")
