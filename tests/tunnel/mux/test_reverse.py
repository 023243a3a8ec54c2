"""Native reverse tunnels (-R): the server listens, connections come back through the tunnel to
the client's target; the listener lives as long as the client's registration."""

from __future__ import annotations

import asyncio
import socket

import pytest

from autovpn.config import parse_reverse
from autovpn.engine import Engine
from autovpn.errors import ConfigError
from tests.conftest import (
    Certs,
    echo_handler,
    engine_config,
    eventually,
    free_port,
    run,
    tcp_server,
)


def _reverse_engine(certs: Certs, bind_port: int, target: int, **kw: object) -> Engine:
    cfg = engine_config(certs, **kw)  # type: ignore[arg-type]
    assert cfg.client is not None
    cfg.client.reverse = [parse_reverse(f"tcp://127.0.0.1:{bind_port}:127.0.0.1:{target}")]
    return Engine(cfg)


async def _echo_through(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_reverse_tcp_carries_connections_back_to_the_client(certs: Certs) -> None:
    async def main() -> None:
        bind_port = free_port()
        async with tcp_server(echo_handler) as echo, _reverse_engine(certs, bind_port, echo) as eng:
            assert eng.server is not None
            await eventually(lambda: eng.server is not None and eng.server.reverse.bound == 1)
            payloads = [bytes([i]) * (1 << 16) for i in range(20)]
            results = await asyncio.gather(*(_echo_through(bind_port, p) for p in payloads))
            assert results == payloads  # concurrent, whole, half-close carried through
            assert eng.tunnel is not None and eng.tunnel.reverse is not None
            assert eng.tunnel.reverse.streams == 20
            # the tunnel drops: the listener goes with it, and comes back on the reconnect
            for conn in list(eng.server.connections):
                conn.abort()
            await eventually(lambda: eng.server is not None and eng.server.reverse.bound == 2)
            assert await _echo_through(bind_port, b"again") == b"again"
        await eventually(lambda: _port_free(bind_port))  # closed with the engine

    run(main())


def test_reverse_bind_outside_the_allowed_addresses_is_refused(certs: Certs) -> None:
    async def main() -> None:
        async with tcp_server(echo_handler) as echo:
            eng = _reverse_engine(certs, free_port(), echo)
            assert eng.config.server is not None
            eng.config.server.reverse_binds = ["10.0.0.0/8"]
            async with eng:
                assert eng.server is not None
                await eventually(lambda: eng.server is not None and eng.server.reverse.refused == 1)
                assert eng.server.reverse.bound == 0

    run(main())


def test_a_taken_reverse_port_fails_that_tunnel_only(certs: Certs) -> None:
    async def main() -> None:
        async with tcp_server(echo_handler) as echo, tcp_server(echo_handler) as taken:
            async with _reverse_engine(certs, taken, echo) as eng:
                assert eng.server is not None
                await asyncio.sleep(0.3)
                assert eng.server.reverse.bound == 0
                assert eng.tunnel is not None and eng.tunnel.up  # the tunnel itself is fine

    run(main())


def test_server_cannot_make_the_client_dial_elsewhere(certs: Certs) -> None:
    """An OPEN from the server for an address the client never registered is refused."""

    async def main() -> None:
        bind_port = free_port()
        async with tcp_server(echo_handler) as echo, _reverse_engine(certs, bind_port, echo) as eng:
            assert eng.server is not None and eng.tunnel is not None
            await eventually(lambda: eng.server is not None and eng.server.reverse.bound == 1)
            from autovpn.tunnel.mux.connection import StreamEndpoint
            from autovpn.wire import frames

            (conn,) = eng.server.connections
            ep = StreamEndpoint(conn)
            ep.opened = asyncio.get_running_loop().create_future()
            conn.open_stream(ep, "127.0.0.1", 22, kind=frames.StreamKind.REVERSE_TCP)
            with pytest.raises(Exception, match="no such reverse tunnel|not_allowed"):
                await ep.opened

    run(main())


def test_reverse_spec_parsing() -> None:
    spec = parse_reverse("tcp://127.0.0.1:2222:localhost:22")
    assert (spec.bind_host, spec.bind_port, spec.target_host, spec.target_port) == (
        "127.0.0.1",
        2222,
        "localhost",
        22,
    )
    assert parse_reverse("tcp://2222:localhost:22").bind_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="wstunnel"):
        parse_reverse("socks5://127.0.0.1:1080")
