"""Does a tunnel server give its memory back after a burst of connections?

``python -m benchmarks.memory_burst`` starts ``autovpn server wss://127.0.0.1:P`` as a
subprocess, proves it with a few handshakes and records its RSS (the baseline), then makes
20,000 authenticated handshakes, 200 at a time: each one a TLS connection and the native
WebSocket upgrade (``TunnelClient.connect_once``, the real client), closed again at once.  Once
the last one is closed, the server's RSS (VmRSS from /proc/PID/status) is sampled at 0, 10, 30
and 60 s.  The target (issue 12, item 6): 60 s after the burst, at most twice the baseline.

The handshakes come from this process, on the fastest event loop available, so the server's
RSS is its own.  ``burst()`` is also the harness's ``memory`` group (``python -m benchmarks
--only memory``) and the regression test's helper.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from autovpn.config import ServerURL
from autovpn.errors import RemoteProtocolError
from autovpn.eventloop import loop_factory
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.tls import client_context
from benchmarks import chains

SAMPLES: Final = (0.0, 10.0, 30.0, 60.0)
HANDSHAKES: Final = 20_000
CONCURRENCY: Final = 200
#: Handshakes made before the baseline is taken, so that lazily imported modules and the first
#: TLS session state count as baseline, not as burst.
WARM_UP: Final = 20


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hwm_kib(pid: int) -> int:
    """VmHWM (peak RSS) of ``pid`` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class BurstResult:
    handshakes: int
    failed: int
    seconds: float  # the burst itself
    baseline_kib: int
    peak_kib: int  # VmHWM at the end of the burst
    #: (seconds after the last close, RSS KiB)
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def final_ratio(self) -> float:
        return self.samples[-1][1] / self.baseline_kib if self.samples else float("nan")

    def describe(self) -> str:
        mib = 1024
        rows = ", ".join(f"{t:g} s: {kib / mib:.1f} MiB" for t, kib in self.samples)
        return (
            f"{self.handshakes:,} handshakes ({self.failed} failed) in {self.seconds:.1f} s"
            f" ({self.handshakes / max(self.seconds, 1e-9):,.0f}/s); server RSS baseline"
            f" {self.baseline_kib / mib:.1f} MiB, peak {self.peak_kib / mib:.1f} MiB;"
            f" after: {rows}; last / baseline = {self.final_ratio:.2f}x"
        )


class Server:
    """``autovpn server wss://127.0.0.1:P --allow 127.0.0.0/8`` in a temporary directory."""

    def __init__(self, work: chains.Workdir, extra_args: Sequence[str] = ()) -> None:
        self.work = work
        self.port = chains.free_port()
        env = dict(
            os.environ,
            AUTOVPN_SECRET=chains.SECRET,
            AUTOVPN_STATE_DIR=str(work.path / f"memory-state-{self.port}"),
            PYTHONPATH=str(chains.autovpn_source()),
        )
        self.proc = chains._popen(
            [
                sys.executable,
                "-m",
                "autovpn",
                "--log-level",
                "warning",
                "server",
                f"wss://127.0.0.1:{self.port}",
                "--tls-certificate",
                str(work.cert),
                "--tls-private-key",
                str(work.key),
                "--allow",
                "127.0.0.0/8",
                # One process: its RSS is the server's (a supervisor's workers are others).
                *(["--workers", "1"] if chains.knows_workers() else []),
                *extra_args,
            ],
            work.path / f"memory-server-{self.port}.log",
            env,
        )
        try:
            chains.wait_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise

    def baseline(self) -> int:
        """RSS in KiB after ``WARM_UP`` handshakes and a second's rest."""
        run_handshakes(self.port, self.work.ca, WARM_UP, 1)
        time.sleep(1.0)
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def handshakes(port: int, ca: Path, count: int, concurrency: int) -> int:
    """``count`` tunnel connections to 127.0.0.1:``port``, ``concurrency`` at a time, each
    upgraded and closed again; returns how many failed."""
    client = TunnelClient(
        ClientSettings(
            server=ServerURL(True, "127.0.0.1", port),
            user="default",
            secret=chains.SECRET.encode(),
            ssl_context=client_context(ca),
            keepalive_interval=0,
        )
    )
    remaining = count
    failed = 0

    async def worker() -> None:
        nonlocal remaining, failed
        while remaining > 0:
            remaining -= 1
            try:
                mux = await client.connect_once()
            except (OSError, TimeoutError, ssl.SSLError, RemoteProtocolError) as exc:
                failed += 1
                if failed <= 3:
                    print(f"handshake failed: {exc!r}", file=sys.stderr)
                continue
            await mux.shutdown()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return failed


def run_handshakes(port: int, ca: Path, count: int, concurrency: int) -> int:
    """``handshakes`` on a loop of its own (the fastest available); returns the failures."""
    _, factory = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(handshakes(port, ca, count, concurrency))


def burst(
    work: chains.Workdir,
    *,
    count: int = HANDSHAKES,
    concurrency: int = CONCURRENCY,
    samples: Sequence[float] = SAMPLES,
    server_args: Sequence[str] = (),
    log: Callable[[str], None] = lambda s: None,
) -> BurstResult:
    """One fresh server, one burst, RSS sampled ``samples`` seconds after it."""
    server = Server(work, server_args)
    try:
        baseline = server.baseline()
        log(f"    memory: baseline {baseline / 1024:.1f} MiB; {count:,} handshakes...")
        start = time.monotonic()
        failed = run_handshakes(server.port, work.ca, count, concurrency)
        seconds = time.monotonic() - start
        if server.proc.poll() is not None:
            raise RuntimeError(chains.exit_report(server.proc))
        result = BurstResult(count, failed, seconds, baseline, hwm_kib(server.proc.pid))
        end = time.monotonic()
        for at in samples:
            time.sleep(max(0.0, end + at - time.monotonic()))
            result.samples.append((at, rss_kib(server.proc.pid)))
            log(f"    memory: {at:g} s after the burst: {result.samples[-1][1] / 1024:.1f} MiB")
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_burst", description=__doc__)
    p.add_argument("--handshakes", type=int, default=HANDSHAKES)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument(
        "--samples",
        default=",".join(f"{s:g}" for s in SAMPLES),
        help="seconds after the burst at which RSS is sampled (comma-separated)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    samples = [float(s) for s in args.samples.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="autovpn-memory-") as tmp:
        work = chains.make_certs(Path(tmp))
        result = burst(
            work,
            count=args.handshakes,
            concurrency=args.concurrency,
            samples=samples,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    if args.json:
        print(
            json.dumps(
                {
                    "handshakes": result.handshakes,
                    "failed": result.failed,
                    "seconds": result.seconds,
                    "baseline_kib": result.baseline_kib,
                    "peak_kib": result.peak_kib,
                    "samples": result.samples,
                    "final_ratio": result.final_ratio,
                }
            )
        )
    else:
        print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
