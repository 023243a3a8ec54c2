"""Fail over, fail fast: several tunnel servers, retries, and errors that say why.

The servers are real ``python -m autovpn server`` processes on loopback with real TLS, killed
with SIGKILL (no goodbye of any kind); the client is an engine in this process, or a
``python -m autovpn client`` process where the command line is what is tested.

- Two servers, the primary killed during a run of new connections: every one succeeds (through
  the backup), and once the primary is back new streams go to it again (fail-back).
- A server refused for good (the secret, an untrusted certificate): requests fail at once with
  a reply that says why, and ``autovpn status`` says it too.
- The only server SIGKILLed under load and restarted on its port: new connections succeed
  within 5 s of the restart, and every transfer that ended cleanly is SHA-256 exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import pytest

from autovpn.config import ClientConfig, Config, ListenSpec, ServerEntry, ServerURL
from autovpn.engine import Engine
from autovpn.routing.router import Mode
from autovpn.tunnel.tls import make_private_ca
from autovpn.wire import socks5
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
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
from tests.processes import autovpn
from tests.tunnel.servers import (
    autovpn_status,
    echo_through,
    server_process,
    through_a_kill,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def client_config(certs: Certs, ports: list[int], *, tls_ca: Path | None = None) -> Config:
    """A client engine (SOCKS5 and HTTP listeners) with these servers, in this order of
    priority, global mode, no control API."""
    servers = [ServerEntry(ServerURL(True, "127.0.0.1", p), i) for i, p in enumerate(ports, 1)]
    cc = ClientConfig(
        server=servers[0].url,
        secret=SECRET,
        tls_ca=tls_ca or certs.ca,
        servers=servers if len(servers) > 1 else [],
        listen=[ListenSpec("socks5", "127.0.0.1", 0), ListenSpec("http", "127.0.0.1", 0)],
    )
    return Config(client=cc, mode=Mode.GLOBAL, control=None)


# --- two servers: failover and fail-back -------------------------------------------------------


def test_primary_killed_during_new_connections_all_succeed_through_the_backup(
    certs: Certs, tmp_path: Path
) -> None:
    """200 sequential new connections; the primary is SIGKILLed after the 60th: 0 failures,
    each one bounded; the rest go to the backup.  The primary restarted on its port takes the
    new streams again."""
    total, kill_at = 200, 60

    async def main() -> None:
        port_a, port_b = free_port(), free_port()
        async with (
            tcp_server(echo_handler) as origin,
            server_process(certs, port_a, tmp_path) as primary,
            server_process(certs, port_b, tmp_path),
            Engine(client_config(certs, [port_a, port_b])) as eng,
        ):
            assert eng.pool is not None
            a, b = eng.pool.clients
            await eventually(lambda: a.up and b.up)
            socks = socks_port(eng)
            failures, slowest = await through_a_kill(socks, origin, primary, total, kill_at)
            assert failures == [], failures
            assert slowest < 5.0, slowest  # a failover costs a retry, not a timeout
            assert a.streams_opened == kill_at  # before the kill: the primary only
            assert b.streams_opened == total - kill_at
            assert not a.up and eng.status()["tunnel"]["up"]  # type: ignore[index]

            # Fail-back: the primary returns on its port; new streams go to it again.
            async with server_process(certs, port_a, tmp_path):
                await eventually(lambda: a.up, within=15)
                for _ in range(10):
                    await echo_through(socks, origin)
                assert a.streams_opened == kill_at + 10
                assert b.streams_opened == total - kill_at

    run(main())


# --- permanent errors: fail at once, and say why -----------------------------------------------


def test_a_wrong_secret_fails_every_request_at_once_and_status_says_why(
    certs: Certs, tmp_path: Path
) -> None:
    """``autovpn client`` with a secret the server refuses: each SOCKS5 request fails within
    1 s with a failure reply, the HTTP proxy's 502 says why, and so do the log and
    ``autovpn status`` (before: retried forever, each request hanging ~10 s)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        port, socks, http = free_port(), free_port(), free_port()
        state = tmp_path / "client-state"
        async with (
            tcp_server(echo_handler) as origin,
            server_process(certs, port, tmp_path),
            autovpn(
                "client",
                "-L",
                f"socks5://127.0.0.1:{socks}",
                "-L",
                f"http://127.0.0.1:{http}",
                "--tls-ca",
                str(certs.ca),
                f"wss://127.0.0.1:{port}",
                secret=b"not-the-right-secret",
                state=state,
            ) as client,
        ):
            for _ in range(3):
                started = loop.time()
                with pytest.raises(socks5.Socks5Error) as failed:
                    await socks_open(socks, "127.0.0.1", origin)
                assert loop.time() - started < 1.0
                assert failed.value.reply_code == socks5.Reply.GENERAL_FAILURE
            reader, writer = await asyncio.open_connection("127.0.0.1", http)
            writer.write(f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 502 "), answer
            assert b"server refused the secret" in answer.split(b"\r\n\r\n", 1)[1]

            out = await autovpn_status(state, "--json")
            (server,) = json.loads(out)["tunnel"]["servers"]
            assert server["state"] == "down"
            assert "server refused the secret" in server["reason"]
            assert "server refused the secret" in client.text

    run(main())


def test_an_untrusted_certificate_fails_at_once_and_the_502_names_tls_ca(
    certs: Certs, tmp_path: Path
) -> None:
    """A client that trusts another CA: the HTTP proxy answers 502 at once, with a one-line
    body that says to use --tls-ca; SOCKS5 fails at once; the status says why."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        other_ca, _, _ = make_private_ca(tmp_path / "other-ca", ["127.0.0.1"])
        server_cfg = engine_config(certs)
        server_cfg.client = None
        async with (
            tcp_server(echo_handler) as origin,
            Engine(server_cfg) as server,
        ):
            assert server.server is not None
            cfg = client_config(certs, [server.server.port], tls_ca=other_ca)
            async with Engine(cfg) as eng:
                started = loop.time()
                reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
                writer.write(f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = await reader.read()
                writer.close()
                assert loop.time() - started < 1.0
                head, body = answer.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 502 "), answer
                assert b"certificate not trusted" in body and b"--tls-ca" in body, body
                assert body.count(b"\n") == 1  # one line
                with pytest.raises(socks5.Socks5Error):
                    await socks_open(socks_port(eng), "127.0.0.1", origin)
                assert loop.time() - started < 2.0
                (status,) = eng.status()["tunnel"]["servers"]  # type: ignore[index]
                assert status["state"] == "down" and "--tls-ca" in status["reason"]

    run(main())


# --- the only server SIGKILLed under load and restarted -----------------------------------------

SIZE = 2 << 20
SEED = 7


async def download(socks: int, origin: int) -> tuple[str, int, bytes]:
    """("eof" | "reset" | "failed", bytes read, their SHA-256) of one download."""
    h = hashlib.sha256()
    total = 0
    try:
        reader, writer = await socks_open(socks, "127.0.0.1", origin)
    except (OSError, socks5.Socks5Error):
        return "failed", 0, h.digest()
    try:
        while data := await reader.read(1 << 20):
            h.update(data)
            total += len(data)
    except ConnectionResetError:
        return "reset", total, h.digest()
    finally:
        writer.close()
    return "eof", total, h.digest()


def test_server_killed_under_load_and_restarted_serves_within_5s(
    certs: Certs, tmp_path: Path
) -> None:
    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for chunk in pattern(SIZE, seed=SEED):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await reader.read()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        port = free_port()
        outcomes: list[tuple[str, int, bytes]] = []
        stop = asyncio.Event()

        async def load(socks: int, origin: int) -> None:
            while not stop.is_set():
                outcome = await download(socks, origin)
                outcomes.append(outcome)
                await asyncio.sleep(0.01 if outcome[0] == "eof" else 0.05)

        async with contextlib.AsyncExitStack() as stack:
            origin = await stack.enter_async_context(tcp_server(origin_handler))
            server = await stack.enter_async_context(server_process(certs, port, tmp_path))
            eng = await stack.enter_async_context(Engine(client_config(certs, [port])))
            socks = socks_port(eng)
            workers = [asyncio.ensure_future(load(socks, origin)) for _ in range(4)]
            await eventually(lambda: sum(o[0] == "eof" for o in outcomes) >= 4, within=30)
            await server.kill()  # under load: downloads in flight
            await asyncio.sleep(1.0)
            async with server_process(certs, port, tmp_path):
                restarted = loop.time()
                while (await download(socks, origin))[0] != "eof":
                    assert loop.time() - restarted < 5.0, "not served within 5 s"
                    await asyncio.sleep(0.05)
                served = loop.time() - restarted
                done = len(outcomes)
                await eventually(lambda: len(outcomes) >= done + 8, within=30)
                stop.set()
                await asyncio.gather(*workers)
        assert served < 5.0, served
        complete = [o for o in outcomes if o[0] == "eof"]
        assert len(complete) >= 12
        for how, size, digest in complete:  # every transfer reported complete is exact
            assert (size, digest) == (SIZE, pattern_digest(SIZE, SEED)), (how, size)
        assert {o[0] for o in outcomes} <= {"eof", "reset", "failed"}

    run(main())
