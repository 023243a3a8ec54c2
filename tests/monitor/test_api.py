"""The control API against a running engine: status, mode switching, route, batch resolve,
the PAC files (ports actually bound, ETag/Last-Modified, 304, regenerated only on change), and
the guard against web pages (DNS rebinding, CSRF) and the control token."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from autovpn.config import RoutingConfig, state_dir
from autovpn.engine import Engine
from autovpn.monitor.api import request, stream_lines
from autovpn.monitor.engines import ENGINES_DIR, live_records
from autovpn.routing.router import Mode
from autovpn.routing.scoring import SCORES_FILE
from tests.conftest import Certs, engine_config, free_port, http_port, run, socks_port
from tests.routing.dnsserver import FakeDns, dns_server


@asynccontextmanager
async def api_engine(
    certs: Certs,
    local: FakeDns | None = None,
    public: FakeDns | None = None,
    control: str = "127.0.0.1:0",
    **kw: Any,
) -> AsyncIterator[Engine]:
    cfg = engine_config(certs, mode=Mode.SMART)
    cfg.routing = RoutingConfig(
        rules=["domain:proxied.test=proxy", "domain:direct.test=direct"],
        dns_local=[f"127.0.0.1:{local.port}"] if local else [],
        dns_public=[f"127.0.0.1:{public.port}"] if public else [],
        hosts_file=None,
        **kw,
    )
    cfg.control = control
    async with Engine(cfg) as eng:
        yield eng


def url(eng: Engine) -> str:
    assert eng.api is not None
    return eng.api.url


def token_path() -> Path:
    """Where the running engine left its control token (named so in the 401 answer): next
    to its record in the state directory."""
    (record,) = live_records(state_dir())
    return record.token_path


def token() -> str:
    """The running engine's token, read as the CLI reads it."""
    return token_path().read_text(encoding="utf-8").strip()


#: Names a DNS-rebinding page could make a browser send in Host; none of them is loopback.
REBINDING_HOSTS = [
    "127.evil.com",
    "127.0.0.1.nip.io",
    "127.0.0.1.evil.com",
    "localhost.evil",
    "evil.example",
]


def test_status_and_mode_switch(certs: Certs) -> None:
    async def main() -> None:
        async with api_engine(certs) as eng:
            r = await request(url(eng), "GET", "/status")
            st = r.json()
            assert r.status == 200 and st["mode"] == "smart"
            assert {(x["kind"], x["port"]) for x in st["listeners"]} == {
                ("socks5", socks_port(eng)),
                ("http", http_port(eng)),
            }
            assert st["rules"]["user"] == 2 and st["rules"]["proxy"] >= 290
            body = json.dumps({"mode": "direct"}).encode()
            r = await request(url(eng), "POST", "/mode", body, token=token())
            assert r.json() == {"mode": "direct", "previous": "smart"}
            assert eng.mode is Mode.DIRECT
            r = await request(url(eng), "POST", "/mode?mode=global", token=token())
            assert r.status == 200 and eng.mode.value == "global"
            r = await request(url(eng), "POST", "/mode", b'{"mode": "sideways"}', token=token())
            assert r.status == 400 and eng.mode.value == "global"
            assert (await request(url(eng), "GET", "/mode")).json() == {"mode": "global"}

    run(main())


def test_pac_files_use_bound_ports_and_cache_validators(certs: Certs) -> None:
    async def main() -> None:
        async with api_engine(certs) as eng:
            assert eng.api is not None
            r = await request(url(eng), "GET", "/proxy.pac")
            assert r.status == 200
            assert r.headers["content-type"] == "application/x-ns-proxy-autoconfig"
            text = r.body.decode()
            assert "mode smart" in text
            assert f"PROXY 127.0.0.1:{http_port(eng)}; SOCKS5 127.0.0.1:{socks_port(eng)}" in text
            etag, modified = r.headers["etag"], r.headers["last-modified"]
            again = await request(url(eng), "GET", "/proxy.pac", headers={"If-None-Match": etag})
            assert again.status == 304 and again.body == b"" and again.headers["etag"] == etag
            ims = await request(
                url(eng), "GET", "/smart.pac", headers={"If-Modified-Since": modified}
            )
            assert ims.status == 304
            assert eng.api.pacs.generations == 1  # /proxy.pac and /smart.pac: one text
            # A mode switch changes /proxy.pac (a new text, a new ETag) ...
            eng.set_mode(Mode.GLOBAL)
            g = await request(url(eng), "GET", "/proxy.pac", headers={"If-None-Match": etag})
            assert g.status == 200 and "mode global" in g.body.decode()
            assert g.headers["etag"] != etag
            # ... and back: the smart text is cached, not generated again.
            eng.set_mode(Mode.SMART)
            s = await request(url(eng), "GET", "/proxy.pac", headers={"If-None-Match": etag})
            assert s.status == 304
            d = await request(url(eng), "GET", "/direct.pac")
            assert "DIRECT" in d.body.decode()
            head = await request(url(eng), "HEAD", "/global.pac")
            assert head.status == 200 and head.body == b""
            assert eng.api.pacs.generations == 3  # smart, global, direct

    run(main())


