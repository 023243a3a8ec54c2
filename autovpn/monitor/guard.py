"""Who may talk to the control API: a pure decision on one request's headers.

The API listens on loopback, but loopback is not a boundary for a web browser: any page the
user opens can make the browser send requests to ``127.0.0.1``, either directly (CSRF: a form
POST needs no CORS preflight) or under the page's own name (DNS rebinding: ``evil.example``
first resolves to the attacker's server, then to ``127.0.0.1``, and the page's requests reach
us with ``Host: evil.example:9090``).  Three checks close both:

- **Host**: only literal loopback addresses (127.0.0.0/8, ``::1``), ``localhost``, the names
  the configuration lists (``control_hosts``) and a non-loopback bound address, each with the
  bound port.  A rebinding page cannot choose the Host its browser sends: it is the page's own
  name, which no longer looks like ours.  Browsers always send the port unless it is 80, so a
  Host without a port is ours only when we are bound to 80.
- **Origin / Sec-Fetch-Site**: a browser names the page behind a request; ``Origin: null``
  (sandboxed frames, ``file:`` pages, some redirects) and any origin but our own are refused,
  and so are state-changing requests that Fetch Metadata marks as not same-origin.
- **Token**: every state-changing request (any method but GET and HEAD) carries
  ``Authorization: Bearer TOKEN``; the engine writes TOKEN to a file (mode 0600) in its state
  directory at start (``monitor/engines.py``), where the CLI reads it.  A page cannot read that
  file, so even a request that slips past the first two checks cannot change anything.

The dashboard (``GET /``) cannot read that file, yet its mode switch must work.  The page
carries a second secret instead, the *page token*, which the API writes into the page it
serves.  Who can read the page?  Only a same-origin reader: a cross-origin page's request for
it is answered, but the browser does not let that page read the answer (no CORS headers
here), and a rebinding page never gets an answer at all (Host).  So the page token is accepted
for ``POST /mode`` only, and only with an ``Origin`` that is our own (a browser's same-origin
POST always sends it) and no ``Sec-Fetch-Site`` but ``same-origin``.  What it does not stop: a
local program that can reach the API can read ``GET /`` like a browser and switch the mode
(not resolve, nor anything the control token guards); the mode is what the dashboard shows to
whoever can reach it anyway.  The page is also served with ``frame-ancestors 'none'``, so no
other page can frame it and trick a click (``monitor/api.py``).

The checks see only a header mapping (lower-case names, or a case-insensitive mapping such
as aiohttp's), so any HTTP server can call ``check_request``.  No I/O here.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

from autovpn.net import normalize_host_name, parse_host

__all__ = [
    "ControlPolicy",
    "Refusal",
    "check_request",
    "is_pac_path",
]

#: Methods that only read.  Everything else changes the engine's state and needs the token.
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: Fetch Metadata values a browser sends for a request its user made (typed URL, bookmark:
#: ``none``) or that our own origin made; the only ones a state-changing request may carry.
_SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})
#: Fetch Metadata values that mark a request some other site made: refused on every
#: route but the PAC files (which browsers fetch on their own: ``none``, or no header).
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})
_PAC_NAMES = frozenset({"proxy", "global", "smart", "direct"})
#: What the dashboard's page token may do (see the module docstring): switch the mode.
PAGE_TOKEN_ROUTES = frozenset({("POST", "/mode")})
_DEFAULT_HTTP_PORT = 80


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the status, a one-line reason, and extra response headers."""

    status: HTTPStatus
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ControlPolicy:
    """What one running API accepts.

    ``port``: the port actually bound.  ``names``: extra accepted host names, normalized by
    ``normalize_host_name`` (the configured ``control_hosts`` and a non-loopback bound
    address).  ``token``: the secret of state-changing requests.  ``token_file``: where the CLI
    reads it, named in the 401 answer (never the token itself).
    """

    port: int
    token: str
    token_file: str | None = None
    names: frozenset[str] = frozenset()
    #: The dashboard's token (``GET /`` embeds it): ``POST /mode`` from our own origin only.
    page_token: str = ""

    @classmethod
    def build(
        cls,
        port: int,
        token: str,
        *,
        token_file: str | None = None,
        bound_host: str = "",
        hosts: Iterable[str] = (),
        page_token: str = "",
    ) -> ControlPolicy:
        names = {normalize_host_name(h) for h in hosts}
        bound = normalize_host_name(bound_host) if bound_host else ""
        # A wildcard bind is not a name any client should use; loopback is accepted anyway.
        if bound and bound not in ("0.0.0.0", "::") and not _is_loopback_name(bound):
            names.add(bound)
        return cls(port, token, token_file, frozenset(n for n in names if n), page_token)


