"""Defects an attacker found in the server (issue 12): requests that leaked the connections the
server had dialled for them, host names that escaped the name-lookup error handling, and
reverse listeners without a bound.  Real servers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from autovpn.errors import InvalidHostName, ResetReason, StreamError
from autovpn.net import check_host_name
from autovpn.routing.router import Mode
from autovpn.wire import socks5, wstunnel
from tests.conftest import Certs, engine, http_port, run, socks_port
from tests.tunnel.wstunnel import wstunnel_peer as peer
from tests.tunnel.wstunnel.test_wstunnel_io import autovpn_server


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _CountingTarget:
    """A TCP listener on 127.0.0.1 that counts the connections it accepted and still holds."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        for writer in list(self.open):
            writer.transport.abort()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open.add(writer)
        try:
            await reader.read()
        except ConnectionError:
            pass
        finally:
            self.open.discard(writer)
            writer.close()


async def _status_line(port: int, request: bytes) -> bytes:
    """The first line the server answers to ``request`` (bounded: a hang fails the test)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            return await reader.readline()
    finally:
        writer.close()


# -- item 2: nothing dialled for a request that is refused; nothing left open on any error ------


def test_non_ascii_websocket_key_is_refused_before_dialling_and_leaks_nothing() -> None:
    n = 50

    async def main() -> None:
        target = _CountingTarget()
        async with autovpn_server() as (server, svc), target as port:
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", port))
            good = peer.upgrade_request("x", jwt)
            bad = good.replace(b"sec-websocket-key: ", b"sec-websocket-key: \xe9")
            assert bad != good
            before = _open_fds()
            answers = await asyncio.gather(*(_status_line(server.port, bad) for _ in range(n)))
            assert all(a.startswith(b"HTTP/1.1 400 ") for a in answers), set(answers)
            await asyncio.sleep(0.2)  # let any stray dial land
            assert target.accepted == 0  # refused before the destination was dialled
            assert not target.open
            assert svc.refused == n
            # Every descriptor of those requests is closed again (the clients' sockets included).
            await asyncio.sleep(0.1)
            assert _open_fds() <= before + 2, (before, _open_fds())
            # The key is the base64 of 16 bytes (RFC 6455 section 4.2.1), and nothing else.
            for key in (b"c2hvcnQ=", b"!" * 24, b""):
                request = good.replace(good.split(b"sec-websocket-key: ")[1][:24], key)
                assert (await _status_line(server.port, request)).startswith(b"HTTP/1.1 400 ")
            assert target.accepted == 0
            # and a good request is still served
            ok = await peer.client_connect(server.port, good)
            assert ok.status == 101
            ok.writer.close()
            assert target.accepted == 1

    run(main())


def test_an_unexpected_error_after_the_dial_closes_the_target_and_answers_400(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong between the dial and the relay (here an error injected into the
    101's construction) closes the dialled target, answers the peer and logs one line."""

    def broken(head: object, cookie: str | None = None) -> bytes:
        raise RuntimeError("injected failure")

    async def main() -> None:
        target = _CountingTarget()
        async with autovpn_server() as (server, svc), target as port:
            monkeypatch.setattr(wstunnel, "accept_upgrade", broken)
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", port))
            with caplog.at_level(logging.INFO, logger="autovpn.tunnel.wstunnel"):
                for _ in range(5):
                    answer = await _status_line(server.port, peer.upgrade_request("x", jwt))
                    assert answer.startswith(b"HTTP/1.1 400 ")
                async with asyncio.timeout(10):
                    while target.open or target.accepted < 5:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
            assert svc.refused == 5
            lines = [r for r in caplog.records if "injected failure" in r.getMessage()]
            assert len(lines) == 5
            assert not any(r.exc_info for r in lines)  # one line each, no traceback

    run(main())


# -- item 7: a name no resolver can take is an invalid name: one refusal, one log line ----------

#: Each fails getaddrinfo's IDNA encoding with UnicodeError, so no query can leave even
#: without the fix (a name over 253 characters would reach the system resolver: it is only in
#: the sans-I/O check below).
BAD_NAMES = (
    "a" * 64 + ".example",  # a label over 63 characters
    "a..example",  # an empty label
    ".example",
)


