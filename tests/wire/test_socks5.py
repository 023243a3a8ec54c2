"""SOCKS5 (RFC 1928 / RFC 1929), from bytes outward: exact bytes first, then fuzzing."""

from __future__ import annotations

import ast
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import AuthenticationFailed, LocalError, RemoteProtocolError
from autovpn.wire import socks5
from autovpn.wire.auth import Credentials
from autovpn.wire.socks5 import (
    ClientState,
    Command,
    Reply,
    ServerState,
    Socks5AuthError,
    Socks5ClientHandshake,
    Socks5Error,
    Socks5Request,
    Socks5ServerHandshake,
    UdpDatagram,
    decode_address,
    encode_address,
    encode_reply,
    encode_udp_datagram,
    parse_udp_datagram,
)

GREETING_NOAUTH = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"
REQ_CONNECT_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # 127.0.0.1:80
REQ_CONNECT_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"  # example.com:443
REQ_CONNECT_V6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x1f\x90"  # [::1]:8080
AUTH_OK = b"\x01\x04user\x06secret"
USERS = {"user": "secret"}


# --- RFC 1928 §3: method negotiation ---------------------------------------------------------


def test_rfc1928_s3_noauth_selected() -> None:
    server = Socks5ServerHandshake()
    assert server.receive_data(GREETING_NOAUTH) is None
    assert server.data_to_send() == b"\x05\x00"
    assert server.data_to_send() == b""  # cleared on read
    assert server.state is ServerState.REQUEST


def test_rfc1928_s3_noauth_among_several_methods() -> None:
    server = Socks5ServerHandshake()
    assert server.receive_data(b"\x05\x03\x01\x02\x00") is None
    assert server.data_to_send() == b"\x05\x00"


def test_rfc1928_s3_userpass_selected_when_users_configured() -> None:
    server = Socks5ServerHandshake(USERS)
    assert server.receive_data(b"\x05\x02\x00\x02") is None
    assert server.data_to_send() == b"\x05\x02"
    assert server.state is ServerState.AUTH


def test_rfc1928_s3_no_acceptable_methods_with_users() -> None:
    server = Socks5ServerHandshake(USERS)
    with pytest.raises(Socks5AuthError) as info:
        server.receive_data(GREETING_NOAUTH)
    assert info.value.reply == b"\x05\xff"
    assert isinstance(info.value, AuthenticationFailed)
    assert server.state is ServerState.FAILED


def test_rfc1928_s3_no_acceptable_methods_without_users() -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(b"\x05\x01\x01")  # GSSAPI only
    assert info.value.reply == b"\x05\xff"


def test_rfc1928_s3_zero_methods_is_no_acceptable_method() -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(b"\x05\x00")
    assert info.value.reply == b"\x05\xff"


def test_rfc1928_s3_wrong_version_detected_on_first_byte() -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(b"G")
    assert info.value.reply == b""
    assert "version" in str(info.value)


def test_socks4_client_gets_socks4_rejection() -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    assert info.value.reply == b"\x00\x5b\x00\x00\x00\x00\x00\x00"


def test_empty_users_mapping_means_no_auth() -> None:
    server = Socks5ServerHandshake({})
    server.receive_data(GREETING_NOAUTH)
    assert server.data_to_send() == b"\x05\x00"


def test_userpass_only_client_accepted_without_users() -> None:
    # Compatibility: clients configured with credentials may offer only 0x02.
    server = Socks5ServerHandshake()
    server.receive_data(GREETING_USERPASS + b"\x01\x01a\x01b")
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    request = server.receive_data(REQ_CONNECT_V4)
    assert request == Socks5Request(Command.CONNECT, "127.0.0.1", 80)
    assert server.username == "a"


# --- RFC 1929 §2: username/password ------------------------------------------------------------


def test_rfc1929_s2_success() -> None:
    server = Socks5ServerHandshake(USERS)
    server.receive_data(GREETING_USERPASS)
    assert server.data_to_send() == b"\x05\x02"
    assert server.receive_data(AUTH_OK) is None
    assert server.data_to_send() == b"\x01\x00"
    assert server.username == "user"
    assert server.receive_data(REQ_CONNECT_DOMAIN) == Socks5Request(
        Command.CONNECT, "example.com", 443
    )


