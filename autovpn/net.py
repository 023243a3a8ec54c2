"""Small helpers shared by the parts that dial sockets (the tunnel server, direct routes)."""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket

from autovpn.errors import ResetReason


def reset_reason_for(exc: BaseException) -> ResetReason:
    """The reset reason (and so SOCKS5 reply / HTTP status) for a failed connect."""
    if isinstance(exc, TimeoutError):
        return ResetReason.TIMED_OUT
    if isinstance(exc, ConnectionRefusedError):
        return ResetReason.CONNECTION_REFUSED
    if isinstance(exc, socket.gaierror):
        return ResetReason.HOST_UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
            return ResetReason.NETWORK_UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return ResetReason.HOST_UNREACHABLE
        if exc.errno == errno.ECONNREFUSED:
            return ResetReason.CONNECTION_REFUSED
        if exc.errno == errno.ETIMEDOUT:
            return ResetReason.TIMED_OUT
    return ResetReason.GENERAL_FAILURE


async def resolve_target(host: str, port: int, *, udp: bool = False) -> list[str]:
    """The addresses to dial for ``host``, in the resolver's order, without repeats: ``[host]``
    for an IP literal, else the system's getaddrinfo (OSError when the name does not resolve).
    The destination policy is checked by the caller, on these addresses."""
    if is_ip_literal(host):
        return [host]
    infos = await asyncio.get_running_loop().getaddrinfo(
        host,
        port,
        type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
        proto=socket.IPPROTO_UDP if udp else socket.IPPROTO_TCP,
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@functools.lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    # Cached: parsing with ipaddress was ~5% of the server's CPU per new stream (py-spy), and
    # a server sees the same few addresses again and again.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
