"""A request is never delivered twice because the tunnel died under it.

The HTTP proxy sends a request's head in the stream's OPEN (early data, no round trip).  Here
a real ``python -m autovpn server`` process gets that OPEN, dials the origin and delivers the
POST; then the tunnel connection is cut (a TCP relay between client and server resets it)
before the server's OPEN_OK reaches the client.  The client used to open the stream again on a
new connection, three attempts by default, and the origin got the POST twice: a payment made
twice.  Now the client answers 502 and the origin has seen the request once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from autovpn.config import ClientConfig, Config, ListenSpec, ServerURL
from autovpn.engine import Engine
from autovpn.routing.router import Mode
from tests.conftest import SECRET, Certs, eventually, run, tcp_server
from tests.server_process import autovpn_server

REQUEST = b"POST /charge HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 0\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\ncharged"


class Shop:
    """The origin: answers every POST /charge, and counts them."""

    def __init__(self) -> None:
        self.charges = 0
        self.charged = asyncio.Event()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST /charge "):
            self.charges += 1
            self.charged.set()
            writer.write(ANSWER)
            await writer.drain()


class CutRelay:
    """TCP between the client and the server.  ``hold`` keeps the server's bytes from the
    client (they are dropped: the connection is cut before anything else passes); ``cut``
    resets every connection relayed so far."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.hold = False
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        self.pairs.append((writer, up_w))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool) -> None:
            while data := await r.read(1 << 16):
                if down and self.hold:
                    continue
                w.write(data)
                await w.drain()
            w.close()

        try:
            await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))
        finally:
            up_w.close()

    def cut(self) -> None:
        for client, server in self.pairs:
            sock = client.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()  # a RST: the client's tunnel connection is lost
            server.transport.abort()
        self.pairs.clear()


@asynccontextmanager
async def client_through(relay_port: int, certs: Certs) -> AsyncIterator[Engine]:
    cc = ClientConfig(
        server=ServerURL(True, "127.0.0.1", relay_port),
        secret=SECRET,
        tls_ca=certs.ca,
        listen=[ListenSpec("http", "127.0.0.1", 0)],
    )
    async with Engine(Config(client=cc, mode=Mode.GLOBAL, control=None)) as eng:
        yield eng


async def post_through(proxy: int, origin: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    try:
        writer.write(REQUEST.replace(b"/charge", f"http://127.0.0.1:{origin}/charge".encode(), 1))
        return await reader.readuntil(b"\r\n")  # the proxy's status line
    finally:
        writer.close()


def test_a_post_in_early_data_is_not_sent_again_when_the_tunnel_dies(
    certs: Certs, tmp_path: Path
) -> None:
    async def main() -> None:
        shop = Shop()
        async with (
            tcp_server(shop.handler) as origin,
            autovpn_server(certs, tmp_path) as server,
        ):
            relay = CutRelay(server.port)
            async with tcp_server(relay.handler) as relay_port:
                async with client_through(relay_port, certs) as eng:
                    assert eng.pool is not None and await eng.pool.wait_up(20)
                    relay.hold = True  # from here the server's answers stop at the relay
                    posting = asyncio.ensure_future(
                        post_through(eng.listeners[0].bound_port, origin)
                    )
                    async with asyncio.timeout(30):
                        await shop.charged.wait()  # the server delivered the POST
                    relay.cut()
                    relay.hold = False  # a new tunnel connection would work
                    async with asyncio.timeout(30):
                        answer = await posting
                    assert shop.charges == 1, f"the POST reached the shop {shop.charges} times"
                    assert answer.startswith(b"HTTP/1.1 502 "), answer
                    # A new connection is up again, and nothing more reached the shop.
                    await eventually(lambda: eng.pool is not None and eng.pool.up, within=20)
                    assert shop.charges == 1
                    assert eng.pool.retried == 0

    run(main())
