"""RuleSet matching: every rule kind, label boundaries and the documented precedence."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autovpn.routing
from autovpn.routing.rules import (
    Action,
    Rule,
    RuleError,
    RuleKind,
    RuleSet,
    Source,
    js_regex_escape,
    make_rule,
    normalize_domain,
    normalize_host,
    parse_ip,
)

SRC = Source("test list", "t.txt", 1)


def rule(kind: RuleKind, value: str, action: Action = Action.PROXY, line: int = 1) -> Rule:
    return make_rule(kind, value, action, Source("test list", "t.txt", line))


def kinds(rs: RuleSet, host: str, port: int = 0) -> tuple[str, str] | None:
    r = rs.match(host, port)
    return None if r is None else (r.kind.value, r.value)


PURE_MODULES = ("rules", "router", "pac", "lists", "hosts")


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_modules_import_no_io(name: str) -> None:
    """The pure routing modules import nothing from asyncio, socket or ssl, no clocks, and
    nothing outside autovpn.routing at module level (autovpn.errors imports socket)."""
    path = Path(autovpn.routing.__file__).parent / f"{name}.py"
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in tree.body:  # module level only: a lazy import inside a function is allowed
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module)
    assert not {m.split(".")[0] for m in imported} & {"asyncio", "socket", "ssl", "time"}
    assert not any(m.startswith("autovpn") for m in imported), imported


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("WWW.Example.COM.", "www.example.com"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, norm: str) -> None:
    assert normalize_host(raw) == norm


@pytest.mark.parametrize("bad", ["", "a..b", "-a.com", "a b.com", "x" * 64 + ".com", "a/b"])
def test_normalize_domain_rejects(bad: str) -> None:
    with pytest.raises(RuleError):
        normalize_domain(bad)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (RuleKind.REGEX, "("),
        (RuleKind.IP_CIDR, "10.0.0.300/8"),
        (RuleKind.GEOIP, "CHN"),
        (RuleKind.PORT, "70000"),
        (RuleKind.PORT, "90-80"),
        (RuleKind.KEYWORD, ""),
    ],
)
def test_make_rule_rejects(kind: RuleKind, value: str) -> None:
    with pytest.raises(RuleError):
        make_rule(kind, value, Action.PROXY, SRC)


def test_suffix_respects_label_boundaries() -> None:
    rs = RuleSet([rule(RuleKind.SUFFIX, "le.com")])
    assert kinds(rs, "le.com") == ("domain-suffix", "le.com")
    assert kinds(rs, "a.b.le.com") == ("domain-suffix", "le.com")
    assert kinds(rs, "google.com") is None  # sing-box#1189
    assert kinds(rs, "le.com.evil") is None


def test_subdomain_only_suffix() -> None:
    rs = RuleSet([rule(RuleKind.SUFFIX, ".example.com")])
    assert kinds(rs, "www.example.com") == ("domain-suffix", ".example.com")
    assert kinds(rs, "example.com") is None
    assert make_rule(RuleKind.SUFFIX, "+.Example.com", Action.PROXY, SRC).value == "example.com"


def test_full_matches_exactly() -> None:
    rs = RuleSet([rule(RuleKind.FULL, "api.example.com")])
    assert kinds(rs, "API.example.com.") == ("full", "api.example.com")
    assert kinds(rs, "x.api.example.com") is None
    assert kinds(rs, "example.com") is None


def test_precedence_full_suffix_keyword_regex_port() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.PORT, "443", Action.REJECT),
            rule(RuleKind.REGEX, r"^www\.", Action.DIRECT),
            rule(RuleKind.KEYWORD, "exam", Action.DIRECT),
            rule(RuleKind.SUFFIX, "example.com", Action.PROXY),
            rule(RuleKind.SUFFIX, "a.example.com", Action.DIRECT),
            rule(RuleKind.FULL, "www.a.example.com", Action.REJECT),
        ]
    )
    assert kinds(rs, "www.a.example.com", 443) == ("full", "www.a.example.com")
    assert kinds(rs, "x.a.example.com", 443) == ("domain-suffix", "a.example.com")  # longest
    assert kinds(rs, "www.example.com", 443) == ("domain-suffix", "example.com")
    assert kinds(rs, "examine.org", 443) is not None and kinds(rs, "www.examp.org") == (
        "keyword",
        "exam",
    )
    assert kinds(rs, "www.other.org", 443) == ("regex", r"^www\.")
    assert kinds(rs, "other.org", 443) == ("port", "443")
    assert kinds(rs, "other.org", 80) is None


def test_keyword_leftmost_then_first_added() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.KEYWORD, "goog", Action.PROXY),
            rule(RuleKind.KEYWORD, "google", Action.DIRECT),
            rule(RuleKind.KEYWORD, "ads", Action.REJECT),
        ]
    )
    assert kinds(rs, "ads.google.com") == ("keyword", "ads")  # leftmost occurrence wins
    assert kinds(rs, "www.google.com") == ("keyword", "goog")  # same position: first added
    assert kinds(rs, "example.com") is None


def test_keyword_with_special_characters() -> None:
    rs = RuleSet([rule(RuleKind.KEYWORD, "a.b"), rule(RuleKind.KEYWORD, "x-y")])
    assert kinds(rs, "1.a.b.c") == ("keyword", "a.b")
    assert kinds(rs, "axb.com") is None  # the dot is literal
    assert kinds(rs, "x-y.com") == ("keyword", "x-y")
    assert js_regex_escape("a.b-é") == "a\\x2eb\\x2d\\xe9"


def test_regex_rules_in_order() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.REGEX, r"(^|\.)cdn\d+\.example\.net$", Action.DIRECT),
            rule(RuleKind.REGEX, r"example", Action.PROXY),
        ]
    )
    assert rs.match("cdn12.example.net") is not None
    assert kinds(rs, "a.cdn12.example.net") == ("regex", r"(^|\.)cdn\d+\.example\.net$")
    assert kinds(rs, "cdnx.example.net") == ("regex", "example")


def test_ipv4_cidr_longest_prefix() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.IP_CIDR, "10.0.0.0/8", Action.PROXY),
            rule(RuleKind.IP_CIDR, "10.1.0.0/16", Action.DIRECT),
            rule(RuleKind.IP_CIDR, "10.1.2.3", Action.REJECT),
            rule(RuleKind.IP_CIDR, "0.0.0.0/0", Action.DIRECT),
        ]
    )
    assert kinds(rs, "10.1.2.3") == ("ip-cidr", "10.1.2.3/32")
    assert kinds(rs, "10.1.9.9") == ("ip-cidr", "10.1.0.0/16")
    assert kinds(rs, "10.9.9.9") == ("ip-cidr", "10.0.0.0/8")
    assert kinds(rs, "8.8.8.8") == ("ip-cidr", "0.0.0.0/0")
    assert rs.ipv4_lengths == [32, 16, 8, 0]
    assert kinds(rs, "::1") is None  # other family


def test_ipv6_cidr() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.IP_CIDR, "2001:db8::/32", Action.PROXY),
            rule(RuleKind.IP_CIDR, "2001:db8:1::/48", Action.DIRECT),
            rule(RuleKind.IP_CIDR, "[2001:db8:1::5]", Action.REJECT),
        ]
    )
    assert kinds(rs, "[2001:db8:1::5]") == ("ip-cidr", "2001:db8:1::5/128")
    assert kinds(rs, "2001:DB8:1::6") == ("ip-cidr", "2001:db8:1::/48")
    assert kinds(rs, "2001:db8:ff::1") == ("ip-cidr", "2001:db8::/32")
    assert kinds(rs, "2001:db9::1") is None


def test_ip_rules_need_ip_literal_or_addresses() -> None:
    rs = RuleSet([rule(RuleKind.IP_CIDR, "93.184.216.0/24"), rule(RuleKind.SUFFIX, "1.1")])
    assert kinds(rs, "example.com") is None
    r = rs.match("example.com", 443, addresses=["2001:db8::1", "93.184.216.34"])
    assert r is not None and r.value == "93.184.216.0/24"
    r = rs.match("example.com", 443, addresses=[ipaddress.ip_address("93.184.216.1")])
    assert r is not None
    assert kinds(rs, "1.1.1.1") is None  # domain rules never apply to IP literals


def test_geoip_uses_injected_lookup() -> None:
    table = {"114.114.114.114": "cn", "8.8.8.8": "US"}
    rs = RuleSet([rule(RuleKind.GEOIP, "cn", Action.DIRECT)], geoip=table.get)
    assert kinds(rs, "114.114.114.114") == ("geoip", "CN")
    assert kinds(rs, "8.8.8.8") is None
    assert kinds(rs, "example.cn") is None
    assert RuleSet([rule(RuleKind.GEOIP, "CN")]).match("114.114.114.114") is None  # no lookup


def test_ports_and_ranges() -> None:
    rs = RuleSet([rule(RuleKind.PORT, "8000-8100"), rule(RuleKind.PORT, "25", Action.REJECT)])
    assert kinds(rs, "x.org", 25) == ("port", "25")
    assert kinds(rs, "x.org", 8080) == ("port", "8000-8100")
    assert kinds(rs, "x.org", 7999) is None


def test_duplicates_first_wins() -> None:
    rs = RuleSet(
        [
            rule(RuleKind.SUFFIX, "a.com", Action.PROXY),
            rule(RuleKind.SUFFIX, "A.com", Action.DIRECT),
        ]
    )
    r = rs.match("a.com")
    assert r is not None and r.action is Action.PROXY
    assert rs.duplicates == 1
    assert len(rs) == 2 and bool(rs) and not RuleSet()


def test_rule_describe_and_source() -> None:
    r = rule(RuleKind.SUFFIX, "google.com", line=12)
    assert r.describe() == "domain-suffix google.com"
    assert str(r.source) == "test list, t.txt:12"
    assert str(Source("user rules")) == "user rules"
    assert r.to_json()["line"] == 12


labels = st.text(alphabet="abcxyz0-", min_size=1, max_size=4).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
domains = st.lists(labels, min_size=1, max_size=5).map(".".join)
# A host that reads as an IP address ("0.0.0.0") is matched by IP rules only, never by domain
# rules, so the brute force below does not apply to it.
domain_hosts = domains.filter(lambda h: parse_ip(normalize_host(h)) is None)


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(domains, max_size=15), host=domain_hosts)
def test_suffix_lookup_equals_brute_force(rules: list[str], host: str) -> None:
    rs = RuleSet([rule(RuleKind.SUFFIX, d) for d in rules])
    matching = [d for d in rules if host == d or host.endswith("." + d)]
    got = rs.match(host)
    if not matching:
        assert got is None
    else:
        assert got is not None and got.value == max(matching, key=len)
