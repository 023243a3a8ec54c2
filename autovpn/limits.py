"""Named limits on what one peer may hold, and the per-address connection count.

Every bound an attacker meets is a named constant with a default, configurable where an operator
would want to change it; THREAT_MODEL.md lists them all (these and the parsers' own: header
sizes in ``wire/http1.py``, frame sizes in ``wire/frames.py``, handshake timers, windows).

The defaults leave room for real use (a browser opens a few hundred connections at most; a
wstunnel client opens one connection per tunnelled stream) and bound what one peer costs:
a tunnel connection's buffered bytes are at most ``MAX_STREAMS_PER_CONNECTION`` stream windows.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Final, Protocol

__all__ = [
    "LISTENER_MAX_CONNECTIONS_PER_ADDRESS",
    "MAX_PENDING_OPENS",
    "MAX_STREAMS_PER_CONNECTION",
    "SERVER_MAX_CONNECTIONS_PER_ADDRESS",
    "ConnectionsPerAddress",
    "address_key",
    "peer_key",
]

log = logging.getLogger("autovpn.limits")

#: Streams one tunnel connection may have open at once, in both directions
#: (``[server] max_streams_per_connection``); an OPEN past it is refused with REFUSED_STREAM.
#: Each stream may buffer one window (``DEFAULT_WINDOW``, 1 MiB) on the server.
MAX_STREAMS_PER_CONNECTION: Final = 1024
#: Streams of one tunnel connection whose target the server is still resolving or dialling
#: (``[server] max_pending_opens``): each is a task and a socket for up to the connect timeout.
#: 256 refused some of 500 streams opened at once on the plain asyncio loop (slower dials).
MAX_PENDING_OPENS: Final = 512
#: TCP connections one client address may hold on the tunnel server, in its handshake or
#: after (``[server] max_connections_per_address``): native tunnel connections and wstunnel
#: tunnels (one connection each) alike.
SERVER_MAX_CONNECTIONS_PER_ADDRESS: Final = 512
#: TCP connections one client address may hold on a SOCKS5 or HTTP listener
#: (``[client] max_connections_per_address``).  On loopback every local program shares one
#: address, so this is also the listener's total there.
LISTENER_MAX_CONNECTIONS_PER_ADDRESS: Final = 1024
#: Entries of closed connections are dropped every this many admissions (and whenever an
#: address reaches its limit), so the table holds the live connections and at most this many
#: dead ones.
_PRUNE_EVERY: Final = 256


def address_key(address: str) -> str:
    """What a connection counts against: its IPv4 address, or its IPv6 /64 (one host usually
    holds a whole /64: counted by single address, it would have 2**64 limits)."""
    if ":" not in address:
        return address  # IPv4, as the socket gives it
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


def peer_key(peer: str) -> str:
    """``address_key`` of a peer given as ``host:port`` (how the tunnel server names them)."""
    return address_key(peer.rpartition(":")[0] or peer)


class Closable(Protocol):
    """A transport, as far as the count needs one (asyncio's, uvloop's or an SSL one)."""

    def is_closing(self) -> bool: ...


class ConnectionsPerAddress:
    """The connections each client address holds, refused past ``limit``.

    ``admit`` at accept time; ``release`` when the connection ends.  A connection whose owner
    cannot call ``release`` (a listener hands its socket to a relay that knows nothing of
    this) is dropped once its transport is closing: entries are checked whenever an address
    reaches its limit, and all of them every ``_PRUNE_EVERY`` admissions.  So the count is
    exact when it matters, the moment a connection would be refused.
    """

    def __init__(self, limit: int, key: str) -> None:
        self.limit = limit
        self.key = key  # the config key that sets the limit, named in the log line
        self.refused = 0
        self._held: dict[str, dict[Closable, None]] = {}  # address -> its transports
        self._address: dict[Closable, str] = {}
        self._admitted = 0
        self._warned: set[str] = set()  # addresses at their limit, already logged

    def __len__(self) -> int:
        return len(self._address)

    def count(self, address: str) -> int:
        address = address_key(address)
        held = self._held.get(address)
        if held is None:
            return 0
        self._prune(address, held)
        return len(held)

    def admit(self, transport: Closable, address: str) -> bool:
        """Count ``transport`` for ``address`` (its /64 for IPv6); False (and nothing
        counted) past the limit."""
        address = address_key(address)
        held = self._held.get(address)
        if held is not None and len(held) >= self.limit:
            self._prune(address, held)
            if len(held) >= self.limit:
                self.refused += 1
                if address not in self._warned:
                    # Once per episode: an attack must not turn into one log line per connect.
                    self._warned.add(address)
                    log.warning(
                        "%s holds %d connections, the limit (%s); refusing more from it",
                        address,
                        len(held),
                        self.key,
                    )
                return False
        # (Pruning may have emptied the address's table and dropped it: fetch it again.)
        self._held.setdefault(address, {})[transport] = None
        self._address[transport] = address
        self._admitted += 1
        if self._admitted % _PRUNE_EVERY == 0:
            self.prune()
        return True

    def release(self, transport: Closable) -> None:
        """``transport``'s connection ended (idempotent)."""
        address = self._address.pop(transport, None)
        if address is None:
            return
        held = self._held[address]
        held.pop(transport, None)
        if len(held) < self.limit:
            self._warned.discard(address)
        if not held:
            del self._held[address]

    def replace(self, old: Closable, new: Closable) -> None:
        """``old``'s connection goes on as ``new`` (the TLS transport over the accepted TCP
        one): still counted once, now released (or pruned) by ``new``."""
        address = self._address.pop(old, None)
        if address is None:
            return
        held = self._held[address]
        held.pop(old, None)
        held[new] = None
        self._address[new] = address

    def releaser(self, transport: Closable) -> Callable[[], None]:
        """``release(transport)`` as a one-shot callable for the connection's next owner, which
        forgets the transport once called: a callback kept by a protocol must not hold its
        transport (transport, SSL layer and protocol would stay in a cycle with their buffers
        until the cyclic GC)."""
        held: list[Closable] = [transport]

        def release() -> None:
            if held:
                self.release(held.pop())

        return release

    def prune(self) -> int:
        """Forget every connection whose transport is closing; how many were forgotten."""
        before = len(self._address)
        for address, held in list(self._held.items()):
            self._prune(address, held)
        return before - len(self._address)

    def _prune(self, address: str, held: dict[Closable, None]) -> None:
        for transport in [t for t in held if t.is_closing()]:
            self.release(transport)
