"""A real DNS server on loopback for tests, written with dnspython's message API.

UDP and TCP (RFC 7766: length-prefixed, pipelined queries answered as they complete) on the
same port of 127.0.0.1.  It records every query it receives (name, type, transport), can inject
latency, and answers from a small zone:

* names in ``zone`` get their addresses (A for IPv4 text, AAAA for IPv6 text);
* names in ``nxdomain`` (or, with ``answer_all=False``, anything else) get NXDOMAIN with an SOA;
* with ``answer_all=True`` any other name gets ``A default_a`` and NODATA for AAAA.

Answers are loopback addresses only, so anything that connects to them stays on the machine.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_LEN = struct.Struct("!H")


@dataclass
class Query:
    name: str  # without the trailing dot, lower-case
    rdtype: str
    transport: str  # "udp" or "tcp"


@dataclass
class FakeDns:
    zone: dict[str, list[str]] = field(default_factory=dict)
    nxdomain: set[str] = field(default_factory=set)
    answer_all: bool = True
    default_a: str = "127.0.0.2"
    latency: float = 0.0
    ttl: int = 300
    negative_ttl: int = 60
    truncate_udp: bool = False  # set TC on every UDP answer (forces the TCP retry)
    queries: list[Query] = field(default_factory=list)
    port: int = 0

    def names(self) -> set[str]:
        return {q.name for q in self.queries}

    def answer(self, wire: bytes, transport: str) -> dns.message.Message | None:
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            return None
        if len(q.question) != 1:
            return None
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append(Query(name, rdtype, transport))
        r = dns.message.make_response(q)
        addrs = self.zone.get(name)
        if addrs is None and self.answer_all and name not in self.nxdomain:
            addrs = [self.default_a]
        if addrs is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(self._soa(question.name))
            return r
        want = [a for a in addrs if (":" in a) == (question.rdtype == dns.rdatatype.AAAA)]
        if question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and want:
            r.answer.append(
                dns.rrset.from_text_list(
                    question.name, self.ttl, dns.rdataclass.IN, question.rdtype, want
                )
            )
        else:
            r.authority.append(self._soa(question.name))
        return r

    def _soa(self, qname: dns.name.Name) -> dns.rrset.RRset:
        zone = qname.parent() if len(qname) > 2 else qname
        return dns.rrset.from_text(
            zone,
            self.negative_ttl,
            "IN",
            "SOA",
            f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}",
        )


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: FakeDns, tasks: set[asyncio.Task[None]]) -> None:
        self.server = server
        self.tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        task = asyncio.get_running_loop().create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        r = self.server.answer(data, "udp")
        if r is None or self.transport is None:
            return
        if self.server.latency:
            await asyncio.sleep(self.server.latency)
        if self.server.truncate_udp:
            r.flags |= dns.flags.TC
            r.answer.clear()
        self.transport.sendto(r.to_wire(), addr)


@asynccontextmanager
async def dns_server(**kwargs: object) -> AsyncIterator[FakeDns]:
    """A ``FakeDns`` listening on 127.0.0.1 (UDP and TCP, one port); closed on exit."""
    server = FakeDns(**kwargs)  # type: ignore[arg-type]
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def one(wire: bytes) -> None:
            r = server.answer(wire, "tcp")
            if r is None:
                return
            if server.latency:
                await asyncio.sleep(server.latency)
            out = r.to_wire()
            writer.write(_LEN.pack(len(out)) + out)

        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        (n,) = _LEN.unpack(await reader.readexactly(2))
                        wire = await reader.readexactly(n)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        break
                    tg.create_task(one(wire))
            with suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    tcp = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(
        lambda: _Udp(server, tasks), local_addr=("127.0.0.1", server.port)
    )
    try:
        yield server
    finally:
        udp.close()
        for t in list(tasks):
            t.cancel()
        for t in list(tasks):
            with suppress(asyncio.CancelledError):
                await t
        tcp.close()
        await tcp.wait_closed()
