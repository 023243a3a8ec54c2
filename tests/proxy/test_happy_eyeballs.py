"""Happy Eyeballs (RFC 8305) for DIRECT connections, on real loopback sockets.

A refused address is 127.0.0.N with nothing listening; a *hanging* one is a listener with
``listen(0)`` whose accept queue is already full, so the kernel drops further SYNs and the
connect neither succeeds nor fails -- a black-holed address without leaving the machine.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from autovpn.errors import StreamError
from autovpn.proxy.dialer import Dialer, happy_eyeballs
from autovpn.routing.dns import SplitResolver
from autovpn.routing.router import Mode, Router
from autovpn.routing.scoring import ScoreBook
from autovpn.routing.upstream import Upstream
from tests.conftest import echo_handler, run, tcp_server
from tests.routing.dnsserver import dns_server


@contextmanager
def listener(host: str, port: int = 0, backlog: int = 16) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, port))
        s.listen(backlog)
        yield s


@contextmanager
def black_hole(host: str, port: int) -> Iterator[None]:
    """``host:port`` accepts nothing: connects to it hang."""
    with ExitStack() as stack:
        srv = stack.enter_context(listener(host, port, backlog=0))
        filler = stack.enter_context(socket.socket())
        filler.connect(srv.getsockname())
        yield


def test_refused_address_falls_back_to_the_next() -> None:
    async def main() -> None:
        with listener("127.0.0.2") as good:
            port = good.getsockname()[1]
            book = ScoreBook()
            sock = await happy_eyeballs(["127.0.0.3", "127.0.0.2"], port, scores=book)
            with sock:
                assert sock.getpeername() == ("127.0.0.2", port)
            assert book.stats["127.0.0.3"].consecutive_failures == 1
            assert book.stats["127.0.0.2"].successes == 1
            assert book.order(["127.0.0.3", "127.0.0.2"], time.time())[0] == "127.0.0.2"

    run(main())


def test_hanging_address_costs_one_attempt_delay() -> None:
    async def main() -> None:
        with listener("127.0.0.2") as good:
            port = good.getsockname()[1]
            with black_hole("127.0.0.4", port):
                start = time.perf_counter()
                sock = await happy_eyeballs(["127.0.0.4", "127.0.0.2"], port, delay=0.2)
                elapsed = time.perf_counter() - start
                with sock:
                    assert sock.getpeername()[0] == "127.0.0.2"
                assert 0.15 < elapsed < 2.0

    run(main())


def test_races_ipv6_and_ipv4() -> None:
    async def main() -> None:
        with listener("127.0.0.2") as v4:
            port = v4.getsockname()[1]
            # ::1 refuses on this port: the IPv4 attempt starts at once and wins.
            sock = await happy_eyeballs(["::1", "127.0.0.2"], port)
            with sock:
                assert sock.family == socket.AF_INET

    run(main())


def test_all_failing_raises_oserror() -> None:
    async def main() -> None:
        with pytest.raises(OSError, match="all 2 addresses failed"):
            await happy_eyeballs(["127.0.0.3", "127.0.0.5"], 9)

    run(main())


def test_dialer_resolves_direct_names_with_the_split_resolver() -> None:
    """DIRECT for a name: split resolver (loopback DNS) -> scored order -> Happy Eyeballs."""

    async def main() -> None:
        async with tcp_server(echo_handler) as port:
            zone = {"svc.direct.test": ["127.0.0.3", "127.0.0.1"]}  # .3 refuses
            async with dns_server(zone=zone) as dns:
                router = Router(Mode.DIRECT)
                book = ScoreBook()
                # .3 scored best (it worked before), so it is tried first; it refuses now.
                book.record_success("127.0.0.3", 0.001, time.time())
                resolver = SplitResolver(router, local=[Upstream("127.0.0.1", dns.port)])
                dialer = Dialer(router, None, resolver=resolver, scores=book)
                upstream, decision = await dialer.connect("svc.direct.test", port)
                assert decision.action.value == "direct"
                # The upstream is connected; give it a transport of ours and echo through it.
                a, b = socket.socketpair()
                loop = asyncio.get_running_loop()
                transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
                transport.pause_reading()
                upstream.attach(transport)
                reader, writer = await asyncio.open_connection(sock=b)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                await writer.wait_closed()
                assert book.stats["127.0.0.3"].consecutive_failures == 1
                assert book.stats["127.0.0.1"].successes == 1
                assert book.order(["127.0.0.3", "127.0.0.1"], time.time())[0] == "127.0.0.1"
                with pytest.raises(StreamError, match="NXDOMAIN|no A/AAAA"):
                    dns.nxdomain.add("gone.direct.test")
                    dns.answer_all = False
                    await dialer.connect("gone.direct.test", port)
                assert {q.name for q in dns.queries} == {"svc.direct.test", "gone.direct.test"}

    run(main())


def test_a_failed_direct_connect_is_tried_again_but_not_a_name_that_does_not_resolve() -> None:
    """retries=3: a name whose every address refuses is dialled three times (each address
    scored each time), with backoff; a name that does not resolve is asked once."""

    async def main() -> None:
        zone = {"down.direct.test": ["127.0.0.3", "127.0.0.5"]}  # both refuse
        async with dns_server(zone=zone) as dns:
            router = Router(Mode.DIRECT)
            book = ScoreBook()
            resolver = SplitResolver(router, local=[Upstream("127.0.0.1", dns.port)])
            dialer = Dialer(router, None, resolver=resolver, scores=book, retries=3)
            with pytest.raises(StreamError) as failed:
                await dialer.connect("down.direct.test", 9)
            assert failed.value.reason.name == "CONNECTION_REFUSED"
            assert book.stats["127.0.0.3"].consecutive_failures == 3
            assert book.stats["127.0.0.5"].consecutive_failures == 3
            dns.nxdomain.add("gone.direct.test")
            dns.answer_all = False
            with pytest.raises(StreamError, match="NXDOMAIN|no A/AAAA"):
                await dialer.connect("gone.direct.test", 9)
            gone = [q.rdtype for q in dns.queries if q.name == "gone.direct.test"]
            assert len(gone) == len(set(gone))  # each record type asked once: no retry

    run(main())
