"""HTTP/1.1 messages on the wire (RFC 9110, RFC 9112), sans-I/O: the one head grammar, head
serialisation, replies and body framing, for every part of autovpn that speaks HTTP/1.

Theory of operation
-------------------
Heads are parsed incrementally by ``RequestHeadParser`` and ``ResponseHeadParser``, one state
machine each::

    START_LINE ──▶ FIELDS ──▶ DONE            (any state ──▶ FAILED on bad input)

Lines end in CRLF or, leniently, a bare LF (RFC 9112 §2.2); empty lines before the start line
are skipped.  Every peer-controlled length is checked against a limit before it is buffered
further, and the result does not depend on how the input was split: the same bytes give the
same head, or the same error, in any chunking.  Bytes after the head are ``trailing_data``.

Each user passes its own ``HeadLimits``: the bounds, the constants they come from (errors
name them) and the status each refusal carries:

- the HTTP proxy (``http_proxy.CLIENT_LIMITS``, ``ORIGIN_LIMITS``): 400/414/431 for a client's
  request, 502 for an origin's response;
- the tunnel upgrade, ours and wstunnel's on the same port (``handshake.REQUEST_LIMITS``,
  ``RESPONSE_LIMITS``): a bare 400 for every bad request, so a prober learns nothing;
- the control API (``monitor/api.py``): 431 for anything too large, 400 otherwise.

A head keeps its fields as received: order, case and repetitions (values without surrounding
whitespace, decoded as Latin-1 so every octet round-trips); ``get`` and ``get_all`` look names
up case-insensitively.  ``render`` is the inverse: a start line and fields to bytes.

Bodies are never parsed into memory: ``BodyFramer`` decides how a message is delimited
(RFC 9112 §6.3) and its ``tracker()`` counts how many bytes of each received buffer belong to
the body, so the I/O layer forwards them untouched and knows where the next message starts.
Because bytes pass through unchanged, framing must agree with the next hop's, so framing
ambiguities that enable request smuggling are errors, and chunked framing is parsed strictly.

Peer errors raise ``HttpError``: ``.status`` is the HTTP status and ``.reply`` a complete
response to send before closing.  This module imports nothing from asyncio, socket or ssl,
and reads no clock.
"""

from __future__ import annotations

import abc
import enum
import http
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from autovpn.errors import LimitExceeded, LocalError, RemoteProtocolError

__all__ = [
    "MAX_LINE",
    "MAX_HEADERS",
    "MAX_HEAD",
    "MAX_CHUNK_LINE",
    "MAX_CHUNK_SIZE_DIGITS",
    "MAX_CONTENT_LENGTH_DIGITS",
    "HeadLimits",
    "DEFAULT_LIMITS",
    "Fields",
    "HttpError",
    "HttpLimitExceeded",
    "RequestHead",
    "ResponseHead",
    "ParserState",
    "HeadParser",
    "RequestHeadParser",
    "ResponseHeadParser",
    "parse_request_line",
    "render",
    "response",
    "phrase",
    "list_tokens",
    "BodyKind",
    "BodyFramer",
    "BodyTracker",
    "NoBody",
    "ContentLengthBody",
    "CloseDelimitedBody",
    "ChunkedScanner",
]

MAX_LINE = 8 * 1024  # request line, status line, one field line (octets, without CRLF)
MAX_HEADERS = 100  # field lines per head (and per chunked trailer section)
MAX_HEAD = 64 * 1024  # a whole head, start line to the empty line (and a trailer section)
MAX_CHUNK_LINE = 4 * 1024  # a chunk-size line with its extensions (RFC 9112 §7.1.1)
MAX_CHUNK_SIZE_DIGITS = 16  # hex digits of a chunk size: at most 2**64 - 1
MAX_CONTENT_LENGTH_DIGITS = 18  # decimal digits of Content-Length: below 10**18 (an exabyte)

# RFC 9110 §5.6.2 token; §5.5 field-value (no CTL but HTAB; obs-text allowed).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_OCTETS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[^\x00-\x20\x7f]+")  # request-target: no whitespace or CTL
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_STATUS_CODE = re.compile(rb"[1-5][0-9][0-9]")
_DIGITS = re.compile(r"[0-9]+")
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?"  # RFC 9112 §7.1, §7.1.1
)

# RFC 9110 §15 names where Python 3.11's http.HTTPStatus still has the RFC 7231 ones, so
# replies are identical on every supported Python.
_PHRASES = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def phrase(status: int) -> str:
    """The standard reason phrase of ``status`` (RFC 9110 §15), ``Unknown`` if none."""
    if status in _PHRASES:
        return _PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --- errors -------------------------------------------------------------------------------------


