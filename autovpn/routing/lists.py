"""Importers for the domain-list formats people already have, and the default lists.

Every importer takes text (the ``load_*`` helpers read files) and returns a ``LoadResult``: the
rules plus a ``ListError(file, line, reason)`` for every line that could not be used.  A bad line
never stops the load; the rest of the file still counts.

Formats (``ListFormat``), detected by content unless the caller says which one:

* AutoProxy / gfwlist, base64-encoded or plain.  Routing here is per host, not per URL, so URL
  rules are reduced to their host: ``||d`` -> domain-suffix ``d``; ``|http://h/path`` -> full
  ``h`` (the path is dropped); a bare substring rule ``d`` or ``.d`` -> domain-suffix ``d`` (a
  label-boundary approximation of a URL substring); ``*`` globs -> a regex on the host;
  ``/re/`` -> regex, with a leading ``^https?:\\/\\/`` rewritten to ``^`` so it applies to the
  host; ``@@`` exceptions -> DIRECT rules (the router consults direct rules before proxy rules,
  which keeps the AutoProxy meaning "an exception beats any match").
* v2fly domain-list-community ``data/`` files: plain = domain and subdomains, ``domain:``,
  ``full:``, ``keyword:``, ``regexp:``, ``include:TAG`` (resolved against the data directory,
  recursively, cycles reported), `` @attr`` annotations and attribute filters (``TAG@cn``,
  ``TAG@!cn``, ``include:TAG @cn``).
* Clash rule-provider, text or YAML ``payload:`` list: behavior domain (``+.d`` domain and
  subdomains, ``.d`` subdomains only, ``*.d`` exactly one label, ``d`` exactly ``d``), ipcidr, and
  classical (``DOMAIN``, ``DOMAIN-SUFFIX``, ``DOMAIN-KEYWORD``, ``DOMAIN-REGEX``, ``IP-CIDR``,
  ``IP-CIDR6``, ``GEOIP``, ``DST-PORT``; an optional policy ``PROXY``/``DIRECT``/``REJECT`` and
  ``no-resolve`` are accepted).  The YAML list is read line by line (no YAML dependency), which
  keeps the line numbers for errors.
* dnsmasq: ``server=/d1/d2/ip`` and ``address=/d/ip`` -> domain-suffix rules; ``ipset=`` and
  ``nftset=`` lines are ignored with a note.
* plain: one domain (domain and subdomains) or IP/CIDR per line, ``#`` comments.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .rules import Action, Rule, RuleError, RuleKind, Source, make_rule, normalize_host, parse_ip

__all__ = [
    "DefaultLists",
    "ListError",
    "ListFormat",
    "LoadResult",
    "detect_format",
    "load_default_lists",
    "load_list_file",
    "load_v2fly",
    "parse_autoproxy",
    "parse_clash",
    "parse_clash_rule",
    "parse_dnsmasq",
    "parse_list",
    "parse_plain",
    "parse_v2fly",
]

DEFAULT_PROXY_FILE = "default-proxy.txt"
DEFAULT_DIRECT_FILE = "default-direct.txt"
MAX_INCLUDE_DEPTH = 32  # v2fly include: chains deeper than this are reported, not followed


@dataclass(frozen=True, slots=True)
class ListError:
    """A line of a list file that was not used (or, as a note, used only in part)."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class LoadResult:
    rules: list[Rule] = field(default_factory=list)
    errors: list[ListError] = field(default_factory=list)
    notes: list[ListError] = field(default_factory=list)  # lines ignored on purpose

    def extend(self, other: LoadResult) -> None:
        self.rules.extend(other.rules)
        self.errors.extend(other.errors)
        self.notes.extend(other.notes)


class ListFormat(enum.Enum):
    AUTOPROXY = "autoproxy"
    V2FLY = "v2fly"
    CLASH = "clash"
    DNSMASQ = "dnsmasq"
    PLAIN = "plain"


