"""The named limits on what one peer may hold (``autovpn/limits.py``, THREAT_MODEL.md): at its
default, the limit-th is served and the next is refused cleanly; once one ends, a new one is
served again.  Real engines, real sockets.

- streams per tunnel connection (``[server] max_streams_per_connection``): REFUSED_STREAM, which
  the SOCKS5 client sees as a failure reply;
- opens in progress per tunnel connection (``[server] max_pending_opens``): REFUSED_STREAM;
- connections per client address on a listener (``[client] max_connections_per_address``) and
  on the server (``[server] max_connections_per_address``): closed at accept.
"""

from __future__ import annotations

import asyncio
import os
import resource
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from autovpn.config import ServerURL
from autovpn.engine import Engine
from autovpn.errors import ResetReason, StreamError
from autovpn.limits import (
    LISTENER_MAX_CONNECTIONS_PER_ADDRESS,
    MAX_PENDING_OPENS,
    MAX_STREAMS_PER_CONNECTION,
    SERVER_MAX_CONNECTIONS_PER_ADDRESS,
    ConnectionsPerAddress,
)
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.tls import client_context, server_context
from autovpn.wire import socks5
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    engine_config,
    eventually,
    run,
    socks_port,
    tcp_server,
)
from tests.tunnel.test_safe_defaults import native_request
from tests.tunnel.wstunnel import wstunnel_peer as peer

