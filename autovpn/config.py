"""Configuration: typed values, parsed from a TOML file and/or command-line flags.

Everything the flags say, the file can say (flags win).  ``load_file`` collects *every* error
with the key it belongs to, so ``autovpn check-config`` reports them all at once.

Example::

    mode = "global"                      # global | smart | direct
    log_level = "info"

    [client]
    server = "wss://vpn.example.net:443"
    user = "alice"
    secret_file = "~/.config/autovpn/secret"
    tls_ca = "ca.pem"                    # private CA; omit for the system store
    listen = ["socks5://127.0.0.1:1080", "http://127.0.0.1:8080?login=u&password=p"]
    keepalive_interval = 15              # seconds (server too); 0 turns keepalive off
    keepalive_timeout = 45               # a tunnel connection silent this long is dead

    [server]
    listen = "wss://0.0.0.0:8443"
    tls_certificate = "cert.pem"
    tls_private_key = "key.pem"
    allow = ["127.0.0.0/8"]
    [server.users]
    alice = { secret_file = "alice.secret" }
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from autovpn.errors import ConfigError
from autovpn.monitor.guard import normalize_host_name, parse_host
from autovpn.net import is_loopback
from autovpn.policy import AllowEntry
from autovpn.routing.hosts import default_hosts_path
from autovpn.routing.lists import ListFormat
from autovpn.routing.router import Action, ListSpec, Mode, Router, parse_user_rule
from autovpn.routing.rules import RuleError
from autovpn.routing.upstream import Upstream

T = TypeVar("T")

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
#: wstunnel's ``--websocket-ping-frequency`` default, on both sides.
DEFAULT_PING_INTERVAL = 30.0


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
        return cls(tls, parts.hostname, port or (443 if tls else 80))

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


@dataclass(slots=True)
class WstunnelClientOptions:
    """The client's wstunnel-protocol settings (``client.protocol = "wstunnel"``)."""

    headers: tuple[tuple[str, str], ...] = ()
    headers_file: str | None = None
    credentials: str | None = None
    min_idle: int = 0
    max_backoff: float = 300.0
    ping_interval: float = DEFAULT_PING_INTERVAL
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    sni_disable: bool = False
    remote_to_local: tuple[str, ...] = ()  # -R specs
    reverse_max_backoff: float = 1.0  # --reverse-tunnel-connection-retry-max-backoff


@dataclass(slots=True)
class WstunnelServerOptions:
    """The server's wstunnel settings (``--restrict-*``, ping frequency, reverse idle timeout)."""

    #: Serve stock wstunnel clients on the tunnel port (``--no-wstunnel`` turns it off).
    enabled: bool = True
    restrict_to: tuple[str, ...] = ()
    restrict_path_prefixes: tuple[str, ...] = ()
    restrict_config: Path | None = None
    ping_interval: float = DEFAULT_PING_INTERVAL
    connect_timeout: float = 10.0
    #: ``--remote-to-local-server-idle-timeout``: a reverse listener nobody waits on closes.
    reverse_idle_timeout: float = 180.0


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