class _Builder:
    """Collects rules and errors for one file; turns ``RuleError`` into ``ListError``."""

    __slots__ = ("file", "list_name", "result")

    def __init__(self, file: str, list_name: str) -> None:
        self.file = file
        self.list_name = list_name
        self.result = LoadResult()

    def add(self, kind: RuleKind, value: str, action: Action, line: int) -> None:
        try:
            rule = make_rule(kind, value, action, Source(self.list_name, self.file, line))
        except RuleError as exc:
            self.error(line, str(exc))
        else:
            self.result.rules.append(rule)

    def error(self, line: int, reason: str) -> None:
        self.result.errors.append(ListError(self.file, line, reason))

    def note(self, line: int, reason: str) -> None:
        self.result.notes.append(ListError(self.file, line, reason))


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line:
            yield n, line


def _glob_to_regex(glob: str) -> str:
    return "".join(".*" if ch == "*" else re.escape(ch) for ch in glob.lower())


def _host_kind(value: str) -> tuple[RuleKind, str]:
    """An IP literal becomes an IP rule; anything else stays a domain."""
    h = normalize_host(value)
    if parse_ip(h) is not None:
        return RuleKind.IP_CIDR, h
    return RuleKind.SUFFIX, value


# --------------------------------------------------------------------------------------------
# AutoProxy / gfwlist

_B64_TEXT_RE = re.compile(r"[A-Za-z0-9+/=\s]+")
_URL_REGEX_PREFIX_RE = re.compile(r"\^(?:https?\??|\(https\?\)):(?:\\/|/){2}")
_HOST_END_RE = re.compile(r"[/?#:^]")


