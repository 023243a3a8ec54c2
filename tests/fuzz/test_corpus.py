"""The corpus of inputs that once broke something (``tests/corpus/``), replayed.

Each directory is one parser or listener; each file one input, named for what it is.  Files are
parsed where the parser is pure, and sent over a real socket where the defect was in the
serving (a leak, a hang, a traceback): then the answer must be a refusal within seconds, and
nothing is dialled for it.  ``tests/corpus/README.md`` says where each input came from.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from autovpn.config import Config, load_file
from autovpn.engine import Engine
from autovpn.errors import ConfigError, RemoteProtocolError
from autovpn.policy import DestinationPolicy
from autovpn.routing.lists import parse_list
from autovpn.routing.rules import RuleSet
from autovpn.tunnel.wstunnel.restrictions import Restrictions
from autovpn.wire.wstunnel import Claims
from tests.conftest import Certs, engine_config, run, socks_port
from tests.tunnel.wstunnel import wstunnel_peer as peer

CORPUS = Path(__file__).parent.parent / "corpus"
#: A live server answers within this (the defects were silence: 15 s with no reply).
ANSWER_WITHIN = 5.0


def inputs(target: str) -> list[Path]:
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert files, f"no corpus files in {target}"
    return files


def ids(files: list[Path]) -> list[str]:
    return [f.name for f in files]


# -- pure parsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", inputs("restrictions"), ids=ids(inputs("restrictions")))
def test_restrictions(path: Path) -> None:
    with pytest.raises(ConfigError):
        Restrictions.from_yaml(path.read_text(encoding="utf-8"), path.name)


#: Inputs that broke a parser once and are valid now that routing regexes run on RE2: it takes
#: 3,000 nested groups in a millisecond (Python's ``re`` ran out of stack), and reads a repeat
#: count it cannot hold (``a{4294967296}``) as literal text, which no host name contains.
NOW_VALID = {"rule-regex-deep-groups.toml", "rule-regex-repeat-overflow.toml"}


@pytest.mark.parametrize("path", inputs("config"), ids=ids(inputs("config")))
def test_config(path: Path) -> None:
    config, errors = load_file(path)
    assert isinstance(config, Config)
    assert all(isinstance(e, ConfigError) for e in errors)
    assert bool(errors) != (path.name in NOW_VALID)


@pytest.mark.parametrize("path", inputs("lists"), ids=ids(inputs("lists")))
def test_lists(path: Path) -> None:
    result = parse_list(path.read_text(encoding="utf-8"), file=path.name)
    assert any(rule.value == "example.com" for rule in result.rules)  # the rest still loads
    RuleSet(result.rules).match("example.com", 443)


@pytest.mark.parametrize("path", inputs("jwt"), ids=ids(inputs("jwt")))
def test_jwt(path: Path) -> None:
    with pytest.raises((ValueError, RemoteProtocolError)):
        Claims.decode(path.read_text(encoding="ascii").strip())


@pytest.mark.parametrize("path", inputs("policy"), ids=ids(inputs("policy")))
def test_policy(path: Path) -> None:
    policy = DestinationPolicy()
    for address in path.read_text(encoding="ascii").split():
        assert not policy.address_allowed(address, 80), address


# -- live: sent over a socket to a running engine -------------------------------------------------


class _Target:
    """A TCP listener that counts the connections made to it."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


_JWT = re.compile(rb"@JWT\(([^:@]+):TARGET\)@")


def _fill(data: bytes, target: int, api: int = 0) -> bytes:
    """Replace the placeholders: ``@JWT(host:TARGET)@`` by a token for host and the test's
    target port, ``{PORT}`` by the control API's port."""

    def token(match: re.Match[bytes]) -> bytes:
        host = match.group(1).decode()
        return peer.make_jwt(peer.tcp_claims(host, target)).encode()

    return _JWT.sub(token, data).replace(b"{PORT}", str(api).encode())


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; what comes back until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(ANSWER_WITHIN):
            return await reader.read()  # every refusal closes the connection
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def _live(certs: Certs, path: Path, caplog: pytest.LogCaptureFixture) -> tuple[bytes, int]:
    """The answer to the file's bytes, and how many connections reached the target."""
    target_dir = path.parent.name
    raw = path.read_bytes()

    async def main() -> tuple[bytes, int]:
        config = engine_config(certs, tls=False)  # the server port speaks plain HTTP
        assert config.server is not None
        config.server.allow_anonymous = True  # so that a wstunnel request reaches every check
        config.control = "127.0.0.1:0"
        target = _Target()
        target_port = await target.start()
        try:
            async with Engine(config) as eng:
                assert eng.server is not None and eng.api is not None
                port = {
                    "wstunnel-request": eng.server.port,
                    "tunnel-request": eng.server.port,
                    "socks5": socks_port(eng),
                    "control-api": eng.api.bound_port,
                }[target_dir]
                data = _fill(raw, target_port, eng.api.bound_port)
                answer = await _exchange(port, data)
                await asyncio.sleep(0.1)  # a stray dial would land by now
                return answer, target.accepted
        finally:
            await target.close()

    with caplog.at_level(logging.INFO):
        answer, dialled = run(main())
    # Refused as foreseen: no "unexpected" error, no traceback in the log.
    for record in caplog.records:
        assert "unexpected" not in record.getMessage(), record.getMessage()
        assert record.exc_info is None, record.getMessage()
    return answer, dialled


def _live_inputs() -> list[Path]:
    return [
        *inputs("wstunnel-request"),
        *inputs("tunnel-request"),
        *inputs("socks5"),
        *inputs("control-api"),
    ]


@pytest.mark.parametrize(
    "path", _live_inputs(), ids=[f"{p.parent.name}/{p.name}" for p in _live_inputs()]
)
def test_live(certs: Certs, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    answer, dialled = _live(certs, path, caplog)
    assert dialled == 0
    if path.parent.name == "socks5":
        # the method selection, then a failure reply: host unreachable
        assert answer[:2] == b"\x05\x00" and answer[2:4] == b"\x05\x04", answer
        return
    status = re.match(rb"HTTP/1\.1 ([0-9]{3}) ", answer)
    assert status is not None, answer[:200]
    assert 400 <= int(status.group(1)) < 500, answer[:200]
