"""Routing rules and the compiled rule set that answers "which rule matches this host?".

This module is pure: no I/O, no clocks, nothing from asyncio, socket or ssl.  GEOIP rules need a
country database; it is injected as a callable (``GeoLookup``) so the rule set itself stays pure
(``autovpn.routing.geoip`` wraps the ``geoip2fast`` package for production use).

Theory of operation
-------------------
A ``Rule`` is a value: a kind, a normalised value, an action and where it came from.  A
``RuleSet`` compiles a sequence of rules once into lookup structures whose cost does not grow with
the number of rules (measured with the 110k-domain dnsmasq-china-list, see
``benchmarks/routing_bench.py``):

* full-domain rules: one dict, probed once with the whole host;
* domain-suffix rules: one dict, probed once per label suffix of the host.  ``a.b.c`` probes
  ``a.b.c``, ``.b.c``, ``b.c``, ``.c``, ``c``; keys starting with a dot are *subdomain-only*
  suffixes (Clash's ``.example.com``), so ``.b.c`` matches ``a.b.c`` but never ``b.c`` itself.
  Label boundaries are respected: ``le.com`` never matches ``google.com`` (sing-box#1189);
* keyword rules: one compiled regex alternation over all keywords, so a lookup is a single C-level
  scan instead of a Python loop over the rules.  Tradeoff (documented, deliberate): the winner is
  the keyword that occurs *leftmost* in the host, ties going to the keyword added first; the PAC
  generator emits the same alternation, so browsers and the engine agree;
* regex rules: compiled once by RE2 (``autovpn.routing.regex``: linear time, whatever the
  pattern; the syntax of v2ray, Clash and sing-box).  One search of their alternation
  (``regex_any``) tells whether any matches; only then are they tried in insertion order (the
  first that matches wins).  Real lists have few: 14 in gfwlist, 163 in all of v2fly's data;
* IP/CIDR rules: per address family, a dict per prefix length keyed by the integer network
  (``address >> (bits - prefixlen)``); a lookup probes only the prefix lengths actually present,
  longest first (at most 33 / 129 probes, usually a handful);
* GEOIP rules: a dict country code -> rule, probed with the injected lookup's answer;
* port rules: a dict port -> rule, then port ranges in insertion order.

Precedence inside one ``RuleSet`` (the first that matches wins):

1. for a domain name: full > suffix (longest suffix first) > keyword > regex;
   for an IP literal: IP/CIDR (longest prefix first) > GEOIP.  Domain rules never apply to IP
   literals and IP rules never apply to names, except through resolved ``addresses`` given to
   ``match`` (then IP/CIDR and GEOIP rules are tried on each address in order, after the domain
   rules);
2. port rules, last: they are a catch-all for a port.

When two rules have the same kind and value, the first one added wins and the later one is counted
in ``RuleSet.duplicates``.  Ordering across rule sets (user rules, lists) is the router's job.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .regex import Regex, RegexError, any_of, compile_re2

__all__ = [
    "Action",
    "GeoLookup",
    "Rule",
    "RuleError",
    "RuleKind",
    "RuleSet",
    "Source",
    "js_regex_escape",
    "make_rule",
    "normalize_domain",
    "normalize_host",
    "parse_ip",
]


class Action(enum.Enum):
    DIRECT = "direct"
    PROXY = "proxy"
    REJECT = "reject"


class RuleKind(enum.Enum):
    FULL = "full"  # exactly this host
    SUFFIX = "domain-suffix"  # this domain and its subdomains (``.x`` value: subdomains only)
    KEYWORD = "keyword"  # substring of the host
    REGEX = "regex"  # regex searched in the host
    IP_CIDR = "ip-cidr"  # an IPv4 or IPv6 network; a bare address is a /32 or /128
    GEOIP = "geoip"  # ISO 3166 country code of the address
    PORT = "port"  # destination port or range ``lo-hi``


GeoLookup = Callable[[str], "str | None"]
"""Maps an IP address (text) to an upper-case ISO country code, or None when unknown."""


class RuleError(ValueError):
    """A rule value is malformed.  Importers turn it into a ``ListError`` with file and line."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a rule came from: the list's role ("proxy list", "user rules"), file and line."""

    list: str
    file: str = ""
    line: int = 0

    def __str__(self) -> str:
        if not self.file:
            return self.list
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{self.list}, {where}"


