"""The load generator: a separate uvloop process that is both the client and the target.

Run by the harness as ``python -m benchmarks.loadgen TEST JSON-ARGS``; prints one JSON line with
its result (and, for the idle test, talks over stdin/stdout).  The target servers live in this
process too, so that every byte of the chain under test crosses exactly one proxy chain.

Fast I/O, so that the generator is not the bottleneck (it reports its own CPU share):
asyncio Protocols, not streams; ``BufferedProtocol`` with one reused receive buffer per role
(no allocation per read); a single 1 MiB block of random bytes written again and again (uvloop
keeps a view of unsent bytes, which is harmless for constant data); writes driven by
``pause_writing``/``resume_writing``, so the generator never buffers more than the water mark.

Tests:
  download  the target streams bytes after a one-byte request; the client counts them (over
            ``streams`` connections at once, 1 by default).
  upload    the client streams bytes; the target counts them.
  conns     50 workers each open a SOCKS5 connection, send a short HTTP request, read the
            response to EOF, close; repeated for a fixed time.  Time to first byte is measured
            from the start of the TCP connect to the first response byte.
  idle      open N connections (each proven end to end by a one-byte echo), report, hold them
            until told to close.
  udp       paced 1,400-byte datagrams to a relay (or straight to the sink), counted by a sink in
            this process: a ladder of fixed-rate trials, then a bisection, finds the highest
            offered rate delivered with under 1% loss (see ``test_udp``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final, cast

BLOCK: Final = os.urandom(1 << 20)
WRITE_HIGH: Final = 4 << 20
RECV_BUFFER_SIZE: Final = 1 << 20
HTTP_REQUEST: Final = b"GET /bench HTTP/1.1\r\nHost: target.bench\r\nUser-Agent: bench\r\n\r\n"
HTTP_RESPONSE: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- SOCKS5 (RFC 1928), client side, no authentication -------------------------------------------


def socks5_request(host: str, port: int) -> bytes:
    try:
        packed = socket.inet_aton(host)
        return b"\x05\x01\x00\x01" + packed + struct.pack("!H", port)
    except OSError:
        name = host.encode()
        return b"\x05\x01\x00\x03" + bytes((len(name),)) + name + struct.pack("!H", port)


class _Connector(asyncio.Protocol):
    """Connects (through SOCKS5 when ``socks`` is set) and then hands over to ``then``."""

    def __init__(
        self,
        socks: bool,
        target: tuple[str, int],
        done: asyncio.Future[asyncio.Transport],
    ) -> None:
        self._socks = socks
        self._target = target
        self._done = done
        self._buffer = b""
        self._stage = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self._socks:
            self._finish()
            return
        self.transport.write(b"\x05\x01\x00")

    def _finish(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        if not self._done.done():
            self._done.set_result(self.transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self._buffer += data
        if self._stage == 0:
            if len(self._buffer) < 2:
                return
            if self._buffer[:2] != b"\x05\x00":
                self._fail(f"SOCKS5 method reply {self._buffer[:2]!r}")
                return
            self._buffer = self._buffer[2:]
            self._stage = 1
            self.transport.write(socks5_request(*self._target))
        if self._stage == 1:
            if len(self._buffer) < 5:
                return
            if self._buffer[1] != 0:
                self._fail(f"SOCKS5 reply code {self._buffer[1]}")
                return
            atyp = self._buffer[3]
            need = {1: 10, 4: 22}.get(atyp, 7 + self._buffer[4])
            if len(self._buffer) < need:
                return
            if len(self._buffer) > need:
                self._fail("bytes after the SOCKS5 reply")
                return
            self._stage = 2
            self._finish()

    def _fail(self, why: str) -> None:
        if not self._done.done():
            self._done.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(ConnectionError(f"closed during connect: {exc or 'EOF'}"))


async def open_through(
    socks: tuple[str, int] | None, target: tuple[str, int], limit: float = 10.0
) -> asyncio.Transport:
    """A connected transport to ``target`` (through ``socks`` if given), reading paused."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[asyncio.Transport] = loop.create_future()
    where = socks if socks is not None else target
    async with asyncio.timeout(limit):
        transport, _ = await loop.create_connection(
            lambda: _Connector(socks is not None, target, done), *where
        )
        try:
            return await done
        except BaseException:
            transport.abort()
            raise


