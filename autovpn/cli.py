"""The command line.  The only module that prints.

Start-up time matters here: ``autovpn --help``, ``status``, ``route``, ``mode`` and ``pac`` talk
to a running engine and should answer in about 0.1 s.  So this module imports only the light
parts at the top (config, errors, argparse); the engine, the event loop, TLS and the tunnel are
imported by the commands that run them (each such import says so).

autovpn                          the embedded default (loopback tunnel, SOCKS5 1080, HTTP 8080)
autovpn --config FILE            what FILE says
autovpn client [-L SPEC]... wss://server:443 [wss://backup:443 ...]
autovpn server wss://0.0.0.0:8443 --tls-certificate C --tls-private-key K
autovpn check-config FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

from autovpn import __version__
from autovpn.cli_settings import (
    add_control_arguments,
    add_failover_arguments,
    add_handshake_timeout_argument,
    add_idle_timeout_argument,
    add_limit_arguments,
    add_reverse_limit_arguments,
    add_routing_arguments,
    apply_control_arguments,
    apply_failover_arguments,
    apply_handshake_timeout_argument,
    apply_idle_timeout_argument,
    apply_limit_arguments,
    apply_reverse_limit_arguments,
    apply_routing_arguments,
    server_entry_flag,
)
from autovpn.config import (
    DEFAULT_USER,
    LISTENER_HANDSHAKE_TIMEOUT,
    MAX_WORKERS,
    MTLS_NEEDS_WSS,
    SERVER_HANDSHAKE_TIMEOUT,
    ClientConfig,
    Config,
    ListenSpec,
    ServerConfig,
    ServerURL,
    certificate_flag,
    check_keepalive,
    describe_file_error,
    load_file,
    private_key_flag,
    read_users_file,
    secret_from,
    state_dir,
)
from autovpn.errors import AutovpnError, BindError, ConfigError, EngineChoiceError, Terminated
from autovpn.monitor.engines import ENGINES_DIR, ROLES, EngineRecord, choose, live_records
from autovpn.policy import AllowEntry
from autovpn.reuseport import STEER_BY
from autovpn.routing.router import Mode
from autovpn.tunnel.wstunnel import cli as wstunnel_cli

if TYPE_CHECKING:
    from autovpn.monitor.client import Reply
    from autovpn.workers import WorkerRole

log = logging.getLogger("autovpn")


def _add_keepalive_arguments(parser: argparse.ArgumentParser, peer: str) -> None:
    parser.add_argument(
        "--keepalive-interval",
        type=float,
        metavar="SECONDS",
        help=f"PING when nothing came from the {peer} for this long (15; 0: off)",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        metavar="SECONDS",
        help="close a tunnel connection silent this long (45)",
    )


def _apply_keepalive_arguments(args: argparse.Namespace, cfg: ClientConfig | ServerConfig) -> None:
    if args.keepalive_interval is not None:
        cfg.keepalive_interval = args.keepalive_interval
    if args.keepalive_timeout is not None:
        cfg.keepalive_timeout = args.keepalive_timeout
    check_keepalive(
        cfg.keepalive_interval,
        cfg.keepalive_timeout,
        "--keepalive-interval",
        "--keepalive-timeout",
    )


class _Parser(argparse.ArgumentParser):
    """A wrong flag value is one line, not that line under forty lines of usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autovpn", description="Proxy engine: wss tunnel + routing.")
    p.add_argument("--version", action="version", version=f"autovpn {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (flags win over it)")
    p.add_argument(
        "--log-level",
        "--log-lvl",
        dest="log_level",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text (default) or one JSON object each (config log_format)",
    )
    p.add_argument(
        "--log-file",
        type=Path,
        help="log to this file, rotated at --log-max-bytes (config log_file); default stderr",
    )
    p.add_argument(
        "--log-max-bytes",
        type=int,
        metavar="N",
        help="rotate --log-file past N bytes, 0 never (config log_max_bytes; 10 MiB)",
    )
    p.add_argument(
        "--log-backups",
        type=int,
        metavar="N",
        help="rotated log files kept (config log_backups; 5)",
    )
    p.add_argument(
        "--no-stats",
        dest="stats",
        action="store_false",
        default=None,
        help="keep no traffic statistics (config stats = false)",
    )
    p.add_argument(
        "--auto-port",
        action="store_true",
        help="a taken proxy or control port: use the next free one (also: client --auto-port)",
    )
    p.add_argument(
        "--set-system-proxy",
        action="store_true",
        help="point the system's proxy setting at the PAC file while running, restore it on "
        "exit (GNOME, macOS, Windows; also: client --set-system-proxy)",
    )
    sub = p.add_subparsers(dest="command")

    c = sub.add_parser("client", help="run the local listeners and the tunnel client")
    c.add_argument(
        "server",
        nargs="*",
        help="wss://host:port (or ws:// behind a TLS proxy); several: the first is used while"
        " it is up, the next ones are its backups (failover and fail-back); with"
        " ?priority=N&weight=N as in [client] servers",
    )
    c.add_argument(
        "-L",
        "--local-to-remote",
        dest="listen",
        action="append",
        default=[],
        metavar="SPEC",
        help="socks5://127.0.0.1:1080, http://127.0.0.1:8080?login=u&password=p",
    )
    c.add_argument("--secret-file", type=Path)
    c.add_argument("--user", default=None)
    c.add_argument("--tls-ca", type=Path, help="trust this CA (a private CA or a pinned cert)")
    c.add_argument(
        "--insecure",
        action="store_true",
        help="do NOT verify the server certificate (anyone on the path can intercept)",
    )
    c.add_argument("--tls-sni-override", dest="sni")
    c.add_argument("--http-upgrade-path-prefix", "-P", dest="path_prefix")
    c.add_argument("--pool-size", type=int)
    c.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="attempts per connection, to the next server or address (3)",
    )
    c.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="for a tunnel connection (TCP, TLS, upgrade) and a direct connect (10)",
    )
    c.add_argument(
        "--fallback-direct-after",
        type=float,
        metavar="SECONDS",
        help="every server down this long: smart mode's default route goes direct (0: off)",
    )
    add_failover_arguments(c)
    _add_keepalive_arguments(c, "server")
    c.add_argument("--mode", choices=[m.value for m in Mode])
    c.add_argument(
        "--allow-open",
        action="store_true",
        help="allow listeners on non-loopback addresses without credentials",
    )
    c.add_argument(
        "--auto-port",
        action="store_true",
        # SUPPRESS: unset here leaves ``autovpn --auto-port client ...`` as it was.
        default=argparse.SUPPRESS,
        help="a taken socks5/http or control port: use the next free one (of 20)",
    )
    c.add_argument("--udp", action="store_true", help="with --udp-src/--udp-dst: a UDP relay")
    c.add_argument(
        "--udp-src",
        metavar="HOST:PORT",
        help="local UDP relay address (WireGuard "
        "Endpoint); same as -L 'udp://SRC:DST?timeout_sec=0'",
    )
    c.add_argument(
        "--udp-dst", metavar="HOST:PORT", help="where the tunnel server sends the relayed datagrams"
    )
    c.add_argument(
        "--set-system-proxy",
        action="store_true",
        default=argparse.SUPPRESS,  # as --auto-port: the top-level flag's value stays
        help="point the system's proxy setting at the PAC file while running; restored on exit",
    )
    add_handshake_timeout_argument(
        c,
        "seconds a local SOCKS5/HTTP client has for its request and its connect",
        LISTENER_HANDSHAKE_TIMEOUT,
    )
    add_idle_timeout_argument(c, "a relayed connection (direct, tunnelled, forwarded)")
    add_limit_arguments(c, ClientConfig)
    wstunnel_cli.add_client_arguments(c)
    add_routing_arguments(c)
    add_control_arguments(c)

    s = sub.add_parser(
        "server",
        help="run the tunnel server",
        description="Native clients always authenticate (HMAC with their user's secret). Stock "
        "wstunnel clients are served on the same port and must send a user's secret as their "
        "path prefix (wstunnel client -P SECRET) or a client certificate, unless "
        "--allow-anonymous.",
    )
    s.add_argument("listen", nargs="?", help="wss://0.0.0.0:8443 or ws://127.0.0.1:8080")
    s.add_argument("--tls-certificate", type=Path)
    s.add_argument("--tls-private-key", type=Path)
    s.add_argument("--secret-file", type=Path, help=f"secret of user {DEFAULT_USER!r}")
    s.add_argument("--users-file", type=Path, help="lines of NAME:SECRET_FILE, one user each")
    s.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR|HOST[:PORT]",
        help="open a destination the default policy refuses (private, loopback...)",
    )
    s.add_argument("--http-upgrade-path-prefix", dest="path_prefix")
    s.add_argument(
        "--auth-failure-limit",
        type=int,
        metavar="N",
        help="authentication failures one address may have within the window before it is "
        "refused at once for that long (10; 0: no limit)",
    )
    s.add_argument("--auth-failure-window", type=float, metavar="SECONDS", help="that window (60)")
    s.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes accepting on the address (SO_REUSEPORT, Linux; default: one per core;"
        " 1: a single process)",
    )
    s.add_argument(
        "--steer-by",
        choices=STEER_BY,
        help="with workers, which worker gets a connection: by client address (the default:"
        " the limits per address hold across workers) or by connection (a client's pool"
        " spreads over the workers)",
    )
    _add_keepalive_arguments(s, "client")
    add_reverse_limit_arguments(s)
    add_handshake_timeout_argument(
        s,
        "seconds a tunnel client has for each step: TLS, upgrade request, AUTH",
        SERVER_HANDSHAKE_TIMEOUT,
    )
    add_idle_timeout_argument(s, "a relayed stream or wstunnel tunnel")
    add_limit_arguments(s, ServerConfig)
    wstunnel_cli.add_server_arguments(s)
    add_control_arguments(s)

    k = sub.add_parser("check-config", help="validate a config file and report every error")
    k.add_argument("file", type=Path)
    _wg_parsers(sub)
    cert = sub.add_parser("cert", help="make a private CA and a server certificate it signs")
    cert.add_argument("directory", type=Path, help="where ca.pem, server.pem, server.key go")
    cert.add_argument(
        "--name",
        action="append",
        required=True,
        help="the server's DNS name or IP address (repeatable)",
    )
    cert.add_argument("--days", type=int, default=825)
    _routing_parsers(sub)
    return p


