"""``autovpn server --workers N``: N processes accept on one address, under a small supervisor.

The parent runs no tunnel.  It starts N copies of its own command line (``python -m autovpn
ARGS``) with ``AUTOVPN_WORKER`` in their environment, waits until each one listens, and then:

* restarts a worker that dies, after a back-off (``Backoff``: 0.5 s, doubling up to 30 s,
  back to 0.5 s once a worker has run 10 s), so a crash loop does not spin;
* on SIGTERM or SIGINT (Ctrl-C), passes SIGTERM on to every worker, which then closes as a
  single server does (GOAWAY to its clients, close), waits for them (``STOP_GRACE``, then
  SIGKILL) and exits: 0 after SIGTERM, 130 after SIGINT;
* serves the control API on the configured address.  Each worker serves its own on an
  ephemeral loopback port, which it reports when it is ready; the parent's ``GET /status``
  and ``GET /metrics`` ask every worker and answer the sums of their counters (``server``
  and the statistics, ``stats``), with one entry per worker (pid, restarts, its own
  counters).  The sums never go down when a worker dies (``FleetTotals``): Prometheus takes
  any decrease of a counter for a reset and would count the survivors' totals again.

Workers share nothing at run time: each reads the configuration, the certificate and the
secrets or users file itself, and the tunnel's authentication is stateless (the 101's
challenge, answered in the first frame, is what makes a recorded handshake useless on another
worker; no replay cache needs to be shared).  The workers are in their own process groups, so
a terminal's Ctrl-C reaches the parent only, and each asks the kernel to SIGKILL it when its
parent dies (``PR_SET_PDEATHSIG``): a supervisor killed with SIGKILL leaves no worker serving.

The supervisor opens the listening sockets itself, one ``SO_REUSEPORT`` socket per worker
(and per address of the listen host), in slot order, and keeps them; worker ``i`` gets slot
``i``'s, and so does the worker started in its place (``reuseport.ListenGroup``).  A classic BPF
program attached to the group steers each new connection to a worker by its client's address
(``steer_by = "address"``, the default: the limits a worker keeps per address then hold across
workers) or by its address and port (``"connection"``: a client's pool spreads over the
workers); the supervisor attaches another program while a worker is down, which gives that
worker's share to the others (autovpn/reuseport.py says why the sockets must outlive their
workers for this).

Linux only: there SO_REUSEPORT makes one group of the sockets bound to the address (Linux 3.9
and later), and the program needs Linux 4.5 (without it the kernel spreads connections by its
own hash, and the start says so).  The BSDs' and macOS's SO_REUSEPORT lets several sockets bind
but does not spread the connections (FreeBSD's SO_REUSEPORT_LB would), and Windows has no such
option: there the server runs one process and says so at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autovpn import __version__
from autovpn.config import Config, state_dir
from autovpn.engine import Engine
from autovpn.errors import ConfigError
from autovpn.eventloop import loop_factory, run
from autovpn.monitor.api import ControlAPI, request
from autovpn.ports import bind_error
from autovpn.reuseport import ListenGroup

if TYPE_CHECKING:
    from autovpn.proxy.listener import ProxyListener
    from autovpn.routing.dns import SplitResolver
    from autovpn.routing.router import Mode, Router

log = logging.getLogger("autovpn.workers")

#: Set in a worker's environment: ``INDEX:PARENT_PID:READY_FD:LISTEN_FD[,LISTEN_FD...]``.
WORKER_ENV = "AUTOVPN_WORKER"
#: Seconds a worker may take to start (import, read its files, bind) before the start fails.
START_TIMEOUT = 60.0
#: Seconds the workers get to close after the parent passed SIGTERM on; then SIGKILL.
STOP_GRACE = 10.0
#: Seconds the parent's ``/status`` waits for a worker's answer (a busy worker on a loaded
#: machine may take a while; one that does not answer is listed with an error).
STATUS_TIMEOUT = 5.0

_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask), the default worker count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def unsupported() -> str | None:
    """Why this system cannot run workers, or None."""
    if not sys.platform.startswith("linux"):
        return (
            f"{sys.platform} has no SO_REUSEPORT that spreads connections over processes"
            " (Linux has)"
        )
    return None


def plan(cfg: Config) -> tuple[int, str | None]:
    """How many processes serve ``cfg``, and a note to print when that is fewer than asked.

    ``server.workers`` (or ``--workers``) says how many; without it, one per core.  Only a
    tunnel server alone runs workers: an engine with a client (the embedded default
    included) is one process, and so is a server on port 0 (each worker would get a port
    of its own).
    """
    if cfg.server is None:
        return 1, None
    asked = cfg.server.workers
    count = asked if asked is not None else cpu_count()
    if count <= 1:
        return 1, None
    why: str | None
    if cfg.client is not None:
        why = "this configuration runs a client too, which is one process"
    elif cfg.server.listen.port == 0:
        why = "the server listens on port 0 (each worker would get another port)"
    else:
        why = unsupported()
    if why is None:
        return count, None
    return 1, (f"note: one process, not {count} workers: {why}" if asked is not None else None)


# -- the worker side -------------------------------------------------------------------------


class _UntilReady(logging.Filter):
    """Drops a worker's log records below ERROR until it is ready (see ``quiet_start``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = False

    def filter(self, record: logging.LogRecord) -> bool:
        return self.ready or record.levelno >= logging.ERROR


