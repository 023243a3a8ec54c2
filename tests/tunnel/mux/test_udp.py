"""UDP through the tunnel: the fixed relay and SOCKS5 UDP ASSOCIATE, over real sockets and TLS."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from autovpn.config import ListenSpec
from autovpn.engine import Engine
from autovpn.tunnel.mux import udp as udp_server
from autovpn.tunnel.mux.udp import UdpFlows
from autovpn.wire import socks5
from tests.conftest import Certs, engine_config, eventually, run, socks_port


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait((data, (str(addr[0]), int(addr[1]))))


@asynccontextmanager
async def udp_socket(port: int = 0) -> AsyncIterator[_Collector]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Collector, local_addr=("127.0.0.1", port)
    )
    try:
        yield proto
    finally:
        transport.close()


@asynccontextmanager
async def udp_echo() -> AsyncIterator[int]:
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            self.transport.sendto(data, addr)

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Echo, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def _with_udp_relay(certs: Certs, target_port: int, **kwargs: object) -> Engine:
    cfg = engine_config(certs, **kwargs)  # type: ignore[arg-type]
    assert cfg.client is not None
    cfg.client.listen.append(
        ListenSpec.parse(f"udp://127.0.0.1:0:127.0.0.1:{target_port}?timeout_sec=0")
    )
    return Engine(cfg)


def _udp_stats(eng: Engine) -> UdpFlows:
    assert eng.server is not None and eng.server.udp is not None
    return eng.server.udp


def test_relay_carries_each_datagram_whole_and_unmerged(certs: Certs) -> None:
    async def main() -> None:
        async with udp_echo() as echo, _with_udp_relay(certs, echo) as eng, udp_socket() as peer:
            relay_port = eng.udp_relays[0].bound_port
            assert peer.transport is not None
            sent: set[bytes] = set()
            for burst in range(20):
                for i in range(50):
                    payload = os.urandom(1400 - 4) + (burst * 50 + i).to_bytes(4, "big")
                    sent.add(payload)
                    peer.transport.sendto(payload, ("127.0.0.1", relay_port))
                for _ in range(50):
                    async with asyncio.timeout(10):
                        data, addr = await peer.queue.get()
                    assert addr == ("127.0.0.1", relay_port)
                    assert data in sent  # whole, unchanged, one reply per datagram
                    sent.discard(data)
            assert not sent
            relay = eng.udp_relays[0]
            assert relay.stats.received == relay.stats.sent == relay.stats.replies == 1000
            # a datagram near the IPv4 maximum crosses too
            big = os.urandom(60000)
            peer.transport.sendto(big, ("127.0.0.1", relay_port))
            async with asyncio.timeout(10):
                assert (await peer.queue.get())[0] == big

    run(main())


def test_relay_keeps_its_port_and_recovers_after_the_tunnel_drops(certs: Certs) -> None:
    async def main() -> None:
        async with udp_echo() as echo, _with_udp_relay(certs, echo) as eng, udp_socket() as peer:
            relay_port = eng.udp_relays[0].bound_port
            assert peer.transport is not None and eng.server is not None
            peer.transport.sendto(b"before", ("127.0.0.1", relay_port))
            async with asyncio.timeout(10):
                assert (await peer.queue.get())[0] == b"before"
            for conn in list(eng.server.connections):
                conn.abort()
            # Like WireGuard: keep sending until the tunnel is back; the relay port never moves.
            async with asyncio.timeout(20):
                while True:
                    peer.transport.sendto(b"after", ("127.0.0.1", relay_port))
                    try:
                        async with asyncio.timeout(0.3):
                            data, addr = await peer.queue.get()
                    except TimeoutError:
                        continue
                    assert addr == ("127.0.0.1", relay_port)
                    if data == b"after":
                        break
            assert eng.udp_relays[0].bound_port == relay_port
            assert eng.tunnel is not None and eng.tunnel.connects >= 2

    run(main())


def test_unreachable_udp_target_is_counted_not_raised(certs: Certs) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        async with _with_udp_relay(certs, closed_port) as eng, udp_socket() as peer:
            assert peer.transport is not None
            relay_port = eng.udp_relays[0].bound_port
            for _ in range(20):
                peer.transport.sendto(b"x" * 100, ("127.0.0.1", relay_port))
                await asyncio.sleep(0.02)
            await eventually(lambda: _udp_stats(eng).stats.icmp_errors > 0)
            assert peer.queue.empty()

    run(main())


def test_server_policy_applies_to_udp(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp_server, "RETRY_FAILED_TARGET", 0.2)

    async def main() -> None:
        async with (
            udp_echo() as echo,
            _with_udp_relay(certs, echo, allow=()) as eng,
            udp_socket() as peer,
        ):
            assert peer.transport is not None
            peer.transport.sendto(b"hello", ("127.0.0.1", eng.udp_relays[0].bound_port))
            await eventually(lambda: _udp_stats(eng).stats.refused > 0)
            await asyncio.sleep(0.2)
            assert peer.queue.empty()
            # a failed target is tried again later (a DNS failure may pass), not black-holed
            await asyncio.sleep(0.3)
            peer.transport.sendto(b"again", ("127.0.0.1", eng.udp_relays[0].bound_port))
            await eventually(lambda: _udp_stats(eng).stats.refused > 1)

    run(main())


# -- SOCKS5 UDP ASSOCIATE ------------------------------------------------------------------


async def _associate(port: int) -> tuple[asyncio.StreamWriter, tuple[str, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hs = socks5.Socks5ClientHandshake("0.0.0.0", 0, command=socks5.Command.UDP_ASSOCIATE)
    writer.write(hs.initial_bytes())
    while True:
        data = await reader.read(1)
        assert data, "proxy closed the control connection"
        bound = hs.receive_data(data)
        if out := hs.data_to_send():
            writer.write(out)
        if bound is not None:
            return writer, bound


@asynccontextmanager
async def dns_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A real DNS server on loopback (dnspython messages) that records every query name."""
    seen: list[str] = []

    class Server(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            query = dns.message.from_wire(data)
            name = query.question[0].name
            seen.append(name.to_text())
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.53"))
            self.transport.sendto(response.to_wire(), addr)

    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Server, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[1], seen
    finally:
        transport.close()


def test_socks5_udp_associate_carries_a_dns_query_through_the_tunnel(certs: Certs) -> None:
    async def main() -> None:
        async with (
            dns_server() as (dns_port, seen),
            Engine(engine_config(certs)) as eng,
            udp_socket() as client,
        ):
            assert client.transport is not None
            control, relay = await _associate(socks_port(eng))
            query = dns.message.make_query("www.proxied.test.", dns.rdatatype.A)
            client.transport.sendto(
                socks5.encode_udp_datagram("127.0.0.1", dns_port, query.to_wire()), relay
            )
            async with asyncio.timeout(10):
                data, addr = await client.queue.get()
            assert addr == relay
            reply = socks5.parse_udp_datagram(data)
            assert (reply.host, reply.port) == ("127.0.0.1", dns_port)
            answer = dns.message.from_wire(reply.payload)
            assert answer.answer[0][0].to_text() == "192.0.2.53"
            assert seen == ["www.proxied.test."]
            # it went through the tunnel: the server relayed one datagram out and one back
            stats = _udp_stats(eng).stats
            assert stats.datagrams_in == 1 and stats.datagrams_out == 1
            control.close()

    run(main())


async def _alternate(
    client: _Collector, relay: tuple[str, int], eng: Engine, order: list[int]
) -> None:
    assert client.transport is not None
    for i, port in enumerate(order):
        payload = f"{i}:{port}".encode()
        client.transport.sendto(socks5.encode_udp_datagram("127.0.0.1", port, payload), relay)
        async with asyncio.timeout(10):
            data, _ = await client.queue.get()
        reply = socks5.parse_udp_datagram(data)
        assert (reply.port, reply.payload) == (port, payload)
    stats = _udp_stats(eng).stats
    assert stats.datagrams_in == stats.datagrams_out == len(order)
    assert stats.dropped == 0


def test_one_association_alternating_between_targets_reaches_each(certs: Certs) -> None:
    # The server sends a flow's datagrams without re-parsing the address while the target
    # stays the same; a datagram to another target must still go there, and its reply back.
    async def main() -> None:
        async with (
            udp_echo() as echo_a,
            udp_echo() as echo_b,
            Engine(engine_config(certs)) as eng,
            udp_socket() as client,
        ):
            assert client.transport is not None
            control, relay = await _associate(socks_port(eng))
            try:
                await _alternate(
                    client, relay, eng, [echo_a, echo_a, echo_b, echo_a, echo_b, echo_b, echo_a] * 5
                )
            finally:
                control.close()

    run(main())


def test_socks5_udp_bad_datagrams_are_dropped_and_counted(certs: Certs) -> None:
    async def main() -> None:
        async with (
            dns_server() as (dns_port, seen),
            Engine(engine_config(certs)) as eng,
            udp_socket() as client,
            udp_socket() as stranger,
        ):
            assert client.transport is not None and stranger.transport is not None
            control, relay = await _associate(socks_port(eng))
            good = socks5.encode_udp_datagram(
                "127.0.0.1", dns_port, dns.message.make_query("ok.test.", "A").to_wire()
            )
            client.transport.sendto(b"\x00\x00", relay)  # truncated header
            client.transport.sendto(b"\x00\x00\x00\x01\x7f", relay)  # truncated address
            client.transport.sendto(b"\x00\x00\x01" + good[3:], relay)  # FRAG = 1
            client.transport.sendto(good, relay)  # the client's port is now fixed
            async with asyncio.timeout(10):
                await client.queue.get()
            stranger.transport.sendto(good, relay)  # another source port: foreign
            await asyncio.sleep(0.3)
            assert stranger.queue.empty()
            assert seen == ["ok.test."]
            stats = eng.listeners[0].udp_stats
            assert (stats.malformed, stats.fragments, stats.foreign) == (2, 1, 1)
            # the association still serves its client
            client.transport.sendto(good, relay)
            async with asyncio.timeout(10):
                await client.queue.get()
            assert seen == ["ok.test.", "ok.test."]
            control.close()

    run(main())


def test_socks5_udp_association_ends_with_its_control_connection(certs: Certs) -> None:
    async def main() -> None:
        async with Engine(engine_config(certs)) as eng:
            control, relay = await _associate(socks_port(eng))
            control.close()
            await control.wait_closed()
            async with asyncio.timeout(10):
                while True:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        try:
                            s.bind(relay)  # free again once the association is gone
                            break
                        except OSError:
                            await asyncio.sleep(0.05)

    run(main())


def test_udp_relay_in_the_wstunnel_protocol(certs: Certs) -> None:
    """-L udp:// with --protocol wstunnel: one WebSocket per peer, one datagram per frame,
    against autovpn's own wstunnel service (the stock wstunnel server's behaviour)."""

    async def main() -> None:
        async with udp_echo() as echo:
            cfg = engine_config(certs)
            assert cfg.client is not None
            cfg.client.protocol = "wstunnel"
            cfg.client.listen = [
                ListenSpec.parse(f"udp://127.0.0.1:0:127.0.0.1:{echo}?timeout_sec=0")
            ]
            async with Engine(cfg) as eng, udp_socket() as peer, udp_socket() as other:
                assert peer.transport is not None and other.transport is not None
                relay = eng.udp_relays[0]
                sent = [os.urandom(1000 + i) for i in range(30)]
                for data in sent:
                    peer.transport.sendto(data, ("127.0.0.1", relay.bound_port))
                got = []
                for _ in sent:
                    async with asyncio.timeout(10):
                        got.append((await peer.queue.get())[0])
                assert sorted(got) == sorted(sent)  # whole datagrams, none merged or split
                other.transport.sendto(b"second peer", ("127.0.0.1", relay.bound_port))
                async with asyncio.timeout(10):
                    assert (await other.queue.get())[0] == b"second peer"
                assert eng.wstunnel is not None and len(eng.wstunnel.tunnels) == 2

    run(main())
