"""Defects an attacker found in the server (issue 12): requests that leaked the connections the
server had dialled for them, host names that escaped the name-lookup error handling, and
reverse listeners without a bound.  Real servers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from autovpn.wire import wstunnel
from tests.conftest import run
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
