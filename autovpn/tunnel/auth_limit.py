"""Authentication failures per source address: past a limit, an address is refused at once.

Pure (the caller passes the clock).  The tunnel server counts every failed authentication of
either protocol (a native request with no or wrong credentials, a wrong AUTH frame, a wstunnel
request with no secret prefix, no client certificate and no matching restriction); once an
address has ``limit`` failures within ``window`` seconds, its next requests are refused for
``window`` seconds before anything is parsed or compared, so a guesser gets ``limit`` tries a
window and costs the server no MAC or secret comparison meanwhile.

Memory is bounded: at most ``max_addresses`` entries; entries whose window and block are over
are dropped first, then the least recently failed.  An IPv6 client is counted by its /64 (one
host usually holds a whole /64, so counting single addresses would give it 2**64 windows).

The address is the TCP peer's, never X-Forwarded-For (the client writes that itself): behind
a reverse proxy every client shares the proxy's address, so raise the limit there or set it
to 0 (off).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from autovpn.config import DEFAULT_AUTH_FAILURE_LIMIT, DEFAULT_AUTH_FAILURE_WINDOW

#: Addresses remembered at most (about 100 bytes each).
MAX_ADDRESSES: Final = 10_000


@dataclass(slots=True)
class _Entry:
    start: float  # the first failure of the current window
    count: int
    until: float  # refused until then (0: not refused)


def address_key(address: str) -> str:
    """What failures are counted against: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class AuthFailureLimiter:
    """``blocked(address, now)`` before authenticating; ``failed(address, now)`` after a
    failure.  ``limit`` 0 turns it off."""

    def __init__(
        self,
        limit: int = DEFAULT_AUTH_FAILURE_LIMIT,
        window: float = DEFAULT_AUTH_FAILURE_WINDOW,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.window = window
        self._max = max_addresses
        self._table: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def blocked(self, address: str, now: float) -> float:
        """Seconds ``address`` is still refused for (0.0: go ahead and authenticate it)."""
        if self.limit <= 0:
            return 0.0
        entry = self._table.get(address_key(address))
        if entry is None or entry.until <= now:
            return 0.0
        return entry.until - now

    def failed(self, address: str, now: float) -> bool:
        """Count a failure; True when it is the one that reached the limit (log it once)."""
        if self.limit <= 0:
            return False
        self._prune(now)
        key = address_key(address)
        entry = self._table.pop(key, None)
        if entry is None or (now - entry.start > self.window and entry.until <= now):
            entry = _Entry(now, 0, 0.0)
        entry.count += 1
        self._table[key] = entry  # the most recently failed go last
        if entry.count >= self.limit and entry.until <= now:
            entry.until = now + self.window
            return True
        return False

    def _prune(self, now: float) -> None:
        table = self._table
        while table:
            entry = next(iter(table.values()))
            if now - entry.start <= self.window or entry.until > now:
                break
            table.popitem(last=False)
        while len(table) >= self._max:
            table.popitem(last=False)
