"""Regex routing rules run on RE2 (linear time, the syntax of the lists' own engines): a badly
written regex in a downloaded list plus a crafted host name cannot stall a decision, and a
pattern RE2 cannot take is one error naming its file and line while the rest of the list loads.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autovpn.routing.lists import ListFormat, load_list_file
from autovpn.routing.router import Action, ListSpec, Mode, Router
from autovpn.routing.rules import (
    RuleError,
    RuleKind,
    RuleSet,
    Source,
    compile_regex,
    make_rule,
)

ROOT = Path(__file__).resolve().parents[2]

#: Decide one host with the rules of one list file, in a child process: a decision stuck in
#: catastrophic backtracking holds the GIL in C code, so only a process can be given up on.
_DECIDE = textwrap.dedent(
    """
    import sys
    from autovpn.routing.router import Action, ListSpec, Mode, Router
    router = Router.from_config(
        mode=Mode.SMART,
        default=Action.DIRECT,
        lists=[ListSpec(sys.argv[1], Action.PROXY)],
        default_lists=False,
        cache_size=0,
    )
    for host in sys.argv[2:]:
        decision = router.decide(host, 443)
        print(host, decision.action.value, decision.source, "|", decision.reason)
    """
)


def _decide_in_child(list_file: Path, *hosts: str) -> list[str]:
    try:
        result = subprocess.run(
            [sys.executable, "-c", _DECIDE, str(list_file), *hosts],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,  # the decisions take milliseconds; before RE2, years
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a routing decision did not finish within 30 s (catastrophic backtracking)")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("line", "hostile", "matching"),
    [
        # nested quantifiers: 2**60 ways to split the run of a's before the failing "$"
        ("DOMAIN-REGEX,(a+)+$", "a" * 60 + ".example", "x.aaa"),
        # a repeated group with a greedy .* inside: polynomial of degree 20
        ("DOMAIN-REGEX,^(.*a){20}$", "a" * 40 + "b.example", "a" * 19 + ".a"),
    ],
)
def test_a_catastrophic_regex_in_a_list_does_not_stall_decisions(
    tmp_path: Path, line: str, hostile: str, matching: str
) -> None:
    bad = tmp_path / "bad-regex.list"
    bad.write_text(f"{line}\nDOMAIN-SUFFIX,listed.example\n")
    out = _decide_in_child(bad, hostile, matching, "www.listed.example")
    assert out[0].startswith(f"{hostile} direct default |")
    assert out[1].startswith(f"{matching} proxy proxy list, {bad}:1 | smart: regex ")
    assert out[2].startswith(f"www.listed.example proxy proxy list, {bad}:2 |")


def test_patterns_re2_cannot_take_are_errors_naming_file_and_line(tmp_path: Path) -> None:
    v2fly = tmp_path / "v2fly-data"
    v2fly.mkdir()
    (v2fly / "example").write_text(
        "example.com\n"
        "regexp:^(a)\\1\\.example$\n"  # a backreference
        "regexp:^(?=ads)[a-z]+\\.example$\n"  # lookahead
        "regexp:(?<!cdn)\\.example\\.net$\n"  # lookbehind
        "regexp:^ok[0-9]+\\.example$\n"
        "regexp:\\.example\\.org\\Z\n"  # Python's \\Z: RE2 spells it \\z
        "full:www.example.net\n"
    )
    loaded = load_list_file(v2fly / "example", fmt=ListFormat.V2FLY)
    where = str(v2fly / "example")
    errors = {e.line: str(e) for e in loaded.errors}
    assert sorted(errors) == [2, 3, 4, 6]
    for line, message in errors.items():
        assert message.startswith(f"{where}:{line}: invalid regex ")
    assert "backreference" in errors[2] or "\\1" in errors[2]
    assert "(?=" in errors[3]
    assert "(?<!" in errors[4]
    assert "\\z" in errors[6]  # says how to write it
    assert [(r.kind, r.value) for r in loaded.rules] == [
        (RuleKind.SUFFIX, "example.com"),
        (RuleKind.REGEX, "^ok[0-9]+\\.example$"),
        (RuleKind.FULL, "www.example.net"),
    ]
    router = Router.from_config(
        mode=Mode.SMART,
        default=Action.DIRECT,
        lists=[ListSpec(v2fly / "example", Action.PROXY, ListFormat.V2FLY)],
        default_lists=False,
    )
    assert len(router.errors) == 4
    assert router.decide("ok42.example", 443).action is Action.PROXY
    assert router.decide("aa.example", 443).action is Action.DIRECT


def test_a_users_regex_rule_re2_refuses_is_a_config_error() -> None:
    from autovpn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"routing.rules\[0\]: invalid regex .*\(\?="):
        Router.from_config(mode=Mode.SMART, rules=["regex:^(?=x)y=proxy"])


@pytest.mark.parametrize(
    "pattern",
    [
        "a{1001}",  # past RE2's repeat limit (Go's too)
        "((((((((((a{100}){100}){100}){100}))))))",  # a program past RE2's memory budget
        "(?P<x",
        "x**",
        "[z-a]",
        "",
    ],
)
def test_patterns_too_large_or_malformed_are_rule_errors(pattern: str) -> None:
    with pytest.raises(RuleError):
        make_rule(RuleKind.REGEX, pattern, Action.PROXY, Source("test"))


def test_compiled_regex_searches_anywhere_in_the_host() -> None:
    r = compile_regex("(^|\\.)google\\.[a-z]+$")
    assert r.pattern == "(^|\\.)google\\.[a-z]+$"
    assert r.search("www.google.com")
    assert r.search("google.co")
    assert not r.search("notgoogle.com")
    assert not r.search("google.com.evil.example1")
    # RE2's "$" is the end of the text (Python's also matched before a final newline)
    assert not compile_regex("a$").search("a\n")
    # non-ASCII hosts (an IDNA failure leaves them as they are) are searched as text
    assert compile_regex("^bücher\\.").search("bücher.example")
    assert compile_regex("^b.cher$").search("bücher")


_PIECES = (
    "a b z 0 . - \\. \\d \\w [a-c] [^a.] ^ $ \\z \\b ( ) (?: (?i) (?i: (?P<g> | * + ? {1,2}"
    " \\Qa. \\E A"
).split()


def test_a_rule_set_answers_as_its_regexes_tried_in_order() -> None:
    # The alternation searched first (RuleSet.regex_any) must not change which rule wins.
    rng = random.Random(15)
    patterns: list[str] = []
    while len(patterns) < 300:
        pattern = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
        try:
            compile_regex(pattern)
        except RuleError:
            continue
        patterns.append(pattern)
    hosts = {"".join(rng.choice("abz0.-A") for _ in range(rng.randint(1, 9))) for _ in range(400)}
    for start in range(0, len(patterns), 20):
        group = patterns[start : start + 20]
        rules = [
            make_rule(RuleKind.REGEX, p, Action.PROXY, Source("test", "t", i))
            for i, p in enumerate(group)
        ]
        rs = RuleSet(rules)
        singles = [(compile_regex(r.value), r) for r in rs.rules if r.kind is RuleKind.REGEX]
        for host in hosts:
            want = next((r for p, r in singles if p.search(host)), None)
            assert rs.match_pattern(host) is want, (group, host)


def test_regexes_that_cannot_be_put_together_are_still_tried() -> None:
    quoted = RuleSet(
        [
            make_rule(RuleKind.REGEX, "\\Qa.b", Action.PROXY, Source("test")),  # to the end
            make_rule(RuleKind.REGEX, "^x\\.", Action.DIRECT, Source("test")),
        ]
    )
    assert quoted.regex_any is None
    assert quoted.match_pattern("za.b") is quoted.rules[0]
    assert quoted.match_pattern("x.y") is quoted.rules[1]
    named = RuleSet(
        [
            make_rule(RuleKind.REGEX, "(?P<n>a)x", Action.PROXY, Source("test")),
            make_rule(RuleKind.REGEX, "(?P<n>b)y", Action.DIRECT, Source("test")),
        ]
    )
    assert named.match_pattern("by") is named.rules[1]
