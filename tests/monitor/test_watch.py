"""``autovpn status --watch`` in a pseudo-terminal, against an engine with real traffic: its
screens show the server, its state, the routes' bytes and rates, the domains, the failures,
and the figures change as traffic flows.  And the one-shot status imports neither rich nor
aiohttp."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from autovpn.engine import Engine
from tests.conftest import Certs, echo_handler, run, socks_open, socks_port, tcp_server
from tests.monitor.test_stats import stats_config

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r")


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side closed
            return out
        if not data:
            return out
        out += data


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX pseudo-terminal")
def test_watch_draws_live_figures_in_a_terminal(certs: Certs) -> None:
    async def main() -> str:
        cfg = stats_config(certs)
        cfg.control = "127.0.0.1:0"
        async with Engine(cfg) as eng, tcp_server(echo_handler) as echo:
            assert eng.api is not None and eng.tunnel is not None
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
            writer.write(b"x" * 5000)
            await reader.readexactly(5000)
            eng.set_mode("smart")
            with pytest.raises(Exception, match="NOT_ALLOWED"):
                await socks_open(socks_port(eng), "blocked.test", 80)
            master, slave = os.openpty()
            env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "80"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "autovpn", "status", "--watch", "--interval", "0.4", "--count", "6"),
                *("--control", eng.api.url),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
            )
            os.close(slave)
            screen = asyncio.ensure_future(asyncio.to_thread(_read_all, master))
            try:
                await asyncio.sleep(1.0)  # a few screens, then more traffic
                writer.write(b"z" * 20000)
                await reader.readexactly(20000)
                async with asyncio.timeout(30):
                    await proc.wait()
                text = (await screen).decode(errors="replace")
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                os.close(master)
            writer.close()
            assert proc.returncode == 0, text
            return ANSI.sub(b"", text.encode()).decode(errors="replace")

    text = run(main())
    assert "servers" in text and "wss://127.0.0.1:" in text and " up " in text
    assert "4.9 KiB" in text  # the proxy route's bytes up, at the first screens
    assert "24.4 KiB" in text  # and after the 20000 more: the figures changed
    assert re.search(r"\d+\.\d KiB/s", text)  # the 20000 bytes' rate, from two answers
    assert "127.0.0.1" in text and "blocked.test:80" in text and "rejected" in text
    assert "mode smart" in text


def test_the_one_shot_status_imports_neither_rich_nor_aiohttp(certs: Certs) -> None:
    code = (
        "import sys, autovpn.cli as c\n"
        "rc = c.main(['status', '--control', 'http://127.0.0.1:1'])\n"
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'aiohttp'}))\n"
    )

    async def main() -> str:
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stdout=pipe, stderr=pipe
        )
        out, _ = await proc.communicate()
        return out.decode()

    assert run(main()).strip() == "1 []"
