"""The tunnel's opening handshake: an HTTP/1.1 WebSocket upgrade, HMAC authentication and a
server challenge.  Pure: the caller passes the clock (``now``) and the random bytes; nothing
here touches a socket.

The client proves it knows its user's secret without sending it (docs/protocol.md, section 1),
twice:

1. In the upgrade request, to get a 101 at all (a prober without the secret sees a bare
   401/403, not a WebSocket server)::

       Authorization: AutoVPN-HMAC user="alice", ts="1764147600", nonce="<b64url 16 bytes>",
                      mac="<b64url HMAC-SHA256(secret, 'autovpn-v2 request' user ts nonce
                                               host path)>"

   The server accepts a timestamp within ``MAX_CLOCK_SKEW`` seconds and each nonce once
   (``ReplayCache``).  That cache lives in one process, so on its own it cannot stop a
   recorded request from being accepted again by a restarted server, or by another server
   with the same secret.
2. Hence the challenge: the 101 carries ``autovpn-challenge: <b64url 16 random bytes>``, and the
   client's first mux frame must be AUTH with ``HMAC-SHA256(secret, 'autovpn-v2 proof' user
   nonce challenge host path)``.  The server opens no stream before it has checked it.  A
   recorded AUTH answers a challenge that will never be asked again, so a recorded handshake
   is worthless anywhere and at any time.  The client sends AUTH without waiting for anything
   and its first OPEN right behind it: no round trip is added.

(The fields of each MAC input are joined with newlines.)  MACs are compared in constant time.
Every failure of the request gets the same bare 403 (401 when no credentials were offered at
all), so a prober learns nothing about which part failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

from autovpn.errors import AuthenticationFailed, RemoteProtocolError
from autovpn.wire import frames, http1
from autovpn.wire.http1 import HeadLimits, RequestHead, ResponseHead

SUBPROTOCOL_PREFIX: Final = "autovpn."
#: Version 2 added the server challenge (AUTH frame); version 1 handshakes could be replayed.
SUPPORTED_VERSIONS: Final = (2,)
WS_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
AUTH_SCHEME: Final = "AutoVPN-HMAC"
#: Asks the peer to send unmasked frames; answered with the same header when agreed.
MASKING_HEADER: Final = "autovpn-masking"
#: The server's challenge in its 101: the base64url of ``CHALLENGE_SIZE`` random bytes.
CHALLENGE_HEADER: Final = "autovpn-challenge"
CHALLENGE_SIZE: Final = 16
#: How far a request's timestamp may be from the server's clock.  Freshness comes from the
#: challenge, not from this window: it only bounds how long a recorded request can still get a
#: 101 (never a stream), so it stays wide enough for clients whose clocks drift.
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


#: The upgrade request's head (http1's grammar; a line may take the whole head).  Every
#: refusal is a 400, like the handshake's own: a prober learns nothing from the status.
REQUEST_LIMITS: Final = HeadLimits(
    max_line=MAX_HEAD_SIZE,
    max_headers=MAX_HEADERS,
    max_head=MAX_HEAD_SIZE,
    line_name="MAX_HEAD_SIZE",
    head_name="MAX_HEAD_SIZE",
    error_status=400,
    start_line_status=400,
    too_large_status=400,
)
#: The server's answer, read by the client with the same bounds; a bad one is a 502.
RESPONSE_LIMITS: Final = replace(
    REQUEST_LIMITS, error_status=502, start_line_status=502, too_large_status=502
)


def _is_number(text: str) -> bool:
    # Not str.isdigit(): it accepts "²", which int() then refuses.
    return 0 < len(text) <= 20 and text.isascii() and text.isdecimal()


def valid_ws_key(key: str) -> bool:
    """RFC 6455 section 4.1: the base64 of 16 bytes (24 ASCII characters)."""
    if len(key) != 24 or not key.isascii():
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key``, which the caller checked with ``valid_ws_key``
    (a non-ASCII key raises UnicodeEncodeError here)."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def b64url(data: bytes) -> str:
    """Unpadded base64url, the encoding of nonces, challenges and MACs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compute_mac(secret: bytes, user: str, ts: int, nonce: str, host: str, path: str) -> str:
    """The request's MAC.  ``host`` is the Host header as sent (``name`` or ``name:port``)."""
    msg = f"autovpn-v2 request\n{user}\n{ts}\n{nonce}\n{host}\n{path}"
    return b64url(hmac.new(secret, msg.encode(), hashlib.sha256).digest())


