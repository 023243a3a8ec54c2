"""The HTTP/1.1 proxy, request side and message framing (RFC 9110, RFC 9112), sans-I/O.

Theory of operation
-------------------
A client of the HTTP proxy sends a request head: either ``CONNECT host:port`` (authority-form,
RFC 9112 §3.2.3), after which the connection becomes a tunnel, or a plain request with an
absolute-form target ``http://host[:port]/path`` (RFC 9112 §3.2.2), which we forward to the
origin with ``rewrite_for_origin`` and then relay both bodies through *unchanged*.

Heads are parsed incrementally by ``HttpHeadParser`` (requests) and ``HttpResponseHeadParser``
(responses), one state machine each::

    START_LINE ──▶ FIELDS ──▶ DONE            (any state ──▶ FAILED on bad input)

Lines end in CRLF or, leniently, a bare LF (RFC 9112 §2.2).  Every peer-controlled length is
checked against a named limit (``MAX_LINE``, ``MAX_HEADERS``, ``MAX_HEAD``) before it is
buffered further; errors name the limit.  Bytes after the head are ``trailing_data``.

Bodies are never parsed into memory: ``BodyFramer`` decides how the message is delimited
(RFC 9112 §6.3) and its ``tracker()`` counts how many bytes of each received buffer belong to
the body, so the I/O layer forwards them untouched and knows where the next message starts.
Because bytes pass through unchanged, framing must agree with the next hop's, so framing
ambiguities that enable request smuggling are errors, and chunked framing is parsed strictly.

Peer errors raise ``HttpProxyError``: ``.status`` is the HTTP status and ``.reply`` the full
response to send before closing (502 for a misbehaving origin).  This module imports nothing
from asyncio, socket or ssl, and reads no clock.
"""

from __future__ import annotations

import abc
import enum
import http
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from autovpn.errors import LimitExceeded, LocalError, RemoteProtocolError

__all__ = [
    "MAX_LINE",
    "MAX_HEADERS",
    "MAX_HEAD",
    "MAX_CHUNK_LINE",
    "MAX_CONTENT_LENGTH_DIGITS",
    "CONNECTION_ESTABLISHED",
    "HOP_BY_HOP",
    "HttpProxyError",
    "HttpLimitExceeded",
    "TargetForm",
    "HttpRequestHead",
    "HttpResponseHead",
    "ParserState",
    "HttpHeadParser",
    "HttpResponseHeadParser",
    "BodyKind",
    "BodyFramer",
    "BodyTracker",
    "NoBody",
    "ContentLengthBody",
    "CloseDelimitedBody",
    "ChunkedScanner",
    "rewrite_for_origin",
    "client_wants_keep_alive",
    "response",
    "proxy_auth_required",
]

MAX_LINE = 8 * 1024  # request line, status line, one field line (octets, without CRLF)
MAX_HEADERS = 100  # field lines per head (and per chunked trailer section)
MAX_HEAD = 64 * 1024  # a whole head, start line to the empty line (and a trailer section)
MAX_CHUNK_LINE = 4 * 1024  # a chunk-size line with its extensions (RFC 9112 §7.1.1)
MAX_CHUNK_SIZE_DIGITS = 16  # hex digits of a chunk size: at most 2**64 - 1
MAX_CONTENT_LENGTH_DIGITS = 18  # decimal digits of Content-Length: below 10**18 (an exabyte)

CONNECTION_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# RFC 9110 §7.6.1 (Connection, Proxy-Connection's legacy twin, Keep-Alive, TE, Trailer,
# Upgrade) and §11.7 (Proxy-Authenticate, Proxy-Authorization).  Transfer-Encoding is
# hop-by-hop too, but we pass the body through unchanged, so its framing header stays.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    }
)
# Never removed even when a client names them in Connection: dropping them would change the
# framing or the target between us and the origin (a known smuggling trick).
_NEVER_REMOVED = frozenset({"host", "content-length", "transfer-encoding"})

