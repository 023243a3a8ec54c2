"""The HTTP proxy's semantics (RFC 9110 / RFC 9112) on http1's grammar: target forms, what
a proxy refuses, hop-by-hop fields, its replies; exact bytes first, then fuzzing.  The grammar,
limits and framing themselves: tests/wire/test_http1.py."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import LocalError
from autovpn.wire import http_proxy
from autovpn.wire.http1 import (
    MAX_HEAD,
    MAX_LINE,
    BodyFramer,
    BodyKind,
    HttpError,
    HttpLimitExceeded,
    ResponseHead,
    ResponseHeadParser,
)
from autovpn.wire.http_proxy import (
    CLIENT_LIMITS,
    CONNECTION_ESTABLISHED,
    ORIGIN_LIMITS,
    HttpHeadParser,
    HttpRequestHead,
    TargetForm,
    client_wants_keep_alive,
    proxy_auth_required,
    rewrite_for_origin,
)
from tests.wire.test_http1 import ABSOLUTE_GET, CONNECT


def parse(data: bytes) -> HttpRequestHead:
    head = HttpHeadParser().receive_data(data)
    assert head is not None
    return head


def parse_response(data: bytes) -> ResponseHead:
    head = ResponseHeadParser(ORIGIN_LIMITS).receive_data(data)
    assert head is not None
    return head


def parse_error(data: bytes) -> HttpError:
    with pytest.raises(HttpError) as info:
        HttpHeadParser().receive_data(data)
    return info.value


# --- RFC 9112 §3: request line and target forms ----------------------------------------------


def test_rfc9112_s3_2_2_absolute_form() -> None:
    head = parse(ABSOLUTE_GET)
    assert head.method == "GET"
    assert head.target == "http://example.com/index.html?q=1"
    assert head.version == "HTTP/1.1"
    assert head.form is TargetForm.ABSOLUTE
    assert (head.host, head.port) == ("example.com", 80)
    assert head.origin_form == "/index.html?q=1"
    assert not head.is_connect
    assert head.headers[1] == ("User-Agent", "curl/8.5.0")
    assert head.get("proxy-connection") == "Keep-Alive"
    assert head.get("absent") == ""


@pytest.mark.parametrize(
    ("target", "host", "port", "origin_form"),
    [
        ("http://example.com", "example.com", 80, "/"),
        ("http://example.com:8080", "example.com", 8080, "/"),
        ("http://example.com:", "example.com", 80, "/"),
        ("HTTP://Example.COM/a", "Example.COM", 80, "/a"),
        ("http://example.com?x=1", "example.com", 80, "/?x=1"),
        ("http://192.0.2.1:81/p#frag", "192.0.2.1", 81, "/p"),
        ("http://[2001:db8::1]/", "2001:db8::1", 80, "/"),
        ("http://[2001:DB8::1]:8443/x", "2001:db8::1", 8443, "/x"),
    ],
)
def test_rfc9112_s3_2_2_absolute_form_variants(
    target: str, host: str, port: int, origin_form: str
) -> None:
    head = parse(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert (head.host, head.port, head.origin_form) == (host, port, origin_form)


def test_rfc9112_s3_2_4_options_absolute_empty_path_becomes_asterisk() -> None:
    head = parse(b"OPTIONS http://example.com HTTP/1.1\r\n\r\n")
    assert head.origin_form == "*"
    assert rewrite_for_origin(head).startswith(b"OPTIONS * HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("example.com:443", "example.com", 443),
        ("10.0.0.1:22", "10.0.0.1", 22),
        ("[::1]:8443", "::1", 8443),
        ("[2001:db8::1]:65535", "2001:db8::1", 65535),
    ],
)
def test_rfc9112_s3_2_3_authority_form(target: str, host: str, port: int) -> None:
    head = parse(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert head.is_connect
    assert head.form is TargetForm.AUTHORITY
    assert (head.host, head.port, head.origin_form) == (host, port, "")


@pytest.mark.parametrize(
    "target",
    [
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:12345678",
        "example.com:https",
        "::1:443",
        "[::1]443",
        "[::1",
        "[nothex]:443",
        ":443",
        'exa"mple.com:443',
    ],
)
def test_rfc9112_s3_2_3_bad_authority(target: str) -> None:
    assert parse_error(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()).status == 400


def test_rfc9112_s3_2_1_origin_form_uses_host() -> None:
    head = parse(b"GET /pac HTTP/1.1\r\nHost: proxy.local:8080\r\n\r\n")
    assert head.form is TargetForm.ORIGIN
    assert (head.host, head.port, head.origin_form) == ("proxy.local", 8080, "/pac")


def test_rfc9112_s3_2_origin_form_http10_without_host() -> None:
    head = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert (head.host, head.port) == ("", 80)
    assert parse(b"GET / HTTP/1.1\r\nHost:\r\n\r\n").host == ""


def test_rfc9112_s3_2_http11_without_host_is_400() -> None:
    assert parse_error(b"GET / HTTP/1.1\r\n\r\n").status == 400


def test_rfc9112_s3_2_two_hosts_is_400() -> None:
    err = parse_error(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n")
    assert err.status == 400
    assert err.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_rfc9112_s3_2_4_asterisk_form() -> None:
    head = parse(b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert head.form is TargetForm.ASTERISK
    assert head.origin_form == "*"
    assert parse_error(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n").status == 400


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("https://example.com/", 501),
        ("ftp://example.com/", 501),
        ("ws://example.com/", 501),
        ("http://user:pw@example.com/", 400),
        ("http:///path", 400),
        ("example.com/path", 400),
        ("http://exa mple", 400),
    ],
)
def test_rfc9110_s4_2_refused_targets(target: str, status: int) -> None:
    assert parse_error(f"GET {target} HTTP/1.1\r\n\r\n".encode()).status == status


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
def test_rfc9110_s15_6_6_unsupported_version_is_505(version: bytes) -> None:
    err = parse_error(b"GET http://a/ " + version + b"\r\n\r\n")
    assert err.status == 505
    assert err.reply.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_http10_request() -> None:
    head = parse(b"GET http://a/ HTTP/1.0\r\n\r\n")
    assert head.version == "HTTP/1.0"


def test_direct_construction_validates() -> None:
    head = HttpRequestHead("CONNECT", "a:1", "HTTP/1.1", ())
    assert (head.host, head.port) == ("a", 1)
    with pytest.raises(HttpError):
        HttpRequestHead("CONNECT", "a", "HTTP/1.1", ())


# --- the proxy's limits: a client's request, an origin's answer ------------------------------


def test_client_limits_are_414_and_431() -> None:
    assert HttpHeadParser().limits is CLIENT_LIMITS
    assert parse_error(b"GET http://a/" + b"x" * MAX_LINE + b" HTTP/1.1\r\n\r\n").status == 414
    err = parse_error(b"GET http://a/ HTTP/1.1\r\nX: " + b"v" * MAX_LINE + b"\r\n\r\n")
    assert err.status == 431 and isinstance(err, HttpLimitExceeded)
    assert err.reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 " + b"x" * MAX_LINE + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"v" * MAX_LINE + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: v\r\n" * (MAX_HEAD // 6) + b"\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
    ],
)
def test_origin_limits_are_502(data: bytes) -> None:
    with pytest.raises(HttpError) as info:
        ResponseHeadParser(ORIGIN_LIMITS).receive_data(data)
    assert info.value.status == 502
    assert info.value.reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


# --- forwarding --------------------------------------------------------------------------------


def test_rewrite_for_origin_curl_request() -> None:
    assert rewrite_for_origin(parse(ABSOLUTE_GET)) == (
        b"GET /index.html?q=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"User-Agent: curl/8.5.0\r\n"
        b"Accept: */*\r\n"
        b"\r\n"
    )


def test_rfc9110_s7_6_1_rewrite_removes_hop_by_hop_and_connection_options() -> None:
    head = parse(
        b"POST http://example.com:8080/submit HTTP/1.1\r\n"
        b"Host: attacker.example\r\n"
        b"Connection: X-Secret, close, Content-Length, Host, Transfer-Encoding\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"TE: trailers\r\n"
        b"Trailer: Expires\r\n"
        b"Upgrade: websocket\r\n"
        b"X-Secret: 1\r\n"
        b"Content-Length: 3\r\n"
        b"\r\n"
    )
    assert rewrite_for_origin(head) == (
        b"POST /submit HTTP/1.1\r\n"
        b"Host: example.com:8080\r\n"
        b"Content-Length: 3\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


def test_rfc9112_s3_2_2_rewrite_inserts_host_first_and_keeps_te() -> None:
    head = parse(
        b"POST http://[2001:db8::1]/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nA: b\r\n\r\n"
    )
    assert rewrite_for_origin(head) == (
        b"POST /x HTTP/1.1\r\nHost: [2001:db8::1]\r\nTransfer-Encoding: chunked\r\nA: b\r\n\r\n"
    )


def test_rewrite_http10_keep_alive_and_close() -> None:
    keep = parse(b"GET http://a/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n")
    assert rewrite_for_origin(keep) == (
        b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    )
    close = parse(b"GET http://a/ HTTP/1.0\r\n\r\n")
    assert rewrite_for_origin(close) == b"GET / HTTP/1.0\r\nHost: a\r\nConnection: close\r\n\r\n"


def test_rewrite_force_close() -> None:
    head = parse(b"GET http://a/ HTTP/1.1\r\nConnection: keep-alive\r\n\r\n")
    assert rewrite_for_origin(head, force_close=True) == (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )


def test_rewrite_origin_form_and_refusals() -> None:
    head = parse(b"GET /x HTTP/1.1\r\nHost: a:81\r\n\r\n")
    assert rewrite_for_origin(head) == b"GET /x HTTP/1.1\r\nHost: a:81\r\n\r\n"
    with pytest.raises(LocalError):
        rewrite_for_origin(parse(CONNECT))
    with pytest.raises(LocalError):
        rewrite_for_origin(parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"))
    with pytest.raises(LocalError):
        rewrite_for_origin(parse(b"GET / HTTP/1.0\r\n\r\n"))


def test_rewrite_keeps_obs_text_bytes() -> None:
    head = parse(b"GET http://a/ HTTP/1.1\r\nX: caf\xe9\r\n\r\n")
    assert b"X: caf\xe9\r\n" in rewrite_for_origin(head)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET http://a/ HTTP/1.1\r\n\r\n", True),
        (b"GET http://a/ HTTP/1.1\r\nConnection: close\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.1\r\nProxy-Connection: close\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.0\r\n\r\n", False),
        (b"GET http://a/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET http://a/ HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n", True),
        (b"GET http://a/ HTTP/1.0\r\nConnection: foo,,keep-alive\r\n\r\n", True),
    ],
)
def test_rfc9112_s9_3_keep_alive(data: bytes, expected: bool) -> None:
    assert client_wants_keep_alive(parse(data)) is expected


# --- replies ---------------------------------------------------------------------------------


def test_connection_established() -> None:
    assert CONNECTION_ESTABLISHED == b"HTTP/1.1 200 Connection established\r\n\r\n"
    head = parse_response(CONNECTION_ESTABLISHED)
    assert BodyFramer.for_response(head, "CONNECT").kind is BodyKind.TUNNEL


def test_rfc9110_s15_5_8_proxy_auth_required() -> None:
    reply = proxy_auth_required()
    assert reply.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="autovpn"\r\n' in reply
    assert b"\r\nConnection: close\r\n" in reply
    head = parse_response(reply)
    assert head.status == 407
    assert BodyFramer.for_response(head, "GET").content_length == len(reply.split(b"\r\n\r\n")[1])
    assert b'realm="a\\"b"' in proxy_auth_required('a"b', close=False)


# --- hypothesis ----------------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=400))
def test_fuzz_request_random_bytes_only_our_errors(data: bytes) -> None:
    try:
        head = HttpHeadParser().receive_data(data)
    except HttpError as exc:
        assert exc.status in (400, 414, 431, 501, 505)
        return
    if head is not None:
        exercise_request_helpers(head)


def exercise_request_helpers(head: HttpRequestHead) -> None:
    try:
        BodyFramer.for_request(head)
    except HttpError as exc:
        assert exc.status == 400
    if head.form in (TargetForm.ABSOLUTE, TargetForm.ORIGIN) and head.host:
        rewrite_for_origin(head)
    client_wants_keep_alive(head)


# --- purity ------------------------------------------------------------------------------------


def test_module_is_pure() -> None:
    tree = ast.parse(pathlib.Path(http_proxy.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert names
    assert not names & {"asyncio", "socket", "ssl", "selectors", "time"}
