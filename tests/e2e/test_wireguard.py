"""Real WireGuard (wireguard-go) through autovpn's UDP relay and tunnel.

Topology ("moved TUN"): both wireguard-go processes
start in this network namespace, so their UDP sockets are on 127.0.0.1; the server's TUN is then
moved into a namespace the test creates, so tunnel traffic really crosses WireGuard.  The client
peer's Endpoint is the autovpn relay; the autovpn server (a separate process, so it can be killed)
sends the datagrams to the WireGuard server's port.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from autovpn.config import ClientConfig, Config, ListenSpec, ServerURL
from autovpn.engine import Engine
from autovpn.eventloop import loop_factory
from tests.conftest import SECRET, Certs, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        sys.platform != "linux"
        or os.geteuid() != 0
        or not shutil.which("wireguard-go")
        or not os.path.exists("/dev/net/tun"),
        reason="needs Linux, root, wireguard-go and /dev/net/tun",
    ),
]

TRANSFER = 64 << 20


def _keypair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    return (
        key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()),
        key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw),
    )


def _uapi(ifname: str, text: str) -> dict[str, str]:
    """wireguard-go's cross-platform configuration protocol over its UNIX socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(f"/var/run/wireguard/{ifname}.sock")
        s.sendall(text.encode())
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    out = buf.decode()
    assert "errno=0" in out, out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EngineThread:
    """An autovpn client engine on its own event loop in a thread (the test body blocks)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine: Engine | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        _, factory = loop_factory()
        self.loop = factory()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("engine did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    async def _main(self) -> None:
        try:
            self.engine = Engine(self.config)
            await self.engine.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self.engine.serve_forever()
        await self.engine.close()

    def stop(self) -> None:
        if self.engine is not None:
            self.loop.call_soon_threadsafe(self.engine.stop)
        self._thread.join(20)


@dataclass
class Topology:
    ns: str
    client_if: str
    relay: EngineThread
    server_port: int  # the autovpn tunnel server's TCP port
    echo_port: int  # a UDP echo on the WireGuard server's side (10.66.0.2)


#: A UDP echo inside the namespace: what a probe across WireGuard reaches (no ping needed).
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""


@dataclass
class _ServerProcess:
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("autovpn server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def wireguard(certs: Certs, tmp_path: Path) -> Iterator[tuple[Topology, _ServerProcess]]:
    tag = uuid.uuid4().hex[:6]
    ns, client_if, server_if = f"avt{tag}", f"avc{tag}", f"avs{tag}"
    client_priv, client_pub = _keypair()
    server_priv, server_pub = _keypair()
    wg_port = _free_udp_port()
    tunnel_port = free_port()

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    server = _ServerProcess(
        [
            sys.executable,
            "-m",
            "autovpn",
            "--log-level",
            "warning",
            "server",
            f"wss://127.0.0.1:{tunnel_port}",
            "--tls-certificate",
            str(certs.cert),
            "--tls-private-key",
            str(certs.key),
            "--secret-file",
            str(secret_file),
            "--allow",
            "127.0.0.0/8",
            "--workers",  # one process, which the test kills
            "1",
        ],
        dict(os.environ),
    )
    _sh("ip", "netns", "add", ns)
    procs: list[subprocess.Popen[bytes]] = []
    relay: EngineThread | None = None
    try:
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        for ifname in (server_if, client_if):
            procs.append(
                subprocess.Popen(
                    ["wireguard-go", "-f", ifname],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        while not all(
            os.path.exists(f"/var/run/wireguard/{i}.sock") for i in (server_if, client_if)
        ):
            assert time.monotonic() < deadline, "wireguard-go did not start"
            time.sleep(0.02)
        server.start(tunnel_port)
        relay_port = _free_udp_port()
        config = Config(
            client=ClientConfig(
                server=ServerURL(True, "127.0.0.1", tunnel_port),
                secret=SECRET,
                tls_ca=certs.ca,
                listen=[
                    ListenSpec.parse(
                        f"udp://127.0.0.1:{relay_port}:127.0.0.1:{wg_port}?timeout_sec=0"
                    )
                ],
            )
        )
        relay = EngineThread(config)
        _uapi(
            server_if,
            f"set=1\nprivate_key={server_priv.hex()}\nlisten_port={wg_port}\n"
            f"public_key={client_pub.hex()}\nallowed_ip=10.66.0.1/32\n\n",
        )
        _sh("ip", "link", "set", server_if, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", "10.66.0.2/32", "dev", server_if)
        _sh("ip", "-n", ns, "link", "set", server_if, "up")
        _sh("ip", "-n", ns, "route", "add", "10.66.0.1/32", "dev", server_if)
        echo = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO, "10.66.0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        procs.append(echo)
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline())
        echo.stdout.close()
        _uapi(
            client_if,
            f"set=1\nprivate_key={client_priv.hex()}\npublic_key={server_pub.hex()}"
            f"\nendpoint=127.0.0.1:{relay_port}\nallowed_ip=10.66.0.2/32\n"
            f"persistent_keepalive_interval=1\n\n",
        )
        _sh("ip", "addr", "add", "10.66.0.1/32", "dev", client_if)
        _sh("ip", "link", "set", client_if, "up")
        _sh("ip", "route", "add", "10.66.0.2/32", "dev", client_if)
        yield Topology(ns, client_if, relay, tunnel_port, echo_port), server
    finally:
        if relay is not None:
            relay.stop()
        server.kill()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _wait_for_echo(port: int, within: float) -> bool:
    """A UDP datagram to 10.66.0.2 comes back: it crossed WireGuard (and so the autovpn relay
    and tunnel) both ways.  Retried: the first ones may go before WireGuard's handshake."""
    deadline = time.monotonic() + within
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            probe = f"probe {n}".encode()
            s.sendto(probe, ("10.66.0.2", port))
            try:
                while True:  # a late echo of an earlier probe is not this one's
                    if s.recv(2048) == probe:
                        return True
            except TimeoutError:
                continue
    return False