@dataclass(frozen=True, slots=True)
class Rule:
    kind: RuleKind
    value: str  # normalised: lower-case domain, compressed network, upper-case country, ...
    action: Action
    source: Source = field(default=Source("unknown"), compare=False)

    def describe(self) -> str:
        """``domain-suffix google.com``: kind and value, as `autovpn route` shows them."""
        return f"{self.kind.value} {self.value}"

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "value": self.value,
            "action": self.action.value,
            "list": self.source.list,
            "file": self.source.file,
            "line": self.source.line,
        }


# --------------------------------------------------------------------------------------------
# Normalisation


_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
MAX_DOMAIN_LENGTH = 253  # RFC 1035 section 2.3.4, in text form without the trailing dot


def normalize_host(host: str) -> str:
    """The canonical form routing compares: lower-case, no trailing dots, no ``[]`` around an
    IPv6 literal, no ``%zone``, IDNA A-labels for non-ASCII names.  Never raises.

    The PAC generator's ``norm()`` does the same for ASCII hosts (browsers pass A-labels).
    """
    h = host.lower()
    if h[:1] == "[" and h[-1:] == "]":
        h = h[1:-1]
    h = h.rstrip(".")
    if ":" in h and "%" in h:
        h = h[: h.index("%")]
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return h


def normalize_domain(value: str) -> str:
    """Validate and normalise a domain used as a rule value; raises ``RuleError``.

    Underscores are accepted (they occur in real lists: ``_dmarc``, SRV-style names).
    """
    d = normalize_host(value.strip())
    if not d.isascii():
        raise RuleError(f"invalid internationalised domain {value!r}")
    if not d or len(d) > MAX_DOMAIN_LENGTH:
        raise RuleError(f"invalid domain {value!r}")
    for label in d.split("."):
        if not _LABEL_RE.match(label):
            raise RuleError(f"invalid domain {value!r}")
    return d


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _looks_like_ip(h: str) -> bool:
    # Cheap filter so ordinary names never pay for ipaddress' exception path: an IPv6 literal
    # has a colon, an IPv4 one (the only other form ip_address takes) starts and ends with a
    # digit.
    return bool(h) and (":" in h or (h[-1].isdigit() and h[0].isdigit()))


def parse_ip(host: str) -> IPAddress | None:
    """The address if ``host`` (already normalised) is an IP literal, else None."""
    if not _looks_like_ip(host):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def js_regex_escape(text: str) -> str:
    """Escape ``text`` for a regex that means the same in Python ``re`` and JavaScript.

    Everything outside ``[a-z0-9]`` becomes ``\\xHH`` or ``\\uHHHH``: both dialects read those
    identically, so the keyword alternation can be shipped verbatim into the PAC file.
    """
    out = []
    for ch in text:
        o = ord(ch)
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            raise RuleError(f"character U+{o:X} not supported in a keyword")
    return "".join(out)


def compile_regex(text: str) -> Regex:
    """A rule's regex, compiled by RE2; raises ``RuleError`` for one RE2 cannot take
    (backreferences, lookaround, a repeat past 1000, a program past ``MAX_REGEX_MEMORY``), with
    RE2's reason.  Lists are downloaded: a bad line is reported, never fatal."""
    try:
        return compile_re2(text)
    except RegexError as exc:
        raise RuleError(f"invalid regex {text[:200]!r}: {exc}") from None


