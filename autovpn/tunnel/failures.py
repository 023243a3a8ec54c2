"""Why a connection to the tunnel server failed, in words that say what to do.

The raw errors name neither the server nor the remedy: ``[SSL: CERTIFICATE_VERIFY_FAILED]
certificate verify failed: self-signed certificate in certificate chain (_ssl.c:1006)``, or
``[Errno 111] Connection refused``.  Both tunnel clients (ours and wstunnel's) describe their
failures here, and keep the time the failures began (``Failing``), so that the log, ``autovpn
status`` and the error a local application gets say which server and since when.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from autovpn.config import ServerURL

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that mean: the issuer is not trusted here.
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID = 10, 9
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64


def describe(exc: BaseException, server: ServerURL) -> str:
    """One line: what went wrong reaching ``server``, and what to do about it."""
    where = f"{server.host}:{server.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_reason(exc)
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused by {where}: no server listens there (is it running, is the"
            " port right, does a firewall refuse it?)"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {server.host}: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} in time (a firewall dropping packets, or a wrong address)"
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS with {where} failed: {exc.reason or exc} (does it serve wss://? a plain"
            " ws:// server or another service answers otherwise)"
        )
    return str(exc) or type(exc).__name__


def certificate_reason(exc: ssl.SSLCertVerificationError) -> str:
    """Why the server's certificate was refused, and what to do (OpenSSL's words in brackets:
    they name the host for a name mismatch)."""
    message = exc.verify_message or str(exc)
    code = exc.verify_code
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return (
            f"server certificate not for the name dialled ({message}): connect by a"
            " name the certificate lists (autovpn cert DIR --name NAME makes one), or send one"
            " with --tls-sni-override NAME"
        )
    if code == _EXPIRED:
        return f"server certificate expired ({message}): renew it on the server"
    if code == _NOT_YET_VALID:
        return f"server certificate not valid yet ({message}): check both clocks"
    hint = (
        "if the server uses a private CA (autovpn cert wrote its ca.pem), trust it with"
        " --tls-ca FILE (tls_ca in [client])"
    )
    if code in _UNTRUSTED:
        return f"server certificate not trusted ({message}): {hint}"
    return f"server certificate refused ({message}): {hint}"


@dataclass(slots=True)
class Failing:
    """A run of failed connection attempts: when it began, how many so far."""

    since: float = 0.0  # time.time() of the first failure of the run
    attempts: int = 0

    def failed(self, exc: BaseException, server: ServerURL) -> str:
        """Count one more failure; the line to show for it (its reason and since when)."""
        if self.attempts == 0:
            self.since = time.time()
        self.attempts += 1
        began = time.strftime("%H:%M:%S", time.localtime(self.since))
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{describe(exc, server)} [failing since {began}{tries}]"

    def ended(self) -> None:
        self.attempts = 0
