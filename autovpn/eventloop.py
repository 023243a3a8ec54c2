"""Event loop selection: uvloop (Linux, macOS) or winloop (Windows) when installed.

uvloop made a Python UDP relay about 3x faster and cut per-stream latency (docs/benchmarks.md);
plain asyncio works everywhere and is the fallback.  ``AUTOVPN_LOOP=asyncio`` chooses plain
asyncio even where uvloop is installed (the Windows path, tested on Linux in CI).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from autovpn.errors import Terminated

T = TypeVar("T")

#: How long after a connection ends the heap is trimmed (``HeapTrimmer``).  Further ends within
#: this time share the one trim, so a server closing thousands of connections trims once a second.
TRIM_DELAY: Final = 1.0


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The name and factory of the fastest loop available here (``AUTOVPN_LOOP=asyncio``:
    the standard one)."""
    if os.environ.get("AUTOVPN_LOOP", "").lower() == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        if sys.platform == "win32":
            # Imported here: only the loop that is chosen is loaded (optional dependencies).
            import winloop

            return "winloop", winloop.new_event_loop
        import uvloop  # optional dependency, loaded only when chosen

        return "uvloop", uvloop.new_event_loop
    except ImportError:
        return "asyncio", asyncio.new_event_loop


def tune_allocator() -> bool:
    """Keep glibc from returning memory to the system after every large buffer is freed.

    A relay frees and allocates 256 KiB-1 MiB buffers all the time; with glibc's defaults each
    one is an mmap/munmap or a heap grow/trim (``brk``): 4-8% of a sender's time here (py-spy),
    and a fresh Python relay ran at about half speed until the heap settled
    (docs/benchmarks.md).  Equivalent to MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_.
    The price is that glibc keeps what a burst of connections freed (up to the 64 MiB trim
    threshold at the top of the heap, and every free page below it): ``HeapTrimmer`` gives it
    back explicitly once connections end, which a relay's data path never does.
    Returns False where there is no glibc (Windows, macOS, musl): nothing to tune there.
    """
    if sys.platform != "linux":
        return False
    import ctypes  # lazy: glibc's allocator is only tuned on Linux, where an engine starts

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 4 << 20) == 1
    return bool(mallopt(m_trim_threshold, 64 << 20) == 1) and ok


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (not Linux, or not glibc: musl has none)."""
    if sys.platform != "linux":
        return None
    import ctypes  # lazy: only where glibc may be, once a connection has ended

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class HeapTrimmer:
    """Gives the memory freed by ended connections back to the system (glibc only).

    A connection's buffers (uvloop's 256 KiB TLS read buffer, OpenSSL's state) come from the C
    heap; once freed they stay in the process, below the trim threshold or between live blocks,
    so a burst of 20,000 connections left a server at 22x its baseline RSS for good.
    ``released()`` (a connection ended) schedules one ``malloc_trim(0)`` ``delay`` seconds
    later, which returns every free page of the heap: 2-7 ms after such a burst, paid at most
    once per ``delay``.  The delay batches a burst's ends into one trim; a relay moving bytes
    on other connections is not slowed by it (measured, docs/benchmarks.md): only connections
    ending trigger a trim, at most once per ``delay``, not its data path.
    """

    __slots__ = ("delay", "trims", "_handle")

    def __init__(self, delay: float = TRIM_DELAY) -> None:
        self.delay = delay
        self.trims = 0
        self._handle: asyncio.TimerHandle | None = None

    def released(self) -> None:
        """A connection ended: trim the heap soon (once, however many end meanwhile)."""
        if self._handle is None and _malloc_trim() is not None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self._trim)

    def _trim(self) -> None:
        self._handle = None
        self.trims += 1
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class LoopBuffers:
    """One reusable read buffer per event loop, for ``BufferedProtocol``s whose
    ``buffer_updated`` is done with every byte (parsed, copied or written) before it returns.

    A loop runs one callback at a time, so such protocols can all read into the same buffer:
    an idle connection then owns no read buffer at all, where one of its own cost 256 KiB per
    logged-in connection on a server.  Per loop rather than per process, so that two loops in
    two threads never fill one buffer at once.
    """

    __slots__ = ("size", "_by_loop")

    def __init__(self, size: int) -> None:
        self.size = size
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, loop: asyncio.AbstractEventLoop) -> memoryview:
        buffer = self._by_loop.get(loop)
        if buffer is None:
            buffer = self._by_loop[loop] = memoryview(bytearray(self.size))
        return buffer


def run(main: Coroutine[Any, Any, T], *, debug: bool = False, sigterm: bool = False) -> T:
    """Run ``main`` to completion on the fastest loop (``asyncio.run`` semantics).

    ``sigterm``: SIGTERM cancels ``main`` as Ctrl-C does (the Runner's SIGINT handling), so
    what it opened with ``async with`` is closed on the same path (IP scores saved, the
    engine's record removed, listeners closed); then ``Terminated`` is raised.  Main thread
    and POSIX only: elsewhere SIGTERM keeps its default action."""
    tune_allocator()
    _, factory = loop_factory()
    with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
        return runner.run(_stop_on_sigterm(main) if sigterm else main)


async def _stop_on_sigterm(main: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received = False

    def on_sigterm() -> None:
        nonlocal received
        if not received:  # once: a second SIGTERM must not interrupt the closing
            received = True
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows; not the main thread
        installed = False
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        raise Terminated("stopped by SIGTERM") from None
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)
