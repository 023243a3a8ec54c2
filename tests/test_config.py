"""Configuration values: wstunnel-style listener specs, the TOML file, every error with its key."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.config import (
    LISTENER_HANDSHAKE_TIMEOUT,
    SERVER_HANDSHAKE_TIMEOUT,
    Config,
    ListenSpec,
    ServerURL,
    load_file,
    parse_config,
)
from autovpn.errors import ConfigError
from autovpn.routing.lists import ListFormat
from tests.imports import ROOT

SECRET = b"config-test-secret-0123"


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("wss://vpn.example.net", "wss://vpn.example.net:443"),
        ("ws://127.0.0.1", "ws://127.0.0.1:80"),
        ("wss://[::1]:8443", "wss://[::1]:8443"),
        # An explicit 0 stays 0 (it once read as "no port" and dialled 80/443 instead).
        ("ws://127.0.0.1:0", "ws://127.0.0.1:0"),
    ],
)
def test_server_url_forms(text: str, expected: str) -> None:
    assert str(ServerURL.parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://vpn.example.net", "scheme must be wss:// or ws://"),
        ("wss://:8443", "no host"),
        ("wss://vpn.example.net:99999", "out of range"),
    ],
)
def test_server_url_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        ServerURL.parse(text)


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


def test_handshake_timeouts_default_and_bounds(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef")
    client = {"server": "wss://127.0.0.1:8443", "secret_file": str(secret)}
    server = {"listen": "ws://127.0.0.1:8080", "secret_file": str(secret)}
    cfg, errors = parse_config({"client": client, "server": server}, tmp_path)
    assert errors == [] and cfg.client is not None and cfg.server is not None
    assert cfg.client.handshake_timeout == LISTENER_HANDSHAKE_TIMEOUT == 30
    assert cfg.server.handshake_timeout == SERVER_HANDSHAKE_TIMEOUT == 10
    for bad in (0, -1, 3601, "10 s", True, float("nan")):
        _, errors = parse_config(
            {
                "client": {**client, "handshake_timeout": bad},
                "server": server | {"handshake_timeout": bad},
            },
            tmp_path,
        )
        assert [e.key for e in errors] == [
            "client.handshake_timeout",
            "server.handshake_timeout",
        ], (bad, errors)


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


def test_a_string_where_an_array_belongs_is_one_error(tmp_path: Path) -> None:
    """Not one error per character of the string (``listen[0]``, ``listen[1]``...)."""
    (tmp_path / "secret").write_bytes(SECRET)
    path = tmp_path / "autovpn.toml"
    path.write_text(
        '[client]\nserver = "wss://vpn.example.net"\nsecret_file = "secret"\n'
        'listen = "socks5://127.0.0.1:1080"\n'
    )
    _, errors = load_file(path)
    assert [e.key for e in errors] == ["client.listen"], errors
    assert "expected an array" in errors[0].reason and "got string" in errors[0].reason


def test_a_list_entry_key_of_the_wrong_type_is_an_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("example.test\n")
    data = {"routing": {"lists": [{"path": "list.txt", "format": ["plain"]}]}}
    _, errors = parse_config(data, tmp_path)  # was: TypeError, unhashable type: 'list'
    assert [e.key for e in errors] == ["routing.lists[0].format"]


def test_the_secret_comes_from_the_file_the_environment_or_nowhere_for_wstunnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOVPN_SECRET", raising=False)
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    server = "wss://vpn.example.net"
    cfg, errors = parse_config({"client": {"server": server, "secret_file": "secret"}}, tmp_path)
    assert errors == [] and cfg.client is not None and cfg.client.secret == SECRET
    assert cfg.client.secret_file == tmp_path / "secret"
    _, errors = parse_config({"client": {"server": server}}, tmp_path)
    assert [(e.key, "no secret" in e.reason) for e in errors] == [("client.secret_file", True)]
    cfg, errors = parse_config({"client": {"server": server, "protocol": "wstunnel"}}, tmp_path)
    assert errors == [] and cfg.client is not None and cfg.client.secret == b""
    monkeypatch.setenv("AUTOVPN_SECRET", "from-the-environment")
    cfg, errors = parse_config({"client": {"server": server}}, tmp_path)
    assert errors == [] and cfg.client is not None
    assert cfg.client.secret == b"from-the-environment"


def test_server_users_or_one_default_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOVPN_SECRET", raising=False)
    (tmp_path / "alice.secret").write_bytes(b"alice-secret")
    (tmp_path / "secret").write_bytes(SECRET)
    listen = "ws://127.0.0.1:8080"
    users = {"alice": {"secret_file": "alice.secret"}}
    cfg, errors = parse_config({"server": {"listen": listen, "users": users}}, tmp_path)
    assert errors == [] and cfg.server is not None
    assert cfg.server.users == {"alice": b"alice-secret"}
    cfg, errors = parse_config({"server": {"listen": listen, "secret_file": "secret"}}, tmp_path)
    assert errors == [] and cfg.server is not None and cfg.server.users == {"default": SECRET}
    bad = {"alice": {"secret_file": "missing"}, "bob": "bob.secret"}
    _, errors = parse_config({"server": {"listen": listen, "users": bad}}, tmp_path)
    assert {e.key for e in errors} == {"server.users.alice.secret_file", "server.users.bob"}


def test_wss_needs_a_certificate_but_a_missing_file_is_reported_once(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    server: dict[str, Any] = {"listen": "wss://0.0.0.0:8443", "secret_file": "secret"}
    _, errors = parse_config({"server": server}, tmp_path)
    assert [e.key for e in errors] == ["server.listen"]
    assert "tls_certificate and tls_private_key" in errors[0].reason
    server |= {"tls_certificate": "cert.pem", "tls_private_key": "key.pem"}
    _, errors = parse_config({"server": server}, tmp_path)
    assert [e.key for e in errors] == ["server.tls_certificate", "server.tls_private_key"]


def test_an_unknown_key_suggests_the_near_one(tmp_path: Path) -> None:
    _, errors = parse_config({"routing": {"dns": {"timout": 3}}}, tmp_path)
    assert [(e.key, e.reason) for e in errors] == [
        ("routing.dns.timout", "unknown key (did you mean 'timeout'?)")
    ]


# -- the config stays pure data: light to import, below the tunnel and the proxy --------------

#: What the engine loads and the config must not: the resolver, the event loop, TLS, the
#: wstunnel and HTTP/2 stacks, YAML (wstunnel restrictions).
HEAVY = ("dns", "asyncio", "ssl", "cryptography", "websockets", "h2", "yaml")


def test_importing_the_config_loads_no_heavy_module() -> None:
    code = "import sys, autovpn.config; print(*sorted({m.split('.')[0] for m in sys.modules}))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert loaded, done.stdout
    assert sorted(loaded.intersection(HEAVY)) == []


# -- fuzz: any TOML-shaped document gives a Config and errors, never an exception --------------

KEYS = [
    *("mode", "log_level", "control", "control_hosts", "client", "server", "routing", "bogus"),
    *("protocol", "secret_file", "user", "tls_ca", "insecure", "sni", "path_prefix"),
    *("pool_size", "listen", "allow_open", "users", "alice", "tls_certificate"),
    *("tls_private_key", "allow", "reverse_binds", "default", "rules", "lists"),
    *("default_lists", "proxy_add", "direct_add", "remove", "geoip", "dns", "local"),
    *("public", "hosts_file", "timeout", "concurrency", "warm_at_start", "path"),
    *("action", "format", "name", "keepalive_interval", "keepalive_timeout"),
    "max_reverse_listeners_per_client",
    "handshake_timeout",
    *("wstunnel", "headers", "headers_file", "credentials", "min_idle", "max_backoff"),
    *("ping_interval", "sni_disable", "reverse_max_backoff", "reverse", "enabled"),
    *("restrict_to", "restrict_path_prefixes", "restrict_config", "reverse_idle_timeout"),
    *("users_file", "system_proxy", "auto_port"),
]
WORDS = [
    *(
        "wss://127.0.0.1:8443",
        "ws://[::1]:80",
        "https://x",
        "wss://[::1",
        "socks5://127.0.0.1:1080",
    ),
    *("http://8080?login=u&password=p", "udp://51820:[::1]:51820", "tcp://1:2:3", "unix:///s:h:1"),
    *("127.0.0.0/8", "[::1]:53", "8.8.8.8", "10.0.0.0/8:22", "proxy", "direct", "reject", "auto"),
    *("autoproxy", "wstunnel", "autovpn", "global", "smart", "debug", "secret", "list.txt"),
    *("missing.txt", "127.0.0.1:9090", "0.0.0.0:1", "domain:x.test=direct", "geoip:cn=direct"),
    *("", "~", "\x00"),
]
scalars = (
    st.sampled_from(WORDS)
    | st.text(max_size=24)
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.datetimes()
)
toml_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)
documents = st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=6)


#: Every key set, every table present: the start of the mutated documents.
VALID: dict[str, Any] = {
    "mode": "smart",
    "log_level": "debug",
    "control": "[::1]:9191",
    "control_hosts": ["autovpn.lan", "[::1]"],
    "client": {
        "server": "wss://vpn.example.net:443",
        "secret_file": "secret",
        "user": "alice",
        "tls_ca": "cert.pem",
        "tls_certificate": "cert.pem",
        "tls_private_key": "key.pem",
        "insecure": False,
        "sni": "sni.example",
        "path_prefix": "p",
        "pool_size": 2,
        "listen": ["socks5://127.0.0.1:1080", "udp://51820:[::1]:51820"],
        "allow_open": False,
        "protocol": "autovpn",
        "keepalive_interval": 10,
        "keepalive_timeout": 30.5,
        "handshake_timeout": 20,
        "reverse": ["tcp://127.0.0.1:2222:127.0.0.1:22"],
        "wstunnel": {
            "headers": {"X-Team": "blue"},
            "headers_file": "list.txt",
            "credentials": "u:p",
            "min_idle": 2,
            "max_backoff": 60,
            "ping_interval": 0,
            "sni_disable": True,
            "reverse_max_backoff": 2.5,
        },
    },
    "server": {
        "listen": "wss://0.0.0.0:8443",
        "tls_certificate": "cert.pem",
        "tls_private_key": "key.pem",
        "tls_client_ca_certs": "cert.pem",
        "users": {"alice": {"secret_file": "secret"}},
        "users_file": "users.txt",
        "secret_file": "secret",
        "path_prefix": "p",
        "allow": ["10.0.0.0/8", "db.internal:5432"],
        "reverse_binds": ["127.0.0.0/8", "::1"],
        "max_reverse_listeners_per_client": 4,
        "keepalive_interval": 0,
        "keepalive_timeout": 60,
        "handshake_timeout": 2.5,
        "wstunnel": {
            "enabled": False,
            "restrict_to": ["127.0.0.1:22"],
            "restrict_path_prefixes": ["p1"],
            "ping_interval": 10,
            "reverse_idle_timeout": 30,
        },
    },
    "system_proxy": True,
    "auto_port": True,
    "routing": {
        "default": "direct",
        "rules": ["domain:x.test=direct"],
        "lists": [
            "list.txt",
            {"path": "list.txt", "action": "reject", "format": "plain", "name": "n"},
        ],
        "default_lists": False,
        "proxy_add": ["a.test"],
        "direct_add": ["b.test"],
        "remove": ["c.test"],
        "geoip": "auto",
        "dns": {
            "local": ["127.0.0.1:5353"],
            "public": ["[::1]:53"],
            "hosts_file": False,
            "timeout": 2.5,
            "concurrency": 10,
            "warm_at_start": True,
        },
    },
}


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    found = []
    for k, v in items:
        found.append((*prefix, k))
        if isinstance(v, dict | list):
            found += _paths(v, (*prefix, k))
    return found


PATHS = _paths(VALID)
DELETE = object()


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """VALID with a few values replaced by random ones, or removed."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        *parents, last = draw(st.sampled_from(PATHS))
        node: Any = doc
        try:
            for part in parents:
                node = node[part]
            value = draw(toml_values | st.just(DELETE))
            if value is DELETE:
                del node[last]
            else:
                node[last] = value
        except (KeyError, IndexError, TypeError):
            pass  # an earlier change took this path away
    return doc


