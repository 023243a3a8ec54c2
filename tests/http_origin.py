"""An HTTP/1.1 origin server for proxy tests: the standard library's ``http.server`` (an
independent implementation, not our parser), in a thread, plain or TLS, on 127.0.0.1.

Paths::

    GET /hello...      200, "hello <path>" with Content-Length (keep-alive)
    GET /chunked       200, chunked body "chunk-0 ... chunk-4"
    GET /close         200, HTTP/1.0-style: no length, the body ends when the server closes
    GET /204           204 No Content
    GET /304           304 Not Modified
    GET /big/N         200, N bytes of ``pattern(N)``
    GET /headers       200, Keep-Alive and a header named by Connection (must not reach clients)
    HEAD any           the GET head of /hello, no body
    POST, PUT any      200, "<length> <sha256 hex>" of the request body (chunked or sized)

``Origin.connections`` counts accepted connections; ``Origin.requests`` records
(method, path, headers) of every request.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import Certs, pattern


class Origin(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.open_sockets: set[socket.socket] = set()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def stop_connections(self) -> None:
        with self.lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Origin
    timeout = 10

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.open_sockets.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers.items())))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._record()
        self._send(200, b"hello /hello")

    def do_GET(self) -> None:
        self._record()
        path = self.path
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                piece = f"chunk-{i} ".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif path in ("/204", "/304"):
            self._send(int(path[1:]), b"")
        elif path.startswith("/big/"):
            size = int(path[5:])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for chunk in pattern(size, seed=7):
                self.wfile.write(chunk)
        elif path == "/headers":
            self._send(
                200,
                b"headers",
                {"Keep-Alive": "timeout=5", "Connection": "X-Secret", "X-Secret": "hop"},
            )
        else:
            self._send(200, f"hello {path}".encode())

    def do_POST(self) -> None:
        self._record()
        h = hashlib.sha256()
        total = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                h.update(data)
                total += len(data)
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 16))
                if not data:
                    break
                h.update(data)
                total += len(data)
                remaining -= len(data)
        self._send(200, f"{total} {h.hexdigest()}".encode())

    do_PUT = do_POST


@contextmanager
def http_origin(certs: Certs | None = None) -> Iterator[Origin]:
    """Run an origin (TLS with the test certificate when ``certs`` is given) until exit."""
    ctx = None
    if certs is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certs.cert, certs.key)
    server = Origin(ctx)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.stop_connections()
        server.server_close()
        thread.join()
