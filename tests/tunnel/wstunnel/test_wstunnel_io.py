"""wstunnel v10 over real sockets and TLS, against the independent conformance peer
(tests/tunnel/wstunnel/wstunnel_peer.py): the peer plays a stock wstunnel client against the autovpn
server and a stock wstunnel server for the autovpn client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from autovpn.config import ServerURL, WstunnelServerOptions
from autovpn.policy import DestinationPolicy
from autovpn.proxy.dialer import Dialer
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.routing.router import Mode, Router
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.tls import client_context, server_context
from autovpn.tunnel.wstunnel.client import WstunnelClient, WstunnelClientSettings
from autovpn.tunnel.wstunnel.relay import WsSide
from autovpn.tunnel.wstunnel.server import WstunnelService
from autovpn.tunnel.wstunnel.servers import WstunnelServer, WstunnelServers
from autovpn.wire.socks5 import Socks5Error
from autovpn.wire.websocket import Opcode, encode_close, encode_header
from autovpn.wire.wstunnel import Session
from tests.conftest import (
    SECRET,
    SECRET_PREFIX,
    Certs,
    echo_handler,
    run,
    sink_handler,
    socks_open,
    tcp_server,
)
from tests.tunnel.wstunnel import wstunnel_peer as peer
from tests.tunnel.wstunnel.wstunnel_peer import PeerServer

BIG = 20 << 20


@asynccontextmanager
async def autovpn_server(
    certs: Certs | None = None,
    *,
    allow: tuple[str, ...] = ("127.0.0.0/8",),
    client_ca: Path | None = None,
    **options: object,
) -> AsyncIterator[tuple[TunnelServer, WstunnelService]]:
    ctx = server_context(certs.cert, certs.key, client_ca) if certs is not None else None
    settings = ServerSettings(
        "127.0.0.1", 0, {"default": SECRET}, ssl_context=ctx, policy=DestinationPolicy(allow)
    )
    async with TunnelServer(settings) as server:
        service = WstunnelService(server, WstunnelServerOptions(**options)).install()  # type: ignore[arg-type]
        try:
            yield server, service
        finally:
            await service.close()


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


def peer_tls(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_cert(directory: Path, cn: str) -> tuple[Path, Path, Path]:
    """A client CA and a client certificate with CN ``cn`` signed by it: (ca, cert, key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = directory / f"{cn}-ca.pem", directory / f"{cn}.pem", directory / f"{cn}.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


# -- the autovpn server, a stock wstunnel client -------------------------------------------------


def test_server_relays_unmasked_frames_and_answers_101_v1(certs: Certs) -> None:
    async def main() -> None:
        async with autovpn_server(certs) as (server, _), tcp_server(echo_handler) as echo:
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo), key=os.urandom(16))
            answer = await peer.client_connect(
                server.port,
                peer.upgrade_request(f"localhost:{server.port}", jwt, prefix=SECRET_PREFIX),
                ssl_context=peer_tls(certs),
                server_hostname="localhost",
            )
            assert answer.status == 101
            assert peer.header(answer.headers, "sec-websocket-protocol") == "v1"
            stats = peer.PeerStats()
            relay = peer.WsRelay(answer.reader, answer.writer, stats)  # unmasked, as wstunnel
            relay.send(peer.BINARY, b"hello ")
            relay.send(peer.BINARY, b"world")
            got = b""
            while len(got) < 11:
                f = await peer.read_frame(answer.reader)
                assert f.opcode == peer.BINARY and f.mask is None  # the server never masks
                got += f.payload
            assert got == b"hello world"
            # a masked frame (random key, as an RFC client would send) is unmasked
            answer.writer.write(peer.frame(peer.BINARY, b"masked", os.urandom(4)))
            f = await peer.read_frame(answer.reader)
            assert f.payload == b"masked"
            relay.close()  # Close(1000) on our EOF, answered with Close(1000)
            f = await peer.read_frame(answer.reader)
            assert f.opcode == peer.CLOSE and struct.unpack("!H", f.payload[:2])[0] == 1000
            answer.writer.close()

    run(main())


