"""wstunnel v10 on the wire, sans-I/O: the tunnel JWT, the upgrade request and its checks, and
the per-tunnel WebSocket session rules.

Theory of operation (docs/wstunnel-protocol.md; "section N" below is a section of it)
---------------------------------------------------------------------------------
wstunnel multiplexes nothing: every tunnelled TCP connection (or UDP peer) is its own TCP(+TLS)
connection carrying one WebSocket.  The only control message is a JWT in the upgrade request's
``Sec-WebSocket-Protocol: v1, authorization.bearer.<JWT>`` header (or the ``Cookie`` header),
whose claims ``{"id","p","r","rp"}`` name the protocol and the destination (section 2).

The server checks a request in a fixed order (section 1.3) and answers every failure with the
same ``400`` and body ``Invalid request``: upgrade headers, path prefix, mTLS CN, JWT, host,
restrictions; then it *opens the tunnel* (the caller's I/O) and only then checks the WebSocket
key and version and answers ``101``.  We check the key and version with the others, before the
tunnel is opened (``check_request``; ``accept_upgrade`` then only builds the ``101``): the
answer to a bad key is the same ``400`` either way, but a request that is going to be refused
must not dial its destination first (a malformed key once left each such connection open).

After the upgrade (``Session``): one binary FIN frame per local read; inbound frames are unmasked
whenever their MASK bit is set (a default wstunnel *client* sends unmasked frames and a default
wstunnel *server* does not unmask, section 3.4 - so our client masks with the all-zero key, which
is a no-op on the payload and satisfies both).  Every Ping is answered by exactly one Pong with
the same payload and we never send an unsolicited Pong: wstunnel counts pongs against its pings
with an unsigned counter and kills the tunnel when it wraps (section 3.5).  EOF sends Close(1000);
there is no half-close (section 3.6).

The JWT authenticates nothing: since 10.0.2 clients sign with a random key and servers do not
verify.  We sign with the historical public key ``champignonfrais`` (what 10.0.0/10.0.1 servers
verify) and never verify what we receive.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from autovpn.errors import LimitExceeded, RemoteProtocolError
from autovpn.wire.handshake import accept_key, valid_ws_key
from autovpn.wire.http1 import RequestHead, ResponseHead, render
from autovpn.wire.websocket import (
    MAX_CONTROL_PAYLOAD,
    Opcode,
    WsDecoder,
    encode_close,
    encode_header,
)

JWT_HEADER: Final = b'{"typ":"JWT","alg":"HS256"}'
JWT_HEADER_B64: Final = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9"
#: The fixed public HS256 key of wstunnel <= 10.0.1 (section 2.2); it protects nothing.
SIGNING_KEY: Final = b"champignonfrais"
DEFAULT_PATH_PREFIX: Final = "v1"
SUBPROTOCOL: Final = "v1"
BEARER_PREFIX: Final = "authorization.bearer."
#: Largest JWT we accept: far above any real one (a few hundred bytes).
MAX_JWT_SIZE: Final = 8192
#: A tunnel is aborted when a ping tick finds this many pings unanswered (section 3.5).
MAX_PINGS_IN_FLIGHT: Final = 3
#: Local reads start at 64 KiB and may grow to 32 MiB per frame (section 3.3).
MAX_SEND_FRAME: Final = 32 << 20
#: jsonwebtoken's known algorithms: a header naming another (or "none") fails to decode.
KNOWN_ALGORITHMS: Final = frozenset(
    {"HS256", "HS384", "HS512", "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384"}
    | {"PS512", "EdDSA"}
)

INVALID_REQUEST: Final = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 15\r\nconnection: close\r\n\r\nInvalid request"
)


#: autovpn's answer to a request nobody vouches for (no user's secret as its path prefix, no
#: client certificate, no operator's rule).  wstunnel answers 400 to everything; a stock client
#: fails the same way on either, and a client of several servers (ours) can tell "this server
#: refused the secret" (skip it) from "this destination was refused" (another server would
#: only dial it again).
FORBIDDEN: Final = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 9\r\nconnection: close\r\n\r\nForbidden"
)


class WstunnelRejected(RemoteProtocolError):
    """A wstunnel request refused: the reply is wstunnel's 400 ``Invalid request``.
    ``reason``: a short name the server's statistics count the refusal by (``auth``,
    ``not_allowed``, ``connection_refused``...)."""

    status = 400

    def __init__(self, message: str, reason: str = "bad_request") -> None:
        super().__init__(message, reply=INVALID_REQUEST)
        self.reason = reason


def refusal_reason(exc: BaseException) -> str:
    """A refused request's result in the server's statistics."""
    if isinstance(exc, WstunnelRejected):
        return exc.reason
    if isinstance(exc, RemoteProtocolError):
        return "bad_request"
    return type(exc).__name__


class WstunnelUnauthenticated(WstunnelRejected):
    """A wstunnel request nobody vouches for: the reply is 403 (see ``FORBIDDEN``)."""

    status = 403

    def __init__(self, message: str, reason: str = "auth") -> None:
        super().__init__(message, reason)
        self.reply = FORBIDDEN


# -- the LocalProtocol enum (section 2.3) --------------------------------------------------------


class Kind(enum.Enum):
    TCP = "Tcp"
    UDP = "Udp"
    REVERSE_TCP = "ReverseTcp"
    REVERSE_UDP = "ReverseUdp"
    REVERSE_SOCKS5 = "ReverseSocks5"
    REVERSE_HTTP_PROXY = "ReverseHttpProxy"
    REVERSE_UNIX = "ReverseUnix"
    STDIO = "Stdio"
    UNIX = "Unix"
    SOCKS5 = "Socks5"
    HTTP_PROXY = "HttpProxy"
    TPROXY_TCP = "TProxyTcp"
    TPROXY_UDP = "TProxyUdp"

    @property
    def reverse(self) -> bool:
        return self.value.startswith("Reverse")


#: The fields of each struct variant, in serde's order; unit variants have none (a bare string).
_FIELDS: Final[dict[Kind, tuple[str, ...] | None]] = {
    Kind.TCP: ("proxy_protocol",),
    Kind.UDP: ("timeout",),
    Kind.REVERSE_TCP: None,
    Kind.REVERSE_UDP: ("timeout",),
    Kind.REVERSE_SOCKS5: ("timeout", "credentials"),
    Kind.REVERSE_HTTP_PROXY: ("timeout", "credentials"),
    Kind.REVERSE_UNIX: ("path",),
    Kind.STDIO: ("proxy_protocol",),
    Kind.UNIX: ("path", "proxy_protocol"),
    Kind.SOCKS5: ("timeout", "credentials"),
    Kind.HTTP_PROXY: ("timeout", "credentials", "proxy_protocol"),
    Kind.TPROXY_TCP: None,
    Kind.TPROXY_UDP: ("timeout",),
}
#: Variants a client may put on the wire (``JwtTunnelConfig::new`` panics on the others).
WIRE_KINDS: Final = frozenset(
    {
        Kind.TCP,
        Kind.UDP,
        Kind.REVERSE_TCP,
        Kind.REVERSE_UDP,
        Kind.REVERSE_SOCKS5,
        Kind.REVERSE_HTTP_PROXY,
        Kind.REVERSE_UNIX,
    }
)


@dataclass(frozen=True, slots=True)
class Duration:
    """A Rust ``Duration``: ``{"secs":u64,"nanos":u32}``."""

    secs: int
    nanos: int = 0

    @classmethod
    def from_seconds(cls, seconds: float) -> Duration:
        secs = int(seconds)
        return cls(secs, round((seconds - secs) * 1e9))

    @property
    def seconds(self) -> float:
        return self.secs + self.nanos / 1e9


@dataclass(frozen=True, slots=True)
class LocalProtocol:
    """One LocalProtocol value; only the fields of ``kind`` are serialised."""

    kind: Kind
    proxy_protocol: bool = False
    timeout: Duration | None = None
    credentials: tuple[str, str] | None = None
    path: str = ""

    def to_json(self) -> Any:
        names = _FIELDS[self.kind]
        if names is None:
            return self.kind.value
        body: dict[str, Any] = {}
        for name in names:
            if name == "timeout":
                t = self.timeout
                body[name] = None if t is None else {"secs": t.secs, "nanos": t.nanos}
            elif name == "credentials":
                body[name] = None if self.credentials is None else list(self.credentials)
            else:
                body[name] = getattr(self, name)
        return {self.kind.value: body}

    @classmethod
    def from_json(cls, value: Any) -> LocalProtocol:
        """Decode serde's externally tagged form; raises ValueError."""
        if isinstance(value, str):
            kind = Kind(value)
            if _FIELDS[kind] is not None:
                raise ValueError(f"variant {value} needs fields")
            return cls(kind)
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("p must be a string or a one-key object")
        ((tag, body),) = value.items()
        kind = Kind(tag)
        names = _FIELDS[kind]
        if names is None or not isinstance(body, dict):
            raise ValueError(f"variant {tag} has the wrong shape")
        kwargs: dict[str, Any] = {}
        for name in names:
            item = body.get(name)
            if name == "proxy_protocol":
                if not isinstance(item, bool):  # a bool has no serde default
                    raise ValueError("proxy_protocol must be a boolean")
                kwargs[name] = item
            elif name == "timeout":
                if item is not None:
                    if not isinstance(item, dict) or set(item) < {"secs", "nanos"}:
                        raise ValueError("timeout must be {secs, nanos} or null")
                    secs, nanos = item["secs"], item["nanos"]
                    if not _is_uint(secs, 1 << 64) or not _is_uint(nanos, 1 << 32):
                        raise ValueError("timeout out of range")
                    kwargs[name] = Duration(secs, nanos)
            elif name == "credentials":
                if item is not None:
                    if (
                        not isinstance(item, list)
                        or len(item) != 2
                        or not all(isinstance(s, str) for s in item)
                    ):
                        raise ValueError("credentials must be [user, password] or null")
                    kwargs[name] = (item[0], item[1])
            elif name == "path":
                if not isinstance(item, str):
                    raise ValueError("path must be a string")
                kwargs[name] = item
        return cls(kind, **kwargs)

    def on_wire(self) -> LocalProtocol:
        """What a client sends for this listener kind (section 2.3, second table)."""
        if self.kind in (Kind.STDIO, Kind.UNIX, Kind.HTTP_PROXY):
            return LocalProtocol(Kind.TCP, proxy_protocol=self.proxy_protocol)
        if self.kind in (Kind.SOCKS5, Kind.TPROXY_TCP):
            return LocalProtocol(Kind.TCP)
        if self.kind is Kind.TPROXY_UDP:
            return LocalProtocol(Kind.UDP, timeout=self.timeout)
        return self