def compute_proof(
    secret: bytes, user: str, nonce: str, challenge: str, host: str, path: str
) -> bytes:
    """The AUTH frame's payload: the answer to the server's ``challenge``.

    Its label differs from the request MAC's, so neither can ever stand in for the other.
    """
    msg = f"autovpn-v2 proof\n{user}\n{nonce}\n{challenge}\n{host}\n{path}"
    return hmac.new(secret, msg.encode(), hashlib.sha256).digest()


def auth_frame(proof: bytes) -> bytes:
    """The client's first mux frame."""
    return frames.frame(frames.FrameType.AUTH, 0, proof)


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
    nonce_text = b64url(nonce)
    mac = compute_mac(secret, user, now, nonce_text, host, path)
    fields = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(ws_key).decode("ascii")),
        ("Sec-WebSocket-Version", "13"),
        (
            "Sec-WebSocket-Protocol",
            ", ".join(f"{SUBPROTOCOL_PREFIX}{v}" for v in reversed(SUPPORTED_VERSIONS)),
        ),
        (
            "Authorization",
            f'{AUTH_SCHEME} user="{user}", ts="{now}", nonce="{nonce_text}", mac="{mac}"',
        ),
    ]
    if unmasked:
        fields.append((MASKING_HEADER, "none"))
    fields.extend(extra_headers)
    return http1.render(f"GET {path} HTTP/1.1", fields)


@dataclass(frozen=True, slots=True)
class ClientResult:
    version: int
    unmasked: bool  # the server agreed that we send unmasked frames
    challenge: str  # the server's challenge: answer it with ``compute_proof`` in AUTH


def _valid_challenge(text: str) -> bool:
    """The unpadded base64url of ``CHALLENGE_SIZE`` bytes."""
    if len(text) != (CHALLENGE_SIZE * 4 + 2) // 3 or not text.isascii():
        return False
    try:
        return len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) == CHALLENGE_SIZE
    except ValueError:
        return False


def _versions_text() -> str:
    return ", ".join(f"{SUBPROTOCOL_PREFIX}{v}" for v in SUPPORTED_VERSIONS)