def test_pac_names_regex_rules_it_cannot_evaluate(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        cfg = engine_config(certs, mode=Mode.SMART)
        cfg.routing = RoutingConfig(
            rules=["regex:^cdn[0-9]+\\.=direct", "regex:(?i)^ADS\\.=reject"],
            default_lists=False,
            hosts_file=None,
        )
        cfg.control = "127.0.0.1:0"
        async with Engine(cfg) as eng:
            with caplog.at_level(logging.WARNING, logger="autovpn.api"):
                for _ in range(2):
                    text = (await request(url(eng), "GET", "/proxy.pac")).body.decode()
                    assert '// regex "(?i)^ADS\\\\." ("user rules, config:2")' in text
                    assert "^cdn[0-9]+" in text  # the portable one is in the PAC itself
        told = [r.getMessage() for r in caplog.records if "JavaScript" in r.getMessage()]
        assert told == [
            "PAC: regex '(?i)^ADS\\\\.' (user rules, config:2) has no JavaScript equivalent:"
            " the PAC sends every host that reaches it to the engine, which applies it"
        ]

    run(main())


def test_route_explains_and_resolves_with_scores(certs: Certs) -> None:
    async def main() -> None:
        async with (
            dns_server(default_a="127.0.0.3") as local,
            dns_server(default_a="127.0.0.4") as public,
            api_engine(certs, local, public) as eng,
        ):
            r = await request(url(eng), "GET", "/route?host=www.proxied.test&port=443&resolve=1")
            e = r.json()
            assert e["action"] == "proxy" and e["mode"] == "smart"
            assert e["rule"]["value"] == "proxied.test" and e["resolver"] == "public"
            assert [a["address"] for a in e["addresses"]] == ["127.0.0.4"]
            assert e["addresses"][0]["score"] > 0
            d = (await request(url(eng), "GET", "/route?host=a.direct.test&port=80")).json()
            assert d["action"] == "direct" and d["resolver"] == "local" and "addresses" not in d
            assert local.queries == []  # not asked to resolve
            assert public.names() == {"www.proxied.test"}
            bad = await request(url(eng), "GET", "/route?port=99999")
            assert bad.status == 400

    run(main())


def test_batch_resolve_streams_progress_and_warms_the_cache(certs: Certs) -> None:
    async def main() -> None:
        async with (
            dns_server() as local,
            dns_server(latency=0.02) as public,
            api_engine(certs, local, public) as eng,
        ):
            lines: list[dict[str, Any]] = []
            path = "/resolve?list=proxy"
            status = await stream_lines(url(eng), "POST", path, lines.append, token=token())
            assert status == 200
            total = lines[0]["total"]
            assert total >= 290 and len(lines) == total + 2
            assert lines[-1]["done"] == total and lines[-1]["failed"] == 0
            assert local.queries == []
            assert len(public.names()) == total
            assert eng.resolver.cache.get("google.com", "A", asyncio.get_running_loop().time())

    run(main())


def test_bad_requests(certs: Certs) -> None:
    async def main() -> None:
        async with api_engine(certs) as eng:
            assert (await request(url(eng), "GET", "/nope")).status == 404
            assert (await request(url(eng), "DELETE", "/status", token=token())).status == 405
            assert (await request(url(eng), "POST", "/proxy.pac", token=token())).status == 405
            huge = {"X-Filler": "a" * 20_000}
            assert (await request(url(eng), "GET", "/status", headers=huge)).status == 431
            many = {f"X-H{i}": "x" for i in range(100)}
            assert (await request(url(eng), "GET", "/status", headers=many)).status == 431
            r = await request(url(eng), "POST", "/mode", b"x" * 70_000)
            assert r.status == 413
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.api.bound_port)  # type: ignore[union-attr]
            writer.write(b"garbage\r\n\r\n")
            answer = await reader.read()  # aiohttp answers an unparsed request as HTTP/1.0
            assert answer.split(b" ", 2)[1] == b"400" and answer.startswith(b"HTTP/1.")
            writer.close()
            await writer.wait_closed()

    run(main())


