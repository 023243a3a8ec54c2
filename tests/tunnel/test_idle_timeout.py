"""The idle timeout of relayed connections (``idle_timeout``, ``autovpn.idle``).

Through each relay (a DIRECT connection, a native tunnel stream, a wstunnel tunnel) and with
the timeout on one side only (the client, or the server: each side's sweep works alone and
its reset reaches both ends), two connections are opened at once to a recording echo origin:
one stays silent, the other moves a byte every few hundredths of a second.  The silent one is
reset at the application and at the origin, not before its timeout; the active one lived as
long and carries on.  Real sockets, real TLS; the server of the native case where the server
sweeps is a ``python -m autovpn server --idle-timeout`` process.

Timing is used only as bounds that cannot flake: the silent connection is reset within a
generous deadline, and never before the timeout (the sweep's guarantee, on this process's
monotonic clock, from a stamp taken before the connection was opened).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn.config import ClientConfig, Config, ListenSpec, ServerURL
from autovpn.engine import Engine
from autovpn.proxy.dialer import Dialer
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.routing.router import Mode, Router
from tests.conftest import (
    SECRET,
    Certs,
    engine_config,
    eventually,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.server_process import autovpn_server

#: Short enough for a test, long enough that the active connection's 50 ms beat never comes
#: near it, even on a loaded machine.
IDLE = 1.5
BEAT = 0.05


class Origin:
    """An echo server that records how each connection ended: "eof" or "reset"."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            self.ends.append("reset")
            raise
        self.ends.append("eof")


async def check_idle_and_active(socks: int, origin: int, ends: list[str]) -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    idle_r, idle_w = await socks_open(socks, "127.0.0.1", origin)
    busy_r, busy_w = await socks_open(socks, "127.0.0.1", origin)
    for r, w in ((idle_r, idle_w), (busy_r, busy_w)):  # both relay, once
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
    beats = 0
    stop = False

    async def keep_busy() -> None:
        nonlocal beats
        while not stop:
            busy_w.write(b"x")
            assert await busy_r.readexactly(1) == b"x"
            beats += 1
            await asyncio.sleep(BEAT)

    busy = asyncio.ensure_future(keep_busy())
    try:
        async with asyncio.timeout(30):
            with pytest.raises(ConnectionResetError):
                await idle_r.read(1)  # a reset, never a clean end: the peer may be half-dead
        assert loop.time() - before >= IDLE  # never before its timeout
        await eventually(lambda: ends == ["reset"], within=30)  # reset at the origin too
        # The active connection lived as long, and lives on as long again.
        seen = beats
        await asyncio.sleep(IDLE * 1.5)
        assert not busy.done() and beats > seen
    finally:
        stop = True
        async with asyncio.timeout(30):
            await busy  # a whole beat: its echo is read
        idle_w.close()
    busy_w.write(b"still here")
    assert await busy_r.readexactly(10) == b"still here"
    busy_w.close()
    await eventually(lambda: len(ends) == 2, within=30)
    assert ends == ["reset", "eof"]  # the active one ended cleanly, by its client's close


@asynccontextmanager
async def direct(origin: Origin) -> AsyncIterator[int]:
    dialer = Dialer(Router(Mode.DIRECT), None, idle_timeout=IDLE)
    listener = ProxyListener(ListenerKind.SOCKS5, "127.0.0.1", 0, dialer)
    await listener.start()
    try:
        yield listener.bound_port
        assert dialer.idle.closed == 1
    finally:
        await listener.close()
        dialer.close()


def _embedded(certs: Certs, *, client_idle: float, server_idle: float, wstunnel: bool) -> Config:
    cfg = engine_config(certs)
    assert cfg.client is not None and cfg.server is not None
    cfg.client.idle_timeout, cfg.server.idle_timeout = client_idle, server_idle
    if wstunnel:
        cfg.client.protocol = "wstunnel"
    return cfg


@asynccontextmanager
async def embedded(
    certs: Certs, *, client_idle: float, server_idle: float, wstunnel: bool = False
) -> AsyncIterator[int]:
    cfg = _embedded(certs, client_idle=client_idle, server_idle=server_idle, wstunnel=wstunnel)
    async with Engine(cfg) as eng:
        yield socks_port(eng)


@asynccontextmanager
async def server_process(certs: Certs, tmp_path: Path) -> AsyncIterator[int]:
    """A real server with ``--idle-timeout``, and a client engine with no idle timeout."""
    async with autovpn_server(certs, tmp_path, "--idle-timeout", str(IDLE)) as server:
        cc = ClientConfig(
            server=ServerURL(True, "127.0.0.1", server.port),
            secret=SECRET,
            tls_ca=certs.ca,
            listen=[ListenSpec("socks5", "127.0.0.1", 0)],
            idle_timeout=0,
        )
        async with Engine(Config(client=cc, mode=Mode.GLOBAL, control=None)) as eng:
            yield socks_port(eng)
        assert "idle_timeout" in server.text()  # its sweep said what it closed


CASES: dict[str, Callable[[Certs, Origin, Path], contextlib.AbstractAsyncContextManager[int]]] = {
    "direct": lambda certs, origin, tmp: direct(origin),
    "tunnel, client sweeps": lambda certs, origin, tmp: embedded(
        certs, client_idle=IDLE, server_idle=0
    ),
    "tunnel, server process sweeps": lambda certs, origin, tmp: server_process(certs, tmp),
    "wstunnel, client sweeps": lambda certs, origin, tmp: embedded(
        certs, client_idle=IDLE, server_idle=0, wstunnel=True
    ),
    "wstunnel, server sweeps": lambda certs, origin, tmp: embedded(
        certs, client_idle=0, server_idle=IDLE, wstunnel=True
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_idle_connection_is_reset_at_both_ends_an_active_one_is_not(
    case: str, certs: Certs, tmp_path: Path
) -> None:
    async def main() -> None:
        origin = Origin()
        async with tcp_server(origin.handler) as origin_port:
            async with CASES[case](certs, origin, tmp_path) as socks:
                await check_idle_and_active(socks, origin_port, origin.ends)

    run(main())


def test_idle_timeout_zero_never_closes(certs: Certs) -> None:
    """``idle_timeout = 0`` on both sides: no sweep is ever armed."""

    async def main() -> None:
        cfg = _embedded(certs, client_idle=0, server_idle=0, wstunnel=False)
        async with Engine(cfg) as eng:
            assert eng.pool is not None and eng.server is not None
            conns = [c for client in eng.pool.clients for c in client.connections]
            conns += list(eng.server.connections)
            assert conns and not any(c.idle.armed for c in conns)
            assert not any(d.idle.armed for d in eng._dialers)

    run(main())
