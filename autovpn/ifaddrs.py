"""The machine's own interface addresses, for the destination policy to refuse (SSRF).

A service bound on 0.0.0.0 or :: answers on every address of the host, not only loopback, so
the tunnel server must refuse its own addresses too.  They are read from the interfaces, never
from the host name: ``getaddrinfo(gethostname())`` may ask DNS, which an attacker can answer,
and misses addresses the name does not list.

- Linux: one rtnetlink dump (``RTM_GETADDR``), every family and every address, secondary ones
  included (``ioctl(SIOCGIFCONF)`` would miss those).  Pure ``socket``, no dependency.
- Other POSIX systems (macOS, BSDs): libc's ``getifaddrs`` through ``ctypes``.
- Elsewhere (Windows), or when both fail: no addresses, and a warning that says so; the
  policy then still refuses loopback and private ranges, only not the host's public addresses.

``HostAddresses`` keeps the answer for ``TTL`` seconds and reads again after, so an address
the host gains (DHCP, a new interface) is refused within a second.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Final

log = logging.getLogger("autovpn.ifaddrs")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Seconds a reading is used before a policy decision reads again.  A read costs ~40 us (one
#: netlink dump, a host with a few interfaces): too much for every new stream of a busy server,
#: nothing once a second; and a second is as long as a new address of the host stays open.
TTL: Final = 1.0

# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_RTM_NEWADDR: Final = 20
_RTM_GETADDR: Final = 22
_NLM_F_REQUEST: Final = 0x1
_NLM_F_DUMP: Final = 0x300
_IFA_ADDRESS: Final = 1
_IFA_LOCAL: Final = 2
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_AF_INET: Final = 2  # the kernel's numbers, the same on every Linux
_AF_INET6: Final = 10


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            raise ValueError("truncated rtnetlink attribute")
        yield kind, data[offset + _RTATTR.size : offset + length]
        offset += _align4(length)


def parse_rtnetlink_addresses(data: bytes) -> tuple[list[IPAddress], bool]:
    """The addresses in one datagram of an ``RTM_GETADDR`` dump, and whether it ended the dump.

    Sans-I/O, for tests with bytes.  Raises OSError for a netlink error message, ValueError for
    a malformed one.  An IPv4 address's own address is ``IFA_LOCAL`` (``IFA_ADDRESS`` is the
    peer on a point-to-point link); an IPv6 one carries ``IFA_LOCAL`` only when it has a peer.
    """
    found: list[IPAddress] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("truncated netlink message")
        body = offset + _NLMSGHDR.size
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, body)
            if error:
                raise OSError(-error, f"rtnetlink: {os.strerror(-error)}")
        elif kind == _RTM_NEWADDR:
            family = data[body]
            size = {_AF_INET: 4, _AF_INET6: 16}.get(family)
            if size is not None:
                attrs = dict(_attributes(data, body + _IFADDRMSG.size, offset + length))
                raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
                if raw is not None and len(raw) == size:
                    found.append(ipaddress.ip_address(raw))
        offset += _align4(length)
    return found, False


def _read_rtnetlink() -> list[IPAddress]:
    found: list[IPAddress] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(2.0)  # the kernel answers at once; this only bounds a surprise
        sock.bind((0, 0))
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(request), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        )
        sock.sendto(header + request, (0, 0))
        while True:
            addresses, done = parse_rtnetlink_addresses(sock.recv(65536))
            found += addresses
            if done:
                return found


class _Sockaddr(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint16)]  # BSD: sa_len, sa_family; Linux: sa_family


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    # ifa_netmask, ifa_dstaddr, ifa_data follow; not read
]

# BSD-derived systems begin struct sockaddr with a length byte; Linux does not.
_SA_LEN: Final = not sys.platform.startswith("linux")


def _read_getifaddrs() -> list[IPAddress]:
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's included
    getifaddrs, freeifaddrs = libc.getifaddrs, libc.freeifaddrs
    getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
    getifaddrs.restype = ctypes.c_int
    freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
    freeifaddrs.restype = None
    head = ctypes.POINTER(_Ifaddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"getifaddrs: {os.strerror(errno)}")
    found: list[IPAddress] = []
    try:
        entry = head
        while entry:
            sa = entry.contents.ifa_addr
            if sa:
                raw = ctypes.string_at(sa, 2)
                family = raw[1] if _SA_LEN else int.from_bytes(raw, sys.byteorder)
                if family == socket.AF_INET:
                    found.append(ipaddress.IPv4Address(ctypes.string_at(sa, 8)[4:8]))
                elif family == socket.AF_INET6:
                    found.append(ipaddress.IPv6Address(ctypes.string_at(sa, 24)[8:24]))
            entry = entry.contents.ifa_next
    finally:
        freeifaddrs(head)
    return found


def interface_addresses() -> frozenset[IPAddress]:
    """Every address of every interface of this host (in its network namespace).

    Raises OSError when the system offers no way to read them here.
    """
    if sys.platform.startswith("linux"):
        try:
            return frozenset(_read_rtnetlink())
        except (OSError, ValueError) as exc:  # netlink filtered (seccomp), say: try libc
            log.debug("rtnetlink address dump failed (%s); trying getifaddrs", exc)
    if os.name != "posix":
        raise OSError(f"reading interface addresses is not supported on {sys.platform}")
    return frozenset(_read_getifaddrs())


class HostAddresses:
    """The host's own addresses, for ``DestinationPolicy(local_addresses=...)``.

    Calling it answers the addresses read at most ``ttl`` seconds ago, reading again when
    older; the same frozenset object while they do not change, so the policy can tell a change
    (and forget its verdicts) by identity.  A failed read keeps the last answer and warns once.
    """

    def __init__(
        self,
        ttl: float = TTL,
        *,
        read: Callable[[], frozenset[IPAddress]] = interface_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._read = read
        self._clock = clock
        self._addresses: frozenset[IPAddress] = frozenset()
        self._stale_at = -float("inf")
        self._failing = False

    def __call__(self) -> frozenset[IPAddress]:
        now = self._clock()
        if now >= self._stale_at:
            self._stale_at = now + self._ttl
            try:
                fresh = self._read()
            except (OSError, ValueError) as exc:
                if not self._failing:
                    log.warning(
                        "cannot read this host's interface addresses (%s): the tunnel server "
                        "does not refuse its own non-loopback addresses until it can; keep "
                        "this host's services on loopback or firewall them",
                        exc,
                    )
                self._failing = True
                return self._addresses
            self._failing = False
            if fresh != self._addresses:
                self._addresses = fresh
        return self._addresses
