"""A fleet of autovpn servers behind a real balancer, with the configurations in deploy/.

Two ``python -m autovpn server`` processes on loopback behind HAProxy (``deploy/haproxy.cfg``,
TCP mode: TLS passes through), nginx's stream module (``deploy/nginx-stream.conf``, the same)
or nginx terminating TLS (``deploy/nginx-wss.conf``: wss:// to nginx, ws:// to the servers).
A client in this process (a pool of 2 tunnel connections, as a rule one on each server)
carries traffic; a server is killed with SIGKILL; the streams it carried fail, and every new
connection from then on succeeds: the client reconnects through the balancer to the server
left.

The balancers run in the foreground as children of this process (``haproxy -db``, nginx with
``daemon off``), are stopped with SIGTERM and waited for.  A balancer that is not installed
skips its test (CI installs both: .ci/run).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from autovpn.config import ServerURL
from autovpn.engine import Engine
from tests.conftest import (
    Certs,
    echo_handler,
    engine_config,
    eventually,
    free_port,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.server_process import ServerProcess, autovpn_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


# -- the balancers -----------------------------------------------------------------------------


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the balancer exited: {log.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {log.read_text(errors='replace')}")


@contextmanager
def _foreground(args: list[str], port: int, log: Path, env: dict[str, str]) -> Iterator[None]:
    """A balancer in the foreground: started, waited for on its port, stopped, reaped."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_listening(port, proc, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def haproxy_running(tmp_path: Path, front: int, servers: list[int]) -> AbstractContextManager[None]:
    """deploy/haproxy.cfg as it is, its addresses in the environment."""
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    env = dict(
        os.environ,
        AUTOVPN_FRONTEND=f"127.0.0.1:{front}",
        AUTOVPN_SERVER_1=f"127.0.0.1:{servers[0]}",
        AUTOVPN_SERVER_2=f"127.0.0.1:{servers[1]}",
    )
    args = [binary, "-db", "-f", str(DEPLOY / "haproxy.cfg")]
    return _foreground(args, front, tmp_path / "haproxy.log", env)


def _replace_once(text: str, old: str, new: str) -> str:
    """A line of the deployed file that the test changes: it must be there exactly once (a
    change to the file makes the test say so)."""
    assert text.count(old) == 1, f"{old!r} appears {text.count(old)} times"
    return text.replace(old, new)


def nginx_stream_module() -> str | None:
    """The ``load_module`` line nginx needs for ``stream {}`` ("" if built in); None when it
    has no stream module (skip)."""
    binary = shutil.which("nginx")
    if binary is None:
        return None
    built = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    if "--with-stream=dynamic" in built:
        found = re.search(r"--modules-path=(\S+)", built)
        module = Path(found.group(1) if found else "/usr/lib/nginx/modules")
        module /= "ngx_stream_module.so"
        return f"load_module {module};" if module.is_file() else None
    return "" if "--with-stream" in built else None


