"""The geoip2fast-backed lookup plugged into a RuleSet."""

from __future__ import annotations

import pytest

from autovpn.routing.rules import Action, RuleKind, RuleSet, Source, make_rule

pytest.importorskip("geoip2fast", reason="geoip2fast not installed")

from autovpn.routing.geoip import geoip2fast_lookup  # noqa: E402


def test_geoip2fast_lookup() -> None:
    lookup = geoip2fast_lookup()
    assert lookup("114.114.114.114") == "CN"
    assert lookup("8.8.8.8") == "US"
    assert lookup("10.0.0.1") is None
    assert lookup("not an ip") is None


def test_geoip_rule_with_database() -> None:
    rs = RuleSet(
        [make_rule(RuleKind.GEOIP, "cn", Action.DIRECT, Source("t"))], geoip=geoip2fast_lookup()
    )
    r = rs.match("114.114.114.114")
    assert r is not None and r.action is Action.DIRECT
    assert rs.match("8.8.8.8") is None
    assert rs.match("example.com", 443, addresses=["114.114.114.114"]) is not None
