"""Small helpers shared by the parts that dial sockets (the tunnel server, direct routes)."""

from __future__ import annotations

import errno
import socket

from autovpn.errors import ResetReason


def reset_reason_for(exc: BaseException) -> ResetReason:
    """The reset reason (and so SOCKS5 reply / HTTP status) for a failed connect."""
    if isinstance(exc, TimeoutError):
        return ResetReason.TIMED_OUT
    if isinstance(exc, ConnectionRefusedError):
        return ResetReason.CONNECTION_REFUSED
    if isinstance(exc, socket.gaierror):
        return ResetReason.HOST_UNREACHABLE
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
            return ResetReason.NETWORK_UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return ResetReason.HOST_UNREACHABLE
        if exc.errno == errno.ECONNREFUSED:
            return ResetReason.CONNECTION_REFUSED
        if exc.errno == errno.ETIMEDOUT:
            return ResetReason.TIMED_OUT
    return ResetReason.GENERAL_FAILURE
