"""README.md's quick start and "A real set-up" run as written, so the README cannot drift.

The ```sh blocks of those two sections are read from README.md (never copied here) and each
command runs in order, in a temporary directory, inside a private network namespace the test
makes: the README's fixed ports (1080, 8080, 8443, 9090) and its ``0.0.0.0`` are that
namespace's own, and nothing leaves it.  Every process has HOME and AUTOVPN_STATE_DIR in the
temporary directory, and the test's virtual environment first on PATH.

What cannot work literally here is substituted, and only that:

1. ``python3 -m venv .venv && . .venv/bin/activate`` is not run, and ``pip install ...``
   is dropped from ``pip install . && python -m autovpn``: the test runs in the virtual
   environment that has this checkout installed (its ``python`` and ``autovpn`` come first on
   PATH); the rest of the line runs.
2. ``https://example.org/`` becomes ``http://127.0.0.1:8000/``: an origin the test serves in
   the namespace (``python -m http.server``), since nothing outside is reachable.
3. ``vpn.example.net`` becomes ``127.0.0.1``, in every command (the certificate's ``--name``
   and the URLs): the server's name resolves nowhere here, and the system resolver is never
   asked for a test name.
4. ``wstunnel client ...`` (a stock wstunnel, not autovpn) runs only where a ``wstunnel``
   program is installed.

How the commands run: ``autovpn server|client`` and ``python -m autovpn`` keep running, as in
a terminal of their own; the test waits for the start-up banner, and for a client until
``autovpn status`` shows its tunnel up (so TLS, the secret and the client certificate worked).
Each block is one machine's terminal: a later ``autovpn server`` replaces the running server,
a later client the running client; at the end of a section every engine is stopped with
SIGTERM and must exit 0.  Every other command must exit 0, and ``curl`` must fetch the origin.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICK_START = "autovpn"  # the title: the section before the first "##" heading
REAL_SETUP = "A real set-up"
ORIGIN_PORT = 8000
ORIGIN_BODY = "hello from the README test's origin\n"
BANNER = re.compile(r"^autovpn \S+ running ")


# -- reading README.md ----------------------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """Each heading's ```sh blocks, as commands: continuation lines joined, comment-only and
    blank lines left out."""
    found: dict[str, list[str]] = {}
    heading = ""
    fence = ""  # the open fence's language ("sh", "python", ...), "" outside one
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not fence and line.startswith("#"):
            heading = line.lstrip("#").strip()
            found.setdefault(heading, [])
        elif not fence and stripped.startswith("```"):
            fence, block = stripped[3:].strip() or "text", []
        elif fence and stripped == "```":
            if fence == "sh":
                found[heading] += commands(block)
            fence = ""
        elif fence:
            block.append(line)
    return found


def commands(lines: list[str]) -> list[str]:
    out: list[str] = []
    current = ""
    for line in lines:
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current and not current.startswith("#"):
            out.append(current)
        current = ""
    return out


def test_the_readme_has_the_sections_this_test_runs() -> None:
    found = sections(README.read_text("utf-8"))
    assert any(c.startswith("pip install . && python -m autovpn") for c in found[QUICK_START])
    assert any(c.startswith("autovpn server ") for c in found[REAL_SETUP])
    assert any(c.startswith("autovpn client ") for c in found[REAL_SETUP])


def test_the_readme_test_command_is_the_ci_command() -> None:
    """.ci/run runs the README's test command: keep the two in step."""
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    command = re.search(r"^test_command='(.*)'$", ci, re.M)
    assert command is not None
    readme = sections(README.read_text("utf-8"))["Running the tests"]
    assert readme == [f"pip install -e '.[test]' && {command.group(1)}"]


# -- the substitutions ----------------------------------------------------------------------


def substituted(command: str) -> str | None:
    """The command as the test runs it (module docstring, 1-3), or None: not run (1, 4)."""
    if re.fullmatch(r"python3 -m venv \.venv && \. \.venv/bin/activate( +#.*)?", command):
        return None
    command = re.sub(r"^pip install [^&]*&& ", "", command)
    assert not command.startswith("pip "), command
    command = command.replace("https://example.org/", f"http://127.0.0.1:{ORIGIN_PORT}/")
    command = command.replace("vpn.example.net", "127.0.0.1")
    if command.startswith("wstunnel ") and shutil.which("wstunnel") is None:
        return None
    return command


def test_the_substitutions_are_only_those() -> None:
    assert substituted("python3 -m venv .venv && . .venv/bin/activate  # a venv") is None
    assert substituted("pip install . && python -m autovpn   # x") == "python -m autovpn   # x"
    assert substituted("curl -x http://127.0.0.1:8080 https://example.org/") == (
        f"curl -x http://127.0.0.1:8080 http://127.0.0.1:{ORIGIN_PORT}/"
    )
    assert substituted("autovpn cert . --name vpn.example.net") == "autovpn cert . --name 127.0.0.1"
    assert substituted("openssl x509 -req -in alice.csr") == "openssl x509 -req -in alice.csr"


# -- running them ---------------------------------------------------------------------------


def _namespace_skip() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the README's commands run in a Linux network namespace"
    missing = [tool for tool in ("unshare", "nsenter", "ip", "curl") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian: util-linux, iproute2, curl)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "cannot create a private network namespace here (not root?)"
    return None


