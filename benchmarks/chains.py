"""The chains under test: each one a set of processes on loopback with a config written here.

A chain is started fresh for every repetition and always stopped (terminate, then wait; kill
after a grace period).  ``find_*`` functions locate the peers without installing anything; a
peer that is not found is reported as absent by the harness.

How to install the peers is in docs/benchmarks.md.  In short: pproxy in its own virtualenv
(it crashes when uvloop is importable), v2ray, stunnel4 and dante-server from Debian.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[1]


def autovpn_source() -> Path:
    """The autovpn tree to run: this checkout, or $BENCH_AUTOVPN_SRC (e.g. an exported commit,
    to measure a fixed revision while the working tree changes)."""
    return Path(os.environ.get("BENCH_AUTOVPN_SRC") or REPO)


SECRET: Final = "bench-secret-0123456789abcdef"
VLESS_ID: Final = str(uuid.UUID(int=0x6F1C2A0E4A1B4A5E9D1E2B3C4D5E6F70))

#: pproxy 2.7.9 cannot run where uvloop is importable, and its WebSocket listener never
#: recognises a request (``WS.guess`` compares the reader, not the header, with b"GET "):
#: the wrapper hides uvloop and fixes that one comparison, nothing else.
PPROXY_WRAPPER: Final = """\
import sys
sys.modules["uvloop"] = None
import pproxy.proto as proto

async def _guess(self, reader, **kw):
    header = await reader.read_w(4)
    reader.rollback(header)
    return header == b"GET "

proto.WS.guess = _guess
from pproxy.server import main
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: Log file of each process started here (the harness quotes its tail when one dies).
LOGS: dict[int, Path] = {}


