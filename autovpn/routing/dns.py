"""Split DNS: direct names resolve locally, proxied names through the tunnel, never both.

Order for every name (the order the product promises): IP literal -> cache -> hosts file ->
routing decision -> DNS.

* The routing decision picks the upstream group.  DIRECT names go to the *local* resolvers:
  the configured servers, or the system's (``/etc/resolv.conf`` read by dnspython), over UDP with
  the TCP retry on truncation (``dns.asyncquery.udp_with_fallback``).  PROXY names go to the
  *public* resolvers (default 8.8.8.8 and 1.1.1.1) with DNS over TCP (RFC 7766) inside a tunnel
  stream: the tunnel server opens ``resolver:53`` and the query never touches the local link.
  A proxied name is **never** sent to a local resolver, not even as a fallback when the tunnel
  is down: that query is exactly the leak split routing exists to prevent (DNS leak tests
  look for precisely that query).  REJECT names are not resolved at all.
* Both families are asked at once (A and AAAA), each cached on its own TTL
  (``dns_cache.DnsCache``), negative answers included.  For the tunnel path the two queries
  share one stream, pipelined and matched by message id (RFC 7766 section 6.2.1.1).
* Concurrent requests for the same name share one lookup: the first caller runs it, the rest
  await its future (``asyncio.shield``, so a cancelled waiter does not cancel the others; if the
  leader is cancelled the waiters retry).
* ``resolve_many`` resolves a batch with at most ``concurrency`` names in flight: a fixed set of
  worker tasks in one TaskGroup pull names from a shared iterator, so memory stays flat for any
  batch size.

The tunnel is reached through an injectable ``StreamOpener`` (``TunnelClient.open_socket_stream``
in production); tests point it at a loopback DNS server through a real tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from autovpn.errors import ResetReason, StreamError

from .dns_cache import CacheEntry, DnsCache, Outcome
from .router import Action, Decision, Router
from .rules import normalize_host, parse_ip
from .upstream import Upstream

__all__ = [
    "DEFAULT_PUBLIC",
    "Resolution",
    "ResolveError",
    "SplitResolver",
    "StreamOpener",
]

log = logging.getLogger("autovpn.dns")

StreamOpener = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens a TCP stream to ``(host, port)`` through the tunnel (the server connects)."""

MAX_DNS_TCP_MESSAGE = 65_535  # RFC 1035 section 4.2.2: a two-byte length prefix
_LEN = struct.Struct("!H")
_TYPES = (("AAAA", dns.rdatatype.AAAA), ("A", dns.rdatatype.A))  # IPv6 first (RFC 6724)


DEFAULT_PUBLIC = (Upstream("8.8.8.8"), Upstream("1.1.1.1"))


