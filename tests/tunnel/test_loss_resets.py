"""A tunnel lost in the middle of a transfer reaches the application as an error, never as a
clean end of data.

Transfers whose end is marked by the connection closing (an HTTP/1.0 body without a length, a
SOCKS5 or CONNECT stream) cannot tell a truncated body from a complete one unless a failure
ends them with a TCP reset.  Each test kills a real ``python -m autovpn`` process with SIGKILL
in the middle of a 256 MiB transfer and checks what the socket on the other side of the
surviving process sees: ``ConnectionResetError``, not EOF.  Downloads kill the server (the
client in this process resets the application's socket); uploads kill the client (the server
in this process resets the socket it dialled).  Where a reply is still due, a failed reply
(502) is the error instead; an origin's own reset is passed on as a reset.  The control test
checks that a transfer that ends normally still ends with a clean EOF and the SHA-256-exact
body.

Every test runs on uvloop and on plain asyncio, in this process and in the subprocesses
(``loop`` fixture, AUTOVPN_LOOP): their transports differ, and both must reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from autovpn.engine import Engine
from autovpn.routing.router import Mode
from tests.conftest import (
    SECRET,
    Certs,
    curl,
    engine_config,
    eventually,
    free_port,
    http_port,
    pattern,
    pattern_digest,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.processes import Process, autovpn
from tests.tunnel.servers import server_args

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

#: What the origin would send (or the application would upload) if nothing failed.
BODY = 256 << 20
#: The kill comes once this much went through: well inside the transfer.
KILL_AFTER = 4 << 20
#: Size of the transfers that end normally (the control).
CONTROL_BODY = 48 << 20
SEED = 5


@pytest.fixture(
    params=[
        pytest.param(
            "uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
            ),
        ),
        "asyncio",
    ]
)
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop of this process and of the ``autovpn`` subprocesses (AUTOVPN_LOOP)."""
    name: str = request.param
    monkeypatch.setenv("AUTOVPN_LOOP", name)
    return name


# --- the far ends: an origin that streams, a sink that records how its upload ended ----------


@dataclass
class Origin:
    """Sends ``size`` bytes of ``pattern`` to each connection, then closes it normally.

    With ``http``, reads a request head first and answers HTTP/1.0 without a length: the body
    ends when the connection closes (RFC 9112 section 6.3, item 8)."""

    size: int
    http: bool = False
    sent: int = 0

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.http:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for chunk in pattern(self.size, seed=SEED):
            writer.write(chunk)
            await writer.drain()
            self.sent += len(chunk)
        writer.write_eof()
        # A clean end: FIN after the body, then close once the peer is done (tcp_server).
        await reader.read()


@dataclass
class Sink:
    """Reads each connection to its end; ``ends`` gets ("eof" | "reset", bytes, sha256)."""

    received: int = 0
    ends: asyncio.Queue[tuple[str, int, bytes]] = field(default_factory=asyncio.Queue)

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        total = 0
        how = "eof"
        try:
            while data := await reader.read(1 << 20):
                h.update(data)
                total += len(data)
                self.received += len(data)
        except ConnectionResetError:
            how = "reset"
        self.ends.put_nowait((how, total, h.digest()))


async def read_to_end(
    reader: asyncio.StreamReader, *, kill_after: int | None = None, kill: Process | None = None
) -> tuple[str, int, bytes]:
    """("eof" | "reset", bytes read, their SHA-256); with ``kill``, SIGKILL it once
    ``kill_after`` bytes were read (the reader stops reading meanwhile: the transfer is stalled
    in the middle, not finished)."""
    h = hashlib.sha256()
    total = 0
    async with asyncio.timeout(30):
        try:
            while data := await reader.read(1 << 20):
                h.update(data)
                total += len(data)
                if kill is not None and kill_after is not None and total >= kill_after:
                    await kill.kill()
                    kill = None
        except ConnectionResetError:
            return "reset", total, h.digest()
    return "eof", total, h.digest()


async def read_http_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
    return head


# --- the processes -----------------------------------------------------------------------------


@asynccontextmanager
async def server_process(certs: Certs) -> AsyncIterator[tuple[Process, int]]:
    port = free_port()
    async with autovpn(*server_args(certs, port), loop=os.environ["AUTOVPN_LOOP"]) as server:
        yield server, port


