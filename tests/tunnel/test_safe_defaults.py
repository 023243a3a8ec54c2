"""Safe defaults (issue 15): a server lets in no tunnel of either protocol without
authentication unless its operator says so; stock wstunnel clients authenticate with what they
can send (a user's secret as the path prefix, or a client certificate); mTLS works on both ends
of both protocols; authentication failures are limited per source address.

Real ``python -m autovpn server`` processes, real TLS, real sockets; the stock wstunnel client
is the conformance peer (tests/tunnel/wstunnel/wstunnel_peer.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn import cli
from autovpn.config import Config, ServerURL, WstunnelServerOptions, load_file
from autovpn.engine import Engine
from autovpn.errors import ConfigError
from autovpn.policy import DestinationPolicy
from autovpn.tunnel.auth_limit import AuthFailureLimiter, address_key
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.wstunnel import access
from autovpn.tunnel.wstunnel.access import How, SecretPrefixes, identify
from autovpn.tunnel.wstunnel.server import WstunnelService
from autovpn.wire import handshake
from autovpn.wire.socks5 import Socks5Error
from tests.conftest import (
    SECRET,
    SECRET_PREFIX,
    Certs,
    echo_handler,
    eventually,
    free_port,
    run,
    socks_open,
    tcp_server,
)
from tests.processes import autovpn
from tests.tunnel.test_server_hardening import _CountingTarget, _listening
from tests.tunnel.wstunnel import wstunnel_peer as peer
from tests.tunnel.wstunnel.test_wstunnel_io import client_cert, peer_tls

ALICE_SECRET = "alice-secret-7f3a9c2e"  # URL-safe, as a stock client sends it with -P


# -- helpers ------------------------------------------------------------------------------------


@asynccontextmanager
async def server_process(tmp_path: Path, *args: str) -> AsyncIterator[list[str]]:
    """``python -m autovpn server ARGS`` (the default user's secret from AUTOVPN_SECRET);
    yields its output lines, a list that grows while it runs.  Ctrl-C and wait on exit."""
    async with autovpn(
        "--log-level", "debug", "server", *args, state=tmp_path / "state", interrupt=True
    ) as process:
        yield process.output


async def answer(
    port: int,
    request: bytes,
    *,
    local: str = "127.0.0.1",
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """(status, body) of the answer to one request from ``local`` (for a 101, what followed
    the status line within 5 s)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        local_addr=(local, 0),
        ssl=ssl_context,
        server_hostname="localhost" if ssl_context else None,
    )
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            status = await reader.readline()
        if not status:
            raise ConnectionError("closed without an answer")
        rest = b""
        try:
            async with asyncio.timeout(5):
                while data := await reader.read(1 << 16):
                    rest += data
                    if int(status.split()[1]) == 101:
                        break
        except TimeoutError:
            pass
        code = int(status.split()[1])
        return code, rest if code == 101 else rest.partition(b"\r\n\r\n")[2]
    finally:
        writer.close()


def native_request(secret: bytes, port: int, user: str = "default") -> bytes:
    return handshake.build_request(
        host=f"127.0.0.1:{port}",
        path=handshake.tunnel_path(),
        user=user,
        secret=secret,
        now=int(time.time()),
        nonce=os.urandom(16),
        ws_key=os.urandom(16),
    )


def forward(port: int, prefix: str) -> bytes:
    return peer.upgrade_request(
        "x", peer.make_jwt(peer.tcp_claims("127.0.0.1", port)), prefix=prefix
    )


def reverse(bind: int, prefix: str) -> bytes:
    claims = {"id": "r", "p": "ReverseTcp", "r": "127.0.0.1", "rp": bind}
    return peer.upgrade_request("x", peer.make_jwt(claims), prefix=prefix)


def secret_free(lines: list[str], *secrets: str) -> None:
    """No line of the server's output shows any of ``secrets`` (nor its base64)."""
    text = "".join(lines)
    for secret in secrets:
        for shown in (secret, base64.b64encode(secret.encode()).decode()):
            assert shown not in text, f"the server logged a secret: {shown!r}"