# RFC 9110 §5.6.2 token; §5.5 field-value (no CTL but HTAB; obs-text allowed).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_OCTETS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[^\x00-\x20\x7f]+")  # request-target: no whitespace or CTL
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_STATUS_CODE = re.compile(rb"[1-5][0-9][0-9]")
_DIGITS = re.compile(r"[0-9]+")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+")  # RFC 3986 §3.2.2
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)(?:#.*)?", re.DOTALL)
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?"  # RFC 9112 §7.1, §7.1.1
)
_SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


# RFC 9110 §15 names where Python 3.11's http.HTTPStatus still has the RFC 7231 ones, so
# replies are identical on every supported Python.
_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def _phrase(status: int) -> str:
    if status in _PHRASES:
        return _PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --- errors -------------------------------------------------------------------------------------


class HttpProxyError(RemoteProtocolError):
    """An HTTP peer broke the protocol.

    ``status`` is what we answer (400, 414, 431, 501, 505; 502 when the origin misbehaved)
    and ``reply`` the complete response bytes to send before closing.  The body names only
    the status, never internals.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        body = f"{status} {_phrase(status)}\n".encode("ascii")
        reply = response(status, headers=[("Content-Type", "text/plain; charset=utf-8")], body=body)
        super().__init__(message, reply=reply)
        self.status = status


class HttpLimitExceeded(HttpProxyError, LimitExceeded):
    """A head, line or chunk went past one of the named limits."""


# --- heads --------------------------------------------------------------------------------------


class TargetForm(enum.Enum):
    """The four request-target forms (RFC 9112 §3.2)."""

    ORIGIN = "origin"  # /path?query   (a client that thinks we are the origin)
    ABSOLUTE = "absolute"  # http://host:port/path?query   (proxied request)
    AUTHORITY = "authority"  # host:port   (CONNECT only)
    ASTERISK = "asterisk"  # *   (OPTIONS only)


def _header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    name = name.lower()
    return [v for n, v in headers if n.lower() == name]


def _list_tokens(values: Iterable[str]) -> list[str]:
    """Elements of comma-separated list fields, lowercased, empties dropped (RFC 9110 §5.6.1)."""
    return [t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")]


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` → (host without brackets, port) (RFC 3986 §3.2)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HttpProxyError(f"unterminated IPv6 literal in {authority!r}")
        try:
            host = str(ipaddress.IPv6Address(authority[1:end]))
        except ValueError:
            raise HttpProxyError(f"bad IPv6 literal in {authority!r}") from None
        rest = authority[end + 1 :]
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon:
            host, port_text = authority, ""
        if not _REG_NAME.fullmatch(host):
            raise HttpProxyError(f"bad host in {authority!r}")
        rest = colon + port_text
    if rest in ("", ":"):  # RFC 3986 §3.2.3: an empty port means the scheme's default
        if default_port is None:
            raise HttpProxyError(f"port required in {authority!r}")
        return host, default_port
    if not rest.startswith(":") or not _PORT_DIGITS.fullmatch(rest[1:]):
        raise HttpProxyError(f"bad port in {authority!r}")
    port = int(rest[1:])
    if not 1 <= port <= 0xFFFF:
        raise HttpProxyError(f"port out of range in {authority!r}")
    return host, port


@dataclass(frozen=True, slots=True)
class HttpRequestHead:
    """A parsed request head; constructing one validates it and derives the target.

    ``headers`` keeps order, case and repetitions as received (values without surrounding
    whitespace, decoded as Latin-1 so every octet round-trips).  Derived fields:

    - ``form``: which request-target form was used.
    - ``host``, ``port``: where to connect.  CONNECT: from the authority (port required).
      Absolute-form: from the URI (``http`` only, default port 80; ``https://`` and other
      schemes are refused with 501, since we relay bytes unchanged and cannot originate TLS;
      browsers send CONNECT for https).  Origin- and asterisk-form: from the Host header,
      default port 80; ``host`` is ``""`` if an HTTP/1.0 request has no Host.
    - ``origin_form``: the target to send to the origin: ``path[?query]`` (``/`` if the path is
      empty, ``*`` for ``OPTIONS http://host`` per RFC 9112 §3.2.4); ``""`` for CONNECT.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    form: TargetForm = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)
    origin_form: str = field(init=False)

    def __post_init__(self) -> None:
        if self.version not in _SUPPORTED_VERSIONS:
            raise HttpProxyError(f"unsupported version {self.version!r}", 505)
        hosts = self.get_all("host")
        if len(hosts) > 1:  # RFC 9112 §3.2
            raise HttpProxyError("more than one Host header")
        origin_form = ""
        if self.method == "CONNECT":
            form = TargetForm.AUTHORITY
            host, port = _split_authority(self.target, None)
        elif self.target.startswith("/"):
            form = TargetForm.ORIGIN
            origin_form = self.target
            host, port = self._from_host_header(hosts)
        elif self.target == "*":
            if self.method != "OPTIONS":
                raise HttpProxyError("asterisk-form target is for OPTIONS only")
            form = TargetForm.ASTERISK
            origin_form = "*"
            host, port = self._from_host_header(hosts)
        else:
            form = TargetForm.ABSOLUTE
            match = _ABSOLUTE.fullmatch(self.target)
            if match is None:
                raise HttpProxyError(f"bad request target {self.target[:100]!r}")
            scheme, authority, path_query = match.groups()
            if scheme.lower() != "http":
                raise HttpProxyError(f"scheme {scheme!r} not supported; use CONNECT", 501)
            if "@" in authority:  # RFC 9110 §4.2.4: userinfo is deprecated, treat as error
                raise HttpProxyError("userinfo in request target")
            if not authority:
                raise HttpProxyError("empty authority in request target")
            host, port = _split_authority(authority, 80)
            if not path_query.startswith("/"):
                path_query = ("*" if self.method == "OPTIONS" and not path_query else "/") + (
                    path_query
                )
            origin_form = path_query
        object.__setattr__(self, "form", form)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "origin_form", origin_form)

    def _from_host_header(self, hosts: list[str]) -> tuple[str, int]:
        if not hosts:
            if self.version == "HTTP/1.1":  # RFC 9112 §3.2: MUST answer 400
                raise HttpProxyError("HTTP/1.1 request without Host")
            return "", 80
        if not hosts[0]:
            return "", 80
        return _split_authority(hosts[0], 80)

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return _header_values(self.headers, name)


