"""The tunnel end to end over real sockets and real TLS: SOCKS5 → wss mux → server → target."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from autovpn.engine import Engine
from autovpn.tunnel.mux.connection import DEFAULT_WINDOW
from autovpn.wire import socks5
from tests.conftest import (
    Certs,
    echo_handler,
    engine,
    pattern,
    pattern_digest,
    run,
    sink_handler,
    socks_open,
    socks_port,
    tcp_server,
)

BULK = 256 << 20


def test_bulk_256mib_each_direction_keeps_sha256(certs: Certs) -> None:
    async def source_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in pattern(BULK, seed=2):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await reader.read()

    async def main() -> None:
        async with (
            engine(certs) as eng,
            tcp_server(sink_handler) as sink,
            tcp_server(source_handler) as source,
        ):
            # Upload: the far end hashes what it received.
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", sink)
            for chunk in pattern(BULK, seed=1):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()  # half-close: the digest still comes back
            digest = await reader.readexactly(32)
            writer.close()
            assert digest == pattern_digest(BULK, seed=1)
            # Download.
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", source)
            h = hashlib.sha256()
            total = 0
            while data := await reader.read(1 << 20):
                h.update(data)
                total += len(data)
            writer.close()
            assert total == BULK
            assert h.digest() == pattern_digest(BULK, seed=2)

    run(main())


def test_500_concurrent_streams_share_one_tunnel_connection(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs, pool_size=1) as eng, tcp_server(echo_handler) as echo:

            async def one(i: int) -> bytes:
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                payload = os.urandom(4096) + i.to_bytes(4, "big")
                writer.write(payload)
                got = await reader.readexactly(len(payload))
                writer.close()
                return got == payload and b"ok" or b"bad"

            results = await asyncio.gather(*(one(i) for i in range(500)))
            assert results.count(b"ok") == 500
            assert eng.tunnel is not None and len(eng.tunnel.connections) == 1
            assert eng.tunnel.connects == 1

    run(main())


def test_stalled_reader_does_not_slow_another_stream(certs: Certs) -> None:
    """Stream A's reader never reads; its target keeps sending.  Stream B still moves 32 MiB,
    and A's buffering stays bounded by its window (the target is paused, not buffered)."""
    stalled_sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal stalled_sent
        chunk = b"x" * 65536
        while True:
            writer.write(chunk)
            stalled_sent += len(chunk)
            await writer.drain()

    async def main() -> None:
        async with (
            engine(certs) as eng,
            tcp_server(firehose) as hose,
            tcp_server(sink_handler) as sink,
        ):
            a_reader, a_writer = await socks_open(socks_port(eng), "127.0.0.1", hose)
            await asyncio.sleep(0.5)  # let A fill every buffer on its path
            before = stalled_sent
            size = 32 << 20
            b_reader, b_writer = await socks_open(socks_port(eng), "127.0.0.1", sink)
            for chunk in pattern(size):
                b_writer.write(chunk)
                await b_writer.drain()
            b_writer.write_eof()
            async with asyncio.timeout(30):
                assert await b_reader.readexactly(32) == pattern_digest(size)
            # A is held back by flow control: what its target managed to send is bounded by
            # the stream window plus socket and transport buffers, not growing while B ran.
            assert stalled_sent - before < 4 * DEFAULT_WINDOW
            assert stalled_sent < 16 * DEFAULT_WINDOW + (8 << 20)
            assert eng.server is not None
            for conn in eng.server.connections:
                for ep in conn.streams.values():
                    if ep.send_credit <= 0:
                        assert ep.reading_paused
            a_writer.close()
            b_writer.close()

    run(main())


def test_half_close_client_still_gets_the_whole_response(certs: Certs) -> None:
    response = os.urandom(3 << 20)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        assert request == b"request body"
        writer.write(response)
        await writer.drain()

    async def main() -> None:
        async with engine(certs) as eng, tcp_server(handler) as port:
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", port)
            writer.write(b"request body")
            writer.write_eof()
            got = await reader.read()
            writer.close()
            assert got == response

    run(main())


