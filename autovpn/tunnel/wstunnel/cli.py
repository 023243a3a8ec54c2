"""wstunnel v10's command-line flags on ``autovpn client`` and ``autovpn server``.

Only adds arguments and copies their values into the config; ``autovpn.cli`` prints the notes
returned here (it is the only module that prints).  Environment variables as wstunnel reads
them: ``WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX`` (-P), ``WSTUNNEL_RESTRICT_HTTP_UPGRADE_PATH_PREFIX``
(-r), ``WSTUNNEL_HTTP_PROXY_LOGIN``/``WSTUNNEL_HTTP_PROXY_PASSWORD``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from autovpn.config import certificate_flag, parse_reverse, private_key_flag
from autovpn.errors import ConfigError

if TYPE_CHECKING:
    from autovpn.config import ClientConfig, ServerConfig


def parse_duration(text: str) -> float:
    """A duration as wstunnel's CLI parses it: ``30s``, ``5m``, ``1h`` or bare seconds."""
    value = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    try:
        seconds = float(value) * scale
    except ValueError:
        raise ValueError(f"bad duration {text!r} (use 30s, 5m, 1h or seconds)") from None
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"bad duration {text!r}")
    return seconds


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning"}
_LEVELS |= {"warning": "warning", "error": "error", "off": "error"}


def log_level(text: str) -> str:
    """wstunnel's ``--log-lvl`` values (RUST_LOG-style, any case) as ours."""
    level = text.strip().lower().split(",")[0].split("=")[-1]
    if level not in _LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}")
    return _LEVELS[level]


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    # Also accepted after the subcommand, as wstunnel's global flag is; SUPPRESS keeps a value
    # given before the subcommand.
    parser.add_argument("--log-lvl", dest="log_level", type=log_level, default=argparse.SUPPRESS)


def add_client_arguments(c: argparse.ArgumentParser) -> None:
    _add_log_level(c)
    g = c.add_argument_group("wstunnel protocol (--protocol wstunnel)")
    g.add_argument("--protocol", choices=["autovpn", "wstunnel"], default=None)
    g.add_argument(
        "-R",
        "--remote-to-local",
        action="append",
        default=[],
        metavar="SPEC",
        help="reverse tunnel: tcp://[BIND:]PORT:HOST:PORT, socks5://[BIND:]PORT, "
        "unix://PATH:HOST:PORT (wstunnel protocol)",
    )
    g.add_argument(
        "--reverse-tunnel-connection-retry-max-backoff",
        "--reverse-tunnel-connection-retry-max-backoff-sec",
        type=_duration,
        default=None,
    )
    g.add_argument("--http-upgrade-credentials", metavar="USER[:PASS]")
    g.add_argument("-H", "--http-headers", action="append", default=[], metavar="'Name: value'")
    g.add_argument("--http-headers-file", type=Path)
    g.add_argument("-c", "--connection-min-idle", type=int, default=None)
    g.add_argument(
        "--connection-retry-max-backoff",
        "--connection-retry-max-backoff-sec",
        type=_duration,
        default=None,
    )
    g.add_argument("--websocket-ping-frequency", "--websocket-ping-frequency-sec", type=_duration)
    g.add_argument(
        "--tls-certificate",
        type=Path,
        help="mTLS client certificate (either protocol; a server with --tls-client-ca-certs "
        "requires one)",
    )
    g.add_argument("--tls-private-key", type=Path, help="its key (default: in the certificate)")
    g.add_argument("--tls-sni-disable", action="store_true")
    g.add_argument(
        "--tls-verify-certificate",
        action="store_true",
        help="accepted for wstunnel compatibility: autovpn always verifies (see --insecure)",
    )
    g.add_argument("--websocket-mask-frame", action="store_true", help="accepted; see docs")
    g.add_argument(
        "--http-proxy-login",
        dest="listener_login",
        default=os.environ.get("WSTUNNEL_HTTP_PROXY_LOGIN"),
        help="credentials of the local SOCKS5/HTTP listeners",
    )
    g.add_argument(
        "--http-proxy-password",
        dest="listener_password",
        default=os.environ.get("WSTUNNEL_HTTP_PROXY_PASSWORD"),
    )
    g.add_argument(
        "--http-proxy-username",
        dest="listener_username",
        help="the seed's spelling of the listener login (never a wstunnel flag)",
    )


