"""A DNS server to ask: the value ``[routing.dns]`` ``local``/``public`` entries parse to.

Kept apart from ``routing.dns`` (which imports dnspython and asyncio) so that the config can
validate these entries without loading the resolver.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rules import parse_ip


@dataclass(frozen=True, slots=True)
class Upstream:
    """One DNS server: ``8.8.8.8``, ``127.0.0.1:5353``, ``[2001:db8::1]:53``."""

    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Upstream:
        t = text.strip()
        host, port = t, 53
        if t.startswith("["):
            host, _, rest = t[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
                port = int(rest[1:])
        elif t.count(":") == 1:
            host, _, p = t.partition(":")
            port = int(p)
        if parse_ip(host) is None:
            raise ValueError(f"{text!r}: a DNS server must be an IP address (no name to resolve)")
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port out of range")
        return cls(host, port)

    def __str__(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{h}:{self.port}"
