"""Reading a module's imports from its source with ``ast`` (nothing is imported to check it).

Shared by the purity test (sans-I/O modules import no I/O) and the import-graph test (layers,
no circles).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autovpn"


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name
    local: bool  # inside a function body
    type_only: bool  # inside ``if TYPE_CHECKING:``
    commented: bool  # a comment on its line or the line above (says why it is where it is)


def package_of(relative: str) -> list[str]:
    return list(Path(relative).with_suffix("").parts[:-1])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, package: list[str]) -> list[Import]:
    """Every import in ``source``, at any depth, with where it stands."""
    lines = source.splitlines()
    found: list[Import] = []

    def commented(lineno: int) -> bool:
        """A comment on the import's line, or above the block of imports it belongs to."""
        if "#" in lines[lineno - 1]:
            return True
        above = lineno - 2
        while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
            above -= 1
        return above >= 0 and lines[above].strip().startswith("#")

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                names = [f"{module}.{a.name}" for a in node.names] if not node.module else [module]
            else:
                names = [node.module or ""]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            lineno = getattr(node, "lineno", 0)
            found.append(Import(lineno, name, local, type_only, commented(lineno)))
        for child in ast.iter_child_nodes(node):
            child_local = local or isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            child_type_only = type_only or (
                isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body
            )
            visit(child, child_local, child_type_only)

    visit(ast.parse(source), False, False)
    return found


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found
