"""WireGuard (wireguard-go) throughput: direct, through the autovpn UDP relay, through socat.

Topology ("moved TUN", testing-recipes.md 2.2, as tests/e2e/test_wireguard.py): two
wireguard-go processes start in this network namespace, so their UDP sockets are on 127.0.0.1;
the server's TUN then moves into a namespace made here (unique name, always deleted), so the
TCP transfer really crosses WireGuard while all UDP, relay included, stays on loopback.  The
client peer's Endpoint is the WireGuard server's port (direct), the autovpn relay (autovpn
client and server as two processes, like the TCP chain) or a socat relay.

The transfer: a Python sender inside the namespace writes ``size`` bytes over one TCP
connection to a receiver here (``recv_into`` a reused buffer), timed from connect to the last
byte; Mbit/s = 8 * bytes / seconds / 10^6.  Each measurement builds a fresh topology.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

from benchmarks import chains
from benchmarks.chains import Running, Workdir

VIAS: Final = ("direct", "autovpn", "socat")
PORT: Final = 18181

_SENDER: Final = """
import socket, sys
size, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
block = bytes(range(256)) * 4096
srv = socket.create_server((host, port))
print("ready", flush=True)
conn, _ = srv.accept()
view, sent = memoryview(block), 0
try:
    while sent < size:
        sent += conn.send(view[: min(len(block), size - sent)])
except OSError:
    pass
conn.close()
"""


def why_absent() -> str | None:
    """None when WireGuard can be measured here, else the reason."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "absent (needs root + wireguard-go)"
    if not shutil.which("wireguard-go") or not os.path.exists("/dev/net/tun"):
        return "absent (needs root + wireguard-go)"
    if not shutil.which("ip"):
        return "absent (needs iproute2)"
    return None


def _keypair() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    return (
        key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()),
        key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw),
    )


def _uapi(ifname: str, text: str) -> dict[str, str]:
    """wireguard-go's configuration protocol over its UNIX socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(f"/var/run/wireguard/{ifname}.sock")
        s.sendall(text.encode())
        buf = b""
        for _ in range(1000):
            if buf.endswith(b"\n\n"):
                break
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    out = buf.decode()
    if "errno=0" not in out:
        raise RuntimeError(f"wireguard-go {ifname}: {out.strip()}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _receive(host: str, size: int, limit: float) -> tuple[int, float]:
    """Connect (retrying while WireGuard does its handshake) and count bytes to EOF."""
    deadline = time.monotonic() + 15
    while True:
        try:
            s = socket.create_connection((host, PORT), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no TCP connection across WireGuard to {host}") from None
            time.sleep(0.1)
    buffer = bytearray(1 << 20)
    got = 0
    with s:
        s.settimeout(10)
        t0 = time.perf_counter()
        end = t0 + limit
        while got < size and time.perf_counter() < end:
            n = s.recv_into(buffer)
            if not n:
                break
            got += n
        wall = time.perf_counter() - t0
    return got, wall


def measure(via: str, work: Workdir, size: int, limit: float = 60.0) -> dict[str, Any]:
    """One fresh topology, one transfer: ``{"mbit": ..., "bytes": ..., "seconds": ...,
    "relay_cpu": ...}`` (relay_cpu: CPU-s of the relay processes, 0 for direct)."""
    tag = uuid.uuid4().hex[:6]
    ns, cif, sif = f"bwn{tag}", f"bwc{tag}", f"bws{tag}"
    net = f"10.{random.randint(100, 199)}.{random.randint(0, 255)}"
    caddr, saddr = f"{net}.1", f"{net}.2"
    cpriv, cpub = _keypair()
    spriv, spub = _keypair()
    wg_port = chains.free_udp_port()
    procs: list[subprocess.Popen[bytes]] = []
    relay: Running | None = None
    sender: subprocess.Popen[bytes] | None = None
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        for ifname in (sif, cif):
            procs.append(
                subprocess.Popen(
                    ["wireguard-go", "-f", ifname],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        while not all(Path(f"/var/run/wireguard/{i}.sock").exists() for i in (sif, cif)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.02)
        if via == "direct":
            endpoint = wg_port
        elif via == "autovpn":
            relay = chains.start_autovpn_udp(work, wg_port)
            assert relay.udp_port is not None
            endpoint = relay.udp_port
        elif via == "socat":
            socat = chains.find_socat()
            if socat is None:
                raise RuntimeError("socat not found")
            relay = chains.start_socat_udp(work, wg_port, socat)
            assert relay.udp_port is not None
            endpoint = relay.udp_port
        else:
            raise ValueError(f"unknown path {via!r}")
        _uapi(
            sif,
            f"set=1\nprivate_key={spriv.hex()}\nlisten_port={wg_port}\n"
            f"public_key={cpub.hex()}\nallowed_ip={caddr}/32\n\n",
        )
        _ip("link", "set", sif, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{saddr}/32", "dev", sif)
        _ip("-n", ns, "link", "set", sif, "up")
        _ip("-n", ns, "route", "add", f"{caddr}/32", "dev", sif)
        _uapi(
            cif,
            f"set=1\nprivate_key={cpriv.hex()}\npublic_key={spub.hex()}"
            f"\nendpoint=127.0.0.1:{endpoint}\nallowed_ip={saddr}/32\n\n",
        )
        _ip("addr", "add", f"{caddr}/32", "dev", cif)
        _ip("link", "set", cif, "up")
        _ip("route", "add", f"{saddr}/32", "dev", cif)
        sender = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _SENDER, str(size), saddr, str(PORT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert sender.stdout is not None
        if sender.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sender in the namespace did not start")
        pids = relay.pids if relay is not None else []
        from benchmarks.loadgen import tree_cpu

        cpu0 = tree_cpu(pids)
        got, wall = _receive(saddr, size, limit)
        relay_cpu = tree_cpu(pids) - cpu0
        if relay is not None:
            relay.check()
        if got < size // 16:
            raise RuntimeError(f"WireGuard via {via}: only {got} bytes crossed")
        return {
            "mbit": got * 8 / wall / 1e6,
            "bytes": got,
            "seconds": wall,
            "relay_cpu": relay_cpu,
        }
    finally:
        if sender is not None:
            if sender.poll() is None:
                sender.terminate()
            sender.wait(10)
            if sender.stdout is not None:
                sender.stdout.close()
        if relay is not None:
            relay.stop()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