def test_refused_target_gives_socks_connection_refused(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as port:
            pass  # the server is closed now: the port refuses
        async with engine(certs) as eng:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            hs = socks5.Socks5ClientHandshake("127.0.0.1", port)
            writer.write(hs.initial_bytes())
            code = None
            try:
                while True:
                    data = await reader.read(100)
                    assert data
                    hs.receive_data(data)
                    if out := hs.data_to_send():
                        writer.write(out)
            except socks5.Socks5Error as exc:
                code = exc.reply_code
            writer.close()
            assert code == socks5.Reply.CONNECTION_REFUSED

    run(main())


def test_policy_refusal_gives_socks_not_allowed(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs, allow=()) as eng, tcp_server(echo_handler) as port:
            try:
                await socks_open(socks_port(eng), "127.0.0.1", port)
            except socks5.Socks5Error as exc:
                assert exc.reply_code == socks5.Reply.NOT_ALLOWED
            else:
                raise AssertionError("the policy let a loopback target through")
            # a name that resolves to loopback is refused too (checked after resolution)
            try:
                await socks_open(socks_port(eng), "localhost", port)
            except socks5.Socks5Error as exc:
                assert exc.reply_code == socks5.Reply.NOT_ALLOWED
            else:
                raise AssertionError("the policy let localhost through")

    run(main())


def test_wrong_secret_fails_without_hanging(certs: Certs) -> None:
    async def main() -> None:
        async with (
            engine(certs, client_secret=b"not-the-secret!!") as eng,
            tcp_server(echo_handler) as port,
        ):
            assert eng.tunnel is not None
            eng.tunnel.settings.connect_timeout = 2.0
            started = time.monotonic()
            try:
                await socks_open(socks_port(eng), "127.0.0.1", port)
            except socks5.Socks5Error as exc:
                assert exc.reply_code == socks5.Reply.GENERAL_FAILURE
            else:
                raise AssertionError("a wrong secret opened a stream")
            assert time.monotonic() - started < 10
            assert eng.server is not None and eng.server.refused >= 1
            assert "403" in eng.tunnel.last_error

    run(main())


def test_plain_ws_transport_works(certs: Certs) -> None:
    """ws:// (for use behind a TLS-terminating reverse proxy) carries the same mux."""

    async def main() -> None:
        async with engine(certs, tls=False) as eng, tcp_server(echo_handler) as port:
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()

    run(main())


def test_killed_tunnel_fails_open_streams_fast_and_recovers(certs: Certs) -> None:
    """The server half is a separate engine; closing it abruptly resets open streams at once,
    and once a server is back on the same port new streams succeed."""
    from tests.conftest import engine_config, free_port

    async def main() -> None:
        port = free_port()
        server_cfg = engine_config(certs, server_port=port)
        server_cfg.client = None
        client_cfg = engine_config(certs, server_port=port, server=False)
        async with tcp_server(echo_handler) as echo:
            server = Engine(server_cfg)
            await server.start()
            async with Engine(client_cfg) as client:
                reader, writer = await socks_open(socks_port(client), "127.0.0.1", echo)
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
                assert server.server is not None
                for conn in list(server.server.connections):
                    conn.abort()  # as if the server process died: RST, no goodbye
                await server.close()
                started = time.monotonic()
                async with asyncio.timeout(5):
                    try:
                        rest = await reader.read()
                    except ConnectionError:
                        rest = b""
                assert rest == b""
                assert time.monotonic() - started < 5
                writer.close()
                server = Engine(server_cfg)
                await server.start()
                try:
                    async with asyncio.timeout(20):
                        while True:
                            try:
                                reader, writer = await socks_open(
                                    socks_port(client), "127.0.0.1", echo
                                )
                                break
                            except (socks5.Socks5Error, ConnectionError):
                                await asyncio.sleep(0.2)
                    writer.write(b"again")
                    assert await reader.readexactly(5) == b"again"
                    writer.close()
                finally:
                    await server.close()

    run(main())


def test_silent_dead_tunnel_is_detected_by_keepalive(certs: Certs) -> None:
    """A tunnel path that goes silent (no FIN, no RST: a blackhole) is declared dead after the
    keepalive timeout; its streams fail instead of hanging, and new streams get a new
    connection once the path works again."""
    from tests.conftest import engine_config, free_port

    frozen = False

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 16):
            if not frozen:
                dst.write(data)
                await dst.drain()

    async def main() -> None:
        server_port = free_port()
        cfg = engine_config(certs, server_port=server_port)
        assert cfg.client is not None

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server_port)
            tasks = [
                asyncio.ensure_future(pump(reader, up_writer)),
                asyncio.ensure_future(pump(up_reader, writer)),
            ]
            try:
                # Either side ending ends the relayed connection (both sockets close).
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                up_writer.close()

        async with tcp_server(relay) as relay_port, tcp_server(echo_handler) as echo:
            from autovpn.config import ServerURL

            cfg.client.server = ServerURL(True, "127.0.0.1", relay_port)
            cfg.client.keepalive_interval = 0.3
            cfg.client.keepalive_timeout = 1.0
            async with Engine(cfg) as eng:
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                writer.write(b"one")
                assert await reader.readexactly(3) == b"one"
                nonlocal frozen
                frozen = True
                started = time.monotonic()
                async with asyncio.timeout(10):
                    try:
                        assert await reader.read() == b""
                    except ConnectionError:
                        pass  # reset: also a prompt failure
                assert time.monotonic() - started < 5
                writer.close()
                frozen = False
                async with asyncio.timeout(15):
                    while True:
                        try:
                            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                            break
                        except (socks5.Socks5Error, ConnectionError):
                            await asyncio.sleep(0.1)
                writer.write(b"two")
                assert await reader.readexactly(3) == b"two"
                writer.close()

    run(main())


