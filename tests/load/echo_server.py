"""A TCP echo server (or a slow reader) in its own process, for the load tests.

``python -m tests.load.echo_server`` prints its port on stdout, then serves until its stdin
closes.  In its own process so that its sockets (one per tunnelled connection) count against
its own descriptor limit, not the test's.  ``--sink``: instead of echoing, each connection is
read at ``--rate`` bytes per second, then fully, and answered with the SHA-256 of all it read;
``--source N``: each connection is sent N bytes of ``tests.conftest.pattern`` at full speed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from typing import cast

from autovpn.eventloop import run


class Echo(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: alike, not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the client ended: the test counts closed connections


async def slow_sink(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int, slow_for: float
) -> None:
    """Read ``rate`` bytes a second for ``slow_for`` seconds, then as fast as possible; answer
    the SHA-256 of everything read once the client half-closes."""
    digest = hashlib.sha256()
    loop = asyncio.get_running_loop()
    until = loop.time() + slow_for
    chunk = max(rate // 10, 1)
    while loop.time() < until:
        data = await reader.read(chunk)
        if not data:
            break
        digest.update(data)
        await asyncio.sleep(0.1)
    while data := await reader.read(1 << 20):
        digest.update(data)
    writer.write(digest.digest())
    await writer.drain()
    writer.close()


async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    """Send ``size`` bytes of ``tests.conftest.pattern`` as fast as the peer takes them."""
    from tests.conftest import pattern

    for chunk in pattern(size):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sink", action="store_true")
    parser.add_argument("--rate", type=int, default=1 << 20)
    parser.add_argument("--slow-for", type=float, default=5.0)
    parser.add_argument("--source", type=int, default=0, help="send this many bytes instead")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    if args.source:

        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await source(reader, writer, args.source)

        server = await asyncio.start_server(send, "127.0.0.1", 0)
    elif args.sink:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await slow_sink(reader, writer, args.rate, args.slow_for)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    else:
        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Serve until the test closes our stdin (or ends us).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    server.close()


if __name__ == "__main__":
    run(main())