def test_requests_are_read_in_any_pieces_and_a_body_that_came_with_the_head_is_kept(
    certs: Certs,
) -> None:
    """A head in several segments, and a body whose first bytes arrived with the head (aiohttp
    parses; a bare-LF head, which RFC 9112 section 2.2 lets a server refuse, is a 400)."""

    async def exchange(eng: Engine, *pieces: bytes) -> bytes:
        assert eng.api is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", eng.api.bound_port)
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)  # separate segments, so the server reads in pieces
            async with asyncio.timeout(10):
                return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def main() -> None:
        async with api_engine(certs) as eng:
            assert eng.api is not None
            # Connection: close, so that reading to the end is reading the answer.
            host = f"Host: 127.0.0.1:{eng.api.bound_port}\r\nConnection: close"
            answer = await exchange(
                eng, b"GET /sta", f"tus HTTP/1.1\r\n{host}\r".encode(), b"\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]
            answer = await exchange(eng, f"GET /mode HTTP/1.1\r\n{host}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'"smart"\n}\n')
            bare = await exchange(eng, f"GET /mode HTTP/1.1\n{host}\n\n".encode())
            assert bare.split(b" ", 2)[1] == b"400"
            body = json.dumps({"mode": "direct"}).encode()
            head = (
                f"POST /mode HTTP/1.1\r\n{host}\r\nAuthorization: Bearer {token()}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            answer = await exchange(eng, head + body[:5], body[5:])
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert eng.mode is Mode.DIRECT

    run(main())


def test_port_conflict_falls_back_and_is_discoverable(certs: Certs) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            cfg = engine_config(certs)
            cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
            cfg.control = f"127.0.0.1:{port}"
            async with Engine(cfg) as eng:
                assert eng.api is not None and eng.api.bound_port not in (0, port)
                (record,) = live_records(state_dir())
                assert record.url == eng.api.url and record.role == "embedded"
                assert (await request(eng.api.url, "GET", "/status")).status == 200
            assert list((state_dir() / ENGINES_DIR).iterdir()) == []

    run(main())


def test_scores_are_saved_at_close_and_loaded_at_start(certs: Certs, tmp_path: Path) -> None:
    async def main() -> None:
        cfg = engine_config(certs)
        cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
        cfg.control = None
        async with Engine(cfg) as eng:
            eng.scores.record_success("127.0.0.7", 0.01, 1.0)
        assert (state_dir() / SCORES_FILE).exists()
        async with Engine(cfg) as eng:
            assert eng.scores.stats["127.0.0.7"].successes == 1
            assert eng.api is None

    run(main())


def test_a_client_leaving_a_streamed_resolve_does_not_break_the_engine(certs: Certs) -> None:
    async def main() -> None:
        async with (
            dns_server() as local,
            dns_server(latency=0.01) as public,
            api_engine(certs, local, public) as eng,
        ):
            assert eng.api is not None
            head = (
                f"POST /resolve?list=proxy&concurrency=5 HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{eng.api.bound_port}\r\n"
                f"Authorization: Bearer {token()}\r\n\r\n"
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.api.bound_port)
            writer.write(head.encode())
            answer = await reader.readuntil(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in answer.lower()
            await reader.readline()  # the first chunk's size
            assert json.loads(await reader.readline())["total"] >= 290
            writer.close()  # leave early
            await writer.wait_closed()
            r = await request(url(eng), "GET", "/status")
            assert r.status == 200 and r.json()["mode"] == "smart"

    run(main())


def test_status_counts_traffic_and_the_cli_prints_it(certs: Certs) -> None:
    from tests.conftest import echo_handler, socks_open, tcp_server

    async def main() -> None:
        async with api_engine(certs) as eng, tcp_server(echo_handler) as echo:
            eng.set_mode(Mode.GLOBAL)
            reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
            writer.write(b"x" * 1000)
            await reader.readexactly(1000)
            st = (await request(url(eng), "GET", "/status")).json()
            assert st["tunnel"]["up"] and st["tunnel"]["connects"] == 1
            (conn,) = st["tunnel"]["connections"]
            assert conn["streams"] == 1 and conn["bytes_out"] > 1000 and conn["bytes_in"] > 1000
            assert st["server"]["streams_opened"] == 1 and st["server"]["streams_open"] == 1
            assert st["connections"]["routed"]["proxy"] == 1
            writer.close()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "autovpn",
                "status",
                "--control",
                url(eng),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            text = out.decode()
            assert "mode global" in text and "tunnel -> wss://127.0.0.1" in text
            assert "1 opened" in text and "proxy 1" in text
            # (open or just ended: the client closed its side before the command ran)
            assert re.search(r"route proxy: [01] open, 1 total, 1000 B up, 1000 B down", text)
            assert "top domains: 127.0.0.1 (1)" in text
            assert f"metrics: {url(eng)}/metrics" in text

    run(main())


def test_web_pages_cannot_drive_the_control_api(certs: Certs) -> None:
    """CSRF: a browser's cross-site or opaque-origin POST is refused even with the token (a
    page cannot have it, but the checks stand on their own); the PAC files stay available to
    browsers, which fetch them with no Origin."""

    async def main() -> None:
        async with api_engine(certs) as eng:
            assert eng.api is not None
            own = f"http://127.0.0.1:{eng.api.bound_port}"
            for headers in (
                {"Origin": "https://evil.example"},
                {"Origin": "null"},
                {"Origin": "http://127.0.0.1:1"},
                {"Sec-Fetch-Site": "cross-site"},
                {"Sec-Fetch-Site": "same-site", "Origin": own},
            ):
                for authorized in (None, token()):
                    r = await request(
                        url(eng), "POST", "/mode?mode=direct", headers=headers, token=authorized
                    )
                    assert r.status == 403, headers
                    assert eng.mode is Mode.SMART
            r = await request(url(eng), "GET", "/status", headers={"Origin": "null"})
            assert r.status == 403
            r = await request(url(eng), "GET", "/status", headers={"Sec-Fetch-Site": "same-site"})
            assert r.status == 403
            # Not even the PAC files answer an opaque origin (a sandboxed frame, a file: page).
            pac = await request(url(eng), "GET", "/proxy.pac", headers={"Origin": "null"})
            assert pac.status == 403
            # A browser's own PAC fetch: Chromium 156 sends Host 127.0.0.1:PORT and no Origin
            # or Fetch Metadata (tests/e2e/test_chromium_pac.py fetches it for real); a
            # user-typed URL carries Sec-Fetch-Site: none.
            for headers in ({}, {"Sec-Fetch-Site": "none"}):
                pac = await request(url(eng), "GET", "/proxy.pac", headers=headers)
                assert pac.status == 200 and b"FindProxyForURL" in pac.body
            # Our own origin may change the mode, with the token.
            r = await request(
                url(eng),
                "POST",
                "/mode?mode=direct",
                headers={"Origin": own, "Sec-Fetch-Site": "same-origin"},
                token=token(),
            )
            assert r.status == 200 and eng.mode.value == "direct"

    run(main())


def test_rebinding_hosts_are_refused_on_every_route(certs: Certs) -> None:
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 makes the browser send its
    own name in Host; no route answers it, the PAC files included."""

    async def main() -> None:
        async with api_engine(certs) as eng:
            assert eng.api is not None
            port = eng.api.bound_port
            for name in REBINDING_HOSTS:
                for path in ("/status", "/proxy.pac", "/smart.pac", "/mode", "/route?host=a.b"):
                    r = await request(url(eng), "GET", path, headers={"Host": f"{name}:{port}"})
                    assert r.status == 421, (name, path, r.status)
                    assert r.body.count(b"\n") == 1 and name in r.json()["error"]
                r = await request(
                    url(eng), "POST", "/mode?mode=direct", headers={"Host": f"{name}:{port}"}
                )
                assert r.status == 421 and eng.mode is Mode.SMART
            # A loopback address with another port is not us either; no port means port 80.
            for host in (f"127.0.0.1:{port + 1}", "127.0.0.1", "localhost"):
                r = await request(url(eng), "GET", "/status", headers={"Host": host})
                assert r.status == 421, host
            # What browsers send for http://127.0.0.1:PORT/proxy.pac and its spellings.
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
                for path in ("/status", "/proxy.pac"):
                    r = await request(url(eng), "GET", path, headers={"Host": host})
                    assert r.status == 200, (host, path)

    run(main())


def test_state_changes_need_the_token(certs: Certs) -> None:
    """POST /mode and POST /resolve without the token, or with a wrong one: 401 naming the
    token file, and nothing changes."""

    async def main() -> None:
        async with (
            dns_server() as local,
            dns_server() as public,
            api_engine(certs, local, public) as eng,
        ):
            r = await request(url(eng), "POST", "/mode?mode=direct")
            assert r.status == 401 and eng.mode is Mode.SMART
            assert str(token_path()) in r.json()["error"]
            assert r.headers["www-authenticate"].startswith("Bearer")
            for wrong in ("", "x" * 43, token()[:-1], token() + "x"):
                r = await request(url(eng), "POST", "/mode?mode=direct", token=wrong)
                assert r.status == 401 and eng.mode is Mode.SMART
            basic = {"Authorization": f"Basic {token()}"}
            r = await request(url(eng), "POST", "/mode?mode=direct", headers=basic)
            assert r.status == 401 and eng.mode is Mode.SMART
            lines: list[dict[str, Any]] = []
            status = await stream_lines(url(eng), "POST", "/resolve?list=all", lines.append)
            assert status == 401 and "control token" in lines[0]["error"]
            assert local.queries == [] and public.queries == []
            # Reads need none.
            for path in ("/status", "/mode", "/route?host=a.b", "/proxy.pac"):
                assert (await request(url(eng), "GET", path)).status == 200, path
            r = await request(url(eng), "POST", "/mode?mode=direct", token=token())
            assert r.status == 200 and eng.mode.value == "direct"

    run(main())


@pytest.mark.skipif(not hasattr(os, "umask"), reason="POSIX file modes")
def test_the_token_file_is_private_new_at_each_start_and_never_logged(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engines = state_dir() / ENGINES_DIR
    engines.mkdir(parents=True)
    port = free_port()
    leftover = engines / f"embedded-127.0.0.1-{port}.token"
    # A leftover from an old run at the same address, readable by everyone: replaced.
    leftover.write_text("old-token\n")
    leftover.chmod(0o644)

    async def main() -> list[str]:
        tokens = []
        for _ in range(2):
            old_umask = os.umask(0)  # the file's mode must not depend on the umask
            try:
                async with api_engine(certs, control=f"127.0.0.1:{port}") as eng:
                    os.umask(old_umask)
                    assert token_path() == leftover
                    info = leftover.stat()
                    assert stat.S_IMODE(info.st_mode) == 0o600
                    assert info.st_uid == os.getuid()
                    tokens.append(token())
                    assert len(tokens[-1]) >= 43  # 32 random bytes
                    r = await request(url(eng), "POST", "/mode?mode=direct", token="old-token")
                    assert r.status == 401
                    if len(tokens) == 2:  # the first engine's token is gone with it
                        r = await request(url(eng), "POST", "/mode?mode=direct", token=tokens[0])
                        assert r.status == 401
                    r = await request(url(eng), "POST", "/mode?mode=direct", token=tokens[-1])
                    assert r.status == 200
                    st = (await request(url(eng), "GET", "/status")).json()
                    assert tokens[-1] not in json.dumps(st)
            finally:
                os.umask(old_umask)
            assert not leftover.exists()
        return tokens

    tokens = run(main())
    assert tokens[0] != tokens[1]
    assert list(engines.iterdir()) == []  # no record, token or temporary file left
    for tok in tokens:
        assert tok not in caplog.text


def test_control_hosts_are_accepted_with_the_bound_port(certs: Certs) -> None:
    async def main() -> None:
        cfg = engine_config(certs)
        cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
        cfg.control = "127.0.0.1:0"
        cfg.control_hosts = ["autovpn.test"]
        async with Engine(cfg) as eng:
            assert eng.api is not None
            port = eng.api.bound_port
            ok = await request(
                eng.api.url, "GET", "/status", headers={"Host": f"autovpn.test:{port}"}
            )
            assert ok.status == 200
            r = await request(
                eng.api.url, "GET", "/status", headers={"Host": f"x.autovpn.test:{port}"}
            )
            assert r.status == 421

    run(main())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_control_api_takes_the_clients_bracketed_host(certs: Certs) -> None:
    async def main() -> None:
        cfg = engine_config(certs, mode=Mode.SMART)
        cfg.routing = RoutingConfig(default_lists=False, hosts_file=None, dns_local=[])
        cfg.control = "[::1]:0"
        async with Engine(cfg) as eng:
            assert eng.api is not None and eng.api.url.startswith("http://[::1]:")
            assert (await request(eng.api.url, "GET", "/proxy.pac")).status == 200
            r = await request(eng.api.url, "POST", "/mode?mode=direct", token=token())
            assert r.status == 200 and eng.mode is Mode.DIRECT

    run(main())
