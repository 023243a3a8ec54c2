"""wstunnel's command line on autovpn: -L forms end to end through the tunnel (tcp://, unix://,
stdio:// with a subprocess pipe), the seed's proxy-mode command line as a subprocess, and the
flag/duration/environment parsing."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn import cli
from autovpn.config import ClientConfig, Config, ListenSpec, ServerURL
from autovpn.engine import Engine
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.wstunnel import cli as wstunnel_cli
from autovpn.tunnel.wstunnel.server import WstunnelService
from autovpn.wire import wstunnel
from tests.conftest import SECRET, echo_handler, env_without_proxies, run, tcp_server

ROOT = Path(__file__).resolve().parents[3]


@asynccontextmanager
async def server() -> AsyncIterator[TunnelServer]:
    """A plain ws:// tunnel server (native + wstunnel) allowing loopback targets."""
    settings = ServerSettings(
        "127.0.0.1", 0, {"default": SECRET}, policy=DestinationPolicy(("127.0.0.0/8",))
    )
    async with TunnelServer(settings) as srv:
        service = WstunnelService(srv).install()
        try:
            yield srv
        finally:
            await service.close()


def client_config(port: int, specs: list[str], protocol: str) -> Config:
    cc = ClientConfig(
        ServerURL(False, "127.0.0.1", port),
        SECRET,
        listen=[ListenSpec.parse(s) for s in specs],
        protocol=protocol,
    )
    return Config(client=cc)


@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_tcp_forward_with_bind_and_ipv6_brackets(protocol: str) -> None:
    async def main() -> None:
        async with server() as srv, tcp_server(echo_handler) as echo:
            specs = [f"tcp://127.0.0.1:0:127.0.0.1:{echo}", f"tcp://0:[127.0.0.1]:{echo}"]
            async with Engine(client_config(srv.port, specs, protocol)) as eng:
                for forward in eng.forwards:
                    reader, writer = await asyncio.open_connection("127.0.0.1", forward.bound_port)
                    writer.write(b"through the forward")
                    assert await reader.readexactly(19) == b"through the forward"
                    writer.close()
                assert any("forward" in line for line in eng.describe())

    run(main())


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="unix sockets are POSIX only")
def test_unix_forward(tmp_path: Path) -> None:
    path = tmp_path / "fwd.sock"

    async def main() -> None:
        async with server() as srv, tcp_server(echo_handler) as echo:
            spec = f"unix://{path}:127.0.0.1:{echo}?proxy_protocol"
            async with Engine(client_config(srv.port, [spec], "wstunnel")):
                reader, writer = await asyncio.open_unix_connection(str(path))
                writer.write(b"unix")
                data = await reader.readexactly(4 + 16 + 12)  # PROXY v2 header first
                assert data.startswith(wstunnel.PROXY_V2_SIGNATURE) and data.endswith(b"unix")
                writer.close()

    run(main())


def test_stdio_forward_is_a_proxy_command_and_exits_when_the_tunnel_closes() -> None:
    async def main() -> None:
        closing = asyncio.Event()

        async def one_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-test\r\n")
            data = await reader.readexactly(5)
            writer.write(data.upper())
            await writer.drain()
            await closing.wait()  # then close: the tunnel ends, the process must exit

        async with server() as srv, tcp_server(one_exchange) as port:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "autovpn",
                "client",
                "--protocol",
                "wstunnel",
                "-L",
                f"stdio://127.0.0.1:{port}",
                f"ws://127.0.0.1:{srv.port}",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
                # -P as the environment gives it: the secret stays out of the process list.
                env=env_without_proxies() | {"WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX": SECRET.decode()},
            )
            assert proc.stdin is not None and proc.stdout is not None
            try:
                async with asyncio.timeout(20):
                    assert await proc.stdout.readexactly(14) == b"SSH-2.0-test\r\n"
                    proc.stdin.write(b"hello")
                    assert await proc.stdout.readexactly(5) == b"HELLO"
                    closing.set()
                    assert await proc.stdout.read() == b""
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                proc.stdin.close()
                assert proc.stderr is not None
                await proc.stderr.read()

    run(main())


