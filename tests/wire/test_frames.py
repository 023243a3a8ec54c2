"""The mux frame codec (docs/protocol.md), from bytes outward: exact bytes first, then fuzzing."""

from __future__ import annotations

import ipaddress
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import LimitExceeded, RemoteProtocolError, ResetReason
from autovpn.wire import frames
from autovpn.wire.frames import (
    FLAG_ACK,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    MAX_EARLY_DATA,
    MAX_RESET_MESSAGE,
    Frame,
    FrameType,
    MuxDecoder,
    StreamKind,
    data_header,
    decode_address,
    decode_open,
    decode_reset,
    decode_u32,
    encode_address,
    encode_open,
    encode_reset,
    frame,
)

Plain = tuple[int, int, int, bytes]


def normalize(decoded: Sequence[Frame]) -> list[Plain]:
    """Copy payloads and join runs of DATA pieces of one stream, so any split compares equal."""
    out: list[Plain] = []
    for ftype, flags, stream, payload in decoded:
        data = bytes(payload)
        if ftype == FrameType.DATA and out:
            last = out[-1]
            if last[0] == FrameType.DATA and last[1] == flags and last[2] == stream:
                out[-1] = (last[0], flags, stream, last[3] + data)
                continue
        out.append((int(ftype), flags, stream, data))
    return out


def feed_split(stream: bytes, cuts: list[int]) -> list[Plain]:
    """Feed ``stream`` cut at ``cuts``; copies each piece before the next feed (the contract)."""
    decoder = MuxDecoder()
    decoded: list[Frame] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        decoded.extend((t, f, s, bytes(p)) for t, f, s, p in decoder.feed(stream[lo:hi]))
    return normalize(decoded)


# -- exact bytes, one per frame type (docs/protocol.md) ---------------------------------------

OPEN_PAYLOAD = (
    b"\x00\x01\x00\x00"  # window 65536
    b"\x01"  # kind TCP
    b"\x03\x0bexample.com\x01\xbb"  # ATYP domain, example.com:443
    b"GET"  # early data
)

EXACT: list[tuple[str, bytes, Plain]] = [
    (
        "OPEN",
        b"\x01\x00\x00\x00\x00\x01\x00\x00\x00\x17" + OPEN_PAYLOAD,
        (1, 0, 1, OPEN_PAYLOAD),
    ),
    (
        "OPEN_OK",
        b"\x02\x00\x00\x00\x00\x01\x00\x00\x00\x04\x00\x01\x00\x00",
        (2, 0, 1, b"\x00\x01\x00\x00"),
    ),
    ("DATA", b"\x03\x00\x00\x00\x00\x05\x00\x00\x00\x05hello", (3, 0, 5, b"hello")),
    (
        "WINDOW",
        b"\x04\x00\x00\x00\x00\x03\x00\x00\x00\x04\x00\x00\x80\x00",
        (4, 0, 3, b"\x00\x00\x80\x00"),
    ),
    ("FIN", b"\x05\x00\x00\x00\x00\x01\x00\x00\x00\x00", (5, 0, 1, b"")),
    (
        "RESET",
        b"\x06\x00\x00\x00\x00\x01\x00\x00\x00\x07\x02denied",
        (6, 0, 1, b"\x02denied"),
    ),
    (
        "PING",
        b"\x07\x00\x00\x00\x00\x00\x00\x00\x00\x0812345678",
        (7, 0, 0, b"12345678"),
    ),
    (
        "PING_ACK",
        b"\x07\x01\x00\x00\x00\x00\x00\x00\x00\x0812345678",
        (7, FLAG_ACK, 0, b"12345678"),
    ),
    (
        "DATAGRAM",
        b"\x08\x00\x00\x00\x00\x07\x00\x00\x00\x0a\x01\x01\x02\x03\x04\x005dns",
        (8, 0, 7, b"\x01\x01\x02\x03\x04\x005dns"),
    ),
    ("GOAWAY", b"\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00", (9, 0, 0, b"")),
]


@pytest.mark.parametrize(("name", "wire", "expected"), EXACT, ids=[e[0] for e in EXACT])
def test_exact_bytes_decode(name: str, wire: bytes, expected: Plain) -> None:
    assert normalize(MuxDecoder().feed(wire)) == [expected]


@pytest.mark.parametrize(("name", "wire", "expected"), EXACT, ids=[e[0] for e in EXACT])
def test_exact_bytes_encode(name: str, wire: bytes, expected: Plain) -> None:
    ftype, flags, stream, payload = expected
    if ftype == FrameType.DATA:
        assert data_header(stream, len(payload)) + payload == wire
    else:
        assert frame(FrameType(ftype), stream, payload, flags) == wire