def apply_client_arguments(args: argparse.Namespace, cc: ClientConfig) -> list[str]:
    """Copy the wstunnel flags into ``cc``; returns notes for the user."""
    # wstunnel's codec (and websockets with it) only when a client command runs: this module
    # is imported by every CLI command, which must start fast.
    from autovpn.wire.wstunnel import parse_header_line

    notes: list[str] = []
    if args.protocol:
        cc.protocol = args.protocol
    if args.path_prefix is None and os.environ.get("WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX"):
        cc.path_prefix = os.environ["WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX"]
    w = cc.wstunnel
    headers = list(w.headers)
    for text in args.http_headers:
        parsed = parse_header_line(text)
        if parsed is None:
            raise ConfigError("-H", f"{text!r}: expected 'Name: value'")
        headers.append(parsed)
    w.headers = tuple(headers)
    if args.http_headers_file is not None:
        if not args.http_headers_file.is_file():  # wstunnel: must exist at start
            raise ConfigError("--http-headers-file", f"{args.http_headers_file}: no such file")
        w.headers_file = str(args.http_headers_file)
    if args.http_upgrade_credentials is not None:
        w.credentials = args.http_upgrade_credentials
    if args.connection_min_idle is not None:
        w.min_idle = args.connection_min_idle
    if args.connection_retry_max_backoff is not None:
        w.max_backoff = args.connection_retry_max_backoff
    if args.websocket_ping_frequency is not None:
        w.ping_interval = args.websocket_ping_frequency
    if args.tls_certificate is not None:
        cc.tls_certificate = certificate_flag(args.tls_certificate, "--tls-certificate")
        if args.tls_private_key is not None:
            cc.tls_private_key = private_key_flag(args.tls_private_key, "--tls-private-key")
        else:  # wstunnel's default: the key is in the certificate's file
            flag = "--tls-private-key (not given: the --tls-certificate file)"
            cc.tls_private_key = private_key_flag(cc.tls_certificate, flag)
    w.sni_disable = w.sni_disable or args.tls_sni_disable
    if args.remote_to_local and cc.protocol != "wstunnel":
        cc.reverse = [*cc.reverse, *(parse_reverse(spec) for spec in args.remote_to_local)]
    elif args.remote_to_local:
        # The wstunnel reverse machinery (asyncio and all) only when -R is given: this module
        # is imported by every CLI command, which must start fast.
        from autovpn.tunnel.wstunnel.reverse import ReverseSpec

        for spec in args.remote_to_local:
            ReverseSpec.parse(spec)  # report a bad spec now, not at start
        w.remote_to_local = (*w.remote_to_local, *args.remote_to_local)
    if args.reverse_tunnel_connection_retry_max_backoff is not None:
        w.reverse_max_backoff = args.reverse_tunnel_connection_retry_max_backoff
    login = args.listener_username or args.listener_login
    password = args.listener_password
    if login is not None or password is not None:
        if login is None or password is None:
            raise ConfigError("--http-proxy-username/--http-proxy-password", "give both")
        if args.listener_username is not None:
            notes.append(
                "note: --http-proxy-username/--http-proxy-password never existed in wstunnel; "
                "in wstunnel v10 the listener credentials are written "
                f"-L 'socks5://127.0.0.1:1080?login={login}&password=...' "
                "(and the same ?login=&password= on http://)"
            )
        cc.listen = [
            dataclasses.replace(spec, users=((login, password),))
            if spec.scheme in ("socks5", "http") and not spec.users
            else spec
            for spec in cc.listen
        ]
    return notes


def add_server_arguments(s: argparse.ArgumentParser) -> None:
    _add_log_level(s)
    g = s.add_argument_group("wstunnel clients (served on the same port)")
    g.add_argument("--restrict-to", action="append", default=[], metavar="HOST:PORT")
    g.add_argument(
        "-r",
        "--restrict-http-upgrade-path-prefix",
        dest="restrict_path_prefix",
        action="append",
        default=[],
        metavar="PREFIX",
    )
    g.add_argument("--restrict-config", type=Path, metavar="restrictions.yaml")
    g.add_argument(
        "--no-wstunnel",
        action="store_true",
        help="do not serve stock wstunnel clients (their protocol authenticates nobody)",
    )
    g.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="let wstunnel clients without a secret path prefix (-P SECRET) or a client "
        "certificate open forward tunnels: an open proxy to anyone who reaches the port "
        "(reverse tunnels stay refused; native clients always authenticate)",
    )
    g.add_argument(
        "--tls-client-ca-certs",
        type=Path,
        help="mTLS: every client (both protocols) must show a certificate this CA signed",
    )
    g.add_argument("--websocket-ping-frequency", "--websocket-ping-frequency-sec", type=_duration)
    g.add_argument("--websocket-mask-frame", action="store_true", help="accepted; see docs")
    g.add_argument(
        "--remote-to-local-server-idle-timeout",
        "--remote-to-local-server-idle-timeout-sec",
        type=_duration,
    )


def apply_server_arguments(args: argparse.Namespace, sc: ServerConfig) -> None:
    w = sc.wstunnel
    if args.no_wstunnel:
        w.enabled = False
    if args.allow_anonymous:
        sc.allow_anonymous = True
    prefixes = list(args.restrict_path_prefix)
    env = os.environ.get("WSTUNNEL_RESTRICT_HTTP_UPGRADE_PATH_PREFIX")
    if not prefixes and env:
        prefixes = [p for p in env.split(",") if p]
    w.restrict_to = (*w.restrict_to, *args.restrict_to)
    w.restrict_path_prefixes = (*w.restrict_path_prefixes, *prefixes)
    if args.restrict_config is not None:
        if w.restrict_to or w.restrict_path_prefixes:
            raise ConfigError("--restrict-config", "conflicts with --restrict-to and -r")
        w.restrict_config = args.restrict_config
    if args.tls_client_ca_certs is not None:
        sc.tls_client_ca_certs = certificate_flag(args.tls_client_ca_certs, "--tls-client-ca-certs")
    if args.websocket_ping_frequency is not None:
        w.ping_interval = args.websocket_ping_frequency
    if args.remote_to_local_server_idle_timeout is not None:
        w.reverse_idle_timeout = args.remote_to_local_server_idle_timeout