def _routing_parsers(sub: Any) -> None:
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument(
        "--control", metavar="URL", help="the running engine's control API (default: found)"
    )
    control.add_argument(
        "--role",
        choices=ROLES,
        help="when several engines run here: the one of this role",
    )
    m = sub.add_parser("mode", parents=[control], help="show or switch the running engine's mode")
    m.add_argument("mode", nargs="?", choices=[m.value for m in Mode])
    r = sub.add_parser("route", parents=[control], help="explain the routing of HOST[:PORT]")
    r.add_argument("host")
    r.add_argument("port", nargs="?", type=int, default=443)
    r.add_argument("--resolve", action="store_true", help="resolve and show the scored addresses")
    r.add_argument("--json", action="store_true")
    pac = sub.add_parser("pac", parents=[control], help="print a PAC file")
    pac.add_argument("--mode", choices=[m.value for m in Mode])
    st = sub.add_parser("status", parents=[control], help="the running engine's state and counters")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", action="store_true", help="a live view, redrawn every --interval")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    st.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # tests
    v = sub.add_parser("resolve", parents=[control], help="batch-resolve the routing lists")
    v.add_argument("--list", choices=["proxy", "direct", "all"], default="proxy")
    v.add_argument("--concurrency", type=int, default=None, help="names in flight (50)")


