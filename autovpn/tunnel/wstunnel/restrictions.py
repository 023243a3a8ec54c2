"""wstunnel's tunnel whitelist (``--restrict-config restrictions.yaml``, ``--restrict-to``,
``-r/--restrict-http-upgrade-path-prefix``), same format and semantics (docs/wstunnel-protocol.md
section 5.1).

Rules are tried in order; the first rule whose matchers *all* hold (``!Any``, ``!PathPrefix
regex`` on the first path segment, ``!Authorization regex`` on the raw header) *and* which has an
allowing entry wins.  Regexes are unanchored searches, as Rust's ``is_match``.  Pure: the caller
reads the file.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from autovpn.errors import ConfigError
from autovpn.wire.wstunnel import Claims, Kind

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ALL_NETWORKS: Final[tuple[IPNetwork, ...]] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)
_MATCH_ALL: Final = re.compile(r"^.*$")
_MATCH_NOTHING: Final = re.compile(r"(?!)")

#: The protocol names a rule may list, per LocalProtocol kind on the wire.
FORWARD_NAMES: Final = {Kind.TCP: "Tcp", Kind.UDP: "Udp"}
REVERSE_NAMES: Final = {
    Kind.REVERSE_TCP: "Tcp",
    Kind.REVERSE_UDP: "Udp",
    Kind.REVERSE_SOCKS5: "Socks5",
    Kind.REVERSE_UNIX: "Unix",
    Kind.REVERSE_HTTP_PROXY: "HttpProxy",
}


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    @classmethod
    def parse(cls, value: Any) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= 65535:
                raise ConfigError("port", f"{value} out of range")
            return cls(value, value)
        text = _scalar(value, "port", "port").strip()
        low, sep, high = text.partition("..")
        try:
            lo = int(low)
            hi = int(high) if sep else lo
        except ValueError:
            raise ConfigError("port", f"{text[:80]!r} is not N or A..B") from None
        if not 0 <= lo <= hi <= 65535:
            raise ConfigError("port", f"{text[:80]!r} out of range")
        return cls(lo, hi)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


def _ports_ok(ports: Sequence[PortRange], port: int) -> bool:
    return not ports or any(port in r for r in ports)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class AllowTunnel:
    """``!Tunnel``: forward tunnels."""

    protocols: frozenset[str] = frozenset()
    ports: tuple[PortRange, ...] = ()
    host: re.Pattern[str] = _MATCH_ALL
    cidrs: tuple[IPNetwork, ...] = ALL_NETWORKS

    def allows(self, claims: Claims, host: str) -> bool:
        name = FORWARD_NAMES.get(claims.protocol.kind)
        if name is None or (self.protocols and name not in self.protocols):
            return False
        if not _ports_ok(self.ports, claims.port):
            return False
        ip = _ip(host)
        if ip is None:
            return self.host.search(host) is not None
        return any(ip in net for net in self.cidrs if net.version == ip.version)


@dataclass(frozen=True, slots=True)
class AllowReverseTunnel:
    """``!ReverseTunnel``: reverse tunnels; ``port_mapping`` rebinds X to Y."""

    protocols: frozenset[str] = frozenset()
    ports: tuple[PortRange, ...] = ()
    port_mapping: tuple[tuple[int, int], ...] = ()
    cidrs: tuple[IPNetwork, ...] = ALL_NETWORKS
    unix_path: re.Pattern[str] = _MATCH_ALL

    def allows(self, claims: Claims, host: str) -> bool:
        name = REVERSE_NAMES.get(claims.protocol.kind)
        if name is None or (self.protocols and name not in self.protocols):
            return False
        if claims.protocol.kind is Kind.REVERSE_UNIX:
            return self.unix_path.search(claims.protocol.path) is not None
        if not _ports_ok(self.ports, claims.port):
            return False
        ip = _ip(host)
        if ip is None:  # a domain bind address is always refused here
            return False
        return any(ip in net for net in self.cidrs if net.version == ip.version)

    def bind_port(self, port: int) -> int:
        for x, y in self.port_mapping:
            if x == port:
                return y
        return port


Allow = AllowTunnel | AllowReverseTunnel


@dataclass(frozen=True, slots=True)
class Matcher:
    kind: str  # "Any", "PathPrefix", "Authorization"
    regex: re.Pattern[str] = _MATCH_ALL

    def matches(self, path_prefix: str, authorization: str | None) -> bool:
        if self.kind == "Any":
            return True
        if self.kind == "PathPrefix":
            return self.regex.search(path_prefix) is not None
        return authorization is not None and self.regex.search(authorization) is not None


@dataclass(frozen=True, slots=True)
class Restriction:
    name: str
    match: tuple[Matcher, ...]
    allow: tuple[Allow, ...]
    description: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Restriction
    entry: Allow

    def bind_port(self, port: int) -> int:
        return self.entry.bind_port(port) if isinstance(self.entry, AllowReverseTunnel) else port


@dataclass(frozen=True, slots=True)
class Restrictions:
    rules: tuple[Restriction, ...] = field(default_factory=tuple)

    def matches(self, path_prefix: str, authorization: str | None) -> bool:
        """Whether some rule's matchers all hold: the request is one the rules know (whether
        they allow its destination is ``check``'s question)."""
        return any(all(m.matches(path_prefix, authorization) for m in r.match) for r in self.rules)

    def anyone(self) -> list[str]:
        """The names of the rules that match every request (only ``!Any`` matchers)."""
        return [r.name for r in self.rules if all(m.kind == "Any" for m in r.match)]

    def check(
        self, path_prefix: str, authorization: str | None, claims: Claims, host: str
    ) -> Verdict | None:
        """The first rule that matches and allows, or None (answer 400)."""
        for rule in self.rules:
            if not all(m.matches(path_prefix, authorization) for m in rule.match):
                continue
            for entry in rule.allow:
                if entry.allows(claims, host):
                    return Verdict(rule, entry)
        return None

    @classmethod
    def allow_all(cls) -> Restrictions:
        """No restriction configured.  wstunnel then allows everything; we keep forward
        tunnels (still under our destination policy) but let reverse tunnels bind only on the
        server's loopback and never create unix sockets: the wstunnel protocol authenticates
        nobody, and an open reverse tunnel would let anyone listen on the server."""
        loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
        reverse = AllowReverseTunnel(cidrs=loopback, unix_path=_MATCH_NOTHING)
        return cls((Restriction("Allow All", (Matcher("Any"),), (AllowTunnel(), reverse)),))

    @classmethod
    def from_flags(
        cls, restrict_to: Sequence[str] = (), path_prefixes: Sequence[str] = ()
    ) -> Restrictions:
        """What ``--restrict-to`` and ``-r`` translate to (wstunnel ``from_path_prefix``)."""
        if not restrict_to and not path_prefixes:
            return cls.allow_all()
        allow: list[Allow] = []
        for spec in restrict_to:
            host, sep, port_text = spec.rpartition(":")
            host = host.strip("[]")
            if not sep or not port_text.isdecimal() or not host:
                raise ConfigError("--restrict-to", f"{spec!r}: expected HOST:PORT")
            port = PortRange.parse(int(port_text))
            ip = _ip(host)
            if ip is not None:
                net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
                allow.append(AllowTunnel(ports=(port,), host=_MATCH_NOTHING, cidrs=(net,)))
            else:
                pattern = re.compile(f"^{re.escape(host)}$")
                allow.append(AllowTunnel(ports=(port,), host=pattern, cidrs=()))
        if not allow:
            allow = [AllowTunnel(), AllowReverseTunnel()]
        # Rules are named by position, not by prefix: a -r prefix is a shared secret, and rule
        # names reach the log.
        matchers = [
            (f"-r prefix #{i}", Matcher("PathPrefix", re.compile(f"^{re.escape(p)}$")))
            for i, p in enumerate(path_prefixes, 1)
        ] or [("Allow restricted destinations", Matcher("Any"))]
        return cls(tuple(Restriction(name, (m,), tuple(allow)) for name, m in matchers))

    @classmethod
    def from_yaml(cls, text: str, source: str = "restrictions") -> Restrictions:
        """Parse the restrictions file (YAML with ``!Tag`` entries)."""
        import yaml  # PyYAML is loaded only when a restrictions file is given

        # A private SafeLoader subclass, so the tag constructors stay local to this parse.
        loader_class: Any = type("_RestrictionsLoader", (yaml.SafeLoader,), {})

        def tagged(loader: Any, suffix: str, node: Any) -> Any:
            if isinstance(node, yaml.MappingNode):
                value: Any = loader.construct_mapping(node, deep=True)
            elif isinstance(node, yaml.SequenceNode):
                value = loader.construct_sequence(node, deep=True)
            else:
                value = loader.construct_scalar(node)
            return (suffix, value)

        loader_class.add_multi_constructor("!", tagged)
        try:
            data = yaml.load(text, Loader=loader_class)
        except yaml.YAMLError as exc:
            raise ConfigError(source, f"YAML: {exc}") from None
        except RecursionError:
            # PyYAML composes recursively: a few thousand nested brackets exhaust the stack.
            raise ConfigError(source, "YAML: nested too deeply") from None
        except (ValueError, TypeError) as exc:
            # Not YAMLErrors: an integer of more than 4300 digits (int()'s own limit), a tagged
            # list used as a mapping key (unhashable).
            raise ConfigError(source, f"YAML: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("restrictions"), list):
            raise ConfigError(source, "expected a top-level 'restrictions:' list")
        rules = []
        for i, entry in enumerate(data["restrictions"]):
            key = f"{source}: restrictions[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(key, "expected a mapping")
            matchers = entry.get("match")
            if not isinstance(matchers, list) or not matchers:
                raise ConfigError(key, "'match' must be a non-empty list")
            allows = entry.get("allow") or []
            if not isinstance(allows, list):
                raise ConfigError(key, "'allow' must be a list")
            rules.append(
                Restriction(
                    _scalar(entry.get("name", ""), "name", key),
                    tuple(_matcher(m, key) for m in matchers),
                    tuple(_allow(a, key) for a in allows),
                    _scalar(entry.get("description") or "", "description", key),
                )
            )
        return cls(tuple(rules))


def _regex(value: Any, key: str) -> re.Pattern[str]:
    try:
        with warnings.catch_warnings():  # "possible nested set" ([[): valid today
            warnings.simplefilter("ignore", FutureWarning)
            return re.compile(_scalar(value, "regex", key))
    except re.error as exc:
        raise ConfigError(key, f"bad regex {value!r}: {exc}") from None
    except (OverflowError, RecursionError):
        # Not re.error: a repeat count past 4294967295, or groups nested thousands deep.
        shown = str(value)[:80]
        raise ConfigError(key, f"bad regex {shown!r}: too large or nested too deep") from None


def _scalar(value: Any, what: str, key: str) -> str:
    """A YAML scalar as text.  A mapping or a list (or a tagged one) is refused: formatting
    one built of nested aliases ("billion laughs") would take forever."""
    if isinstance(value, dict | list | tuple):
        raise ConfigError(key, f"{what} must be a single value, not a {type(value).__name__}")
    return str(value)


def _is_port(text: str) -> bool:
    # ASCII digits only, and few of them: int() would take "٣" or choke on 5,000 digits.
    return text.isascii() and text.isdecimal() and len(text) <= 5 and int(text) <= 65535


def _matcher(value: Any, key: str) -> Matcher:
    if not isinstance(value, tuple):
        raise ConfigError(key, f"match entry {value!r} needs a tag (!Any, !PathPrefix, ...)")
    tag, body = value
    if tag == "Any":
        return Matcher("Any")
    if tag in ("PathPrefix", "Authorization"):
        return Matcher(tag, _regex(body, key))
    raise ConfigError(key, f"unknown matcher !{tag}")


def _list(body: dict[str, Any], name: str, key: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, f"{name!r} must be a list")
    return value


def _cidrs(body: dict[str, Any], key: str) -> tuple[IPNetwork, ...]:
    if "cidr" not in body:
        return ALL_NETWORKS
    try:
        return tuple(
            ipaddress.ip_network(_scalar(c, "cidr", key), strict=False)
            for c in _list(body, "cidr", key)
        )
    except ValueError as exc:
        raise ConfigError(key, f"bad cidr: {exc}") from None


def _allow(value: Any, key: str) -> Allow:
    if not isinstance(value, tuple):
        raise ConfigError(key, f"allow entry {value!r} needs a tag (!Tunnel, !ReverseTunnel)")
    tag, body = value
    if body in (None, ""):
        body = {}
    if not isinstance(body, dict):
        raise ConfigError(key, f"!{tag} takes a mapping")
    ports = tuple(PortRange.parse(p) for p in _list(body, "port", key))
    protocols = frozenset(_scalar(p, "protocol", key) for p in _list(body, "protocol", key))
    if tag == "Tunnel":
        unknown = protocols - set(FORWARD_NAMES.values())
        if unknown:
            raise ConfigError(key, f"unknown forward protocol(s) {sorted(unknown)}")
        host = _regex(body["host"], key) if "host" in body else _MATCH_ALL
        return AllowTunnel(protocols, ports, host, _cidrs(body, key))
    if tag == "ReverseTunnel":
        unknown = protocols - set(REVERSE_NAMES.values())
        if unknown:
            raise ConfigError(key, f"unknown reverse protocol(s) {sorted(unknown)}")
        mapping = []
        for m in _list(body, "port_mapping", key):
            x, sep, y = (part.strip() for part in _scalar(m, "port_mapping", key).partition(":"))
            if not sep or not _is_port(x) or not _is_port(y):
                raise ConfigError(key, f"port_mapping {str(m)[:80]!r} is not X:Y (ports 0-65535)")
            mapping.append((int(x), int(y)))
        unix = _regex(body["unix_path"], key) if "unix_path" in body else _MATCH_ALL
        return AllowReverseTunnel(protocols, ports, tuple(mapping), _cidrs(body, key), unix)
    raise ConfigError(key, f"unknown allow entry !{tag}")