@dataclass(frozen=True, slots=True)
class HttpResponseHead:
    """A parsed response head (RFC 9112 §4).  ``version`` is HTTP/1.0 or HTTP/1.1."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return _header_values(self.headers, name)


class ParserState(enum.Enum):
    START_LINE = "start-line"
    FIELDS = "fields"
    DONE = "done"
    FAILED = "failed"


def _parse_field_line(line: bytes, status: int) -> tuple[str, str]:
    """One field line (RFC 9112 §5): ``name ":" OWS value OWS``."""
    if line[:1] in (b" ", b"\t"):  # RFC 9112 §5.2: obs-fold; we reject it
        raise HttpProxyError("obsolete line folding in header", status)
    name, colon, value = line.partition(b":")
    if not colon:
        raise HttpProxyError("header line without colon", status)
    if name != name.rstrip(b" \t"):  # RFC 9112 §5.1: MUST reject with 400
        raise HttpProxyError("whitespace between header name and colon", status)
    if not _TOKEN.fullmatch(name):
        raise HttpProxyError("bad header name", status)
    value = value.strip(b" \t")
    if _BAD_VALUE_OCTETS.search(value):
        raise HttpProxyError("control character in header value", status)
    return name.decode("ascii"), value.decode("latin-1")


HeadT = TypeVar("HeadT", "HttpRequestHead", "HttpResponseHead")


class _HeadParser(Generic[HeadT]):
    """Line splitting and limits shared by the request and the response parser."""

    __slots__ = ("_buffer", "_pos", "_searched", "_start", "_fields", "_state", "_trailing")

    # For a peer's bad request we answer 400 (or 414/431); for a bad response, 502.
    _error_status = 400
    _start_line_too_long_status = 414

    def receive_data(self, data: bytes | bytearray | memoryview) -> HeadT | None:
        """Feed received bytes; return the head once complete, else None.

        Raises ``HttpProxyError`` (``.status``, ``.reply``) on bad input and ``LocalError``
        if called again after returning the head or raising.
        """
        if not self._receive(data):
            return None
        try:
            head = self._build()
        except HttpProxyError:
            self._state = ParserState.FAILED
            raise
        self._finish()
        return head

    def _build(self) -> HeadT:
        raise NotImplementedError

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0  # start of the line being read
        self._searched = 0  # no LF in buffer[_pos:_searched]: don't search it again
        self._start = b""
        self._fields: list[tuple[str, str]] = []
        self._state = ParserState.START_LINE
        self._trailing = b""

    @property
    def state(self) -> ParserState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the head (body or pipelined data): must not be lost."""
        return self._trailing

    def _receive(self, data: bytes | bytearray | memoryview) -> bool:
        """Buffer data; True when the head is complete."""
        if self._state is ParserState.DONE or self._state is ParserState.FAILED:
            raise LocalError(f"receive_data() called in state {self._state.name}")
        self._buffer += data
        try:
            return self._scan()
        except HttpProxyError:
            self._state = ParserState.FAILED
            self._buffer.clear()
            raise

    def _limit(self, message: str, status: int) -> HttpLimitExceeded:
        return HttpLimitExceeded(message, status if self._error_status == 400 else 502)

    def _scan(self) -> bool:
        buf = self._buffer
        while True:
            newline = buf.find(b"\n", max(self._pos, self._searched))
            if newline < 0:
                self._searched = len(buf)
                self._check_line_length(len(buf) - self._pos)
                if len(buf) > MAX_HEAD:
                    raise self._limit(f"head exceeds MAX_HEAD ({MAX_HEAD} bytes)", 431)
                return False
            end = newline - 1 if newline > self._pos and buf[newline - 1] == 0x0D else newline
            self._check_line_length(end - self._pos)
            line = bytes(buf[self._pos : end])
            self._pos = newline + 1
            if self._pos > MAX_HEAD:
                raise self._limit(f"head exceeds MAX_HEAD ({MAX_HEAD} bytes)", 431)
            if b"\r" in line:  # RFC 9112 §2.2: a bare CR is invalid
                raise HttpProxyError("bare CR in head", self._error_status)
            if self._state is ParserState.START_LINE:
                if line:  # RFC 9112 §2.2: ignore empty lines before the start line
                    self._start = line
                    self._state = ParserState.FIELDS
            elif line:
                if len(self._fields) >= MAX_HEADERS:
                    raise self._limit(f"more than MAX_HEADERS ({MAX_HEADERS}) header lines", 431)
                self._fields.append(_parse_field_line(line, self._error_status))
            else:
                self._trailing = bytes(buf[self._pos :])
                return True

    def _check_line_length(self, length: int) -> None:
        if length <= MAX_LINE:
            return
        if self._state is ParserState.START_LINE:
            raise self._limit(
                f"start line exceeds MAX_LINE ({MAX_LINE} bytes)",
                self._start_line_too_long_status,
            )
        raise self._limit(f"header line exceeds MAX_LINE ({MAX_LINE} bytes)", 431)

    def _finish(self) -> None:
        self._state = ParserState.DONE
        self._buffer.clear()
        self._fields = []


