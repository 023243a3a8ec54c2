"""List importers: inline samples per format, bad lines with file:line, the real snapshots."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.routing.lists import (
    ListError,
    ListFormat,
    detect_format,
    load_default_lists,
    load_list_file,
    load_v2fly,
    parse_autoproxy,
    parse_clash,
    parse_dnsmasq,
    parse_list,
    parse_plain,
    parse_v2fly,
)
from autovpn.routing.rules import Action, Rule, RuleKind, RuleSet

from ._shared import shared_file


def summary(rules: list[Rule]) -> list[tuple[str, str, str]]:
    return [(r.kind.value, r.value, r.action.value) for r in rules]


AUTOPROXY = """[AutoProxy 0.2.9]
! a comment
||google.com
|http://85.17.73.31/
|https://www.Example.org/path
.blogspot.com
twitter.com/foo
@@||www.gov.tw
/^https?:\\/\\/[^\\/]+blogspot\\.(.*)/
|http://*.pimg.tw/
||cdn*.i-scmp.com
|
||bad..domain
"""


def test_autoproxy_plain() -> None:
    res = parse_autoproxy(AUTOPROXY, file="gfw.txt")
    assert summary(res.rules) == [
        ("domain-suffix", "google.com", "proxy"),
        ("ip-cidr", "85.17.73.31/32", "proxy"),
        ("full", "www.example.org", "proxy"),
        ("domain-suffix", "blogspot.com", "proxy"),
        ("domain-suffix", "twitter.com", "proxy"),
        ("domain-suffix", "www.gov.tw", "direct"),
        ("regex", "^[^\\/]+blogspot\\.(.*)", "proxy"),
        ("regex", "^.*\\.pimg\\.tw$", "proxy"),
        ("regex", "(^|\\.)cdn.*\\.i\\-scmp\\.com$", "proxy"),
    ]
    assert [(e.file, e.line) for e in res.errors] == [("gfw.txt", 12), ("gfw.txt", 13)]
    assert str(res.errors[0]).startswith("gfw.txt:12: ")
    rs = RuleSet(res.rules)
    assert rs.match("x.pimg.tw") is not None
    assert rs.match("foo.blogspot.com.br") is not None


def test_autoproxy_base64_is_decoded_and_detected() -> None:
    encoded = base64.b64encode(AUTOPROXY.encode()).decode()
    wrapped = "\n".join(encoded[i : i + 64] for i in range(0, len(encoded), 64))
    assert detect_format(wrapped) is ListFormat.AUTOPROXY
    assert summary(parse_list(wrapped).rules) == summary(parse_autoproxy(AUTOPROXY).rules)


def test_v2fly_inline_with_includes_and_attrs(tmp_path: Path) -> None:
    (tmp_path / "base").write_text(
        "# comment\n"
        "example.com\n"
        "domain:example.net @cn\n"
        "full:www.example.org @ads @cn\n"
        "keyword:tracker @ads\n"
        "regexp:^cdn[0-9]+\\.example\\.io$\n"
        "bogus:thing\n"
        "example.info trailing-garbage\n"
    )
    (tmp_path / "top").write_text("include:base @cn\ninclude:missing\ntop.example\n")
    (tmp_path / "loop").write_text("include:loop\n")
    res = load_v2fly(tmp_path, "base")
    assert summary(res.rules) == [
        ("domain-suffix", "example.com", "proxy"),
        ("domain-suffix", "example.net", "proxy"),
        ("full", "www.example.org", "proxy"),
        ("keyword", "tracker", "proxy"),
        ("regex", "^cdn[0-9]+\\.example\\.io$", "proxy"),
    ]
    base = str(tmp_path / "base")
    assert [(e.file, e.line) for e in res.errors] == [(base, 7), (base, 8)]
    assert [r.value for r in load_v2fly(tmp_path, "base@cn").rules] == [
        "example.net",
        "www.example.org",
    ]
    assert [r.value for r in load_v2fly(tmp_path, "base@!cn@!ads").rules] == [
        "example.com",
        "^cdn[0-9]+\\.example\\.io$",
    ]
    top = load_v2fly(tmp_path, "top", action=Action.DIRECT)
    assert [r.value for r in top.rules] == ["example.net", "www.example.org", "top.example"]
    assert all(r.action is Action.DIRECT for r in top.rules)
    assert any("include:missing" in e.reason for e in top.errors)
    assert any("cycle" in e.reason for e in load_v2fly(tmp_path, "loop").errors)
    assert load_v2fly(tmp_path, "nope").errors[0].line == 0
    assert parse_v2fly("include:x\n").errors[0].reason.startswith("include:x needs")


CLASH_YAML = """# comment
payload:
  - '+.google.com'
  - ".github.com"
  - "*.example.org"
  - 'exact.example.net'
  - DOMAIN-KEYWORD,tracker
  - "IP-CIDR,10.0.0.0/8,no-resolve"
  - 'PROCESS-NAME,curl'
