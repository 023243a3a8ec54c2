"""Liveness against a real server process that stops answering (SIGSTOP: the kernel still
accepts its TCP connections, nothing answers on them): the keepalive timeout is kept, new
streams fail fast while the server is known to be silent, and the tunnel comes back with it.

docs/protocol.md, section 6 (Liveness) is the contract tested here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn.config import ClientConfig, Config, ListenSpec, ServerURL
from autovpn.engine import Engine
from autovpn.wire import socks5
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    env_without_proxies,
    free_port,
    run,
    socks_open,
    tcp_server,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")


@asynccontextmanager
async def server_process(certs: Certs, tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """``python -m autovpn server`` on a free loopback port: yields (port, pid).  It is always
    continued, killed and waited for, whatever state the test left it in."""
    port = free_port()
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    env = env_without_proxies()
    env["AUTOVPN_STATE_DIR"] = str(tmp_path / "server-state")
    env.pop("AUTOVPN_SECRET", None)
    with (tmp_path / "server.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "autovpn",
            "server",
            f"wss://127.0.0.1:{port}",
            "--tls-certificate",
            str(certs.cert),
            "--tls-private-key",
            str(certs.key),
            "--secret-file",
            str(secret),
            "--allow",
            "127.0.0.0/8",
            # One process: SIGSTOP stops it (a supervisor's workers would go on serving).
            "--workers",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while b"running" not in (line := await proc.stdout.readline()):
                    assert line, (tmp_path / "server.log").read_text()
            yield port, proc.pid
        finally:
            if proc.returncode is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            await proc.wait()


def client_config(certs: Certs, port: int, interval: float, timeout: float) -> Config:
    cc = ClientConfig(
        server=ServerURL(True, "127.0.0.1", port),
        secret=SECRET,
        tls_ca=certs.ca,
        listen=[ListenSpec("socks5", "127.0.0.1", 0), ListenSpec("http", "127.0.0.1", 0)],
        keepalive_interval=interval,
        keepalive_timeout=timeout,
    )
    return Config(client=cc)


@asynccontextmanager
async def socks_stream(
    port: int, target: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A SOCKS5 stream that is closed however the test ends (a failed assertion included)."""
    reader, writer = await socks_open(port, "127.0.0.1", target)
    try:
        yield reader, writer
    finally:
        writer.close()


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"


async def ended(reader: asyncio.StreamReader) -> bool:
    """The stream ended: EOF or reset (both are a failure the application notices)."""
    try:
        return await reader.read() == b""
    except ConnectionError:
        return True


async def socks_fails(port: int, target: int) -> float:
    """Open a SOCKS5 CONNECT that must fail; returns how long the failure took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(socks5.Socks5Error, match="GENERAL_FAILURE"):
        _, writer = await socks_open(port, "127.0.0.1", target)
        writer.close()
    return loop.time() - started


async def socks_works_again(port: int, target: int, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                reader, writer = await socks_open(port, "127.0.0.1", target)
                break
            except (socks5.Socks5Error, ConnectionError):
                await asyncio.sleep(0.1)
    try:
        await echo_once(reader, writer)
    finally:
        writer.close()


def test_a_stopped_server_is_declared_dead_at_the_keepalive_timeout(
    certs: Certs, tmp_path: Path
) -> None:
    """Silence is measured from the last byte received, and the check is armed for the moment
    it reaches the timeout: a tick of fixed period used to notice it up to one interval late
    (52.5 s for the documented 45 s; here 8 s for 6 s)."""
    interval, timeout = 3.0, 6.0

    async def main() -> None:
        async with (
            server_process(certs, tmp_path) as (port, pid),
            tcp_server(echo_handler) as echo,
            Engine(client_config(certs, port, interval, timeout)) as eng,
            socks_stream(eng.listeners[0].bound_port, echo) as (reader, writer),
        ):
            loop = asyncio.get_running_loop()
            up = loop.time()  # the engine returns once its tunnel connection is up
            assert eng.tunnel is not None
            mux = eng.tunnel.connections[0]
            # The last byte lands a third into a keepalive period (a fixed tick would be two
            # thirds of a period late).
            await asyncio.sleep(max(0.0, 1.0 - (loop.time() - up)))
            await echo_once(reader, writer)
            last_byte = loop.time()
            os.kill(pid, signal.SIGSTOP)
            async with asyncio.timeout(timeout + 4 * interval):
                await mux.lost
            silence = loop.time() - last_byte
            # Never early; late only by timer latency (1 s of slack for a loaded machine).
            assert timeout - 0.1 <= silence < timeout + 1.0, silence
            async with asyncio.timeout(5):
                assert await ended(reader)  # its streams fail with it

    run(main())


def test_new_streams_fail_fast_while_the_server_is_silent_and_work_when_it_answers(
    certs: Certs, tmp_path: Path
) -> None:
    """interval 1 s, timeout 8 s: stalled after 2 s of silence, dead after 8 s.  Opens waiting
    when the stall is declared fail then; opens during the stall, and after the dead connection
    until a new one is up, fail at once (SOCKS5 general failure, HTTP 502) instead of waiting
    15 s for OPEN_OK or 10 s for a reconnect.  The stalled connection and its streams survive
    a server that answers again before the timeout."""
    interval, timeout = 1.0, 8.0

    async def main() -> None:
        async with (
            server_process(certs, tmp_path) as (port, pid),
            tcp_server(echo_handler) as echo,
            Engine(client_config(certs, port, interval, timeout)) as eng,
            socks_stream(eng.listeners[0].bound_port, echo) as (reader, writer),
        ):
            assert eng.tunnel is not None
            tunnel = eng.tunnel
            mux = tunnel.connections[0]
            socks, http = eng.listeners[0].bound_port, eng.listeners[1].bound_port
            loop = asyncio.get_running_loop()
            await echo_once(reader, writer)

            # Stop: an open already waiting fails when the stall is declared (after 2 s).
            last_byte = loop.time()
            os.kill(pid, signal.SIGSTOP)
            await socks_fails(socks, echo)
            assert loop.time() - last_byte < 2 * interval + 1.5
            assert mux.stalled and not mux.closed
            # While stalled: at once, on both listeners; datagrams are dropped, not queued; the
            # status says why.
            assert await socks_fails(socks, echo) < 1.0
            flow = tunnel.open_flow(lambda host, port, data: None)
            assert not tunnel.send_datagram(flow, "127.0.0.1", echo, b"lost")
            tunnel.close_flow(flow)
            status = eng.status()["tunnel"]
            assert isinstance(status, dict) and not status["up"]
            assert "tunnel stalled: no reply from server" in status["last_error"]
            r, w = await asyncio.open_connection("127.0.0.1", http)
            try:
                w.write(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                async with asyncio.timeout(1.0):
                    assert (await r.readline()).startswith(b"HTTP/1.1 502 ")
            finally:
                w.close()

            # The server answers again before the timeout: same connection, same stream.
            os.kill(pid, signal.SIGCONT)
            await socks_works_again(socks, echo, within=5)
            assert not mux.stalled and tunnel.connections == [mux]
            await echo_once(reader, writer)

            # Stop for good: dead after the timeout, its stream with it.
            os.kill(pid, signal.SIGSTOP)
            async with asyncio.timeout(timeout + 4 * interval):
                await mux.lost
                assert await ended(reader)
            # No connection now, and the reconnect hangs: still at once, not after 10 s.
            assert await socks_fails(socks, echo) < 1.0

            os.kill(pid, signal.SIGCONT)
            await socks_works_again(socks, echo, within=20)
            assert tunnel.connects == 2

    run(main())
