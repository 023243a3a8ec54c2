"""The HTTP/1.1 proxy's semantics (RFC 9110, RFC 9112) on top of ``http1``, sans-I/O.

Theory of operation
-------------------
A client of the HTTP proxy sends a request head: either ``CONNECT host:port`` (authority-form,
RFC 9112 §3.2.3), after which the connection becomes a tunnel, or a plain request with an
absolute-form target ``http://host[:port]/path`` (RFC 9112 §3.2.2), which we forward to the
origin with ``rewrite_for_origin`` and then relay both bodies through *unchanged*.

The grammar, the limits and the body framing are ``autovpn.wire.http1``'s.  This module adds
what a proxy makes of a request: ``HttpHeadParser`` gives an ``HttpRequestHead``, which knows
its target form and where to connect (and refuses what a proxy cannot serve: other versions
with 505, other schemes with 501); ``rewrite_for_origin`` drops the hop-by-hop fields;
``CONNECTION_ESTABLISHED`` and ``proxy_auth_required`` are the proxy's own replies.
Clients' requests are read with ``CLIENT_LIMITS`` (400, 414 and 431), origins' responses
with ``ORIGIN_LIMITS`` (every refusal a 502).

Peer errors raise ``http1.HttpError``: ``.status`` is the HTTP status and ``.reply`` the full
response to send before closing.  This module imports nothing from asyncio, socket or ssl,
and reads no clock.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

from autovpn.errors import LocalError
from autovpn.wire import http1
from autovpn.wire.http1 import Fields, HeadLimits, HttpError, RequestHead, list_tokens, render

__all__ = [
    "CLIENT_LIMITS",
    "ORIGIN_LIMITS",
    "CONNECTION_ESTABLISHED",
    "HOP_BY_HOP",
    "TargetForm",
    "HttpRequestHead",
    "HttpHeadParser",
    "rewrite_for_origin",
    "client_wants_keep_alive",
    "proxy_auth_required",
]

#: A client's request head: http1's bounds; 400, 414 (request line) and 431 (fields, head).
CLIENT_LIMITS = HeadLimits()
#: An origin's response head: the same bounds, and every refusal a 502 Bad Gateway.
ORIGIN_LIMITS = HeadLimits(error_status=502, start_line_status=502, too_large_status=502)

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

_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+")  # RFC 3986 §3.2.2
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)(?:#.*)?", re.DOTALL)
_SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


# --- requests -----------------------------------------------------------------------------------


class TargetForm(enum.Enum):
    """The four request-target forms (RFC 9112 §3.2)."""

    ORIGIN = "origin"  # /path?query   (a client that thinks we are the origin)
    ABSOLUTE = "absolute"  # http://host:port/path?query   (proxied request)
    AUTHORITY = "authority"  # host:port   (CONNECT only)
    ASTERISK = "asterisk"  # *   (OPTIONS only)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` → (host without brackets, port) (RFC 3986 §3.2)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HttpError(f"unterminated IPv6 literal in {authority!r}")
        try:
            host = str(ipaddress.IPv6Address(authority[1:end]))
        except ValueError:
            raise HttpError(f"bad IPv6 literal in {authority!r}") from None
        rest = authority[end + 1 :]
    else:
        host, colon, port_text = authority.rpartition(":")
        if not colon:
            host, port_text = authority, ""
        if not _REG_NAME.fullmatch(host):
            raise HttpError(f"bad host in {authority!r}")
        rest = colon + port_text
    if rest in ("", ":"):  # RFC 3986 §3.2.3: an empty port means the scheme's default
        if default_port is None:
            raise HttpError(f"port required in {authority!r}")
        return host, default_port
    if not rest.startswith(":") or not _PORT_DIGITS.fullmatch(rest[1:]):
        raise HttpError(f"bad port in {authority!r}")
    port = int(rest[1:])
    if not 1 <= port <= 0xFFFF:
        raise HttpError(f"port out of range in {authority!r}")
    return host, port


@dataclass(frozen=True, slots=True)
class HttpRequestHead(RequestHead):
    """A request head as the proxy sees it; constructing one validates it and derives the
    target.  Derived fields:

    - ``form``: which request-target form was used.
    - ``host``, ``port``: where to connect.  CONNECT: from the authority (port required).
      Absolute-form: from the URI (``http`` only, default port 80; ``https://`` and other
      schemes are refused with 501, since we relay bytes unchanged and cannot originate TLS;
      browsers send CONNECT for https).  Origin- and asterisk-form: from the Host header,
      default port 80; ``host`` is ``""`` if an HTTP/1.0 request has no Host.
    - ``origin_form``: the target to send to the origin: ``path[?query]`` (``/`` if the path is
      empty, ``*`` for ``OPTIONS http://host`` per RFC 9112 §3.2.4); ``""`` for CONNECT.
    """

    form: TargetForm = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)
    origin_form: str = field(init=False)

    def __post_init__(self) -> None:
        if self.version not in _SUPPORTED_VERSIONS:
            raise HttpError(f"unsupported version {self.version!r}", 505)
        hosts = self.get_all("host")
        if len(hosts) > 1:  # RFC 9112 §3.2
            raise HttpError("more than one Host header")
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
                raise HttpError("asterisk-form target is for OPTIONS only")
            form = TargetForm.ASTERISK
            origin_form = "*"
            host, port = self._from_host_header(hosts)
        else:
            form = TargetForm.ABSOLUTE
            match = _ABSOLUTE.fullmatch(self.target)
            if match is None:
                raise HttpError(f"bad request target {self.target[:100]!r}")
            scheme, authority, path_query = match.groups()
            if scheme.lower() != "http":
                raise HttpError(f"scheme {scheme!r} not supported; use CONNECT", 501)
            if "@" in authority:  # RFC 9110 §4.2.4: userinfo is deprecated, treat as error
                raise HttpError("userinfo in request target")
            if not authority:
                raise HttpError("empty authority in request target")
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
                raise HttpError("HTTP/1.1 request without Host")
            return "", 80
        if not hosts[0]:
            return "", 80
        return _split_authority(hosts[0], 80)

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"


class HttpHeadParser(http1.HeadParser[HttpRequestHead]):
    """Incremental request-head parser: http1's grammar, then ``HttpRequestHead``'s checks.
    One instance per request: for the next request on a persistent connection, make a new
    parser and feed it the previous ``trailing_data``."""

    __slots__ = ()

    def __init__(self, limits: HeadLimits = CLIENT_LIMITS) -> None:
        super().__init__(limits)

    def _build(self, start: bytes, fields: Fields) -> HttpRequestHead:
        return HttpRequestHead(*http1.parse_request_line(start, self.limits.error_status), fields)


# --- forwarding -------------------------------------------------------------------------------


def client_wants_keep_alive(head: HttpRequestHead) -> bool:
    """Whether the client asked for a persistent connection (RFC 9112 §9.3).

    HTTP/1.1: yes unless a ``close`` connection option.  HTTP/1.0: only with ``keep-alive``.
    The non-standard ``Proxy-Connection`` (still sent by some clients to proxies) counts
    like ``Connection``; ``close`` in either wins.
    """
    options = list_tokens(head.get_all("connection") + head.get_all("proxy-connection"))
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
    options = set(list_tokens(head.get_all("connection") + head.get_all("proxy-connection")))
    removed = (HOP_BY_HOP | options) - _NEVER_REMOVED
    host_value = _host_header_value(head.host, head.port)
    fields: list[tuple[str, str]] = []
    host_sent = False
    for name, value in head.headers:
        lowered = name.lower()
        if lowered == "host":
            if not host_sent:
                fields.append((name, host_value))
                host_sent = True
        elif lowered not in removed:
            fields.append((name, value))
    if not host_sent:
        fields.insert(0, ("Host", host_value))
    if force_close or not client_wants_keep_alive(head):
        fields.append(("Connection", "close"))
    elif head.version == "HTTP/1.0":
        fields.append(("Connection", "keep-alive"))
    return render(f"{head.method} {head.origin_form} {head.version}", fields)


def proxy_auth_required(realm: str = "autovpn", close: bool = True) -> bytes:
    """A 407 asking for Basic credentials (RFC 9110 §11.7.1, §15.5.8; RFC 7617)."""
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')  # RFC 9110 §5.6.4
    return http1.response(
        407,
        headers=[
            ("Proxy-Authenticate", f'Basic realm="{quoted}"'),
            ("Content-Type", "text/plain; charset=utf-8"),
        ],
        body=b"407 Proxy Authentication Required\n",
        close=close,
    )
