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

A ``regex`` value is RE2's syntax (``autovpn.routing.regex``), as in the lists.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import _CacheInfo, lru_cache
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


class Decision:
    """What ``Router.decide`` answers: the action, why, and the rule that decided, if one did.

    A frozen value, like the dataclass it was: the constructor, the five fields, equality,
    hash and repr are the dataclass's.  One difference inside: a decision made by a rule
    formats its ``reason`` and ``source`` from the rule when they are first read, and keeps
    them.  Most decisions are only asked for their ``action`` (every UDP datagram, every DNS
    lookup), and with a 110k-domain list a name's rule is often one not used before, so
    formatting the two strings up front (2 us) was most of the cost of such a decision.
    """

    __slots__ = ("_reason", "_source", "action", "mode", "rule")
    __match_args__ = ("action", "reason", "rule", "source", "mode")

    action: Action
    rule: Rule | None  # the rule that matched, if one did
    mode: Mode | None

    def __init__(
        self,
        action: Action,
        reason: str,
        rule: Rule | None = None,
        source: str = "",
        mode: Mode | None = None,
    ) -> None:
        _set_action(self, action)
        _set_reason(self, reason)
        _set_rule(self, rule)
        _set_source(self, source)
        _set_mode(self, mode)

    @property
    def reason(self) -> str:
        """Human-readable: which mode, rule and list decided."""
        try:
            return _get_reason(self)
        except AttributeError:  # a rule's decision (_rule_decision), not read before
            return self._format()[0]

    @property
    def source(self) -> str:
        """Where the deciding rule came from: "proxy list, default-proxy.txt:12", "user
        rules", "local", "default", "mode"."""
        try:
            return _get_source(self)
        except AttributeError:
            return self._format()[1]

    def _format(self) -> tuple[str, str]:
        rule = self.rule
        assert rule is not None  # only _rule_decision leaves the strings to format
        src = str(rule.source)
        reason = f"smart: {rule.describe()} ({src})"
        _set_reason(self, reason)
        _set_source(self, src)
        return reason, src

    def _fields(self) -> tuple[Action, str, Rule | None, str, Mode | None]:
        return (self.action, self.reason, self.rule, self.source, self.mode)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Decision:
            return NotImplemented
        assert isinstance(other, Decision)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"Decision(action={self.action!r}, reason={self.reason!r}, rule={self.rule!r},"
            f" source={self.source!r}, mode={self.mode!r})"
        )

    def __reduce__(self) -> tuple[type[Decision], tuple[object, ...]]:
        return (Decision, self._fields())  # copy and pickle: __setattr__ refuses

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def to_json(self) -> dict[str, object]:
        """What ``autovpn route --json`` prints."""
        return {
            "action": self.action.value,
            "mode": self.mode.value if self.mode else None,
            "reason": self.reason,
            "source": self.source,
            "rule": self.rule.to_json() if self.rule else None,
        }


# The slots' own descriptors: they set a field of a frozen Decision, and cost a third of
# object.__setattr__ (what a frozen dataclass's __init__ calls for each field).
_slots = Decision.__dict__
_set_action: Callable[[Decision, Action], None] = _slots["action"].__set__
_set_reason: Callable[[Decision, str], None] = _slots["_reason"].__set__
_get_reason: Callable[[Decision], str] = _slots["_reason"].__get__
_set_rule: Callable[[Decision, Rule | None], None] = _slots["rule"].__set__
_set_source: Callable[[Decision, str], None] = _slots["_source"].__set__
_get_source: Callable[[Decision], str] = _slots["_source"].__get__
_set_mode: Callable[[Decision, Mode | None], None] = _slots["mode"].__set__
_new_object = object.__new__
_SMART = Mode.SMART


def _rule_decision(rule: Rule) -> Decision:
    """Smart mode's decision by ``rule``; its reason and source slots stay unset until read."""
    d: Decision = _new_object(Decision)
    _set_action(d, rule.action)
    _set_rule(d, rule)
    _set_mode(d, _SMART)
    return d


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


_LIST_RANK = {Action.REJECT: 1, Action.DIRECT: 2, Action.PROXY: 3}  # the tiers after user: 0
_GLOBAL_DECISION = Decision(Action.PROXY, "mode global", source="mode", mode=Mode.GLOBAL)
_DIRECT_DECISION = Decision(Action.DIRECT, "mode direct", source="mode", mode=Mode.DIRECT)
_LOCAL_SUFFIXES = (".localhost", ".local")
_NO_TIER = 4  # the rank of "no full or suffix rule matched": after the user + 3 list tiers
_NameEntry = tuple[int, Rule | None, int, Rule | None, bool]
_MARKER: _NameEntry = (_NO_TIER, None, _NO_TIER, None, True)
_LEAF: _NameEntry = (_NO_TIER, None, _NO_TIER, None, False)
DEFAULT_CACHE_SIZE = 2048  # hosts whose decision is kept (under 0.5 MB when full)


