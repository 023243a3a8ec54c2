"""Headless Chromium with ``--proxy-pac-url`` pointing at the running engine's /proxy.pac.

A proxied test name must reach the engine's HTTP proxy *as a name* and travel through the tunnel;
a direct one must not touch the engine at all.  Chromium's rules, as probed on this machine
(http:// PAC, never file://; loopback is never proxied under a PAC, so test names are
non-loopback names; ``MAP * ~NOTFOUND`` keeps Chromium away from the system resolver).

The tunnel server resolves target names through a loopback DNS server (``ServerSettings.resolve``),
so no test name reaches the system resolver on either side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

import dns.asyncresolver
import dns.exception
import pytest

from autovpn.config import RoutingConfig
from autovpn.engine import Engine
from autovpn.policy import DestinationPolicy
from autovpn.routing.router import Mode
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from tests.conftest import (
    SECRET,
    Certs,
    engine_config,
    env_without_proxies,
    eventually,
    run,
)
from tests.routing.dnsserver import dns_server

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason="Chromium not installed (apt-get install --no-install-recommends chromium)",
    ),
]


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A tiny HTTP origin that shows the Host header it received."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        host = ""
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "host":
                host = value.strip()
        body = f'<html><body><p id="host">host={host}</p></body></html>'.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def chromium_dump(pac_url: str, url: str, direct_host: str) -> str:
    """One ``--dump-dom`` run (blocking: call it in a thread); the Popen handle is always
    waited for, also on timeout."""
    rules = f"MAP {direct_host} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="autovpn-chromium-") as profile:
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--proxy-pac-url={pac_url}",
            f"--host-resolver-rules={rules}",
            "--dump-dom",
            url,
        ]
        env = {**env_without_proxies(), "HOME": profile}
        with subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
    return out.decode(errors="replace")


def test_chromium_follows_the_engine_pac(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with dns_server(
            zone={"www.proxied.test": ["127.0.0.1"]}, answer_all=False
        ) as server_dns:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            resolver.port = server_dns.port

            async def server_resolve(host: str, port: int) -> list[str]:
                try:
                    answer = await resolver.resolve(host, "A", search=False)
                except dns.exception.DNSException as exc:
                    # The server's contract is getaddrinfo's: failures are OSErrors.
                    raise socket.gaierror(socket.EAI_NONAME, str(exc)) from None
                return [r.address for r in answer]

            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(certs.cert, certs.key)
            server = TunnelServer(
                ServerSettings(
                    host="127.0.0.1",
                    port=0,
                    users={"default": SECRET},
                    ssl_context=ctx,
                    policy=DestinationPolicy(["127.0.0.0/8"]),
                    resolve=server_resolve,
                )
            )
            await server.start()
            try:
                cfg = engine_config(certs, server=False, server_port=server.port, mode=Mode.SMART)
                cfg.routing = RoutingConfig(
                    default="direct",
                    rules=["domain:proxied.test=proxy", "domain:direct.test=direct"],
                    hosts_file=None,
                    dns_local=[],
                )
                cfg.control = "127.0.0.1:0"
                origin_server = await asyncio.start_server(origin, "127.0.0.1", 0)
                port = origin_server.sockets[0].getsockname()[1]
                try:
                    async with Engine(cfg) as eng:
                        assert eng.api is not None
                        pac = f"{eng.api.url}/proxy.pac"
                        caplog.set_level(logging.INFO, logger="autovpn.access")
                        proxied = await asyncio.to_thread(
                            chromium_dump,
                            pac,
                            f"http://www.proxied.test:{port}/via-pac",
                            "www.direct.test",
                        )
                        opened = server.streams_opened
                        assert f"host=www.proxied.test:{port}" in proxied
                        assert opened >= 1
                        # (Chromium's own background fetches of Google names are proxied by
                        # the default lists too; they reach only this loopback server.)
                        assert "www.proxied.test" in server_dns.names()
                        # The access log's line, written when Chromium's connection ends.
                        await eventually(
                            lambda: f"-> www.proxied.test:{port} proxy" in caplog.text
                        )
                        direct = await asyncio.to_thread(
                            chromium_dump,
                            pac,
                            f"http://www.direct.test:{port}/direct",
                            "www.direct.test",
                        )
                        assert f"host=www.direct.test:{port}" in direct
                        assert server.streams_opened == opened
                        assert "www.direct.test" not in caplog.text
                        assert "www.direct.test" not in server_dns.names()
                        assert eng.api.pacs.generations == 1
                finally:
                    origin_server.close()
                    await origin_server.wait_closed()
            finally:
                await server.close()

    run(main())


def test_chromium_binary_is_the_debian_one() -> None:
    assert shutil.which("chromium") == CHROMIUM or Path(CHROMIUM).exists()
