"""The log as an operator reads it: an access line per connection (text or JSON), the file
destination with rotation, and secrets that never appear, in a real run of real processes at
debug level (a server with two users, a native client and a wstunnel-protocol client, secret
path prefixes, proxy passwords in -L URLs, the control token used and misused)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from autovpn import logs
from tests.conftest import Certs, curl, free_port, run
from tests.http_origin import http_origin
from tests.test_cli import autovpn, clean_env, needs_curl, posix_only, run_cli, stop

SECRETS = {
    "alice": "alice-secret-7f3a9c1e55",
    "bob": "bob-secret-0d8e61b2c4",
    "native_prefix": "nativeprefix5b1e9d",
    "wstunnel_prefix": "wsprefix93c27a0f",
    "native_password": "socks-pass-native-41ab",
    "wstunnel_password": "socks-pass-ws-92cd",
}


def _token(env: dict[str, str]) -> str:
    (token_file,) = (Path(env["XDG_STATE_HOME"]) / "autovpn" / "engines").glob("*.token")
    return token_file.read_text().strip()


@needs_curl
@posix_only
def test_no_secret_reaches_the_log_at_debug_level(tmp_path: Path, certs: Certs) -> None:
    users = tmp_path / "users"
    lines = []
    for name in ("alice", "bob"):
        (tmp_path / f"{name}.secret").write_text(SECRETS[name] + "\n")
        lines.append(f"{name}:{tmp_path / f'{name}.secret'}")
    users.write_text("\n".join(lines) + "\n")
    server_port, socks_native, socks_ws = free_port(), free_port(), free_port()
    server_log, native_log = tmp_path / "logs" / "server.log", tmp_path / "native.log"
    envs = {}
    for name in ("server", "native", "ws"):
        (tmp_path / name).mkdir()
        envs[name] = clean_env(tmp_path / name)
    tls = ["--tls-ca", str(certs.ca)]
    server_args = [
        "--log-level=debug",
        "--log-format=json",
        f"--log-file={server_log}",
        "server",
        f"wss://127.0.0.1:{server_port}",
        "--tls-certificate",
        str(certs.cert),
        "--tls-private-key",
        str(certs.key),
        "--users-file",
        str(users),
        "--http-upgrade-path-prefix",
        SECRETS["native_prefix"],
        "--restrict-http-upgrade-path-prefix",
        SECRETS["wstunnel_prefix"],
        "--allow",
        "127.0.0.0/8",
    ]
    native_args = [
        "--log-level=debug",
        f"--log-file={native_log}",
        "client",
        f"wss://127.0.0.1:{server_port}",
        *tls,
        "--user",
        "alice",
        "--secret-file",
        str(tmp_path / "alice.secret"),
        "-P",
        SECRETS["native_prefix"],
        "-L",
        f"socks5://127.0.0.1:{socks_native}?login=u&password={SECRETS['native_password']}",
        "--mode",
        "global",
    ]
    ws_args = [
        "--log-level=debug",
        "--log-format=json",
        "client",
        f"wss://127.0.0.1:{server_port}",
        *tls,
        "--protocol",
        "wstunnel",
        "-P",
        SECRETS["wstunnel_prefix"],
        "-L",
        f"socks5://127.0.0.1:{socks_ws}?login=u&password={SECRETS['wstunnel_password']}",
        "--mode",
        "global",
    ]
    outputs: list[str] = []

    async def main() -> None:
        with http_origin() as origin:
            url = f"http://127.0.0.1:{origin.port}/hello"
            async with (
                autovpn(*server_args, env=envs["server"], ready="running") as server,
                autovpn(*native_args, env=envs["native"], ready="running") as native,
                autovpn(*ws_args, env=envs["ws"], ready="running") as ws,
            ):
                for port, password in (
                    (socks_native, SECRETS["native_password"]),
                    (socks_ws, SECRETS["wstunnel_password"]),
                ):
                    proxy = f"socks5h://u:{password}@127.0.0.1:{port}"
                    rc, out, err = await curl("-x", proxy, url)
                    assert (rc, out) == (0, "hello /hello"), err
                    wrong = f"socks5h://u:wrong-{password}@127.0.0.1:{port}"
                    rc, _, _ = await curl("-x", wrong, url)
                    assert rc != 0
                for name in ("native", "ws"):
                    env = envs[name]
                    token = _token(env)
                    SECRETS[f"{name}_token"] = token
                    code, out, err = await run_cli("mode", "direct", env=env)
                    assert code == 0, err
                    # A wrong token, and an oversized head that carries the real one.
                    await _raw_request(env, token)
                for proc in (ws, native, server):
                    code, rest = await stop(proc)
                    assert code in (0, 130), rest
                    outputs.append(rest)

    run(main())
    server_text = "".join(p.read_text() for p in sorted(server_log.parent.iterdir()))
    texts = [server_text, native_log.read_text(), *outputs]
    everything = "\n".join(texts)
    for name, secret in SECRETS.items():
        assert secret not in everything, f"{name} appears in the log"
    # And the logs are there: debug lines, an access line per connection, in both formats.
    assert "DEBUG" in native_log.read_text()  # the routing decisions, as they are made
    access = [json.loads(line) for line in server_text.splitlines() if '"autovpn.access"' in line]
    assert {a["user"] for a in access} >= {"alice"} and all(a["result"] for a in access)
    assert any("-> 127.0.0.1:" in line and " proxy " in line for line in texts[1].splitlines())
    ws_json = [json.loads(line) for line in outputs[0].splitlines() if line.startswith("{")]
    assert any(r["logger"] == "autovpn.access" and r["route"] == "proxy" for r in ws_json)


async def _raw_request(env: dict[str, str], token: str) -> None:
    """POST /mode with the token in an oversized header (431), and in a bad one."""
    (record,) = (Path(env["XDG_STATE_HOME"]) / "autovpn" / "engines").glob("*.json")
    url = json.loads(record.read_text())["url"]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for head in (
        f"POST /mode?mode=global HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"X-Pad: {'a' * 9000}{token}\r\nAuthorization: Bearer {token}\r\n\r\n",
        f"POST /mode?mode=global HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}x\r\n\r\n",
        f"GET /{token} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head.encode())
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()


def test_the_log_file_rotates_and_json_lines_carry_the_access_fields(tmp_path: Path) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        handler = logs.configure(
            "info", fmt="json", file=tmp_path / "a.log", max_bytes=2000, backups=2
        )
        for i in range(100):
            logging.getLogger("autovpn.access").info(
                "line %d", i, extra={"access": {"host": "x.test", "bytes_up": i}}
            )
        logging.getLogger("autovpn").debug("not written: below the level")
        handler.flush()
        files = sorted(p.name for p in tmp_path.glob("a.log*"))
        assert files == ["a.log", "a.log.1", "a.log.2"]  # the oldest are gone
        last = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines()]
        assert last[-1]["message"] == "line 99" and last[-1]["bytes_up"] == 99
        assert last[-1]["logger"] == "autovpn.access" and last[-1]["level"] == "info"
        # A secret that reaches a message by accident is replaced.
        logs.redact("very-secret-value-123")
        logging.getLogger("autovpn").warning("oops %s", "very-secret-value-123")
        handler.flush()
        text = (tmp_path / "a.log").read_text()
        assert "very-secret-value-123" not in text and logs.REDACTED in text
    finally:
        if logs._installed is not None:
            root.removeHandler(logs._installed)
            logs._installed.close()
            logs._installed = None
        root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_traceback_is_one_record(tmp_path: Path, fmt: str) -> None:
    root = logging.getLogger()
    level = root.level
    try:
        handler = logs.configure("info", fmt=fmt, file=tmp_path / "e.log")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("autovpn").exception("failed")
        handler.flush()
        text = (tmp_path / "e.log").read_text()
        assert "ValueError: boom" in text
        if fmt == "json":
            (record,) = [json.loads(line) for line in text.splitlines()]
            assert record["level"] == "error" and "ValueError" in record["exception"]
    finally:
        if logs._installed is not None:
            root.removeHandler(logs._installed)
            logs._installed.close()
            logs._installed = None
        root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_secret_in_an_access_field_is_replaced_in_the_line_and_its_keys(
    tmp_path: Path, fmt: str
) -> None:
    """The filter searches a line's text and its access fields at once (one search per
    secret): a secret in a field that the message does not show is still found and replaced,
    and a line without one is written as it came."""
    root = logging.getLogger()
    level = root.level
    secret = "field-secret-5c0ffee1"
    try:
        handler = logs.configure("info", fmt=fmt, file=tmp_path / "s.log")
        logs.redact(secret)
        access = logging.getLogger("autovpn.access")
        access.info("clean %s", "line", extra={"access": {"host": "a.test", "bytes_up": 1}})
        access.info("dirty", extra={"access": {"detail": f"refused for {secret}", "port": 2}})
        access.info("%s in the message", secret, extra={"access": {"host": "b.test"}})
        handler.flush()
        text = (tmp_path / "s.log").read_text()
        assert secret not in text and "clean line" in text
        if fmt == "json":
            clean, dirty, message = [json.loads(line) for line in text.splitlines()]
            assert clean["host"] == "a.test" and clean["bytes_up"] == 1
            assert dirty["detail"] == f"refused for {logs.REDACTED}" and dirty["port"] == 2
            assert message["message"] == f"{logs.REDACTED} in the message"
    finally:
        if logs._installed is not None:
            root.removeHandler(logs._installed)
            logs._installed.close()
            logs._installed = None
        root.setLevel(level)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_log_file_that_is_not_a_regular_file_is_never_rotated(tmp_path: Path) -> None:
    """``--log-file`` may name a FIFO (or /dev/stderr): its size says nothing, and renaming
    it would take it from its reader."""
    root = logging.getLogger()
    level = root.level
    (tmp_path / "logs").mkdir()
    fifo = tmp_path / "logs" / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # before the writer, which then opens
    try:
        handler = logs.configure("info", file=fifo, max_bytes=100, backups=2)
        for i in range(20):
            logging.getLogger("autovpn").warning("line %d of a FIFO log", i)
        handler.flush()
        got = os.read(reader, 1 << 16).decode()
        assert got.count("of a FIFO log") == 20
        assert [p.name for p in fifo.parent.iterdir()] == ["log.fifo"]
    finally:
        if logs._installed is not None:
            root.removeHandler(logs._installed)
            logs._installed.close()
            logs._installed = None
        root.setLevel(level)
        os.close(reader)


def test_the_config_file_has_the_log_and_stats_keys(tmp_path: Path) -> None:
    from autovpn.config import parse_config

    cfg, errors = parse_config(
        {
            "log_format": "json",
            "log_file": "logs/autovpn.log",
            "log_max_bytes": 1000,
            "log_backups": 2,
            "stats": False,
        },
        tmp_path,
    )
    assert errors == []
    assert (cfg.log_format, cfg.log_file) == ("json", tmp_path / "logs" / "autovpn.log")
    assert (cfg.log_max_bytes, cfg.log_backups, cfg.stats) == (1000, 2, False)
    _, errors = parse_config({"log_format": "xml", "log_backups": -1}, tmp_path)
    assert sorted(e.key for e in errors) == ["log_backups", "log_format"]
