"""The tunnel's opening handshake (RFC 6455 section 4 + AutoVPN-HMAC + the server's challenge),
from bytes outward."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import AuthenticationFailed, LimitExceeded, RemoteProtocolError
from autovpn.wire import frames
from autovpn.wire.handshake import (
    CHALLENGE_SIZE,
    MAX_CLOCK_SKEW,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    REQUEST_LIMITS,
    RESPONSE_LIMITS,
    Accepted,
    ClientResult,
    HandshakeError,
    ReplayCache,
    accept_key,
    accept_request,
    auth_frame,
    build_request,
    check_auth,
    check_response,
    compute_mac,
    compute_proof,
    plain_response,
    request_target,
    tunnel_path,
)
from autovpn.wire.http1 import (
    HttpError,
    RequestHead,
    RequestHeadParser,
    ResponseHead,
    ResponseHeadParser,
)

PATH = "/autovpn/tunnel"
SECRET = b"correct horse battery staple"
USERS = {"alice": SECRET}
NOW = 1764147600
NONCE = bytes(range(16))
NONCE_TEXT = "AAECAwQFBgcICQoLDA0ODw"
WS_KEY = b"the sample nonce"  # RFC 6455 section 1.3: base64 is dGhlIHNhbXBsZSBub25jZQ==
HOST = "vpn.example"
CHALLENGE = bytes(range(100, 116))
CHALLENGE_TEXT = "ZGVmZ2hpamtsbW5vcHFycw"


def expected_mac(secret: bytes, user: str, ts: int, nonce: str, path: str, host: str = HOST) -> str:
    """The request MAC of docs/protocol.md, computed independently of the module."""
    fields = ("autovpn-v2 request", user, str(ts), nonce, host, path)
    digest = hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def expected_proof(
    secret: bytes = SECRET,
    challenge: str = CHALLENGE_TEXT,
    *,
    user: str = "alice",
    nonce: str = NONCE_TEXT,
    host: str = HOST,
    path: str = PATH,
) -> bytes:
    """The AUTH payload of docs/protocol.md, computed independently of the module."""
    fields = ("autovpn-v2 proof", user, nonce, challenge, host, path)
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).digest()


def request(**overrides: object) -> bytes:
    kwargs: dict[str, object] = {
        "host": HOST,
        "path": PATH,
        "user": "alice",
        "secret": SECRET,
        "now": NOW,
        "nonce": NONCE,
        "ws_key": WS_KEY,
    }
    kwargs.update(overrides)
    return build_request(**kwargs)  # type: ignore[arg-type]


def head_of(raw: bytes) -> RequestHead:
    """An upgrade request, read as the server reads it."""
    head = RequestHeadParser(REQUEST_LIMITS).receive_data(raw)
    assert head is not None
    return head


def answer_of(raw: bytes) -> ResponseHead:
    """The server's answer, read as the client reads it."""
    head = ResponseHeadParser(RESPONSE_LIMITS).receive_data(raw)
    assert head is not None
    return head


def accept(
    raw: bytes,
    *,
    replay: ReplayCache | None = None,
    now: float = NOW,
    challenge: bytes = CHALLENGE,
) -> Accepted:
    return accept_request(
        head_of(raw),
        path=PATH,
        users=USERS,
        replay=replay or ReplayCache(),
        now=now,
        challenge=challenge,
    )


def replace_header(raw: bytes, name: bytes, line: bytes | None) -> bytes:
    lines = raw[:-4].split(b"\r\n")
    kept = [x for x in lines if not x.lower().startswith(name.lower() + b":")]
    if line is not None:
        kept.append(line)
    return b"\r\n".join(kept) + b"\r\n\r\n"


# -- RFC 6455 section 1.3 / 4.2.2: the accept key -----------------------------------------------


def test_rfc6455_1_3_accept_key_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert base64.b64encode(WS_KEY) == b"dGhlIHNhbXBsZSBub25jZQ=="


# -- the request, byte for byte ----------------------------------------------------------------