class HttpHeadParser(_HeadParser[HttpRequestHead]):
    """Incremental request-head parser.  One instance per request: for the next request on
    a persistent connection, make a new parser and feed it the previous ``trailing_data``."""

    __slots__ = ()

    def _build(self) -> HttpRequestHead:
        # RFC 9112 §3: method SP request-target SP HTTP-version, single spaces.
        parts = self._start.split(b" ")
        if len(parts) != 3:
            raise HttpProxyError("malformed request line")
        method, target, version = parts
        if not _TOKEN.fullmatch(method):
            raise HttpProxyError("bad method")
        if not _TARGET.fullmatch(target):
            raise HttpProxyError("bad request target")
        if not _HTTP_VERSION.fullmatch(version):
            raise HttpProxyError("malformed HTTP version")
        return HttpRequestHead(
            method.decode("ascii"),
            target.decode("latin-1"),
            version.decode("ascii"),
            tuple(self._fields),
        )


class HttpResponseHeadParser(_HeadParser[HttpResponseHead]):
    """Incremental response-head parser (origin → us).  Errors carry status 502.

    A 1xx other than 101 is an interim response: make a new parser for the final one and
    feed it ``trailing_data``.
    """

    __slots__ = ()

    _error_status = 502
    _start_line_too_long_status = 502

    def _build(self) -> HttpResponseHead:
        # RFC 9112 §4: HTTP-version SP status-code SP [ reason-phrase ]; a missing final SP
        # is tolerated.
        version, _, rest = self._start.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HttpProxyError("bad or unsupported response version", 502)
        if not _STATUS_CODE.fullmatch(code):
            raise HttpProxyError("bad status code", 502)
        if _BAD_VALUE_OCTETS.search(reason):
            raise HttpProxyError("control character in reason phrase", 502)
        return HttpResponseHead(
            version.decode("ascii"), int(code), reason.decode("latin-1"), tuple(self._fields)
        )