def _client_from_args(args: argparse.Namespace, cfg: Config) -> None:
    base = cfg.client
    if not args.server and base is None:
        raise ConfigError("server", "give the tunnel server URL, e.g. wss://vpn.example.net:443")
    entries = [server_entry_flag(text, place) for place, text in enumerate(args.server, 1)]
    urls = [entry.url for entry in entries]
    server = urls[0] if urls else base.server  # type: ignore[union-attr]
    wstunnel_protocol = args.protocol == "wstunnel" or (
        base is not None and base.protocol == "wstunnel"
    )
    if wstunnel_protocol and not args.secret_file:
        secret = base.secret if base is not None else b""  # wstunnel has no secret
    elif args.secret_file or base is None:
        secret = secret_from(args.secret_file, "--secret-file")
    else:
        secret = base.secret
    cc = base if base is not None else ClientConfig(server, secret)
    cc.server, cc.secret = server, secret
    if urls:  # the command line's servers replace the file's: in order, the first preferred
        cc.servers = entries if len(entries) > 1 else []
    if args.secret_file:
        cc.secret_file = args.secret_file
    if args.listen:
        cc.listen = [ListenSpec.parse(spec, "-L") for spec in args.listen]
    if args.udp_src or args.udp_dst:
        cc.listen = [*cc.listen, _udp_relay_from_flags(args.udp_src, args.udp_dst)]
    if not cc.listen:
        cc.listen = [ListenSpec("socks5", "127.0.0.1", 1080), ListenSpec("http", "127.0.0.1", 8080)]
    for attr in (
        "user",
        "sni",
        "path_prefix",
        "pool_size",
        "retries",
        "connect_timeout",
        "fallback_direct_after",
    ):
        value = getattr(args, attr)
        if value is not None:
            setattr(cc, attr, value)
    if args.tls_ca is not None:
        cc.tls_ca = certificate_flag(args.tls_ca, "--tls-ca")
    if not 1 <= cc.retries <= 10:
        raise ConfigError("--retries", f"{cc.retries}: from 1 to 10")
    if not 0 < cc.connect_timeout <= 300:
        raise ConfigError("--connect-timeout", f"{cc.connect_timeout:g}: more than 0, at most 300")
    if not cc.fallback_direct_after >= 0:  # NaN too
        raise ConfigError("--fallback-direct-after", "seconds, 0 (off) or more")
    apply_failover_arguments(args, cc)
    _apply_keepalive_arguments(args, cc)
    cc.insecure = cc.insecure or args.insecure
    cc.allow_open = cc.allow_open or args.allow_open
    if args.mode:
        cfg.mode = Mode(args.mode)
    for note in wstunnel_cli.apply_client_arguments(args, cc):
        print(note, file=sys.stderr)
    apply_handshake_timeout_argument(args, cc)
    apply_idle_timeout_argument(args, cc)
    apply_limit_arguments(args, cc)
    apply_routing_arguments(args, cfg.routing)
    apply_control_arguments(args, cfg)
    cfg.client = cc


def _udp_relay_from_flags(src: str | None, dst: str | None) -> ListenSpec:
    """``--udp --udp-src A --udp-dst B`` (the seed's spelling; never wstunnel's) is the UDP
    relay that wstunnel v10 writes ``-L 'udp://A:B?timeout_sec=0'``."""
    if not src or not dst:
        raise ConfigError(
            "--udp-src/--udp-dst",
            "give both, e.g. --udp-src 127.0.0.1:51820 --udp-dst 127.0.0.1:1081",
        )
    spec = f"udp://{src}:{dst}?timeout_sec=0"
    parsed = ListenSpec.parse(spec, "--udp-src/--udp-dst")
    print(
        f"note: --udp --udp-src {src} --udp-dst {dst} is written -L '{spec}' in wstunnel v10",
        file=sys.stderr,
    )
    return parsed


