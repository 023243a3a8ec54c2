"""The listening sockets of ``autovpn server --workers N``, and which worker gets a connection.

Linux spreads the connections of a ``SO_REUSEPORT`` group over its sockets by a hash of each
connection's addresses and ports, so two connections from one client usually reach two
workers, and every limit a worker keeps per client address (authentication failures,
connections, TLS handshakes in progress) would be per worker: a guesser would get
``auth_failure_limit`` tries a window on each.  Instead, a classic BPF program attached to the
group (``SO_ATTACH_REUSEPORT_CBPF``, Linux 4.5 and later, no privilege needed) picks the socket
of each new connection from its SYN:

* ``address`` (the default): a hash of the client's IPv4 address, or of its IPv6 /64 (the
  same keys as ``limits.address_key``), so every connection of one address reaches one worker
  and the per-address limits hold across workers, exactly;
* ``connection``: a hash of the client's address and port, so the connections of one client's
  pool spread over the workers (one client can use several cores) and the per-address limits
  are per worker again.

The program reads the IP header through ``SKF_NET_OFF`` (for TCP the packet it sees starts
after the TCP header): the version nibble, then the IPv4 source (offset 12) or the IPv6
source's first 8 bytes (offsets 8 and 12); for ``connection`` also the TCP source port,
behind the IPv4 header's own length (``ldxb 4*([0]&0xf)``) or at offset 40 for IPv6.  The key
is mixed by a multiplication by 2^32/phi (Fibonacci hashing) and its top 16 bits taken modulo
the number of workers: the low bits of an address alone would put every gateway ending in .1
on one worker.

The group's order is the order of ``listen()``, and when a socket of the group closes the
kernel moves the last one into its place: a worker that died and was started again would
come back last, and the addresses of two workers would change hands.  So the supervisor
opens the sockets, in order, and keeps them: a worker gets its slot's socket (its descriptor
passed on at start) and a restarted worker gets the same one, so the order never changes.
While a worker is down the supervisor attaches a program that sends its slot's share to the
live workers (a second hash modulo their number) and attaches the full one again once the
worker is back; connections it had accepted into its queue but not taken wait there for it.
(An index the program returned that is not below the group's size would make the kernel fall
back to its own hash; the program never returns one.)
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import platform
import socket
import struct
from collections.abc import Collection, Sequence
from typing import Final

log = logging.getLogger("autovpn.workers")

#: What ``[server] steer_by`` (``--steer-by``) may say.
STEER_BY: Final = ("address", "connection")
DEFAULT_STEER_BY: Final = "address"

#: ``SO_ATTACH_REUSEPORT_CBPF`` (include/uapi/asm-generic/socket.h: 51; parisc and sparc
#: number their socket options their own way).  Python's socket module has no name for it.
_SO_ATTACH_REUSEPORT_CBPF: Final = {"parisc": 0x402E, "sparc": 0x0035}.get(
    platform.machine().rstrip("0123456789"), 51
)

# Classic BPF (include/uapi/linux/filter.h, bpf_common.h).
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MEM, _MSH = 0x20, 0x40, 0x60, 0xA0
_K, _X, _A = 0x00, 0x08, 0x10
_MUL, _RSH, _MOD, _XOR = 0x20, 0x70, 0x90, 0xA0
_JA, _JEQ = 0x00, 0x10
_TAX = 0x00
#: Loads at this offset and above (negative) are relative to the packet's network header.
SKF_NET_OFF: Final = -0x100000
#: 2^32 / phi: the multiplier of Fibonacci hashing.
_GOLDEN: Final = 0x9E3779B1

Instruction = tuple[int, int, int, int]  # code, jump if true, jump if false, k


def _op(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> Instruction:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _key(by: str) -> list[Instruction]:
    """A = the client's key: its address (IPv6: the /64), with the source port for
    ``connection``."""
    port = by == "connection"
    v6 = [
        _op(_LD | _W | _ABS, SKF_NET_OFF + 8),
        _op(_MISC | _TAX),
        _op(_LD | _W | _ABS, SKF_NET_OFF + 12),
        _op(_ALU | _XOR | _X),
    ]
    if port:  # the TCP header right after the fixed IPv6 header
        v6 += [
            _op(_MISC | _TAX),
            _op(_LD | _H | _ABS, SKF_NET_OFF + 40),
            _op(_ALU | _XOR | _X),
        ]
    v4 = [_op(_LD | _W | _ABS, SKF_NET_OFF + 12)]
    if port:  # X = the IPv4 header's length; then the port behind it
        v4 = [
            _op(_LDX | _B | _MSH, SKF_NET_OFF),
            _op(_LD | _H | _IND, SKF_NET_OFF),
            _op(_MISC | _TAX),
            *v4,
            _op(_ALU | _XOR | _X),
        ]
    return [
        _op(_LD | _B | _ABS, SKF_NET_OFF),
        _op(_ALU | _RSH | _K, 4),
        _op(_JMP | _JEQ | _K, 6, 0, len(v6) + 1),  # IPv6: next; else past the IPv6 part
        *v6,
        _op(_JMP | _JA, len(v4)),
        *v4,
    ]


def program(count: int, live: Collection[int], by: str = DEFAULT_STEER_BY) -> list[Instruction]:
    """The classic BPF program that picks one of ``count`` sockets for a new connection.

    ``live``: the slots whose worker runs; a key whose slot is not live goes to a live one
    (by a second hash), so nothing waits for a worker that is being started again.  The
    mirror of this in Python is ``slot``."""
    if by not in STEER_BY:
        raise ValueError(f"steer_by {by!r}: one of {', '.join(STEER_BY)}")
    if not 1 <= count <= 256:
        raise ValueError(f"{count} sockets: 1 to 256")
    up = sorted(s for s in set(live) if 0 <= s < count)
    code = [
        *_key(by),
        _op(_ALU | _MUL | _K, _GOLDEN),
        _op(_ALU | _RSH | _K, 16),
    ]
    down = [s for s in range(count) if s not in up]
    if not down or not up:
        # All live; or none (every connection then waits in its slot's queue).
        return [*code, _op(_ALU | _MOD | _K, count), _op(_RET | _A)]
    code += [_op(_ST, 0), _op(_ALU | _MOD | _K, count)]  # M[0] = the hash
    for i, slot_down in enumerate(down):  # to ``remap`` (past the later ones and the ret)
        code.append(_op(_JMP | _JEQ | _K, slot_down, len(down) - i, 0))
    code.append(_op(_RET | _A))
    code += [_op(_LD | _MEM, 0), _op(_ALU | _MOD | _K, len(up))]  # remap: A = M[0] % live
    for j, target in enumerate(up):
        code += [_op(_JMP | _JEQ | _K, j, 0, 1), _op(_RET | _K, target)]
    code.append(_op(_RET | _K, up[0]))  # not reached: A < len(up)
    return code


def slot(
    address: str,
    port: int,
    count: int,
    live: Collection[int] | None = None,
    by: str = DEFAULT_STEER_BY,
) -> int:
    """The slot ``program`` picks for a connection from ``address``:``port`` (the mirror the
    tests check the kernel against, and what an operator may compute)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # such a client's packets are IPv4
    if isinstance(ip, ipaddress.IPv4Address):
        key = int(ip) ^ (port if by == "connection" else 0)
    else:
        first, second = struct.unpack("!II", ip.packed[:8])
        key = first ^ second ^ (port if by == "connection" else 0)
    mixed = ((key * _GOLDEN) & 0xFFFFFFFF) >> 16
    up = sorted(s for s in set(range(count) if live is None else live) if 0 <= s < count)
    index = mixed % count
    if not up or index in up:
        return index
    return up[mixed % len(up)]