# --- body framing (RFC 9112 §6) -------------------------------------------------------------


class BodyKind(enum.Enum):
    NONE = "none"  # no body: the next message starts right after the head
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    CLOSE_DELIMITED = "close-delimited"  # responses only: the body ends when the origin closes
    TUNNEL = "tunnel"  # 2xx to CONNECT, 101 Switching Protocols: raw bytes both ways from here


def _content_length(values: list[str], status: int) -> int | None:
    if not values:
        return None
    lengths = set()
    for element in (e.strip(" \t") for v in values for e in v.split(",")):
        if not _DIGITS.fullmatch(element):
            raise HttpProxyError("bad Content-Length", status)
        if len(element) > MAX_CONTENT_LENGTH_DIGITS:
            raise HttpLimitExceeded(
                f"Content-Length exceeds MAX_CONTENT_LENGTH_DIGITS ({MAX_CONTENT_LENGTH_DIGITS})",
                status,
            )
        lengths.add(int(element))
    if len(lengths) != 1:  # RFC 9112 §6.3 rule 5: differing values are unrecoverable
        raise HttpProxyError("conflicting Content-Length values", status)
    return lengths.pop()


def _chunked_is_final(values: list[str], status: int) -> bool:
    """Whether ``chunked`` is the final transfer coding (RFC 9112 §6.1), and at most once."""
    codings = [t.split(";", 1)[0].strip(" \t") for t in _list_tokens(values)]
    if not codings:
        raise HttpProxyError("empty Transfer-Encoding", status)
    if codings.count("chunked") > 1:
        raise HttpProxyError("chunked applied more than once", status)
    return codings[-1] == "chunked"


@dataclass(frozen=True, slots=True)
class BodyFramer:
    """How a message body is delimited (RFC 9112 §6.3), decided from its head.

    ``error_status`` is what framing errors answer: 400 for requests, 502 for responses.
    """

    kind: BodyKind
    content_length: int = 0
    error_status: int = 400

    @classmethod
    def for_request(cls, head: HttpRequestHead) -> BodyFramer:
        """Request framing: CONNECT has none (RFC 9110 §9.3.6); Transfer-Encoding with
        Content-Length is refused (smuggling, RFC 9112 §6.1), as is a Transfer-Encoding
        whose final coding is not chunked (§6.3 rule 4) or one in an HTTP/1.0 request."""
        if head.is_connect:
            return cls(BodyKind.NONE)
        te = head.get_all("transfer-encoding")
        cl = head.get_all("content-length")
        if te:
            if cl:
                raise HttpProxyError("both Transfer-Encoding and Content-Length")
            if head.version == "HTTP/1.0":
                raise HttpProxyError("Transfer-Encoding in an HTTP/1.0 request")
            if not _chunked_is_final(te, 400):
                raise HttpProxyError("final transfer coding is not chunked")
            return cls(BodyKind.CHUNKED)
        length = _content_length(cl, 400)
        if length is None:
            return cls(BodyKind.NONE)
        return cls(BodyKind.CONTENT_LENGTH, length)

    @classmethod
    def for_response(cls, head: HttpResponseHead, request_method: str) -> BodyFramer:
        """Response framing, RFC 9112 §6.3 rules 1-7 in order.

        Both Transfer-Encoding and Content-Length is a 502: the RFC lets a recipient go by
        Transfer-Encoding, but an intermediary must then drop Content-Length, and we forward
        the head unchanged.  A 1xx other than 101 has no body; another head follows.
        """
        status = head.status
        if status == 101:
            return cls(BodyKind.TUNNEL, error_status=502)
        if request_method == "HEAD" or status < 200 or status in (204, 304):
            return cls(BodyKind.NONE, error_status=502)
        if request_method == "CONNECT" and status < 300:
            return cls(BodyKind.TUNNEL, error_status=502)
        te = head.get_all("transfer-encoding")
        cl = head.get_all("content-length")
        if te:
            if cl:
                raise HttpProxyError("both Transfer-Encoding and Content-Length", 502)
            if head.version == "HTTP/1.1" and _chunked_is_final(te, 502):
                return cls(BodyKind.CHUNKED, error_status=502)
            return cls(BodyKind.CLOSE_DELIMITED, error_status=502)
        length = _content_length(cl, 502)
        if length is None:
            return cls(BodyKind.CLOSE_DELIMITED, error_status=502)
        return cls(BodyKind.CONTENT_LENGTH, length, 502)

    def tracker(self) -> BodyTracker:
        """A fresh tracker for one body framed this way."""
        if self.kind is BodyKind.CONTENT_LENGTH:
            return ContentLengthBody(self.content_length, self.error_status)
        if self.kind is BodyKind.CHUNKED:
            return ChunkedScanner(self.error_status)
        if self.kind is BodyKind.NONE:
            return NoBody()
        return CloseDelimitedBody()


