"""WebSocket framing (RFC 6455 section 5), from bytes outward: exact bytes first, then fuzzing."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.errors import LimitExceeded, RemoteProtocolError
from autovpn.wire import websocket
from autovpn.wire.websocket import (
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_SIZE,
    Opcode,
    WsDecoder,
    WsEvent,
    _mask_python,
    apply_mask,
    encode_close,
    encode_frame,
    encode_header,
)

Event = tuple[int, bytes]
MASK = b"\x37\xfa\x21\x3d"  # the key of RFC 6455 section 5.7's examples


def normalize(events: Sequence[WsEvent]) -> list[Event]:
    """Copy payloads and join runs of BINARY pieces, so any split compares equal."""
    out: list[Event] = []
    for opcode, payload in events:
        data = bytes(payload)
        if opcode == Opcode.BINARY and out and out[-1][0] == Opcode.BINARY:
            out[-1] = (Opcode.BINARY, out[-1][1] + data)
        else:
            out.append((int(opcode), data))
    return out


def feed_split(wire: bytes, cuts: list[int], *, require_mask: bool = False) -> list[Event]:
    decoder = WsDecoder(require_mask=require_mask)
    events: list[WsEvent] = []
    bounds = [0, *sorted(set(cuts)), len(wire)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        events.extend((op, bytes(p)) for op, p in decoder.feed(wire[lo:hi]))
    return normalize(events)


def decode(wire: bytes, *, require_mask: bool = False) -> list[Event]:
    return normalize(WsDecoder(require_mask=require_mask).feed(wire))


# -- RFC 6455 section 5.7: the examples, byte for byte -----------------------------------------


def test_rfc6455_5_7_unmasked_text_is_refused_on_a_binary_tunnel() -> None:
    with pytest.raises(RemoteProtocolError, match="text frame"):
        WsDecoder().feed(b"\x81\x05\x48\x65\x6c\x6c\x6f")


def test_rfc6455_5_7_masked_text_header_and_mask() -> None:
    wire = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    assert encode_frame(Opcode.TEXT, b"Hello", MASK) == wire
    assert apply_mask(b"Hello", MASK) == b"\x7f\x9f\x4d\x51\x58"
    assert _mask_python(b"\x7f\x9f\x4d\x51\x58", MASK) == b"Hello"
    with pytest.raises(RemoteProtocolError):
        WsDecoder().feed(wire)


def test_rfc6455_5_7_fragmented_text_is_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        WsDecoder().feed(b"\x01\x03\x48\x65\x6c\x80\x02\x6c\x6f")


def test_rfc6455_5_7_unmasked_ping() -> None:
    wire = b"\x89\x05\x48\x65\x6c\x6c\x6f"
    assert encode_frame(Opcode.PING, b"Hello") == wire
    assert decode(wire) == [(Opcode.PING, b"Hello")]


def test_rfc6455_5_7_masked_pong() -> None:
    wire = b"\x8a\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    assert encode_frame(Opcode.PONG, b"Hello", MASK) == wire
    assert decode(wire) == [(Opcode.PONG, b"Hello")]
    assert decode(wire, require_mask=True) == [(Opcode.PONG, b"Hello")]


def test_rfc6455_5_7_256_bytes_binary_16_bit_length() -> None:
    payload = bytes(range(256))
    wire = b"\x82\x7e\x01\x00" + payload
    assert encode_frame(Opcode.BINARY, payload) == wire
    assert decode(wire) == [(Opcode.BINARY, payload)]


def test_rfc6455_5_7_64kib_binary_64_bit_length() -> None:
    payload = bytes(range(256)) * 256
    wire = b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00" + payload
    assert encode_frame(Opcode.BINARY, payload) == wire
    assert decode(wire) == [(Opcode.BINARY, payload)]


# -- section 5.2: payload length encodings, masked and unmasked --------------------------------

LENGTHS = [
    (0, b"\x00"),
    (1, b"\x01"),
    (125, b"\x7d"),  # largest 7-bit length
    (126, b"\x7e\x00\x7e"),  # smallest 16-bit length
    (65535, b"\x7e\xff\xff"),  # largest 16-bit length
    (65536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),  # smallest 64-bit length
    (70000, b"\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
]


@pytest.mark.parametrize(("length", "encoded"), LENGTHS)
@pytest.mark.parametrize("mask", [None, MASK, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"])
def test_rfc6455_5_2_payload_length(length: int, encoded: bytes, mask: bytes | None) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(length))
    header = encode_header(Opcode.BINARY, length, mask)
    if mask is None:
        assert header == b"\x82" + encoded
    else:
        assert header == b"\x82" + bytes((encoded[0] | 0x80,)) + encoded[1:] + mask
    wire = encode_frame(Opcode.BINARY, payload, mask)
    assert wire[: len(header)] == header
    assert len(wire) == len(header) + length
    expected = [(Opcode.BINARY, payload)] if length else []
    assert decode(wire) == expected
    assert feed_split(wire, list(range(1, min(len(wire), 40)))) == expected


def test_rfc6455_5_2_fin_bit_and_opcode_in_first_byte() -> None:
    assert encode_header(Opcode.BINARY, 3, fin=False) == b"\x02\x03"
    assert encode_header(Opcode.CONTINUATION, 3) == b"\x80\x03"
    assert encode_header(Opcode.CLOSE, 2, MASK) == b"\x88\x82" + MASK


def test_rfc6455_5_2_reserved_bits_refused() -> None:
    for rsv in (0x40, 0x20, 0x10, 0x70):
        with pytest.raises(RemoteProtocolError, match="reserved bits"):
            WsDecoder().feed(bytes((0x82 | rsv, 0x00)))


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_rfc6455_5_2_reserved_opcodes_refused(opcode: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown WebSocket opcode"):
        WsDecoder().feed(bytes((0x80 | opcode, 0x00)))


def test_rfc6455_5_2_frame_size_limit() -> None:
    at_limit = encode_header(Opcode.BINARY, MAX_FRAME_SIZE)
    assert WsDecoder().feed(at_limit) == []
    with pytest.raises(LimitExceeded, match="MAX_FRAME_SIZE"):
        WsDecoder().feed(encode_header(Opcode.BINARY, MAX_FRAME_SIZE + 1))
    # The most significant bit of a 64-bit length MUST be 0; such a length is far past the limit.
    with pytest.raises(LimitExceeded):
        WsDecoder().feed(b"\x82\x7f" + struct.pack("!Q", 1 << 63))


# -- section 5.1 / 5.3: masking -----------------------------------------------------------------


def test_rfc6455_5_1_require_mask_refuses_unmasked_frames() -> None:
    with pytest.raises(RemoteProtocolError, match="unmasked"):
        WsDecoder(require_mask=True).feed(b"\x82\x01x")
    assert decode(encode_frame(Opcode.BINARY, b"x", MASK), require_mask=True) == [
        (Opcode.BINARY, b"x")
    ]


def test_rfc6455_5_1_unmasked_frames_accepted_by_default() -> None:
    assert decode(b"\x82\x01x") == [(Opcode.BINARY, b"x")]


def test_rfc6455_5_3_mask_continues_across_pieces() -> None:
    payload = bytes(range(200))
    wire = encode_frame(Opcode.BINARY, payload, b"\x01\x02\x03\x04")
    for cuts in ([7, 8, 9, 10, 11], [6, 13, 50, 51], list(range(1, len(wire)))):
        assert feed_split(wire, cuts) == [(Opcode.BINARY, payload)]


def test_rfc6455_5_3_mask_key_per_frame() -> None:
    wire = encode_frame(Opcode.BINARY, b"abcde", b"\x01\x02\x03\x04") + encode_frame(
        Opcode.BINARY, b"fghij", b"\xa0\xb0\xc0\xd0"
    )
    assert feed_split(wire, [3, 12]) == [(Opcode.BINARY, b"abcdefghij")]


def test_mask_fallback_matches_c_path_on_edge_sizes() -> None:
    for n in (0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1000, 65537):
        data = bytes((i * 31 + 7) & 0xFF for i in range(n))
        assert _mask_python(data, MASK) == apply_mask(data, MASK)
        assert _mask_python(memoryview(data), MASK) == apply_mask(memoryview(data), MASK)
        assert _mask_python(bytearray(data), MASK) == apply_mask(bytearray(data), MASK)
        assert _mask_python(_mask_python(data, MASK), MASK) == data


@settings(max_examples=300)
@given(data=st.binary(max_size=2000), mask=st.binary(min_size=4, max_size=4))
def test_mask_fallback_equals_apply_mask(data: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert _mask_python(data, mask) == expected
    assert apply_mask(data, mask) == expected


# -- section 5.4: fragmentation ---------------------------------------------------------------


def test_rfc6455_5_4_fragments_come_out_as_binary_pieces() -> None:
    wire = (
        encode_header(Opcode.BINARY, 3, fin=False)
        + b"abc"
        + encode_header(Opcode.CONTINUATION, 2, fin=False)
        + b"de"
        + encode_header(Opcode.CONTINUATION, 1)
        + b"f"
    )
    events = WsDecoder().feed(wire)
    assert [(op, bytes(p)) for op, p in events] == [
        (Opcode.BINARY, b"abc"),
        (Opcode.BINARY, b"de"),
        (Opcode.BINARY, b"f"),
    ]


def test_rfc6455_5_4_control_frames_inside_a_fragmented_message() -> None:
    wire = (
        encode_header(Opcode.BINARY, 3, fin=False)
        + b"abc"
        + encode_frame(Opcode.PING, b"p", MASK)
        + encode_header(Opcode.CONTINUATION, 2)
        + b"de"
        + encode_header(Opcode.BINARY, 1)
        + b"g"
    )
    assert decode(wire) == [
        (Opcode.BINARY, b"abc"),
        (Opcode.PING, b"p"),
        (Opcode.BINARY, b"deg"),
    ]


def test_rfc6455_5_4_continuation_outside_a_message_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="continuation frame outside"):
        WsDecoder().feed(encode_header(Opcode.CONTINUATION, 0))
    decoder = WsDecoder()
    decoder.feed(encode_frame(Opcode.BINARY, b"done"))
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode_header(Opcode.CONTINUATION, 1) + b"x")


def test_rfc6455_5_4_new_data_frame_inside_a_message_refused() -> None:
    decoder = WsDecoder()
    decoder.feed(encode_header(Opcode.BINARY, 1, fin=False) + b"a")
    with pytest.raises(RemoteProtocolError, match="inside a fragmented message"):
        decoder.feed(encode_header(Opcode.BINARY, 1) + b"b")


def test_rfc6455_5_4_empty_fragments() -> None:
    wire = (
        encode_header(Opcode.BINARY, 0, fin=False)
        + encode_header(Opcode.CONTINUATION, 0, fin=False)
        + encode_header(Opcode.CONTINUATION, 1)
        + b"z"
    )
    assert decode(wire) == [(Opcode.BINARY, b"z")]


# -- section 5.5: control frames ----------------------------------------------------------------


def test_rfc6455_5_5_2_zero_length_ping() -> None:
    assert WsDecoder().feed(b"\x89\x00") == [(Opcode.PING, b"")]
    assert decode(b"\x89\x80" + MASK) == [(Opcode.PING, b"")]
    assert encode_frame(Opcode.PING, b"") == b"\x89\x00"
    # split between the two header bytes
    decoder = WsDecoder()
    assert decoder.feed(b"\x89") == []
    assert decoder.feed(b"\x00") == [(Opcode.PING, b"")]


def test_rfc6455_5_5_zero_length_frames_back_to_back() -> None:
    wire = b"\x89\x00\x8a\x00\x82\x00\x88\x00"
    assert decode(wire) == [(Opcode.PING, b""), (Opcode.PONG, b""), (Opcode.CLOSE, b"")]


def test_rfc6455_5_5_control_payload_limit() -> None:
    payload = bytes(MAX_CONTROL_PAYLOAD)
    assert decode(encode_frame(Opcode.PING, payload)) == [(Opcode.PING, payload)]
    for opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
        with pytest.raises(RemoteProtocolError, match="section 5.5"):
            WsDecoder().feed(encode_header(opcode, MAX_CONTROL_PAYLOAD + 1))


def test_rfc6455_5_5_fragmented_control_frame_refused() -> None:
    for opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
        with pytest.raises(RemoteProtocolError, match="fragmented"):
            WsDecoder().feed(encode_header(opcode, 1, fin=False) + b"x")


def test_rfc6455_5_5_control_payload_is_whole_bytes_even_when_split() -> None:
    wire = encode_frame(Opcode.CLOSE, encode_close(1001, "bye"), MASK)
    decoder = WsDecoder()
    out: list[WsEvent] = []
    for i in range(len(wire)):
        out.extend(decoder.feed(wire[i : i + 1]))
    assert len(out) == 1
    assert out[0][0] == Opcode.CLOSE
    assert isinstance(out[0][1], bytes) and out[0][1] == b"\x03\xe9bye"


def test_rfc6455_5_5_1_close_payload() -> None:
    assert encode_close() == b"\x03\xe8"
    assert encode_close(1001, "going away") == b"\x03\xe9going away"
    long = encode_close(1000, "x" * 500)
    assert len(long) == MAX_CONTROL_PAYLOAD
    assert decode(encode_frame(Opcode.CLOSE, long)) == [(Opcode.CLOSE, long)]


def test_rfc6455_5_5_1_close_reason_stays_valid_utf8_when_truncated() -> None:
    payload = encode_close(1000, "é" * 100)
    assert len(payload) <= MAX_CONTROL_PAYLOAD
    payload[2:].decode("utf-8")


# -- streaming: a 20 MiB frame is never buffered ------------------------------------------------

BIG = 20 << 20
CHUNK = 64 * 1024


@pytest.mark.parametrize("mask", [None, MASK])
def test_20_mib_frame_streams_in_pieces(mask: bytes | None) -> None:
    decoder = WsDecoder()
    assert decoder.feed(encode_header(Opcode.BINARY, BIG, mask)) == []
    chunk = bytes(range(256)) * (CHUNK // 256)
    expected_piece = apply_mask(chunk, mask) if mask is not None else chunk
    tracemalloc.start()
    try:
        total = 0
        for _ in range(BIG // CHUNK):
            events = decoder.feed(chunk)
            # Every byte fed comes straight back out in this call: the decoder keeps nothing.
            assert len(events) == 1
            opcode, piece = events[0]
            assert opcode == Opcode.BINARY
            assert len(piece) == CHUNK
            if mask is None:
                assert isinstance(piece, memoryview) and piece.obj is chunk
            else:
                # 64 KiB is a multiple of 4, so every piece starts at mask offset 0
                assert piece == expected_piece
            total += len(piece)
            del events, piece
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == BIG
    assert peak < 1 << 20  # far below the 20 MiB frame
    assert decoder.feed(b"\x89\x00") == [(Opcode.PING, b"")]


def test_large_frame_pieces_are_views_of_the_fed_buffer() -> None:
    decoder = WsDecoder()
    buf = bytearray(encode_header(Opcode.BINARY, 10) + b"01234")
    ((_, piece),) = decoder.feed(buf)
    assert isinstance(piece, memoryview) and piece.obj is buf
    ((_, rest),) = decoder.feed(memoryview(b"56789"))
    assert bytes(rest) == b"56789"


# -- hypothesis ---------------------------------------------------------------------------------

masks = st.one_of(st.none(), st.binary(min_size=4, max_size=4))
controls = st.tuples(
    st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE]),
    st.binary(max_size=MAX_CONTROL_PAYLOAD),
    masks,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A valid frame stream and the events it must decode to."""
    wire: list[bytes] = []
    events: list[Event] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            opcode, payload, mask = draw(controls)
            wire.append(encode_frame(opcode, payload, mask))
            events.append((opcode, payload))
            continue
        fragments = draw(
            st.lists(st.tuples(st.binary(max_size=300), masks), min_size=1, max_size=4)
        )
        for i, (payload, mask) in enumerate(fragments):
            if i and draw(st.booleans()):
                opcode, cpayload, cmask = draw(controls)
                wire.append(encode_frame(opcode, cpayload, cmask))
                events.append((opcode, cpayload))
            first = Opcode.BINARY if i == 0 else Opcode.CONTINUATION
            fin = i == len(fragments) - 1
            body = apply_mask(payload, mask) if mask is not None else payload
            wire.append(encode_header(first, len(payload), mask, fin=fin) + body)
            if payload:
                events.append((Opcode.BINARY, payload))
    return b"".join(wire), normalize(events)


