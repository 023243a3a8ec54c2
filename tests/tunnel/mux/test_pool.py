"""The server pool and the client's connect logic, on real in-process servers (loopback, TLS).

- Permanent errors are told from transient ones (``permanent_reason``).
- Backup IPs: a server name's addresses are tried in turn, the last good one first (with an
  injected resolver: no test name reaches the system resolver).
- Priority and weight choose the server of each new stream; a destination's own refusal is
  not retried on another server, a lost tunnel is.
- UDP flows move to the backup when their server goes, and back when it returns.
- The mode fallback: smart mode's default route goes direct while every server is down (rules
  and lists never), and back through the tunnel when one returns.
- ``servers`` in the config and on the command line.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from autovpn.cli import _client_from_args, _parser
from autovpn.config import (
    ClientConfig,
    Config,
    ListenSpec,
    RoutingConfig,
    ServerEntry,
    ServerURL,
    parse_config,
)
from autovpn.engine import Engine
from autovpn.errors import ResetReason, StreamError, TunnelUnavailable
from autovpn.policy import DestinationPolicy
from autovpn.routing.router import Mode
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient, permanent_reason
from autovpn.tunnel.mux.pool import PoolServer, ServerPool
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.tls import client_context, server_context
from autovpn.wire import socks5
from autovpn.wire.handshake import HandshakeError
from tests.conftest import (
    SECRET,
    Certs,
    echo_handler,
    eventually,
    free_port,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.tunnel.mux.test_udp import udp_echo

# -- permanent or transient -----------------------------------------------------------------------


def test_permanent_errors_are_told_from_transient_ones() -> None:
    refused = permanent_reason(HandshakeError("tunnel server answered HTTP 403", 403))
    assert refused.startswith("server refused the secret")
    assert "server refused the secret" in permanent_reason(HandshakeError("", 401))
    assert "older autovpn" in permanent_reason(HandshakeError("", 400))
    assert "path" in permanent_reason(HandshakeError("", 404))
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate in certificate chain"
    cert.verify_code = 19  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    assert permanent_reason(cert) == (
        "server certificate not trusted (self-signed certificate in certificate"
        " chain): if the server uses a private CA (autovpn cert wrote its ca.pem), trust it"
        " with --tls-ca FILE (tls_ca in [client])"
    )
    for transient in (
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        OSError("all 2 addresses failed"),
        HandshakeError("tunnel server answered HTTP 502: upgrade refused", 502),
        HandshakeError("wrong Sec-WebSocket-Accept from the tunnel server", 502),
        ssl.SSLError("record layer failure"),
    ):
        assert permanent_reason(transient) == "", transient


# -- in-process servers ---------------------------------------------------------------------------


@asynccontextmanager
async def tunnel_server(certs: Certs, port: int = 0) -> AsyncIterator[TunnelServer]:
    settings = ServerSettings(
        "127.0.0.1",
        port,
        {"default": SECRET},
        ssl_context=server_context(certs.cert, certs.key),
        policy=DestinationPolicy(["127.0.0.0/8"]),
    )
    async with TunnelServer(settings) as server:
        yield server


def settings_for(certs: Certs, port: int, host: str = "127.0.0.1") -> ClientSettings:
    return ClientSettings(
        ServerURL(True, host, port),
        "default",
        SECRET,
        ssl_context=client_context(certs.ca),
        connect_timeout=5.0,
    )


def test_backup_ips_are_tried_in_turn_the_last_good_first(certs: Certs) -> None:
    """``tunnel.test.example`` resolves to 127.0.0.2 (nothing listens there: refused) and
    127.0.0.1 (the server): the connection comes up on the second, which is tried first from
    then on; TLS still checks the name, not the address."""
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.2", "127.0.0.1"]

    async def main() -> None:
        async with tunnel_server(certs) as server:
            settings = settings_for(certs, server.port, "tunnel.test.example")
            settings.resolve = resolve
            async with TunnelClient(settings) as client:
                assert await client.wait_up(10), client.last_error
                assert client.address == "127.0.0.1"
                assert asked == ["tunnel.test.example"]
                assert await client.addresses() == ["127.0.0.1", "127.0.0.2"]
                # Every address refuses: one error naming each.
                settings.resolve = lambda host, port: _addresses("127.0.0.2", "127.0.0.3")
                with pytest.raises(OSError, match="all 2 addresses failed: 127.0.0.2: .*127.0.0.3"):
                    await client.connect_once()

    run(main())


async def _addresses(*found: str) -> list[str]:
    return list(found)


@asynccontextmanager
async def pool_of(
    certs: Certs, servers: list[tuple[int, int, int]], **kwargs: object
) -> AsyncIterator[ServerPool]:
    """A pool of (port, priority, weight) servers, up on every server that listens."""
    members = [
        PoolServer(settings_for(certs, port), prio, weight) for port, prio, weight in servers
    ]
    async with ServerPool(members, **kwargs) as pool:  # type: ignore[arg-type]
        yield pool


def test_new_streams_go_to_the_best_priority_then_by_weight(certs: Certs) -> None:
    async def main() -> None:
        async with (
            tcp_server(echo_handler) as echo,
            tunnel_server(certs) as a,
            tunnel_server(certs) as b,
            tunnel_server(certs) as c,
            pool_of(
                certs,
                [(a.port, 1, 1), (b.port, 2, 3), (c.port, 2, 1)],
                rng=random.Random(15),
            ) as pool,
        ):
            ca, cb, cc = pool.clients
            await eventually(lambda: ca.up and cb.up and cc.up)
            for _ in range(40):
                ep = await pool.open_stream("127.0.0.1", echo)
                ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED)
            assert (ca.streams_opened, cb.streams_opened, cc.streams_opened) == (40, 0, 0)
            await a.close()  # the primary goes: its connection is lost at once
            await eventually(lambda: not ca.up)
            for _ in range(400):
                ep = await pool.open_stream("127.0.0.1", echo)
                ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED)
            assert cb.streams_opened + cc.streams_opened == 400
            assert 250 <= cb.streams_opened <= 350  # weight 3 to 1: about 300 to 100

    run(main())


def test_a_destination_refusal_is_not_retried_a_lost_tunnel_is(certs: Certs) -> None:
    async def main() -> None:
        refused = free_port()  # nothing listens there
        async with (
            tcp_server(echo_handler) as echo,
            tunnel_server(certs) as a,
            tunnel_server(certs) as b,
            pool_of(certs, [(a.port, 1, 1), (b.port, 2, 1)]) as pool,
        ):
            ca, cb = pool.clients
            await eventually(lambda: ca.up and cb.up)
            with pytest.raises(StreamError) as failed:
                await pool.open_stream("127.0.0.1", refused)
            assert failed.value.reason is ResetReason.CONNECTION_REFUSED
            assert not failed.value.tunnel
            assert pool.retried == 0  # the backup never dialled it:
            assert (b.streams_opened, b.streams_failed) == (0, 0)

            # A stream whose tunnel is lost before the server answers: tried on the backup.
            (conn,) = ca.connections
            opening = asyncio.ensure_future(pool.open_stream("127.0.0.1", echo))
            await asyncio.sleep(0)  # the OPEN is written...
            conn.abort()  # ...and the connection dies before OPEN_OK
            ep = await opening
            assert ep.conn in cb.connections and pool.retried == 1
            ep.conn.reset_stream(ep.sid, ResetReason.CANCELLED)

    run(main())


def test_with_no_server_up_a_stream_fails_at_once_saying_why(certs: Certs) -> None:
    """Two servers whose ports refuse: after the attempts the stream itself started, it fails
    (not after the connect timeout), naming both."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        p1, p2 = free_port(), free_port()
        async with pool_of(certs, [(p1, 1, 1), (p2, 2, 1)]) as pool:
            assert not await pool.wait_up(0.5)
            started = loop.time()
            with pytest.raises(TunnelUnavailable) as failed:
                await pool.open_stream("127.0.0.1", 9)
            assert loop.time() - started < 3.0  # one demand attempt, not the 5 s timeout
            assert not failed.value.permanent
            assert f"127.0.0.1:{p1}" in str(failed.value) and f"127.0.0.1:{p2}" in str(failed.value)
            assert failed.value.public.startswith("tunnel down: ")

    run(main())


