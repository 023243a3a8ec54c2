"""hosts(5) parsing and the platform path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autovpn.routing.hosts import default_hosts_path, parse_hosts

HOSTS = """# comment
127.0.0.1   localhost LocalHost.localdomain
::1         localhost ip6-localhost   # trailing comment
192.0.2.10  Router.Home. nas
192.0.2.11  nas
not-an-ip   bogus.example
10.0.0.1
fe80::1%eth0 linklocal.example
192.0.2.10  router.home
"""


def test_parse_hosts() -> None:
    table = parse_hosts(HOSTS)
    assert table["localhost"] == ["127.0.0.1", "::1"]
    assert table["localhost.localdomain"] == ["127.0.0.1"]
    assert table["router.home"] == ["192.0.2.10"]  # normalised, not duplicated
    assert table["nas"] == ["192.0.2.10", "192.0.2.11"]
    assert table["linklocal.example"] == ["fe80::1%eth0"]
    assert "bogus.example" not in table
    assert parse_hosts("") == {}


def test_default_hosts_path_posix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    assert default_hosts_path() == Path("/etc/hosts")


def test_default_hosts_path_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("SystemRoot", "D:\\Win")
    p = default_hosts_path()
    assert p.parts[-4:] == ("System32", "drivers", "etc", "hosts")
    assert str(p).startswith("D:\\Win")