def test_seed_proxy_mode_command_line_serves_with_listener_credentials() -> None:
    from tests.conftest import free_port, socks_open

    async def main() -> None:
        socks, http = free_port(), free_port()
        async with server() as srv, tcp_server(echo_handler) as echo:
            env = env_without_proxies()
            env["AUTOVPN_SECRET"] = SECRET.decode()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "autovpn",
                "client",
                "-L",
                f"socks5://127.0.0.1:{socks}",
                "-L",
                f"http://127.0.0.1:{http}",
                "--http-proxy-username",
                "user",
                "--http-proxy-password",
                "pass",
                f"ws://127.0.0.1:{srv.port}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
                env=env,
            )
            assert proc.stdout is not None and proc.stderr is not None
            try:
                async with asyncio.timeout(20):
                    while b"running" not in await proc.stdout.readline():
                        pass
                    reader, writer = await socks_open(socks, "127.0.0.1", echo, "user", "pass")
                    writer.write(b"ok")
                    assert await reader.readexactly(2) == b"ok"
                    writer.close()
                    r, w = await asyncio.open_connection("127.0.0.1", http)
                    w.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert b" 407 " in await r.readline()  # the credentials guard http:// too
                    w.close()
            finally:
                proc.terminate()
                await proc.wait()
                err = (await proc.stderr.read()).decode()
                await proc.stdout.read()
            assert err.count("never existed in wstunnel") == 1

    run(main())


def test_flags_durations_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert wstunnel_cli.parse_duration("30s") == 30
    assert wstunnel_cli.parse_duration("5m") == 300
    assert wstunnel_cli.parse_duration("1h") == 3600
    assert wstunnel_cli.parse_duration("45") == 45
    with pytest.raises(ValueError):
        wstunnel_cli.parse_duration("soon")
    monkeypatch.setenv("WSTUNNEL_HTTP_UPGRADE_PATH_PREFIX", "from-env")
    headers = tmp_path / "h"
    headers.write_text("X-A: 1\n")
    args = cli._parser().parse_args(
        [
            "client",
            "--protocol",
            "wstunnel",
            "-H",
            "X-Test: yes",
            "--http-headers-file",
            str(headers),
            "--http-upgrade-credentials",
            "u:p",
            "-c",
            "3",
            "--connection-retry-max-backoff",
            "2m",
            "--websocket-ping-frequency-sec",
            "10",
            "-L",
            "tcp://[::1]:2222:[::1]:22?proxy_protocol",
            "-L",
            "udp://51820:127.0.0.1:51820?timeout_sec=0",
            "wss://example.net",
        ]
    )
    cfg = Config()
    cli._client_from_args(args, cfg)
    cc = cfg.client
    assert cc is not None and cc.protocol == "wstunnel" and cc.secret == b""
    assert cc.path_prefix == "from-env"
    w = cc.wstunnel
    assert w.headers == (("X-Test", "yes"),) and w.headers_file == str(headers)
    assert (w.credentials, w.min_idle, w.max_backoff, w.ping_interval) == ("u:p", 3, 120, 10)
    tcp, udp = cc.listen
    assert (tcp.host, tcp.port, tcp.target_host, tcp.target_port) == ("::1", 2222, "::1", 22)
    assert tcp.option("proxy_protocol") == ""
    assert (udp.scheme, udp.target_port, udp.option("timeout_sec")) == ("udp", 51820, "0")
    monkeypatch.setenv("WSTUNNEL_RESTRICT_HTTP_UPGRADE_PATH_PREFIX", "s3cret")
    monkeypatch.setenv("AUTOVPN_SECRET", "long-enough-secret")
    args = cli._parser().parse_args(
        ["server", "ws://127.0.0.1:0", "--restrict-to", "localhost:22", "--log-lvl", "debug"]
    )
    cli._server_from_args(args, cfg)
    assert cfg.server is not None
    assert cfg.server.wstunnel.restrict_to == ("localhost:22",)
    assert cfg.server.wstunnel.restrict_path_prefixes == ("s3cret",)
    assert args.log_level == "debug"
