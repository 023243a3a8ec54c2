"""Shared test fixtures: certificates made here, loopback servers, and a tunnel engine.

Everything listens on 127.0.0.1 with port 0.  No test name is resolved by the system resolver:
targets are IP literals (or ``localhost``, answered by the hosts file).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from autovpn.config import ClientConfig, Config, ListenSpec, ServerConfig, ServerURL
from autovpn.engine import Engine
from autovpn.eventloop import run as run_on_loop
from autovpn.routing.router import Mode
from autovpn.tunnel.tls import make_private_ca
from autovpn.wire import socks5

T = TypeVar("T")
SECRET = b"test-secret-0123456789"
#: What a stock wstunnel client sends as ``-P`` to authenticate as the default user.
SECRET_PREFIX = SECRET.decode()


#: A test coroutine that runs longer is cancelled.  pytest-timeout's signal cannot interrupt
#: uvloop's C run loop, so a hung await would otherwise stall the whole suite.
TEST_TIMEOUT = 90.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine on the engine's event loop (uvloop when installed)."""

    async def bounded() -> T:
        try:
            async with asyncio.timeout(TEST_TIMEOUT):
                return await coro
        except BaseException as exc:
            # A failed test may leave streams open, held by the locals of its frames.  Let
            # them go while the loop still runs: a StreamWriter collected later, inside
            # uvloop's loop.close(), closes its transport there, and close() never returns
            # (seen: the whole suite hung on one failing test).
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
            await asyncio.sleep(0.05)
            raise

    return run_on_loop(bounded())


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path
    dir: Path


def _make_certs(directory: Path) -> Certs:
    ca, cert, key = make_private_ca(directory, ["localhost", "*.test.example", "127.0.0.1"])
    return Certs(ca, cert, key, directory)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return _make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test, and every subprocess it starts with the inherited environment, keeps its
    state in its own temporary directory: AUTOVPN_STATE_DIR, and a HOME of its own (so that
    a process that loses AUTOVPN_STATE_DIR still writes nothing in the user's home)."""
    monkeypatch.setenv("AUTOVPN_STATE_DIR", str(tmp_path / "state"))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AUTOVPN_SECRET", raising=False)
    yield


def engine_config(
    certs: Certs,
    *,
    allow: tuple[str, ...] = ("127.0.0.0/8",),
    users: tuple[tuple[str, str], ...] = (),
    client_secret: bytes = SECRET,
    tls: bool = True,
    pool_size: int = 1,
    mode: Mode = Mode.GLOBAL,
    server: bool = True,
    server_port: int = 0,
) -> Config:
    """A client and a server in one engine, talking wss over loopback with the test CA."""
    sc = ServerConfig(
        listen=ServerURL(tls, "127.0.0.1", server_port),
        users={"default": SECRET},
        tls_certificate=certs.cert if tls else None,
        tls_private_key=certs.key if tls else None,
        allow=list(allow),
    )
    cc = ClientConfig(
        server=ServerURL(tls, "127.0.0.1", server_port),
        secret=client_secret,
        tls_ca=certs.ca,
        pool_size=pool_size,
        listen=[
            ListenSpec("socks5", "127.0.0.1", 0, users),
            ListenSpec("http", "127.0.0.1", 0, users),
        ],
    )
    return Config(client=cc, server=sc if server else None, mode=mode)


@asynccontextmanager
async def engine(certs: Certs, **kwargs: Any) -> AsyncIterator[Engine]:
    async with Engine(engine_config(certs, **kwargs)) as eng:
        yield eng


def socks_port(eng: Engine) -> int:
    return eng.listeners[0].bound_port


def http_port(eng: Engine) -> int:
    return eng.listeners[1].bound_port


async def socks_open(
    port: int, host: str, target_port: int, user: str | None = None, password: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a SOCKS5 CONNECT through our listener with the sans-I/O client helper."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hs = socks5.Socks5ClientHandshake(host, target_port, username=user, password=password)
    writer.write(hs.initial_bytes())
    try:
        while True:
            # One byte at a time: bytes after the reply belong to the caller's stream.
            data = await reader.read(1)
            if not data:
                raise ConnectionError("proxy closed during the SOCKS5 handshake")
            result = hs.receive_data(data)
            out = hs.data_to_send()
            if out:
                writer.write(out)
            if result is not None:
                return reader, writer
    except BaseException:
        writer.close()
        raise


@asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    # A backlog for bursts: with asyncio's default of 100, 500 connects at once overflowed the
    # accept queue on the plain asyncio loop (slower to accept) and one was reset.
    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, backlog=1024)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


async def sink_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads until EOF, then answers with the SHA-256 of everything read."""
    h = hashlib.sha256()
    while data := await reader.read(1 << 18):
        h.update(data)
    writer.write(h.digest())
    await writer.drain()


def pattern(size: int, seed: int = 1) -> Iterator[bytes]:
    """Deterministic, incompressible-looking data in 1 MiB chunks."""
    block = hashlib.shake_256(seed.to_bytes(4, "big")).digest(1 << 20)
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        sent += len(chunk)
        yield chunk


def pattern_digest(size: int, seed: int = 1) -> bytes:
    h = hashlib.sha256()
    for chunk in pattern(size, seed):
        h.update(chunk)
    return h.digest()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def env_without_proxies() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = ""
    return env


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``condition()`` holds (for counters that have no event to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.02)


async def curl(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one curl run, with no proxy from the environment."""
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env_without_proxies(),
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
