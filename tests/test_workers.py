"""``autovpn server --workers N``: N processes on one address (SO_REUSEPORT), one supervisor.

Real processes throughout: the server is ``python -m autovpn server`` with its workers, the
client an engine in this process.  The supervisor's rules (back-off, how many workers) are
pure functions, tested as such.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from autovpn import reuseport
from autovpn.config import ServerURL, parse_config
from autovpn.engine import Engine
from autovpn.monitor.api import request
from autovpn.workers import Backoff, FleetTotals, plan
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    engine_config,
    env_without_proxies,
    eventually,
    free_port,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.monitor.test_metrics import Samples, key, samples
from tests.server_process import ServerProcess, autovpn_server

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers need Linux's SO_REUSEPORT"
)


# -- the rules ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_stable_run() -> None:
    b = Backoff(first=0.5, most=4.0, stable=10.0)
    assert [b.delay(0.1) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(10.0) == 0.5  # it ran long enough: the crash was not a loop
    assert b.delay(0.2) == 1.0


def _config(tmp_path: Path, server: dict[str, Any], client: bool = False) -> Any:
    (tmp_path / "secret").write_bytes(SECRET)
    doc: dict[str, Any] = {"server": {"secret_file": "secret", **server}}
    if client:
        doc["client"] = {"server": "wss://127.0.0.1:8443", "secret_file": "secret"}
    cfg, errors = parse_config(doc, tmp_path)
    assert errors == []
    return cfg


def test_how_many_processes_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr("autovpn.workers.cpu_count", lambda: 8)
    listen = {"listen": "ws://127.0.0.1:8080"}
    assert plan(_config(tmp_path, listen)) == (8, None)  # default: one per core
    assert plan(_config(tmp_path, {**listen, "workers": 3})) == (3, None)
    assert plan(_config(tmp_path, {**listen, "workers": 1})) == (1, None)
    # An engine with a client is one process; said only when workers were asked for.
    assert plan(_config(tmp_path, listen, client=True)) == (1, None)
    count, note = plan(_config(tmp_path, {**listen, "workers": 2}, client=True))
    assert count == 1 and note is not None and "client" in note
    on_port_0 = _config(tmp_path, {**listen, "workers": 2})
    on_port_0.server.listen = ServerURL(False, "127.0.0.1", 0)
    count, note = plan(on_port_0)
    assert count == 1 and note is not None and "port 0" in note
    # No SO_REUSEPORT that spreads connections: one process, and the start says so.
    monkeypatch.setattr(sys, "platform", "darwin")
    count, note = plan(_config(tmp_path, {**listen, "workers": 4}))
    assert count == 1 and note is not None and "darwin" in note
    assert plan(_config(tmp_path, listen)) == (1, None)


def test_the_workers_key_is_checked(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    doc = {"server": {"listen": "ws://127.0.0.1:8080", "secret_file": "secret", "workers": 0}}
    _, errors = parse_config(doc, tmp_path)
    assert [(e.key, e.reason) for e in errors] == [("server.workers", "must be between 1 and 256")]


def _worker_status(opened: int, conns: int, up: int, is_open: int = 0) -> dict[str, Any]:
    """A worker's /status, as much of it as the sums read."""
    figures = {"open": is_open, "total": opened, "bytes_up": up, "bytes_down": 2 * up}
    return {
        "server": {
            "connections": conns,
            "streams_open": is_open,
            "streams_opened": opened,
            "udp": {"datagrams_in": opened},
            "x": None,
        },
        "stats": {
            "since": 1.0,
            "listeners": {"tunnel": {**figures, "failures": {"connection_refused": 1}}},
            "users": {"default": {**figures, "failures": {}}},
            "routes": {},
            "servers": {},
            "domains": {},
            "open": is_open,
            "connections": [{"host": f"h{opened}", "bytes_up": up, "bytes_down": 0}],
            "recent_failures": [{"time": float(opened), "reason": "connection_refused"}],
            "health": {},
        },
    }