def make_rule(kind: RuleKind, value: str, action: Action, source: Source) -> Rule:
    """Build a rule with a validated, normalised value; raises ``RuleError``."""
    v = value.strip()
    if kind is RuleKind.FULL:
        v = normalize_domain(v)
    elif kind is RuleKind.SUFFIX:
        v = v.lower()
        if v.startswith("+."):  # Clash: the domain and its subdomains
            v = v[2:]
        sub_only = v.startswith(".")
        v = normalize_domain(v.lstrip("."))
        if sub_only:
            v = "." + v
    elif kind is RuleKind.KEYWORD:
        v = v.lower()
        if not v:
            raise RuleError("empty keyword")
        js_regex_escape(v)  # validates the characters
    elif kind is RuleKind.REGEX:
        if not v:
            raise RuleError("empty regex")
        compile_regex(v)
    elif kind is RuleKind.IP_CIDR:
        try:
            v = str(ipaddress.ip_network(v.strip("[]"), strict=False))
        except ValueError:
            raise RuleError(f"invalid IP network {value!r}") from None
    elif kind is RuleKind.GEOIP:
        v = v.upper()
        if not re.fullmatch(r"[A-Z]{2}", v):
            raise RuleError(f"invalid country code {value!r}")
    elif kind is RuleKind.PORT:
        lo, _, hi = v.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise RuleError(f"invalid port {value!r}")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b <= 65535:
            raise RuleError(f"invalid port {value!r}")
        v = str(a) if a == b else f"{a}-{b}"
    return Rule(kind, v, action, source)


# --------------------------------------------------------------------------------------------
# The compiled rule set


class RuleSet:
    """Rules compiled for lookup; immutable after construction.  See the module docstring for
    the structures and the precedence.  Public attributes are read by the PAC generator."""

    __slots__ = (
        "duplicates",
        "full",
        "geoip",
        "geoip_lookup",
        "ipv4",
        "ipv4_lengths",
        "ipv6",
        "ipv6_lengths",
        "keyword_re",
        "keywords",
        "port_ranges",
        "ports",
        "regex_any",
        "regexes",
        "rules",
        "suffix",
    )

    def __init__(self, rules: Iterable[Rule] = (), *, geoip: GeoLookup | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.geoip_lookup = geoip
        self.full: dict[str, Rule] = {}
        self.suffix: dict[str, Rule] = {}
        self.keywords: dict[str, Rule] = {}
        self.regexes: list[tuple[Regex, Rule]] = []
        self.ipv4: dict[int, dict[int, Rule]] = {}
        self.ipv6: dict[int, dict[int, Rule]] = {}
        self.geoip: dict[str, Rule] = {}
        self.ports: dict[int, Rule] = {}
        self.port_ranges: list[tuple[int, int, Rule]] = []
        self.duplicates = 0
        seen_regex: set[str] = set()
        for rule in self.rules:
            kind = rule.kind
            if kind is RuleKind.FULL:
                self._add(self.full, rule.value, rule)
            elif kind is RuleKind.SUFFIX:
                self._add(self.suffix, rule.value, rule)
            elif kind is RuleKind.KEYWORD:
                self._add(self.keywords, rule.value, rule)
            elif kind is RuleKind.REGEX:
                if rule.value in seen_regex:
                    self.duplicates += 1
                else:
                    seen_regex.add(rule.value)
                    self.regexes.append((compile_regex(rule.value), rule))
            elif kind is RuleKind.IP_CIDR:
                net = ipaddress.ip_network(rule.value)
                table = self.ipv4 if net.version == 4 else self.ipv6
                plen = net.prefixlen
                key = int(net.network_address) >> (net.max_prefixlen - plen)
                self._add(table.setdefault(plen, {}), key, rule)
            elif kind is RuleKind.GEOIP:
                self._add(self.geoip, rule.value, rule)
            elif kind is RuleKind.PORT:
                lo, _, hi = rule.value.partition("-")
                if hi:
                    self.port_ranges.append((int(lo), int(hi), rule))
                else:
                    self._add(self.ports, int(lo), rule)
        # Longest prefix first: the most specific network wins.
        self.ipv4_lengths = sorted(self.ipv4, reverse=True)
        self.ipv6_lengths = sorted(self.ipv6, reverse=True)
        self.regex_any = any_of([p.pattern for p, _ in self.regexes])
        self.keyword_re: re.Pattern[str] | None = (
            re.compile("|".join(js_regex_escape(k) for k in self.keywords))
            if self.keywords
            else None
        )

    def _add(self, table: dict[str, Rule] | dict[int, Rule], key: object, rule: Rule) -> None:
        if key in table:
            self.duplicates += 1
        else:
            table[key] = rule  # type: ignore[index]

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    # -- lookup ---------------------------------------------------------------------------

    def match(
        self,
        host: str,
        port: int = 0,
        addresses: Sequence[str | IPAddress] = (),
    ) -> Rule | None:
        """The rule that decides ``host:port``, or None.  ``host`` may be in any case and form
        (``normalize_host`` is applied); ``addresses`` are resolved addresses for a name."""
        h = normalize_host(host)
        return self.match_normalized(h, parse_ip(h), port, addresses)

    def match_normalized(
        self,
        h: str,
        ip: IPAddress | None,
        port: int,
        addresses: Sequence[str | IPAddress] = (),
    ) -> Rule | None:
        """``match`` for a host already normalised and parsed (the router does it once)."""
        if ip is None:
            rule = self.match_domain(h)
            if rule is not None:
                return rule
            for a in addresses:
                addr = a if not isinstance(a, str) else parse_ip(normalize_host(a))
                if addr is not None:
                    rule = self.match_ip(addr)
                    if rule is not None:
                        return rule
        else:
            rule = self.match_ip(ip)
            if rule is not None:
                return rule
        return self.match_port(port)

    def match_domain(self, h: str) -> Rule | None:
        rule = self.full.get(h)
        if rule is not None:
            return rule
        suffix = self.suffix
        if suffix:
            rule = suffix.get(h)
            if rule is not None:
                return rule
            i = h.find(".")
            while i >= 0:
                rule = suffix.get(h[i:])  # ".b.c": subdomain-only rules
                if rule is not None:
                    return rule
                rule = suffix.get(h[i + 1 :])
                if rule is not None:
                    return rule
                i = h.find(".", i + 1)
        return self.match_pattern(h)

    def match_pattern(self, h: str) -> Rule | None:
        """The keyword and regex steps of ``match_domain`` alone (the router probes the full
        and suffix tables of all its rule sets at once, then asks each set for the rest)."""
        if self.keyword_re is not None:
            m = self.keyword_re.search(h)
            if m is not None:
                return self.keywords[m.group()]
        if self.regexes:
            data = h.encode("utf-8", "replace")  # once for all of them
            if self.regex_any is not None and not self.regex_any.search_bytes(data):
                return None  # the usual answer, in one search
            for pattern, rule in self.regexes:
                if pattern.search_bytes(data):
                    return rule
        return None

    def match_ip(self, addr: IPAddress) -> Rule | None:
        n = int(addr)
        if addr.version == 4:
            tables, lengths, bits = self.ipv4, self.ipv4_lengths, 32
        else:
            tables, lengths, bits = self.ipv6, self.ipv6_lengths, 128
        for plen in lengths:
            rule = tables[plen].get(n >> (bits - plen))
            if rule is not None:
                return rule
        if self.geoip and self.geoip_lookup is not None:
            country = self.geoip_lookup(str(addr))
            if country:
                return self.geoip.get(country.upper())
        return None

    def match_port(self, port: int) -> Rule | None:
        rule = self.ports.get(port)
        if rule is not None:
            return rule
        for lo, hi, r in self.port_ranges:
            if lo <= port <= hi:
                return r
        return None