def test_rfc1929_s2_accepts_credentials_object() -> None:
    server = Socks5ServerHandshake(Credentials(USERS))
    server.receive_data(GREETING_USERPASS + AUTH_OK)
    assert server.data_to_send() == b"\x05\x02\x01\x00"


@pytest.mark.parametrize(
    "auth",
    [
        b"\x01\x04user\x05wrong",
        b"\x01\x05users\x06secret",
        b"\x01\x00\x00",
        b"\x01\x04user\x00",
        b"\x01\x04us\xffr\x06secret",  # not UTF-8
    ],
)
def test_rfc1929_s2_bad_credentials(auth: bytes) -> None:
    server = Socks5ServerHandshake(USERS)
    server.receive_data(GREETING_USERPASS)
    server.data_to_send()
    with pytest.raises(Socks5AuthError) as info:
        server.receive_data(auth)
    assert info.value.reply == b"\x01\x01"
    assert "secret" not in str(info.value)
    assert server.username is None


def test_rfc1929_s2_bad_subnegotiation_version() -> None:
    server = Socks5ServerHandshake(USERS)
    server.receive_data(GREETING_USERPASS)
    with pytest.raises(Socks5AuthError) as info:
        server.receive_data(b"\x05\x04user\x06secret")
    assert info.value.reply == b"\x01\x01"


def test_rfc1929_s2_max_lengths() -> None:
    user, password = "u" * 255, "p" * 255
    server = Socks5ServerHandshake({user: password})
    data = GREETING_USERPASS + b"\x01\xff" + user.encode() + b"\xff" + password.encode()
    assert server.receive_data(data) is None
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    assert server.username == user


# --- RFC 1928 §4/§5: requests and address types ----------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (REQ_CONNECT_V4, Socks5Request(Command.CONNECT, "127.0.0.1", 80)),
        (REQ_CONNECT_DOMAIN, Socks5Request(Command.CONNECT, "example.com", 443)),
        (REQ_CONNECT_V6, Socks5Request(Command.CONNECT, "::1", 8080)),
        (
            b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00",
            Socks5Request(Command.BIND, "0.0.0.0", 0),
        ),
        (
            b"\x05\x03\x00\x01\x0a\x00\x00\x02\x13\x88",
            Socks5Request(Command.UDP_ASSOCIATE, "10.0.0.2", 5000),
        ),
    ],
)
def test_rfc1928_s4_request(request_bytes: bytes, expected: Socks5Request) -> None:
    whole = Socks5ServerHandshake()
    assert whole.receive_data(GREETING_NOAUTH + request_bytes) == expected
    assert whole.data_to_send() == b"\x05\x00"
    assert whole.state is ServerState.DONE
    assert whole.trailing_data == b""

    bytewise = Socks5ServerHandshake()
    data = GREETING_NOAUTH + request_bytes
    results = [bytewise.receive_data(data[i : i + 1]) for i in range(len(data))]
    assert results[-1] == expected
    assert all(r is None for r in results[:-1])  # truncated input: None, not an error
    assert bytewise.data_to_send() == b"\x05\x00"


def test_rfc1928_s5_domain_max_length() -> None:
    name = ("a" * 63 + ".") * 3 + "a" * 63  # 255 octets
    request = b"\x05\x01\x00\x03\xff" + name.encode() + b"\x00\x50"
    server = Socks5ServerHandshake()
    assert server.receive_data(GREETING_NOAUTH + request) == Socks5Request(
        Command.CONNECT, name, 80
    )


def test_rfc1928_s5_utf8_domain_becomes_idna() -> None:
    name = "bücher.de".encode()
    request = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    server = Socks5ServerHandshake()
    result = server.receive_data(GREETING_NOAUTH + request)
    assert result == Socks5Request(Command.CONNECT, "xn--bcher-kva.de", 80)


@pytest.mark.parametrize(
    "domain",
    [b"", b"\xff\xfe", b"exa mple.com", b"evil\x00.com", b"a\r\nb", b"bu\xcc..de"],
)
def test_rfc1928_s5_bad_domain(domain: bytes) -> None:
    request = b"\x05\x01\x00\x03" + bytes((len(domain),)) + domain + b"\x00\x50"
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(GREETING_NOAUTH + request)
    assert info.value.reply == b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"
    assert info.value.reply_code == Reply.GENERAL_FAILURE


