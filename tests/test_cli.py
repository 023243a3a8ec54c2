"""The command line as a user runs it: ``python -m autovpn`` in subprocesses, curl through it,
Ctrl-C, config checking and start-up errors.

Every process is waited for (in a container, PID 1 may reap no orphans); SIGINT is what a
terminal sends on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import SECRET, Certs, curl, env_without_proxies, free_port, run
from tests.http_origin import http_origin

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = env_without_proxies()
    env.pop("AUTOVPN_STATE_DIR", None)
    env.pop("AUTOVPN_SECRET", None)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env["XDG_STATE_HOME"] = str(home / ".state")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@asynccontextmanager
async def autovpn(
    *args: str, env: dict[str, str], ready: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``python -m autovpn ARGS`` until a line containing ``ready`` appears on its stdout
    or stderr; on exit, Ctrl-C it if still running and always wait for it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autovpn",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError("autovpn exited before it was ready:\n" + "".join(seen))
                seen.append(line)
                if ready in line:
                    break
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(15):
                    await proc.communicate()
            except TimeoutError:
                proc.kill()
        await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Ctrl-C, then (exit code, the rest of the output)."""
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autovpn",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- the embedded default ------------------------------------------------------------------


@needs_curl
@posix_only
def test_no_arguments_runs_the_embedded_default(tmp_path: Path) -> None:
    busy = [p for p in (1080, 8080) if not port_free(p)]
    if busy:
        pytest.skip(f"127.0.0.1 port(s) {busy} in use here (CI runs in its own network namespace)")
    env = clean_env(tmp_path)

    async def main() -> None:
        with http_origin() as origin:
            url = f"http://127.0.0.1:{origin.port}/hello"
            async with autovpn(env=env, ready="Stop with Ctrl-C") as proc:
                for proxy in ("socks5h://127.0.0.1:1080", "http://127.0.0.1:8080"):
                    rc, out, err = await curl("-x", proxy, url)
                    assert (rc, out) == (0, "hello /hello"), err
                code, rest = await stop(proc)
            assert code in (0, 130), rest
            assert "Traceback" not in rest
        state = Path(env["XDG_STATE_HOME"]) / "autovpn"
        assert (state / "embedded-tls" / "ca.pem").is_file()

    run(main())


# --- server and client ---------------------------------------------------------------------


@needs_curl
@posix_only
def test_server_and_client_processes(tmp_path: Path, certs: Certs) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    server_port, socks, http, reverse = free_port(), free_port(), free_port(), free_port()

    async def main() -> None:
        with http_origin() as origin:
            server_env = clean_env(tmp_path, AUTOVPN_SECRET=SECRET.decode())
            server_args = [
                "server",
                f"wss://127.0.0.1:{server_port}",
                "--tls-certificate",
                str(certs.cert),
                "--tls-private-key",
                str(certs.key),
                "--allow",
                "127.0.0.0/8",
            ]
            client_args = [
                "client",
                "-L",
                f"socks5://127.0.0.1:{socks}",
                "-L",
                f"http://127.0.0.1:{http}?login=alice&password=s3cret",
                "--tls-ca",
                str(certs.ca),
                "--secret-file",
                str(secret_file),
                "--mode",
                "global",
                "-R",
                f"tcp://127.0.0.1:{reverse}:127.0.0.1:{origin.port}",
                f"wss://127.0.0.1:{server_port}",
            ]
            async with (
                autovpn(*server_args, env=server_env, ready="listening") as server,
                autovpn(*client_args, env=clean_env(tmp_path), ready="is up") as client,
            ):
                url = f"http://127.0.0.1:{origin.port}/hello"
                rc, out, err = await curl("-x", f"socks5h://127.0.0.1:{socks}", url)
                assert (rc, out) == (0, "hello /hello"), err
                rc, out, err = await curl("-x", f"http://alice:s3cret@127.0.0.1:{http}", url)
                assert (rc, out) == (0, "hello /hello"), err
                # -R: the server listens on `reverse`; connections come back to the origin
                for _ in range(50):
                    rc, out, err = await curl(f"http://127.0.0.1:{reverse}/hello")
                    if rc == 0:
                        break
                    await asyncio.sleep(0.1)
                assert (rc, out) == (0, "hello /hello"), err
                for proc in (client, server):
                    code, rest = await stop(proc)
                    assert code in (0, 130) and "Traceback" not in rest, rest

    run(main())