def check_response(head: ResponseHead, ws_key: bytes) -> ClientResult:
    """Validate the server's answer to ``build_request``; raise HandshakeError otherwise."""
    status = head.status
    if status != 101:
        what = {
            400: "bad request (this client speaks only "
            f"{_versions_text()}: if the server runs an older autovpn, update it)",
            401: "credentials required",
            403: "authentication refused (check the secret; a proxy in front of the server "
            "must pass the Host header and the path on unchanged)",
            404: "wrong path (check the path prefix)",
            429: "too many authentication failures from this address: the server refuses it "
            "for a while (check the secret, then wait)",
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
        raise HandshakeError(
            f"server chose protocol version {version}; this client speaks only {_versions_text()}",
            502,
        )
    challenge = head.get(CHALLENGE_HEADER)
    if not _valid_challenge(challenge):
        raise HandshakeError(f"no valid {CHALLENGE_HEADER} in the tunnel server's 101", 502)
    return ClientResult(version, head.get(MASKING_HEADER).lower() == "none", challenge)


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
    proof: bytes  # the AUTH payload that answers this 101's challenge (see ``check_auth``)


def plain_response(status: int, reason: str | None = None) -> bytes:
    """The server's bare refusal: the status and nothing else (``reason``: the standard one)."""
    reason = http1.phrase(status) if reason is None else reason
    body = f"{status} {reason}\n".encode()
    return http1.response(status, reason, [("Content-Type", "text/plain")], body)


def request_target(head: RequestHead) -> tuple[str, str]:
    """(method, path without query) of an HTTP/1 request head; raises HandshakeError(400)."""
    if not head.version.startswith("HTTP/1."):
        raise HandshakeError(
            f"not an HTTP/1 request ({head.version})", 400, reply=plain_response(400, "Bad Request")
        )
    return head.method, head.target.split("?", 1)[0]


def accept_request(
    head: RequestHead,
    *,
    path: str,
    users: Mapping[str, bytes],
    replay: ReplayCache,
    now: float,
    challenge: bytes,
) -> Accepted:
    """Check an upgrade request for our tunnel.  Raises HandshakeError carrying the answer.

    ``challenge`` is ``CHALLENGE_SIZE`` fresh random bytes: the 101 carries them, and the
    connection may carry nothing but an AUTH frame with ``Accepted.proof`` until ``check_auth``
    passed.  The caller has already matched the path; order of checks: upgrade headers (400),
    credentials present (401), timestamp, nonce and MAC (403 for all three).
    """
    method, _ = request_target(head)
    hosts = head.get_all("host")
    if (
        method != "GET"
        or len(hosts) != 1  # RFC 9112 section 3.2: exactly one, or 400
        or head.get("upgrade").lower() != "websocket"
        or "upgrade" not in head.get("connection").lower()
        or head.get("sec-websocket-version") != "13"
        or not valid_ws_key(head.get("sec-websocket-key"))
    ):
        raise HandshakeError(
            "not a WebSocket upgrade", 400, reply=plain_response(400, "Bad Request")
        )
    host = hosts[0]
    offered = [p.strip() for p in head.get("sec-websocket-protocol").split(",")]
    versions = [
        int(p[len(SUBPROTOCOL_PREFIX) :])
        for p in offered
        if p.startswith(SUBPROTOCOL_PREFIX) and _is_number(p[len(SUBPROTOCOL_PREFIX) :])
    ]
    common = sorted(set(versions) & set(SUPPORTED_VERSIONS))
    if not common:
        raise HandshakeError(
            f"no common protocol version: the client offers {offered!r}, this server speaks "
            f"{_versions_text()} (update the older end)",
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
        secret or _DUMMY_SECRET,
        user,
        int(ts_text) if _is_number(ts_text) else 0,
        nonce,
        host,
        path,
    )
    mac_ok = hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace"))
    if secret is None or not mac_ok:
        raise AuthenticationFailed(
            f"bad credentials for user {user[:64]!r} (a wrong secret, or a proxy that changed "
            f"the Host header {host[:100]!r} or the path)",
            reply=forbidden,
        )
    if not _is_number(ts_text) or abs(now - int(ts_text)) > MAX_CLOCK_SKEW:
        raise AuthenticationFailed(
            f"stale timestamp from user {user!r} (its clock is off by more than "
            f"{MAX_CLOCK_SKEW} s, or the request is a recorded one)",
            reply=forbidden,
        )
    if not replay.check_and_add(nonce, now):
        raise AuthenticationFailed(f"replayed nonce from user {user!r}", reply=forbidden)
    version = common[-1]
    unmasked = head.get(MASKING_HEADER).lower() == "none"
    challenge_text = b64url(challenge)
    fields = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(head.get("sec-websocket-key"))),
        ("Sec-WebSocket-Protocol", f"{SUBPROTOCOL_PREFIX}{version}"),
        (CHALLENGE_HEADER, challenge_text),
    ]
    if unmasked:
        fields.append((MASKING_HEADER, "none"))
    response = http1.render("HTTP/1.1 101 Switching Protocols", fields)
    proof = compute_proof(secret, user, nonce, challenge_text, host, path)
    return Accepted(user, version, unmasked, response, proof)


def check_auth(accepted: Accepted, ftype: int, sid: int, payload: bytes | memoryview) -> None:
    """Check the first mux frame after ``accepted``'s 101; raises AuthenticationFailed.

    It must be AUTH on stream 0 carrying ``accepted.proof``: anything else (an OPEN, a DATA
    piece, a proof for another challenge, as a replayed handshake carries) is refused before
    the connection can open a stream or a UDP flow.
    """
    if ftype != frames.TYPE_AUTH or sid != 0:
        try:
            name = frames.FrameType(ftype).name
        except ValueError:  # an unknown type: the decoder refuses those before us
            name = str(ftype)
        raise AuthenticationFailed(
            f"user {accepted.user!r} sent {name} before AUTH (a client that skips the challenge)"
        )
    if not hmac.compare_digest(bytes(payload), accepted.proof):
        raise AuthenticationFailed(
            f"wrong challenge response from user {accepted.user!r} (a replayed or forged handshake)"
        )
