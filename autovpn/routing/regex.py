"""Regular expressions for routing rules, on RE2: time linear in the host name, whatever the
pattern.

Regex rules come from the user's config and from downloaded lists (v2fly ``regexp:``, Clash
``DOMAIN-REGEX``, AutoProxy ``/re/`` and ``*`` globs), and the names they are searched in come
from whatever page the user opens.  Python's ``re`` backtracks: one badly written pattern in a
list (``(a+)+$``) and a crafted name held the event loop for years.  RE2 (``google-re2``)
never backtracks, and its syntax is the one those lists are written for: v2ray, Clash and
sing-box use Go's ``regexp``, which is RE2's syntax.  What RE2 does not have (backreferences,
lookaround, Python's ``\\Z``) is refused here, with RE2's own reason, so that a list's bad line is
one error naming its file and line while the rest of the list loads.

This module is the only one that touches ``re2`` (which ships no type hints): ``Regex`` is the
typed face of one compiled pattern.  It uses the binding's compiled-pattern object
(``re2._re2.RE2``) rather than ``re2.compile(...).search``: the pure-Python layer above it costs
2.3 us per search against 0.75 us here (a 22-character host; Python's ``re``: 0.74 us), and a
decision tries every regex of a list in turn.  ``re2`` is imported on the first compile only:
an engine without regex rules never loads it (4-5 ms).

Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["MAX_REGEX_MEMORY", "Regex", "RegexError", "any_of", "compile_re2"]

#: The memory RE2 may use for one pattern: its compiled program and the DFA it builds while
#: searching (RE2 falls back to its NFA, still linear, when the DFA would need more).  Host
#: names are at most 253 characters; real list patterns compile to a few hundred instructions
#: (``.{1000}`` is 8,004 and fits).  RE2's default, 8 MiB, let a pattern such as ``\\pL{1000}``
#: take 90 ms to be refused; at 1 MiB it is refused in 9 ms.
MAX_REGEX_MEMORY: Final = 1 << 20


class RegexError(ValueError):
    """RE2 cannot take a pattern; the message is RE2's reason (with a hint where we have one)."""


#: The memory for ``any_of``'s alternation of every regex of a rule set: v2fly's 163 regexes
#: compile to 3,286 instructions; past this budget a rule set simply goes without it.
MAX_ANY_OF_MEMORY: Final = 16 << 20


class _Binding:
    """What this module needs of ``re2``, loaded once, on the first compile."""

    compile: Callable[[bytes], Any]
    compile_any: Callable[[bytes], Any]
    unanchored: Any


_binding: _Binding | None = None


def _load() -> _Binding:
    global _binding
    if _binding is None:
        # Lazy: only an engine with regex rules pays for loading RE2 (4-5 ms).
        import re2
        from re2 import _re2

        options = re2.Options()
        options.log_errors = False  # RE2 would print each refused pattern on stderr
        options.never_capture = True  # a rule asks "is there a match", never for groups
        options.max_mem = MAX_REGEX_MEMORY
        any_options = re2.Options()
        any_options.log_errors = False
        any_options.never_capture = True
        any_options.max_mem = MAX_ANY_OF_MEMORY
        b = _Binding()
        b.compile = lambda pattern: _re2.RE2(pattern, options)
        b.compile_any = lambda pattern: _re2.RE2(pattern, any_options)
        b.unanchored = _re2.RE2.Anchor.UNANCHORED
        _binding = b
    return _binding


_NO_MATCH: Final = (-1, -1)


class Regex:
    """One compiled pattern.  ``search`` says whether it matches anywhere in a text, as Go's
    ``MatchString`` and Python's ``re.search`` do."""

    __slots__ = ("_match", "_unanchored", "pattern")

    def __init__(self, pattern: str, compiled: Any, unanchored: Any) -> None:
        self.pattern = pattern
        self._match = compiled.Match
        self._unanchored = unanchored

    def search(self, text: str) -> bool:
        return self.search_bytes(text.encode("utf-8", "replace"))

    def search_bytes(self, data: bytes) -> bool:
        """``search`` on text already encoded as UTF-8 (a decision encodes its host once)."""
        return bool(self._match(self._unanchored, data, 0, len(data))[0] != _NO_MATCH)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def compile_re2(pattern: str) -> Regex:
    """``pattern`` compiled by RE2; raises ``RegexError`` with RE2's reason."""
    b = _load()
    # "replace": a lone surrogate (from a list read with errors="surrogateescape") cannot be
    # UTF-8; the pattern then has a U+FFFD where it was, which no host name contains either.
    compiled = b.compile(pattern.encode("utf-8", "replace"))
    if not compiled.ok():
        reason = bytes(compiled.error()).decode("utf-8", "replace")
        if "\\Z" in reason:
            reason += " (Python's \\Z: RE2 and Go write the end of the text \\z, or $)"
        elif any(op in reason for op in ("(?=", "(?!", "(?<=", "(?<!")):
            reason += " (lookaround: RE2 and Go have none)"
        elif "invalid escape sequence: \\" in reason and reason[-1:].isdigit():
            reason += " (a backreference: RE2 and Go have none)"
        elif "pattern too large" in reason:
            reason += f" (over {MAX_REGEX_MEMORY >> 20} MiB once compiled)"
        raise RegexError(reason)
    return Regex(pattern, compiled, b.unanchored)


def any_of(patterns: Sequence[str]) -> Regex | None:
    """One regex that matches where any of ``patterns`` (each accepted by ``compile_re2``)
    does, or None when they cannot be put together.

    A rule set searches it first: most hosts match no regex rule, and one search of the
    alternation costs what one search of a single pattern does (0.5 us for v2fly's 163
    patterns, against 88 us for the 163 searches).  Each pattern is wrapped in ``(?:...)``, the
    scope of its own flags (``(?i)``), so none changes another's meaning; ``\\Q`` is the
    exception (without ``\\E`` it quotes to the end of the text, the wrapper's ``)`` included),
    and so is left alone, as is a set whose alternation RE2 refuses (two groups of one name,
    past ``MAX_ANY_OF_MEMORY``).
    """
    if len(patterns) < 2 or any("\\Q" in p for p in patterns):
        return None
    text = "|".join(f"(?:{p})" for p in patterns)
    b = _load()
    compiled = b.compile_any(text.encode("utf-8", "replace"))
    if not compiled.ok():
        return None
    return Regex(text, compiled, b.unanchored)
