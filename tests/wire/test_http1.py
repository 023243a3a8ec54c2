"""The one HTTP/1.1 head grammar and body framing (RFC 9112): exact bytes first, named after
the RFC's sections, then properties (any chunking, random and mutated bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import LimitExceeded, LocalError, RemoteProtocolError
from autovpn.wire import http1
from autovpn.wire.http1 import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    BodyFramer,
    BodyKind,
    ChunkedScanner,
    CloseDelimitedBody,
    ContentLengthBody,
    HeadLimits,
    HttpError,
    HttpLimitExceeded,
    NoBody,
    ParserState,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    ResponseHeadParser,
    render,
    response,
)

#: Statuses as a proxy gives them for an origin's answer.
BAD_GATEWAY = HeadLimits(error_status=502, start_line_status=502, too_large_status=502)


def parse(data: bytes) -> RequestHead:
    head = RequestHeadParser().receive_data(data)
    assert head is not None
    return head


def parse_response(data: bytes) -> ResponseHead:
    head = ResponseHeadParser(BAD_GATEWAY).receive_data(data)
    assert head is not None
    return head


def parse_error(data: bytes) -> HttpError:
    with pytest.raises(HttpError) as info:
        RequestHeadParser().receive_data(data)
    return info.value


ABSOLUTE_GET = (
    b"GET http://example.com/index.html?q=1 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


# --- RFC 9112 §3: the request line ---------------------------------------------------------------


def test_rfc9112_s3_request_line() -> None:
    head = parse(ABSOLUTE_GET)
    assert (head.method, head.target, head.version) == (
        "GET",
        "http://example.com/index.html?q=1",
        "HTTP/1.1",
    )
    assert head.start_line == "GET http://example.com/index.html?q=1 HTTP/1.1"
    assert head.headers[1] == ("User-Agent", "curl/8.5.0")
    assert head.get("proxy-connection") == "Keep-Alive"
    assert head.get("absent") == "" and head.get("absent", "x") == "x"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2"])
def test_rfc9112_s2_3_any_http_version_is_grammatical(version: bytes) -> None:
    """What a user accepts is its own: the proxy answers 505, the tunnel 400; an HTTP/2
    preface (``PRI * HTTP/2.0``) must parse for the tunnel port to hand it on."""
    assert parse(b"GET / " + version + b"\r\n\r\n").version == version.decode()
    parser = RequestHeadParser()
    assert parser.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == RequestHead(
        "PRI", "*", "HTTP/2.0", ()
    )
    assert parser.trailing_data == b"SM\r\n\r\n"


@pytest.mark.parametrize(
    "line",
    [
        b"GET http://a/ HTTP/1.1 extra",
        b"GET  http://a/ HTTP/1.1",
        b"GET http://a/",
        b"GET",
        b"G(ET http://a/ HTTP/1.1",
        b"GET http://a/ HTTP/1",
        b"GET http://a/ http/1.1",
        b"GET http://a/\x01 HTTP/1.1",
    ],
)
def test_rfc9112_s3_bad_request_line(line: bytes) -> None:
    assert parse_error(line + b"\r\n\r\n").status == 400


# --- RFC 9112 §2, §5: lines and fields -------------------------------------------------------


def test_rfc9112_s2_2_bare_lf_accepted() -> None:
    head = parse(b"GET http://a/ HTTP/1.1\nHost: a\nX: y\n\nbody")
    assert head.headers == (("Host", "a"), ("X", "y"))


def test_rfc9112_s2_2_leading_empty_lines_ignored() -> None:
    head = parse(b"\r\n\r\nGET http://a/ HTTP/1.1\r\n\r\n")
    assert head.target == "http://a/"


def test_rfc9112_s2_2_bare_cr_rejected() -> None:
    assert parse_error(b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n").status == 400


def test_rfc9112_s5_ows_stripped_case_and_order_kept() -> None:
    head = parse(b"GET http://a/ HTTP/1.1\r\nX-One: \t v1 \t\r\nx-one: v2\r\nEmpty:\r\n\r\n")
    assert head.headers == (("X-One", "v1"), ("x-one", "v2"), ("Empty", ""))
    assert head.get_all("X-ONE") == ["v1", "v2"]


def test_rfc9112_s5_obs_text_is_latin1() -> None:
    head = parse(b"GET http://a/ HTTP/1.1\r\nX: caf\xe9\r\n\r\n")
    assert head.get("x") == "caf\xe9"


def test_rfc9112_s5_1_whitespace_before_colon_is_400() -> None:
    err = parse_error(b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n")
    assert err.status == 400
    assert "colon" in str(err)


def test_rfc9112_s5_2_obs_fold_is_400() -> None:
    err = parse_error(b"GET http://a/ HTTP/1.1\r\nX: a\r\n  b\r\n\r\n")
    assert err.status == 400
    assert "fold" in str(err)


@pytest.mark.parametrize(
    "line", [b"NoColon", b": novalue", b"Bad Name: x", b"X: a\x00b", b"X: \x7f", b"X\x01: y"]
)
def test_rfc9112_s5_bad_field_lines(line: bytes) -> None:
    assert parse_error(b"GET http://a/ HTTP/1.1\r\n" + line + b"\r\n\r\n").status == 400


# --- limits ---------------------------------------------------------------------------------------


def test_limit_request_line_is_414() -> None:
    data = b"GET http://a/" + b"x" * MAX_LINE + b" HTTP/1.1\r\n\r\n"
    err = parse_error(data)
    assert err.status == 414
    assert isinstance(err, HttpLimitExceeded)
    assert isinstance(err, LimitExceeded)
    assert "MAX_LINE" in str(err)
    assert err.reply.startswith(b"HTTP/1.1 414 URI Too Long\r\n")


def test_limit_request_line_detected_before_newline() -> None:
    parser = RequestHeadParser()
    assert parser.receive_data(b"GET http://a/" + b"x" * (MAX_LINE - 13)) is None
    with pytest.raises(HttpLimitExceeded, match="MAX_LINE") as info:
        parser.receive_data(b"xx")
    assert info.value.status == 414
    assert parser.state is ParserState.FAILED


def test_limit_header_line_is_431() -> None:
    err = parse_error(b"GET http://a/ HTTP/1.1\r\nX: " + b"v" * MAX_LINE + b"\r\n\r\n")
    assert err.status == 431
    assert "MAX_LINE" in str(err)


def test_limit_header_line_exactly_max_ok() -> None:
    value = b"v" * (MAX_LINE - 3)
    head = parse(b"GET http://a/ HTTP/1.1\r\nX: " + value + b"\r\n\r\n")
    assert head.get("x") == value.decode()


def test_limit_max_headers_is_431() -> None:
    ok = b"".join(b"X%d: v\r\n" % i for i in range(MAX_HEADERS))
    assert len(parse(b"GET http://a/ HTTP/1.1\r\n" + ok + b"\r\n").headers) == MAX_HEADERS
    err = parse_error(b"GET http://a/ HTTP/1.1\r\n" + ok + b"Y: v\r\n\r\n")
    assert err.status == 431
    assert "MAX_HEADERS" in str(err)


def test_limit_max_head_is_431() -> None:
    line = b"X: " + b"v" * (MAX_LINE - 10) + b"\r\n"
    data = b"GET http://a/ HTTP/1.1\r\n" + line * (MAX_HEAD // len(line) + 1) + b"\r\n"
    err = parse_error(data)
    assert err.status == 431
    assert "MAX_HEAD" in str(err)


def test_limit_max_head_of_empty_lines() -> None:
    err = parse_error(b"\r\n" * (MAX_HEAD // 2 + 1))
    assert "MAX_HEAD" in str(err)


# --- incremental parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("data", [ABSOLUTE_GET, CONNECT])
def test_bytewise_equals_whole(data: bytes) -> None:
    parser = RequestHeadParser()
    for i in range(len(data) - 1):
        assert parser.receive_data(data[i : i + 1]) is None  # truncated: None, not an error
    head = parser.receive_data(data[-1:])
    assert head == parse(data)
    assert parser.state is ParserState.DONE
    assert parser.trailing_data == b""


def test_trailing_data_preserved() -> None:
    parser = RequestHeadParser()
    head = parser.receive_data(CONNECT + b"\x16\x03\x01early tls")
    assert head is not None and head.method == "CONNECT"
    assert parser.trailing_data == b"\x16\x03\x01early tls"


def test_pipelined_requests_with_new_parser() -> None:
    first = RequestHeadParser()
    assert first.receive_data(ABSOLUTE_GET + ABSOLUTE_GET) is not None
    second = RequestHeadParser()
    assert second.receive_data(first.trailing_data) == parse(ABSOLUTE_GET)


def test_memoryview_input_and_reuse_is_local_error() -> None:
    parser = RequestHeadParser()
    assert parser.receive_data(memoryview(CONNECT)) is not None
    with pytest.raises(LocalError):
        parser.receive_data(b"x")
    failed = RequestHeadParser()
    with pytest.raises(HttpError):
        failed.receive_data(b"GET\r\n\r\n")
    with pytest.raises(LocalError):
        failed.receive_data(b"x")


# --- responses (RFC 9112 §4) --------------------------------------------------------------------


def test_rfc9112_s4_status_line() -> None:
    parser = ResponseHeadParser(BAD_GATEWAY)
    head = parser.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert head == ResponseHead("HTTP/1.1", 200, "OK", (("Content-Length", "2"),))
    assert parser.trailing_data == b"hi"
    assert head is not None and head.get("content-length") == "2"
    assert head.get_all("x") == []


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"HTTP/1.0 404 Not Found", 404, "Not Found"),
        (b"HTTP/1.1 204 ", 204, ""),
        (b"HTTP/1.1 204", 204, ""),
        (b"HTTP/1.1 599 Whatever it is", 599, "Whatever it is"),
    ],
)
def test_rfc9112_s4_status_line_variants(line: bytes, status: int, reason: str) -> None:
    head = parse_response(line + b"\n\n")
    assert (head.status, head.reason) == (status, reason)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 600 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",  # RFC 9112 §5.2: proxy answers 502
        b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
    ],
)
def test_bad_response_is_502(data: bytes) -> None:
    with pytest.raises(HttpError) as info:
        ResponseHeadParser(BAD_GATEWAY).receive_data(data)
    assert info.value.status == 502
    assert info.value.reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_response_limits_are_502() -> None:
    with pytest.raises(HttpLimitExceeded) as info:
        ResponseHeadParser(BAD_GATEWAY).receive_data(b"HTTP/1.1 200 " + b"x" * MAX_LINE)
    assert info.value.status == 502
    fields = b"".join(b"X: v\r\n" for _ in range(MAX_HEADERS + 1))
    with pytest.raises(HttpLimitExceeded, match="MAX_HEADERS") as info:
        ResponseHeadParser(BAD_GATEWAY).receive_data(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    assert info.value.status == 502


# --- RFC 9112 §6: framing ---------------------------------------------------------------------


def request_framer(fields: bytes, line: bytes = b"POST http://a/ HTTP/1.1") -> BodyFramer:
    return BodyFramer.for_request(parse(line + b"\r\n" + fields + b"\r\n"))


def response_framer(data: bytes, method: str = "GET") -> BodyFramer:
    return BodyFramer.for_response(parse_response(data + b"\r\n"), method)


def test_rfc9112_s6_3_request_content_length() -> None:
    assert request_framer(b"Content-Length: 42\r\n") == BodyFramer(BodyKind.CONTENT_LENGTH, 42)
    assert request_framer(b"Content-Length: 0\r\n").kind is BodyKind.CONTENT_LENGTH


def test_rfc9112_s6_3_request_same_content_length_repeated_ok() -> None:
    framer = request_framer(b"Content-Length: 5\r\nContent-Length: 5, 5\r\n")
    assert framer.content_length == 5


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 0x10\r\n",
        b"Content-Length: \r\n",
        b"Content-Length: 1 2\r\n",
        b"Content-Length: +5\r\n",
    ],
)
def test_rfc9112_s6_3_bad_content_length_is_400(fields: bytes) -> None:
    with pytest.raises(HttpError) as info:
        request_framer(fields)
    assert info.value.status == 400


def test_content_length_digit_limit() -> None:
    with pytest.raises(HttpLimitExceeded, match="MAX_CONTENT_LENGTH_DIGITS"):
        request_framer(b"Content-Length: " + b"9" * 5000 + b"\r\n")


def test_rfc9112_s6_1_request_chunked() -> None:
    assert request_framer(b"Transfer-Encoding: chunked\r\n").kind is BodyKind.CHUNKED
    assert request_framer(b"Transfer-Encoding: gzip, Chunked\r\n").kind is BodyKind.CHUNKED
    assert request_framer(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n").kind is (
        BodyKind.CHUNKED
    )


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"POST http://a/ HTTP/1.1"),
        (b"Transfer-Encoding: chunked, gzip\r\n", b"POST http://a/ HTTP/1.1"),
        (b"Transfer-Encoding: chunked, chunked\r\n", b"POST http://a/ HTTP/1.1"),
        (b"Transfer-Encoding: ,\r\n", b"POST http://a/ HTTP/1.1"),
        (b"Transfer-Encoding: chunked\r\n", b"POST http://a/ HTTP/1.0"),
    ],
)
def test_rfc9112_s6_1_request_smuggling_is_400(fields: bytes, line: bytes) -> None:
    with pytest.raises(HttpError) as info:
        request_framer(fields, line)
    assert info.value.status == 400


def test_rfc9112_s6_3_request_without_body() -> None:
    assert request_framer(b"").kind is BodyKind.NONE
    connect = BodyFramer.for_request(parse(CONNECT))
    assert connect.kind is BodyKind.NONE


@pytest.mark.parametrize(
    ("data", "method", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n", "HEAD", BodyKind.NONE),
        (b"HTTP/1.1 100 Continue\r\n", "POST", BodyKind.NONE),
        (b"HTTP/1.1 101 Switching Protocols\r\n", "GET", BodyKind.TUNNEL),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n", "GET", BodyKind.NONE),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n", "GET", BodyKind.NONE),
        (b"HTTP/1.1 200 OK\r\n", "CONNECT", BodyKind.TUNNEL),
        (b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n", "CONNECT", BodyKind.CONTENT_LENGTH),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "GET", BodyKind.CHUNKED),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n", "GET", BodyKind.CLOSE_DELIMITED),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n", "GET", BodyKind.CLOSE_DELIMITED),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", "GET", BodyKind.CONTENT_LENGTH),
        (b"HTTP/1.1 200 OK\r\n", "GET", BodyKind.CLOSE_DELIMITED),
        (b"HTTP/1.0 200 OK\r\n", "POST", BodyKind.CLOSE_DELIMITED),
    ],
)
def test_rfc9112_s6_3_response_framing(data: bytes, method: str, kind: BodyKind) -> None:
    framer = response_framer(data, method)
    assert framer.kind is kind
    assert framer.error_status == 502


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n",
    ],
)
def test_rfc9112_s6_3_bad_response_framing_is_502(data: bytes) -> None:
    with pytest.raises(HttpError) as info:
        response_framer(data)
    assert info.value.status == 502


def test_trackers_from_framer() -> None:
    assert isinstance(BodyFramer(BodyKind.NONE).tracker(), NoBody)
    assert isinstance(BodyFramer(BodyKind.CONTENT_LENGTH, 3).tracker(), ContentLengthBody)
    assert isinstance(BodyFramer(BodyKind.CHUNKED).tracker(), ChunkedScanner)
    assert isinstance(BodyFramer(BodyKind.CLOSE_DELIMITED).tracker(), CloseDelimitedBody)
    assert isinstance(BodyFramer(BodyKind.TUNNEL).tracker(), CloseDelimitedBody)


def test_no_body_tracker() -> None:
    tracker = NoBody()
    assert tracker.done
    assert tracker.feed(b"next request") == 0
    tracker.receive_eof()


def test_content_length_tracker() -> None:
    tracker = ContentLengthBody(5)
    assert tracker.feed(b"abc") == 3
    assert not tracker.done
    assert tracker.remaining == 2
    assert tracker.feed(memoryview(b"deNEXT")) == 2
    assert tracker.done
    assert tracker.feed(b"more") == 0
    zero = ContentLengthBody(0)
    assert zero.done and zero.feed(b"x") == 0


def test_content_length_truncated_at_eof() -> None:
    tracker = ContentLengthBody(5, 502)
    tracker.feed(b"abc")
    with pytest.raises(HttpError, match="2 bytes") as info:
        tracker.receive_eof()
    assert info.value.status == 502


def test_close_delimited_tracker() -> None:
    tracker = CloseDelimitedBody()
    assert tracker.feed(b"anything") == 8
    assert not tracker.done
    tracker.receive_eof()
    assert tracker.done


# --- RFC 9112 §7.1: chunked -----------------------------------------------------------------------

CHUNKED_BODY = (
    b"4\r\nWiki\r\n"
    b"5;name=value;flag\r\npedia\r\n"
    b'E \t; ext="quoted;"\r\n in\r\n\r\nchunks.\r\n'
    b"0\r\n"
    b"Expires: never\r\n"
    b"X-Checksum: abc\r\n"
    b"\r\n"
)


def test_rfc9112_s7_1_chunked_whole() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(CHUNKED_BODY + b"GET /next") == len(CHUNKED_BODY)
    assert scanner.done
    assert scanner.feed(b"more") == 0
    scanner.receive_eof()


def test_rfc9112_s7_1_chunked_bytewise() -> None:
    scanner = ChunkedScanner()
    total = 0
    for i in range(len(CHUNKED_BODY)):
        assert not scanner.done
        total += scanner.feed(CHUNKED_BODY[i : i + 1])
    assert total == len(CHUNKED_BODY)
    assert scanner.done


def test_rfc9112_s7_1_last_chunk_without_trailers() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"0\r\n\r\nX") == 5
    assert scanner.done


def test_rfc9112_s7_1_hex_sizes_and_memoryview() -> None:
    body = b"1A\r\n" + b"x" * 26 + b"\r\n" + b"0000\r\n\r\n"
    scanner = ChunkedScanner()
    assert scanner.feed(memoryview(body)) == len(body)
    assert scanner.done


def test_chunked_truncated_at_eof() -> None:
    scanner = ChunkedScanner(502)
    scanner.feed(b"5\r\nab")
    with pytest.raises(HttpError) as info:
        scanner.receive_eof()
    assert info.value.status == 502


@pytest.mark.parametrize(
    "body",
    [
        b"x\r\n",
        b"\r\n",
        b"-1\r\n",
        b" 5\r\nhello\r\n",
        b"5 x\r\nhello\r\n",
        b"5\nhello\r\n",  # bare LF refused in chunked framing
        b"5\r\nhelloXX",
        b"5\r\nhello\rX",
        b"5\r\nhello\n",
        b"0\r\nBad Trailer: x\r\n\r\n",
        b"0\r\n folded: x\r\n\r\n",
        b"0\r\nX: y\n\r\n",
        b"5;\x00\r\n",
        b"5\r5\r\n",
    ],
)
def test_rfc9112_s7_1_malformed_chunked(body: bytes) -> None:
    with pytest.raises(HttpError) as info:
        ChunkedScanner().feed(body)
    assert info.value.status == 400


def test_chunk_line_limit() -> None:
    scanner = ChunkedScanner()
    with pytest.raises(HttpLimitExceeded, match="MAX_CHUNK_LINE"):
        scanner.feed(b"5;" + b"e" * MAX_CHUNK_LINE + b"\r\n")
    split = ChunkedScanner()
    split.feed(b"5;" + b"e" * (MAX_CHUNK_LINE // 2))
    with pytest.raises(HttpLimitExceeded, match="MAX_CHUNK_LINE"):
        split.feed(b"e" * MAX_CHUNK_LINE)


def test_chunk_size_digit_limit() -> None:
    assert ChunkedScanner().feed(b"F" * 16 + b"\r\nabc") == 21
    with pytest.raises(HttpLimitExceeded, match="MAX_CHUNK_SIZE_DIGITS"):
        ChunkedScanner().feed(b"1" * 17 + b"\r\n")


def test_trailer_limits() -> None:
    with pytest.raises(HttpLimitExceeded, match="MAX_LINE"):
        ChunkedScanner().feed(b"0\r\nX: " + b"v" * MAX_LINE + b"\r\n")
    many = b"".join(b"X: v\r\n" for _ in range(MAX_HEADERS + 1))
    with pytest.raises(HttpLimitExceeded, match="MAX_HEADERS"):
        ChunkedScanner().feed(b"0\r\n" + many + b"\r\n")
    big = (b"X: " + b"v" * (MAX_LINE - 10) + b"\r\n") * 9
    with pytest.raises(HttpLimitExceeded, match="MAX_HEAD"):
        ChunkedScanner().feed(b"0\r\n" + big + b"\r\n")


def test_response_helper() -> None:
    assert response(403, body=b"no") == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno"
    )
    assert response(200, "Fine", [("X", "y")], close=False) == (
        b"HTTP/1.1 200 Fine\r\nX: y\r\nContent-Length: 0\r\n\r\n"
    )
    assert response(204, close=False) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert response(599) == (
        b"HTTP/1.1 599 Unknown\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert response(200, headers=[("Content-Length", "5")], close=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 99},
        {"status": 200, "reason": "a\r\nb"},
        {"status": 200, "headers": [("X", "a\nb")]},
        {"status": 304, "body": b"x"},
    ],
)
def test_response_helper_local_misuse(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalError):
        response(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(400, b"Bad Request"), (414, b"URI Too Long"), (431, b"Request Header Fields Too Large"),
     (501, b"Not Implemented"), (502, b"Bad Gateway"), (505, b"HTTP Version Not Supported")],
)  # fmt: skip
def test_error_reply_bytes(status: int, phrase: bytes) -> None:
    err = HttpError("internal detail", status)
    assert err.reply.startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase))
    assert err.reply.endswith(b"\r\n\r\n%d %s\n" % (status, phrase))
    assert b"internal detail" not in err.reply
    assert isinstance(err, RemoteProtocolError)


header_lines = st.lists(
    st.tuples(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
        st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip),
    ).filter(lambda kv: kv[0].lower() not in ("host", "content-length", "transfer-encoding")),
    max_size=8,
)


@settings(max_examples=300)
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    st.from_regex(r"/[A-Za-z0-9/._~?=&%-]{0,40}", fullmatch=True),
    header_lines,
    st.binary(max_size=30),
    st.sampled_from([b"\r\n", b"\n"]),
    st.data(),
)
def test_fuzz_random_splits_same_head(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    trailing: bytes,
    eol: bytes,
    data: st.DataObject,
) -> None:
    lines = [f"{method} http://example.com:8080{path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers]
    raw = eol.join(line.encode() for line in lines) + eol + eol
    expected = parse(raw)
    assert expected.headers == tuple(headers)
    assert expected.target == f"http://example.com:8080{path}"
    stream = raw + trailing
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = RequestHeadParser()
    start = 0
    result = None
    for cut in [*cuts, len(stream)]:
        result = parser.receive_data(stream[start:cut])
        start = cut
        if result is not None:
            break
    assert result == expected
    assert parser.trailing_data + stream[start:] == trailing


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_response_random_bytes_only_our_errors(data: bytes) -> None:
    try:
        head = ResponseHeadParser(BAD_GATEWAY).receive_data(b"HTTP/1.1 200 OK\r\n" + data)
    except HttpError as exc:
        assert exc.status == 502
        return
    if head is not None:
        try:
            BodyFramer.for_response(head, "GET")
        except HttpError as exc:
            assert exc.status == 502


def encode_chunked(chunks: list[bytes], exts: list[str], trailers: list[tuple[str, str]]) -> bytes:
    out = b""
    for i, chunk in enumerate(chunks):
        ext = exts[i % len(exts)] if exts else ""
        out += b"%x%s\r\n%s\r\n" % (len(chunk), ext.encode(), chunk)
    out += b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers) + b"\r\n"
    return out


@settings(max_examples=300)
@given(
    st.lists(st.binary(min_size=1, max_size=50), max_size=6),
    st.lists(st.sampled_from(["", ";a", ";a=b", ' ; q="x;y"']), max_size=3),
    header_lines,
    st.binary(max_size=20),
    st.data(),
)
def test_fuzz_chunked_random_splits(
    chunks: list[bytes],
    exts: list[str],
    trailers: list[tuple[str, str]],
    after: bytes,
    data: st.DataObject,
) -> None:
    body = encode_chunked(chunks, exts, trailers)
    stream = body + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    scanner = ChunkedScanner()
    consumed = 0
    start = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[start:cut]
        taken = scanner.feed(piece)
        assert 0 <= taken <= len(piece)
        consumed += taken
        if taken < len(piece):
            assert scanner.done
        start = cut
    assert scanner.done
    assert consumed == len(body)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.data())
def test_fuzz_chunked_random_bytes_only_our_errors(data: bytes, draw: st.DataObject) -> None:
    scanner = ChunkedScanner()
    cut = draw.draw(st.integers(0, len(data)))
    try:
        first = scanner.feed(data[:cut])
        assert 0 <= first <= cut
        if not scanner.done:
            second = scanner.feed(data[cut:])
            assert 0 <= second <= len(data) - cut
    except HttpError as exc:
        assert exc.status == 400


@settings(max_examples=200)
@given(st.integers(0, 10**6), st.lists(st.integers(0, 4000), max_size=5))
def test_fuzz_content_length_tracker(length: int, pieces: list[int]) -> None:
    tracker = ContentLengthBody(length)
    total = 0
    for size in pieces:
        total += tracker.feed(bytes(size))
    assert total == min(length, sum(pieces))
    assert tracker.done == (sum(pieces) >= length)


# --- the head's limits: each user's own, and exact at their bounds -----------------------------

SMALL = HeadLimits(
    max_line=40,
    max_headers=3,
    max_head=120,
    line_name="SMALL_LINE",
    headers_name="SMALL_HEADERS",
    head_name="SMALL_HEAD",
    error_status=418,
    start_line_status=419,
    too_large_status=420,
)


def test_limits_names_and_statuses_are_the_users() -> None:
    with pytest.raises(HttpError, match="SMALL_LINE") as info:
        RequestHeadParser(SMALL).receive_data(b"GET /" + b"x" * 40 + b" HTTP/1.1\r\n")
    assert info.value.status == 419
    with pytest.raises(HttpError, match="SMALL_LINE") as info:
        RequestHeadParser(SMALL).receive_data(b"GET / HTTP/1.1\r\nX: " + b"v" * 40 + b"\r\n")
    assert info.value.status == 420
    with pytest.raises(HttpError, match="SMALL_HEADERS") as info:
        RequestHeadParser(SMALL).receive_data(b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 4)
    assert info.value.status == 420
    with pytest.raises(HttpError, match="SMALL_HEAD") as info:
        RequestHeadParser(SMALL).receive_data(
            b"GET / HTTP/1.1\r\n" + (b"X: " + b"v" * 30 + b"\r\n") * 3
        )
    assert info.value.status == 420
    with pytest.raises(HttpError) as info:
        RequestHeadParser(SMALL).receive_data(b"GET /\r\n\r\n")
    assert info.value.status == 418
    assert info.value.reply.startswith(b"HTTP/1.1 418 I'm a Teapot\r\n")


def _head(size: int, line: int = 0) -> bytes:
    """A request head of exactly ``size`` bytes, CRLFs included; its first field line has
    ``line`` bytes (without CRLF) when given."""
    start = b"GET / HTTP/1.1\r\n"
    first = b"A: " + b"a" * (line - 3) + b"\r\n" if line else b""
    rest = size - len(start) - len(first) - 2
    filler = b""
    while rest:
        line = min(rest, 4000) if rest - 4000 >= 6 or rest <= 4000 else rest - 6
        assert line >= 6
        filler += b"B: " + b"b" * (line - 5) + b"\r\n"
        rest -= line
    return start + first + filler + b"\r\n"


@pytest.mark.parametrize("cut", [None, -1, -2, -3])
def test_limit_head_of_exactly_max_head_passes_in_any_split(cut: int | None) -> None:
    raw = _head(MAX_HEAD)
    assert len(raw) == MAX_HEAD
    parser = RequestHeadParser()
    if cut is not None:
        assert parser.receive_data(raw[:cut]) is None
        raw = raw[cut:]
    assert parser.receive_data(raw) is not None
    with pytest.raises(HttpLimitExceeded, match="MAX_HEAD"):
        RequestHeadParser().receive_data(_head(MAX_HEAD + 1))


@pytest.mark.parametrize("cut", [None, 0, 1, 2])
def test_limit_line_of_exactly_max_line_passes_in_any_split(cut: int | None) -> None:
    """A CR that ends a chunk may be the first half of the CRLF: it does not count towards
    the line until the next byte shows it does not.  (Before http1, a field line of exactly
    MAX_LINE bytes was refused when a chunk ended between its CR and LF.)"""
    raw = _head(200 + MAX_LINE, line=MAX_LINE)
    parser = RequestHeadParser()
    if cut is not None:
        split = raw.index(b"a\r\n") + cut  # in "a|\r\n", "a\r|\n", "a\r\n|"
        assert parser.receive_data(raw[: split + 1]) is None
        raw = raw[split + 1 :]
    head = parser.receive_data(raw)
    assert head is not None and len(head.get("a")) == MAX_LINE - 3
    with pytest.raises(HttpLimitExceeded, match="MAX_LINE"):
        RequestHeadParser().receive_data(_head(200 + MAX_LINE + 1, line=MAX_LINE + 1))


def test_limit_passed_first_in_the_stream_is_the_one_named() -> None:
    """A line that passes both bounds: whichever it passed first, whatever the chunking."""
    head_first = (
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 36 + b"\r\n" + b"Y: " + b"v" * 36 + b"\r\n")
        + b"Z: "
        + b"v" * 60
        + b"\r\n\r\n"
    )  # the head's bound (byte 121) before the line's (139)
    line_first = b"GET / HTTP/1.1\r\n" + b"Z: " + b"v" * 120 + b"\r\n\r\n"
    for raw, bound in ((head_first, "SMALL_HEAD"), (line_first, "SMALL_LINE")):
        for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
            parser = RequestHeadParser(SMALL)
            with pytest.raises(HttpLimitExceeded, match=bound):
                for piece in pieces:
                    parser.receive_data(piece)


def _outcome(limits: HeadLimits, response: bool, pieces: list[bytes]) -> tuple[object, ...]:
    parser: http1.HeadParser[RequestHead] | http1.HeadParser[ResponseHead]
    parser = ResponseHeadParser(limits) if response else RequestHeadParser(limits)
    for i, piece in enumerate(pieces):
        try:
            head = parser.receive_data(piece)
        except HttpError as exc:
            return ("error", type(exc), exc.status, str(exc))
        if head is not None:
            return ("head", head, parser.trailing_data + b"".join(pieces[i + 1 :]))
    return ("incomplete",)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


VALID_HEADS = [
    ABSOLUTE_GET,
    CONNECT,
    b"\r\nGET / HTTP/1.0\nHost: a\n\nbody",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX:  y \r\n\r\nhi",
    b"HTTP/1.0 204\n\n",
    b"GET /" + b"a" * 30 + b" HTTP/1.1\r\nX: " + b"v" * 34 + b"\r\nY: 1\r\n\r\nnext",
    b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"v" * 37 + b"\r\n" + b"\r" * 40 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: "
    + b"v" * 36
    + b"\r\nY: "
    + b"v" * 36
    + b"\r\nZ: "
    + b"v" * 60
    + b"\r\n\r\n",
]


def _mutated(head: bytes, at: int, new: bytes) -> bytes:
    at %= len(head)
    return head[:at] + new + head[at + 1 :]


@settings(max_examples=500)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from(VALID_HEADS),
        st.builds(
            _mutated,
            st.sampled_from(VALID_HEADS),
            st.integers(0, 300),
            st.binary(max_size=3),
        ),
    ),
    st.sampled_from([http1.DEFAULT_LIMITS, BAD_GATEWAY, SMALL]),
    st.booleans(),
    st.data(),
)
def test_property_any_chunking_gives_the_same_head_or_the_same_error(
    data: bytes, limits: HeadLimits, response: bool, draw: st.DataObject
) -> None:
    """Random, valid and mutated heads, against roomy and tight limits: fed in any pieces,
    the same head (and the same bytes after it), the same error, or nothing yet; and no
    exception but ours, with one of the user's statuses."""
    whole = _outcome(limits, response, [data])
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8))
    assert _outcome(limits, response, _split(data, cuts)) == whole
    assert _outcome(limits, response, [data[i : i + 1] for i in range(len(data))]) == whole
    if whole[0] == "error":
        assert whole[2] in {limits.error_status, limits.start_line_status, limits.too_large_status}


@settings(max_examples=200)
@given(
    st.sampled_from(["GET", "POST", "OPTIONS", "X-CUSTOM"]),
    st.from_regex(r"/[!-~]{0,30}", fullmatch=True),
    st.lists(
        st.tuples(
            st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}", fullmatch=True),
            st.from_regex(
                r"([!-~\x80-\xff]([ !-~\x80-\xff]{0,20}[!-~\x80-\xff])?)?", fullmatch=True
            ),
        ),
        max_size=6,
    ),
)
def test_property_render_then_parse_round_trips(
    method: str, target: str, fields: list[tuple[str, str]]
) -> None:
    raw = render(f"{method} {target} HTTP/1.1", fields)
    head = parse(raw)
    assert head == RequestHead(method, target, "HTTP/1.1", tuple(fields))
    assert render(head.start_line, head.headers) == raw
