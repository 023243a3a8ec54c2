"""IP scoring: the score formula's behaviour, RFC 8305 family interleaving, and the history file."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from autovpn.routing.scoring import ScoreBook, interleave_families


def test_unknown_addresses_keep_the_resolver_order() -> None:
    book = ScoreBook()
    assert book.order(["::1", "127.0.0.2", "127.0.0.3"], 0.0) == ["::1", "127.0.0.2", "127.0.0.3"]


def test_failures_sink_and_are_forgiven_with_time() -> None:
    book = ScoreBook(failure_half_life=60.0)
    for _ in range(3):
        book.record_failure("127.0.0.2", 100.0)
    book.record_success("127.0.0.3", 0.02, 100.0)
    assert book.order(["127.0.0.2", "127.0.0.3"], 101.0) == ["127.0.0.3", "127.0.0.2"]
    fresh = book.score("127.0.0.9", 101.0)
    assert book.score("127.0.0.2", 101.0) < fresh
    # An hour later the failure streak has decayed away; only the success rate remains.
    assert book.score("127.0.0.2", 3700.0) > 0.9 * book.score("127.0.0.2", 3700.0 + 1e6)


def test_faster_address_wins_among_reliable_ones() -> None:
    book = ScoreBook()
    for _ in range(5):
        book.record_success("127.0.0.2", 0.200, 0.0)
        book.record_success("127.0.0.3", 0.010, 0.0)
    assert book.order(["127.0.0.2", "127.0.0.3"], 1.0)[0] == "127.0.0.3"
    s = book.stats["127.0.0.3"]
    assert s.rtt_ms is not None and abs(s.rtt_ms - 10.0) < 1e-6
    assert s.success_rate == 6 / 7


def test_rtt_is_a_moving_average() -> None:
    book = ScoreBook()
    book.record_success("a", 0.100, 0.0)
    book.record_success("a", 0.200, 0.0)
    assert book.stats["a"].rtt_ms == 100.0 + 0.3 * 100.0


def test_interleave_starts_with_the_best_family_then_alternates() -> None:
    addrs = ["127.0.0.2", "127.0.0.3", "::1", "::2", "127.0.0.4"]
    assert interleave_families(addrs) == ["127.0.0.2", "::1", "127.0.0.3", "::2", "127.0.0.4"]
    assert interleave_families(["::1", "127.0.0.1"]) == ["::1", "127.0.0.1"]
    assert interleave_families([]) == []


@given(st.lists(st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "::2", "::3"]), unique=True))
def test_interleave_is_a_permutation_keeping_each_family_order(addrs: list[str]) -> None:
    out = interleave_families(addrs)
    assert sorted(out) == sorted(addrs)
    for fam in (":", "."):
        assert [a for a in out if fam in a] == [a for a in addrs if fam in a]


def test_country_comes_from_the_geo_lookup() -> None:
    book = ScoreBook(geo=lambda a: "ZZ" if a.startswith("127.") else None)
    book.record_success("127.0.0.2", 0.01, 0.0)
    assert book.describe("127.0.0.2", 0.0)["country"] == "ZZ"
    assert book.describe("::1", 0.0)["country"] is None


def test_history_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ip-scores.json"
    book = ScoreBook()
    book.record_success("127.0.0.2", 0.05, 10.0)
    book.record_failure("::1", 11.0)
    book.save(path)
    again = ScoreBook()
    assert again.load(path) == 2
    assert again.stats == book.stats
    assert again.order(["::1", "127.0.0.2"], 12.0) == ["127.0.0.2", "::1"]


def test_corrupt_history_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "ip-scores.json"
    path.write_text("{not json")
    assert ScoreBook().load(path) == 0
    assert (tmp_path / "ip-scores.json.corrupt").exists()
    assert ScoreBook().load(tmp_path / "missing.json") == 0


def test_bad_entries_are_skipped() -> None:
    good = {"attempts": 2, "successes": 1, "rtt_ms": 3.0}
    data = {
        "version": 1,
        "addresses": {
            "127.0.0.2": good,
            "127.0.0.3": {"attempts": 1, "successes": 5},
            "127.0.0.4": {"attempts": "x"},
            "127.0.0.5": {"attempts": float("nan")},
        },
    }
    book = ScoreBook()
    assert book.load_json(json.loads(json.dumps(data))) == 1
    assert book.load_json({"version": 99}) == 0


def test_book_is_bounded() -> None:
    book = ScoreBook(max_addresses=3)
    for i in range(10):
        book.record_success(f"127.0.0.{i}", 0.01, float(i))
    assert set(book.stats) == {"127.0.0.7", "127.0.0.8", "127.0.0.9"}
