"""Fixed forwards, as wstunnel's ``-L`` writes them: ``tcp://[BIND:]PORT:HOST:PORT``,
``unix:///path.sock:HOST:PORT`` and ``stdio://HOST:PORT`` (ssh ``ProxyCommand``).

Every accepted connection goes through the tunnel to the fixed target, never through the
router: the target is named from the server's point of view (``127.0.0.1:22`` is the server's
own sshd).  ``?proxy_protocol`` asks a wstunnel server for a PROXY v2 header (wstunnel protocol
only).  ``stdio://`` bridges stdin/stdout to the tunnel through a socket pair, so the tunnel's
relay code sees an ordinary socket, and stops the engine when the tunnel closes.

Statistics: each connection is a ``Flow`` as a SOCKS5 connection is (``autovpn.stats``), with
the listener ``tcp-forward``, ``unix-forward`` or ``stdio-forward``, the route ``proxy``, the
forward itself (``-L tcp://...``) as its rule, and the tunnel server; its access log line is
written at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from autovpn.errors import BindError, StreamError
from autovpn.net import reset_transport
from autovpn.ports import bind_error
from autovpn.proxy.dialer import MeteredUpstream, TunnelOpener, discard
from autovpn.stats import Flow, Stats
from autovpn.tunnel.wstunnel.servers import WstunnelServers

if TYPE_CHECKING:
    from autovpn.config import ListenSpec

log = logging.getLogger("autovpn.forward")

FORWARD_LISTENER_SCHEMES: Final = ("tcp", "unix", "stdio")


#: The route of every forwarded connection: through the tunnel, whatever the rules say.
ROUTE: Final = "proxy"


def listener_name(spec: ListenSpec) -> str:
    """The forward's listener name in the statistics: ``tcp-forward`` and so on."""
    return f"{spec.scheme}-forward"


def start_flow(stats: Stats | None, spec: ListenSpec, client: str) -> Flow | None:
    """The record of one forwarded connection (None when statistics are off)."""
    if stats is None:
        return None
    assert spec.target_host is not None and spec.target_port is not None
    return stats.start(
        listener=listener_name(spec),
        client=client,
        host=spec.target_host,
        port=spec.target_port,
        route=ROUTE,
        rule=f"-L {spec}",
    )


def failure_reason(exc: BaseException) -> str:
    """A failed open's result, as the dialer names it: the reset reason, or the type."""
    if isinstance(exc, StreamError):
        return exc.reason.name.lower()
    return type(exc).__name__


async def open_forward(
    opener: TunnelOpener, spec: ListenSpec, early: bytes = b""
) -> MeteredUpstream:
    """Open the tunnel for one connection of ``spec`` (honouring ``?proxy_protocol``)."""
    assert spec.target_host is not None and spec.target_port is not None
    if isinstance(opener, WstunnelServers):
        # Its refusals (an HTTP 400) become a StreamError there, as for the proxies: before,
        # this opened the tunnel itself, and a refusal escaped the forward's handler,
        # leaving its client's connection open with nothing behind it.
        proxy_protocol = spec.option("proxy_protocol") is not None
        return await opener.open_upstream(
            spec.target_host, spec.target_port, early, proxy_protocol=proxy_protocol
        )
    return await opener.open_upstream(spec.target_host, spec.target_port, early)


