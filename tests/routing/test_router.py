"""Router.decide: modes, the smart decision order, from_config and user rule syntax."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import pickle
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autovpn.errors import ConfigError
from autovpn.routing.lists import ListFormat
from autovpn.routing.router import (
    LOCAL_NETWORKS,
    Action,
    Decision,
    ListSpec,
    Mode,
    Router,
    parse_user_rule,
)
from autovpn.routing.rules import (
    Rule,
    RuleError,
    RuleKind,
    RuleSet,
    Source,
    make_rule,
    normalize_host,
)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router.from_config(
        rules=[
            "ip-cidr:192.168.50.0/24=proxy",  # a home network through the tunnel
            "keyword:adserv=reject",
            "domain-suffix:ads.youtube.com=reject",
            "DOMAIN-SUFFIX,corp.example,DIRECT",
            "port:25=reject",
        ],
        proxy_add=["proxied.example"],
        direct_add=["direct.example", "google.com.hk"],
        remove=["github.com"],
    )


def test_decision_keeps_old_constructor() -> None:
    d = Decision(Action.PROXY, "mode global")
    assert d.rule is None and d.source == "" and d.mode is None


def test_decision_is_a_frozen_value(router: Router) -> None:
    d = router.decide("mail.google.com", 443)  # reason and source formatted on first read
    assert d.rule is not None
    src = str(d.rule.source)
    eager = Decision(Action.PROXY, f"smart: {d.rule.describe()} ({src})", d.rule, src, Mode.SMART)
    assert d == eager and hash(d) == hash(eager) and repr(d) == repr(eager)
    assert copy.copy(d) == d and pickle.loads(pickle.dumps(d)) == d
    assert d != Decision(Action.PROXY, eager.reason, d.rule, src, Mode.GLOBAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.__setattr__("action", Action.DIRECT)
    assert repr(Decision(Action.PROXY, "mode global")) == (
        "Decision(action=<Action.PROXY: 'proxy'>, reason='mode global', rule=None,"
        " source='', mode=None)"
    )


def test_global_and_direct_modes(router: Router) -> None:
    g = Router.from_config(mode=Mode.GLOBAL)
    for host in ("localhost", "192.168.1.1", "baidu.com", "x.local"):
        assert g.decide(host, 80).action is Action.PROXY
    g.mode = Mode.DIRECT  # switched at run time: a plain attribute
    for host in ("google.com", "10.0.0.1"):
        assert g.decide(host, 80) == Decision(
            Action.DIRECT, "mode direct", source="mode", mode=Mode.DIRECT
        )
    assert Router().decide("x", 1).reason == "mode global"  # the default mode is global


def test_decision_cache_follows_default_and_is_bounded() -> None:
    r = Router.from_config(cache_size=4)
    assert r.decide("unlisted.example", 443).action is Action.PROXY
    r.default = Action.DIRECT  # switched at run time: cached default decisions are dropped
    assert r.decide("unlisted.example", 443).action is Action.DIRECT
    for i in range(10):
        r.decide(f"h{i}.example", 443)
    info = r.cache_info()
    assert info is not None and info.currsize == 4 and info.maxsize == 4
    assert Router(cache_size=0).cache_info() is None
    # Decisions with resolved addresses are not cached: the addresses decide.
    ips = Router.from_config(rules=["ip-cidr:203.0.113.0/24=reject"], cache_size=4)
    assert ips.decide("n.example", 443).action is Action.PROXY
    assert ips.decide("n.example", 443, ["203.0.113.1"]).action is Action.REJECT


@pytest.mark.parametrize(
    ("host", "port", "action", "source_starts"),
    [
        # 1. user rules override everything below, local addresses included
        ("192.168.50.7", 80, Action.PROXY, "user rules, config:1"),
        ("adserv.baidu.com", 443, Action.REJECT, "user rules, config:2"),
        ("ads.youtube.com", 443, Action.REJECT, "user rules, config:3"),
        ("x.corp.example", 443, Action.DIRECT, "user rules, config:4"),
        ("www.google.com", 25, Action.REJECT, "user rules, config:5"),
        # 2. local addresses
        ("localhost", 80, Action.DIRECT, "local"),
        ("printer", 80, Action.DIRECT, "local"),
        ("nas.local", 80, Action.DIRECT, "local"),
        ("app.localhost", 80, Action.DIRECT, "local"),
        ("127.8.9.10", 80, Action.DIRECT, "local"),
        ("10.1.2.3", 80, Action.DIRECT, "local"),
        ("172.16.0.1", 80, Action.DIRECT, "local"),
        ("172.31.255.255", 80, Action.DIRECT, "local"),
        ("192.168.1.1", 80, Action.DIRECT, "local"),
        ("169.254.1.1", 80, Action.DIRECT, "local"),
        ("100.64.0.1", 80, Action.DIRECT, "local"),
        ("::1", 80, Action.DIRECT, "local"),
        ("[fe80::1]", 80, Action.DIRECT, "local"),
        ("fd12:3456::1", 80, Action.DIRECT, "local"),
        # 3. direct list before proxy list
        ("www.baidu.com", 443, Action.DIRECT, "direct list, default-direct.txt:"),
        ("google.com.hk", 443, Action.DIRECT, "direct list, routing.direct_add:2"),
        ("direct.example", 443, Action.DIRECT, "direct list, routing.direct_add:1"),
        ("WWW.Google.COM.", 443, Action.PROXY, "proxy list, default-proxy.txt:"),
        ("a.b.c.youtube.com", 443, Action.PROXY, "proxy list, default-proxy.txt:"),
        ("proxied.example", 443, Action.PROXY, "proxy list, routing.proxy_add:1"),
        # 4. the default (proxy); removed default entries fall through to it
        ("github.com", 443, Action.PROXY, "default"),
        ("unlisted.example", 443, Action.PROXY, "default"),
        ("172.32.0.1", 443, Action.PROXY, "default"),
        ("8.8.8.8", 443, Action.PROXY, "default"),
        ("2001:4860::8888", 443, Action.PROXY, "default"),
    ],
)
def test_smart_decision_order(
    router: Router, host: str, port: int, action: Action, source_starts: str
) -> None:
    d = router.decide(host, port)
    assert d.action is action, d
    assert d.source.startswith(source_starts), d
    assert d.mode is Mode.SMART
    assert d.reason.startswith("smart: ")


def test_reason_names_rule_and_list(router: Router) -> None:
    d = router.decide("mail.google.com", 443)
    assert d.reason.startswith("smart: domain-suffix google.com (proxy list, default-proxy.txt:")
    assert d.rule is not None and d.rule.kind is RuleKind.SUFFIX
    j = d.to_json()
    assert j["action"] == "proxy" and j["mode"] == "smart"
    assert isinstance(j["rule"], dict) and j["rule"]["file"] == "default-proxy.txt"


def test_default_direct_and_removed_entries(router: Router) -> None:
    r = Router.from_config(default=Action.DIRECT, default_lists=True, remove=["google.com"])
    assert r.decide("unlisted.example", 443).action is Action.DIRECT
    assert r.decide("google.com", 443).source == "default"
    assert r.decide("youtube.com", 443).action is Action.PROXY
    assert Router.from_config(default_lists=False).decide("google.com", 443).source == "default"


def test_ip_rules_with_resolved_addresses(tmp_path: Path) -> None:
    f = tmp_path / "ips.txt"
    f.write_text("IP-CIDR,203.0.113.0/24\nGEOIP,CN,DIRECT\n")
    r = Router.from_config(
        lists=[ListSpec(f, Action.PROXY, ListFormat.CLASH)],
        default=Action.DIRECT,
        default_lists=False,
        geoip={"198.51.100.1": "CN"}.get,
    )
    assert r.decide("name.example", 443).action is Action.DIRECT
    assert r.decide("name.example", 443, addresses=["203.0.113.9"]).action is Action.PROXY
    assert r.decide("203.0.113.9", 443).action is Action.PROXY
    d = r.decide("other.example", 443, addresses=["198.51.100.1"])
    assert d.action is Action.DIRECT and d.rule is not None and d.rule.kind is RuleKind.GEOIP


def test_list_file_errors_are_collected(tmp_path: Path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text("good.example\nbad domain here\n")
    r = Router.from_config(lists=[ListSpec(f, Action.PROXY, name="my list")], default=Action.DIRECT)
    assert [(e.file, e.line) for e in r.errors] == [(str(f), 2)]
    assert r.decide("x.good.example", 443).source == f"my list, {f}:1"


def test_autoproxy_exceptions_beat_proxy_rules(tmp_path: Path) -> None:
    f = tmp_path / "gfw.txt"
    f.write_text("[AutoProxy 0.2.9]\n||gov.tw\n@@||www.gov.tw\n@@/^exempt\\./\n||exempt.tw\n")
    r = Router.from_config(lists=[ListSpec(f)], default=Action.DIRECT, default_lists=False)
    assert r.decide("a.gov.tw", 443).action is Action.PROXY
    assert r.decide("www.gov.tw", 443).action is Action.DIRECT
    assert r.decide("exempt.tw", 443).action is Action.DIRECT  # regex exception beats suffix


@pytest.mark.parametrize(
    ("text", "kind", "value", "action"),
    [
        ("domain-suffix:example.com=proxy", RuleKind.SUFFIX, "example.com", Action.PROXY),
        ("domain:Example.com=DIRECT", RuleKind.SUFFIX, "example.com", Action.DIRECT),
        ("full:a.example.com=reject", RuleKind.FULL, "a.example.com", Action.REJECT),
        ("ip-cidr:10.0.0.0/8=proxy", RuleKind.IP_CIDR, "10.0.0.0/8", Action.PROXY),
        ("ip:2001:db8::/32=direct", RuleKind.IP_CIDR, "2001:db8::/32", Action.DIRECT),
        ("keyword:ads=reject", RuleKind.KEYWORD, "ads", Action.REJECT),
        ("regex:^a=b$=proxy", RuleKind.REGEX, "^a=b$", Action.PROXY),
        ("geoip:cn=direct", RuleKind.GEOIP, "CN", Action.DIRECT),
        ("port:8000-8100=direct", RuleKind.PORT, "8000-8100", Action.DIRECT),
        ("example.org=direct", RuleKind.SUFFIX, "example.org", Action.DIRECT),
        ("192.168.1.0/24=proxy", RuleKind.IP_CIDR, "192.168.1.0/24", Action.PROXY),
        ("::1=proxy", RuleKind.IP_CIDR, "::1/128", Action.PROXY),
        ("DOMAIN-SUFFIX,google.com,PROXY", RuleKind.SUFFIX, "google.com", Action.PROXY),
        ("IP-CIDR,1.2.3.0/24,DIRECT,no-resolve", RuleKind.IP_CIDR, "1.2.3.0/24", Action.DIRECT),
        ("DOMAIN-KEYWORD,ads,REJECT", RuleKind.KEYWORD, "ads", Action.REJECT),
    ],
)
def test_parse_user_rule(text: str, kind: RuleKind, value: str, action: Action) -> None:
    r = parse_user_rule(text)
    assert (r.kind, r.value, r.action) == (kind, value, action)


@pytest.mark.parametrize(
    "text",
    [
        "example.com",
        "example.com=maybe",
        "domain:bad domain=proxy",
        "DOMAIN-SUFFIX,google.com",
        "DOMAIN-SUFFIX,google.com,MyGroup",
        "PROCESS-NAME,curl,DIRECT",
        "ip-cidr:10.0.0.0/33=proxy",
    ],
)
def test_parse_user_rule_rejects(text: str) -> None:
    with pytest.raises(RuleError):
        parse_user_rule(text)


def test_from_config_bad_user_rule_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Router.from_config(rules=["keyword:ok=proxy", "nonsense"])
    assert info.value.key == "routing.rules[1]"


# -- the fast path against a straightforward reference -----------------------------------------
#
# Router.decide merges the full and suffix rules of all its rule sets into one table and keeps a
# decision cache; the reference below follows the module docstrings literally, rule by rule,
# with ipaddress for every address question.  normalize_host is the specification of the host
# form (tested on its own in test_rules.py), so the reference uses it.


def _ref_ip(h: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        return None


def _ref_domain(rules: list[Rule], h: str) -> Rule | None:
    for r in rules:
        if r.kind is RuleKind.FULL and r.value == h:
            return r
    suffixes = [
        r
        for r in rules
        if r.kind is RuleKind.SUFFIX
        and (
            h.endswith(r.value)
            if r.value.startswith(".")
            else h == r.value or h.endswith("." + r.value)
        )
    ]
    if suffixes:  # the longest value; max() keeps the first added among equals
        return max(suffixes, key=lambda r: len(r.value))
    keywords = [(h.find(r.value), i, r) for i, r in enumerate(rules) if r.kind is RuleKind.KEYWORD]
    found = [k for k in keywords if k[0] >= 0]
    if found:  # leftmost occurrence, then the first added
        return min(found, key=lambda k: (k[0], k[1]))[2]
    for r in rules:
        if r.kind is RuleKind.REGEX and re.search(r.value, h):
            return r
    return None


def _ref_address(
    rules: list[Rule],
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    geoip: dict[str, str],
) -> Rule | None:
    nets = [
        (ipaddress.ip_network(r.value), i, r)
        for i, r in enumerate(rules)
        if r.kind is RuleKind.IP_CIDR
    ]
    inside = [(n.prefixlen, -i, r) for n, i, r in nets if n.version == addr.version and addr in n]
    if inside:  # the longest prefix, then the first added
        return max(inside, key=lambda k: (k[0], k[1]))[2]
    country = geoip.get(str(addr))
    for r in rules:
        if r.kind is RuleKind.GEOIP and country is not None and r.value == country.upper():
            return r
    return None


def _ref_port(rules: list[Rule], port: int) -> Rule | None:
    for r in rules:
        if r.kind is RuleKind.PORT and "-" not in r.value and int(r.value) == port:
            return r
    for r in rules:
        if r.kind is RuleKind.PORT and "-" in r.value:
            lo, hi = r.value.split("-")
            if int(lo) <= port <= int(hi):
                return r
    return None


def _ref_tier(
    rules: list[Rule], h: str, port: int, addresses: list[str], geoip: dict[str, str]
) -> Rule | None:
    ip = _ref_ip(h)
    if ip is None:
        found = _ref_domain(rules, h)
        if found is not None:
            return found
        for a in addresses:
            addr = _ref_ip(normalize_host(a))
            if addr is not None and (found := _ref_address(rules, addr, geoip)) is not None:
                return found
    elif (found := _ref_address(rules, ip, geoip)) is not None:
        return found
    return _ref_port(rules, port)


def _ref_local(h: str) -> str | None:
    ip = _ref_ip(h)
    if ip is not None:
        for net, why in LOCAL_NETWORKS:
            if ip in ipaddress.ip_network(net):
                return f"{net} {why}"
        return None
    if "." not in h:
        return "localhost" if h == "localhost" else "plain host name"
    for suffix in (".localhost", ".local"):
        if h.endswith(suffix):
            return "*" + suffix
    return None


def reference_decide(
    user: list[Rule],
    lists: list[Rule],
    default: Action,
    host: str,
    port: int,
    addresses: list[str],
    geoip: dict[str, str],
) -> Decision:
    h = normalize_host(host)

    def by(rule: Rule) -> Decision:
        src = str(rule.source)
        reason = f"smart: {rule.kind.value} {rule.value} ({src})"
        return Decision(rule.action, reason, rule=rule, source=src, mode=Mode.SMART)

    if (found := _ref_tier(user, h, port, addresses, geoip)) is not None:
        return by(found)
    if (why := _ref_local(h)) is not None:
        return Decision(
            Action.DIRECT, f"smart: local address ({why})", source="local", mode=Mode.SMART
        )
    for action in (Action.REJECT, Action.DIRECT, Action.PROXY):
        tier = [r for r in lists if r.action is action]
        if (found := _ref_tier(tier, h, port, addresses, geoip)) is not None:
            return by(found)
    reason = f"smart: no rule matched, default {default.value}"
    return Decision(default, reason, source="default", mode=Mode.SMART)


# A small vocabulary, so that rules nest (cn, a.cn, .a.cn, b.a.cn) and hosts fall under them
# often; an IDN label, digits and hyphens for the rest.
_label = st.one_of(
    st.sampled_from(["a", "b", "cn"]),
    st.sampled_from(["a", "b", "cn"]),
    st.sampled_from(["x-y", "bücher", "q1", "local", "ads"]),
    st.text(alphabet="ab-1", min_size=1, max_size=2),
)
_domain = st.lists(_label, min_size=1, max_size=3).map(".".join)
_name = st.lists(_label, min_size=1, max_size=5).map(".".join)
_NETS = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "192.168.50.0/24",
    "203.0.113.0/24",
    "203.0.113.9/32",
    "8.8.8.8/32",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "fd00::/8",
    "::/0",
]
_ADDRS = [
    "10.1.2.3",
    "10.2.3.4",
    "192.168.50.7",
    "203.0.113.9",
    "203.0.113.10",
    "8.8.8.8",
    "1.2.3.4",
    "127.0.0.1",
    "2001:db8:1::5",
    "2001:db8:2::5",
    "fd00::1",
    "fe80::1",
    "::1",
]
_GEOIP = {"1.2.3.4": "cn", "8.8.8.8": "US", "2001:db8:2::5": "CN"}


def _make(kind: RuleKind, value: str, action: Action, line: int) -> Rule | None:
    try:
        return make_rule(kind, value, action, Source("test list", "t.txt", line))
    except RuleError:
        return None  # e.g. a generated label "-a": not a rule a list could hold


_OTHER_KINDS = st.one_of(
    st.tuples(st.just(RuleKind.KEYWORD), st.sampled_from(["ad", "cn", "b.c", "xn--", "1", "-"])),
    st.tuples(st.just(RuleKind.IP_CIDR), st.sampled_from(_NETS)),
    st.tuples(st.just(RuleKind.REGEX), st.sampled_from([r"^a\.", r"cn$", r"b+", r"^\d"])),
    st.tuples(st.just(RuleKind.GEOIP), st.sampled_from(["CN", "US"])),
    st.tuples(st.just(RuleKind.PORT), st.sampled_from(["25", "8000-8100"])),
)


def _spell(name: str, upper: bool, dots: int) -> str:
    return (name.upper() if upper else name) + "." * dots


_other_hosts = st.one_of(
    st.builds(_spell, _name, st.booleans(), st.integers(0, 2)),
    st.builds(_spell, st.sampled_from(_ADDRS), st.booleans(), st.just(0)),
    st.sampled_from(_ADDRS).map(lambda a: f"[{a.upper()}]"),
    st.builds(lambda n: f"[{n}]", _name),
    st.ip_addresses().map(str),
    st.sampled_from(["", ".", "a..b", ".a.cn", "fe80::1%eth0", "[::1]", "1.2.3", "01.2.3.4"]),
)


@st.composite
def _scenario(draw: st.DrawFn) -> tuple[list[Rule], list[Rule], str]:
    """User rules, list rules and a host.  Domain rules are mostly label suffixes of one chain
    of labels and the host mostly a name at or under that chain, so that several rules of
    several tiers match one host (full, suffix, subdomain-only, at different lengths)."""
    chain = draw(st.lists(_label, min_size=1, max_size=4))
    tails = [".".join(chain[i:]) for i in range(len(chain))]

    def rules() -> list[Rule]:
        out = []
        for i in range(draw(st.integers(0, 10))):
            choice = draw(st.integers(0, 10))
            if choice < 6:  # a suffix of the chain: domain-suffix, subdomain-only or full
                value = draw(st.sampled_from(tails))
                kind = RuleKind.FULL if choice == 5 else RuleKind.SUFFIX
                if choice == 4:
                    value = "." + value
            elif choice < 7:
                kind, value = RuleKind.SUFFIX, draw(_domain)
            elif choice < 8:  # a keyword the host contains: it competes with the suffixes
                kind, value = RuleKind.KEYWORD, draw(st.sampled_from(chain))
            else:
                kind, value = draw(_OTHER_KINDS)
            rule = _make(kind, value, draw(st.sampled_from(list(Action))), i + 1)
            if rule is not None:
                out.append(rule)
        return out

    user, lists = rules(), rules()
    if draw(st.integers(0, 4)):
        host = ".".join([*draw(st.lists(_label, max_size=2)), draw(st.sampled_from(tails))])
        if "." not in host:  # a plain host name is local: decided before any list
            host = draw(_label) + "." + host
        host = _spell(host, draw(st.integers(0, 5)) == 0, draw(st.integers(0, 5)) == 0)
    else:
        host = draw(_other_hosts)
    return user, lists, host


def _rules_of(*specs: tuple[RuleKind, str, Action]) -> list[Rule]:
    return [
        make_rule(k, v, a, Source("test list", "t.txt", i + 1)) for i, (k, v, a) in enumerate(specs)
    ]


S, F, K, D, P, R = (
    RuleKind.SUFFIX,
    RuleKind.FULL,
    RuleKind.KEYWORD,
    Action.DIRECT,
    Action.PROXY,
    Action.REJECT,
)


@settings(max_examples=500, deadline=None)
# Cases a random draw meets rarely, pinned: inside one tier the longest suffix wins, a full
# rule beats a suffix, a suffix beats a keyword; across tiers the earlier tier wins.
@example(
    scenario=([], _rules_of((S, "cn", D), (S, "a.cn", D)), "x.a.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(
    scenario=([], _rules_of((S, "cn", P), (F, "a.cn", P)), "a.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(
    scenario=([], _rules_of((K, "a", D), (S, "a.cn", D)), "x.a.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(
    scenario=([], _rules_of((K, "a", R), (S, "a.cn", D)), "x.a.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(
    scenario=(_rules_of((S, "cn", P)), _rules_of((F, "x.a.cn", R)), "X.A.CN."),
    default=P,
    port=443,
    addresses=[],
)
@example(scenario=(_rules_of((S, ".a", D)), [], "A.A.-.A"), default=P, port=443, addresses=[])
@example(
    scenario=(_rules_of((S, ".a.cn", D)), _rules_of((S, "a.cn", P)), "a.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(
    scenario=([], _rules_of((S, "xn--bcher-kva.cn", P)), "www.Bücher.cn"),
    default=P,
    port=443,
    addresses=[],
)
@example(scenario=(_rules_of((S, "local", P)), [], "[10.1.2.3]"), default=P, port=443, addresses=[])
@example(scenario=([], _rules_of((S, "1.2.3", P)), "1.2.3"), default=P, port=443, addresses=[])
@given(
    scenario=_scenario(),
    default=st.sampled_from([Action.PROXY, Action.DIRECT]),
    port=st.sampled_from([25, 443, 8080]),
    addresses=st.one_of(st.just([]), st.just([]), st.lists(st.sampled_from(_ADDRS), max_size=2)),
)
def test_decide_equals_reference(
    scenario: tuple[list[Rule], list[Rule], str],
    default: Action,
    port: int,
    addresses: list[str],
) -> None:
    user, lists, host = scenario
    want = reference_decide(user, lists, default, host, port, addresses, _GEOIP)
    for cache_size in (0, 16):
        r = Router(
            Mode.SMART,
            user_rules=RuleSet(user, geoip=_GEOIP.get),
            list_rules=lists,
            default=default,
            geoip=_GEOIP.get,
            cache_size=cache_size,
        )
        assert r.decide(host, port, addresses) == want
        assert r.decide(host, port, addresses) == want  # the second time from the cache
