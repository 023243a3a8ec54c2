"""Generated PAC files evaluated in a real JS engine (pacparser, QuickJS): every answer must
equal the router's own decision mapped to the PAC string."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.routing.lists import ListFormat, load_list_file
from autovpn.routing.pac import (
    js_regex,
    pac_answer,
    proxy_string,
    render_pac,
    unportable_regexes,
)
from autovpn.routing.router import Action, ListSpec, Mode, Router, local_reason
from autovpn.routing.rules import RuleError, compile_regex, normalize_host, parse_ip

from ._shared import shared_file

pacparser = pytest.importorskip("pacparser", reason="pacparser not installed")

HTTP_PORT, SOCKS_PORT = 18080, 11080
PROXY = proxy_string(HTTP_PORT, SOCKS_PORT)


class _Pac:
    """pacparser holds one PAC per process: load a new one only when the text changes."""

    loaded: str | None = None

    def load(self, js: str) -> None:
        if js == self.loaded:
            return
        self.unload()
        pacparser.init()
        pacparser.parse_pac_string(js)
        self.loaded = js

    def unload(self) -> None:
        if self.loaded is not None:
            pacparser.cleanup()
            self.loaded = None

    def ask(self, host: str, port: int) -> str:
        url_host = f"[{host.strip('[]')}]" if ":" in host else host
        scheme = "https" if port == 443 else "http"
        url = f"{scheme}://{url_host}/" if port in (80, 443) else f"http://{url_host}:{port}/"
        return str(pacparser.find_proxy(url, host))


@pytest.fixture(scope="module")
def pac() -> Iterator[_Pac]:
    p = _Pac()
    yield p
    p.unload()


LIST = """\
payload:
  - DOMAIN-KEYWORD,tracker
  - DOMAIN-KEYWORD,track
  - DOMAIN-REGEX,^cdn[0-9]+\\.media\\.example$
  - DOMAIN,exact.example
  - DOMAIN-SUFFIX,proxied.example
  - '.subonly.example'
  - IP-CIDR,203.0.113.0/24
  - IP-CIDR,198.51.100.7/32
  - IP-CIDR,0.0.0.0/1
  - IP-CIDR6,2001:db8:abcd::/47
  - IP-CIDR6,2001:db8::/33
  - DST-PORT,8000-8100
"""

DIRECT_LIST = """\
payload:
  - DOMAIN-SUFFIX,direct.proxied.example
  - DOMAIN-KEYWORD,local-cdn
  - IP-CIDR,203.0.113.128/25
  - IP-CIDR6,2001:db8:abcd:8000::/49
  - DOMAIN-SUFFIX,__proto__
  - DOMAIN,constructor.example
