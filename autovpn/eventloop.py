"""Event loop selection: uvloop (Linux, macOS) or winloop (Windows) when installed.

uvloop made a Python UDP relay about 3x faster and cut per-stream latency (performance-notes.md);
plain asyncio works everywhere and is the fallback.  ``AUTOVPN_LOOP=asyncio`` chooses plain
asyncio even where uvloop is installed (the Windows path, tested on Linux in CI).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from autovpn.errors import Terminated

T = TypeVar("T")


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
    (performance-notes.md).  Equivalent to MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_.
    Returns False where there is no glibc (Windows, macOS, musl): nothing to tune there.
    """
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 4 << 20) == 1
    return bool(mallopt(m_trim_threshold, 64 << 20) == 1) and ok


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
