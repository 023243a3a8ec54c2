"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-I/O.

Theory of operation
-------------------
``Socks5ServerHandshake`` is fed whatever bytes arrive (``receive_data``) and walks one
explicit state machine::

    GREETING ──▶ AUTH ──▶ REQUEST ──▶ DONE        (any state ──▶ FAILED on bad input)
        └───────────────────▲  (method 0x00: no AUTH state)

Bytes to send back (method selection, RFC 1929 status) accumulate in ``data_to_send()``.
Once the request is complete ``receive_data`` returns a ``Socks5Request``; the I/O layer
then dials and answers with ``encode_reply``.  Anything after the request is client early
data, kept in ``trailing_data``.  A peer error raises ``Socks5Error`` whose ``reply`` is the
exact bytes to send before closing.

Every message here is bounded by its own format (one length byte per variable field), so the
largest message is 4 + 1 + 255 + 2 bytes; no extra buffering limit is needed.  Clients may
pipeline (send the greeting, authentication and request without waiting): the buffer simply
holds the next message until its turn.

``Socks5ClientHandshake`` is the mirror image, used by our tests, benchmarks and reverse
tunnels.  ``parse_udp_datagram`` / ``encode_udp_datagram`` handle the RFC 1928 §7 UDP
header.  This module imports nothing from asyncio, socket or ssl, and reads no clock.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from autovpn.errors import AuthenticationFailed, LocalError, RemoteProtocolError
from autovpn.wire.auth import Credentials

__all__ = [
    "SOCKS_VERSION",
    "AUTH_VERSION",
    "Method",
    "Command",
    "Reply",
    "AddressType",
    "Socks5Request",
    "Socks5Error",
    "Socks5AuthError",
    "ServerState",
    "Socks5ServerHandshake",
    "ClientState",
    "Socks5ClientHandshake",
    "UdpDatagram",
    "encode_reply",
    "encode_address",
    "decode_address",
    "parse_udp_datagram",
    "encode_udp_datagram",
]

SOCKS_VERSION = 0x05  # RFC 1928 §3
AUTH_VERSION = 0x01  # RFC 1929 §2: version of the username/password subnegotiation
_SOCKS4_VERSION = 0x04


