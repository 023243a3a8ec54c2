"""Keeps the benchmark harness from rotting: tiny sizes, direct and autovpn only, no timing."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import (
    Sizes,
    build_table,
    render_markdown,
    render_text,
    run_benchmarks,
    write_doc,
)


def test_harness_runs_direct_and_autovpn(tmp_path: Path) -> None:
    sizes = Sizes(transfer=8 << 20, transfer_seconds=10.0, conn_seconds=0.5, idle=50)
    results, rows = run_benchmarks(
        reps=1, only=["direct", "autovpn"], sizes=sizes, routing=False, log=lambda s: None
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
