"""``autovpn server --workers 2``, steered by client address (autovpn/reuseport.py): what a
worker keeps per address holds across the workers.  Real processes, real TLS, clients from
several loopback addresses (each client socket bound to its own 127.0.0.x).

Each test predicts with ``reuseport.slot`` (the steering program's mirror) which worker an
address reaches, and checks it in the workers' own counters.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from autovpn import reuseport
from autovpn.tunnel.tls import client_context
from tests.conftest import SECRET, SECRET_PREFIX, Certs, free_port, run
from tests.server_process import ServerProcess, autovpn_server
from tests.test_limits import closed_at_once, held_open, tls_upgrade
from tests.tunnel.test_safe_defaults import answer, native_request, reverse
from tests.tunnel.wstunnel import wstunnel_peer as peer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers need Linux's SO_REUSEPORT"
)

WORKERS = 2


def home(address: str) -> int:
    """The worker the steering program gives ``address``'s connections."""
    return reuseport.slot(address, 0, WORKERS)


def addresses_on_both(count: int) -> list[str]:
    """``count`` loopback addresses, the first ones reaching each worker at least once."""
    found = [f"127.0.0.{i}" for i in range(10, 60)]
    assert {home(a) for a in found[:count]} == set(range(WORKERS)), "pick other addresses"
    return found[:count]


