"""One user's hanging name lookups against another user's connect, on a real tunnel server whose
system resolver is a black hole; run in private mount and network namespaces.

``test_lookups.py`` runs this module under ``unshare -m -n`` with its own ``/etc/resolv.conf``
(``nameserver 127.0.0.1``, 30 s per query, one attempt), ``/etc/hosts`` (``good.test`` is
127.0.0.1) and ``/etc/nsswitch.conf`` (files, then DNS) bind-mounted over the machine's, so the
server's ``getaddrinfo`` is the real one, and asks a DNS server on this namespace's loopback
that reads every query and answers none.

argv[1], who floods (the other protocol is the well-behaved user):

* ``native``: a native tunnel client on 127.0.0.1 opens 40 streams to names under
  ``hang.test``; then a stock-wstunnel-style request from 127.0.0.2 asks for ``good.test``;
* ``wstunnel``: 40 wstunnel requests from 127.0.0.3 ask for names under ``hang.test``; then a
  native client on 127.0.0.1 opens a stream to ``good.test``.

argv[2]: the server's lookup timeout (seconds).  The test's resolv.conf says how long the C
library waits for the black hole: longer than that (the flood's lookups time out while their
threads stay blocked), or shorter (each fails on its own and hands its turn on).

Prints one JSON object: whether the well-behaved user was served (within 8 s), the names the
black hole was asked for, how the flood's requests failed and what the server logged of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from typing import Any

from autovpn.config import ServerURL
from autovpn.errors import ResetReason, StreamError
from autovpn.eventloop import run
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.wstunnel.server import WstunnelService
from tests.conftest import SECRET, SECRET_PREFIX, eventually
from tests.tunnel.wstunnel import wstunnel_peer as peer

FLOOD = 40
#: How long the well-behaved user may wait.  Served, it takes milliseconds; behind the flood,
#: as long as the black hole holds the lookup threads (30 s, resolv.conf's timeout).
SERVED_WITHIN = 8.0


class BlackHole(asyncio.DatagramProtocol):
    """A DNS server that reads every query and answers none; it remembers the names."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        # The question's name: labels from byte 12 on (RFC 1035 4.1.2), no compression.
        labels, i = [], 12
        while i < len(data) and data[i]:
            n = data[i]
            labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        self.names.add(".".join(labels).lower())


async def wstunnel_request(host: str, port: int, local: str) -> str:
    """A stock wstunnel client's upgrade for ``host:port`` from ``local``; the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
    try:
        claims = peer.tcp_claims(host, TARGET_PORT)
        writer.write(peer.upgrade_request("x", peer.make_jwt(claims), prefix=SECRET_PREFIX))
        status = (await reader.readline()).decode().strip()
        if not status.endswith("101 Switching Protocols"):
            status += " " + (await reader.read(4096)).decode(errors="replace").split("\r\n\r\n")[-1]
        return status
    finally:
        writer.close()


TARGET_PORT = 0


class Lines(logging.Handler):
    """The server's log lines about the flood's names."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "hang.test" in text:
            self.lines.add(re.sub(r"127\.0\.0\.[0-9]+:[0-9]+", "PEER", _shape(text)))


async def main(flooder: str, lookup_timeout: float) -> dict[str, Any]:
    global TARGET_PORT
    lines = Lines()
    logging.getLogger("autovpn").addHandler(lines)
    logging.getLogger("autovpn").setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    hole = BlackHole()
    dns, _ = await loop.create_datagram_endpoint(lambda: hole, local_addr=("127.0.0.1", 53))
    accepted = 0

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    tcp = await asyncio.start_server(target, "127.0.0.1", 0)
    TARGET_PORT = tcp.sockets[0].getsockname()[1]
    settings = ServerSettings(
        "127.0.0.1",
        0,
        {"default": SECRET},
        policy=DestinationPolicy(("127.0.0.0/8",)),
        lookup_timeout=lookup_timeout,
    )
    out: dict[str, Any] = {}
    async with TunnelServer(settings) as server:
        WstunnelService(server).install()
        client = TunnelClient(
            ClientSettings(ServerURL(False, "127.0.0.1", server.port), "default", SECRET)
        )
        async with client:
            flooding = "127.0.0.1" if flooder == "native" else "127.0.0.3"
            most = 0

            async def sample() -> None:
                nonlocal most
                while True:
                    most = max(most, server.lookups.in_flight(flooding))
                    await asyncio.sleep(0.005)

            sampler = loop.create_task(sample())
            flood: list[asyncio.Task[Any]] = []
            for i in range(FLOOD):
                name = f"n{i}.hang.test"
                if flooder == "native":
                    flood.append(loop.create_task(client.open_stream(name, 80)))
                else:
                    flood.append(
                        loop.create_task(wstunnel_request(name, server.port, flooding))
                    )
            # The flood holds the lookup threads once the black hole sees its queries (4: the
            # smallest pool it could hold, uvloop's libuv one).
            await eventually(lambda: len(hole.names) >= 4)
            try:
                async with asyncio.timeout(SERVED_WITHIN):
                    if flooder == "native":
                        status = await wstunnel_request("good.test", server.port, "127.0.0.2")
                        served = status.endswith("101 Switching Protocols")
                    else:
                        ep = await client.open_stream("good.test", TARGET_PORT)
                        ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED, "done")
                        served = True
                    await eventually(lambda: accepted == 1)
                out["good"] = "served" if served else "refused"
            except TimeoutError:
                out["good"] = f"not served within {SERVED_WITHIN:g} s"
            # How the flood ends: each lookup's deadline (or its turn's) passes.
            results = await asyncio.gather(*flood, return_exceptions=True)
            out["flood"] = sorted(
                {
                    _shape(str(r) if isinstance(r, StreamError) else r)
                    for r in results
                    if isinstance(r, str | StreamError)
                }
            )
            out["flood_other"] = [repr(r) for r in results if not isinstance(r, str | StreamError)]
            sampler.cancel()
            out["most_in_flight"] = most
    out["asked"] = sorted(hole.names)
    out["log"] = sorted(lines.lines)
    dns.close()
    tcp.close()
    return out


def _shape(message: object) -> str:
    """A failure message with the flood's names taken out (one line per kind)."""
    return re.sub(r"n[0-9]+\.hang\.test", "NAME", str(message))


if __name__ == "__main__":
    result = run(main(sys.argv[1], float(sys.argv[2])))
    print(json.dumps(result), flush=True)
    # Not a normal exit: that would wait for the lookups still blocked in the black hole (the
    # pool's threads are joined at exit), up to resolv.conf's 30 s.
    os._exit(0)