def test_rfc6455_4_1_upgrade_request_exact_bytes() -> None:
    mac = expected_mac(SECRET, "alice", NOW, NONCE_TEXT, PATH)
    assert compute_mac(SECRET, "alice", NOW, NONCE_TEXT, HOST, PATH) == mac
    assert (
        request()
        == (
            "GET /autovpn/tunnel HTTP/1.1\r\n"
            "Host: vpn.example\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: autovpn.2\r\n"
            f'Authorization: AutoVPN-HMAC user="alice", ts="{NOW}", nonce="{NONCE_TEXT}", '
            f'mac="{mac}"\r\n'
            "autovpn-masking: none\r\n"
            "\r\n"
        ).encode()
    )


def test_request_without_unmasking_and_with_extra_headers() -> None:
    raw = request(unmasked=False, extra_headers=(("User-Agent", "autovpn/0.1"),))
    assert b"autovpn-masking" not in raw
    assert raw.endswith(b"\r\nUser-Agent: autovpn/0.1\r\n\r\n")


def test_mac_is_unpadded_base64url_of_sha256() -> None:
    mac = compute_mac(b"k", "u", 0, "n", "h", "/")
    assert len(mac) == 43 and "=" not in mac and "+" not in mac and "/" not in mac


@pytest.mark.parametrize(
    ("prefix", "path"),
    [("autovpn", "/autovpn/tunnel"), ("/a/b/", "/a/b/tunnel"), ("", "/tunnel"), ("/", "/tunnel")],
)
def test_tunnel_path(prefix: str, path: str) -> None:
    assert tunnel_path(prefix) == path


def test_default_tunnel_path() -> None:
    assert tunnel_path() == PATH


# -- reading the upgrade's heads (http1's grammar, the tunnel's bounds) -------------------------


def test_upgrade_head_incomplete_then_complete_keeps_what_follows() -> None:
    raw = request() + b"\x82\x00early"
    parser = RequestHeadParser(REQUEST_LIMITS)
    head = None
    for i in range(len(raw)):
        head = parser.receive_data(raw[i : i + 1])
        if head is not None:
            break
    assert head is not None
    assert parser.trailing_data + raw[i + 1 :] == b"\x82\x00early"
    assert head.start_line == "GET /autovpn/tunnel HTTP/1.1"
    assert head.get("host") == "vpn.example"
    assert head.get("sec-websocket-version") == "13"
    assert head.get("missing", "dflt") == "dflt"


def test_upgrade_head_fields_keep_order_and_repetitions() -> None:
    head = answer_of(b"HTTP/1.1 101 OK\r\nX-A:  one \r\nx-a:two\r\nUpgrade:\twebsocket\r\n\r\n")
    assert head.headers == (("X-A", "one"), ("x-a", "two"), ("Upgrade", "websocket"))
    assert head.get("x-a") == "one"
    assert head.get_all("X-A") == ["one", "two"]
    assert head.get_all("nope") == []


@pytest.mark.parametrize(
    "line",
    [b"no colon here", b": empty name", b"Bad Name: x", b" Folded: x", b"Name : x", b"\tTab: x"],
)
def test_upgrade_request_malformed_header_lines_are_400(line: bytes) -> None:
    with pytest.raises(HttpError) as info:
        head_of(b"GET / HTTP/1.1\r\n" + line + b"\r\n\r\n")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "line",
    [
        b"GET /a",
        b"GET /a HTTP/2",
        b"GET  /a HTTP/1.1",
        b"GET /a HTTP/1.1 x",
        b"GET /a\x01 HTTP/1.1",
    ],
)
def test_upgrade_request_malformed_request_lines_are_400(line: bytes) -> None:
    with pytest.raises(HttpError) as info:
        head_of(line + b"\r\nHost: x\r\n\r\n")
    assert info.value.status == 400


def test_upgrade_head_header_count_limit() -> None:
    ok = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * MAX_HEADERS + b"\r\n"
    assert len(head_of(ok).headers) == MAX_HEADERS
    too_many = b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    with pytest.raises(LimitExceeded, match="MAX_HEADERS") as info:
        head_of(too_many)
    assert isinstance(info.value, HttpError) and info.value.status == 400