def test_the_sums_of_the_workers_counters_never_go_down() -> None:
    """A worker that does not answer keeps its counters in the sums (not its levels); one
    that dies keeps the counters last seen of it; its replacement starts from 0."""
    fleet = FleetTotals(clock=lambda: 100.0)
    a, b = _worker_status(3, 2, 1000, is_open=1), _worker_status(5, 4, 500)
    fleet.seen(0, 11, a)
    fleet.seen(1, 22, b)
    server, stats = fleet.sums([a, b])
    assert server == {
        "connections": 6,
        "streams_open": 1,
        "streams_opened": 8,
        "udp": {"datagrams_in": 8},
    }
    assert stats is not None and stats["since"] == 100.0
    assert stats["listeners"]["tunnel"] == {
        "open": 1,
        "total": 8,
        "bytes_up": 1500,
        "bytes_down": 3000,
        "failures": {"connection_refused": 2},
    }
    assert [c["worker"] for c in stats["connections"]] == [0, 1]  # the busiest first
    assert [f["worker"] for f in stats["recent_failures"]] == [0, 1]  # the oldest first
    # Worker 1 does not answer this time: its counts stay, its open connections do not.
    server, stats = fleet.sums([a, None])
    assert (server["streams_opened"], server["connections"]) == (8, 2)
    assert stats is not None and stats["users"]["default"]["bytes_up"] == 1500
    # Worker 0 dies; its replacement starts from nothing.
    fleet.exited(0, 11)
    fleet.exited(0, 99)  # not the process it knows: nothing happens
    fresh = _worker_status(0, 0, 0)
    fleet.seen(0, 12, fresh)
    server, stats = fleet.sums([fresh, b])
    assert (server["streams_opened"], server["connections"], server["streams_open"]) == (8, 4, 0)
    assert stats is not None and stats["listeners"]["tunnel"]["total"] == 8
    assert stats["listeners"]["tunnel"]["open"] == 0
    # Every worker gone at once: the counters stay, the levels are 0 (not missing).
    fleet.exited(0, 12)
    fleet.exited(1, 22)
    server, stats = fleet.sums([None, None])
    assert server == {
        "connections": 0,
        "streams_open": 0,
        "streams_opened": 8,
        "udp": {"datagrams_in": 8},
    }
    assert stats is not None and stats["users"]["default"]["open"] == 0
    assert stats["users"]["default"]["bytes_down"] == 3000
    # Statistics off in the workers: no ``stats`` in the sums either.
    bare = {"server": {"connections": 1}, "stats": None}
    assert FleetTotals().sums([bare]) == ({"connections": 1, "streams_open": 0}, None)


# -- real processes --------------------------------------------------------------------------


def _exists(pid: int) -> bool:
    """The process is there (running, or a zombie nobody reaped)."""
    return Path(f"/proc/{pid}").exists()


def _reap(pid: int, block: bool = False) -> int | None:
    """Reap a child of this process: its wait status, or None while it runs."""
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return status if done else None


def _parent_of(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2 :].split()[1])


async def _echo_through(eng: Engine, echo: int) -> None:
    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
    try:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
    finally:
        writer.close()


async def _cli_status(state: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autovpn",
        "status",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env_without_proxies(), AUTOVPN_STATE_DIR=str(state)),
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


async def _scrape(server: ServerProcess) -> Samples:
    """The supervisor's /metrics, read by prometheus_client's own parser."""
    async with asyncio.timeout(20):
        reply = await request(server.control, "GET", "/metrics")
    assert reply.status == 200, reply
    return samples(reply.body.decode())


async def _scrape_until(server: ServerProcess, name: str, value: float, **labels: str) -> Samples:
    """Scrapes until ``name{labels}`` reads ``value`` (the workers count a stream's bytes as
    they move, and its end a moment after the client's)."""
    got: Samples = {}
    async with asyncio.timeout(30):
        while got.get(key(name, **labels)) != value:
            got = await _scrape(server)
            await asyncio.sleep(0.05)
    return got


async def _connections_per_worker(server: ServerProcess, total: int) -> list[int]:
    """Each worker's tunnel connections, once every worker answered and they add up to
    ``total``."""
    status: dict[str, Any] = {}
    async with asyncio.timeout(30):
        while True:
            status = await server.status()
            answered = all("error" not in w for w in status["workers"])
            if answered and status["server"].get("connections") == total:
                break
            await asyncio.sleep(0.1)
    return [w["server"]["connections"] for w in status["workers"]]


@linux_only
@pytest.mark.parametrize("steer_by", ["connection", "address"])
def test_two_workers_share_the_port_and_a_pool_lands_as_steered(
    certs: Certs, tmp_path: Path, steer_by: str
) -> None:
    """By connection: 16 pool connections from distinct source ports land on both of two
    workers (all on one with probability 2 x 2^-16).  By address (the default): all on the
    worker of 127.0.0.1's slot."""
    pool = 16

    async def main() -> None:
        async with (
            autovpn_server(certs, tmp_path, "--workers", "2", "--steer-by", steer_by) as server,
            tcp_server(echo_handler) as echo,
        ):
            pids = server.worker_pids
            assert len(pids) == 2 and server.pid not in pids
            assert [_parent_of(p) for p in pids] == [server.pid, server.pid]
            # What each worker would say at start, worker 0 says once for all.
            assert server.text().count("tunnel server listening on") == 1, server.text()
            assert f"SO_REUSEPORT, by client {steer_by}; worker pids" in server.text()
            cfg = engine_config(certs, server=False, server_port=server.port, pool_size=pool)
            async with Engine(cfg) as eng:
                per_worker = await _connections_per_worker(server, pool)
                assert sum(per_worker) == pool, per_worker
                if steer_by == "connection":
                    assert min(per_worker) >= 1, per_worker
                else:
                    home = reuseport.slot("127.0.0.1", 0, 2)
                    assert per_worker[home] == pool, per_worker
                status = await server.status()
                assert [w["pid"] for w in status["workers"]] == pids
                assert status["steering"] == f"by client {steer_by}"
                # One stream at a time takes each connection in turn: the 16 streams ran on
                # the 16 connections, so each worker opened one per connection it holds.
                for _ in range(pool):
                    await _echo_through(eng, echo)
                opened = await server.status()
                assert all("error" not in w for w in opened["workers"]), opened
                assert opened["server"]["streams_opened"] == pool
                per_stream = [w["server"]["streams_opened"] for w in opened["workers"]]
                assert per_stream == per_worker, opened
                # `autovpn status` shows the sums and each worker.
                shown = await _cli_status(tmp_path / "server-state")
                assert f"server: {pool} tunnel connections" in shown, shown
                for index, pid in enumerate(pids):
                    assert f"worker {index} (pid {pid}, 0 restarts)" in shown, shown

    run(main())


