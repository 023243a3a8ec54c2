"""Configuration: typed values, parsed from a TOML file and/or command-line flags.

Everything the flags say, the file can say (flags win), and the reverse
(``tests/test_flag_parity.py``).  Each table of the file is a dataclass
here whose fields carry their key, parser and doc (``toml(...)``; the checker is
``autovpn.toml_tables``), so a new key is one field plus its test.  ``load_file`` collects
*every* error with its full key, so ``autovpn check-config`` reports them all at once.

This module is pure data and validation: it imports no tunnel, proxy or engine code, and stays
light to import.  The objects that run (tunnel settings, listeners, the resolver) are built from
these values where they are used.

Example::

    mode = "global"                      # global | smart | direct
    log_level = "info"
    system_proxy = false                 # true: the system uses our PAC file while we run

    [client]
    server = "wss://vpn.example.net:443" # or several, tried by priority (lower first):
    # servers = [{ url = "wss://a.example.net", priority = 1 }, "wss://b.example.net:8443"]
    retries = 3                          # attempts per connection, to the next address/server
    user = "alice"
    secret_file = "~/.config/autovpn/secret"
    tls_ca = "ca.pem"                    # private CA; omit for the system store
    tls_certificate = "me.pem"           # mTLS (either protocol), with tls_private_key
    listen = ["socks5://127.0.0.1:1080", "http://127.0.0.1:8080?login=u&password=p"]
    keepalive_interval = 15              # seconds (server too); 0 turns keepalive off
    keepalive_timeout = 45               # a tunnel connection silent this long is dead
    idle_timeout = 300                   # a relayed connection silent both ways this long is reset
    handshake_timeout = 30               # seconds a local client has for its SOCKS5/HTTP request
    max_connections_per_address = 1024   # per client address on each SOCKS5/HTTP listener
    reverse = ["tcp://127.0.0.1:2222:127.0.0.1:22"]   # -R: the server's port 2222 comes here
    [client.wstunnel]                    # wstunnel's client flags (protocol = "wstunnel")
    headers = { "X-Team" = "blue" }      # -H

    [server]
    listen = "wss://0.0.0.0:8443"
    tls_certificate = "cert.pem"
    tls_private_key = "key.pem"
    allow = ["127.0.0.0/8"]
    tls_client_ca_certs = "clients-ca.pem"   # mTLS: every client shows a certificate it signed
    allow_anonymous = false              # true: wstunnel clients need no secret (forward only)
    auth_failure_limit = 10              # failures per address within the window; 0: no limit
    auth_failure_window = 60             # seconds; also how long such an address is refused
    handshake_timeout = 10               # seconds for each step: TLS, upgrade request, AUTH
    idle_timeout = 300                   # a relayed stream silent both ways this long is reset
    users_file = "users"                 # NAME:SECRET_FILE lines, added to [server.users]
    workers = 4                          # processes on the port (Linux); default: one per core
    steer_by = "address"                 # which worker: by client "address" or "connection"
    max_connections_per_address = 512    # TCP connections per client address
    max_streams_per_connection = 1024    # per tunnel connection; more: REFUSED_STREAM
    max_pending_opens = 512              # streams being dialled per tunnel connection
    lookup_timeout = 10                  # seconds for a destination name's lookup
    max_lookups_per_address = 16         # name lookups one client address has in progress
    [server.users]
    alice = { secret_file = "alice.secret" }
    [server.wstunnel]                    # how stock wstunnel clients are served
    enabled = true                       # false: --no-wstunnel
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from autovpn.errors import ConfigError
from autovpn.limits import (
    LISTENER_MAX_CONNECTIONS_PER_ADDRESS,
    MAX_PENDING_OPENS,
    MAX_STREAMS_PER_CONNECTION,
    SERVER_MAX_CONNECTIONS_PER_ADDRESS,
)
from autovpn.net import (
    LOOKUP_TIMEOUT,
    MAX_LOOKUPS_PER_ADDRESS,
    is_loopback,
    normalize_host_name,
    parse_host,
)
from autovpn.pem import certificate_problem, private_key_problem
from autovpn.policy import AllowEntry
from autovpn.reuseport import DEFAULT_STEER_BY, STEER_BY
from autovpn.routing.hosts import default_hosts_path
from autovpn.routing.lists import ListFormat
from autovpn.routing.router import Action, ListSpec, Mode, Router, parse_user_rule
from autovpn.routing.upstream import Upstream
from autovpn.toml_tables import (
    Found,
    Parser,
    Where,
    boolean,
    checked,
    choice,
    false_or,
    file_path,
    integer,
    key_line,
    list_of,
    mapped,
    not_in_file,
    number,
    table,
    table_of,
    text,
    toml,
    walk,
)

DEFAULT_USER = "default"
SECRET_ENV = "AUTOVPN_SECRET"
DEFAULT_CONTROL = "127.0.0.1:9090"
LISTEN_SCHEMES = ("socks5", "http", "udp", "tcp", "unix", "stdio")
#: Schemes that forward to one fixed target: ``udp://[BIND:]PORT:HOST:PORT`` (wstunnel's form).
FORWARD_SCHEMES = ("udp", "tcp")
#: Binds a client may ask for when the server says nothing else: its own loopback only.
DEFAULT_REVERSE_BINDS = ("127.0.0.0/8", "::1/128")
#: Reverse listeners one client may hold at once, native and wstunnel alike (each a socket and
#: a port on the server): a client is a native user, or a wstunnel client's certificate CN or
#: else its address.  Without it one anonymous client opened 300 listeners in 4 s.
MAX_REVERSE_LISTENERS_PER_CLIENT = 16
#: Most worker processes one server runs (``server.workers``, ``--workers``).
MAX_WORKERS = 256
#: wstunnel's ``--websocket-ping-frequency`` default, on both sides.
DEFAULT_PING_INTERVAL = 30.0
#: Authentication failures (either protocol) one address may have within the window before
#: the server refuses it at once (429) for a window (``autovpn.tunnel.auth_limit``).
DEFAULT_AUTH_FAILURE_LIMIT = 10
DEFAULT_AUTH_FAILURE_WINDOW = 60.0
MTLS_NEEDS_WSS = (
    "client certificates need a wss:// listen address (behind a TLS-terminating proxy, "
    "the proxy checks them)"
)
#: ``[client] handshake_timeout``: a client of a local SOCKS5 or HTTP listener has this long from
#: its accept until its request is read and its target connected (autovpn/proxy/listener.py).
#: Bytes do not extend it: idle and slowloris clients are closed while others are served.
LISTENER_HANDSHAKE_TIMEOUT = 30.0
#: ``[server] handshake_timeout``: a tunnel peer has this long for each step of its handshake:
#: TLS, then the upgrade request, then (native) the AUTH frame after the 101
#: (autovpn/tunnel/mux/server.py).  Bytes do not extend it, as above.
SERVER_HANDSHAKE_TIMEOUT = 10.0
#: The most either may be set to: an hour is no limit any more.
MAX_HANDSHAKE_TIMEOUT = 3600.0
#: ``idle_timeout``'s default, client and server: v2ray's and Xray's ``connIdle`` (docs/
#: protocol.md says why).  An application that keeps a connection silent for longer (SSH
#: without ServerAliveInterval, IMAP IDLE renewed every 29 minutes) needs its own keepalive,
#: as behind those proxies, or a longer setting; 0 turns the timeout off.
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class ServerURL:
    """``wss://host:port`` (TLS) or ``ws://host:port`` (plain, e.g. to a local nginx)."""

    tls: bool
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, key: str = "server") -> ServerURL:
        parts = urlsplit(text)
        if parts.scheme not in ("ws", "wss"):
            raise ConfigError(key, f"{text!r}: the scheme must be wss:// or ws://")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(key, f"{text!r}: {exc}") from None
        if not parts.hostname:
            raise ConfigError(key, f"{text!r}: no host")
        tls = parts.scheme == "wss"
        # ``is None``, not falsy: an explicit port 0 once became 80/443 (the tests use it as
        # "no server here"; a connect to it fails and says so).
        return cls(tls, parts.hostname, (443 if tls else 80) if port is None else port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ReverseSpec:
    """One native ``-R``: listen on the server's ``bind_host:bind_port``, deliver to our target."""

    bind_host: str
    bind_port: int
    target_host: str
    target_port: int

    def __str__(self) -> str:
        return f"server {self.bind_host}:{self.bind_port} -> {self.target_host}:{self.target_port}"


def _split_endpoints(text: str, key: str, original: str) -> list[str]:
    """Split ``a:b:[v6]:c`` on the colons that are outside brackets."""
    parts: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(key, f"{original!r}: unbalanced ']'")
        if ch == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ConfigError(key, f"{original!r}: unbalanced '['")
    parts.append(current)
    return [p[1:-1] if p.startswith("[") and p.endswith("]") else p for p in parts]


def parse_reverse(text: str, key: str = "-R") -> ReverseSpec:
    """A native ``-R tcp://[BIND:]PORT:HOST:PORT`` (BIND is on the server, IP literal)."""
    spec = ListenSpec.parse(text, key)
    if spec.scheme != "tcp" or spec.target_host is None or spec.target_port is None:
        raise ConfigError(
            key,
            f"{text!r}: the native protocol reverses tcp://[BIND:]PORT:HOST:PORT"
            " (socks5/unix reverse tunnels need --protocol wstunnel)",
        )
    return ReverseSpec(spec.host, spec.port, spec.target_host, spec.target_port)


def _port(text: str, key: str, original: str) -> int:
    if not (text.isascii() and text.isdecimal()) or not 0 <= int(text) < 65536:
        raise ConfigError(key, f"{original!r}: {text!r} is not a port number")
    return int(text)


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """A local listener, written as wstunnel writes ``-L``.

    ``socks5://127.0.0.1:1080?login=u&password=p``, ``http://[::1]:8080``, and for fixed
    forwards ``udp://[BIND:]PORT:HOST:PORT?timeout_sec=0`` (BIND defaults to 127.0.0.1).
    """

    scheme: str
    host: str
    port: int
    users: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    target_host: str | None = None
    target_port: int | None = None

    @classmethod
    def parse(cls, text: str, key: str = "listen") -> ListenSpec:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in LISTEN_SCHEMES:
            raise ConfigError(key, f"{text!r}: scheme must be one of {', '.join(LISTEN_SCHEMES)}")
        address, _, query_text = rest.partition("?")
        address = address.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
        users: tuple[tuple[str, str], ...] = ()
        login, password = query.pop("login", None), query.pop("password", None)
        if (login is None) != (password is None):
            raise ConfigError(key, f"{text!r}: give both login= and password=")
        if login is not None and password is not None:
            if not login or not password:
                # RFC 1929: both are 1-255 bytes; an empty pair would be no protection at all.
                raise ConfigError(key, f"{text!r}: login= and password= must not be empty")
            users = ((login, password),)
        if scheme in ("stdio", "unix"):
            return _local_forward(scheme, address, users, query, key, text)
        fields = _split_endpoints(address, key, text)
        target_host: str | None = None
        target_port: int | None = None
        if scheme in FORWARD_SCHEMES:
            if len(fields) == 3:
                fields = ["127.0.0.1", *fields]
            if len(fields) != 4 or not fields[2]:
                raise ConfigError(key, f"{text!r}: expected {scheme}://[BIND:]PORT:HOST:PORT")
            target_host, target_port = fields[2], _port(fields[3], key, text)
            fields = fields[:2]
        if len(fields) == 1:
            fields = ["127.0.0.1", *fields]
        if len(fields) != 2 or not fields[1]:
            raise ConfigError(key, f"{text!r}: a port is required, e.g. {scheme}://127.0.0.1:1080")
        if "timeout_sec" in query:
            timeout = query["timeout_sec"]
            if not (timeout.isascii() and timeout.isdecimal()):
                raise ConfigError(key, f"{text!r}: timeout_sec must be a whole number of seconds")
        return cls(
            scheme,
            fields[0] or "127.0.0.1",
            _port(fields[1], key, text),
            users,
            tuple(sorted(query.items())),
            target_host,
            target_port,
        )

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    def __str__(self) -> str:
        """As it is written (``-L``), without credentials: it names a forward in log lines
        and in the access log's ``rule``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "stdio":  # no local address
            text = "stdio://"
        elif self.scheme == "unix":  # the path, no port
            text = f"unix://{self.host}:"
        else:
            text = f"{self.scheme}://{host}:{self.port}:"
        if self.target_host is None:
            return text[:-1]
        target = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        return f"{text}{target}:{self.target_port}"


def _local_forward(
    scheme: str,
    address: str,
    users: tuple[tuple[str, str], ...],
    query: dict[str, str],
    key: str,
    text: str,
) -> ListenSpec:
    """``stdio://HOST:PORT`` and ``unix:///path.sock:HOST:PORT`` (the path in ``host``)."""
    fields = _split_endpoints(address, key, text)
    if scheme == "stdio":
        fields = ["", *fields]
    if len(fields) != 3 or not fields[0] and scheme == "unix" or not fields[1]:
        shape = "stdio://HOST:PORT" if scheme == "stdio" else "unix:///PATH.sock:HOST:PORT"
        raise ConfigError(key, f"{text!r}: expected {shape}")
    target = fields[1].strip("[]")
    return ListenSpec(
        scheme,
        fields[0],
        0,
        users,
        tuple(sorted(query.items())),
        target,
        _port(fields[2], key, text),
    )


# -- secrets ------------------------------------------------------------------------------------


def read_secret(path: Path, key: str) -> bytes:
    try:
        secret = path.expanduser().read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(secret) < 8:
        raise ConfigError(key, f"{path}: the secret must be at least 8 bytes")
    return secret


def secret_from(secret_file: str | Path | None, key: str) -> bytes:
    """The secret from ``secret_file`` or the AUTOVPN_SECRET environment variable."""
    if secret_file:
        return read_secret(Path(secret_file), key)
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        if len(env) < 8:
            raise ConfigError(SECRET_ENV, "the secret must be at least 8 bytes")
        return env.encode()
    raise ConfigError(key, f"no secret: use --secret-file FILE or set {SECRET_ENV}")


# -- parsers of this file's values --------------------------------------------------------------


def parse_control(value: str | bool, key: str = "control") -> str | None:
    """``control = "127.0.0.1:9090"`` (loopback only: other machines have no business there;
    browsers on this one are kept out by ``monitor.guard``), or ``false`` to turn it off."""
    if value is False:
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"expected HOST:PORT or false, got {value!r}")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not (port.isascii() and port.isdecimal()) or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"{value!r}: expected HOST:PORT, e.g. {DEFAULT_CONTROL}")
    if not is_loopback(host):
        raise ConfigError(key, f"{value!r}: the control API listens on loopback only")
    return value