def _head_of_size(size: int) -> bytes:
    """A complete request head of exactly ``size`` bytes, terminators included."""
    start = b"GET / HTTP/1.1\r\nX: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_upgrade_head_size_limit() -> None:
    assert head_of(_head_of_size(MAX_HEAD_SIZE)).get("x") == "a" * (MAX_HEAD_SIZE - 23)
    with pytest.raises(LimitExceeded, match="MAX_HEAD_SIZE") as info:
        head_of(_head_of_size(MAX_HEAD_SIZE + 1))
    assert isinstance(info.value, HttpError) and info.value.status == 400
    with pytest.raises(LimitExceeded, match="MAX_HEAD_SIZE"):
        ResponseHeadParser(RESPONSE_LIMITS).receive_data(b"H" * (MAX_HEAD_SIZE + 1))


def test_upgrade_head_size_limit_does_not_depend_on_the_split() -> None:
    raw = _head_of_size(MAX_HEAD_SIZE)
    parser = RequestHeadParser(REQUEST_LIMITS)
    assert parser.receive_data(raw[:-1]) is None  # 3 of 4 terminator bytes: must wait
    assert parser.receive_data(raw[-1:]) is not None


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_upgrade_head_random_bytes_raise_only_remote_protocol_errors(data: bytes) -> None:
    for raw in (data, b"GET / HTTP/1.1\r\n" + data + b"\r\n\r\n"):
        with contextlib.suppress(RemoteProtocolError):
            RequestHeadParser(REQUEST_LIMITS).receive_data(raw)
        with contextlib.suppress(RemoteProtocolError):
            ResponseHeadParser(RESPONSE_LIMITS).receive_data(raw)


@settings(max_examples=200)
@given(
    headers=st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True),
            st.from_regex(r"[ -~]{0,40}", fullmatch=True),
        ),
        max_size=10,
    ),
    tail=st.binary(max_size=20),
)
def test_upgrade_head_round_trip(headers: list[tuple[str, str]], tail: bytes) -> None:
    raw = "GET / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    parser = RequestHeadParser(REQUEST_LIMITS)
    head = parser.receive_data(raw.encode() + tail)
    assert head is not None
    assert parser.trailing_data == tail
    assert head.headers == tuple((k, v.strip(" ")) for k, v in headers)


# -- check_response (the client side of RFC 6455 section 4.1) ---------------------------------

GOOD_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"Sec-WebSocket-Protocol: autovpn.2\r\n"
    b"autovpn-challenge: ZGVmZ2hpamtsbW5vcHFycw\r\n"
    b"autovpn-masking: none\r\n"
    b"\r\n"
)


def test_check_response_accepts_101() -> None:
    assert check_response(answer_of(GOOD_RESPONSE), WS_KEY) == ClientResult(2, True, CHALLENGE_TEXT)
    masked = replace_header(GOOD_RESPONSE, b"autovpn-masking", None)
    assert check_response(answer_of(masked), WS_KEY) == ClientResult(2, False, CHALLENGE_TEXT)


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 426, 500, 502])
def test_check_response_refusals_carry_the_status(status: int) -> None:
    raw = f"HTTP/1.1 {status} Whatever\r\n\r\n".encode()
    with pytest.raises(HandshakeError, match=f"HTTP {status}") as info:
        check_response(answer_of(raw), WS_KEY)
    assert info.value.status == status


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\n\r\n",
        b"SPDY/3 101 Upgrade\r\n\r\n",
        b"HTTP/2 101\r\n\r\n",
        b"HTTP/1.1 \xb2 Odd\r\n\r\n",
        b"HTTP/1.1 1010 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade : websocket\r\n\r\n",
    ],
)
def test_unreadable_answers_are_502(raw: bytes) -> None:
    """A status line or field the grammar refuses: the client reads no answer at all."""
    with pytest.raises(HttpError) as info:
        answer_of(raw)
    assert info.value.status == 502


def test_blank_lines_are_no_answer() -> None:
    parser = ResponseHeadParser(RESPONSE_LIMITS)
    assert parser.receive_data(b"\r\n\r\n") is None  # RFC 9112 section 2.2: skipped