@linux_only
def test_a_dead_worker_is_started_again(certs: Certs, tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            autovpn_server(certs, tmp_path, "--workers", "2") as server,
            tcp_server(echo_handler) as echo,
        ):
            first, second = server.worker_pids
            cfg = engine_config(certs, server=False, server_port=server.port, pool_size=4)
            async with Engine(cfg) as eng:
                os.kill(first, signal.SIGKILL)
                # The supervisor reaps it and starts another after its back-off (0.5 s).
                status: dict[str, Any] = {}
                async with asyncio.timeout(30):
                    while True:
                        status = await server.status()
                        w0 = status["workers"][0]
                        if w0["pid"] not in (first, None) and "error" not in w0:
                            break
                        await asyncio.sleep(0.1)
                assert w0["restarts"] == 1
                assert status["workers"][1]["pid"] == second
                assert not _exists(first)  # reaped, not a zombie
                assert f"worker 0 (pid {first}) exited with signal 9" in server.text()
                # The client's connections to the dead worker came back (on either worker).
                await eventually(lambda: eng.tunnel is not None and eng.tunnel.up, within=20)
                await _connections_per_worker(server, 4)
                for _ in range(4):
                    await _echo_through(eng, echo)

    run(main())


@linux_only
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_to_the_supervisor_stops_every_worker(
    certs: Certs, tmp_path: Path, sig: int, code: int
) -> None:
    async def main() -> None:
        async with (
            autovpn_server(certs, tmp_path, "--workers", "2") as server,
            tcp_server(echo_handler) as echo,
        ):
            pids = server.worker_pids
            cfg = engine_config(certs, server=False, server_port=server.port, pool_size=2)
            async with Engine(cfg) as eng:
                await _echo_through(eng, echo)
                server.proc.send_signal(sig)
                async with asyncio.timeout(30):
                    assert await server.proc.wait() == code, server.text()
                # The supervisor waited for its workers: none is left, not even as a zombie.
                assert not any(_exists(p) for p in pids), server.text()
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", server.port)) != 0
                assert "Traceback" not in server.text()

    run(main())


_PR_SET_CHILD_SUBREAPER = 36