def parse_control_host(text: str, key: str = "control_hosts") -> str:
    """A name for ``control_hosts``: as a browser sends it in Host, without the port.  Parsed
    by the guard's own Host parser, so what is accepted here is what the guard matches."""
    parsed = parse_host(text if ":" not in text or text.startswith("[") else f"[{text}]")
    if parsed is None or parsed[1] is not None:
        raise ConfigError(key, f"{text!r}: expected a host name or address without a port")
    return normalize_host_name(parsed[0])


# The keepalive pair (docs/protocol.md, Liveness), from [client] or [server] or from the flags.
_INTERVAL_EXPECTS = "seconds, 0 (off) or more"
_TIMEOUT_EXPECTS = "seconds, more than 0"


def _check_interval(interval: float, key: str) -> float:
    if not math.isfinite(interval) or interval < 0:
        raise ConfigError(key, f"{interval!r}: {_INTERVAL_EXPECTS}")
    return float(interval)


def _check_timeout(timeout: float, key: str) -> float:
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(key, f"{timeout!r}: {_TIMEOUT_EXPECTS}")
    return float(timeout)


def _check_keepalive_order(interval: float, timeout: float, timeout_key: str) -> None:
    """The timeout must leave a PING time to be answered (``interval`` 0: keepalive is off)."""
    if interval > 0 and timeout <= interval:
        raise ConfigError(
            timeout_key,
            f"{timeout:g} s is not longer than the keepalive interval ({interval:g} s): "
            "use about three intervals",
        )


