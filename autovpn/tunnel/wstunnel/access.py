"""Who a stock wstunnel client is, from what it can send (pure).

wstunnel's JWT authenticates nothing (docs/wstunnel-protocol.md section 2.2), so a stock
client can prove who it is only with what its command line controls:

1. **mTLS.** With ``--tls-client-ca-certs`` every TLS client presents a certificate the CA
   signed, and (wstunnel's own rule, checked by ``wire.wstunnel.check_request``) the path
   prefix must be its CN.  The CN names the client.
2. **A secret path prefix.** ``wstunnel client -P SECRET`` sends ``GET /SECRET/events``; when
   SECRET is the secret of one of the server's users, the request is that user's.  Every
   user's secret is compared, in constant time (SHA-256 digests, so lengths do not show).
3. **The operator's own rules.** ``-r PREFIX`` or ``--restrict-config FILE`` say who may
   connect, as in wstunnel: a request one of their rules matches is let in by that rule.
4. **Nobody**, only with ``allow_anonymous``: forward tunnels for anyone (under the
   destination policy), never reverse ones.

Anything else is refused before anything is dialled.  ``--restrict-to`` alone narrows the
destinations and says nothing about who connects, so it does not let anyone in by itself.

The secret travels in the request line, so nothing here, and no caller, may log the prefix.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

#: Characters a stock wstunnel client can put in ``-P`` unchanged (an URL path segment).
_PATH_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)


class How(enum.Enum):
    CERTIFICATE = "certificate"
    SECRET = "secret"
    RESTRICTION = "restriction"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a wstunnel request is: a user (by secret), a certificate CN, or nobody in particular
    (``RESTRICTION``: the matching rule names it later; ``ANONYMOUS``)."""

    how: How
    name: str = ""

    @property
    def authenticated(self) -> bool:
        """A user or a certificate: may open reverse tunnels (under the restrictions)."""
        return self.how in (How.CERTIFICATE, How.SECRET)

    @property
    def label(self) -> str:
        """Who it counts for in the statistics (a label value, never a secret): a user's
        name (as the native protocol's streams count), ``CN=`` a certificate's, ``rule:`` a
        restriction's, or ``anonymous``."""
        if self.how is How.SECRET:
            return self.name
        if self.how is How.CERTIFICATE:
            return f"CN={self.name}"
        if self.how is How.RESTRICTION:
            return f"rule:{self.name}"
        return "anonymous"

    def __str__(self) -> str:
        if self.how is How.SECRET:
            return f"user {self.name}"
        if self.how is How.CERTIFICATE:
            return f"certificate CN={self.name}"
        return f"rule {self.name!r}" if self.name else str(self.how.value)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _prefix_bytes(prefix: str) -> bytes:
    # Heads are decoded as latin-1, so this gives back the bytes the client sent.
    try:
        return prefix.encode("latin-1")
    except UnicodeEncodeError:
        return prefix.encode("utf-8", "surrogatepass")


def path_safe(secret: bytes) -> bool:
    """Whether a stock client can send ``secret`` as its ``-P`` path prefix."""
    return bool(secret) and all(b in _PATH_SAFE for b in secret)


class SecretPrefixes:
    """The users' secrets as path prefixes.  Never printed: ``repr`` names the users only."""

    __slots__ = ("_digests",)

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._digests = tuple((name, _digest(secret)) for name, secret in users.items())

    def __repr__(self) -> str:
        return f"SecretPrefixes(users={[name for name, _ in self._digests]!r})"

    def match(self, prefix: str) -> str | None:
        """The user whose secret ``prefix`` is, or None.  Compares with every user's secret
        whatever matches, so the time taken says nothing about which (or whether one) did."""
        given = _digest(_prefix_bytes(prefix))
        found: str | None = None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found


def identify(
    prefix: str,
    client_cn: str | None,
    secrets: SecretPrefixes,
    *,
    restricted: bool,
    allow_anonymous: bool,
) -> Identity | None:
    """Who sent a request with path ``prefix`` (``check_request`` has already made sure a
    certificate's CN equals it), or None: refuse it.

    ``restricted``: the operator gave ``-r`` or ``--restrict-config``; the caller then lets in
    only what one of those rules matches.
    """
    if client_cn is not None:
        return Identity(How.CERTIFICATE, client_cn)
    user = secrets.match(prefix)
    if user is not None:
        return Identity(How.SECRET, user)
    if restricted:
        return Identity(How.RESTRICTION)
    if allow_anonymous:
        return Identity(How.ANONYMOUS)
    return None