@pytest.mark.parametrize(
    "raw",
    [
        replace_header(GOOD_RESPONSE, b"sec-websocket-accept", None),
        replace_header(GOOD_RESPONSE, b"sec-websocket-accept", b"Sec-WebSocket-Accept: x="),
        replace_header(GOOD_RESPONSE, b"sec-websocket-protocol", None),
        replace_header(GOOD_RESPONSE, b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: chat"),
        replace_header(
            GOOD_RESPONSE, b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.1"
        ),
        replace_header(
            GOOD_RESPONSE, b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.3"
        ),
        # a version 1 server's 101, or a challenge that is not 16 bytes of base64url
        replace_header(GOOD_RESPONSE, b"autovpn-challenge", None),
        replace_header(GOOD_RESPONSE, b"autovpn-challenge", b"autovpn-challenge: "),
        replace_header(GOOD_RESPONSE, b"autovpn-challenge", b"autovpn-challenge: AAAA"),
        replace_header(
            GOOD_RESPONSE, b"autovpn-challenge", b"autovpn-challenge: ZGVmZ2hpamtsbW5vcHFyc!"
        ),
        replace_header(
            GOOD_RESPONSE, b"autovpn-challenge", b"autovpn-challenge: ZGVmZ2hpamtsbW5vcHFycw=="
        ),
        replace_header(
            GOOD_RESPONSE, b"autovpn-challenge", b"autovpn-challenge: ZGVmZ2hpamtsbW5vcHFyc\xe9"
        ),
        replace_header(
            GOOD_RESPONSE, b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn."
        ),
    ],
)
def test_check_response_bad_answers_are_502(raw: bytes) -> None:
    with pytest.raises(HandshakeError) as info:
        check_response(answer_of(raw), WS_KEY)
    assert info.value.status == 502


def test_check_response_superscript_version_is_a_handshake_error() -> None:
    raw = replace_header(
        GOOD_RESPONSE, b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.\xb2"
    )
    with pytest.raises(HandshakeError):
        check_response(answer_of(raw), WS_KEY)


@settings(max_examples=300)
@given(
    status=st.integers(100, 599),
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "sec-websocket-accept",
                    "sec-websocket-protocol",
                    "autovpn-masking",
                    "autovpn-challenge",
                ]
            ),
            st.text(alphabet=st.characters(codec="ascii"), max_size=30),
        ),
        max_size=3,
    ),
)
def test_check_response_fuzz_raises_only_handshake_errors(
    status: int, headers: list[tuple[str, str]]
) -> None:
    try:
        check_response(ResponseHead("HTTP/1.1", status, "", tuple(headers)), WS_KEY)
    except HandshakeError:
        pass


# -- accept_request: the server side -----------------------------------------------------------


def test_full_round_trip_client_server_client() -> None:
    accepted = accept(request())
    assert accepted == Accepted("alice", 2, True, GOOD_RESPONSE, expected_proof())
    result = check_response(answer_of(accepted.response), WS_KEY)
    assert result == ClientResult(2, True, CHALLENGE_TEXT)
    proof = compute_proof(SECRET, "alice", NONCE_TEXT, result.challenge, HOST, PATH)
    assert proof == expected_proof()
    check_auth(accepted, frames.TYPE_AUTH, 0, proof)  # passes: returns None


def test_accept_masked_client() -> None:
    accepted = accept(request(unmasked=False))
    assert not accepted.unmasked
    assert b"autovpn-masking" not in accepted.response
    assert check_response(answer_of(accepted.response), WS_KEY) == ClientResult(
        2, False, CHALLENGE_TEXT
    )


def test_accept_picks_a_supported_version_from_a_list() -> None:
    raw = replace_header(
        request(),
        b"sec-websocket-protocol",
        b"Sec-WebSocket-Protocol: chat, autovpn.9, autovpn.2, autovpn.1, autovpn.x",
    )
    assert accept(raw).version == 2


def test_accept_ignores_query_string_and_header_case() -> None:
    raw = request().replace(b"GET /autovpn/tunnel ", b"GET /autovpn/tunnel?x=1 ")
    raw = raw.replace(b"Upgrade: websocket", b"Upgrade: WebSocket")
    raw = raw.replace(b"Connection: Upgrade", b"Connection: keep-alive, upgrade")
    assert accept(raw).user == "alice"


def test_request_target() -> None:
    assert request_target(head_of(b"GET /a?b=c HTTP/1.1\r\n\r\n")) == ("GET", "/a")
    for version in ("HTTP/2.0", "HTTP/0.9"):  # what the grammar lets through
        with pytest.raises(HandshakeError) as info:
            request_target(RequestHead("GET", "/a", version, ()))
        assert info.value.status == 400
        assert info.value.reply == plain_response(400, "Bad Request")