def check_keepalive(interval: float, timeout: float, interval_key: str, timeout_key: str) -> None:
    """The keepalive pair as the flags give it: each value, then the timeout past the interval."""
    _check_interval(interval, interval_key)
    _check_timeout(timeout, timeout_key)
    _check_keepalive_order(interval, timeout, timeout_key)


def _geoip(value: str | bool, where: Where) -> bool | None:
    if value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise where.error(f'expected "auto", true or false, got {value!r}')


def _cidr(text: str) -> None:
    ipaddress.ip_network(text, strict=False)  # ValueError names the problem


MODE = mapped(choice(*(m.value for m in Mode)), lambda value, where: Mode(value))
SERVER_URL = Parser(
    "a wss:// or ws:// URL",
    frozenset({"string"}),
    lambda value, where: ServerURL.parse(value, key=where.key),
)
LISTENER = Parser(
    "a listener URL (socks5://, http://, tcp://, udp://, unix://, stdio://)",
    frozenset({"string"}),
    lambda value, where: ListenSpec.parse(value, where.key),
)
CONTROL = false_or(
    Parser(
        '"HOST:PORT" on loopback',
        frozenset({"string"}),
        lambda value, where: parse_control(value, where.key),
    )
)
GEOIP = Parser('"auto", true or false', frozenset({"string", "boolean"}), _geoip)
ALLOW_ENTRY = checked(AllowEntry.parse, "a CIDR, an IP or a host name, each with :PORT or not")
CIDR = checked(_cidr, "a CIDR (an address with /PREFIX)")
DNS_SERVER = checked(Upstream.parse, "a DNS server's IP address, with :PORT or not")
RULE = checked(parse_user_rule, "a rule, e.g. domain:corp.example=direct")
DOMAIN_NAME = text()
CONTROL_HOST = Parser(
    "a host name or address without a port",
    frozenset({"string"}),
    lambda value, where: parse_control_host(value, where.key),
)
KEEPALIVE_INTERVAL = Parser(
    _INTERVAL_EXPECTS,
    frozenset({"integer", "float"}),
    lambda value, where: _check_interval(value, where.key),
)
KEEPALIVE_TIMEOUT = Parser(
    _TIMEOUT_EXPECTS,
    frozenset({"integer", "float"}),
    lambda value, where: _check_timeout(value, where.key),
)
HANDSHAKE_TIMEOUT = number(above=0, at_most=MAX_HANDSHAKE_TIMEOUT)
SECONDS_OR_OFF = KEEPALIVE_INTERVAL  # seconds, 0 (off) or more


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One server of ``[client] servers``: ``{ url = "wss://a", priority = 1, weight = 1 }``,
    or the bare ``"wss://a"`` (priority 1, weight 1)."""

    url: ServerURL = field(metadata=toml(SERVER_URL, "the tunnel server", required=True))
    priority: int = field(
        default=1,
        metadata=toml(
            integer(0, 1000), "new streams go to the lowest priority up; backups get higher"
        ),
    )
    weight: int = field(
        default=1,
        metadata=toml(integer(1, 1000), "share of new streams among servers of equal priority"),
    )


_SERVER_TABLE = table(ServerEntry)
_SERVER_SHAPE = '"wss://HOST:PORT" or { url = "wss://HOST:PORT", priority = N, weight = N }'


def _server_entry(value: str | dict[str, Any], where: Where) -> ServerEntry:
    if isinstance(value, str):
        return ServerEntry(SERVER_URL(value, where))
    if "url" not in value:  # not a server entry at all: one error, not one per key
        raise where.error(f"expected {_SERVER_SHAPE}")
    return _SERVER_TABLE(value, where)


SERVER_ENTRY = Parser(
    _SERVER_SHAPE, frozenset({"string", "table"}), _server_entry, _SERVER_TABLE.tables
)


SECONDS = Parser(
    "seconds, 0 or more",
    frozenset({"integer", "float"}),
    lambda value, where: _check_interval(value, where.key),
)


def _headers(value: dict[str, str], where: Where) -> tuple[tuple[str, str], ...]:
    """``{ "X-Name" = "value" }``: names a header line can carry, values without line breaks."""
    for name, header in value.items():
        if not name or any(c.isspace() or c in ':"' for c in name):
            raise where.error(f"{name!r} is not a header name")
        if "\r" in header or "\n" in header:
            raise where.at(name).error("a header value cannot hold a line break")
    return tuple(value.items())


HEADERS = mapped(table_of(text()), _headers)


def check_reverse(text: str, key: str, protocol: str) -> None:
    """A ``-R`` spec as the client's protocol takes it: native ``tcp://[BIND:]PORT:HOST:PORT``;
    wstunnel's ``tcp://``, ``socks5://[BIND:]PORT`` and ``unix://PATH:HOST:PORT``."""
    if protocol != "wstunnel":
        parse_reverse(text, key)
        return
    scheme = text.partition("://")[0]
    if scheme not in ("tcp", "socks5", "unix"):
        raise ConfigError(key, f"{text!r}: wstunnel reverses tcp://, socks5:// and unix://")
    ListenSpec.parse(text, key)