class BodyTracker(abc.ABC):
    """Finds where a body ends without buffering it.

    ``feed(data)`` returns how many leading bytes of ``data`` belong to the body (forward
    exactly those; the rest is the next message).  ``done`` is True once the body is
    complete.  Call ``receive_eof()`` when the peer closes: it completes a close-delimited
    body and raises ``HttpProxyError`` if a delimited body was cut short.
    """

    __slots__ = ()

    @abc.abstractmethod
    def feed(self, data: bytes | bytearray | memoryview) -> int: ...

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    def receive_eof(self) -> None:
        if not self.done:
            raise HttpProxyError("connection closed before the body was complete")


class NoBody(BodyTracker):
    __slots__ = ()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        return 0

    @property
    def done(self) -> bool:
        return True


class ContentLengthBody(BodyTracker):
    __slots__ = ("_remaining", "_error_status")

    def __init__(self, length: int, error_status: int = 400) -> None:
        self._remaining = length
        self._error_status = error_status

    @property
    def remaining(self) -> int:
        return self._remaining

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        take = min(self._remaining, len(data))
        self._remaining -= take
        return take

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def receive_eof(self) -> None:
        if self._remaining:
            raise HttpProxyError(
                f"connection closed {self._remaining} bytes before the end of the body",
                self._error_status,
            )


class CloseDelimitedBody(BodyTracker):
    """Everything until the peer closes (RFC 9112 §6.3 rule 8)."""

    __slots__ = ("_eof",)

    def __init__(self) -> None:
        self._eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    @property
    def done(self) -> bool:
        return self._eof

    def receive_eof(self) -> None:
        self._eof = True


class _Chunk(enum.Enum):
    SIZE_LINE = "size-line"  # chunk-size [ chunk-ext ] CRLF
    DATA = "data"  # chunk-data
    DATA_CR = "data-cr"  # the CRLF after chunk-data
    DATA_LF = "data-lf"
    TRAILER = "trailer"  # trailer-section CRLF
    DONE = "done"


