"""A wstunnel v10 conformance peer written from docs/wstunnel-protocol.md only.

It shares no code with autovpn: its own WebSocket framing (RFC 6455 section 5.2), its own JWT
(HS256 with ``champignonfrais``, base64url without padding) and its own HTTP head handling.
It plays a wstunnel v10 *client* against the autovpn server and a wstunnel v10 *server* for
the autovpn client, behaving as the facts file says the Rust code does:

- the client sends unmasked frames (no ``--websocket-mask-frame``), the server never unmasks
  (it forwards payload bytes as received, MASK bit or not) and never masks (section 3.4);
- every Ping gets one Pong; a Pong decrements the in-flight counter, and a Pong with nothing
  in flight is recorded as ``unsolicited_pongs`` (the counter wrap that kills a real tunnel);
- EOF sends Close(1000); a Close is answered with Close(1000).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

KEY = b"champignonfrais"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

BINARY, CLOSE, PING, PONG = 0x2, 0x8, 0x9, 0xA


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt(claims: dict[str, Any], key: bytes = KEY) -> str:
    header = b64url(json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    result: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return result


def jwt_signature_ok(token: str, key: bytes = KEY) -> bool:
    head, payload, sig = token.split(".")
    want = b64url(hmac.new(key, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    return hmac.compare_digest(want, sig)


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    n = len(payload)
    b1 = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, b1 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, b1 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, b1 | 127, n)
    if mask is None:
        return head + payload
    masked = (
        bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _xor(payload, mask)
    )
    return head + mask + masked


def _xor(data: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(data) // 4 + 1))[: len(data)], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(len(data), "big")


@dataclass
class Frame:
    opcode: int
    payload: bytes  # as received: NOT unmasked (a default wstunnel server does not unmask)
    mask: bytes | None

    def unmasked(self) -> bytes:
        return self.payload if self.mask is None else _xor(self.payload, self.mask)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    if n >= 64 << 20:
        raise ValueError("frame of 64 MiB or more (fastwebsockets limit)")
    mask = await reader.readexactly(4) if b1 & 0x80 else None
    return Frame(b0 & 0x0F, await reader.readexactly(n), mask)


async def read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")[:-2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


@dataclass
class PeerStats:
    requests: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    frames_in: list[tuple[int, bytes | None]] = field(default_factory=list)  # opcode, mask
    pongs: list[bytes] = field(default_factory=list)
    unsolicited_pongs: int = 0
    closes_received: list[int] = field(default_factory=list)
    connections: int = 0
    sni: list[str | None] = field(default_factory=list)
    client_cn: list[str | None] = field(default_factory=list)


class WsRelay:
    """The data phase of one tunnel, as a wstunnel end runs it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stats: PeerStats,
        *,
        send_mask: bytes | None = None,
        unmask: bool = False,
    ) -> None:
        self.reader, self.writer, self.stats = reader, writer, stats
        self.send_mask, self.unmask = send_mask, unmask
        self.in_flight = 0
        self.closed = False

    def send(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            self.in_flight += 1
        self.writer.write(frame(opcode, payload, self.send_mask))

    async def pump_in(self, out: asyncio.StreamWriter | None) -> None:
        """WebSocket → ``out``; returns when a Close arrives or the connection ends."""
        try:
            while True:
                f = await read_frame(self.reader)
                self.stats.frames_in.append((f.opcode, f.mask))
                data = f.unmasked() if self.unmask else f.payload
                if f.opcode in (BINARY, 0x1, 0x0):
                    if out is not None:
                        out.write(data)
                        await out.drain()
                elif f.opcode == PING:
                    self.writer.write(frame(PONG, f.unmasked(), self.send_mask))
                elif f.opcode == PONG:
                    self.stats.pongs.append(f.unmasked())
                    if self.in_flight == 0:
                        self.stats.unsolicited_pongs += 1
                    else:
                        self.in_flight -= 1
                elif f.opcode == CLOSE:
                    body = f.unmasked()
                    self.stats.closes_received.append(
                        struct.unpack("!H", body[:2])[0] if len(body) >= 2 else 1005
                    )
                    if not self.closed:
                        self.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if out is not None and not out.is_closing():
                out.close()

    async def pump_out(self, source: asyncio.StreamReader, frame_size: int = 0) -> None:
        """``source`` → one binary frame per read (of exactly ``frame_size`` bytes when set,
        as wstunnel's growing buffer makes big frames); Close(1000) at EOF."""
        try:
            while True:
                if frame_size:
                    try:
                        data = await source.readexactly(frame_size)
                    except asyncio.IncompleteReadError as exc:
                        data = exc.partial
                else:
                    data = await source.read(1 << 16)
                if not data:
                    break
                self.send(BINARY, data)
                await self.writer.drain()
        except ConnectionError:
            pass
        if not self.closed:
            self.close()

    def close(self) -> None:
        self.closed = True
        if not self.writer.is_closing():
            self.writer.write(frame(CLOSE, struct.pack("!H", 1000), self.send_mask))


# -- playing a wstunnel v10 client against the autovpn server ----------------------------------


@dataclass
class ClientAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def upgrade_request(
    host: str,
    jwt: str,
    *,
    prefix: str = "v1",
    extra: list[tuple[str, str]] | None = None,
    drop: tuple[str, ...] = (),
    path: str | None = None,
) -> bytes:
    headers = [
        ("host", host),
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-key", base64.b64encode(os.urandom(16)).decode()),
        ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", f"v1, authorization.bearer.{jwt}"),
        *(extra or []),
    ]
    lines = [f"GET {path or f'/{prefix}/events'} HTTP/1.1"] + [
        f"{k}: {v}" for k, v in headers if k not in drop
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def tcp_claims(host: str, port: int, proxy_protocol: bool = False) -> dict[str, Any]:
    return {
        "id": "019247a6-7c3e-7b21-9d4e-3f0c2a1b5d60",
        "p": {"Tcp": {"proxy_protocol": proxy_protocol}},
        "r": f"[{host}]" if ":" in host else host,
        "rp": port,
    }


async def client_connect(
    port: int,
    request: bytes,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ClientAnswer:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=ssl_context,
        server_hostname=server_hostname if ssl_context else None,
        limit=1 << 22,
    )
    writer.write(request)
    status_line, headers = await read_head(reader)
    status = int(status_line.split(" ")[1])
    body = b""
    if status != 101:
        length = int(header(headers, "content-length") or 0)
        body = await reader.readexactly(length)
    return ClientAnswer(status, headers, body, reader, writer)


# -- playing a wstunnel v10 server for the autovpn client ---------------------------------------


class PeerServer:
    """``async with PeerServer(...) as peer``: a wstunnel v10 server on 127.0.0.1:peer.port."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        answer_status: int = 101,
        frame_size: int = 0,
        ping_payloads: tuple[bytes, ...] = (),
        unmask: bool = False,
    ) -> None:
        self.ssl_context = ssl_context
        self.answer_status = answer_status
        self.frame_size = frame_size
        self.ping_payloads = ping_payloads
        self.unmask = unmask  # --websocket-mask-frame on the server
        self.stats = PeerStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        if ssl_context is not None:
            ssl_context.sni_callback = self._sni

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.stats.sni.append(name)

    async def __aenter__(self) -> PeerServer:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.ssl_context, limit=1 << 22
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.stats.connections += 1
        cert = writer.get_extra_info("peercert")
        cn = None
        if cert:
            for rdn in cert.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cn = v
        self.stats.client_cn.append(cn)
        target_writer: asyncio.StreamWriter | None = None
        try:
            try:
                line, headers = await read_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # a pooled connection that was never used
            self.stats.requests.append((line, headers))
            proto = header(headers, "sec-websocket-protocol") or ""
            jwt = proto.split("authorization.bearer.", 1)[1]
            claims = jwt_claims(jwt)
            host = claims["r"].strip("[]")
            if self.answer_status != 101:
                # wstunnel's own refusal, or another status as a proxy in front would answer
                status = self.answer_status
                body = b"Invalid request" if status == 400 else b"refused"
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
                )
                await writer.drain()
                return
            try:
                t_reader, target_writer = await asyncio.open_connection(host, claims["rp"])
            except OSError:
                writer.write(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 15\r\n\r\nInvalid request"
                )
                await writer.drain()
                return
            key = header(headers, "sec-websocket-key") or ""
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            writer.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                    f"upgrade: websocket\r\nsec-websocket-accept: {accept}\r\n"
                    "sec-websocket-protocol: v1\r\n\r\n"
                ).encode()
            )
            relay = WsRelay(reader, writer, self.stats, unmask=self.unmask)
            for payload in self.ping_payloads:
                relay.send(PING, payload)
            await asyncio.gather(
                relay.pump_in(target_writer), relay.pump_out(t_reader, self.frame_size)
            )
            await writer.drain()
        finally:
            if target_writer is not None:
                target_writer.close()
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


# -- the HTTP/2 transport (section 4), client side, with the h2 package ------------------------


class H2Tunnel:
    """A wstunnel HTTP/2 client stream: POST /<prefix>/events, cookie: <JWT>."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection

        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.stream_id = 1
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.ended = False

    @classmethod
    async def open(
        cls,
        port: int,
        jwt: str,
        *,
        prefix: str = "v1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> H2Tunnel:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_context, server_hostname="localhost" if ssl_context else None
        )
        t = cls(reader, writer)
        t.conn.initiate_connection()
        t.conn.send_headers(
            t.stream_id,
            [
                (":method", "POST"),
                (":scheme", "https" if ssl_context else "http"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", f"/{prefix}/events"),
                ("cookie", jwt),
                ("content-type", "application/json"),
            ],
        )
        writer.write(t.conn.data_to_send())
        while not t.status:
            await t._read()
        return t

    async def _read(self) -> None:
        import h2.events

        data = await self.reader.read(1 << 16)
        if not data:
            self.ended = True
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers = {str(k): str(v) for k, v in event.headers}
                self.status = int(self.headers[":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended = True
        self.writer.write(self.conn.data_to_send())

    async def send(self, data: bytes) -> None:
        """Send within the server's flow-control window, reading its updates as needed."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(self.stream_id),
                self.conn.max_outbound_frame_size,
            )
            if window <= 0:
                await self._read()
                continue
            self.conn.send_data(self.stream_id, bytes(view[:window]))
            self.writer.write(self.conn.data_to_send())
            view = view[window:]

    async def receive(self, n: int) -> bytes:
        while len(self.body) < n and not self.ended:
            await self._read()
        out = bytes(self.body[:n])
        del self.body[:n]
        return out

    async def end(self) -> None:
        self.conn.end_stream(self.stream_id)
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()