def _pem_file(problem: Callable[[Path], str | None], what: str) -> Parser[Path]:
    """An existing file that holds a PEM ``what`` (``pem.py``: "not a PEM certificate")."""
    exists = file_path(must_exist=True)

    def convert(value: str, where: Where) -> Path:
        path = exists(value, where)
        reason = problem(path)
        if reason is not None:
            raise where.error(reason)
        return path

    return Parser(f"the path of a PEM {what} file", frozenset({"string"}), convert)


CERTIFICATE_FILE = _pem_file(certificate_problem, "certificate")
PRIVATE_KEY_FILE = _pem_file(private_key_problem, "private key")


def certificate_flag(path: Path, flag: str) -> Path:
    """A flag's certificate file, checked as its key's is (relative to the working directory)."""
    return CERTIFICATE_FILE(str(path), Where(flag, Path.cwd()))


def private_key_flag(path: Path, flag: str) -> Path:
    """A flag's private key file, checked as its key's is."""
    return PRIVATE_KEY_FILE(str(path), Where(flag, Path.cwd()))


# -- the tables ---------------------------------------------------------------------------------


@dataclass(slots=True)
class WstunnelClientOptions:
    """The client's wstunnel-protocol settings (``client.protocol = "wstunnel"``): the table
    ``[client.wstunnel]``, each key named after its field, each a wstunnel flag."""

    headers: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=toml(
            HEADERS,
            'extra headers of the upgrade request, { "X-Name" = "value" } (-H)',
        ),
    )
    headers_file: str | None = field(
        default=None,
        metadata=toml(
            mapped(file_path(must_exist=True), lambda value, where: str(value)),
            "a file of 'Name: value' lines, read at each connection (--http-headers-file)",
        ),
    )
    credentials: str | None = field(
        default=None,
        metadata=toml(
            text(), "USER[:PASS] for the server's Basic authentication (--http-upgrade-credentials)"
        ),
    )
    min_idle: int = field(
        default=0,
        metadata=toml(integer(0), "connections kept open in advance (-c/--connection-min-idle)"),
    )
    max_backoff: float = field(
        default=300.0,
        metadata=toml(
            SECONDS,
            "longest wait between probes of a server that is down, 30 s at most"
            " (--connection-retry-max-backoff)",
        ),
    )
    ping_interval: float = field(
        default=DEFAULT_PING_INTERVAL,
        metadata=toml(
            SECONDS, "seconds between WebSocket pings; 0: none (--websocket-ping-frequency)"
        ),
    )
    sni_disable: bool = field(
        default=False,
        metadata=toml(boolean(), "send no SNI and skip the name check (--tls-sni-disable)"),
    )
    remote_to_local: tuple[str, ...] = field(
        default=(),
        metadata=not_in_file('client.reverse, when client.protocol = "wstunnel" (-R)'),
    )
    reverse_max_backoff: float = field(
        default=1.0,
        metadata=toml(
            SECONDS,
            "longest wait between reverse tunnel requests"
            " (--reverse-tunnel-connection-retry-max-backoff)",
        ),
    )


@dataclass(slots=True)
class WstunnelServerOptions:
    """The server's wstunnel settings: the table ``[server.wstunnel]`` (``--restrict-*``, ping
    frequency, reverse idle timeout)."""

    enabled: bool = field(
        default=True,
        metadata=toml(
            boolean(), "serve stock wstunnel clients on the tunnel port (false: --no-wstunnel)"
        ),
    )
    restrict_to: tuple[str, ...] = field(
        default=(),
        metadata=toml(
            mapped(list_of(text()), lambda value, where: tuple(value)),
            "the only HOST:PORT destinations wstunnel clients may ask for (--restrict-to)",
        ),
    )
    restrict_path_prefixes: tuple[str, ...] = field(
        default=(),
        metadata=toml(
            mapped(list_of(text()), lambda value, where: tuple(value)),
            "the only path prefixes wstunnel clients may use (-r)",
        ),
    )
    restrict_config: Path | None = field(
        default=None,
        metadata=toml(
            file_path(must_exist=True),
            "wstunnel's restrictions.yaml (--restrict-config; not with restrict_to or"
            " restrict_path_prefixes)",
        ),
    )
    ping_interval: float = field(
        default=DEFAULT_PING_INTERVAL,
        metadata=toml(
            SECONDS, "seconds between WebSocket pings; 0: none (--websocket-ping-frequency)"
        ),
    )
    connect_timeout: float = field(
        default=10.0, metadata=not_in_file("seconds to dial a wstunnel client's destination")
    )
    #: ``--remote-to-local-server-idle-timeout``: a reverse listener nobody waits on closes.
    reverse_idle_timeout: float = field(
        default=180.0,
        metadata=toml(
            SECONDS,
            "a reverse listener no client waits on closes after this many seconds"
            " (--remote-to-local-server-idle-timeout)",
        ),
    )


