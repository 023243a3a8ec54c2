"""Reading the host's own interface addresses (autovpn.ifaddrs), which the tunnel server refuses."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import struct
import subprocess
import sys

import pytest

from autovpn import ifaddrs
from autovpn.ifaddrs import HostAddresses, IPAddress, parse_rtnetlink_addresses

LINUX = sys.platform.startswith("linux")


# -- the rtnetlink parser, with bytes ----------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body


def newaddr(family: int, *attrs: bytes) -> bytes:
    return message(20, struct.pack("=BBBBI", family, 24, 0, 0, 2) + b"".join(attrs))


V4_LOCAL = ipaddress.IPv4Address("192.0.2.2")
V4_PEER = ipaddress.IPv4Address("192.0.2.9")
V6 = ipaddress.IPv6Address("2001:db8::2")
DONE = message(3, struct.pack("=i", 0))


def test_parses_addresses_of_both_families() -> None:
    data = (
        newaddr(2, attr(1, V4_LOCAL.packed), attr(2, V4_LOCAL.packed), attr(3, b"eth0\0"))
        + newaddr(10, attr(1, V6.packed), attr(6, bytes(16)))
        + newaddr(2, attr(1, V4_PEER.packed), attr(2, V4_LOCAL.packed))  # point-to-point
    )
    assert parse_rtnetlink_addresses(data) == ([V4_LOCAL, V6, V4_LOCAL], False)


def test_done_ends_the_dump() -> None:
    found, done = parse_rtnetlink_addresses(newaddr(10, attr(1, V6.packed)) + DONE)
    assert (found, done) == ([V6], True)


def test_other_families_and_messages_are_skipped() -> None:
    data = newaddr(17, attr(1, b"\1" * 6)) + message(16, b"\0" * 16) + message(2, b"\0" * 20)
    assert parse_rtnetlink_addresses(data) == ([], False)


def test_a_netlink_error_is_an_oserror() -> None:
    with pytest.raises(OSError) as info:
        parse_rtnetlink_addresses(message(2, struct.pack("=i", -1) + b"\0" * 16))
    assert info.value.errno == 1


@pytest.mark.parametrize(
    "data",
    [
        newaddr(2, attr(2, V4_LOCAL.packed))[:-2],  # message longer than the datagram
        struct.pack("=IHHII", 8, 20, 0, 0, 0),  # length below the header's
        message(20, struct.pack("=BBBBI", 2, 32, 0, 0, 1) + struct.pack("=HH", 40, 2)),
    ],
)
def test_malformed_dumps_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_rtnetlink_addresses(data)


# -- the reader, on this host ------------------------------------------------------------------


def ip_addr_output() -> set[IPAddress]:
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("iproute2's ip is not installed")
    out = subprocess.run([ip, "-j", "addr"], capture_output=True, check=True, text=True).stdout
    return {
        ipaddress.ip_address(info["local"])
        for link in json.loads(out)
        for info in link.get("addr_info", ())
        if "local" in info
    }


def test_interface_addresses_include_loopback() -> None:
    found = ifaddrs.interface_addresses()
    assert ipaddress.IPv4Address("127.0.0.1") in found
    if os.path.exists("/proc/net/if_inet6") and "::1" in _proc_if_inet6():
        assert ipaddress.IPv6Address("::1") in found


def _proc_if_inet6() -> set[str]:
    with open("/proc/net/if_inet6") as f:
        return {str(ipaddress.IPv6Address(int(line.split()[0], 16))) for line in f}


def test_interface_addresses_match_ip_addr() -> None:
    assert ifaddrs.interface_addresses() == ip_addr_output()


@pytest.mark.skipif(not LINUX, reason="rtnetlink is Linux's")
def test_rtnetlink_and_getifaddrs_agree_with_ip_addr() -> None:
    # getifaddrs is the reader on other systems; glibc has it too, so it is checked here.
    expected = ip_addr_output()
    assert set(ifaddrs._read_rtnetlink()) == expected
    assert set(ifaddrs._read_getifaddrs()) == expected


_IN_NAMESPACE = """
import ipaddress, subprocess, sys
from autovpn.ifaddrs import HostAddresses, interface_addresses
own = HostAddresses(ttl=0.0)
before = own()
subprocess.run(["ip", "addr", "add", "198.51.100.7/32", "dev", "lo"], check=True)
after = own()
print(" ".join(sorted(map(str, before))))
print(" ".join(sorted(map(str, after))))
print(" ".join(sorted(map(str, interface_addresses()))))
"""


def test_reads_addresses_added_in_a_private_namespace() -> None:
    """An address given to ``lo`` in a namespace of its own (never this host's interfaces) is
    read, and a HostAddresses whose time is up reads it when it comes."""
    if not LINUX or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs Linux with unshare and ip")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here (not root?)")
    script = 'ip link set lo up && ip addr add 192.0.2.2/32 dev lo && exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, sys.executable, _IN_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    before, after, again = (set(line.split()) for line in result.stdout.splitlines())
    assert {"127.0.0.1", "192.0.2.2"} <= before
    assert "198.51.100.7" not in before
    assert after == before | {"198.51.100.7"} == again


# -- HostAddresses: the reading kept for a while ----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_host_addresses_are_read_again_after_the_ttl() -> None:
    readings: list[frozenset[IPAddress]] = [
        frozenset({V4_LOCAL}),
        frozenset({V4_LOCAL}),
        frozenset({V4_LOCAL, V6}),
    ]
    reads: list[frozenset[IPAddress]] = []

    def read() -> frozenset[IPAddress]:
        reads.append(readings[len(reads)])
        return reads[-1]

    clock = Clock()
    own = HostAddresses(1.0, read=read, clock=clock)
    first = own()
    assert first == {V4_LOCAL} and own() is first and len(reads) == 1
    clock.now += 0.99
    assert own() is first and len(reads) == 1
    clock.now += 0.01
    assert own() is first and len(reads) == 2  # read again, unchanged: the same object
    clock.now += 1.0
    assert own() == {V4_LOCAL, V6} and len(reads) == 3


def test_a_failed_read_keeps_the_last_answer_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[frozenset[IPAddress] | OSError] = [
        frozenset({V4_LOCAL}),
        OSError(97, "Address family not supported by protocol"),
        OSError(97, "Address family not supported by protocol"),
        frozenset({V6}),
    ]

    def read() -> frozenset[IPAddress]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    clock = Clock()
    own = HostAddresses(1.0, read=read, clock=clock)
    with caplog.at_level(logging.WARNING, "autovpn.ifaddrs"):
        assert own() == {V4_LOCAL}
        for _ in range(2):
            clock.now += 1
            assert own() == {V4_LOCAL}
        clock.now += 1
        assert own() == {V6}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot read this host's interface addresses" in warnings[0].getMessage()