BAD_UPGRADES = [
    request().replace(b"GET ", b"POST ", 1),
    replace_header(request(), b"upgrade", None),
    replace_header(request(), b"upgrade", b"Upgrade: h2c"),
    replace_header(request(), b"connection", b"Connection: keep-alive"),
    replace_header(request(), b"sec-websocket-version", b"Sec-WebSocket-Version: 8"),
    replace_header(request(), b"sec-websocket-version", None),
    replace_header(request(), b"sec-websocket-key", None),
    replace_header(request(), b"sec-websocket-protocol", None),
    replace_header(request(), b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.3"),
    # a version 1 client (its handshake could be replayed): refused, not served
    replace_header(request(), b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.1"),
    # RFC 9112 section 3.2: exactly one Host header
    replace_header(request(), b"host", None),
    request().replace(b"Host: vpn.example\r\n", b"Host: vpn.example\r\nHost: other\r\n"),
]


@pytest.mark.parametrize("raw", BAD_UPGRADES)
def test_rfc6455_4_2_1_not_an_upgrade_is_400(raw: bytes) -> None:
    with pytest.raises(HandshakeError) as info:
        accept(raw)
    assert info.value.status == 400
    assert info.value.reply == plain_response(400, "Bad Request")
    assert info.value.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("auth", [None, b"Authorization: Basic YWxpY2U6eA==", b"Authorization:"])
def test_no_credentials_is_401(auth: bytes | None) -> None:
    raw = replace_header(request(), b"authorization", auth)
    with pytest.raises(AuthenticationFailed) as info:
        accept(raw)
    assert not isinstance(info.value, HandshakeError)
    assert info.value.reply == plain_response(401, "Unauthorized")


FORBIDDEN = plain_response(403, "Forbidden")


def test_plain_response_exact_bytes() -> None:
    assert FORBIDDEN == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n"
        b"Connection: close\r\n\r\n403 Forbidden\n"
    )


def _auth_line(user: str, ts: str, nonce: str, mac: str) -> bytes:
    value = f'AutoVPN-HMAC user="{user}", ts="{ts}", nonce="{nonce}", mac="{mac}"'
    return ("Authorization: " + value).encode("latin-1")


def _with_auth(user: str, ts: str, nonce: str, mac: str) -> bytes:
    return replace_header(request(), b"authorization", _auth_line(user, ts, nonce, mac))


GOOD_MAC = expected_mac(SECRET, "alice", NOW, NONCE_TEXT, PATH)


def compute_v1_mac(secret: bytes, user: str, ts: int, nonce: str, path: str) -> str:
    """Version 1's MAC (no host, no label suffix): a version 2 server must refuse it."""
    msg = f"autovpn-v1\n{user}\n{ts}\n{nonce}\n{path}".encode()
    return base64.urlsafe_b64encode(hmac.new(secret, msg, hashlib.sha256).digest()).decode()[:43]


BAD_CREDENTIALS = {
    "unknown user": request(user="mallory"),
    "wrong secret": request(secret=b"guess"),
    "mac over another path": request(path="/other/tunnel"),
    "host tampered": request().replace(b"Host: vpn.example", b"Host: other.example"),
    "host port added": request().replace(b"Host: vpn.example", b"Host: vpn.example:443"),
    "mac tampered": _with_auth("alice", str(NOW), NONCE_TEXT, GOOD_MAC[:-1] + "A"),
    "mac empty": _with_auth("alice", str(NOW), NONCE_TEXT, ""),
    "mac non-ascii": _with_auth("alice", str(NOW), NONCE_TEXT, "é" * 43),
    "nonce changed": _with_auth("alice", str(NOW), "AAAA", GOOD_MAC),
    "ts changed": _with_auth("alice", str(NOW + 1), NONCE_TEXT, GOOD_MAC),
    "ts not a number": _with_auth("alice", "soon", NONCE_TEXT, GOOD_MAC),
    "ts negative": _with_auth("alice", str(-NOW), NONCE_TEXT, GOOD_MAC),
    "no params": replace_header(request(), b"authorization", b"Authorization: AutoVPN-HMAC x"),
    "v1 mac": _with_auth(
        "alice", str(NOW), NONCE_TEXT, compute_v1_mac(SECRET, "alice", NOW, NONCE_TEXT, PATH)
    ),
    "stale": request(now=NOW - MAX_CLOCK_SKEW - 1),
    "from the future": request(now=NOW + MAX_CLOCK_SKEW + 1),
}


@pytest.mark.parametrize("raw", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_every_credential_failure_is_the_same_bare_403(raw: bytes) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        accept(raw)
    assert info.value.reply == FORBIDDEN


def test_request_for_another_tunnel_path_is_403() -> None:
    """A request MACed for one path (prefix), arriving at a server whose tunnel path is another
    (a path rewritten on the way): the bare 403."""
    for server_path in ("/other/tunnel", "/autovpn/tunnel/", "/tunnel"):
        with pytest.raises(AuthenticationFailed) as info:
            accept_request(
                head_of(request()),
                path=server_path,
                users=USERS,
                replay=ReplayCache(),
                now=NOW,
                challenge=CHALLENGE,
            )
        assert info.value.reply == FORBIDDEN


@pytest.mark.parametrize("skew", [-MAX_CLOCK_SKEW, -1, 0, 1, MAX_CLOCK_SKEW])
def test_timestamp_within_skew_accepted(skew: int) -> None:
    assert accept(request(now=NOW + skew)).user == "alice"


def test_fractional_server_clock_at_the_skew_edge() -> None:
    assert accept(request(), now=NOW + MAX_CLOCK_SKEW).user == "alice"
    with pytest.raises(AuthenticationFailed):
        accept(request(), now=NOW + MAX_CLOCK_SKEW + 0.5)


def test_replayed_request_is_403() -> None:
    replay = ReplayCache()
    raw = request()
    accept(raw, replay=replay)
    with pytest.raises(AuthenticationFailed, match="replayed") as info:
        accept(raw, replay=replay, now=NOW + 1)
    assert info.value.reply == FORBIDDEN
    # A fresh nonce from the same user is fine.
    accept(request(nonce=b"\xff" * 16), replay=replay, now=NOW + 1)


def test_refused_requests_do_not_burn_the_nonce() -> None:
    replay = ReplayCache()
    with pytest.raises(AuthenticationFailed):
        accept(request(secret=b"wrong"), replay=replay)
    with pytest.raises(AuthenticationFailed):
        accept(request(), replay=replay, now=NOW + 10 * MAX_CLOCK_SKEW)
    assert accept(request(), replay=replay).user == "alice"


def test_mac_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module handshake uses
    accept(request())
    for raw in (request(secret=b"wrong"), request(user="nobody")):
        with pytest.raises(AuthenticationFailed):
            accept(raw)
    # One constant-time comparison per request, unknown users included (no user oracle).
    assert len(calls) == 3
    assert calls[0] == (GOOD_MAC.encode(), GOOD_MAC.encode())


def test_superscript_timestamp_is_a_403() -> None:
    with pytest.raises(AuthenticationFailed):
        accept(_with_auth("alice", "\u00b2", NONCE_TEXT, GOOD_MAC))


def test_superscript_protocol_version_is_a_400() -> None:
    raw = replace_header(
        request(), b"sec-websocket-protocol", b"Sec-WebSocket-Protocol: autovpn.\xb2"
    )
    with pytest.raises(HandshakeError):
        accept(raw)


@settings(max_examples=300)
@given(
    raw_headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "upgrade",
                    "connection",
                    "sec-websocket-version",
                    "sec-websocket-key",
                    "sec-websocket-protocol",
                    "authorization",
                    "autovpn-masking",
                ]
            ),
            st.text(alphabet=st.characters(codec="ascii"), max_size=60),
        ),
        max_size=8,
    ),
    start=st.sampled_from(
        [("GET", "/autovpn/tunnel", "HTTP/1.1"), ("GET", "/", "HTTP/1.0"), ("PUT", "x", "HTTP/1.1")]
    ),
)
def test_accept_request_fuzz_raises_only_remote_protocol_errors(
    raw_headers: list[tuple[str, str]], start: tuple[str, str, str]
) -> None:
    try:
        accept_request(
            RequestHead(*start, tuple(raw_headers)),
            path=PATH,
            users=USERS,
            replay=ReplayCache(),
            now=NOW,
            challenge=CHALLENGE,
        )
    except RemoteProtocolError:
        pass