def exit_report(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    what = " ".join(str(a) for a in args[:6])
    tail = ""
    log = LOGS.get(proc.pid)
    if log is not None:
        try:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            pass
    return f"{what} ... exited with {proc.returncode}: {tail[-400:]}"


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(exit_report(proc))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Running:
    """A started chain: its processes and the SOCKS5 port (None for direct)."""

    name: str
    socks_port: int | None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    udp_port: int | None = None  # the UDP relay's port (UDP chains)
    #: Processes the chain's own processes started (a server's workers): their CPU and memory
    #: count too, and their parent stops them.
    children: list[int] = field(default_factory=list)
    #: Processes started as their own session, stopped by process group: socat forks a child
    #: per UDP peer, and a child left behind keeps the port busy (testing-recipes.md).
    groups: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Whether its processes fork the workers that carry the traffic (danted's negotiate,
    #: request and I/O children): then ``pids`` counts their descendants too.
    forks: bool = False

    @property
    def pids(self) -> list[int]:
        pids = [p.pid for p in self.procs]
        return _with_descendants(pids) if self.forks else pids + self.children

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: {exit_report(p)}")

    def stop(self) -> None:
        for p in self.groups:
            _stop_children(p.pid)
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own group: start_new_session=True
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.groups:  # the group's other members (forked children) too
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def _with_descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them now (from /proc).  A child that exits between two
    CPU samples still counts: its parent's cutime/cstime holds it once it is reaped."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found = list(roots)
    for pid in found:  # grows while it is walked: breadth-first over the process tree
        found.extend(children.get(pid, ()))
    return found


def _stop_children(pid: int, grace: float = 2.0) -> None:
    """Terminate ``pid``'s children first and give it time to reap them: killed together, the
    parent may die first, and PID 1 here never reaps the orphans (zombies pile up)."""
    children = _children(pid)
    for child in children:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        children = [c for c in children if Path(f"/proc/{c}").exists()]
        time.sleep(0.02)


@dataclass
class Workdir:
    path: Path
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Workdir:
    """A CA and a server certificate for localhost/127.0.0.1 (EC P-256), made here."""
    from autovpn.tunnel.tls import make_private_ca

    ca, cert, key = make_private_ca(directory, ["localhost", "127.0.0.1"], days=1)
    return Workdir(directory, ca, cert, key)


def _popen(
    args: list[str], log: Path, env: dict[str, str] | None = None, session: bool = False
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(log.parent),
            start_new_session=session,
        )
    LOGS[proc.pid] = log
    return proc


# -- peers: where are they ----------------------------------------------------------------


def find_pproxy_python() -> str | None:
    """The interpreter that has pproxy: $BENCH_PPROXY_PYTHON, the venv, or pproxy's shebang."""
    candidates = [os.environ.get("BENCH_PPROXY_PYTHON", ""), "/tmp/pproxy-venv/bin/python"]
    script = shutil.which("pproxy")
    if script:
        try:
            first = Path(script).read_text(errors="replace").splitlines()[0]
            if first.startswith("#!"):
                candidates.append(first[2:].strip().split()[0])
        except (OSError, IndexError):
            pass
    for python in candidates:
        if python and Path(python).is_file():
            probe = subprocess.run(
                [python, "-c", "import importlib.metadata as m; print(m.version('pproxy'))"],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                return python
    return None


def pproxy_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('pproxy'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "?"


def find_v2ray() -> str | None:
    return os.environ.get("BENCH_V2RAY") or shutil.which("v2ray")


def v2ray_version(binary: str) -> str:
    for args in ([binary, "-version"], [binary, "version"]):
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout:
            return " ".join(out.stdout.split()[:2])
    return "?"


def find_stunnel() -> str | None:
    """stunnel 5 (Debian's ``stunnel4``): $BENCH_STUNNEL, or on PATH."""
    return os.environ.get("BENCH_STUNNEL") or shutil.which("stunnel4") or shutil.which("stunnel")


def stunnel_version(binary: str) -> str:
    # ``-version`` prints to stderr: "stunnel 5.68 on x86_64-pc-linux-gnu platform"
    out = subprocess.run([binary, "-version"], capture_output=True, text=True)
    for line in (out.stderr + out.stdout).splitlines():
        if line.startswith("stunnel "):
            return " ".join(line.split()[:2])
    return "?"


def find_danted() -> str | None:
    """dante-server's ``danted``: $BENCH_DANTED, on PATH, or /usr/sbin (not on a user's PATH)."""
    found = os.environ.get("BENCH_DANTED") or shutil.which("danted")
    if found is None and Path("/usr/sbin/danted").is_file():
        found = "/usr/sbin/danted"
    return found


def danted_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("Dante v"):
            return "dante " + line.split()[1].rstrip(".").lstrip("v")
    return "?"


# -- the chains ----------------------------------------------------------------------------


def start_direct(work: Workdir) -> Running:
    return Running("direct", None)


@functools.cache
def knows_workers() -> bool:
    """Whether the autovpn measured has ``server --workers`` (BENCH_AUTOVPN_SRC may be older)."""
    env = dict(os.environ, PYTHONPATH=str(autovpn_source()))
    out = subprocess.run(
        [sys.executable, "-m", "autovpn", "server", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(autovpn_source()),
    )
    return "--workers" in out.stdout


def _start_autovpn_pair(
    work: Workdir,
    run: Running,
    listen: str,
    log_name: str,
    *,
    workers: int = 1,
    pool_size: int = 1,
    server_args: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """``autovpn server wss://… --allow 127.0.0.0/8`` and ``autovpn client -L LISTEN wss://…``
    as two processes (the secret in AUTOVPN_SECRET); returns (server, client) once the server
    listens.  The caller waits for the client's own port.  The server runs ``workers``
    processes (one by default: the chains compare one process with one process), the
    client ``pool_size`` tunnel connections; ``server_args``: more of the server's flags.

    Their state (engine records, IP scores) stays in the chain's work directory: never the
    user's own state directory, whose engines' records it would mix with."""
    server_port = free_port()
    env = dict(
        os.environ,
        AUTOVPN_SECRET=SECRET,
        PYTHONPATH=str(autovpn_source()),
        AUTOVPN_STATE_DIR=str(work.path / f"{log_name}-state"),
    )
    py = [sys.executable, "-m", "autovpn", "--log-level", "warning"]
    server = _popen(
        [
            *py,
            "server",
            f"wss://127.0.0.1:{server_port}",
            "--tls-certificate",
            str(work.cert),
            "--tls-private-key",
            str(work.key),
            "--allow",
            "127.0.0.0/8",
            *(["--workers", str(workers)] if workers > 1 or knows_workers() else []),
            *server_args,
        ],
        work.path / f"{log_name}-server.log",
        env,
    )
    run.procs.append(server)
    wait_port(server_port, server)
    if workers > 1:
        # The supervisor's banner comes once every worker listens.
        log = work.path / f"{log_name}-server.log"
        deadline = time.monotonic() + 60
        while "worker processes" not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers did not start: {exit_report(server)}")
            time.sleep(0.05)
        run.children = _children(server.pid)
    pool = ["--pool-size", str(pool_size)] if pool_size > 1 else []
    client = _popen(
        [
            *py,
            "client",
            "-L",
            listen,
            "--tls-ca",
            str(work.ca),
            *pool,
            f"wss://127.0.0.1:{server_port}",
        ],
        work.path / f"{log_name}-client.log",
        env,
    )
    run.procs.append(client)
    return server, client


def start_autovpn(work: Workdir) -> Running:
    socks = free_port()
    run = Running("autovpn", socks)
    try:
        _, client = _start_autovpn_pair(work, run, f"socks5://127.0.0.1:{socks}", "autovpn")
        wait_port(socks, client)
    except BaseException:
        run.stop()
        raise
    return run


def _pproxy(python: str, work: Workdir, args: list[str], log: str) -> subprocess.Popen[bytes]:
    wrapper = work.path / "pproxy_wrapper.py"
    if not wrapper.exists():
        wrapper.write_text(PPROXY_WRAPPER)
    return _popen([python, str(wrapper), *args], work.path / log)


def start_pproxy(work: Workdir, python: str) -> Running:
    socks = free_port()
    run = Running("pproxy", socks)
    proc = _pproxy(python, work, ["-l", f"socks5://127.0.0.1:{socks}"], "pproxy.log")
    run.procs.append(proc)
    try:
        wait_port(socks, proc)
    except BaseException:
        run.stop()
        raise
    return run


def start_pproxy_ws(work: Workdir, python: str) -> Running:
    """SOCKS5 → ws+TLS → pproxy.  pproxy's ws listener forwards to a fixed address, so the
    server process relays it into its own SOCKS5 listener, which the client's SOCKS5 jump
    (``__socks5://``) then drives through the WebSocket to reach any target."""
    socks, ws, inner = free_port(), free_port(), free_port()
    run = Running("pproxy-ws", socks)
    try:
        server = _pproxy(
            python,
            work,
            [
                "-l",
                f"ws{{127.0.0.1:{inner}}}+ssl://127.0.0.1:{ws}",
                "-l",
                f"socks5://127.0.0.1:{inner}",
                "--ssl",
                f"{work.cert},{work.key}",
            ],
            "pproxy-ws-server.log",
        )
        run.procs.append(server)
        wait_port(ws, server)
        client = _pproxy(
            python,
            work,
            ["-l", f"socks5://127.0.0.1:{socks}", "-r", f"ws+ssl://127.0.0.1:{ws}__socks5://x:1"],
            "pproxy-ws-client.log",
        )
        run.procs.append(client)
        wait_port(socks, client)
    except BaseException:
        run.stop()
        raise
    return run


def start_v2ray(work: Workdir, binary: str) -> Running:
    """SOCKS5 → VLESS over WebSocket+TLS → v2ray (freedom outbound)."""
    socks, port = free_port(), free_port()
    stream = {
        "network": "ws",
        "security": "tls",
        "wsSettings": {"path": "/bench"},
    }
    log = {"loglevel": "warning", "access": "none"}
    server_cfg = {
        "log": log,
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": port,
                "protocol": "vless",
                "settings": {"clients": [{"id": VLESS_ID}], "decryption": "none"},
                "streamSettings": dict(
                    stream,
                    tlsSettings={
                        "certificates": [
                            {"certificateFile": str(work.cert), "keyFile": str(work.key)}
                        ]
                    },
                ),
            }
        ],
        "outbounds": [{"protocol": "freedom"}],
    }
    client_cfg = {
        "log": log,
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": socks,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": False},
            }
        ],
        "outbounds": [
            {
                "protocol": "vless",
                "settings": {
                    "vnext": [
                        {
                            "address": "127.0.0.1",
                            "port": port,
                            "users": [{"id": VLESS_ID, "encryption": "none"}],
                        }
                    ]
                },
                "streamSettings": dict(
                    stream,
                    tlsSettings={
                        "serverName": "localhost",
                        "certificates": [{"usage": "verify", "certificateFile": str(work.ca)}],
                    },
                ),
            }
        ],
    }
    (work.path / "v2ray-server.json").write_text(json.dumps(server_cfg, indent=1))
    (work.path / "v2ray-client.json").write_text(json.dumps(client_cfg, indent=1))
    run = Running("v2ray", socks)
    try:
        server = _popen(
            [binary, "-config", str(work.path / "v2ray-server.json")],
            work.path / "v2ray-server.log",
        )
        run.procs.append(server)
        wait_port(port, server)
        client = _popen(
            [binary, "-config", str(work.path / "v2ray-client.json")],
            work.path / "v2ray-client.log",
        )
        run.procs.append(client)
        wait_port(socks, client)
    except BaseException:
        run.stop()
        raise
    return run


def stunnel_client_conf(accept: int, connect: int, ca: Path) -> str:
    """The stunnel client of the C chain: plain SOCKS5 in on ``accept``, TLS out to
    ``connect``, the server's certificate verified against the harness's CA for localhost."""
    return f"""\
; written by benchmarks/chains.py: the C chain's TLS client
foreground = yes
pid =
debug = warning

[socks]
client = yes
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
sni = localhost
verifyChain = yes
CAfile = {ca}
checkHost = localhost
"""


def stunnel_server_conf(accept: int, connect: int, cert: Path, key: Path) -> str:
    """The stunnel server of the C chain: TLS in on ``accept``, plain out to danted."""
    return f"""\
; written by benchmarks/chains.py: the C chain's TLS server
foreground = yes
pid =
debug = warning

[socks]
accept = 127.0.0.1:{accept}
cert = {cert}
key = {key}
connect = 127.0.0.1:{connect}
"""


def danted_conf(port: int) -> str:
    """dante-server: SOCKS5 without authentication on 127.0.0.1:``port``, to 127.0.0.0/8 only.

    No ``user.*`` lines: danted runs as whoever starts it (as root it warns, and goes on).
    ``log: error`` keeps a connection that works out of the log."""
    return f"""\
# written by benchmarks/chains.py: the C chain's SOCKS5 server
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: error
}}
"""


def start_stunnel_dante(work: Workdir, stunnel: str, danted: str) -> Running:
    """SOCKS5 → stunnel client → TLS → stunnel server → danted (SOCKS5, no auth) → target.

    Both stunnels run in the foreground with no pid file (a thread per connection, one
    process each).  danted runs in the foreground too (no ``-D``) with its pid file in the work
    directory, but it forks negotiate, request and I/O children: it gets its own session and is
    stopped by process group after its children (``Running.groups``: killed first, its mother
    exits without reaping them, and PID 1 here reaps no orphans), and its CPU and memory are
    counted with its descendants' (``Running.forks``)."""
    socks, tls, dante = free_port(), free_port(), free_port()
    client_conf = work.path / "stunnel-client.conf"
    server_conf = work.path / "stunnel-server.conf"
    dante_conf = work.path / "danted.conf"
    client_conf.write_text(stunnel_client_conf(socks, tls, work.ca))
    server_conf.write_text(stunnel_server_conf(tls, dante, work.cert, work.key))
    dante_conf.write_text(danted_conf(dante))
    run = Running("stunnel+dante", socks, forks=True)
    try:
        proc = _popen(
            [danted, "-f", str(dante_conf), "-p", str(work.path / "danted.pid")],
            work.path / "danted.log",
            # its lock and shared-memory files go to TMPDIR: keep them in the work directory
            dict(os.environ, TMPDIR=str(work.path)),
            session=True,
        )
        run.procs.append(proc)
        run.groups.append(proc)
        wait_port(dante, proc)
        server = _popen([stunnel, str(server_conf)], work.path / "stunnel-server.log")
        run.procs.append(server)
        wait_port(tls, server)
        client = _popen([stunnel, str(client_conf)], work.path / "stunnel-client.log")
        run.procs.append(client)
        wait_port(socks, client)
    except BaseException:
        run.stop()
        raise
    return run


# -- UDP relays ---------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def udp_bound(port: int) -> bool:
    """Whether something has bound UDP 127.0.0.1:``port`` (from /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want for line in lines if len(line.split()) > 1)


def wait_udp(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(exit_report(proc))
        if udp_bound(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing bound UDP 127.0.0.1:{port} after {timeout} s")


def find_socat() -> str | None:
    return os.environ.get("BENCH_SOCAT") or shutil.which("socat")


def socat_version(binary: str) -> str:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("socat version"):
            return " ".join(line.split()[:3])
    return "?"


#: The socket buffers autovpn's UDP relay asks for (``autovpn/udp_io.py``: UDP_BUFFER).
UDP_BUFFER: Final = 8 << 20


def socat_buffer_options(size: int = UDP_BUFFER) -> tuple[str, str]:
    """socat's options for the buffers autovpn's relay gives itself (``udp_io.enlarge_buffers``):
    ``size`` bytes, forced past ``net.core.rmem_max`` when we are root, else capped by it.

    With the default 208 KiB a 1 ms burst at the higher rates overflows the buffer, which would
    measure the buffer, not the relay.  Returns the options of the listening side and of the
    side that sends to the target.  socat's ``rcvbuf`` cannot force; ``setsockopt-listen``
    sets the listening socket (which its per-peer child keeps) with SO_RCVBUFFORCE/SNDBUFFORCE.
    """
    plain = f"rcvbuf={size},sndbuf={size}"
    if sys.platform != "linux" or os.geteuid() != 0:
        return plain, plain
    value = struct.pack("=i", size).hex()  # socat's binary form: native-endian int
    return f"setsockopt-listen=1:33:x{value},setsockopt-listen=1:32:x{value}", plain


def start_socat_udp(work: Workdir, target_port: int, binary: str = "socat") -> Running:
    """``socat UDP4-LISTEN:P,bind=127.0.0.1,fork,reuseaddr UDP4:127.0.0.1:T`` in its own
    session, stopped by process group (its per-peer fork child goes with it)."""
    port = free_udp_port()
    run = Running("socat", None, udp_port=port)
    listen_buffers, target_buffers = socat_buffer_options()
    proc = _popen(
        [
            binary,
            f"UDP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,{listen_buffers}",
            f"UDP4:127.0.0.1:{target_port},{target_buffers}",
        ],
        work.path / "socat.log",
        session=True,
    )
    run.procs.append(proc)
    run.groups.append(proc)
    try:
        wait_udp(port, proc)
    except BaseException:
        run.stop()
        raise
    return run


def start_autovpn_udp(work: Workdir, target_port: int) -> Running:
    """``autovpn client -L 'udp://127.0.0.1:P:127.0.0.1:T?timeout_sec=0' wss://…`` →
    ``autovpn server wss://… --allow 127.0.0.0/8`` (two processes, as for the TCP chain)."""
    port = free_udp_port()
    run = Running("autovpn", None, udp_port=port)
    try:
        listen = f"udp://127.0.0.1:{port}:127.0.0.1:{target_port}?timeout_sec=0"
        _, client = _start_autovpn_pair(work, run, listen, "autovpn-udp")
        wait_udp(port, client)
    except BaseException:
        run.stop()
        raise
    return run