@settings(max_examples=300)
@given(stream=streams(), data=st.data())
def test_any_split_yields_the_same_events(
    stream: tuple[bytes, list[Event]], data: st.DataObject
) -> None:
    wire, expected = stream
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30))
    assert feed_split(wire, cuts) == expected


@settings(max_examples=50)
@given(stream=streams())
def test_one_byte_at_a_time_yields_the_same_events(stream: tuple[bytes, list[Event]]) -> None:
    wire, expected = stream
    assert feed_split(wire, list(range(1, len(wire)))) == expected


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20), require_mask=st.booleans())
def test_random_bytes_raise_only_remote_protocol_errors(
    chunks: list[bytes], require_mask: bool
) -> None:
    decoder = WsDecoder(require_mask=require_mask)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(first=st.integers(0, 255), second=st.integers(0, 255), rest=st.binary(max_size=20))
def test_random_headers_raise_only_remote_protocol_errors(
    first: int, second: int, rest: bytes
) -> None:
    try:
        WsDecoder().feed(bytes((first, second)) + rest)
    except RemoteProtocolError:
        pass


def test_module_exports_are_consistent() -> None:
    assert websocket.MAX_CONTROL_PAYLOAD == 125
    assert MAX_FRAME_SIZE >= 32 << 20  # wstunnel sends frames up to 32 MiB