class HttpError(RemoteProtocolError):
    """An HTTP peer broke the protocol.

    ``status`` is what we answer (400, 414, 431, 501, 505; 502 when an origin misbehaved;
    whatever the ``HeadLimits`` in use say) and ``reply`` the complete response bytes to send
    before closing.  The body names only the status, never internals.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        body = f"{status} {phrase(status)}\n".encode("ascii")
        reply = response(status, headers=[("Content-Type", "text/plain; charset=utf-8")], body=body)
        super().__init__(message, reply=reply)
        self.status = status


class HttpLimitExceeded(HttpError, LimitExceeded):
    """A head, line or chunk went past one of the named limits."""


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """The bounds on one head, the names errors give them, and the status of each refusal.

    ``max_head`` counts the whole head, start line to the empty line, terminators included.
    ``*_name`` are the constants the bounds come from, so an error message leads to the knob.
    ``error_status`` answers a malformed head, ``start_line_status`` a start line over
    ``max_line`` (414 URI Too Long for a request), ``too_large_status`` a field line, the field
    count or the whole head over its bound (431).
    """

    max_line: int = MAX_LINE
    max_headers: int = MAX_HEADERS
    max_head: int = MAX_HEAD
    line_name: str = "MAX_LINE"
    headers_name: str = "MAX_HEADERS"
    head_name: str = "MAX_HEAD"
    error_status: int = 400
    start_line_status: int = 414
    too_large_status: int = 431


#: The bounds above, with a request's statuses.
DEFAULT_LIMITS = HeadLimits()

# --- heads --------------------------------------------------------------------------------------

Fields = tuple[tuple[str, str], ...]


def list_tokens(values: Iterable[str]) -> list[str]:
    """Elements of comma-separated list fields, lowercased, empties dropped (RFC 9110 §5.6.1)."""
    return [t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")]


class _FieldAccess:
    """Case-insensitive look-ups in a head's ``headers`` (RFC 9110 §5.1)."""

    __slots__ = ()
    headers: Fields

    def get(self, name: str, default: str = "") -> str:
        """The first value of header ``name``, or ``default`` (an absent header and an empty
        one mean the same to most checks; ``get_all`` tells them apart)."""
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]


@dataclass(frozen=True, slots=True)
class RequestHead(_FieldAccess):
    """A request head (RFC 9112 §3): ``method SP request-target SP HTTP-version``, then fields.

    The grammar is checked by the parser; the version is any ``HTTP/d.d`` (what a user
    accepts is its own business: the proxy answers 505, the tunnel 400).
    """

    method: str
    target: str
    version: str
    headers: Fields

    @property
    def start_line(self) -> str:
        return f"{self.method} {self.target} {self.version}"


@dataclass(frozen=True, slots=True)
class ResponseHead(_FieldAccess):
    """A response head (RFC 9112 §4).  ``version`` is HTTP/1.0 or HTTP/1.1."""

    version: str
    status: int
    reason: str
    headers: Fields

    @property
    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"