def test_a_wrong_secret_is_permanent_no_retry_until_the_long_backoff(certs: Certs) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel_server(certs) as server:
            settings = settings_for(certs, server.port)
            settings.secret = b"not-the-secret!!"
            async with ServerPool([PoolServer(settings)]) as pool:
                assert not await pool.wait_up(5)  # returns as soon as the refusal is known
                (client,) = pool.clients
                assert client.state == "down" and client.permanent.startswith(
                    "server refused the secret"
                )
                refused = server.refused
                for _ in range(5):
                    started = loop.time()
                    with pytest.raises(TunnelUnavailable) as failed:
                        await pool.open_stream("127.0.0.1", 9)
                    assert loop.time() - started < 0.5
                    assert failed.value.permanent
                    assert failed.value.public.startswith("tunnel down: server refused the secret")
                await asyncio.sleep(1.0)
                assert server.refused == refused  # no new attempt: the backoff is minutes

    run(main())


# -- UDP flows follow the best server ------------------------------------------------------------


def test_udp_flows_move_to_the_backup_and_back(certs: Certs) -> None:
    async def main() -> None:
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def exchange(pool: ServerPool, flow: int, echo: int, data: bytes) -> None:
            """Send until the echo comes back (the first datagrams after a loss may drop)."""
            async with asyncio.timeout(15):
                while True:
                    pool.send_datagram(flow, "127.0.0.1", echo, data)
                    try:
                        async with asyncio.timeout(0.2):
                            while await replies.get() != data:
                                pass
                        return
                    except TimeoutError:
                        continue

        port_a = free_port()
        async with udp_echo() as echo, tunnel_server(certs) as b:
            a = TunnelServer(
                ServerSettings(
                    "127.0.0.1",
                    port_a,
                    {"default": SECRET},
                    ssl_context=server_context(certs.cert, certs.key),
                    policy=DestinationPolicy(["127.0.0.0/8"]),
                )
            )
            await a.start()
            try:
                async with pool_of(certs, [(port_a, 1, 1), (b.port, 2, 1)]) as pool:
                    ca, cb = pool.clients
                    await eventually(lambda: ca.up and cb.up)
                    flow = pool.open_flow(lambda host, port, data: replies.put_nowait(data))
                    assert a.udp is not None and b.udp is not None
                    await exchange(pool, flow, echo, b"one")
                    assert a.udp.stats.datagrams_in >= 1 and b.udp.stats.datagrams_in == 0
                    await a.close()
                    await exchange(pool, flow, echo, b"two")
                    on_backup = b.udp.stats.datagrams_in
                    assert on_backup >= 1
                    async with tunnel_server(certs, port_a) as back:
                        await eventually(lambda: ca.up, within=15)
                        await exchange(pool, flow, echo, b"three")  # fail-back
                        assert back.udp is not None and back.udp.stats.datagrams_in >= 1
                        assert b.udp.stats.datagrams_in == on_backup
                    pool.close_flow(flow)
            finally:
                await a.close()

    run(main())