# -- the targets -----------------------------------------------------------------------------


class _Pump(asyncio.BufferedProtocol):
    """Writes BLOCK over and over while the transport accepts, after ``start``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.running = False
        self.closed = False
        self._buffer = memoryview(bytearray(64 * 1024))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)

    def start(self) -> None:
        self.running = True
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        assert transport is not None
        while not self.paused and not self.closed and not transport.is_closing():
            transport.write(BLOCK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.running:
            self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if not self.running:
            self.start()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


class _Counter(asyncio.BufferedProtocol):
    """Counts received bytes into a reused buffer; stops at ``limit`` or the deadline."""

    def __init__(self, limit: int, on_done: Callable[[_Counter], None] | None = None) -> None:
        self.limit = limit
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()
        self._buffer = memoryview(bytearray(RECV_BUFFER_SIZE))
        self._on_done = on_done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += nbytes
        if self.count >= self.limit:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.last = time.perf_counter()
            self.done.set_result(None)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        self.finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()


class _HttpTarget(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.transport is not None:
            self.transport.write(HTTP_RESPONSE)
            self.transport.close()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def _serve(factory: Callable[[], asyncio.BaseProtocol]) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, backlog=4096)
    port: int = server.sockets[0].getsockname()[1]
    return server, port


# -- the client side -----------------------------------------------------------------------


class _Reader(asyncio.BufferedProtocol):
    """Reads a whole short response to EOF, noting when its first byte arrived."""

    def __init__(self, buffer: memoryview, expect: int = len(HTTP_RESPONSE)) -> None:
        self._buffer = buffer
        self.expect = expect
        self.first: float | None = None
        self.got = 0
        self.done = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.got += nbytes
        if self.got >= self.expect and not self.done.done():
            # The whole response (its Content-Length) is in: done, as an HTTP client would
            # be, without waiting for the proxy to pass the server's close on.
            self.done.set_result(None)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


async def _warm_up(socks: tuple[str, int] | None, port: int, deadline: float = 20.0) -> None:
    """One request through the chain, retried until the chain is up."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    buffer = memoryview(bytearray(4096))
    while True:
        try:
            transport = await open_through(socks, ("127.0.0.1", port))
            reader = _Reader(buffer)
            transport.set_protocol(reader)
            transport.resume_reading()
            transport.write(HTTP_REQUEST)
            async with asyncio.timeout(10):
                await reader.done
            transport.close()
            if reader.got == len(HTTP_RESPONSE):
                return
        except (OSError, TimeoutError):
            pass
        if loop.time() > end:
            raise RuntimeError("the chain did not come up")
        await asyncio.sleep(0.1)


