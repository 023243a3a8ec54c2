"""Dials the host's own addresses through a real tunnel server; run in a private namespace.

``test_own_addresses.py`` runs this module under ``unshare -n`` with 192.0.2.2 and 2001:db8::2
given to that namespace's ``lo``: the host's non-loopback addresses, as eth0's would be.  A
target listens on 0.0.0.0 and :: (all of them), and an engine (tunnel server and SOCKS5 client
over ws:// on loopback) dials it.  Prints one JSON object: each dial's outcome, "reached" or
the SOCKS5 reply code.

argv: the server's --allow entries, comma-separated (may be empty); then "refresh" to add
192.0.2.3 while the server runs and dial it until refused (at most 10 s).
"""

from __future__ import annotations

import asyncio
import json
import sys

from autovpn.config import ClientConfig, Config, ListenSpec, ServerConfig, ServerURL
from autovpn.engine import Engine
from autovpn.eventloop import run
from autovpn.routing.router import Mode
from autovpn.wire.socks5 import Socks5Error
from tests.conftest import SECRET, socks_open, socks_port


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"reached")
    await writer.drain()
    writer.close()


async def through_tunnel(port: int, host: str, target_port: int) -> str:
    try:
        reader, writer = await socks_open(port, host, target_port)
    except Socks5Error as exc:
        return f"reply {exc.reply_code}"
    try:
        return (await reader.read(100)).decode()
    finally:
        writer.close()


async def main(allow: list[str], refresh: bool) -> dict[str, str]:
    v4 = await asyncio.start_server(answer, "0.0.0.0", 0)
    port = v4.sockets[0].getsockname()[1]
    v6 = await asyncio.start_server(answer, "::", port)
    config = Config(
        client=ClientConfig(
            server=ServerURL(False, "127.0.0.1", 0),
            secret=SECRET,
            listen=[ListenSpec("socks5", "127.0.0.1", 0)],
        ),
        server=ServerConfig(
            listen=ServerURL(False, "127.0.0.1", 0), users={"default": SECRET}, allow=allow
        ),
        mode=Mode.GLOBAL,
    )
    outcomes: dict[str, str] = {}
    async with v4, v6, Engine(config) as engine:
        socks = socks_port(engine)
        # The target answers on the namespace's own address, directly...
        reader, writer = await asyncio.open_connection("192.0.2.2", port)
        outcomes["direct 192.0.2.2"] = (await reader.read(100)).decode()
        writer.close()
        for host in ("127.0.0.1", "192.0.2.2", "::ffff:192.0.2.2", "2001:db8::2"):
            outcomes[host] = await through_tunnel(socks, host, port)
        if refresh:
            # An address the host gains while the server runs is refused once the server has
            # read the interfaces again (autovpn.ifaddrs.TTL, a second); the wait is bounded
            # generously, for a loaded machine.
            outcomes["192.0.2.3 before"] = await through_tunnel(socks, "192.0.2.3", port)
            ip = await asyncio.create_subprocess_exec(*"ip addr add 192.0.2.3/32 dev lo".split())
            assert await ip.wait() == 0
            deadline = asyncio.get_running_loop().time() + 10
            while (outcome := await through_tunnel(socks, "192.0.2.3", port)) == "reached":
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            outcomes["192.0.2.3 after"] = outcome
    return outcomes


if __name__ == "__main__":
    entries = [e for e in sys.argv[1].split(",") if e]
    print(json.dumps(run(main(entries, refresh=sys.argv[2:] == ["refresh"]))))