@dataclass(slots=True)
class ClientConfig:
    """The ``[client]`` table: the local listeners and the tunnel server they use."""

    server: ServerURL = field(
        metadata=toml(
            SERVER_URL,
            "the tunnel server, e.g. wss://vpn.example.net:443 (or servers, for several)",
        )
    )
    secret: bytes = field(
        repr=False,  # never in a repr: they end up in logs and tracebacks
        metadata=not_in_file("the shared secret, read from secret_file or AUTOVPN_SECRET"),
    )
    secret_file: Path | None = field(
        default=None,
        metadata=toml(
            file_path(),
            "the file holding the secret (at least 8 bytes); without it, the AUTOVPN_SECRET"
            " environment variable (a stock wstunnel server needs neither)",
        ),
    )
    user: str = field(
        default=DEFAULT_USER, metadata=toml(text(), "the user name the secret belongs to")
    )
    tls_ca: Path | None = field(
        default=None,
        metadata=toml(
            CERTIFICATE_FILE,
            "trust this CA (a private CA or a pinned certificate); omit for the system store",
        ),
    )
    tls_certificate: Path | None = field(
        default=None,
        metadata=toml(
            CERTIFICATE_FILE,
            "mTLS: the client certificate to show the server, in either protocol (PEM)",
        ),
    )
    tls_private_key: Path | None = field(
        default=None,
        metadata=toml(PRIVATE_KEY_FILE, "its private key (default: in the certificate)"),
    )
    insecure: bool = field(
        default=False,
        metadata=toml(boolean(), "do NOT verify the server certificate (anyone can intercept)"),
    )
    sni: str | None = field(
        default=None, metadata=toml(text(), "the TLS server name to send (--tls-sni-override)")
    )
    path_prefix: str = field(
        default="autovpn", metadata=toml(text(), "the HTTP upgrade path prefix (-P)")
    )
    pool_size: int = field(
        default=1, metadata=toml(integer(1, 64), "tunnel connections to keep open")
    )
    listen: list[ListenSpec] = field(
        default_factory=list,
        metadata=toml(
            list_of(LISTENER),
            'the local listeners, as wstunnel writes -L: ["socks5://127.0.0.1:1080",'
            ' "http://127.0.0.1:8080?login=u&password=p", "udp://51820:10.0.0.1:51820"]',
        ),
    )
    allow_open: bool = field(
        default=False,
        metadata=toml(boolean(), "allow listeners on non-loopback addresses without credentials"),
    )
    keepalive_interval: float = field(
        default=15.0,
        metadata=toml(
            KEEPALIVE_INTERVAL, "PING after this many seconds without hearing from the server"
        ),
    )
    keepalive_timeout: float = field(
        default=45.0,
        metadata=toml(
            KEEPALIVE_TIMEOUT,
            "a tunnel connection silent this many seconds is dead (longer than the interval)",
        ),
    )
    idle_timeout: float = field(
        default=IDLE_TIMEOUT,
        metadata=toml(
            SECONDS_OR_OFF,
            "a relayed connection (direct, tunnelled, forwarded) that moved no byte either way"
            " this many seconds is reset, here and at the server; 0: never",
        ),
    )
    handshake_timeout: float = field(
        default=LISTENER_HANDSHAKE_TIMEOUT,
        metadata=toml(
            HANDSHAKE_TIMEOUT,
            "seconds a SOCKS5/HTTP client has from its accept until its request is read and its"
            " target connected; bytes do not extend it (idle and slowloris clients)",
        ),
    )
    servers: list[ServerEntry] = field(
        default_factory=list,
        metadata=toml(
            list_of(SERVER_ENTRY),
            "several tunnel servers instead of server: failover by priority (lower first),"
            " spread by weight among equals, fail-back when a better one returns",
        ),
    )
    retries: int = field(
        default=3,
        metadata=toml(
            integer(1, 10),
            "attempts per connection (tunnelled or direct): a tunnel failure moves to the next"
            " server, a failed direct connect to the next address",
        ),
    )
    connect_timeout: float = field(
        default=10.0,
        metadata=toml(
            number(above=0, at_most=300),
            "seconds for a tunnel connection's TCP, TLS and upgrade, and for a direct connect",
        ),
    )
    open_timeout: float = field(
        default=15.0,
        metadata=toml(
            number(above=0, at_most=300),
            "seconds to wait for the server's answer to a new stream (it dials the target)",
        ),
    )
    retry_refused_after: float = field(
        default=300.0,
        metadata=toml(
            number(above=0, at_most=86400),
            "seconds before trying again a server that refused us for good (the secret, the"
            " certificate); meanwhile requests fail at once with the reason",
        ),
    )
    fallback_direct_after: float = field(
        default=0.0,
        metadata=toml(
            SECONDS_OR_OFF,
            "when every server has been down this many seconds, smart mode's default route"
            " goes direct until one is back (rules and lists never); 0: off",
        ),
    )
    max_connections_per_address: int = field(
        default=LISTENER_MAX_CONNECTIONS_PER_ADDRESS,
        metadata=toml(
            integer(1),
            "connections one client address may hold on each SOCKS5/HTTP listener (on loopback"
            " every local program shares one address); more are closed at once",
        ),
    )
    protocol: str = field(
        default="autovpn",
        metadata=toml(
            choice("autovpn", "wstunnel"),
            "autovpn (our multiplexed tunnel) or wstunnel (a stock wstunnel v10 server)",
        ),
    )
    wstunnel: WstunnelClientOptions = field(
        default_factory=WstunnelClientOptions,
        metadata=toml(
            table(WstunnelClientOptions),
            "the wstunnel protocol's settings (-H, -c, --http-upgrade-credentials...)",
        ),
    )
    reverse: list[ReverseSpec] = field(
        default_factory=list,
        metadata=toml(
            list_of(text()),
            "reverse tunnels (-R): the server listens, each connection comes back here;"
            ' tcp://[BIND:]PORT:HOST:PORT, and with protocol = "wstunnel" also'
            " socks5://[BIND:]PORT and unix://PATH:HOST:PORT",
        ),
    )


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One user of ``[server.users]``: ``alice = { secret_file = "alice.secret" }``."""

    secret_file: Path = field(
        metadata=toml(file_path(), "the file holding the user's secret", required=True)
    )


def server_entries(cc: ClientConfig) -> list[ServerEntry]:
    """The client's servers: ``servers``, or the one ``server``."""
    return list(cc.servers) or [ServerEntry(cc.server)]


USER = mapped(
    table(UserEntry, expects='{ secret_file = "FILE" }'),
    lambda user, where: read_secret(user.secret_file, where.at("secret_file").key),
)


