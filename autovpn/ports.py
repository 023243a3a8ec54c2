"""Taken ports: who holds one, the error that says so, and ``auto_port`` (bind the next one).

The holder is read from Linux's ``/proc``: ``/proc/net/{tcp,tcp6,udp,udp6}`` give the inode of
the socket bound to the port (listening, for TCP), and ``/proc/PID/fd`` links name the
process that has it open.  Only this user's processes can be read (all of them as root), so
another user's program is "another program", as is any holder elsewhere than Linux.

Nothing here stops or kills anything: the message names the holder and the user decides.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from autovpn.errors import BindError

log = logging.getLogger("autovpn")

T = TypeVar("T")

#: How many ports ``auto_port`` tries: the configured one and the next 19.
AUTO_PORT_TRIES = 20

#: EADDRINUSE as Linux, macOS/BSD and Windows (WSAEADDRINUSE) number it.
_IN_USE = frozenset({errno.EADDRINUSE, 98, 48, 10048})

_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp: include/net/tcp_states.h
_PROC = Path("/proc")


def port_in_use(exc: OSError) -> bool:
    return exc.errno in _IN_USE


@dataclass(frozen=True, slots=True)
class Holder:
    """The process holding a port, as ``/proc`` shows it."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name})"


def _socket_inodes(port: int, udp: bool) -> set[str]:
    """Inodes of the sockets bound to ``port`` on any address (listening, for TCP)."""
    inodes: set[str] = set()
    for table in ("udp", "udp6") if udp else ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text(encoding="ascii").splitlines()[1:]
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            _, _, port_hex = fields[1].rpartition(":")
            if int(port_hex, 16) != port or fields[9] == "0":
                continue
            if udp or fields[3] == _TCP_LISTEN:
                inodes.add(fields[9])
    return inodes


def _process_name(pid: int) -> str:
    """``python3 autovpn``, ``nginx``: the program, and for an interpreter its script or
    module (``python3 -m autovpn`` and ``/venv/bin/autovpn`` both read ``python3 autovpn``)."""
    try:
        argv = [
            a.decode(errors="replace")
            for a in (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
            if a
        ]
    except OSError:
        argv = []
    if not argv:
        try:
            return (_PROC / str(pid) / "comm").read_text(errors="replace").strip() or "?"
        except OSError:
            return "?"
    program = os.path.basename(argv[0])
    if not program.startswith("python"):
        return program
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "-m":
            return f"{program} {next(rest, '?')}"
        if arg.startswith("-m"):
            return f"{program} {arg[2:]}"
        if arg == "-c":
            return f"{program} -c"
        if not arg.startswith("-"):
            return f"{program} {os.path.basename(arg)}"
    return program


def port_holder(port: int, *, udp: bool = False) -> Holder | None:
    """The process holding ``port`` (TCP listening, or UDP bound), if this user may see it.

    None elsewhere than Linux, when nothing holds it, or when the holder is not readable
    here (another user's process, another network namespace)."""
    inodes = _socket_inodes(port, udp)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        pids = sorted((int(p.name) for p in _PROC.iterdir() if p.name.isdigit()), reverse=True)
    except OSError:
        return None
    own = os.getpid()
    # Our own process first: the commonest holder in a test, and the cheapest to read.
    for pid in [own, *(p for p in pids if p != own)]:
        fd_dir = _PROC / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        for fd in names:
            try:
                link = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if link in targets:
                return Holder(pid, _process_name(pid))
    return None


def bind_error(what: str, host: str, port: int, exc: OSError, *, udp: bool = False) -> BindError:
    """The error for ``what`` (``socks5 listener``) failing to bind ``host:port``; for a taken
    port it names the holder: ``... port in use by pid 1234 (python3 autovpn)``.

    It suggests no flag: the engine cannot know which command started it (the CLI adds the
    remedy that command has)."""
    shown = f"[{host}]" if ":" in host else host
    holder = port_holder(port, udp=udp) if port_in_use(exc) and port else None
    if holder is not None:
        why = f"port in use by {holder}"
    elif port_in_use(exc):
        why = "port in use by another program"
    else:
        why = exc.strerror or str(exc)
    return BindError(
        f"{what} cannot bind {shown}:{port}: {why}",
        what=what,
        host=host,
        port=port,
        in_use=port_in_use(exc),
        holder=None if holder is None else holder.pid,
    )


async def bind_with_auto_port(
    start: Callable[[int], Awaitable[T]], port: int, auto_port: bool
) -> T:
    """``start(port)``; with ``auto_port`` and the port taken, ``start(port + 1)`` and so on,
    ``AUTO_PORT_TRIES`` ports in all.  Port 0 (the system picks) never needs it.

    ``start`` raises ``BindError`` (``in_use`` for a taken port) and leaves nothing open when
    it does."""
    first: BindError | None = None
    last = min(port + AUTO_PORT_TRIES, 65536) if auto_port and port else port + 1
    for candidate in range(port, last):
        try:
            started = await start(candidate)
        except BindError as exc:
            if not exc.in_use or not auto_port:
                raise
            first = first or exc
            continue
        if first is not None:
            log.warning("%s; auto_port: using port %d instead", first, candidate)
        return started
    assert first is not None
    others = f", and ports {port + 1}-{last - 1} are taken too" if last - 1 > port else ""
    raise BindError(
        f"{first}{others}",
        what=first.what,
        host=first.host,
        port=port,
        in_use=True,
        holder=first.holder,
    )
