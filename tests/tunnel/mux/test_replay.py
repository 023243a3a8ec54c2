"""A recorded native handshake, replayed byte for byte, opens nothing anywhere.

A real client connects through a recording relay on loopback (plain ws://, as behind a
TLS-terminating proxy: that is where a handshake can be recorded) and opens one stream.  Its
bytes up to and including that OPEN are then replayed (1) to another server with the same
secret, (2) to the same server after a restart (a ``python -m autovpn server`` process), and
(3) to the same server at once.  Each replay must be refused before any stream opens or any
dial happens, and the refusal is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn.config import ServerURL
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from tests.conftest import SECRET, free_port, run, tcp_server
from tests.processes import autovpn

#: What a refused replay that got past the upgrade reads: the WebSocket close frame with code
#: 1008 (policy violation), then EOF.
CLOSE_1008 = b"\x88\x02\x03\xf0"


class Target:
    """A loopback TCP server that counts the connections it accepted (the dials)."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await reader.read()


@asynccontextmanager
async def recording_relay(upstream_port: int, record: bytearray) -> AsyncIterator[int]:
    """A TCP relay to ``upstream_port`` that appends every client-to-server byte to ``record``."""

    async def pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, tap: bytearray | None
    ) -> None:
        while data := await src.read(1 << 16):
            if tap is not None:
                tap += data
            dst.write(data)
            await dst.drain()
        dst.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        try:
            await asyncio.gather(pump(reader, up_writer, record), pump(up_reader, writer, None))
        finally:
            up_writer.close()

    async with tcp_server(relay) as port:
        yield port


async def record_handshake(server_port: int, target: int) -> bytes:
    """A real client's bytes from its upgrade request through its first OPEN."""
    record = bytearray()
    async with recording_relay(server_port, record) as relay:
        settings = ClientSettings(ServerURL(False, "127.0.0.1", relay), "default", SECRET)
        async with TunnelClient(settings) as client:
            assert await client.wait_up(10), client.last_error
            await client.open_stream("127.0.0.1", target)  # returns once OPEN_OK came back
            captured = bytes(record)
    assert captured.startswith(b"GET /autovpn/tunnel HTTP/1.1\r\n")
    assert len(captured) > captured.index(b"\r\n\r\n") + 4  # mux bytes followed the head
    return captured


async def replay(port: int, captured: bytes) -> bytes:
    """Send ``captured`` to a server; what it answers until it closes, or for 10 s at most
    (a server that accepts the replay keeps the connection open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(captured)
    answer = b""
    try:
        async with asyncio.timeout(10):
            while data := await reader.read(1 << 16):
                answer += data
    except TimeoutError:
        pass
    finally:
        writer.close()
    return answer


def server_settings(port: int = 0) -> ServerSettings:
    return ServerSettings(
        "127.0.0.1",
        port,
        {"default": SECRET},
        policy=DestinationPolicy(["127.0.0.0/8"]),
    )


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


def test_replay_to_another_server_and_to_the_same_one_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autovpn")
    target = Target()

    async def main() -> None:
        async with (
            tcp_server(target.handler) as target_port,
            TunnelServer(server_settings()) as first,
            TunnelServer(server_settings()) as second,  # another server, the same secret
        ):
            captured = await record_handshake(first.port, target_port)
            assert target.accepted == 1 and first.streams_opened == 1
            caplog.clear()

            # (1) Another server with the same secret: its replay cache never saw the nonce,
            # so the request gets its 101, but the recorded AUTH answers another challenge.
            answer = await replay(second.port, captured)
            assert answer.startswith(b"HTTP/1.1 101 "), answer[:80]
            assert second.streams_opened == second.streams_failed == 0, "a stream opened"
            assert target.accepted == 1, "the replayed OPEN was dialled"
            assert answer.endswith(b"\r\n\r\n" + CLOSE_1008), answer[-40:]
            assert second.refused == 1
            (line,) = refusals(caplog)
            assert "wrong challenge response" in line
            caplog.clear()

            # (3) The same server at once: the nonce is in its replay cache.
            answer = await replay(first.port, captured)
            assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer[:80]
            assert first.streams_opened == 1 and first.streams_failed == 0
            assert first.refused == 1
            (line,) = refusals(caplog)
            assert "replayed nonce" in line

            # Both refusals happened before any dial: the target saw the recording's
            # connection only, and a genuine client is still served.
            assert target.accepted == 1
            settings = ClientSettings(ServerURL(False, "127.0.0.1", second.port), "default", SECRET)
            async with TunnelClient(settings) as client:
                await client.open_stream("127.0.0.1", target_port)
            assert second.streams_opened == 1

    run(main())


@asynccontextmanager
async def server_process(port: int, tmp_path: Path) -> AsyncIterator[list[str]]:
    """``python -m autovpn server ws://127.0.0.1:PORT``; yields its output lines so far (the
    list grows while it runs).  Ctrl-C and wait on exit."""
    async with autovpn(
        "server",
        f"ws://127.0.0.1:{port}",
        "--allow",
        "127.0.0.0/8",
        state=tmp_path / "state",
        interrupt=True,
    ) as process:
        yield process.output


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX")
def test_replay_to_a_restarted_server_process_is_refused(tmp_path: Path) -> None:
    target = Target()
    port = free_port()

    async def main() -> None:
        async with tcp_server(target.handler) as target_port:
            async with server_process(port, tmp_path):
                captured = await record_handshake(port, target_port)
            assert target.accepted == 1
            # (2) The same server after a restart: a new process, an empty replay cache.
            async with server_process(port, tmp_path) as lines:
                answer = await replay(port, captured)
                assert answer.startswith(b"HTTP/1.1 101 "), answer[:80]
                assert target.accepted == 1, "the replayed OPEN was dialled"
                assert answer.endswith(b"\r\n\r\n" + CLOSE_1008), answer[-40:]
                refused: list[str] = []
                async with asyncio.timeout(10):  # the log line may trail the close
                    while not refused:
                        refused = [line for line in lines if "refused" in line]
                        await asyncio.sleep(0.05)
            refused = [line for line in lines if "refused" in line]
            assert len(refused) == 1 and "wrong challenge response" in refused[0], lines
            assert not any("connected" in line or "dial" in line for line in lines), lines
        assert target.accepted == 1

    run(main())
