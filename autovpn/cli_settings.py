"""The command-line flags of the settings that only a config file could say before: routing,
the control API, the handshake and idle timeouts, the server's reverse-tunnel limits.

Each flag's value is checked by its key's own parser (``config.py``), so a flag and its key
take the same values and refuse them with the same words; the error names the flag.  Only adds
arguments and copies their values into the config; ``autovpn.cli`` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from autovpn.config import (
    CIDR,
    CONTROL,
    CONTROL_HOST,
    DNS_SERVER,
    DOMAIN_NAME,
    GEOIP,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    LIST_ENTRY,
    RULE,
    SERVER_ENTRY,
    ClientConfig,
    Config,
    RoutingConfig,
    ServerConfig,
    ServerEntry,
)
from autovpn.toml_tables import Parser, Where, false_or, file_path, integer, number, setting_of


def _value(parser: Parser[Any], value: object, flag: str) -> Any:
    """``value`` (a flag's) checked and converted by a key's parser; relative paths are
    relative to the working directory, as on any command line."""
    return parser(value, Where(flag, Path.cwd()))


def add_routing_arguments(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("routing (smart mode; the [routing] table of a config file)")
    g.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="KIND:VALUE=ACTION",
        help="a rule checked first, e.g. domain:corp.example=direct (repeatable)",
    )
    g.add_argument(
        "--routing-list",
        action="append",
        default=[],
        metavar="FILE[?action=A&format=F&name=N]",
        help="a list file (AutoProxy/gfwlist, v2fly, Clash, dnsmasq, plain); action proxy "
        "(default), direct or reject; format auto-detected unless given (repeatable)",
    )
    g.add_argument(
        "--routing-default",
        choices=["proxy", "direct"],
        help="what smart mode does when no rule matches (proxy)",
    )
    g.add_argument(
        "--no-default-lists", action="store_true", help="do not load the shipped proxy/direct lists"
    )
    g.add_argument("--proxy-add", action="append", default=[], metavar="NAME")
    g.add_argument("--direct-add", action="append", default=[], metavar="NAME")
    g.add_argument(
        "--list-remove",
        action="append",
        default=[],
        metavar="NAME",
        help="drop NAME from the shipped lists (repeatable)",
    )
    g.add_argument(
        "--geoip",
        choices=["auto", "on", "off"],
        help="load the country database (auto: if a rule needs it)",
    )
    g.add_argument(
        "--dns-local",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="resolver of direct names (default: the system's; repeatable)",
    )
    g.add_argument(
        "--dns-public",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="resolver of proxied names, asked through the tunnel (8.8.8.8, 1.1.1.1)",
    )
    g.add_argument("--hosts-file", metavar="FILE|off", help="the hosts file read first")
    g.add_argument("--dns-timeout", type=float, metavar="SECONDS", help="(5)")
    g.add_argument(
        "--dns-concurrency", type=int, metavar="N", help="names in flight in a batch (50)"
    )
    g.add_argument(
        "--warm-at-start", action="store_true", help="resolve the lists when the engine starts"
    )


def apply_routing_arguments(args: argparse.Namespace, r: RoutingConfig) -> None:
    """Flags win over the file: their rules come first, their resolvers replace the file's,
    their names and lists are added."""
    r.rules = [_value(RULE, rule, "--rule") for rule in args.rule] + r.rules
    for text in args.routing_list:
        path, _, query = text.partition("?")
        entry: dict[str, str] = {"path": path, **dict(parse_qsl(query, keep_blank_values=True))}
        r.lists = [*r.lists, _value(LIST_ENTRY, entry, "--routing-list")]
    if args.routing_default is not None:
        r.default = args.routing_default
    if args.no_default_lists:
        r.default_lists = False
    r.proxy_add = r.proxy_add + [_value(DOMAIN_NAME, n, "--proxy-add") for n in args.proxy_add]
    r.direct_add = r.direct_add + [_value(DOMAIN_NAME, n, "--direct-add") for n in args.direct_add]
    r.remove = r.remove + [_value(DOMAIN_NAME, n, "--list-remove") for n in args.list_remove]
    if args.geoip is not None:
        r.geoip = _value(GEOIP, {"auto": "auto", "on": True, "off": False}[args.geoip], "--geoip")
    if args.dns_local:
        r.dns_local = [_value(DNS_SERVER, u, "--dns-local") for u in args.dns_local]
    if args.dns_public:
        r.dns_public = [_value(DNS_SERVER, u, "--dns-public") for u in args.dns_public]
    if args.hosts_file is not None:
        off = args.hosts_file == "off"
        hosts = False if off else args.hosts_file
        r.hosts_file = _value(false_or(file_path()), hosts, "--hosts-file")
    if args.dns_timeout is not None:
        r.dns_timeout = _value(number(above=0, at_most=60), args.dns_timeout, "--dns-timeout")
    if args.dns_concurrency is not None:
        r.concurrency = _value(integer(1, 1000), args.dns_concurrency, "--dns-concurrency")
    if args.warm_at_start:
        r.warm_at_start = True


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("control API (autovpn status, mode, route, PAC files)")
    g.add_argument(
        "--control-api",
        metavar="HOST:PORT|off",
        help="where the control API listens, on loopback (127.0.0.1:9090), or off",
    )
    g.add_argument(
        "--control-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name (besides loopback addresses and localhost) the API answers to",
    )


def apply_control_arguments(args: argparse.Namespace, cfg: Config) -> None:
    if args.control_api is not None:
        value = False if args.control_api == "off" else args.control_api
        cfg.control = _value(CONTROL, value, "--control-api")
    cfg.control_hosts = cfg.control_hosts + [
        _value(CONTROL_HOST, name, "--control-host") for name in args.control_host
    ]


def add_reverse_limit_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--reverse-bind",
        action="append",
        default=[],
        metavar="CIDR",
        help="an address native reverse tunnels may bind on (default: loopback; repeatable)",
    )
    s.add_argument(
        "--max-reverse-listeners",
        type=int,
        metavar="N",
        help="reverse listeners one client may hold at once (16; 0: no reverse tunnels)",
    )


def apply_reverse_limit_arguments(args: argparse.Namespace, sc: ServerConfig) -> None:
    if args.reverse_bind:
        sc.reverse_binds = [_value(CIDR, cidr, "--reverse-bind") for cidr in args.reverse_bind]
    if args.max_reverse_listeners is not None:
        sc.max_reverse_listeners_per_client = _value(
            integer(0), args.max_reverse_listeners, "--max-reverse-listeners"
        )


def add_handshake_timeout_argument(p: argparse.ArgumentParser, what: str, default: float) -> None:
    p.add_argument(
        "--handshake-timeout", type=float, metavar="SECONDS", help=f"{what} ({default:g})"
    )


def apply_handshake_timeout_argument(
    args: argparse.Namespace, section: ClientConfig | ServerConfig
) -> None:
    if args.handshake_timeout is not None:
        section.handshake_timeout = _value(
            HANDSHAKE_TIMEOUT, args.handshake_timeout, "--handshake-timeout"
        )


def add_idle_timeout_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help=f"reset {what} that moved no byte either way this long ({IDLE_TIMEOUT:g}; 0: never)",
    )


def apply_idle_timeout_argument(
    args: argparse.Namespace, section: ClientConfig | ServerConfig
) -> None:
    if args.idle_timeout is not None:
        section.idle_timeout = _value(
            _key_parser(type(section), "idle_timeout"), args.idle_timeout, "--idle-timeout"
        )


#: The per-peer limits' flags (autovpn/limits.py, net.py): flag -> (key, the sections that have
#: it, help, the value's type).
_LIMIT_FLAGS: dict[
    str, tuple[str, tuple[type[ClientConfig | ServerConfig], ...], str, type[int | float]]
] = {
    "--max-connections-per-address": (
        "max_connections_per_address",
        (ClientConfig, ServerConfig),
        "connections one client address may hold; more are closed at once (%s)",
        int,
    ),
    "--max-streams-per-connection": (
        "max_streams_per_connection",
        (ServerConfig,),
        "streams one tunnel connection may have open; more: REFUSED_STREAM (%s)",
        int,
    ),
    "--max-pending-opens": (
        "max_pending_opens",
        (ServerConfig,),
        "streams of one tunnel connection being dialled at once; more: REFUSED_STREAM (%s)",
        int,
    ),
    "--lookup-timeout": (
        "lookup_timeout",
        (ServerConfig,),
        "seconds a destination name's lookup may take; then the stream fails (%s)",
        float,
    ),
    "--max-lookups-per-address": (
        "max_lookups_per_address",
        (ServerConfig,),
        "name lookups one client address may have in progress; more wait their turn (%s)",
        int,
    ),
}


def add_limit_arguments(
    p: argparse.ArgumentParser, section: type[ClientConfig | ServerConfig]
) -> None:
    """The limits' flags of the client's or the server's command, with the key's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    for flag, (key, sections, text, kind) in _LIMIT_FLAGS.items():
        if section in sections:
            metavar = "N" if kind is int else "SECONDS"
            p.add_argument(flag, type=kind, metavar=metavar, help=text % f"{defaults[key]:g}")


def apply_limit_arguments(args: argparse.Namespace, section: ClientConfig | ServerConfig) -> None:
    for flag, (key, sections, _, _) in _LIMIT_FLAGS.items():
        value = getattr(args, key, None)
        if value is not None and type(section) in sections:
            setattr(section, key, _value(_key_parser(type(section), key), value, flag))


def _key_parser(cls: type[Any], name: str) -> Parser[Any]:
    """The parser of field ``name``'s key (a flag of the same setting takes what it takes)."""
    parser = setting_of({f.name: f for f in dataclasses.fields(cls)}[name]).parser
    assert parser is not None, name
    return parser


def server_entry_flag(text: str, priority: int) -> ServerEntry:
    """A server URL of the command line, ``wss://HOST:PORT[?priority=N&weight=N]``: what a
    ``[client] servers`` entry says (priority: its place on the command line if not given)."""
    url, _, query = text.partition("?")
    entry: dict[str, object] = {"url": url, "priority": priority}
    for name, value in parse_qsl(query, keep_blank_values=True):
        entry[name] = int(value) if value.isascii() and value.isdecimal() else value
    server: ServerEntry = _value(SERVER_ENTRY, entry, "server")
    return server


def add_failover_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--open-timeout",
        type=float,
        metavar="SECONDS",
        help="for the server's answer to a new stream, while it dials the target (15)",
    )
    c.add_argument(
        "--retry-refused-after",
        type=float,
        metavar="SECONDS",
        help="before trying again a server that refused us for good: the secret, the"
        " certificate (300)",
    )


def apply_failover_arguments(args: argparse.Namespace, cc: ClientConfig) -> None:
    for name in ("open_timeout", "retry_refused_after"):
        flag = "--" + name.replace("_", "-")
        value = getattr(args, name)
        if value is not None:
            setattr(cc, name, _value(_key_parser(ClientConfig, name), value, flag))
