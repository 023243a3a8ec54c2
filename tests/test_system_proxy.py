"""``--set-system-proxy``: the system's proxy setting points at the engine's PAC file while it
runs, and the previous setting comes back on Ctrl-C and SIGTERM, and after a SIGKILL at the
next run.

Tested with GNOME's setting through the real ``gsettings``, on GLib's ``keyfile`` backend in the
test's own XDG_CONFIG_HOME: a file that the test and the engine's process share (the ``memory``
backend lives in one process only), and nothing of the machine's own settings is touched.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from autovpn import sysproxy
from tests.conftest import SECRET, run
from tests.test_cli import clean_env


def _gsettings_ready() -> str | None:
    if not sys.platform.startswith("linux"):
        return "GNOME's setting is a Linux desktop's"
    if shutil.which("gsettings") is None:
        return "gsettings is not installed (Debian: libglib2.0-bin)"
    done = subprocess.run(
        ["gsettings", "list-keys", sysproxy.GNOME_SCHEMA], capture_output=True, check=False
    )
    if done.returncode != 0:
        return "the org.gnome.system.proxy schema is not installed (gsettings-desktop-schemas)"
    return None


pytestmark = pytest.mark.skipif(_gsettings_ready() is not None, reason=str(_gsettings_ready()))

BEFORE = {"mode": "'manual'", "autoconfig-url": "'http://old.example/proxy.pac'"}
BANNER = re.compile(r"system proxy\s+GNOME -> (http://127\.0\.0\.1:\d+/proxy\.pac)")


def gsettings(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        ["gsettings", *args], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip()


def current(env: dict[str, str]) -> dict[str, str]:
    return {key: gsettings(env, "get", sysproxy.GNOME_SCHEMA, key) for key in BEFORE}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = clean_env(
        tmp_path,
        GSETTINGS_BACKEND="keyfile",
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        AUTOVPN_STATE_DIR=str(tmp_path / "state"),
    )
    for key, value in BEFORE.items():
        gsettings(env, "set", sysproxy.GNOME_SCHEMA, key, value)
    assert current(env) == BEFORE
    (tmp_path / "secret").write_bytes(SECRET)
    # A client and a server in one process, every port chosen by the system.
    (tmp_path / "autovpn.toml").write_text(
        'control = "127.0.0.1:0"\n'
        "[server]\n"
        'listen = "ws://127.0.0.1:0"\n'
        'secret_file = "secret"\n'
        "[client]\n"
        'server = "ws://127.0.0.1:0"\n'
        'secret_file = "secret"\n'
        'listen = ["socks5://127.0.0.1:0", "http://127.0.0.1:0"]\n'
    )
    return env


async def start(
    tmp_path: Path, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str, str]:
    """The engine, running with --set-system-proxy; the PAC URL its banner shows, and its
    output so far."""
    config = str(tmp_path / "autovpn.toml")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "autovpn", "--config", config, "--set-system-proxy"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not (found := BANNER.search("".join(seen))):
                line = (await proc.stdout.readline()).decode(errors="replace")
                assert line, "autovpn exited before it was ready:\n" + "".join(seen)
                seen.append(line)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, found.group(1), "".join(seen)


async def finish(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def pac_body(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for this
    with opener.open(url, timeout=10) as answer:
        return str(answer.read().decode())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_points_the_system_at_the_pac_and_restores_it(
    tmp_path: Path, env: dict[str, str], sig: signal.Signals, status: int
) -> None:
    async def main() -> None:
        proc, url, _ = await start(tmp_path, env)
        try:
            assert current(env) == {"mode": "'auto'", "autoconfig-url": f"'{url}'"}
            assert "FindProxyForURL" in await asyncio.to_thread(pac_body, url)
            assert (tmp_path / "state" / sysproxy.RECORD).is_file()
        finally:
            code, out = await finish(proc, sig)
        assert code == status, out
        assert "Traceback" not in out
        assert current(env) == BEFORE
        assert not (tmp_path / "state" / sysproxy.RECORD).exists()

    run(main())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_killed_engines_setting_is_restored_by_the_next_run(
    tmp_path: Path, env: dict[str, str]
) -> None:
    async def main() -> None:
        proc, url, _ = await start(tmp_path, env)
        await finish(proc, signal.SIGKILL)  # no chance to restore anything
        assert current(env)["autoconfig-url"] == f"'{url}'"
        proc, url, started = await start(tmp_path, env)
        try:
            assert current(env)["autoconfig-url"] == f"'{url}'"
        finally:
            code, out = await finish(proc, signal.SIGTERM)
        assert code == 0, out
        assert "restored the setting that an autovpn engine" in started
        assert current(env) == BEFORE  # the one from before the first run

    run(main())


def test_refused_without_a_setting_to_change(tmp_path: Path, env: dict[str, str]) -> None:
    """No GNOME schema here (another desktop, a server): say so and start nothing."""
    bare = dict(env, XDG_DATA_DIRS=str(tmp_path / "empty"))  # where GLib looks for schemas
    config = str(tmp_path / "autovpn.toml")
    done = subprocess.run(
        [sys.executable, "-m", "autovpn", "--config", config, "--set-system-proxy"],
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "no system proxy setting found here (supported: GNOME" in done.stderr
    assert "Traceback" not in done.stderr
    assert current(env) == BEFORE
