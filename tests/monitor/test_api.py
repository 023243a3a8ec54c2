"""The control API against a running engine: status, mode switching, route, batch resolve,
and the PAC files (ports actually bound, ETag/Last-Modified, 304, regenerated only on change)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from autovpn.config import RoutingConfig, state_dir
from autovpn.engine import Engine
from autovpn.monitor.api import CONTROL_STATE_FILE, read_control_state, request, stream_lines
from autovpn.routing.router import Mode
from autovpn.routing.scoring import SCORES_FILE
from tests.conftest import Certs, engine_config, http_port, run, socks_port
from tests.routing.dnsserver import FakeDns, dns_server


@asynccontextmanager
async def api_engine(
    certs: Certs, local: FakeDns | None = None, public: FakeDns | None = None, **kw: Any
) -> AsyncIterator[Engine]:
    cfg = engine_config(certs, mode=Mode.SMART)
    cfg.routing = RoutingConfig(
        rules=["domain:proxied.test=proxy", "domain:direct.test=direct"],
        dns_local=[f"127.0.0.1:{local.port}"] if local else [],
        dns_public=[f"127.0.0.1:{public.port}"] if public else [],
        hosts_file=None,
        **kw,
    )
    cfg.control = "127.0.0.1:0"
    async with Engine(cfg) as eng:
        yield eng


def url(eng: Engine) -> str:
    assert eng.api is not None
    return eng.api.url


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
            r = await request(url(eng), "POST", "/mode", json.dumps({"mode": "direct"}).encode())
            assert r.json() == {"mode": "direct", "previous": "smart"}
            assert eng.mode is Mode.DIRECT
            r = await request(url(eng), "POST", "/mode?mode=global")
            assert r.status == 200 and eng.mode.value == "global"
            r = await request(url(eng), "POST", "/mode", b'{"mode": "sideways"}')
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
            status = await stream_lines(url(eng), "POST", "/resolve?list=proxy", lines.append)
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
            assert (await request(url(eng), "DELETE", "/status")).status == 405
            assert (await request(url(eng), "POST", "/proxy.pac")).status == 405
            huge = {"X-Filler": "a" * 20_000}
            assert (await request(url(eng), "GET", "/status", headers=huge)).status == 431
            r = await request(url(eng), "POST", "/mode", b"x" * 70_000)
            assert r.status == 413
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.api.bound_port)  # type: ignore[union-attr]
            writer.write(b"garbage\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()
            await writer.wait_closed()

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
                assert read_control_state(state_dir()) == eng.api.url
                assert (await request(eng.api.url, "GET", "/status")).status == 200
            assert not (state_dir() / CONTROL_STATE_FILE).exists()

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
            reader, writer = await asyncio.open_connection("127.0.0.1", eng.api.bound_port)
            writer.write(
                b"POST /resolve?list=proxy&concurrency=5 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            await reader.readuntil(b"\r\n\r\n")
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

    run(main())


def test_web_pages_cannot_drive_the_control_api(certs: Certs) -> None:
    """CSRF and DNS rebinding: a browser's cross-site POST, or a request naming a foreign host,
    is refused; the PAC files stay available to browsers."""

    async def main() -> None:
        async with api_engine(certs) as eng:
            csrf = await request(
                url(eng), "POST", "/mode?mode=direct", headers={"Origin": "https://evil.example"}
            )
            assert csrf.status == 403 and eng.mode is Mode.SMART
            rebound = await request(url(eng), "GET", "/status", headers={"Host": "evil.example"})
            assert rebound.status == 403
            fetch = await request(
                url(eng), "POST", "/mode?mode=direct", headers={"Sec-Fetch-Site": "cross-site"}
            )
            assert fetch.status == 403 and eng.mode is Mode.SMART
            pac = await request(url(eng), "GET", "/proxy.pac", headers={"Origin": "null"})
            assert pac.status == 200

    run(main())
