"""``python -m benchmarks``: every chain side by side, medians of fresh-chain repetitions.

For each repetition, every chain is started fresh (its own processes and config in a temp
dir), measured, and stopped; chains are interleaved within a repetition so that drift of the
shared machine hits all of them alike.  On each fresh chain, in this order:

1. idle memory: RSS of all chain processes with one live stream, then with N more held open;
2. new connections per second (50 concurrent SOCKS5 connects, one short HTTP exchange each),
   with p50/p99 time to first byte and the chain's CPU per request;
3. single-connection download, then upload (MB/s = 10^6 bytes/s), with the chain's CPU.

UDP chains (direct, autovpn's UDP relay, a socat relay) get a fresh chain per repetition too:
4. the highest rate of 1,400-byte datagrams delivered with under 1% loss (fixed-rate trials,
   ``loadgen.test_udp``), MB/s and loss at that rate, chain CPU per datagram;
5. WireGuard (wireguard-go, root only) TCP throughput direct, via autovpn and via socat
   (``benchmarks/wg_bench.py``).

The ``memory`` group starts a lone ``autovpn server`` per repetition and measures its RSS before
and after a burst of 20,000 tunnel handshakes (``benchmarks/memory_burst.py``).

``--only`` takes chain names (direct, autovpn, pproxy, pproxy-ws, v2ray, stunnel+dante, socat)
and/or groups (tcp, udp, wireguard, routing, memory); with no group named, all groups run.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
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
    udp_seconds: float = 2.0  # each fixed-rate UDP trial
    wg_transfer: int = 256 * MIB  # one TCP transfer inside WireGuard
    udp_max_rate: float = 400_000.0  # the UDP ladder stops here (datagrams/s)
    burst: int = 20_000  # tunnel handshakes in the memory burst
    burst_wait: float = 60.0  # seconds after the burst of its last RSS sample

    @classmethod
    def full(cls) -> Sizes:
        return cls(GIB, 20.0, 5.0, 2000, 2.0, 256 * MIB)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(256 * MIB, 8.0, 2.0, 2000, 1.0, 64 * MIB)


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
    ("udp_rate", "UDP datagrams/s at < 1% loss (1,400 B)", True),
    ("udp_mbs", "UDP MB/s delivered at that rate", True),
    ("udp_loss", "UDP loss % at that rate", False),
    ("udp_cpu", "UDP chain CPU µs per datagram", False),
    ("udp_gen", "UDP loadgen CPU % of a core", False),
    ("wg_mbit", "WireGuard TCP Mbit/s (wireguard-go)", True),
    ("wg_ratio", "WireGuard ÷ WireGuard direct (per rep)", True),
    ("mem_base", "server RSS MiB before a handshake burst", False),
    ("mem_peak", "server RSS MiB at the burst's peak", False),
    ("mem_after", "server RSS MiB after the burst (last sample)", False),
    ("mem_ratio", "server RSS after the burst ÷ before", False),
]

#: Test groups for ``--only``.
GROUPS: Final = ("tcp", "udp", "wireguard", "routing", "memory")


def measure_memory(work: Workdir, sizes: Sizes, log: Callable[[str], None]) -> dict[str, float]:
    """A lone autovpn server's RSS before and after ``sizes.burst`` tunnel handshakes."""
    from benchmarks import memory_burst

    samples = [t for t in memory_burst.SAMPLES if t < sizes.burst_wait] + [sizes.burst_wait]
    r = memory_burst.burst(work, count=sizes.burst, samples=samples, log=log)
    log(f"    memory: {r.describe()}")
    if r.failed:
        raise RuntimeError(f"memory burst: {r.failed} of {r.handshakes} handshakes failed")
    return {
        "mem_base": r.baseline_kib / 1024,
        "mem_peak": r.peak_kib / 1024,
        "mem_after": r.samples[-1][1] / 1024,
        "mem_ratio": r.final_ratio,
    }