class _Filter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def attach(sock: socket.socket, code: Sequence[Instruction]) -> None:
    """Attach ``code`` to the reuseport group of ``sock`` (any socket of it), in place of
    the program it had; the kernel copies the program.  OSError when it refuses."""
    filters = (_Filter * len(code))(*(_Filter(c, jt, jf, k) for c, jt, jf, k in code))
    fprog = _Program(len(code), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


class ListenGroup:
    """The supervisor's listening sockets: for each address the listen host stands for,
    ``count`` sockets of one reuseport group, slot ``i``'s socket for worker ``i``."""

    def __init__(self, host: str, port: int, count: int, by: str, backlog: int = 1024) -> None:
        self.host = host
        self.port = port
        self.count = count
        self.by = by
        self.backlog = backlog
        #: One list per address, each ``count`` sockets in slot order.
        self.groups: list[list[socket.socket]] = []
        #: Why the kernel refused the program (then it spreads by its own hash), or None.
        self.unsteered: str | None = None

    def open(self) -> None:
        """Bind and listen, slot by slot (the group's order is the order of ``listen``).
        OSError (and nothing left open) when the address cannot be bound."""
        infos = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address[:2]) in seen:
                    continue
                seen.add((family, address[:2]))
                group: list[socket.socket] = []
                self.groups.append(group)
                for _ in range(self.count):
                    sock = socket.socket(family, kind, proto)
                    group.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        # As asyncio's create_server does: "::" is IPv6 only.
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    sock.listen(self.backlog)
        except OSError:
            self.close()
            raise

    def fds(self, index: int) -> tuple[int, ...]:
        """Slot ``index``'s descriptors, one per address (passed on to its worker)."""
        return tuple(group[index].fileno() for group in self.groups)

    def steer(self, live: Collection[int]) -> bool:
        """Attach the program for these live slots to every group; False when the kernel
        refused it (said once in the log: the groups then spread by the kernel's hash)."""
        if self.unsteered is not None:
            return False
        code = program(self.count, live, self.by)
        try:
            for group in self.groups:
                attach(group[0], code)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.unsteered = f"SO_ATTACH_REUSEPORT_CBPF refused: {name}"
            log.warning(
                "the kernel refused the program that steers connections to workers by client"
                " %s (%s; Linux 4.5 or later has it): connections are spread by the kernel's"
                " hash, so the limits per client address are per worker",
                self.by,
                self.unsteered,
            )
            return False
        return True

    def close(self) -> None:
        for group in self.groups:
            for sock in group:
                sock.close()
        self.groups = []
