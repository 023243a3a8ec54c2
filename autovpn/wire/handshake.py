"""The tunnel's opening handshake: an HTTP/1.1 WebSocket upgrade with HMAC authentication.

Pure: the caller passes the clock (``now``) and the random bytes; nothing here touches a socket.

The client proves it knows its user's secret without sending it (docs/protocol.md, "Auth")::

    Authorization: AutoVPN-HMAC user="alice", ts="1764147600", nonce="<b64url 16 bytes>",
                   mac="<b64url HMAC-SHA256(secret, 'autovpn-v1' user ts nonce path)>"

(the five fields of the MAC input are joined with newlines).

The server accepts a timestamp within ``MAX_CLOCK_SKEW`` seconds and each nonce once
(``ReplayCache``), and compares MACs in constant time.  Every failure gets the same bare 403
(401 when no credentials were offered at all), so a prober learns nothing about which part failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from autovpn.errors import AuthenticationFailed, LimitExceeded, RemoteProtocolError

SUBPROTOCOL_PREFIX: Final = "autovpn."
SUPPORTED_VERSIONS: Final = (1,)
WS_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
AUTH_SCHEME: Final = "AutoVPN-HMAC"
#: Asks the peer to send unmasked frames; answered with the same header when agreed.
MASKING_HEADER: Final = "autovpn-masking"
MAX_CLOCK_SKEW: Final = 120  # seconds
MAX_HEAD_SIZE: Final = 16 * 1024
MAX_HEADERS: Final = 64
DEFAULT_PATH_PREFIX: Final = "autovpn"
TUNNEL_PATH_SUFFIX: Final = "tunnel"


class HandshakeError(RemoteProtocolError):
    """The upgrade failed.  ``status`` is the HTTP status sent or received."""

    def __init__(self, message: str, status: int, *, reply: bytes = b"") -> None:
        super().__init__(message, reply=reply)
        self.status = status


@dataclass(frozen=True, slots=True)
class HttpHead:
    """A parsed request or response head.  Header names are lower-cased; order is kept."""

    start_line: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def parse_head(buffer: bytearray) -> tuple[HttpHead, bytes] | None:
    """Parse an HTTP/1.1 head at the start of ``buffer``.

    Returns (head, bytes after the head), or None while incomplete.  Raises LimitExceeded past
    ``MAX_HEAD_SIZE`` and RemoteProtocolError on malformed lines.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        # +3: the terminator may have started inside the limit and not fully arrived yet.
        if len(buffer) > MAX_HEAD_SIZE + 3:
            raise LimitExceeded(f"HTTP head larger than MAX_HEAD_SIZE ({MAX_HEAD_SIZE} bytes)")
        return None
    if end > MAX_HEAD_SIZE:
        raise LimitExceeded(f"HTTP head larger than MAX_HEAD_SIZE ({MAX_HEAD_SIZE} bytes)")
    try:
        text = bytes(buffer[:end]).decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes everything
        raise RemoteProtocolError("undecodable HTTP head") from exc
    lines = text.split("\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise LimitExceeded(f"more than MAX_HEADERS ({MAX_HEADERS}) header lines")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise RemoteProtocolError(f"malformed header line {line[:40]!r}")
        headers.append((name.lower(), value.strip()))
    return HttpHead(lines[0], tuple(headers)), bytes(buffer[end + 4 :])


def _is_number(text: str) -> bool:
    # Not str.isdigit(): it accepts "²", which int() then refuses.
    return 0 < len(text) <= 20 and text.isascii() and text.isdecimal()


def _valid_ws_key(key: str) -> bool:
    """RFC 6455 section 4.1: the base64 of 16 bytes (24 ASCII characters)."""
    if len(key) != 24 or not key.isascii():
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def accept_key(key: str) -> str:
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compute_mac(secret: bytes, user: str, ts: int, nonce: str, path: str) -> str:
    msg = f"autovpn-v1\n{user}\n{ts}\n{nonce}\n{path}".encode()
    return _b64(hmac.new(secret, msg, hashlib.sha256).digest())


def tunnel_path(prefix: str = DEFAULT_PATH_PREFIX) -> str:
    prefix = prefix.strip("/")
    return f"/{prefix}/{TUNNEL_PATH_SUFFIX}" if prefix else f"/{TUNNEL_PATH_SUFFIX}"


def build_request(
    *,
    host: str,
    path: str,
    user: str,
    secret: bytes,
    now: int,
    nonce: bytes,
    ws_key: bytes,
    unmasked: bool = True,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The client's upgrade request."""
    nonce_text = _b64(nonce)
    mac = compute_mac(secret, user, now, nonce_text, path)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(ws_key).decode('ascii')}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: "
        + ", ".join(f"{SUBPROTOCOL_PREFIX}{v}" for v in reversed(SUPPORTED_VERSIONS)),
        f'Authorization: {AUTH_SCHEME} user="{user}", ts="{now}", nonce="{nonce_text}", '
        f'mac="{mac}"',
    ]
    if unmasked:
        lines.append(f"{MASKING_HEADER}: none")
    lines.extend(f"{k}: {v}" for k, v in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class ClientResult:
    version: int
    unmasked: bool  # the server agreed that we send unmasked frames


def check_response(head: HttpHead, ws_key: bytes) -> ClientResult:
    """Validate the server's answer to ``build_request``; raise HandshakeError otherwise."""
    parts = head.start_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _is_number(parts[1]):
        raise HandshakeError(f"malformed status line {head.start_line[:60]!r}", 502)
    status = int(parts[1])
    if status != 101:
        what = {
            401: "credentials required",
            403: "authentication refused",
            404: "wrong path (check the path prefix)",
        }.get(status, "upgrade refused")
        raise HandshakeError(f"tunnel server answered HTTP {status}: {what}", status)
    expected = accept_key(base64.b64encode(ws_key).decode("ascii"))
    if head.get("sec-websocket-accept") != expected:
        raise HandshakeError("wrong Sec-WebSocket-Accept from the tunnel server", 502)
    proto = head.get("sec-websocket-protocol")
    if not proto.startswith(SUBPROTOCOL_PREFIX) or not _is_number(proto[len(SUBPROTOCOL_PREFIX) :]):
        raise HandshakeError(f"server chose no autovpn protocol version ({proto!r})", 502)
    version = int(proto[len(SUBPROTOCOL_PREFIX) :])
    if version not in SUPPORTED_VERSIONS:
        raise HandshakeError(f"server chose unsupported protocol version {version}", 502)
    return ClientResult(version, head.get(MASKING_HEADER).lower() == "none")


class ReplayCache:
    """Nonces seen within the clock-skew window, so a captured request cannot be replayed.

    Bounded: entries older than the window are dropped first, and past ``max_entries`` the
    oldest go (a request that old is refused by its timestamp anyway).
    """

    def __init__(self, window: float = 2 * MAX_CLOCK_SKEW, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._window = window
        self._max = max_entries

    def check_and_add(self, nonce: str, now: float) -> bool:
        """True if ``nonce`` is fresh (and remember it), False if it was seen."""
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if now - when <= self._window and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


_AUTH_PARAM = re.compile(r'(\w+)="([^"]*)"')
_DUMMY_SECRET = b"\x00" * 32


@dataclass(frozen=True, slots=True)
class Accepted:
    user: str
    version: int
    unmasked: bool  # the client sends unmasked frames and asks us to do the same
    response: bytes  # the 101 answer to send


def plain_response(status: int, reason: str, extra: str = "") -> bytes:
    body = f"{status} {reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1") + body


def request_target(head: HttpHead) -> tuple[str, str]:
    """(method, path without query) of a request head; raises HandshakeError(400)."""
    parts = head.start_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HandshakeError(
            "malformed request line", 400, reply=plain_response(400, "Bad Request")
        )
    return parts[0], parts[1].split("?", 1)[0]


def accept_request(
    head: HttpHead,
    *,
    path: str,
    users: Mapping[str, bytes],
    replay: ReplayCache,
    now: float,
) -> Accepted:
    """Check an upgrade request for our tunnel.  Raises HandshakeError carrying the answer.

    The caller has already matched the path; order of checks: upgrade headers (400),
    credentials present (401), timestamp, nonce and MAC (403 for all three).
    """
    method, _ = request_target(head)
    if (
        method != "GET"
        or head.get("upgrade").lower() != "websocket"
        or "upgrade" not in head.get("connection").lower()
        or head.get("sec-websocket-version") != "13"
        or not _valid_ws_key(head.get("sec-websocket-key"))
    ):
        raise HandshakeError(
            "not a WebSocket upgrade", 400, reply=plain_response(400, "Bad Request")
        )
    offered = [p.strip() for p in head.get("sec-websocket-protocol").split(",")]
    versions = [
        int(p[len(SUBPROTOCOL_PREFIX) :])
        for p in offered
        if p.startswith(SUBPROTOCOL_PREFIX) and _is_number(p[len(SUBPROTOCOL_PREFIX) :])
    ]
    common = sorted(set(versions) & set(SUPPORTED_VERSIONS))
    if not common:
        raise HandshakeError(
            f"no common protocol version (offered {offered!r})",
            400,
            reply=plain_response(400, "Bad Request"),
        )
    auth = head.get("authorization")
    scheme, _, params_text = auth.partition(" ")
    if scheme != AUTH_SCHEME:
        raise AuthenticationFailed("no credentials", reply=plain_response(401, "Unauthorized"))
    params = dict(_AUTH_PARAM.findall(params_text))
    user, ts_text, nonce, mac = (params.get(k, "") for k in ("user", "ts", "nonce", "mac"))
    forbidden = plain_response(403, "Forbidden")
    secret = users.get(user)
    # Compute the MAC even for an unknown user, so timing does not tell which users exist.
    expected = compute_mac(
        secret or _DUMMY_SECRET, user, int(ts_text) if _is_number(ts_text) else 0, nonce, path
    )
    mac_ok = hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace"))
    if secret is None or not mac_ok:
        raise AuthenticationFailed(f"bad credentials for user {user!r}", reply=forbidden)
    if not _is_number(ts_text) or abs(now - int(ts_text)) > MAX_CLOCK_SKEW:
        raise AuthenticationFailed(f"stale timestamp from user {user!r}", reply=forbidden)
    if not replay.check_and_add(nonce, now):
        raise AuthenticationFailed(f"replayed nonce from user {user!r}", reply=forbidden)
    version = common[-1]
    unmasked = head.get(MASKING_HEADER).lower() == "none"
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(head.get('sec-websocket-key'))}",
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL_PREFIX}{version}",
    ]
    if unmasked:
        lines.append(f"{MASKING_HEADER}: none")
    response = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return Accepted(user, version, unmasked, response)
