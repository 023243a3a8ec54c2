"""Prometheus's way to a server's counters, as docs/deploy.md ("Monitoring") sets it up: nginx
with deploy/nginx-metrics.conf in front of a real ``autovpn server``'s control API, scraped
as deploy/prometheus.yml says (scheme, path, basic auth with the password from its file).

Prometheus itself is not run (not packaged for the test machine's budget): its job is read
from the YAML and followed field by field, and the answer is parsed with prometheus_client's
own parser, which reads the same text format."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Certs, free_port, run
from tests.e2e.test_fleet import DEPLOY, _replace_once, nginx_running
from tests.processes import autovpn

PASSWORD = "scrape-password-0123"


def _job() -> dict[str, Any]:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "autovpn"
    return dict(job)


def _nginx_main(tmp_path: Path, front: int, control: int, certs: Certs, users: Path) -> Path:
    text = (DEPLOY / "nginx-metrics.conf").read_text()
    text = _replace_once(text, "listen 9443 ssl;", f"listen 127.0.0.1:{front} ssl;")
    text = _replace_once(text, "listen [::]:9443 ssl;", "")
    text = _replace_once(
        text, "/etc/letsencrypt/live/vpn.example.net/fullchain.pem", str(certs.cert)
    )
    text = _replace_once(text, "/etc/letsencrypt/live/vpn.example.net/privkey.pem", str(certs.key))
    text = _replace_once(
        text,
        "auth_basic_user_file /etc/nginx/autovpn-metrics.htpasswd;",
        f"auth_basic_user_file {users};",
    )
    text = _replace_once(
        text, "http://127.0.0.1:9090/metrics", f"http://127.0.0.1:{control}/metrics"
    )
    copy = tmp_path / "nginx-metrics.conf"
    copy.write_text(text)
    temp = "".join(
        f"    {kind}_temp_path {tmp_path / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = tmp_path / "main-metrics.conf"
    main.write_text(
        # Its workers read the password file in the test's directory (root's, 0700):
        # as root they would be "nobody" and get a 500.
        f"{'user root;' if os.geteuid() == 0 else ''}\nworker_processes 1;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{temp}    include {copy};\n}}\n"
    )
    return main


def _apr1(password: str) -> str:
    """nginx's hash of ``password``, made as deploy/nginx-metrics.conf says."""
    done = subprocess.run(
        ["openssl", "passwd", "-apr1", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _get(url: str, certs: Certs, auth: tuple[str, str] | None) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(certs.ca))
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_prometheus_scrapes_a_server_through_nginx(certs: Certs, tmp_path: Path) -> None:
    run(_scrape(certs, tmp_path))


async def _scrape(certs: Certs, tmp_path: Path) -> None:
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.skip("nginx and openssl are needed (apt-get install nginx openssl)")
    job = _job()
    # The password file Prometheus reads, and nginx's hash of it, made as the doc says.
    password_file = tmp_path / "autovpn-metrics.password"
    password_file.write_text(PASSWORD + "\n")
    hashed = await asyncio.to_thread(_apr1, PASSWORD)
    users = tmp_path / "autovpn-metrics.htpasswd"
    username = job["basic_auth"]["username"]
    users.write_text(f"{username}:{hashed}\n")
    front, control, tunnel = free_port(), free_port(), free_port()
    args = ("server", f"ws://127.0.0.1:{tunnel}", "--control-api", f"127.0.0.1:{control}")
    async with autovpn(*args, state=tmp_path / "state"):
        main = _nginx_main(tmp_path, front, control, certs, users)
        with nginx_running(tmp_path, main, front):
            target = f"{job['scheme']}://127.0.0.1:{front}"
            password = password_file.read_text().strip()
            status, body = await asyncio.to_thread(
                _get, target + job["metrics_path"], certs, (username, password)
            )
            assert status == 200, body
            names = {family.name for family in text_string_to_metric_families(body)}
            assert "autovpn_server_tunnel_connections" in names, sorted(names)
            # No password, a wrong one, and the rest of the API: nothing gets through.
            assert (await asyncio.to_thread(_get, target + "/metrics", certs, None))[0] == 401
            wrong = (username, "guess")
            assert (await asyncio.to_thread(_get, target + "/metrics", certs, wrong))[0] == 401
            auth = (username, password)
            assert (await asyncio.to_thread(_get, target + "/status", certs, auth))[0] == 404