def _rekeyed(parse: Callable[[str], T], key: str) -> Callable[[str], T]:
    """``parse`` with its ConfigError reported under ``key`` (the config file's own key)."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as exc:
            raise ConfigError(key, exc.reason) from None

    return wrapped


def _cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string, got {value!r}")
    ipaddress.ip_network(value, strict=False)  # ValueError names the problem
    return value


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
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.scheme}://{host}:{self.port}"
        if self.target_host is not None:
            target = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
            text += f":{target}:{self.target_port}"
        return text


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


@dataclass(slots=True)
class ClientConfig:
    server: ServerURL
    secret: bytes
    user: str = DEFAULT_USER
    tls_ca: Path | None = None
    insecure: bool = False
    sni: str | None = None
    path_prefix: str = "autovpn"
    pool_size: int = 1
    listen: list[ListenSpec] = field(default_factory=list)
    allow_open: bool = False
    keepalive_interval: float = 15.0  # PING after this long without hearing from the server
    keepalive_timeout: float = 45.0  # a connection silent this long is dead
    #: "autovpn" (our mux) or "wstunnel" (a stock wstunnel v10 server; no secret needed)
    protocol: str = "autovpn"
    wstunnel: WstunnelClientOptions = field(default_factory=WstunnelClientOptions)
    #: Native reverse tunnels (-R tcp://[BIND:]PORT:HOST:PORT): listen on the server.
    reverse: list[ReverseSpec] = field(default_factory=list)


@dataclass(slots=True)
class ServerConfig:
    listen: ServerURL
    users: dict[str, bytes]
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    path_prefix: str = "autovpn"
    allow: list[str] = field(default_factory=list)
    allow_all: bool = False  # the embedded server: the user's own machine, no SSRF boundary
    tls_client_ca_certs: Path | None = None  # mTLS: clients must present a certificate
    wstunnel: WstunnelServerOptions = field(default_factory=WstunnelServerOptions)
    keepalive_interval: float = 15.0  # PING after this long without hearing from a client
    keepalive_timeout: float = 45.0  # a connection silent this long is dead
    #: Addresses native reverse tunnels may bind on this server (default: loopback only).
    reverse_binds: list[str] = field(default_factory=lambda: list(DEFAULT_REVERSE_BINDS))
    #: Reverse listeners (native and wstunnel) one client may hold at once: a native user, or a
    #: wstunnel client's certificate CN, else its address.
    max_reverse_listeners_per_client: int = MAX_REVERSE_LISTENERS_PER_CLIENT


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

    default: str = "proxy"
    rules: list[str] = field(default_factory=list)
    lists: list[ListSpec] = field(default_factory=list)
    default_lists: bool = True
    proxy_add: list[str] = field(default_factory=list)
    direct_add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    geoip: bool | None = None  # None: auto
    dns_local: list[str] | None = None  # None: the system's
    dns_public: list[str] = field(default_factory=lambda: ["8.8.8.8", "1.1.1.1"])
    hosts_file: Path | None = field(default_factory=default_hosts_path)
    dns_timeout: float = 5.0
    concurrency: int = 50
    warm_at_start: bool = False

    def build_router(self, mode: Mode) -> Router:
        """The router this table describes (list-file problems land in ``router.errors``)."""
        geo = None
        wants_geo = self.geoip or (
            self.geoip is None and any("geoip" in r.lower() for r in self.rules)
        )
        if wants_geo:
            try:
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
    client: ClientConfig | None = None
    server: ServerConfig | None = None
    mode: Mode = Mode.GLOBAL
    log_level: str = "info"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    #: The control API (``autovpn mode``, PAC files): ``HOST:PORT`` on loopback, None for off.
    control: str | None = DEFAULT_CONTROL
    #: Host names (besides loopback addresses and ``localhost``) the control API answers to,
    #: e.g. a name the hosts file maps to 127.0.0.1; any other name in Host is refused.
    control_hosts: list[str] = field(default_factory=list)


def parse_mode(value: object, key: str = "mode") -> Mode:
    choices = ", ".join(m.value for m in Mode)
    if not isinstance(value, str) or value not in {m.value for m in Mode}:
        raise ConfigError(key, f"{value!r} is not a mode: use one of {choices}")
    return Mode(value)


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


class _Collector:
    """Gathers ConfigErrors so that every bad key is reported, not only the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def unknown_keys(self, table: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in table:
            if key not in known:
                self.errors.append(ConfigError(f"{prefix}{key}", "unknown key"))

    def take(self, key: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigError as exc:
            self.errors.append(exc)
        except (TypeError, ValueError) as exc:
            self.errors.append(ConfigError(key, str(exc)))
        return None


def _expect(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(key, f"expected {names}, got {type(value).__name__} {value!r}")
    return value


_TOP_KEYS = {"mode", "log_level", "client", "server", "routing", "control", "control_hosts"}
_CLIENT_KEYS = {
    "protocol",
    "server",
    "user",
    "secret_file",
    "tls_ca",
    "insecure",
    "sni",
    "path_prefix",
    "pool_size",
    "listen",
    "allow_open",
    "keepalive_interval",
    "keepalive_timeout",
}
_SERVER_KEYS = {
    "reverse_binds",
    "max_reverse_listeners_per_client",
    "listen",
    "tls_certificate",
    "tls_private_key",
    "path_prefix",
    "allow",
    "secret_file",
    "users",
    "keepalive_interval",
    "keepalive_timeout",
}


def check_keepalive(interval: float, timeout: float, interval_key: str, timeout_key: str) -> None:
    """The keepalive pair (docs/protocol.md, Liveness): ``interval`` 0 turns it off; otherwise
    the timeout must leave the PING time to be answered."""
    if not math.isfinite(interval) or interval < 0:
        raise ConfigError(interval_key, f"{interval!r}: seconds, 0 (off) or more")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(timeout_key, f"{timeout!r}: seconds, more than 0")
    if interval > 0 and timeout <= interval:
        raise ConfigError(
            timeout_key,
            f"{timeout:g} s is not longer than the keepalive interval ({interval:g} s): "
            "use about three intervals",
        )


def _keepalive_keys(
    table: dict[str, Any], target: ClientConfig | ServerConfig, prefix: str, c: _Collector
) -> None:
    """``keepalive_interval`` and ``keepalive_timeout`` of the client or server table."""
    for key in ("keepalive_interval", "keepalive_timeout"):
        value = table.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            c.errors.append(ConfigError(prefix + key, f"expected seconds, got {value!r}"))
        else:
            setattr(target, key, float(value))
    c.take(
        prefix + "keepalive_timeout",
        check_keepalive,
        target.keepalive_interval,
        target.keepalive_timeout,
        prefix + "keepalive_interval",
        prefix + "keepalive_timeout",
    )


def parse_config(data: dict[str, Any], base: Path) -> tuple[Config, list[ConfigError]]:
    """Build a Config from parsed TOML; relative paths are relative to ``base``."""
    c = _Collector()
    cfg = Config()
    c.unknown_keys(data, _TOP_KEYS, "")

    def path(value: Any, key: str) -> Path:
        p = Path(_expect(value, str, key)).expanduser()
        return p if p.is_absolute() else base / p

    if "mode" in data:
        cfg.mode = c.take("mode", parse_mode, data["mode"]) or cfg.mode
    if "log_level" in data:
        level = data["log_level"]
        if level not in ("debug", "info", "warning", "error"):
            c.errors.append(ConfigError("log_level", "must be debug, info, warning or error"))
        else:
            cfg.log_level = level

    client = data.get("client")
    if client is not None:
        if not isinstance(client, dict):
            c.errors.append(ConfigError("client", "must be a table"))
        else:
            c.unknown_keys(client, _CLIENT_KEYS, "client.")
            server = c.take(
                "client.server",
                lambda: ServerURL.parse(
                    _expect(client.get("server"), str, "client.server"), key="client.server"
                ),
            )
            wstunnel_protocol = client.get("protocol") == "wstunnel"
            secret = (
                b""
                if wstunnel_protocol and "secret_file" not in client
                else c.take(
                    "client.secret_file",
                    lambda: secret_from(
                        path(client["secret_file"], "client.secret_file")
                        if "secret_file" in client
                        else None,
                        "client.secret_file",
                    ),
                )
            )
            listen = []
            for i, spec in enumerate(client.get("listen", [])):
                got = c.take(
                    f"client.listen[{i}]",
                    lambda s=spec, i=i: ListenSpec.parse(
                        _expect(s, str, f"client.listen[{i}]"), f"client.listen[{i}]"
                    ),
                )
                if got is not None:
                    listen.append(got)
            cc = ClientConfig(server or ServerURL(True, "invalid", 443), secret or b"")
            cc.listen = listen
            for key, kind in (
                ("user", str),
                ("sni", str),
                ("path_prefix", str),
                ("insecure", bool),
                ("pool_size", int),
                ("allow_open", bool),
                ("protocol", str),
            ):
                if key in client:
                    value = c.take(f"client.{key}", _expect, client[key], kind, f"client.{key}")
                    if value is not None:
                        setattr(cc, key, value)
            if cc.protocol not in ("autovpn", "wstunnel"):
                c.errors.append(ConfigError("client.protocol", 'must be "autovpn" or "wstunnel"'))
            if "tls_ca" in client:
                cc.tls_ca = c.take("client.tls_ca", path, client["tls_ca"], "client.tls_ca")
                if cc.tls_ca is not None and not cc.tls_ca.is_file():
                    c.errors.append(ConfigError("client.tls_ca", f"{cc.tls_ca}: no such file"))
            if not 1 <= cc.pool_size <= 64:
                c.errors.append(ConfigError("client.pool_size", "must be between 1 and 64"))
            _keepalive_keys(client, cc, "client.", c)
            cfg.client = cc

    server = data.get("server")
    if server is not None:
        if not isinstance(server, dict):
            c.errors.append(ConfigError("server", "must be a table"))
        else:
            c.unknown_keys(server, _SERVER_KEYS, "server.")
            listen_url = c.take(
                "server.listen",
                lambda: ServerURL.parse(
                    _expect(server.get("listen"), str, "server.listen"), key="server.listen"
                ),
            )
            users: dict[str, bytes] = {}
            table = c.take("server.users", _expect, server.get("users", {}), dict, "server.users")
            for name, entry in (table or {}).items():
                key = f"server.users.{name}"
                if isinstance(entry, dict) and "secret_file" in entry:
                    got = c.take(
                        key,
                        lambda e=entry, k=key: read_secret(
                            path(e["secret_file"], k + ".secret_file"), k + ".secret_file"
                        ),
                    )
                    if got is not None:
                        users[name] = got
                else:
                    c.errors.append(ConfigError(key, 'expected { secret_file = "FILE" }'))
            if not users:
                got = c.take(
                    "server.secret_file",
                    lambda: secret_from(
                        path(server["secret_file"], "server.secret_file")
                        if "secret_file" in server
                        else None,
                        "server.secret_file",
                    ),
                )
                if got is not None:
                    users[DEFAULT_USER] = got
            sc = ServerConfig(listen_url or ServerURL(True, "0.0.0.0", 8443), users)
            if "tls_certificate" in server:
                sc.tls_certificate = c.take(
                    "server.tls_certificate",
                    path,
                    server["tls_certificate"],
                    "server.tls_certificate",
                )
            if "tls_private_key" in server:
                sc.tls_private_key = c.take(
                    "server.tls_private_key",
                    path,
                    server["tls_private_key"],
                    "server.tls_private_key",
                )
            for key in ("tls_certificate", "tls_private_key"):
                p = getattr(sc, key)
                if p is not None and not p.is_file():
                    c.errors.append(ConfigError(f"server.{key}", f"{p}: no such file"))
            if sc.listen.tls and (sc.tls_certificate is None or sc.tls_private_key is None):
                c.errors.append(
                    ConfigError("server.listen", "wss:// needs tls_certificate and tls_private_key")
                )
            if "path_prefix" in server:
                sc.path_prefix = (
                    c.take(
                        "server.path_prefix",
                        _expect,
                        server["path_prefix"],
                        str,
                        "server.path_prefix",
                    )
                    or sc.path_prefix
                )
            if "allow" in server:
                allow = c.take("server.allow", _expect, server["allow"], list, "server.allow")
                if allow is not None:
                    for i, entry in enumerate(allow):
                        key = f"server.allow[{i}]"
                        if c.take(key, _rekeyed(AllowEntry.parse, key), str(entry)) is not None:
                            sc.allow.append(str(entry))
            if "reverse_binds" in server:
                binds = c.take(
                    "server.reverse_binds",
                    _expect,
                    server["reverse_binds"],
                    list,
                    "server.reverse_binds",
                )
                if binds is not None:
                    sc.reverse_binds = []
                    for i, entry in enumerate(binds):
                        if c.take(f"server.reverse_binds[{i}]", _cidr, entry) is not None:
                            sc.reverse_binds.append(str(entry))
            _keepalive_keys(server, sc, "server.", c)
            if "max_reverse_listeners_per_client" in server:
                key = "server.max_reverse_listeners_per_client"
                value = server[key.removeprefix("server.")]
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    sc.max_reverse_listeners_per_client = value
                else:
                    c.errors.append(
                        ConfigError(
                            key,
                            f"expected a whole number, 0 or more (0: no reverse tunnels), "
                            f"got {value!r}",
                        )
                    )
            cfg.server = sc
    if "routing" in data:
        cfg.routing = parse_routing(data["routing"], base, c.errors)
    if "control" in data:
        cfg.control = c.take("control", parse_control, data["control"])
    if "control_hosts" in data:
        names = c.take("control_hosts", _expect, data["control_hosts"], list, "control_hosts")
        for i, name in enumerate(names or []):
            key = f"control_hosts[{i}]"
            host = c.take(key, lambda n=name, k=key: parse_control_host(_expect(n, str, k), k))
            if host is not None:
                cfg.control_hosts.append(host)
    return cfg, c.errors


def load_file(path: Path) -> tuple[Config, list[ConfigError]]:
    """Parse a TOML config file.  Syntax errors come back as one error naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return Config(), [ConfigError(str(path), f"cannot read: {exc.strerror or exc}")]
    except UnicodeDecodeError:
        return Config(), [ConfigError(str(path), "not UTF-8 text")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Config(), [ConfigError(str(path), f"TOML syntax: {exc}")]
    return parse_config(data, path.parent)


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


# -- [routing] and control --------------------------------------------------------------------

_ROUTING_KEYS = {
    "default",
    "rules",
    "lists",
    "default_lists",
    "proxy_add",
    "direct_add",
    "remove",
    "geoip",
    "dns",
}
_DNS_KEYS = {"local", "public", "hosts_file", "timeout", "concurrency", "warm_at_start"}
_LIST_KEYS = {"path", "action", "format", "name"}


def parse_control(value: Any) -> str | None:
    """``control = "127.0.0.1:9090"`` (loopback only: other machines have no business there;
    browsers on this one are kept out by ``monitor.guard``), or ``false`` to turn it off."""
    if value is False:
        return None
    text: str = _expect(value, str, "control")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdecimal() or not 0 <= int(port) < 65536:
        raise ConfigError("control", f"{text!r}: expected HOST:PORT, e.g. {DEFAULT_CONTROL}")
    if not is_loopback(host):
        raise ConfigError("control", f"{text!r}: the control API listens on loopback only")
    return text


def parse_control_host(text: str, key: str = "control_hosts") -> str:
    """A name for ``control_hosts``: as a browser sends it in Host, without the port."""
    parsed = parse_host(text if ":" not in text or text.startswith("[") else f"[{text}]")
    if parsed is None or parsed[1] is not None:
        raise ConfigError(key, f"{text!r}: expected a host name or address without a port")
    return normalize_host_name(parsed[0])


def _str_list(value: Any, key: str, errors: list[ConfigError]) -> list[str]:
    if not isinstance(value, list):
        errors.append(ConfigError(key, f"expected a list of strings, got {type(value).__name__}"))
        return []
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        else:
            errors.append(ConfigError(f"{key}[{i}]", f"expected a string, got {item!r}"))
    return out


def parse_routing(data: Any, base: Path, errors: list[ConfigError]) -> RoutingConfig:
    """The ``[routing]`` table; every problem is appended to ``errors`` with its key."""
    rc = RoutingConfig()
    if not isinstance(data, dict):
        errors.append(ConfigError("routing", "must be a table"))
        return rc
    for key in data:
        if key not in _ROUTING_KEYS:
            errors.append(ConfigError(f"routing.{key}", "unknown key"))
    if "default" in data:
        if data["default"] in ("proxy", "direct"):
            rc.default = data["default"]
        else:
            errors.append(ConfigError("routing.default", 'must be "proxy" or "direct"'))
    rc.rules = _str_list(data.get("rules", []), "routing.rules", errors)
    for i, text in enumerate(rc.rules):
        try:
            parse_user_rule(text)
        except RuleError as exc:
            errors.append(ConfigError(f"routing.rules[{i}]", str(exc)))
    for key in ("proxy_add", "direct_add", "remove"):
        setattr(rc, key, _str_list(data.get(key, []), f"routing.{key}", errors))
    if "default_lists" in data:
        if isinstance(data["default_lists"], bool):
            rc.default_lists = data["default_lists"]
        else:
            errors.append(ConfigError("routing.default_lists", "expected true or false"))
    if "geoip" in data:
        g = data["geoip"]
        if g == "auto" or isinstance(g, bool):
            rc.geoip = None if g == "auto" else g
        else:
            errors.append(ConfigError("routing.geoip", 'expected "auto", true or false'))
    lists = data.get("lists", [])
    if not isinstance(lists, list):
        errors.append(ConfigError("routing.lists", "expected a list"))
        lists = []
    formats = {f.value: f for f in ListFormat}
    for i, entry in enumerate(lists):
        key = f"routing.lists[{i}]"
        spec = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            errors.append(ConfigError(key, 'expected "FILE" or { path = "FILE", action = ... }'))
            continue
        bad = False
        for k in spec:
            if k not in _LIST_KEYS:
                errors.append(ConfigError(f"{key}.{k}", "unknown key"))
                bad = True
        action = spec.get("action", "proxy")
        if action not in ("proxy", "direct", "reject"):
            errors.append(ConfigError(f"{key}.action", "must be proxy, direct or reject"))
            bad = True
        fmt = spec.get("format", "auto")
        if fmt != "auto" and fmt not in formats:
            errors.append(
                ConfigError(f"{key}.format", "must be auto, " + ", ".join(sorted(formats)))
            )
            bad = True
        path = Path(spec["path"]).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            errors.append(ConfigError(f"{key}.path", f"{path}: no such file"))
            bad = True
        name = spec.get("name")
        if not bad:
            rc.lists.append(
                ListSpec(
                    path,
                    Action(action),
                    None if fmt == "auto" else formats[fmt],
                    name if isinstance(name, str) else None,
                )
            )
    dns = data.get("dns", {})
    if not isinstance(dns, dict):
        errors.append(ConfigError("routing.dns", "must be a table"))
        return rc
    for key in dns:
        if key not in _DNS_KEYS:
            errors.append(ConfigError(f"routing.dns.{key}", "unknown key"))
    for key, attr in (("local", "dns_local"), ("public", "dns_public")):
        if key not in dns:
            continue
        servers = _str_list(dns[key], f"routing.dns.{key}", errors)
        for i, text in enumerate(servers):
            try:
                Upstream.parse(text)
            except ValueError as exc:
                errors.append(ConfigError(f"routing.dns.{key}[{i}]", str(exc)))
        setattr(rc, attr, servers)
    if "hosts_file" in dns:
        h = dns["hosts_file"]
        if h is False:
            rc.hosts_file = None
        elif isinstance(h, str):
            p = Path(h).expanduser()
            rc.hosts_file = p if p.is_absolute() else base / p
        else:
            errors.append(ConfigError("routing.dns.hosts_file", "expected a path or false"))
    if "timeout" in dns:
        t = dns["timeout"]
        if isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 60:
            rc.dns_timeout = float(t)
        else:
            errors.append(ConfigError("routing.dns.timeout", "seconds, between 0 and 60"))
    if "concurrency" in dns:
        n = dns["concurrency"]
        if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000:
            rc.concurrency = n
        else:
            errors.append(ConfigError("routing.dns.concurrency", "between 1 and 1000"))
    if "warm_at_start" in dns:
        if isinstance(dns["warm_at_start"], bool):
            rc.warm_at_start = dns["warm_at_start"]
        else:
            errors.append(ConfigError("routing.dns.warm_at_start", "expected true or false"))
    return rc
