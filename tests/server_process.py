"""``python -m autovpn server ...`` as a real subprocess, for the tests of workers and fleets.

The process is always waited for: killed (SIGKILL) if the test left it running, and its output
drained to the end (PID 1 here reaps no orphans, so nothing is left unwaited).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autovpn.monitor.api import request
from tests.conftest import SECRET, Certs, env_without_proxies, free_port


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    port: int
    output: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _banner_line(self, what: str) -> str:
        return next(line for line in self.output if line.lstrip().startswith(what))

    @property
    def worker_pids(self) -> list[int]:
        """The pids the supervisor's banner names (empty for a single process)."""
        found = re.search(r"worker pids ([\d, ]+)", self._banner_line("tunnel server"))
        return [] if found is None else [int(p) for p in found.group(1).split(",")]

    @property
    def control(self) -> str:
        found = re.search(r"http://\S+", self._banner_line("control api"))
        assert found is not None, self.output
        return found.group(0)

    async def status(self) -> dict[str, Any]:
        async with asyncio.timeout(20):
            reply = await request(self.control, "GET", "/status")
        assert reply.status == 200, reply
        data: dict[str, Any] = reply.json()
        return data

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode(errors="replace"))
            if self.output[-1].lstrip().startswith("control api"):
                self.ready.set()

    def text(self) -> str:
        return "".join(self.output)


def server_args(
    certs: Certs, port: int, secret: Path, tls: bool = True, wstunnel: bool = False
) -> list[str]:
    pem = ["--tls-certificate", str(certs.cert), "--tls-private-key", str(certs.key)]
    return [
        "server",
        f"{'wss' if tls else 'ws'}://127.0.0.1:{port}",
        *(pem if tls else []),
        "--secret-file",
        str(secret),
        "--allow",
        "127.0.0.0/8",
        *([] if wstunnel else ["--no-wstunnel"]),
    ]


@asynccontextmanager
async def autovpn_server(
    certs: Certs,
    tmp_path: Path,
    *extra: str,
    port: int | None = None,
    name: str = "server",
    tls: bool = True,
    wstunnel: bool = False,
) -> AsyncIterator[ServerProcess]:
    """A tunnel server on 127.0.0.1 (wss with the test CA's certificate, or ws:// without
    ``tls``; user "default" with SECRET; stock wstunnel clients served with ``wstunnel``,
    by SECRET as their path prefix) with the ``extra`` flags (``--workers 2``...), once
    its banner is out (its workers listen).  On exit it gets SIGTERM (SIGKILL after 30 s)
    and is waited for."""
    port = port or free_port()
    secret = tmp_path / f"{name}.secret"
    secret.write_bytes(SECRET)
    env = env_without_proxies()
    env["AUTOVPN_STATE_DIR"] = str(tmp_path / f"{name}-state")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("AUTOVPN_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "autovpn",
        *server_args(certs, port, secret, tls, wstunnel),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    server = ServerProcess(proc, port)
    reading = asyncio.ensure_future(server.read())
    try:
        ready = asyncio.ensure_future(server.ready.wait())
        async with asyncio.timeout(60):
            await asyncio.wait([ready, reading], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise AssertionError("the server exited before it was ready:\n" + server.text())
        yield server
    finally:
        # SIGTERM first: the supervisor stops and reaps its workers (killed, it would leave
        # them to PID 1); SIGKILL if that takes too long.
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        async with asyncio.timeout(30):  # its workers hold the pipe until they are gone too
            await reading