class _Accepted(asyncio.Protocol):
    def __init__(self, listener: ForwardListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None  # the connection's record (``connection_made``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.early = bytearray()
        self.listener.accepted += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            client = f"{peer[0]}:{peer[1]}"
        else:  # a unix socket's client is unnamed: the socket's path says where it came in
            client = self.listener.spec.host or "?"
        self.flow = start_flow(self.listener.stats, self.listener.spec, client)
        self.listener.spawn(self._open(), "forward")

    def data_received(self, data: bytes) -> None:
        # uvloop may start reading after connection_made: keep what arrives, send it first.
        self.early += data
        if self.transport is not None:
            self.transport.pause_reading()

    async def _open(self) -> None:
        assert self.transport is not None
        flow = self.flow
        try:
            upstream: MeteredUpstream = await open_forward(
                self.listener.opener, self.listener.spec
            )
        except (StreamError, OSError, TimeoutError) as exc:
            self.listener.failed += 1
            if flow is not None:
                flow.end(failure_reason(exc), str(exc))
            else:  # without statistics no access line says it
                log.info("forward %s: %s", self.listener.spec, exc)
            reset_transport(self.transport)  # no reply to give: a reset says it failed
            return
        except BaseException as exc:  # cancelled (the engine closes): the record ends too
            if flow is not None:
                flow.end(type(exc).__name__)
            raise
        if flow is not None:
            upstream.bind(flow)  # ended with the relay, as a SOCKS5 connection's
        if self.transport.is_closing():
            # The client's socket closed while the tunnel opened: end the stream (and its
            # record) rather than leave it open.
            discard(upstream)
            return
        if self.early:
            upstream = _EarlyUpstream(upstream, bytes(self.early))
        upstream.attach(self.transport)


class _EarlyUpstream:
    """Attaches, then replays the bytes read before the tunnel was open through the attached
    protocol's own read path (so they are framed and flow-controlled like any read)."""

    def __init__(self, upstream: MeteredUpstream, early: bytes) -> None:
        self.upstream = upstream
        self.early = early

    def bind(self, flow: Flow) -> None:
        self.upstream.bind(flow)

    def attach(self, transport: asyncio.Transport) -> None:
        self.upstream.attach(transport)
        proto = transport.get_protocol()
        view = memoryview(self.early)
        while view:
            if isinstance(proto, asyncio.BufferedProtocol):
                buf = memoryview(proto.get_buffer(len(view)))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                proto.buffer_updated(n)
            else:
                n = len(view)
                cast(asyncio.Protocol, proto).data_received(bytes(view))
            view = view[n:]


class ForwardListener:
    """``tcp://`` or ``unix://``: listen, and tunnel every connection to the fixed target."""

    def __init__(self, spec: ListenSpec, opener: TunnelOpener, stats: Stats | None = None) -> None:
        self.spec = spec
        self.opener = opener
        self.stats = stats
        self.accepted = 0
        self.failed = 0
        self.kind = spec.scheme
        self.host = spec.host
        self.credentials: object = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def bound_port(self) -> int:
        assert self._server is not None and self._server.sockets
        if self.spec.scheme == "unix":
            return 0
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.spec.scheme == "unix":
                self._server = await loop.create_unix_server(
                    lambda: _Accepted(self), self.spec.host
                )
            else:
                self._server = await loop.create_server(
                    lambda: _Accepted(self), self.spec.host, self.spec.port, backlog=1024
                )
        except OSError as exc:
            if self.spec.scheme == "unix":
                why = exc.strerror or exc
                raise BindError(f"forward {self.spec} cannot listen: {why}") from exc
            raise bind_error(f"forward {self.spec}", self.spec.host, self.spec.port, exc) from exc
        log.info("forward %s -> %s:%s", self.spec, self.spec.target_host, self.spec.target_port)

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.spec.scheme == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.spec.host)


class StdioForward:
    """``stdio://HOST:PORT``: stdin/stdout through the tunnel; ``on_done`` when it closes."""

    def __init__(
        self,
        spec: ListenSpec,
        opener: TunnelOpener,
        on_done: Callable[[], None],
        stats: Stats | None = None,
    ) -> None:
        self.spec = spec
        self.opener = opener
        self.on_done = on_done
        self.stats = stats
        self.kind = "stdio"
        self.host = ""
        self.bound_port = 0
        self.credentials: object = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stdio-forward")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        ours, pair = socket.socketpair()
        theirs: socket.socket | None = pair
        writer: asyncio.StreamWriter | None = None
        stdin_transport: asyncio.BaseTransport | None = None
        pump: asyncio.Task[None] | None = None
        upstream: MeteredUpstream | None = None
        attached = False
        flow = start_flow(self.stats, self.spec, "stdio")
        try:
            try:
                upstream = await open_forward(self.opener, self.spec)
            except BaseException as exc:
                if flow is not None:
                    flow.end(failure_reason(exc), str(exc))
                raise
            if flow is not None:
                upstream.bind(flow)
            transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, pair)
            theirs = None
            transport.pause_reading()
            upstream.attach(transport)
            attached = True
            reader, writer = await asyncio.open_connection(sock=ours)
            stdin = asyncio.StreamReader()
            stdin_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
            )
            pump = loop.create_task(self._stdin_to(stdin, writer), name="stdio-stdin")
            stdout = sys.stdout.buffer
            # The tunnel closing (EOF here) ends the forward, whatever stdin does (wstunnel
            # issue #93: stdio mode must exit when the server closes).
            while data := await reader.read(1 << 16):
                stdout.write(data)
                stdout.flush()
        except (StreamError, OSError) as exc:
            target = f"{self.spec.target_host}:{self.spec.target_port}"
            log.error("stdio forward to %s: %s", target, exc)
        finally:
            if upstream is not None and not attached:
                discard(upstream)  # the tunnel's stream (and its record) ends, not leaked
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            if stdin_transport is not None:
                stdin_transport.close()
            if theirs is not None:
                theirs.close()
            if writer is not None:
                writer.close()
            else:
                ours.close()
            self.on_done()

    @staticmethod
    async def _stdin_to(stdin: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await stdin.read(1 << 16):
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()