# --- configuration errors ------------------------------------------------------------------


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'mode = "sideways"\n'
        'log_level = "loud"\n'
        "[client]\n"
        'server = "ftp://example.net"\n'
        'listen = ["gopher://127.0.0.1:70"]\n'
        "pool_size = -1\n"
    )
    good = tmp_path / "good.toml"
    good.write_text(
        'mode = "global"\n'
        "[client]\n"
        'server = "wss://vpn.example.net:443"\n'
        'listen = ["socks5://127.0.0.1:1080"]\n'
        'secret_file = "secret"\n'
    )
    (tmp_path / "secret").write_bytes(SECRET)
    env = clean_env(tmp_path)

    async def main() -> None:
        rc, out, err = await run_cli("check-config", str(bad), env=env)
        assert rc == 1
        for key in ("mode", "log_level", "client.server", "client.listen", "client.pool_size"):
            assert f": {key}" in err, (key, err)
        assert "Traceback" not in err
        rc, out, err = await run_cli("check-config", str(good), env=env)
        assert (rc, err) == (0, ""), err
        assert "OK" in out

    run(main())


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('mode = "global"\n[client\nserver = "wss://x:1"\n')
    env = clean_env(tmp_path)

    async def main() -> None:
        for args in (["check-config", str(broken)], ["--config", str(broken)]):
            rc, out, err = await run_cli(*args, env=env)
            assert rc != 0
            assert "line 2" in err, err
            assert "Traceback" not in err

    run(main())


@posix_only
def test_taken_port_is_one_clear_line(tmp_path: Path, certs: Certs) -> None:
    env = clean_env(tmp_path, AUTOVPN_SECRET=SECRET.decode())

    async def main() -> None:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            rc, out, err = await run_cli(
                "client",
                "-L",
                f"socks5://127.0.0.1:{port}",
                "--tls-ca",
                str(certs.ca),
                f"wss://127.0.0.1:{free_port()}",
                env=env,
            )
        finally:
            holder.close()
        assert rc != 0
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("autovpn:")]
        assert len(errors) == 1, err
        assert f"127.0.0.1:{port}" in errors[0]
        # The holder (this test process) where /proc shows it; the remedies client has.
        named = f"pid {os.getpid()} (" if sys.platform == "linux" else "another program"
        assert f"port in use by {named}" in errors[0], errors[0]
        assert "-L" in errors[0] and "--auto-port" in errors[0]

    run(main())


