"""The HTTP proxy listener over real sockets: absolute-form forwarding with keep-alive
(RFC 9112 §9.3), body framing both ways (§6.3), hop-by-hop fields (RFC 9110 §7.6.1), proxy
authentication on every request (§11.7), error statuses, and backpressure.

The origin is the standard library's ``http.server`` (tests/http_origin.py); the client side
is raw bytes, read with a small independent response reader.  Each test runs through the
tunnel (mode global) and, where the route matters, directly (mode direct).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from autovpn.engine import Engine
from autovpn.proxy import http_forward
from autovpn.routing.router import Mode
from tests.conftest import Certs, engine, free_port, http_port, pattern_digest, run, tcp_server
from tests.http_origin import Origin, http_origin

MODES = [Mode.GLOBAL, Mode.DIRECT]
GOOD = "Basic " + base64.b64encode(b"alice:s3cret").decode()


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    """One response, framed by hand (not with the code under test)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
    resp = Response(status, headers, b"")
    if 100 <= status < 200:
        return resp
    if method == "HEAD" or status in (204, 304) or (method == "CONNECT" and status == 200):
        return resp
    if (resp.get("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        resp.body = bytes(body)
    elif resp.get("content-length") is not None:
        resp.body = await reader.readexactly(int(resp.get("content-length") or 0))
    else:
        resp.body = await reader.read()
    return resp


def get(port: int, path: str, *extra: str, method: str = "GET", host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} http://{host}:{port}{path} HTTP/1.1", f"Host: {host}:{port}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def proxy_conn(eng: Engine) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", http_port(eng))


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def finish(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


# --- keep-alive ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_two_requests_reuse_one_client_and_one_origin_connection(certs: Certs, mode: Mode) -> None:
    """RFC 9112 §9.3: persistent on both sides; the second request rides the same sockets."""

    async def main(origin: Origin) -> None:
        async with engine(certs, mode=mode) as eng:
            reader, writer = await proxy_conn(eng)
            for path in ("/hello/1", "/hello/2", "/chunked", "/hello/3"):
                writer.write(get(origin.port, path))
                resp = await read_response(reader)
                assert resp.status == 200
                want = b"chunk-0 chunk-1 chunk-2 chunk-3 chunk-4 " if path == "/chunked" else None
                assert resp.body == (want or f"hello {path}".encode())
                assert resp.get("connection") is None
            await finish(writer)
            assert origin.connections == 1

    with http_origin() as origin:
        run(main(origin))


def test_pipelined_requests_are_answered_in_order(certs: Certs) -> None:
    async def main(origin: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(b"".join(get(origin.port, f"/hello/{i}") for i in range(5)))
            for i in range(5):
                assert (await read_response(reader)).body == f"hello /hello/{i}".encode()
            await finish(writer)
            assert origin.connections == 1

    with http_origin() as origin:
        run(main(origin))


def test_another_origin_on_the_same_client_connection_gets_its_own_connection(
    certs: Certs,
) -> None:
    async def main(a: Origin, b: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            for origin in (a, b, a):
                writer.write(get(origin.port, "/hello"))
                assert (await read_response(reader)).status == 200
            await finish(writer)
            assert (a.connections, b.connections) == (2, 1)

    with http_origin() as a, http_origin() as b:
        run(main(a, b))


def test_client_connection_close_is_honoured(certs: Certs) -> None:
    async def main(origin: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello", "Connection: close"))
            resp = await read_response(reader)
            assert resp.status == 200 and resp.get("connection") == "close"
            assert await closed_by_peer(reader)
            await finish(writer)
            assert origin.requests[0][2].get("Connection") == "close"

    with http_origin() as origin:
        run(main(origin))


def test_http10_client_keep_alive(certs: Certs) -> None:
    async def main(origin: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            for _ in range(2):
                writer.write(
                    f"GET http://127.0.0.1:{origin.port}/hello HTTP/1.0\r\n"
                    "Connection: keep-alive\r\n\r\n".encode()
                )
                resp = await read_response(reader)
                assert resp.status == 200 and resp.get("connection") == "keep-alive"
            writer.write(f"GET http://127.0.0.1:{origin.port}/hello HTTP/1.0\r\n\r\n".encode())
            assert (await read_response(reader)).get("connection") == "close"
            assert await closed_by_peer(reader)
            await finish(writer)

    with http_origin() as origin:
        run(main(origin))


# --- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bodies_by_their_framing(certs: Certs, mode: Mode) -> None:
    """RFC 9112 §6.3: HEAD, 204 and 304 have no body; sized and chunked request bodies."""

    async def main(origin: Origin) -> None:
        async with engine(certs, mode=mode) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello", method="HEAD"))
            resp = await read_response(reader, "HEAD")
            assert resp.status == 200 and resp.get("content-length") == "12"
            for code in (204, 304):
                writer.write(get(origin.port, f"/{code}"))
                assert (await read_response(reader)).status == code
            body = b"x" * 100_000
            writer.write(get(origin.port, "/up", f"Content-Length: {len(body)}", method="POST"))
            writer.write(body)
            resp = await read_response(reader)
            assert resp.body == f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
            writer.write(get(origin.port, "/up", "Transfer-Encoding: chunked", method="POST"))
            for piece in (b"abc", b"d" * 70_000):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
            resp = await read_response(reader)
            whole = b"abc" + b"d" * 70_000
            assert resp.body == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()
            writer.write(get(origin.port, "/hello/after"))
            assert (await read_response(reader)).body == b"hello /hello/after"
            await finish(writer)
            assert origin.connections == 1

    with http_origin() as origin:
        run(main(origin))


def test_close_delimited_response_closes_the_client_connection(certs: Certs) -> None:
    async def main(origin: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/close"))
            resp = await read_response(reader)
            assert resp.status == 200 and resp.get("connection") == "close"
            assert resp.body == b"until the end"
            await finish(writer)

    with http_origin() as origin:
        run(main(origin))


def test_interim_100_continue_is_passed_on(certs: Certs) -> None:
    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with engine(certs) as eng, tcp_server(origin_handler) as port:
            reader, writer = await proxy_conn(eng)
            writer.write(get(port, "/", "Content-Length: 5", "Expect: 100-continue", method="PUT"))
            assert (await read_response(reader)).status == 100
            writer.write(b"hello")
            assert (await read_response(reader)).body == b"hello"
            await finish(writer)

    run(main())


def test_hop_by_hop_fields_are_removed_both_ways(certs: Certs) -> None:
    """RFC 9110 §7.6.1; Proxy-Authorization is for us only (§11.7.2)."""

    async def main(origin: Origin) -> None:
        async with engine(certs, users=(("alice", "s3cret"),)) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(
                get(
                    origin.port,
                    "/headers",
                    f"Proxy-Authorization: {GOOD}",
                    "Proxy-Connection: keep-alive",
                    "Connection: X-Drop, keep-alive",
                    "X-Drop: me",
                    "Keep-Alive: 300",
                    "TE: trailers",
                    "X-Keep: yes",
                )
            )
            resp = await read_response(reader)
            assert resp.status == 200 and resp.body == b"headers"
            names = {n.lower() for n, _ in resp.headers}
            assert not names & {"keep-alive", "x-secret", "connection"}
            await finish(writer)
            seen = {n.lower() for n in origin.requests[0][2]}
            assert "x-keep" in seen and "host" in seen
            assert not seen & {"proxy-authorization", "proxy-connection", "x-drop", "keep-alive"}
            assert not seen & {"te", "connection"}

    with http_origin() as origin:
        run(main(origin))


# --- authentication ------------------------------------------------------------------------


def test_credentials_are_checked_on_every_request(certs: Certs) -> None:
    async def main(origin: Origin) -> None:
        async with engine(certs, users=(("alice", "s3cret"),)) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello", f"Proxy-Authorization: {GOOD}"))
            assert (await read_response(reader)).status == 200
            writer.write(get(origin.port, "/hello"))
            resp = await read_response(reader)
            assert resp.status == 407
            assert resp.get("proxy-authenticate") == 'Basic realm="autovpn"'
            assert await closed_by_peer(reader)
            await finish(writer)
            assert len(origin.requests) == 1

    with http_origin() as origin:
        run(main(origin))


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "allow", "status"),
    [
        (Mode.GLOBAL, ("127.0.0.0/8",), 502),  # refused by the target
        (Mode.DIRECT, (), 502),
        (Mode.GLOBAL, (), 403),  # the server's destination policy
    ],
)
def test_unreachable_gets_a_bare_error_status(
    certs: Certs, mode: Mode, allow: tuple[str, ...], status: int
) -> None:
    async def main() -> None:
        async with engine(certs, mode=mode, allow=allow) as eng:
            for request in (get(free_port(), "/x"), b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n"):
                if b"%d" in request:
                    request = request % free_port()
                reader, writer = await proxy_conn(eng)
                writer.write(request)
                resp = await read_response(reader)
                assert resp.status == status
                assert resp.body == f"{status} {resp_phrase(status)}\n".encode()
                await finish(writer)
            # Still serving.
            with http_origin() as origin:
                reader, writer = await proxy_conn(eng)
                writer.write(get(origin.port, "/ok"))
                got = await read_response(reader)
                await finish(writer)
            assert got.status == (403 if status == 403 else 200)

    run(main())


def resp_phrase(status: int) -> str:
    return {502: "Bad Gateway", 403: "Forbidden"}[status]


def test_origin_closing_before_its_response_gives_502(certs: Certs) -> None:
    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async def main() -> None:
        async with engine(certs) as eng, tcp_server(origin_handler) as port:
            reader, writer = await proxy_conn(eng)
            writer.write(get(port, "/"))
            assert (await read_response(reader)).status == 502
            await finish(writer)

    run(main())


def test_bad_request_and_bad_response(certs: Certs) -> None:
    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx")
        await writer.drain()
        await reader.read()

    async def main(origin: Origin) -> None:
        async with engine(certs) as eng, tcp_server(origin_handler) as bad:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello"))
            assert (await read_response(reader)).status == 200
            # Smuggling attempt on the kept-alive connection: 400 and close.
            writer.write(
                get(
                    origin.port,
                    "/x",
                    "Content-Length: 3",
                    "Transfer-Encoding: chunked",
                    method="POST",
                )
            )
            assert (await read_response(reader)).status == 400
            assert await closed_by_peer(reader)
            await finish(writer)
            reader, writer = await proxy_conn(eng)
            writer.write(get(bad, "/"))
            assert (await read_response(reader)).status == 502
            await finish(writer)

    with http_origin() as origin:
        run(main(origin))


def test_idle_keep_alive_connection_times_out(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_forward, "KEEPALIVE_TIMEOUT", 0.2)

    async def main(origin: Origin) -> None:
        async with engine(certs) as eng:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello"))
            assert (await read_response(reader)).status == 200
            assert await closed_by_peer(reader)
            await finish(writer)

    with http_origin() as origin:
        run(main(origin))


def test_connect_after_forwarded_requests(certs: Certs) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)

    async def main(origin: Origin) -> None:
        async with engine(certs) as eng, tcp_server(echo) as echo_port:
            reader, writer = await proxy_conn(eng)
            writer.write(get(origin.port, "/hello"))
            assert (await read_response(reader)).status == 200
            writer.write(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
            assert (await read_response(reader, "CONNECT")).status == 200
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await finish(writer)

    with http_origin() as origin:
        run(main(origin))


# --- backpressure --------------------------------------------------------------------------

BIG = 64 << 20


@pytest.mark.parametrize("mode", MODES)
def test_download_backpressure_stalls_the_origin(certs: Certs, mode: Mode) -> None:
    """A client that does not read holds the origin back: the bytes in flight stay bounded
    by windows and socket buffers, far below the body; then everything arrives intact."""
    written = 0

    async def origin_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        from tests.conftest import pattern

        for chunk in pattern(BIG, seed=7):
            writer.write(chunk)
            await writer.drain()
            written += len(chunk)
        await reader.read()

    async def main() -> None:
        async with engine(certs, mode=mode) as eng, tcp_server(origin_handler) as port:
            reader, writer = await proxy_conn(eng)
            writer.write(get(port, "/big"))
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.5)
            stalled_at = written
            await asyncio.sleep(0.3)
            assert written == stalled_at, "origin kept writing to a client that does not read"
            assert stalled_at < 24 << 20
            h = hashlib.sha256()
            total = 0
            while total < BIG:
                data = await reader.read(1 << 20)
                assert data
                h.update(data)
                total += len(data)
            assert h.digest() == pattern_digest(BIG, seed=7)
            await finish(writer)

    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_upload_backpressure_stalls_the_client(certs: Certs, mode: Mode) -> None:
    """An origin that does not read the request body makes the proxy stop reading it."""
    release = asyncio.Event

    async def main() -> None:
        go = release()

        async def origin_handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await go.wait()
            h = hashlib.sha256()
            remaining = BIG
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                h.update(data)
                remaining -= len(data)
            body = h.hexdigest().encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await reader.read()

        async with engine(certs, mode=mode) as eng, tcp_server(origin_handler) as port:
            reader, writer = await proxy_conn(eng)
            writer.write(get(port, "/", f"Content-Length: {BIG}", method="PUT"))
            sent = 0
            from tests.conftest import pattern

            chunks = pattern(BIG, seed=3)

            async def pump() -> None:
                nonlocal sent
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

            task = asyncio.create_task(pump())
            await asyncio.sleep(0.5)
            stalled_at = sent
            await asyncio.sleep(0.3)
            assert sent == stalled_at and stalled_at < 24 << 20
            go.set()
            await task
            resp = await read_response(reader)
            assert resp.body == pattern_digest(BIG, seed=3).hex().encode()
            await finish(writer)

    run(main())


def test_idempotent_request_is_retried_when_a_reused_origin_connection_dies(
    certs: Certs,
) -> None:
    """RFC 9112 section 9.3.1: the origin closes a kept-alive connection just as the proxy
    reuses it; the GET goes out again on a new connection instead of becoming a 502."""
    connections = 0

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        served = 0
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if served == 1 and connections == 1:
                return  # the race: the second request on the first connection dies unanswered
            served += 1
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()

    async def main() -> None:
        async with tcp_server(origin) as port, engine(certs) as eng:
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port(eng))
            for path in (b"/one", b"/two"):
                writer.write(
                    b"GET http://127.0.0.1:%d%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                    % (port, path, port)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                assert await reader.readexactly(len(path)) == path
            writer.close()
            assert connections == 2

    run(main())