@dataclass(slots=True)
class ServerConfig:
    """The ``[server]`` table: the tunnel server and who may use it."""

    listen: ServerURL = field(
        metadata=toml(
            SERVER_URL,
            "where to serve: wss://0.0.0.0:8443, or ws:// behind a TLS-terminating proxy",
            required=True,
        )
    )
    users: dict[str, bytes] = field(
        repr=False,  # the secrets: never in a repr
        metadata=toml(
            table_of(USER),
            "the users and their secrets; without it, secret_file is user"
            f" {DEFAULT_USER!r}'s secret",
        ),
    )
    tls_certificate: Path | None = field(
        default=None,
        metadata=toml(CERTIFICATE_FILE, "the server's certificate chain (PEM)"),
    )
    tls_private_key: Path | None = field(
        default=None, metadata=toml(PRIVATE_KEY_FILE, "its private key (PEM)")
    )
    path_prefix: str = field(
        default="autovpn", metadata=toml(text(), "the HTTP upgrade path prefix")
    )
    allow: list[str] = field(
        default_factory=list,
        metadata=toml(
            list_of(ALLOW_ENTRY),
            "destinations the default policy refuses (private, loopback, this host) to open",
        ),
    )
    allow_all: bool = field(
        default=False,
        metadata=not_in_file("the embedded server: the user's own machine, no SSRF boundary"),
    )
    tls_client_ca_certs: Path | None = field(
        default=None,
        metadata=toml(
            CERTIFICATE_FILE,
            "mTLS: every client (both protocols) must present a certificate this CA signed;"
            " a stock wstunnel client is let in by it (needs wss://)",
        ),
    )
    allow_anonymous: bool = field(
        default=False,
        metadata=toml(
            boolean(),
            "let stock wstunnel clients with no secret path prefix and no client certificate"
            " open forward tunnels: an open proxy to anyone who reaches the port (reverse"
            " tunnels stay refused; native clients always authenticate)",
        ),
    )
    auth_failure_limit: int = field(
        default=DEFAULT_AUTH_FAILURE_LIMIT,
        metadata=toml(
            integer(0),
            "authentication failures (either protocol) one address may have within"
            " auth_failure_window before it is refused at once for that long (0: no limit)",
        ),
    )
    auth_failure_window: float = field(
        default=DEFAULT_AUTH_FAILURE_WINDOW,
        metadata=toml(
            number(above=0, at_most=86400),
            "seconds authentication failures are counted over, and how long an address that"
            " had too many is refused",
        ),
    )
    wstunnel: WstunnelServerOptions = field(
        default_factory=WstunnelServerOptions,
        metadata=toml(
            table(WstunnelServerOptions),
            "how stock wstunnel clients are served (--no-wstunnel, --restrict-to, ...)",
        ),
    )
    reverse_binds: list[str] = field(
        default_factory=lambda: list(DEFAULT_REVERSE_BINDS),
        metadata=toml(
            list_of(CIDR), "addresses native reverse tunnels may bind on (default: loopback)"
        ),
    )
    max_reverse_listeners_per_client: int = field(
        default=MAX_REVERSE_LISTENERS_PER_CLIENT,
        metadata=toml(
            integer(0),
            "reverse listeners (native and wstunnel) one client may hold at once: a native"
            " user, or a wstunnel client's certificate CN, else its address (0: no reverse"
            " tunnels)",
        ),
    )
    keepalive_interval: float = field(
        default=15.0,
        metadata=toml(
            KEEPALIVE_INTERVAL, "PING after this many seconds without hearing from a client"
        ),
    )
    keepalive_timeout: float = field(
        default=45.0,
        metadata=toml(
            KEEPALIVE_TIMEOUT,
            "a client connection silent this many seconds is dead (longer than the interval)",
        ),
    )
    idle_timeout: float = field(
        default=IDLE_TIMEOUT,
        metadata=toml(
            SECONDS_OR_OFF,
            "a relayed stream or wstunnel tunnel that moved no byte either way this many"
            " seconds is reset, here and at the client; 0: never",
        ),
    )
    handshake_timeout: float = field(
        default=SERVER_HANDSHAKE_TIMEOUT,
        metadata=toml(
            HANDSHAKE_TIMEOUT,
            "seconds a tunnel peer has for each step of its handshake: TLS, the upgrade request,"
            " the AUTH frame after the 101; bytes do not extend it (idle and slowloris peers)",
        ),
    )
    max_connections_per_address: int = field(
        default=SERVER_MAX_CONNECTIONS_PER_ADDRESS,
        metadata=toml(
            integer(1),
            "TCP connections one client address may hold, in their handshake or after (native"
            " tunnel connections and wstunnel tunnels alike); more are closed at once",
        ),
    )
    max_streams_per_connection: int = field(
        default=MAX_STREAMS_PER_CONNECTION,
        metadata=toml(
            integer(1),
            "streams one tunnel connection may have open (each may buffer one 1 MiB window"
            " here); more are refused with REFUSED_STREAM",
        ),
    )
    max_pending_opens: int = field(
        default=MAX_PENDING_OPENS,
        metadata=toml(
            integer(1),
            "streams of one tunnel connection whose target is being resolved or dialled at"
            " once; more are refused with REFUSED_STREAM",
        ),
    )
    lookup_timeout: float = field(
        default=LOOKUP_TIMEOUT,
        metadata=toml(
            number(above=0, at_most=300),
            "seconds a destination name's lookup (the system resolver) may take, its wait for"
            " a turn included; then the stream or wstunnel tunnel fails, naming the resolver",
        ),
    )
    max_lookups_per_address: int = field(
        default=MAX_LOOKUPS_PER_ADDRESS,
        metadata=toml(
            integer(1),
            "destination name lookups one client address (IPv6: its /64) may have in progress;"
            " more wait for its own turn, never for other clients' lookups",
        ),
    )
    secret_file: Path | None = field(
        default=None,
        metadata=toml(
            file_path(),
            f"user {DEFAULT_USER!r}'s secret when there is no [server.users]; without it,"
            " the AUTOVPN_SECRET environment variable",
        ),
    )
    users_file: Path | None = field(
        default=None,
        metadata=toml(
            file_path(must_exist=True),
            "a file of NAME:SECRET_FILE lines, one user each (--users-file), added to"
            " [server.users]",
        ),
    )
    workers: int | None = field(
        default=None,
        metadata=toml(
            integer(1, MAX_WORKERS),
            "processes accepting on the listen address (SO_REUSEPORT, Linux); default: one per"
            " core; 1: a single process (docs/deploy.md)",
        ),
    )
    steer_by: str = field(
        default=DEFAULT_STEER_BY,
        metadata=toml(
            choice(*STEER_BY),
            "with workers, which worker gets a connection: by the client's address (every"
            " connection of an address on one worker, so the limits per address hold across"
            " workers) or by connection (a client's pool spreads over the workers; the limits"
            " per address are per worker); docs/deploy.md",
        ),
    )
    listen_fds: tuple[int, ...] = field(
        default=(),
        metadata=not_in_file(
            "a worker of `autovpn server --workers N`: the listening sockets its supervisor"
            " opened for it (one per address of the listen host)"
        ),
    )


def _finish_keepalive(t: Found[ClientConfig] | Found[ServerConfig]) -> None:
    """The keepalive timeout must be longer than the interval (each value is checked by its
    parser; a refused one is already reported, so the pair is not checked again)."""
    if t.failed("keepalive_interval") or t.failed("keepalive_timeout"):
        return
    try:
        _check_keepalive_order(
            t.current("keepalive_interval"),
            t.current("keepalive_timeout"),
            t.key("keepalive_timeout"),
        )
    except ConfigError as exc:
        t.errors.append(exc)


def _finish_client(t: Found[ClientConfig]) -> None:
    """server or servers (the first of which is ``server``).  The secret: from secret_file,
    else AUTOVPN_SECRET; a stock wstunnel server needs none.  The keepalive pair.  The reverse
    tunnels, as the protocol takes them."""
    _finish_keepalive(t)
    if "reverse" in t.values:
        _finish_reverse(t, t.values.pop("reverse"))
    servers = t.values.get("servers")
    if not (t.failed("server") or t.failed("servers")):
        if "server" in t.given and servers:
            t.error("servers", "give server or servers, not both")
        elif servers:
            t.values["server"] = servers[0].url
        elif "server" not in t.given:
            t.error("server", "required: a wss:// or ws:// URL (or servers = [...])")
    if t.failed("secret_file"):
        return
    secret_file = t.values.get("secret_file")
    if secret_file is None and t.values.get("protocol") == "wstunnel":
        t.values["secret"] = b""
    else:
        t.attempt("secret", lambda: secret_from(secret_file, t.key("secret_file")))


