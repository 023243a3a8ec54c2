"""TOML tables described by dataclasses, and the one checker that walks a table against them.

Each field of a table's dataclass says, in its metadata, the TOML key it is read from, the parser
that checks and converts the value, and a line of documentation::

    @dataclass
    class ClientConfig:
        pool_size: int = field(default=1, metadata=toml(integer(1, 64), "connections kept open"))

``table(ClientConfig)`` is then the parser of the whole table.  It reports every problem with its
full key (``client.listen[1]``, ``routing.lists[0].path``): an unknown key, a value of the wrong
TOML type (one error for the key, whatever the value holds), a value the parser refuses, a
required key missing.  Rules that span keys (a secret read from a file, ``wss://`` needs a
certificate) are the table's ``finish`` function, run on what the fields gave.  ``reference``
lists every key with its type and doc, for documentation and tests.

A field read from no key (set by command-line flags or code) says so with ``not_in_file(doc)``,
so every field of a table is accounted for.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from autovpn.errors import ConfigError

T = TypeVar("T")
U = TypeVar("U")
K = TypeVar("K", str, int)

_META = "autovpn.toml"


@dataclass(frozen=True, slots=True)
class Where:
    """Where a value sits: its full key as the user writes it, and the config file's directory
    (relative paths are relative to it)."""

    key: str
    base: Path

    def at(self, part: str | int) -> Where:
        if isinstance(part, int):
            return Where(f"{self.key}[{part}]", self.base)
        return Where(f"{self.key}.{part}" if self.key else part, self.base)

    def error(self, reason: str) -> ConfigError:
        return ConfigError(self.key, reason)


class Invalid(Exception):
    """Several errors from one value: the items of an array, the keys of a table."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type (bool first: True is an int in Python)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.date | datetime.time):
        return "date-time"
    return type(value).__name__


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class Parser(Generic[T]):
    """Checks one TOML value and converts it, or raises ConfigError (Invalid for several)."""

    #: What it takes, for errors and docs: "an integer from 1 to 64".
    expects: str
    #: The TOML types it takes; any other is one "expected ..., got ..." error.
    types: frozenset[str]
    #: Called with a value of one of ``types``; a ValueError it raises becomes the key's error.
    convert: Callable[[Any, Where], T]
    #: The dataclass tables inside (for ``reference``), and how their keys continue below this
    #: one: "" (a table), "[]" (an array of tables), ".NAME" (a table of tables).
    tables: tuple[type, ...] = ()
    nest: str = ""

    def __call__(self, value: object, where: Where) -> T:
        kind = toml_type(value)
        if kind not in self.types:
            raise where.error(f"expected {self.expects}, got {kind} {_shown(value)}")
        try:
            return self.convert(value, where)
        except ValueError as exc:  # int(), ipaddress, urlsplit: their message names the problem
            raise where.error(str(exc)) from None


def _same(value: Any, where: Where) -> Any:
    return value


