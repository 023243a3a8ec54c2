"""Router.decide: modes, the smart decision order, from_config and user rule syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from autovpn.errors import ConfigError
from autovpn.routing.lists import ListFormat
from autovpn.routing.router import (
    Action,
    Decision,
    ListSpec,
    Mode,
    Router,
    parse_user_rule,
)
from autovpn.routing.rules import RuleError, RuleKind


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
