"""The DNS cache: TTL-respecting, with negative caching, bounded in size.  Pure: the caller
passes the time (``now``, seconds on any monotonic clock), so tests need no sleeping.

Entries are keyed by (name, record type).  A positive entry lives for the answer's TTL, clamped
to ``[min_ttl, max_ttl]``; a negative one (NXDOMAIN, or NOERROR with no records of that type)
for the SOA minimum the server sent (RFC 2308 section 5), clamped to ``max_negative_ttl`` so a
misconfigured zone cannot pin a failure for days, and to ``default_negative_ttl`` when the
server sent no SOA.  Leak-test sites probe random names: without negative caching every probe
would be a new query.

The cache holds at most ``max_entries``; past that the least recently used entry goes (an
``OrderedDict`` moved-to-end on every hit, O(1)).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["CacheEntry", "DnsCache", "Outcome"]


class Outcome(enum.Enum):
    OK = "ok"  # addresses found
    NODATA = "nodata"  # the name exists, no records of this type (RFC 2308 section 2.2)
    NXDOMAIN = "nxdomain"  # the name does not exist (RFC 2308 section 2.1)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    outcome: Outcome
    addresses: tuple[str, ...]
    expires: float
    upstream: str  # which resolver group answered: "local", "public"

    def ttl(self, now: float) -> int:
        return max(0, int(self.expires - now))


class DnsCache:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        min_ttl: float = 5.0,
        max_ttl: float = 86_400.0,
        max_negative_ttl: float = 300.0,
        default_negative_ttl: float = 30.0,
    ) -> None:
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.default_negative_ttl = default_negative_ttl
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, rdtype: str, now: float) -> CacheEntry | None:
        """The live entry for ``name``/``rdtype`` (``name`` normalised by the caller), or None."""
        key = (name, rdtype)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= now:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put_answer(
        self,
        name: str,
        rdtype: str,
        addresses: tuple[str, ...],
        ttl: float,
        now: float,
        upstream: str,
    ) -> CacheEntry:
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        return self._put(name, rdtype, CacheEntry(Outcome.OK, addresses, now + ttl, upstream))

    def put_negative(
        self,
        name: str,
        rdtype: str,
        outcome: Outcome,
        soa_minimum: float | None,
        now: float,
        upstream: str,
    ) -> CacheEntry:
        ttl = self.default_negative_ttl if soa_minimum is None else soa_minimum
        ttl = min(max(ttl, 0.0), self.max_negative_ttl)
        return self._put(name, rdtype, CacheEntry(outcome, (), now + ttl, upstream))

    def _put(self, name: str, rdtype: str, entry: CacheEntry) -> CacheEntry:
        key = (name, rdtype)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()