@pytest.mark.parametrize("cmd", [0x00, 0x04, 0xFF])
def test_rfc1928_s4_unsupported_command_replies_07(cmd: int) -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(GREETING_NOAUTH + bytes((5, cmd, 0, 1, 1, 2, 3, 4, 0, 80)))
    assert info.value.reply == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert info.value.reply_code == Reply.COMMAND_NOT_SUPPORTED


def test_rfc1928_s4_unsupported_command_after_auth() -> None:
    server = Socks5ServerHandshake(USERS)
    server.receive_data(GREETING_USERPASS + AUTH_OK)
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    with pytest.raises(Socks5Error) as info:
        server.receive_data(b"\x05\x09\x00\x01\x01\x02\x03\x04\x00\x50")
    assert info.value.reply == encode_reply(Reply.COMMAND_NOT_SUPPORTED)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_rfc1928_s5_bad_address_type_replies_08(atyp: int) -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(GREETING_NOAUTH + bytes((5, 1, 0, atyp)))
    assert info.value.reply == b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"
    assert info.value.reply_code == Reply.ADDRESS_TYPE_NOT_SUPPORTED


def test_rfc1928_s4_bad_request_version() -> None:
    server = Socks5ServerHandshake()
    with pytest.raises(Socks5Error) as info:
        server.receive_data(GREETING_NOAUTH + b"\x04\x01\x00\x01\x01\x02\x03\x04\x00\x50")
    assert info.value.reply == encode_reply(Reply.GENERAL_FAILURE)


def test_rfc1928_s4_nonzero_rsv_tolerated() -> None:
    server = Socks5ServerHandshake()
    result = server.receive_data(GREETING_NOAUTH + b"\x05\x01\x07\x01\x01\x02\x03\x04\x00\x50")
    assert result == Socks5Request(Command.CONNECT, "1.2.3.4", 80)


def test_pipelined_greeting_auth_request_and_early_data() -> None:
    server = Socks5ServerHandshake(USERS)
    early = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    result = server.receive_data(GREETING_USERPASS + AUTH_OK + REQ_CONNECT_DOMAIN + early)
    assert result == Socks5Request(Command.CONNECT, "example.com", 443)
    assert server.data_to_send() == b"\x05\x02\x01\x00"
    assert server.trailing_data == early


def test_early_data_preserved_bytewise() -> None:
    server = Socks5ServerHandshake()
    data = GREETING_NOAUTH + REQ_CONNECT_V4
    for i in range(len(data)):
        result = server.receive_data(data[i : i + 1])
    assert result == Socks5Request(Command.CONNECT, "127.0.0.1", 80)
    assert server.trailing_data == b""


def test_memoryview_and_bytearray_input() -> None:
    server = Socks5ServerHandshake()
    assert server.receive_data(bytearray(GREETING_NOAUTH)) is None
    result = server.receive_data(memoryview(REQ_CONNECT_V6 + b"xy"))
    assert result == Socks5Request(Command.CONNECT, "::1", 8080)
    assert server.trailing_data == b"xy"


def test_receive_after_done_or_failed_is_local_error() -> None:
    server = Socks5ServerHandshake()
    server.receive_data(GREETING_NOAUTH + REQ_CONNECT_V4)
    with pytest.raises(LocalError):
        server.receive_data(b"more")
    failed = Socks5ServerHandshake()
    with pytest.raises(Socks5Error):
        failed.receive_data(b"\x00")
    with pytest.raises(LocalError):
        failed.receive_data(b"\x05")


# --- RFC 1928 §6: replies ----------------------------------------------------------------------


@pytest.mark.parametrize("code", list(Reply))
def test_rfc1928_s6_every_reply_code(code: Reply) -> None:
    assert encode_reply(code) == bytes((5, int(code), 0, 1, 0, 0, 0, 0, 0, 0))


def test_rfc1928_s6_reply_ipv4() -> None:
    assert (
        encode_reply(Reply.SUCCEEDED, "192.0.2.1", 1080)
        == b"\x05\x00\x00\x01\xc0\x00\x02\x01\x04\x38"
    )


