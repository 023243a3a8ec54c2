"""The control API's request guard as a pure function: Host (DNS rebinding), Origin and
Fetch Metadata (CSRF), and the bearer token of state-changing requests."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from autovpn.monitor.guard import ControlPolicy, Refusal, check_request
from autovpn.net import parse_host

PORT = 9090
TOKEN = "t0ken-" + "x" * 37
POLICY = ControlPolicy.build(PORT, TOKEN, token_file="/state/control.token")
BEARER = f"Bearer {TOKEN}"


def check(
    method: str = "GET", path: str = "/status", policy: ControlPolicy = POLICY, **headers: str
) -> Refusal | None:
    fields = {"host": f"127.0.0.1:{PORT}"}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    return check_request(policy, method, path, fields)


def status(refusal: Refusal | None) -> int:
    return 200 if refusal is None else refusal.status.value


# -- Host -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        f"127.0.0.1:{PORT}",
        f"127.0.0.2:{PORT}",
        f"127.255.255.254:{PORT}",
        f"localhost:{PORT}",
        f"LOCALHOST:{PORT}",
        f"[::1]:{PORT}",
        f"[0:0:0:0:0:0:0:1]:{PORT}",
    ],
)
def test_literal_loopback_hosts_with_the_bound_port_pass(host: str) -> None:
    for path in ("/status", "/proxy.pac", "/route"):
        assert check(path=path, host=host) is None


@pytest.mark.parametrize(
    "host",
    [
        "127.evil.com",
        "127.0.0.1.nip.io",
        "127.0.0.1.evil.com",
        "localhost.evil",
        "localhost.",
        "127.0.0.1.",
        "evil.example",
        "sub.localhost",
        "10.0.0.1",
        "0.0.0.0",
        "[::]",
        "[::ffff:7f00:1]",  # IPv4-mapped 127.0.0.1: not what a browser sends for a loopback URL
    ],
)
def test_other_names_are_refused_on_every_route(host: str) -> None:
    for path in ("/status", "/proxy.pac", "/smart.pac", "/mode", "/route"):
        for method in ("GET", "POST"):
            r = check(method, path, host=f"{host}:{PORT}", authorization=BEARER)
            assert r is not None and r.status is HTTPStatus.MISDIRECTED_REQUEST, (host, path)
            assert "\n" not in r.reason and host in r.reason


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:9091",  # wrong port
        "127.0.0.1",  # no port: a browser's port 80
        "localhost:80",
        "[::1]",
        "[::1]:9091",
    ],
)
def test_a_loopback_host_with_another_port_is_refused(host: str) -> None:
    r = check(host=host)
    assert r is not None and r.status is HTTPStatus.MISDIRECTED_REQUEST
    assert f"port {PORT}" in r.reason


def test_no_port_means_80() -> None:
    on_80 = ControlPolicy.build(80, TOKEN)
    assert check(policy=on_80, host="127.0.0.1") is None
    assert check(policy=on_80, host="localhost:80") is None
    assert status(check(policy=on_80, host="127.0.0.1:9090")) == 421


@pytest.mark.parametrize(
    "host",
    [
        "",
        "::1",
        f"::1:{PORT}",
        "[::1",
        "[::1]x",
        "[evil]:9090",
        "127.0.0.1:",
        "127.0.0.1:+90",
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "a b:9090",
        "user@127.0.0.1:9090",
        "127.0.0.1:9090/x",
    ],
)
def test_malformed_hosts_are_bad_requests(host: str) -> None:
    assert status(check(host=host)) == 400


def test_a_missing_host_is_refused() -> None:
    assert status(check_request(POLICY, "GET", "/status", {})) == 400


def test_parse_host() -> None:
    assert parse_host("[::1]:9090") == ("::1", 9090)
    assert parse_host("[0::1]") == ("::1", None)
    assert parse_host("LocalHost:80") == ("localhost", 80)
    assert parse_host("127.0.0.1") == ("127.0.0.1", None)
    assert parse_host("::1") is None


def test_configured_names_and_a_non_loopback_bound_address_pass() -> None:
    policy = ControlPolicy.build(PORT, TOKEN, bound_host="192.0.2.7", hosts=["AutoVPN.lan"])
    assert check(policy=policy, host=f"autovpn.lan:{PORT}") is None
    assert check(policy=policy, host=f"192.0.2.7:{PORT}") is None
    assert status(check(policy=policy, host="autovpn.lan:1")) == 421
    assert status(check(policy=policy, host=f"x.autovpn.lan:{PORT}")) == 421
    assert status(check(policy=policy, host=f"192.0.2.8:{PORT}")) == 421
    six = ControlPolicy.build(PORT, TOKEN, bound_host="2001:db8::7")
    assert check(policy=six, host=f"[2001:DB8:0::7]:{PORT}") is None
    # A wildcard bind names no host.
    wild = ControlPolicy.build(PORT, TOKEN, bound_host="0.0.0.0")
    assert status(check(policy=wild, host=f"0.0.0.0:{PORT}")) == 421


# -- Origin and Fetch Metadata --------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/status", "/mode", "/proxy.pac"])
@pytest.mark.parametrize(
    "origin",
    [
        "null",
        " null ",
        "https://evil.example",
        f"http://127.evil.com:{PORT}",
        "http://127.0.0.1:8000",  # another loopback service's page
        f"https://127.0.0.1:{PORT}",  # another scheme
        f"http://localhost:{PORT}",  # another name for us is another origin
        "http://127.0.0.1",
        f"http://127.0.0.1:{PORT}/path",
        "garbage",
        f"http://127.0.0.1:{PORT} http://evil.example",
    ],
)
def test_foreign_and_null_origins_are_refused(method: str, path: str, origin: str) -> None:
    r = check(method, path, origin=origin, authorization=BEARER)
    assert r is not None and r.status is HTTPStatus.FORBIDDEN, (method, path, origin)
    assert "\n" not in r.reason


def test_our_own_origin_passes() -> None:
    assert check("POST", "/mode", origin=f"http://127.0.0.1:{PORT}", authorization=BEARER) is None
    six = {"host": f"[::1]:{PORT}", "origin": f"http://[::1]:{PORT}", "authorization": BEARER}
    assert check_request(POLICY, "POST", "/mode", six) is None


@pytest.mark.parametrize("site", ["cross-site", "same-site", "bogus"])
def test_state_changes_need_same_origin_fetch_metadata(site: str) -> None:
    r = check("POST", "/mode", sec_fetch_site=site, authorization=BEARER)
    assert r is not None and r.status is HTTPStatus.FORBIDDEN and site in r.reason
    for ok in ("same-origin", "none"):
        assert check("POST", "/mode", sec_fetch_site=ok, authorization=BEARER) is None


def test_reads_refuse_other_sites_except_the_pac_files() -> None:
    for site in ("cross-site", "same-site"):
        assert status(check("GET", "/status", sec_fetch_site=site)) == 403
        assert status(check("GET", "/route", sec_fetch_site=site)) == 403
        assert check("GET", "/proxy.pac", sec_fetch_site=site) is None
    assert check("GET", "/status", sec_fetch_site="none") is None


# -- the token ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_state_changing_requests_need_the_token(method: str) -> None:
    r = check(method, "/mode")
    assert r is not None and r.status is HTTPStatus.UNAUTHORIZED
    assert "/state/control.token" in r.reason and "no control token" in r.reason
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in r.reason
    assert check(method, "/mode", authorization=BEARER) is None
    assert check(method, "/mode", authorization=f"bearer  {TOKEN} ") is None


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN.upper()}",
        TOKEN,
        "Bearer \udcff",
    ],
)
def test_a_wrong_token_is_refused(authorization: str) -> None:
    r = check("POST", "/mode", authorization=authorization)
    assert r is not None and r.status is HTTPStatus.UNAUTHORIZED
    assert TOKEN not in r.reason


def test_reads_need_no_token() -> None:
    for path in ("/status", "/mode", "/route", "/proxy.pac", "/direct.pac"):
        assert check("GET", path) is None
        assert check("HEAD", path) is None


def test_no_token_no_state_changes() -> None:
    empty = ControlPolicy.build(PORT, "")
    assert status(check("POST", "/mode", policy=empty, authorization="Bearer ")) == 401
    r = check("POST", "/mode", policy=ControlPolicy.build(PORT, TOKEN))
    assert r is not None and "no state directory" in r.reason


def test_the_host_is_checked_before_the_token() -> None:
    """A rebinding page learns nothing from the answers it can provoke."""
    r = check("POST", "/mode", host=f"evil.example:{PORT}")
    assert r is not None and r.status is HTTPStatus.MISDIRECTED_REQUEST
    assert "control.token" not in r.reason
    r = check("POST", "/mode", origin="null")
    assert r is not None and r.status is HTTPStatus.FORBIDDEN


# -- the dashboard's page token ---------------------------------------------------------------

PAGE = "p4ge-" + "y" * 38
PAGE_POLICY = ControlPolicy.build(PORT, TOKEN, page_token=PAGE)
OWN = f"http://127.0.0.1:{PORT}"


def test_the_page_token_switches_the_mode_from_our_own_origin_only() -> None:
    bearer = f"Bearer {PAGE}"
    ok = {"origin": OWN, "authorization": bearer}
    assert check("POST", "/mode", PAGE_POLICY, **ok) is None
    assert check("POST", "/mode", PAGE_POLICY, **ok, sec_fetch_site="same-origin") is None
    # Not without a browser's Origin (a bare client), nor from another site or a subdomain.
    assert status(check("POST", "/mode", PAGE_POLICY, authorization=bearer)) == 401
    for site in ("same-site", "cross-site", "none"):
        refused = check("POST", "/mode", PAGE_POLICY, **ok, sec_fetch_site=site)
        assert status(refused) in (401, 403), site
    other = {"origin": "http://127.0.0.1:1", "authorization": bearer}
    assert status(check("POST", "/mode", PAGE_POLICY, **other)) == 403
    # Nothing but the mode: a batch resolve needs the control token.
    assert status(check("POST", "/resolve", PAGE_POLICY, **ok)) == 401
    assert check("POST", "/resolve", PAGE_POLICY, origin=OWN, authorization=BEARER) is None
    # No page token configured: an empty bearer is no match.
    assert status(check("POST", "/mode", POLICY, origin=OWN, authorization="Bearer ")) == 401
    assert status(check("POST", "/mode", POLICY, origin=OWN, authorization=bearer)) == 401
