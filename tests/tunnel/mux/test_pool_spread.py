"""How the client spreads streams over its pool of tunnel connections (``pool_size``).

By load: a new stream takes the connection with the fewest open streams.  Among equally loaded
connections, each in turn: streams that end before the next one opens (short requests) would
otherwise all ride the first connection, and behind ``autovpn server --workers N`` (whose
workers each hold some of the pool's connections) one worker would do all the work.
"""

from __future__ import annotations

from autovpn.engine import Engine
from autovpn.tunnel.mux.connection import MuxConnection
from tests.conftest import (
    Certs,
    echo_handler,
    engine,
    eventually,
    run,
    socks_open,
    socks_port,
    tcp_server,
)


async def _full_pool(eng: Engine, size: int) -> list[MuxConnection]:
    assert eng.tunnel is not None
    tunnel = eng.tunnel
    await eventually(lambda: len(tunnel.connections) == size)
    return list(tunnel.connections)


def test_streams_go_to_the_connection_with_the_fewest(certs: Certs) -> None:
    async def main() -> None:
        async with engine(certs, pool_size=3) as eng, tcp_server(echo_handler) as echo:
            pool = await _full_pool(eng, 3)
            held = []
            # A long stream on some connection: the next two go to the two others.
            for expected in ([1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 1, 1]):
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                held.append(writer)
                assert sorted((len(c.streams) for c in pool), reverse=True) == expected
            for writer in held:
                writer.close()

    run(main())


def test_one_stream_at_a_time_takes_each_connection_in_turn(certs: Certs) -> None:
    """Before: every stream of a client that opens one at a time rode connection 0."""

    async def main() -> None:
        async with engine(certs, pool_size=2) as eng, tcp_server(echo_handler) as echo:
            pool = await _full_pool(eng, 2)
            used = []
            for _ in range(6):
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                [carrier] = [i for i, c in enumerate(pool) if c.streams]
                used.append(carrier)
                writer.close()
                await eventually(lambda: not any(c.streams for c in pool))
            assert used.count(0) == used.count(1) == 3, used

    run(main())