def _maybe_base64(text: str) -> str:
    stripped = text.strip()
    if len(stripped) < 16 or not _B64_TEXT_RE.fullmatch(stripped):
        return text
    try:
        return base64.b64decode("".join(stripped.split()), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return text


def parse_autoproxy(
    text: str,
    *,
    action: Action = Action.PROXY,
    file: str = "<string>",
    list_name: str = "proxy list",
) -> LoadResult:
    """AutoProxy (gfwlist) rules, base64 or plain.  ``@@`` exceptions become DIRECT rules."""
    b = _Builder(file, list_name)
    for n, line in _lines(_maybe_base64(text)):
        if line.startswith("!") or (line.startswith("[") and line.endswith("]")):
            continue
        act = action
        if line.startswith("@@"):
            act = Action.DIRECT
            line = line[2:]
        _autoproxy_rule(b, line, act, n)
    return b.result


def _autoproxy_rule(b: _Builder, line: str, act: Action, n: int) -> None:
    if len(line) > 2 and line.startswith("/") and line.endswith("/"):
        pattern = _URL_REGEX_PREFIX_RE.sub("^", line[1:-1], count=1)
        b.add(RuleKind.REGEX, pattern, act, n)
        return
    if line.startswith("||"):
        rest, anchored = line[2:], "domain"
    elif line.startswith("|"):
        rest, anchored = line[1:], "start"
        low = rest.lower()
        for scheme in ("http://", "https://"):
            if low.startswith(scheme):
                rest = rest[len(scheme) :]
                break
    else:
        rest, anchored = line, "substring"
        low = rest.lower()
        for scheme in ("http://", "https://"):
            if low.startswith(scheme):
                rest, anchored = rest[len(scheme) :], "start"
                break
        rest = rest.lstrip(".")
    m = _HOST_END_RE.search(rest)
    host = rest[: m.start()] if m else rest
    if not host:
        b.error(n, f"no host in rule {line!r}")
        return
    if "*" in host:
        glob = _glob_to_regex(host.lstrip("."))
        pattern = f"^{glob}$" if anchored == "start" else f"(^|\\.){glob}$"
        b.add(RuleKind.REGEX, pattern, act, n)
        return
    kind, value = _host_kind(host)
    if kind is RuleKind.SUFFIX and anchored == "start":
        kind = RuleKind.FULL
    b.add(kind, value, act, n)


# --------------------------------------------------------------------------------------------
# v2fly domain-list-community

_V2FLY_KINDS = {
    "domain": RuleKind.SUFFIX,
    "full": RuleKind.FULL,
    "keyword": RuleKind.KEYWORD,
    "regexp": RuleKind.REGEX,
}

AttrFilter = tuple[tuple[str, bool], ...]  # (attribute, wanted); all must hold


def _parse_attr_filter(tokens: Iterable[str]) -> AttrFilter:
    out = []
    for tok in tokens:
        t = tok.lstrip("@")
        if t.startswith(("!", "-")):
            out.append((t[1:].lower(), False))
        elif t:
            out.append((t.lower(), True))
    return tuple(out)


def _attrs_ok(attrs: frozenset[str], flt: AttrFilter) -> bool:
    return all((a in attrs) == wanted for a, wanted in flt)


_V2Entry = tuple[Rule, frozenset[str]]
_IncludeResolver = Callable[[str, AttrFilter, int], tuple[list[_V2Entry], str | None]]


def _v2fly_entries(
    text: str,
    b: _Builder,
    action: Action,
    resolve: _IncludeResolver | None,
    depth: int,
) -> list[_V2Entry]:
    entries: list[_V2Entry] = []
    for n, raw in _lines(text):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split()
        head = tokens[0]
        attr_tokens = [t for t in tokens[1:] if t.startswith("@")]
        bad = [t for t in tokens[1:] if not t.startswith(("@", "&"))]
        if bad:
            b.error(n, f"unexpected text {' '.join(bad)!r}")
            continue
        prefix, sep, value = head.partition(":")
        if not sep:
            prefix, value = "domain", head
        if prefix == "include":
            if resolve is None:
                b.error(n, f"include:{value} needs a data directory")
                continue
            included, problem = resolve(value, _parse_attr_filter(attr_tokens), depth + 1)
            if problem:
                b.error(n, problem)
            entries.extend(included)
            continue
        kind = _V2FLY_KINDS.get(prefix)
        if kind is None:
            b.error(n, f"unknown rule type {prefix!r}")
            continue
        before = len(b.result.rules)
        b.add(kind, value, action, n)
        if len(b.result.rules) > before:
            attrs = frozenset(a for a, _ in _parse_attr_filter(attr_tokens))
            entries.append((b.result.rules.pop(), attrs))
    return entries


def parse_v2fly(
    text: str,
    *,
    action: Action = Action.PROXY,
    file: str = "<string>",
    list_name: str = "proxy list",
    attrs: str = "",
    directory: str | Path | None = None,
) -> LoadResult:
    """One v2fly data file's text.  ``include:`` lines are resolved against ``directory`` (the
    ``data/`` folder); without it they are reported.  ``attrs`` is a filter such as ``"@cn"``,
    ``"@!cn"`` or ``"@cn @ads"`` (all must hold)."""
    b = _Builder(file, list_name)
    resolve = _make_resolver(Path(directory), action, list_name, b) if directory else None
    entries = _v2fly_entries(text, b, action, resolve, 0)
    flt = _parse_attr_filter(attrs.split())
    b.result.rules = [r for r, a in entries if _attrs_ok(a, flt)]
    return b.result


def _make_resolver(
    directory: Path, action: Action, list_name: str, outer: _Builder
) -> _IncludeResolver:
    cache: dict[str, list[_V2Entry]] = {}
    active: set[str] = set()

    def resolve(tag: str, flt: AttrFilter, depth: int) -> tuple[list[_V2Entry], str | None]:
        if tag in active or depth > MAX_INCLUDE_DEPTH:
            return [], f"include:{tag} forms a cycle or is nested too deeply"
        entries = cache.get(tag)
        if entries is None:
            path = directory / tag
            if "/" in tag or "\\" in tag or not path.is_file():
                return [], f"include:{tag}: no such list in {directory}"
            sub = _Builder(str(path), list_name)
            active.add(tag)
            try:
                entries = _v2fly_entries(
                    path.read_text(encoding="utf-8", errors="replace"), sub, action, resolve, depth
                )
            finally:
                active.discard(tag)
            outer.result.errors.extend(sub.result.errors)
            cache[tag] = entries
        return [e for e in entries if _attrs_ok(e[1], flt)], None

    return resolve


def load_v2fly(
    directory: str | Path,
    tag: str,
    *,
    action: Action = Action.PROXY,
    list_name: str | None = None,
) -> LoadResult:
    """The rules of one tag of a domain-list-community ``data/`` directory, includes resolved.

    ``tag`` may carry attribute filters as in v2ray's ``geosite:``: ``"cn"``, ``"apple@cn"``,
    ``"geolocation-!cn@!cn"``.
    """
    name, _, attrs = tag.partition("@")
    d = Path(directory)
    path = d / name
    label = list_name or f"geosite:{tag}"
    if not path.is_file():
        return LoadResult(errors=[ListError(str(path), 0, f"no such list {name!r}")])
    return parse_v2fly(
        path.read_text(encoding="utf-8", errors="replace"),
        action=action,
        file=str(path),
        list_name=label,
        attrs=" ".join("@" + a for a in attrs.split("@") if a),
        directory=d,
    )


# --------------------------------------------------------------------------------------------
# Clash rule-provider

_CLASH_KINDS = {
    "DOMAIN": RuleKind.FULL,
    "DOMAIN-SUFFIX": RuleKind.SUFFIX,
    "DOMAIN-KEYWORD": RuleKind.KEYWORD,
    "DOMAIN-REGEX": RuleKind.REGEX,
    "IP-CIDR": RuleKind.IP_CIDR,
    "IP-CIDR6": RuleKind.IP_CIDR,
    "GEOIP": RuleKind.GEOIP,
    "DST-PORT": RuleKind.PORT,
}
_CLASH_POLICIES = {
    "PROXY": Action.PROXY,
    "DIRECT": Action.DIRECT,
    "REJECT": Action.REJECT,
    "REJECT-DROP": Action.REJECT,
}
_CLASH_CLASSICAL_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*,")


def parse_clash_rule(line: str, default: Action) -> tuple[RuleKind, str, Action]:
    """One classical Clash rule ``TYPE,VALUE[,POLICY][,no-resolve]``; raises ``RuleError``.

    ``POLICY`` must be PROXY, DIRECT or REJECT (any case): autovpn has no proxy groups.
    """
    parts = [p.strip() for p in line.split(",")]
    rtype = parts[0].upper()
    kind = _CLASH_KINDS.get(rtype)
    if kind is None:
        raise RuleError(f"unsupported Clash rule type {parts[0]!r}")
    if kind is RuleKind.REGEX:
        # A regex may itself contain commas: the policy/no-resolve are only stripped at the end.
        rest = parts[1:]
        action = default
        while len(rest) > 1 and (
            rest[-1].lower() == "no-resolve" or rest[-1].upper() in _CLASH_POLICIES
        ):
            tail = rest.pop()
            if tail.lower() != "no-resolve":
                action = _CLASH_POLICIES[tail.upper()]
        return kind, ",".join(rest), action
    if len(parts) < 2 or not parts[1]:
        raise RuleError(f"missing value in {line!r}")
    action = default
    for extra in parts[2:]:
        if extra.lower() == "no-resolve":
            continue
        policy = _CLASH_POLICIES.get(extra.upper())
        if policy is None:
            raise RuleError(f"unknown policy {extra!r} (use PROXY, DIRECT or REJECT)")
        action = policy
    return kind, parts[1], action


def _strip_yaml_scalar(value: str) -> str:
    v = value.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    hash_at = v.find(" #")
    return v[:hash_at].rstrip() if hash_at >= 0 else v


def parse_clash(
    text: str,
    *,
    action: Action = Action.PROXY,
    file: str = "<string>",
    list_name: str = "proxy list",
) -> LoadResult:
    """A Clash rule-provider file (text, or YAML with a ``payload:`` list)."""
    b = _Builder(file, list_name)
    in_payload = False
    yaml_mode = any(line.startswith("payload:") for _, line in _lines(text))
    for n, line in _lines(text):
        if line.startswith("#"):
            continue
        if yaml_mode:
            if line.startswith("payload:"):
                in_payload = True
                rest = line[len("payload:") :].strip()
                if rest and rest not in ("[]", "|"):
                    b.error(n, "flow-style payload lists are not supported; use '- item' lines")
                continue
            if not in_payload:
                continue
            if not line.startswith("-"):
                if ":" in line:
                    in_payload = False  # the next key after the payload list
                else:
                    b.error(n, "expected a '- item' line in payload")
                continue
            entry = _strip_yaml_scalar(line[1:])
        else:
            entry = line
        if not entry:
            continue
        _clash_entry(b, entry, action, n)
    return b.result


def _clash_entry(b: _Builder, entry: str, action: Action, n: int) -> None:
    if _CLASH_CLASSICAL_RE.match(entry):
        try:
            kind, value, act = parse_clash_rule(entry, action)
        except RuleError as exc:
            b.error(n, str(exc))
            return
        b.add(kind, value, act, n)
        return
    low = entry.lower()
    if low.startswith("+."):
        b.add(RuleKind.SUFFIX, low[2:], action, n)
    elif low.startswith("*.") and "*" not in low[2:]:
        pattern = "^[^.]+\\." + re.escape(low[2:].rstrip(".")) + "$"
        b.add(RuleKind.REGEX, pattern, action, n)
    elif "*" in low:
        b.add(RuleKind.REGEX, "^" + _glob_to_regex(low).replace(".*", "[^.]*") + "$", action, n)
    elif low.startswith("."):
        b.add(RuleKind.SUFFIX, low, action, n)  # subdomains only
    elif "/" in low or parse_ip(normalize_host(low)) is not None:
        b.add(RuleKind.IP_CIDR, low, action, n)  # behavior: ipcidr
    else:
        b.add(RuleKind.FULL, low, action, n)


# --------------------------------------------------------------------------------------------
# dnsmasq and plain


def parse_dnsmasq(
    text: str,
    *,
    action: Action = Action.DIRECT,
    file: str = "<string>",
    list_name: str = "direct list",
) -> LoadResult:
    """``server=/d1/d2/upstream`` (and ``address=/d/ip``) lines -> domain-suffix rules."""
    b = _Builder(file, list_name)
    for n, line in _lines(text):
        if line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep:
            b.error(n, f"not a dnsmasq option line: {line!r}")
            continue
        if key in ("ipset", "nftset"):
            b.note(n, f"{key}= line ignored: routing does not manage firewall sets")
            continue
        if key not in ("server", "address", "local"):
            b.error(n, f"unsupported dnsmasq option {key!r}")
            continue
        fields = value.strip().split("/")
        if len(fields) < 3 or fields[0] != "":
            b.error(n, f"expected {key}=/domain/... in {line!r}")
            continue
        domains = [d for d in fields[1:-1] if d]
        if not domains:
            b.error(n, f"no domain in {line!r}")
        for d in domains:
            b.add(RuleKind.SUFFIX, d, action, n)
    return b.result


def parse_plain(
    text: str,
    *,
    action: Action = Action.PROXY,
    file: str = "<string>",
    list_name: str = "proxy list",
) -> LoadResult:
    """One domain (domain and subdomains) or IP/CIDR per line; ``#`` starts a comment."""
    b = _Builder(file, list_name)
    for n, raw in _lines(text):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) != 1:
            b.error(n, f"expected one domain per line, got {line!r}")
            continue
        if line.startswith(("*.", "+.")):
            line = line[2:]
        elif line.startswith("."):
            line = line[1:]
        if "/" in line:
            b.add(RuleKind.IP_CIDR, line, action, n)
            continue
        kind, value = _host_kind(line)
        b.add(kind, value, action, n)
    return b.result


