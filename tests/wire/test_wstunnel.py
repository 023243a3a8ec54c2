"""wstunnel v10 on the wire, from bytes outward: the examples of docs/wstunnel-protocol.md byte
for byte (sections named in each test), then the server's checks in order, the session rules, the
restrictions file, then hypothesis fuzzing of every parser."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import ConfigError, RemoteProtocolError
from autovpn.tunnel.wstunnel.restrictions import Restrictions
from autovpn.wire import wstunnel
from autovpn.wire.handshake import REQUEST_LIMITS
from autovpn.wire.http1 import RequestHead, RequestHeadParser
from autovpn.wire.websocket import Opcode, WsDecoder, encode_frame
from autovpn.wire.wstunnel import (
    Claims,
    Duration,
    Kind,
    LocalProtocol,
    Session,
    SessionState,
    WstunnelRejected,
)
from tests.wire.test_handshake import answer_of, head_of

# -- section 2.4: the example tokens, signed with champignonfrais ------------------------------

TOKEN_A = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpZCI6IjAxOTI0N2E2LTdjM2UtN2IyMS05ZDRlLTNmMGMyYTFiNWQ2"
    "MCIsInAiOnsiVGNwIjp7InByb3h5X3Byb3RvY29sIjpmYWxzZX19LCJyIjoiZ29vZ2xlLmNvbSIsInJwIjo0NDN9.XiavR"
    "W9eG3S8BZU7-VyQ4tCiR5vYIJP_5wLQfVlou6Q"
)
TOKEN_B = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpZCI6IjAxOTI0N2E2LTdjM2UtN2IyMS05ZDRlLTNmMGMyYTFiNWQ2"
    "MSIsInAiOnsiVWRwIjp7InRpbWVvdXQiOm51bGx9fSwiciI6IjEyNy4wLjAuMSIsInJwIjo1MTgyMH0.XhXHNyfdIKTnq"
    "19M9lO4A4hPKU7gxasqeNyG1rOUYrc"
)


def test_2_1_header_is_exactly_typ_then_alg() -> None:
    assert base64.urlsafe_b64encode(wstunnel.JWT_HEADER).rstrip(b"=") == (
        wstunnel.JWT_HEADER_B64.encode()
    )


def test_2_4_a_tcp_tunnel_token_byte_for_byte() -> None:
    claims = Claims(
        "019247a6-7c3e-7b21-9d4e-3f0c2a1b5d60",
        wstunnel.TCP,
        wstunnel.format_host("google.com"),
        443,
    )
    assert claims.payload() == (
        b'{"id":"019247a6-7c3e-7b21-9d4e-3f0c2a1b5d60","p":{"Tcp":{"proxy_protocol":false}},'
        b'"r":"google.com","rp":443}'
    )
    assert claims.encode() == TOKEN_A
    assert Claims.decode(TOKEN_A) == claims


def test_2_4_b_udp_wireguard_token_with_null_timeout() -> None:
    claims = Claims(
        "019247a6-7c3e-7b21-9d4e-3f0c2a1b5d61", LocalProtocol(Kind.UDP), "127.0.0.1", 51820
    )
    assert claims.encode() == TOKEN_B
    assert Claims.decode(TOKEN_B) == claims


def test_2_4_d_reverse_socks5_with_credentials_and_bracketed_ipv6() -> None:
    p = LocalProtocol(Kind.REVERSE_SOCKS5, timeout=Duration(30), credentials=("admin", "admin"))
    claims = Claims("x", p, wstunnel.format_host("::1"), 1212)
    assert json.loads(claims.payload()) == {
        "id": "x",
        "p": {
            "ReverseSocks5": {
                "timeout": {"secs": 30, "nanos": 0},
                "credentials": ["admin", "admin"],
            }
        },
        "r": "[::1]",
        "rp": 1212,
    }


EVERY_VARIANT = [
    (LocalProtocol(Kind.TCP, proxy_protocol=True), '{"Tcp":{"proxy_protocol":true}}'),
    (LocalProtocol(Kind.UDP, timeout=Duration(30)), '{"Udp":{"timeout":{"secs":30,"nanos":0}}}'),
    (LocalProtocol(Kind.UDP), '{"Udp":{"timeout":null}}'),
    (LocalProtocol(Kind.REVERSE_TCP), '"ReverseTcp"'),
    (
        LocalProtocol(Kind.REVERSE_UDP, timeout=Duration(30)),
        '{"ReverseUdp":{"timeout":{"secs":30,"nanos":0}}}',
    ),
    (
        LocalProtocol(Kind.REVERSE_SOCKS5, timeout=Duration(30)),
        '{"ReverseSocks5":{"timeout":{"secs":30,"nanos":0},"credentials":null}}',
    ),
    (
        LocalProtocol(Kind.REVERSE_HTTP_PROXY, timeout=Duration(30)),
        '{"ReverseHttpProxy":{"timeout":{"secs":30,"nanos":0},"credentials":null}}',
    ),
    (
        LocalProtocol(Kind.REVERSE_UNIX, path="/tmp/x.sock"),
        '{"ReverseUnix":{"path":"/tmp/x.sock"}}',
    ),
    (LocalProtocol(Kind.STDIO), '{"Stdio":{"proxy_protocol":false}}'),
    (
        LocalProtocol(Kind.UNIX, path="/s", proxy_protocol=True),
        '{"Unix":{"path":"/s","proxy_protocol":true}}',
    ),
    (
        LocalProtocol(Kind.SOCKS5, timeout=Duration(1, 500), credentials=("u", "p")),
        '{"Socks5":{"timeout":{"secs":1,"nanos":500},"credentials":["u","p"]}}',
    ),
    (
        LocalProtocol(Kind.HTTP_PROXY),
        '{"HttpProxy":{"timeout":null,"credentials":null,"proxy_protocol":false}}',
    ),
    (LocalProtocol(Kind.TPROXY_TCP), '"TProxyTcp"'),
    (LocalProtocol(Kind.TPROXY_UDP), '{"TProxyUdp":{"timeout":null}}'),
]


@pytest.mark.parametrize(("protocol", "text"), EVERY_VARIANT)
def test_2_3_p_serialisation_of_every_variant(protocol: LocalProtocol, text: str) -> None:
    assert json.dumps(protocol.to_json(), separators=(",", ":")) == text
    assert LocalProtocol.from_json(json.loads(text)) == protocol


def test_2_3_client_side_variants_go_on_the_wire_as_tcp_or_udp() -> None:
    assert LocalProtocol(Kind.STDIO, proxy_protocol=True).on_wire() == LocalProtocol(
        Kind.TCP, proxy_protocol=True
    )
    assert LocalProtocol(Kind.SOCKS5, credentials=("a", "b")).on_wire() == wstunnel.TCP
    assert LocalProtocol(Kind.TPROXY_UDP, timeout=Duration(5)).on_wire() == LocalProtocol(
        Kind.UDP, timeout=Duration(5)
    )


def test_2_3_proxy_protocol_has_no_default_and_duration_needs_both_keys() -> None:
    with pytest.raises(ValueError):
        LocalProtocol.from_json({"Tcp": {}})
    with pytest.raises(ValueError):
        LocalProtocol.from_json({"Udp": {"timeout": {"secs": 3}}})
    # a missing Option decodes as null
    assert LocalProtocol.from_json({"Udp": {}}) == LocalProtocol(Kind.UDP)


def test_2_2_server_does_not_verify_the_signature_but_needs_a_known_alg() -> None:
    head, payload, _ = TOKEN_A.split(".")
    assert Claims.decode(f"{head}.{payload}.AAAA").port == 443  # any key: 10.0.2+ clients
    none_head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    with pytest.raises(ValueError):
        Claims.decode(f"{none_head}.{payload}.")
    with pytest.raises(ValueError):
        Claims.decode(f"{head}=.{payload}.x")  # padding is refused (URL_SAFE_NO_PAD)


def test_uuid_v7_tunnel_id_shape() -> None:
    tid = wstunnel.new_tunnel_id(0x019247A67C3E, bytes(range(10)))
    assert tid.startswith("019247a6-7c3e-7")
    assert tid[19] in "89ab"


# -- section 1.2: the upgrade request ---------------------------------------------------------

KEY = b"the sample nonce"  # RFC 6455 section 1.3: dGhlIHNhbXBsZSBub25jZQ==


def test_1_2_upgrade_request_headers_in_order() -> None:
    request = wstunnel.build_upgrade_request(
        host=wstunnel.host_header("example.com", 8443), jwt=TOKEN_A, ws_key=KEY
    )
    assert request == (
        b"GET /v1/events HTTP/1.1\r\n"
        b"host: example.com:8443\r\n"
        b"upgrade: websocket\r\n"
        b"connection: upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"sec-websocket-version: 13\r\n"
        b"sec-websocket-protocol: v1, authorization.bearer." + TOKEN_A.encode() + b"\r\n\r\n"
    )


def test_1_2_host_header_defaults() -> None:
    assert wstunnel.host_header("example.com", 443) == "example.com"
    assert wstunnel.host_header("example.com", 80) == "example.com"
    assert wstunnel.host_header("::1", 8443) == "[::1]:8443"


def test_1_2_h_headers_credentials_and_file_override_in_that_order() -> None:
    request = wstunnel.build_upgrade_request(
        host="h",
        jwt="j.w.t",
        ws_key=KEY,
        path_prefix="secret",
        headers=[("Host", "cdn.example"), ("Authorization", "Bearer x"), ("X-A", "1")],
        credentials="user:pass",
        file_headers=wstunnel.parse_headers_file("X-A: 2\n\nnot a header\nX-B: 3\n"),
    )
    text = request.decode()
    assert text.startswith("GET /secret/events HTTP/1.1\r\n")
    assert "\r\nhost: cdn.example\r\n" in text and "host: h\r\n" not in text
    assert f"authorization: Basic {base64.b64encode(b'user:pass').decode()}\r\n" in text
    assert "Bearer x" not in text
    assert "x-a: 2\r\n" in text and "x-a: 1" not in text and "x-b: 3\r\n" in text


# -- sections 1.3 and 1.4: the server's checks, in order, and its answers ----------------------


def request(path: str = "/v1/events", jwt: str = TOKEN_A, **extra: str) -> RequestHead:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: v1, authorization.bearer.{jwt}",
    ]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    for name, value in extra.items():
        name = name.replace("_", "-")
        if value == "":
            headers.pop(name, None)
        else:
            headers[name] = value
    raw = "\r\n".join([lines[0], *(f"{k}: {v}" for k, v in headers.items())]) + "\r\n\r\n"
    return head_of(raw.encode())


def test_1_3_a_good_request() -> None:
    req = wstunnel.check_request(request())
    assert (req.path_prefix, req.host, req.claims.port) == ("v1", "google.com", 443)
    assert req.authorization is None and req.forwarded_for is None


def test_1_3_check_1_upgrade_headers_come_before_the_path() -> None:
    with pytest.raises(WstunnelRejected, match="upgrade"):
        wstunnel.check_request(request("/nowhere", Upgrade=""))


def test_1_3_check_2_x_forwarded_for_first_ip() -> None:
    req = wstunnel.check_request(request(**{"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}))
    assert req.forwarded_for == "203.0.113.9"


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/v1/events", True),
        ("/p/a/b/events", True),
        ("/p/xevents", True),
        ("/v1/events?x=1", True),
        ("/events", False),
        ("/v1/event", False),
        ("v1/events", False),
    ],
)
def test_1_3_check_3_path_prefix(path: str, ok: bool) -> None:
    if ok:
        wstunnel.check_request(request(path))
    else:
        with pytest.raises(WstunnelRejected):
            wstunnel.check_request(request(path))


def test_1_3_check_4_mtls_cn_must_equal_prefix() -> None:
    wstunnel.check_request(request("/alice/events"), client_cn="alice")
    with pytest.raises(WstunnelRejected, match="CN"):
        wstunnel.check_request(request("/v1/events"), client_cn="alice")


def test_1_3_check_5_jwt_from_cookie_and_trailing_text_breaks_it() -> None:
    head = request(Sec_WebSocket_Protocol="", Cookie=TOKEN_A)
    assert wstunnel.check_request(head).claims.host == "google.com"
    # Trailing text after the JWT lands in the signature part: still decodes (no verification).
    wstunnel.check_request(request(jwt=TOKEN_A + ", v2"))
    with pytest.raises(WstunnelRejected, match="JWT"):
        wstunnel.check_request(request(jwt="garbage"))
    with pytest.raises(WstunnelRejected, match="JWT"):
        wstunnel.check_request(request(Sec_WebSocket_Protocol=""))


def test_1_3_check_6_unbracketed_ipv6_host_is_refused() -> None:
    good = Claims("i", wstunnel.TCP, "[::1]", 22).encode()
    assert wstunnel.check_request(request(jwt=good)).host == "::1"
    bad = Claims("i", wstunnel.TCP, "::1", 22).encode()
    with pytest.raises(WstunnelRejected):
        wstunnel.check_request(request(jwt=bad))


def test_2_3_client_only_variants_are_refused_by_the_server() -> None:
    jwt = Claims("i", LocalProtocol(Kind.STDIO), "a.b", 22).encode()
    with pytest.raises(WstunnelRejected, match="client-side"):
        wstunnel.check_request(request(jwt=jwt))


def test_1_4_answers_101_and_400() -> None:
    assert wstunnel.accept_upgrade(request()) == (
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: v1\r\n\r\n"
    )
    assert b"\r\ncookie: abc\r\n" in wstunnel.accept_upgrade(request(), cookie="abc")
    with pytest.raises(WstunnelRejected) as info:
        wstunnel.accept_upgrade(request(Sec_WebSocket_Version="8"))
    assert info.value.reply.startswith(b"HTTP/1.1 400 ")
    assert info.value.reply.endswith(b"\r\n\r\nInvalid request")


def test_1_4_client_checks_only_status_upgrade_and_connection() -> None:
    ok = answer_of(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    assert wstunnel.check_upgrade_response(ok).cookie is None
    with pytest.raises(WstunnelRejected, match="400"):
        wstunnel.check_upgrade_response(answer_of(wstunnel.INVALID_REQUEST[:-15]))


# -- section 3: the session --------------------------------------------------------------------


def test_3_4_client_frames_carry_the_zero_mask_and_server_frames_none() -> None:
    client, server = Session(client=True), Session(client=False)
    assert client.data_header(3) == b"\x82\x83\x00\x00\x00\x00"
    assert server.data_header(3) == b"\x82\x03"


def test_3_4_server_unmasks_masked_frames_and_takes_unmasked_ones() -> None:
    server = Session(client=False)
    pieces = server.receive(encode_frame(Opcode.BINARY, b"hello", b"\x01\x02\x03\x04"))
    assert b"".join(bytes(p) for p in pieces) == b"hello"
    pieces = server.receive(encode_frame(Opcode.BINARY, b"plain"))
    assert b"".join(bytes(p) for p in pieces) == b"plain"


def test_3_5_each_ping_gets_exactly_one_pong_and_no_pong_is_unsolicited() -> None:
    session = Session(client=False)
    session.receive(encode_frame(Opcode.PING, b"a") + encode_frame(Opcode.PING, b""))
    out = session.data_to_send()
    assert out == encode_frame(Opcode.PONG, b"a") + encode_frame(Opcode.PONG, b"")
    session.receive(encode_frame(Opcode.PONG, b"unsolicited"))  # ignored, counter stays at 0
    assert session.data_to_send() == b"" and session.pings_in_flight == 0


def test_3_5_three_unanswered_pings_abort() -> None:
    session = Session(client=True)
    assert session.ping_tick() and session.ping_tick() and session.ping_tick()
    assert session.pings_in_flight == 3
    assert not session.ping_tick()
    session.receive(encode_frame(Opcode.PONG, b""))
    assert session.ping_tick()
    decoded = WsDecoder().feed(session.data_to_send())
    assert [op for op, _ in decoded] == [Opcode.PING] * 4


def test_3_6_close_1000_once_and_answer_a_peer_close() -> None:
    session = Session(client=False)
    session.close()
    session.close()
    assert session.data_to_send() == b"\x88\x02\x03\xe8"
    session.receive(encode_frame(Opcode.CLOSE, b"\x03\xe8"))
    assert session.data_to_send() == b"" and session.state is SessionState.CLOSED
    peer_first = Session(client=False)
    peer_first.receive(encode_frame(Opcode.CLOSE, b"\x03\xe8", b"\x00\x00\x00\x00"))
    assert peer_first.data_to_send() == b"\x88\x02\x03\xe8"
    assert peer_first.close_code == 1000


def test_3_3_a_32_mib_frame_streams_through() -> None:
    size = 32 << 20
    session = Session(client=False)
    wire = Session(client=True).data_header(size)
    assert session.receive(wire) == []
    got = 0
    chunk = bytes(1 << 20)
    for _ in range(32):
        got += sum(len(p) for p in session.receive(chunk))
    assert got == size


# -- section 5.1: restrictions -----------------------------------------------------------------

RESTRICTIONS = """
restrictions:
  - name: "ssh only for the secret path"
    match:
      - !PathPrefix "^my-secret$"
      - !Authorization "^[Bb]earer +token$"
    allow:
      - !Tunnel
        protocol: [Tcp]
        port: [22, 8000..8010]
        host: ^localhost$
        cidr: [127.0.0.1/32]
      - !ReverseTunnel
        protocol: [Socks5]
        port: [1080]
        port_mapping: ["1080:2080"]
  - name: "nothing else"
    match:
      - !Any
    allow: []