def nginx_config(tmp_path: Path, name: str, front: int, servers: list[int], certs: Certs) -> Path:
    """A main configuration that includes a copy of deploy/NAME with the test's addresses
    (and certificate); everything nginx writes goes to ``tmp_path``."""
    text = (DEPLOY / name).read_text()
    if name == "nginx-stream.conf":
        text = _replace_once(text, "listen 443;", f"listen 127.0.0.1:{front};")
        text = _replace_once(text, "listen [::]:443;", "")
        olds = ["server 10.0.0.11:443", "server 10.0.0.12:443"]
    else:
        text = _replace_once(text, "listen 443 ssl;", f"listen 127.0.0.1:{front} ssl;")
        text = _replace_once(text, "listen [::]:443 ssl;", "")
        text = _replace_once(
            text, "/etc/letsencrypt/live/vpn.example.net/fullchain.pem", str(certs.cert)
        )
        text = _replace_once(
            text, "/etc/letsencrypt/live/vpn.example.net/privkey.pem", str(certs.key)
        )
        olds = ["server 10.0.0.11:8080", "server 10.0.0.12:8080"]
    for old, port in zip(olds, servers, strict=True):
        text = _replace_once(text, old, f"server 127.0.0.1:{port}")
    copy = tmp_path / name
    copy.write_text(text)
    head = "worker_processes 1;\nevents { worker_connections 1024; }\n"
    if name == "nginx-stream.conf":
        module = nginx_stream_module()
        assert module is not None
        text = f"{module}\n{head}include {copy};\n"  # load_module comes first
    else:
        temp = "".join(
            f"    {kind}_temp_path {tmp_path / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = f"{head}http {{\n    access_log off;\n{temp}    include {copy};\n}}\n"
    main = tmp_path / f"main-{name}"
    main.write_text(text)
    return main


def nginx_running(tmp_path: Path, main: Path, front: int) -> AbstractContextManager[None]:
    binary = shutil.which("nginx")
    assert binary is not None
    args = [
        binary,
        "-p",
        str(tmp_path),
        "-e",
        "stderr",
        "-c",
        str(main),
        "-g",
        f"daemon off; pid {tmp_path / 'nginx.pid'};",
    ]
    return _foreground(args, front, tmp_path / "nginx.log", dict(os.environ))


# -- the scenario ------------------------------------------------------------------------------


async def _connections(server: ServerProcess) -> int:
    connections: int = (await server.status())["server"]["connections"]
    return connections


async def _wait_connections(servers: list[ServerProcess], expected: list[int]) -> None:
    seen: list[int] = []
    try:
        async with asyncio.timeout(20):
            while (seen := [await _connections(s) for s in servers]) != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # counters in another process: nothing to wait on
    except TimeoutError:
        raise AssertionError(f"tunnel connections per server: {seen}, not {expected}") from None


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ping")
    async with asyncio.timeout(10):
        assert await reader.readexactly(4) == b"ping"


async def _new_connection(eng: Engine, echo: int) -> None:
    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
    try:
        await _echo(reader, writer)
    finally:
        writer.close()


async def _settled(servers: list[ServerProcess], total: int) -> list[int]:
    """The tunnel connections of each server, once they add up to ``total``."""
    seen: list[int] = []
    async with asyncio.timeout(20):
        while sum(seen := [await _connections(s) for s in servers]) != total:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # counters in another process: nothing to wait on
    return seen


async def kill_one_during_traffic(eng: Engine, echo: int, servers: list[ServerProcess]) -> None:
    """The client's pool (2 connections, as a rule one on each server: the balancers spread
    by connection count) carries 4 streams (2 on each connection, by load); a server with a
    connection dies; its streams fail, the others go on; new connections succeed from the
    first on; the pool refills on the survivor."""
    tunnel = eng.tunnel
    assert tunnel is not None
    await eventually(lambda: len(tunnel.connections) == 2, within=20)
    counts = await _settled(servers, 2)
    doomed, survivor = servers if counts[0] else servers[::-1]
    streams = [await socks_open(socks_port(eng), "127.0.0.1", echo) for _ in range(4)]
    try:
        for reader, writer in streams:
            await _echo(reader, writer)
        connects = tunnel.connects
        doomed.proc.kill()
        await doomed.proc.wait()
        failed = 0
        for reader, writer in streams:
            try:
                await _echo(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):
                failed += 1  # RuntimeError: uvloop's write on a transport already closed
        lost = counts[servers.index(doomed)]  # the killed server's tunnel connections
        assert failed == 2 * lost, f"{failed} of 4 streams failed; connections {counts}"
        # The client has seen its connections to the killed server go: from here on, every
        # new connection works (on a connection left, or on the first new one).
        for _ in range(20):
            await _new_connection(eng, echo)
        await eventually(lambda: tunnel.up and len(tunnel.connections) == 2, within=30)
        assert tunnel.connects == connects + lost
        await _wait_connections([survivor], [2])
        for _ in range(5):
            await _new_connection(eng, echo)
    finally:
        for _, writer in streams:
            writer.close()


@asynccontextmanager
async def two_servers(
    certs: Certs, tmp_path: Path, tls: bool
) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    # One process each: the test kills a server as a whole with SIGKILL (workers are
    # tested in test_workers.py).
    async with (
        autovpn_server(certs, tmp_path, "--workers", "1", name="a", tls=tls) as a,
        autovpn_server(certs, tmp_path, "--workers", "1", name="b", tls=tls) as b,
    ):
        yield a, b


@pytest.mark.parametrize("balancer", ["haproxy", "nginx-stream.conf", "nginx-wss.conf"])
def test_a_fleet_behind_a_balancer_survives_a_killed_server(
    certs: Certs, tmp_path: Path, balancer: str
) -> None:
    if balancer.startswith("nginx"):
        if shutil.which("nginx") is None:
            pytest.skip("nginx is not installed (apt-get install nginx)")
        if balancer == "nginx-stream.conf" and nginx_stream_module() is None:
            pytest.skip("this nginx has no stream module (apt-get install libnginx-mod-stream)")
    front = free_port()
    # Pass-through: the servers terminate TLS; nginx-wss: nginx does, the servers speak ws://.
    servers_tls = balancer != "nginx-wss.conf"

    async def main() -> None:
        async with (
            two_servers(certs, tmp_path, servers_tls) as (a, b),
            tcp_server(echo_handler) as echo,
        ):
            ports = [a.port, b.port]
            running = (
                haproxy_running(tmp_path, front, ports)
                if balancer == "haproxy"
                else nginx_running(
                    tmp_path, nginx_config(tmp_path, balancer, front, ports, certs), front
                )
            )
            with running:
                cfg = engine_config(certs, server=False, server_port=front, pool_size=2)
                assert cfg.client is not None and cfg.client.server == ServerURL(
                    True, "127.0.0.1", front
                )
                async with Engine(cfg) as eng:
                    await kill_one_during_traffic(eng, echo, [a, b])

    run(main())


def test_nginx_terminating_tls_must_pass_the_host_header_on(certs: Certs, tmp_path: Path) -> None:
    """Without ``proxy_set_header Host $http_host`` nginx sends the upstream's name: the
    handshake MAC, which covers the Host the client sent, no longer matches, and the server
    refuses the client (403).  This is why the line is in deploy/nginx-wss.conf."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    front = free_port()

    async def main() -> None:
        async with two_servers(certs, tmp_path, False) as (a, b):
            main_conf = nginx_config(tmp_path, "nginx-wss.conf", front, [a.port, b.port], certs)
            copy = tmp_path / "nginx-wss.conf"
            copy.write_text(
                _replace_once(copy.read_text(), "proxy_set_header Host $http_host;", "")
            )
            with nginx_running(tmp_path, main_conf, front):
                cfg = engine_config(certs, server=False, server_port=front)
                async with Engine(cfg) as eng:
                    assert eng.tunnel is not None and not eng.tunnel.up
                    assert "403" in eng.tunnel.last_error, eng.tunnel.last_error
            refused = a.text() + b.text()
            assert "refused" in refused, refused

    run(main())