# -- 1. a default server: no secret, no certificate, no tunnel ----------------------------------


def test_default_server_refuses_anonymous_wstunnel_and_lets_in_each_users_secret(
    tmp_path: Path, certs: Certs
) -> None:
    (tmp_path / "alice.secret").write_text(ALICE_SECRET + "\n")
    users = tmp_path / "users"
    users.write_text("alice:alice.secret\n")
    (tmp_path / "secret").write_bytes(SECRET)
    port = free_port()

    async def main() -> None:
        target = _CountingTarget()
        async with (
            target as target_port,
            server_process(
                tmp_path,
                f"wss://127.0.0.1:{port}",
                "--tls-certificate",
                str(certs.cert),
                "--tls-private-key",
                str(certs.key),
                "--secret-file",
                str(tmp_path / "secret"),
                "--users-file",
                str(users),
                "--allow",
                "127.0.0.0/8",
            ) as lines,
        ):
            tls = peer_tls(certs)
            # wstunnel's default prefix, any other non-secret, a near miss: refused, no dial;
            # 403, where wstunnel answers 400 to everything: a client of several servers can
            # tell a refused secret (skip the server) from a refused destination
            for prefix in ("v1", "not-a-secret", SECRET_PREFIX[:-1], ALICE_SECRET + "x"):
                status, body = await answer(port, forward(target_port, prefix), ssl_context=tls)
                assert (status, body) == (403, b"Forbidden"), prefix
            bind = free_port()
            status, _ = await answer(port, reverse(bind, "v1"), ssl_context=tls)
            assert status == 403 and not _listening(bind)
            await asyncio.sleep(0.2)  # a stray dial would land by now
            assert target.accepted == 0
            # each user's secret as the prefix (wstunnel client -P SECRET): served
            for n, prefix in enumerate((SECRET_PREFIX, ALICE_SECRET), 1):
                status, _ = await answer(port, forward(target_port, prefix), ssl_context=tls)
                assert status == 101
                await eventually(lambda n=n: target.accepted == n)  # type: ignore[misc]
            # refusals after authentication log nothing of the path either
            status, _ = await answer(
                port,
                f"GET /{ALICE_SECRET}/x/evnts HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                ssl_context=tls,
            )
            assert status == 404
            bad_jwt = peer.upgrade_request("x", "not.a.jwt", prefix=ALICE_SECRET)
            assert (await answer(port, bad_jwt, ssl_context=tls))[0] == 400
            private = peer.upgrade_request(
                "x", peer.make_jwt(peer.tcp_claims("10.255.255.1", 80)), prefix=ALICE_SECRET
            )
            assert (await answer(port, private, ssl_context=tls))[0] == 400
            await eventually(lambda: sum("refused" in x for x in lines) >= 8)
        assert target.accepted == 2
        text = "".join(lines)
        assert "each must send a user's secret as its path prefix" in text  # said at start
        assert "(user default)" in text and "(user alice)" in text  # named, by name
        assert "OPEN TO ANYONE" not in text
        secret_free(lines, SECRET_PREFIX, ALICE_SECRET)

    run(main())


# -- 2. --allow-anonymous: said at start, forward tunnels only ---------------------------------


