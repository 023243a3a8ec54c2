"""The dashboard in a real headless Chromium (Debian's, driven by Playwright; never
``playwright install``): it loads from the engine with nothing fetched elsewhere, its figures
change when traffic flows through the engine, and a click on a mode switches the engine's
mode with the page's own token (the control token never reaches the page)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from autovpn.engine import Engine
from autovpn.routing.router import Mode
from tests.conftest import (
    Certs,
    echo_handler,
    env_without_proxies,
    run,
    socks_open,
    socks_port,
    tcp_server,
)
from tests.monitor.test_stats import stats_config

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--no-proxy-server",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason="Chromium not installed (apt-get install --no-install-recommends chromium)",
    ),
]

T = TypeVar("T")


def test_the_dashboard_shows_live_traffic_and_switches_the_mode(
    certs: Certs, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    screenshot = os.environ.get("AUTOVPN_DASHBOARD_SCREENSHOT")  # docs/dashboard.png

    async def main() -> None:
        cfg = stats_config(certs)
        cfg.control = "127.0.0.1:0"
        loop = asyncio.get_running_loop()
        async with Engine(cfg) as eng, tcp_server(echo_handler) as echo:
            assert eng.api is not None
            url = eng.api.url
            kept: list[Any] = []

            async def traffic(size: int) -> None:
                reader, writer = await socks_open(socks_port(eng), "127.0.0.1", echo)
                writer.write(b"x" * size)
                await reader.readexactly(size)
                kept.append(writer)  # stays open: the connections table shows it

            def in_engine(coro: Coroutine[Any, Any, T]) -> T:
                return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

            def browse() -> list[str]:
                requested: list[str] = []
                with playwright.sync_playwright() as p:
                    context = p.chromium.launch_persistent_context(
                        str(tmp_path / "profile"),
                        executable_path=CHROMIUM,
                        headless=True,
                        args=ARGS,
                        env=env_without_proxies(),
                        viewport={"width": 1200, "height": 900},
                        # Playwright's waits evaluate strings, which the page's CSP forbids
                        # (as it should): the policy itself is checked on the answer below.
                        bypass_csp=True,
                    )
                    try:
                        page = context.new_page()
                        page.on("request", lambda r: requested.append(r.url))
                        answer = page.goto(url + "/")
                        assert answer is not None and answer.status == 200
                        csp = answer.headers["content-security-policy"]
                        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
                        page.wait_for_function(
                            "document.getElementById('summary').textContent.includes('mode global')"
                        )
                        assert "tunnel up" in page.inner_text("#summary")
                        assert "none" in page.inner_text("#connections")
                        assert f"{url}/proxy.pac" in page.inner_text("#pac")
                        in_engine(traffic(50_000))
                        # The next polls show it: 50000 bytes each way, the open connection.
                        page.wait_for_function(
                            "document.getElementById('routes').textContent.includes('48.8 KiB')"
                        )
                        assert re.search(r"127\.0\.0\.1:\d+", page.inner_text("#connections"))
                        assert "proxy" in page.inner_text("#connections")
                        assert "wss://127.0.0.1:" in page.inner_text("#servers")
                        in_engine(traffic(200_000))
                        page.wait_for_function(
                            "/[1-9][0-9.]* KiB\\/s/.test("
                            "document.getElementById('rates').textContent)"
                        )
                        page.click("button[data-mode=direct]")
                        page.wait_for_function(
                            "document.querySelector('button.active').dataset.mode === 'direct'"
                        )
                        if screenshot:
                            page.click("button[data-mode=smart]")
                            page.wait_for_timeout(2500)
                            page.screenshot(path=screenshot, full_page=True)
                        html = page.content()
                    finally:
                        context.close()
                assert eng.api is not None and eng.api.token not in html
                return requested

            requested = await asyncio.to_thread(browse)
            assert eng.mode is (Mode.SMART if screenshot else Mode.DIRECT)
            # Nothing but the engine's own origin: no CDN, no other host.
            assert requested and all(r.startswith(url + "/") for r in requested), requested
            for writer in kept:
                writer.close()

    run(main())