def measure_udp(
    chain: Running, sizes: Sizes, log: Callable[[str], None], *, sink: int
) -> dict[str, float]:
    """Datagram rate through ``chain.udp_port`` to a sink on ``sink`` (loadgen ``udp``)."""
    assert chain.udp_port is not None
    r = run_loadgen(
        chain,
        "udp",
        {
            "target": chain.udp_port,
            "sink": sink,
            "seconds": sizes.udp_seconds,
            "max_rate": sizes.udp_max_rate,
            "pids": chain.pids,
        },
        timeout=40 * (sizes.udp_seconds + 1) + 60,
    )
    best = r["best"]
    trials = ", ".join(f"{t['offered'] / 1e3:.0f}k:{t['loss']:.1f}%" for t in r["trials"])
    log(f"    udp trials (offered:loss) {trials}")
    if best is None:
        raise RuntimeError(f"{chain.name}: no UDP rate had < 1% loss ({trials})")
    out = {
        "udp_rate": best["rate"],
        "udp_mbs": best["mbs"],
        "udp_loss": best["loss"],
        "udp_gen": best["gen_share"] * 100,
    }
    if chain.pids:
        out["udp_cpu"] = best["cpu_us"]
    log(
        f"    udp: {best['rate']:,.0f} datagrams/s ({best['mbs']:.0f} MB/s) at"
        f" {best['offered']:,.0f} offered, loss {best['loss']:.2f}%, chain"
        f" {best['cpu_us']:.1f} µs/datagram, gen {best['gen_share'] * 100:.0f}%"
        + (" (generator-limited)" if r["gen_limited"] else "")
    )
    return out


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
    start: Callable[[Workdir], Running] | None  # TCP chain (None: none, or absent)
    version: str = ""
    why_absent: str = ""
    #: UDP relay to a sink port (None: no UDP chain); its name is also the WireGuard path.
    udp_start: Callable[[Workdir, int], Running] | None = None

    @property
    def absent(self) -> bool:
        return bool(self.why_absent)


def _start_direct_udp(work: Workdir, sink: int) -> Running:
    return Running("direct", None, udp_port=sink)


def chain_specs(peers: bool, only: Sequence[str] | None = None) -> list[ChainSpec]:
    specs = [
        ChainSpec("direct", "direct (limit)", chains.start_direct, udp_start=_start_direct_udp),
        ChainSpec(
            "autovpn", "autovpn wss mux", chains.start_autovpn, udp_start=chains.start_autovpn_udp
        ),
    ]
    groups = _groups(only)
    if "udp" in groups or "wireguard" in groups:
        socat = chains.find_socat()
        if socat is not None:
            specs.append(
                ChainSpec(
                    "socat",
                    "socat UDP relay",
                    None,
                    chains.socat_version(socat),
                    udp_start=lambda w, sink: chains.start_socat_udp(w, sink, socat),
                )
            )
        else:
            specs.append(
                ChainSpec(
                    "socat", "socat UDP relay", None, why_absent="socat not found (apt socat)"
                )
            )
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
        stunnel, danted = chains.find_stunnel(), chains.find_danted()
        title = "stunnel+dante TLS (C)"
        if stunnel is not None and danted is not None:
            specs.append(
                ChainSpec(
                    "stunnel+dante",
                    title,
                    lambda w: chains.start_stunnel_dante(w, stunnel, danted),
                    f"{chains.stunnel_version(stunnel)}, {chains.danted_version(danted)}",
                )
            )
        else:
            missing = " and ".join(
                what for what, found in (("stunnel", stunnel), ("danted", danted)) if found is None
            )
            why = f"{missing} not found (apt stunnel4 dante-server)"
            specs.append(ChainSpec("stunnel+dante", title, None, why_absent=why))
    names = [o for o in only or () if o not in GROUPS]
    if names:
        specs = [s for s in specs if s.name in names]
    return specs


def _groups(only: Sequence[str] | None) -> set[str]:
    named = {o for o in only or () if o in GROUPS}
    return named or set(GROUPS)


