"""Configuration values: wstunnel-style listener specs, the TOML file, every error with its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autovpn.config import ListenSpec, load_file
from autovpn.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("socks5://127.0.0.1:1080", ("socks5", "127.0.0.1", 1080, None, None)),
        ("socks5://[::1]:1212", ("socks5", "::1", 1212, None, None)),
        ("http://8080", ("http", "127.0.0.1", 8080, None, None)),
        ("udp://127.0.0.1:51820:10.0.0.1:51820", ("udp", "127.0.0.1", 51820, "10.0.0.1", 51820)),
        ("udp://51820:[::1]:51820", ("udp", "127.0.0.1", 51820, "::1", 51820)),
        ("tcp://[::1]:2222:localhost:22", ("tcp", "::1", 2222, "localhost", 22)),
    ],
)
def test_listen_spec_forms(text: str, expected: tuple[object, ...]) -> None:
    spec = ListenSpec.parse(text)
    assert (spec.scheme, spec.host, spec.port, spec.target_host, spec.target_port) == expected


def test_listen_spec_credentials_and_options() -> None:
    spec = ListenSpec.parse("http://127.0.0.1:8080?login=u&password=p%3Aq&timeout_sec=5")
    assert spec.users == (("u", "p:q"),)
    assert spec.option("timeout_sec") == "5"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ftp://127.0.0.1:21", "scheme"),
        ("socks5://127.0.0.1", "port"),
        ("socks5://127.0.0.1:99999", "port"),
        ("udp://127.0.0.1:51820", "HOST:PORT"),
        ("udp://127.0.0.1:5:10.0.0.1:x", "port"),
        ("socks5://127.0.0.1:1080?login=u", "both"),
        ("socks5://127.0.0.1:1080?login=&password=", "empty"),
        ("udp://51820:[::1:51820", "unbalanced"),
        ("udp://1:2:3:4?timeout_sec=soon", "timeout_sec"),
    ],
)
def test_listen_spec_errors_name_the_problem(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        ListenSpec.parse(text)


def test_config_file_reports_every_error_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "autovpn.toml"
    path.write_text(
        'mode = "sideways"\n'
        "bogus = 1\n"
        "[client]\n"
        'server = "https://example.invalid"\n'
        'listen = ["socks5://127.0.0.1:1080", "nope://1"]\n'
        "pool_size = 0\n"
        "[server]\n"
        'listen = "wss://127.0.0.1:8443"\n'
        'allow = ["10.0.0.0/8", "[::1"]\n'
    )
    _, errors = load_file(path)
    keys = {e.key for e in errors}
    expected = {
        "mode",
        "bogus",
        "client.server",
        "client.listen[1]",
        "client.pool_size",
        "server.listen",
        "server.allow[1]",
    }
    assert expected <= keys, keys
    assert all(e.reason for e in errors)


def test_keepalive_keys_of_client_and_server(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef")
    path = tmp_path / "autovpn.toml"
    path.write_text(
        "[client]\n"
        'server = "wss://127.0.0.1:8443"\n'
        f'secret_file = "{secret}"\n'
        "keepalive_interval = 0.5\n"
        "keepalive_timeout = 2\n"
        "[server]\n"
        'listen = "ws://127.0.0.1:8080"\n'
        f'secret_file = "{secret}"\n'
        "keepalive_interval = 0\n"  # off
    )
    cfg, errors = load_file(path)
    assert errors == []
    assert cfg.client is not None and cfg.server is not None
    assert (cfg.client.keepalive_interval, cfg.client.keepalive_timeout) == (0.5, 2.0)
    assert (cfg.server.keepalive_interval, cfg.server.keepalive_timeout) == (0.0, 45.0)


@pytest.mark.parametrize(
    ("lines", "key", "reason"),
    [
        ("keepalive_interval = 60\n", "client.keepalive_timeout", "not longer than"),
        ("keepalive_timeout = 10\nkeepalive_interval = 10\n", "client.keepalive_timeout", "three"),
        ("keepalive_interval = -1\n", "client.keepalive_interval", "0 .off. or more"),
        ("keepalive_timeout = 0\n", "client.keepalive_timeout", "more than 0"),
        ("keepalive_timeout = true\n", "client.keepalive_timeout", "seconds"),
        ('keepalive_interval = "15s"\n', "client.keepalive_interval", "seconds"),
        ("keepalive_timeout = inf\n", "client.keepalive_timeout", "more than 0"),
    ],
)
def test_keepalive_errors_name_their_key(tmp_path: Path, lines: str, key: str, reason: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef")
    path = tmp_path / "autovpn.toml"
    path.write_text(
        f'[client]\nserver = "wss://127.0.0.1:8443"\nsecret_file = "{secret}"\n' + lines
    )
    _, errors = load_file(path)
    assert [e.key for e in errors] == [key], errors
    assert re.search(reason, errors[0].reason), errors[0].reason


def test_control_hosts(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('control_hosts = ["AutoVPN.lan", "192.0.2.7", "::1", "[2001:db8::7]"]\n')
    cfg, errors = load_file(good)
    assert errors == []
    assert cfg.control_hosts == ["autovpn.lan", "192.0.2.7", "::1", "2001:db8::7"]
    bad = tmp_path / "bad.toml"
    bad.write_text('control_hosts = ["autovpn.lan:9090", "", "http://x", 7, "a b"]\n')
    _, errors = load_file(bad)
    assert [e.key for e in errors] == [f"control_hosts[{i}]" for i in range(5)]
    assert "without a port" in errors[0].reason
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('control_hosts = "autovpn.lan"\n')
    _, errors = load_file(wrong)
    assert [e.key for e in errors] == ["control_hosts"]
