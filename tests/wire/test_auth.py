"""Credentials and Proxy-Authorization parsing (RFC 1929 users, RFC 7617 Basic)."""

from __future__ import annotations

import ast
import base64
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autovpn.wire import auth
from autovpn.wire.auth import MAX_BASIC_TOKEN, Credentials, parse_basic_proxy_authorization


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_check_right_and_wrong() -> None:
    creds = Credentials({"alice": "s3cret", "bob": "hunter2"})
    assert creds.check("alice", "s3cret")
    assert creds.check("bob", "hunter2")
    assert not creds.check("alice", "hunter2")
    assert not creds.check("alice", "s3cre")
    assert not creds.check("alice", "")
    assert not creds.check("carol", "s3cret")
    assert not creds.check("", "")


def test_check_non_ascii_and_surrogates() -> None:
    creds = Credentials({"jürgen": "pässwörd"})
    assert creds.check("jürgen", "pässwörd")
    assert not creds.check("jürgen", "passwort")
    assert not creds.check("j\udcffrgen", "x")  # does not raise on lone surrogates


def test_unknown_user_never_matches_dummy() -> None:
    creds = Credentials({"a": "b"})
    assert not creds.check("nobody", "")
    assert not creds.check("nobody", "nobody")


def test_mapping_interface_and_repr_hides_passwords() -> None:
    creds = Credentials([("a", "pw1"), ("b", "pw2")])
    assert len(creds) == 2
    assert sorted(creds) == ["a", "b"]
    assert creds["a"] == "pw1"
    assert dict(creds) == {"a": "pw1", "b": "pw2"}
    assert "pw1" not in repr(creds)
    assert not Credentials()


def test_rfc7617_s2_basic() -> None:
    headers = [("Host", "x"), ("Proxy-Authorization", basic("Aladdin", "open sesame"))]
    assert parse_basic_proxy_authorization(headers) == ("Aladdin", "open sesame")


def test_rfc7617_s2_exact_example_token() -> None:
    headers = [("proxy-authorization", "basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")]
    assert parse_basic_proxy_authorization(headers) == ("Aladdin", "open sesame")


def test_rfc7617_s2_password_may_contain_colon() -> None:
    assert parse_basic_proxy_authorization([("Proxy-Authorization", basic("u", "a:b"))]) == (
        "u",
        "a:b",
    )


def test_rfc7617_s2_1_utf8_and_latin1_fallback() -> None:
    assert parse_basic_proxy_authorization([("Proxy-Authorization", basic("jürgen", "ü"))]) == (
        "jürgen",
        "ü",
    )
    token = base64.b64encode("j\xfcrgen:pw".encode("latin-1")).decode()
    assert parse_basic_proxy_authorization([("Proxy-Authorization", "Basic " + token)]) == (
        "j\xfcrgen",
        "pw",
    )


def test_tolerant_spacing_and_missing_padding() -> None:
    token = base64.b64encode(b"ab:c").decode().rstrip("=")
    assert parse_basic_proxy_authorization([("PROXY-AUTHORIZATION", f"  BASIC   {token} ")]) == (
        "ab",
        "c",
    )


def test_first_basic_header_wins_and_other_schemes_skipped() -> None:
    headers = [
        ("Proxy-Authorization", "Digest username=x"),
        ("Proxy-Authorization", basic("first", "1")),
        ("Proxy-Authorization", basic("second", "2")),
    ]
    assert parse_basic_proxy_authorization(headers) == ("first", "1")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Basic",
        "Basic ",
        "Bearer abc",
        "Basic !!!!",
        "Basic QWxhZGRpbg==",  # no colon
        "Basic QWxh ZGRp",
        "Basic ÄÖÜ=",
        "Basic " + "A" * (MAX_BASIC_TOKEN + 4),
        "Basic a",
    ],
)
def test_bad_values_give_none(value: str) -> None:
    assert parse_basic_proxy_authorization([("Proxy-Authorization", value)]) is None


def test_absent_header_gives_none() -> None:
    assert parse_basic_proxy_authorization([("Authorization", basic("a", "b"))]) is None
    assert parse_basic_proxy_authorization([]) is None


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_fuzz_never_raises(value: str) -> None:
    result = parse_basic_proxy_authorization([("Proxy-Authorization", value)])
    assert result is None or isinstance(result, tuple)


@settings(max_examples=300)
@given(st.text().filter(lambda s: ":" not in s), st.text())
def test_fuzz_roundtrip(user: str, password: str) -> None:
    assert parse_basic_proxy_authorization([("Proxy-Authorization", basic(user, password))]) == (
        user,
        password,
    )


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5), st.data())
def test_fuzz_check_matches_dict(users: dict[str, str], data: st.DataObject) -> None:
    creds = Credentials(users)
    user = data.draw(st.sampled_from([*users, "x"]) if users else st.just("x"))
    password = data.draw(st.text(max_size=10))
    assert creds.check(user, password) == (users.get(user) == password)
    for known, pw in users.items():
        assert creds.check(known, pw)


def test_module_is_pure() -> None:
    tree = ast.parse(pathlib.Path(auth.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncio", "socket", "ssl", "selectors", "time"}
