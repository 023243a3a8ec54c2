"""Credentials for the local proxies: one user table, two wire formats.

This module is pure (no I/O).  SOCKS5 (RFC 1929 username/password) and the HTTP proxy
(RFC 9110 §11.7.1 ``Proxy-Authorization`` with the Basic scheme of RFC 7617) both end in
``Credentials.check(user, password)``.

Timing: ``check`` always performs the same work, whether or not the user exists: an unknown
user is compared against a per-table random dummy secret, and the username and password
comparisons both run (``hmac.compare_digest``) and are combined without short-circuiting.
The dict lookup by username is not constant-time, but its cost depends on a salted hash, not
on how many leading characters of a secret were right, so it leaks nothing useful.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Iterable, Iterator, Mapping

__all__ = ["MAX_BASIC_TOKEN", "Credentials", "parse_basic_proxy_authorization"]

# A Basic token longer than this is refused (None) before decoding: the HTTP head limits
# already bound it, this keeps the function safe on its own.
MAX_BASIC_TOKEN = 4096


class Credentials(Mapping[str, str]):
    """An immutable table username → password.

    Usernames and passwords are compared as UTF-8 bytes.  Note the formats' own limits: RFC
    1929 carries at most 255 bytes of each, and RFC 7617 Basic cannot carry a username that
    contains ``:``; such entries simply never match on that protocol.
    """

    __slots__ = ("_table", "_dummy")

    def __init__(self, users: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        items = users.items() if isinstance(users, Mapping) else users
        self._table: dict[str, tuple[bytes, bytes, str]] = {
            user: (user.encode("utf-8"), password.encode("utf-8"), password)
            for user, password in items
        }
        # Compared against when the user is unknown, so that path costs the same as a wrong
        # password.  Random per table: no password can ever match it.
        self._dummy = os.urandom(32)

    def __getitem__(self, user: str) -> str:
        return self._table[user][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        # Never print passwords (they end up in logs).
        return f"Credentials(users={sorted(self._table)!r})"

    def check(self, user: str, password: str) -> bool:
        """Whether ``user`` exists and ``password`` is its password (timing-safe, see module)."""
        given_user = user.encode("utf-8", "surrogateescape")
        given_password = password.encode("utf-8", "surrogateescape")
        entry = self._table.get(user)
        if entry is None:
            found = False
            expected_user, expected_password = given_user, self._dummy
        else:
            found = True
            expected_user, expected_password = entry[0], entry[1]
        user_ok = hmac.compare_digest(expected_user, given_user)
        password_ok = hmac.compare_digest(expected_password, given_password)
        # Bitwise &: both comparisons have already run; no short-circuit on purpose.
        return found & user_ok & password_ok


def parse_basic_proxy_authorization(
    headers: Iterable[tuple[str, str]],
) -> tuple[str, str] | None:
    """``(user, password)`` from the first ``Proxy-Authorization: Basic ...`` header, or None.

    Tolerant where clients differ (scheme case, extra spaces, missing base64 padding,
    Latin-1 instead of UTF-8 as old browsers send), strict where it matters: anything that is
    not valid base64 of ``user:password`` gives None, never an exception (RFC 7617 §2).
    """
    for name, value in headers:
        if name.lower() != "proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            continue
        return _decode_basic_token(token.strip())
    return None


def _decode_basic_token(token: str) -> tuple[str, str] | None:
    if not token or len(token) > MAX_BASIC_TOKEN or not token.isascii():
        return None
    token += "=" * (-len(token) % 4)
    try:
        raw = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, colon, password = text.partition(":")
    if not colon:
        return None
    return user, password