class Method(enum.IntEnum):
    """Authentication methods (RFC 1928 §3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """Request commands (RFC 1928 §4)."""

    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class Reply(enum.IntEnum):
    """Reply codes (RFC 1928 §6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class AddressType(enum.IntEnum):
    """ATYP values (RFC 1928 §5)."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


@dataclass(frozen=True, slots=True)
class Socks5Request:
    """A complete request (RFC 1928 §4).

    ``host`` is an IPv4 or IPv6 literal (IPv6 without brackets) or a domain name (ASCII; a
    UTF-8 name sent by the client is converted to its IDNA A-label form).
    """

    command: Command
    host: str
    port: int


class Socks5Error(RemoteProtocolError):
    """A SOCKS5 peer broke the protocol or refused us.

    ``reply`` is the exact bytes to send before closing (may be ``b""``).  ``reply_code`` is
    the RFC 1928 §6 code involved, if any: the one we answer with on the server side, the
    one the server sent on the client side.
    """

    def __init__(self, message: str, *, reply: bytes = b"", reply_code: int | None = None) -> None:
        super().__init__(message, reply=reply)
        self.reply_code = reply_code


class Socks5AuthError(Socks5Error, AuthenticationFailed):
    """Missing or wrong RFC 1929 credentials."""


# Header formats, compiled once (RFC 1928 §3, §4, §6, §7; RFC 1929 §2).
_VER_BYTE = struct.Struct("!BB")  # VER NMETHODS / VER METHOD / VER STATUS
_REQUEST_HEAD = struct.Struct("!BBBB")  # VER CMD RSV ATYP (same layout for VER REP RSV ATYP)
_UDP_HEAD = struct.Struct("!HBB")  # RSV FRAG ATYP
_PORT = struct.Struct("!H")
_UDP_PREFIX = bytes(3)  # RSV=0x0000 FRAG=0
_IPV4_PORT = struct.Struct("!4sH")
_IPV6_PORT = struct.Struct("!16sH")

_NO_ACCEPTABLE_METHODS = bytes((SOCKS_VERSION, Method.NO_ACCEPTABLE))  # RFC 1928 §3
_AUTH_SUCCESS = bytes((AUTH_VERSION, 0x00))  # RFC 1929 §2: STATUS 0 = success
_AUTH_FAILURE = bytes((AUTH_VERSION, 0x01))  # any non-zero STATUS = failure, then close
# A SOCKS4 client gets a SOCKS4 "request rejected" (VN=0, CD=91) instead of silence.
_SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)

# Octets that never appear in a usable host name; refusing them keeps log lines and the
# dialer's input clean.
_BAD_DOMAIN_OCTETS = re.compile(rb"[\x00-\x20\x7f]")


def _failure_reply(code: Reply) -> bytes:
    return encode_reply(code)


# --- addresses (RFC 1928 §5) ----------------------------------------------------------------


def encode_address(host: str, port: int) -> bytes:
    """ATYP + DST.ADDR + DST.PORT for an IPv4/IPv6 literal or a domain name (RFC 1928 §5).

    An IPv6 literal may come with or without brackets.  Raises ``LocalError`` for a port out
    of range or a domain that is empty or longer than 255 octets.
    """
    if not 0 <= port <= 0xFFFF:
        raise LocalError(f"port out of range: {port}")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv4Address):
            return bytes((AddressType.IPV4,)) + _IPV4_PORT.pack(ip.packed, port)
        return bytes((AddressType.IPV6,)) + _IPV6_PORT.pack(ip.packed, port)
    try:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
    except UnicodeError as exc:
        raise LocalError(f"host name not encodable: {host!r}") from exc
    if not 1 <= len(name) <= 255:
        raise LocalError(f"domain name must be 1-255 octets, got {len(name)}")
    return bytes((AddressType.DOMAIN, len(name))) + name + _PORT.pack(port)


def _decode_domain(raw: bytes) -> str:
    """A DOMAINNAME field as text: ASCII as is, UTF-8 converted to IDNA A-labels."""
    if not raw:
        raise ValueError("empty domain name")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        try:
            name = raw.decode("utf-8").encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError("domain name is neither ASCII nor valid IDNA") from exc
    if _BAD_DOMAIN_OCTETS.search(name.encode("ascii")):
        raise ValueError("domain name contains control characters or spaces")
    return name


def _parse_address(buf: bytes | bytearray | memoryview, offset: int) -> tuple[str, int, int] | None:
    """Parse ATYP ADDR PORT at ``offset``: ``(host, port, end)``, or None if incomplete.

    Raises ``Socks5Error`` (reply: a full reply with code 0x08 or 0x01) for an unknown ATYP or
    a bad domain name.
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + _IPV4_PORT.size
        if len(buf) < end:
            return None
        packed, port = _IPV4_PORT.unpack_from(buf, start)
        return str(ipaddress.IPv4Address(packed)), port, end
    if atyp == AddressType.IPV6:
        end = start + _IPV6_PORT.size
        if len(buf) < end:
            return None
        packed, port = _IPV6_PORT.unpack_from(buf, start)
        return str(ipaddress.IPv6Address(packed)), port, end
    if atyp == AddressType.DOMAIN:
        if len(buf) <= start:
            return None
        length = buf[start]
        end = start + 1 + length + _PORT.size
        if len(buf) < end:
            return None
        try:
            host = _decode_domain(bytes(buf[start + 1 : start + 1 + length]))
        except ValueError as exc:
            raise Socks5Error(
                f"bad domain name: {exc}",
                reply=_failure_reply(Reply.GENERAL_FAILURE),
                reply_code=Reply.GENERAL_FAILURE,
            ) from None
        (port,) = _PORT.unpack_from(buf, end - _PORT.size)
        return host, port, end
    raise Socks5Error(
        f"address type not supported: 0x{atyp:02x}",
        reply=_failure_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        reply_code=Reply.ADDRESS_TYPE_NOT_SUPPORTED,
    )


def decode_address(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[str, int, int]:
    """Parse ATYP + ADDR + PORT at ``offset`` (RFC 1928 §5): ``(host, port, end_offset)``.

    Raises ``Socks5Error`` on truncation, an unknown address type or a bad domain name.
    """
    result = _parse_address(data, offset)
    if result is None:
        raise Socks5Error(
            "truncated address",
            reply=_failure_reply(Reply.GENERAL_FAILURE),
            reply_code=Reply.GENERAL_FAILURE,
        )
    return result


def encode_reply(reply: Reply | int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (RFC 1928 §6)."""
    if not 0 <= reply <= 0xFF:
        raise LocalError(f"reply code out of range: {reply}")
    return bytes((SOCKS_VERSION, reply, 0x00)) + encode_address(host, port)


# --- server ---------------------------------------------------------------------------------


class ServerState(enum.Enum):
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS (RFC 1928 §3)
    AUTH = "auth"  # waiting for the RFC 1929 username/password request
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT (RFC 1928 §4)
    DONE = "done"  # request delivered; the I/O layer answers with encode_reply
    FAILED = "failed"  # a Socks5Error was raised; the connection must be closed


class Socks5ServerHandshake:
    """Server side of the SOCKS5 handshake, up to and including the request.

    ``users`` None or empty: no authentication (method 0x00).  Otherwise method 0x02 is
    required and checked with ``Credentials.check`` (timing-safe).  Compatibility choice: with
    no users configured, a client that offers only 0x02 (some clients do whenever they have
    credentials configured) is accepted with any username and password.
    """

    __slots__ = ("_credentials", "_buffer", "_outgoing", "_state", "_username", "_trailing")

    def __init__(self, users: Mapping[str, str] | None = None) -> None:
        if users is None or isinstance(users, Credentials):
            self._credentials = users
        else:
            self._credentials = Credentials(users)
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._state = ServerState.GREETING
        self._username: str | None = None
        self._trailing = b""

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def username(self) -> str | None:
        """The authenticated username (RFC 1929), None without authentication."""
        return self._username

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the request (client early data): forward them, don't drop."""
        return self._trailing

    def data_to_send(self) -> bytes:
        """Bytes produced so far (method selection, RFC 1929 status); cleared on read."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> Socks5Request | None:
        """Feed received bytes; return the request once complete, else None.

        Raises ``Socks5Error`` (``.reply`` = bytes to send, then close) on bad input, and
        ``LocalError`` if called again after the request was returned or an error raised.
        """
        if self._state is ServerState.DONE or self._state is ServerState.FAILED:
            raise LocalError(f"receive_data() called in state {self._state.name}")
        self._buffer += data
        try:
            return self._advance()
        except Socks5Error:
            self._state = ServerState.FAILED
            self._buffer.clear()
            raise

    def _advance(self) -> Socks5Request | None:
        # All transitions happen here, in order; a pipelining client may have sent several
        # messages at once, so loop until a message is incomplete.
        while True:
            if self._state is ServerState.GREETING:
                if not self._receive_greeting():
                    return None
            elif self._state is ServerState.AUTH:
                if not self._receive_auth():
                    return None
            else:
                return self._receive_request()

    def _receive_greeting(self) -> bool:
        # RFC 1928 §3: VER(1)=5 NMETHODS(1) METHODS(1-255)
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != SOCKS_VERSION:
            reply = _SOCKS4_REJECTED if buf[0] == _SOCKS4_VERSION else b""
            raise Socks5Error(f"not SOCKS5: version byte 0x{buf[0]:02x}", reply=reply)
        if len(buf) < _VER_BYTE.size:
            return False
        _, nmethods = _VER_BYTE.unpack_from(buf)
        end = _VER_BYTE.size + nmethods
        if len(buf) < end:
            return False
        methods = frozenset(buf[_VER_BYTE.size : end])
        del buf[:end]
        if not self._credentials:
            if Method.NO_AUTH in methods:
                return self._select(Method.NO_AUTH, ServerState.REQUEST)
            if Method.USERNAME_PASSWORD in methods:
                return self._select(Method.USERNAME_PASSWORD, ServerState.AUTH)
        elif Method.USERNAME_PASSWORD in methods:
            return self._select(Method.USERNAME_PASSWORD, ServerState.AUTH)
        # RFC 1928 §3: "the client MUST close the connection" after X'FF'.
        raise Socks5AuthError(
            f"no acceptable authentication method among {sorted(methods)}",
            reply=_NO_ACCEPTABLE_METHODS,
        )

    def _select(self, method: Method, next_state: ServerState) -> bool:
        self._outgoing += bytes((SOCKS_VERSION, method))
        self._state = next_state
        return True

    def _receive_auth(self) -> bool:
        # RFC 1929 §2: VER(1)=1 ULEN(1) UNAME(1-255) PLEN(1) PASSWD(1-255)
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != AUTH_VERSION:
            raise Socks5AuthError(
                f"bad username/password subnegotiation version 0x{buf[0]:02x}",
                reply=_AUTH_FAILURE,
            )
        if len(buf) < 2:
            return False
        ulen = buf[1]
        plen_at = 2 + ulen
        if len(buf) <= plen_at:
            return False
        end = plen_at + 1 + buf[plen_at]
        if len(buf) < end:
            return False
        raw_user = bytes(buf[2:plen_at])
        raw_password = bytes(buf[plen_at + 1 : end])
        del buf[:end]
        try:
            user = raw_user.decode("utf-8")
            password = raw_password.decode("utf-8")
        except UnicodeDecodeError:
            raise Socks5AuthError("credentials are not UTF-8", reply=_AUTH_FAILURE) from None
        if self._credentials and not self._credentials.check(user, password):
            # Never say which part was wrong, to the peer or in the message (it gets logged).
            raise Socks5AuthError("bad credentials", reply=_AUTH_FAILURE)
        self._username = user
        self._outgoing += _AUTH_SUCCESS
        self._state = ServerState.REQUEST
        return True

    def _receive_request(self) -> Socks5Request | None:
        # RFC 1928 §4: VER(1)=5 CMD(1) RSV(1) ATYP(1) DST.ADDR DST.PORT(2)
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            raise Socks5Error(
                f"bad request version 0x{buf[0]:02x}",
                reply=_failure_reply(Reply.GENERAL_FAILURE),
                reply_code=Reply.GENERAL_FAILURE,
            )
        if len(buf) < 2:
            return None
        if buf[1] not in _COMMANDS:
            raise Socks5Error(
                f"command not supported: 0x{buf[1]:02x}",
                reply=_failure_reply(Reply.COMMAND_NOT_SUPPORTED),
                reply_code=Reply.COMMAND_NOT_SUPPORTED,
            )
        # RSV (buf[2]) is "X'00'" but, as most servers, we don't refuse a non-zero one.
        parsed = _parse_address(buf, 3)
        if parsed is None:
            return None
        host, port, end = parsed
        request = Socks5Request(Command(buf[1]), host, port)
        self._trailing = bytes(buf[end:])
        buf.clear()
        self._state = ServerState.DONE
        return request


_COMMANDS = frozenset(int(c) for c in Command)


# --- client ---------------------------------------------------------------------------------


class ClientState(enum.Enum):
    METHOD = "method"  # greeting sent, waiting for VER METHOD (RFC 1928 §3)
    AUTH = "auth"  # RFC 1929 request sent, waiting for VER STATUS
    REPLY = "reply"  # request sent, waiting for the reply (RFC 1928 §6)
    DONE = "done"
    FAILED = "failed"


class Socks5ClientHandshake:
    """Client side of the SOCKS5 handshake (tests, benchmarks, reverse tunnels).

    Protocol: send ``initial_bytes()``, then feed everything received to ``receive_data``
    and send ``data_to_send()`` after each call.  By default the client waits for the method
    selection before sending the authentication or the request, as RFC 1928 describes; with
    ``pipeline=True`` and no credentials, the request goes out with the greeting (one round
    trip saved; our server and most others accept it).
    """

    __slots__ = (
        "_host",
        "_port",
        "_command",
        "_auth",
        "_pipeline",
        "_buffer",
        "_outgoing",
        "_state",
        "_trailing",
    )

    def __init__(
        self,
        host: str,
        port: int,
        command: Command = Command.CONNECT,
        username: str | None = None,
        password: str | None = None,
        *,
        pipeline: bool = False,
    ) -> None:
        self._auth: bytes | None = None  # the RFC 1929 request, if we have credentials
        if username is not None or password is not None:
            if username is None or password is None:
                raise LocalError("username and password go together")
            user, secret = username.encode("utf-8"), password.encode("utf-8")
            if not (1 <= len(user) <= 255 and 1 <= len(secret) <= 255):
                raise LocalError("RFC 1929 username and password must be 1-255 octets each")
            self._auth = bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret
        self._host = host
        self._port = port
        self._command = command
        self._pipeline = pipeline and self._auth is None
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._state = ClientState.METHOD
        self._trailing = b""
        self._request()  # validate host and port now, not after a round trip

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the server's reply (server early data)."""
        return self._trailing

    def initial_bytes(self) -> bytes:
        """The greeting (RFC 1928 §3), plus the request if pipelining."""
        methods = [Method.NO_AUTH]
        if self._auth is not None:
            methods.append(Method.USERNAME_PASSWORD)
        greeting = bytes((SOCKS_VERSION, len(methods), *methods))
        if self._pipeline:
            return greeting + self._request()
        return greeting

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _request(self) -> bytes:
        return bytes((SOCKS_VERSION, self._command, 0x00)) + encode_address(self._host, self._port)

    def receive_data(self, data: bytes | bytearray | memoryview) -> tuple[str, int] | None:
        """Feed received bytes; return the bound address (BND.ADDR, BND.PORT) on success.

        Raises ``Socks5Error`` on a failure reply (``.reply_code`` = the server's code) or a
        malformed answer.
        """
        if self._state is ClientState.DONE or self._state is ClientState.FAILED:
            raise LocalError(f"receive_data() called in state {self._state.name}")
        self._buffer += data
        try:
            return self._advance()
        except Socks5Error:
            self._state = ClientState.FAILED
            raise

    def _advance(self) -> tuple[str, int] | None:
        buf = self._buffer
        while True:
            if self._state is ClientState.METHOD:
                if len(buf) < _VER_BYTE.size:
                    return None
                version, method = _VER_BYTE.unpack_from(buf)
                del buf[: _VER_BYTE.size]
                if version != SOCKS_VERSION:
                    raise Socks5Error(f"server is not SOCKS5: version 0x{version:02x}")
                if method == Method.NO_AUTH:
                    if not self._pipeline:
                        self._outgoing += self._request()
                    self._state = ClientState.REPLY
                elif method == Method.USERNAME_PASSWORD and self._auth is not None:
                    self._outgoing += self._auth
                    self._state = ClientState.AUTH
                else:
                    raise Socks5AuthError(f"server selected unusable method 0x{method:02x}")
            elif self._state is ClientState.AUTH:
                if len(buf) < _VER_BYTE.size:
                    return None
                version, status = _VER_BYTE.unpack_from(buf)
                del buf[: _VER_BYTE.size]
                if status != 0x00:
                    raise Socks5AuthError(f"authentication rejected (status 0x{status:02x})")
                self._outgoing += self._request()
                self._state = ClientState.REPLY
            else:
                return self._receive_reply()

    def _receive_reply(self) -> tuple[str, int] | None:
        # RFC 1928 §6: VER REP RSV ATYP BND.ADDR BND.PORT
        buf = self._buffer
        if len(buf) < 2:
            return None
        version, code = buf[0], buf[1]
        if version != SOCKS_VERSION:
            raise Socks5Error(f"bad reply version 0x{version:02x}")
        if code != Reply.SUCCEEDED:
            name = Reply(code).name if code in _REPLIES else f"0x{code:02x}"
            raise Socks5Error(f"server replied {name}", reply_code=code)
        parsed = _parse_address(buf, 3)
        if parsed is None:
            return None
        host, port, end = parsed
        self._trailing = bytes(buf[end:])
        buf.clear()
        self._state = ClientState.DONE
        return host, port


_REPLIES = frozenset(int(r) for r in Reply)


# --- UDP (RFC 1928 §7) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One UDP ASSOCIATE datagram: RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA."""

    frag: int  # 0 = standalone; we don't reassemble, callers drop frag != 0 (RFC 1928 §7)
    host: str
    port: int
    payload: bytes


def parse_udp_datagram(data: bytes | bytearray | memoryview) -> UdpDatagram:
    """Parse one datagram (RFC 1928 §7).  Raises ``Socks5Error`` (``reply`` b"": datagrams
    that fail are dropped silently) when truncated, RSV is not 0x0000, or ATYP is bad."""
    if len(data) < _UDP_HEAD.size:
        raise Socks5Error("truncated UDP header")
    rsv, frag, _ = _UDP_HEAD.unpack_from(data)
    if rsv != 0:
        raise Socks5Error(f"UDP RSV must be 0x0000, got 0x{rsv:04x}")
    try:
        parsed = _parse_address(data, 3)
    except Socks5Error as exc:
        raise Socks5Error(str(exc), reply_code=exc.reply_code) from None
    if parsed is None:
        raise Socks5Error("truncated UDP header")
    host, port, end = parsed
    return UdpDatagram(frag, host, port, bytes(data[end:]))


def encode_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """RSV=0 FRAG=0 + address + payload (RFC 1928 §7)."""
    return _UDP_PREFIX + encode_address(host, port) + payload