"""


def test_clash_yaml_domain_and_classical() -> None:
    res = parse_clash(CLASH_YAML, file="p.yaml")
    assert summary(res.rules) == [
        ("domain-suffix", "google.com", "proxy"),
        ("domain-suffix", ".github.com", "proxy"),
        ("regex", "^[^.]+\\.example\\.org$", "proxy"),
        ("full", "exact.example.net", "proxy"),
        ("keyword", "tracker", "proxy"),
        ("ip-cidr", "10.0.0.0/8", "proxy"),
    ]
    assert [(e.file, e.line) for e in res.errors] == [("p.yaml", 9)]
    assert detect_format(CLASH_YAML) is ListFormat.CLASH


def test_clash_classical_text() -> None:
    text = (
        "DOMAIN,a.example.com\n"
        "DOMAIN-SUFFIX,example.com,DIRECT\n"
        "DOMAIN-KEYWORD,ads,REJECT\n"
        "DOMAIN-REGEX,^x(a|b)\\.com$\n"
        "IP-CIDR,192.0.2.0/24,no-resolve\n"
        "IP-CIDR6,2001:db8::/32\n"
        "GEOIP,CN,DIRECT\n"
        "DST-PORT,8080\n"
        "DOMAIN-SUFFIX,example.org,SomeGroup\n"
        "IP-CIDR,999.0.0.0/8\n"
        "MATCH,DIRECT\n"
    )
    assert detect_format(text) is ListFormat.CLASH
    res = parse_clash(text, file="c.txt")
    assert summary(res.rules) == [
        ("full", "a.example.com", "proxy"),
        ("domain-suffix", "example.com", "direct"),
        ("keyword", "ads", "reject"),
        ("regex", "^x(a|b)\\.com$", "proxy"),
        ("ip-cidr", "192.0.2.0/24", "proxy"),
        ("ip-cidr", "2001:db8::/32", "proxy"),
        ("geoip", "CN", "direct"),
        ("port", "8080", "proxy"),
    ]
    assert [e.line for e in res.errors] == [9, 10, 11]


def test_dnsmasq() -> None:
    text = (
        "# comment\n"
        "server=/example.cn/114.114.114.114\n"
        "server=/a.cn/b.cn/119.29.29.29\n"
        "ipset=/example.cn/chnroute\n"
        "nftset=/example.cn/4#inet#fw4#set\n"
        "address=/ads.example/0.0.0.0\n"
        "server=bad\n"
        "cache-size=100\n"
        "no equals sign\n"
    )
    assert detect_format(text) is ListFormat.DNSMASQ
    res = parse_dnsmasq(text, file="d.conf")
    assert [r.value for r in res.rules] == ["example.cn", "a.cn", "b.cn", "ads.example"]
    assert all(r.action is Action.DIRECT for r in res.rules)
    assert [n.line for n in res.notes] == [4, 5]
    assert [e.line for e in res.errors] == [7, 8, 9]


def test_plain() -> None:
    text = "# header\nexample.com  # inline\n*.Example.org\n.x.io\n10.0.0.0/8\n::1\nbad domain\n"
    assert detect_format(text) is ListFormat.PLAIN
    res = parse_plain(text, file="p.txt")
    assert summary(res.rules) == [
        ("domain-suffix", "example.com", "proxy"),
        ("domain-suffix", "example.org", "proxy"),
        ("domain-suffix", "x.io", "proxy"),
        ("ip-cidr", "10.0.0.0/8", "proxy"),
        ("ip-cidr", "::1/128", "proxy"),
    ]
    assert res.errors == [ListError("p.txt", 7, "expected one domain per line, got 'bad domain'")]


def test_detect_v2fly_and_override() -> None:
    text = "full:a.example\nb.example @cn\n"
    assert detect_format(text) is ListFormat.V2FLY
    assert [r.kind for r in parse_list(text).rules] == [RuleKind.FULL, RuleKind.SUFFIX]
    # an explicit format wins over detection
    assert parse_list(text, fmt=ListFormat.PLAIN).errors


def test_load_list_file_unreadable_and_named(tmp_path: Path) -> None:
    res = load_list_file(tmp_path / "absent.txt")
    assert len(res.errors) == 1 and res.errors[0].line == 0
    f = tmp_path / "mine.txt"
    f.write_text("example.com\n")
    r = load_list_file(f, action=Action.DIRECT).rules[0]
    assert str(r.source) == f"direct list, {f}:1"


def test_default_lists() -> None:
    d = load_default_lists()
    assert d.proxy.errors == [] and d.direct.errors == []
    proxy = {r.value for r in d.proxy.rules}
    direct = {r.value for r in d.direct.rules}
    assert len(proxy) == len(d.proxy.rules) >= 290
    assert len(direct) >= 50
    assert not proxy & direct
    for must in (
        "google.com",
        "youtube.com",
        "gmail.com",
        "instagram.com",
        "facebook.com",
        "twitter.com",
        "x.com",
        "telegram.org",
        "whatsapp.com",
        "openai.com",
        "chatgpt.com",
        "anthropic.com",
        "claude.ai",
        "huggingface.co",
        "shopify.com",
        "amazon.com",
        "github.com",
        "gitlab.com",
        "npmjs.com",
        "pypi.org",
        "docker.io",
        "stackoverflow.com",
        "nytimes.com",
    ):
        assert must in proxy, must
    for must in ("baidu.com", "taobao.com", "tmall.com", "qq.com", "weixin.qq.com", "alipay.com"):
        assert must in direct, must
    for must in ("jd.com", "bilibili.com", "163.com", "alicdn.com", "bdstatic.com", "gtimg.com"):
        assert must in direct, must
    assert all(r.source.file == "default-proxy.txt" and r.source.line for r in d.proxy.rules)


# -- the real snapshots in ../shared/data ----------------------------------------------------


def test_real_gfwlist() -> None:
    res = load_list_file(shared_file("gfwlist/gfwlist.txt"))
    counts = Counter((r.kind, r.action) for r in res.rules)
    assert len(res.rules) > 4000
    assert counts[(RuleKind.SUFFIX, Action.PROXY)] > 3900
    assert counts[(RuleKind.SUFFIX, Action.DIRECT)] >= 25  # @@ exceptions
    assert len(res.errors) <= 5, res.errors  # the snapshot has one regex without closing '/'
    rs = RuleSet(res.rules)
    hit = rs.match("www.blogjav.net")
    assert hit is not None and hit.action is Action.PROXY


def test_real_dnsmasq_china_list() -> None:
    path = shared_file("dnsmasq-china-list/accelerated-domains.china.conf")
    res = load_list_file(path, action=Action.DIRECT)
    assert res.errors == []
    assert 100_000 < len(res.rules) < 130_000
    rs = RuleSet(res.rules)
    assert rs.match("www.baidu.com") is not None
    assert rs.match("www.google.com") is None


def test_real_v2fly() -> None:
    data = shared_file("v2fly-domain-list-community/data")
    google = load_v2fly(data, "google")
    assert google.errors == [] and len(google.rules) > 500
    assert RuleSet(google.rules).match("mail.google.com") is not None
    cn = load_v2fly(data, "geolocation-cn")
    assert cn.errors == [] and len(cn.rules) > 3000
    not_cn = load_v2fly(data, "geolocation-!cn@!cn")
    assert not_cn.errors == [] and len(not_cn.rules) > 10_000
    apple_cn = load_v2fly(data, "apple@cn")
    assert 0 < len(apple_cn.rules) < len(load_v2fly(data, "apple").rules)


# -- fuzz --------------------------------------------------------------------------------------

line_chars = st.sampled_from(list("abz09.-_|@/*:!#=+,[]^$() \t") + ["\u00e9", "\u4e2d"])
texts = st.lists(st.text(alphabet=line_chars, max_size=30), max_size=12).map("\n".join)
prefixes = st.sampled_from(
    [
        "",
        "||",
        "|http://",
        "@@",
        "full:",
        "keyword:",
        "regexp:",
        "include:",
        "payload:\n- ",
        "server=/",
        "DOMAIN-SUFFIX,",
        "IP-CIDR,",
        "+.",
        "[AutoProxy]\n",
    ]
)


@settings(max_examples=150, deadline=None)
@given(prefix=prefixes, text=texts, fmt=st.sampled_from([None, *ListFormat]))
def test_importers_never_raise(prefix: str, text: str, fmt: ListFormat | None) -> None:
    res = parse_list(prefix + text, fmt=fmt, file="fuzz")
    for err in res.errors:
        assert err.file == "fuzz" and err.line >= 0
    RuleSet(res.rules).match("example.com", 443)