async def until(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    """Poll ``check`` (it asks the server's processes) until it holds."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 (another process's state: nothing to await)
            await asyncio.sleep(0.05)


async def worker_counters(server: ServerProcess, key: str) -> list[int]:
    """Each worker's ``server`` counter ``key``, once every worker answered."""
    async with asyncio.timeout(30):
        while True:
            status = await server.status()
            if all("error" not in w for w in status["workers"]):
                return [int(w["server"][key]) for w in status["workers"]]
            await asyncio.sleep(0.1)


def test_a_guesser_gets_auth_failure_limit_tries_across_the_workers(
    certs: Certs, tmp_path: Path
) -> None:
    """Without steering each worker would count its own share of the failures: a guesser
    would get up to 2 x the limit before its first 429."""
    limit = 3
    tries = 8
    guessers = addresses_on_both(6)

    async def main() -> None:
        async with autovpn_server(
            certs, tmp_path, "--workers", str(WORKERS), "--auth-failure-limit", str(limit)
        ) as server:
            tls = client_context(certs.ca)
            port = server.port
            for address in guessers:
                statuses = [
                    (
                        await answer(
                            port, native_request(b"wrong!!!", port), local=address, ssl_context=tls
                        )
                    )[0]
                    for _ in range(tries)
                ]
                assert statuses == [403] * limit + [429] * (tries - limit), (address, statuses)
            # Every answer, 403 or 429, was counted by the worker of the guesser's address.
            expected = [0] * WORKERS
            for address in guessers:
                expected[home(address)] += tries
            assert await worker_counters(server, "upgrades_refused") == expected
            # Another address is served, on whichever worker.
            status, _ = await answer(
                port, native_request(SECRET, port), local="127.0.0.99", ssl_context=tls
            )
            assert status == 101

    run(main())


def test_a_tls_slowloris_from_one_address_is_capped_across_the_workers(
    certs: Certs, tmp_path: Path
) -> None:
    """Connections that never finish their TLS handshake count against their address's
    max_connections_per_address, on the one worker all of them reach."""
    limit = 6

    async def main() -> None:
        async with autovpn_server(
            certs,
            tmp_path,
            "--workers",
            str(WORKERS),
            "--max-connections-per-address",
            str(limit),
            "--handshake-timeout",
            "120",
        ) as server:
            port = server.port
            idle = [await held_open(port, "127.0.0.5") for _ in range(limit)]
            assert await closed_at_once(port, "127.0.0.5")  # the limit + 1st
            assert await tls_upgrade(port, certs.ca, "127.0.0.5") == 0
            # Other addresses are served meanwhile, on either worker.
            for address in addresses_on_both(4):
                assert await tls_upgrade(port, certs.ca, address) == 101
            idle.pop().close()  # one ends: its address may complete a handshake again
            await until(lambda: _served(port, certs.ca, "127.0.0.5"))
            for writer in idle:
                writer.close()

    run(main())


async def _served(port: int, ca: Path, address: str) -> bool:
    return await tls_upgrade(port, ca, address) == 101


async def _reverse_round(server: ServerProcess, bind: int, tls: Any, n: int) -> None:
    """One reverse request of a stock wstunnel client (a new TLS connection each time, as
    wstunnel sends them), then one connection to the server's reverse port, relayed."""
    request = asyncio.ensure_future(
        peer.client_connect(
            server.port,
            reverse(bind, SECRET_PREFIX),
            ssl_context=tls,
            server_hostname="localhost",
        )
    )
    try:
        async with asyncio.timeout(20):
            while True:  # the listener binds when the first request arrives
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", bind)
                    break
                except OSError:
                    if request.done():
                        break
                    await asyncio.sleep(0.05)
            got = await request
        assert got.status == 101, (n, got.status, got.body)
        payload = f"round {n}".encode()
        writer.write(payload)
        frame = await peer.read_frame(got.reader)
        assert frame.unmasked() == payload
        got.writer.write(peer.frame(peer.BINARY, b"back"))
        assert await reader.readexactly(4) == b"back"
        writer.close()
        got.writer.close()
    finally:
        request.cancel()


def test_a_stock_wstunnel_reverse_tunnel_works_with_two_workers(
    certs: Certs, tmp_path: Path
) -> None:
    """A stock wstunnel client sends one request per reverse connection, each a new
    connection: without steering, a request reaching the worker that does not hold the
    listener fails (that worker cannot bind the port), half of the time."""
    bind = free_port()

    async def main() -> None:
        async with autovpn_server(
            certs, tmp_path, "--workers", str(WORKERS), wstunnel=True
        ) as server:
            tls = peer_tls(certs)
            for n in range(8):
                await _reverse_round(server, bind, tls, n)
            # The listener is on the worker of 127.0.0.1's address, and only there.
            refused = await worker_counters(server, "upgrades_refused")
            assert refused == [0] * WORKERS, server.text()
            assert "cannot listen" not in server.text()
            assert f"wstunnel reverse listener ReverseTcp on 127.0.0.1:{bind}" in server.text()

    run(main())


def peer_tls(certs: Certs) -> Any:
    ctx = client_context(certs.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def test_a_dead_workers_share_goes_to_the_others_and_comes_back(
    certs: Certs, tmp_path: Path
) -> None:
    """Worker k is stopped (SIGSTOP) with a connection of its address waiting in its queue,
    then killed: the queued connection waits in the socket the supervisor keeps and is served
    by the worker started in its place; meanwhile new connections of that address go to the
    other worker; once it is back they reach it again."""
    address = "127.0.0.20"
    k = home(address)

    async def main() -> None:
        async with autovpn_server(certs, tmp_path, "--workers", str(WORKERS)) as server:
            port = server.port
            tls = client_context(certs.ca)

            async def refused_by(expected: list[int]) -> None:
                status, _ = await answer(
                    port, native_request(b"wrong!!!", port), local=address, ssl_context=tls
                )
                assert status == 403

                async def counted() -> bool:
                    return await worker_counters(server, "upgrades_refused") == expected

                await until(counted)

            await refused_by([1 if i == k else 0 for i in range(WORKERS)])
            pid = server.worker_pids[k]
            os.kill(pid, signal.SIGSTOP)
            # Accepted by the kernel into worker k's queue; its TLS handshake waits.
            queued = asyncio.ensure_future(tls_upgrade(port, certs.ca, address))
            await asyncio.sleep(0.5)
            assert not queued.done()
            os.kill(pid, signal.SIGKILL)
            # Served by the worker started in k's place (its back-off is 0.5 s).
            async with asyncio.timeout(60):
                assert await queued == 101
            status = await server.status()
            assert status["workers"][k]["pid"] != pid and status["workers"][k]["restarts"] == 1
            # The new worker k counts from 0; the address is its own again.
            await refused_by([1 if i == k else 0 for i in range(WORKERS)])

    run(main())


def test_while_a_worker_is_down_its_addresses_are_served_by_the_others(
    certs: Certs, tmp_path: Path
) -> None:
    """Between a worker's death and its restart its addresses reach the live worker.  The
    worker is killed each time it is back, so that its back-off grows (0.5, 1, 2, then 4 s)
    and the last wait is long enough to be seen from here."""
    address = "127.0.0.21"
    k = home(address)
    other = 1 - k

    async def main() -> None:
        async with autovpn_server(certs, tmp_path, "--workers", str(WORKERS)) as server:
            port = server.port
            tls = client_context(certs.ca)

            async def worker(index: int) -> dict[str, Any]:
                status = await server.status()
                entry: dict[str, Any] = status["workers"][index]
                return entry

            async def down() -> bool:
                return not (await worker(k))["live"]

            async def back() -> bool:  # a new pid, taking connections, answering
                entry = await worker(k)
                return bool(entry["live"]) and "error" not in entry

            for kills in range(4):
                os.kill((await worker(k))["pid"], signal.SIGKILL)
                await until(down)
                if kills < 3:
                    await until(back, within=60)
            before = (await worker(other))["server"]["upgrades_refused"]
            for _ in range(3):
                status, _ = await answer(
                    port, native_request(b"wrong!!!", port), local=address, ssl_context=tls
                )
                assert status == 403
            entry = await worker(k)
            assert not entry["live"] and entry["restarts"] == 3, entry  # still in its back-off
            assert (await worker(other))["server"]["upgrades_refused"] == before + 3

    run(main())
