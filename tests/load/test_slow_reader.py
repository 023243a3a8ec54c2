"""A fast sender behind a slow reader: flow control keeps both engines' memory bounded.

Real ``autovpn server`` and ``autovpn client`` processes (``test_load.chain``).  Each way, a
sender pushes 256 MiB into the tunnel as fast as it is let while the receiving application
reads 1 MiB/s for 5 s; the RSS of the client and the server (VmRSS, sampled every 0.2 s) stays
under its baseline + 64 MiB meanwhile, and the sender is held back (it got far less than the
256 MiB out).  Then the reader reads at full speed and every byte is checked (SHA-256).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from tests.conftest import pattern, pattern_digest, run
from tests.load.test_load import MIB, Chain, chain, report, socks_connect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc"),
]

SIZE = 256 << 20
RATE = 1 << 20  # the slow reader's bytes per second
SLOW_FOR = 5.0
#: What each engine may hold above its baseline while the reader is slow (issue 15).
BOUND_MIB = 64.0


async def sample_rss(c: Chain, until: asyncio.Future[None]) -> dict[str, float]:
    """The highest RSS of each engine (MiB), sampled every 0.2 s until ``until`` is done."""
    peak = c.rss_mib()
    while not until.done():
        for name, mib in c.rss_mib().items():
            peak[name] = max(peak[name], mib)
        await asyncio.sleep(0.2)
    return peak


def check(c: Chain, base: dict[str, float], peak: dict[str, float], what: str) -> None:
    report(
        f"{what}: RSS MiB { {k: round(v, 1) for k, v in base.items()} } -> at most"
        f" { {k: round(v, 1) for k, v in peak.items()} } while the reader was slow"
    )
    for name in base:
        assert peak[name] <= base[name] + BOUND_MIB, (what, name, base, peak)


def test_upload_to_a_slow_reader(tmp_path: Path) -> None:
    """The application sends; the target reads slowly (the server's side buffers)."""
    args = ("--sink", "--rate", str(RATE), "--slow-for", str(SLOW_FOR))
    with chain(tmp_path, args) as c:
        warm_up_sink(c)
        base = c.rss_mib()

        async def main() -> tuple[dict[str, float], int, bytes]:
            reader, writer = await socks_connect(c.socks_port, c.target_port)
            loop = asyncio.get_running_loop()
            slow_over: asyncio.Future[None] = loop.create_future()
            loop.call_later(SLOW_FOR, slow_over.set_result, None)
            sampler = asyncio.ensure_future(sample_rss(c, slow_over))
            sent = 0
            sent_while_slow = -1
            for chunk in pattern(SIZE):
                writer.write(chunk)
                await writer.drain()  # held here while the tunnel's windows are full
                sent += len(chunk)
                if slow_over.done() and sent_while_slow < 0:
                    sent_while_slow = sent
            writer.write_eof()
            digest = await reader.readexactly(32)
            writer.close()
            return await sampler, sent_while_slow, digest

        peak, sent_while_slow, digest = run(main())
        c.alive()
        check(c, base, peak, f"upload, {sent_while_slow / MIB / 1024:.0f} MiB sent in 5 s")
        assert 0 < sent_while_slow < SIZE // 4, sent_while_slow  # held back
        assert digest == pattern_digest(SIZE)


def test_download_by_a_slow_reader(tmp_path: Path) -> None:
    """The target sends; the application reads slowly (the client's side buffers)."""
    with chain(tmp_path, ("--source", str(SIZE))) as c:
        base = c.rss_mib()

        async def main() -> tuple[dict[str, float], int, bytes, int]:
            reader, writer = await socks_connect(c.socks_port, c.target_port)
            loop = asyncio.get_running_loop()
            slow_over: asyncio.Future[None] = loop.create_future()
            sampler = asyncio.ensure_future(sample_rss(c, slow_over))
            h = hashlib.sha256()
            got = 0
            until = time.monotonic() + SLOW_FOR
            while time.monotonic() < until:
                data = await reader.read(RATE // 10)
                h.update(data)
                got += len(data)
                await asyncio.sleep(0.1)
            slow_over.set_result(None)
            got_while_slow = got
            while data := await reader.read(1 << 20):
                h.update(data)
                got += len(data)
            writer.close()
            return await sampler, got_while_slow, h.digest(), got

        peak, got_while_slow, digest, total = run(main())
        c.alive()
        check(c, base, peak, f"download, {got_while_slow / MIB / 1024:.1f} MiB read in 5 s")
        assert total == SIZE
        assert digest == pattern_digest(SIZE)


def warm_up_sink(c: Chain) -> None:
    """``warm_up`` for a sink target: one small transfer through the chain first."""

    async def main() -> None:
        reader, writer = await socks_connect(c.socks_port, c.target_port)
        writer.write(b"x" * 1000)
        writer.write_eof()
        assert await reader.readexactly(32) == hashlib.sha256(b"x" * 1000).digest()
        writer.close()

    run(main())
    time.sleep(1.5)
