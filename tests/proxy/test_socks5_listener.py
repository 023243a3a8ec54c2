"""The SOCKS5 listener over real sockets: every reply code the engine produces (RFC 1928 §6),
address types (IPv4, IPv6, domain), RFC 1929 authentication, and bad input.  After each bad
client the engine must still serve a good one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from autovpn.engine import Engine
from autovpn.errors import BindError, ConfigError
from autovpn.proxy.dialer import Dialer
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.routing.router import Mode, Router
from autovpn.wire.auth import Credentials
from tests.conftest import (
    Certs,
    echo_handler,
    engine,
    engine_config,
    free_port,
    run,
    socks_open,
    socks_port,
    tcp_server,
)

V4 = 0x01
DOMAIN = 0x03
V6 = 0x04


def connect_request(host: str, port: int, command: int = 0x01) -> bytes:
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        address = bytes([V4]) + packed
    except OSError:
        try:
            address = bytes([V6]) + socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raw = host.encode()
            address = bytes([DOMAIN, len(raw)]) + raw
    return bytes([5, command, 0]) + address + struct.pack("!H", port)


async def read_reply(reader: asyncio.StreamReader) -> int:
    """The REP field of a SOCKS5 reply (RFC 1928 §6), the whole reply consumed."""
    ver, rep, _, atyp = await reader.readexactly(4)
    assert ver == 5
    size = {V4: 4, V6: 16}.get(atyp)
    if size is None:
        size = (await reader.readexactly(1))[0]
    await reader.readexactly(size + 2)
    return rep


async def raw_connect(
    port: int, host: str, target: int, command: int = 0x01
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(connect_request(host, target, command))
    return await read_reply(reader), reader, writer


async def closes(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes (a reset counts as a close)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


async def done(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def still_serves(eng: Engine, echo: int) -> None:
    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    await done(writer)


# --- reply codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_connect_succeeds_and_refused_is_0x05(certs: Certs, mode: Mode) -> None:
    async def main() -> None:
        async with engine(certs, mode=mode) as eng, tcp_server(echo_handler) as echo:
            rep, reader, writer = await raw_connect(socks_port(eng), "127.0.0.1", echo)
            assert rep == 0x00
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await done(writer)
            rep, reader, writer = await raw_connect(socks_port(eng), "127.0.0.1", free_port())
            assert rep == 0x05
            assert await closes(reader) == b""
            await done(writer)

    run(main())


def test_server_policy_refusal_is_0x02(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs, allow=()) as eng, tcp_server(echo_handler) as echo:
            rep, reader, writer = await raw_connect(socks_port(eng), "127.0.0.1", echo)
            assert rep == 0x02
            await done(writer)

    run(main())


def test_bind_is_command_not_supported_0x07(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as echo:
            rep, reader, writer = await raw_connect(socks_port(eng), "127.0.0.1", echo, 0x02)
            assert rep == 0x07
            assert await closes(reader) == b""
            await done(writer)
            await still_serves(eng, echo)

    run(main())


# --- address types -------------------------------------------------------------------------


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="::1 is not available here")
@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_ipv6_literal_target(certs: Certs, mode: Mode) -> None:
    async def echo_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await echo_handler(reader, writer)
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo_and_close, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with engine(certs, mode=mode, allow=("127.0.0.0/8", "::1/128")) as eng:
                rep, reader, writer = await raw_connect(socks_port(eng), "::1", port)
                assert rep == 0x00
                writer.write(b"six")
                assert await reader.readexactly(3) == b"six"
                await done(writer)
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_domain_localhost_target(certs: Certs, mode: Mode) -> None:
    async def main() -> None:
        async with (
            engine(certs, mode=mode, allow=("127.0.0.0/8", "::1/128")) as eng,
            tcp_server(echo_handler) as echo,
        ):
            rep, reader, writer = await raw_connect(socks_port(eng), "localhost", echo)
            assert rep == 0x00
            writer.write(b"name")
            assert await reader.readexactly(4) == b"name"
            await done(writer)

    run(main())


# --- authentication ------------------------------------------------------------------------


def test_username_password(certs: Certs) -> None:
    async def main() -> None:
        async with (
            engine(certs, users=(("alice", "s3cret"),)) as eng,
            tcp_server(echo_handler) as echo,
        ):
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo, "alice", "s3cret")
            writer.write(b"authed")
            assert await reader.readexactly(6) == b"authed"
            await done(writer)
            # Wrong password: RFC 1929 §2 failure status, then close.
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            writer.write(b"\x05\x01\x02")
            assert await reader.readexactly(2) == b"\x05\x02"
            writer.write(b"\x01\x05alice\x05wrong")
            status = await closes(reader)
            assert status[:1] == b"\x01" and status[1:2] != b"\x00"
            await done(writer)
            # No acceptable method (only no-auth offered): X'FF', then close.
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            writer.write(b"\x05\x01\x00")
            assert await closes(reader) == b"\x05\xff"
            await done(writer)

    run(main())


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(os.urandom(64), id="random"),
        pytest.param(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", id="socks4"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"\x06\x01\x00\x01\x7f\x00\x00\x01\x00\x50", id="request-v6"),
        pytest.param(b"\x05\x01\x00\x09", id="bad-atyp"),
    ],
)
def test_bad_input_is_answered_or_closed_and_the_engine_goes_on(certs: Certs, junk: bytes) -> None:
    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as echo:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            request = junk[:1] in (b"\x05", b"\x06")  # a bad request after a good greeting
            if request:
                writer.write(b"\x05\x01\x00")
                assert await reader.readexactly(2) == b"\x05\x00"
            writer.write(junk)
            got = await closes(reader)
            if junk[:1] == b"\x04":
                assert got[:2] == b"\x00\x5b"  # SOCKS4 "request rejected"
            elif request:  # general failure (bad version), address type not supported
                assert got[:2] == (b"\x05\x08" if junk[:1] == b"\x05" else b"\x05\x01")
            await done(writer)
            await still_serves(eng, echo)

    run(main())


@pytest.mark.parametrize(
    "prefix",
    [b"\x05", b"\x05\x02\x00", b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00"],
    ids=["greeting", "methods", "request"],
)
def test_truncated_handshake_then_close(certs: Certs, prefix: bytes) -> None:
    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as echo:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            writer.write(prefix)
            await writer.drain()
            writer.write_eof()
            await closes(reader)
            await done(writer)
            await still_serves(eng, echo)

    run(main())


def test_silent_client_hits_the_handshake_timeout(certs: Certs) -> None:
    config = engine_config(certs)
    assert config.client is not None
    config.client.handshake_timeout = 0.2

    async def main() -> None:
        async with Engine(config) as eng, tcp_server(echo_handler) as echo:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await closes(reader) == b""
            assert loop.time() - start < 3
            await done(writer)
            await still_serves(eng, echo)

    run(main())


# --- binding -------------------------------------------------------------------------------


def test_non_loopback_without_credentials_is_refused() -> None:
    dialer = Dialer(Router(Mode.DIRECT), None)
    with pytest.raises(ConfigError, match="non-loopback"):
        ProxyListener(ListenerKind.SOCKS5, "0.0.0.0", 1080, dialer)
    # With credentials, or explicitly opened, it may be constructed (not started here).
    ProxyListener(ListenerKind.SOCKS5, "0.0.0.0", 1080, dialer, Credentials({"a": "b"}))
    ProxyListener(ListenerKind.HTTP, "0.0.0.0", 1080, dialer, allow_open=True)


@asynccontextmanager
async def taken_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_taken_port_is_a_clear_bind_error() -> None:
    async def main() -> None:
        async with taken_port() as port:
            listener = ProxyListener(
                ListenerKind.SOCKS5, "127.0.0.1", port, Dialer(Router(Mode.DIRECT), None)
            )
            with pytest.raises(BindError) as info:
                await listener.start()
            await listener.close()
            message = str(info.value)
            assert f"127.0.0.1:{port}" in message and "port in use by" in message
            assert info.value.in_use and info.value.port == port
            assert "\n" not in message

    run(main())


def test_pipelined_greeting_and_bad_auth_get_both_replies(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs, users=(("alice", "s3cret"),)) as eng:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            writer.write(b"\x05\x01\x02" + b"\x01\x05alice\x05wrong")
            async with asyncio.timeout(10):
                answer = await reader.read()
            assert answer == b"\x05\x02\x01\x01"  # method selection, then the RFC 1929 failure
            writer.close()

    run(main())


def test_engine_close_ends_direct_relays(certs: Certs) -> None:
    async def main() -> None:
        async with tcp_server(echo_handler) as echo:
            eng = Engine(engine_config(certs, mode=Mode.DIRECT))
            await eng.start()
            try:
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
            finally:
                await eng.close()
            async with asyncio.timeout(5):
                try:
                    assert await reader.read() == b""
                except ConnectionError:
                    pass
            writer.close()

    run(main())