def test_exact_payload_encoders() -> None:
    assert encode_open(65536, StreamKind.TCP, "example.com", 443, b"GET") == OPEN_PAYLOAD
    assert encode_reset(ResetReason.NOT_ALLOWED, "denied") == b"\x02denied"
    assert encode_address("1.2.3.4", 53) == b"\x01\x01\x02\x03\x04\x005"
    assert frames.U32.pack(0x8000) == b"\x00\x00\x80\x00"


def test_header_is_ten_bytes_network_order() -> None:
    assert HEADER_SIZE == 10
    assert frame(FrameType.WINDOW, 0x01020304, b"", 0xAB) == b"\x04\xab\x01\x02\x03\x04" + bytes(4)
    assert data_header(0xFFFFFFFF, 0x01020304) == b"\x03\x00\xff\xff\xff\xff\x01\x02\x03\x04"


def test_all_frame_types_back_to_back() -> None:
    stream = b"".join(wire for _, wire, _ in EXACT)
    assert feed_split(stream, []) == [expected for _, _, expected in EXACT]


def test_feed_one_byte_at_a_time() -> None:
    stream = b"".join(wire for _, wire, _ in EXACT)
    assert feed_split(stream, list(range(1, len(stream)))) == [e for _, _, e in EXACT]


def test_empty_feed_yields_nothing() -> None:
    decoder = MuxDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x05\x00\x00\x00") == []
    assert decoder.feed(b"") == []
    assert normalize(decoder.feed(b"\x00\x01\x00\x00\x00\x00")) == [(5, 0, 1, b"")]


# -- DATA streaming: pieces are views of the caller's buffer ------------------------------------


def test_data_pieces_are_views_into_the_fed_buffer() -> None:
    decoder = MuxDecoder()
    first = bytearray(data_header(9, 10) + b"01234")
    (piece,) = decoder.feed(first)
    assert piece[:3] == (FrameType.DATA, 0, 9)
    assert isinstance(piece[3], memoryview)
    assert piece[3].obj is first
    assert bytes(piece[3]) == b"01234"
    second = b"56789" + frame(FrameType.FIN, 9)
    data, fin = decoder.feed(second)
    assert isinstance(data[3], memoryview) and data[3].obj is second
    assert bytes(data[3]) == b"56789"
    assert normalize([fin]) == [(FrameType.FIN, 0, 9, b"")]


def test_data_piece_of_a_memoryview_input_is_a_slice_of_it() -> None:
    backing = bytearray(b"xx" + data_header(1, 3) + b"abcyy")
    view = memoryview(backing)[2:-2]
    ((_, _, _, payload),) = MuxDecoder().feed(view)
    assert isinstance(payload, memoryview)
    assert payload.obj is backing
    assert bytes(payload) == b"abc"


def test_zero_length_data_frame() -> None:
    assert normalize(MuxDecoder().feed(data_header(4, 0))) == [(FrameType.DATA, 0, 4, b"")]


def test_max_data_payload_streams_without_buffering() -> None:
    decoder = MuxDecoder()
    assert decoder.feed(data_header(1, MAX_DATA_PAYLOAD)) == []
    chunk = bytes(16 * 1024)
    tracemalloc.start()
    try:
        total = 0
        for _ in range(MAX_DATA_PAYLOAD // len(chunk)):
            pieces = decoder.feed(chunk)
            # Everything fed comes straight back out: nothing is held inside the decoder.
            assert len(pieces) == 1
            assert isinstance(pieces[0][3], memoryview) and pieces[0][3].obj is chunk
            total += len(pieces[0][3])
            del pieces
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == MAX_DATA_PAYLOAD
    assert peak < 256 * 1024
    assert normalize(decoder.feed(frame(FrameType.FIN, 1))) == [(FrameType.FIN, 0, 1, b"")]


# -- limits (principle 3: every peer-controlled length against a named limit) -------------------


def test_data_at_limit_is_accepted() -> None:
    assert MuxDecoder().feed(data_header(1, MAX_DATA_PAYLOAD)) == []


def test_data_over_limit_refused_at_the_header() -> None:
    with pytest.raises(LimitExceeded, match="MAX_DATA_PAYLOAD"):
        MuxDecoder().feed(data_header(1, MAX_DATA_PAYLOAD + 1))


def test_data_over_limit_refused_when_header_arrives_in_pieces() -> None:
    decoder = MuxDecoder()
    header = data_header(1, 0xFFFFFFFF)
    assert decoder.feed(header[:9]) == []
    with pytest.raises(LimitExceeded):
        decoder.feed(header[9:])


@pytest.mark.parametrize("ftype", [t for t in FrameType if t != FrameType.DATA])
def test_control_at_limit_is_buffered(ftype: FrameType) -> None:
    decoder = MuxDecoder()
    payload = bytes(MAX_CONTROL_PAYLOAD)
    wire = frame(ftype, 1, payload)
    assert decoder.feed(wire[:-1]) == []
    out = decoder.feed(wire[-1:])
    assert len(out) == 1
    assert out[0][:3] == (ftype, 0, 1)
    assert isinstance(out[0][3], bytes) and out[0][3] == payload


@pytest.mark.parametrize("ftype", [t for t in FrameType if t != FrameType.DATA])
def test_control_over_limit_refused(ftype: FrameType) -> None:
    header = frames.HEADER.pack(ftype, 0, 1, MAX_CONTROL_PAYLOAD + 1)
    with pytest.raises(LimitExceeded, match="MAX_CONTROL_PAYLOAD"):
        MuxDecoder().feed(header)


@pytest.mark.parametrize("ftype", [0, 11, 12, 0x7F, 0x80, 0xFF])
def test_unknown_frame_type_refused(ftype: int) -> None:
    header = frames.HEADER.pack(ftype, 0, 1, 0)
    with pytest.raises(RemoteProtocolError, match=f"unknown mux frame type {ftype}") as info:
        MuxDecoder().feed(header)
    assert not isinstance(info.value, LimitExceeded)


def test_unknown_frame_type_refused_even_after_valid_frames() -> None:
    decoder = MuxDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(frame(FrameType.FIN, 1) + b"\x0c" + bytes(9))


# -- addresses (RFC 1928 section 5 ATYP encoding) ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("1.2.3.4", 80, b"\x01\x01\x02\x03\x04\x00\x50"),
        ("::1", 443, b"\x04" + bytes(15) + b"\x01\x01\xbb"),
        ("example.com", 65535, b"\x03\x0bexample.com\xff\xff"),
        ("bücher.de", 1, b"\x03\x10xn--bcher-kva.de\x00\x01"),
        ("a" * 255, 0, b"\x03\xff" + b"a" * 255 + b"\x00\x00"),
    ],
)
def test_encode_address_exact(host: str, port: int, wire: bytes) -> None:
    assert encode_address(host, port) == wire