# -- the challenge: the 101's autovpn-challenge and the client's AUTH frame --------------------


def test_auth_frame_exact_bytes() -> None:
    proof = expected_proof()
    # type 10 (AUTH), flags 0, stream 0, length 32, then the raw HMAC
    assert auth_frame(proof) == bytes([10, 0, 0, 0, 0, 0, 0, 0, 0, 32]) + proof
    assert frames.MuxDecoder().feed(auth_frame(proof)) == [(frames.TYPE_AUTH, 0, 0, proof)]


def test_each_101_carries_the_challenge_it_was_given() -> None:
    a = accept(request(), challenge=b"\x00" * CHALLENGE_SIZE)
    b = accept(request(), challenge=b"\xff" * CHALLENGE_SIZE)
    assert b"\r\nautovpn-challenge: AAAAAAAAAAAAAAAAAAAAAA\r\n" in a.response
    assert b"\r\nautovpn-challenge: _____________________w\r\n" in b.response
    assert a.proof == expected_proof(challenge="AAAAAAAAAAAAAAAAAAAAAA")
    assert b.proof == expected_proof(challenge="_____________________w")


def _accepted(challenge: bytes = CHALLENGE) -> Accepted:
    return accept(request(), challenge=challenge)


BAD_PROOFS = {
    "wrong secret": expected_proof(b"guess"),
    "another challenge (a recorded AUTH)": expected_proof(challenge="AAAAAAAAAAAAAAAAAAAAAA"),
    "tampered host": expected_proof(host="other.example"),
    "tampered path": expected_proof(path="/other/tunnel"),
    "another nonce": expected_proof(nonce="AAAAAAAAAAAAAAAAAAAAAA"),
    "another user": expected_proof(user="bob"),
    "the request's MAC": base64.urlsafe_b64decode(GOOD_MAC + "="),
    "truncated": expected_proof()[:-1],
    "one byte more": expected_proof() + b"\x00",
    "empty": b"",
}