def test_allow_anonymous_opens_forward_tunnels_only_and_says_so(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        target = _CountingTarget()
        async with (
            target as target_port,
            server_process(
                tmp_path, f"ws://127.0.0.1:{port}", "--allow", "127.0.0.0/8", "--allow-anonymous"
            ) as lines,
        ):
            (line,) = [x for x in lines if "OPEN TO ANYONE" in x]
            assert " WARNING " in line
            status, _ = await answer(port, forward(target_port, "v1"))
            assert status == 101
            await eventually(lambda: target.accepted == 1)
            # reverse tunnels stay refused for anonymous clients...
            bind = free_port()
            status, body = await answer(port, reverse(bind, "v1"))
            assert (status, body) == (400, b"Invalid request")
            assert not _listening(bind)
            # ...and are served to a user (the request waits for a connection on the server)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(reverse(bind, SECRET_PREFIX))
            await eventually(lambda: _listening(bind))
            writer.close()
            # native clients still authenticate
            status, _ = await answer(port, native_request(b"not the secret", port))
            assert status == 403
        assert any("reverse tunnels need a secret path prefix" in x for x in lines)

    run(main())


def test_restrictions_say_who_may_connect_and_restrict_to_alone_does_not() -> None:
    async def main() -> None:
        target = _CountingTarget()
        async with target as target_port:
            settings = ServerSettings(
                "127.0.0.1", 0, {"default": SECRET}, policy=DestinationPolicy(("127.0.0.0/8",))
            )
            for options, prefix, want in (
                # --restrict-to narrows destinations only: it lets nobody in by itself
                (WstunnelServerOptions(restrict_to=(f"127.0.0.1:{target_port}",)), "v1", 403),
                (
                    WstunnelServerOptions(restrict_to=(f"127.0.0.1:{target_port}",)),
                    SECRET_PREFIX,
                    101,
                ),
                # -r PREFIX: the operator's shared prefix is the credential, as in wstunnel
                (
                    WstunnelServerOptions(restrict_path_prefixes=("team-prefix",)),
                    "team-prefix",
                    101,
                ),
                (WstunnelServerOptions(restrict_path_prefixes=("team-prefix",)), "v1", 403),
            ):
                async with TunnelServer(settings) as server:
                    service = WstunnelService(server, options).install()
                    try:
                        before = target.accepted
                        status, _ = await answer(server.port, forward(target_port, prefix))
                        assert status == want, (options, prefix)
                        if want == 101:
                            await eventually(lambda b=before: target.accepted == b + 1)  # type: ignore[misc]
                        else:
                            await asyncio.sleep(0.1)
                            assert target.accepted == before
                    finally:
                        await service.close()

    run(main())


def test_a_restrictions_file_that_matches_anyone_is_warned_about(tmp_path: Path) -> None:
    import logging

    rules = tmp_path / "restrictions.yaml"
    rules.write_text(
        "restrictions:\n  - name: everyone\n    match:\n      - !Any\n    allow:\n      - !Tunnel\n"
    )

    async def main() -> None:
        settings = ServerSettings("127.0.0.1", 0, {"default": SECRET})
        async with TunnelServer(settings) as server:
            service = WstunnelService(server, WstunnelServerOptions(restrict_config=rules))
            level, line = service.describe_access()
            assert level == logging.WARNING and "'everyone'" in line and "ANY request" in line
            closed = WstunnelService(server, WstunnelServerOptions())
            level, line = closed.describe_access()
            assert level == logging.INFO and "nobody else gets in" in line

    run(main())


# -- 3. mTLS on both ends of both protocols -----------------------------------------------------


@pytest.mark.parametrize("protocol", ["autovpn", "wstunnel"])
def test_mtls_client_certificate_in_both_protocols(
    tmp_path: Path, certs: Certs, protocol: str
) -> None:
    ca, cert, key = client_cert(tmp_path, "alice")
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    port = free_port()

    def client(with_cert: bool) -> Config:
        argv = ["client", "--tls-ca", str(certs.ca), "-L", "socks5://127.0.0.1:0"]
        argv += ["--protocol", protocol]
        if protocol == "autovpn":
            argv += ["--secret-file", str(secret_file)]
        if with_cert:
            argv += ["--tls-certificate", str(cert), "--tls-private-key", str(key)]
        cfg = Config(control=None)
        cli._client_from_args(cli._parser().parse_args([*argv, f"wss://127.0.0.1:{port}"]), cfg)
        return cfg

    async def main() -> None:
        async with (
            tcp_server(echo_handler) as echo,
            server_process(
                tmp_path,
                f"wss://127.0.0.1:{port}",
                "--tls-certificate",
                str(certs.cert),
                "--tls-private-key",
                str(certs.key),
                "--tls-client-ca-certs",
                str(ca),
                "--allow",
                "127.0.0.0/8",
            ) as lines,
        ):
            # without a certificate: refused during TLS, nothing gets through
            async with Engine(client(with_cert=False)) as eng:
                if eng.tunnel is not None:  # native: the tunnel connection never comes up
                    tunnel = eng.tunnel
                    await eventually(lambda: tunnel.failures >= 1)
                    assert not tunnel.up
                else:  # wstunnel: each tunnel is its own connection, refused the same way
                    with pytest.raises(Socks5Error):
                        await socks_open(eng.listeners[0].bound_port, "127.0.0.1", echo)
                    assert eng.wstunnel is not None and eng.wstunnel.opened == 0
            # with one: served
            async with Engine(client(with_cert=True)) as eng:
                reader, writer = await socks_open(eng.listeners[0].bound_port, "127.0.0.1", echo)
                writer.write(b"through mTLS")
                assert await reader.readexactly(12) == b"through mTLS"
                writer.close()
        text = "".join(lines)
        if protocol == "wstunnel":
            assert "(certificate CN=alice)" in text  # the CN names the client
        else:
            assert "user default connected" in text

    run(main())


def test_mtls_stock_wstunnel_client_needs_a_certificate(tmp_path: Path, certs: Certs) -> None:
    ca, cert, key = client_cert(tmp_path, "bob")
    port = free_port()

    async def main() -> None:
        target = _CountingTarget()
        async with (
            target as target_port,
            server_process(
                tmp_path,
                f"wss://127.0.0.1:{port}",
                "--tls-certificate",
                str(certs.cert),
                "--tls-private-key",
                str(certs.key),
                "--tls-client-ca-certs",
                str(ca),
                "--allow",
                "127.0.0.0/8",
            ),
        ):
            # no certificate: the TLS handshake is refused (even with the secret prefix)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await answer(port, forward(target_port, SECRET_PREFIX), ssl_context=peer_tls(certs))
            with_cert = peer_tls(certs)
            with_cert.load_cert_chain(str(cert), str(key))
            status, _ = await answer(port, forward(target_port, "bob"), ssl_context=with_cert)
            assert status == 101
            await eventually(lambda: target.accepted == 1)

    run(main())


# -- 4. authentication failures, limited per source address -------------------------------------


def test_auth_failures_are_limited_per_source_address_in_both_protocols(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = 4.0
    macs = 0
    matches = 0
    real_accept, real_match = handshake.accept_request, SecretPrefixes.match

    def counting_accept(*args: object, **kwargs: object) -> handshake.Accepted:
        nonlocal macs
        macs += 1
        return real_accept(*args, **kwargs)  # type: ignore[arg-type]

    def counting_match(self: SecretPrefixes, prefix: str) -> str | None:
        nonlocal matches
        matches += 1
        return real_match(self, prefix)

    monkeypatch.setattr(handshake, "accept_request", counting_accept)
    monkeypatch.setattr(SecretPrefixes, "match", counting_match)

    async def main() -> None:
        target = _CountingTarget()
        settings = ServerSettings(
            "127.0.0.1",
            0,
            {"default": SECRET},
            policy=DestinationPolicy(("127.0.0.0/8",)),
            auth_failure_limit=10,
            auth_failure_window=window,
        )
        async with target as target_port, TunnelServer(settings) as server:
            service = WstunnelService(server).install()
            port = server.port
            try:
                # 20 bad attempts from 127.0.0.1, native and wstunnel mixed
                statuses = []
                for i in range(20):
                    if i % 2:
                        statuses.append((await answer(port, forward(target_port, "v1")))[0])
                    else:
                        statuses.append((await answer(port, native_request(b"wrong!!!", port)))[0])
                assert statuses[:10] == [403] * 10  # both protocols: the secret refused
                assert statuses[10:] == [429] * 10
                # then good ones from 127.0.0.1: refused at once, nothing compared or dialled
                macs_before, matches_before = macs, matches
                status, _ = await answer(port, native_request(SECRET, port))
                assert status == 429
                status, _ = await answer(port, forward(target_port, SECRET_PREFIX))
                assert status == 429
                assert (macs, matches) == (macs_before, matches_before)
                assert target.accepted == 0
                # the native client says why
                client = TunnelClient(
                    ClientSettings(ServerURL(False, "127.0.0.1", port), "default", SECRET)
                )
                async with client:
                    await eventually(lambda: "429" in (client.last_error or ""))
                    assert "too many authentication failures" in (client.last_error or "")
                # another address is not affected
                status, _ = await answer(port, native_request(SECRET, port), local="127.0.0.2")
                assert status == 101
                status, _ = await answer(
                    port, forward(target_port, SECRET_PREFIX), local="127.0.0.2"
                )
                assert status == 101
                await eventually(lambda: target.accepted == 1)
                # once the window has passed, 127.0.0.1 is served again
                async with asyncio.timeout(window + 15):
                    while (await answer(port, native_request(SECRET, port)))[0] == 429:  # noqa: ASYNC110
                        await asyncio.sleep(0.2)
                status, _ = await answer(port, forward(target_port, SECRET_PREFIX))
                assert status == 101
                await eventually(lambda: target.accepted == 2)
            finally:
                await service.close()

    run(main())


def test_auth_failure_limiter_is_bounded_and_counts_ipv6_by_64() -> None:
    limiter = AuthFailureLimiter(limit=3, window=10.0, max_addresses=100)
    assert not limiter.failed("192.0.2.1", 0.0)
    assert not limiter.failed("192.0.2.1", 1.0)
    assert limiter.failed("192.0.2.1", 2.0)  # the third: blocked now, said once
    assert not limiter.failed("192.0.2.1", 2.5)
    assert limiter.blocked("192.0.2.1", 3.0) == pytest.approx(9.0)
    assert limiter.blocked("192.0.2.2", 3.0) == 0.0
    assert limiter.blocked("192.0.2.1", 12.0) == 0.0  # the back-off is over
    assert not limiter.failed("192.0.2.1", 12.5)  # and counting starts again
    # one /64 is one client; its IPv4-mapped form is the IPv4 address
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    # bounded: old entries go first, and never more than max_addresses
    for i in range(10_000):
        limiter.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 20.0 + i * 0.001)
    assert len(limiter) <= 100
    # 0 turns it off
    off = AuthFailureLimiter(limit=0)
    assert not any(off.failed("192.0.2.1", 0.0) for _ in range(100))
    assert off.blocked("192.0.2.1", 0.0) == 0.0


def test_identify_secret_prefix_in_constant_time_and_never_shown() -> None:
    secrets = SecretPrefixes({"default": SECRET, "alice": ALICE_SECRET.encode()})
    assert secrets.match(ALICE_SECRET) == "alice"
    assert secrets.match(SECRET_PREFIX) == "default"
    assert secrets.match(ALICE_SECRET[:-1]) is None
    assert secrets.match("") is None
    assert ALICE_SECRET not in repr(secrets) and SECRET_PREFIX not in repr(secrets)

    def who(prefix: str, cn: str | None = None, **kw: bool) -> object:
        flags = {"restricted": False, "allow_anonymous": False} | kw
        found = identify(prefix, cn, secrets, **flags)
        return None if found is None else (found.how, found.name)

    assert who("v1") is None
    assert who(ALICE_SECRET) == (How.SECRET, "alice")
    assert who("carol", "carol") == (How.CERTIFICATE, "carol")
    assert who("v1", allow_anonymous=True) == (How.ANONYMOUS, "")
    assert who("v1", restricted=True) == (How.RESTRICTION, "")
    assert (
        access.path_safe(b"abc-_.~09")
        and not access.path_safe(b"a/b")
        and not access.path_safe(b"a b")
    )


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    """A repr ends up in logs and tracebacks: no secret, and no -P prefix made of one."""
    from autovpn.config import ClientConfig, ServerConfig
    from autovpn.tunnel.wstunnel.client import client_settings

    url = ServerURL(True, "127.0.0.1", 8443)
    cc = ClientConfig(url, SECRET, protocol="wstunnel")
    shown = [
        repr(cc),
        repr(ServerConfig(url, {"default": SECRET})),
        repr(ServerSettings("127.0.0.1", 0, {"default": SECRET})),
        repr(ClientSettings(url, "default", SECRET)),
        repr(client_settings(cc)),
    ]
    assert client_settings(cc).path_prefix == SECRET_PREFIX  # --secret-file: the -P prefix
    for text in shown:
        assert SECRET_PREFIX not in text and repr(SECRET) not in text, text
    cc.secret = b"has/a/slash"
    with pytest.raises(ConfigError, match="path"):
        client_settings(cc)


# -- configuration ------------------------------------------------------------------------------


def test_config_keys_and_flags(tmp_path: Path, certs: Certs) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    path = tmp_path / "autovpn.toml"
    path.write_text(
        f'[server]\nlisten = "wss://127.0.0.1:8443"\nsecret_file = "{secret}"\n'
        f'tls_certificate = "{certs.cert}"\ntls_private_key = "{certs.key}"\n'
        f'tls_client_ca_certs = "{certs.ca}"\nallow_anonymous = true\n'
        "auth_failure_limit = 5\nauth_failure_window = 30\n"
        f'[client]\nserver = "wss://127.0.0.1:8443"\nsecret_file = "{secret}"\n'
        f'tls_certificate = "{certs.cert}"\ntls_private_key = "{certs.key}"\n'
    )
    cfg, errors = load_file(path)
    assert not errors, errors
    assert cfg.server is not None and cfg.client is not None
    assert cfg.server.tls_client_ca_certs == certs.ca
    assert cfg.server.allow_anonymous
    assert (cfg.server.auth_failure_limit, cfg.server.auth_failure_window) == (5, 30.0)
    assert (cfg.client.tls_certificate, cfg.client.tls_private_key) == (certs.cert, certs.key)
    path.write_text(
        f'[server]\nlisten = "ws://127.0.0.1:8443"\nsecret_file = "{secret}"\n'
        f'tls_client_ca_certs = "{certs.ca}"\nallow_anonymous = "yes"\n'
        "auth_failure_limit = -1\nauth_failure_window = 0\n"
    )
    _, errors = load_file(path)
    assert sorted(e.key for e in errors) == [
        "server.allow_anonymous",
        "server.auth_failure_limit",
        "server.auth_failure_window",
        "server.tls_client_ca_certs",  # client certificates need wss://
    ]
    # the defaults: closed, 10 failures a minute
    cfg = Config()
    args = cli._parser().parse_args(["server", "ws://127.0.0.1:0", "--secret-file", str(secret)])
    cli._server_from_args(args, cfg)
    assert cfg.server is not None
    assert not cfg.server.allow_anonymous
    assert (cfg.server.auth_failure_limit, cfg.server.auth_failure_window) == (10, 60.0)
    args = cli._parser().parse_args(
        [
            "server",
            "ws://127.0.0.1:0",
            "--secret-file",
            str(secret),
            "--allow-anonymous",
            "--auth-failure-limit",
            "3",
            "--auth-failure-window",
            "1.5",
        ]
    )
    cfg = Config()
    cli._server_from_args(args, cfg)
    assert cfg.server is not None and cfg.server.allow_anonymous
    assert (cfg.server.auth_failure_limit, cfg.server.auth_failure_window) == (3, 1.5)
    with pytest.raises(ConfigError, match="wss://"):
        argv = ["server", "ws://127.0.0.1:0", "--tls-client-ca-certs", str(certs.ca)]
        cli._server_from_args(
            cli._parser().parse_args([*argv, "--secret-file", str(secret)]), Config()
        )
