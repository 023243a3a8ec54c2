"""wstunnel's HTTP/2 transport on the server: a destination that reads slowly holds its sender
back (found by the slow-reader proof, issue 15).

Before, every DATA frame was acknowledged as soon as it was handed to the destination's socket,
whether or not that socket took it: a client pushed 256 MiB into a destination that read
nothing, and the server's RSS went from 44 to 370 MiB.  Now a stream's data is acknowledged
once the destination's socket drains, so one slow stream holds at most its window (and the
connection's larger window keeps its other streams going).
"""

from __future__ import annotations

import asyncio
import hashlib

from tests.conftest import SECRET_PREFIX, pattern, pattern_digest, run
from tests.tunnel.wstunnel import wstunnel_peer as peer
from tests.tunnel.wstunnel.test_wstunnel_io import autovpn_server

SIZE = 64 << 20
#: What may get out while the destination reads nothing: the stream's window, the socket
#: buffers on the way, the destination's write buffer.
HELD_BACK = 16 << 20


def test_a_slow_destination_holds_an_http2_sender_back() -> None:
    async def main() -> None:
        reading = asyncio.Event()
        digests: asyncio.Queue[bytes] = asyncio.Queue()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reading.wait()  # reads nothing until told to
            h = hashlib.sha256()
            got = 0
            while got < SIZE and (data := await reader.read(1 << 20)):
                h.update(data)
                got += len(data)
            digests.put_nowait(h.digest())
            writer.close()

        target = await asyncio.start_server(slow, "127.0.0.1", 0)
        try:
            async with autovpn_server() as (server, _):
                port = target.sockets[0].getsockname()[1]
                jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", port))
                quiet = await peer.H2Tunnel.open(server.port, jwt, prefix=SECRET_PREFIX)
                assert quiet.status == 200
                sent = 0

                async def push() -> None:
                    nonlocal sent
                    for chunk in pattern(SIZE):
                        await quiet.send(chunk)
                        sent += len(chunk)

                pusher = asyncio.ensure_future(push())
                await asyncio.sleep(3)
                assert sent <= HELD_BACK, f"{sent >> 20} MiB out to a destination reading nothing"
                reading.set()
                async with asyncio.timeout(60):
                    await pusher
                    assert await digests.get() == pattern_digest(SIZE)
                quiet.close()
        finally:
            target.close()

    run(main())
