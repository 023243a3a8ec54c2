"""The tunnel server's destination policy: which targets a tunnel client may reach.

By default the server refuses loopback, private, link-local, CGNAT, multicast and unspecified
destinations, and the addresses of the server host itself (a service bound on 0.0.0.0 answers on
the public address too), so a tunnel client cannot use the server to reach the server's own
network (SSRF).  The check runs on the *resolved* addresses, so a name that resolves to
127.0.0.1 is refused like the literal, and on every IPv4 address an IPv6 one carries (mapped,
translated, compatible, NAT64, 6to4, Teredo), so ``::ffff:7f00:1`` is refused like 127.0.0.1.
``--allow`` entries open holes: a CIDR, an IP, or a host name, each with an optional port.

Sans-I/O: the host's own addresses come from a function the I/O layer passes in
(``autovpn.ifaddrs.HostAddresses``, which reads the interfaces).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from autovpn.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED_BY_DEFAULT: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
        # Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the prefix length
        # the operator chose (RFC 6052: /48 to /96), so it cannot be read off the address.
        "64:ff9b:1::/48",
    )
)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdecimal()


# The /96 prefixes whose addresses are only another spelling of the IPv4 address in their last
# 32 bits (as the high 96 bits of the address): IPv4-mapped ::ffff:a.b.c.d (RFC 4291), which a
# dual-stack socket dials as IPv4; IPv4-translated ::ffff:0:a.b.c.d (RFC 2765, SIIT);
# IPv4-compatible ::a.b.c.d (RFC 4291 2.5.5.1, deprecated, which Linux's sit0 tunnels to
# a.b.c.d); NAT64's well-known prefix 64:ff9b::/96 (RFC 6052).
_V4_SPELLINGS: Final = frozenset({0xFFFF, 0xFFFF_0000, 0x64_FF9B << 64, 0})
_6TO4: Final = 0x2002  # 2002::/16, the IPv4 relay in bits 16-47 (RFC 3056)
_TEREDO: Final = 0x2001_0000  # 2001::/32: server in bits 32-63, client ~bits 96-127 (RFC 4380)


def destinations(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses dialling ``ip`` may reach, each of which the policy must allow.

    An IPv6 address that only spells an IPv4 one (mapped, translated, compatible, NAT64) is that
    IPv4 address.  A 6to4 or Teredo address is itself and the IPv4 addresses its packets go to
    (relay; Teredo server and client).  ``::`` and ``::1`` are themselves, not IPv4-compatible.
    ISATAP (``::5efe:a.b.c.d`` interface ids) is left alone on purpose: its IPv4 address is
    legitimately private, inside the remote site, and reached through that site's router.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return (ip,)
    n = int(ip)
    if n >> 32 in _V4_SPELLINGS and n > 1:
        return (ipaddress.IPv4Address(n & 0xFFFF_FFFF),)
    if n >> 112 == _6TO4:
        return ip, ipaddress.IPv4Address(n >> 80 & 0xFFFF_FFFF)
    if n >> 96 == _TEREDO:
        server = ipaddress.IPv4Address(n >> 64 & 0xFFFF_FFFF)
        return ip, server, ipaddress.IPv4Address(~n & 0xFFFF_FFFF)
    return (ip,)


@dataclass(frozen=True, slots=True)
class AllowEntry:
    network: IPNetwork | None
    host: str | None  # a lower-cased host name
    port: int | None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """``CIDR``, ``IP``, ``HOST``, each optionally ``:PORT`` (IPv6 as ``[addr]:port``)."""
        spec = text.strip()
        port: int | None = None
        if spec.startswith("["):
            addr, bracket, rest = spec[1:].partition("]")
            if not bracket:
                raise ConfigError("allow", f"missing ']' in {text!r}")
            if rest:
                if not rest.startswith(":") or not _is_port(rest[1:]):
                    raise ConfigError("allow", f"bad entry {text!r}")
                port = int(rest[1:])
            spec = addr
        elif spec.count(":") == 1:
            spec, _, port_text = spec.partition(":")
            if not _is_port(port_text):
                raise ConfigError("allow", f"bad port in {text!r}")
            port = int(port_text)
        if port is not None and not 0 < port < 65536:
            raise ConfigError("allow", f"port out of range in {text!r}")
        try:
            return cls(ipaddress.ip_network(spec, strict=False), None, port)
        except ValueError:
            pass
        name = spec.lower().rstrip(".")
        if not name or any(c.isspace() or c in "/[]" for c in name):
            raise ConfigError("allow", f"{text!r} is neither a CIDR, an IP nor a host name")
        return cls(None, name, port)


_MAX_VERDICTS: Final = 4096


LocalAddresses = Callable[[], frozenset[IPAddress]]
_NO_ADDRESSES: Final[frozenset[IPAddress]] = frozenset()


class DestinationPolicy:
    """``local_addresses`` answers the host's own addresses (refused unless allowed), the same
    frozenset object while they are unchanged; None until the I/O layer sets it (the tunnel
    server sets ``autovpn.ifaddrs.HostAddresses()``)."""

    def __init__(
        self,
        allow: list[str] | tuple[str, ...] = (),
        *,
        block_private: bool = True,
        local_addresses: LocalAddresses | None = None,
    ) -> None:
        self.entries = [AllowEntry.parse(a) for a in allow]
        self.block_private = block_private
        self.local_addresses = local_addresses
        # Verdicts by (address, port): a server asks about the same few addresses for every
        # stream, and parsing each with ipaddress was ~2% of its CPU per new stream (py-spy).
        # Bounded: cleared when full, and when the host's addresses change (they are the only
        # part of the policy that changes).
        self._verdicts: dict[tuple[str, int], bool] = {}
        self._local: frozenset[IPAddress] = _NO_ADDRESSES

    def host_allowed(self, host: str, port: int) -> bool:
        """True when ``host`` (a name) is explicitly allowed: its addresses are not checked."""
        name = host.lower().rstrip(".")
        return any(e.host == name and (e.port is None or e.port == port) for e in self.entries)

    def address_allowed(self, address: str, port: int) -> bool:
        if self.block_private and self.local_addresses is not None:
            local = self.local_addresses()
            if local is not self._local:
                self._local = local
                self._verdicts.clear()
        key = (address, port)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) >= _MAX_VERDICTS:
                self._verdicts.clear()
            verdict = self._verdicts[key] = self._judge(address, port)
        return verdict

    def _judge(self, address: str, port: int) -> bool:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        return all(self._allowed(d, port) for d in destinations(ip))

    def _allowed(self, ip: IPAddress, port: int) -> bool:
        for e in self.entries:
            if e.network is not None and ip in e.network and (e.port is None or e.port == port):
                return True
        if not self.block_private:
            return True
        if ip in self._local:
            return False
        return not any(ip in net for net in BLOCKED_BY_DEFAULT if net.version == ip.version)