"""


def claims(kind: Kind, host: str, port: int) -> Claims:
    return Claims("i", LocalProtocol(kind), host, port)


def test_5_1_restrictions_file_semantics() -> None:
    rules = Restrictions.from_yaml(RESTRICTIONS)
    auth = "Bearer  token"
    ok = rules.check("my-secret", auth, claims(Kind.TCP, "localhost", 22), "localhost")
    assert ok is not None and ok.rule.name == "ssh only for the secret path"
    assert rules.check("my-secret", auth, claims(Kind.TCP, "127.0.0.1", 8005), "127.0.0.1")
    assert not rules.check("my-secret", auth, claims(Kind.TCP, "127.0.0.2", 22), "127.0.0.2")
    assert not rules.check("my-secret", auth, claims(Kind.UDP, "localhost", 22), "localhost")
    assert not rules.check("my-secret", None, claims(Kind.TCP, "localhost", 22), "localhost")
    assert not rules.check("other", auth, claims(Kind.TCP, "localhost", 22), "localhost")
    rev = rules.check("my-secret", auth, claims(Kind.REVERSE_SOCKS5, "[::1]", 1080), "::1")
    assert rev is not None and rev.bind_port(1080) == 2080
    # a domain bind address is always refused for reverse tunnels
    assert not rules.check("my-secret", auth, claims(Kind.REVERSE_SOCKS5, "lo", 1080), "lo")


def test_5_1_the_example_file_parses() -> None:
    rules = Restrictions.from_yaml(
        "restrictions:\n  - name: x\n    match:\n      - !Any\n    allow:\n"
        "      - !Tunnel\n      - !ReverseTunnel\n"
    )
    assert rules.check("p", None, claims(Kind.REVERSE_TCP, "0.0.0.0", 1), "0.0.0.0")
    with pytest.raises(ConfigError):
        Restrictions.from_yaml("restrictions:\n  - name: x\n    match: []\n    allow: []\n")
    with pytest.raises(ConfigError):
        Restrictions.from_yaml("restrictions:\n  - match: [!Nope]\n")


def test_5_1_flags_restrict_to_and_path_prefix() -> None:
    rules = Restrictions.from_flags(["localhost:51820", "[::1]:22"], ["s3cret"])
    tcp = claims(Kind.TCP, "localhost", 51820)
    assert rules.check("s3cret", None, tcp, "localhost")
    assert not rules.check("v1", None, tcp, "localhost")
    # a domain rule matches the JWT's r string, not its address
    assert not rules.check("s3cret", None, claims(Kind.TCP, "127.0.0.1", 51820), "127.0.0.1")
    assert rules.check("s3cret", None, claims(Kind.TCP, "[::1]", 22), "::1")
    # --restrict-to forbids reverse tunnels
    assert not rules.check("s3cret", None, claims(Kind.REVERSE_TCP, "[::1]", 22), "::1")
    # no restriction configured: forward tunnels anywhere (the destination policy still
    # applies), reverse tunnels only on the server's loopback, never unix sockets
    everything = Restrictions.from_flags()
    assert everything.check("any", None, tcp, "localhost")
    assert everything.check("any", None, claims(Kind.REVERSE_TCP, "127.0.0.1", 9), "127.0.0.1")
    assert not everything.check("any", None, claims(Kind.REVERSE_TCP, "0.0.0.0", 9), "0.0.0.0")


# -- fuzzing -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_jwt_decode_raises_only_value_errors(token: str) -> None:
    try:
        Claims.decode(token)
    except (ValueError, RemoteProtocolError):
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 65), 1 << 65) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        json_values,
        st.sampled_from([k.value for k in Kind]),
        st.builds(lambda k, b: {k: b}, st.sampled_from([k.value for k in Kind]), json_values),
    )
)
def test_fuzz_local_protocol_from_json(value: object) -> None:
    try:
        decoded = LocalProtocol.from_json(value)
    except ValueError:
        return
    assert LocalProtocol.from_json(decoded.to_json()) == decoded


durations = st.builds(Duration, st.integers(0, 1 << 40), st.integers(0, 999_999_999))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(list(Kind)),
    st.booleans(),
    st.none() | durations,
    st.none() | st.tuples(st.text(max_size=5), st.text(max_size=5)),
    st.text(max_size=10),
    st.text(max_size=20),
    st.integers(0, 65535),
)
def test_fuzz_claims_roundtrip(
    kind: Kind,
    pp: bool,
    timeout: Duration | None,
    creds: tuple[str, str] | None,
    path: str,
    tid: str,
    port: int,
) -> None:
    fields = wstunnel._FIELDS[kind] or ()
    protocol = LocalProtocol(
        kind,
        proxy_protocol=pp if "proxy_protocol" in fields else False,
        timeout=timeout if "timeout" in fields else None,
        credentials=creds if "credentials" in fields else None,
        path=path if "path" in fields else "",
    )
    c = Claims(tid, protocol, "example.org", port)
    assert Claims.decode(c.encode(b"any random key")) == c


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_check_request_refuses_with_400_only(raw: bytes) -> None:
    try:
        parser = RequestHeadParser(REQUEST_LIMITS)
        head = parser.receive_data(b"GET /v1/events HTTP/1.1\r\n" + raw + b"\r\n\r\n")
    except RemoteProtocolError:
        return
    if head is None:
        return
    try:
        wstunnel.check_request(head)
    except WstunnelRejected as exc:
        assert exc.reply == wstunnel.INVALID_REQUEST


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300))
def test_fuzz_session_receive(wire: bytes, cut: int) -> None:
    session = Session(client=False)
    try:
        session.receive(wire[:cut])
        session.receive(wire[cut:])
    except RemoteProtocolError:
        return
    out = session.data_to_send()
    # whatever we answer is pongs and at most one close, never unsolicited
    for opcode, _ in WsDecoder().feed(out):
        assert opcode in (Opcode.PONG, Opcode.CLOSE)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_fuzz_parse_host(text: str) -> None:
    try:
        host = wstunnel.parse_host(text)
    except ValueError:
        return
    assert host and "/" not in host


def test_3_2_frame_splitter_cuts_whole_frames_for_udp() -> None:
    wire = encode_frame(Opcode.BINARY, b"a" * 300) + encode_frame(Opcode.PING, b"") + b"\x82"
    splitter = wstunnel.FrameSplitter()
    frames = splitter.feed(wire[:5]) + splitter.feed(wire[5:])
    assert frames == [encode_frame(Opcode.BINARY, b"a" * 300), encode_frame(Opcode.PING, b"")]
    with pytest.raises(RemoteProtocolError):
        wstunnel.FrameSplitter().feed(Session(client=False).data_header(1 << 20))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=70000), max_size=4), st.integers(1, 5000))
def test_fuzz_frame_splitter_keeps_boundaries(payloads: list[bytes], step: int) -> None:
    wire = b"".join(encode_frame(Opcode.BINARY, p, b"\x01\x02\x03\x04") for p in payloads)
    splitter = wstunnel.FrameSplitter(limit=1 << 20)
    frames: list[bytes] = []
    for i in range(0, len(wire), step):
        frames += splitter.feed(wire[i : i + step])
    session = Session(client=False)
    assert [b"".join(bytes(x) for x in session.receive(f)) for f in frames] == payloads