def test_rfc1928_s6_reply_ipv6() -> None:
    assert encode_reply(Reply.SUCCEEDED, "2001:db8::1", 443) == (
        b"\x05\x00\x00\x04\x20\x01\x0d\xb8" + bytes(11) + b"\x01\x01\xbb"
    )


def test_rfc1928_s6_reply_ipv6_brackets_accepted() -> None:
    assert encode_reply(Reply.SUCCEEDED, "[::1]", 1) == encode_reply(Reply.SUCCEEDED, "::1", 1)


def test_rfc1928_s6_reply_domain() -> None:
    assert encode_reply(Reply.HOST_UNREACHABLE, "proxy.local", 1080) == (
        b"\x05\x04\x00\x03\x0bproxy.local\x04\x38"
    )


def test_encode_reply_accepts_plain_int() -> None:
    assert encode_reply(5) == encode_reply(Reply.CONNECTION_REFUSED)


@pytest.mark.parametrize(
    ("host", "port"), [("a" * 256, 1), ("", 1), ("1.2.3.4", -1), ("1.2.3.4", 65536)]
)
def test_encode_address_rejects_local_misuse(host: str, port: int) -> None:
    with pytest.raises(LocalError):
        encode_address(host, port)


def test_encode_reply_rejects_bad_code() -> None:
    with pytest.raises(LocalError):
        encode_reply(256)


def test_rfc1928_s5_encode_address_each_type() -> None:
    assert encode_address("10.1.2.3", 53) == b"\x01\x0a\x01\x02\x03\x00\x35"
    assert encode_address("::", 53) == b"\x04" + bytes(16) + b"\x00\x35"
    assert encode_address("example.org", 53) == b"\x03\x0bexample.org\x00\x35"
    assert encode_address("bücher.de", 80) == b"\x03\x10xn--bcher-kva.de\x00\x50"


def test_rfc1928_s5_decode_address_offset_and_end() -> None:
    data = b"junk" + encode_address("example.org", 8443) + b"tail"
    assert decode_address(data, 4) == ("example.org", 8443, len(data) - 4)
    assert decode_address(memoryview(data), 4)[:2] == ("example.org", 8443)


@pytest.mark.parametrize("data", [b"", b"\x01\x01\x02", b"\x03\x05ab", b"\x04" + bytes(17)])
def test_rfc1928_s5_decode_address_truncated(data: bytes) -> None:
    with pytest.raises(Socks5Error, match="truncated"):
        decode_address(data)


def test_rfc1928_s5_decode_address_bad_atyp() -> None:
    with pytest.raises(Socks5Error) as info:
        decode_address(b"\x09\x00\x00")
    assert info.value.reply_code == Reply.ADDRESS_TYPE_NOT_SUPPORTED


# --- RFC 1928 §7: UDP --------------------------------------------------------------------------


def test_rfc1928_s7_udp_ipv4() -> None:
    data = b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35payload"
    assert parse_udp_datagram(data) == UdpDatagram(0, "8.8.8.8", 53, b"payload")
    assert encode_udp_datagram("8.8.8.8", 53, b"payload") == data


def test_rfc1928_s7_udp_ipv6_and_domain() -> None:
    v6 = encode_udp_datagram("2001:db8::53", 53, b"q")
    assert v6[:4] == b"\x00\x00\x00\x04"
    assert parse_udp_datagram(v6) == UdpDatagram(0, "2001:db8::53", 53, b"q")
    dom = encode_udp_datagram("dns.google", 853, b"")
    assert dom == b"\x00\x00\x00\x03\x0adns.google\x03\x55"
    assert parse_udp_datagram(memoryview(dom)) == UdpDatagram(0, "dns.google", 853, b"")


def test_rfc1928_s7_udp_frag_reported() -> None:
    data = b"\x00\x00\x02\x01\x01\x01\x01\x01\x00\x35x"
    assert parse_udp_datagram(data).frag == 2


def test_rfc1928_s7_udp_rsv_must_be_zero() -> None:
    with pytest.raises(Socks5Error, match="RSV"):
        parse_udp_datagram(b"\x00\x01\x00\x01\x01\x01\x01\x01\x00\x35")


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x00", b"\x00\x00\x00", b"\x00\x00\x00\x01\x01\x01", b"\x00\x00\x00\x03"]
)
def test_rfc1928_s7_udp_truncated(data: bytes) -> None:
    with pytest.raises(Socks5Error, match="truncated") as info:
        parse_udp_datagram(data)
    assert info.value.reply == b""  # datagrams are dropped, never answered