def test_every_key_of_a_full_config_lands_in_its_field(config_dir: Path) -> None:
    cfg, errors = parse_config(VALID, config_dir)
    assert errors == []
    c, s, r = cfg.client, cfg.server, cfg.routing
    assert c is not None and s is not None
    assert (cfg.mode.value, cfg.log_level, cfg.control) == ("smart", "debug", "[::1]:9191")
    assert cfg.control_hosts == ["autovpn.lan", "::1"]
    assert (str(c.server), c.secret, c.user, c.tls_ca) == (
        "wss://vpn.example.net:443",
        SECRET,
        "alice",
        config_dir / "cert.pem",
    )
    assert (c.tls_certificate, c.tls_private_key) == (
        config_dir / "cert.pem",
        config_dir / "key.pem",
    )
    assert [str(spec) for spec in c.reverse] == ["server 127.0.0.1:2222 -> 127.0.0.1:22"]
    w = c.wstunnel
    assert (w.headers, w.headers_file, w.credentials, w.min_idle, w.sni_disable) == (
        (("X-Team", "blue"),),
        str(config_dir / "list.txt"),
        "u:p",
        2,
        True,
    )
    assert (w.max_backoff, w.ping_interval, w.reverse_max_backoff) == (60.0, 0.0, 2.5)
    sw = s.wstunnel
    assert (sw.enabled, sw.restrict_to, sw.restrict_path_prefixes) == (
        False,
        ("127.0.0.1:22",),
        ("p1",),
    )
    assert (sw.ping_interval, sw.reverse_idle_timeout) == (10.0, 30.0)
    assert (s.tls_client_ca_certs, cfg.system_proxy, cfg.auto_port) == (
        config_dir / "cert.pem",
        True,
        True,
    )
    assert (c.insecure, c.sni, c.path_prefix, c.pool_size, c.allow_open, c.protocol) == (
        False,
        "sni.example",
        "p",
        2,
        False,
        "autovpn",
    )
    assert (c.keepalive_interval, c.keepalive_timeout) == (10.0, 30.5)
    assert (c.handshake_timeout, s.handshake_timeout) == (20.0, 2.5)
    assert (s.max_reverse_listeners_per_client, s.keepalive_interval, s.keepalive_timeout) == (
        4,
        0.0,
        60.0,
    )
    assert [str(spec) for spec in c.listen] == [
        "socks5://127.0.0.1:1080",
        "udp://127.0.0.1:51820:[::1]:51820",
    ]
    assert (str(s.listen), s.path_prefix) == ("wss://0.0.0.0:8443", "p")
    assert s.users == {"alice": SECRET, "bob": b"bob-secret-0123"}
    assert (s.tls_certificate, s.tls_private_key) == (
        config_dir / "cert.pem",
        config_dir / "key.pem",
    )
    assert (s.allow, s.reverse_binds) == (
        ["10.0.0.0/8", "db.internal:5432"],
        ["127.0.0.0/8", "::1"],
    )
    assert (r.default, r.rules, r.default_lists, r.geoip) == (
        "direct",
        ["domain:x.test=direct"],
        False,
        None,
    )
    assert (r.proxy_add, r.direct_add, r.remove) == (["a.test"], ["b.test"], ["c.test"])
    assert [(str(spec.path), spec.action.value, spec.format, spec.name) for spec in r.lists] == [
        (str(config_dir / "list.txt"), "proxy", None, None),
        (str(config_dir / "list.txt"), "reject", ListFormat.PLAIN, "n"),
    ]
    assert (r.dns_local, r.dns_public, r.hosts_file) == (["127.0.0.1:5353"], ["[::1]:53"], None)
    assert (r.dns_timeout, r.concurrency, r.warm_at_start) == (2.5, 10, True)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("config")
    (base / "secret").write_bytes(SECRET)
    (base / "list.txt").write_text("example.test\n")
    (base / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (base / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    (base / "bob.secret").write_bytes(b"bob-secret-0123")
    (base / "users.txt").write_text("# one user a line\nbob:bob.secret\n")
    yield base


@settings(max_examples=300, deadline=None)
@given(data=documents | near_valid())
def test_parse_config_never_raises(config_dir: Path, data: dict[str, Any]) -> None:
    cfg, errors = parse_config(data, config_dir)
    assert isinstance(cfg, Config)
    for error in errors:
        assert isinstance(error, ConfigError) and error.key and error.reason