def _server_from_args(args: argparse.Namespace, cfg: Config) -> None:
    base = cfg.server
    if args.listen is None and base is None:
        raise ConfigError("listen", "give the address to serve, e.g. wss://0.0.0.0:8443")
    listen = ServerURL.parse(args.listen, key="listen") if args.listen else base.listen  # type: ignore[union-attr]
    users: dict[str, bytes] = dict(base.users) if base is not None else {}
    if args.users_file:
        users.update(read_users_file(args.users_file))
    if args.secret_file or not users:
        users[DEFAULT_USER] = secret_from(args.secret_file, "--secret-file")
    sc = base if base is not None else ServerConfig(listen, users)
    sc.listen, sc.users = listen, users
    if args.secret_file:
        sc.secret_file = args.secret_file
    if args.tls_certificate:
        sc.tls_certificate = certificate_flag(args.tls_certificate, "--tls-certificate")
    if args.tls_private_key:
        sc.tls_private_key = private_key_flag(args.tls_private_key, "--tls-private-key")
    if args.path_prefix is not None:
        sc.path_prefix = args.path_prefix
    if args.allow:
        for entry in args.allow:
            AllowEntry.parse(entry)
        sc.allow = list(sc.allow) + list(args.allow)
    if args.workers is not None:
        if not 1 <= args.workers <= MAX_WORKERS:
            raise ConfigError(
                "--workers", f"{args.workers}: give 1 to {MAX_WORKERS} (1: a single process)"
            )
        sc.workers = args.workers
    if args.steer_by is not None:
        sc.steer_by = args.steer_by
    _apply_keepalive_arguments(args, sc)
    if args.auth_failure_limit is not None:
        if args.auth_failure_limit < 0:
            raise ConfigError("--auth-failure-limit", "0 (no limit) or more")
        sc.auth_failure_limit = args.auth_failure_limit
    if args.auth_failure_window is not None:
        if not 0 < args.auth_failure_window < float("inf"):
            raise ConfigError("--auth-failure-window", "seconds, more than 0")
        sc.auth_failure_window = args.auth_failure_window
    if args.users_file:
        sc.users_file = args.users_file
    apply_reverse_limit_arguments(args, sc)
    apply_handshake_timeout_argument(args, sc)
    apply_idle_timeout_argument(args, sc)
    apply_limit_arguments(args, sc)
    wstunnel_cli.apply_server_arguments(args, sc)
    apply_control_arguments(args, cfg)
    if sc.tls_client_ca_certs is not None and not sc.listen.tls:
        raise ConfigError("--tls-client-ca-certs", MTLS_NEEDS_WSS)
    if sc.listen.tls and (sc.tls_certificate is None or sc.tls_private_key is None):
        raise ConfigError(
            "listen",
            "wss:// needs --tls-certificate and --tls-private-key "
            "(or serve ws:// behind a TLS-terminating proxy)",
        )
    cfg.server = sc


def _configure_logging(cfg: Config) -> None:
    from autovpn import logs  # only the commands that run an engine log

    logs.configure(
        cfg.log_level,
        fmt=cfg.log_format,
        file=cfg.log_file,
        max_bytes=cfg.log_max_bytes,
        backups=cfg.log_backups,
    )
    logs.redact(*_secrets_of(cfg))


#: Path prefixes everybody knows (the defaults): not secrets, and too common to redact.
_PUBLIC_PREFIXES = frozenset({"autovpn", "v1"})


def _secrets_of(cfg: Config) -> list[str | bytes | None]:
    """What the log must never show: secrets, passwords, a secret path prefix (-P)."""
    found: list[str | bytes | None] = []
    client, server = cfg.client, cfg.server
    if client is not None:
        found += [client.secret, client.wstunnel.credentials]
        found += [value for name, value in client.wstunnel.headers if _is_credential(name)]
        if client.path_prefix not in _PUBLIC_PREFIXES:
            found.append(client.path_prefix)
        found += [password for spec in client.listen for _, password in spec.users]
    if server is not None:
        found += list(server.users.values())
        found += list(server.wstunnel.restrict_path_prefixes)
        if server.path_prefix not in _PUBLIC_PREFIXES:
            found.append(server.path_prefix)
    return found


def _is_credential(header: str) -> bool:
    name = header.lower()
    return "auth" in name or "token" in name or "cookie" in name or "secret" in name


async def _serve(cfg: Config, embedded: bool, role: WorkerRole | None = None) -> None:
    # The engine (tunnel, TLS, listeners) only for the commands that run one.
    from autovpn.engine import Engine
    from autovpn.eventloop import loop_factory

    async with Engine(cfg) as engine:
        if role is not None:
            # A worker of `autovpn server --workers N`: the parent prints the banner.
            assert engine.server is not None
            role.ready(engine.api.url if engine.api is not None else None, engine.server.port)
            await engine.serve_forever()
            return
        name, _ = loop_factory()
        # stdio:// owns stdout (ssh ProxyCommand): everything else goes to stderr then.
        stdio = cfg.client is not None and any(s.scheme == "stdio" for s in cfg.client.listen)
        out = sys.stderr if stdio else sys.stdout
        print(f"autovpn {__version__} running ({name} event loop)", file=out)
        for line in engine.describe():
            print(f"  {line}", file=out)
        if embedded:
            print(
                "This is the embedded default: a tunnel to a server inside this process.\n"
                "Point it at your own server with:\n"
                "  AUTOVPN_SECRET=... autovpn client wss://your-server:443\n"
                "Stop with Ctrl-C."
            )
        sys.stdout.flush()
        await engine.serve_forever()


