"""The sans-I/O modules stay pure (STYLE.md principle 1): no asyncio, socket, ssl or selectors.

Checked on the source with ``ast``, so an import hidden in a function, a ``try`` or an
``if TYPE_CHECKING`` block is caught too, and nothing has to be imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "selectors"})

PURE = [
    "autovpn/wire/frames.py",
    "autovpn/wire/websocket.py",
    "autovpn/wire/handshake.py",
    "autovpn/tunnel/policy.py",
    "autovpn/wire/socks5.py",
    "autovpn/wire/http_proxy.py",
    "autovpn/wire/auth.py",
    "autovpn/routing/rules.py",
    "autovpn/routing/router.py",
    "autovpn/routing/dns_cache.py",
    "autovpn/routing/scoring.py",
    "autovpn/wire/wstunnel.py",
    "autovpn/tunnel/wstunnel/restrictions.py",
]
PURE_IF_PRESENT = ["autovpn/routing/pac.py"]


def _package_of(relative: str) -> list[str]:
    return list(Path(relative).with_suffix("").parts[:-1])


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                if not node.module:
                    found.extend((node.lineno, f"{module}.{a.name}") for a in node.names)
                    continue
            else:
                module = node.module or ""
            found.append((node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


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
    assert forbidden_imports(path.read_text("utf-8"), _package_of(relative)) == []


@pytest.mark.parametrize("relative", PURE_IF_PRESENT)
def test_optional_pure_module_imports_no_io(relative: str) -> None:
    path = ROOT / relative
    if not path.is_file():
        pytest.skip(f"{relative} not present")
    assert forbidden_imports(path.read_text("utf-8"), _package_of(relative)) == []


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