def test_server_takes_a_20_mib_frame_and_sends_close_1000_on_target_eof(certs: Certs) -> None:
    async def main() -> None:
        async with autovpn_server() as (server, _), tcp_server(sink_handler) as sink:
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", sink))
            answer = await peer.client_connect(
                server.port, peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
            )
            assert answer.status == 101
            payload = os.urandom(BIG)
            answer.writer.write(peer.frame(peer.BINARY, payload))
            # wstunnel has no half-close: our Close ends the tunnel, so the sink's digest never
            # comes; instead check what reached the sink by closing from the sink side.
            await answer.writer.drain()
            answer.writer.write(peer.frame(peer.CLOSE, struct.pack("!H", 1000)))
            f = await peer.read_frame(answer.reader)
            assert f.opcode == peer.CLOSE
            answer.writer.close()

        received = bytearray()
        done = asyncio.Event()

        async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while len(received) < BIG:
                data = await reader.read(1 << 20)
                if not data:
                    break
                received.extend(data)
            done.set()  # then close: the server must send Close(1000)

        async with autovpn_server() as (server, _), tcp_server(collect) as port:
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", port))
            answer = await peer.client_connect(
                server.port, peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
            )
            payload = os.urandom(BIG)
            answer.writer.write(peer.frame(peer.BINARY, payload))
            async with asyncio.timeout(20):
                await done.wait()
                f = await peer.read_frame(answer.reader)
            assert f.opcode == peer.CLOSE and f.payload == struct.pack("!H", 1000)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            answer.writer.close()

    run(main())


def test_server_answers_each_ping_once_and_its_own_pings_are_answered(certs: Certs) -> None:
    async def main() -> None:
        async with (
            autovpn_server(ping_interval=0.2) as (server, _),
            tcp_server(echo_handler) as echo,
        ):
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo))
            answer = await peer.client_connect(
                server.port, peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
            )
            stats = peer.PeerStats()
            relay = peer.WsRelay(answer.reader, answer.writer, stats)
            relay.send(peer.PING, b"p1")
            relay.send(peer.PING, b"")
            pump = asyncio.create_task(relay.pump_in(None))
            await asyncio.sleep(0.9)  # the server pings every 0.2 s; we answer each
            relay.close()
            async with asyncio.timeout(5):
                await pump
            assert stats.pongs == [b"p1", b""]
            assert stats.unsolicited_pongs == 0
            server_pings = [m for op, m in stats.frames_in if op == peer.PING]
            assert len(server_pings) >= 2 and all(m is None for m in server_pings)
            answer.writer.close()

    run(main())