class ChunkedScanner(BodyTracker):
    """Finds the end of a chunked body (RFC 9112 §7.1) in input split anywhere.

    Strict on purpose: since the bytes go on unchanged, every line must end in CRLF (a bare
    LF is a known source of framing disagreement between hops) and sizes have at most
    ``MAX_CHUNK_SIZE_DIGITS`` hex digits.  Chunk extensions are skipped (bounded by
    ``MAX_CHUNK_LINE``); trailer fields are checked like header fields and bounded by
    ``MAX_LINE``, ``MAX_HEADERS`` and ``MAX_HEAD``.  Only partial lines are buffered; chunk
    data is counted, never copied.
    """

    __slots__ = ("_state", "_remaining", "_line", "_trailer_bytes", "_trailer_fields", "_status")

    def __init__(self, error_status: int = 400) -> None:
        self._state = _Chunk.SIZE_LINE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_bytes = 0
        self._trailer_fields = 0
        self._status = error_status

    @property
    def done(self) -> bool:
        return self._state is _Chunk.DONE

    def receive_eof(self) -> None:
        if self._state is not _Chunk.DONE:
            raise HttpProxyError("connection closed before the last chunk", self._status)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        buf = data if not isinstance(data, memoryview) else data.tobytes()
        pos, end = 0, len(buf)
        while pos < end and self._state is not _Chunk.DONE:
            state = self._state
            if state is _Chunk.DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _Chunk.DATA_CR
            elif state is _Chunk.DATA_CR or state is _Chunk.DATA_LF:
                expected = 0x0D if state is _Chunk.DATA_CR else 0x0A
                if buf[pos] != expected:
                    raise HttpProxyError("chunk data not followed by CRLF", self._status)
                pos += 1
                self._state = _Chunk.DATA_LF if state is _Chunk.DATA_CR else _Chunk.SIZE_LINE
            else:
                newline = buf.find(b"\n", pos)
                stop = end if newline < 0 else newline + 1
                self._line += buf[pos:stop]
                pos = stop
                self._check_line_limit()
                if newline < 0:
                    break
                self._line_complete()
        return pos

    def _check_line_limit(self) -> None:
        if self._state is _Chunk.SIZE_LINE:
            if len(self._line) > MAX_CHUNK_LINE + 2:
                raise HttpLimitExceeded(
                    f"chunk-size line exceeds MAX_CHUNK_LINE ({MAX_CHUNK_LINE} bytes)",
                    self._status,
                )
        else:
            if len(self._line) > MAX_LINE + 2:
                raise HttpLimitExceeded(
                    f"trailer line exceeds MAX_LINE ({MAX_LINE} bytes)", self._status
                )
            if self._trailer_bytes + len(self._line) > MAX_HEAD:
                raise HttpLimitExceeded(
                    f"trailer section exceeds MAX_HEAD ({MAX_HEAD} bytes)", self._status
                )

    def _line_complete(self) -> None:
        raw = bytes(self._line)
        self._line.clear()
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            raise HttpProxyError("chunked line not terminated by CRLF", self._status)
        line = raw[:-2]
        if self._state is _Chunk.SIZE_LINE:
            match = _CHUNK_SIZE_LINE.fullmatch(line)
            if match is None:
                raise HttpProxyError("malformed chunk-size line", self._status)
            digits = match.group(1)
            if len(digits) > MAX_CHUNK_SIZE_DIGITS:
                raise HttpLimitExceeded(
                    f"chunk size exceeds MAX_CHUNK_SIZE_DIGITS ({MAX_CHUNK_SIZE_DIGITS})",
                    self._status,
                )
            size = int(digits, 16)
            if size:
                self._remaining = size
                self._state = _Chunk.DATA
            else:  # last-chunk: the trailer section follows (RFC 9112 §7.1.2)
                self._state = _Chunk.TRAILER
            return
        if not line:
            self._state = _Chunk.DONE
            return
        self._trailer_bytes += len(raw)
        self._trailer_fields += 1
        if self._trailer_fields > MAX_HEADERS:
            raise HttpLimitExceeded(
                f"more than MAX_HEADERS ({MAX_HEADERS}) trailer fields", self._status
            )
        _parse_field_line(line, self._status)


# --- forwarding -------------------------------------------------------------------------------


def client_wants_keep_alive(head: HttpRequestHead) -> bool:
    """Whether the client asked for a persistent connection (RFC 9112 §9.3).

    HTTP/1.1: yes unless a ``close`` connection option.  HTTP/1.0: only with ``keep-alive``.
    The non-standard ``Proxy-Connection`` (still sent by some clients to proxies) counts
    like ``Connection``; ``close`` in either wins.
    """
    options = _list_tokens(head.get_all("connection") + head.get_all("proxy-connection"))
    if "close" in options:
        return False
    if head.version == "HTTP/1.1":
        return True
    return "keep-alive" in options


