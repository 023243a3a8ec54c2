"""What the failover tests of both protocols share: a tunnel server as a real process that a
test may SIGKILL, one new connection through a SOCKS5 listener, and ``autovpn status``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from autovpn.wire import socks5
from tests.conftest import SECRET, Certs, env_without_proxies, socks_open
from tests.processes import Process, autovpn


def server_args(certs: Certs, port: int) -> list[str]:
    """``autovpn server`` on ``port`` with the test CA's certificate, loopback destinations
    allowed, in one process (the tests kill a server with SIGKILL, as a whole, at once)."""
    return [
        "server",
        f"wss://127.0.0.1:{port}",
        "--tls-certificate",
        str(certs.cert),
        "--tls-private-key",
        str(certs.key),
        "--allow",
        "127.0.0.0/8",
        "--workers",
        "1",
    ]


@asynccontextmanager
async def server_process(
    certs: Certs, port: int, tmp_path: Path, *, secret: bytes = SECRET
) -> AsyncIterator[Process]:
    """``autovpn server`` on ``port`` (its default user's secret ``secret``, which a wstunnel
    client sends as its path prefix), with a state directory of its own (per port)."""
    async with autovpn(
        *server_args(certs, port),
        secret=secret,
        state=tmp_path / f"server-{port}",
    ) as process:
        yield process


async def echo_through(socks: int, origin: int, size: int = 4096) -> None:
    """One new connection through the SOCKS5 listener: ``size`` bytes there and back."""
    reader, writer = await socks_open(socks, "127.0.0.1", origin)
    try:
        data = os.urandom(size)
        writer.write(data)
        assert await reader.readexactly(size) == data
    finally:
        writer.close()


async def through_a_kill(
    socks: int, origin: int, victim: Process, total: int, kill_at: int
) -> tuple[list[tuple[int, str]], float]:
    """``total`` new connections one after another, ``victim`` SIGKILLed before the
    ``kill_at``-th: the ones that failed (index, error) and the slowest one's seconds."""
    loop = asyncio.get_running_loop()
    failures: list[tuple[int, str]] = []
    slowest = 0.0
    for i in range(total):
        if i == kill_at:
            await victim.kill()
        started = loop.time()
        try:
            await echo_through(socks, origin)
        except (OSError, EOFError, socks5.Socks5Error) as exc:
            failures.append((i, repr(exc)))
        slowest = max(slowest, loop.time() - started)
    return failures, slowest


async def autovpn_status(state: Path, *args: str) -> str:
    """What ``autovpn status ARGS`` prints about the engine whose state directory is
    ``state`` (it must succeed)."""
    env = env_without_proxies()
    env["AUTOVPN_STATE_DIR"] = str(state)
    status = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "autovpn", "status", *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await status.communicate()
    assert status.returncode == 0
    return out.decode()
