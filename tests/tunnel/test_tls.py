"""TLS helpers: the private CA the tests (and users, via ``autovpn cert``) make, and the
self-signed certificate of the embedded default, verified by real TLS handshakes."""

from __future__ import annotations

import asyncio
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from autovpn.engine import embedded_config
from autovpn.errors import ConfigError
from autovpn.tunnel.tls import client_context, make_private_ca, server_context
from tests.conftest import run


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server)
    try:
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=name
        )
        assert await reader.read() == b"ok"
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


def test_cli_cert_makes_a_ca_that_verifies_its_server(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "autovpn",
            "cert",
            str(tmp_path),
            "--name",
            "vpn.test.example",
            "--name",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--tls-ca" in out
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    server = server_context(tmp_path / "server.pem", tmp_path / "server.key")
    run(_handshake(server, client_context(tmp_path / "ca.pem"), "vpn.test.example"))
    run(_handshake(server, client_context(tmp_path / "ca.pem"), "127.0.0.1"))
    with pytest.raises(ssl.SSLCertVerificationError):  # the name must match
        run(_handshake(server, client_context(tmp_path / "ca.pem"), "other.test.example"))
    with pytest.raises(ssl.SSLCertVerificationError):  # the system store does not trust it
        run(_handshake(server, client_context(), "vpn.test.example"))


def test_embedded_default_trusts_only_its_own_ca(tmp_path: Path) -> None:
    cfg = embedded_config(tmp_path)
    assert cfg.client is not None and cfg.server is not None
    assert cfg.client.tls_ca is not None and not cfg.client.insecure
    assert cfg.server.tls_certificate is not None and cfg.server.tls_private_key is not None
    server = server_context(cfg.server.tls_certificate, cfg.server.tls_private_key)
    run(_handshake(server, client_context(cfg.client.tls_ca), "127.0.0.1"))
    again = embedded_config(tmp_path)  # made once, then reused
    assert again.client is not None and again.client.tls_ca == cfg.client.tls_ca
    assert cfg.client.tls_ca.read_bytes() == again.client.tls_ca.read_bytes()


def test_insecure_skips_verification(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, cert, key = make_private_ca(tmp_path, ["localhost"])
    run(_handshake(server_context(cert, key), client_context(insecure=True), "anything"))
    assert "NOT verified" in caplog.text


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls-certificate"):
        server_context(tmp_path / "missing.pem", tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="tls-ca"):
        client_context(tmp_path / "missing-ca.pem")
