"""Taken ports: the error names the process holding the port (here: this test process, which
holds it with a plain socket) and suggests no flag the command lacks; ``auto_port`` binds the
next free port and everything that reports the port (status, PAC, banner) says that one."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from autovpn.config import RoutingConfig
from autovpn.engine import Engine
from autovpn.errors import BindError
from autovpn.monitor.api import request
from tests.conftest import Certs, engine_config, run
from tests.test_cli import clean_env, port_free, run_cli

linux_only = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="the holder is read from Linux /proc"
)


@contextmanager
def held(kind: int = socket.SOCK_STREAM, port: int = 0) -> Iterator[int]:
    """A port on 127.0.0.1 held by this process (listening, for TCP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            s.listen(1)
        yield s.getsockname()[1]


@linux_only
def test_the_holder_of_a_port_is_this_process() -> None:
    from autovpn.ports import port_holder

    for kind, udp in ((socket.SOCK_STREAM, False), (socket.SOCK_DGRAM, True)):
        with held(kind) as port:
            holder = port_holder(port, udp=udp)
            assert holder is not None and holder.pid == os.getpid()
            assert "python" in holder.name
            assert str(holder) == f"pid {os.getpid()} ({holder.name})"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert port_holder(free) is None


@linux_only
def test_a_taken_listener_port_names_its_holder(certs: Certs) -> None:
    async def main() -> None:
        with held() as port:
            cfg = engine_config(certs)
            cfg.control = None
            cfg.client.listen[0] = cfg.client.listen[0].__class__("socks5", "127.0.0.1", port)  # type: ignore[union-attr]
            with pytest.raises(BindError) as info:
                async with Engine(cfg):
                    pass
            text = str(info.value)
            assert f"socks5 listener cannot bind 127.0.0.1:{port}" in text
            assert f"port in use by pid {os.getpid()} (" in text
            assert "-L" not in text  # the engine cannot know the command's flags

    run(main())


def test_auto_port_binds_the_next_free_port_and_reports_it(certs: Certs) -> None:
    async def main() -> None:
        with held() as socks, held() as control:
            cfg = engine_config(certs)
            cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
            cfg.client.listen[0] = cfg.client.listen[0].__class__("socks5", "127.0.0.1", socks)  # type: ignore[union-attr]
            cfg.control = f"127.0.0.1:{control}"
            cfg.auto_port = True
            async with Engine(cfg) as eng:
                assert eng.api is not None
                bound = eng.listeners[0].bound_port
                assert socks < bound <= socks + 20
                assert control < eng.api.bound_port <= control + 20
                http = eng.listeners[1].bound_port
                st = (await request(eng.api.url, "GET", "/status")).json()
                assert {"kind": "socks5", "host": "127.0.0.1", "port": bound} in st["listeners"]
                pac = (await request(eng.api.url, "GET", "/proxy.pac")).body.decode()
                assert f"SOCKS5 127.0.0.1:{bound}" in pac and f"127.0.0.1:{socks};" not in pac
                assert f"PROXY 127.0.0.1:{http}" in pac
                banner = "\n".join(eng.describe())
                assert f"127.0.0.1:{bound}" in banner
                assert f":{eng.api.bound_port}" in banner

    run(main())


# -- the command line: only flags the command has (client: tests/test_cli.py) -------------------


def test_embedded_default_suggests_no_flag_it_lacks(tmp_path: Path) -> None:
    """The embedded default has no -L: the hint is --auto-port, which it has; with it, the
    next free port is bound and the banner says which."""
    if not port_free(1080):
        pytest.skip("127.0.0.1:1080 is in use here")
    env = clean_env(tmp_path)

    async def main() -> None:
        with socket.socket() as taken:
            try:
                taken.bind(("127.0.0.1", 1080))
            except OSError:
                pytest.skip("127.0.0.1:1080 was taken meanwhile")
            taken.listen(1)
            rc, out, err = await run_cli(env=env)
            assert rc == 1, (out, err)
            assert "cannot bind 127.0.0.1:1080" in err and "Traceback" not in err
            if sys.platform == "linux":
                assert f"pid {os.getpid()}" in err
            assert "-L" not in err and "--auto-port" in err
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "autovpn",
                "--auto-port",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
            try:
                assert proc.stdout is not None
                banner = ""
                async with asyncio.timeout(30):
                    while "Stop with" not in banner:
                        line = (await proc.stdout.readline()).decode()
                        assert line, banner
                        banner += line
                assert "socks5 proxy   127.0.0.1:1080" not in banner, banner
                assert "socks5 proxy   127.0.0.1:10" in banner, banner
            finally:
                proc.terminate()
                await proc.communicate()

    run(main())


@linux_only
def test_a_port_held_by_an_engine_of_the_same_state_directory_says_so(
    tmp_path: Path, certs: Certs
) -> None:
    """Started twice: the second names the first (its role, URL and how to stop it) and
    stops nothing itself."""
    from tests.conftest import SECRET, free_port
    from tests.test_cli import _engine_toml, autovpn

    env = clean_env(
        tmp_path, AUTOVPN_STATE_DIR=str(tmp_path / "state"), AUTOVPN_SECRET=SECRET.decode()
    )
    config = _engine_toml(tmp_path, certs, free_port())

    async def main() -> None:
        async with autovpn("--config", str(config), env=env, ready="control api") as first:
            rc, out, err = await run_cli("--config", str(config), env=env)
            assert rc == 1, (out, err)
            assert f"port in use by pid {first.pid} (" in err
            assert "this state directory's embedded engine (http://127.0.0.1:" in err
            assert f"kill -TERM {first.pid}" in err
            assert first.returncode is None

    run(main())
