"""Every command-line flag has a config key, and every key a flag: what one says, the other can.

The flags come from walking ``autovpn.cli._parser()``, the keys from ``toml_tables.reference``.
Each case below gives a flag (or a few that say one thing together) and the keys that say the
same, with a value for each; the test runs the command line once with the flags and once with a
config file holding the keys (``--config FILE``), and the setting must come out the same, and
not the default.  A flag that is inherently a command-line thing is in ``CLI_ONLY``, with the
reason; nothing else is let off.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from autovpn.cli import _parser, engine_config
from autovpn.config import ClientConfig, Config, ServerConfig, load_file
from autovpn.toml_tables import reference

#: Flags that name no setting of a running engine: (command, option) -> why.
CLI_ONLY = {
    ("*", "-h"): "argparse's help (-h, --help), on every command",
    ("", "--version"): "prints the version",
    ("", "--config"): "names the file the keys are in",
    ("check-config", "FILE"): "the file to check",
    ("cert", "*"): "makes certificate files; nothing a running engine reads",
    ("wg", "*"): "prints WireGuard keys and configs; nothing a running engine reads",
    ("wg keys", "*"): "prints a WireGuard key pair",
    ("wg config", "*"): "prints a wg-quick config",
    ("mode", "*"): "asks (or switches) a running engine",
    ("route", "*"): "asks a running engine, or answers from the config",
    ("pac", "*"): "prints a PAC file of a running engine, or of the config",
    ("status", "*"): "asks a running engine",
    (
        "resolve",
        "*",
    ): "a batch job of a running engine (its --concurrency: routing.dns.concurrency)",
    (
        "client",
        "--tls-verify-certificate",
    ): "wstunnel's spelling, accepted: autovpn always verifies",
    ("client", "--websocket-mask-frame"): "accepted for wstunnel's command lines; changes nothing",
    ("server", "--websocket-mask-frame"): "accepted for wstunnel's command lines; changes nothing",
}

#: Keys that are tables: their own keys are the settings.
TABLES = {"client", "server", "routing", "client.wstunnel", "server.wstunnel"}

CLIENT_URL = "wss://vpn.example.net:443"
SERVER_URL = "ws://127.0.0.1:8443"
ENV_SECRET = "environment-secret-0123"
FILE_SECRET = b"file-secret-0123456789"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


@dataclass(frozen=True)
class Case:
    """``flags`` (command, option) given as ``argv`` say what ``toml`` says, read by ``get``."""

    flags: tuple[tuple[str, str], ...]
    keys: tuple[str, ...]
    argv: tuple[str, ...]
    toml: dict[str, Any]
    get: Callable[[Config], object]
    positional: tuple[str, ...] = ()  # instead of the base server URL / listen address
    before: tuple[str, ...] = ()  # top-level flags, before the command
    command: str = field(default="")

    def __post_init__(self) -> None:
        # Top-level flags are run with a client: they set the engine it runs.
        object.__setattr__(self, "command", self.flags[0][0] or "client")


def client(cfg: Config) -> ClientConfig:
    assert cfg.client is not None
    return cfg.client


def server(cfg: Config) -> ServerConfig:
    assert cfg.server is not None
    return cfg.server


def c(
    option: str, key: str, argv: list[str], value: Any, get: Callable[[ClientConfig], object]
) -> Case:
    """One client flag and one [client] key (dotted below it: ``wstunnel.min_idle``)."""
    return Case(
        (("client", option),),
        (f"client.{key}",),
        tuple(argv),
        {"client": _nest(key, value)},
        lambda cfg: get(client(cfg)),
    )


def s(
    option: str, key: str, argv: list[str], value: Any, get: Callable[[ServerConfig], object]
) -> Case:
    return Case(
        (("server", option),),
        (f"server.{key}",),
        tuple(argv),
        {"server": _nest(key, value)},
        lambda cfg: get(server(cfg)),
    )


def r(option: str, key: str, argv: list[str], value: Any, attr: str) -> Case:
    """A routing flag (on ``client``) and its [routing] key."""
    return Case(
        (("client", option),),
        (f"routing.{key}",),
        tuple(argv),
        {"routing": _nest(key, value)},
        lambda cfg: getattr(cfg.routing, attr),
    )


def _nest(key: str, value: Any) -> dict[str, Any]:
    *tables, last = key.split(".")
    node: dict[str, Any] = {last: value}
    for part in reversed(tables):
        node = {part: node}
    return node


def cases(d: Path) -> list[Case]:
    """Files the cases name are in ``d`` (see the ``files`` fixture)."""
    cert, key, secret, users = (str(d / n) for n in ("cert.pem", "key.pem", "secret", "users"))
    udp = "udp://127.0.0.1:51820:10.0.0.1:51820?timeout_sec=0"
    return [
        # -- top level
        Case(
            (("", "--log-level"),),
            ("log_level",),
            (),
            {"log_level": "debug"},
            lambda cfg: cfg.log_level,
            before=("--log-level", "debug"),
        ),
        Case(
            (("client", "--log-lvl"),),
            ("log_level",),
            ("--log-lvl", "DEBUG"),
            {"log_level": "debug"},
            lambda cfg: cfg.log_level,
        ),
        Case(
            (("server", "--log-lvl"),),
            ("log_level",),
            ("--log-lvl", "warn"),
            {"log_level": "warning"},
            lambda cfg: cfg.log_level,
        ),
        Case(
            (("", "--log-format"),),
            ("log_format",),
            (),
            {"log_format": "json"},
            lambda cfg: cfg.log_format,
            before=("--log-format", "json"),
        ),
        Case(
            (("", "--log-file"),),
            ("log_file",),
            (),
            {"log_file": str(d / "autovpn.log")},
            lambda cfg: cfg.log_file,
            before=("--log-file", str(d / "autovpn.log")),
        ),
        Case(
            (("", "--log-max-bytes"),),
            ("log_max_bytes",),
            (),
            {"log_max_bytes": 4096},
            lambda cfg: cfg.log_max_bytes,
            before=("--log-max-bytes", "4096"),
        ),
        Case(
            (("", "--log-backups"),),
            ("log_backups",),
            (),
            {"log_backups": 2},
            lambda cfg: cfg.log_backups,
            before=("--log-backups", "2"),
        ),
        Case(
            (("", "--no-stats"),),
            ("stats",),
            (),
            {"stats": False},
            lambda cfg: cfg.stats,
            before=("--no-stats",),
        ),
        Case(
            (("", "--auto-port"),),
            ("auto_port",),
            (),
            {"auto_port": True},
            lambda cfg: cfg.auto_port,
            before=("--auto-port",),
        ),
        Case(
            (("client", "--auto-port"),),
            ("auto_port",),
            ("--auto-port",),
            {"auto_port": True},
            lambda cfg: cfg.auto_port,
        ),
        Case(
            (("", "--set-system-proxy"),),
            ("system_proxy",),
            (),
            {"system_proxy": True},
            lambda cfg: cfg.system_proxy,
            before=("--set-system-proxy",),
        ),
        Case(
            (("client", "--set-system-proxy"),),
            ("system_proxy",),
            ("--set-system-proxy",),
            {"system_proxy": True},
            lambda cfg: cfg.system_proxy,
        ),
        Case(
            (("client", "--mode"),),
            ("mode",),
            ("--mode", "smart"),
            {"mode": "smart"},
            lambda cfg: cfg.mode,
        ),
        *(
            Case(
                ((command, "--control-api"),),
                ("control",),
                ("--control-api", "127.0.0.1:9191"),
                {"control": "127.0.0.1:9191"},
                lambda cfg: cfg.control,
            )
            for command in ("client", "server")
        ),
        *(
            Case(
                ((command, "--control-api"),),
                ("control",),
                ("--control-api", "off"),
                {"control": False},
                lambda cfg: cfg.control,
            )
            for command in ("client", "server")
        ),
        *(
            Case(
                ((command, "--control-host"),),
                ("control_hosts",),
                ("--control-host", "autovpn.lan"),
                {"control_hosts": ["autovpn.lan"]},
                lambda cfg: cfg.control_hosts,
            )
            for command in ("client", "server")
        ),
        # -- client
        Case(
            (("client", "SERVER"),),
            ("client.server",),
            (),
            {"client": {"server": "wss://other.example:8443"}},
            lambda cfg: client(cfg).server,
            positional=("wss://other.example:8443",),
        ),
        Case(
            (("client", "SERVER"),),
            (
                "client.servers",
                "client.servers[].url",
                "client.servers[].priority",
                "client.servers[].weight",
            ),
            (),
            {
                "client": {
                    "servers": [
                        {"url": "wss://a.example:443", "priority": 1, "weight": 3},
                        {"url": "wss://b.example:443", "priority": 1, "weight": 1},
                        {"url": "wss://c.example:443", "priority": 3},
                    ]
                }
            },
            lambda cfg: client(cfg).servers,
            positional=(
                "wss://a.example:443?weight=3",
                "wss://b.example:443?priority=1",
                "wss://c.example:443",
            ),
        ),
        c("--retries", "retries", ["--retries", "5"], 5, lambda cc: cc.retries),
        c(
            "--connect-timeout",
            "connect_timeout",
            ["--connect-timeout", "3"],
            3,
            lambda cc: cc.connect_timeout,
        ),
        c("--open-timeout", "open_timeout", ["--open-timeout", "4"], 4, lambda cc: cc.open_timeout),
        c(
            "--retry-refused-after",
            "retry_refused_after",
            ["--retry-refused-after", "60"],
            60,
            lambda cc: cc.retry_refused_after,
        ),
        c(
            "--fallback-direct-after",
            "fallback_direct_after",
            ["--fallback-direct-after", "30"],
            30,
            lambda cc: cc.fallback_direct_after,
        ),
        c(
            "-L",
            "listen",
            ["-L", "socks5://127.0.0.1:1090"],
            ["socks5://127.0.0.1:1090"],
            lambda cc: cc.listen,
        ),
        Case(
            (("client", "--udp"), ("client", "--udp-src"), ("client", "--udp-dst")),
            ("client.listen",),
            ("--udp", "--udp-src", "127.0.0.1:51820", "--udp-dst", "10.0.0.1:51820"),
            {"client": {"listen": [udp]}},
            lambda cfg: client(cfg).listen,
        ),
        *(
            Case(
                (("client", option), ("client", "--http-proxy-password")),
                ("client.listen",),
                ("-L", "socks5://127.0.0.1:1080", option, "u", "--http-proxy-password", "p"),
                {"client": {"listen": ["socks5://127.0.0.1:1080?login=u&password=p"]}},
                lambda cfg: client(cfg).listen,
            )
            for option in ("--http-proxy-login", "--http-proxy-username")
        ),
        c(
            "--secret-file",
            "secret_file",
            ["--secret-file", secret],
            secret,
            lambda cc: (cc.secret_file, cc.secret),
        ),
        c("--user", "user", ["--user", "alice"], "alice", lambda cc: cc.user),
        c("--tls-ca", "tls_ca", ["--tls-ca", cert], cert, lambda cc: cc.tls_ca),
        Case(
            (("client", "--tls-certificate"), ("client", "--tls-private-key")),
            ("client.tls_certificate", "client.tls_private_key"),
            ("--tls-certificate", cert, "--tls-private-key", key),
            {"client": {"tls_certificate": cert, "tls_private_key": key}},
            lambda cfg: (client(cfg).tls_certificate, client(cfg).tls_private_key),
        ),
        c("--insecure", "insecure", ["--insecure"], True, lambda cc: cc.insecure),
        c(
            "--tls-sni-override",
            "sni",
            ["--tls-sni-override", "x.test"],
            "x.test",
            lambda cc: cc.sni,
        ),
        c("--http-upgrade-path-prefix", "path_prefix", ["-P", "p"], "p", lambda cc: cc.path_prefix),
        c("--pool-size", "pool_size", ["--pool-size", "3"], 3, lambda cc: cc.pool_size),
        c(
            "--keepalive-interval",
            "keepalive_interval",
            ["--keepalive-interval", "5"],
            5,
            lambda cc: cc.keepalive_interval,
        ),
        c(
            "--keepalive-timeout",
            "keepalive_timeout",
            ["--keepalive-timeout", "90"],
            90,
            lambda cc: cc.keepalive_timeout,
        ),
        c("--allow-open", "allow_open", ["--allow-open"], True, lambda cc: cc.allow_open),
        c(
            "--handshake-timeout",
            "handshake_timeout",
            ["--handshake-timeout", "5"],
            5,
            lambda cc: cc.handshake_timeout,
        ),
        c(
            "--idle-timeout",
            "idle_timeout",
            ["--idle-timeout", "0"],
            0,
            lambda cc: cc.idle_timeout,
        ),
        c(
            "--max-connections-per-address",
            "max_connections_per_address",
            ["--max-connections-per-address", "7"],
            7,
            lambda cc: cc.max_connections_per_address,
        ),
        c("--protocol", "protocol", ["--protocol", "wstunnel"], "wstunnel", lambda cc: cc.protocol),
        c(
            "-R",
            "reverse",
            ["-R", "tcp://127.0.0.1:2222:127.0.0.1:22"],
            ["tcp://127.0.0.1:2222:127.0.0.1:22"],
            lambda cc: cc.reverse,
        ),
        Case(
            (("client", "-R"), ("client", "--protocol")),
            ("client.reverse", "client.protocol"),
            ("--protocol", "wstunnel", "-R", "socks5://127.0.0.1:1081"),
            {"client": {"protocol": "wstunnel", "reverse": ["socks5://127.0.0.1:1081"]}},
            lambda cfg: client(cfg).wstunnel.remote_to_local,
        ),
        c(
            "--reverse-tunnel-connection-retry-max-backoff",
            "wstunnel.reverse_max_backoff",
            ["--reverse-tunnel-connection-retry-max-backoff", "5s"],
            5,
            lambda cc: cc.wstunnel.reverse_max_backoff,
        ),
        c(
            "--http-upgrade-credentials",
            "wstunnel.credentials",
            ["--http-upgrade-credentials", "u:p"],
            "u:p",
            lambda cc: cc.wstunnel.credentials,
        ),
        c(
            "-H",
            "wstunnel.headers",
            ["-H", "X-Team: blue"],
            {"X-Team": "blue"},
            lambda cc: cc.wstunnel.headers,
        ),
        c(
            "--http-headers-file",
            "wstunnel.headers_file",
            ["--http-headers-file", secret],
            secret,
            lambda cc: cc.wstunnel.headers_file,
        ),
        c("-c", "wstunnel.min_idle", ["-c", "2"], 2, lambda cc: cc.wstunnel.min_idle),
        c(
            "--connection-retry-max-backoff",
            "wstunnel.max_backoff",
            ["--connection-retry-max-backoff", "1m"],
            60,
            lambda cc: cc.wstunnel.max_backoff,
        ),
        c(
            "--websocket-ping-frequency",
            "wstunnel.ping_interval",
            ["--websocket-ping-frequency", "0"],
            0,
            lambda cc: cc.wstunnel.ping_interval,
        ),
        c(
            "--tls-sni-disable",
            "wstunnel.sni_disable",
            ["--tls-sni-disable"],
            True,
            lambda cc: cc.wstunnel.sni_disable,
        ),
        # -- routing (client)
        r("--rule", "rules", ["--rule", "domain:x.test=direct"], ["domain:x.test=direct"], "rules"),
        Case(
            (("client", "--routing-list"),),
            (
                "routing.lists",
                "routing.lists[].path",
                "routing.lists[].action",
                "routing.lists[].format",
                "routing.lists[].name",
            ),
            ("--routing-list", f"{secret}?action=direct&format=plain&name=mine"),
            {
                "routing": {
                    "lists": [
                        {"path": secret, "action": "direct", "format": "plain", "name": "mine"}
                    ]
                }
            },
            lambda cfg: cfg.routing.lists,
        ),
        r("--routing-default", "default", ["--routing-default", "direct"], "direct", "default"),
        r("--no-default-lists", "default_lists", ["--no-default-lists"], False, "default_lists"),
        r("--proxy-add", "proxy_add", ["--proxy-add", "a.test"], ["a.test"], "proxy_add"),
        r("--direct-add", "direct_add", ["--direct-add", "b.test"], ["b.test"], "direct_add"),
        r("--list-remove", "remove", ["--list-remove", "c.test"], ["c.test"], "remove"),
        r("--geoip", "geoip", ["--geoip", "on"], True, "geoip"),
        r("--dns-local", "dns.local", ["--dns-local", "192.0.2.53"], ["192.0.2.53"], "dns_local"),
        r("--dns-public", "dns.public", ["--dns-public", "[::1]:53"], ["[::1]:53"], "dns_public"),
        r("--hosts-file", "dns.hosts_file", ["--hosts-file", "off"], False, "hosts_file"),
        r("--dns-timeout", "dns.timeout", ["--dns-timeout", "2.5"], 2.5, "dns_timeout"),
        r("--dns-concurrency", "dns.concurrency", ["--dns-concurrency", "7"], 7, "concurrency"),
        r("--warm-at-start", "dns.warm_at_start", ["--warm-at-start"], True, "warm_at_start"),
        # -- server
        Case(
            (("server", "LISTEN"),),
            ("server.listen",),
            (),
            {"server": {"listen": "ws://127.0.0.1:9443"}},
            lambda cfg: server(cfg).listen,
            positional=("ws://127.0.0.1:9443",),
        ),
        Case(
            (("server", "--tls-certificate"), ("server", "--tls-private-key")),
            ("server.tls_certificate", "server.tls_private_key"),
            ("--tls-certificate", cert, "--tls-private-key", key),
            {"server": {"tls_certificate": cert, "tls_private_key": key}},
            lambda cfg: (server(cfg).tls_certificate, server(cfg).tls_private_key),
        ),
        Case(
            (("server", "--tls-client-ca-certs"),),
            ("server.tls_client_ca_certs",),
            ("--tls-certificate", cert, "--tls-private-key", key, "--tls-client-ca-certs", cert),
            {
                "server": {
                    "listen": "wss://127.0.0.1:8443",
                    "tls_certificate": cert,
                    "tls_private_key": key,
                    "tls_client_ca_certs": cert,
                }
            },
            lambda cfg: server(cfg).tls_client_ca_certs,
            positional=("wss://127.0.0.1:8443",),
        ),
        s(
            "--secret-file",
            "secret_file",
            ["--secret-file", secret],
            secret,
            lambda sc: (sc.secret_file, sc.users),
        ),
        s("--users-file", "users_file", ["--users-file", users], users, lambda sc: sc.users),
        Case(
            (("server", "--users-file"),),
            ("server.users", "server.users.NAME.secret_file"),
            ("--users-file", users),
            {"server": {"users": {"bob": {"secret_file": secret}}}},
            lambda cfg: server(cfg).users,
        ),
        s("--allow", "allow", ["--allow", "10.0.0.0/8"], ["10.0.0.0/8"], lambda sc: sc.allow),
        s(
            "--http-upgrade-path-prefix",
            "path_prefix",
            ["--http-upgrade-path-prefix", "p"],
            "p",
            lambda sc: sc.path_prefix,
        ),
        s(
            "--auth-failure-limit",
            "auth_failure_limit",
            ["--auth-failure-limit", "3"],
            3,
            lambda sc: sc.auth_failure_limit,
        ),
        s(
            "--auth-failure-window",
            "auth_failure_window",
            ["--auth-failure-window", "5"],
            5,
            lambda sc: sc.auth_failure_window,
        ),
        s(
            "--keepalive-interval",
            "keepalive_interval",
            ["--keepalive-interval", "0"],
            0,
            lambda sc: sc.keepalive_interval,
        ),
        s(
            "--keepalive-timeout",
            "keepalive_timeout",
            ["--keepalive-timeout", "90"],
            90,
            lambda sc: sc.keepalive_timeout,
        ),
        s(
            "--handshake-timeout",
            "handshake_timeout",
            ["--handshake-timeout", "2.5"],
            2.5,
            lambda sc: sc.handshake_timeout,
        ),
        s(
            "--idle-timeout",
            "idle_timeout",
            ["--idle-timeout", "600"],
            600,
            lambda sc: sc.idle_timeout,
        ),
        s(
            "--max-connections-per-address",
            "max_connections_per_address",
            ["--max-connections-per-address", "9"],
            9,
            lambda sc: sc.max_connections_per_address,
        ),
        s(
            "--max-streams-per-connection",
            "max_streams_per_connection",
            ["--max-streams-per-connection", "64"],
            64,
            lambda sc: sc.max_streams_per_connection,
        ),
        s(
            "--max-pending-opens",
            "max_pending_opens",
            ["--max-pending-opens", "8"],
            8,
            lambda sc: sc.max_pending_opens,
        ),
        s(
            "--lookup-timeout",
            "lookup_timeout",
            ["--lookup-timeout", "2.5"],
            2.5,
            lambda sc: sc.lookup_timeout,
        ),
        s(
            "--max-lookups-per-address",
            "max_lookups_per_address",
            ["--max-lookups-per-address", "4"],
            4,
            lambda sc: sc.max_lookups_per_address,
        ),
        s(
            "--reverse-bind",
            "reverse_binds",
            ["--reverse-bind", "10.0.0.0/8"],
            ["10.0.0.0/8"],
            lambda sc: sc.reverse_binds,
        ),
        s(
            "--max-reverse-listeners",
            "max_reverse_listeners_per_client",
            ["--max-reverse-listeners", "2"],
            2,
            lambda sc: sc.max_reverse_listeners_per_client,
        ),
        s(
            "--workers",
            "workers",
            ["--workers", "3"],
            3,
            lambda sc: sc.workers,
        ),
        s(
            "--steer-by",
            "steer_by",
            ["--steer-by", "connection"],
            "connection",
            lambda sc: sc.steer_by,
        ),
        s(
            "--allow-anonymous",
            "allow_anonymous",
            ["--allow-anonymous"],
            True,
            lambda sc: sc.allow_anonymous,
        ),
        s(
            "--no-wstunnel",
            "wstunnel.enabled",
            ["--no-wstunnel"],
            False,
            lambda sc: sc.wstunnel.enabled,
        ),
        s(
            "--restrict-to",
            "wstunnel.restrict_to",
            ["--restrict-to", "127.0.0.1:22"],
            ["127.0.0.1:22"],
            lambda sc: sc.wstunnel.restrict_to,
        ),
        s(
            "-r",
            "wstunnel.restrict_path_prefixes",
            ["-r", "p1"],
            ["p1"],
            lambda sc: sc.wstunnel.restrict_path_prefixes,
        ),
        s(
            "--restrict-config",
            "wstunnel.restrict_config",
            ["--restrict-config", secret],
            secret,
            lambda sc: sc.wstunnel.restrict_config,
        ),
        s(
            "--websocket-ping-frequency",
            "wstunnel.ping_interval",
            ["--websocket-ping-frequency", "10s"],
            10,
            lambda sc: sc.wstunnel.ping_interval,
        ),
        s(
            "--remote-to-local-server-idle-timeout",
            "wstunnel.reverse_idle_timeout",
            ["--remote-to-local-server-idle-timeout", "30"],
            30,
            lambda sc: sc.wstunnel.reverse_idle_timeout,
        ),
    ]


# -- the parsers and the tables, walked ---------------------------------------------------------


def flags(parser: argparse.ArgumentParser, command: str = "") -> Iterator[tuple[str, str]]:
    """(command, option) of every argument: ``("client", "-L")``, ``("server", "LISTEN")``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from flags(sub, f"{command} {name}".strip())
        elif action.option_strings:
            yield command, action.option_strings[0]
        else:
            yield command, action.dest.upper()