def test_keepalive_flags_on_client_and_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from autovpn import cli
    from autovpn.config import Config
    from autovpn.errors import ConfigError

    monkeypatch.setenv("AUTOVPN_SECRET", SECRET.decode())
    cfg = Config()
    args = cli._parser().parse_args(
        ["client", "--keepalive-interval", "0.5", "--keepalive-timeout", "2", "wss://127.0.0.1:1"]
    )
    cli._client_from_args(args, cfg)
    assert cfg.client is not None
    assert (cfg.client.keepalive_interval, cfg.client.keepalive_timeout) == (0.5, 2.0)
    args = cli._parser().parse_args(["server", "ws://127.0.0.1:0", "--keepalive-interval", "5"])
    cli._server_from_args(args, cfg)
    assert cfg.server is not None
    assert (cfg.server.keepalive_interval, cfg.server.keepalive_timeout) == (5.0, 45.0)
    args = cli._parser().parse_args(["client", "--keepalive-timeout", "10", "wss://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="keepalive interval") as info:
        cli._client_from_args(args, Config())
    assert info.value.key == "--keepalive-timeout"


# --- the control API from the command line -------------------------------------------------


@posix_only
def test_mode_and_resolve_reach_a_running_engine_with_its_token(
    tmp_path: Path, certs: Certs
) -> None:
    """``autovpn mode`` and ``autovpn resolve`` read the token the engine left (0600) next to
    its record in the state directory; a CLI without it is refused and told where it is."""
    import json
    import stat

    state = tmp_path / "state"
    env = clean_env(tmp_path, AUTOVPN_STATE_DIR=str(state), AUTOVPN_SECRET=SECRET.decode())
    config = tmp_path / "engine.toml"
    config.write_text(
        'mode = "smart"\n'
        'control = "127.0.0.1:0"\n'
        "[server]\n"
        f'listen = "wss://127.0.0.1:{free_port()}"\n'
        f'tls_certificate = "{certs.cert}"\n'
        f'tls_private_key = "{certs.key}"\n'
        "[routing]\n"
        "default_lists = false\n"
        "[routing.dns]\n"
        'local = ["127.0.0.1:9"]\n'
        'public = ["127.0.0.1:9"]\n'
        "hosts_file = false\n"
    )

    async def main() -> None:
        async with autovpn("--config", str(config), env=env, ready="control api") as proc:
            (record,) = (state / "engines").glob("*.json")
            assert record.name.startswith("server-127.0.0.1-")
            token_file = record.with_suffix(".token")
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            token = token_file.read_text().strip()
            rc, out, err = await run_cli("mode", "direct", env=env)
            assert (rc, out.strip()) == (0, "mode smart -> direct"), err
            rc, out, err = await run_cli("mode", env=env)
            assert (rc, out.strip()) == (0, "direct"), err
            rc, out, err = await run_cli("resolve", "--list", "all", env=env)
            assert rc == 0 and "the running engine's cache is warm" in out, err
            # Another user, or another state directory: no token, no switch.
            url = json.loads(record.read_text())["url"]
            other = clean_env(tmp_path, AUTOVPN_STATE_DIR=str(tmp_path / "other"))
            for args in (["mode", "global"], ["resolve"]):
                rc, out, err = await run_cli(*args, "--control", url, env=other)
                assert rc == 1, (args, out, err)
                assert str(token_file) in err and str(tmp_path / "other") in err, err
                assert "Traceback" not in err
            # A stale token (an earlier run's) is refused too.
            token_file.write_text("stale\n")
            rc, out, err = await run_cli("mode", "global", env=env)
            assert rc == 1 and "wrong control token" in err, err
            token_file.write_text(token + "\n")
            rc, out, err = await run_cli("mode", env=env)
            assert (rc, out.strip()) == (0, "direct"), err
            code, rest = await stop(proc)
            assert code in (0, 130) and "Traceback" not in rest, rest
            assert token not in rest
        assert list((state / "engines").iterdir()) == []

    run(main())


# --- SIGTERM, and nothing written outside the state directory ----------------------------------


def _engine_toml(tmp_path: Path, certs: Certs, socks: int) -> Path:
    """A server and a client in one process, direct mode, ``scored.test`` in its hosts file
    (so a direct connection to it is resolved and scored)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 scored.test\n")
    server_port = free_port()
    config = tmp_path / "engine.toml"
    config.write_text(
        'mode = "direct"\n'
        'control = "127.0.0.1:0"\n'
        "[server]\n"
        f'listen = "wss://127.0.0.1:{server_port}"\n'
        f'tls_certificate = "{certs.cert}"\n'
        f'tls_private_key = "{certs.key}"\n'
        "[client]\n"
        f'server = "wss://127.0.0.1:{server_port}"\n'
        f'tls_ca = "{certs.ca}"\n'
        f'listen = ["socks5://127.0.0.1:{socks}"]\n'
        "[routing]\n"
        "default_lists = false\n"
        "[routing.dns]\n"
        'local = ["127.0.0.1:9"]\n'
        'public = ["127.0.0.1:9"]\n'
        f'hosts_file = "{hosts}"\n'
    )
    return config


@posix_only
def test_sigterm_stops_the_engine_as_ctrl_c_does(tmp_path: Path, certs: Certs) -> None:
    """SIGTERM (systemd, docker stop, kill): listeners closed, IP scores saved, the engine's
    state file removed, exit code 0."""
    import json

    from tests.conftest import echo_handler, socks_open, tcp_server

    state = tmp_path / "state"
    env = clean_env(tmp_path, AUTOVPN_STATE_DIR=str(state), AUTOVPN_SECRET=SECRET.decode())
    socks = free_port()
    config = _engine_toml(tmp_path, certs, socks)

    async def main() -> None:
        async with (
            tcp_server(echo_handler) as echo,
            autovpn("--config", str(config), env=env, ready="control api") as proc,
        ):
            (record,) = (state / "engines").glob("*.json")
            assert json.loads(record.read_text())["pid"] == proc.pid
            reader, writer = await socks_open(socks, "scored.test", echo)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                out, _ = await proc.communicate()
            rest = out.decode(errors="replace")
            assert proc.returncode == 0, rest
            assert "Traceback" not in rest
        scores = json.loads((state / "ip-scores.json").read_text())
        assert "127.0.0.1" in json.dumps(scores)
        assert list((state / "engines").iterdir()) == []

    run(main())


@posix_only
def test_commands_write_nothing_under_home(tmp_path: Path, certs: Certs) -> None:
    """With AUTOVPN_STATE_DIR set, the commands and an engine's whole run leave HOME as it was
    (empty): the state directory and the paths given are all they write."""
    state = tmp_path / "state"
    env = clean_env(tmp_path, AUTOVPN_STATE_DIR=str(state), AUTOVPN_SECRET=SECRET.decode())
    env.pop("XDG_STATE_HOME")
    home = Path(env["HOME"])
    config = _engine_toml(tmp_path, certs, free_port())

    async def main() -> None:
        for args in (
            ["check-config", str(config)],
            ["--config", str(config), "pac"],
            ["--config", str(config), "route", "scored.test", "80"],
            ["status"],
            ["wg", "keys"],
            ["cert", str(tmp_path / "made"), "--name", "localhost"],
        ):
            rc, out, err = await run_cli(*args, env=env)
            assert "Traceback" not in err, (args, err)
        async with autovpn("--config", str(config), env=env, ready="control api") as proc:
            for args in (["status"], ["mode", "smart"], ["route", "scored.test"], ["pac"]):
                rc, out, err = await run_cli(*args, env=env)
                assert rc == 0, (args, err)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await proc.communicate()

    run(main())
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []
    assert state.is_dir()
