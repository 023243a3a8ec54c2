"""Defects an attacker found in the server (issue 12): requests that leaked the connections the
server had dialled for them, host names that escaped the name-lookup error handling, and
reverse listeners without a bound.  Real servers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn.config import (
    MAX_REVERSE_LISTENERS_PER_CLIENT,
    WstunnelServerOptions,
    load_file,
    parse_reverse,
)
from autovpn.engine import Engine
from autovpn.errors import InvalidHostName, ResetReason, StreamError
from autovpn.net import check_host_name
from autovpn.routing.router import Mode
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.wstunnel.server import WstunnelService
from autovpn.wire import socks5, wstunnel
from tests.conftest import (
    SECRET,
    SECRET_PREFIX,
    Certs,
    engine,
    engine_config,
    eventually,
    http_port,
    run,
    socks_port,
)
from tests.tunnel.wstunnel import wstunnel_peer as peer
from tests.tunnel.wstunnel.test_wstunnel_io import autovpn_server
from tests.wire.test_wstunnel import request


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
            good = peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
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
                    answer = await _status_line(
                        server.port, peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
                    )
                    assert answer.startswith(b"HTTP/1.1 400 ")
                async with asyncio.timeout(10):
                    while target.open or target.accepted < 5:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
            assert svc.refused == 5
            lines = [r for r in caplog.records if "injected failure" in r.getMessage()]
            assert len(lines) == 5
            assert not any(r.exc_info for r in lines)  # one line each, no traceback

    run(main())


def test_check_request_refuses_a_bad_key_before_the_caller_dials() -> None:
    """Sans-I/O: check 9 is part of ``check_request`` now, so no caller dials for a request
    whose 101 could never be built; HTTP/2 requests carry no key and are not asked for one."""
    assert wstunnel.check_request(request()).host == "google.com"
    for key in ("\xe9" + "A" * 23, "c2hvcnQ=", "!" * 24, "dGhlIHNhbXBsZSBub25jZQ"):
        with pytest.raises(wstunnel.WstunnelRejected, match="Sec-WebSocket-Key"):
            wstunnel.check_request(request(Sec_WebSocket_Key=key))
    with pytest.raises(wstunnel.WstunnelRejected, match="Version"):
        wstunnel.check_request(request(Sec_WebSocket_Version="8"))
    wstunnel.check_request(request(Sec_WebSocket_Key=""), require_upgrade=False)


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
                    # The stream's access log line, which names the failure.
                    assert lines[0].name == "autovpn.access"
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
                        request = peer.upgrade_request(
                            "x", peer.make_jwt(claims), prefix=SECRET_PREFIX
                        )
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


# -- item 10: reverse listeners per client are bounded and close when their client leaves --------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@asynccontextmanager
async def _wstunnel_server(per_client: int) -> AsyncIterator[tuple[TunnelServer, WstunnelService]]:
    settings = ServerSettings(
        "127.0.0.1", 0, {"default": SECRET}, max_reverse_listeners_per_client=per_client
    )
    async with TunnelServer(settings) as server:
        service = WstunnelService(server, WstunnelServerOptions()).install()
        try:
            yield server, service
        finally:
            await service.close()


async def _reverse_request(
    server_port: int, bind_port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    claims = {"id": "r", "p": "ReverseTcp", "r": "127.0.0.1", "rp": bind_port}
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(peer.upgrade_request("x", peer.make_jwt(claims), prefix=SECRET_PREFIX))
    return reader, writer


def test_wstunnel_reverse_listeners_are_capped_per_client_and_close_when_it_leaves() -> None:
    cap = 3

    async def main() -> None:
        async with _wstunnel_server(cap) as (server, svc):
            ports = _free_ports(cap + 1)
            held = [await _reverse_request(server.port, p) for p in ports[:cap]]
            await eventually(lambda: len(svc.reverse.listeners) == cap, within=10)
            # One more listener for the same client: refused at once with wstunnel's 400.
            reader, writer = await _reverse_request(server.port, ports[cap])
            async with asyncio.timeout(10):
                assert (await reader.readline()).startswith(b"HTTP/1.1 400 ")
            writer.close()
            assert not _listening(ports[cap])
            # Waiting on a listener the client opened already costs nothing: held, not refused.
            reader, again = await _reverse_request(server.port, ports[0])
            held.append((reader, again))
            with pytest.raises(TimeoutError):  # no answer: it waits for a connection
                await asyncio.wait_for(reader.readline(), 0.3)
            assert all(_listening(p) for p in ports[:cap])
            assert len(svc.reverse.listeners) == cap
            # The client leaves (FIN): its listeners close now, not after the idle timeout.
            for _, w in held:
                w.close()
            await eventually(lambda: not svc.reverse.listeners, within=5)
            await eventually(lambda: not any(_listening(p) for p in ports[:cap]), within=5)
            assert svc.options.reverse_idle_timeout == 180.0  # it was not the idle timeout
            # and its slots are free again
            again_held = await _reverse_request(server.port, ports[cap])
            await eventually(lambda: len(svc.reverse.listeners) == 1, within=10)
            again_held[1].close()
            await eventually(lambda: not svc.reverse.listeners, within=5)

    run(main())


def test_native_reverse_listeners_are_capped_per_user_and_close_when_it_leaves(
    certs: Certs,
) -> None:
    cap = 2

    async def main() -> None:
        server_cfg = engine_config(certs, tls=False)
        server_cfg.client = None
        assert server_cfg.server is not None
        server_cfg.server.max_reverse_listeners_per_client = cap
        async with Engine(server_cfg) as srv:
            assert srv.server is not None
            reverse = srv.server.reverse
            client_cfg = engine_config(certs, tls=False, server=False, server_port=srv.server.port)
            assert client_cfg.client is not None
            ports = _free_ports(cap + 1)
            client_cfg.client.reverse = [parse_reverse(f"tcp://{p}:127.0.0.1:9") for p in ports]
            async with Engine(client_cfg):
                await eventually(lambda: reverse.bound + reverse.refused == cap + 1, within=10)
                assert (reverse.bound, reverse.refused) == (cap, 1)
                assert sum(_listening(p) for p in ports) == cap
                assert reverse.held == {"default": cap}
            # the client is gone: so are its listeners, and its count
            await eventually(lambda: not any(_listening(p) for p in ports), within=5)
            assert reverse.held == {}

    run(main())


def test_max_reverse_listeners_per_client_in_the_server_config(tmp_path: Path) -> None:
    assert ServerSettings("127.0.0.1", 0, {}).max_reverse_listeners_per_client == 16
    assert MAX_REVERSE_LISTENERS_PER_CLIENT == 16
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    path = tmp_path / "autovpn.toml"
    for value, ok in (("4", True), ("0", True), ("-1", False), ('"many"', False), ("true", False)):
        path.write_text(
            f'[server]\nlisten = "ws://127.0.0.1:8443"\nsecret_file = "{secret}"\n'
            f"max_reverse_listeners_per_client = {value}\n"
        )
        cfg, errors = load_file(path)
        if ok:
            assert not errors, errors
            assert cfg.server is not None
            assert cfg.server.max_reverse_listeners_per_client == int(value)
        else:
            assert [e.key for e in errors] == ["server.max_reverse_listeners_per_client"]


def test_a_waiting_wstunnel_request_is_read_on_so_its_leaving_is_seen() -> None:
    """A reverse request waits unanswered, maybe for hours: its peer's FIN must still be seen
    (with reading paused it was not, and the request, its socket and the listener stayed for
    good), and what the peer sends meanwhile still reaches the tunnel."""

    async def main() -> None:
        async with _wstunnel_server(MAX_REVERSE_LISTENERS_PER_CLIENT) as (server, svc):
            (bind,) = _free_ports(1)
            reader, writer = await _reverse_request(server.port, bind)
            await eventually(lambda: len(svc.reverse.listeners) == 1, within=10)
            await asyncio.sleep(0.1)
            writer.write(peer.frame(peer.BINARY, b"sent before the 101"))
            await asyncio.sleep(0.1)
            r, w = await asyncio.open_connection("127.0.0.1", bind)
            async with asyncio.timeout(10):
                assert (await reader.readline()).startswith(b"HTTP/1.1 101 ")
                assert await r.readexactly(19) == b"sent before the 101"
            w.close()
            writer.close()
            # The next request waits; its client leaves: the listener goes at once.
            reader, writer = await _reverse_request(server.port, bind)
            listeners = svc.reverse.listeners
            await eventually(lambda: sum(x.waiting for x in listeners.values()) == 1)
            writer.close()
            await eventually(lambda: not svc.reverse.listeners, within=5)
            assert not _listening(bind)

    run(main())