# -- results -------------------------------------------------------------------------------


@dataclass
class Results:
    specs: list[ChainSpec]
    reps: int
    sizes: Sizes
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    extra_rows: list[tuple[str, str]] = field(default_factory=list)
    groups: set[str] = field(default_factory=lambda: set(GROUPS))
    #: Why a whole metric was not measured (e.g. WireGuard without root), shown in its row.
    notes: dict[str, str] = field(default_factory=dict)

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


_ERRORS: Final = (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError)


def run_all(
    specs: list[ChainSpec],
    reps: int,
    sizes: Sizes,
    log: Callable[[str], None],
    groups: set[str] | None = None,
) -> Results:
    groups = set(GROUPS) if groups is None else groups
    results = Results(specs, reps, sizes, groups=groups)
    from benchmarks import wg_bench

    wg_absent = wg_bench.why_absent() if "wireguard" in groups else None
    if wg_absent is not None:
        results.notes["wg_mbit"] = results.notes["wg_ratio"] = wg_absent
    with tempfile.TemporaryDirectory(prefix="autovpn-bench-") as tmp:
        work = chains.make_certs(Path(tmp))
        for rep in range(1, reps + 1):
            wg: dict[str, float] = {}
            for spec in specs:
                if spec.absent:
                    continue
                if "memory" in groups and spec.name == "autovpn":
                    log(f"rep {rep}/{reps} autovpn memory")
                    try:
                        results.add(spec.name, measure_memory(work, sizes, log))
                    except _ERRORS as exc:
                        results.failures.setdefault(spec.name, []).append(f"memory: {exc}")
                        log(f"    FAILED: memory: {exc}")
                if "tcp" in groups and spec.start is not None:
                    log(f"rep {rep}/{reps} {spec.name}")
                    _run_one(
                        results, spec.name, partial(spec.start, work), measure_chain, sizes, log
                    )
                if "udp" in groups and spec.udp_start is not None:
                    log(f"rep {rep}/{reps} {spec.name} udp")
                    sink = chains.free_udp_port()
                    _run_one(
                        results,
                        spec.name,
                        partial(spec.udp_start, work, sink),
                        partial(measure_udp, sink=sink),
                        sizes,
                        log,
                    )
                if (
                    "wireguard" in groups
                    and wg_absent is None
                    and spec.udp_start is not None
                    and spec.name in wg_bench.VIAS
                ):
                    log(f"rep {rep}/{reps} {spec.name} wireguard")
                    try:
                        r = wg_bench.measure(spec.name, work, sizes.wg_transfer)
                    except _ERRORS as exc:
                        results.failures.setdefault(spec.name, []).append(f"wireguard: {exc}")
                        log(f"    FAILED: wireguard: {exc}")
                        continue
                    wg[spec.name] = r["mbit"]
                    results.add(spec.name, {"wg_mbit": r["mbit"]})
                    log(
                        f"    wireguard via {spec.name}: {r['mbit']:,.0f} Mbit/s"
                        f" ({r['bytes'] / MIB:,.0f} MiB in {r['seconds']:.2f} s)"
                        f" relay CPU {r['relay_cpu']:.2f}s"
                    )
            if "direct" in wg:  # ratios within one repetition: drift hits both alike
                for name, mbit in wg.items():
                    if name != "direct":
                        results.add(name, {"wg_ratio": mbit / wg["direct"]})
    return results


