"""Routing benchmarks: decisions per second, and PAC evaluation time per host in pacparser.

``run_routing_bench()`` returns ``(name, value)`` rows:

* ``decide/s, default lists``: ``Router.decide`` in smart mode with the shipped lists;
* ``decide/s, +dnsmasq-china-list``: the same with the ~110k-domain list loaded as a direct list
  (skipped when ../shared/data is absent) -- lookup cost must stay flat as lists grow;
* ``pacparser us/host, 10k rules``: one ``FindProxyForURL`` call in pacparser (QuickJS) on a
  smart PAC generated from 10,000 domain rules (skipped without pacparser).
"""

from __future__ import annotations

import os
import random
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
    return rows


if __name__ == "__main__":
    for name, value in run_routing_bench():
        print(f"{name:40} {value:14,.1f}")
