"""Hostile and broken peers against a running tunnel server: each gets the protocol's answer
(or is closed), the server logs it, and a well-behaved client keeps being served throughout."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time

import pytest

from autovpn.config import Config
from autovpn.engine import Engine
from autovpn.wire import frames, handshake, http1
from autovpn.wire.websocket import Opcode, encode_frame
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    engine_config,
    run,
    socks_open,
    socks_port,
    tcp_server,
)


async def _still_serves(eng: Engine, echo: int) -> None:
    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
    payload = os.urandom(1000)
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    writer.close()


async def _raw(eng: Engine, certs: Certs) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert eng.server is not None
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    return await asyncio.open_connection(
        "127.0.0.1", eng.server.port, ssl=ctx, server_hostname="localhost"
    )


def _request(path: str = "/autovpn/tunnel", secret: bytes = SECRET, nonce: bytes = b"") -> bytes:
    return handshake.build_request(
        host="localhost",
        path=path,
        user="default",
        secret=secret,
        now=int(time.time()),
        nonce=nonce or os.urandom(16),
        ws_key=os.urandom(16),
    )


async def _upgraded(
    eng: Engine, certs: Certs
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A connection past the 101, and the AUTH frame (masked, in a WebSocket frame) that
    answers its challenge: send it first, or be refused."""
    reader, writer = await _raw(eng, certs)
    nonce = os.urandom(16)
    writer.write(_request(nonce=nonce))
    answer = await _answer(reader)
    head = http1.ResponseHeadParser(handshake.RESPONSE_LIMITS).receive_data(answer)
    assert head is not None and head.status == 101, answer[:80]
    challenge = head.get(handshake.CHALLENGE_HEADER)
    proof = handshake.compute_proof(
        SECRET, "default", handshake.b64url(nonce), challenge, "localhost", "/autovpn/tunnel"
    )
    auth = encode_frame(Opcode.BINARY, handshake.auth_frame(proof), mask=os.urandom(4))
    return reader, writer, auth


