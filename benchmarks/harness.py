"""``python -m benchmarks``: every chain side by side, medians of fresh-chain repetitions.

For each repetition, every chain is started fresh (its own processes and config in a temp
dir), measured, and stopped; chains are interleaved within a repetition so that drift of the
shared machine hits all of them alike.  On each fresh chain, in this order:

1. idle memory: RSS of all chain processes with one live stream, then with N more held open;
2. new connections per second (50 concurrent SOCKS5 connects, one short HTTP exchange each),
   with p50/p99 time to first byte and the chain's CPU per request;
3. single-connection download, then upload (MB/s = 10^6 bytes/s), with the chain's CPU.

CPU of the chain processes comes from /proc/PID/stat (utime+stime) sampled around each test;
the load generator (benchmarks/loadgen.py, its own uvloop process) reports its own CPU share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks import chains
from benchmarks.chains import Running, Workdir

REPO: Final = chains.REPO
MIB: Final = 1 << 20
GIB: Final = 1 << 30
CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BEGIN: Final = "<!-- benchmarks:begin (written by python -m benchmarks; edit outside) -->"
END: Final = "<!-- benchmarks:end -->"


@dataclass(frozen=True)
class Sizes:
    transfer: int
    transfer_seconds: float
    conn_seconds: float
    idle: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(GIB, 20.0, 5.0, 2000)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(256 * MIB, 8.0, 2.0, 2000)


# -- process accounting ------------------------------------------------------------------


def cpu_of(pids: Sequence[int]) -> float:
    """utime+stime in seconds of the processes (and their reaped children), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[11..14] are utime, stime, cutime, cstime (stat(5) fields 14-17)
        total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return total


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- running the load generator ----------------------------------------------------------------


