"""The files in deploy/, checked by the programs that load them, and docs/deploy.md, which shows
them as they are.  (The balancers also run for real in tests/e2e/test_fleet.py.)  A program
that is not installed skips its check; CI installs them all (.ci/run)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Certs
from tests.e2e.test_fleet import nginx_config, nginx_stream_module

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "autovpn-server.service"


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "autovpn", *args, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _exec_start(text: str) -> list[str]:
    """The unit's ExecStart, its continued lines joined, split as systemd splits it."""
    joined = re.sub(r"\\\n\s*", " ", text)
    [line] = [ln for ln in joined.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_runs_autovpn_server_with_flags_that_exist() -> None:
    argv = _exec_start(UNIT.read_text())
    assert Path(argv[0]).name == "autovpn"
    assert "server" in argv, argv
    split = argv.index("server")
    for before, after in ((argv[1:split], ()), (argv[split + 1 :], ("server",))):
        options = _help(*after)
        for arg in before:
            if arg.startswith("--"):
                assert re.search(rf"(^|[\s,]){re.escape(arg)}\b", options), f"{arg} in {after}"
    listen = argv[split + 1]
    assert listen.startswith("wss://"), listen


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    autovpn = Path(sys.executable).parent / "autovpn"
    assert autovpn.is_file(), "the autovpn script of this environment (pip install -e .)"
    unit = tmp_path / UNIT.name
    # The one change: the ExecStart binary must exist here for verify to pass.
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/autovpn", str(autovpn)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_the_firewall_passes_nft_check() -> None:
    nft = shutil.which("nft")
    if nft is None:
        pytest.skip("nft is not installed (apt-get install nftables)")
    # -c: checked by the kernel, applied nowhere; in a network namespace of its own if this
    # process may make one, so that nothing can touch the machine's own rules.
    args = [nft, "-c", "-f", str(DEPLOY / "autovpn.nft")]
    unshare = shutil.which("unshare")
    if unshare is not None and subprocess.run([unshare, "-n", "true"]).returncode == 0:
        args = [unshare, "-n", *args]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        pytest.skip(f"nft cannot talk to the kernel here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr


def test_haproxy_accepts_its_config() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    env = dict(
        os.environ,
        AUTOVPN_FRONTEND="127.0.0.1:1443",
        AUTOVPN_SERVER_1="127.0.0.1:2443",
        AUTOVPN_SERVER_2="127.0.0.1:3443",
    )
    done = subprocess.run(
        [haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALERT" not in done.stdout + done.stderr and "WARNING" not in done.stdout + done.stderr


@pytest.mark.parametrize("name", ["nginx-stream.conf", "nginx-wss.conf"])
def test_nginx_accepts_its_configs(certs: Certs, tmp_path: Path, name: str) -> None:
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    if name == "nginx-stream.conf" and nginx_stream_module() is None:
        pytest.skip("this nginx has no stream module (apt-get install libnginx-mod-stream)")
    main = nginx_config(tmp_path, name, 1443, [2443, 3443], certs)
    done = subprocess.run(
        [
            nginx,
            "-t",
            "-p",
            str(tmp_path),
            "-e",
            "stderr",
            "-c",
            str(main),
            "-g",
            f"pid {tmp_path / 'nginx.pid'};",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "[warn]" not in done.stderr, done.stderr


def test_the_deploy_doc_shows_every_file_as_it_is() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    shown = dict(re.findall(r"<!-- (deploy/\S+) -->\n```[a-z]*\n(.*?)```\n", doc, re.S))
    files = {f"deploy/{p.name}" for p in DEPLOY.iterdir() if p.is_file()}
    assert set(shown) == files
    for name, text in shown.items():
        assert text == (ROOT / name).read_text(), f"{name} differs from docs/deploy.md"