class ResolveError(StreamError):
    """No address for a name (NXDOMAIN, no records, every upstream failed, or refused)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(ResetReason.HOST_UNREACHABLE, f"{name}: {message}")
        self.name = name


class _UpstreamFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Resolution:
    name: str
    addresses: tuple[str, ...]  # IPv6 first, then IPv4, each in the server's order
    source: str  # "literal", "hosts", "cache", "local", "public" (the first answer's)
    upstream: str  # "local", "public" or "" (literal, hosts)
    decision: Decision | None = None
    ttl: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # rdtype -> ok/nodata/nxdomain

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "addresses": list(self.addresses),
            "source": self.source,
            "upstream": self.upstream,
            "ttl": self.ttl,
            "outcomes": dict(self.outcomes),
        }


class SplitResolver:
    """See the module docstring.  ``local=None`` means the system's resolvers."""

    def __init__(
        self,
        router: Router,
        *,
        local: Sequence[Upstream] | None = None,
        public: Sequence[Upstream] = DEFAULT_PUBLIC,
        opener: StreamOpener | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        cache: DnsCache | None = None,
        timeout: float = 5.0,
        concurrency: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self._local = list(local) if local is not None else None
        self.public = list(public)
        self.opener = opener
        self.hosts = {normalize_host(k): list(v) for k, v in (hosts or {}).items()}
        self.cache = cache if cache is not None else DnsCache()
        self.timeout = timeout
        self.concurrency = concurrency
        self.clock = clock
        self._inflight: dict[str, asyncio.Future[Resolution]] = {}
        self.queries = {"local": 0, "public": 0}

    @property
    def local(self) -> list[Upstream]:
        """The local resolvers: configured, or the system's (read on first use)."""
        if self._local is None:
            try:
                system = dns.resolver.Resolver(configure=True)
                self._local = [Upstream(str(ns)) for ns in system.nameservers]
            except (dns.resolver.NoResolverConfiguration, OSError, ValueError) as exc:
                log.warning("no system DNS configuration (%s); direct names cannot resolve", exc)
                self._local = []
        return self._local

    def plan(self, host: str, port: int = 443) -> tuple[str, Decision | None, str]:
        """Which path a lookup of ``host`` takes, without doing it: ``(upstream, decision,
        explanation)`` with upstream "literal", "hosts", "local", "public" or "none"."""
        h = normalize_host(host)
        if parse_ip(h) is not None:
            return "literal", None, "an IP literal: nothing to resolve"
        if h in self.hosts:
            return "hosts", None, "hosts file: " + ", ".join(self.hosts[h])
        d = self.router.decide(h, port)
        if d.action is Action.PROXY:
            servers = ", ".join(map(str, self.public)) or "none configured"
            via = "through the tunnel" if self.opener else "needs the tunnel (not connected)"
            return "public", d, f"public resolvers {servers} (DNS over TCP {via})"
        if d.action is Action.DIRECT:
            servers = ", ".join(map(str, self.local)) or "none"
            src = "configured" if self._local is not None else "system"
            return "local", d, f"local resolvers ({src}) {servers}"
        return "none", d, "rejected by routing: not resolved"

    # -- one name ---------------------------------------------------------------------------

    async def resolve(self, host: str, port: int = 443) -> Resolution:
        """The addresses of ``host``; raises ``ResolveError`` when there are none."""
        h = normalize_host(host)
        if parse_ip(h) is not None:
            return Resolution(h, (h,), "literal", "")
        while True:
            fut = self._inflight.get(h)
            if fut is None:
                break
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The leader was cancelled, not us: try again (perhaps as the leader).
        fut = asyncio.get_running_loop().create_future()
        self._inflight[h] = fut
        try:
            result = await self._resolve(h, port)
        except BaseException as exc:
            if isinstance(exc, Exception):
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, and none may be waiting
            else:
                fut.cancel()
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._inflight[h]

    async def _resolve(self, h: str, port: int) -> Resolution:
        now = self.clock()
        cached: dict[str, CacheEntry] = {}
        for name, _ in _TYPES:
            entry = self.cache.get(h, name, now)
            if entry is not None:
                cached[name] = entry
        if len(cached) == len(_TYPES):
            return self._combine(h, cached, "cache", None, now)
        pinned = self.hosts.get(h)
        if pinned:
            return Resolution(h, tuple(pinned), "hosts", "")
        decision = self.router.decide(h, port)
        if decision.action is Action.REJECT:
            raise ResolveError(h, f"rejected by routing, not resolved: {decision.reason}")
        upstream = "public" if decision.action is Action.PROXY else "local"
        missing = [(n, t) for n, t in _TYPES if n not in cached]
        try:
            qname = dns.name.from_text(h)
        except dns.exception.DNSException as exc:
            raise ResolveError(h, f"not a valid DNS name: {exc}") from None
        queries = [dns.message.make_query(qname, t) for _, t in missing]
        if upstream == "public":
            responses = await self._query_public(h, queries)
        else:
            responses = await self._query_local(h, queries)
        now = self.clock()
        for (name, _), response in zip(missing, responses, strict=True):
            cached[name] = self._store(h, name, response, now, upstream)
        return self._combine(h, cached, upstream, decision, now)

    def _store(
        self, h: str, rdtype: str, response: dns.message.Message, now: float, upstream: str
    ) -> CacheEntry:
        rcode = response.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise ResolveError(h, f"{upstream} resolver answered {dns.rcode.to_text(rcode)}")
        try:
            chain = response.resolve_chaining()  # type: ignore[attr-defined]
        except dns.exception.DNSException as exc:
            raise ResolveError(h, f"bad answer from the {upstream} resolver: {exc}") from None
        if chain.answer is not None:
            addrs = tuple(r.address for r in chain.answer)
            return self.cache.put_answer(h, rdtype, addrs, chain.minimum_ttl, now, upstream)
        outcome = Outcome.NXDOMAIN if rcode == dns.rcode.NXDOMAIN else Outcome.NODATA
        return self.cache.put_negative(h, rdtype, outcome, chain.minimum_ttl, now, upstream)

    def _combine(
        self,
        h: str,
        entries: dict[str, CacheEntry],
        source: str,
        decision: Decision | None,
        now: float,
    ) -> Resolution:
        addrs = tuple(a for name, _ in _TYPES for a in entries[name].addresses)
        outcomes = {name: entries[name].outcome.value for name, _ in _TYPES}
        if not addrs:
            nx = any(e.outcome is Outcome.NXDOMAIN for e in entries.values())
            raise ResolveError(h, "no such domain (NXDOMAIN)" if nx else "no A/AAAA records")
        live = [e for e in entries.values() if e.addresses]
        upstream = next(iter(entries.values())).upstream
        return Resolution(
            h,
            addrs,
            source,
            upstream,
            decision,
            min(e.ttl(now) for e in live),
            outcomes,
        )

    # -- the two paths ----------------------------------------------------------------------

    async def _query_local(
        self, h: str, queries: Sequence[dns.message.Message]
    ) -> list[dns.message.Message]:
        servers = self.local
        if not servers:
            raise ResolveError(h, "no local DNS server")
        self.queries["local"] += len(queries)
        return list(await asyncio.gather(*(self._local_one(h, q, servers) for q in queries)))

    async def _local_one(
        self, h: str, q: dns.message.Message, servers: list[Upstream]
    ) -> dns.message.Message:
        errors = []
        for server in servers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    q, server.host, timeout=self.timeout, port=server.port
                )
                return response
            except (dns.exception.DNSException, OSError, EOFError) as exc:
                errors.append(f"{server}: {exc or type(exc).__name__}")
        raise ResolveError(h, "local resolvers failed: " + "; ".join(errors))

    async def _query_public(
        self, h: str, queries: Sequence[dns.message.Message]
    ) -> list[dns.message.Message]:
        if self.opener is None:
            # Never fall back to the local resolvers: that query would leak the name.
            raise ResolveError(h, "proxied name and no tunnel: not resolved locally")
        if not self.public:
            raise ResolveError(h, "no public DNS server configured")
        self.queries["public"] += len(queries)
        errors = []
        for server in self.public:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._exchange_tcp(server, queries)
            except (_UpstreamFailed, StreamError, OSError, TimeoutError, EOFError) as exc:
                errors.append(f"{server}: {str(exc) or type(exc).__name__}")
            except asyncio.IncompleteReadError:
                errors.append(f"{server}: connection closed mid-answer")
        raise ResolveError(h, "public resolvers failed: " + "; ".join(errors))

    async def _exchange_tcp(
        self, server: Upstream, queries: Sequence[dns.message.Message]
    ) -> list[dns.message.Message]:
        """Send every query on one tunnel stream (pipelined) and match answers by id."""
        assert self.opener is not None
        reader, writer = await self.opener(server.host, server.port)
        try:
            by_id: dict[int, dns.message.Message] = {}
            for q in queries:
                wire = q.to_wire()
                writer.write(_LEN.pack(len(wire)) + wire)
                by_id[q.id] = q
            await writer.drain()
            answers: dict[int, dns.message.Message] = {}
            while len(answers) < len(queries):
                (length,) = _LEN.unpack(await reader.readexactly(2))
                wire = await reader.readexactly(length)
                try:
                    response = dns.message.from_wire(wire)
                except dns.exception.DNSException as exc:
                    raise _UpstreamFailed(f"unparsable answer: {exc}") from None
                asked = by_id.get(response.id)
                if asked is None or not asked.is_response(response):
                    raise _UpstreamFailed("answer does not match a query")
                answers[response.id] = response
            return [answers[q.id] for q in queries]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- batches ----------------------------------------------------------------------------

    async def resolve_many(
        self,
        names: Iterable[str],
        *,
        concurrency: int | None = None,
        progress: Callable[[str, Resolution | ResolveError], Awaitable[None] | None] | None = None,
    ) -> dict[str, Resolution | ResolveError]:
        """Resolve every name, at most ``concurrency`` (default ``self.concurrency``) in
        flight.  Failures are returned, not raised; ``progress`` is called once per name, and
        when it returns an awaitable the worker awaits it (so a slow consumer, such as a
        client reading the streamed ``/resolve`` answer, slows the batch instead of buffering
        its results without bound)."""
        results: dict[str, Resolution | ResolveError] = {}
        todo = iter(dict.fromkeys(names))

        async def worker() -> None:
            for name in todo:
                try:
                    r: Resolution | ResolveError = await self.resolve(name)
                except ResolveError as exc:
                    r = exc
                results[name] = r
                if progress is not None:
                    pending = progress(name, r)
                    if pending is not None:
                        await pending

        n = max(1, concurrency or self.concurrency)
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                tg.create_task(worker(), name=f"dns-batch-{i}")
        return results
