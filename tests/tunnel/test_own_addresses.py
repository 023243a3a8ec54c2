"""The tunnel server refuses the host's own non-loopback addresses (SSRF through a service on
0.0.0.0), checked in a network namespace the test makes: the real machine's interfaces are
never touched.  The dials themselves are in ``own_addresses_scenario.py``."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autovpn.ifaddrs import HostAddresses, IPAddress
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer

ROOT = Path(__file__).resolve().parents[2]
SETUP = (
    "ip link set lo up && ip addr add 192.0.2.2/32 dev lo && ip addr add 2001:db8::2/128 dev lo"
    ' && exec "$0" -m tests.tunnel.own_addresses_scenario "$@"'
)


def scenario(allow: str, tmp_path: Path, *options: str) -> dict[str, str]:
    if not sys.platform.startswith("linux") or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("needs Linux with unshare and ip (iproute2)")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a private network namespace here (not root?)")
    env = dict(os.environ, AUTOVPN_STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", SETUP, sys.executable, allow, *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    outcomes: dict[str, str] = json.loads(result.stdout.splitlines()[-1])
    return outcomes


def test_server_refuses_the_hosts_own_addresses(tmp_path: Path) -> None:
    assert scenario("127.0.0.0/8", tmp_path, "refresh") == {
        "direct 192.0.2.2": "reached",  # the address does lead to the service...
        "127.0.0.1": "reached",  # ... the tunnel works, loopback allowed by the operator...
        "192.0.2.2": "reply 2",  # ... yet the host's own addresses are refused
        "::ffff:192.0.2.2": "reply 2",
        "2001:db8::2": "reply 2",
        "192.0.2.3 before": "reply 3",  # not the host's yet: unreachable in the namespace
        "192.0.2.3 after": "reply 2",  # given to the host while the server runs: refused
    }


def test_allow_entries_still_open_own_addresses(tmp_path: Path) -> None:
    outcomes = scenario("127.0.0.0/8,192.0.2.0/24,2001:db8::2", tmp_path)
    for host in ("192.0.2.2", "::ffff:192.0.2.2", "2001:db8::2"):
        assert outcomes[host] == "reached", host


def test_the_server_gives_its_policy_the_hosts_addresses() -> None:
    # One policy object serves the native TCP, UDP and wstunnel dial paths: all refuse them.
    policy = DestinationPolicy(["127.0.0.0/8"])
    TunnelServer(ServerSettings("127.0.0.1", 0, {}, policy=policy))
    assert isinstance(policy.local_addresses, HostAddresses)
    assert ipaddress.IPv4Address("127.0.0.1") in policy.local_addresses()
    given: frozenset[IPAddress] = frozenset()
    kept = DestinationPolicy(local_addresses=lambda: given)
    TunnelServer(ServerSettings("127.0.0.1", 0, {}, policy=kept))
    assert kept.local_addresses is not None and kept.local_addresses() is given