"""


def _router(tmp: Path, default: Action) -> Router:
    (tmp / "proxy.yaml").write_text(LIST)
    (tmp / "direct.yaml").write_text(DIRECT_LIST)
    (tmp / "reject.txt").write_text("blocked.example\n10.99.0.0/16\n")
    return Router.from_config(
        mode=Mode.SMART,
        default=default,
        rules=[
            "ip-cidr:192.168.50.0/24=proxy",
            "keyword:adserv=reject",
            "full:override.google.com=direct",
            "regex:^x[0-9]\\.user\\.example$=proxy",
            "ip-cidr:fd00:1::/32=proxy",
            "port:2525=reject",
            "domain:home.lan=proxy",
        ],
        lists=[
            ListSpec(tmp / "proxy.yaml", Action.PROXY, ListFormat.CLASH),
            ListSpec(tmp / "direct.yaml", Action.DIRECT, ListFormat.CLASH),
            ListSpec(tmp / "reject.txt", Action.REJECT, ListFormat.PLAIN),
        ],
    )


@pytest.fixture(
    scope="module", params=[Action.PROXY, Action.DIRECT], ids=["dflt-proxy", "dflt-direct"]
)
def router(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Router:
    r = _router(tmp_path_factory.mktemp("lists"), request.param)
    assert r.errors == []
    return r


HOSTS = [
    # local addresses and names
    "localhost",
    "LOCALHOST",
    "printer",
    "nas.local",
    "NAS.LOCAL.",
    "app.localhost",
    "127.0.0.1",
    "127.255.0.9",
    "10.0.0.1",
    "10.99.1.1",
    "172.16.5.4",
    "172.31.0.1",
    "172.32.0.1",
    "192.168.1.1",
    "192.168.50.9",
    "169.254.10.10",
    "100.64.0.1",
    "100.128.0.1",
    "::1",
    "[::1]",
    "fe80::1",
    "FE80::abcd:1",
    "[fe80::1%eth0]",
    "fc00::1",
    "fd12::1",
    "fd00:1::5",
    "fe00::1",
    "0.0.0.0",
    "255.255.255.255",
    # IPv4/IPv6 literals against IP rules
    "203.0.113.5",
    "203.0.113.200",
    "198.51.100.7",
    "198.51.100.8",
    "8.8.8.8",
    "1.1.1.1",
    "128.0.0.1",
    "01.2.3.4",
    "256.1.1.1",
    "1.2.3",
    "2001:db8::1",
    "2001:db8:abcd::1",
    "2001:db8:abcd:8000::1",
    "2001:db8:abce::1",
    "2001:db8:8000::1",
    "2001:4860::8888",
    "::ffff:203.0.113.5",
    "::ffff:10.0.0.1",
    "1:2:3:4:5:6:7::",
    "1::2:3:4:5:6:7",
    "::",
    "12345::1",
    "a:b",
    # names: lists, precedence, case, trailing dots, deep subdomains
    "google.com",
    "WWW.GOOGLE.COM",
    "www.google.com.",
    "a.b.c.d.e.f.mail.google.com",
    "override.google.com",
    "x.override.google.com",
    "youtube.com",
    "i.ytimg.com",
    "www.baidu.com",
    "baidu.com.",
    "img.alicdn.com",
    "googleX.com",
    "notgoogle.com",
    "adserv.google.com",
    "my-adserv.baidu.com",
    "tracker.example",
    "tracking.example",
    "mytracker.example",
    "cdn12.media.example",
    "cdnx.media.example",
    "a.cdn1.media.example",
    "exact.example",
    "www.exact.example",
    "proxied.example",
    "deep.x.y.proxied.example",
    "direct.proxied.example",
    "a.direct.proxied.example",
    "subonly.example",
    "w.subonly.example",
    "local-cdn.example",
    "blocked.example",
    "x.blocked.example",
    "x1.user.example",
    "x12.user.example",
    "home.lan",
    "nas.home.lan",
    "__proto__",
    "a.__proto__",
    "constructor",
    "constructor.example",
    "toString.example",
    "hasownproperty.com",
    "unlisted.example",
    "xn--bcher-kva.example",
    "under_score.example",
    "-weird-.example",
    "a..b.example",
]
PORTS = [80, 443, 2525, 8080, 8443]


def expected(router: Router, mode: Mode, host: str, port: int) -> str:
    if mode is Mode.DIRECT:
        return "DIRECT"
    if mode is Mode.GLOBAL:
        h = normalize_host(host)
        return "DIRECT" if local_reason(h, parse_ip(h)) is not None else PROXY
    return pac_answer(router.decide(host, port).action, PROXY)


@pytest.mark.parametrize("mode", list(Mode))
def test_pac_equals_router_for_corpus(pac: _Pac, router: Router, mode: Mode) -> None:
    pac.load(render_pac(router, mode, http_port=HTTP_PORT, socks_port=SOCKS_PORT))
    wrong = [
        (host, port, got, want)
        for host in HOSTS
        for port in PORTS
        if (got := pac.ask(host, port)) != (want := expected(router, mode, host, port))
    ]
    assert wrong == []


def test_corpus_covers_every_outcome(router: Router) -> None:
    sources = {router.decide(h, p).source.split(",")[0] for h in HOSTS for p in PORTS}
    assert {"user rules", "local", "proxy list", "direct list", "reject list", "default"} <= sources


def test_global_pac_shape_and_fallback(pac: _Pac, router: Router) -> None:
    js = render_pac(router, Mode.GLOBAL, http_port=1, socks_port=2)
    pac.load(js)
    assert pac.ask("example.com", 443) == "PROXY 127.0.0.1:1; SOCKS5 127.0.0.1:2"
    assert pac.ask("192.168.0.1", 80) == "DIRECT"
    js = render_pac(router, Mode.GLOBAL, http_port=1, socks_port=2, allow_direct_fallback=True)
    pac.load(js)
    assert pac.ask("example.com", 443) == "PROXY 127.0.0.1:1; SOCKS5 127.0.0.1:2; DIRECT"
    assert "dnsResolve" not in js and "isInNet" not in js and "shExpMatch" not in js


def test_direct_pac(pac: _Pac, router: Router) -> None:
    pac.load(render_pac(router, Mode.DIRECT, http_port=1, socks_port=2))
    assert pac.ask("google.com", 443) == "DIRECT"


def test_pac_uses_router_mode_by_default(router: Router) -> None:
    assert "mode smart" in render_pac(router, http_port=1, socks_port=2)


def test_user_strings_are_json_escaped(pac: _Pac, tmp_path: Path) -> None:
    r = Router.from_config(
        rules=['regex:"\\);alert(1);//\u2028</script>=proxy', 'keyword:quo"te=reject'],
        default=Action.DIRECT,
        default_lists=False,
    )
    js = render_pac(r, Mode.SMART, http_port=1, socks_port=2)
    assert "\u2028" not in js and "</script>" not in js
    pac.load(js)
    assert pac.ask("example.com", 443) == "DIRECT"
    assert pac.ask('a"b', 443) == "DIRECT"


domain_labels = st.text(alphabet="abcdefgoqlxyz0189-", min_size=1, max_size=8)
suffixes = st.sampled_from(
    [
        "google.com",
        "baidu.com",
        "proxied.example",
        "subonly.example",
        "media.example",
        "local",
        "localhost",
        "example",
        "com",
        "cn",
        "home.lan",
        "user.example",
    ]
)
names = st.builds(
    lambda labels, sfx, upper, dot: (
        (".".join([*labels, sfx]).upper() if upper else ".".join([*labels, sfx]))
        + ("." if dot else "")
    ),
    st.lists(domain_labels, min_size=0, max_size=4),
    suffixes,
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(host=names, port=st.sampled_from(PORTS + [8050]))
def test_pac_equals_router_random_names(pac: _Pac, host: str, port: int) -> None:
    r = _ROUTER_CACHE.get("r")
    if r is None:
        r = _ROUTER_CACHE["r"] = _router(Path(_tmpdir()), Action.PROXY)
    pac.load(render_pac(r, Mode.SMART, http_port=HTTP_PORT, socks_port=SOCKS_PORT))
    assert pac.ask(host, port) == expected(r, Mode.SMART, host, port)


_ROUTER_CACHE: dict[str, Router] = {}


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="autovpn-pac-")


def test_pac_with_real_gfwlist(pac: _Pac) -> None:
    path = shared_file("gfwlist/gfwlist.txt")
    r = Router.from_config(lists=[ListSpec(path)], default=Action.DIRECT, default_lists=False)
    pac.load(render_pac(r, Mode.SMART, http_port=HTTP_PORT, socks_port=SOCKS_PORT))
    rules = load_list_file(path).rules
    rng = random.Random(7)
    hosts = ["foo.blogspot.com.br", "x.pimg.tw", "www.gov.tw", "a.b.google.com", "baidu.com"]
    for rule in rng.sample(rules, 300):
        if rule.kind.value in ("domain-suffix", "full"):
            hosts += [rule.value.lstrip("."), "www." + rule.value.lstrip(".")]
    wrong = [
        (h, got, want)
        for h in hosts
        if (got := pac.ask(h, 443)) != (want := expected(r, Mode.SMART, h, 443))
    ]
    assert wrong == []


# -- regex rules: RE2 in the engine, JavaScript in the browser -----------------------------------

# Pieces of RE2 patterns over a host name's alphabet, with the syntax the two dialects share and
# the spellings js_regex rewrites (\A, \z, \x{..}, named groups, a lone "]" or "}").
_PIECES = (
    "a b z 0 . - \\. \\d \\D \\w \\W \\s \\b \\B ^ $ \\A \\z"
    " [a-c] [^a.] []a] [^]a] [\\d-z] [.-] [\\]a] [^\\w] [\\x61-\\x{7a}]"
    " ( ) (?: (?P<g> (?<h> | * + ? *? +? ?? {1,2} {2} {0,} {1,2}? ] }"
    " \\x61 \\x{62} \\- \\/ \\^"
).split()
_HOST_CHARS = "abz0.-_"


def _random_patterns(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(RE2 pattern, its JavaScript spelling) pairs: random pieces that RE2 compiles and
    js_regex can spell."""
    out: list[tuple[str, str]] = []
    while len(out) < count:
        pattern = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 7)))
        try:
            compile_regex(pattern)
        except RuleError:
            continue
        js = js_regex(pattern)
        if js is not None:
            out.append((pattern, js))
    return out