def test_rfc1928_s7_udp_bad_atyp_has_no_reply() -> None:
    with pytest.raises(Socks5Error) as info:
        parse_udp_datagram(b"\x00\x00\x00\x07abc")
    assert info.value.reply == b""
    assert info.value.reply_code == Reply.ADDRESS_TYPE_NOT_SUPPORTED


# --- client ------------------------------------------------------------------------------------


def run_pair(
    client: Socks5ClientHandshake, server: Socks5ServerHandshake, reply: bytes
) -> tuple[Socks5Request | None, tuple[str, int] | None]:
    """Drive both sides to completion: bytes to the server one at a time, to the client whole."""
    to_server = client.initial_bytes()
    request = None
    for _ in range(10):
        for i in range(len(to_server)):
            got = server.receive_data(to_server[i : i + 1])
            if got is not None:
                request = got
        to_client = server.data_to_send()
        if request is not None:
            to_client += reply
        bound = client.receive_data(to_client)
        if bound is not None:
            return request, bound
        to_server = client.data_to_send()
    return request, None


def test_client_noauth_exact_bytes() -> None:
    client = Socks5ClientHandshake("example.com", 443)
    assert client.initial_bytes() == GREETING_NOAUTH
    assert client.receive_data(b"\x05\x00") is None
    assert client.data_to_send() == REQ_CONNECT_DOMAIN
    assert client.receive_data(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38early") == (
        "127.0.0.1",
        1080,
    )
    assert client.trailing_data == b"early"
    assert client.state is ClientState.DONE


def test_client_userpass_exact_bytes() -> None:
    client = Socks5ClientHandshake("127.0.0.1", 80, username="user", password="secret")
    assert client.initial_bytes() == b"\x05\x02\x00\x02"
    client.receive_data(b"\x05\x02")
    assert client.data_to_send() == AUTH_OK
    client.receive_data(b"\x01\x00")
    assert client.data_to_send() == REQ_CONNECT_V4


def test_client_pipeline() -> None:
    client = Socks5ClientHandshake("::1", 8080, pipeline=True)
    assert client.initial_bytes() == GREETING_NOAUTH + REQ_CONNECT_V6
    assert client.receive_data(b"\x05\x00") is None
    assert client.data_to_send() == b""
    assert client.receive_data(encode_reply(Reply.SUCCEEDED)) == ("0.0.0.0", 0)


@pytest.mark.parametrize("code", [r for r in Reply if r != Reply.SUCCEEDED])
def test_client_failure_reply_codes(code: Reply) -> None:
    client = Socks5ClientHandshake("example.com", 443, pipeline=True)
    client.initial_bytes()
    with pytest.raises(Socks5Error) as info:
        client.receive_data(b"\x05\x00" + encode_reply(code))
    assert info.value.reply_code == code
    assert code.name in str(info.value)
    assert client.state is ClientState.FAILED


def test_client_unknown_failure_code() -> None:
    client = Socks5ClientHandshake("example.com", 443, pipeline=True)
    with pytest.raises(Socks5Error) as info:
        client.receive_data(b"\x05\x00\x05\x42")
    assert info.value.reply_code == 0x42


def test_client_rejected_method_and_auth() -> None:
    client = Socks5ClientHandshake("example.com", 443)
    with pytest.raises(Socks5AuthError):
        client.receive_data(b"\x05\xff")
    client = Socks5ClientHandshake("example.com", 443)
    with pytest.raises(Socks5AuthError):
        client.receive_data(b"\x05\x02")  # server wants auth, we have none
    client = Socks5ClientHandshake("example.com", 443, username="u", password="p")
    client.receive_data(b"\x05\x02")
    with pytest.raises(Socks5AuthError):
        client.receive_data(b"\x01\x01")


def test_client_bad_versions() -> None:
    with pytest.raises(Socks5Error):
        Socks5ClientHandshake("a", 1).receive_data(b"\x04\x00")
    client = Socks5ClientHandshake("a", 1, pipeline=True)
    with pytest.raises(Socks5Error):
        client.receive_data(b"\x05\x00\x04\x00")
    with pytest.raises(LocalError):
        client.receive_data(b"")