@dataclass
class Machine:
    """The namespace, and the commands that keep running in it (one per role)."""

    holder: subprocess.Popen[bytes]
    cwd: Path
    env: dict[str, str]
    running: dict[str, tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *args]

    def run(
        self, command: str, timeout: float = 120, *, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``command`` through sh in the namespace; logged unless ``quiet`` (the test's own)."""
        if not quiet:
            self.log.append(f"$ {command}")
        done = subprocess.run(
            self.argv("sh", "-c", command),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if not quiet:
            self.log.append(done.stdout + done.stderr)
        return done

    def start(self, role: str, command: str) -> None:
        """A command that keeps running, as in a terminal of its own (replacing the one of
        its role); returns once it is ready."""
        self.stop(role)
        self.log.append(f"$ {command} &")
        output = self.cwd / f"{role}-{len(self.log)}.out"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                self.argv(*shlex.split(command, comments=True)),
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.running[role] = (command, proc, output)
        deadline = time.monotonic() + 30
        while not self.ready(role, command, output):
            if proc.poll() is not None or time.monotonic() > deadline:
                text = output.read_text(errors="replace")
                raise AssertionError(f"{command!r} did not start:\n{text}")
            time.sleep(0.1)

    def ready(self, role: str, command: str, output: Path) -> bool:
        if command.startswith("wstunnel "):  # its SOCKS5 listener accepts
            probe = "import socket; socket.create_connection(('127.0.0.1', 1080))"
            return self.run(f'python3 -c "{probe}"', quiet=True).returncode == 0
        if not any(BANNER.match(line) for line in output.read_text(errors="replace").splitlines()):
            return False
        if role == "server":
            return True
        status = self.run(f"autovpn status --role {engine_role(command)} --json", quiet=True)
        return status.returncode == 0 and bool(json.loads(status.stdout)["tunnel"]["up"])

    def stop(self, role: str) -> None:
        if role not in self.running:
            return
        command, proc, output = self.running.pop(role)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{command!r} did not stop on SIGTERM") from None
        text = output.read_text(errors="replace")
        self.log.append(text)
        assert code == 0, f"{command!r} exited {code}:\n{text}"
        assert "Traceback" not in text, text

    def stop_all(self) -> None:
        for role in reversed(list(self.running)):  # the client before its server
            self.stop(role)


def engine_role(command: str) -> str:
    """``client``, ``server``, ``embedded`` (``python -m autovpn``), or "" for a command that
    runs and ends."""
    words = shlex.split(command, comments=True)
    if words[:3] == ["python", "-m", "autovpn"] and len(words) == 3:
        return "embedded"
    if words[:1] == ["autovpn"] and words[1:2] in (["client"], ["server"]):
        return words[1]
    if words[:2] == ["wstunnel", "client"]:
        return "client"
    return ""


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    reason = _namespace_skip()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path / "work"
    (work / "www").mkdir(parents=True)
    (work / "www" / "index.html").write_text(ORIGIN_BODY)
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("AUTOVPN_", "XDG_", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
        HOME=str(tmp_path / "home"),
        AUTOVPN_STATE_DIR=str(tmp_path / "state"),
        PYTHONUNBUFFERED="1",
    )
    (tmp_path / "home").mkdir(exist_ok=True)  # conftest made it
    holder = subprocess.Popen(
        ["unshare", "-n", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"],
        stdout=subprocess.PIPE,
    )
    origin: subprocess.Popen[bytes] | None = None
    m = Machine(holder, work, env)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        origin = subprocess.Popen(
            m.argv(sys.executable, "-m", "http.server", str(ORIGIN_PORT), "--bind", "127.0.0.1"),
            cwd=work / "www",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while m.run(f"curl -sf http://127.0.0.1:{ORIGIN_PORT}/", quiet=True).stdout != ORIGIN_BODY:
            assert time.monotonic() < deadline, "the origin did not start"
            time.sleep(0.1)
        yield m
    finally:
        try:
            m.stop_all()
        finally:
            for proc in (origin, holder):
                if proc is not None:
                    proc.terminate()
                    proc.wait(20)
            if holder.stdout is not None:
                holder.stdout.close()


def run_section(m: Machine, heading: str) -> None:
    ran = 0
    for written in sections(README.read_text("utf-8"))[heading]:
        command = substituted(written)
        if command is None:
            m.log.append(f"# not run: {written}")
            continue
        ran += 1
        role = engine_role(command)
        if role:
            m.start("server" if role == "server" else "client", command)
            continue
        done = m.run(command)
        assert done.returncode == 0, "\n".join(m.log)
        if command.startswith("curl "):
            assert done.stdout == ORIGIN_BODY, "\n".join(m.log)
    assert ran >= 2, m.log
    m.stop_all()


@pytest.mark.e2e
def test_quick_start_runs_as_written(machine: Machine) -> None:
    run_section(machine, QUICK_START)
    assert any(line.startswith("$ python -m autovpn") for line in machine.log)
    assert sum(line.startswith("$ curl ") for line in machine.log) >= 2


@pytest.mark.e2e
@pytest.mark.skipif(  # the mTLS block makes the client certificates with it
    shutil.which("openssl") is None, reason="openssl is not installed (Debian: openssl)"
)
def test_a_real_set_up_runs_as_written(machine: Machine) -> None:
    run_section(machine, REAL_SETUP)
    servers = [line for line in machine.log if line.startswith("$ autovpn server ")]
    clients = [line for line in machine.log if line.startswith("$ autovpn client ")]
    assert len(servers) >= 2 and len(clients) >= 2, machine.log  # plain, then with mTLS
    assert (machine.cwd / "server.pem").is_file() and (machine.cwd / "alice.pem").is_file()