_SENDER = """
import hashlib, socket, sys
size = int(sys.argv[1])
block = hashlib.shake_256(b"wireguard").digest(1 << 20)
srv = socket.create_server(("10.66.0.2", 18181))
print("ready", flush=True)
conn, _ = srv.accept()
sent = 0
while sent < size:
    n = conn.send(block[: min(len(block), size - sent)])
    sent += n
conn.close()
"""


def _transfer(ns: str, size: int, during: object = None) -> bytes:
    """Receive ``size`` bytes from a sender inside the namespace, across WireGuard."""
    sender = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _SENDER, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == b"ready"
        h = hashlib.sha256()
        got = 0
        with socket.create_connection(("10.66.0.2", 18181), timeout=30) as s:
            s.settimeout(30)
            while True:
                data = s.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                got += len(data)
                if during is not None and got > size // 4:
                    during()  # type: ignore[operator]
                    during = None
        assert got == size
        return h.digest()
    finally:
        sender.wait(30)
        if sender.stdout is not None:
            sender.stdout.close()


def _expected(size: int) -> bytes:
    block = hashlib.shake_256(b"wireguard").digest(1 << 20)
    h = hashlib.sha256()
    sent = 0
    while sent < size:
        chunk = block[: min(len(block), size - sent)]
        h.update(chunk)
        sent += len(chunk)
    return h.digest()


def test_wireguard_handshake_udp_echo_and_64mib_through_autovpn(
    wireguard: tuple[Topology, _ServerProcess],
) -> None:
    topo, _ = wireguard
    assert _wait_for_echo(topo.echo_port, 15), "no UDP echo across WireGuard through the relay"
    assert int(_uapi(topo.client_if, "get=1\n\n")["last_handshake_time_sec"]) > 0
    assert _transfer(topo.ns, TRANSFER) == _expected(TRANSFER)
    assert topo.relay.engine is not None
    relay = topo.relay.engine.udp_relays[0]
    assert relay.stats.sent > 1000 and relay.stats.replies > 1000


def test_wireguard_survives_a_killed_and_restarted_autovpn_server(
    wireguard: tuple[Topology, _ServerProcess],
) -> None:
    topo, server = wireguard
    assert _wait_for_echo(topo.echo_port, 15)

    def bounce() -> None:
        server.kill()
        time.sleep(0.5)
        server.start(topo.server_port)

    # A TCP transfer inside WireGuard spans the kill: it stalls, then resumes by itself once
    # the relay's tunnel reconnects (same relay port, no restart of WireGuard or the relay).
    size = 16 << 20
    assert _transfer(topo.ns, size, during=bounce) == _expected(size)
    assert _wait_for_echo(topo.echo_port, 10)