def test_server_400_answers_in_wstunnel_order(certs: Certs, tmp_path: Path) -> None:
    """wstunnel's 400 ``Invalid request`` for every refusal, except ours to a request nobody
    vouches for (no secret prefix, no certificate, no operator's rule matches): 403."""

    async def expect_400(port: int, request: bytes) -> None:
        answer = await peer.client_connect(port, request)
        assert answer.status == 400, answer.status
        assert answer.body == b"Invalid request"
        answer.writer.close()

    async def expect_403(port: int, request: bytes) -> None:
        answer = await peer.client_connect(port, request)
        assert (answer.status, answer.body) == (403, b"Forbidden")
        answer.writer.close()

    async def main() -> None:
        async with tcp_server(echo_handler) as echo:
            good = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo))
            async with autovpn_server(restrict_path_prefixes=("s3cret",)) as (server, svc):
                p = server.port
                await expect_400(p, peer.upgrade_request("x", good, drop=("upgrade",)))
                await expect_400(p, peer.upgrade_request("x", good, path="/s3cret/x/evnts"))
                await expect_400(p, peer.upgrade_request("x", "not.a.jwt", prefix="s3cret"))
                await expect_403(p, peer.upgrade_request("x", good))  # prefix not allowed
                bad_host = peer.make_jwt({**peer.tcp_claims("::1", echo), "r": "::1"})
                await expect_400(p, peer.upgrade_request("x", bad_host, prefix="s3cret"))
                await expect_400(
                    p,
                    peer.upgrade_request(
                        "x", good, prefix="s3cret", drop=("sec-websocket-version",)
                    ),
                )
                closed = peer.make_jwt(peer.tcp_claims("127.0.0.1", 1))  # refused: a 400 too
                await expect_400(p, peer.upgrade_request("x", closed, prefix="s3cret"))
                ok = await peer.client_connect(p, peer.upgrade_request("x", good, prefix="s3cret"))
                assert ok.status == 101
                ok.writer.close()
                assert svc.refused == 7
            # our destination policy on top: loopback is refused by default
            async with autovpn_server(allow=()) as (server, _):
                await expect_400(server.port, peer.upgrade_request("x", good, prefix=SECRET_PREFIX))
            # --restrict-to matches the JWT's r string
            async with autovpn_server(restrict_to=(f"localhost:{echo}",)) as (server, _):
                authed = peer.upgrade_request("x", good, prefix=SECRET_PREFIX)
                await expect_400(server.port, authed)
                by_name = peer.make_jwt(peer.tcp_claims("localhost", echo))
                authed = peer.upgrade_request("x", by_name, prefix=SECRET_PREFIX)
                ok = await peer.client_connect(server.port, authed)
                assert ok.status == 101
                ok.writer.close()
            # --restrict-config, reloaded when it changes
            rules = tmp_path / "restrictions.yaml"
            rules.write_text(
                "restrictions:\n  - name: auth\n    match:\n"
                "      - !Authorization '^Bearer tok$'\n    allow:\n      - !Tunnel\n"
            )
            async with autovpn_server(restrict_config=rules) as (server, _):
                await expect_403(server.port, peer.upgrade_request("x", good))
                authed = peer.upgrade_request("x", good, extra=[("authorization", "Bearer tok")])
                ok = await peer.client_connect(server.port, authed)
                assert ok.status == 101
                ok.writer.close()
                rules.write_text(rules.read_text().replace("tok$", "other$"))
                os.utime(rules, (1, 1))
                await expect_403(server.port, authed)
            # a request that is not wstunnel-shaped is left to the native server (404)
            async with autovpn_server() as (server, _):
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.write(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await r.readline()).startswith(b"HTTP/1.1 404")
                w.close()

    run(main())


def test_server_mtls_cn_must_be_the_path_prefix(certs: Certs, tmp_path: Path) -> None:
    async def main() -> None:
        ca, cert, key = client_cert(tmp_path, "alice")
        async with (
            autovpn_server(certs, client_ca=ca) as (server, _),
            tcp_server(echo_handler) as echo,
        ):
            ctx = peer_tls(certs)
            ctx.load_cert_chain(str(cert), str(key))
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo))
            for prefix, status in (("v1", 400), ("alice", 101)):
                answer = await peer.client_connect(
                    server.port,
                    peer.upgrade_request("x", jwt, prefix=prefix),
                    ssl_context=ctx,
                    server_hostname="localhost",
                )
                assert answer.status == status
                answer.writer.close()

    run(main())


# -- the autovpn client, a stock wstunnel server -------------------------------------------------


@asynccontextmanager
async def autovpn_client(
    settings: WstunnelClientSettings,
) -> AsyncIterator[tuple[WstunnelClient, int]]:
    async with WstunnelClient(settings) as client:
        listener = ProxyListener(
            ListenerKind.SOCKS5, "127.0.0.1", 0, Dialer(Router(Mode.GLOBAL), client)
        )
        await listener.start()
        try:
            yield client, listener.bound_port
        finally:
            await listener.close()


