"""Small helpers shared by the parts that dial sockets (the tunnel server, direct routes) and
the config (``is_loopback``), which is why asyncio is imported only where it is used.

Name lookups through the system resolver (``resolve_target``, ``SystemResolver``) are bounded:
``getaddrinfo`` blocks a thread until the resolver answers, and a slow or black-holed resolver
(or names whose servers never answer, which any user or web page can ask for) would otherwise
hold every thread of a pool that everything else in the process shares (asyncio's default
executor: 6 threads on 2 cores; uvloop's libuv pool: 4), and every other user's lookups would
wait behind them.  So the lookups run on a pool of their own (``LOOKUP_THREADS``), each has a
deadline (``LOOKUP_TIMEOUT``: the caller gets ``LookupTimedOut`` naming the name and the
resolver), and one client address has at most ``MAX_LOOKUPS_PER_ADDRESS`` of them in the pool at
once; its further lookups wait for its own turn, not for the others'.  A lookup counts until its
thread is free again, not only until its caller gave up: a timed-out ``getaddrinfo`` goes on
until the resolver library gives up (its own timeout and attempts, from resolv.conf), and that
thread is not free before.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import sys
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from autovpn.errors import InvalidHostName, LookupTimedOut, ResetReason, StreamError

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

#: RFC 1035 section 2.3.4: a label has 1-63 octets, a name at most 253 characters in text form
#: (255 octets on the wire), both counted on the ASCII (IDNA) form, without a trailing dot.
MAX_LABEL_LENGTH: Final = 63
MAX_NAME_LENGTH: Final = 253

#: Threads of the pool that runs the system resolver's lookups (``getaddrinfo``), one pool per
#: process shared by every ``SystemResolver``: a thread blocked in a lookup costs a stack and
#: nothing else, so the pool can hold many, and ``MAX_LOOKUPS_PER_ADDRESS`` keeps one client
#: address to a sixteenth of it.
LOOKUP_THREADS: Final = 256
#: Seconds one lookup may take, the wait for its client address's turn included
#: (``[server] lookup_timeout``).  glibc asks each name server for 5 s, twice: a name whose
#: first query was lost still resolves within 10 s.
LOOKUP_TIMEOUT: Final = 10.0
#: Lookups one client address (IPv6: its /64) may have in the pool at once
#: (``[server] max_lookups_per_address``): a browser opens a page's few dozen names at once,
#: and a name answered from the resolver's cache takes a millisecond.
MAX_LOOKUPS_PER_ADDRESS: Final = 16

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
    resolver: SystemResolver | None = None,
    client: str = "",
) -> list[str]:
    """The addresses to dial for ``host``, in the resolver's order, without repeats: ``[host]``
    for an IP literal, else ``lookup`` (a test's loopback DNS) or the system resolver, bounded
    (``resolver``, default: this event loop's ``SystemResolver`` with the default bounds;
    ``client``: what the lookup is counted against, ``limits.address_key`` of the client's
    address; empty for a lookup of our own).  Raises OSError when the name does
    not resolve, ``LookupTimedOut`` (an OSError) when it takes too long, InvalidHostName (an
    OSError too) when it cannot be a name at all.  The destination policy is checked by the
    caller, on these addresses."""
    if is_ip_literal(host):
        return [host]
    check_host_name(host)
    if lookup is not None:
        return await lookup(host, port)
    return await (resolver or SystemResolver.default()).resolve(host, port, udp=udp, client=client)


def _lookup_pool() -> ThreadPoolExecutor:
    """The process's pool for ``getaddrinfo`` (``LOOKUP_THREADS``), made on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # Imported here, as asyncio is: autovpn.config imports this module and stays light.
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="autovpn-lookup")
        return _pool


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _system_resolvers() -> str:
    """Who answers ``getaddrinfo``, for error messages: resolv.conf's name servers where there
    is one (read once; the C library reads it once too)."""
    global _resolvers_text
    if _resolvers_text is None:
        servers: list[str] = []
        try:
            with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) >= 2 and fields[0] == "nameserver":
                        servers.append(fields[1])
        except OSError:
            pass
        _resolvers_text = (
            f"the system resolver: nameserver {', '.join(servers)} in /etc/resolv.conf"
            if servers
            else "the system resolver"
        )
    return _resolvers_text


_resolvers_text: str | None = None


class _Turns:
    """One client address's lookups in the pool, and its lookups waiting for a turn."""

    __slots__ = ("busy", "waiting")

    def __init__(self) -> None:
        self.busy = 0
        self.waiting: deque[asyncio.Future[None]] = deque()