@linux_only
def test_a_killed_supervisor_leaves_no_worker_serving(certs: Certs, tmp_path: Path) -> None:
    """SIGKILL cannot be passed on: each worker asked the kernel to kill it with its parent
    (PR_SET_PDEATHSIG).  This test process becomes the workers' reaper meanwhile (a child
    subreaper), so that it can see them exit and reap them (PID 1 here reaps no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)

    async def main() -> None:
        assert libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        left: list[int] = []
        try:
            async with autovpn_server(certs, tmp_path, "--workers", "2") as server:
                left = server.worker_pids
                server.proc.kill()
                await server.proc.wait()
                deadline = time.monotonic() + 15
                while left and time.monotonic() < deadline:
                    for pid in list(left):
                        status = _reap(pid)
                        if status is not None:
                            assert os.WIFSIGNALED(status), status
                            assert os.WTERMSIG(status) == signal.SIGKILL
                            left.remove(pid)
                    await asyncio.sleep(0.05)
                assert left == [], "workers outlived their supervisor"
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", server.port)) != 0
        finally:
            for pid in left:  # the failure case: do not leave them running
                os.kill(pid, signal.SIGKILL)
                _reap(pid, block=True)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    run(main())


@linux_only
def test_a_taken_port_fails_the_start(certs: Certs, tmp_path: Path) -> None:
    """Another program holds the port (without SO_REUSEPORT): the supervisor, which opens
    the workers' sockets, cannot bind it and exits with the error (naming the holder) before
    any worker starts."""
    port = free_port()

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            with pytest.raises(AssertionError, match="exited before it was ready") as failed:
                async with autovpn_server(certs, tmp_path, "--workers", "2", port=port):
                    pass
        text = str(failed.value)
        assert f"tunnel server cannot bind 127.0.0.1:{port}: port in use by pid {os.getpid()}" in (
            text
        ), text
        assert "worker" not in text, text

    run(main())


@linux_only
def test_the_supervisors_metrics_sum_the_workers_across_a_restart(
    certs: Certs, tmp_path: Path
) -> None:
    """A scraper pointed at ``server --workers 2`` sees the families a single server has,
    summed over the workers (and per worker); a worker killed and started again takes its
    open connections away but not its counts: no summed counter goes down."""
    pool = 16
    sizes = [1000 + 100 * i for i in range(pool)]

    async def main() -> None:
        async with (
            # One client address: steered by connection, or its pool would all be on one worker.
            autovpn_server(
                certs, tmp_path, "--workers", "2", "--steer-by", "connection"
            ) as server,
            tcp_server(echo_handler) as echo,
        ):
            cfg = engine_config(certs, server=False, server_port=server.port, pool_size=pool)
            async with Engine(cfg) as eng:
                per_worker = await _connections_per_worker(server, pool)
                assert min(per_worker) >= 1, per_worker  # both workers carry traffic
                for size in sizes:  # one stream on each pool connection in turn
                    reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                    writer.write(b"z" * size)
                    await reader.readexactly(size)
                    writer.close()
                    await writer.wait_closed()
                sent = sum(sizes)
                got = await _scrape_until(
                    server, "autovpn_listener_connections_open", 0, listener="tunnel"
                )
                got = await _scrape_until(
                    server, "autovpn_user_bytes_total", sent, user="default", direction="down"
                )
                assert got[key("autovpn_info", mode="global", version="0.1.0")] == 1
                tunnel = {"listener": "tunnel"}
                user = {"user": "default"}
                assert got[key("autovpn_listener_connections_total", **tunnel)] == pool
                for way in ("up", "down"):
                    assert got[key("autovpn_listener_bytes_total", direction=way, **tunnel)] == sent
                    assert got[key("autovpn_user_bytes_total", direction=way, **user)] == sent
                assert got[key("autovpn_user_connections_total", **user)] == pool
                assert got[key("autovpn_server_streams_opened_total")] == pool
                assert got[key("autovpn_server_tunnel_connections")] == pool

                # Per worker: each answered, the parts add up to the sums.
                def each(name: str, **labels: str) -> list[float]:
                    return [got[key(name, worker=w, **labels)] for w in ("0", "1")]

                assert each("autovpn_worker_up") == [1, 1]
                assert each("autovpn_worker_restarts_total") == [0, 0]
                # One stream per pool connection: each worker opened as many as it holds.
                assert each("autovpn_worker_streams_opened_total") == per_worker
                assert each("autovpn_worker_tunnel_connections") == per_worker
                moved = each("autovpn_worker_bytes_total", direction="up")
                assert sum(moved) == sent and min(moved) > 0

                # Worker 0 dies, and is started again (its back-off is 0.5 s).
                first = server.worker_pids[0]
                os.kill(first, signal.SIGKILL)
                async with asyncio.timeout(30):
                    while True:
                        status = await server.status()
                        w0 = status["workers"][0]
                        if w0["pid"] not in (first, None) and "error" not in w0:
                            break
                        await asyncio.sleep(0.1)
                after = await _scrape(server)
                assert after[key("autovpn_worker_restarts_total", worker="0")] == 1
                assert after[key("autovpn_worker_streams_opened_total", worker="0")] == 0
                for name, labels in (
                    ("autovpn_listener_connections_total", tunnel),
                    ("autovpn_listener_bytes_total", {"direction": "up", **tunnel}),
                    ("autovpn_user_bytes_total", {"direction": "down", "user": "default"}),
                    ("autovpn_server_streams_opened_total", {}),
                ):
                    assert after[key(name, **labels)] == got[key(name, **labels)], name
                # /status says the same as /metrics.
                assert status["server"]["streams_opened"] == pool
                assert status["stats"]["listeners"]["tunnel"]["bytes_up"] == sent

                # Traffic after the restart adds to the sums.
                await eventually(lambda: eng.tunnel is not None and eng.tunnel.up, within=20)
                await _connections_per_worker(server, pool)
                for _ in range(4):
                    await _echo_through(eng, echo)  # 4 bytes each way
                got = await _scrape_until(
                    server, "autovpn_listener_bytes_total", sent + 16, direction="down", **tunnel
                )
                assert got[key("autovpn_listener_connections_total", **tunnel)] == pool + 4
                assert got[key("autovpn_server_streams_opened_total")] == pool + 4

    run(main())