def cli_only(flag: tuple[str, str]) -> bool:
    command, option = flag
    return any((c in ("*", command) and o in ("*", option)) for c, o in CLI_ONLY)


def toml_text(value: Any) -> str:
    """A TOML value (inline tables for tables); JSON strings are TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_text(v)}" for k, v in value.items()) + " }"


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AUTOVPN_SECRET", ENV_SECRET)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text(PEM_CERT)
    (tmp_path / "key.pem").write_text(PEM_KEY)
    (tmp_path / "secret").write_bytes(FILE_SECRET)
    (tmp_path / "users").write_text(f"bob:{tmp_path / 'secret'}\n")
    return tmp_path


def run(case: Case, d: Path, *, flags_given: bool, file_given: bool) -> Config:
    base: dict[str, Any] = (
        {"client": {"server": CLIENT_URL}}
        if case.command == "client"
        else {"server": {"listen": SERVER_URL}}
    )
    positional = case.positional or (argv_default(case),)
    if "servers" in case.toml.get("client", {}):
        del base["client"]["server"]  # one or the other
    argv: list[str] = list(case.before) if flags_given else []
    if file_given:
        doc = merged(base, case.toml)
        path = d / "config.toml"
        path.write_text("".join(f"{k} = {toml_text(v)}\n" for k, v in doc.items()))
        argv += ["--config", str(path), case.command]
    else:
        argv += [case.command, *(positional if flags_given else (argv_default(case),))]
    if flags_given:
        argv += case.argv
    args = _parser().parse_args(argv)
    cfg = Config()
    if file_given:
        cfg, errors = load_file(Path(args.config))
        assert errors == [], [str(e) for e in errors]
    return engine_config(args, cfg)[0]


def argv_default(case: Case) -> str:
    return CLIENT_URL if case.command == "client" else SERVER_URL


def test_every_flag_has_a_key_or_a_reason(files: Path) -> None:
    covered = {flag for case in cases(files) for flag in case.flags}
    found = set(flags(_parser()))
    assert sorted(f for f in found if not cli_only(f) and f not in covered) == []
    assert sorted(covered - found) == []  # no case names a flag that is not there


def test_every_key_has_a_flag(files: Path) -> None:
    covered = {key for case in cases(files) for key in case.keys}
    keys = {key for key, _ in reference(Config)} - TABLES
    assert sorted(keys - covered) == []
    assert sorted(covered - keys) == []


def test_the_allow_list_is_small_and_explained() -> None:
    assert len(CLI_ONLY) <= 16
    assert all(reason.strip() for reason in CLI_ONLY.values())


@pytest.mark.parametrize("index", range(len(cases(Path("/")))))
def test_a_flag_and_its_key_say_the_same(files: Path, index: int) -> None:
    case = cases(files)[index]
    from_flags = case.get(run(case, files, flags_given=True, file_given=False))
    from_file = case.get(run(case, files, flags_given=False, file_given=True))
    default = case.get(run(case, files, flags_given=False, file_given=False))
    assert from_flags == from_file, (case.flags, case.keys)
    assert from_flags != default, (case.flags, "the case sets nothing")
