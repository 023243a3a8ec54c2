"""Which failed opens are tried again (``autovpn.tunnel.failover.retry_kind``), on real
in-process servers over loopback TLS.

- Early data (the client's first bytes, carried by the OPEN) is never delivered twice: a
  stream whose tunnel died after its OPEN was written fails, and says why; one whose OPEN
  never left is tried again on another server, and the destination gets its bytes once.
- REFUSED_STREAM: a refusal because the connection is closing (GOAWAY) is tried again on a
  new connection to the same, only, server; a refusal for a limit of the connection fails at
  once with the reason when no other connection or server could take it, and goes to another
  server when one is up; the destination policy's refusal fails at once.

The process-level reproduction of the duplicate (a POST through the HTTP proxy, a real server
process, the tunnel cut between them) is in ``tests/tunnel/test_early_data_once.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from autovpn.errors import ResetReason, StreamError
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.pool import PoolServer, ServerPool
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.tls import server_context
from tests.conftest import SECRET, Certs, eventually, run, tcp_server
from tests.tunnel.mux.test_pool import pool_of, settings_for, tunnel_server


class Recorder:
    """A destination that keeps what each connection sent, and never answers."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.arrived = asyncio.Event()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        while data := await reader.read(1 << 16):
            got += data
            self.arrived.set()

    def count(self, data: bytes) -> int:
        return sum(bytes(r).count(data) for r in self.received)


EARLY = b"POST /charge HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n"


def test_an_open_that_never_left_is_retried_with_its_early_data(certs: Certs) -> None:
    async def main() -> None:
        dest = Recorder()
        async with (
            tcp_server(dest.handler) as port,
            tunnel_server(certs) as a,
            tunnel_server(certs) as b,
            pool_of(certs, [(a.port, 1, 1), (b.port, 2, 1)]) as pool,
        ):
            ca, cb = pool.clients
            await eventually(lambda: ca.up and cb.up)
            (conn,) = ca.connections
            opening = asyncio.ensure_future(pool.open_stream("127.0.0.1", port, EARLY))
            await asyncio.sleep(0)  # the OPEN is queued; its write comes after this step...
            conn.abort()  # ...and the connection dies first: nothing left for server a
            ep = await opening
            assert ep.conn in cb.connections and pool.retried == 1
            await eventually(lambda: dest.count(EARLY) == 1)
            assert a.streams_opened == 0 and len(dest.received) == 1
            ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED)

    run(main())


def test_early_data_that_may_have_arrived_is_never_sent_again(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """The OPEN went out and the server delivered its early data; the tunnel dies before the
    OPEN_OK is read.  Another server is up, yet the open fails: a second one would deliver
    the request twice."""

    async def main() -> None:
        dest = Recorder()
        async with (
            tcp_server(dest.handler) as port,
            tunnel_server(certs) as a,
            tunnel_server(certs) as b,
            pool_of(certs, [(a.port, 1, 1), (b.port, 2, 1)]) as pool,
        ):
            ca, cb = pool.clients
            await eventually(lambda: ca.up and cb.up)
            (conn,) = ca.connections
            assert conn.transport is not None
            conn.transport.pause_reading()  # the server's OPEN_OK will not be read
            opening = asyncio.ensure_future(pool.open_stream("127.0.0.1", port, EARLY))
            async with asyncio.timeout(30):
                await dest.arrived.wait()  # the destination has the request
            conn.abort()
            with caplog.at_level(logging.INFO), pytest.raises(StreamError) as failed:
                await opening
            assert failed.value.reason is ResetReason.TUNNEL_LOST and failed.value.tunnel
            assert f"its first {len(EARLY)} bytes may have reached 127.0.0.1:{port}" in str(
                failed.value
            )
            assert pool.retried == 0 and b.streams_opened == 0
            await asyncio.sleep(0.3)  # time enough for a retry that must not come
            assert dest.count(EARLY) == 1 and len(dest.received) == 1

    run(main())


@asynccontextmanager
async def limited_server(certs: Certs, max_streams: int) -> AsyncIterator[TunnelServer]:
    settings = ServerSettings(
        "127.0.0.1",
        0,
        {"default": SECRET},
        ssl_context=server_context(certs.cert, certs.key),
        policy=DestinationPolicy(["127.0.0.0/8"]),
        max_streams_per_connection=max_streams,
    )
    async with TunnelServer(settings) as server:
        yield server


def test_a_goaway_refusal_is_retried_on_a_new_connection_to_the_only_server(
    certs: Certs,
) -> None:
    """The server says GOAWAY on the client's only connection (a worker being replaced, say)
    while it keeps accepting; an OPEN that crossed the GOAWAY is refused, and opened again
    on the new connection the client starts at once.  The old one closes once its last
    stream ended."""

    async def main() -> None:
        dest = Recorder()
        async with (
            tcp_server(dest.handler) as port,
            tunnel_server(certs) as server,
            ServerPool([PoolServer(settings_for(certs, server.port))]) as pool,
        ):
            assert await pool.wait_up(10)
            (client,) = pool.clients
            held = await pool.open_stream("127.0.0.1", port)  # keeps the old one busy
            (old,) = server.connections
            old.goaway()  # written at the end of this step, as the client's OPEN is
            ep = await pool.open_stream("127.0.0.1", port, b"once")
            assert pool.retried == 1 and ep.conn is not held.conn
            assert held.conn.draining and not held.conn.closed
            assert old.streams_refused == 0  # refused for the GOAWAY, not a limit
            await eventually(lambda: dest.count(b"once") == 1)
            held.conn.reset_stream(held.sid, ResetReason.CANCELLED)
            held.on_reset(ResetReason.CANCELLED, "", from_peer=False)
            await eventually(lambda: held.conn.closed and len(server.connections) == 1)
            assert client.live == 1
            ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED)

    run(main())


def test_a_limit_refusal_fails_at_once_with_one_server_and_moves_with_two(certs: Certs) -> None:
    async def main() -> None:
        dest = Recorder()
        async with (
            tcp_server(dest.handler) as port,
            limited_server(certs, 1) as small,
            tunnel_server(certs) as big,
        ):
            async with ServerPool([PoolServer(settings_for(certs, small.port))]) as pool:
                assert await pool.wait_up(10)
                # The destination policy's refusal: final at once.
                with pytest.raises(StreamError) as denied:
                    await pool.open_stream("10.0.0.1", 80)
                assert denied.value.reason is ResetReason.NOT_ALLOWED and pool.retried == 0
                held = await pool.open_stream("127.0.0.1", port)
                with pytest.raises(StreamError) as failed:
                    await pool.open_stream("127.0.0.1", port)
                assert failed.value.reason is ResetReason.REFUSED_STREAM
                message = str(failed.value)
                assert "refused the stream: more than 1 streams open" in message
                assert "max_streams_per_connection" in message
                assert failed.value.public.startswith("tunnel server wss://127.0.0.1:")
                (conn,) = small.connections
                assert conn.streams_refused == 1 and pool.retried == 0  # one try, not three
                held.conn.reset_stream(held.sid, ResetReason.CANCELLED)

            async with pool_of(certs, [(small.port, 1, 1), (big.port, 2, 1)]) as pool:
                await eventually(lambda: all(c.up for c in pool.clients))
                held = await pool.open_stream("127.0.0.1", port)
                ep = await pool.open_stream("127.0.0.1", port)  # refused by small: to big
                assert pool.retried == 1 and ep.conn in pool.clients[1].connections
                for e in (held, ep):
                    e.conn.reset_stream(e.sid, ResetReason.CANCELLED)

    run(main())
