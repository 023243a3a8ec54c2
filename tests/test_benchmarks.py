"""Keeps the benchmark harness from rotting: tiny sizes, direct and autovpn only, no timing."""

from __future__ import annotations

import shutil
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