@asynccontextmanager
async def client_engine(certs: Certs, port: int, protocol: str) -> AsyncIterator[Engine]:
    """The client half in this process (SOCKS5 and HTTP listeners), global mode."""
    cfg = engine_config(certs, server=False, server_port=port)
    assert cfg.client is not None
    cfg.client.protocol = protocol
    async with Engine(cfg) as eng:
        yield eng


# --- downloads: the server dies, the client must reset the application's socket --------------


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def socks_download(eng: Engine, origin: int) -> Stream:
    return await socks_open(socks_port(eng), "127.0.0.1", origin)


async def connect_download(eng: Engine, origin: int) -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
    writer.write(
        f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode()
    )
    await read_http_head(reader)
    return reader, writer


async def get_download(eng: Engine, origin: int) -> Stream:
    """An absolute-form HTTP/1.0 GET whose body ends when the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
    writer.write(f"GET http://127.0.0.1:{origin}/big HTTP/1.0\r\n\r\n".encode())
    head = await read_http_head(reader)
    assert b"content-length" not in head.lower()
    return reader, writer


DOWNLOADS = {"socks5": socks_download, "connect": connect_download, "get": get_download}


@pytest.mark.parametrize(
    ("protocol", "kind"),
    [
        ("autovpn", "socks5"),
        ("autovpn", "connect"),
        ("autovpn", "get"),
        ("wstunnel", "socks5"),
        ("wstunnel", "get"),
    ],
)
def test_server_killed_mid_download_resets_the_application(
    certs: Certs, loop: str, protocol: str, kind: str
) -> None:
    async def main() -> None:
        origin = Origin(BODY, http=kind == "get")
        async with (
            tcp_server(origin.handler) as origin_port,
            server_process(certs) as (server, port),
            client_engine(certs, port, protocol) as eng,
        ):
            reader, writer = await DOWNLOADS[kind](eng, origin_port)
            how, total, _ = await read_to_end(reader, kill_after=KILL_AFTER, kill=server)
            writer.close()
            assert server.proc.returncode == -signal.SIGKILL
            assert total < BODY
            assert how == "reset", f"clean EOF after {total} of {BODY} bytes: a silent truncation"

    run(main())


@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_server_killed_before_the_response_is_a_failed_reply(
    certs: Certs, loop: str, protocol: str
) -> None:
    """Where a reply is still due, the failure is that reply: a forwarded request whose
    response had not begun is answered 502 Bad Gateway."""

    async def main() -> None:
        asked = asyncio.Event()

        async def holding(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            asked.set()
            await reader.read()  # no answer: the server dies first

        async with (
            tcp_server(holding) as origin_port,
            server_process(certs) as (server, port),
            client_engine(certs, port, protocol) as eng,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
            writer.write(f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\n\r\n".encode())
            async with asyncio.timeout(30):
                await asked.wait()
                await server.kill()
                reply = await reader.read()
            writer.close()
            assert reply.startswith(b"HTTP/1.1 502 "), reply

    run(main())


@pytest.mark.parametrize(
    ("mode", "protocol"),
    [(Mode.GLOBAL, "autovpn"), (Mode.GLOBAL, "wstunnel"), (Mode.DIRECT, "autovpn")],
)
def test_origin_reset_mid_body_reaches_the_application_as_a_reset(
    certs: Certs, loop: str, mode: Mode, protocol: str
) -> None:
    """A reset from the origin is passed on as a reset, through either tunnel protocol (the
    server resets the stream, the client its socket) and on a direct route alike, not turned
    into a clean end of the body.  Client and server in this process."""

    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in pattern(KILL_AFTER, seed=SEED):
            writer.write(chunk)
            await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        cfg = engine_config(certs, mode=mode)
        assert cfg.client is not None
        cfg.client.protocol = protocol
        async with tcp_server(resetting) as origin_port, Engine(cfg) as eng:
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", origin_port)
            how, total, _ = await read_to_end(reader)
            writer.close()
            assert how == "reset", f"clean EOF after {total} bytes of a reset transfer"

    run(main())


# --- uploads: the client dies, the server must reset the socket it dialled --------------------


@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_client_killed_mid_upload_resets_the_target(certs: Certs, loop: str, protocol: str) -> None:
    async def upload(socks: int, target: int) -> None:
        _, writer = await socks_open(socks, "127.0.0.1", target)
        try:
            for chunk in pattern(BODY, seed=SEED):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass  # the client process is gone: its socket was reset
        finally:
            writer.close()

    async def main() -> None:
        sink = Sink()
        cfg = engine_config(certs)
        cfg.client = None
        async with tcp_server(sink.handler) as sink_port, Engine(cfg) as eng:
            assert eng.server is not None
            socks = free_port()
            async with autovpn(
                "client",
                "--protocol",
                protocol,
                # a wstunnel client authenticates with the secret as its path prefix (-P)
                *(["-P", SECRET.decode()] if protocol == "wstunnel" else []),
                "-L",
                f"socks5://127.0.0.1:{socks}",
                "--tls-ca",
                str(certs.ca),
                "--mode",
                "global",
                f"wss://127.0.0.1:{eng.server.port}",
                loop=os.environ["AUTOVPN_LOOP"],
            ) as client:
                uploading = asyncio.ensure_future(upload(socks, sink_port))
                try:
                    await eventually(lambda: sink.received >= KILL_AFTER, within=30)
                    await client.kill()
                    async with asyncio.timeout(30):
                        how, total, _ = await sink.ends.get()
                finally:
                    uploading.cancel()
                    await asyncio.gather(uploading, return_exceptions=True)
            assert total < BODY
            assert how == "reset", f"clean EOF after {total} of {BODY} bytes: a silent truncation"

    run(main())


# --- curl: an independent client sees the failure --------------------------------------------


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_fails_when_the_server_dies_mid_body(certs: Certs, loop: str) -> None:
    """HTTP/1.0 without a length through SOCKS5: only a reset tells curl the body is short
    (curl(1): exit 56, failure receiving network data); before, it exited 0."""

    async def main() -> None:
        origin = Origin(BODY, http=True)
        async with (
            tcp_server(origin.handler) as origin_port,
            server_process(certs) as (server, port),
            client_engine(certs, port, "autovpn") as eng,
        ):
            fetch = asyncio.ensure_future(
                curl(
                    "--limit-rate",
                    "20M",  # the body takes 13 s: the kill comes in the middle
                    "--socks5-hostname",
                    f"127.0.0.1:{socks_port(eng)}",
                    "--output",
                    "/dev/null",
                    "--write-out",
                    "%{size_download}",
                    f"http://127.0.0.1:{origin_port}/big",
                )
            )
            await eventually(lambda: origin.sent >= KILL_AFTER, within=30)
            await server.kill()
            rc, out, err = await fetch
            assert rc != 0, f"curl exited 0 with {out} of {BODY} bytes"
            assert int(out) < BODY, err

    run(main())


# --- normal ends stay clean -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_normal_ends_stay_clean_and_complete(certs: Certs, loop: str, protocol: str) -> None:
    """The same paths without a failure: EOF, and every byte (SHA-256) both ways."""

    async def main() -> None:
        digest = pattern_digest(CONTROL_BODY, seed=SEED)
        raw, http = Origin(CONTROL_BODY), Origin(CONTROL_BODY, http=True)
        sink = Sink()
        async with (
            tcp_server(raw.handler) as raw_port,
            tcp_server(http.handler) as http_port_,
            tcp_server(sink.handler) as sink_port,
            server_process(certs) as (_, port),
            client_engine(certs, port, protocol) as eng,
        ):
            for kind, origin in (("socks5", raw_port), ("connect", raw_port), ("get", http_port_)):
                reader, writer = await DOWNLOADS[kind](eng, origin)
                assert await read_to_end(reader) == ("eof", CONTROL_BODY, digest), kind
                writer.close()
            _, writer = await socks_open(socks_port(eng), "127.0.0.1", sink_port)
            for chunk in pattern(CONTROL_BODY, seed=SEED):
                writer.write(chunk)
                await writer.drain()
            writer.close()
            async with asyncio.timeout(30):
                assert await sink.ends.get() == ("eof", CONTROL_BODY, digest)

    run(main())
