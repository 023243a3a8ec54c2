"""Generated PAC files evaluated in a real JS engine (pacparser, QuickJS): every answer must
equal the router's own decision mapped to the PAC string."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.routing.lists import ListFormat, load_list_file
from autovpn.routing.pac import pac_answer, proxy_string, render_pac
from autovpn.routing.router import Action, ListSpec, Mode, Router, local_reason
from autovpn.routing.rules import normalize_host, parse_ip

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
        rules=['regex:"\\);alert(1);//</script>\\u2028=proxy', 'keyword:quo"te=reject'],
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