def _run_one(
    results: Results,
    name: str,
    start: Callable[[], Running],
    measure: Callable[[Running, Sizes, Callable[[str], None]], dict[str, float]],
    sizes: Sizes,
    log: Callable[[str], None],
) -> None:
    running: Running | None = None
    try:
        running = start()
        results.add(name, measure(running, sizes, log))
    except _ERRORS as exc:
        results.failures.setdefault(name, []).append(str(exc))
        log(f"    FAILED: {exc}")
    finally:
        if running is not None:
            running.stop()


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
    header += [f"autovpn ÷ {s.name}" for s in peers if not s.absent]
    rows = [header]
    for key, label, _ in METRICS:
        measured = any(results.samples.get(n, {}).get(key) for n in names)
        if not measured and key not in results.notes:
            continue  # a test group this run did not include
        row = [label]
        for spec in results.specs:
            if spec.absent:
                row.append("absent")
                continue
            med = results.median(spec.name, key)
            spread = results.spread(spec.name, key)
            if med is None and key in results.notes and _applies(spec, key):
                row.append(results.notes[key])
                continue
            if med is None and spec.name in results.failures and _applies(spec, key):
                row.append("failed")
                continue
            cell = _fmt(med)
            if spread is not None and med is not None:
                cell += f" ±{spread:.0f}%"
            row.append(cell)
        mine = results.median("autovpn", key) if "autovpn" in names else None
        for spec in peers:
            if spec.absent:
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


def _applies(spec: ChainSpec, key: str) -> bool:
    """Whether metric ``key`` is measured on ``spec`` at all (TCP rows on a UDP-only relay
    are not; nor CPU/ratio rows on direct)."""
    if key.startswith("mem_"):
        return spec.name == "autovpn"
    udp = key.startswith(("udp_", "wg_"))
    if udp:
        return spec.udp_start is not None and not (
            spec.name == "direct" and key in ("udp_cpu", "wg_ratio")
        )
    return spec.start is not None


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
    udp = ratio("udp_rate", "socat")
    loss = m("autovpn", "udp_loss")
    if udp is None or loss is None:
        lines.append(
            "- UDP relay ≥ 80% of socat's datagram rate, < 1% loss: not measured in this run"
        )
    else:
        met = udp >= 0.8 and loss < 1
        lines.append(
            f"- UDP relay ≥ 80% of socat's datagram rate, < 1% loss: {udp:.2f}x socat at"
            f" {loss:.2f}% loss → {'met' if met else 'NOT met'}"
        )
    check(
        "server RSS after the handshake burst ≤ 2x before (issue 12)",
        m("autovpn", "mem_ratio"),
        lambda r: r <= 2,
        "{:.2f}x",
    )
    if "wg_ratio" in results.notes:
        lines.append(f"- WireGuard via autovpn ≥ 50% of direct: {results.notes['wg_ratio']}")
    else:
        check(
            "WireGuard via autovpn ≥ 50% of direct (median of per-rep ratios)",
            m("autovpn", "wg_ratio"),
            lambda r: r >= 0.5,
            "{:.0%}",
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
        info.append((spec.name, f"absent: {spec.why_absent}" if spec.absent else spec.version))
    wg = shutil.which("wireguard-go")
    if wg is not None:
        out = subprocess.run([wg, "--version"], capture_output=True, text=True)
        info.append(("wireguard-go", (out.stdout.strip().splitlines() or ["?"])[0]))
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
        f" at 50 concurrent; idle: {s.idle} connections.  UDP: {s.udp_seconds:.0f} s per"
        f" fixed-rate trial; WireGuard: {s.wg_transfer // MIB} MiB per transfer.  Memory:"
        f" {s.burst:,} tunnel handshakes, RSS {s.burst_wait:g} s after.  MB = 10^6 bytes.",
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
    groups = _groups(only)
    results = run_all(specs, reps, sizes or (Sizes.quick() if quick else Sizes.full()), log, groups)
    if routing and "routing" in groups:
        results.extra_rows = extra_rows(quick)
    return results, build_table(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB transfers, 2 s of connections")
    p.add_argument(
        "--peers", action="store_true", help="also measure pproxy, v2ray and stunnel+dante"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions per chain (default 3)")
    p.add_argument(
        "--only",
        action="append",
        help="only these chains and/or test groups (tcp, udp, wireguard, routing, memory);"
        " repeatable",
    )
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
            + [f"--only {o}" for o in args.only or ()]
        )
        write_doc(args.out, generated_section(results, rows, command))
        print(f"\nwritten to {args.out}")
    return 1 if results.failures else 0
