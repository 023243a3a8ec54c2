"""``python -m benchmarks.workers_bench``: an autovpn server as one process and as two workers.

For each worker count (and, with more than one worker, each way of steering connections to
workers: ``--steer-by connection``, where the pool's 4 connections land on different workers,
and ``address``, the default, where one client's connections all reach one worker) and
repetition, a fresh chain: ``autovpn server --workers N`` and one ``autovpn client
--pool-size 4``, then:

1. **new connections/s**: the load generator's ``conns`` test (50 concurrent SOCKS5 connects,
   one short HTTP exchange each, for ``conn_seconds``), as in the main harness;
2. **aggregate download**: ``download`` over 4 connections at once (``transfer`` bytes in all,
   capped at ``transfer_seconds``).

The CPU of every process of the chain (utime+stime from /proc) is sampled around each test:
the supervisor, each worker, the client.  From the workers' CPU come the server's cost per
request and per GiB, and from those, on paper, what a machine with more cores would sustain
(``projection``): the cost per unit of work, measured, divided into the cores' time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import chains
from benchmarks.chains import Running, Workdir
from benchmarks.harness import GIB, MIB, REPO, _env, _loadgen_cmd, cpu_of, raise_nofile

POOL: Final = 4  # the client's tunnel connections
STREAMS: Final = 4  # downloads at once


@dataclass(frozen=True)
class Sizes:
    transfer: int = 1 * GIB
    transfer_seconds: float = 20.0
    conn_seconds: float = 5.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(256 * MIB, 8.0, 2.0)


@dataclass
class Sample:
    """One repetition with ``workers`` workers."""

    workers: int
    steer_by: str = ""  # "" with one worker
    conns_per_s: float = 0.0
    requests: int = 0
    down_mbs: float = 0.0
    down_bytes: int = 0
    #: CPU seconds of each process during each test: {"conns": {"worker 0": s, ...}, ...}
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    def server_cpu(self, test: str) -> float:
        return sum(v for k, v in self.cpu[test].items() if k.startswith("worker"))


def start_chain(work: Workdir, workers: int, steer_by: str = "") -> tuple[Running, dict[str, int]]:
    """The chain and its processes by role: supervisor (with workers), worker N, client."""
    socks = chains.free_port()
    run = Running(f"autovpn-{workers}w{steer_by}", socks)
    try:
        server, client = chains._start_autovpn_pair(
            work,
            run,
            f"socks5://127.0.0.1:{socks}",
            f"workers-{workers}{steer_by}",
            workers=workers,
            pool_size=POOL,
            server_args=["--steer-by", steer_by] if steer_by else [],
        )
        chains.wait_port(socks, client)
    except BaseException:
        run.stop()
        raise
    roles = {"client": client.pid}
    if workers > 1:
        roles["supervisor"] = server.pid
        roles.update({f"worker {i}": pid for i, pid in enumerate(sorted(run.children))})
    else:
        roles["worker 0"] = server.pid
    return run, roles


def _cpu(roles: dict[str, int]) -> dict[str, float]:
    return {role: cpu_of([pid]) for role, pid in roles.items()}


def _loadgen(socks: int, test: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        _loadgen_cmd(test, dict(args, socks=socks)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {test} failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(
    work: Workdir, workers: int, sizes: Sizes, log: Callable[[str], None], steer_by: str = ""
) -> Sample:
    run, roles = start_chain(work, workers, steer_by)
    sample = Sample(workers, steer_by)
    try:
        assert run.socks_port is not None
        before = _cpu(roles)
        c = _loadgen(run.socks_port, "conns", {"seconds": sizes.conn_seconds}, timeout=120)
        after = _cpu(roles)
        run.check()
        sample.cpu["conns"] = {r: after[r] - before[r] for r in roles}
        sample.requests = int(c["requests"])
        sample.conns_per_s = c["requests"] / c["seconds"]
        before = after
        d = _loadgen(
            run.socks_port,
            "download",
            {"size": sizes.transfer, "seconds": sizes.transfer_seconds, "streams": STREAMS},
            timeout=sizes.transfer_seconds + 60,
        )
        after = _cpu(roles)
        run.check()
        sample.cpu["down"] = {r: after[r] - before[r] for r in roles}
        sample.down_bytes = int(d["bytes"])
        sample.down_mbs = d["bytes"] / d["seconds"] / 1e6
    finally:
        run.stop()
    spread = ", ".join(f"{r} {v:.2f}s" for r, v in sorted(sample.cpu["down"].items()))
    log(
        f"  {_name(workers, steer_by)}: {sample.conns_per_s:,.0f} conns/s"
        f" (errors {c['errors']}),"
        f" download {sample.down_mbs:,.0f} MB/s over {STREAMS} connections; CPU during the"
        f" download: {spread}"
    )
    return sample


def _name(workers: int, steer_by: str) -> str:
    return f"{workers} worker(s)" + (f" by {steer_by}" if steer_by else "")


def run_bench(
    counts: Sequence[int],
    reps: int,
    sizes: Sizes,
    log: Callable[[str], None],
    steer_by: Sequence[str] = ("connection", "address"),
) -> dict[tuple[int, str], list[Sample]]:
    raise_nofile()
    configs = [(n, s) for n in counts for s in (steer_by if n > 1 else [""])]
    samples: dict[tuple[int, str], list[Sample]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="autovpn-workers-bench-") as tmp:
        work = chains.make_certs(Path(tmp))
        for rep in range(1, reps + 1):
            for n, steer in configs:  # interleaved: drift of the shared machine hits all alike
                log(f"rep {rep}/{reps}, {_name(n, steer)}")
                samples[(n, steer)].append(measure(work, n, sizes, log, steer))
    return samples


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(samples: dict[tuple[int, str], list[Sample]]) -> list[dict[str, Any]]:
    """One row per worker count and steering: medians, and each process's share of the
    server's CPU."""
    rows = []
    for (n, steer), reps in samples.items():
        roles = sorted({r for s in reps for r in s.cpu["down"]})
        rows.append(
            {
                "workers": n,
                "steer_by": steer,
                "conns_per_s": _median([s.conns_per_s for s in reps]),
                "down_mbs": _median([s.down_mbs for s in reps]),
                "cpu_us_per_request": _median(
                    [s.server_cpu("conns") / max(1, s.requests) * 1e6 for s in reps]
                ),
                "cpu_s_per_gib": _median(
                    [s.server_cpu("down") / (s.down_bytes / GIB) for s in reps if s.down_bytes]
                ),
                "cpu_conns": {r: _median([s.cpu["conns"][r] for s in reps]) for r in roles},
                "cpu_down": {r: _median([s.cpu["down"][r] for s in reps]) for r in roles},
            }
        )
    return rows