def test_client_local_misuse() -> None:
    with pytest.raises(LocalError):
        Socks5ClientHandshake("a", 1, username="u")
    with pytest.raises(LocalError):
        Socks5ClientHandshake("a", 1, username="", password="p")
    with pytest.raises(LocalError):
        Socks5ClientHandshake("a", 70000)


@pytest.mark.parametrize("users", [None, USERS])
@pytest.mark.parametrize("command", list(Command))
@pytest.mark.parametrize("host", ["192.0.2.7", "2001:db8::7", "example.net"])
def test_client_server_pair(users: dict[str, str] | None, command: Command, host: str) -> None:
    creds = ("user", "secret") if users else (None, None)
    client = Socks5ClientHandshake(host, 4242, command, creds[0], creds[1])
    server = Socks5ServerHandshake(users)
    reply = encode_reply(Reply.SUCCEEDED, "198.51.100.1", 50000) + b"server-first"
    request, bound = run_pair(client, server, reply)
    assert request == Socks5Request(command, host, 4242)
    assert bound == ("198.51.100.1", 50000)
    assert client.trailing_data == b"server-first"
    assert server.username == creds[0]


# --- hypothesis ----------------------------------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
)
ports = st.integers(0, 65535)


@settings(max_examples=400)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_server_random_bytes_only_our_errors(data: bytes, with_users: bool) -> None:
    server = Socks5ServerHandshake(USERS if with_users else None)
    try:
        result = server.receive_data(data)
    except Socks5Error as exc:
        assert isinstance(exc.reply, bytes)
        return
    if result is not None:
        assert server.state is ServerState.DONE
        assert 0 <= result.port <= 65535


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_server_after_valid_greeting(data: bytes) -> None:
    server = Socks5ServerHandshake()
    server.receive_data(GREETING_NOAUTH)
    try:
        server.receive_data(b"\x05" + data)
    except Socks5Error as exc:
        assert exc.reply == b"" or exc.reply[:1] == b"\x05"


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_udp_and_decode_address_only_our_errors(data: bytes) -> None:
    for parse in (parse_udp_datagram, decode_address):
        try:
            parse(data)
        except Socks5Error:
            pass


@settings(max_examples=300)
@given(
    hosts,
    ports,
    st.sampled_from(list(Command)),
    st.booleans(),
    st.binary(max_size=40),
    st.data(),
)
def test_fuzz_random_splits_same_result(
    host: str, port: int, command: Command, auth: bool, early: bytes, data: st.DataObject
) -> None:
    stream = (
        (GREETING_USERPASS + AUTH_OK if auth else GREETING_NOAUTH)
        + bytes((5, command, 0))
        + encode_address(host, port)
        + early
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    server = Socks5ServerHandshake(USERS if auth else None)
    results = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if server.state is ServerState.DONE:
            break
        results.append(server.receive_data(stream[start:cut]))
        start = cut
    done = [r for r in results if r is not None]
    assert done == [Socks5Request(command, host, port)]
    assert server.trailing_data == early[: max(0, start - (len(stream) - len(early)))]
    assert server.data_to_send() == (b"\x05\x02\x01\x00" if auth else b"\x05\x00")


@settings(max_examples=300)
@given(hosts, ports, st.binary(max_size=100))
def test_fuzz_udp_roundtrip(host: str, port: int, payload: bytes) -> None:
    assert parse_udp_datagram(encode_udp_datagram(host, port, payload)) == UdpDatagram(
        0, host, port, payload
    )


@settings(max_examples=300)
@given(hosts, ports, st.sampled_from(list(Reply)))
def test_fuzz_address_and_reply_roundtrip(host: str, port: int, code: Reply) -> None:
    encoded = encode_address(host, port)
    assert decode_address(encoded) == (host, port, len(encoded))
    reply = encode_reply(code, host, port)
    assert reply[:3] == bytes((5, code, 0))
    assert decode_address(reply, 3) == (host, port, len(reply))


# --- purity ------------------------------------------------------------------------------------

FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "time"}


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_module_is_pure() -> None:
    path = pathlib.Path(socks5.__file__)
    imported = imported_modules(path)
    assert imported
    assert not imported & FORBIDDEN
    assert isinstance(Socks5Error("x"), RemoteProtocolError)
