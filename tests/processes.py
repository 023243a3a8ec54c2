"""``python -m autovpn ...`` as a real child process, for the tests that kill or stop one.

The process's output is drained as it comes (a full pipe would stall it) and kept for the
assertion messages; ``kill`` is SIGKILL, as when the process or its machine dies, and always
waits for it (PID 1 here reaps no orphans).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.conftest import SECRET, env_without_proxies

#: The start-up banner: "autovpn X running (LOOP event loop)".
BANNER = " running ("


class Process:
    """A running ``python -m autovpn ...``; its output is drained and kept."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []
        self.ready = asyncio.Event()  # the banner was printed
        self.drain = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode(errors="replace"))
            if BANNER in self.output[-1]:
                self.ready.set()

    @property
    def text(self) -> str:
        return "".join(self.output)

    async def interrupt(self) -> None:
        """Ctrl-C, as a person stops it; killed if it has not ended within 15 s."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
        await self.proc.wait()
        await self.drain

    async def kill(self) -> None:
        """SIGKILL: no goodbye of any kind; waited for, its output drained."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self.drain


@asynccontextmanager
async def autovpn(
    *args: str,
    secret: bytes = SECRET,
    state: Path | None = None,
    loop: str | None = None,
    interrupt: bool = False,
) -> AsyncIterator[Process]:
    """``python -m autovpn ARGS`` until its start-up banner; always stopped and waited for:
    SIGKILL, or Ctrl-C with ``interrupt`` (its goodbye lines then land in ``output``).

    ``state``: its own AUTOVPN_STATE_DIR (default: the test's, from conftest); ``loop``: the
    event loop its banner must name.
    """
    env = env_without_proxies()  # with the test's AUTOVPN_STATE_DIR and HOME (conftest)
    env["AUTOVPN_SECRET"] = secret.decode()
    env["PYTHONUNBUFFERED"] = "1"
    if state is not None:
        env["AUTOVPN_STATE_DIR"] = str(state)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autovpn",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    process = Process(proc)
    try:
        ready = asyncio.ensure_future(process.ready.wait())
        async with asyncio.timeout(30):
            await asyncio.wait([ready, process.drain], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise AssertionError("autovpn exited before it was ready:\n" + process.text)
        if loop is not None:
            banner = next(line for line in process.output if BANNER in line)
            assert f"({loop} event loop)" in banner, banner
        yield process
    finally:
        await (process.interrupt() if interrupt else process.kill())