def engine_config(args: argparse.Namespace, cfg: Config) -> tuple[Config, bool]:
    """What an engine command runs: ``cfg`` (the file's, or the defaults) with the flags over
    it; True for the embedded default (no command, no file)."""
    if args.command == "client":
        _client_from_args(args, cfg)
        cfg.server = None if args.config is None else cfg.server
    elif args.command == "server":
        _server_from_args(args, cfg)
        cfg.client = None if args.config is None else cfg.client
    embedded = args.command is None and args.config is None
    if embedded:
        # The engine (TLS, certificate making) only for the embedded default.
        from autovpn.engine import embedded_config

        cfg = embedded_config(state_dir())
    if args.log_level is not None:
        cfg.log_level = args.log_level
    for attr in ("log_format", "log_file", "log_max_bytes", "log_backups", "stats"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    if cfg.log_max_bytes < 0 or cfg.log_backups < 0:
        raise ConfigError("--log-max-bytes/--log-backups", "give a number, 0 or more")
    cfg.auto_port = cfg.auto_port or args.auto_port
    cfg.system_proxy = cfg.system_proxy or args.set_system_proxy
    return cfg, embedded


def main(argv: list[str] | None = None) -> int:
    role = _worker_role()
    args = _parser().parse_args(argv)
    try:
        if args.command == "wg":
            return _wg_command(args)
        if args.command == "cert":
            # TLS and cryptography only for this command.
            from autovpn.tunnel.tls import make_private_ca

            ca, cert_path, key = make_private_ca(args.directory, args.name, days=args.days)
            print(
                f"server: --tls-certificate {cert_path} --tls-private-key {key}\n"
                f"client: --tls-ca {ca}"
            )
            return 0
        if args.command == "check-config":
            _, errors = load_file(args.file)
            for error in errors:
                print(describe_file_error(args.file, error), file=sys.stderr)
            if not errors:
                cfg, _ = load_file(args.file)
                for list_error in cfg.routing.build_router(cfg.mode).errors:
                    print(f"{args.file}: routing.lists: warning: {list_error}", file=sys.stderr)
                print(f"{args.file}: OK")
            return 1 if errors else 0
        cfg = Config()
        if args.config is not None:
            cfg, errors = load_file(args.config)
            if errors:
                for error in errors:
                    print(describe_file_error(args.config, error), file=sys.stderr)
                return 2
        if args.command == "status":
            return _status_command(args, cfg)
        if args.command in ("mode", "route", "pac", "resolve"):
            return _routing_command(args, cfg)
        cfg, embedded = engine_config(args, cfg)
        # The event loop only for the commands that run an engine.
        from autovpn.eventloop import run

        _configure_logging(cfg)
        if role is not None:
            role.quiet_start()
            role.configure(cfg)
        else:
            # The supervisor only for a server that may run workers.
            from autovpn.workers import plan, supervise

            count, note = plan(cfg)
            if note:
                print(note, file=sys.stderr)
            if count > 1:
                return supervise(sys.argv[1:] if argv is None else argv, count, cfg)
        # SIGTERM (systemd, docker stop, kill) stops it as Ctrl-C does: the same closing path.
        run(_serve(cfg, embedded, role), sigterm=True)
    except KeyboardInterrupt:
        if role is None:  # a worker's parent says it once for all
            print("\nautovpn stopped", file=sys.stderr)
        return 130
    except Terminated:
        if role is None:
            print("autovpn stopped (SIGTERM)", file=sys.stderr)
        return 0
    except ConfigError as exc:
        print(f"autovpn: configuration error: {exc}", file=sys.stderr)
        return 2
    except EngineChoiceError as exc:
        print(
            f"autovpn: {exc} on the state directory {state_dir()}; choose one with --role ROLE"
            " or --control URL:",
            file=sys.stderr,
        )
        for line in exc.engines:
            print(f"  {line}", file=sys.stderr)
        return 2
    except BindError as exc:
        print(f"autovpn: {exc}{_bind_remedy(exc, args)}", file=sys.stderr)
        return 1
    except AutovpnError as exc:
        print(f"autovpn: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker_role() -> WorkerRole | None:
    """This process's place under ``autovpn server --workers N``, or None (the usual case).

    Read first: a worker asks to die with its parent before it does anything else (and exits
    at once if its parent is already gone)."""
    if not os.environ.get("AUTOVPN_WORKER"):
        return None
    # The supervisor's module only in its workers.
    from autovpn.workers import WorkerRole

    role = WorkerRole.from_env()
    if role is not None:
        role.attach()
    return role


# -- routing commands: talk to the running engine, or answer from the config ------------------


def _bind_remedy(exc: BindError, args: argparse.Namespace) -> str:
    """What this command can do about a taken port, in its own flags (the embedded default
    has no -L, the server no --auto-port); empty when it has nothing to offer."""
    if not exc.in_use:
        return ""
    # An engine of this state directory holds it (one left running, say): say which, and how
    # to stop it; nothing is stopped here.
    ours = next((r for r in live_records(state_dir()) if r.pid == exc.holder), None)
    if ours is not None:
        return (
            f"; that is this state directory's {ours.role} engine ({ours.url}):"
            f" stop it first (kill -TERM {ours.pid}), or use another port"
        )
    config = f" in {args.config}" if args.config is not None else ""
    proxy = exc.what in ("socks5 listener", "http listener", "control API")
    if exc.what == "tunnel server":
        if args.command == "server":
            return "; give another port in the listen URL"
        return f"; change server.listen{config}" if config else ""
    remedies = []
    if args.command == "client":
        remedies.append("pick another port with -L")
    elif config:
        remedies.append(f"change the port{config}")
    if proxy and not args.auto_port:
        if args.command == "client" or config:
            remedies.append("add --auto-port to take the next free one")
        else:
            remedies.append("start it with `autovpn --auto-port` to take the next free one")
    return "; " + ", or ".join(remedies) if remedies else ""


def _target(
    args: argparse.Namespace, cfg: Config, *, read_only: bool
) -> tuple[list[str], EngineRecord | None]:
    """The control URL to ask, and the record of the engine it belongs to (for its token).

    ``--control URL``: that one.  Else the engines running on this state directory
    (``monitor/engines.py``): the only one, or the one of ``--role``; for a read-only command
    (status, route, pac, mode without an argument) the only one with local proxies (role
    client or embedded); else ``EngineChoiceError`` (exit 2, listing them).  When none runs:
    the configured control address (an engine of another state directory may be there)."""
    records = live_records(state_dir())
    if args.control:
        found = next((r for r in records if r.url == args.control.rstrip("/")), None)
        return [args.control], found
    chosen = choose(records, role=args.role, read_only=read_only)
    if chosen is not None:
        return [chosen.url], chosen
    if cfg.control:
        host, _, port = cfg.control.rpartition(":")
        return [f"http://{host}:{port}"], None
    return [], None


def _auth(engine: EngineRecord | None) -> dict[str, str]:
    """The engine's control token (in its record's ``.token`` file, mode 0600), as the
    header that state-changing requests carry."""
    token = engine.read_token() if engine is not None else None
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _refused(error: object, engine: EngineRecord | None) -> str:
    """The engine's error, and where this CLI looked for the token when it found none."""
    text = f"autovpn: {error}"
    if "control token" in str(error):
        if engine is None:
            text += f" (no engine in {state_dir() / ENGINES_DIR} has this address: no token)"
        elif engine.read_token() is None:
            text += f" (no token at {engine.token_path})"
    return text


def _ask(
    urls: list[str],
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Reply | None:
    """The first running engine's answer, or None when none answers."""
    # http.client (and the email parser under it) only for the commands that ask an engine.
    from autovpn.monitor.client import ControlUnreachable, request

    for url in urls:
        try:
            return request(url, method, path, body, headers)
        except ControlUnreachable:
            continue
    return None


def _routing_command(args: argparse.Namespace, cfg: Config) -> int:
    # Read-only commands may pick the one client among several engines; changes may not.
    changes = args.command == "resolve" or (args.command == "mode" and args.mode is not None)
    urls, engine = _target(args, cfg, read_only=not changes)
    if args.command == "mode":
        if args.mode is None:
            reply = _ask(urls, "GET", "/mode")
        else:
            body = json.dumps({"mode": args.mode}).encode()
            reply = _ask(urls, "POST", "/mode", body, _auth(engine))
        if reply is None:
            print(f"autovpn: no running engine at {', '.join(urls) or '(none)'}", file=sys.stderr)
            return 1
        data = reply.json()
        if reply.status != 200:
            print(_refused(data.get("error"), engine), file=sys.stderr)
            return 1
        if args.mode is None:
            print(data["mode"])
        else:
            print(f"mode {data['previous']} -> {data['mode']}")
        return 0
    if args.command == "pac":
        mode = args.mode or "proxy"
        reply = _ask(urls, "GET", f"/{mode}.pac")
        if reply is not None and reply.status == 200:
            sys.stdout.write(reply.body.decode())
            return 0
        return _local_pac(cfg, Mode(args.mode) if args.mode else cfg.mode)
    if args.command == "route":
        query = f"/route?host={quote(args.host)}&port={args.port}"
        reply = _ask(urls, "GET", query + ("&resolve=1" if args.resolve else ""))
        if reply is not None and reply.status == 200:
            explained = reply.json()
            explained["engine"] = "running"
        else:
            # No engine answers: build one from the configuration (not started) and ask it.
            from autovpn.eventloop import run

            explained = run(_explain_offline(cfg, args.host, args.port, args.resolve))
        _print_route(explained, args.json)
        return 0
    return _resolve_command(args, cfg, urls, engine)


async def _explain_offline(cfg: Config, host: str, port: int, resolve: bool) -> dict[str, Any]:
    # The engine only when no running engine answered.
    from autovpn.engine import Engine
    from autovpn.routing.scoring import SCORES_FILE

    engine = Engine(cfg)
    engine.scores.load(state_dir() / SCORES_FILE)
    explained = await engine.explain(host, port, resolve=resolve)
    explained["engine"] = "not running: answered from the configuration"
    return explained


def _watch(urls: list[str], args: argparse.Namespace) -> int:
    # rich only for --watch: the one-shot status stays within its start-up budget.
    from autovpn.monitor.watch import watch

    def fetch() -> dict[str, Any]:
        reply = _ask(urls, "GET", "/status")
        if reply is None or reply.status != 200:
            raise AutovpnError(f"the engine at {', '.join(urls)} stopped answering")
        data: dict[str, Any] = reply.json()
        return data

    try:
        watch(fetch, interval=max(args.interval, 0.1), count=args.count)
    except KeyboardInterrupt:
        pass
    return 0


def _status_command(args: argparse.Namespace, cfg: Config) -> int:
    urls, _ = _target(args, cfg, read_only=True)
    reply = _ask(urls, "GET", "/status")
    if reply is None or reply.status != 200:
        print(f"autovpn: no running engine at {', '.join(urls) or '(none)'}", file=sys.stderr)
        return 1
    data = reply.json()
    if args.watch:
        return _watch(urls, args)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"autovpn {data.get('version')}  mode {data.get('mode')}  (default {data.get('default')})"
    )
    for lst in data.get("listeners", []):
        print(f"  {lst['kind']:<6} proxy  {lst['host']}:{lst['port']}")
    tunnel = data.get("tunnel")
    if tunnel:
        servers = tunnel.get("servers") or [
            {
                "url": tunnel["server"],
                "state": "up" if tunnel["up"] else "down",
                "reason": tunnel.get("last_error"),
                "connections": tunnel.get("connections", []),
            }
        ]
        state = "up" if tunnel["up"] else "DOWN"  # each server's line says why
        print(
            f"  tunnel: {state}, {tunnel['connects']} connects, "
            f"{tunnel['datagrams_dropped']} datagrams dropped"
            + (
                ", smart mode's default route DIRECT (fallback)"
                if tunnel.get("fallback_direct")
                else ""
            )
        )
        for server in servers:
            _print_server(server, len(servers) > 1)
    server = data.get("server")
    if server:
        print(
            f"  server: {server['connections']} tunnel connections, "
            f"{server['streams_open']} streams open, {server['streams_opened']} opened, "
            f"{server['streams_failed']} failed, {server['upgrades_refused']} upgrades refused"
        )
    for worker in data.get("workers") or []:
        counters = worker.get("server") or {}
        state = worker.get("error") or (
            f"{counters.get('connections', 0)} tunnel connections, "
            f"{counters.get('streams_open', 0)} streams open"
        )
        print(
            f"    worker {worker['index']} (pid {worker['pid']}, {worker['restarts']} restarts):"
            f" {state}"
        )
    conns = data.get("connections") or {}
    routed = conns.get("routed", {})
    print(
        f"  connections: {conns.get('accepted', 0)} accepted, {conns.get('failed', 0)} failed; "
        + ", ".join(f"{k} {v}" for k, v in routed.items())
    )
    for relay in data.get("udp_relays", []):
        print(
            f"  udp relay {relay['listen']} -> {relay['target']}: {relay['received']} in, "
            f"{relay['replies']} back, {relay['dropped']} dropped"
        )
    stats = data.get("stats")
    if isinstance(stats, dict):
        for route, r in stats.get("routes", {}).items():
            failed = sum(r["failures"].values())
            print(
                f"  route {route}: {r['open']} open, {r['total']} total, {_size(r['bytes_up'])}"
                f" up, {_size(r['bytes_down'])} down" + (f", {failed} failed" if failed else "")
            )
        top = list(stats.get("domains", {}).items())[:5]
        if top:
            print("  top domains: " + ", ".join(f"{name} ({d['total']})" for name, d in top))
    if data.get("metrics"):
        print(f"  metrics: {data['metrics']}  (live: autovpn status --watch)")
    return 0


def _print_server(server: dict[str, Any], several: bool) -> None:
    """One tunnel server of ``autovpn status``: its state and why, and its connections."""
    rank = f" (priority {server.get('priority')}, weight {server.get('weight')})" if several else ""
    reason = f": {server['reason']}" if server.get("reason") else ""
    via = f" via {server['address']}" if server.get("address") else ""
    # wstunnel: no connection outlives its tunnel, so the server counts its tunnels instead.
    tunnels = f", {server['tunnels']} tunnels open" if server.get("tunnels") is not None else ""
    print(f"  tunnel -> {server['url']}{rank}: {server['state']}{reason}{via}{tunnels}")
    for i, conn in enumerate(server.get("connections", [])):
        rtt = "?" if conn["rtt_ms"] is None else f"{conn['rtt_ms']} ms"
        print(
            f"    connection {i}: {conn['streams']} streams, rtt {rtt}, "
            f"{conn['bytes_in']:,} B in, {conn['bytes_out']:,} B out"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _local_pac(cfg: Config, mode: Mode) -> int:
    # The PAC renderer only when no running engine serves the file.
    from autovpn.routing.pac import render_pac

    specs = cfg.client.listen if cfg.client is not None else []
    http = next((s.port for s in specs if s.scheme == "http" and s.port), 8080)
    socks = next((s.port for s in specs if s.scheme == "socks5" and s.port), 1080)
    router = cfg.routing.build_router(cfg.mode)
    sys.stdout.write(render_pac(router, mode, http_port=http, socks_port=socks))
    return 0


def _print_route(e: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(e, indent=2))
        return
    print(f"{e['host']}:{e['port']}  ->  {str(e['action']).upper()}")
    print(f"  mode      {e['mode']}   (engine {e['engine']})")
    print(f"  why       {e['reason']}")
    rule = e.get("rule")
    if rule:
        where = f"{rule['file']}:{rule['line']}" if rule.get("file") else ""
        print(f"  rule      {rule['kind']} {rule['value']}  [{rule['list']}] {where}".rstrip())
    print(f"  resolver  {e['resolver']}: {e['resolver_detail']}")
    if e.get("note"):
        print(f"  note      {e['note']}")
    if "resolve_error" in e:
        print(f"  resolve   failed: {e['resolve_error']}")
    for a in e.get("addresses", []):
        rtt = f"{a['rtt_ms']:.1f} ms" if a.get("rtt_ms") is not None else "rtt ?"
        print(
            f"  address   {a['address']:<40} score {a['score']:6.2f}  {rtt:>10}  "
            f"{a['successes']}/{a['attempts']} ok  country {a.get('country') or '?'}"
        )


class _Progress:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.tty = sys.stderr.isatty()

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.tty and (self.done == self.total or self.done % 5 == 0):
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total}  failed {self.failed}")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _resolve_command(
    args: argparse.Namespace, cfg: Config, urls: list[str], engine: EngineRecord | None
) -> int:
    path = f"/resolve?list={args.list}"
    if args.concurrency:
        path += f"&concurrency={args.concurrency}"
    progress: _Progress | None = None
    summary: dict[str, Any] = {}
    errors: list[str] = []

    def on_line(obj: dict[str, Any]) -> None:
        nonlocal progress
        if "total" in obj:
            progress = _Progress(int(obj["total"]))
        elif "name" in obj and progress is not None:
            progress.step("error" not in obj)
            if "error" in obj:
                errors.append(str(obj["error"]))
        else:
            summary.update(obj)

    # http.client only for the commands that ask an engine.
    from autovpn.monitor.client import ControlUnreachable, stream_lines

    for url in urls:
        try:
            status = stream_lines(url, "POST", path, on_line, _auth(engine))
        except ControlUnreachable:
            continue
        if progress is not None:
            progress.end()
        if status != 200:
            print(_refused(summary.get("error"), engine), file=sys.stderr)
            return 1
        print(
            f"resolved {summary.get('done', 0)} names from the {args.list} list in "
            f"{summary.get('seconds', 0):.2f} s ({summary.get('failed', 0)} failed); "
            "the running engine's cache is warm"
        )
        return 0
    # No engine answers: start one here (the event loop and the engine only in this case).
    from autovpn.eventloop import run

    return run(_resolve_in_process(args, cfg), sigterm=True)


async def _resolve_in_process(args: argparse.Namespace, cfg: Config) -> int:
    """No engine running: start the tunnel (no listeners, no control API) and resolve here."""
    # The engine only when no running engine answered.
    from autovpn.engine import Engine, embedded_config

    if cfg.client is None and cfg.server is None:
        embedded = embedded_config(state_dir())
        embedded.routing, embedded.mode = cfg.routing, cfg.mode
        cfg = embedded
    if cfg.client is not None:
        cfg.client.listen = []
    cfg.control = None
    async with Engine(cfg) as engine:
        names = engine.list_names(args.list)
        progress = _Progress(len(names))
        start = time.perf_counter()
        await engine.resolver.resolve_many(
            names,
            concurrency=args.concurrency,
            progress=lambda _n, r: progress.step(not isinstance(r, Exception)),
        )
        progress.end()
        print(
            f"resolved {len(names)} names from the {args.list} list in "
            f"{time.perf_counter() - start:.2f} s ({progress.failed} failed; no engine was"
            " running, so no cache was warmed)"
        )
    return 0


def _wg_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    w = sub.add_parser("wg", help="WireGuard keys and a client config for the UDP relay")
    wsub = w.add_subparsers(dest="wg_command", required=True)
    keys = wsub.add_parser("keys", help="print a new key pair")
    keys.add_argument("--preshared", action="store_true", help="also a preshared key")
    conf = wsub.add_parser("config", help="print a wg-quick client config (Endpoint = relay)")
    conf.add_argument("--server-public-key", required=True, help="the WireGuard server's key")
    conf.add_argument("--address", required=True, help="this peer's address, e.g. 10.66.0.2/32")
    conf.add_argument("--private-key", help="this peer's key (default: a new one)")
    conf.add_argument("--preshared-key", help="a preshared key (or --new-preshared-key)")
    conf.add_argument("--new-preshared-key", action="store_true")
    conf.add_argument("--endpoint", default="127.0.0.1:51820", help="the autovpn UDP relay")
    conf.add_argument("--allowed-ips", default="0.0.0.0/0,::/0")
    conf.add_argument(
        "--tunnel-server-ip",
        action="append",
        default=[],
        metavar="IP",
        help="the autovpn server's address, kept out of AllowedIPs (no loop)",
    )
    conf.add_argument("--dns", action="append", default=[])
    conf.add_argument("--mtu", type=int, help="e.g. 1280: the tunnel adds its own overhead")
    conf.add_argument("--out", type=Path, help="write the config here (mode 0600)")


def _wg_command(args: argparse.Namespace) -> int:
    # cryptography (WireGuard keys) and TLS helpers only for this command.
    from autovpn import wg
    from autovpn.tunnel.tls import write_private

    if args.wg_command == "keys":
        pair = wg.generate_keypair()
        print(f"PrivateKey = {pair.private}\nPublicKey = {pair.public}")
        if args.preshared:
            print(f"PresharedKey = {wg.generate_preshared_key()}")
        return 0
    private = args.private_key or wg.generate_keypair().private
    psk = args.preshared_key or (wg.generate_preshared_key() if args.new_preshared_key else None)
    holes = [f"{ip}/{32 if ':' not in ip else 128}" for ip in args.tunnel_server_ip]
    text = wg.client_config(
        private_key=private,
        address=args.address,
        server_public_key=args.server_public_key,
        endpoint=args.endpoint,
        allowed=wg.allowed_ips(args.allowed_ips.split(","), holes),
        preshared_key=psk,
        dns=args.dns or None,
        mtu=args.mtu,
    )
    header = (
        f"# WireGuard through autovpn: this peer's public key is {wg.public_key(private)}\n"
        f"# Start the relay first:\n#   autovpn client -L 'udp://{args.endpoint}:"
        "WG_SERVER_HOST:51820?timeout_sec=0' wss://YOUR_SERVER:443\n"
    )
    if args.out:
        write_private(args.out, (header + text).encode())
        print(f"wrote {args.out}")
    else:
        print(header + text, end="")
    return 0
