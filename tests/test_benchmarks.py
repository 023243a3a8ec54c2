"""Keeps the benchmark harness from rotting: tiny sizes, direct and autovpn only, no timing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.harness import (
    Sizes,
    build_table,
    render_markdown,
    render_text,
    run_benchmarks,
    target_checks,
    write_doc,
)


def test_harness_runs_direct_and_autovpn(tmp_path: Path) -> None:
    sizes = Sizes(transfer=8 << 20, transfer_seconds=10.0, conn_seconds=0.5, idle=50)
    results, rows = run_benchmarks(
        reps=1, only=["direct", "autovpn", "tcp"], sizes=sizes, routing=False, log=lambda s: None
    )
    assert not results.failures, results.failures
    for chain in ("direct", "autovpn"):
        assert (results.median(chain, "down") or 0) > 0
        assert (results.median(chain, "up") or 0) > 0
        assert (results.median(chain, "conns") or 0) > 0
    assert results.median("autovpn", "idle_kib") is not None
    assert results.median("autovpn", "cpu_gib") is not None
    assert rows == build_table(results)
    assert "autovpn" in render_text(rows)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# kept above\n")
    write_doc(doc, render_markdown(rows))
    write_doc(doc, render_markdown(rows))  # rewrites the generated block, keeps the rest
    text = doc.read_text()
    assert text.count("benchmarks:begin") == 1
    assert "# kept above" in text


@pytest.mark.skipif(not Path("/proc/net/udp").exists(), reason="needs Linux /proc")
def test_harness_udp_rows_at_low_rates() -> None:
    """Two 0.2 s trials (5k and 10k datagrams/s) through autovpn's relay, socat if present."""
    sizes = Sizes(
        transfer=1 << 20,
        transfer_seconds=1.0,
        conn_seconds=0.1,
        idle=1,
        udp_seconds=0.2,
        udp_max_rate=10_000,
    )
    only = ["autovpn", "udp"] + (["socat"] if shutil.which("socat") else [])
    results, rows = run_benchmarks(reps=1, only=only, sizes=sizes, log=lambda s: None)
    assert not results.failures, results.failures
    assert (results.median("autovpn", "udp_rate") or 0) > 1000
    assert (results.median("autovpn", "udp_loss") or 0) < 1
    assert results.median("autovpn", "udp_cpu") is not None
    assert any(r[0].startswith("UDP datagrams/s") for r in rows)
    assert not any(r[0].startswith("download") for r in rows)  # the TCP group did not run
    assert any("UDP relay ≥ 80% of socat" in line for line in target_checks(results))


