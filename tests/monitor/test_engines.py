"""One state file per running engine (``engines/<role>-<host>-<port>.json`` and its 0600
token) in the state directory, and how the CLI picks the engine it talks to: the only one,
the one ``--role`` or ``--control`` names, the one client for read-only commands, else it
lists them and asks (exit 2)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from autovpn.cli import main
from autovpn.config import Config, RoutingConfig, state_dir
from autovpn.engine import Engine
from autovpn.routing.router import Mode
from tests.conftest import Certs, engine_config, run


def _quiet(cfg: Config) -> Config:
    cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
    cfg.control = "127.0.0.1:0"
    return cfg


@asynccontextmanager
async def server_and_client(certs: Certs) -> AsyncIterator[tuple[Engine, Engine]]:
    """A server-only engine and a client-only engine that uses it, one state directory."""
    async with AsyncExitStack() as stack:
        server_cfg = _quiet(engine_config(certs))
        server_cfg.client = None
        server = await stack.enter_async_context(Engine(server_cfg))
        assert server.server is not None
        client_cfg = _quiet(engine_config(certs, server=False, server_port=server.server.port))
        client_cfg.mode = Mode.GLOBAL
        client = await stack.enter_async_context(Engine(client_cfg))
        yield server, client


def engines_dir() -> Path:
    return state_dir() / "engines"


def records() -> dict[str, dict[str, object]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(engines_dir().glob("*.json"))}


def test_a_server_and_a_client_on_one_machine_each_keep_their_own_state(certs: Certs) -> None:
    async def main_() -> None:
        async with server_and_client(certs) as (server, client):
            assert server.api is not None and client.api is not None
            found = records()
            names = {
                f"server-127.0.0.1-{server.api.bound_port}.json": (server, "server"),
                f"client-127.0.0.1-{client.api.bound_port}.json": (client, "client"),
            }
            assert set(found) == set(names)
            tokens = set()
            for name, (eng, role) in names.items():
                rec = found[name]
                assert eng.api is not None
                assert rec["url"] == eng.api.url and rec["pid"] == os.getpid()
                assert rec["role"] == role and isinstance(rec["started"], float)
                token_path = engines_dir() / str(rec["token_file"])
                assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
                tokens.add(token_path.read_text().strip())
            assert len(tokens) == 2  # one token per engine
            assert not (state_dir() / "control.json").exists()
            assert not (state_dir() / "control.token").exists()
        assert list(engines_dir().iterdir()) == []  # both removed at close

    run(main_())


def test_the_cli_picks_the_engine_or_asks_which(
    certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    async def main_() -> None:
        async with server_and_client(certs) as (server, client):
            assert server.api is not None and client.api is not None
            # Read-only: the one client is preferred.
            rc, out, err = await cli("status", "--json")
            assert rc == 0, err
            assert json.loads(out)["control"] == client.api.url
            rc, out, err = await cli("status", "--json", "--role", "server")
            assert rc == 0 and json.loads(out)["control"] == server.api.url, err
            # A change needs a choice: both are listed, with the way to choose.
            rc, out, err = await cli("mode", "smart")
            assert rc == 2, (out, err)
            assert server.api.url in err and client.api.url in err
            assert "--role" in err and "--control" in err
            assert (server.mode, client.mode) == (Mode.GLOBAL, Mode.GLOBAL)
            rc, out, err = await cli("mode", "smart", "--role", "client")
            assert rc == 0 and "mode global -> smart" in out, err
            assert (server.mode, client.mode) == (Mode.GLOBAL, Mode.SMART)
            # --control names one, and its token is found for it.
            rc, out, err = await cli("mode", "direct", "--control", server.api.url)
            assert rc == 0, err
            assert (server.mode, client.mode) == (Mode.DIRECT, Mode.SMART)
        # Only the client left running: it is the only one, for every command.
        async with server_and_client(certs) as (server, client):
            await server.close()
            rc, out, err = await cli("mode", "direct")
            assert rc == 0 and client.mode is Mode.DIRECT, err

    run(main_())


def test_stale_state_files_are_ignored_and_removed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    engines_dir().mkdir(parents=True)
    stale = engines_dir() / "client-127.0.0.1-1.json"
    stale.write_text(
        json.dumps(
            {
                "url": "http://127.0.0.1:1",
                "pid": pid,
                "role": "client",
                "started": 0.0,
                "token_file": "client-127.0.0.1-1.token",
            }
        )
    )
    (engines_dir() / "client-127.0.0.1-1.token").write_text("old\n")
    dead_control = tmp_path / "c.toml"
    dead_control.write_text('control = "127.0.0.1:1"\n')
    assert main(["--config", str(dead_control), "mode"]) == 1
    assert "no running engine" in capsys.readouterr().err
    assert list(engines_dir().iterdir()) == []