def peer_server_tls(certs: Certs, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.cert), str(certs.key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_client_request_jwt_and_zero_masked_frames(certs: Certs, tmp_path: Path) -> None:
    headers_file = tmp_path / "headers"
    headers_file.write_text("X-From-File: 1\n")

    async def main() -> None:
        async with (
            PeerServer(ssl_context=peer_server_tls(certs)) as wst,
            tcp_server(echo_handler) as echo,
        ):
            settings = WstunnelClientSettings(
                ServerURL(True, "127.0.0.1", wst.port),
                ssl_context=client_context(certs.ca),
                sni="localhost",
                path_prefix="pfx",
                headers=(("X-Custom", "yes"),),
                headers_file=headers_file,
                credentials="user:pass",
            )
            async with autovpn_client(settings) as (_, socks):
                reader, writer = await socks_open(socks, "127.0.0.1", echo)
                writer.write(b"ping through wstunnel")
                assert await reader.readexactly(21) == b"ping through wstunnel"
                headers_file.write_text("X-From-File: 2\n")  # re-read for every request
                r2, w2 = await socks_open(socks, "127.0.0.1", echo)
                w2.write(b"again")
                assert await r2.readexactly(5) == b"again"
                writer.close()
                w2.close()
                await asyncio.sleep(0.2)
            line, headers = wst.stats.requests[0]
            assert line == "GET /pfx/events HTTP/1.1"
            assert [k for k, _ in headers][:6] == [
                "host",
                "upgrade",
                "connection",
                "sec-websocket-key",
                "sec-websocket-version",
                "sec-websocket-protocol",
            ]
            assert peer.header(headers, "host") == f"127.0.0.1:{wst.port}"
            assert peer.header(headers, "x-custom") == "yes"
            assert peer.header(headers, "authorization") == "Basic dXNlcjpwYXNz"
            assert peer.header(headers, "x-from-file") == "1"
            assert peer.header(wst.stats.requests[1][1], "x-from-file") == "2"
            proto = peer.header(headers, "sec-websocket-protocol") or ""
            assert proto.startswith("v1, authorization.bearer.")
            jwt = proto.removeprefix("v1, authorization.bearer.")
            assert peer.jwt_signature_ok(jwt)
            claims = peer.jwt_claims(jwt)
            assert list(claims) == ["id", "p", "r", "rp"]
            assert claims["p"] == {"Tcp": {"proxy_protocol": False}}
            assert (claims["r"], claims["rp"]) == ("127.0.0.1", echo)
            assert wst.stats.sni == ["localhost"] * 3  # the first probe, then each tunnel
            data_frames = [m for op, m in wst.stats.frames_in if op == peer.BINARY]
            assert data_frames and all(m == b"\0\0\0\0" for m in data_frames)
            assert 1000 in wst.stats.closes_received  # Close(1000) on EOF

    run(main())


def test_client_receives_a_20_mib_frame_and_answers_pings_once(certs: Certs) -> None:
    payload = os.urandom(BIG)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with (
            PeerServer(frame_size=BIG, ping_payloads=(b"a", b"bb", b"")) as wst,
            tcp_server(source) as port,
        ):
            settings = WstunnelClientSettings(ServerURL(False, "127.0.0.1", wst.port))
            async with autovpn_client(settings) as (_, socks):
                reader, writer = await socks_open(socks, "127.0.0.1", port)
                async with asyncio.timeout(20):
                    got = await reader.readexactly(BIG)
                assert got == payload
                writer.close()
                await asyncio.sleep(0.2)
            assert wst.stats.pongs == [b"a", b"bb", b""]
            assert wst.stats.unsolicited_pongs == 0

    run(main())


def test_client_maps_a_400_to_a_socks_failure_and_pool_preconnects(certs: Certs) -> None:
    async def main() -> None:
        async with PeerServer(answer_status=400) as wst, tcp_server(echo_handler) as echo:
            settings = WstunnelClientSettings(ServerURL(False, "127.0.0.1", wst.port), min_idle=2)
            async with autovpn_client(settings) as (client, socks):
                await wait_until(lambda: client.pool_size == 2)
                assert wst.stats.connections == 2 and not wst.stats.requests
                try:
                    await socks_open(socks, "127.0.0.1", echo)
                except Socks5Error as exc:
                    assert exc.reply_code == 1
                else:
                    raise AssertionError("a 400 opened a tunnel")
                assert len(wst.stats.requests) == 1
                await wait_until(lambda: client.pool_size == 2)  # the pool refills

    run(main())


def test_client_mtls_certificate_reaches_the_server(certs: Certs, tmp_path: Path) -> None:
    async def main() -> None:
        ca, cert, key = client_cert(tmp_path, "bob")
        async with (
            PeerServer(ssl_context=peer_server_tls(certs, ca)) as wst,
            tcp_server(echo_handler) as echo,
        ):
            ctx = client_context(certs.ca, certificate=cert, private_key=key)
            settings = WstunnelClientSettings(
                ServerURL(True, "127.0.0.1", wst.port), ssl_context=ctx, sni="localhost"
            )
            async with autovpn_client(settings) as (_, socks):
                reader, writer = await socks_open(socks, "127.0.0.1", echo)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                writer.close()
            assert wst.stats.client_cn[0] == "bob"

    run(main())


# -- both ends autovpn ---------------------------------------------------------------------------


def test_autovpn_client_to_autovpn_server_in_the_wstunnel_protocol(certs: Certs) -> None:
    async def main() -> None:
        async with (
            autovpn_server(certs) as (server, svc),
            tcp_server(sink_handler) as sink,
        ):
            settings = WstunnelClientSettings(
                ServerURL(True, "127.0.0.1", server.port),
                ssl_context=client_context(certs.ca),
                sni="localhost",
                path_prefix=SECRET_PREFIX,
            )
            async with autovpn_client(settings) as (_, socks):
                reader, writer = await socks_open(socks, "127.0.0.1", sink)
                data = os.urandom(3 << 20)
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.close()
            assert svc.accepted == 1

    run(main())


# -- reverse tunnels (section 5.6) -------------------------------------------------------------


def test_server_reverse_tcp_holds_the_request_until_a_connection_and_idles_out() -> None:
    from tests.conftest import free_port

    async def main() -> None:
        bind = free_port()
        async with autovpn_server(reverse_idle_timeout=0.5) as (server, svc):
            claims = {"id": "r", "p": "ReverseTcp", "r": "127.0.0.1", "rp": bind}
            jwt = peer.make_jwt(claims)
            # two clients wait on the same listener (several waiting clients)
            waits = [
                asyncio.create_task(
                    peer.client_connect(
                        server.port, peer.upgrade_request("x", jwt, prefix=SECRET_PREFIX)
                    )
                )
                for _ in range(2)
            ]
            await wait_until(lambda: len(svc.reverse.listeners) == 1)
            await asyncio.sleep(0.1)
            assert not any(w.done() for w in waits)  # held unanswered
            r1, w1 = await asyncio.open_connection("127.0.0.1", bind)
            w1.write(b"first")
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            answer = done.pop().result()
            assert answer.status == 101
            f = await peer.read_frame(answer.reader)
            assert f.payload == b"first"
            answer.writer.write(peer.frame(peer.BINARY, b"back"))
            assert await r1.readexactly(4) == b"back"
            r2, w2 = await asyncio.open_connection("127.0.0.1", bind)  # the second waiter
            other = [w for w in waits if not w.done() or w.result() is not answer]
            second = await other[0]
            assert second.status == 101
            for a in (answer, second):
                a.writer.close()
            w1.close()
            w2.close()
            # nobody waits any more: the listener closes after the idle timeout
            await wait_until(lambda: not svc.reverse.listeners)
            try:
                _, w3 = await asyncio.open_connection("127.0.0.1", bind)
            except OSError:
                pass
            else:
                w3.close()
                raise AssertionError("the idle reverse listener is still open")

    run(main())


def test_autovpn_client_reverse_tcp_and_socks5_through_autovpn_server() -> None:
    from tests.conftest import free_port

    async def main() -> None:
        tcp_bind, socks_bind = free_port(), free_port()
        async with autovpn_server() as (server, _), tcp_server(echo_handler) as echo:
            settings = WstunnelClientSettings(
                ServerURL(False, "127.0.0.1", server.port), path_prefix=SECRET_PREFIX
            )
            async with WstunnelServers(
                [WstunnelServer(settings)],
                reverse=(f"tcp://{tcp_bind}:127.0.0.1:{echo}", f"socks5://127.0.0.1:{socks_bind}"),
            ) as client:
                for _ in range(2):  # the client re-arms after each connection
                    for _attempt in range(100):
                        try:
                            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_bind)
                            break
                        except OSError:
                            await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("reverse listener never opened")
                    writer.write(b"reverse!")
                    assert await reader.readexactly(8) == b"reverse!"
                    writer.close()
                reader, writer = await socks_open(socks_bind, "127.0.0.1", echo)
                writer.write(b"dynamic")
                assert await reader.readexactly(7) == b"dynamic"
                writer.close()
                assert client.reverse[0].served == 2 and client.reverse[1].served == 1

    run(main())