# -- mode fallback --------------------------------------------------------------------------------


def test_smart_default_route_falls_back_to_direct_while_every_server_is_down(
    certs: Certs, tmp_path: Path
) -> None:
    """fallback_direct_after = 1: with the only server down, a name on smart mode's default
    route goes direct after 1 s; a REJECT rule and a proxy rule are kept (refused, and failing
    at once); when the server is up again the default route goes through the tunnel again."""

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # the server's resolver: every test name is this host

    async def main() -> None:
        port = free_port()
        async with tcp_server(echo_handler) as echo:
            hosts = tmp_path / "hosts"
            hosts.write_text("127.0.0.1 default.test proxied.test blocked.test\n")
            routing = RoutingConfig(
                default_lists=False,
                rules=["domain:blocked.test=reject", "domain:proxied.test=proxy"],
                hosts_file=hosts,
                dns_local=["127.0.0.1:9"],  # never asked: the hosts file answers
            )
            cc = ClientConfig(
                server=ServerURL(True, "127.0.0.1", port),
                secret=SECRET,
                tls_ca=certs.ca,
                listen=[ListenSpec("socks5", "127.0.0.1", 0)],
                fallback_direct_after=1.0,
            )
            cfg = Config(client=cc, mode=Mode.SMART, routing=routing, control=None)
            async with Engine(cfg) as eng:
                socks = socks_port(eng)
                assert eng.pool is not None
                await eventually(lambda: eng.pool is not None and eng.pool.fallback_direct)
                reader, writer = await socks_open(socks, "default.test", echo)
                writer.write(b"direct")
                assert await reader.readexactly(6) == b"direct"
                writer.close()
                with pytest.raises(socks5.Socks5Error) as rejected:
                    await socks_open(socks, "blocked.test", echo)
                assert rejected.value.reply_code == socks5.Reply.NOT_ALLOWED
                with pytest.raises(socks5.Socks5Error) as unavailable:
                    await socks_open(socks, "proxied.test", echo)
                assert unavailable.value.reply_code == socks5.Reply.GENERAL_FAILURE
                assert eng.status()["tunnel"]["fallback_direct"] is True  # type: ignore[index]

                async with tunnel_server(certs, port) as server:
                    server.settings.resolve = resolve
                    await eventually(lambda: eng.pool is not None and eng.pool.up, within=15)
                    await eventually(lambda: eng.pool is not None and not eng.pool.fallback_direct)
                    reader, writer = await socks_open(socks, "default.test", echo)
                    writer.write(b"tunnel")
                    assert await reader.readexactly(6) == b"tunnel"
                    writer.close()
                    assert server.streams_opened == 1  # through the tunnel again

    run(main())


