"""The program that steers ``autovpn server --workers N``'s connections (autovpn/reuseport.py),
run by the kernel: real listening sockets of one reuseport group, real connections from
several loopback addresses, each accepted where ``reuseport.slot`` (the program's mirror in
Python) says."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from autovpn import reuseport
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from tests.conftest import SECRET, Certs, eventually, run
from tests.tunnel.test_safe_defaults import native_request

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


def test_a_kernel_that_refuses_the_program_is_said_once_and_spreads_by_its_hash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel without SO_ATTACH_REUSEPORT_CBPF (before Linux 4.5): here an option number
    no kernel has, which it refuses the same way."""
    monkeypatch.setattr(reuseport, "_SO_ATTACH_REUSEPORT_CBPF", 9999)
    with group("127.0.0.1", 2, "address") as listening:
        assert not listening.steer([0, 1])
        assert listening.unsteered == "SO_ATTACH_REUSEPORT_CBPF refused: ENOPROTOOPT"
        assert not listening.steer([1])  # not tried again, not logged again
        warnings = [r for r in caplog.records if "refused the program" in r.getMessage()]
        assert len(warnings) == 1
        # Served all the same, by the kernel's hash over both sockets.
        assert {accepted_by(listening, "127.0.0.1")[0] for _ in range(40)} == {0, 1}


def test_a_worker_serves_every_address_of_its_listen_host(certs: Certs) -> None:
    """The listen host stands for two addresses (here none: every IPv4 and IPv6 address):
    a group each, and a worker's tunnel server listens on its slot's socket of both."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with group("", 2, "address") as listening:
        families = sorted(g[0].family for g in listening.groups)
        assert families == sorted([socket.AF_INET, socket.AF_INET6])
        assert listening.steer([0, 1])
        port = listening.groups[0][0].getsockname()[1]

        async def main() -> None:
            def settings(index: int) -> ServerSettings:
                # Each worker's own copies of its slot's descriptors (one per family).
                fds = tuple(os.dup(fd) for fd in listening.fds(index))
                return ServerSettings("", port, {"default": SECRET}, listen_fds=fds)

            async with TunnelServer(settings(0)) as w0, TunnelServer(settings(1)) as w1:
                workers = [w0, w1]
                assert w0.port == w1.port == port
                for host, source in (("127.0.0.1", "127.0.0.9"), ("::1", "::1")):
                    reader, writer = await asyncio.open_connection(
                        host, port, local_addr=(source, 0)
                    )
                    writer.write(native_request(SECRET, port))
                    assert (await reader.readline()).startswith(b"HTTP/1.1 101"), host
                    home = workers[reuseport.slot(source, 0, 2)]
                    assert len(home.connections) == 1, host
                    writer.close()
                    await eventually(lambda: not w0.connections and not w1.connections)

        run(main())