async def test_download(
    socks: tuple[str, int] | None, size: int, seconds: float, streams: int = 1
) -> dict[str, Any]:
    """``size`` bytes downloaded over ``streams`` connections at once (each ``size //
    streams``); the time runs from the requests to the last byte of the last one."""
    server, port = await _serve(_Pump)
    await _warm_up_http(socks)
    downloads: list[tuple[asyncio.Transport, _Counter]] = []
    for _ in range(streams):
        transport = await open_through(socks, ("127.0.0.1", port))
        counter = _Counter(size // streams)
        transport.set_protocol(counter)
        counter.connection_made(transport)
        downloads.append((transport, counter))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for transport, _ in downloads:
        transport.resume_reading()
        transport.write(b"G")
    # asyncio.wait, not a timeout around the futures: that would cancel them.
    await asyncio.wait({counter.done for _, counter in downloads}, timeout=seconds)
    for _, counter in downloads:
        counter.finish()
    wall = max(counter.last for _, counter in downloads) - t0
    cpu = cpu_seconds() - cpu0
    server.close()
    total = sum(counter.count for _, counter in downloads)
    return {"bytes": total, "seconds": wall, "gen_cpu": cpu, "gen_share": cpu / wall}


async def test_upload(socks: tuple[str, int] | None, size: int, seconds: float) -> dict[str, Any]:
    counters: list[_Counter] = []
    accepted = asyncio.Event()

    def factory() -> _Counter:
        c = _Counter(size)
        counters.append(c)
        accepted.set()
        return c

    server, port = await _serve(factory)
    await _warm_up_http(socks)
    transport = await open_through(socks, ("127.0.0.1", port))
    pump = _Pump()
    transport.set_protocol(pump)
    pump.connection_made(transport)
    transport.resume_reading()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    pump.start()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with asyncio.timeout(seconds):
        await accepted.wait()
    counter = counters[0]
    await asyncio.wait({counter.done}, timeout=max(0.0, end - loop.time()))
    counter.finish()
    wall = counter.last - t0
    cpu = cpu_seconds() - cpu0
    pump.closed = True
    transport.abort()
    server.close()
    return {"bytes": counter.count, "seconds": wall, "gen_cpu": cpu, "gen_share": cpu / wall}


_HTTP_PORT: list[int] = []


async def _warm_up_http(socks: tuple[str, int] | None) -> None:
    if not _HTTP_PORT:
        _, port = await _serve(_HttpTarget)
        _HTTP_PORT.append(port)
    await _warm_up(socks, _HTTP_PORT[0])


async def test_conns(
    socks: tuple[str, int] | None, seconds: float, concurrency: int = 50, warmup: float = 0.5
) -> dict[str, Any]:
    await _warm_up_http(socks)
    port = _HTTP_PORT[0]
    loop = asyncio.get_running_loop()
    ttfb: list[float] = []
    errors = 0
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal errors
        buffer = memoryview(bytearray(4096))
        while not stop:
            t0 = time.perf_counter()
            try:
                transport = await open_through(socks, ("127.0.0.1", port))
                reader = _Reader(buffer)
                transport.set_protocol(reader)
                transport.resume_reading()
                transport.write(HTTP_REQUEST)
                await asyncio.wait({reader.done}, timeout=10)
                transport.close()
                ok = reader.done.done() and reader.got == len(HTTP_RESPONSE)
                ok = ok and reader.first is not None and not reader.done.exception()
            except (OSError, TimeoutError):
                ok = False
            if measuring:
                if ok:
                    assert reader.first is not None
                    ttfb.append(reader.first - t0)
                else:
                    errors += 1

    tasks = [loop.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    ttfb.sort()
    n = len(ttfb)
    return {
        "requests": n,
        "errors": errors,
        "seconds": wall,
        "p50": ttfb[n // 2] if n else float("nan"),
        "p99": ttfb[min(n - 1, int(n * 0.99))] if n else float("nan"),
        "gen_cpu": cpu,
        "gen_share": cpu / wall,
    }


async def test_idle(socks: tuple[str, int] | None, count: int, concurrency: int = 50) -> None:
    """Interactive: prints ``{"ready": ...}`` twice (before and with the connections held)."""
    _, port = await _serve(_Echo)
    await _warm_up_http(socks)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    held: list[asyncio.Transport] = []
    buffer = memoryview(bytearray(64))

    async def one() -> None:
        transport = await open_through(socks, ("127.0.0.1", port), limit=30)
        reader = _Reader(buffer, 1)
        transport.set_protocol(reader)
        transport.resume_reading()
        transport.write(b"x")
        async with asyncio.timeout(30):
            await reader.done
        held.append(transport)

    # One proven connection first, so the "before" figure includes a live stream's fixed costs.
    await one()
    print(json.dumps({"ready": "before"}), flush=True)
    await stdin.readline()
    semaphore = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with semaphore:
            await one()

    results = await asyncio.gather(*(limited() for _ in range(count)), return_exceptions=True)
    failed = sum(1 for r in results if isinstance(r, BaseException))
    print(json.dumps({"ready": "held", "held": count - failed, "failed": failed}), flush=True)
    await stdin.readline()
    for transport in held:
        transport.abort()
    print(json.dumps({"done": True}), flush=True)


# -- UDP: datagram rate and loss through a relay --------------------------------------------------

#: Socket buffers of the generator's sender and sink, forced past net.core.rmem_max when we are
#: root: a relay delivers in bursts (a tunnel read's worth at once), and the sink, which shares
#: its thread with the pacer, must not be what drops them (it did, with 4 MiB, at 113k/s).
UDP_BUFFER: Final = 32 << 20
_SO_SNDBUFFORCE: Final = 32  # asm-generic/socket.h
_SO_RCVBUFFORCE: Final = 33
UDP_TICK: Final = 0.001  # the pacer sends what is due once per millisecond


def tree_cpu(roots: list[int]) -> float:
    """utime+stime (with reaped children) of ``roots`` and all their descendants: socat serves
    each peer from a forked child that is not among the PIDs the harness started."""
    parent: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        stats[pid] = fields
    wanted = set(roots)
    grew = True
    while grew:  # bounded: each pass adds at least one PID of a finite table or stops
        grew = False
        for pid, ppid in parent.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    tick = os.sysconf("SC_CLK_TCK")
    return sum(sum(int(x) for x in stats[p][11:15]) / tick for p in wanted if p in stats)


class _UdpSink(asyncio.DatagramProtocol):
    """Counts datagrams whose first byte is the current trial's tag (late ones are ignored)."""

    def __init__(self) -> None:
        self.tag = 0
        self.count = 0
        self.nbytes = 0
        self.any = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if data[0] == self.tag:
            self.count += 1
            self.nbytes += len(data)
        self.any.set()


def _big_buffers(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    for forced, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, UDP_BUFFER)
        except OSError:  # not root (or not Linux): as much as net.core.rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER)


async def _udp_trial(
    send: asyncio.DatagramTransport,
    sink: _UdpSink,
    tag: int,
    size: int,
    rate: float,
    seconds: float,
    drain: float,
    pids: list[int],
) -> dict[str, Any]:
    """Offer ``rate`` datagrams/s for ``seconds``; count what arrives until ``drain`` after."""
    payload = bytes((tag,)) + BLOCK[: size - 1]
    sink.tag, sink.count, sink.nbytes = tag, 0, 0
    chain0, cpu0 = tree_cpu(pids), cpu_seconds()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + seconds
    sent = 0
    burst_cap = max(1, int(rate * 0.01))  # never more than 10 ms worth at once after a stall
    while True:
        now = loop.time()
        if now >= end:
            break
        due = min(int(rate * (now - t0)) - sent, burst_cap)
        for _ in range(due):
            send.sendto(payload)
        sent += max(0, due)
        await asyncio.sleep(UDP_TICK)
    wall = loop.time() - t0
    gen_cpu = cpu_seconds() - cpu0
    await asyncio.sleep(drain)
    chain_cpu = tree_cpu(pids) - chain0
    got = sink.count
    return {
        "offered": rate,
        "sent_rate": sent / wall,
        "sent": sent,
        "received": got,
        "rate": got / wall,
        "mbs": sink.nbytes / wall / 1e6,
        "loss": (1 - got / sent) * 100 if sent else 100.0,
        "chain_cpu": chain_cpu,
        "cpu_us": chain_cpu / got * 1e6 if got else float("nan"),
        "gen_share": gen_cpu / wall,
    }


async def test_udp(
    target: tuple[str, int],
    sink_port: int,
    *,
    size: int = 1400,
    seconds: float = 2.0,
    start: float = 5000.0,
    factor: float = 2.0,
    max_rate: float = 400_000.0,
    bisect: int = 3,
    loss_limit: float = 1.0,
    pids: list[int] | None = None,
) -> dict[str, Any]:
    """The highest offered rate delivered with under ``loss_limit`` % loss.

    Trials at ``start``, ``start*factor``, ... until one loses ``loss_limit`` % or more (or the
    pacer cannot keep up: then the generator is the limit and says so), then ``bisect`` trials
    between the last good and the first bad rate.  Each trial is a fixed offered rate, paced
    every millisecond, so bursts stay far below the relays' 4 MiB socket buffers.
    """
    loop = asyncio.get_running_loop()
    sink = _UdpSink()
    sink_transport, _ = await loop.create_datagram_endpoint(
        lambda: sink, local_addr=("127.0.0.1", sink_port)
    )
    _big_buffers(sink_transport)
    send, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=target)
    _big_buffers(send)
    chain = pids or []
    try:
        # Warm-up: until a datagram crosses (the tunnel may still be connecting), then a
        # short low-rate run so sessions, sockets and socat's per-peer child exist.
        sink.tag = 0
        for _ in range(400):
            send.sendto(b"\x00warm")
            try:
                async with asyncio.timeout(0.05):
                    await sink.any.wait()
                break
            except TimeoutError:
                pass
        else:
            raise RuntimeError(f"no datagram came through {target} in 20 s")
        await _udp_trial(send, sink, 0, size, start, 0.3, 0.2, chain)
        trials: list[dict[str, Any]] = []
        good: dict[str, Any] | None = None
        bad: dict[str, Any] | None = None
        tag = 1

        def ok(t: dict[str, Any]) -> bool:
            return bool(t["loss"] < loss_limit)

        rate = start
        gen_limited = False
        while rate <= max_rate:
            t = await _udp_trial(send, sink, tag, size, rate, seconds, 0.4, chain)
            tag += 1
            trials.append(t)
            if not ok(t):
                bad = t
                break
            good = t
            if t["sent_rate"] < 0.95 * rate:  # the pacer fell behind: we are the limit
                gen_limited = True
                break
            rate *= factor
        if good is not None and bad is not None and not gen_limited:
            lo, hi = good["offered"], bad["offered"]
            for _ in range(bisect):
                mid = (lo * hi) ** 0.5
                t = await _udp_trial(send, sink, tag, size, mid, seconds, 0.4, chain)
                tag += 1
                trials.append(t)
                if ok(t):
                    lo, good = mid, t
                else:
                    hi, bad = mid, t
        return {
            "best": good,
            "first_bad": bad,
            "gen_limited": gen_limited,
            "trials": trials,
        }
    finally:
        send.close()
        sink_transport.close()


async def _main(test: str, args: dict[str, Any]) -> dict[str, Any] | None:
    socks = ("127.0.0.1", int(args["socks"])) if args.get("socks") else None
    if test == "download":
        return await test_download(
            socks, int(args["size"]), float(args["seconds"]), int(args.get("streams", 1))
        )
    if test == "upload":
        return await test_upload(socks, int(args["size"]), float(args["seconds"]))
    if test == "conns":
        return await test_conns(socks, float(args["seconds"]), int(args.get("concurrency", 50)))
    if test == "idle":
        await test_idle(socks, int(args["count"]))
        return None
    if test == "udp":
        return await test_udp(
            ("127.0.0.1", int(args["target"])),
            int(args["sink"]),
            size=int(args.get("size", 1400)),
            seconds=float(args.get("seconds", 2.0)),
            start=float(args.get("start", 5000)),
            max_rate=float(args.get("max_rate", 400_000)),
            bisect=int(args.get("bisect", 3)),
            pids=[int(p) for p in args.get("pids", [])],
        )
    raise SystemExit(f"unknown test {test!r}")


def main() -> None:
    test, raw = sys.argv[1], sys.argv[2]
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - the harness reports the loop in use
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(_main(test, json.loads(raw)))
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