# --------------------------------------------------------------------------------------------
# Detection and files

_V2FLY_LINE_RE = re.compile(r"(?:full|domain|keyword|regexp|include):\S|\S+\s+@!?[\w-]+$")
_CLASH_LINE_RE = re.compile(
    r"(?:DOMAIN|DOMAIN-SUFFIX|DOMAIN-KEYWORD|DOMAIN-REGEX|IP-CIDR6?|GEOIP|DST-PORT|"
    r"PROCESS-NAME|SRC-IP-CIDR|MATCH),",
    re.IGNORECASE,
)


def detect_format(text: str) -> ListFormat:
    """Guess the format from the content (the first 200 meaningful lines vote)."""
    decoded = _maybe_base64(text)
    if decoded.lstrip().startswith("[AutoProxy"):
        return ListFormat.AUTOPROXY
    votes = dict.fromkeys(ListFormat, 0)
    seen = 0
    for _, line in _lines(decoded):
        if line.startswith(("#", "!")):
            continue
        seen += 1
        if seen > 200:
            break
        if line.startswith("payload:"):
            return ListFormat.CLASH
        if line.startswith(("server=/", "ipset=/", "nftset=/", "address=/")):
            votes[ListFormat.DNSMASQ] += 1
        elif line.startswith(("||", "|", "@@")) or (line.startswith("/") and line.endswith("/")):
            votes[ListFormat.AUTOPROXY] += 1
        elif _CLASH_LINE_RE.match(line) or line.startswith("+."):
            votes[ListFormat.CLASH] += 1
        elif _V2FLY_LINE_RE.match(line):
            votes[ListFormat.V2FLY] += 1
    best = max(votes, key=lambda f: votes[f])
    return best if votes[best] else ListFormat.PLAIN


