"""A configuration error names FILE:LINE: ``toml_tables.key_line`` finds where a key is written
(tomllib reports no positions), and falls back to the file name alone when unsure."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from autovpn.cli import main
from autovpn.config import load_file
from autovpn.toml_tables import key_line

DOC = """\
# a comment with key = value in it
mode = "smart"          # top level
log_level = 'debug'

[client]
server = "wss://vpn.example.net:443"
listen = [
  "socks5://127.0.0.1:1080",   # [not a header]
  "http://127.0.0.1:8080",
]
wstunnel.ping_interval = 3
"quoted.key" = 1
note = \"\"\"
[server]
pool_size = 3
\"\"\"

[ server . wstunnel ]
enabled = false

[server.users]
alice = { secret_file = "alice.secret" }

[routing]
dns = { timeout = 2, local = ["192.0.2.53"] }
lists = [
  { path = "a.txt", action = "proxy" },
]

[[routing.extra]]
path = "first"
[[routing.extra]]
path = "second"
"""


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("mode", 2),
        ("log_level", 3),
        ("client.server", 6),
        ("client.listen", 7),
        ("client.listen[1]", 7),  # an item: the line of its array
        ("client.wstunnel.ping_interval", 11),  # a dotted key
        ("client.quoted.key", 12),  # a quoted key holding a dot
        ("client.pool_size", 5),  # not written: its table's header (not the string's text)
        ("server.wstunnel.enabled", 19),  # spaces in the header
        ("server.users.alice.secret_file", 22),  # an inline table
        ("routing.dns.timeout", 25),
        ("routing.lists[0].action", 26),
        ("routing.extra[0].path", 31),  # the n-th [[header]]
        ("routing.extra[1].path", 33),
        ("routing.extra[1]", 32),
        ("server.listen", 18),  # [server] itself is not written: [server.wstunnel] is
    ],
)
def test_key_line_finds_where_a_key_is_written(key: str, line: int) -> None:
    tomllib.loads(DOC)  # the document is valid TOML
    assert key_line(DOC, key) == line


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('mode = "smart"\n', "control"),  # neither the key nor a table of it
        ('[client]\nserver = "x"\n', "server.listen"),
        ('listen = [\n  "a",\n', "listen"),  # an array never closed: not a document
        ('note = """\nnever closed\n', "note"),
        ("[client\nserver = 1\n", "client.server"),
        ('x = "unterminated\n', "x"),
    ],
)
def test_key_line_is_none_when_unsure(text: str, key: str) -> None:
    assert key_line(text, key) is None


def test_load_file_gives_each_error_its_line(tmp_path: Path) -> None:
    path = tmp_path / "autovpn.toml"
    path.write_text(
        'mode = "sideways"\n'
        "[client]\n"
        'server = "wss://vpn.example.net:443"\n'
        'secret_file = "secret"\n'
        'pool_size = "3"\n'
        "listen = [\n"
        '  "socks5://127.0.0.1:1080",\n'
        '  "gopher://127.0.0.1:70",\n'
        "]\n"
    )
    (tmp_path / "secret").write_bytes(b"0123456789abcdef")
    _, errors = load_file(path)
    assert sorted((e.key, e.line) for e in errors) == [
        ("client.listen[1]", 6),
        ("client.pool_size", 5),
        ("mode", 1),
    ]


def test_check_config_prints_file_line_key_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "autovpn.toml"
    path.write_text(
        '[client]\nserver = "wss://vpn.example.net:443"\npool_size = "3"\nsecret_file = "s"\n'
    )
    (tmp_path / "s").write_bytes(b"0123456789abcdef")
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    # a wrong type: one line, naming the file, the line, the key, what it takes and what it got
    assert err.splitlines() == [
        f"{path}:3: client.pool_size: expected an integer from 1 to 64, got string '3'"
    ]


def test_an_engine_command_names_the_line_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "autovpn.toml"
    path.write_text('mode = "global"\n\n[server]\nlisten = "ftp://0.0.0.0:21"\n')
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{path}:4: server.listen: 'ftp://0.0.0.0:21': the scheme must be")


def test_a_missing_key_names_its_table_and_a_syntax_error_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "autovpn.toml"
    path.write_text('mode = "global"\n[client]\nuser = "alice"\n')
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: client.server: required" in err
    assert f"{path}:2: client.secret_file: no secret: use --secret-file FILE" in err
    path.write_text('mode = "global"\n[client\n')
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2: TOML syntax: ")


def test_a_wrong_flag_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Not the error under forty lines of usage: the line, and where the help is."""
    with pytest.raises(SystemExit) as exited:
        main(["client", "--pool-size", "x", "wss://vpn.example.net"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "autovpn client: error: argument --pool-size: invalid int value: 'x'"
        " (see autovpn client --help)"
    ]


def test_the_documented_example_has_only_real_keys_each_found(tmp_path: Path) -> None:
    """config.py's example: every key is one the checker knows, and each error (its files do
    not exist here) is found on the key's own line."""
    import autovpn.config

    example = (autovpn.config.__doc__ or "").split("Example::", 1)[1]
    text = "\n".join(line[4:] for line in example.splitlines())
    path = tmp_path / "example.toml"
    path.write_text(text)
    _, errors = load_file(path)
    assert errors, "the example names files that are not here"
    for error in errors:
        assert "unknown key" not in error.reason, error
        assert error.line is not None, error
        last = error.key.rpartition(".")[2].partition("[")[0]
        assert last in text.splitlines()[error.line - 1], (error, error.line)
