"""autovpn's exceptions.

Two families, as h11 splits them: ``LocalError`` is our caller's misuse (a bad config, a port
that is taken, an API called in the wrong state); ``RemoteProtocolError`` is a peer that broke a
protocol.  A remote error carries what to answer on the wire (a SOCKS5 reply code, an HTTP
status, a tunnel reset code), so the I/O layer never invents one and never leaks internals.
"""

from __future__ import annotations

import enum


class AutovpnError(Exception):
    """Base class of every exception autovpn raises on purpose."""


class LocalError(AutovpnError):
    """Our own side got something wrong: configuration, usage, environment."""


class ConfigError(LocalError):
    """A configuration value is invalid.  ``key`` names it as the user wrote it; ``line`` is
    where a config file says it, when known (``config.load_file``)."""

    def __init__(self, key: str, reason: str, line: int | None = None) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
        self.line = line


class BindError(LocalError):
    """A listener could not bind its address (taken port, missing permission).

    ``in_use``: the port is taken, which ``auto_port`` or another port would fix (the CLI
    adds the remedy its command has; the message itself names no flag)."""

    def __init__(
        self,
        message: str,
        *,
        what: str = "",
        host: str = "",
        port: int = 0,
        in_use: bool = False,
        holder: int | None = None,
    ) -> None:
        super().__init__(message)
        self.what = what  # "socks5 listener", "udp relay", "tunnel server"...
        self.host = host
        self.port = port
        self.in_use = in_use
        self.holder = holder  # the pid holding the port, when the system shows it


class EngineChoiceError(LocalError):
    """Several engines run on this state directory and the command did not say which (or none
    of the role it asked for runs).  ``engines``: one line per running engine."""

    def __init__(self, message: str, engines: list[str]) -> None:
        super().__init__(message)
        self.engines = engines


class Terminated(AutovpnError):
    """The process was asked to stop (SIGTERM) and closed everything as on Ctrl-C."""


class ResetReason(enum.IntEnum):
    """Why a tunnelled stream failed or was reset (docs/protocol.md, RESET frame).

    Each reason maps to one SOCKS5 reply code and one HTTP status, so a failure on the far
    side of the tunnel reaches the local application as the error it understands.
    """

    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2  # the server's destination policy refused the target
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4  # includes "name did not resolve"
    CONNECTION_REFUSED = 5
    TIMED_OUT = 6
    PROTOCOL_ERROR = 7
    CANCELLED = 8  # the local side went away
    TUNNEL_LOST = 9  # the tunnel connection carrying the stream died
    REFUSED_STREAM = 10  # too many streams, or the server is shutting down

    @property
    def socks5_reply(self) -> int:
        return _SOCKS5_REPLY.get(self, 0x01)

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self, 502)


_SOCKS5_REPLY = {
    ResetReason.GENERAL_FAILURE: 0x01,
    ResetReason.NOT_ALLOWED: 0x02,
    ResetReason.NETWORK_UNREACHABLE: 0x03,
    ResetReason.HOST_UNREACHABLE: 0x04,
    ResetReason.CONNECTION_REFUSED: 0x05,
    ResetReason.TIMED_OUT: 0x06,
}

_HTTP_STATUS = {
    ResetReason.NOT_ALLOWED: 403,
    ResetReason.TIMED_OUT: 504,
}


class RemoteProtocolError(AutovpnError):
    """A peer broke a protocol.  ``reply`` is what the protocol says to answer, if anything."""

    def __init__(self, message: str, *, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class LimitExceeded(RemoteProtocolError):
    """A peer-controlled length went past one of our named limits."""


class AuthenticationFailed(RemoteProtocolError):
    """A peer presented missing or wrong credentials."""


class StreamError(AutovpnError):
    """A tunnelled stream could not be opened or was reset.

    ``tunnel``: the tunnel failed (its connection was lost or stalled, the server did not
    answer), not the destination, so the same stream may succeed through another server.
    ``sent``: the stream's OPEN, with its early data, may have reached the server, which may
    have passed that data on to the destination: opening the stream again could deliver it
    twice.  False only where it provably never left us.
    ``draining``: the server refused the stream (REFUSED_STREAM) because its connection is
    closing (GOAWAY): a new connection will take it.  A REFUSED_STREAM without it is a limit.
    ``public``: one line the local client may read (the HTTP proxy's 502 body); empty for a
    bare reply.  It is only ever about our own tunnel, never about the far side.
    """

    def __init__(
        self,
        reason: ResetReason,
        message: str = "",
        *,
        tunnel: bool = False,
        public: str = "",
        sent: bool = True,
        draining: bool = False,
    ) -> None:
        super().__init__(message or reason.name.lower().replace("_", " "))
        self.reason = reason
        self.tunnel = tunnel
        self.public = public
        self.sent = sent
        self.draining = draining


class TunnelUnavailable(StreamError):
    """No tunnel server can take a stream now: every one is down, stalled or refused us.

    ``permanent``: retrying soon cannot help (the server refused the secret, its certificate
    is not trusted); ``public`` says why in one line, with what to do.
    """

    def __init__(self, message: str, *, public: str = "", permanent: bool = False) -> None:
        super().__init__(
            ResetReason.TUNNEL_LOST,
            message,
            tunnel=True,
            public=public or f"tunnel down: {message}",
            sent=False,  # raised before any stream was opened
        )
        self.permanent = permanent


class LookupTimedOut(StreamError, OSError):
    """The system resolver did not answer for a name in time (``net.SystemResolver``): its
    lookup, or the turn of its client address (``max_lookups_per_address``), took longer than
    the lookup timeout.  An OSError, as the resolver's own failures are: HOST_UNREACHABLE."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(ResetReason.HOST_UNREACHABLE, message)
        self.name = name


class InvalidHostName(StreamError, OSError):
    """A target name no resolver can look up: an empty label, a label over 63 characters,
    over 253 in all, or not encodable as IDNA (what getaddrinfo's own encoding raises
    UnicodeError for).  An OSError too, as the resolver's "name does not resolve" is, so every
    path that refuses an unresolvable name refuses this one the same way: HOST_UNREACHABLE."""

    def __init__(self, reason: str) -> None:
        super().__init__(ResetReason.HOST_UNREACHABLE, f"not a valid host name: {reason}")