_PARSERS = {
    ListFormat.AUTOPROXY: parse_autoproxy,
    ListFormat.CLASH: parse_clash,
    ListFormat.DNSMASQ: parse_dnsmasq,
    ListFormat.PLAIN: parse_plain,
}


def parse_list(
    text: str,
    *,
    action: Action = Action.PROXY,
    fmt: ListFormat | None = None,
    file: str = "<string>",
    list_name: str | None = None,
    v2fly_directory: str | Path | None = None,
) -> LoadResult:
    """Parse ``text`` in ``fmt`` (detected when None).  ``list_name`` defaults to
    "proxy list" / "direct list" / "reject list" after ``action``."""
    fmt = fmt or detect_format(text)
    name = list_name or f"{action.value} list"
    if fmt is ListFormat.V2FLY:
        return parse_v2fly(
            text, action=action, file=file, list_name=name, directory=v2fly_directory
        )
    return _PARSERS[fmt](text, action=action, file=file, list_name=name)


def load_list_file(
    path: str | Path,
    *,
    action: Action = Action.PROXY,
    fmt: ListFormat | None = None,
    list_name: str | None = None,
) -> LoadResult:
    """Read and parse one list file.  An unreadable file is one ``ListError`` (line 0).
    v2fly ``include:`` lines resolve against the file's own directory."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        return LoadResult(errors=[ListError(str(p), 0, f"cannot read: {exc.strerror or exc}")])
    return parse_list(
        text, action=action, fmt=fmt, file=str(p), list_name=list_name, v2fly_directory=p.parent
    )


@dataclass(slots=True)
class DefaultLists:
    proxy: LoadResult
    direct: LoadResult


def load_default_lists() -> DefaultLists:
    """The curated lists shipped in ``autovpn/routing/data/`` (plain format)."""
    data = resources.files("autovpn.routing").joinpath("data")
    return DefaultLists(
        proxy=parse_plain(
            data.joinpath(DEFAULT_PROXY_FILE).read_text(encoding="utf-8"),
            action=Action.PROXY,
            file=DEFAULT_PROXY_FILE,
            list_name="proxy list",
        ),
        direct=parse_plain(
            data.joinpath(DEFAULT_DIRECT_FILE).read_text(encoding="utf-8"),
            action=Action.DIRECT,
            file=DEFAULT_DIRECT_FILE,
            list_name="direct list",
        ),
    )
