"""The declarative config tables: every field documented, and the one checker's promises
(one error per wrongly typed key, naming its full key) held for every key of the file."""

from __future__ import annotations

import copy
import dataclasses
import datetime
from pathlib import Path
from typing import Any

import pytest

from autovpn.config import (
    ClientConfig,
    Config,
    ListEntry,
    RoutingConfig,
    ServerConfig,
    ServerEntry,
    UserEntry,
    WstunnelClientOptions,
    WstunnelServerOptions,
    parse_config,
)
from autovpn.errors import ConfigError
from autovpn.toml_tables import Parser, Where, integer, key_of, reference, setting_of, tables

SECRET = b"toml-tables-secret-0123"

#: Fields no key sets, whose value a table's finish computes (so they have no default).
FILLED_BY_FINISH = {
    (ClientConfig, "secret"),
    (ClientConfig, "server"),  # or the first of servers
    (ServerConfig, "users"),
}


def test_every_table_is_found() -> None:
    assert tables(Config) == [
        Config,
        ClientConfig,
        ServerEntry,
        WstunnelClientOptions,
        ServerConfig,
        UserEntry,
        WstunnelServerOptions,
        RoutingConfig,
        ListEntry,
    ]


@pytest.mark.parametrize("cls", tables(Config), ids=lambda cls: cls.__name__)
def test_every_field_has_a_key_a_parser_and_a_doc(cls: type[Any]) -> None:
    keys = []
    for f in dataclasses.fields(cls):
        s = setting_of(f)  # TypeError for a field with neither toml() nor not_in_file()
        assert s.doc.strip(), f.name
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if s.parser is None:  # set by flags or code, never by the file
            assert not s.required and not s.key, f.name
            assert not no_default or (cls, f.name) in FILLED_BY_FINISH, f.name
            continue
        assert isinstance(s.parser, Parser) and s.parser.expects and s.parser.types, f.name
        keys.append(key_of(f))
        if s.required:
            assert no_default, f"{f.name}: a required key has no default"
        else:
            assert not no_default or (cls, f.name) in FILLED_BY_FINISH, f.name
    assert len(keys) == len(set(keys)), keys


def test_reference_names_every_key_in_full() -> None:
    keys = [key for key, _ in reference(Config)]
    for key in (
        "mode",
        "client.listen",
        "server.users.NAME.secret_file",
        "routing.lists[].action",
        "routing.dns.timeout",
    ):
        assert key in keys
    assert len(keys) == len(set(keys))


# -- a wrong type: one error, with the full key --------------------------------------------------

#: A valid document with every table present (list entries, servers and users included).
BASE: dict[str, Any] = {
    "mode": "global",
    "client": {"servers": [{"url": "wss://vpn.example.net:443"}], "secret_file": "secret"},
    "server": {
        "listen": "ws://127.0.0.1:8080",
        "secret_file": "secret",
        "users": {"NAME": {"secret_file": "secret"}},
    },
    "routing": {"lists": [{"path": "list.txt"}], "dns": {"timeout": 5}},
}

#: One value of each TOML type; a key gets the first its parser does not take.
SAMPLES: dict[str, Any] = {
    "string": "socks5://127.0.0.1:1080",
    "array": ["127.0.0.1"],
    "integer": 7,
    "table": {"path": "list.txt"},
    "boolean": True,
    "date-time": datetime.datetime(2024, 1, 1),
}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "list.txt").write_text("example.test\n")
    return tmp_path


def _place(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (``routing.lists[].path``: the first entry) in ``doc``."""
    *parents, last = key.split(".")
    node: Any = doc
    for part in parents:
        if part.endswith("[]"):
            node = node[part[:-2]][0]
        else:
            node = node.setdefault(part, {})
    node[last] = value


def test_the_base_document_is_valid(base: Path) -> None:
    assert parse_config(BASE, base)[1] == []


@pytest.mark.parametrize(
    ("key", "wrong"),
    [
        (key, next(v for t, v in SAMPLES.items() if t not in s.parser.types))
        for key, s in reference(Config)
        if s.parser is not None
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_a_wrong_type_is_one_error_naming_the_full_key(base: Path, key: str, wrong: Any) -> None:
    doc = copy.deepcopy(BASE)
    _place(doc, key, wrong)
    _, errors = parse_config(doc, base)
    assert [e.key for e in errors] == [key.replace("[]", "[0]")], errors
    assert errors[0].reason.startswith("expected "), errors[0].reason


def test_a_sub_table_of_the_wrong_type_is_one_error(base: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["routing"]["dns"] = ["8.8.8.8"]
    _, errors = parse_config(doc, base)
    assert [(e.key, e.reason) for e in errors] == [
        ("routing.dns", "expected a table, got array ['8.8.8.8']")
    ]


def test_an_integer_with_and_without_an_upper_bound() -> None:
    where = Where("k", Path("."))
    assert integer(0)(10**6, where) == 10**6
    with pytest.raises(ConfigError, match="must be 0 or more"):
        integer(0)(-1, where)
    with pytest.raises(ConfigError, match="must be between 1 and 64"):
        integer(1, 64)(65, where)
    assert integer(0).expects == "an integer, 0 or more"