class SystemResolver:
    """``getaddrinfo``, bounded: on the lookup pool (``LOOKUP_THREADS``), ``timeout`` seconds
    per lookup, at most ``per_address`` lookups of one client address in the pool at once (see
    the module docstring).  Belongs to one event loop (the loop it is first used on)."""

    def __init__(
        self,
        timeout: float = LOOKUP_TIMEOUT,
        per_address: int = MAX_LOOKUPS_PER_ADDRESS,
    ) -> None:
        self.timeout = timeout
        self.per_address = per_address
        self._turns: dict[str, _Turns] = {}
        self.timed_out = 0  # lookups that failed for their deadline

    @staticmethod
    def default() -> SystemResolver:
        """The running loop's resolver with the default bounds (``resolve_target`` without
        one: the client side, and servers built without their own)."""
        import asyncio  # lazy: autovpn.config imports this module and stays light

        loop = asyncio.get_running_loop()
        resolver = _defaults.get(loop)
        if resolver is None:
            resolver = _defaults[loop] = SystemResolver()
        return resolver

    def in_flight(self, client: str) -> int:
        """Lookups of ``client``'s address in the pool now (finished or not for their caller)."""
        turns = self._turns.get(client)
        return turns.busy if turns is not None else 0

    async def resolve(
        self, host: str, port: int, *, udp: bool = False, client: str = ""
    ) -> list[str]:
        """``getaddrinfo(host, port)``'s addresses, in its order, without repeats."""
        import asyncio  # lazy: autovpn.config imports this module and stays light

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        # No client: a lookup of our own (a tunnel server's name, a -R target), bounded by the
        # deadline and the pool only.
        key = client
        try:
            async with asyncio.timeout_at(deadline):
                if key:
                    await self._take_turn(key)
        except TimeoutError:
            self.timed_out += 1
            raise LookupTimedOut(
                host,
                f"{host}: not looked up: {self.per_address} lookups of {key} were still in"
                f" progress after {self.timeout:g} s (max_lookups_per_address)",
            ) from None
        try:
            job = _lookup_pool().submit(
                socket.getaddrinfo,
                host,
                port,
                0,
                socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                socket.IPPROTO_UDP if udp else socket.IPPROTO_TCP,
            )
        except BaseException:
            if key:
                self._end_turn(key)
            raise

        def finished(_: object) -> None:
            # In the pool's thread (or here, if it is already done).  The turn ends when the
            # thread is free: not when our caller stopped waiting for it.
            try:
                loop.call_soon_threadsafe(self._end_turn, key)
            except RuntimeError:
                pass  # the loop is closed: nobody waits for a turn any more

        if key:
            job.add_done_callback(finished)
        try:
            async with asyncio.timeout_at(deadline):
                infos = await asyncio.wrap_future(job)
        except TimeoutError:
            self.timed_out += 1
            raise LookupTimedOut(
                host,
                f"{host}: no answer within {self.timeout:g} s (lookup_timeout) from"
                f" {_system_resolvers()}",
            ) from None
        except UnicodeError as exc:  # an IDNA rule check_host_name does not know of
            raise InvalidHostName(str(exc)) from None
        except socket.gaierror as exc:  # the same error, saying which name and who answered
            raise socket.gaierror(
                exc.errno, f"{host}: {exc.strerror} ({_system_resolvers()})"
            ) from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _take_turn(self, key: str) -> None:
        turns = self._turns.get(key)
        if turns is None:
            turns = self._turns[key] = _Turns()
        if turns.busy < self.per_address and not turns.waiting:
            turns.busy += 1
            return
        import asyncio  # lazy: autovpn.config imports this module and stays light

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turns.waiting.append(waiter)
        try:
            await waiter  # _end_turn hands a turn over: ``busy`` already counts it
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._end_turn(key)  # handed over as we were cancelled: pass it on
            elif waiter in turns.waiting:
                turns.waiting.remove(waiter)
                if not turns.busy and not turns.waiting:
                    self._turns.pop(key, None)
            raise

    def _end_turn(self, key: str) -> None:
        turns = self._turns.get(key)
        if turns is None:
            return
        while turns.waiting:
            waiter = turns.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # its turn: ``busy`` stays as it is
                return
        turns.busy -= 1
        if turns.busy <= 0:
            del self._turns[key]


_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SystemResolver] = (
    weakref.WeakKeyDictionary()
)


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