@dataclass(slots=True)
class WorkerRole:
    """What a worker learns from its environment (``WORKER_ENV``)."""

    index: int
    parent: int
    ready_fd: int
    #: The listening sockets the supervisor opened for this worker's slot.
    listen_fds: tuple[int, ...] = ()
    _quiet: _UntilReady | None = None

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        value = os.environ.get(WORKER_ENV)
        if not value:
            return None
        try:
            index, parent, fd, listening = value.split(":")
            fds = tuple(int(one) for one in listening.split(","))
            return cls(int(index), int(parent), int(fd), fds)
        except ValueError:
            raise ConfigError(WORKER_ENV, f"{value!r}: set by the supervisor only") from None

    def attach(self) -> None:
        """Die with the parent: SIGKILL when it exits, however it exits (Linux)."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning(
                "worker %d: PR_SET_PDEATHSIG failed (errno %d)", self.index, ctypes.get_errno()
            )
        if os.getppid() != self.parent:
            # The parent died before the line above: nobody supervises this worker.
            os._exit(1)

    def quiet_start(self) -> None:
        """Worker 0 says what every worker would say while it starts (warnings about the
        configuration, "listening on"); the others say only errors until they are ready, so
        that N workers do not print every start-up line N times."""
        if self.index == 0:
            return
        self._quiet = _UntilReady()
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._quiet)

    def configure(self, cfg: Config) -> None:
        """The worker's own settings: the listening sockets of its slot; its control API on
        an ephemeral port of the same loopback address (the parent's ``/status`` asks it)."""
        assert cfg.server is not None
        cfg.server.listen_fds = self.listen_fds
        if cfg.control is not None:
            host, _, _ = cfg.control.rpartition(":")
            cfg.control = f"{host}:0"

    def ready(self, control: str | None, port: int) -> None:
        """Tell the parent this worker listens (one JSON line on the ready pipe)."""
        line = {"pid": os.getpid(), "control": control, "port": port}
        if self._quiet is not None:
            self._quiet.ready = True
        try:
            os.write(self.ready_fd, json.dumps(line).encode() + b"\n")
        finally:
            os.close(self.ready_fd)


def worker_state_dir(index: int) -> Path:
    """A worker's own state directory (its control API's token and URL files)."""
    return state_dir() / f"worker-{index}"


# -- the parent side -------------------------------------------------------------------------


@dataclass(slots=True)
class Backoff:
    """Delay before starting a dead worker again: ``first`` doubling up to ``most``; a worker
    that ran ``stable`` seconds or more starts again after ``first`` (sans-I/O)."""

    first: float = 0.5
    most: float = 30.0
    stable: float = 10.0
    _next: float = 0.0

    def delay(self, ran: float) -> float:
        if ran >= self.stable or self._next == 0.0:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.most)
        return delay


