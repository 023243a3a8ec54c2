"""Statistics and access log lines of the fixed forwards (-L tcp://, unix://, stdio://) and of
the server's wstunnel-protocol side (WebSocket, UDP and HTTP/2 tunnels), with real traffic:
our own client in either protocol, the independent wstunnel peer
(tests/tunnel/wstunnel/wstunnel_peer.py) for what our client does not speak (HTTP/2), and a
real ``autovpn client -L stdio://`` process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from autovpn.config import ListenSpec, WstunnelServerOptions
from autovpn.engine import Engine
from autovpn.monitor.api import request
from autovpn.stats import RESULT_OK
from tests.conftest import (
    SECRET,
    SECRET_PREFIX,
    Certs,
    echo_handler,
    env_without_proxies,
    eventually,
    free_port,
    run,
    tcp_server,
)
from tests.monitor.test_metrics import key, samples
from tests.monitor.test_stats import stats_config
from tests.tunnel.wstunnel import wstunnel_peer as peer

unix_only = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets are POSIX")


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        cast(dict[str, Any], r.access)
        for r in caplog.records
        if r.name == "autovpn.access" and hasattr(r, "access")
    ]


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(os.urandom(size))
    await reader.readexactly(size)
    writer.close()
    await writer.wait_closed()


def closed_port() -> int:
    """A loopback port nobody listens on (``free_port`` binds one, then closes it)."""
    return free_port()


@unix_only
@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_tcp_and_unix_forwards_count_and_log_like_the_proxies(
    certs: Certs, caplog: pytest.LogCaptureFixture, tmp_path: Path, protocol: str
) -> None:
    """Each forwarded connection counts per listener, route, server, domain; the server's
    side counts it per user (``tunnel`` in our protocol, ``wstunnel`` in wstunnel's); one
    access line each; a forward whose target refuses counts a failure on both sides."""
    caplog.set_level(logging.INFO, logger="autovpn.access")
    sock = tmp_path / "fwd.sock"

    async def main() -> None:
        async with tcp_server(echo_handler) as echo:
            refused = closed_port()
            cfg = stats_config(certs, control="127.0.0.1:0")
            cfg.client.protocol = protocol
            cfg.client.listen = [
                ListenSpec.parse(f"tcp://127.0.0.1:0:127.0.0.1:{echo}"),
                ListenSpec.parse(f"unix://{sock}:127.0.0.1:{echo}"),
                ListenSpec.parse(f"tcp://127.0.0.1:0:127.0.0.1:{refused}"),
            ]
            async with Engine(cfg) as eng:
                stats = eng.stats
                assert stats is not None and eng.api is not None
                tcp, _, bad = eng.forwards
                await exchange(*await asyncio.open_connection("127.0.0.1", tcp.bound_port), 3000)
                await exchange(*await asyncio.open_unix_connection(str(sock)), 5000)
                reader, writer = await asyncio.open_connection("127.0.0.1", bad.bound_port)
                with contextlib.suppress(ConnectionResetError):  # the open failed: a reset
                    assert await reader.read() == b""
                writer.close()
                await eventually(lambda: not stats.open)
                snap: Any = stats.snapshot()
                listeners, routes = snap["listeners"], snap["routes"]
                for name, size in (("tcp-forward", 3000), ("unix-forward", 5000)):
                    got = listeners[name]
                    assert (got["open"], got["bytes_up"], got["bytes_down"]) == (0, size, size)
                assert listeners["tcp-forward"]["total"] == 2  # the refused one too
                assert listeners["unix-forward"]["total"] == 1
                (why,) = listeners["tcp-forward"]["failures"]
                proxy = routes["proxy"]
                assert (proxy["total"], proxy["bytes_up"], proxy["bytes_down"]) == (3, 8000, 8000)
                (server,) = snap["servers"]
                assert snap["servers"][server]["bytes_up"] == 8000
                assert snap["domains"]["127.0.0.1"]["total"] == 3
                # The server's side of the same connections.
                side = "tunnel" if protocol == "autovpn" else "wstunnel"
                srv = listeners[side]
                assert (srv["total"], srv["bytes_up"], srv["bytes_down"]) == (3, 8000, 8000)
                assert srv["failures"] == {"connection_refused": 1}
                user = snap["users"]["default"]
                assert (user["total"], user["bytes_up"], user["bytes_down"]) == (3, 8000, 8000)
                # /metrics has them too.
                reply = await request(eng.api.url, "GET", "/metrics")
                got_metrics = samples(reply.body.decode())
                assert got_metrics[
                    key("autovpn_listener_bytes_total", listener="unix-forward", direction="up")
                ] == 5000
                assert got_metrics[key("autovpn_listener_connections_total", listener=side)] == 3
                # wstunnel's server answers every refusal with the same 400 (its reason is
                # the server's own record's, below).
                assert why == ("connection_refused" if protocol == "autovpn" else "general_failure")

    run(main())
    lines = access_lines(caplog)
    forwards = [f for f in lines if f["listener"].endswith("-forward")]
    assert len(forwards) == 3
    (unix,) = [f for f in forwards if f["listener"] == "unix-forward"]
    assert unix["route"] == "proxy" and unix["rule"].startswith(f"-L unix://{sock}:127.0.0.1:")
    assert (unix["bytes_up"], unix["bytes_down"], unix["result"]) == (5000, 5000, RESULT_OK)
    assert unix["client"] == str(sock) and unix["server"]
    ok_tcp, failed = sorted(
        (f for f in forwards if f["listener"] == "tcp-forward"), key=lambda f: f["bytes_up"]
    )[::-1]
    assert ok_tcp["client"].startswith("127.0.0.1:") and ok_tcp["bytes_up"] == 3000
    assert failed["result"] != RESULT_OK and failed["bytes_up"] == 0
    side = "tunnel" if protocol == "autovpn" else "wstunnel"
    served = [f for f in lines if f["listener"] == side]
    assert len(served) == 3 and {f["user"] for f in served} == {"default"}
    assert sorted(f["result"] for f in served) == ["connection_refused", RESULT_OK, RESULT_OK]


def test_stdio_forward_counts_and_logs_its_connection(tmp_path: Path) -> None:
    """``autovpn client -L stdio://`` (ssh's ProxyCommand): its one connection has its access
    line (on stderr, where its log goes) with the bytes both ways."""

    async def main() -> str:
        cfg = stats_config_server_only()
        async with tcp_server(echo_handler) as echo, Engine(cfg) as srv:
            assert srv.server is not None
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "autovpn",
                "client",
                "--protocol",
                "wstunnel",
                "--control-api",
                "off",
                "-L",
                f"stdio://127.0.0.1:{echo}",
                f"ws://127.0.0.1:{srv.server.port}",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env_without_proxies() | {"WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX": SECRET_PREFIX},
            )
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stderr is not None
            try:
                async with asyncio.timeout(30):
                    data = os.urandom(7000)
                    proc.stdin.write(data)
                    assert await proc.stdout.readexactly(7000) == data
                    proc.stdin.close()  # EOF: the echo server closes, the tunnel ends
                    assert await proc.stdout.read() == b""
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            return (await proc.stderr.read()).decode()

    err = run(main())
    (line,) = [line for line in err.splitlines() if "autovpn.access" in line]
    assert "stdio-forward stdio -> 127.0.0.1:" in line, err
    assert " proxy rule='-L stdio://127.0.0.1:" in line and "up=7000 down=7000" in line, err
    assert line.rstrip().endswith(" ok"), line


def stats_config_server_only() -> Any:
    """A plain ws:// server (native and wstunnel) with statistics, in this process."""
    from autovpn.config import Config, ServerConfig, ServerURL

    sc = ServerConfig(
        listen=ServerURL(False, "127.0.0.1", 0),
        users={"default": SECRET},
        allow=["127.0.0.0/8"],
    )
    return Config(server=sc, control=None)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


def test_wstunnel_server_counts_udp_and_http2_tunnels_and_refusals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stock-client tunnels the WebSocket-over-TCP test does not cover: a UDP tunnel (its
    datagrams' bytes), an HTTP/2 stream, and requests refused before and after the user is
    known."""
    caplog.set_level(logging.INFO, logger="autovpn.access")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
        udp_port = udp.get_extra_info("sockname")[1]
        cfg = stats_config_server_only()
        cfg.server.wstunnel = WstunnelServerOptions()
        try:
            async with tcp_server(echo_handler) as echo, Engine(cfg) as srv:
                assert srv.server is not None and srv.stats is not None
                port = srv.server.port
                # UDP: three datagrams each way.
                claims = {
                    "id": "u",
                    "p": {"Udp": {"timeout": None}},
                    "r": "127.0.0.1",
                    "rp": udp_port,
                }
                answer = await peer.client_connect(
                    port, peer.upgrade_request("x", peer.make_jwt(claims), prefix=SECRET_PREFIX)
                )
                assert answer.status == 101
                sizes = (10, 200, 1400)
                answer.writer.write(b"".join(peer.frame(peer.BINARY, b"u" * n) for n in sizes))
                async with asyncio.timeout(10):
                    for _ in sizes:
                        await peer.read_frame(answer.reader)
                    # A clean end: Close(1000), answered (a dropped connection is a failure).
                    answer.writer.write(peer.frame(peer.CLOSE, (1000).to_bytes(2, "big")))
                    assert (await peer.read_frame(answer.reader)).opcode == peer.CLOSE
                answer.writer.close()
                # HTTP/2 (h2c): one stream, 100 kB each way.
                jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo))
                t = await peer.H2Tunnel.open(port, jwt, prefix=SECRET_PREFIX)
                assert t.status == 200
                payload = os.urandom(100_000)
                async with asyncio.timeout(10):
                    await t.send(payload)
                    assert await t.receive(len(payload)) == payload
                await t.end()
                # Refused: no secret (before the user is known), then a closed port (after).
                nobody = await peer.client_connect(
                    port, peer.upgrade_request("x", jwt, prefix="not-a-secret")
                )
                assert nobody.status == 403  # autovpn's answer to a request nobody vouches for
                nobody.writer.close()
                bad = peer.make_jwt(peer.tcp_claims("127.0.0.1", closed_port()))
                refused = await peer.H2Tunnel.open(port, bad, prefix=SECRET_PREFIX)
                assert refused.status == 400
                refused.close()
                await eventually(lambda: not srv.stats.open)  # type: ignore[union-attr]
                t.close()
                snap: Any = srv.stats.snapshot()
                ws = snap["listeners"]["wstunnel"]
                total_bytes = sum(sizes) + len(payload)
                assert (ws["total"], ws["bytes_up"], ws["bytes_down"]) == (
                    3,
                    total_bytes,
                    total_bytes,
                )
                assert ws["failures"] == {"auth": 1, "connection_refused": 1}
                user = snap["users"]["default"]
                assert user["total"] == 3 and user["bytes_up"] == total_bytes
                assert user["failures"] == {"connection_refused": 1}
        finally:
            udp.close()

    run(main())
    lines = [f for f in access_lines(caplog) if f["listener"] == "wstunnel"]
    assert {f["user"] for f in lines} == {"default"}
    ended = sorted((f["bytes_up"], f["bytes_down"], f["result"]) for f in lines)
    assert ended == [
        (0, 0, "connection_refused"),
        (1610, 1610, RESULT_OK),
        (100_000, 100_000, RESULT_OK),
    ]