def test_pipelined_early_data_beyond_the_open_frame_arrives_whole(certs: Certs) -> None:
    """A client that sends its greeting, CONNECT and 100,000 bytes at once: the first 64 KiB
    ride in OPEN, the rest follows once the stream is open."""

    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as echo:
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port(eng))
            hs = socks5.Socks5ClientHandshake("127.0.0.1", echo, pipeline=True)
            payload = os.urandom(100_000)
            writer.write(hs.initial_bytes() + payload)
            while hs.receive_data(await reader.readexactly(1)) is None:
                pass
            assert await reader.readexactly(len(payload)) == payload
            writer.close()

    run(main())


def test_data_after_fin_resets_only_that_stream(certs: Certs) -> None:
    from autovpn.wire import frames

    async def main() -> None:
        async with engine(certs) as eng, tcp_server(echo_handler) as echo:
            a_reader, a_writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
            b_reader, b_writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
            assert eng.tunnel is not None
            (conn,) = eng.tunnel.connections
            sid_a = min(conn.streams)
            # a misbehaving peer: FIN, then DATA on the same stream
            conn.receive(_ws(frames.frame(frames.FrameType.FIN, sid_a)))
            conn.receive(_ws(frames.data_header(sid_a, 3) + b"bad"))
            async with asyncio.timeout(10):
                try:
                    await a_reader.read()
                except ConnectionError:
                    pass
            b_writer.write(b"still fine")
            assert await b_reader.readexactly(10) == b"still fine"
            a_writer.close()
            b_writer.close()

    run(main())


def _ws(payload: bytes) -> bytes:
    from autovpn.wire.websocket import Opcode, encode_frame

    return encode_frame(Opcode.BINARY, payload)


def test_an_open_the_server_never_answers_times_out_and_is_cancelled(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs) as eng:
            assert eng.server is not None and eng.tunnel is not None
            stuck = asyncio.Event()

            async def never(host: str, port: int) -> list[str]:
                stuck.set()
                await asyncio.Event().wait()  # a resolver that never answers
                return []

            eng.server.settings.resolve = never
            eng.tunnel.settings.open_timeout = 0.5
            started = time.monotonic()
            try:
                await socks_open(socks_port(eng), "never.test.example", 80)
            except socks5.Socks5Error as exc:
                assert exc.reply_code == socks5.Reply.TTL_EXPIRED  # SOCKS5's "timed out"
            else:
                raise AssertionError("an unanswered open succeeded")
            assert stuck.is_set() and time.monotonic() - started < 5
            conn = next(iter(eng.tunnel.connections))
            assert not conn.streams  # forgotten on our side; the server got a RESET

    run(main())