def test_a_chain_writes_only_in_its_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's autovpn processes keep their state in the chain's temporary directory,
    never in the user's (HOME here is a fresh directory that must stay empty)."""
    from benchmarks import chains

    home = tmp_path / "chain-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    work = chains.make_certs(tmp_path / "work")
    run = chains.start_autovpn(work)
    try:
        run.check()
    finally:
        run.stop()
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []
    assert any((tmp_path / "work").glob("*state*"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_harness_memory_rows() -> None:
    """A burst of 50 handshakes against a lone server, RSS sampled right after it."""
    sizes = Sizes(
        transfer=1 << 20, transfer_seconds=1.0, conn_seconds=0.1, idle=1, burst=50, burst_wait=0
    )
    results, rows = run_benchmarks(
        reps=1, only=["autovpn", "memory"], sizes=sizes, log=lambda s: None
    )
    assert not results.failures, results.failures
    assert (results.median("autovpn", "mem_base") or 0) > 0
    assert results.median("autovpn", "mem_ratio") is not None
    assert any(r[0].startswith("server RSS after the burst") for r in rows)
    assert not any(r[0].startswith("download") for r in rows)  # the TCP group did not run
    assert any("handshake burst ≤ 2x" in line for line in target_checks(results))


# -- the C chain: stunnel + dante-server ----------------------------------------------------------


def _ini(text: str) -> dict[str, dict[str, str]]:
    """stunnel's configuration format: ``key = value`` lines, ``[service]`` sections, ``;``
    comments; the keys before the first section are the global ones (section "")."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = {}
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key = value line: {raw!r}"
        sections[current][key.strip()] = value.strip()
    return sections


def test_c_chain_configs_say_what_the_chain_needs(tmp_path: Path) -> None:
    """The stunnel client verifies the server against the harness's CA for localhost, both
    stunnels stay in the foreground without a pid file, and danted is a SOCKS5 server without
    authentication on loopback that connects only to 127.0.0.0/8."""
    from benchmarks import chains

    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    client = _ini(chains.stunnel_client_conf(1081, 1443, ca))
    server = _ini(chains.stunnel_server_conf(1443, 1080, cert, key))
    for conf in (client, server):
        assert conf[""] == {"foreground": "yes", "pid": "", "debug": "warning"}
    assert client["socks"] == {
        "client": "yes",
        "accept": "127.0.0.1:1081",
        "connect": "127.0.0.1:1443",
        "sni": "localhost",
        "verifyChain": "yes",
        "CAfile": str(ca),
        "checkHost": "localhost",
    }
    assert server["socks"] == {
        "accept": "127.0.0.1:1443",
        "cert": str(cert),
        "key": str(key),
        "connect": "127.0.0.1:1080",
    }
    dante = chains.danted_conf(1080)
    lines = [line.strip() for line in dante.splitlines()]
    assert "internal: 127.0.0.1 port = 1080" in lines
    assert "external: 127.0.0.1" in lines
    assert "socksmethod: none" in lines and "clientmethod: none" in lines
    assert "from: 127.0.0.0/8 to: 127.0.0.0/8" in lines  # the socks rule: loopback targets only
    assert not any(line.startswith("user.") for line in lines)  # runs as whoever starts it
    danted = chains.find_danted()
    if danted is not None:  # danted's own check of the file (-V: verify and exit)
        (tmp_path / "danted.conf").write_text(dante)
        check = subprocess.run(
            [danted, "-V", "-f", str(tmp_path / "danted.conf")],
            capture_output=True,
            text=True,
            env=dict(os.environ, TMPDIR=str(tmp_path)),
            timeout=30,
        )
        assert check.returncode == 0, check.stderr


def test_c_chain_absent_without_stunnel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness installs nothing: without stunnel the chain is reported, as absent."""
    from benchmarks.harness import chain_specs

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no peer on PATH
    for name in ("BENCH_STUNNEL", "BENCH_V2RAY", "BENCH_PPROXY_PYTHON"):
        monkeypatch.delenv(name, raising=False)
    specs = {s.name: s for s in chain_specs(peers=True, only=["stunnel+dante", "tcp"])}
    assert list(specs) == ["stunnel+dante"]
    spec = specs["stunnel+dante"]
    assert spec.absent and spec.start is None
    assert "stunnel" in spec.why_absent and "apt stunnel4 dante-server" in spec.why_absent


def _c_chain_installed() -> bool:
    from benchmarks import chains

    return chains.find_stunnel() is not None and chains.find_danted() is not None


_C_CHAIN = pytest.mark.skipif(
    not _c_chain_installed(),
    reason="needs stunnel and danted (apt-get install stunnel4 dante-server)",
)


@_C_CHAIN
def test_harness_runs_the_c_chain() -> None:
    """One tiny repetition of stunnel client → TLS → stunnel server → danted: data moves both
    ways, connections are made, and idle memory and CPU per GiB are measured."""
    sizes = Sizes(transfer=8 << 20, transfer_seconds=10.0, conn_seconds=0.5, idle=50)
    results, rows = run_benchmarks(
        peers=True,
        reps=1,
        only=["autovpn", "stunnel+dante", "tcp"],
        sizes=sizes,
        routing=False,
        log=lambda s: None,
    )
    assert not results.failures, results.failures
    for key in ("down", "up", "conns"):
        assert (results.median("stunnel+dante", key) or 0) > 0
    assert results.median("stunnel+dante", "idle_kib") is not None
    assert results.median("stunnel+dante", "cpu_gib") is not None
    assert "stunnel+dante TLS (C)" in rows[0] and "autovpn ÷ stunnel+dante" in rows[0]


@_C_CHAIN
def test_c_chain_refuses_a_server_its_ca_did_not_sign(tmp_path: Path) -> None:
    """The stunnel client really verifies: with another CA, no SOCKS5 session gets through
    (stunnel drops the client once the server's certificate fails), and stopping the chain
    leaves none of danted's forked children behind."""
    from benchmarks import chains

    work = chains.make_certs(tmp_path / "work")
    other = chains.make_certs(tmp_path / "other")
    stunnel, danted = chains.find_stunnel(), chains.find_danted()
    assert stunnel is not None and danted is not None
    wrong = chains.Workdir(work.path, other.ca, work.cert, work.key)
    run = chains.start_stunnel_dante(wrong, stunnel, danted)
    try:
        assert run.socks_port is not None
        workers = run.pids
        assert len(workers) > 3  # danted's children are counted with the chain
        with socket.create_connection(("127.0.0.1", run.socks_port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"\x05\x01\x00")
            try:
                reply = s.recv(2)
            except ConnectionResetError:
                reply = b""
        assert reply == b""
        run.check()
    finally:
        run.stop()
    assert "certificate verify failed" in (work.path / "stunnel-client.log").read_text()
    deadline = time.monotonic() + 5  # danted's mother reaps its children as they exit
    while (alive := [p for p in workers if Path(f"/proc/{p}").exists()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert alive == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers need Linux")
def test_workers_bench_runs_one_and_two_workers() -> None:
    from benchmarks import workers_bench

    sizes = workers_bench.Sizes(transfer=8 << 20, transfer_seconds=10.0, conn_seconds=0.5)
    samples = workers_bench.run_bench([1, 2], 1, sizes, log=lambda s: None)
    rows = workers_bench.summarize(samples)
    assert [(r["workers"], r["steer_by"]) for r in rows] == [
        (1, ""),
        (2, "connection"),
        (2, "address"),
    ]
    for row in rows:
        assert row["conns_per_s"] > 0 and row["down_mbs"] > 0
        assert row["cpu_s_per_gib"] > 0
    # Each process's CPU is its own: the supervisor and both workers are listed.
    assert set(rows[1]["cpu_down"]) == {"client", "supervisor", "worker 0", "worker 1"}
    rendered = workers_bench.render(rows)
    assert "| 1 |" in rendered and "| 2 (connection) |" in rendered, rendered
    assert "| 2 (address) |" in rendered, rendered