def _is_loopback_name(name: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1``, spelled as addresses (not IPv4-mapped: no
    browser sends that for a loopback URL, and Python 3.13 changed what ``is_loopback`` says)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a name that merely starts with "127." is a DNS name, not an address
    if isinstance(address, ipaddress.IPv6Address):
        return address == ipaddress.IPv6Address("::1")
    return address.is_loopback


def is_pac_path(path: str) -> bool:
    """``/proxy.pac``, ``/global.pac``, ``/smart.pac``, ``/direct.pac``."""
    return path.endswith(".pac") and path[1:-4] in _PAC_NAMES and path.startswith("/")


def _check_host(policy: ControlPolicy, value: str | None) -> tuple[str, int] | Refusal:
    if not value:
        return Refusal(HTTPStatus.BAD_REQUEST, "no Host header: HTTP/1.1 requires one")
    parsed = parse_host(value)
    if parsed is None:
        return Refusal(HTTPStatus.BAD_REQUEST, f"Host {value!r} is not HOST[:PORT]")
    name, port = parsed
    if not _is_loopback_name(name) and name not in policy.names:
        return Refusal(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"Host {value!r}: the control API answers to loopback addresses, localhost and"
            " the names in control_hosts only (a web page's name pointed here is DNS rebinding)",
        )
    effective = _DEFAULT_HTTP_PORT if port is None else port
    if effective != policy.port:
        return Refusal(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"Host {value!r}: the control API listens on port {policy.port}",
        )
    return name, effective


def _check_origin(origin: str | None, host: tuple[str, int]) -> Refusal | None:
    if origin is None:
        return None
    if origin.strip() == "null":
        return Refusal(
            HTTPStatus.FORBIDDEN,
            "Origin: null (a sandboxed frame or a file: page): the control API is not for web"
            " pages",
        )
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        parts, port = None, None
    ok = (
        parts is not None
        and parts.scheme == "http"
        and parts.hostname is not None
        and not parts.path
        and not parts.query
        and not parts.fragment
        and parts.username is None
        and (normalize_host_name(parts.hostname), port or _DEFAULT_HTTP_PORT) == host
    )
    if not ok:
        return Refusal(
            HTTPStatus.FORBIDDEN,
            f"Origin {origin!r} is not this API's own origin: the control API is not for web pages",
        )
    return None


def _matches(given: str, secret: str) -> bool:
    return bool(secret) and hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), secret.encode()
    )


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def check_request(
    policy: ControlPolicy, method: str, path: str, headers: Mapping[str, str]
) -> Refusal | None:
    """None when the request may proceed, else why not.

    Order: Host (400/421), then Origin and Sec-Fetch-Site (403), then the token (401), so a
    web page learns nothing about the token from the answers it can provoke.
    """
    host = _check_host(policy, headers.get("host"))
    if isinstance(host, Refusal):
        return host
    refused = _check_origin(headers.get("origin"), host)
    if refused is not None:
        return refused
    site = headers.get("sec-fetch-site")
    changes_state = method not in SAFE_METHODS
    if site is not None and (
        (changes_state and site not in _SAME_ORIGIN_SITES)
        or (site in _FOREIGN_SITES and not is_pac_path(path))
    ):
        return Refusal(
            HTTPStatus.FORBIDDEN,
            f"Sec-Fetch-Site: {site}: the control API is not for web pages",
        )
    if not changes_state:
        return None
    given = _bearer(headers.get("authorization"))
    if given is not None and _matches(given, policy.token):
        return None
    if (
        given is not None
        and (method, path) in PAGE_TOKEN_ROUTES
        # A browser's POST from our own page: Origin is present (and was checked above to
        # be ours), and Fetch Metadata, where sent, says same-origin.
        and headers.get("origin") is not None
        and headers.get("sec-fetch-site", "same-origin") == "same-origin"
        and _matches(given, policy.page_token)
    ):
        return None
    where = (
        f"the contents of {policy.token_file} (autovpn mode and autovpn resolve read it there;"
        " run them as the engine's user, with its AUTOVPN_STATE_DIR)"
        if policy.token_file
        else "the engine's control token (it has no state directory, so no file holds it)"
    )
    return Refusal(
        HTTPStatus.UNAUTHORIZED,
        f"{'a wrong' if given is not None else 'no'} control token: {method} needs"
        f" 'Authorization: Bearer TOKEN', TOKEN being {where}",
        {"WWW-Authenticate": 'Bearer realm="autovpn control API"'},
    )