def test_host_name_check() -> None:
    for good in (
        "example.com",
        "example.com.",
        "a" * 63 + ".example",
        ("x" * 62 + ".") * 4 + "y",  # 253 characters
        "localhost",
        "127.0.0.1",
        "::1",
        "bücher.example",
        "_dmarc.example",
    ):
        check_host_name(good)
    for bad in (*BAD_NAMES, "x." * 126 + "ab", "", ".", "example..", "ü" * 64 + ".example"):
        with pytest.raises(InvalidHostName) as info:
            check_host_name(bad)
        assert isinstance(info.value, OSError)  # refused as an unresolvable name is
        assert info.value.reason is ResetReason.HOST_UNREACHABLE


def _records_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if name[:40] in r.getMessage()]


def test_native_server_refuses_an_invalid_name_in_one_log_line(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with engine(certs, tls=False) as eng:
            assert eng.tunnel is not None
            caplog.clear()
            with caplog.at_level(logging.INFO):
                for name in BAD_NAMES:
                    # The client's own tunnel opener: it sends what it is given.
                    with pytest.raises(StreamError) as info:
                        async with asyncio.timeout(10):
                            await eng.tunnel.open_stream(name, 80)
                    assert info.value.reason is ResetReason.HOST_UNREACHABLE
                    lines = _records_naming(caplog, name)
                    assert len(lines) == 1, [r.getMessage() for r in lines]
                    assert lines[0].name == "autovpn.tunnel.server"
                    assert not lines[0].exc_info
                    assert "not a valid host name" in lines[0].getMessage()
                    caplog.clear()

    run(main())


def test_wstunnel_server_refuses_an_invalid_name_promptly_in_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with autovpn_server() as (server, svc):
            with caplog.at_level(logging.INFO, logger="autovpn.tunnel.wstunnel"):
                for name in BAD_NAMES:
                    for protocol in (
                        {"Tcp": {"proxy_protocol": False}},
                        {"Udp": {"timeout": None}},
                    ):
                        claims = {"id": "i", "p": protocol, "r": name, "rp": 80}
                        request = peer.upgrade_request("x", peer.make_jwt(claims))
                        answer = await _status_line(server.port, request)  # no hang: bounded
                        assert answer.startswith(b"HTTP/1.1 400 "), (name, protocol, answer)
                        lines = _records_naming(caplog, name)
                        assert len(lines) == 1, [r.getMessage() for r in lines]
                        assert not lines[0].exc_info
                        caplog.clear()
            assert svc.refused == 2 * len(BAD_NAMES)

    run(main())


@pytest.mark.parametrize("mode", [Mode.GLOBAL, Mode.DIRECT])
def test_client_listeners_refuse_an_invalid_name_as_host_unreachable(
    certs: Certs, caplog: pytest.LogCaptureFixture, mode: Mode
) -> None:
    """Given such a name, the SOCKS5 and HTTP listeners answer "host unreachable" (0x04, 502)
    themselves, whether the route is the tunnel or direct, and log one line."""
    name = BAD_NAMES[0]

    async def main() -> None:
        async with engine(certs, tls=False, mode=mode) as eng:
            caplog.clear()
            with caplog.at_level(logging.INFO):
                reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
                raw = name.encode()
                writer.write(b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\0P")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(2) == b"\x05\x00"  # no auth
                    reply = await reader.readexactly(4)
                assert reply[1] == socks5.Reply.HOST_UNREACHABLE
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
                writer.write(f"CONNECT {name}:80 HTTP/1.1\r\nHost: {name}:80\r\n\r\n".encode())
                async with asyncio.timeout(10):
                    assert (await reader.readline()).startswith(b"HTTP/1.1 502 ")
                writer.close()
                await asyncio.sleep(0.1)
            lines = _records_naming(caplog, name)
            assert len(lines) == 2, [r.getMessage() for r in lines]  # one per listener
            assert not any(r.exc_info for r in caplog.records)

    run(main())