def _is_uint(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


TCP: Final = LocalProtocol(Kind.TCP)
UDP_DEFAULT_TIMEOUT: Final = Duration(30)


# -- hosts as url::Host prints and parses them ---------------------------------------------------

#: Characters url::Host::parse refuses in a domain (the "forbidden host code points").
_FORBIDDEN_HOST = frozenset("\x00\t\n\r #%/:<>?@[\\]^|")


def format_host(host: str) -> str:
    """``r`` as wstunnel writes it: IPv6 bracketed and compressed, domains lower-cased."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        try:
            return bare.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return bare.lower()
    return f"[{ip.compressed}]" if ip.version == 6 else str(ip)


def parse_host(text: str) -> str:
    """``url::Host::parse`` of ``r``: returns the bare host (IPv6 unbracketed).

    Raises ValueError for an unbracketed IPv6, a bad bracketed one, or a forbidden character.
    """
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"unterminated IPv6 host {text[:80]!r}")
        return ipaddress.IPv6Address(text[1:-1]).compressed
    if not text or any(c in _FORBIDDEN_HOST for c in text) or len(text) > 253:
        raise ValueError(f"bad host {text[:80]!r}")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if text[-1:].isdigit() and all(c.isdigit() or c == "." for c in text):
        raise ValueError(f"bad IPv4 address {text!r}")
    try:
        return text.encode("idna").decode("ascii").lower() if not text.isascii() else text.lower()
    except UnicodeError as exc:
        raise ValueError(f"bad domain {text[:80]!r}") from exc


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- the JWT (section 2) -------------------------------------------------------------------------


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    # URL_SAFE_NO_PAD: padding is an error, as are characters outside the url-safe alphabet.
    if not text or "=" in text or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(part: str) -> Any:
    """One JWT part's JSON.  Nesting that exhausts the decoder's stack (2,000 ``[`` fit in a
    JWT under MAX_JWT_SIZE) is a ValueError like any other bad token, not a RecursionError."""
    try:
        return json.loads(_b64d(part))
    except RecursionError:
        raise ValueError("JWT JSON nested too deeply") from None


@dataclass(frozen=True, slots=True)
class Claims:
    """The JWT payload ``JwtTunnelConfig``: tunnel id, protocol, remote host and port."""

    id: str
    protocol: LocalProtocol
    host: str  # as on the wire: "[::1]" for IPv6
    port: int

    def payload(self) -> bytes:
        """The compact JSON, claims in serde's order (id, p, r, rp)."""
        obj = {"id": self.id, "p": self.protocol.to_json(), "r": self.host, "rp": self.port}
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def encode(self, key: bytes = SIGNING_KEY) -> str:
        """The compact JWS, HS256-signed with ``key`` (default: the historical public key)."""
        signing_input = f"{JWT_HEADER_B64}.{_b64e(self.payload())}"
        mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
        return f"{signing_input}.{_b64e(mac)}"

    @classmethod
    def decode(cls, token: str) -> Claims:
        """Decode without verifying the signature (what every 10.0.2+ server does).

        Raises ValueError (or LimitExceeded) on anything a 10.x server would refuse.
        """
        if len(token) > MAX_JWT_SIZE:
            raise LimitExceeded(f"JWT longer than MAX_JWT_SIZE ({MAX_JWT_SIZE})")
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("a JWT has three parts")
        header = _json(parts[0])
        if not isinstance(header, dict) or header.get("alg") not in KNOWN_ALGORITHMS:
            raise ValueError("JWT header without a known alg")
        claims = _json(parts[1])
        if not isinstance(claims, dict):
            raise ValueError("JWT claims are not an object")
        tid, p, r = claims.get("id"), claims.get("p"), claims.get("r")
        rp: Any = claims.get("rp")
        if not isinstance(tid, str) or not isinstance(r, str) or not _is_uint(rp, 1 << 16):
            raise ValueError("claims id, r, rp missing or of the wrong type")
        return cls(tid, LocalProtocol.from_json(p), r, rp)


def new_tunnel_id(unix_ms: int, rand: bytes) -> str:
    """A UUIDv7 (RFC 9562 section 5.7) from the time and 10 random bytes, as wstunnel sends."""
    value = (unix_ms & ((1 << 48) - 1)) << 80 | int.from_bytes(rand[:10].ljust(10, b"\0"), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- the upgrade request (client, section 1.1-1.2) -----------------------------------------------


def upgrade_path(prefix: str = DEFAULT_PATH_PREFIX) -> str:
    return f"/{prefix}/events"


def host_header(host: str, port: int) -> str:
    """The default Host: the server host, ``:port`` unless 80 or 443, IPv6 bracketed."""
    bare = host[1:-1] if host.startswith("[") else host
    shown = f"[{bare}]" if ":" in bare else bare
    return shown if port in (80, 443) else f"{shown}:{port}"


def basic_authorization(credentials: str) -> str:
    """``--http-upgrade-credentials USER[:PASS]`` as the Authorization value."""
    return "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")


def parse_header_line(line: str) -> tuple[str, str] | None:
    """``Name: value`` (as for -H and the headers file); None for a blank or bad line."""
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not name or any(c.isspace() for c in name):
        return None
    return name, value.strip()


def parse_headers_file(text: str) -> list[tuple[str, str]]:
    return [h for line in text.splitlines() if (h := parse_header_line(line)) is not None]


def _set_header(headers: list[tuple[str, str]], name: str, value: str) -> None:
    lname = name.lower()
    headers[:] = [(k, v) for k, v in headers if k != lname]
    headers.append((lname, value))


def build_upgrade_request(
    *,
    host: str,
    jwt: str,
    ws_key: bytes,
    path_prefix: str = DEFAULT_PATH_PREFIX,
    headers: Sequence[tuple[str, str]] = (),
    credentials: str | None = None,
    file_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The client's upgrade request, headers in wstunnel's order and spelling (lowercase names).

    ``headers`` (``-H``) and then ``file_headers`` (``--http-headers-file``, re-read per
    connection) each replace any earlier header of the same name, Host included.
    """
    out: list[tuple[str, str]] = [
        ("host", host),
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-key", base64.b64encode(ws_key).decode("ascii")),
        ("sec-websocket-version", "13"),
        ("sec-websocket-protocol", f"{SUBPROTOCOL}, {BEARER_PREFIX}{jwt}"),
    ]
    for name, value in headers:
        _set_header(out, name, value)
    if credentials is not None:
        _set_header(out, "authorization", basic_authorization(credentials))
    for name, value in file_headers:
        _set_header(out, name, value)
    return render(f"GET {upgrade_path(path_prefix)} HTTP/1.1", out, "utf-8")


@dataclass(frozen=True, slots=True)
class UpgradeAnswer:
    status: int
    cookie: str | None  # the dynamic reverse tunnel's destination JWT


def check_upgrade_response(head: ResponseHead) -> UpgradeAnswer:
    """What fastwebsockets checks of the answer: status 101, Upgrade and Connection.

    Raises WstunnelRejected (with the status in the message) otherwise.
    """
    if head.status != 101:
        raise WstunnelRejected(f"wstunnel server answered HTTP {head.status}")
    if "websocket" not in head.get("upgrade").lower():
        raise WstunnelRejected("101 without Upgrade: websocket")
    if "upgrade" not in head.get("connection").lower():
        raise WstunnelRejected("101 without Connection: upgrade")
    return UpgradeAnswer(101, head.get("cookie") or None)


# -- the server's checks (section 1.3) and answers (section 1.4) ---------------------------------


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """A request that passed checks 1-6; restrictions and the tunnel itself are the caller's."""

    path_prefix: str
    claims: Claims
    host: str  # the bare destination host (IPv6 unbracketed)
    authorization: str | None
    forwarded_for: str | None  # the X-Forwarded-For client address, when it is an IP


def is_upgrade_request(head: RequestHead) -> bool:
    """fastwebsockets ``is_upgrade_request``: Connection contains upgrade, Upgrade websocket."""
    return (
        "upgrade" in head.get("connection").lower() and "websocket" in head.get("upgrade").lower()
    )


def extract_path_prefix(target: str) -> str:
    """The first path segment; the rest must end with ``events`` (so ``/p/xevents`` passes)."""
    # The messages do not show the path: its first segment may be a secret (``-P SECRET``).
    path = target.split("?", 1)[0]
    if not path.startswith("/"):
        raise WstunnelRejected("the request path does not start with /")
    prefix, sep, rest = path[1:].partition("/")
    if not sep or not rest.endswith("events"):
        raise WstunnelRejected("the request path is not /<prefix>/events")
    return prefix


def find_jwt(head: RequestHead) -> str:
    """From ``Sec-WebSocket-Protocol`` (everything after ``authorization.bearer.``), else the
    whole ``Cookie`` value."""
    proto = _optional(head, "sec-websocket-protocol")
    if proto is not None:
        at = proto.find(BEARER_PREFIX)
        if at >= 0:
            return proto[at + len(BEARER_PREFIX) :]
    cookie = _optional(head, "cookie")
    if cookie is not None:
        return cookie
    raise WstunnelRejected("no JWT in Sec-WebSocket-Protocol or Cookie")


def _optional(head: RequestHead, name: str) -> str | None:
    values = head.get_all(name)
    return values[0] if values else None


def _forwarded_for(head: RequestHead) -> str | None:
    first = head.get("x-forwarded-for").split(",", 1)[0].strip()
    return first if first and is_ip(first) else None


def check_request(
    head: RequestHead, *, client_cn: str | None = None, require_upgrade: bool = True
) -> TunnelRequest:
    """Checks 1-6 of section 1.3, in wstunnel's order; raises WstunnelRejected (400).

    ``client_cn`` is the CN of the TLS client certificate, when one was presented.
    ``require_upgrade`` is False for the HTTP/2 transport (a POST, no upgrade headers).
    """
    if require_upgrade and not is_upgrade_request(head):
        raise WstunnelRejected("not a WebSocket upgrade")
    forwarded = _forwarded_for(head)
    prefix = extract_path_prefix(head.target)
    if client_cn is not None and prefix != client_cn:
        # The prefix is not shown: it may be a secret (``-P SECRET``).
        raise WstunnelRejected(f"path prefix is not the client certificate's CN {client_cn!r}")
    try:
        claims = Claims.decode(find_jwt(head))
    except (ValueError, RemoteProtocolError) as exc:  # json errors are ValueErrors
        raise WstunnelRejected(f"bad JWT: {exc}") from None
    if claims.protocol.kind not in WIRE_KINDS:
        raise WstunnelRejected(f"protocol {claims.protocol.kind.value} is client-side only")
    try:
        host = parse_host(claims.host)
    except ValueError as exc:
        raise WstunnelRejected(str(exc)) from None
    if require_upgrade:
        check_key(head)  # wstunnel's check 9, made before the caller dials (module docstring)
    auth = _optional(head, "authorization")
    return TunnelRequest(prefix, claims, host, auth, forwarded)


def check_key(head: RequestHead) -> None:
    """Check 9: version 13 and a key that is the base64 of 16 bytes (RFC 6455 section 4.2.1);
    raises WstunnelRejected (400)."""
    if head.get("sec-websocket-version") != "13":
        raise WstunnelRejected("Sec-WebSocket-Version is not 13")
    if not valid_ws_key(head.get("sec-websocket-key")):
        raise WstunnelRejected("Sec-WebSocket-Key is missing or not the base64 of 16 bytes")


def accept_upgrade(head: RequestHead, cookie: str | None = None) -> bytes:
    """The 101 answer of section 1.4 (check 9 again, for callers that skipped check_request)."""
    check_key(head)
    key = head.get("sec-websocket-key")
    fields = [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-accept", accept_key(key)),
        ("sec-websocket-protocol", SUBPROTOCOL),
    ]
    if cookie is not None:
        fields.append(("cookie", cookie))
    return render("HTTP/1.1 101 Switching Protocols", fields)


def cookie_claims(host: str, port: int, protocol: LocalProtocol = TCP) -> Claims:
    """The destination JWT of a dynamic reverse tunnel's 101 (section 2.4 d)."""
    return Claims("00000000-0000-0000-0000-000000000000", protocol, format_host(host), port)


# -- the session after the upgrade (section 3) ---------------------------------------------------


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close-sent"  # our Close left; the peer's may still come
    CLOSED = "closed"  # the peer's Close arrived (answered if we had not sent ours)


#: MASK=1 with the all-zero key: RFC-shaped frames that default wstunnel servers (which do not
#: unmask) and --websocket-mask-frame servers (which do) both read correctly (section 3.4).
ZERO_MASK: Final = b"\x00\x00\x00\x00"


@dataclass(slots=True)
class Session:
    """One tunnel's WebSocket after the upgrade.  Pure: feed bytes, collect bytes to send.

    ``client`` sessions send frames with the zero mask; server sessions send them unmasked.
    Inbound frames are unmasked when their MASK bit is set, whatever the role.
    """

    client: bool
    state: SessionState = SessionState.OPEN
    pings_in_flight: int = 0
    close_code: int | None = None
    _decoder: WsDecoder = field(default_factory=WsDecoder)
    _out: list[bytes] = field(default_factory=list)

    def _header(self, opcode: int, length: int) -> bytes:
        return encode_header(opcode, length, ZERO_MASK if self.client else None)

    def data_header(self, length: int) -> bytes:
        """The header of one binary FIN frame; the payload follows unchanged (zero mask)."""
        return self._header(Opcode.BINARY, length)

    def receive(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """Feed bytes from the WebSocket; returns the data pieces (views into ``data``: copy
        or write them before the next call).  Control frames are handled here."""
        pieces: list[bytes | memoryview] = []
        if self.state is SessionState.CLOSED:
            return pieces
        for opcode, payload in self._decoder.feed(data):
            if opcode == Opcode.BINARY:
                pieces.append(payload)
            elif opcode == Opcode.PING:
                # Exactly one Pong per Ping, echoing its payload (section 3.5).
                if self.state is SessionState.OPEN:
                    self._out.append(self._header(Opcode.PONG, len(payload)) + bytes(payload))
            elif opcode == Opcode.PONG:
                if self.pings_in_flight > 0:
                    self.pings_in_flight -= 1
            elif opcode == Opcode.CLOSE:
                raw = bytes(payload)
                self.close_code = int.from_bytes(raw[:2], "big") if len(raw) >= 2 else 1005
                if self.state is SessionState.OPEN:
                    self._out.append(self._header(Opcode.CLOSE, 2) + encode_close(1000))
                self.state = SessionState.CLOSED
                break
        return pieces

    def ping_tick(self) -> bool:
        """The ping timer fired.  False: too many pings unanswered, abort the tunnel."""
        if self.pings_in_flight >= MAX_PINGS_IN_FLIGHT:
            return False
        if self.state is SessionState.OPEN:
            self.pings_in_flight += 1
            self._out.append(self._header(Opcode.PING, 0))
        return True

    def ping(self, payload: bytes = b"") -> None:
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError("ping payload over 125 bytes")
        self.pings_in_flight += 1
        self._out.append(self._header(Opcode.PING, len(payload)) + payload)

    def close(self, code: int = 1000) -> None:
        """Local EOF or error: Close(code) with an empty reason, once."""
        if self.state is SessionState.OPEN:
            self._out.append(self._header(Opcode.CLOSE, 2) + encode_close(code))
            self.state = SessionState.CLOSE_SENT

    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)


def frames_for(session: Session, chunks: Iterable[bytes]) -> bytes:
    """Helper for tests and small writes: each chunk as one frame."""
    return b"".join(session.data_header(len(c)) + c for c in chunks)


# -- PROXY protocol v2 (section 5.5) -------------------------------------------------------------

PROXY_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The PROXY v2 header (PROXY command, STREAM) wstunnel writes to a ``proxy_protocol``
    destination.  When the families differ, the destination's address becomes the unspecified
    address of the source's family."""
    src = ipaddress.ip_address(source[0].split("%", 1)[0])
    dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    if src.version != dst.version:
        dst = ipaddress.ip_address("::" if src.version == 6 else "0.0.0.0")
    family, length = (0x11, 12) if src.version == 4 else (0x21, 36)
    body = (
        src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    )
    return PROXY_V2_SIGNATURE + bytes((0x21, family)) + length.to_bytes(2, "big") + body


# -- command-line values -------------------------------------------------------------------------


# -- whole frames, for UDP (one datagram per frame, section 3.2) ---------------------------------

#: A UDP tunnel's frames carry one datagram each: at most 64 KiB, plus the header.
MAX_DATAGRAM_FRAME: Final = 65536 + 14


def frame_size(buffer: bytes | bytearray | memoryview) -> int | None:
    """Total size of the frame starting ``buffer`` (header included), None if unknown yet."""
    if len(buffer) < 2:
        return None
    n = buffer[1] & 0x7F
    size = 2
    if n == 126:
        if len(buffer) < 4:
            return None
        n = int.from_bytes(buffer[2:4], "big")
        size = 4
    elif n == 127:
        if len(buffer) < 10:
            return None
        n = int.from_bytes(buffer[2:10], "big")
        size = 10
    return size + (4 if buffer[1] & 0x80 else 0) + n


@dataclass(slots=True)
class FrameSplitter:
    """Cuts a byte stream into whole frames, so each data frame's payload is one datagram."""

    limit: int = MAX_DATAGRAM_FRAME
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while True:
            size = frame_size(self._buffer)
            if size is None:
                if len(self._buffer) > 14:  # pragma: no cover - a header is at most 14 bytes
                    raise RemoteProtocolError("unparseable frame header")
                break
            if size > self.limit:
                raise LimitExceeded(f"frame of {size} bytes on a UDP tunnel (limit {self.limit})")
            if len(self._buffer) < size:
                break
            frames.append(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return frames
