"""The package's layers, read from its imports (docs/architecture.md draws them).

Every import that runs counts, function-local ones too: a circle held together by an import
inside a function is still a circle.  Imports under ``if TYPE_CHECKING:`` never run and do not
count.  A function-local import must say why it is there (a comment on its line or above):
lazy loading of a heavy dependency on purpose, nothing else.
"""

from __future__ import annotations

import pytest

from tests.imports import Import, imports_of, modules, package_of

MODULES = modules()

#: The layers, bottom up.  A part may import the parts of the layers below its own, never those
#: of its own layer or above (docs/architecture.md draws them).
LAYERS: list[set[str]] = [
    {"autovpn.errors"},
    {
        "autovpn.wire",
        "autovpn.net",
        "autovpn.ifaddrs",
        "autovpn.ports",
        "autovpn.udp_io",
        "autovpn.eventloop",
        "autovpn.toml_tables",
        "autovpn.wg",
        "autovpn.pem",
        "autovpn.sysproxy",
        "autovpn.stats",  # counters the relays write and the control API reads
        "autovpn.logs",  # log destinations, formats and redaction (the CLI configures them)
        "autovpn.limits",
        "autovpn.idle",  # the idle timeout's sweep, for the relays of every layer above
        "autovpn.reuseport",  # the workers' listening sockets and the program that steers them
    },
    {"autovpn.routing", "autovpn.policy"},
    {"autovpn.config"},
    {"autovpn.tunnel"},
    {"autovpn.proxy"},
    {"autovpn.monitor"},
    {"autovpn.engine", "autovpn.cli_settings"},  # cli_settings: flags over config, for cli
    {"autovpn.workers"},  # the supervisor of `autovpn server --workers N`
    {"autovpn.cli"},
    {"autovpn", "autovpn.__main__"},  # the embedding API (lazy re-exports) and `python -m`
]
ALLOWED: dict[str, set[str]] = {
    part: set().union(*LAYERS[:level]) for level, parts in enumerate(LAYERS) for part in parts
}


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _runtime_imports() -> dict[str, list[Import]]:
    graph: dict[str, list[Import]] = {}
    for name, path in MODULES.items():
        package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
        graph[name] = [
            imp
            for imp in imports_of(path.read_text("utf-8"), package)
            if not imp.type_only and imp.module.split(".")[0] == "autovpn"
        ]
    return graph


GRAPH = _runtime_imports()


def _resolve(module: str) -> str | None:
    """The package module an import names (``from autovpn.x import y`` may name a module y)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def find_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return circles


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, imports in GRAPH.items():
        for imp in imports:
            target = _resolve(imp.module)
            # A package's __init__ is run by importing any of its modules, but it is the
            # module's own parent: not an edge of the graph.
            if target is not None and target != name and not name.startswith(target + "."):
                edges.setdefault(name, set()).add(target)
    return edges


def test_no_import_circles() -> None:
    assert find_circles(_edges()) == []


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_layers(name: str) -> None:
    part = _part(name)
    allowed = ALLOWED.get(part)
    assert allowed is not None, f"{name}: add its part {part} to ALLOWED"
    wrong = [
        f"line {imp.line}: {imp.module}"
        for imp in GRAPH[name]
        if _part(imp.module) != part
        and _part(imp.module) not in allowed
        and not name.startswith(imp.module + ".")  # its own package (``from autovpn import``)
    ]
    assert wrong == [], f"{name} ({part}) may import only {sorted(allowed)}"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_function_local_imports_say_why(name: str) -> None:
    path = MODULES[name]
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    silent = [
        f"line {imp.line}: {imp.module}"
        for imp in imports_of(path.read_text("utf-8"), package)
        if imp.local and not imp.type_only and not imp.commented
    ]
    assert silent == [], "a function-local import needs a comment saying why it is lazy"


# -- the checker itself -------------------------------------------------------------------------


def test_finds_a_circle_and_its_members() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_circles(edges) == [["a", "b", "c"]]


def test_a_chain_is_no_circle() -> None:
    assert find_circles({"a": {"b"}, "b": {"c"}}) == []


def test_type_checking_and_local_imports_are_told_apart() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from autovpn.engine import Engine\n"
        "def f():\n    # lazy: heavy\n    from autovpn import engine\n"
        "def g():\n    import autovpn.cli\n"
    )
    found = {imp.module: imp for imp in imports_of(source, package_of("autovpn/x.py"))}
    assert found["autovpn.engine"].type_only and not found["autovpn.engine"].local
    assert found["autovpn"].local and found["autovpn"].commented
    assert found["autovpn.cli"].local and not found["autovpn.cli"].commented