def test_server_udp_tunnel_one_datagram_per_frame_both_ways() -> None:
    """wstunnel -L 'udp://51820:127.0.0.1:PORT?timeout_sec=0' (the WireGuard set-up)."""

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(b"echo:" + data, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        port = echo.get_extra_info("sockname")[1]
        try:
            async with autovpn_server() as (server, _):
                claims = {"id": "u", "p": {"Udp": {"timeout": None}}, "r": "127.0.0.1", "rp": port}
                answer = await peer.client_connect(
                    server.port,
                    peer.upgrade_request("x", peer.make_jwt(claims), prefix=SECRET_PREFIX),
                )
                assert answer.status == 101
                sizes = [1, 100, 1420, 60000]
                # several datagrams in one write: boundaries come from the frames alone
                answer.writer.write(
                    b"".join(peer.frame(peer.BINARY, bytes([n % 251]) * n) for n in sizes)
                )
                got: list[bytes] = []
                async with asyncio.timeout(5):
                    while len(got) < len(sizes):
                        f = await peer.read_frame(answer.reader)
                        assert f.opcode == peer.BINARY
                        got.append(f.payload)
                assert sorted(got, key=len) == [b"echo:" + bytes([n % 251]) * n for n in sizes]
                answer.writer.close()
        finally:
            echo.close()

    run(main())


def test_server_http2_transport_h2c_and_alpn_h2(certs: Certs) -> None:
    async def main() -> None:
        for tls in (False, True):
            async with (
                autovpn_server(certs if tls else None) as (server, svc),
                tcp_server(echo_handler) as echo,
            ):
                ctx = None
                if tls:
                    ctx = peer_tls(certs)
                    ctx.set_alpn_protocols(["h2"])
                jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", echo))
                t = await peer.H2Tunnel.open(
                    server.port, jwt, prefix=SECRET_PREFIX, ssl_context=ctx
                )
                assert t.status == 200
                assert t.headers.get("content-type") == "application/json"
                payload = os.urandom(200_000)  # past the 64 KiB initial window
                async with asyncio.timeout(10):
                    await t.send(payload)
                    assert await t.receive(len(payload)) == payload
                await t.end()
                t.close()
                bad = peer.make_jwt(peer.tcp_claims("127.0.0.1", 1))
                t = await peer.H2Tunnel.open(
                    server.port, bad, prefix=SECRET_PREFIX, ssl_context=ctx
                )
                assert t.status == 400
                async with asyncio.timeout(5):
                    assert await t.receive(15) == b"Invalid request"
                t.close()
                assert svc.accepted == 1 and svc.refused == 1

    run(main())


def test_server_http2_stream_reset_or_lost_resets_the_target() -> None:
    """END_STREAM ends the destination socket cleanly; RST_STREAM, or the HTTP/2 connection
    lost, resets it: an upload cut short must not look complete there."""

    async def main() -> None:
        ends: asyncio.Queue[str] = asyncio.Queue()

        async def record(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            try:
                while await reader.read(1 << 16):
                    pass
            except ConnectionResetError:
                ends.put_nowait("reset")
            else:
                ends.put_nowait("eof")

        async with autovpn_server() as (server, _), tcp_server(record) as target:
            jwt = peer.make_jwt(peer.tcp_claims("127.0.0.1", target))
            for how in ("end", "rst_stream", "connection lost"):
                t = await peer.H2Tunnel.open(server.port, jwt, prefix=SECRET_PREFIX)
                assert t.status == 200
                await t.send(os.urandom(100_000))
                if how == "end":
                    await t.end()
                elif how == "rst_stream":
                    t.conn.reset_stream(t.stream_id)
                    t.writer.write(t.conn.data_to_send())
                else:
                    t.writer.transport.abort()
                async with asyncio.timeout(10):
                    assert await ends.get() == ("eof" if how == "end" else "reset"), how
                t.close()

    run(main())


def test_a_server_that_is_down_fails_at_once_and_is_used_again_once_it_is_up() -> None:
    """No server up: a connection waits only for the probe it starts itself, then fails
    saying why (before: each one retried for --connection-retry-max-backoff, 5 min by
    default); the probes back off; once the server answers, the same client opens tunnels."""
    from autovpn.errors import TunnelUnavailable
    from tests.conftest import free_port

    async def main() -> None:
        port = free_port()  # nothing listens yet
        settings = WstunnelClientSettings(
            ServerURL(False, "127.0.0.1", port), max_backoff=1.0, path_prefix=SECRET_PREFIX
        )
        async with WstunnelServers([WstunnelServer(settings)]) as servers:
            (client,) = servers.clients
            await wait_until(lambda: client.failures >= 1)
            for _ in range(3):
                try:
                    await servers.open_upstream("127.0.0.1", 9)
                except TunnelUnavailable as exc:
                    assert f"connection refused by 127.0.0.1:{port}" in str(exc)
                    assert exc.public.startswith("tunnel down: ") and "refused" in exc.public
                else:
                    raise AssertionError("opened a tunnel to nowhere")
            assert client.state == "connecting" and not servers.up
            # once a server is up, the same client opens tunnels again
            async with tcp_server(echo_handler) as echo, autovpn_server() as (server, _):
                settings.server = ServerURL(False, "127.0.0.1", server.port)
                upstream = await servers.open_upstream("127.0.0.1", echo)
                assert client.opened == 1 and client.state == "up"
                upstream.ws.abort()

    run(main())


def test_destination_bytes_read_before_the_relay_starts_are_kept() -> None:
    """The server dials the destination before its 101; a destination that speaks first (an
    SSH banner) may be read by then: uvloop starts reading after ``connection_made`` whatever
    it asked.  Those bytes are the first frame, not dropped, and an EOF read with them still
    ends the tunnel with Close(1000) after them."""
    banner = b"SSH-2.0-speaks-first\r\n"
    close = encode_header(Opcode.CLOSE, 2) + encode_close(1000)

    async def one(said: bytes) -> None:
        loop = asyncio.get_running_loop()

        async def speak_first(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(said)
            writer.write_eof()
            await writer.drain()

        async with tcp_server(speak_first) as port:
            ws = WsSide(Session(client=False), ping_interval=0)
            local, _ = await loop.create_connection(lambda: ws.local, "127.0.0.1", port)
            await asyncio.sleep(0.1)  # the bytes arrive while the upgrade is answered
            ours, theirs = socket.socketpair()
            with theirs:
                ws_transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
                ws.start(ws_transport)
                ws.attach_local(local)
                theirs.setblocking(False)
                expected = close
                if said:
                    expected = Session(client=False).data_header(len(said)) + said + close
                got = b""
                async with asyncio.timeout(10):
                    while len(got) < len(expected):
                        got += await loop.sock_recv(theirs, 4096)
                assert got == expected
                ws.abort()

    async def main() -> None:
        await one(banner)  # a banner, then EOF
        await one(b"")  # EOF at once

    run(main())