def test_portable_regexes_mean_the_same_in_javascript(pac: _Pac) -> None:
    rng = random.Random(15)
    pairs = _random_patterns(rng, 400)
    hosts = sorted(
        {"".join(rng.choice(_HOST_CHARS) for _ in range(rng.randint(1, 9))) for _ in range(300)}
        | {"a", "b.z", "ab", "0", "-a-", "a.b.z0"}
    )
    # One PAC answers, for a host, one digit per pattern: whether its RegExp matches.
    js = (
        "var R = " + json.dumps([j for _, j in pairs]) + ".map(function (p) {\n"
        "  return new RegExp(p);\n});\n"
        "function FindProxyForURL(url, host) {\n"
        "  var s = '';\n"
        "  for (var i = 0; i < R.length; i++) s += R[i].test(host) ? '1' : '0';\n"
        "  return s;\n}\n"
    )
    pac.load(js)
    compiled = [compile_regex(p) for p, _ in pairs]
    wrong = []
    for host in hosts:
        got = pac.ask(host, 80)
        want = "".join("1" if r.search(host) else "0" for r in compiled)
        wrong += [(pairs[i], host, got[i]) for i in range(len(pairs)) if got[i] != want[i]]
    assert wrong == []


@pytest.mark.parametrize(
    "pattern",
    [
        "(?i)^ADS\\.",  # flags
        "^\\pL+\\.example$",  # Unicode classes
        "^[[:alpha:]]+\\.example$",  # POSIX names
        "^[]a]\\.example$",  # a leading "]" in a class
        "^\\Qa.b\\E\\.example$",  # quoting
        "^x{,2}\\.example$",  # a literal "{" in RE2
        "^x{4294967296}\\.example$",  # a count RE2 cannot hold: literal text there
        "^\\b*x\\.example$",  # a repeated assertion
        "^\U0001f600?x\\.example$",  # past U+FFFF: two UTF-16 units in JavaScript
    ],
)
def test_regexes_without_a_javascript_spelling_are_named(pattern: str) -> None:
    compile_regex(pattern)  # RE2 takes each
    assert js_regex(pattern) is None