def projection(row: dict[str, Any], cores: int = 16) -> tuple[float, float]:
    """(new connections/s, GiB/s) that ``cores`` fully busy workers would sustain at the
    measured CPU cost per request and per GiB (server side only; on paper)."""
    return cores / (row["cpu_us_per_request"] / 1e6), cores / row["cpu_s_per_gib"]


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers (steered by) | new conns/s | download MB/s (4 conns) | server CPU µs/request |"
        " server CPU-s/GiB | CPU s per process, conns test | CPU s per process, download |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        conns, down = (
            ", ".join(f"{r} {v:.2f}" for r, v in row[key].items())
            for key in ("cpu_conns", "cpu_down")
        )
        steered = f" ({row['steer_by']})" if row["steer_by"] else ""
        lines.append(
            f"| {row['workers']}{steered} | {row['conns_per_s']:,.0f} | {row['down_mbs']:,.0f} |"
            f" {row['cpu_us_per_request']:,.0f} | {row['cpu_s_per_gib']:.2f} | {conns} | {down} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="256 MiB, 2 s of connections")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, action="append", help="worker counts (1 and 2)")
    p.add_argument(
        "--steer-by",
        action="append",
        choices=["connection", "address"],
        help="with more than one worker, each of these (both)",
    )
    args = p.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    samples = run_bench(
        args.workers or [1, 2],
        args.reps,
        sizes,
        lambda s: print(s, file=sys.stderr, flush=True),
        args.steer_by or ["connection", "address"],
    )
    rows = summarize(samples)
    print(render(rows))
    print()
    for row in rows:
        conns, gib = projection(row)
        print(
            f"- {_name(row['workers'], row['steer_by'])}: 16 cores at the measured cost"
            " would serve"
            f" {conns:,.0f} new connections/s or {gib:.1f} GiB/s"
            f" ({gib * GIB * 8 / 1e9:.0f} Gbit/s)"
        )
    print(f"\n{os.cpu_count()} cores here; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