def _or(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def boolean() -> Parser[bool]:
    return Parser("true or false", frozenset({"boolean"}), _same)


def text() -> Parser[str]:
    return Parser("a string", frozenset({"string"}), _same)


def integer(lo: int, hi: int | None = None) -> Parser[int]:
    """An integer from ``lo`` to ``hi`` (None: no upper bound)."""
    expects = f"an integer from {lo} to {hi}" if hi is not None else f"an integer, {lo} or more"
    refusal = f"must be between {lo} and {hi}" if hi is not None else f"must be {lo} or more"

    def convert(value: int, where: Where) -> int:
        if value < lo or (hi is not None and value > hi):
            raise where.error(refusal)
        return value

    return Parser(expects, frozenset({"integer"}), convert)


def number(*, above: float, at_most: float) -> Parser[float]:
    """An integer or a float in ``(above, at_most]`` (NaN and infinities are refused)."""
    bounds = f"more than {above:g} and at most {at_most:g}"

    def convert(value: float, where: Where) -> float:
        if not above < value <= at_most:
            raise where.error(f"must be {bounds}")
        return float(value)

    return Parser(f"a number {bounds}", frozenset({"integer", "float"}), convert)


def choice(*options: str) -> Parser[str]:
    shown = _or([f'"{o}"' for o in options])

    def convert(value: str, where: Where) -> str:
        if value not in options:
            raise where.error(f"must be {shown}, not {_shown(value)}")
        return value

    return Parser(shown, frozenset({"string"}), convert)


def file_path(*, must_exist: bool = False) -> Parser[Path]:
    """A path, ``~`` expanded, relative to the config file's directory."""

    def convert(value: str, where: Where) -> Path:
        if "\0" in value:
            raise where.error("a path cannot contain a NUL character")
        try:
            path = Path(value).expanduser()
        except RuntimeError as exc:  # ~ with no home directory to expand it to
            raise where.error(f"{value!r}: {exc}") from None
        path = path if path.is_absolute() else where.base / path
        if must_exist:
            try:
                exists = path.is_file()
            except OSError as exc:  # a name too long, say: is_file() raises only some errors
                raise where.error(f"{path}: {exc.strerror or exc}") from None
            if not exists:
                raise where.error(f"{path}: no such file")
        return path

    expects = "the path of an existing file" if must_exist else "a file path"
    return Parser(expects, frozenset({"string"}), convert)


def checked(check: Callable[[str], object], expects: str) -> Parser[str]:
    """A string that ``check`` accepts (it raises ConfigError or ValueError), kept as written.
    A ConfigError from ``check`` keeps its reason but takes this value's key."""

    def convert(value: str, where: Where) -> str:
        try:
            check(value)
        except ConfigError as exc:
            raise where.error(exc.reason) from None
        return value

    return Parser(expects, frozenset({"string"}), convert)


def mapped(parser: Parser[T], fn: Callable[[T, Where], U]) -> Parser[U]:
    """``parser``, then ``fn`` on its result."""
    return Parser(
        parser.expects,
        parser.types,
        lambda value, where: fn(parser.convert(value, where), where),
        parser.tables,
        parser.nest,
    )


def false_or(parser: Parser[T]) -> Parser[T | None]:
    """``parser``'s value, or ``false`` for None (off)."""
    expects = f"{parser.expects} or false"

    def convert(value: Any, where: Where) -> T | None:
        if value is False:
            return None
        if value is True:
            raise where.error(f"expected {expects}, got true")
        return parser(value, where)

    return Parser(expects, parser.types | {"boolean"}, convert, parser.tables, parser.nest)


def _each(item: Parser[T], entries: Iterable[tuple[K, Any]], where: Where) -> list[tuple[K, T]]:
    """``item`` on every entry; Invalid with every bad one's error, each under its own key."""
    out: list[tuple[K, T]] = []
    errors: list[ConfigError] = []
    for part, entry in entries:
        try:
            out.append((part, item(entry, where.at(part))))
        except ConfigError as exc:
            errors.append(exc)
        except Invalid as exc:
            errors.extend(exc.errors)
    if errors:
        raise Invalid(errors)
    return out


def list_of(item: Parser[T]) -> Parser[list[T]]:
    """An array; every bad item is reported, each with its index."""

    def convert(value: list[Any], where: Where) -> list[T]:
        return [parsed for _, parsed in _each(item, enumerate(value), where)]

    expects = f"an array, each {item.expects}"
    return Parser(expects, frozenset({"array"}), convert, item.tables, "[]" + item.nest)


def table_of(item: Parser[T]) -> Parser[dict[str, T]]:
    """A table of NAME = value, any names; every bad value is reported, each with its name."""

    def convert(value: dict[str, Any], where: Where) -> dict[str, T]:
        return dict(_each(item, value.items(), where))

    expects = f"a table, each NAME = {item.expects}"
    return Parser(expects, frozenset({"table"}), convert, item.tables, ".NAME" + item.nest)


# -- the fields' metadata -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """What a field's metadata says about it."""

    parser: Parser[Any] | None  # None: not read from the file (flags or code set it)
    doc: str
    key: str = ""  # the TOML key, dotted for a sub-table ("dns.local"); "" is the field's name
    required: bool = False


def toml(parser: Parser[Any], doc: str, *, key: str = "", required: bool = False) -> dict[str, Any]:
    """A field's metadata: read from ``key`` (default: the field's name) with ``parser``."""
    return {_META: Setting(parser, doc, key, required)}


def not_in_file(doc: str) -> dict[str, Any]:
    """A field's metadata: no key sets it (command-line flags or code do)."""
    return {_META: Setting(None, doc)}


def setting_of(f: dataclasses.Field[Any]) -> Setting:
    meta = f.metadata.get(_META)
    if not isinstance(meta, Setting):
        raise TypeError(f"field {f.name!r} has neither toml(...) nor not_in_file(...) metadata")
    return meta


def key_of(f: dataclasses.Field[Any]) -> str | None:
    """The field's TOML key, None if it is not read from the file."""
    s = setting_of(f)
    return None if s.parser is None else s.key or f.name


_Tree = dict[str, "dataclasses.Field[Any] | _Tree"]


_TREES: dict[type[Any], _Tree] = {}


def _tree(cls: type[Any]) -> _Tree:
    """The table's keys as a tree: dotted keys ("dns.local") make sub-tables."""
    if cls in _TREES:
        return _TREES[cls]
    tree: _Tree = {}
    for f in dataclasses.fields(cls):
        key = key_of(f)
        if key is None:
            continue
        *tables, last = key.split(".")
        node = tree
        for part in tables:
            sub = node.setdefault(part, {})
            assert isinstance(sub, dict), f"{cls.__name__}: {key} is under a key, not a table"
            node = sub
        node[last] = f
    _TREES[cls] = tree
    return tree


# -- the checker ----------------------------------------------------------------------------


@dataclass(slots=True)
class Found(Generic[T]):
    """What walking a table found: the valid values by field name, and the errors."""

    cls: type[T]
    where: Where
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    given: set[str] = dataclasses.field(default_factory=set)  # fields whose key is present
    errors: list[ConfigError] = dataclasses.field(default_factory=list)

    def key(self, name: str) -> str:
        """The full key of field ``name``."""
        f = {f.name: f for f in dataclasses.fields(self.cls)}[name]  # type: ignore[arg-type]
        return self.where.at(key_of(f) or name).key

    def current(self, name: str) -> Any:
        """Field ``name``'s value so far: what its key gave, else the field's default."""
        if name in self.values:
            return self.values[name]
        f = {f.name: f for f in dataclasses.fields(self.cls)}[name]  # type: ignore[arg-type]
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        if f.default is not dataclasses.MISSING:
            return f.default
        raise KeyError(f"{self.cls.__name__}.{name} has no value and no default")

    def failed(self, name: str) -> bool:
        """The key is present but its value was refused (its error is already reported)."""
        return name in self.given and name not in self.values

    def error(self, name: str, reason: str) -> None:
        self.errors.append(ConfigError(self.key(name), reason))

    def attempt(self, name: str, fn: Callable[[], Any]) -> None:
        """Set field ``name`` to ``fn()``, or report the ConfigError it raises."""
        try:
            self.values[name] = fn()
        except ConfigError as exc:
            self.errors.append(exc)

    def build(self) -> T:
        """The table's object, or Invalid with every error (required keys missing included)."""
        for f in dataclasses.fields(self.cls):  # type: ignore[arg-type]
            s = setting_of(f)
            if s.required and s.parser is not None and f.name not in self.given:
                self.error(f.name, f"required: {s.parser.expects}")
        if self.errors:
            raise Invalid(self.errors)
        return self.cls(**self.values)


def walk(cls: type[T], data: dict[str, Any], where: Where) -> Found[T]:
    """Check every key of ``data`` against the fields of ``cls``."""
    found = Found(cls, where)
    _visit(_tree(cls), data, where, found)
    return found


def _visit(tree: _Tree, data: dict[str, Any], where: Where, found: Found[Any]) -> None:
    for key, value in data.items():
        at = where.at(key)
        node = tree.get(key)
        if node is None:
            near = difflib.get_close_matches(key, list(tree), n=1, cutoff=0.8)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            found.errors.append(at.error(f"unknown key{hint}"))
        elif isinstance(node, dict):
            if isinstance(value, dict):
                _visit(node, value, at, found)
            else:
                found.errors.append(
                    at.error(f"expected a table, got {toml_type(value)} {_shown(value)}")
                )
        else:
            found.given.add(node.name)
            parser = setting_of(node).parser
            assert parser is not None  # only keyed fields are in the tree
            try:
                found.values[node.name] = parser(value, at)
            except ConfigError as exc:
                found.errors.append(exc)
            except Invalid as exc:
                found.errors.extend(exc.errors)


def table(
    cls: type[T],
    *,
    finish: Callable[[Found[T]], None] | None = None,
    expects: str = "a table",
) -> Parser[T]:
    """The parser of a whole table: its fields' keys, then ``finish`` for rules across keys
    (it may set fields no key sets, and report errors), then the object."""

    def convert(value: dict[str, Any], where: Where) -> T:
        found = walk(cls, value, where)
        if finish is not None:
            finish(found)
        return found.build()

    return Parser(expects, frozenset({"table"}), convert, (cls,))


# -- documentation --------------------------------------------------------------------------


def reference(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, Setting]]:
    """Every key of table ``cls`` and of the tables inside it, with its full key:
    ``routing.lists[].action``, ``server.users.NAME.secret_file``."""
    for f in dataclasses.fields(cls):
        s = setting_of(f)
        if s.parser is None:
            continue
        key = f"{prefix}.{s.key or f.name}" if prefix else s.key or f.name
        yield key, s
        for inner in s.parser.tables:
            yield from reference(inner, key + s.parser.nest)


