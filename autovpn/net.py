"""Small helpers shared by the parts that dial sockets (the tunnel server, direct routes) and
the config (``is_loopback``), which is why asyncio is imported only where it is used."""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from autovpn.errors import InvalidHostName, ResetReason, StreamError

if TYPE_CHECKING:
    import asyncio

#: RFC 1035 section 2.3.4: a label has 1-63 octets, a name at most 253 characters in text form
#: (255 octets on the wire), both counted on the ASCII (IDNA) form, without a trailing dot.
MAX_LABEL_LENGTH: Final = 63
MAX_NAME_LENGTH: Final = 253

#: ``struct linger {on, 0}``: closing the socket then sends RST and drops unsent bytes.  Two
#: u_shorts on Windows, two ints elsewhere.
_LINGER_RESET: Final = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)


def reset_reason_for(exc: BaseException) -> ResetReason:
    """The reset reason (and so SOCKS5 reply / HTTP status) for a failed connect."""
    if isinstance(exc, StreamError):  # our own (InvalidHostName): it carries its reason
        return exc.reason
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


def check_host_name(host: str) -> None:
    """Raise InvalidHostName unless ``host`` (not an IP literal) is a name a resolver can look
    up.  getaddrinfo itself raises UnicodeError for a label over 63 characters or an empty one
    (from its IDNA encoding), which no caller expected: names from peers are checked here."""
    if host.isascii():
        name = host
    else:
        try:
            name = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidHostName(f"not encodable as IDNA ({exc.__cause__ or exc})") from None
    if name.endswith("."):
        name = name[:-1]  # the root: "example.com." is absolute, not an empty label
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidHostName(f"{len(name)} characters (1 to {MAX_NAME_LENGTH})")
    for label in name.split("."):
        if not 0 < len(label) <= MAX_LABEL_LENGTH:
            raise InvalidHostName(f"a label of {len(label)} characters (1 to {MAX_LABEL_LENGTH})")


def reset_transport(transport: asyncio.Transport) -> None:
    """Abort ``transport`` so that its peer sees a connection *reset*, not a clean end.

    For a stream that failed (its tunnel died, its other side was reset).  ``abort()`` alone
    closes the socket with a FIN on asyncio and uvloop alike, after the kernel has sent what
    it holds: an application reading to end-of-stream (a body without a length, a SOCKS5 or
    CONNECT stream) would take a truncated transfer for a complete one.  With SO_LINGER {on,
    0} the close sends RST, and the peer's read fails with ECONNRESET.  Transports without a
    TCP socket (pipes, Unix sockets, our virtual ports) are just aborted.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except (OSError, ValueError):
            pass  # already closed (uvloop raises ValueError for fd -1): nothing to reset
    transport.abort()


async def resolve_target(
    host: str,
    port: int,
    *,
    udp: bool = False,
    lookup: Callable[[str, int], Awaitable[list[str]]] | None = None,
) -> list[str]:
    """The addresses to dial for ``host``, in the resolver's order, without repeats: ``[host]``
    for an IP literal, else ``lookup`` (a test's loopback DNS) or the system's getaddrinfo.
    Raises OSError when the name does not resolve, InvalidHostName (an OSError too) when it
    cannot be a name at all.  The destination policy is checked by the caller, on these
    addresses."""
    if is_ip_literal(host):
        return [host]
    check_host_name(host)
    if lookup is not None:
        return await lookup(host, port)
    # asyncio here, not at the top: autovpn.config imports this module (is_loopback) and must
    # stay light.  Past the IP-literal return, so the server's per-stream path never pays it.
    import asyncio

    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host,
            port,
            type=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
            proto=socket.IPPROTO_UDP if udp else socket.IPPROTO_TCP,
        )
    except UnicodeError as exc:  # an IDNA rule check_host_name does not know of
        raise InvalidHostName(str(exc)) from None
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


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal: reachable from this host only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_host_name(name: str) -> str:
    """Lower case, brackets off, IP addresses in their canonical text (``::0:1`` -> ``::1``)."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` (RFC 9110 section 7.2: uri-host [":" port]) as (normalized name, port or None);
    None when it is not one.  An IPv6 address must be in brackets, as in a URL."""
    value = value.strip().lower()
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            return None
        if not sep or (rest and not rest.startswith(":")):
            return None
        name, port_text = str(ipaddress.IPv6Address(inside)), rest[1:] if rest else None
    else:
        name, sep, port_text_or_empty = value.partition(":")
        if ":" in port_text_or_empty:
            return None  # an unbracketed IPv6 address, or garbage
        port_text = port_text_or_empty if sep else None
        if not name or not name.isascii() or not all(c.isalnum() or c in "-._" for c in name):
            return None
        name = normalize_host_name(name)
    if port_text is None:
        return name, None
    if not (port_text.isdecimal() and port_text.isascii() and len(port_text) <= 5):
        return None
    port = int(port_text)
    return (name, port) if 0 < port < 65536 else None