# -- configuration --------------------------------------------------------------------------------


def test_servers_in_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    client = {
        "secret_file": "secret",
        "servers": [{"url": "wss://a.example:443", "priority": 1}, "wss://b.example:8443"],
        "retries": 5,
        "fallback_direct_after": 30,
    }
    cfg, errors = parse_config({"client": client}, tmp_path)
    assert errors == [] and cfg.client is not None
    assert cfg.client.servers == [
        ServerEntry(ServerURL(True, "a.example", 443), 1, 1),
        ServerEntry(ServerURL(True, "b.example", 8443), 1, 1),
    ]
    assert cfg.client.server == ServerURL(True, "a.example", 443)  # the first
    assert (cfg.client.retries, cfg.client.fallback_direct_after) == (5, 30.0)

    both = client | {"server": "wss://c.example"}
    assert [e.key for e in parse_config({"client": both}, tmp_path)[1]] == ["client.servers"]
    neither = {"secret_file": "secret"}
    (error,) = parse_config({"client": neither}, tmp_path)[1]
    assert error.key == "client.server" and "servers" in error.reason
    bad = client | {"servers": [{"priority": 1}, {"url": "https://x", "weight": 0}]}
    keys = [e.key for e in parse_config({"client": bad}, tmp_path)[1]]
    assert keys == ["client.servers[0]", "client.servers[1].url", "client.servers[1].weight"]


def test_several_servers_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOVPN_SECRET", SECRET.decode())
    args = _parser().parse_args(
        ["client", "--retries", "4", "wss://a.example", "ws://b.example:8080"]
    )
    cfg = Config()
    _client_from_args(args, cfg)
    assert cfg.client is not None
    assert [(str(e.url), e.priority) for e in cfg.client.servers] == [
        ("wss://a.example:443", 1),
        ("ws://b.example:8080", 2),
    ]
    assert cfg.client.retries == 4
    one = _parser().parse_args(["client", "wss://a.example"])
    cfg = Config()
    _client_from_args(one, cfg)
    assert cfg.client is not None and cfg.client.servers == []
