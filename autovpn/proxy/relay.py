"""Direct relaying between two local sockets (the DIRECT route), with real backpressure.

Each side's protocol writes what it reads into the other side's transport; when that
transport's write buffer passes its high-water mark (``pause_writing``), the reading side stops
reading until it drains.  EOF is passed on as a half-close.  No per-byte Python: one copy out of
the shared read buffer per read.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from autovpn.net import reset_transport
from autovpn.stats import RESULT_OK, Flow

#: Read buffer shared by every pipe: ``buffer_updated`` copies out of it synchronously.
_READ_BUFFER: Final = memoryview(bytearray(256 * 1024))


class Pipe(asyncio.BufferedProtocol):
    """One side of a direct relay.  Create both, then ``link`` them."""

    __slots__ = (
        "transport",
        "peer",
        "eof",
        "closed",
        "early",
        "registry",
        "nread",
        "flow",
        "idle_mark",
        "idle_since",
    )

    def __init__(self, registry: set[Pipe] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.eof = False
        self.closed = False
        self.early = b""
        #: The set of live pipes this one belongs to (so an engine can close them all).
        self.registry = registry
        self.nread = 0  # bytes read from this side's socket (one addition per read)
        #: The connection's record (``autovpn.stats``), ended by whichever side is lost first.
        self.flow: Flow | None = None
        #: For the idle sweep (``autovpn.idle``) of the registry's owner.
        self.idle_mark = -1
        self.idle_since = 0.0
        if registry is not None:
            registry.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(cast(asyncio.Transport, transport))

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if self.early:
            transport.write(self.early)
            self.early = b""
        # What the peer saw before we were attached (a server that speaks first, a reply to
        # early data): its EOF or close was kept for us.
        peer = self.peer
        if peer is not None and peer.closed:
            transport.close()
        elif peer is not None and peer.eof and transport.can_write_eof():
            transport.write_eof()
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.resume_reading()  # paused while we were not attached (bounded)

    def counts(self) -> tuple[int, int]:
        """Bytes read by this side and by its peer (``autovpn.stats.Metered``)."""
        peer = self.peer
        return self.nread, 0 if peer is None else peer.nread

    def activity(self) -> int:
        """Bytes read by both sides (``autovpn.idle.Idler``): the counts already kept."""
        peer = self.peer
        return self.nread if peer is None else self.nread + peer.nread

    def close_idle(self, quiet: float) -> None:
        """Silent both ways for ``quiet`` seconds: reset both sockets (``autovpn.idle``)."""
        for side in (self, self.peer):
            if side is not None and side.transport is not None and not side.closed:
                reset_transport(side.transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.nread += nbytes
        peer = self.peer
        if peer is not None and not peer.closed:
            if peer.transport is not None:
                peer.transport.write(bytes(_READ_BUFFER[:nbytes]))
            else:  # read before the listener attached its socket: it gets this first
                peer.early += _READ_BUFFER[:nbytes]
                if len(peer.early) >= len(_READ_BUFFER) and self.transport is not None:
                    self.transport.pause_reading()  # bounded: resumed by the peer's attach

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if peer.eof:
                peer.transport.close()
                return False
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
        return True  # keep our write side open until the peer finishes too

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.flow is not None:
            self.flow.end(RESULT_OK if exc is None else type(exc).__name__)
        if self.registry is not None:
            self.registry.discard(self)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if exc is not None:  # an error here is a reset there, never a clean end
                reset_transport(peer.transport)
            else:
                peer.transport.close()


def abort_all(pipes: set[Pipe]) -> None:
    """Reset every pipe of ``pipes`` (their peers follow): an engine that stops ends them, and
    a transfer cut short must not look complete to either side."""
    for pipe in list(pipes):
        if pipe.transport is not None and not pipe.closed:
            reset_transport(pipe.transport)
    pipes.clear()


def link(a: Pipe, b: Pipe) -> None:
    a.peer = b
    b.peer = a