class Router:
    """Decides how one connection is carried.  Cheap enough to call per connection.

    ``mode`` and ``default`` are plain attributes: set them at run time to switch.  The rule
    sets are replaced as a whole (build a new ``Router`` when rules change).

    How a decision stays cheap (``benchmarks/routing_bench.py``): the full and suffix rules of
    the four rule sets (user, reject, direct, proxy) are merged into one dict keyed by domain,
    whose entries carry the rank of the set that wins there; a name is walked from its TLD
    leftwards and the walk stops where no longer key exists, so most names cost two probes
    whatever the number of lists and rules.  The rarer keyword, regex and port rules are then
    asked only of the sets ranked before the match.  A rule's ``Decision`` formats its text
    only when it is read; local and default decisions are built once.  The last
    ``cache_size`` hosts' decisions are kept in an LRU cache (0: none).  IP literals and
    resolved ``addresses`` (never cached) take the set-by-set path, ``_decide_generic``.
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
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """``list_rules`` come from list files: they are split by action into the REJECT,
        DIRECT and PROXY steps of the decision order."""
        self.mode = mode
        self.user_rules = user_rules if user_rules is not None else RuleSet(geoip=geoip)
        by_action: dict[Action, list[Rule]] = {a: [] for a in Action}
        for rule in list_rules:
            by_action[rule.action].append(rule)
        self.reject_rules = RuleSet(by_action[Action.REJECT], geoip=geoip)
        self.direct_rules = RuleSet(by_action[Action.DIRECT], geoip=geoip)
        self.proxy_rules = RuleSet(by_action[Action.PROXY], geoip=geoip)
        self.errors: list[ListError] = list(errors)
        self._local_decisions: dict[str, Decision] = {}
        self._compile()
        self._cache = lru_cache(cache_size)(self._decide_smart) if cache_size > 0 else None
        self.default = default

    def _compile(self) -> None:
        """The merged name table of ``_decide_smart``; see the class docstring."""
        tiers = (self.user_rules, *self.list_tiers)
        # One entry per key: (rank, rule) of the best rule matching a host equal to the key
        # (a full rule, or a suffix rule not marked subdomain-only), then (rank, rule) of the
        # best rule matching a host that ends with ".key" (a suffix rule ".key" or "key").
        # Tiers go in decision order and, inside a tier, in RuleSet precedence (full before
        # suffix, ".key" before "key", as match_domain probes them): the first one set wins.
        names: dict[str, _NameEntry] = {}
        for rank, rs in enumerate(tiers):
            for key, rule in rs.full.items():
                e = names.get(key, _LEAF)
                if e[1] is None:
                    names[key] = (rank, rule, e[2], e[3], False)
            sub_only = [(k, r) for k, r in rs.suffix.items() if k[0] == "."]
            for key, rule in sub_only:  # first: ".key" beats "key" inside a tier
                key = key[1:]
                e = names.get(key, _LEAF)
                if e[3] is None:
                    names[key] = (e[0], e[1], rank, rule, False)
            for key, rule in rs.suffix.items():
                if key[0] == ".":
                    continue
                old = names.get(key)
                if old is None:  # the usual case: the first rule for this key
                    names[key] = (rank, rule, rank, rule, False)
                elif old[1] is None or old[3] is None:
                    exact = (rank, rule) if old[1] is None else (old[0], old[1])
                    sub = (rank, rule) if old[3] is None else (old[2], old[3])
                    names[key] = (*exact, *sub, False)
        # Every proper label suffix of a key is present (as a marker if nothing else) and knows
        # that longer keys end with it; so the walk from the TLD leftwards stops at the first
        # suffix that is absent or a leaf: no longer key can match.  For most names that is
        # two probes (the TLD, then the listed domain or an absent one).
        for key in list(names):
            i = key.find(".")
            while i >= 0:
                parent = key[i + 1 :]
                p = names.get(parent)
                if p is None:
                    names[parent] = _MARKER
                elif p[4]:
                    break  # marked before, and so are its own parents
                else:
                    names[parent] = (p[0], p[1], p[2], p[3], True)
                i = key.find(".", i + 1)
        # Most keys of a big list are a list's domain-suffix rule and nothing else: the entry
        # is then the Rule itself (its rank follows from its action, _LIST_RANK), which saves
        # a tuple per key (8 MiB with the 110k-domain dnsmasq-china-list).
        table: dict[str, _NameEntry | Rule] = {
            key: e[1] if e[1] is not None and e[1] is e[3] and e[0] and not e[4] else e
            for key, e in names.items()
        }
        self._names = table
        self._user_pattern = self._has_pattern(self.user_rules)
        self._list_patterns = tuple(
            (rank, rs) for rank, rs in enumerate(tiers) if rank and self._has_pattern(rs)
        )
        self._port_rules = any(rs.ports or rs.port_ranges for rs in tiers)

    @staticmethod
    def _has_pattern(rs: RuleSet) -> bool:
        """Whether ``rs`` has name rules beyond full and suffix: keyword, regex or port."""
        return bool(rs.keyword_re or rs.regexes or rs.ports or rs.port_ranges)

    @property
    def default(self) -> Action:
        """What smart mode does when no rule matches (settable at run time)."""
        return self._default

    @default.setter
    def default(self, action: Action) -> None:
        self._default = action
        self._default_decision = Decision(
            action,
            f"smart: no rule matched, default {action.value}",
            source="default",
            mode=Mode.SMART,
        )
        self.cache_clear()

    def cache_clear(self) -> None:
        """Forget the cached decisions (``default`` does it when it changes)."""
        if self._cache is not None:
            self._cache.cache_clear()

    def cache_info(self) -> _CacheInfo | None:
        """Hits, misses and size of the decision cache; None without one."""
        return None if self._cache is None else self._cache.cache_info()

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
        if mode is Mode.SMART:
            if addresses:
                h = normalize_host(host)
                return self._decide_generic(h, parse_ip(h), port, addresses)
            if not self._port_rules:
                port = 0  # no rule looks at it: one cache entry per host, not per host:port
            if self._cache is not None:
                return self._cache(host, port)
            return self._decide_smart(host, port)
        if mode is Mode.GLOBAL:
            return _GLOBAL_DECISION
        return _DIRECT_DECISION

    def _decide_smart(self, host: str, port: int) -> Decision:
        """Smart mode without resolved addresses; same answer as ``_decide_generic``."""
        h = host.lower()
        last = h[-1:]
        # Only what normalize_host would change besides the case (a trailing dot, [v6], a
        # %zone, IDNA) pays for it; IP literals take the general path.  Any other string is
        # walked: the walk is string probing, as RuleSet's, and no key has an empty label.
        if last in ".]" or ":" in h or not h.isascii():  # (true for "" too: no last char)
            h = normalize_host(host)
            ip = parse_ip(h)
            if ip is not None:
                return self._decide_generic(h, ip, port, ())
        elif last.isdigit() and h[0].isdigit():  # could be IPv4 (see rules._looks_like_ip)
            ip = parse_ip(h)
            if ip is not None:
                return self._decide_generic(h, ip, port, ())
        # The best full/suffix match over all tiers: the lowest rank and, inside a rank, the
        # longest key (the whole host's own entry last: it beats its suffixes).
        names = self._names
        rank, best = _NO_TIER, None
        j = len(h)
        while True:
            i = h.rfind(".", 0, j)
            e = names.get(h[i + 1 :])  # the host itself when i == -1
            if e is _MARKER and i >= 0:  # no rule here, longer keys exist: the usual TLD
                j = i  # (at the host itself, i == -1, the walk must end below instead)
                continue
            if e is None:
                break
            if not isinstance(e, tuple):  # a list's suffix rule, no longer key (see _compile)
                a = e.action  # its rank, as _LIST_RANK (a dict lookup by enum costs more)
                r = 1 if a is Action.REJECT else 2 if a is Action.DIRECT else 3
                if r <= rank:
                    rank, best = r, e
                break
            if i < 0:
                if e[0] <= rank:
                    rank, best = e[0], e[1]
                break
            if e[2] <= rank:
                rank, best = e[2], e[3]
            if not e[4]:
                break
            j = i
        if rank:
            # Before the match's tier: the user's keyword/regex/port rules, local names, then
            # the keyword/regex/port rules of the list tiers ranked before it.
            if self._user_pattern:
                rule = self.user_rules.match_pattern(h) or self.user_rules.match_port(port)
                if rule is not None:
                    return _rule_decision(rule)
            if "." not in h or h.endswith(_LOCAL_SUFFIXES):  # local_reason's tests for names
                why = local_reason(h, None)
                assert why is not None
                return self._local(why)
            if self._list_patterns:
                for r, rs in self._list_patterns:
                    if r >= rank:
                        break
                    rule = rs.match_pattern(h) or rs.match_port(port)
                    if rule is not None:
                        return _rule_decision(rule)
        if best is None:
            return self._default_decision
        return _rule_decision(best)

    def _decide_generic(
        self, h: str, ip: IPAddress | None, port: int, addrs: Sequence[str | IPAddress]
    ) -> Decision:
        """Smart mode for any normalised host ``h`` (``ip`` if a literal), rule set by rule
        set in the order of the module docstring: the reference ``_decide_smart`` matches."""
        rule = self.user_rules.match_normalized(h, ip, port, addrs)
        if rule is not None:
            return _rule_decision(rule)
        why = local_reason(h, ip)
        if why is not None:
            return self._local(why)
        for tier in self.list_tiers:
            rule = tier.match_normalized(h, ip, port, addrs)
            if rule is not None:
                return _rule_decision(rule)
        return self._default_decision

    def _local(self, why: str) -> Decision:
        d = self._local_decisions.get(why)
        if d is None:
            d = Decision(
                Action.DIRECT, f"smart: local address ({why})", source="local", mode=Mode.SMART
            )
            self._local_decisions[why] = d
        return d

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
        cache_size: int = DEFAULT_CACHE_SIZE,
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
            cache_size=cache_size,
        )