def _finish_reverse(t: Found[ClientConfig], specs: list[str]) -> None:
    """``reverse``: native specs become ReverseSpecs; with ``protocol = "wstunnel"`` they go,
    checked, to the wstunnel client (which parses them when it starts), as -R does."""
    protocol = t.values.get("protocol", "autovpn")
    key = t.key("reverse")
    errors = []
    for i, spec in enumerate(specs):
        try:
            check_reverse(spec, f"{key}[{i}]", protocol)
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        t.errors.extend(errors)
        t.given.discard("reverse")
    elif protocol == "wstunnel":
        options = t.values.setdefault("wstunnel", WstunnelClientOptions())
        options.remote_to_local = tuple(specs)
    else:
        t.values["reverse"] = [parse_reverse(spec, key) for spec in specs]


def read_users_file(path: Path, key: str = "--users-file") -> dict[str, bytes]:
    """The users of a file of ``NAME:SECRET_FILE`` lines (``#`` comments; a relative
    SECRET_FILE is relative to the file)."""
    users: dict[str, bytes] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(key, f"cannot read {path}: {reason}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret_file = line.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{key} {path}:{lineno}", "expected NAME:SECRET_FILE")
        secret_path = Path(secret_file.strip()).expanduser()
        if not secret_path.is_absolute():
            secret_path = path.parent / secret_path
        users[name.strip()] = read_secret(secret_path, f"{key} {path}:{lineno}")
    return users