@dataclass(slots=True)
class Slot:
    """One worker position: the process in it now, and its history."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    control: str | None = None
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    #: Its worker listens (ready, and not exited since): the steering sends it connections.
    live: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def _add(
    total: dict[str, Any], counters: dict[str, Any], skip: frozenset[str] = frozenset()
) -> None:
    """Sum ``counters`` (numbers, nested tables of numbers) into ``total``; numbers named in
    ``skip`` are left out."""
    for key, value in counters.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if key not in skip:
                total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            _add(total.setdefault(key, {}), value, skip)


#: The groups of a worker's statistics (``autovpn.stats.Stats.snapshot``), summed by name.
STATS_GROUPS = ("listeners", "routes", "servers", "users", "domains")
#: Numbers in a worker's status that are levels, not counts: they leave with the worker.
GAUGES = frozenset({"open", "connections", "streams_open"})
#: Open connections listed in the summed statistics (a worker lists its 50 busiest).
CONNECTIONS_SHOWN = 50
#: Recent failures kept in the summed statistics (as ``autovpn.stats.RECENT_FAILURES``).
RECENT_FAILURES = 20


def _counted(status: dict[str, Any]) -> dict[str, Any]:
    """The parts of a worker's status that are summed: ``server`` and the statistics'
    groups."""
    stats = status.get("stats")
    groups = {k: stats.get(k) or {} for k in STATS_GROUPS} if isinstance(stats, dict) else {}
    server = status.get("server")
    return {"server": server if isinstance(server, dict) else {}, "stats": groups}


class FleetTotals:
    """The workers' counters, added up so that no sum goes down when a worker dies (sans-I/O).

    Each sum is the workers' latest answers, plus for a worker that did not answer this time
    its previous answer's counters, plus the counters last seen of the worker processes that
    have exited (``retired``): a dead worker's counts stay in the sums, its levels (open
    connections, ``GAUGES``) leave with it.  What a worker counted after the supervisor last
    asked it (the last scrape or ``/status``) and before it died is lost: the sums then stay
    where they were, they do not go down.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.since = clock()
        #: Counters of the exited worker processes, summed (as ``_counted`` shapes them).
        self.retired: dict[str, Any] = {}
        #: Each slot's process and its last answer: slot index -> (pid, status).
        self.last: dict[int, tuple[int, dict[str, Any]]] = {}

    def seen(self, index: int, pid: int, status: dict[str, Any]) -> None:
        """The worker in slot ``index`` (process ``pid``, running) answered ``status``."""
        self.last[index] = (pid, status)

    def exited(self, index: int, pid: int) -> None:
        """Process ``pid`` of slot ``index`` exited: its last counters are kept for good."""
        last = self.last.get(index)
        if last is not None and last[0] == pid:
            del self.last[index]
            _add(self.retired, _counted(last[1]), GAUGES)

    def sums(
        self, statuses: Sequence[dict[str, Any] | None]
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(``server``, ``stats``) summed over ``statuses`` (by slot; None: no answer now);
        ``stats`` None when no worker keeps statistics."""
        total: dict[str, Any] = {"server": {}, "stats": {k: {} for k in STATS_GROUPS}}
        _add(total, self.retired)
        answered: list[tuple[int, dict[str, Any]]] = []
        kept = bool(self.retired.get("stats"))
        for index, status in enumerate(statuses):
            if status is not None:
                answered.append((index, status))
                _add(total, _counted(status))
                kept = kept or isinstance(status.get("stats"), dict)
            elif index in self.last:  # a worker that did not answer in time: no levels
                _add(total, _counted(self.last[index][1]), GAUGES)
        server = total["server"]
        if server:  # every worker may be gone for now: its levels are 0 then, not missing
            for name in ("connections", "streams_open"):
                server.setdefault(name, 0)
        return server, self._stats(total["stats"], answered) if kept else None

    def _stats(
        self, groups: dict[str, Any], answered: list[tuple[int, dict[str, Any]]]
    ) -> dict[str, Any]:
        """The summed groups shaped as one engine's statistics; the open connections and
        recent failures of the workers that answered, each with its ``worker``."""
        for members in groups.values():
            for figures in members.values():
                for name in ("open", "total", "bytes_up", "bytes_down"):
                    figures.setdefault(name, 0)
                figures.setdefault("failures", {})
        connections: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        health: dict[str, Any] = {}
        shown = 0
        for index, status in answered:
            stats = status.get("stats")
            if not isinstance(stats, dict):
                continue
            shown += int(stats.get("open") or 0)
            connections += [{**c, "worker": index} for c in stats.get("connections") or ()]
            failures += [{**f, "worker": index} for f in stats.get("recent_failures") or ()]
            health.update(stats.get("health") or {})
        connections.sort(key=lambda c: c.get("bytes_up", 0) + c.get("bytes_down", 0), reverse=True)
        failures.sort(key=lambda f: f.get("time", 0))
        return {
            "since": round(self.since, 3),
            **groups,
            "open": shown,
            "connections": connections[:CONNECTIONS_SHOWN],
            "recent_failures": failures[-RECENT_FAILURES:],
            "health": health,
        }


def _bytes(status: dict[str, Any]) -> tuple[int, int] | None:
    """A worker's bytes up and down, over its listeners (each connection is in one)."""
    stats = status.get("stats")
    if not isinstance(stats, dict):
        return None
    listeners = (stats.get("listeners") or {}).values()
    return (
        sum(int(f.get("bytes_up", 0)) for f in listeners),
        sum(int(f.get("bytes_down", 0)) for f in listeners),
    )


class Supervisor:
    """The parent of ``autovpn server --workers N``: see the module docstring."""

    def __init__(self, argv: Sequence[str], count: int, cfg: Config) -> None:
        self.argv = list(argv)
        self.cfg = cfg
        self.slots = [Slot(i) for i in range(count)]
        self.stopping = False
        self.signal: int | None = None
        self._stop = asyncio.Event()
        self.api: ControlAPI | None = None  # when the configuration has a control API
        #: The workers' counters, summed across their restarts (``/status``, ``/metrics``).
        self.totals = FleetTotals()
        assert cfg.server is not None
        listen = cfg.server.listen
        self.listening = ListenGroup(listen.host, listen.port, count, cfg.server.steer_by)

    @property
    def steering(self) -> str:
        """How connections are given to the workers, as the banner and ``/status`` say it."""
        if self.listening.unsteered is not None:
            return f"the kernel's hash ({self.listening.unsteered})"
        return f"by client {self.listening.by}"

    def _steer(self) -> None:
        """Attach the program for the workers that listen now (autovpn/reuseport.py)."""
        self.listening.steer([slot.index for slot in self.slots if slot.live])

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> tuple[subprocess.Popen[bytes], int]:
        read, write = os.pipe()
        listening = self.listening.fds(slot.index)
        env = dict(os.environ)
        env[WORKER_ENV] = (
            f"{slot.index}:{os.getpid()}:{write}:{','.join(str(fd) for fd in listening)}"
        )
        env["AUTOVPN_STATE_DIR"] = str(worker_state_dir(slot.index))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "autovpn", *self.argv],
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(write, *listening),
                # Its own process group: a terminal's Ctrl-C reaches the parent only, which
                # passes it on once (twice would interrupt the worker's own closing).
                process_group=0,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        slot.proc = proc
        return proc, read

    async def _ready(self, read: int) -> dict[str, Any] | None:
        """The worker's ready line, or None when it exited (or closed the pipe) first."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            line = await reader.readline()
        finally:
            transport.close()
        if not line:
            return None
        try:
            data: dict[str, Any] = json.loads(line)
        except ValueError:
            return None
        return data

    @staticmethod
    async def _exited(proc: subprocess.Popen[bytes]) -> int:
        """Wait for ``proc`` to exit and reap it; its exit status."""
        if proc.returncode is not None:
            return proc.returncode
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:  # already reaped (by a poll())
            return proc.wait()
        except (AttributeError, OSError):  # no pidfd (Linux before 5.3): a thread waits
            return await asyncio.to_thread(proc.wait)
        try:
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(fd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return proc.wait()

    async def _start(self, slot: Slot) -> bool:
        """Start ``slot``'s worker and wait until it listens; False if it exited first."""
        proc, read = self._spawn(slot)
        ready = asyncio.ensure_future(self._ready(read))
        exited = asyncio.ensure_future(self._exited(proc))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.error(
                "worker %d (pid %d) did not start within %.0f s",
                slot.index,
                proc.pid,
                START_TIMEOUT,
            )
        except asyncio.CancelledError:  # the supervisor stops: it reaps the process itself
            ready.cancel()
            exited.cancel()
            raise
        info = ready.result() if ready.done() else None
        ready.cancel()
        if info is None:
            if not exited.done():
                proc.kill()
            await exited
            return False
        exited.cancel()
        slot.control = info.get("control")
        slot.live = True
        self._steer()  # its share of the clients comes back to it
        return True

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _reap_all(self) -> None:
        """Wait for every worker (``STOP_GRACE``, then SIGKILL)."""
        procs = [s.proc for s in self.slots if s.proc is not None]
        waits = [asyncio.ensure_future(self._exited(p)) for p in procs]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=STOP_GRACE)
        if pending:
            log.warning(
                "%d workers still running after %.0f s: killing them", len(pending), STOP_GRACE
            )
            self._signal_all(signal.SIGKILL)
        await asyncio.gather(*waits)

    def _on_signal(self, sig: int) -> None:
        if self.stopping:
            # A second Ctrl-C or SIGTERM: do not wait for the workers' goodbyes.
            self._signal_all(signal.SIGKILL)
            return
        self.stopping = True
        self.signal = sig
        self._signal_all(signal.SIGTERM)
        self._stop.set()

    async def _keep(self, slot: Slot) -> None:
        """Keep ``slot``'s worker running until the supervisor stops."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            proc = slot.proc
            assert proc is not None
            started = loop.time()
            code = await self._exited(proc)
            self.totals.exited(slot.index, proc.pid)
            if self.stopping:
                return
            # Its socket stays open (the supervisor's): what it had queued waits for the next
            # worker in its place, and new clients of its share go to the others meanwhile.
            slot.live = False
            self._steer()
            delay = slot.backoff.delay(loop.time() - started)
            log.warning(
                "worker %d (pid %d) exited with %s; starting it again in %.1f s",
                slot.index,
                proc.pid,
                f"signal {-code}" if code < 0 else f"code {code}",
                delay,
            )
            slot.control = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            while not self.stopping:
                slot.restarts += 1
                if await self._start(slot):
                    log.info("worker %d started again (pid %d)", slot.index, slot.pid)
                    break
                delay = slot.backoff.delay(0.0)
                log.warning("worker %d failed to start; trying again in %.1f s", slot.index, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()

    # -- the control API ----------------------------------------------------------------------

    async def worker_statuses(self) -> list[dict[str, Any] | None]:
        """Each slot's worker's status (None: no answer); each answer is remembered
        (``FleetTotals.seen``)."""

        async def one(slot: Slot) -> dict[str, Any] | None:
            proc, control = slot.proc, slot.control
            if control is None or proc is None:
                return None
            try:
                async with asyncio.timeout(STATUS_TIMEOUT):
                    reply = await request(control, "GET", "/status")
                status: dict[str, Any] = reply.json()
            except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
                return None  # not answering, or not with a status: counted as missing
            if slot.proc is not proc or proc.returncode is not None:
                # It exited while answering, and its earlier counters are retired already:
                # counting this answer too would count it twice.
                return None
            self.totals.seen(slot.index, proc.pid, status)
            return status

        return list(await asyncio.gather(*(one(s) for s in self.slots)))

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            code = await self._run()
        finally:
            if self.api is not None:
                await self.api.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if code is not None:
            return code
        if self.signal == signal.SIGINT:
            print("\nautovpn stopped", file=sys.stderr)
            return 130
        print("autovpn stopped (SIGTERM)", file=sys.stderr)
        return 0

    async def _run(self) -> int | None:
        """Start, serve until a signal, stop; an exit code when the start failed.  However
        it ends (a control API that cannot bind included), the workers are stopped and
        reaped before it returns."""
        try:
            return await self._serve()
        finally:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            await self._reap_all()
            self.listening.close()

    async def _serve(self) -> int | None:
        try:
            self.listening.open()
        except OSError as exc:
            raise bind_error(
                "tunnel server", self.listening.host, self.listening.port, exc
            ) from exc
        self._steer()  # before any worker listens: nothing is steered by the kernel's hash
        # A signal while they start stops them too (``_on_signal``): each start then ends.
        started = await asyncio.gather(*(self._start(s) for s in self.slots))
        if self.stopping:
            return None
        if not all(started):
            failed = self.slots[started.index(False)]
            code = failed.proc.returncode if failed.proc is not None else None
            print(
                f"autovpn: worker {failed.index} did not start"
                + (f" (exit code {code})" if code is not None else "")
                + "; its messages are above",
                file=sys.stderr,
            )
            return code if code is not None and code > 0 else 1
        await self._serve_api()
        self._banner()
        keepers = [asyncio.ensure_future(self._keep(s)) for s in self.slots]
        try:
            await self._stop.wait()
        finally:
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
        return None

    async def _serve_api(self) -> None:
        if self.cfg.control is None:
            return
        view = FleetView(self)
        self.api = ControlAPI(
            view,
            self.cfg.control,
            state_dir(),
            self.cfg.control_hosts,
            role="server",
            auto_port=self.cfg.auto_port,
        )
        await self.api.start()

    def _banner(self) -> None:
        sc = self.cfg.server
        assert sc is not None
        name, _ = loop_factory()
        pids = ", ".join(str(s.pid) for s in self.slots)
        lines = [
            f"autovpn {__version__} running ({name} event loop) in {len(self.slots)} worker"
            " processes",
            f"  tunnel server  {sc.listen}  (SO_REUSEPORT, {self.steering}; worker pids {pids})",
        ]
        if self.api is not None:
            lines.append(f"  control api    {self.api.url}  (/status and /metrics sum the workers)")
        print("\n".join(lines), flush=True)


class FleetView:
    """The control API's view of a server run by workers (``monitor.api.EngineView``).

    Routing answers (``/route``, PAC files, ``/mode``) come from an engine built from the
    same configuration and never started, as ``autovpn route`` answers when no engine runs:
    a tunnel server routes nothing itself.  ``/status`` (and so ``/metrics``) gathers the
    workers': ``server`` and ``stats`` are their sums (``FleetTotals``).
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.engine = Engine(supervisor.cfg)

    @property
    def router(self) -> Router:
        return self.engine.router

    @property
    def resolver(self) -> SplitResolver:
        return self.engine.resolver

    @property
    def listeners(self) -> list[ProxyListener]:
        return []

    @property
    def mode(self) -> Mode:
        return self.engine.mode

    def set_mode(self, mode: Mode | str) -> None:
        self.engine.set_mode(mode)

    def list_names(self, which: str = "proxy") -> list[str]:
        return self.engine.list_names(which)

    async def explain(self, host: str, port: int, *, resolve: bool = False) -> dict[str, object]:
        return await self.engine.explain(host, port, resolve=resolve)

    async def status(self) -> dict[str, object]:
        sup = self.supervisor
        statuses = await sup.worker_statuses()
        out = self.engine.status()
        out["server"], out["stats"] = sup.totals.sums(statuses)
        out["control"] = sup.api.url if sup.api is not None else None
        out["steering"] = sup.steering
        workers: list[dict[str, Any]] = []
        for slot, status in zip(sup.slots, statuses, strict=True):
            entry: dict[str, Any] = {
                "index": slot.index,
                "pid": slot.pid,
                "restarts": slot.restarts,
                "live": slot.live,  # taking connections (down: its share goes to the others)
                "control": slot.control,
                "server": None if status is None else status.get("server"),
            }
            moved = None if status is None else _bytes(status)
            if moved is not None:
                entry["bytes_up"], entry["bytes_down"] = moved
            if status is None:
                entry["error"] = "no answer from its control API"
            workers.append(entry)
        out["workers"] = workers
        return out


def supervise(argv: Sequence[str], count: int, cfg: Config) -> int:
    """Run ``count`` workers of ``python -m autovpn ARGV`` until SIGTERM or SIGINT."""

    async def main() -> int:
        return await Supervisor(argv, count, cfg).run()

    return run(main())
