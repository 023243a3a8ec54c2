"""The routing decision: DIRECT, PROXY or REJECT for every connection the engine receives.

This module is pure (no asyncio, socket or ssl; ``Router.from_config`` reads list files).  The
engine asks ``Router.decide(host, port)`` once per connection; the listeners never route on their
own, so a mode switch at run time (``router.mode = Mode.SMART``) changes what new connections do
without touching established ones.

Smart mode decides in this order; the first step that answers wins:

1. the user's own rules (they override everything below: a user can send a home network's
   private range through the tunnel, or REJECT an ad domain that a list proxies);
2. local addresses -> DIRECT: ``localhost``, plain host names (no dot), ``*.local``,
   ``*.localhost``, 127.0.0.0/8, ::1, RFC 1918, link-local (169.254/16, fe80::/10), CGNAT
   100.64/10 (RFC 6598), unique-local fc00::/7 (RFC 4193);
3. list rules whose action is REJECT, then DIRECT (the direct list, and ``@@`` exceptions of
   AutoProxy lists), then PROXY (the proxy list);
4. the configured default (``Router.default``: PROXY or DIRECT).

Inside each step the ``RuleSet`` precedence applies (``autovpn.routing.rules``).  IP rules apply
to IP-literal hosts and, when the caller passes them, to resolved ``addresses``.  Global mode
proxies everything, local addresses included (the server's destination policy still decides);
direct mode sends nothing through the tunnel.

User rule syntax (``parse_user_rule``), one rule per string:

* compact: ``KIND:VALUE=ACTION`` with KIND one of ``full``, ``domain`` (alias ``domain-suffix``,
  ``suffix``), ``keyword``, ``regex`` (alias ``regexp``), ``ip-cidr`` (alias ``ip``, ``cidr``),
  ``geoip``, ``port`` and ACTION ``proxy``, ``direct`` or ``reject``; e.g.
  ``domain-suffix:example.com=proxy``, ``ip-cidr:10.0.0.0/8=proxy``, ``keyword:ads=reject``,
  ``port:25=reject``.  Without ``KIND:`` a domain is a domain-suffix and an address or network an
  ip-cidr: ``example.com=direct``, ``192.168.1.0/24=proxy``.  The value ends at the *last* ``=``.
* Clash classical: ``DOMAIN-SUFFIX,example.com,PROXY`` (policy required: PROXY, DIRECT, REJECT).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .lists import (
    ListError,
    ListFormat,
    LoadResult,
    load_default_lists,
    load_list_file,
    parse_clash_rule,
    parse_plain,
)
from .rules import (
    Action,
    GeoLookup,
    IPAddress,
    Rule,
    RuleError,
    RuleKind,
    RuleSet,
    Source,
    make_rule,
    normalize_host,
    parse_ip,
)

__all__ = [
    "LOCAL_NETWORKS",
    "Action",
    "Decision",
    "ListSpec",
    "Mode",
    "Router",
    "local_reason",
    "parse_user_rule",
]


class Mode(enum.Enum):
    GLOBAL = "global"  # everything through the tunnel, local addresses included
    SMART = "smart"  # rules decide
    DIRECT = "direct"  # nothing through the tunnel


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # human-readable: which mode, rule and list decided
    rule: Rule | None = None  # the rule that matched, if one did
    source: str = ""  # "proxy list, default-proxy.txt:12", "user rules", "local", "default"
    mode: Mode | None = None

    def to_json(self) -> dict[str, object]:
        """What ``autovpn route --json`` prints."""
        return {
            "action": self.action.value,
            "mode": self.mode.value if self.mode else None,
            "reason": self.reason,
            "source": self.source,
            "rule": self.rule.to_json() if self.rule else None,
        }


# -- local addresses ---------------------------------------------------------------------------

LOCAL_NETWORKS: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "RFC 1918 private"),
    ("172.16.0.0/12", "RFC 1918 private"),
    ("192.168.0.0/16", "RFC 1918 private"),
    ("169.254.0.0/16", "link-local"),
    ("100.64.0.0/10", "CGNAT, RFC 6598"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "unique local, RFC 4193"),
)
"""Networks that are DIRECT in smart mode and in every PAC file (also used by ``pac``)."""

LOCAL_RULES = RuleSet(
    make_rule(RuleKind.IP_CIDR, net, Action.DIRECT, Source(why)) for net, why in LOCAL_NETWORKS
)


def local_reason(h: str, ip: IPAddress | None) -> str | None:
    """Why the normalised host ``h`` (parsed as ``ip`` if a literal) is local, or None."""
    if ip is not None:
        rule = LOCAL_RULES.match_ip(ip)
        return f"{rule.value} {rule.source.list}" if rule is not None else None
    if "." not in h:
        return "localhost" if h == "localhost" else "plain host name"
    if h.endswith(".localhost"):
        return "*.localhost"
    if h.endswith(".local"):
        return "*.local"
    return None


# -- user rules ----------------------------------------------------------------------------

_KIND_ALIASES = {
    "full": RuleKind.FULL,
    "domain": RuleKind.SUFFIX,
    "domain-suffix": RuleKind.SUFFIX,
    "suffix": RuleKind.SUFFIX,
    "keyword": RuleKind.KEYWORD,
    "domain-keyword": RuleKind.KEYWORD,
    "regex": RuleKind.REGEX,
    "regexp": RuleKind.REGEX,
    "domain-regex": RuleKind.REGEX,
    "ip-cidr": RuleKind.IP_CIDR,
    "ip": RuleKind.IP_CIDR,
    "cidr": RuleKind.IP_CIDR,
    "geoip": RuleKind.GEOIP,
    "port": RuleKind.PORT,
}
_ACTIONS = {a.value: a for a in Action}


_USER_SOURCE = Source("user rules")


def parse_user_rule(text: str, source: Source = _USER_SOURCE) -> Rule:
    """One user rule (syntax in the module docstring); raises ``RuleError``."""
    t = text.strip()
    head = t.split(",", 1)[0]
    if "," in t and head.isupper() and ":" not in head and "=" not in head:
        return _parse_clash_user_rule(t, source)
    body, eq, act = t.rpartition("=")
    if not eq:
        raise RuleError(f"{t!r}: expected KIND:VALUE=ACTION")
    action = _ACTIONS.get(act.strip().lower())
    if action is None:
        raise RuleError(f"{t!r}: unknown action {act.strip()!r} (proxy, direct or reject)")
    prefix, colon, value = body.partition(":")
    kind = _KIND_ALIASES.get(prefix.strip().lower()) if colon else None
    if kind is None:
        value = body.strip()
        is_net = "/" in value or parse_ip(normalize_host(value)) is not None
        kind = RuleKind.IP_CIDR if is_net else RuleKind.SUFFIX
    return make_rule(kind, value, action, source)


def _parse_clash_user_rule(t: str, source: Source) -> Rule:
    extras = {p.strip().upper() for p in t.split(",")[2:]}
    if not extras & {"PROXY", "DIRECT", "REJECT", "REJECT-DROP"}:
        raise RuleError(f"{t!r}: a Clash rule needs a policy (PROXY, DIRECT or REJECT)")
    kind, value, action = parse_clash_rule(t, Action.PROXY)
    return make_rule(kind, value, action, source)


@dataclass(frozen=True, slots=True)
class ListSpec:
    """A list file to load: its path, what a match means, and its format (None: detect)."""

    path: str | Path
    action: Action = Action.PROXY
    format: ListFormat | None = None
    name: str | None = None  # shown in reasons; defaults to "<action> list"


# -- the router --------------------------------------------------------------------------------


class Router:
    """Decides how one connection is carried.  Cheap enough to call per connection.

    ``mode`` and ``default`` are plain attributes: set them at run time to switch.  The rule
    sets are replaced as a whole (build a new ``Router`` when rules change).
    """

    def __init__(
        self,
        mode: Mode = Mode.GLOBAL,
        *,
        user_rules: RuleSet | None = None,
        list_rules: Iterable[Rule] = (),
        default: Action = Action.PROXY,
        geoip: GeoLookup | None = None,
        errors: Sequence[ListError] = (),
    ) -> None:
        """``list_rules`` come from list files: they are split by action into the REJECT,
        DIRECT and PROXY steps of the decision order."""
        self.mode = mode
        self.default = default
        self.user_rules = user_rules if user_rules is not None else RuleSet(geoip=geoip)
        by_action: dict[Action, list[Rule]] = {a: [] for a in Action}
        for rule in list_rules:
            by_action[rule.action].append(rule)
        self.reject_rules = RuleSet(by_action[Action.REJECT], geoip=geoip)
        self.direct_rules = RuleSet(by_action[Action.DIRECT], geoip=geoip)
        self.proxy_rules = RuleSet(by_action[Action.PROXY], geoip=geoip)
        self.errors: list[ListError] = list(errors)

    @property
    def list_tiers(self) -> tuple[RuleSet, RuleSet, RuleSet]:
        """The list steps after the local-address check, in decision order."""
        return (self.reject_rules, self.direct_rules, self.proxy_rules)

    def decide(
        self,
        host: str,
        port: int,
        addresses: Sequence[str | IPAddress] | None = None,
    ) -> Decision:
        """The decision for a connection to ``host:port``.  ``host`` is a name or an IP literal
        (any case, a trailing dot and ``[...]`` allowed); ``addresses`` are addresses the name
        resolved to, if the caller already has them (IP rules are then tried on them)."""
        mode = self.mode
        if mode is Mode.GLOBAL:
            return Decision(Action.PROXY, "mode global", mode=mode, source="mode")
        if mode is Mode.DIRECT:
            return Decision(Action.DIRECT, "mode direct", mode=mode, source="mode")
        h = normalize_host(host)
        ip = parse_ip(h)
        addrs: Sequence[str | IPAddress] = addresses or ()
        rule = self.user_rules.match_normalized(h, ip, port, addrs)
        if rule is not None:
            return self._by_rule(rule)
        why = local_reason(h, ip)
        if why is not None:
            return Decision(
                Action.DIRECT, f"smart: local address ({why})", source="local", mode=mode
            )
        for tier in self.list_tiers:
            rule = tier.match_normalized(h, ip, port, addrs)
            if rule is not None:
                return self._by_rule(rule)
        d = self.default
        return Decision(
            d, f"smart: no rule matched, default {d.value}", source="default", mode=mode
        )

    @staticmethod
    def _by_rule(rule: Rule) -> Decision:
        src = str(rule.source)
        return Decision(
            rule.action, f"smart: {rule.describe()} ({src})", rule=rule, source=src, mode=Mode.SMART
        )

    @classmethod
    def from_config(
        cls,
        *,
        mode: Mode = Mode.SMART,
        default: Action = Action.PROXY,
        rules: Iterable[str] = (),
        lists: Iterable[ListSpec] = (),
        default_lists: bool = True,
        proxy_add: Iterable[str] = (),
        direct_add: Iterable[str] = (),
        remove: Iterable[str] = (),
        geoip: GeoLookup | None = None,
    ) -> Router:
        """Build a router from configuration values.

        * ``rules``: user rules (``parse_user_rule`` syntax); a bad one raises ``ConfigError``
          with key ``routing.rules[i]``, since the user's own config should fail loudly.
        * ``lists``: list files; their bad lines (and unreadable files) are collected in
          ``router.errors`` and the rest loads.
        * ``default_lists``: load the shipped proxy/direct lists; ``proxy_add`` /
          ``direct_add`` add domains (or networks) to them, ``remove`` drops domains from them
          (exact value of a full or suffix rule; entries in your own list files are untouched).
        """
        # Imported here: autovpn.errors imports socket, and this module stays free of it.
        from autovpn.errors import ConfigError

        user: list[Rule] = []
        for i, text in enumerate(rules):
            try:
                user.append(parse_user_rule(text, Source("user rules", "config", i + 1)))
            except RuleError as exc:
                raise ConfigError(f"routing.rules[{i}]", str(exc)) from None
        loaded = LoadResult()
        if default_lists:
            defaults = load_default_lists()
            drop = {normalize_host(r).lstrip(".") for r in remove}
            for part in (defaults.proxy, defaults.direct):
                part.rules = [
                    r
                    for r in part.rules
                    if not (
                        r.kind in (RuleKind.FULL, RuleKind.SUFFIX) and r.value.lstrip(".") in drop
                    )
                ]
                loaded.extend(part)
        for key, entries, action in (
            ("routing.proxy_add", proxy_add, Action.PROXY),
            ("routing.direct_add", direct_add, Action.DIRECT),
        ):
            loaded.extend(
                parse_plain(
                    "\n".join(entries), action=action, file=key, list_name=f"{action.value} list"
                )
            )
        for spec in lists:
            loaded.extend(
                load_list_file(spec.path, action=spec.action, fmt=spec.format, list_name=spec.name)
            )
        return cls(
            mode,
            user_rules=RuleSet(user, geoip=geoip),
            list_rules=loaded.rules,
            default=default,
            geoip=geoip,
            errors=loaded.errors,
        )