def _loadgen_cmd(test: str, args: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.loadgen", test, json.dumps(args)]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return env


def run_loadgen(chain: Running, test: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    args = dict(args, socks=chain.socks_port)
    cpu0 = cpu_of(chain.pids)
    proc = subprocess.run(
        _loadgen_cmd(test, args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=str(REPO),
    )
    cpu1 = cpu_of(chain.pids)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {test} on {chain.name} failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["chain_cpu"] = cpu1 - cpu0
    return result


def measure_idle(chain: Running, count: int) -> dict[str, Any]:
    with subprocess.Popen(
        _loadgen_cmd("idle", {"socks": chain.socks_port, "count": count}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(REPO),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            json.loads(proc.stdout.readline())
            time.sleep(0.3)
            before = rss_kib(chain.pids)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"idle loadgen on {chain.name} died")
            held = json.loads(line)
            time.sleep(0.5)  # let the chain settle (late allocations, logging)
            after = rss_kib(chain.pids)
            proc.stdin.write("close\n")
            proc.stdin.flush()
            proc.stdout.readline()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    n = int(held.get("held", 0))
    return {
        "held": n,
        "failed": held.get("failed", 0),
        "before_kib": before,
        "after_kib": after,
        "kib_per_conn": (after - before) / n if n else float("nan"),
    }


# -- one repetition of one chain ------------------------------------------------------------------


#: Metric key, label, unit and whether more is better.
METRICS: Final[list[tuple[str, str, bool]]] = [
    ("down", "download MB/s (1 conn)", True),
    ("up", "upload MB/s (1 conn)", True),
    ("conns", "new conns/s (50 concurrent)", True),
    ("p50", "TTFB p50 ms", False),
    ("p99", "TTFB p99 ms", False),
    ("idle_kib", "KiB per idle tunnelled conn", False),
    ("cpu_gib", "chain CPU-s per GiB (down+up)", False),
    ("cpu_req", "chain CPU µs per request", False),
    ("gen_down", "loadgen CPU % of a core (down)", False),
    ("gen_up", "loadgen CPU % of a core (up)", False),
    ("gen_conns", "loadgen CPU % of a core (conns)", False),
]


def measure_chain(chain: Running, sizes: Sizes, log: Callable[[str], None]) -> dict[str, float]:
    out: dict[str, float] = {}
    if chain.socks_port is not None:
        idle = measure_idle(chain, sizes.idle)
        if idle["failed"]:
            log(f"    idle: {idle['failed']} of {sizes.idle} connections failed")
        out["idle_kib"] = idle["kib_per_conn"]
        log(
            f"    idle: {idle['held']} held, RSS {idle['before_kib']} -> {idle['after_kib']} KiB"
            f" = {idle['kib_per_conn']:.1f} KiB/conn"
        )
        chain.check()
    c = run_loadgen(chain, "conns", {"seconds": sizes.conn_seconds}, timeout=120)
    out["conns"] = c["requests"] / c["seconds"]
    out["p50"] = c["p50"] * 1e3
    out["p99"] = c["p99"] * 1e3
    out["gen_conns"] = c["gen_share"] * 100
    if chain.socks_port is not None:
        out["cpu_req"] = c["chain_cpu"] / max(1, c["requests"]) * 1e6
    log(
        f"    conns: {out['conns']:,.0f}/s p50 {out['p50']:.1f} ms p99 {out['p99']:.1f} ms"
        f" errors {c['errors']} chain CPU {c['chain_cpu']:.2f}s gen {out['gen_conns']:.0f}%"
    )
    chain.check()
    moved = 0
    cpu = 0.0
    for test in ("down", "up"):
        r = run_loadgen(
            chain,
            "download" if test == "down" else "upload",
            {"size": sizes.transfer, "seconds": sizes.transfer_seconds},
            timeout=sizes.transfer_seconds + 60,
        )
        out[test] = r["bytes"] / r["seconds"] / 1e6
        out[f"gen_{test}"] = r["gen_share"] * 100
        moved += r["bytes"]
        cpu += r["chain_cpu"]
        log(
            f"    {test}: {out[test]:,.0f} MB/s ({r['bytes'] / MIB:,.0f} MiB in"
            f" {r['seconds']:.2f} s) chain CPU {r['chain_cpu']:.2f}s gen {out[f'gen_{test}']:.0f}%"
        )
        chain.check()
    if chain.socks_port is not None and moved:
        out["cpu_gib"] = cpu / (moved / GIB)
    return out


# -- chain registry ------------------------------------------------------------------------


@dataclass
class ChainSpec:
    name: str
    title: str
    start: Callable[[Workdir], Running] | None  # None: absent
    version: str = ""
    why_absent: str = ""


def chain_specs(peers: bool, only: Sequence[str] | None = None) -> list[ChainSpec]:
    specs = [
        ChainSpec("direct", "direct (limit)", chains.start_direct),
        ChainSpec("autovpn", "autovpn wss mux", chains.start_autovpn),
    ]
    if peers:
        python = chains.find_pproxy_python()
        if python is not None:
            version = chains.pproxy_version(python)
            specs.append(
                ChainSpec(
                    "pproxy",
                    "pproxy SOCKS5",
                    lambda w: chains.start_pproxy(w, python),
                    f"pproxy {version}",
                )
            )
            specs.append(
                ChainSpec(
                    "pproxy-ws",
                    "pproxy ws+TLS",
                    lambda w: chains.start_pproxy_ws(w, python),
                    f"pproxy {version}",
                )
            )
        else:
            why = "pproxy not found (see docs/benchmarks.md)"
            specs.append(ChainSpec("pproxy", "pproxy SOCKS5", None, why_absent=why))
            specs.append(ChainSpec("pproxy-ws", "pproxy ws+TLS", None, why_absent=why))
        v2ray = chains.find_v2ray()
        if v2ray is not None:
            specs.append(
                ChainSpec(
                    "v2ray",
                    "v2ray VLESS ws+TLS",
                    lambda w: chains.start_v2ray(w, v2ray),
                    chains.v2ray_version(v2ray),
                )
            )
        else:
            specs.append(
                ChainSpec(
                    "v2ray", "v2ray VLESS ws+TLS", None, why_absent="v2ray not found (apt v2ray)"
                )
            )
    if only:
        specs = [s for s in specs if s.name in only]
    return specs


# -- results -------------------------------------------------------------------------------


@dataclass
class Results:
    specs: list[ChainSpec]
    reps: int
    sizes: Sizes
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    extra_rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, chain: str, values: dict[str, float]) -> None:
        per = self.samples.setdefault(chain, {})
        for key, value in values.items():
            per.setdefault(key, []).append(value)

    def median(self, chain: str, key: str) -> float | None:
        values = self.samples.get(chain, {}).get(key)
        return statistics.median(values) if values else None

    def spread(self, chain: str, key: str) -> float | None:
        """(max - min) / median, in percent."""
        values = self.samples.get(chain, {}).get(key)
        if not values or len(values) < 2:
            return None
        mid = statistics.median(values)
        return (max(values) - min(values)) / mid * 100 if mid else None


def run_all(specs: list[ChainSpec], reps: int, sizes: Sizes, log: Callable[[str], None]) -> Results:
    results = Results(specs, reps, sizes)
    with tempfile.TemporaryDirectory(prefix="autovpn-bench-") as tmp:
        work = chains.make_certs(Path(tmp))
        for rep in range(1, reps + 1):
            for spec in specs:
                if spec.start is None:
                    continue
                log(f"rep {rep}/{reps} {spec.name}")
                running: Running | None = None
                try:
                    running = spec.start(work)
                    results.add(spec.name, measure_chain(running, sizes, log))
                except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                    results.failures.setdefault(spec.name, []).append(str(exc))
                    log(f"    FAILED: {exc}")
                finally:
                    if running is not None:
                        running.stop()
    return results


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def build_table(results: Results) -> list[list[str]]:
    """Rows of cells: metric | each chain (median ±spread) | autovpn ÷ each peer."""
    names = [s.name for s in results.specs]
    peers = [s for s in results.specs if s.name not in ("direct", "autovpn")]
    header = ["metric"] + [s.title for s in results.specs]
    header += [f"autovpn ÷ {s.name}" for s in peers if s.start is not None]
    rows = [header]
    for key, label, _ in METRICS:
        row = [label]
        for spec in results.specs:
            if spec.start is None:
                row.append("absent")
                continue
            med = results.median(spec.name, key)
            spread = results.spread(spec.name, key)
            if med is None and spec.name in results.failures:
                row.append("failed")
                continue
            cell = _fmt(med)
            if spread is not None and med is not None:
                cell += f" ±{spread:.0f}%"
            row.append(cell)
        mine = results.median("autovpn", key) if "autovpn" in names else None
        for spec in peers:
            if spec.start is None:
                continue
            theirs = results.median(spec.name, key)
            if mine is None or theirs is None or not theirs or theirs != theirs:
                row.append("–")
            else:
                row.append(f"{mine / theirs:.2f}x")
        rows.append(row)
    width = len(header)
    for label, value in results.extra_rows:
        rows.append([label, *[""] * (width - 1)])
        rows[-1][names.index("autovpn") + 1 if "autovpn" in names else 1] = value
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
    for row in rows[1:]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(out)


# -- targets (issue 6) -------------------------------------------------------------------------


def target_checks(results: Results) -> list[str]:
    """Issue 6's targets, evaluated on this run's medians."""
    m = results.median
    lines: list[str] = []

    def ratio(key: str, peer: str) -> float | None:
        a, b = m("autovpn", key), m(peer, key)
        if a is None or b is None or not b:
            return None
        return a / b

    def check(what: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        if value is None:
            lines.append(f"- {what}: not measured in this run")
        else:
            lines.append(f"- {what}: {shown.format(value)} → {'met' if ok(value) else 'NOT met'}")

    check("download ≥ 4x v2ray", ratio("down", "v2ray"), lambda r: r >= 4, "{:.2f}x")
    check(
        "download ≥ 1.75x pproxy ws+TLS", ratio("down", "pproxy-ws"), lambda r: r >= 1.75, "{:.2f}x"
    )
    check("upload ≥ 5x v2ray", ratio("up", "v2ray"), lambda r: r >= 5, "{:.2f}x")
    check("new conns/s ≥ 3.5x v2ray", ratio("conns", "v2ray"), lambda r: r >= 3.5, "{:.2f}x")
    check("p99 TTFB ≤ 1/3 of v2ray", ratio("p99", "v2ray"), lambda r: r <= 1 / 3, "{:.2f}x")
    check(
        "≤ 8 KiB per idle tunnelled conn", m("autovpn", "idle_kib"), lambda v: v <= 8, "{:.1f} KiB"
    )
    check("≤ 2.5 CPU-s per GiB", m("autovpn", "cpu_gib"), lambda v: v <= 2.5, "{:.2f} CPU-s/GiB")
    lines.append(
        "- UDP relay ≥ 80% of socat, < 1% loss; WireGuard ≥ 50% of direct: not implemented yet"
    )
    return lines


# -- machine -------------------------------------------------------------------------------------


def machine_info(specs: list[ChainSpec]) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        loop = f"uvloop {version('uvloop')}"
    except PackageNotFoundError:
        loop = "asyncio (uvloop not installed)"
    import ssl

    info = [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("event loop", loop),
        ("TLS", ssl.OPENSSL_VERSION),
    ]
    try:
        info.append(("websockets (C masking)", version("websockets")))
    except PackageNotFoundError:
        pass
    info.append(("autovpn", _autovpn_revision()))
    try:
        info.append(("load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    except OSError:
        pass
    for spec in specs:
        if spec.name in ("direct", "autovpn"):
            continue
        info.append(
            (spec.name, spec.version if spec.start is not None else f"absent: {spec.why_absent}")
        )
    return info


def _autovpn_revision() -> str:
    if chains.autovpn_source() != REPO:
        return f"from {chains.autovpn_source()} (BENCH_AUTOVPN_SRC)"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "autovpn"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    if not head:
        return "?"
    return f"commit {head}" + (" with uncommitted changes under autovpn/" if dirty else "")


# -- the routing and UDP rows ---------------------------------------------------------------------


def extra_rows(quick: bool) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    try:
        from benchmarks.routing_bench import run_routing_bench

        for name, value in run_routing_bench():
            rows.append((f"routing: {name}", _fmt(value)))
    except Exception as exc:  # the routing bench belongs to another module: report, go on
        rows.append(("routing", f"failed: {type(exc).__name__}: {exc}"[:80]))
    rows.append(("UDP datagrams/s via relay (vs socat)", "not implemented yet"))
    rows.append(("UDP loss at that rate", "not implemented yet"))
    rows.append(("WireGuard via autovpn ÷ direct", "not implemented yet"))
    return rows


# -- docs/benchmarks.md ---------------------------------------------------------------------


DOC_HEAD: Final = """\
# Benchmarks

`python -m benchmarks` measures autovpn side by side with direct connections and, with
`--peers`, with pproxy and v2ray, in the same run on the same machine.  The section between the
markers below is rewritten by every run that has `--out docs/benchmarks.md` (the default);
everything outside it is kept.

"""

DOC_TAIL: Final = """
"""


def write_doc(path: Path, generated: str) -> None:
    block = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail.lstrip("\n"))
        else:
            path.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(DOC_HEAD + block + DOC_TAIL)


def generated_section(results: Results, rows: list[list[str]], command: str) -> str:
    s = results.sizes
    lines = [
        "## Latest run",
        "",
        f"Command: `{command}`; {results.reps} repetitions, each on a freshly started chain;"
        f" cells are medians ±(max−min)/median.  Transfers: {s.transfer // MIB} MiB per"
        f" direction (capped at {s.transfer_seconds:.0f} s); connections: {s.conn_seconds:.0f} s"
        f" at 50 concurrent; idle: {s.idle} connections.  MB = 10^6 bytes.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    for key, value in machine_info(results.specs):
        lines.append(f"| {key} | {value} |")
    lines += ["", render_markdown(rows), "", "### Targets of issue 6 on this run", ""]
    lines += target_checks(results)
    if results.failures:
        lines += ["", "### Failures", ""]
        for name, errors in results.failures.items():
            for error in errors:
                lines.append(f"- {name}: {error[:300]}")
    return "\n".join(lines) + "\n"


# -- CLI -------------------------------------------------------------------------------------------


def run_benchmarks(
    *,
    quick: bool = False,
    peers: bool = False,
    reps: int = 3,
    only: Sequence[str] | None = None,
    sizes: Sizes | None = None,
    routing: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> tuple[Results, list[list[str]]]:
    raise_nofile()
    specs = chain_specs(peers, only)
    results = run_all(specs, reps, sizes or (Sizes.quick() if quick else Sizes.full()), log)
    if routing:
        results.extra_rows = extra_rows(quick)
    return results, build_table(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB transfers, 2 s of connections")
    p.add_argument("--peers", action="store_true", help="also measure pproxy and v2ray")
    p.add_argument("--reps", type=int, default=3, help="repetitions per chain (default 3)")
    p.add_argument("--only", action="append", help="only these chains (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-out", action="store_true", help="print only, write no file")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    results, rows = run_benchmarks(
        quick=args.quick, peers=args.peers, reps=args.reps, only=args.only
    )
    print(render_text(rows))
    print()
    print("\n".join(target_checks(results)))
    if not args.no_out:
        command = "python -m benchmarks" + " ".join(
            [""]
            + (["--quick"] if args.quick else [])
            + (["--peers"] if args.peers else [])
            + [f"--reps {args.reps}"]
        )
        write_doc(args.out, generated_section(results, rows, command))
        print(f"\nwritten to {args.out}")
    return 1 if results.failures else 0
