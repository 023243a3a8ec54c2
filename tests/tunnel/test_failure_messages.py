"""Error messages say what to do: an untrusted certificate names --tls-ca, a name the
certificate lacks names --tls-sni-override, a refused connection names the server and since
when, a file that is no PEM certificate says so (before OpenSSL's own words)."""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from pathlib import Path

import pytest

from autovpn.cli import main
from autovpn.config import ServerURL, load_file
from autovpn.errors import ConfigError, StreamError, TunnelUnavailable
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.tls import client_context, server_context
from autovpn.tunnel.wstunnel.client import WstunnelClient, WstunnelClientSettings
from tests.conftest import SECRET, Certs, eventually, free_port, run
from tests.test_cli import autovpn as autovpn_process
from tests.test_cli import clean_env

SINCE = re.compile(r"\[failing since \d\d:\d\d:\d\d(, \d+ attempts)?\]")
GARBAGE = b"this is not a certificate\n"


async def _first_error(client: TunnelClient) -> str:
    client.start()
    try:
        await eventually(lambda: bool(client.last_error))
        return client.last_error
    finally:
        await client.close()


def test_a_refused_connection_names_the_server_and_since_when() -> None:
    port = free_port()  # nothing listens there
    server = ServerURL(False, "127.0.0.1", port)

    async def main_() -> None:
        client = TunnelClient(ClientSettings(server, "default", SECRET, connect_timeout=0.5))
        client.start()
        try:
            with pytest.raises(TunnelUnavailable) as caught:
                await client.open_stream("127.0.0.1", 9)
        finally:
            await client.close()
        message = str(caught.value)
        assert f"no tunnel connection to ws://127.0.0.1:{port}" in message
        assert f"connection refused by 127.0.0.1:{port}: no server listens there" in message
        assert SINCE.search(message), message
        assert client.failing.attempts > 1 and f"{client.failing.attempts} attempts" in message

    run(main_())


@pytest.fixture
def tls_server(certs: Certs) -> tuple[ssl.SSLContext, Path]:
    return server_context(certs.cert, certs.key), certs.ca


async def _tls_listener(ctx: ssl.SSLContext, host: str) -> asyncio.Server:
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(close, host, 0, ssl=ctx)


def test_an_untrusted_certificate_names_tls_ca(tls_server: tuple[ssl.SSLContext, Path]) -> None:
    async def main_() -> None:
        listener = await _tls_listener(tls_server[0], "127.0.0.1")
        port = listener.sockets[0].getsockname()[1]
        try:
            settings = ClientSettings(
                ServerURL(True, "127.0.0.1", port), "default", SECRET, client_context()
            )
            error = await _first_error(TunnelClient(settings))
        finally:
            listener.close()
            await listener.wait_closed()
        assert error.startswith("server certificate not trusted ("), error
        assert "trust it with --tls-ca FILE" in error and SINCE.search(error)

    run(main_())


@pytest.mark.skipif(sys.platform == "darwin", reason="127.0.0.2 is not on lo by default")
def test_a_certificate_for_another_name_names_the_remedy(
    tls_server: tuple[ssl.SSLContext, Path],
) -> None:
    async def main_() -> None:
        listener = await _tls_listener(tls_server[0], "127.0.0.2")  # not in the certificate
        port = listener.sockets[0].getsockname()[1]
        try:
            settings = ClientSettings(
                ServerURL(True, "127.0.0.2", port),
                "default",
                SECRET,
                client_context(tls_server[1]),
            )
            error = await _first_error(TunnelClient(settings))
        finally:
            listener.close()
            await listener.wait_closed()
        assert error.startswith("server certificate not for the name dialled"), error
        assert "127.0.0.2" in error
        assert "--tls-sni-override NAME" in error

    run(main_())


def test_the_wstunnel_client_says_the_same() -> None:
    port = free_port()

    async def main_() -> None:
        settings = WstunnelClientSettings(ServerURL(False, "127.0.0.1", port), max_backoff=0.3)
        async with WstunnelClient(settings) as client:
            with pytest.raises(StreamError) as caught:
                await client.open_upstream("127.0.0.1", 9)
        message = str(caught.value)
        assert f"connection refused by 127.0.0.1:{port}" in message and SINCE.search(message)

    run(main_())


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child is POSIX")
def test_a_client_without_tls_ca_is_told_to_give_it(tmp_path: Path, certs: Certs) -> None:
    """What the README's client command did before it had --tls-ca, as a user sees it."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    port = free_port()
    env = clean_env(tmp_path)

    async def main_() -> None:
        server_args = ["server", f"wss://127.0.0.1:{port}", "--secret-file", str(secret)]
        server_args += ["--tls-certificate", str(certs.cert), "--tls-private-key", str(certs.key)]
        client_args = ["client", "--secret-file", str(secret), "-L", "socks5://127.0.0.1:0"]
        async with (
            autovpn_process(*server_args, env=env, ready="running"),
            autovpn_process(
                *client_args,
                f"wss://127.0.0.1:{port}",
                env=env,
                ready="server certificate not trusted",
            ),
        ):
            pass

    run(main_())


@pytest.mark.parametrize("kind", ["garbage", "key only"])
def test_a_file_that_is_no_pem_certificate_says_so(
    tmp_path: Path, certs: Certs, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_bytes(GARBAGE if kind == "garbage" else certs.key.read_bytes())
    reason = "no -----BEGIN CERTIFICATE----- line" if kind == "garbage" else "a private key only"
    # the flag, on the client and the server
    assert main(["client", "--tls-ca", str(bad), "--secret-file", str(bad), "wss://x.test"]) == 2
    err = capsys.readouterr().err
    assert f"--tls-ca: {bad}: not a PEM certificate" in err and reason in err
    args = ["server", "wss://127.0.0.1:0", "--secret-file", str(certs.key)]
    args += ["--tls-certificate", str(bad)]
    assert main([*args, "--tls-private-key", str(certs.key)]) == 2
    assert f"--tls-certificate: {bad}: not a PEM certificate" in capsys.readouterr().err
    # the key, with its line
    config = tmp_path / "autovpn.toml"
    config.write_text(f'[client]\nserver = "wss://x.test"\ntls_ca = "{bad}"\n')
    errors = load_file(config)[1]
    assert [(e.key, e.line) for e in errors if "PEM" in e.reason] == [("client.tls_ca", 3)]
    # and an engine built without either (embedding)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        client_context(bad)


def test_a_file_that_is_no_pem_private_key_says_so(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(ConfigError, match="not a PEM private key: it holds a certificate only"):
        server_context(certs.cert, certs.cert)
    der = tmp_path / "key.der"
    der.write_bytes(b"\x30\x82\x01\x00" + bytes(32))
    with pytest.raises(ConfigError, match="it looks like DER: convert it with openssl pkey"):
        server_context(certs.cert, der)
