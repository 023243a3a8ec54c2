"""Fuzzing the control API's HTTP handling over a real socket, against a running engine.

Random bytes, and valid requests mutated (bytes flipped, inserted and cut; headers repeated,
oversized or missing; bodies shorter or longer than their Content-Length), each sent on its own
connection, whose write side is then shut.  The API must answer with a complete HTTP/1.1
status line that is not a server error (501 for a chunked body is a refusal), or close; it must
never hang, never log an error, and it still answers a good request afterwards.  Nothing here
depends on how the API is implemented: only bytes on a socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autovpn.config import Config, RoutingConfig
from autovpn.engine import Engine
from autovpn.eventloop import run as run_on_loop
from tests.conftest import Certs, engine_config

#: How long one answer may take: the API's own read timeout is 10 s, but every request here
#: ends in EOF, which must end the wait at once.
ANSWER_WITHIN = 5.0
#: How long to wait for an answer before shutting our write side (see ``exchange``).
FIRST_BYTE_WITHIN = 0.25
#: aiohttp answers a request line without a version (HTTP/0.9's form) with "HTTP/0.9 404".
STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([1-5][0-9][0-9])[ \r]")


class _Errors(logging.Handler):
    """Collects every ERROR (and worse) any logger emits: an unhandled exception in a
    connection handler is logged so, by asyncio or by us."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def engine_thread(config: Config) -> Iterator[Engine]:
    """An engine on its own event loop in a thread, for blocking clients in the test."""
    started = threading.Event()
    running: list[tuple[Engine, asyncio.AbstractEventLoop]] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        async with Engine(config) as eng:
            running.append((eng, asyncio.get_running_loop()))
            started.set()
            await eng.serve_forever()

    def main() -> None:
        try:
            run_on_loop(serve())
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=main, name="engine", daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        raise failure[0]
    eng, loop = running[0]
    try:
        yield eng
    finally:
        loop.call_soon_threadsafe(eng.stop)
        thread.join(30)
    if failure:
        raise failure[0]


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and return the answer's head (or b"" if the API closed without one).

    An answer is read as soon as it comes.  If none comes at once (the request may be
    incomplete, and the API rightly waits for the rest), our write side is shut: the API must
    then answer or close within ANSWER_WITHIN, not wait for its read timeout.  (Shutting it
    first would not do: aiohttp drops a complete request whose connection is half-closed.)
    """
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN) as sock:
        try:
            sock.sendall(request)
        except OSError:
            pass  # it answered and closed while we were still sending: a refusal too
        answer = bytearray()
        sock.settimeout(FIRST_BYTE_WITHIN)
        try:
            first = sock.recv(65536)
        except TimeoutError:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.settimeout(ANSWER_WITHIN)
            first = _recv(sock)
        except ConnectionResetError:
            first = b""
        answer += first
        sock.settimeout(ANSWER_WITHIN)
        while answer and b"\r\n\r\n" not in answer:
            data = _recv(sock)
            if not data:
                break
            answer += data
        return bytes(answer)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def check_answer(answer: bytes) -> None:
    if not answer:
        return  # closed without answering: allowed
    match = STATUS_LINE.match(answer)
    assert match is not None, answer[:200]
    status = int(match.group(1))
    assert status < 500 or status == 501, answer[:300]
    assert b"\r\n\r\n" in answer, answer[:300]  # a whole head, not a torn one


def templates(port: int) -> list[bytes]:
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    return [
        b"GET /status HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /proxy.pac HTTP/1.1\r\n" + host + b'If-None-Match: "x", W/"y"\r\n\r\n',
        b"HEAD /smart.pac HTTP/1.1\r\n" + host + b"If-Modified-Since: Sun, 06 Nov 1994\r\n\r\n",
        b"GET /route?host=example.com&port=443&resolve=1 HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /route?host=%00%ff&port=99999 HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /mode HTTP/1.0\r\n" + host + b"Origin: null\r\n\r\n",
        b"POST /mode HTTP/1.1\r\n" + host + b"Content-Length: 17\r\n\r\n" + b'{"mode": "smart"}',
        b"POST /mode?mode=direct HTTP/1.1\r\n" + host + b"Authorization: Bearer x\r\n\r\n",
        b"POST /resolve?list=all HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n0\r\n",
        b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n",
        b"GET http://127.0.0.1/status HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /status HTTP/1.1\r\nHost: 127.evil.com\r\n\r\n",
    ]


@st.composite
def requests(draw: st.DrawFn, port: int) -> bytes:
    # Most requests end with an empty line, so that the API has a whole head to judge at once.
    end = draw(st.sampled_from([b"\r\n\r\n", b"\r\n\r\n", b"\r\n\r\n", b""]))
    return draw(_requests(port)) + end


@st.composite
def _requests(draw: st.DrawFn, port: int) -> bytes:
    how = draw(st.sampled_from(["bytes", "mutate", "mutate", "mutate", "header", "length"]))
    if how == "bytes":
        return draw(st.binary(max_size=2048))
    request = bytearray(draw(st.sampled_from(templates(port))))
    if how == "header":
        name = draw(st.sampled_from([b"Host", b"Content-Length", b"X", b"Origin", b"Cookie"]))
        if draw(st.booleans()):
            value, copies = b"a" * draw(st.integers(1000, 70_000)), 1  # past MAX_HEAD
        else:
            value, copies = draw(st.binary(max_size=64)), draw(st.integers(1, 150))  # MAX_HEADERS
        at = request.index(b"\r\n") + 2
        request[at:at] = (name + b": " + value + b"\r\n") * copies
        return bytes(request)
    if how == "length":
        length = draw(st.sampled_from([b"-1", b"1e3", b"0x10", b"99999999999999999999", b" 5"]))
        head, _, body = bytes(request).partition(b"\r\n\r\n")
        return head + b"\r\nContent-Length: " + length + b"\r\n\r\n" + body
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(request)))
        action = draw(st.sampled_from(["flip", "insert", "cut", "dup"]))
        if action == "flip" and at < len(request):
            request[at] = draw(st.integers(0, 255))
        elif action == "insert":
            request[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif action == "cut":
            del request[at : at + draw(st.integers(1, 40))]
        else:
            request[at:at] = request[max(0, at - 40) : at]
    return bytes(request)


def test_control_api_answers_any_bytes_with_a_refusal_or_a_close(certs: Certs) -> None:
    config = engine_config(certs)
    config.control = "127.0.0.1:0"
    # No name may reach a real resolver: /route?resolve=1 asks the ones configured here.
    config.routing = RoutingConfig(dns_local=[], dns_public=[], hosts_file=None)
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    try:
        with engine_thread(config) as eng:
            assert eng.api is not None
            port = eng.api.bound_port

            @settings(
                max_examples=1000,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(request=requests(port))
            def one(request: bytes) -> None:
                check_answer(exchange(port, request))

            one()
            # Still serving, and nothing was logged as an error on the way.
            good = exchange(port, templates(port)[0])
            assert good.startswith(b"HTTP/1.1 200"), good[:200]
    finally:
        logging.getLogger().removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []
