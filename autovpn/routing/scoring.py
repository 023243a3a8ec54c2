"""IP scoring: per-address connect statistics, candidate ordering, and their JSON file.

Pure apart from reading and writing the history file: no asyncio or sockets, and the time is
passed in (``now``, wall-clock seconds, since history survives restarts).

Theory of operation.  When a name has several addresses the dialer asks ``ScoreBook.order`` for
the order to try them in, then reports each attempt (``record_success(addr, rtt, now)`` /
``record_failure(addr, now)``).  The score, higher is better, in (0, 100]::

    p      = (successes + 1) / (attempts + 2)          # success rate, Laplace-smoothed
    rtt    = RTT moving average in ms (EWMA, alpha 0.3); 100 ms while unknown
    recent = consecutive failures, halved every ``failure_half_life`` seconds since the last
    score  = 100 * p / (1 + rtt / 100) / (1 + recent)

so an unknown address scores 25, a fast reliable one approaches 100, and one that just failed
three times drops below a fresh one but recovers as time passes (a backup that keeps failing is
not tried first forever, and one that failed once an hour ago is forgiven).

``order`` sorts by score (stable: equal scores keep the resolver's order, which lists IPv6
first, RFC 6724) and then interleaves the address families as RFC 8305 section 4 asks: the
family of the best address first, then alternating, so one broken family costs one
attempt delay, not a whole list of timeouts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AddressStats", "ScoreBook", "interleave_families"]

RTT_ALPHA = 0.3
UNKNOWN_RTT_MS = 100.0
SCORES_FILE = "ip-scores.json"
FILE_VERSION = 1


@dataclass(slots=True)
class AddressStats:
    attempts: int = 0
    successes: int = 0
    rtt_ms: float | None = None  # EWMA of successful connect times
    consecutive_failures: int = 0
    last_failure: float = 0.0
    last_used: float = 0.0
    country: str | None = None

    @property
    def success_rate(self) -> float:
        return (self.successes + 1) / (self.attempts + 2)

    def to_json(self) -> dict[str, object]:
        return {
            "attempts": self.attempts,
            "successes": self.successes,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "consecutive_failures": self.consecutive_failures,
            "last_failure": self.last_failure,
            "last_used": self.last_used,
            "country": self.country,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> AddressStats:
        def num(key: str) -> float:
            v = data.get(key, 0)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{key}: not a number")
            return float(v)

        rtt = data.get("rtt_ms")
        country = data.get("country")
        s = cls(
            attempts=int(num("attempts")),
            successes=int(num("successes")),
            rtt_ms=None if rtt is None else num("rtt_ms"),
            consecutive_failures=int(num("consecutive_failures")),
            last_failure=num("last_failure"),
            last_used=num("last_used"),
            country=country if isinstance(country, str) else None,
        )
        if not 0 <= s.successes <= s.attempts or s.consecutive_failures < 0:
            raise ValueError("inconsistent counts")
        return s


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def interleave_families(addresses: Sequence[str]) -> list[str]:
    """RFC 8305 section 4: keep each family's order, start with the first address's family,
    then alternate (the "First Address Family Count" is 1)."""
    if not addresses:
        return []
    first = _family(addresses[0])
    a = [x for x in addresses if _family(x) == first]
    b = [x for x in addresses if _family(x) != first]
    out: list[str] = []
    for i in range(max(len(a), len(b))):
        if i < len(a):
            out.append(a[i])
        if i < len(b):
            out.append(b[i])
    return out


class ScoreBook:
    """Statistics for every address the dialer has tried, bounded to ``max_addresses``
    (the least recently used go first)."""

    def __init__(
        self,
        *,
        geo: Callable[[str], str | None] | None = None,
        failure_half_life: float = 60.0,
        max_addresses: int = 4096,
    ) -> None:
        self.geo = geo
        self.failure_half_life = failure_half_life
        self.max_addresses = max_addresses
        self.stats: dict[str, AddressStats] = {}

    def get(self, address: str) -> AddressStats:
        s = self.stats.get(address)
        if s is None:
            s = self.stats[address] = AddressStats()
            if self.geo is not None:
                s.country = self.geo(address)
            self._trim(keep=address)
        return s

    def _trim(self, keep: str = "") -> None:
        if len(self.stats) <= self.max_addresses:
            return
        by_age = sorted(
            (kv for kv in self.stats.items() if kv[0] != keep), key=lambda kv: kv[1].last_used
        )
        for addr, _ in by_age[: len(self.stats) - self.max_addresses]:
            del self.stats[addr]

    def record_success(self, address: str, rtt: float, now: float) -> None:
        """A connect to ``address`` took ``rtt`` seconds."""
        s = self.get(address)
        s.attempts += 1
        s.successes += 1
        ms = rtt * 1000.0
        s.rtt_ms = ms if s.rtt_ms is None else s.rtt_ms + RTT_ALPHA * (ms - s.rtt_ms)
        s.consecutive_failures = 0
        s.last_used = now

    def record_failure(self, address: str, now: float) -> None:
        s = self.get(address)
        s.attempts += 1
        s.consecutive_failures += 1
        s.last_failure = now
        s.last_used = now

    def score(self, address: str, now: float) -> float:
        s = self.stats.get(address)
        if s is None:
            return 100.0 * 0.5 / (1 + UNKNOWN_RTT_MS / 100.0)
        rtt = UNKNOWN_RTT_MS if s.rtt_ms is None else s.rtt_ms
        recent = 0.0
        if s.consecutive_failures:
            age = max(0.0, now - s.last_failure)
            recent = s.consecutive_failures * 0.5 ** (age / self.failure_half_life)
        return 100.0 * s.success_rate / (1.0 + rtt / 100.0) / (1.0 + recent)

    def order(self, addresses: Iterable[str], now: float) -> list[str]:
        """The order to try ``addresses`` in: by score, then families interleaved."""
        unique = list(dict.fromkeys(addresses))
        ranked = sorted(unique, key=lambda a: -self.score(a, now))  # stable
        return interleave_families(ranked)

    def describe(self, address: str, now: float) -> dict[str, object]:
        """What ``autovpn route --resolve`` shows for one address."""
        s = self.stats.get(address)
        out: dict[str, object] = {"address": address, "score": round(self.score(address, now), 2)}
        if s is None:
            out.update(attempts=0, successes=0, rtt_ms=None, recent_failures=0, country=None)
            if self.geo is not None:
                out["country"] = self.geo(address)
        else:
            out.update(
                attempts=s.attempts,
                successes=s.successes,
                rtt_ms=None if s.rtt_ms is None else round(s.rtt_ms, 2),
                recent_failures=s.consecutive_failures,
                country=s.country,
            )
        return out

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        return {
            "version": FILE_VERSION,
            "addresses": {a: s.to_json() for a, s in self.stats.items()},
        }

    def load_json(self, data: object) -> int:
        """Merge a saved history; returns how many entries were usable (bad ones are skipped)."""
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
            return 0
        addresses = data.get("addresses")
        if not isinstance(addresses, dict):
            return 0
        n = 0
        for addr, entry in addresses.items():
            if not isinstance(addr, str) or not isinstance(entry, dict):
                continue
            try:
                self.stats[addr] = AddressStats.from_json(entry)
            except (ValueError, TypeError):
                continue
            n += 1
        self._trim()
        return n

    def save(self, path: Path) -> None:
        """Write the history atomically (a crash mid-write leaves the old file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)

    def load(self, path: Path) -> int:
        """Read a history written by ``save``; a missing or corrupt file counts as empty."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                if path.exists():
                    path.replace(path.with_name(path.name + ".corrupt"))
            return 0
        return self.load_json(data)
