"""The UDP send side of the relays: big socket buffers, and runs of datagrams in one syscall.

Buffers: a relay receives bursts (a WireGuard peer's window, a tunnel read's worth of replies)
and must hold them while the event loop is busy elsewhere.  ``enlarge_buffers`` asks for
8 MiB, forced past ``net.core.rmem_max`` where the process may (CAP_NET_ADMIN, as
wireguard-go does), else as much as the system allows.

Batches: a relay that forwards a burst of datagrams pays the kernel's per-send cost (the
syscall, the route, building the packet: about 3 µs on loopback here) once per datagram.  With
``UDP_SEGMENT`` (Linux 4.18+) one ``sendmsg`` carries a run of datagrams of one size (the last
may be shorter) and the kernel cuts it into separate datagrams, each delivered whole: measured
here 3.5 -> 0.6-0.9 µs of sender CPU per 1,400-byte datagram, the receiver's cost unchanged.
A bulk WireGuard transfer is such a run: its packets all have the tunnel's MTU.

``DatagramBatch.send`` queues a datagram for one destination; the queue goes out at the end of
the event-loop iteration (``BatchFlusher``), after the whole tunnel read that carried it was
decoded.  Where GSO is not available (another OS, an old kernel) or refused for a socket, or the
transport has datagrams of its own waiting, datagrams go one by one through the transport, as
without batching.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import sys
from typing import Final

log = logging.getLogger("autovpn.udp")

_SOL_UDP: Final = 17
_UDP_SEGMENT: Final = 103  # linux/udp.h; not exported by Python's socket module
_SEGMENT_SIZE: Final = struct.Struct("=H")
#: Kernel limits of one GSO send (UDP_MAX_SEGMENTS is 64 before Linux 5.5, 128 since) and the
#: largest UDP payload one IPv4 packet holds (65,535 - 20 - 8), less some margin.
MAX_SEGMENTS: Final = 64
MAX_GSO_BYTES: Final = 65000
#: Errors meaning "this socket or route cannot do GSO": stop trying on it.
_GSO_REFUSED: Final = frozenset(
    (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE)
)


#: Socket buffer size a relay asks for (wireguard-go asks for 7 MiB).
UDP_BUFFER: Final = 8 << 20
_SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h; not exported by Python's socket module
_SO_RCVBUFFORCE: Final = 33


def enlarge_buffers(transport: asyncio.BaseTransport | None, size: int = UDP_BUFFER) -> None:
    """Give ``transport``'s socket ``size``-byte send and receive buffers, or what is allowed.

    Measured on the relay: a 1,000-datagram burst overflowed the default 208 KiB receive buffer
    (254 of 1,000 arrived, testing-recipes.md 2.4), and with 4 MiB a 4 s trial at 123k
    datagrams/s lost 0.9% in that buffer (kernel drop counter) on this shared 2-core machine.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    for forced, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            if sys.platform == "linux":
                try:
                    sock.setsockopt(socket.SOL_SOCKET, forced, size)
                    continue
                except PermissionError:
                    pass  # no CAP_NET_ADMIN: the kernel caps the plain option at its maximum
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
        except OSError as exc:  # the default still works, only with less slack
            log.debug("udp: cannot enlarge a socket buffer: %s", exc)


def gso_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A duplicate of ``transport``'s socket for GSO sends, or None where GSO is unavailable.

    A duplicate, not the transport's own socket object, so that closing one never closes a
    descriptor the other still uses.  The caller closes it with the transport.
    """
    if sys.platform != "linux":
        return None
    raw = transport.get_extra_info("socket")
    if raw is None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(raw.fileno()))
    except OSError:
        return None
    # The descriptor is already non-blocking (the flag belongs to the shared open file); this
    # only tells the socket object, so a full buffer raises BlockingIOError at once.
    sock.setblocking(False)
    try:
        # Probe: a kernel without UDP GSO refuses the option (ENOPROTOOPT).
        sock.setsockopt(_SOL_UDP, _UDP_SEGMENT, 0)
    except OSError:
        sock.close()
        return None
    return sock


class BatchFlusher:
    """Sends every batch that has datagrams, once per event-loop iteration."""

    __slots__ = ("_loop", "_dirty", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[DatagramBatch] = []
        self._handle: asyncio.Handle | None = None

    def mark(self, batch: DatagramBatch) -> None:
        self._dirty.append(batch)
        if self._handle is None:
            self._handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._handle = None
        dirty, self._dirty = self._dirty, []
        for batch in dirty:
            batch.flush()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._dirty.clear()


class DatagramBatch:
    """The datagrams for one destination (``addr``, or the peer of a connected socket)."""

    __slots__ = ("transport", "sock", "addr", "pending", "flusher", "sent", "gso_sends")

    def __init__(
        self,
        transport: asyncio.DatagramTransport,
        sock: socket.socket | None,
        flusher: BatchFlusher,
        addr: tuple[str | int, ...] | None = None,
    ) -> None:
        self.transport = transport
        self.sock = sock  # from gso_socket(transport); None: one send per datagram
        self.addr = addr
        self.pending: list[bytes] = []
        self.flusher = flusher
        self.sent = 0  # datagrams handed to the kernel or the transport
        self.gso_sends = 0  # sendmsg calls that carried more than one datagram

    def send(self, data: bytes) -> None:
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(data)

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        transport = self.transport
        if transport.is_closing():
            return
        sock = self.sock
        if (
            sock is None
            or len(pending) == 1
            or sock.fileno() < 0
            or _queued(transport)  # keep order behind the transport's own queue
        ):
            self._one_by_one(pending)
            return
        n = len(pending)
        i = 0
        while i < n:
            size = len(pending[i])
            j = i + 1
            total = size
            # A run: datagrams of ``size`` bytes, closed by the first shorter one.
            while j < n and j - i < MAX_SEGMENTS:
                following = len(pending[j])
                if following > size or total + following > MAX_GSO_BYTES:
                    break
                total += following
                j += 1
                if following < size:
                    break
            if j - i == 1:
                self._one_by_one(pending[i:j])
                i = j
                continue
            cmsg = [(_SOL_UDP, _UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
            try:
                if self.addr is None:
                    sock.sendmsg([b"".join(pending[i:j])], cmsg)
                else:
                    sock.sendmsg([b"".join(pending[i:j])], cmsg, 0, self.addr)
            except BlockingIOError:
                # The socket buffer is full: the transport queues what cannot go now, and
                # everything after it must queue behind.
                self._one_by_one(pending[i:])
                return
            except OSError as exc:
                if exc.errno in _GSO_REFUSED:
                    log.debug("udp: GSO refused (%s); sending datagrams one by one", exc)
                    self.sock = None
                    self._one_by_one(pending[i:])
                    return
                # ECONNREFUSED and the like, left by an ICMP error: the run is lost, as a
                # datagram sent through the transport would be, and reported the same way.
                transport.get_protocol().error_received(exc)  # type: ignore[attr-defined]
            else:
                self.sent += j - i
                self.gso_sends += 1
            i = j

    def _one_by_one(self, datagrams: list[bytes]) -> None:
        sendto = self.transport.sendto
        addr = self.addr
        for data in datagrams:
            sendto(data, addr)
        self.sent += len(datagrams)


def _queued(transport: asyncio.DatagramTransport) -> int:
    """Bytes the transport holds unsent (asyncio's and uvloop's datagram transports both have
    ``get_write_buffer_size``; the abstract class does not declare it)."""
    size: int = getattr(transport, "get_write_buffer_size", lambda: 0)()
    return size