def _finish_server(t: Found[ServerConfig]) -> None:
    """The users: [server.users] and users_file's; without either, one user: "default", with
    secret_file's secret (or AUTOVPN_SECRET).  wss:// needs a certificate and its key.  The
    keepalive pair.  restrictions.yaml or the restrict lists, not both."""
    _finish_keepalive(t)
    users_file = t.values.get("users_file")
    if users_file is not None and not t.failed("users"):
        try:
            t.values["users"] = {**t.values.get("users", {}), **read_users_file(users_file)}
        except ConfigError as exc:
            t.error("users_file", exc.reason if exc.key == "--users-file" else str(exc))
    if not t.values.get("users") and not (
        t.failed("users") or t.failed("secret_file") or t.failed("users_file")
    ):
        secret_file = t.values.get("secret_file")
        t.attempt("users", lambda: {DEFAULT_USER: secret_from(secret_file, t.key("secret_file"))})
    options = t.values.get("wstunnel")
    if options is not None and options.restrict_config is not None:
        if options.restrict_to or options.restrict_path_prefixes:
            t.errors.append(
                ConfigError(
                    t.key("wstunnel") + ".restrict_config",
                    "conflicts with restrict_to and restrict_path_prefixes",
                )
            )
    listen = t.values.get("listen")
    if listen is not None and listen.tls:
        if not {"tls_certificate", "tls_private_key"} <= t.given:
            t.error("listen", "wss:// needs tls_certificate and tls_private_key")
    elif listen is not None and t.values.get("tls_client_ca_certs") is not None:
        t.error("tls_client_ca_certs", MTLS_NEEDS_WSS)


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One entry of ``[routing] lists``, as a table (a bare ``"FILE"`` is its path)."""

    path: Path = field(metadata=toml(file_path(must_exist=True), "the list file", required=True))
    action: str = field(
        default="proxy",
        metadata=toml(choice("proxy", "direct", "reject"), "what a name on the list gets"),
    )
    format: str = field(
        default="auto",
        metadata=toml(
            choice("auto", *sorted(f.value for f in ListFormat)),
            "the list's format; auto detects it",
        ),
    )
    name: str | None = field(
        default=None, metadata=toml(text(), 'shown in the reasons; default "<action> list"')
    )


_LIST_TABLE = table(ListEntry)
_LIST_SHAPE = '"FILE" or { path = "FILE", action = ... }'


def _list_entry(value: str | dict[str, Any], where: Where) -> ListSpec:
    spec = {"path": value} if isinstance(value, str) else value
    if "path" not in spec:  # not a list entry at all: one error, not one per key
        raise where.error(f"expected {_LIST_SHAPE}")
    entry = _LIST_TABLE(spec, where)
    fmt = None if entry.format == "auto" else ListFormat(entry.format)
    return ListSpec(entry.path, Action(entry.action), fmt, entry.name)


LIST_ENTRY = Parser(_LIST_SHAPE, frozenset({"string", "table"}), _list_entry, _LIST_TABLE.tables)


@dataclass(slots=True)
class RoutingConfig:
    """The ``[routing]`` table: what ``Router.from_config`` and the split resolver get.

    ::

        [routing]
        default = "proxy"                 # what smart mode does when no rule matches
        rules = ["domain:corp.example=direct", "keyword:ads=reject", "10.8.0.0/16=proxy"]
        lists = [{ path = "gfwlist.txt", action = "proxy", format = "autoproxy" }, "mine.txt"]
        default_lists = true              # the shipped proxy/direct lists
        proxy_add = ["example.org"]       # added to the shipped proxy list
        direct_add = ["example.cn"]
        remove = ["github.com"]           # dropped from the shipped lists
        geoip = "auto"                    # load the country database if a rule needs it
        [routing.dns]
        local = ["192.0.2.53"]            # omit for the system's resolvers
        public = ["8.8.8.8", "1.1.1.1"]   # asked through the tunnel for proxied names
        hosts_file = "/etc/hosts"         # false to ignore it
        timeout = 5.0
        concurrency = 50                  # names in flight in a batch (autovpn resolve)
        warm_at_start = false             # resolve the lists when the engine starts
    """

    default: str = field(
        default="proxy",
        metadata=toml(choice("proxy", "direct"), "what smart mode does when no rule matches"),
    )
    rules: list[str] = field(
        default_factory=list,
        metadata=toml(list_of(RULE), "the user's rules, checked first: KIND:VALUE=ACTION"),
    )
    lists: list[ListSpec] = field(
        default_factory=list,
        metadata=toml(
            list_of(LIST_ENTRY),
            "extra list files (AutoProxy/gfwlist, v2fly, Clash, dnsmasq, plain)",
        ),
    )
    default_lists: bool = field(
        default=True, metadata=toml(boolean(), "load the shipped proxy and direct lists")
    )
    proxy_add: list[str] = field(
        default_factory=list,
        metadata=toml(list_of(DOMAIN_NAME), "names added to the shipped proxy list"),
    )
    direct_add: list[str] = field(
        default_factory=list,
        metadata=toml(list_of(DOMAIN_NAME), "names added to the shipped direct list"),
    )
    remove: list[str] = field(
        default_factory=list,
        metadata=toml(list_of(DOMAIN_NAME), "names dropped from the shipped lists"),
    )
    geoip: bool | None = field(
        default=None,
        metadata=toml(GEOIP, "load the country database; auto: if a rule needs it"),
    )
    dns_local: list[str] | None = field(
        default=None,
        metadata=toml(
            list_of(DNS_SERVER),
            "the resolvers of direct names; omit for the system's",
            key="dns.local",
        ),
    )
    dns_public: list[str] = field(
        default_factory=lambda: ["8.8.8.8", "1.1.1.1"],
        metadata=toml(
            list_of(DNS_SERVER),
            "the resolvers of proxied names, asked through the tunnel (DNS over TCP)",
            key="dns.public",
        ),
    )
    hosts_file: Path | None = field(
        default_factory=default_hosts_path,
        metadata=toml(
            false_or(file_path()),
            "the hosts file, read first; false to ignore it",
            key="dns.hosts_file",
        ),
    )
    dns_timeout: float = field(
        default=5.0,
        metadata=toml(
            number(above=0, at_most=60), "seconds to wait for a DNS answer", key="dns.timeout"
        ),
    )
    concurrency: int = field(
        default=50,
        metadata=toml(
            integer(1, 1000),
            "names in flight in a batch (autovpn resolve)",
            key="dns.concurrency",
        ),
    )
    warm_at_start: bool = field(
        default=False,
        metadata=toml(
            boolean(), "resolve the lists when the engine starts", key="dns.warm_at_start"
        ),
    )

    def build_router(self, mode: Mode) -> Router:
        """The router this table describes (list-file problems land in ``router.errors``)."""
        geo = None
        wants_geo = self.geoip or (
            self.geoip is None and any("geoip" in r.lower() for r in self.rules)
        )
        if wants_geo:
            try:
                # Optional and slow to load: only when a rule needs the country database.
                from autovpn.routing.geoip import geoip2fast_lookup

                geo = geoip2fast_lookup()
            except ImportError:
                geo = None
        return Router.from_config(
            mode=mode,
            default=Action(self.default),
            rules=self.rules,
            lists=self.lists,
            default_lists=self.default_lists,
            proxy_add=self.proxy_add,
            direct_add=self.direct_add,
            remove=self.remove,
            geoip=geo,
        )


@dataclass(slots=True)
class Config:
    """The whole file: its top-level keys and its tables."""

    client: ClientConfig | None = field(
        default=None,
        metadata=toml(
            table(ClientConfig, finish=_finish_client),
            "run the local listeners and the tunnel client",
        ),
    )
    server: ServerConfig | None = field(
        default=None,
        metadata=toml(table(ServerConfig, finish=_finish_server), "run the tunnel server"),
    )
    mode: Mode = field(
        default=Mode.GLOBAL,
        metadata=toml(
            MODE,
            "global: everything through the tunnel; smart: the routing decides; direct: none",
        ),
    )
    log_level: str = field(
        default="info", metadata=toml(choice("debug", "info", "warning", "error"), "log level")
    )
    log_format: str = field(
        default="text",
        metadata=toml(
            choice("text", "json"), "text lines, or one JSON object per line (--log-format)"
        ),
    )
    log_file: Path | None = field(
        default=None,
        metadata=toml(
            file_path(),
            "write the log to this file, rotated at log_max_bytes (--log-file); default stderr",
        ),
    )
    log_max_bytes: int = field(
        default=10 << 20,
        metadata=toml(integer(0), "rotate log_file past this size (0: never rotate)"),
    )
    log_backups: int = field(
        default=5,
        metadata=toml(integer(0, 1000), "rotated log files kept (log_file.1, .2 ...)"),
    )
    stats: bool = field(
        default=True,
        metadata=toml(
            boolean(),
            "keep traffic statistics (per listener, route, server, user, domain; /metrics and"
            " the access log's byte counts): false saves their small cost",
        ),
    )
    routing: RoutingConfig = field(
        default_factory=RoutingConfig,
        metadata=toml(table(RoutingConfig), "smart mode's rules and lists, and the DNS"),
    )
    control: str | None = field(
        default=DEFAULT_CONTROL,
        metadata=toml(
            CONTROL, "the control API (autovpn mode, route, PAC files): HOST:PORT, or false"
        ),
    )
    control_hosts: list[str] = field(
        default_factory=list,
        metadata=toml(
            list_of(CONTROL_HOST),
            "host names (besides loopback addresses and localhost) the control API answers to,"
            " e.g. a name the hosts file maps to 127.0.0.1; any other name in Host is refused",
        ),
    )
    auto_port: bool = field(
        default=False,
        metadata=toml(
            boolean(),
            "a taken SOCKS5/HTTP listener or control API port: bind the next free one (of 20);"
            " status, the PAC files and the banner report the port bound",
        ),
    )
    system_proxy: bool = field(
        default=False,
        metadata=toml(
            boolean(),
            "point the system's proxy setting at the PAC file while the engine runs (GNOME,"
            " macOS, Windows) and restore the previous setting when it stops",
        ),
    )


def parse_config(data: dict[str, Any], base: Path) -> tuple[Config, list[ConfigError]]:
    """Build a Config from parsed TOML; relative paths are relative to ``base``.  A table with
    an error is left at its default; the errors say why."""
    found = walk(Config, data, Where("", base))
    return Config(**found.values), found.errors


def load_file(path: Path) -> tuple[Config, list[ConfigError]]:
    """Parse a TOML config file.  Syntax errors come back as one error naming the line; each
    error's ``line`` is where the file says its key, when it can be told (``key_line``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return Config(), [ConfigError(str(path), f"cannot read: {exc.strerror or exc}")]
    except UnicodeDecodeError:
        return Config(), [ConfigError(str(path), "not UTF-8 text")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        return Config(), [
            ConfigError(str(path), f"TOML syntax: {exc}", int(at.group(1)) if at else None)
        ]
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        return Config(), [ConfigError(str(path), "TOML: arrays or tables nested too deeply")]
    except ValueError as exc:
        # Not a TOMLDecodeError: an integer of more than 4300 digits (int()'s own limit).
        return Config(), [ConfigError(str(path), f"TOML: {exc}")]
    cfg, errors = parse_config(data, path.parent)
    for error in errors:
        error.line = key_line(text, error.key)
    return cfg, errors


def describe_file_error(path: Path, error: ConfigError) -> str:
    """``FILE:LINE: KEY: REASON``, one line (the line left out when it cannot be told)."""
    where = f"{path}:{error.line}" if error.line is not None else str(path)
    if error.key == str(path):
        return f"{where}: {error.reason}"
    return f"{where}: {error.key}: {error.reason}"


def state_dir() -> Path:
    """Where autovpn keeps its own state (certificate, secret, scores), per platform."""
    override = os.environ.get("AUTOVPN_STATE_DIR")
    if override:
        return Path(override)
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
        return base / "autovpn"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "autovpn"
    return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "autovpn"
