"""The running engines of a state directory: one record each, so none overwrites another's.

Each engine with a control API writes, in ``STATE/engines/``::

    <role>-<host>-<port>.json    {"url", "pid", "role", "started", "token_file", "pid_start"}
    <role>-<host>-<port>.token   its control token (mode 0600, new at each start)

``role`` is ``client`` (local proxies and a tunnel client), ``server`` (a tunnel server) or
``embedded`` (both in one process, as the out-of-the-box default).  Host and port are the
control API's bound address, which no other running engine can have: a client and a server on
one machine each keep their own record and token (a single ``control.json`` was
last-writer-wins, so ``autovpn status`` could talk to the wrong engine).

The token is written before the record, so a record names a token that is there.  An engine
removes its own two files when it stops.  A record whose process is gone (a crash, SIGKILL) is
stale: ``live_records`` skips and removes it.  ``choose`` is the CLI's rule for picking one.

Standard library only, and light: the CLI imports this for ``autovpn status``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autovpn.errors import EngineChoiceError

ENGINES_DIR = "engines"
ROLES = ("client", "server", "embedded")
#: Roles that run local proxies: what read-only commands prefer when several engines run.
CLIENT_SIDE = ("client", "embedded")


@dataclass(frozen=True, slots=True)
class EngineRecord:
    url: str
    pid: int
    role: str
    started: float
    token_file: str  # a name in the same directory
    path: Path  # the record itself
    #: The process's start time as the kernel counts it (Linux), so that a pid used again by
    #: another process after a crash does not make a stale record look alive.
    pid_start: str | None = None

    @property
    def token_path(self) -> Path:
        return self.path.parent / self.token_file

    def read_token(self) -> str | None:
        """The engine's control token, if this user may read it."""
        try:
            token = self.token_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return token or None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.role:<8} {self.url:<28} pid {self.pid}, started {started}"


def record_stem(role: str, host: str, port: int) -> str:
    """``client-127.0.0.1-9090``; an IPv6 host's colons become ``_`` (not a file name
    character everywhere)."""
    safe = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in host)
    return f"{role}-{safe}-{port}"


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only from the first byte on.

    The new file is created under a temporary name with O_EXCL and mode 0600 (never another
    mode, whatever the umask, and never someone else's file or symlink planted at that name),
    then renamed over ``path``: a reader sees the old text or the new, never a partial one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with open(fd, "w", encoding="utf-8", closefd=True) as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o600)  # a umask may take bits away, never add them
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _process_start(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat`` (start time in clock ticks since boot); None elsewhere."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":
        # Windows only: os.kill(pid, 0) there would terminate the process, not probe it.
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
        try:
            code = ctypes.c_ulong()
            ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return bool(ok) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, not ours to signal
    return True


def _alive(record: EngineRecord) -> bool:
    if not pid_alive(record.pid):
        return False
    now = _process_start(record.pid)
    return record.pid_start is None or now is None or now == record.pid_start


def write_record(
    state: Path, role: str, host: str, port: int, url: str, token: str
) -> EngineRecord:
    """Write this engine's token, then its record (both 0600); raises OSError."""
    directory = state / ENGINES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stem = record_stem(role, host, port)
    record = EngineRecord(
        url=url,
        pid=os.getpid(),
        role=role,
        started=time.time(),
        token_file=f"{stem}.token",
        path=directory / f"{stem}.json",
        pid_start=_process_start(os.getpid()),
    )
    write_private_file(record.token_path, token)
    data = {
        "url": record.url,
        "pid": record.pid,
        "role": record.role,
        "started": record.started,
        "token_file": record.token_file,
        "pid_start": record.pid_start,
    }
    write_private_file(record.path, json.dumps(data))
    return record


def remove_record(record: EngineRecord, token: str) -> None:
    """Remove this engine's record and token, if they are still its own."""
    found = read_record(record.path)
    if found is not None and (found.pid, found.url) == (record.pid, record.url):
        with contextlib.suppress(OSError):
            record.path.unlink()
    current = record.read_token()
    if current is not None and hmac.compare_digest(current.encode(), token.encode()):
        with contextlib.suppress(OSError):
            record.token_path.unlink()


def read_record(path: Path) -> EngineRecord | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = EngineRecord(
            url=str(data["url"]),
            pid=int(data["pid"]),
            role=str(data["role"]),
            started=float(data["started"]),
            token_file=str(data["token_file"]),
            path=path,
            pid_start=None if data.get("pid_start") is None else str(data["pid_start"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if Path(record.token_file).name != record.token_file:
        return None  # a name in this directory, nothing else
    return record


def live_records(state: Path) -> list[EngineRecord]:
    """The records of running engines, oldest first; stale ones (their process is gone) are
    removed with their token."""
    try:
        paths = sorted((state / ENGINES_DIR).glob("*.json"))
    except OSError:
        return []
    live = []
    for path in paths:
        record = read_record(path)
        if record is None:
            continue  # unreadable or being written: not ours to remove
        if _alive(record):
            live.append(record)
            continue
        for stale in (record.path, record.token_path):
            with contextlib.suppress(OSError):
                stale.unlink()
    return sorted(live, key=lambda r: r.started)


def choose(
    records: list[EngineRecord], *, role: str | None = None, read_only: bool = False
) -> EngineRecord | None:
    """The engine a command talks to: the only one (of ``role``, when given); for a read-only
    command, the only one with local proxies (role client or embedded) when several run.

    None when none runs; ``EngineChoiceError`` (listing them) when the choice is not clear."""
    if not records:
        return None
    found = [r for r in records if role is None or r.role == role]
    if len(found) == 1:
        return found[0]
    if not found:
        raise EngineChoiceError(f"no {role} engine is running", [r.describe() for r in records])
    if read_only and role is None:
        client_side = [r for r in found if r.role in CLIENT_SIDE]
        if len(client_side) == 1:
            return client_side[0]
    raise EngineChoiceError(
        f"{len(found)} engines are running", [r.describe() for r in found]
    )
