"""A tunnel server gives back the memory of a burst of connections once they are gone.

A real ``autovpn server`` subprocess, real TLS handshakes and upgrades (the benchmark's own
generator, benchmarks/memory_burst.py, at a tenth of its size), and the server's RSS from
/proc.  Before the fix, 2,000 handshakes left the server at 8x its baseline for good: every
TLS connection's mux sat in a reference cycle with its 256 KiB read buffer (and the TLS layer's
256 KiB) until the cyclic GC, and glibc kept what was freed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks import chains
from benchmarks.memory_burst import Server, rss_kib, run_handshakes

HANDSHAKES = 2000
CONCURRENCY = 200
#: The bound of the issue: RSS after the burst at most twice the baseline.
RATIO = 2.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_server_memory_falls_back_after_a_burst_of_handshakes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BENCH_AUTOVPN_SRC", raising=False)  # this checkout's server
    work = chains.make_certs(tmp_path)
    server = Server(work)
    try:
        baseline = server.baseline()
        failed = run_handshakes(server.port, work.ca, HANDSHAKES, CONCURRENCY)
        assert failed == 0
        assert server.proc.poll() is None, chains.exit_report(server.proc)
        limit = RATIO * baseline
        rss = rss_kib(server.proc.pid)
        deadline = time.monotonic() + 15  # the trim follows the last close within a second
        while rss > limit and time.monotonic() < deadline:
            time.sleep(0.25)
            rss = rss_kib(server.proc.pid)
        assert rss <= limit, (
            f"server RSS {rss / 1024:.1f} MiB after {HANDSHAKES} handshakes, baseline"
            f" {baseline / 1024:.1f} MiB: more than {RATIO}x"
        )
    finally:
        server.stop()