def tables(cls: type[Any]) -> list[type[Any]]:
    """``cls`` and every table inside it."""
    found = [cls]
    for f in dataclasses.fields(cls):
        parser = setting_of(f).parser
        for inner in parser.tables if parser is not None else ():
            found += [t for t in tables(inner) if t not in found]
    return found


# -- where a key is written -----------------------------------------------------------------

#: One part of a key path: its name, and for an item of an array its index (``lists[1]``;
#: for the n-th ``[[a.b]]`` header, n - 1).
_Part = tuple[str, int | None]


class _Unsure(Exception):
    """The text is not what this small reader understands; the caller names the file only."""


def _key_parts(text: str) -> list[str]:
    """``a."b.c" . d`` -> ["a", "b.c", "d"]: a TOML dotted key, bare or quoted parts."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in "\"'":
            quote = text[i]
            end = text.find(quote, i + 1)
            while quote == '"' and end > 0 and text[end - 1] == "\\":
                end = text.find(quote, end + 1)
            if end < 0:
                raise _Unsure
            parts.append(text[i + 1 : end])
            i = end + 1
        else:
            start = i
            while i < n and text[i] not in ". \t":
                i += 1
            if i == start:
                raise _Unsure
            parts.append(text[start:i])
        while i < n and text[i] in " \t":
            i += 1
        if i == n:
            return parts
        if text[i] != ".":
            raise _Unsure
        i += 1


class _Scanner:
    """Bracket depth and string state across lines, for values that span several."""

    def __init__(self) -> None:
        self.depth = 0
        self.multiline: str | None = None  # the closing delimiter of an open """ or '''

    def scan(self, line: str, start: int = 0) -> None:
        i, n = start, len(line)
        while i < n:
            if self.multiline is not None:
                end = line.find(self.multiline, i)
                while self.multiline == '"""' and end > 0 and line[end - 1] == "\\":
                    end = line.find(self.multiline, end + 1)
                if end < 0:
                    return
                i = end + 3
                self.multiline = None
                continue
            c = line[i]
            if c == "#":
                return
            if line.startswith(('"""', "'''"), i):
                self.multiline = line[i : i + 3]
                i += 3
            elif c in "\"'":
                end = line.find(c, i + 1)
                while c == '"' and end > 0 and line[end - 1] == "\\":
                    end = line.find(c, end + 1)
                if end < 0:
                    raise _Unsure
                i = end + 1
            else:
                self.depth += c in "[{"
                self.depth -= c in "]}"
                i += 1


