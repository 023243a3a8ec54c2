"""The ``[routing]`` config table, check-config's routing errors, and the routing CLI commands
(``mode``, ``route``, ``pac``) against a running engine and without one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from autovpn.cli import main
from autovpn.config import RoutingConfig, load_file, parse_config
from autovpn.engine import Engine
from autovpn.routing.router import Action, Mode
from tests.conftest import Certs, engine_config, free_port, run


def test_routing_table_maps_to_the_router(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("||blocked.test\n@@||ok.blocked.test\n! comment\n")
    data = {
        "mode": "smart",
        "control": "127.0.0.1:9191",
        "routing": {
            "default": "direct",
            "rules": ["keyword:ads=reject", "DOMAIN-SUFFIX,corp.test,PROXY"],
            "lists": [{"path": "mine.txt", "format": "autoproxy"}],
            "proxy_add": ["extra.test"],
            "remove": ["google.com"],
            "dns": {"local": ["127.0.0.1:5353"], "public": ["9.9.9.9"], "hosts_file": False},
        },
    }
    cfg, errors = parse_config(data, tmp_path)
    assert errors == []
    assert cfg.control == "127.0.0.1:9191"
    rc = cfg.routing
    assert rc.dns_local == ["127.0.0.1:5353"] and rc.hosts_file is None
    router = rc.build_router(cfg.mode)
    assert router.default is Action.DIRECT
    assert router.decide("x.ads.example", 443).action is Action.REJECT
    assert router.decide("www.blocked.test", 443).action is Action.PROXY
    assert router.decide("ok.blocked.test", 443).action is Action.DIRECT
    assert router.decide("a.extra.test", 443).action is Action.PROXY
    assert router.decide("www.google.com", 443).action is Action.DIRECT  # removed: default
    assert router.decide("www.youtube.com", 443).action is Action.PROXY  # shipped list


def test_routing_errors_carry_their_keys(tmp_path: Path) -> None:
    data = {
        "control": "0.0.0.0:9090",
        "routing": {
            "default": "maybe",
            "rules": ["nonsense", 7],
            "lists": [{"path": "missing.txt", "format": "yaml"}, {"nope": 1}],
            "bogus": 1,
            "dns": {"local": ["dns.example"], "concurrency": 0, "extra": True},
        },
    }
    _, errors = parse_config(data, tmp_path)
    keys = {e.key for e in errors}
    assert keys == {
        "control",
        "routing.default",
        "routing.rules[0]",
        "routing.rules[1]",
        "routing.lists[0].path",
        "routing.lists[0].format",
        "routing.lists[1]",
        "routing.bogus",
        "routing.dns.local[0]",
        "routing.dns.concurrency",
        "routing.dns.extra",
    }


def test_check_config_reports_routing_keys_and_list_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[routing]\nrules = ["what=ever=zzz"]\n')
    assert main(["check-config", str(bad)]) == 1
    assert "routing.rules[0]" in capsys.readouterr().err
    (tmp_path / "list.txt").write_text("good.test\nnot a domain\n")
    ok = tmp_path / "ok.toml"
    ok.write_text('[routing]\nlists = ["list.txt"]\n')
    assert main(["check-config", str(ok)]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out and "list.txt:2:" in out.err


def test_pac_command_without_an_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["pac", "--mode", "smart", "--control", dead]) == 0
    text = capsys.readouterr().out
    assert text.startswith("// autovpn PAC, mode smart")
    assert "PROXY 127.0.0.1:8080; SOCKS5 127.0.0.1:1080" in text


def test_route_command_without_an_engine(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["route", "www.youtube.com", "--json", "--control", dead]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["mode"] == "global" and e["action"] == "proxy"  # the default config's mode
    assert e["engine"].startswith("not running")


def test_mode_and_route_commands_talk_to_the_running_engine(
    certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main_() -> None:
        cfg = engine_config(certs, mode=Mode.GLOBAL)
        cfg.routing = RoutingConfig(hosts_file=None, dns_local=[], rules=["x.test=direct"])
        cfg.control = "127.0.0.1:0"
        async with Engine(cfg) as eng:
            assert eng.api is not None
            u = eng.api.url
            assert await asyncio.to_thread(main, ["mode", "smart", "--control", u]) == 0
            assert eng.mode is Mode.SMART
            rc = await asyncio.to_thread(main, ["route", "a.x.test", "80", "--control", u])
            assert rc == 0
            # Found without --control: through its record in the state directory.
            assert await asyncio.to_thread(main, ["mode", "direct"]) == 0
            assert eng.mode.value == "direct"
            assert await asyncio.to_thread(main, ["pac"]) == 0

    run(main_())
    out = capsys.readouterr().out
    assert "mode global -> smart" in out
    assert "a.x.test:80  ->  DIRECT" in out and "engine running" in out
    assert "mode smart -> direct" in out
    assert 'return "DIRECT"' in out  # the direct-mode PAC


def test_mode_command_without_an_engine_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["mode", "smart", "--control", dead]) == 1
    assert "no running engine" in capsys.readouterr().err


def test_load_file_keeps_existing_keys_working(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('mode = "direct"\nlog_level = "debug"\n')
    cfg, errors = load_file(f)
    assert errors == [] and cfg.mode is Mode.DIRECT and cfg.control == "127.0.0.1:9090"
    assert cfg.routing == RoutingConfig()


def test_resolve_command_streams_from_the_running_engine(
    certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.routing.dnsserver import dns_server

    async def main_() -> None:
        async with dns_server() as local, dns_server() as public:
            cfg = engine_config(certs, mode=Mode.SMART)
            cfg.routing = RoutingConfig(
                hosts_file=None,
                dns_local=[f"127.0.0.1:{local.port}"],
                dns_public=[f"127.0.0.1:{public.port}"],
            )
            cfg.control = "127.0.0.1:0"
            async with Engine(cfg) as eng:
                assert eng.api is not None
                argv = ["resolve", "--list", "all", "--concurrency", "20", "--control", eng.api.url]
                assert await asyncio.to_thread(main, argv) == 0
                direct = set(eng.list_names("direct"))
                proxied = set(eng.list_names("proxy"))
            # Split even in a batch: each list went to its own resolver.
            assert local.names() == direct - proxied
            assert public.names() == proxied

    run(main_())
    assert "the running engine's cache is warm" in capsys.readouterr().out


def test_resolve_command_in_process_without_an_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No engine running: the command starts the embedded tunnel itself (no listeners)."""
    from tests.routing.dnsserver import dns_server

    async def main_() -> None:
        async with dns_server() as local:
            conf = tmp_path / "c.toml"
            conf.write_text(
                'mode = "smart"\ncontrol = "127.0.0.1:1"\n[routing]\ndefault_lists = false\n'
                'direct_add = ["a.direct.test", "b.direct.test"]\n'
                f'[routing.dns]\nlocal = ["127.0.0.1:{local.port}"]\nhosts_file = false\n'
            )
            argv = ["--config", str(conf), "resolve", "--list", "direct"]
            # A config without [client]/[server] runs the embedded default.
            assert await asyncio.to_thread(main, argv) == 0
            assert local.names() == {"a.direct.test", "b.direct.test"}

    run(main_())
    assert "resolved 2 names from the direct list" in capsys.readouterr().out