def test_unportable_regex_rules_in_the_pac(pac: _Pac, tmp_path: Path) -> None:
    lst = tmp_path / "regex.yaml"
    lst.write_text(
        "payload:\n"
        "  - DOMAIN-REGEX,(?i)^ADS[0-9]*\\.,DIRECT\n"  # DIRECT: left out
        "  - DOMAIN-REGEX,^cdn[0-9]+\\.media\\.example$\n"  # portable: evaluated
        "  - DOMAIN-SUFFIX,listed.example\n"
        "  - DOMAIN-REGEX,^\\pL+\\.tracker\\.example$\n"  # PROXY: hosts reaching it -> engine
        "  - DOMAIN-REGEX,^after\\.example$\n"
    )
    r = Router.from_config(
        lists=[ListSpec(lst, Action.PROXY, ListFormat.CLASH)],
        rules=["regex:(?i)^USER\\.=reject", "regex:^(?i:direct)\\.example$=direct"],
        default=Action.DIRECT,
        default_lists=False,
    )
    assert r.errors == []
    unportable = unportable_regexes(r)
    assert [rule.value for rule in unportable] == [
        "(?i)^USER\\.",
        "^(?i:direct)\\.example$",
        "(?i)^ADS[0-9]*\\.",
        "^\\pL+\\.tracker\\.example$",
    ]
    js = render_pac(r, Mode.SMART, http_port=HTTP_PORT, socks_port=SOCKS_PORT)
    head = js.split("var ANSWER", 1)[0]
    assert head.count("\n// regex ") == 4
    assert f"({json.dumps(str(unportable[3].source))}): no JavaScript equivalent;" in head
    pac.load(js)
    # The user's REJECT rule has no spelling: every host goes to the engine, which decides.
    for host in ("user.example", "ads1.example", "cdn1.media.example", "unlisted.example"):
        assert pac.ask(host, 443) == PROXY, host
    # Without it, the list's portable rules are evaluated in the browser; its unportable PROXY
    # rule sends what reaches it to the engine, its unportable DIRECT rule is left out.
    r = Router.from_config(
        lists=[ListSpec(lst, Action.PROXY, ListFormat.CLASH)],
        default=Action.DIRECT,
        default_lists=False,
    )
    pac.load(render_pac(r, Mode.SMART, http_port=HTTP_PORT, socks_port=SOCKS_PORT))
    assert pac.ask("cdn1.media.example", 443) == PROXY
    assert r.decide("cdn1.media.example", 443).action is Action.PROXY
    assert pac.ask("www.listed.example", 443) == PROXY
    assert pac.ask("ads1.listed.example", 443) == PROXY  # suffix first, as the engine
    # ads1.example: the engine's DIRECT regex; the PAC lets it reach the match-all: the engine
    # then decides DIRECT itself.
    assert r.decide("ads1.example", 443).action is Action.DIRECT
    assert pac.ask("ads1.example", 443) == PROXY
    # unlisted: DIRECT in the engine, sent to the engine by the PAC (never DIRECT where the
    # engine would proxy: the other way round is what is avoided).
    assert pac.ask("unlisted.example", 443) == PROXY
    assert pac.ask("wx.tracker.example", 443) == PROXY
    assert r.decide("wx.tracker.example", 443).action is Action.PROXY