def _host_header_value(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 80 else f"{shown}:{port}"


def rewrite_for_origin(head: HttpRequestHead, *, force_close: bool = False) -> bytes:
    """The request head to send to the origin for a proxied (absolute-form) request.

    - Target: origin-form ``path?query`` (RFC 9112 §3.2.1); the fragment is dropped.
    - Host: replaced with the target's authority (RFC 9112 §3.2.2: a proxy MUST ignore the
      received Host for absolute-form), kept in place, or first if the client sent none.
    - Removed: the ``HOP_BY_HOP`` headers and every header a ``Connection`` (or
      ``Proxy-Connection``) option names, except Host, Content-Length and
      Transfer-Encoding, which we keep because the body is relayed unchanged.  Upgrade goes
      too: browsers tunnel WebSockets through CONNECT.
    - Connection: ``close`` if the client does not want a persistent connection, or if
      ``force_close`` (a relay that carries one exchange per origin connection);
      ``keep-alive`` for an HTTP/1.0 client that does; nothing for HTTP/1.1 (persistent by
      default).
    - Version: the client's, not ours.  RFC 9110 §6.2 has an intermediary send its own
      version, but we relay the response unchanged, so the origin must not use HTTP/1.1
      features (chunked) that an HTTP/1.0 client would not understand.
    - No Via header: the proxy stays invisible to origins.

    Origin-form requests (a client that took us for the origin) are rewritten the same way;
    CONNECT and asterisk-form requests are a ``LocalError`` (nothing to rewrite).
    """
    if head.form is TargetForm.AUTHORITY or head.form is TargetForm.ASTERISK:
        raise LocalError(f"cannot rewrite a {head.form.value}-form request")
    if not head.host:
        raise LocalError("request has no host to forward to")
    options = set(_list_tokens(head.get_all("connection") + head.get_all("proxy-connection")))
    removed = (HOP_BY_HOP | options) - _NEVER_REMOVED
    host_value = _host_header_value(head.host, head.port)
    lines = [f"{head.method} {head.origin_form} {head.version}"]
    host_sent = False
    for name, value in head.headers:
        lowered = name.lower()
        if lowered == "host":
            if not host_sent:
                lines.append(f"{name}: {host_value}")
                host_sent = True
        elif lowered not in removed:
            lines.append(f"{name}: {value}")
    if not host_sent:
        lines.insert(1, f"Host: {host_value}")
    if force_close or not client_wants_keep_alive(head):
        lines.append("Connection: close")
    elif head.version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _check_no_crlf(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise LocalError(f"CR or LF in response text: {text!r}")
    return text


def response(
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    """A complete HTTP/1.1 response.

    Adds ``Content-Length`` (unless given, or the status forbids a body: 1xx, 204, 304) and,
    with ``close``, ``Connection: close``.  ``reason`` defaults to the standard phrase.
    """
    if not 100 <= status <= 999:
        raise LocalError(f"bad status code {status}")
    phrase = _check_no_crlf(_phrase(status) if reason is None else reason)
    lines = [f"HTTP/1.1 {status} {phrase}"]
    has_length = False
    for name, value in headers:
        has_length = has_length or name.lower() == "content-length"
        lines.append(f"{_check_no_crlf(name)}: {_check_no_crlf(value)}")
    bodiless = status < 200 or status in (204, 304)
    if bodiless and body:
        raise LocalError(f"status {status} cannot have a body")
    if not has_length and not bodiless:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def proxy_auth_required(realm: str = "autovpn", close: bool = True) -> bytes:
    """A 407 asking for Basic credentials (RFC 9110 §11.7.1, §15.5.8; RFC 7617)."""
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')  # RFC 9110 §5.6.4
    return response(
        407,
        headers=[
            ("Proxy-Authenticate", f'Basic realm="{quoted}"'),
            ("Content-Type", "text/plain; charset=utf-8"),
        ],
        body=b"407 Proxy Authentication Required\n",
        close=close,
    )