async def _answer(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.read(4096)


def _quick_handshakes(certs: Certs) -> Config:
    """The engine of the tests, its server's handshake timeout at half a second."""
    config = engine_config(certs)
    assert config.server is not None
    config.server.handshake_timeout = 0.5
    return config


def test_garbage_and_truncated_handshakes(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autovpn")

    async def main() -> None:
        async with Engine(_quick_handshakes(certs)) as eng, tcp_server(echo_handler) as echo:
            # random bytes where a request should be
            reader, writer = await _raw(eng, certs)
            writer.write(os.urandom(2000) + b"\r\n\r\n")
            assert (await _answer(reader)).startswith(b"HTTP/1.1 400")
            writer.close()
            await _still_serves(eng, echo)
            # a request cut short: closed after the handshake timeout, no answer
            reader, writer = await _raw(eng, certs)
            writer.write(_request()[:40])
            assert await _answer(reader) == b""
            writer.close()
            # an oversized head
            reader, writer = await _raw(eng, certs)
            writer.write(b"GET /autovpn/tunnel HTTP/1.1\r\n" + b"X: " + b"a" * 20000)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 400")
            writer.close()
            # not TLS at all on a TLS port
            assert eng.server is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.server.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await _answer(reader) == b""
            writer.close()
            await _still_serves(eng, echo)
        assert "HTTP" in caplog.text or "refused" in caplog.text

    run(main())


def test_paths_credentials_and_replays(certs: Certs) -> None:
    async def main() -> None:
        async with Engine(engine_config(certs)) as eng, tcp_server(echo_handler) as echo:
            cases = [
                (_request(path="/other"), b"HTTP/1.1 404"),
                (_request(secret=b"wrong-secret-123"), b"HTTP/1.1 403"),
                (
                    b"GET /autovpn/tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: "
                    + base64.b64encode(os.urandom(16))
                    + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: autovpn.2\r\n\r\n",
                    b"HTTP/1.1 401",
                ),
                # a version 1 client: refused at once, before its credentials are looked at
                (
                    _request().replace(b"autovpn.2", b"autovpn.1"),
                    b"HTTP/1.1 400",
                ),
            ]
            for request, expected in cases:
                reader, writer = await _raw(eng, certs)
                writer.write(request)
                answer = await _answer(reader)
                assert answer.startswith(expected), answer[:60]
                assert b"secret" not in answer.lower() and b"user" not in answer.lower()
                writer.close()
            # a captured good request works once; replayed, it is refused
            request = _request(nonce=b"n" * 16)
            reader, writer = await _raw(eng, certs)
            writer.write(request)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 101")
            writer.close()
            reader, writer = await _raw(eng, certs)
            writer.write(request)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 403")
            writer.close()
            await _still_serves(eng, echo)

    run(main())


def test_hostile_frames_close_only_that_connection(certs: Certs) -> None:
    async def main() -> None:
        async with Engine(engine_config(certs)) as eng, tcp_server(echo_handler) as echo:
            for bad_mux in (
                bytes([0xEE, 0, 0, 0, 0, 1, 0, 0, 0, 0]),  # unknown frame type
                frames.HEADER.pack(frames.FrameType.DATA, 0, 1, frames.MAX_DATA_PAYLOAD + 1),
                frames.HEADER.pack(frames.FrameType.OPEN, 0, 1, frames.MAX_CONTROL_PAYLOAD + 1),
            ):
                reader, writer = await _raw(eng, certs)
                writer.write(_request())
                assert (await _answer(reader)).startswith(b"HTTP/1.1 101")
                writer.write(encode_frame(Opcode.BINARY, bad_mux, mask=os.urandom(4)))
                async with asyncio.timeout(10):
                    rest = await reader.read()  # a close frame (1002), then EOF
                assert rest[:1] == bytes([0x88])
                writer.close()
            # a bad OPEN (truncated address) is answered with a RESET on that stream only
            reader, writer, auth = await _upgraded(eng, certs)
            bad_open = frames.frame(
                frames.FrameType.OPEN, 1, frames.OPEN_PREFIX.pack(1 << 20, 1) + b"\x01\x7f"
            )
            writer.write(auth + encode_frame(Opcode.BINARY, bad_open, mask=os.urandom(4)))
            async with asyncio.timeout(10):
                data = await reader.read(4096)
            # WebSocket binary frame carrying a RESET for stream 1
            assert data[0] == 0x82
            payload = data[2:]
            ftype, _, sid, _ = frames.HEADER.unpack_from(payload)
            assert (ftype, sid) == (frames.FrameType.RESET, 1)
            writer.close()
            await _still_serves(eng, echo)

    run(main())


def test_no_wstunnel_leaves_only_authenticated_clients(certs: Certs) -> None:
    async def main() -> None:
        cfg = engine_config(certs)
        assert cfg.server is not None
        cfg.server.wstunnel.enabled = False
        async with Engine(cfg) as eng:
            reader, writer = await _raw(eng, certs)
            writer.write(
                b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Protocol: v1, authorization.bearer.x.y.z\r\n\r\n"
            )
            assert (await _answer(reader)).startswith(b"HTTP/1.1 404")
            writer.close()

    run(main())


def test_nothing_is_served_before_the_challenge_is_answered(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """After the 101 the server dispatches nothing until an AUTH frame answered its challenge:
    an OPEN or a DATAGRAM first, a wrong answer, or silence are each refused (close 1008, or
    an abort after the handshake timeout) and logged once; a second AUTH is a protocol error."""
    caplog.set_level(logging.INFO, logger="autovpn")
    dialled = 0

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dialled
        dialled += 1
        await reader.read()

    async def main() -> None:
        async with (
            Engine(_quick_handshakes(certs)) as eng,
            tcp_server(target) as port,
            tcp_server(echo_handler) as echo,
        ):
            assert eng.server is not None
            await _still_serves(eng, echo)  # the engine's own client, AUTH and all
            open_frame = frames.frame(
                frames.FrameType.OPEN,
                1,
                frames.encode_open(1 << 20, frames.StreamKind.TCP, "127.0.0.1", port),
            )
            datagram = frames.frame(
                frames.FrameType.DATAGRAM, 1, frames.encode_address("127.0.0.1", port) + b"x"
            )
            wrong = encode_frame(Opcode.BINARY, handshake.auth_frame(bytes(32)), mask=os.urandom(4))
            for first in (
                encode_frame(Opcode.BINARY, open_frame, mask=os.urandom(4)),
                encode_frame(Opcode.BINARY, datagram, mask=os.urandom(4)),
                wrong + encode_frame(Opcode.BINARY, open_frame, mask=os.urandom(4)),
                b"",  # nothing at all: refused after the handshake timeout
            ):
                caplog.clear()
                refused = eng.server.refused
                reader, writer, _ = await _upgraded(eng, certs)
                writer.write(first)
                async with asyncio.timeout(10):
                    rest = await reader.read()
                assert rest in (b"\x88\x02\x03\xf0", b""), rest  # close 1008, or aborted
                writer.close()
                assert eng.server.refused == refused + 1
                lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
                assert len(lines) == 1, lines
            assert "no AUTH frame within" in lines[0]
            assert dialled == 0 and eng.server.streams_failed == 0
            # AUTH twice: the second one is a protocol error (close 1002)
            reader, writer, auth = await _upgraded(eng, certs)
            writer.write(auth + auth)
            async with asyncio.timeout(10):
                rest = await reader.read()
            assert rest[:4] == b"\x88\x10\x03\xea", rest  # close 1002, "protocol error"
            writer.close()
            await _still_serves(eng, echo)

    run(main())
