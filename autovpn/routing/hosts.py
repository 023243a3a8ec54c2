"""The hosts file: a parser (pure: it takes text) and where the file lives on this platform.

The product resolves in the order cache -> hosts file -> routing decision -> DNS, so a name
pinned here never reaches any resolver.  Format (hosts(5)): an address, then one or more names,
``#`` to the end of the line is a comment.  Lines whose address does not parse are skipped.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from .rules import normalize_host

__all__ = ["default_hosts_path", "parse_hosts"]


def parse_hosts(text: str) -> dict[str, list[str]]:
    """Map each name (normalised: lower-case, no trailing dot) to its addresses, in file order,
    without duplicates.  IPv6 zone ids (``fe80::1%eth0``) are kept in the address text."""
    table: dict[str, list[str]] = {}
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = fields[0]
        try:
            ipaddress.ip_address(address)
        except ValueError:
            continue
        for name in fields[1:]:
            key = normalize_host(name)
            if not key:
                continue
            addrs = table.setdefault(key, [])
            if address not in addrs:
                addrs.append(address)
    return table


def default_hosts_path() -> Path:
    """``/etc/hosts`` on POSIX; ``%SystemRoot%\\System32\\drivers\\etc\\hosts`` on Windows."""
    if sys.platform == "win32":
        root = os.environ.get("SystemRoot") or os.environ.get("WINDIR") or r"C:\Windows"
        return Path(root) / "System32" / "drivers" / "etc" / "hosts"
    return Path("/etc/hosts")