def render(start_line: str, fields: Iterable[tuple[str, str]], encoding: str = "latin-1") -> bytes:
    """A head on the wire: the start line, ``name: value`` lines, the empty line.

    Latin-1 gives back the octets of a parsed head unchanged; wstunnel's client sends its
    headers in UTF-8, as the Rust original does.
    """
    lines = [start_line, *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(encoding)


class ParserState(enum.Enum):
    START_LINE = "start-line"
    FIELDS = "fields"
    DONE = "done"
    FAILED = "failed"


def _parse_field_line(line: bytes, status: int) -> tuple[str, str]:
    """One field line (RFC 9112 §5): ``name ":" OWS value OWS``."""
    if line[:1] in (b" ", b"\t"):  # RFC 9112 §5.2: obs-fold; we reject it
        raise HttpError("obsolete line folding in header", status)
    name, colon, value = line.partition(b":")
    if not colon:
        raise HttpError("header line without colon", status)
    if name != name.rstrip(b" \t"):  # RFC 9112 §5.1: MUST reject with 400
        raise HttpError("whitespace between header name and colon", status)
    if not _TOKEN.fullmatch(name):
        raise HttpError("bad header name", status)
    value = value.strip(b" \t")
    if _BAD_VALUE_OCTETS.search(value):
        raise HttpError("control character in header value", status)
    return name.decode("ascii"), value.decode("latin-1")


def parse_request_line(line: bytes, status: int = 400) -> tuple[str, str, str]:
    """(method, target, version) of a request line (RFC 9112 §3), single spaces."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError("malformed request line", status)
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError("bad method", status)
    if not _TARGET.fullmatch(target):
        raise HttpError("bad request target", status)
    if not _HTTP_VERSION.fullmatch(version):
        raise HttpError("malformed HTTP version", status)
    return method.decode("ascii"), target.decode("latin-1"), version.decode("ascii")


HeadT = TypeVar("HeadT")


class HeadParser(Generic[HeadT], abc.ABC):
    """Line splitting and limits; ``_build`` makes the head from the start line and fields.

    One instance per head: for the next message on a persistent connection, make a new
    parser and feed it the previous ``trailing_data``.
    """

    __slots__ = (
        "limits",
        "_buffer",
        "_pos",
        "_searched",
        "_start",
        "_fields",
        "_state",
        "_trailing",
    )

    def __init__(self, limits: HeadLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
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

    def receive_data(self, data: bytes | bytearray | memoryview) -> HeadT | None:
        """Feed received bytes; return the head once complete, else None.

        Raises ``HttpError`` (``.status``, ``.reply``) on bad input and ``LocalError`` if
        called again after returning the head or raising.
        """
        if self._state is ParserState.DONE or self._state is ParserState.FAILED:
            raise LocalError(f"receive_data() called in state {self._state.name}")
        self._buffer += data
        try:
            if not self._scan():
                return None
            head = self._build(self._start, tuple(self._fields))
        except HttpError:
            self._state = ParserState.FAILED
            self._buffer.clear()
            raise
        self._state = ParserState.DONE
        self._buffer.clear()
        self._fields = []
        return head

    @abc.abstractmethod
    def _build(self, start: bytes, fields: Fields) -> HeadT: ...

    def _scan(self) -> bool:
        """Consume complete lines; True once the empty line ending the head is read."""
        buf = self._buffer
        limits = self.limits
        while True:
            newline = buf.find(b"\n", max(self._pos, self._searched))
            if newline < 0:
                self._searched = len(buf)
                # A CR at the end may be the first half of the CRLF: not part of the line.
                pending = len(buf) - self._pos - (1 if buf[-1:] == b"\r" else 0)
                self._check_limits(pending, len(buf))
                return False
            end = newline - 1 if newline > self._pos and buf[newline - 1] == 0x0D else newline
            self._check_limits(end - self._pos, newline + 1)
            line = bytes(buf[self._pos : end])
            self._pos = newline + 1
            if b"\r" in line:  # RFC 9112 §2.2: a bare CR is invalid
                raise HttpError("bare CR in head", limits.error_status)
            if self._state is ParserState.START_LINE:
                if line:  # RFC 9112 §2.2: ignore empty lines before the start line
                    self._start = line
                    self._state = ParserState.FIELDS
            elif line:
                if len(self._fields) >= limits.max_headers:
                    raise HttpLimitExceeded(
                        f"more than {limits.headers_name} ({limits.max_headers}) header lines",
                        limits.too_large_status,
                    )
                self._fields.append(_parse_field_line(line, limits.error_status))
            else:
                self._trailing = bytes(buf[self._pos :])
                return True

    def _check_limits(self, line_length: int, head_length: int) -> None:
        """The line being read is ``line_length`` bytes so far (without its CRLF), the head
        ``head_length``.  The error does not depend on how the input was split."""
        limits = self.limits
        line_too_long = line_length > limits.max_line
        head_too_large = head_length > limits.max_head
        if line_too_long and head_too_large:
            # Both passed: name the one passed first in the byte stream, as a byte-by-byte
            # feed would.  A CR on the line's bound passes it only once the next byte shows
            # that it does not start the CRLF.
            at = self._pos + limits.max_line
            line_too_long = at + (self._buffer[at] == 0x0D) <= limits.max_head
        if line_too_long:
            if self._state is ParserState.START_LINE:
                where, status = "start line", limits.start_line_status
            else:
                where, status = "header line", limits.too_large_status
            raise HttpLimitExceeded(
                f"{where} exceeds {limits.line_name} ({limits.max_line} bytes)", status
            )
        if head_too_large:
            raise HttpLimitExceeded(
                f"head exceeds {limits.head_name} ({limits.max_head} bytes)",
                limits.too_large_status,
            )


class RequestHeadParser(HeadParser[RequestHead]):
    """Incremental request-head parser."""

    __slots__ = ()

    def _build(self, start: bytes, fields: Fields) -> RequestHead:
        return RequestHead(*parse_request_line(start, self.limits.error_status), fields)


class ResponseHeadParser(HeadParser[ResponseHead]):
    """Incremental response-head parser.

    A 1xx other than 101 is an interim response: make a new parser for the final one and
    feed it ``trailing_data``.
    """

    __slots__ = ()

    def _build(self, start: bytes, fields: Fields) -> ResponseHead:
        # RFC 9112 §4: HTTP-version SP status-code SP [ reason-phrase ]; a missing final SP
        # is tolerated.
        status = self.limits.error_status
        version, _, rest = start.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HttpError("bad or unsupported response version", status)
        if not _STATUS_CODE.fullmatch(code):
            raise HttpError("bad status code", status)
        if _BAD_VALUE_OCTETS.search(reason):
            raise HttpError("control character in reason phrase", status)
        return ResponseHead(version.decode("ascii"), int(code), reason.decode("latin-1"), fields)


# --- replies ------------------------------------------------------------------------------------


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
    text = _check_no_crlf(phrase(status) if reason is None else reason)
    fields = [(_check_no_crlf(name), _check_no_crlf(value)) for name, value in headers]
    has_length = any(name.lower() == "content-length" for name, _ in fields)
    bodiless = status < 200 or status in (204, 304)
    if bodiless and body:
        raise LocalError(f"status {status} cannot have a body")
    if not has_length and not bodiless:
        fields.append(("Content-Length", str(len(body))))
    if close:
        fields.append(("Connection", "close"))
    return render(f"HTTP/1.1 {status} {text}", fields) + body


# --- body framing (RFC 9112 §6) -------------------------------------------------------------


class BodyKind(enum.Enum):
    NONE = "none"  # no body: the next message starts right after the head
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    CLOSE_DELIMITED = "close-delimited"  # responses only: the body ends when the peer closes
    TUNNEL = "tunnel"  # 2xx to CONNECT, 101 Switching Protocols: raw bytes both ways from here


def _content_length(values: list[str], status: int) -> int | None:
    if not values:
        return None
    lengths = set()
    for element in (e.strip(" \t") for v in values for e in v.split(",")):
        if not _DIGITS.fullmatch(element):
            raise HttpError("bad Content-Length", status)
        if len(element) > MAX_CONTENT_LENGTH_DIGITS:
            raise HttpLimitExceeded(
                f"Content-Length exceeds MAX_CONTENT_LENGTH_DIGITS ({MAX_CONTENT_LENGTH_DIGITS})",
                status,
            )
        lengths.add(int(element))
    if len(lengths) != 1:  # RFC 9112 §6.3 rule 5: differing values are unrecoverable
        raise HttpError("conflicting Content-Length values", status)
    return lengths.pop()


def _chunked_is_final(values: list[str], status: int) -> bool:
    """Whether ``chunked`` is the final transfer coding (RFC 9112 §6.1), and at most once."""
    codings = [t.split(";", 1)[0].strip(" \t") for t in list_tokens(values)]
    if not codings:
        raise HttpError("empty Transfer-Encoding", status)
    if codings.count("chunked") > 1:
        raise HttpError("chunked applied more than once", status)
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
    def for_request(cls, head: RequestHead) -> BodyFramer:
        """Request framing: CONNECT has none (RFC 9110 §9.3.6); Transfer-Encoding with
        Content-Length is refused (smuggling, RFC 9112 §6.1), as is a Transfer-Encoding
        whose final coding is not chunked (§6.3 rule 4) or one in an HTTP/1.0 request."""
        if head.method == "CONNECT":
            return cls(BodyKind.NONE)
        te = head.get_all("transfer-encoding")
        cl = head.get_all("content-length")
        if te:
            if cl:
                raise HttpError("both Transfer-Encoding and Content-Length")
            if head.version == "HTTP/1.0":
                raise HttpError("Transfer-Encoding in an HTTP/1.0 request")
            if not _chunked_is_final(te, 400):
                raise HttpError("final transfer coding is not chunked")
            return cls(BodyKind.CHUNKED)
        length = _content_length(cl, 400)
        if length is None:
            return cls(BodyKind.NONE)
        return cls(BodyKind.CONTENT_LENGTH, length)

    @classmethod
    def for_response(cls, head: ResponseHead, request_method: str) -> BodyFramer:
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
                raise HttpError("both Transfer-Encoding and Content-Length", 502)
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
    body and raises ``HttpError`` if a delimited body was cut short.
    """

    __slots__ = ()

    @abc.abstractmethod
    def feed(self, data: bytes | bytearray | memoryview) -> int: ...

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    def receive_eof(self) -> None:
        if not self.done:
            raise HttpError("connection closed before the body was complete")


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
            raise HttpError(
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
            raise HttpError("connection closed before the last chunk", self._status)

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
                    raise HttpError("chunk data not followed by CRLF", self._status)
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
            raise HttpError("chunked line not terminated by CRLF", self._status)
        line = raw[:-2]
        if self._state is _Chunk.SIZE_LINE:
            match = _CHUNK_SIZE_LINE.fullmatch(line)
            if match is None:
                raise HttpError("malformed chunk-size line", self._status)
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
