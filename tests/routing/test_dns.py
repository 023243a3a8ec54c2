"""Split DNS against two real DNS servers on loopback ("local" and "public"), the public one
reached through a real tunnel (wss on loopback).  Every assertion is on what each server saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from autovpn.routing.dns import ResolveError, SplitResolver, StreamOpener
from autovpn.routing.dns_cache import DnsCache
from autovpn.routing.lists import load_default_lists
from autovpn.routing.router import Action, Mode, Router
from autovpn.routing.upstream import Upstream
from tests.conftest import Certs, engine, run
from tests.routing.dnsserver import FakeDns, dns_server

RULES = ["domain:proxied.test=proxy", "domain:direct.test=direct"]


def smart_router(default: Action = Action.DIRECT) -> Router:
    return Router.from_config(mode=Mode.SMART, rules=RULES, default=default, default_lists=False)


@dataclass
class Rig:
    local: FakeDns
    public: FakeDns
    opener: StreamOpener

    def resolver(self, router: Router, **kwargs: object) -> SplitResolver:
        return SplitResolver(
            router,
            local=[Upstream("127.0.0.1", self.local.port)],
            public=[Upstream("127.0.0.1", self.public.port)],
            opener=self.opener,
            **kwargs,  # type: ignore[arg-type]
        )


@asynccontextmanager
async def rig(
    certs: Certs, *, public_latency: float = 0.0, local_latency: float = 0.0
) -> AsyncIterator[Rig]:
    async with (
        engine(certs) as eng,
        dns_server(latency=local_latency, default_a="127.0.0.3") as local,
        dns_server(latency=public_latency, default_a="127.0.0.4") as public,
    ):
        assert eng.tunnel is not None
        yield Rig(local, public, eng.tunnel.open_socket_stream)


def test_split_direct_names_local_proxied_names_through_the_tunnel(certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            res = r.resolver(smart_router())
            p = await res.resolve("www.proxied.test")
            d = await res.resolve("a.direct.test")
            o = await res.resolve("other.example")  # no rule: the default (direct)
            assert p.addresses == ("127.0.0.4",) and p.upstream == "public"
            assert d.addresses == ("127.0.0.3",) and d.upstream == "local"
            assert o.upstream == "local"
            assert r.public.names() == {"www.proxied.test"}
            assert {q.transport for q in r.public.queries} == {"tcp"}
            assert r.local.names() == {"a.direct.test", "other.example"}
            assert {q.rdtype for q in r.public.queries} == {"A", "AAAA"}

    run(main())


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_mode_picks_the_resolver(certs: Certs, mode: Mode) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            router = smart_router()
            router.mode = mode
            res = r.resolver(router)
            names = ["www.proxied.test", "a.direct.test"]
            for n in names:
                await res.resolve(n)
            used, unused = (r.public, r.local) if mode is Mode.GLOBAL else (r.local, r.public)
            assert used.names() == set(names)
            assert unused.queries == []

    run(main())


def test_no_proxied_name_reaches_the_local_resolver_even_without_a_tunnel() -> None:
    async def main() -> None:
        async with dns_server() as local:
            res = SplitResolver(
                smart_router(), local=[Upstream("127.0.0.1", local.port)], opener=None
            )
            with pytest.raises(ResolveError, match="no tunnel"):
                await res.resolve("www.proxied.test")
            assert local.queries == []

    run(main())


def test_public_resolver_failure_never_falls_back_to_local(certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            res = SplitResolver(
                smart_router(),
                local=[Upstream("127.0.0.1", r.local.port)],
                public=[Upstream("127.0.0.1", 9)],  # nothing listens: the tunnel reports it
                opener=r.opener,
            )
            with pytest.raises(ResolveError, match="public resolvers failed"):
                await res.resolve("www.proxied.test")
            assert r.local.queries == []

    run(main())


def test_cache_hits_make_no_query_and_ttl_expiry_asks_again() -> None:
    now = [1000.0]

    async def main() -> None:
        async with dns_server(ttl=60) as local:
            res = SplitResolver(
                smart_router(),
                local=[Upstream("127.0.0.1", local.port)],
                clock=lambda: now[0],
            )
            first = await res.resolve("a.direct.test")
            assert len(local.queries) == 2
            again = await res.resolve("A.Direct.Test.")
            assert again.source == "cache" and again.addresses == first.addresses
            assert again.ttl == 60
            assert len(local.queries) == 2
            now[0] += 61
            await res.resolve("a.direct.test")
            assert len(local.queries) == 4

    run(main())


def test_negative_answers_are_cached_for_the_soa_minimum() -> None:
    now = [0.0]

    async def main() -> None:
        async with dns_server(nxdomain={"gone.direct.test"}, negative_ttl=30) as local:
            res = SplitResolver(
                smart_router(), local=[Upstream("127.0.0.1", local.port)], clock=lambda: now[0]
            )
            for _ in range(3):
                with pytest.raises(ResolveError, match="NXDOMAIN"):
                    await res.resolve("gone.direct.test")
            assert len(local.queries) == 2  # A and AAAA, once
            now[0] += 31
            with pytest.raises(ResolveError):
                await res.resolve("gone.direct.test")
            assert len(local.queries) == 4

    run(main())


def test_negative_ttl_is_bounded() -> None:
    cache = DnsCache(max_negative_ttl=300)
    from autovpn.routing.dns_cache import Outcome

    entry = cache.put_negative("x.test", "A", Outcome.NXDOMAIN, 86_400, 0.0, "local")
    assert entry.expires == 300


def test_nodata_for_one_family_still_resolves() -> None:
    async def main() -> None:
        zone = {"v6.direct.test": ["::1"], "both.direct.test": ["127.0.0.5", "::1"]}
        async with dns_server(zone=zone) as local:
            res = SplitResolver(smart_router(), local=[Upstream("127.0.0.1", local.port)])
            assert (await res.resolve("v6.direct.test")).addresses == ("::1",)
            both = await res.resolve("both.direct.test")
            assert both.addresses == ("::1", "127.0.0.5")  # IPv6 first
            assert both.outcomes == {"AAAA": "ok", "A": "ok"}

    run(main())


def test_concurrent_lookups_of_one_name_share_one_query() -> None:
    async def main() -> None:
        async with dns_server(latency=0.05) as local:
            res = SplitResolver(smart_router(), local=[Upstream("127.0.0.1", local.port)])
            results = await asyncio.gather(*(res.resolve("a.direct.test") for _ in range(20)))
            assert {r.addresses for r in results} == {("127.0.0.2",)}
            assert len(local.queries) == 2

    run(main())


def test_a_cancelled_waiter_does_not_cancel_the_lookup() -> None:
    async def main() -> None:
        async with dns_server(latency=0.05) as local:
            res = SplitResolver(smart_router(), local=[Upstream("127.0.0.1", local.port)])
            leader = asyncio.ensure_future(res.resolve("a.direct.test"))
            await asyncio.sleep(0.01)
            waiter = asyncio.ensure_future(res.resolve("a.direct.test"))
            await asyncio.sleep(0.01)
            waiter.cancel()
            assert (await leader).addresses == ("127.0.0.2",)
            with pytest.raises(asyncio.CancelledError):
                await waiter

    run(main())


def test_truncated_udp_answers_are_retried_over_tcp() -> None:
    async def main() -> None:
        async with dns_server(truncate_udp=True) as local:
            res = SplitResolver(smart_router(), local=[Upstream("127.0.0.1", local.port)])
            assert (await res.resolve("a.direct.test")).addresses == ("127.0.0.2",)
            assert {q.transport for q in local.queries} == {"udp", "tcp"}

    run(main())


def test_hosts_file_answers_before_any_resolver(certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            res = r.resolver(
                smart_router(), hosts={"www.proxied.test": ["127.0.0.9"], "Pinned.Test": ["::1"]}
            )
            got = await res.resolve("www.proxied.test")
            assert got.addresses == ("127.0.0.9",) and got.source == "hosts"
            assert (await res.resolve("pinned.test")).addresses == ("::1",)
            assert r.local.queries == [] and r.public.queries == []

    run(main())


def test_literals_and_rejects_make_no_query() -> None:
    async def main() -> None:
        async with dns_server() as local:
            router = Router.from_config(rules=["keyword:ads=reject"], default_lists=False)
            res = SplitResolver(router, local=[Upstream("127.0.0.1", local.port)])
            assert (await res.resolve("[::1]")).addresses == ("::1",)
            with pytest.raises(ResolveError, match="reject"):
                await res.resolve("ads.example")
            assert local.queries == []

    run(main())


def test_plan_explains_without_querying() -> None:
    res = SplitResolver(smart_router(), local=[Upstream("127.0.0.1", 5353)])
    assert res.plan("www.proxied.test")[0] == "public"
    assert "needs the tunnel" in res.plan("www.proxied.test")[2]
    assert res.plan("a.direct.test")[0] == "local"
    assert "127.0.0.1:5353" in res.plan("a.direct.test")[2]
    assert res.plan("127.0.0.1")[0] == "literal"


def test_upstream_parse() -> None:
    assert Upstream.parse("8.8.8.8") == Upstream("8.8.8.8", 53)
    assert Upstream.parse("127.0.0.1:5353") == Upstream("127.0.0.1", 5353)
    assert Upstream.parse("[::1]:53") == Upstream("::1", 53)
    assert Upstream.parse("2001:db8::1") == Upstream("2001:db8::1", 53)
    with pytest.raises(ValueError, match="IP address"):
        Upstream.parse("dns.google")


def test_default_proxy_list_batch_through_the_tunnel_with_50ms_latency(certs: Certs) -> None:
    """~335 names, 50 ms per answer, 50 in flight: well under a second when it works.  The
    assertion is only a hang guard; the measured figure is printed (pytest -s)."""
    names = sorted({r.value.lstrip(".") for r in load_default_lists().proxy.rules})
    assert len(names) >= 290

    async def main() -> None:
        async with rig(certs, public_latency=0.05) as r:
            res = r.resolver(Router.from_config(mode=Mode.SMART))
            done: list[str] = []
            start = time.perf_counter()
            results = await res.resolve_many(
                names, concurrency=50, progress=lambda n, _: done.append(n)
            )
            elapsed = time.perf_counter() - start
            print(f"\nbatch: {len(names)} proxied names, 50 ms latency: {elapsed:.3f} s")
            assert elapsed < 5.0
            assert len(done) == len(names)
            assert all(not isinstance(v, Exception) for v in results.values())
            assert r.local.queries == []
            assert r.public.names() == set(names)
            # A second pass is all cache: no query at all.
            before = len(r.public.queries)
            await res.resolve_many(names)
            assert len(r.public.queries) == before

    run(main())