def test_decode_address_exact_and_offset() -> None:
    assert decode_address(b"\x01\x7f\x00\x00\x01\x1f\x90") == ("127.0.0.1", 8080, 7)
    v6 = b"\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x35"
    assert decode_address(v6) == ("2001:db8::1", 53, 19)
    assert decode_address(b"junk\x03\x01a\x00\x01tail", 4) == ("a", 1, 9)
    assert decode_address(memoryview(b"\x03\x01a\x00\x01")) == ("a", 1, 5)


@pytest.mark.parametrize("host", ["", "a" * 256])
def test_encode_address_refuses_bad_names(host: str) -> None:
    with pytest.raises(ValueError):
        encode_address(host, 1)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x01\x01\x02\x03",  # truncated IPv4
        b"\x01\x01\x02\x03\x04\x00",  # truncated port
        b"\x04" + bytes(10),  # truncated IPv6
        b"\x03",  # missing name length
        b"\x03\x05abc",  # truncated name
        b"\x03\x00\x00\x50",  # empty name
        b"\x03\x02\xc3\xa9\x00\x50",  # non-ASCII name
        b"\x02\x00\x00",  # unknown ATYP
        b"\x00",
        b"\xff" * 8,
    ],
)
def test_decode_address_refuses_bad_input(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_address(wire)


# -- OPEN / RESET / u32 payloads ----------------------------------------------------------------


def test_open_round_trip_exact() -> None:
    payload = encode_open(MAX_EARLY_DATA, StreamKind.UDP, "10.0.0.1", 53)
    assert payload == b"\x00\x01\x00\x00\x02\x01\x0a\x00\x00\x01\x00\x35"
    assert decode_open(payload) == (MAX_EARLY_DATA, StreamKind.UDP, "10.0.0.1", 53, b"")
    assert decode_open(memoryview(OPEN_PAYLOAD)) == (
        65536,
        StreamKind.TCP,
        "example.com",
        443,
        b"GET",
    )


def test_open_early_data_limit() -> None:
    encode_open(MAX_EARLY_DATA, StreamKind.TCP, "a", 1, bytes(MAX_EARLY_DATA))
    with pytest.raises(ValueError, match="MAX_EARLY_DATA"):
        encode_open(MAX_EARLY_DATA, StreamKind.TCP, "a", 1, bytes(MAX_EARLY_DATA + 1))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x01\x00\x00",  # no kind
        b"\x00\x01\x00\x00\x09\x01\x01\x02\x03\x04\x00\x01",  # unknown kind 9
        b"\x00\x00\xff\xff\x01\x01\x01\x02\x03\x04\x00\x01",  # window below MAX_EARLY_DATA
        b"\x00\x01\x00\x00\x01",  # no address
        b"\x00\x01\x00\x00\x01\x09",  # bad ATYP
    ],
)
def test_decode_open_refuses_bad_payloads(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_open(payload)


def test_reset_encoding() -> None:
    assert decode_reset(b"") == (1, "")
    assert decode_reset(b"\x07") == (7, "")
    assert decode_reset(encode_reset(ResetReason.TIMED_OUT, "slow")) == (6, "slow")
    long = encode_reset(1, "x" * 1000)
    assert len(long) == 1 + MAX_RESET_MESSAGE
    assert decode_reset(b"\x01" + b"y" * 1000) == (1, "y" * MAX_RESET_MESSAGE)
    assert decode_reset(b"\x02\xff\xfe") == (2, "\ufffd\ufffd")


def test_decode_u32() -> None:
    assert decode_u32(b"\x00\x00\x01\x00", "WINDOW") == 256
    assert decode_u32(memoryview(b"\xff\xff\xff\xff"), "WINDOW") == 0xFFFFFFFF
    for bad in (b"", b"\x00\x00\x00", b"\x00" * 5):
        with pytest.raises(RemoteProtocolError, match="WINDOW payload must be 4 bytes"):
            decode_u32(bad, "WINDOW")


# -- hypothesis ---------------------------------------------------------------------------------

control_types = st.sampled_from([t for t in FrameType if t != FrameType.DATA])
u32 = st.integers(0, 0xFFFFFFFF)
small_stream = st.integers(0, 3)  # few stream ids, so runs of DATA on one stream are common


@st.composite
def frame_lists(draw: st.DrawFn) -> list[Plain]:
    out: list[Plain] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            payload = draw(st.binary(max_size=300))
            out.append((FrameType.DATA, 0, draw(small_stream), payload))
        else:
            ftype = draw(control_types)
            payload = draw(st.binary(max_size=100))
            out.append((ftype, draw(st.integers(0, 255)), draw(small_stream), payload))
    return out


def encode_all(items: list[Plain]) -> bytes:
    parts = []
    for ftype, flags, stream, payload in items:
        if ftype == FrameType.DATA:
            parts.append(data_header(stream, len(payload)) + payload)
        else:
            parts.append(frame(FrameType(ftype), stream, payload, flags))
    return b"".join(parts)


@settings(max_examples=300)
@given(items=frame_lists(), data=st.data())
def test_round_trip_random_frames_any_split(items: list[Plain], data: st.DataObject) -> None:
    wire = encode_all(items)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    expected = normalize(items)
    assert feed_split(wire, cuts) == expected
    assert feed_split(wire, []) == expected


@settings(max_examples=50)
@given(items=frame_lists())
def test_round_trip_one_byte_at_a_time(items: list[Plain]) -> None:
    wire = encode_all(items)
    assert feed_split(wire, list(range(1, len(wire)))) == normalize(items)


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_raise_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    decoder = MuxDecoder()
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(head=st.tuples(st.integers(0, 12), st.integers(0, 255), u32, u32))
def test_random_headers_raise_only_remote_protocol_errors(head: tuple[int, int, int, int]) -> None:
    try:
        MuxDecoder().feed(frames.HEADER.pack(*head))
    except LimitExceeded:
        assert head[3] > MAX_CONTROL_PAYLOAD
    except RemoteProtocolError:
        assert head[0] not in set(FrameType)


@settings(max_examples=300)
@given(wire=st.binary(max_size=40), offset=st.integers(0, 4))
def test_decode_address_and_open_fuzz(wire: bytes, offset: int) -> None:
    for decode in (lambda: decode_address(wire, offset), lambda: decode_open(wire)):
        try:
            decode()
        except RemoteProtocolError:
            pass
    decode_reset(wire)


domain_names = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){0,3}", fullmatch=True
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


hosts = st.one_of(
    st.ip_addresses().map(str),
    domain_names.filter(lambda h: not _is_ip(h)),
)


@settings(max_examples=300)
@given(
    window=st.integers(MAX_EARLY_DATA, 0xFFFFFFFF),
    kind=st.sampled_from(StreamKind),
    host=hosts,
    port=st.integers(0, 65535),
    early=st.binary(max_size=200),
)
def test_open_round_trip(window: int, kind: StreamKind, host: str, port: int, early: bytes) -> None:
    payload = encode_open(window, kind, host, port, early)
    assert decode_open(payload) == (window, kind, host, port, early)
    decoded = MuxDecoder().feed(frame(FrameType.OPEN, 3, payload))
    assert normalize(decoded) == [(FrameType.OPEN, 0, 3, payload)]


@settings(max_examples=200)
@given(host=hosts, port=st.integers(0, 65535), prefix=st.binary(max_size=5))
def test_address_round_trip_at_offset(host: str, port: int, prefix: bytes) -> None:
    wire = prefix + encode_address(host, port) + b"tail"
    assert decode_address(wire, len(prefix)) == (host, port, len(wire) - 4)