#: Every connection of these tests has its two ends in this process, and the engine's too.
DESCRIPTORS = 4 * MAX_STREAMS_PER_CONNECTION + 1024


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= DESCRIPTORS:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < DESCRIPTORS:
        pytest.skip(f"needs {DESCRIPTORS} file descriptors; RLIMIT_NOFILE hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def socks_connect(
    port: int, target: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A SOCKS5 CONNECT from ``source``; the reply code (0: success) and the streams."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    hs = socks5.Socks5ClientHandshake("127.0.0.1", target)
    writer.write(hs.initial_bytes())
    async with asyncio.timeout(10):
        while True:
            data = await reader.read(1)
            if not data:
                raise ConnectionError("closed during the SOCKS5 handshake")
            try:
                result = hs.receive_data(data)
            except socks5.Socks5Error as exc:
                return reader, writer, -1 if exc.reply_code is None else exc.reply_code
            out = hs.data_to_send()
            if out:
                writer.write(out)
            if result is not None:
                return reader, writer, 0


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    payload = os.urandom(64)
    writer.write(payload)
    return await reader.readexactly(len(payload)) == payload


async def closed_at_once(port: int, source: str) -> bool:
    """True when a connection from ``source`` is closed by the other side without a word."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        async with asyncio.timeout(5):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def held_open(port: int, source: str) -> asyncio.StreamWriter:
    """A connection from ``source`` that sends nothing; asserted still open a moment later."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    await asyncio.sleep(0)
    assert not reader.at_eof()
    return writer


# -- streams per tunnel connection ------------------------------------------------------------


def test_streams_past_max_streams_per_connection_are_refused(certs: Certs) -> None:
    limit = MAX_STREAMS_PER_CONNECTION

    async def main() -> None:
        async with (
            Engine(engine_config(certs, pool_size=1)) as eng,
            tcp_server(echo_handler) as echo,
        ):
            assert eng.server is not None and eng.tunnel is not None
            port = socks_port(eng)
            # From eight addresses: under the listener's own per-address limit.
            sources = [f"127.0.0.{2 + i % 8}" for i in range(limit)]
            held = []
            for start in range(0, limit, 128):
                held += await asyncio.gather(
                    *(socks_connect(port, echo, s) for s in sources[start : start + 128])
                )
            assert [code for _, _, code in held] == [0] * limit
            assert all(await asyncio.gather(*(echoes(r, w) for r, w, _ in held[:16])))
            (conn,) = eng.server.connections
            assert len(conn.streams) == limit
            # One more on the same tunnel connection: refused (general failure for SOCKS5).
            _, writer, code = await socks_connect(port, echo, "127.0.0.10")
            writer.close()
            assert code == socks5.Reply.GENERAL_FAILURE
            assert conn.streams_refused >= 1  # (the client may retry it: client.retries)
            # One ends: there is room again.
            held[0][1].close()
            await eventually(lambda: len(conn.streams) < limit)
            reader, writer, code = await socks_connect(port, echo, "127.0.0.10")
            assert code == 0 and await echoes(reader, writer)
            writer.close()
            for _, w, _ in held:
                w.close()

    run(main())


# -- opens in progress per tunnel connection --------------------------------------------------


def test_opens_past_max_pending_opens_are_refused(certs: Certs) -> None:
    limit = MAX_PENDING_OPENS

    async def main() -> None:
        answer = asyncio.Event()
        asked = 0

        async def slow_resolve(host: str, port: int) -> list[str]:
            nonlocal asked
            asked += 1
            await answer.wait()  # a resolver that takes its time: every open stays pending
            return ["127.0.0.1"]

        async with tcp_server(echo_handler) as echo:
            settings = ServerSettings(
                "127.0.0.1",
                0,
                {"default": SECRET},
                policy=DestinationPolicy(["127.0.0.0/8"]),
                resolve=slow_resolve,
            )
            async with TunnelServer(settings) as server:
                client = TunnelClient(
                    ClientSettings(
                        server=ServerURL(False, "127.0.0.1", server.port),
                        user="default",
                        secret=SECRET,
                        keepalive_interval=0,
                    )
                )
                client.start()
                try:
                    pending = [
                        asyncio.ensure_future(client.open_stream("slow.test", echo))
                        for _ in range(limit)
                    ]
                    await eventually(lambda: asked == limit)
                    with pytest.raises(StreamError) as refused:
                        async with asyncio.timeout(5):  # refused at once, not left pending
                            await client.open_stream("slow.test", echo)
                    assert refused.value.reason is ResetReason.REFUSED_STREAM
                    answer.set()  # the pending ones connect, and the room is back
                    opened = await asyncio.gather(*pending)
                    assert len(opened) == limit
                    extra = await client.open_stream("slow.test", echo)
                    assert extra.opened is not None and extra.opened.done()
                finally:
                    await client.close()

    run(main())


# -- connections per client address: the listeners ---------------------------------------------


def test_listener_refuses_connections_past_max_connections_per_address(certs: Certs) -> None:
    limit = LISTENER_MAX_CONNECTIONS_PER_ADDRESS

    async def main() -> None:
        async with Engine(engine_config(certs)) as eng, tcp_server(echo_handler) as echo:
            port = socks_port(eng)
            idle = []
            for start in range(0, limit, 256):
                n = min(256, limit - start)
                idle += await asyncio.gather(*(held_open(port, "127.0.0.1") for _ in range(n)))
            assert await closed_at_once(port, "127.0.0.1")  # the limit + 1st
            # Another address is served meanwhile.
            reader, writer, code = await socks_connect(port, echo, "127.0.0.2")
            assert code == 0 and await echoes(reader, writer)
            writer.close()
            # One leaves: its address may connect again.
            idle.pop().close()
            await eventually(lambda: eng.listeners[0].clients.count("127.0.0.1") < limit)
            reader, writer, code = await socks_connect(port, echo, "127.0.0.1")
            assert code == 0 and await echoes(reader, writer)
            writer.close()
            for w in idle:
                w.close()

    run(main())


def test_a_listener_counts_relayed_connections_until_they_close(certs: Certs) -> None:
    """After the handshake the socket belongs to the relay; it still counts, until closed."""
    config = engine_config(certs)
    assert config.client is not None
    config.client.max_connections_per_address = 3

    async def main() -> None:
        async with Engine(config) as eng, tcp_server(echo_handler) as echo:
            port = socks_port(eng)
            relays = [await socks_connect(port, echo) for _ in range(3)]
            assert [code for _, _, code in relays] == [0, 0, 0]
            assert all([await echoes(r, w) for r, w, _ in relays])
            assert await closed_at_once(port, "127.0.0.1")
            relays[0][1].close()
            await eventually(lambda: eng.listeners[0].clients.count("127.0.0.1") < 3)
            reader, writer, code = await socks_connect(port, echo)
            assert code == 0 and await echoes(reader, writer)
            writer.close()
            for _, w, _ in relays[1:]:
                w.close()

    run(main())


# -- connections per client address: the server --------------------------------------------------


def test_server_refuses_connections_past_max_connections_per_address(certs: Certs) -> None:
    limit = SERVER_MAX_CONNECTIONS_PER_ADDRESS

    async def main() -> None:
        config = engine_config(certs, tls=False)  # idle TCP connections reach the upgrade
        async with Engine(config) as eng, tcp_server(echo_handler) as echo:
            assert eng.server is not None
            port = eng.server.port
            idle = []
            for start in range(0, limit, 256):
                n = min(256, limit - start)
                idle += await asyncio.gather(*(held_open(port, "127.0.0.3") for _ in range(n)))
            assert await closed_at_once(port, "127.0.0.3")  # the limit + 1st
            # The engine's own tunnel connection (from 127.0.0.1) still serves.
            reader, writer, code = await socks_connect(socks_port(eng), echo)
            assert code == 0 and await echoes(reader, writer)
            writer.close()
            idle.pop().close()
            await eventually(lambda: eng.server is not None and len(eng.server.clients) < limit + 1)
            idle.append(await held_open(port, "127.0.0.3"))
            for w in idle:
                w.close()

    run(main())


async def tls_upgrade(port: int, ca: Path, source: str) -> int:
    """A TLS handshake from ``source``, then the native upgrade with the right secret: the
    answer's status (0: closed before or during the handshake)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            local_addr=(source, 0),
            ssl=client_context(ca),
            server_hostname="localhost",
        )
    except (ssl.SSLError, ConnectionError):
        return 0
    try:
        writer.write(native_request(SECRET, port))
        async with asyncio.timeout(10):
            status = await reader.readline()
        return int(status.split()[1]) if status else 0
    finally:
        writer.close()


def test_server_counts_tls_handshakes_in_progress_per_address(certs: Certs) -> None:
    """A TLS slowloris (connections that never finish their TLS handshake) holds connections
    of its own address's allowance: the count starts at the TCP accept, not at the end of
    the TLS handshake (asyncio's ``create_server(ssl=...)`` reports a connection only then)."""
    limit = 4

    async def main() -> None:
        settings = ServerSettings(
            "127.0.0.1",
            0,
            {"default": SECRET},
            ssl_context=server_context(certs.cert, certs.key),
            handshake_timeout=120,  # the slowloris outlives the test
            max_connections_per_address=limit,
        )
        async with TunnelServer(settings) as server:
            port = server.port
            # Half of them send nothing, half a ClientHello's first bytes (a TLS record
            # header that promises 512 bytes and never brings them).
            idle = [await held_open(port, "127.0.0.3") for _ in range(limit // 2)]
            for _ in range(limit - limit // 2):
                writer = await held_open(port, "127.0.0.3")
                writer.write(b"\x16\x03\x01\x02\x00\x01")
                idle.append(writer)
            await eventually(lambda: server.clients.count("127.0.0.3") == limit)
            assert await closed_at_once(port, "127.0.0.3")  # the limit + 1st
            assert await tls_upgrade(port, certs.ca, "127.0.0.3") == 0
            assert server.clients.refused == 2
            # Another address is served meanwhile, TLS handshake and upgrade.
            assert await tls_upgrade(port, certs.ca, "127.0.0.4") == 101
            # One of the slowloris's connections ends: its address may complete a handshake.
            idle.pop().close()
            await eventually(lambda: server.clients.count("127.0.0.3") < limit)
            assert await tls_upgrade(port, certs.ca, "127.0.0.3") == 101
            for w in idle:
                w.close()
            # Every connection ended, so nothing is counted any more (TLS or not, upgraded
            # or not: the count follows the connection from TCP to TLS to the tunnel).
            await eventually(lambda: len(server.clients) == 0)

    run(main())


async def _wstunnel_tunnel(
    port: int, echo: int, source: str
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A stock wstunnel client's tunnel from ``source``: the upgrade's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(
        peer.upgrade_request("127.0.0.1", peer.make_jwt(peer.tcp_claims("127.0.0.1", echo)))
    )
    try:
        async with asyncio.timeout(5):
            status_line, _ = await peer.read_head(reader)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return 0, reader, writer  # closed without an answer
    return int(status_line.split(" ")[1]), reader, writer


def test_server_counts_wstunnel_tunnels_and_native_connections_until_they_end(
    certs: Certs,
) -> None:
    config = engine_config(certs, pool_size=1)
    assert config.server is not None
    config.server.max_connections_per_address = 2  # the engine's own tunnel holds one
    config.server.allow_anonymous = True

    async def main() -> None:
        async with Engine(config) as eng:
            assert eng.server is not None
            server = eng.server

            def connect() -> TunnelClient:
                return TunnelClient(
                    ClientSettings(
                        server=ServerURL(True, "127.0.0.1", server.port),
                        user="default",
                        secret=SECRET,
                        ssl_context=client_context(certs.ca),
                        keepalive_interval=0,
                    )
                )

            # Native: the second connection is served, the third refused until one ends.
            second = await connect().connect_once()
            with pytest.raises((ConnectionError, OSError)):
                await connect().connect_once()
            await second.shutdown()
            await eventually(lambda: server.clients.count("127.0.0.1") < 2)
            third = await connect().connect_once()
            await third.shutdown()

    run(main())

    plain = engine_config(certs, tls=False)
    assert plain.server is not None
    plain.server.max_connections_per_address = 3
    plain.server.allow_anonymous = True

    async def wstunnel() -> None:
        async with Engine(plain) as eng, tcp_server(echo_handler) as echo:
            assert eng.server is not None
            port = eng.server.port
            tunnels = [await _wstunnel_tunnel(port, echo, "127.0.0.3") for _ in range(3)]
            assert [status for status, _, _ in tunnels] == [101] * 3
            status, _, writer = await _wstunnel_tunnel(port, echo, "127.0.0.3")
            writer.close()
            assert status == 0  # closed at accept: no answer
            tunnels[0][2].close()  # one tunnel ends: its connection is released
            await eventually(
                lambda: eng.server is not None and eng.server.clients.count("127.0.0.3") < 3
            )
            status, _, writer = await _wstunnel_tunnel(port, echo, "127.0.0.3")
            assert status == 101
            writer.close()
            for _, _, w in tunnels[1:]:
                w.close()

    run(wstunnel())


# -- the count itself -------------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


def test_the_count_goes_by_ipv4_address_and_ipv6_slash_64() -> None:
    count = ConnectionsPerAddress(2, "test.limit")
    held = [_Transport() for _ in range(4)]
    assert count.admit(held[0], "2001:db8::1")
    assert count.admit(held[1], "2001:db8::ffff:2")  # the same /64
    assert not count.admit(held[2], "2001:db8::3")
    assert count.admit(held[2], "2001:db8:0:1::3")  # another /64
    assert count.admit(held[3], "::ffff:192.0.2.1")  # IPv4-mapped: counted as IPv4
    assert count.count("192.0.2.1") == 1 and count.refused == 1
    held[0].closing = True  # closed, not released: noticed when the limit is reached
    assert count.admit(_Transport(), "2001:db8::4")
    count.release(held[1])
    count.release(held[1])  # idempotent
    assert count.count("2001:db8::") == 1