@pytest.mark.parametrize("proof", BAD_PROOFS.values(), ids=BAD_PROOFS.keys())
def test_wrong_challenge_response_is_refused(proof: bytes) -> None:
    with pytest.raises(AuthenticationFailed, match="wrong challenge response from user 'alice'"):
        check_auth(_accepted(), frames.TYPE_AUTH, 0, proof)


@pytest.mark.parametrize(
    ("ftype", "sid"),
    [
        (frames.TYPE_OPEN, 1),
        (frames.TYPE_DATA, 1),
        (frames.TYPE_DATAGRAM, 1),
        (frames.TYPE_PING, 0),
        (frames.TYPE_WINDOW, 1),
        (frames.TYPE_GOAWAY, 0),
        (frames.TYPE_AUTH, 1),  # AUTH belongs on stream 0
    ],
)
def test_anything_but_auth_first_is_refused(ftype: int, sid: int) -> None:
    with pytest.raises(AuthenticationFailed, match="before AUTH"):
        check_auth(_accepted(), ftype, sid, expected_proof())


def test_proof_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    accepted = _accepted()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    check_auth(accepted, frames.TYPE_AUTH, 0, memoryview(expected_proof()))
    assert calls == [(expected_proof(), expected_proof())]


def test_recorded_handshake_is_worthless_on_another_or_restarted_server() -> None:
    """The sans-I/O core of tests/tunnel/mux/test_replay.py: the exact request bytes and AUTH
    a client sent to one server."""
    raw = request()
    first = accept(raw, challenge=b"\x01" * CHALLENGE_SIZE)
    result = check_response(answer_of(first.response), WS_KEY)
    recorded_auth = compute_proof(SECRET, "alice", NONCE_TEXT, result.challenge, HOST, PATH)
    check_auth(first, frames.TYPE_AUTH, 0, recorded_auth)
    # Another server, or this one restarted: an empty replay cache, so the request passes;
    # but its challenge is new and the recorded AUTH answers the old one.
    elsewhere = accept(raw, replay=ReplayCache(), now=NOW + 30, challenge=b"\x02" * 16)
    with pytest.raises(AuthenticationFailed, match="wrong challenge response"):
        check_auth(elsewhere, frames.TYPE_AUTH, 0, recorded_auth)
    # The same server at once: the replay cache refuses the request itself.
    replay = ReplayCache()
    accept(raw, replay=replay)
    with pytest.raises(AuthenticationFailed, match="replayed nonce"):
        accept(raw, replay=replay, now=NOW + 12)


