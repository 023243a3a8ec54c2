"""Fail over, fail fast with ``--protocol wstunnel``: several servers speaking wstunnel's protocol.

The servers are real ``python -m autovpn server`` processes on loopback with real TLS (they
serve wstunnel clients whose path prefix is a user's secret), killed with SIGKILL; the client
is an engine in this process, or a ``python -m autovpn client`` process where the command line
and ``autovpn status`` are what is tested.

- Two servers, the primary killed during a run of new connections: every one succeeds (through
  the backup), and once the primary is back new tunnels go to it again (fail-back).
- A server that refuses the secret (403) is skipped: every connection goes through the other,
  and ``autovpn status`` and the log say which server refused and why.
- A server whose certificate is not trusted is down for good from its first probe.
- Against the conformance peer: a 502 (a proxy in front) moves the tunnel to the next server, a
  401 marks the server down for good, wstunnel's 400 fails that tunnel only.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from autovpn.config import ClientConfig, Config, ListenSpec, ServerEntry, ServerURL
from autovpn.engine import Engine
from autovpn.errors import StreamError
from autovpn.routing.router import Mode
from autovpn.tunnel.tls import make_private_ca
from autovpn.tunnel.wstunnel.client import WstunnelClientSettings
from autovpn.tunnel.wstunnel.servers import WstunnelServer, WstunnelServers
from autovpn.wire import socks5
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    eventually,
    free_port,
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
from tests.tunnel.wstunnel.wstunnel_peer import PeerServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def client_config(ports: list[int], tls_ca: Path) -> Config:
    """A wstunnel-protocol client engine (SOCKS5) with these servers in this order of
    priority, global mode, no control API; a down server is probed every second at most."""
    servers = [ServerEntry(ServerURL(True, "127.0.0.1", p), i) for i, p in enumerate(ports, 1)]
    cc = ClientConfig(
        server=servers[0].url,
        secret=SECRET,  # sent as the path prefix (wstunnel client -P SECRET)
        tls_ca=tls_ca,
        servers=servers,
        protocol="wstunnel",
        listen=[ListenSpec("socks5", "127.0.0.1", 0)],
    )
    cc.wstunnel.max_backoff = 1.0  # --connection-retry-max-backoff 1s
    return Config(client=cc, mode=Mode.GLOBAL, control=None)


def test_primary_killed_during_new_connections_all_succeed_through_the_backup(
    certs: Certs, tmp_path: Path
) -> None:
    """200 sequential new connections; the primary is SIGKILLed before the 60th: 0 failures,
    the rest go to the backup (the first one after the kill by a retry on it).  The primary
    restarted on its port is found by a probe and takes the new tunnels again."""
    total, kill_at = 200, 60

    async def main() -> None:
        port_a, port_b = free_port(), free_port()
        async with (
            tcp_server(echo_handler) as origin,
            server_process(certs, port_a, tmp_path) as primary,
            server_process(certs, port_b, tmp_path),
            Engine(client_config([port_a, port_b], certs.ca)) as eng,
        ):
            assert eng.wstunnel is not None
            servers = eng.wstunnel
            a, b = servers.clients
            await eventually(lambda: a.up and b.up)
            socks = socks_port(eng)
            failures, slowest = await through_a_kill(socks, origin, primary, total, kill_at)
            assert failures == [], failures
            print(f"slowest new connection across the kill: {slowest * 1000:.1f} ms")
            assert a.opened == kill_at  # before the kill: the primary only
            assert b.opened == total - kill_at
            assert servers.retried >= 1  # the first one after the kill, on the backup
            status = eng.status()["tunnel"]
            assert isinstance(status, dict) and status["up"] and status["protocol"] == "wstunnel"
            down, backup = status["servers"]
            assert (down["state"], backup["state"]) == ("connecting", "up")
            assert f"connection refused by 127.0.0.1:{port_a}" in down["reason"]

            # Fail-back: the primary returns on its port; a probe finds it, new tunnels go there.
            async with server_process(certs, port_a, tmp_path):
                await eventually(lambda: a.up, within=15)
                for _ in range(10):
                    await echo_through(socks, origin)
                assert a.opened == kill_at + 10
                assert b.opened == total - kill_at

    run(main())


def test_a_server_refusing_the_secret_is_skipped_and_status_says_why(
    certs: Certs, tmp_path: Path
) -> None:
    """``autovpn client --protocol wstunnel --secret-file S wss://a wss://b``, where a has
    another secret: a answers 403, is marked down for good (retried only after
    --retry-refused-after) and every connection goes through b; the log and ``autovpn
    status`` name a and the refused secret."""

    async def main() -> None:
        port_a, port_b, socks = free_port(), free_port(), free_port()
        secret_file = tmp_path / "secret"
        secret_file.write_bytes(SECRET)
        state = tmp_path / "client-state"
        async with (
            tcp_server(echo_handler) as origin,
            server_process(certs, port_a, tmp_path, secret=b"the-other-servers-secret"),
            server_process(certs, port_b, tmp_path),
            autovpn(
                "client",
                "--protocol",
                "wstunnel",
                "--secret-file",
                str(secret_file),
                "--tls-ca",
                str(certs.ca),
                "-L",
                f"socks5://127.0.0.1:{socks}",
                f"wss://127.0.0.1:{port_a}",
                f"wss://127.0.0.1:{port_b}",
                state=state,
            ) as client,
        ):
            for _ in range(20):
                await echo_through(socks, origin)
            tunnel = json.loads(await autovpn_status(state, "--json"))["tunnel"]
            refused, good = tunnel["servers"]
            assert refused["url"] == f"wss://127.0.0.1:{port_a}"
            assert refused["state"] == "down"
            assert "server refused the secret" in refused["reason"]
            assert (good["state"], good["streams_opened"]) == ("up", 20)
            assert refused["streams_opened"] == 0 and tunnel["up"]
            # the human form says it too, and so does the log, once
            human = await autovpn_status(state)
            assert (
                f"wss://127.0.0.1:{port_a} (priority 1, weight 1): down: server refused the"
                in human
            )
            lines = [x for x in client.output if "server refused the secret" in x]
            errors = [x for x in lines if " ERROR " in x]
            assert len(errors) == 1 and str(port_a) in errors[0], lines
            assert SECRET.decode() not in client.text  # the prefix is the secret: never logged

    run(main())


def test_an_untrusted_certificate_marks_the_server_down_from_its_first_probe(
    certs: Certs, tmp_path: Path
) -> None:
    """A server whose certificate another CA signed is down for good at once (its first
    probe says so, before any connection tries it); connections go to the other."""

    async def main() -> None:
        port_a, port_b = free_port(), free_port()
        other_ca, other_cert, other_key = make_private_ca(tmp_path / "other-ca", ["127.0.0.1"])
        stranger = Certs(other_ca, other_cert, other_key, tmp_path / "other-ca")
        async with (
            tcp_server(echo_handler) as origin,
            server_process(stranger, port_a, tmp_path),
            server_process(certs, port_b, tmp_path),
            Engine(client_config([port_a, port_b], certs.ca)) as eng,
        ):
            assert eng.wstunnel is not None
            a, b = eng.wstunnel.clients
            await eventually(lambda: a.permanent != "" and b.up)
            for _ in range(5):
                await echo_through(socks_port(eng), origin)
            assert (a.opened, b.opened) == (0, 5)
            assert a.state == "down" and "certificate not trusted" in a.reason
            assert "--tls-ca" in a.reason

    run(main())


def test_the_only_server_refusing_the_secret_fails_each_request_with_the_reason(
    certs: Certs, tmp_path: Path
) -> None:
    """One server, which answers 403: SOCKS5 gets a failure reply and the HTTP proxy a 502
    whose one-line body says the secret was refused, every time, without waiting for the
    server again (before: a bare failure, the same as for an unreachable destination)."""

    async def main() -> None:
        port = free_port()
        cfg = client_config([port], certs.ca)
        assert cfg.client is not None
        cfg.client.listen.append(ListenSpec("http", "127.0.0.1", 0))
        async with (
            tcp_server(echo_handler) as origin,
            server_process(certs, port, tmp_path, secret=b"the-other-servers-secret"),
            Engine(cfg) as eng,
        ):
            assert eng.wstunnel is not None
            (server,) = eng.wstunnel.clients
            for _ in range(3):
                with pytest.raises(socks5.Socks5Error) as failed:
                    await socks_open(socks_port(eng), "127.0.0.1", origin)
                assert failed.value.reply_code == socks5.Reply.GENERAL_FAILURE
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", eng.listeners[1].bound_port
                )
                writer.write(f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = await reader.read()
                writer.close()
                head, body = answer.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 502 "), answer
                assert b"tunnel down: server refused the secret" in body, body
                assert body.count(b"\n") == 1  # one line
            assert server.state == "down" and server.opened == 0
            assert server.failures == 1  # refused once; not asked again since

    run(main())


def test_upgrade_answers_say_what_happened_to_the_server() -> None:
    """Against the conformance peer (a wstunnel server written from the protocol notes), as a
    proxy in front of a server would answer: 502 marks the server connecting and the tunnel
    goes to the next server; 401 marks it down for good; wstunnel's 400 fails that tunnel
    only (it may be about the destination: another server would dial it again)."""

    async def main() -> None:
        async with (
            PeerServer() as first,
            PeerServer() as second,
            tcp_server(echo_handler) as origin,
        ):
            servers = WstunnelServers(
                [
                    WstunnelServer(WstunnelClientSettings(ServerURL(False, "127.0.0.1", p)), i)
                    for i, p in enumerate((first.port, second.port), 1)
                ],
                retry_backoff=0.01,
            )
            async with servers:
                a, b = servers.clients
                await eventually(lambda: a.up and b.up)
                # 502: trouble on the server's side; the probe finds it serving again
                first.answer_status = 502
                upstream = await servers.open_upstream("127.0.0.1", origin)
                upstream.ws.abort()
                assert (b.opened, a.state) == (1, "connecting")
                assert "answered HTTP 502" in a.reason, a.reason
                first.answer_status = 101
                await eventually(lambda: a.up)
                # 401: refused for good; not asked again before --retry-refused-after
                first.answer_status = 401
                upstream = await servers.open_upstream("127.0.0.1", origin)
                upstream.ws.abort()
                assert (b.opened, a.state) == (2, "down")
                assert "server refused the credentials" in a.reason
                asked = len(first.stats.requests)
                upstream = await servers.open_upstream("127.0.0.1", origin)
                upstream.ws.abort()
                assert (b.opened, len(first.stats.requests)) == (3, asked)
                assert servers.retried == 2
                # wstunnel's 400: that tunnel fails, nothing else is tried or marked
                second.answer_status = 400
                with pytest.raises(StreamError) as failed:
                    await servers.open_upstream("127.0.0.1", origin)
                assert not failed.value.tunnel and b.up and servers.retried == 2

    run(main())
