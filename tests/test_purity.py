"""The sans-I/O modules stay pure (STYLE.md principle 1): no asyncio, socket, ssl or selectors.

Checked on the source with ``ast``, so an import hidden in a function, a ``try`` or an
``if TYPE_CHECKING`` block is caught too, and nothing has to be imported to check it.
"""

from __future__ import annotations

import pytest

from tests.imports import ROOT, imports_of, package_of

FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "selectors"})

PURE = [
    "autovpn/wire/frames.py",
    "autovpn/wire/websocket.py",
    "autovpn/wire/handshake.py",
    "autovpn/policy.py",
    "autovpn/wire/socks5.py",
    "autovpn/wire/http1.py",
    "autovpn/wire/http_proxy.py",
    "autovpn/wire/auth.py",
    "autovpn/routing/rules.py",
    "autovpn/routing/router.py",
    "autovpn/routing/dns_cache.py",
    "autovpn/routing/scoring.py",
    "autovpn/wire/wstunnel.py",
    "autovpn/tunnel/wstunnel/restrictions.py",
    "autovpn/tunnel/wstunnel/access.py",
    "autovpn/tunnel/auth_limit.py",
    "autovpn/monitor/guard.py",
]
PURE_IF_PRESENT = ["autovpn/routing/pac.py"]


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth."""
    return [(imp.line, imp.module) for imp in imports_of(source, package)]


def forbidden_imports(source: str, package: list[str]) -> list[str]:
    return [
        f"line {line}: {name}"
        for line, name in imported_modules(source, package)
        if name.split(".", 1)[0] in FORBIDDEN
    ]


@pytest.mark.parametrize("relative", PURE)
def test_pure_module_imports_no_io(relative: str) -> None:
    path = ROOT / relative
    assert path.is_file(), f"{relative} is listed as pure but does not exist"
    assert forbidden_imports(path.read_text("utf-8"), package_of(relative)) == []


@pytest.mark.parametrize("relative", PURE_IF_PRESENT)
def test_optional_pure_module_imports_no_io(relative: str) -> None:
    path = ROOT / relative
    if not path.is_file():
        pytest.skip(f"{relative} not present")
    assert forbidden_imports(path.read_text("utf-8"), package_of(relative)) == []


# -- the checker itself -------------------------------------------------------------------------

PKG = ["autovpn", "tunnel"]


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import socket as s",
        "import os, ssl",
        "import asyncio.streams",
        "from asyncio import Protocol",
        "from selectors import DefaultSelector",
        "from ssl import SSLContext as C",
        "def f():\n    import socket\n",
        "try:\n    import ssl\nexcept ImportError:\n    pass\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n",
        "__import__('socket')",
        "import importlib\nimportlib.import_module('asyncio.events')",
    ],
)
def test_checker_catches_io_imports(source: str) -> None:
    assert forbidden_imports(source, PKG)


@pytest.mark.parametrize(
    "source",
    [
        "import struct, ipaddress",
        "from autovpn.errors import RemoteProtocolError",
        "from . import socket",  # autovpn.tunnel.socket, not the stdlib
        "from .ssl_helpers import x",
        "from ..asyncio_glue import y",
        "import socketserver_like_name_is_fine_only_if_prefix_differs as x",
        "x = 'import asyncio'",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert forbidden_imports(source, PKG) == []


def test_checker_resolves_relative_imports() -> None:
    names = [name for _, name in imported_modules("from .lists import a\nfrom .. import b", PKG)]
    assert names == ["autovpn.tunnel.lists", "autovpn.b"]