@settings(max_examples=300)
@given(
    ftype=st.integers(0, 255),
    sid=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=64),
)
def test_check_auth_fuzz_refuses_all_but_the_proof(ftype: int, sid: int, payload: bytes) -> None:
    accepted = _accepted()
    good = (ftype, sid, payload) == (frames.TYPE_AUTH, 0, accepted.proof)
    try:
        check_auth(accepted, ftype, sid, payload)
    except AuthenticationFailed:
        assert not good
    else:
        assert good


@settings(max_examples=300)
@given(position=st.integers(0, 31), bit=st.integers(0, 7))
def test_any_flipped_bit_of_the_proof_is_refused(position: int, bit: int) -> None:
    proof = bytearray(expected_proof())
    proof[position] ^= 1 << bit
    with pytest.raises(AuthenticationFailed):
        check_auth(_accepted(), frames.TYPE_AUTH, 0, bytes(proof))


@settings(max_examples=300)
@given(data=st.data())
def test_mutated_request_raises_only_remote_protocol_errors(data: st.DataObject) -> None:
    """One byte of a good request changed: refused (400/401/403) or, where the byte is one no
    MAC covers (the WebSocket key, say), accepted with the same proof as before."""
    raw = bytearray(request())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]))
    try:
        head = RequestHeadParser(REQUEST_LIMITS).receive_data(raw)
        if head is None:
            return
        accepted = accept_request(
            head,
            path=PATH,
            users=USERS,
            replay=ReplayCache(),
            now=NOW,
            challenge=CHALLENGE,
        )
    except RemoteProtocolError:
        return
    assert accepted.proof == expected_proof()


# -- ReplayCache -------------------------------------------------------------------------------


def test_replay_cache_refuses_a_nonce_seen_within_the_window() -> None:
    cache = ReplayCache(window=10)
    assert cache.check_and_add("a", 0)
    assert not cache.check_and_add("a", 5)
    assert not cache.check_and_add("a", 10)
    assert cache.check_and_add("a", 10.5)  # dropped once older than the window
    assert not cache.check_and_add("a", 11)


def test_replay_cache_default_window_covers_the_timestamp_window() -> None:
    cache = ReplayCache()
    assert cache.check_and_add("n", 0)
    # A request stamped ts is accepted until ts + MAX_CLOCK_SKEW, having been first seen as
    # early as ts - MAX_CLOCK_SKEW: the nonce must be remembered 2 * MAX_CLOCK_SKEW.
    assert not cache.check_and_add("n", 2 * MAX_CLOCK_SKEW)


def test_replay_cache_is_bounded_oldest_first() -> None:
    cache = ReplayCache(window=1000, max_entries=3)
    for nonce in ("a", "b", "c", "d"):
        assert cache.check_and_add(nonce, 0)
    assert cache.check_and_add("a", 1)  # "a" was dropped to make room for "d"
    assert not cache.check_and_add("d", 1)


@settings(max_examples=200)
@given(
    nonces=st.lists(st.sampled_from("abcdefgh"), max_size=60),
    max_entries=st.integers(2, 10),
)
def test_replay_cache_never_forgets_the_most_recent(nonces: list[str], max_entries: int) -> None:
    cache = ReplayCache(window=1000, max_entries=max_entries)
    recent: list[str] = []  # model: nonces added, newest last
    for t, nonce in enumerate(nonces):
        fresh = cache.check_and_add(nonce, t)
        if nonce in recent[-(max_entries - 1) :]:
            assert not fresh
        if fresh:
            recent.append(nonce)


@settings(max_examples=100)
@given(count=st.integers(0, 3000))
def test_replay_cache_memory_is_bounded(count: int) -> None:
    cache = ReplayCache(window=1e9, max_entries=50)
    for i in range(count):
        assert cache.check_and_add(str(i), i)
    # Only the newest entries survive: everything older than the last 50 is fresh again.
    for i in range(max(0, count - 100), max(0, count - 50)):
        assert cache.check_and_add(str(i), count)