def _statements(text: str) -> Iterator[tuple[int, list[_Part], bool]]:
    """(line number, full key path, is a table header) of every table header and every
    ``key = value`` outside a value of a TOML document."""
    scanner = _Scanner()
    table: list[_Part] = []
    seen: dict[tuple[str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if scanner.depth or scanner.multiline is not None:
            scanner.scan(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            close = stripped.find("]]" if array else "]")
            if close < 0:
                raise _Unsure
            names = _key_parts(stripped[2 if array else 1 : close])
            if array:
                count = seen[tuple(names)] = seen.get(tuple(names), -1) + 1
                table = [(name, None) for name in names[:-1]] + [(names[-1], count)]
            else:
                table = [(name, None) for name in names]
            yield number, table, True
            continue
        key_text, sep, _ = _split_key(line)
        if not sep:
            raise _Unsure
        yield number, table + [(name, None) for name in _key_parts(key_text)], False
        scanner.scan(line, len(key_text) + 1)
    if scanner.depth or scanner.multiline is not None:
        raise _Unsure


def _split_key(line: str) -> tuple[str, str, str]:
    """``line`` split at the first '=' outside a quoted key."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "=":
            return line[:i], "=", line[i + 1 :]
    return line, "", ""


def _error_path(key: str) -> list[_Part]:
    """``routing.lists[1].path`` -> [("routing", None), ("lists", 1), ("path", None)]."""
    parts: list[_Part] = []
    for name in key.split("."):
        index: int | None = None
        while name.endswith("]") and "[" in name:
            name, _, rest = name.rpartition("[")
            if rest[:-1].isdecimal() and index is None:
                index = int(rest[:-1])
        parts.append((name, index))
    return parts


def _flat(parts: list[_Part]) -> list[_Part]:
    """Quoted names may hold dots, which error keys do not quote: compare dot by dot."""
    flat: list[_Part] = []
    for name, index in parts:
        *names, last = name.split(".")
        flat += [(n, None) for n in names] + [(last, index)]
    return flat


def _score(written: list[_Part], wanted: list[_Part]) -> int:
    """How well a key written in the file points at ``wanted``: the parts they share, twice,
    plus one if the written key holds ``wanted`` (is its prefix) rather than only sharing its
    table.  0: nothing shared."""
    shared = 0
    for (name, index), (want, want_index) in zip(written, wanted, strict=False):
        if name != want or (index is not None and want_index is not None and index != want_index):
            break
        shared += 1
    return 2 * shared + (shared == len(written) <= len(wanted) and shared > 0)


def key_line(text: str, key: str) -> int | None:
    """The line of TOML document ``text`` where the value of ``key`` (as errors name it:
    ``client.listen[1]``, ``routing.lists[0].path``) is written: its own ``key = `` line, the
    line of the inline table or array that holds it, or when it is not written at all the
    first line of the table it belongs in.  None when the key's table is not in the text
    either, or the text is more than this reader follows: the caller then names the file
    alone.

    tomllib reports no positions, so this reads the text itself: table headers (``[a.b]``,
    ``[[a.b]]`` counted for the index), dotted and quoted keys, inline tables, and values that
    span lines (arrays, multi-line strings) are skipped over."""
    wanted = _flat(_error_path(key))
    best, best_line = 0, None
    try:
        for number, written, _ in _statements(text):
            score = _score(_flat(written), wanted)
            if score > best:
                best, best_line = score, number
    except _Unsure:
        return None
    return best_line
