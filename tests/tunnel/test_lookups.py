"""Name lookups on the tunnel server are bounded (issue 15, "hostile input" and "fail fast"):
one user asking for many names whose lookups hang cannot hold the lookup threads every user
shares.  The server's real ``getaddrinfo`` asks a DNS server on loopback that never answers, in
private mount and network namespaces (``lookup_scenario.py`` says how); no test name reaches
the machine's resolver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = (
    'ip link set lo up && mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts'
    ' && mount --bind "$3" /etc/nsswitch.conf'
    ' && shift 3 && exec "$0" -m tests.tunnel.lookup_scenario "$@"'
)


def scenario(
    flooder: str, tmp_path: Path, *, resolver_wait: int, lookup_timeout: float
) -> dict[str, object]:
    """The scenario's outcome; ``resolver_wait``: seconds the C library waits for the black
    hole (resolv.conf), ``lookup_timeout``: the server's."""
    if not sys.platform.startswith("linux") or not (shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("needs Linux with unshare and ip (iproute2)")
    if subprocess.run(["unshare", "-m", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create private mount and network namespaces here (not root?)")
    etc = {name: Path("/etc", name) for name in ("resolv.conf", "hosts", "nsswitch.conf")}
    if not all(p.is_file() for p in etc.values()):
        pytest.skip("needs /etc/resolv.conf, /etc/hosts and /etc/nsswitch.conf to mount over")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\noptions timeout:{resolver_wait} attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost good.test\n")
    nss = tmp_path / "nsswitch.conf"
    nss.write_text("hosts: files dns\n")
    env = dict(os.environ, AUTOVPN_STATE_DIR=str(tmp_path / "state"))
    result = subprocess.run(
        [
            *("unshare", "-m", "-n", "sh", "-c", SETUP, sys.executable, resolv, hosts, nss),
            *(flooder, str(lookup_timeout)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    outcome: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return outcome


@pytest.mark.parametrize("flooder", ["native", "wstunnel"])
def test_one_users_hanging_lookups_do_not_hold_up_another_users_connect(
    flooder: str, tmp_path: Path
) -> None:
    # The black hole holds each lookup's thread 30 s; the server gives up on it after 3.
    outcome = scenario(flooder, tmp_path, resolver_wait=30, lookup_timeout=3)
    # The other user (the other protocol, another address) is served at once.
    assert outcome["good"] == "served", outcome
    # The flooding address had 16 lookups in the resolver at most (max_lookups_per_address);
    # the black hole saw no other name of it, and good.test came from the hosts file.
    asked = outcome["asked"]
    assert isinstance(asked, list)
    assert len(asked) == 16 and all(n.endswith(".hang.test") for n in asked), asked
    assert outcome["most_in_flight"] == 16
    # Each of the flood's requests failed fast (the lookup timeout is 3 s here), and the server
    # says why: no answer from the resolver it names, or the address's turns all taken.  A
    # native client reads the reason in the stream's reset; a wstunnel one gets a bare 400.
    assert outcome["flood_other"] == []
    flood = outcome["flood"]
    assert isinstance(flood, list)
    log = " | ".join(map(str, outcome["log"]))  # type: ignore[call-overload]
    source = log if flooder == "wstunnel" else " | ".join(flood)
    if flooder == "wstunnel":
        assert flood == ["HTTP/1.1 400 Bad Request Invalid request"]
    assert (
        "NAME: no answer within 3 s (lookup_timeout) from the system resolver:"
        " nameserver 127.0.0.1 in /etc/resolv.conf" in source
    ), source
    assert "NAME: not looked up: 16 lookups of 127.0.0." in source


def test_an_address_gets_its_turns_back_as_its_lookups_end(tmp_path: Path) -> None:
    # The C library gives up after 1 s; the server would wait 10: each lookup of the flood
    # fails on its own and hands its turn to the next, 16 at a time, until all 40 were asked.
    outcome = scenario("native", tmp_path, resolver_wait=1, lookup_timeout=10)
    assert outcome["good"] == "served", outcome
    assert outcome["most_in_flight"] == 16
    asked = outcome["asked"]
    assert isinstance(asked, list) and len(asked) == 40, asked
    assert outcome["flood_other"] == []
    assert outcome["flood"] == [
        "[Errno -3] NAME: Temporary failure in name resolution"
        " (the system resolver: nameserver 127.0.0.1 in /etc/resolv.conf)"
    ]
