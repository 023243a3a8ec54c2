"""The program that steers ``autovpn server --workers N``'s connections (autovpn/reuseport.py),
run by the kernel: real listening sockets of one reuseport group, real connections from
several loopback addresses, each accepted where ``reuseport.slot`` (the program's mirror in
Python) says."""

from __future__ import annotations

import select
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from autovpn import reuseport

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_ATTACH_REUSEPORT_CBPF is Linux's"
)

SOURCES = [f"127.0.0.{i}" for i in range(1, 41)] + ["127.1.2.3", "127.200.0.9"]


@contextmanager
def group(host: str, count: int, by: str) -> Iterator[reuseport.ListenGroup]:
    listening = reuseport.ListenGroup(host, 0, 1, by)
    listening.open()  # the first socket picks the port; the others join it
    port = listening.groups[0][0].getsockname()[1]
    listening.close()
    listening = reuseport.ListenGroup(host, port, count, by)
    listening.open()
    try:
        yield listening
    finally:
        listening.close()


def accepted_by(listening: reuseport.ListenGroup, source: str) -> tuple[int, int]:
    """Connect from ``source``: (the slot whose socket accepted it, the client's port)."""
    socks = listening.groups[0]
    host, port = socks[0].getsockname()[:2]
    family = socks[0].family
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect((host, port))
        ready, _, _ = select.select(socks, [], [], 10)
        assert len(ready) == 1, ready
        conn, _ = ready[0].accept()
        conn.close()
        return socks.index(ready[0]), client.getsockname()[1]


def check(listening: reuseport.ListenGroup, sources: Sequence[str], live: list[int]) -> set[int]:
    assert listening.steer(live), listening.unsteered
    seen = set()
    for source in sources:
        for _ in range(2):
            index, port = accepted_by(listening, source)
            want = reuseport.slot(source, port, listening.count, live, listening.by)
            assert index == want, (source, port, live)
            seen.add(index)
    return seen


@pytest.mark.parametrize("count", [2, 3, 4])
def test_every_connection_of_an_address_reaches_the_slot_the_mirror_names(count: int) -> None:
    with group("127.0.0.1", count, "address") as listening:
        assert check(listening, SOURCES, list(range(count))) == set(range(count))
        # One address, many connections (ports): one slot.
        slots = {accepted_by(listening, "127.0.0.7")[0] for _ in range(20)}
        assert slots == {reuseport.slot("127.0.0.7", 0, count)}


def test_a_slot_whose_worker_is_down_sends_its_share_to_the_live_ones() -> None:
    with group("127.0.0.1", 3, "address") as listening:
        for live in ([0, 2], [1], [0, 1]):
            assert check(listening, SOURCES, live) <= set(live)
        assert check(listening, SOURCES, [0, 1, 2]) == {0, 1, 2}  # all back: as before


def test_by_connection_the_ports_of_one_address_spread() -> None:
    with group("127.0.0.1", 2, "connection") as listening:
        assert check(listening, ["127.0.0.1"] * 20, [0, 1]) == {0, 1}
        assert check(listening, ["127.0.0.1"] * 20, [1]) == {1}


def test_ipv6_is_steered_by_its_slash_64() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with group("::1", 3, "address") as listening:
        check(listening, ["::1"], [0, 1, 2])
    # The mirror: the /64 is the key, the interface identifier is not.
    assert reuseport.slot("2001:db8::1", 1, 7) == reuseport.slot("2001:db8::ffff:2", 2, 7)
    assert reuseport.slot("::ffff:192.0.2.1", 1, 7) == reuseport.slot("192.0.2.1", 9, 7)


def test_the_programs_jumps_stay_in_range_for_256_slots() -> None:
    for live in ([0], [255], list(range(1, 256)), list(range(0, 256, 2))):
        code = reuseport.program(256, live, "connection")
        assert len(code) <= 4096  # BPF_MAXINSNS
        for i, (op, jt, jf, _) in enumerate(code):
            assert 0 <= jt < 256 and 0 <= jf < 256
            if op & 0x07 == 0x05:
                assert i + 1 + max(jt, jf) < len(code)
    with pytest.raises(ValueError, match="steer_by"):
        reuseport.program(2, [0, 1], "random")
