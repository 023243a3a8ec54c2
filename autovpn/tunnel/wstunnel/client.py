"""The wstunnel v10 protocol client: talks to a stock wstunnel server (``--protocol wstunnel``).

Each tunnelled connection gets its own TCP(+TLS) connection and WebSocket
(docs/wstunnel-protocol.md section 0.1): ``open_upstream(host, port, early)`` takes a
pre-connected stream from the pool (or dials one), sends the upgrade request with the JWT for
``Tcp{proxy_protocol}`` to host:port, waits for the 101 and returns an ``Upstream`` that relays
the application's socket once attached.

As in wstunnel (section 5.7) the pool holds ``min_idle`` connected streams with no HTTP sent
yet, each used once and dropped after 30 s; dialling retries with exponential backoff until
``max_backoff`` (``--connection-retry-max-backoff``) has passed.  The headers file is re-read
for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from autovpn.config import DEFAULT_PING_INTERVAL, IDLE_TIMEOUT, ServerURL
from autovpn.errors import (
    ConfigError,
    RemoteProtocolError,
    ResetReason,
    StreamError,
    TunnelUnavailable,
)
from autovpn.idle import IdleSweep
from autovpn.stats import Flow
from autovpn.tunnel.failures import Failing
from autovpn.tunnel.tls import client_context
from autovpn.tunnel.wstunnel.access import path_safe
from autovpn.tunnel.wstunnel.relay import WsSide, tcp_tunnels
from autovpn.tunnel.wstunnel.reverse import ReverseRunner, ReverseSpec
from autovpn.wire import http1, wstunnel
from autovpn.wire.handshake import RESPONSE_LIMITS
from autovpn.wire.wstunnel import Claims, LocalProtocol, Session, WstunnelRejected

if TYPE_CHECKING:
    from autovpn.config import ClientConfig

log = logging.getLogger("autovpn.tunnel.wstunnel")

#: Pooled streams older than this are dropped (bb8 ``max_lifetime``).
POOL_MAX_LIFETIME: Final = 30.0


@dataclass(slots=True)
class WstunnelClientSettings:
    server: ServerURL
    ssl_context: ssl.SSLContext | None = None
    #: ``--tls-sni-override``; "" sends no SNI (``--tls-sni-disable``).
    sni: str | None = None
    #: May be a secret (``-P SECRET``), as ``credentials`` is: neither is in the repr.
    path_prefix: str = field(default=wstunnel.DEFAULT_PATH_PREFIX, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    headers_file: Path | None = None
    credentials: str | None = field(default=None, repr=False)  # --http-upgrade-credentials
    min_idle: int = 0  # -c/--connection-min-idle
    max_backoff: float = 300.0  # --connection-retry-max-backoff
    connect_timeout: float = 10.0
    ping_interval: float = DEFAULT_PING_INTERVAL
    proxy_protocol: bool = False
    reverse: tuple[str, ...] = ()  # -R specs, each kept pending by a ReverseRunner
    reverse_max_backoff: float = 1.0
    #: A TCP tunnel that relayed nothing either way this long is dropped (0: never).
    idle_timeout: float = IDLE_TIMEOUT


class _Idle(asyncio.Protocol):
    """A pooled stream: connected, nothing sent yet."""

    def __init__(self) -> None:
        self.lost = False
        self.created = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:  # a server speaking first: unusable
        self.lost = True


class _Upgrade(asyncio.Protocol):
    """Reads the answer to our upgrade request."""

    def __init__(self) -> None:
        self._parser = http1.ResponseHeadParser(RESPONSE_LIMITS)
        self.done: asyncio.Future[tuple[wstunnel.UpgradeAnswer, bytes]] = (
            asyncio.get_running_loop().create_future()
        )

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            head = self._parser.receive_data(data)
            if head is None:
                return
            answer = wstunnel.check_upgrade_response(head)
        except RemoteProtocolError as exc:
            self.done.set_exception(exc)
            return
        self.done.set_result((answer, self._parser.trailing_data))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(
                ConnectionError(f"connection closed during the upgrade: {exc or 'EOF'}")
            )


class WsUpstream:
    """An open wstunnel tunnel waiting for the application's socket (dialer ``Upstream``)."""

    __slots__ = ("ws",)

    def __init__(self, ws: WsSide) -> None:
        self.ws = ws

    def bind(self, flow: Flow) -> None:
        """Count this tunnel's bytes in ``flow`` (payload bytes, as a mux stream's) and end
        it with the tunnel."""
        self.ws.flow = flow
        flow.meter = self.ws
        flow.server = self.ws.peer

    def attach(self, transport: asyncio.Transport) -> None:
        self.ws.attach_local(transport)


class WstunnelClient:
    """``async with WstunnelClient(settings) as client``; see the module docstring."""

    def __init__(self, settings: WstunnelClientSettings) -> None:
        self.settings = settings
        self.tunnels: set[WsSide] = set()
        self.idle = IdleSweep(
            settings.idle_timeout, lambda: tcp_tunnels(self.tunnels), "wstunnel tunnels"
        )
        self.opened = 0
        self.failures = 0
        self.last_error = ""
        self.failing = Failing()  # the run of failed connection attempts, for last_error
        self._pool: list[tuple[asyncio.Transport, _Idle]] = []
        self._pool_task: asyncio.Task[None] | None = None
        self._pool_wakeup = asyncio.Event()
        self._closing = False
        self.reverse = [
            ReverseRunner(self, ReverseSpec.parse(r), settings.reverse_max_backoff)
            for r in settings.reverse
        ]

    async def __aenter__(self) -> WstunnelClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        for runner in self.reverse:
            runner.start()
        if self.settings.min_idle > 0:
            self._pool_task = asyncio.get_running_loop().create_task(
                self._fill_pool(), name="wstunnel-pool"
            )

    async def close(self) -> None:
        self._closing = True
        for runner in self.reverse:
            await runner.close()
        if self._pool_task is not None:
            self._pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_task
            self._pool_task = None
        for transport, _ in self._pool:
            transport.abort()
        self._pool.clear()
        self.idle.close()
        for ws in list(self.tunnels):
            ws.abort()

    @property
    def up(self) -> bool:
        return not self._closing

    @property
    def pool_size(self) -> int:
        return sum(1 for _, idle in self._pool if not idle.lost)

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.Transport, _Idle]:
        s = self.settings
        loop = asyncio.get_running_loop()
        ctx = s.ssl_context if s.server.tls else None
        if s.server.tls and ctx is None:
            ctx = client_context()
        server_hostname: str | None = None
        if ctx is not None:
            server_hostname = s.server.host if s.sni is None else s.sni
        async with asyncio.timeout(s.connect_timeout):
            transport, idle = await loop.create_connection(
                _Idle, s.server.host, s.server.port, ssl=ctx, server_hostname=server_hostname
            )
        return transport, idle

    async def _fill_pool(self) -> None:
        backoff = 0.1
        while not self._closing:
            now = time.monotonic()
            keep = []
            for transport, idle in self._pool:
                if idle.lost or now - idle.created > POOL_MAX_LIFETIME:
                    transport.abort()
                else:
                    keep.append((transport, idle))
            self._pool = keep
            if len(self._pool) < self.settings.min_idle:
                try:
                    self._pool.append(await self._connect())
                    backoff = 0.1
                    self.failing.ended()
                except (OSError, TimeoutError) as exc:
                    self.last_error = self.failing.failed(exc, self.settings.server)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.max_backoff)
                continue
            self._pool_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._pool_wakeup.wait()

    async def _stream(self) -> tuple[asyncio.Transport, _Idle]:
        """A pooled stream if one is fresh, else a new one (retried with backoff)."""
        while self._pool:
            transport, idle = self._pool.pop(0)
            self._pool_wakeup.set()
            if not idle.lost and time.monotonic() - idle.created <= POOL_MAX_LIFETIME:
                return transport, idle
            transport.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.max_backoff
        backoff = 0.1
        while True:
            try:
                connected = await self._connect()
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.failures += 1
                self.last_error = self.failing.failed(exc, self.settings.server)
                if self._closing or loop.time() + backoff > deadline:
                    raise TunnelUnavailable(
                        f"no connection to {self.settings.server}: {self.last_error}"
                    ) from None
                log.info("wstunnel server %s: %s; retrying", self.settings.server, self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.max_backoff)
            else:
                self.failing.ended()
                return connected

    def _request(self, claims: Claims) -> bytes:
        s = self.settings
        file_headers: list[tuple[str, str]] = []
        if s.headers_file is not None:
            try:
                file_headers = wstunnel.parse_headers_file(s.headers_file.read_text("utf-8"))
            except OSError as exc:
                log.warning("cannot read --http-headers-file %s: %s", s.headers_file, exc)
        return wstunnel.build_upgrade_request(
            host=wstunnel.host_header(s.server.host, s.server.port),
            jwt=claims.encode(),
            ws_key=os.urandom(16),
            path_prefix=s.path_prefix,
            headers=s.headers,
            credentials=s.credentials,
            file_headers=file_headers,
        )

    async def open_tunnel(
        self,
        protocol: LocalProtocol,
        host: str,
        port: int,
        *,
        answer_timeout: float | None = 20.0,
        side: type[WsSide] = WsSide,
    ) -> tuple[WsSide, wstunnel.UpgradeAnswer]:
        """One upgraded WebSocket for ``protocol`` to host:port (not yet relaying).

        ``answer_timeout`` None waits for the 101 forever (a reverse tunnel's request is held
        until the server's listener accepts a connection)."""
        claims = Claims(
            wstunnel.new_tunnel_id(int(time.time() * 1000), os.urandom(10)),
            protocol,
            wstunnel.format_host(host),
            port,
        )
        transport, _ = await self._stream()
        upgrade = _Upgrade()
        transport.set_protocol(upgrade)
        transport.write(self._request(claims))
        try:
            async with asyncio.timeout(answer_timeout):
                answer, rest = await upgrade.done
        except BaseException:
            transport.abort()
            raise
        ws = side(
            Session(client=True),
            ping_interval=self.settings.ping_interval,
            peer=str(self.settings.server),
            on_closed=self.tunnels.discard,
        )
        self.tunnels.add(ws)
        self.idle.start()
        ws.start(transport, rest)
        return ws, answer

    async def open_upstream(
        self, host: str, port: int, early: bytes = b"", *, proxy_protocol: bool | None = None
    ) -> WsUpstream:
        """For the dialer and the forwards: a Tcp tunnel to host:port (``proxy_protocol``:
        ask for a PROXY v2 header, default the client's setting).  Raises StreamError."""
        if proxy_protocol is None:
            proxy_protocol = self.settings.proxy_protocol
        protocol = LocalProtocol(wstunnel.Kind.TCP, proxy_protocol=proxy_protocol)
        try:
            ws, _ = await self.open_tunnel(protocol, host, port)
        except WstunnelRejected as exc:
            # wstunnel answers every failure (policy, unreachable, refused) with one 400.
            self.failures += 1
            self.last_error = str(exc)
            raise StreamError(ResetReason.GENERAL_FAILURE, str(exc)) from None
        except (OSError, TimeoutError, RemoteProtocolError) as exc:
            self.failures += 1
            self.last_error = str(exc) or type(exc).__name__
            raise StreamError(ResetReason.TUNNEL_LOST, self.last_error) from None
        self.opened += 1
        if early:
            ws.send_data(early)
        return WsUpstream(ws)


def client_settings(cc: ClientConfig) -> WstunnelClientSettings:
    """The client's settings from the config (``client.protocol = "wstunnel"``).

    Certificate verification stays on (as everywhere in autovpn) unless ``insecure``; wstunnel
    itself does not verify by default (``--tls-verify-certificate`` turns it on there).
    """
    w = cc.wstunnel
    ctx = None
    if cc.server.tls:
        ctx = client_context(
            cc.tls_ca,
            insecure=cc.insecure,
            certificate=cc.tls_certificate,
            private_key=cc.tls_private_key,
        )
        if w.sni_disable:
            ctx.check_hostname = False
    prefix = cc.path_prefix
    default = prefix in ("autovpn", wstunnel.DEFAULT_PATH_PREFIX)
    if default and cc.tls_certificate:
        # mTLS: with the default prefix, wstunnel uses the certificate's CN (section 1.1).
        prefix = _certificate_cn(cc.tls_certificate) or wstunnel.DEFAULT_PATH_PREFIX
    elif default and cc.secret:
        # --secret-file: the secret is the path prefix, as ``wstunnel client -P SECRET`` sends
        # it: what an autovpn server (or a wstunnel server with ``-r SECRET``) lets in.
        if not path_safe(cc.secret):
            raise ConfigError(
                "--secret-file",
                "with --protocol wstunnel the secret travels as the URL path prefix, and it has "
                "characters a path cannot carry: use letters, digits, '-' and '_' (e.g. "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )
        prefix = cc.secret.decode("ascii")
    elif prefix == "autovpn":  # our native default: wstunnel's is v1
        prefix = wstunnel.DEFAULT_PATH_PREFIX
    return WstunnelClientSettings(
        server=cc.server,
        ssl_context=ctx,
        sni="" if w.sni_disable else cc.sni,
        path_prefix=prefix,
        headers=w.headers,
        headers_file=Path(w.headers_file) if w.headers_file else None,
        credentials=w.credentials,
        min_idle=w.min_idle,
        max_backoff=w.max_backoff,
        ping_interval=w.ping_interval,
        reverse=w.remote_to_local,
        reverse_max_backoff=w.reverse_max_backoff,
        idle_timeout=cc.idle_timeout,
    )


def _certificate_cn(path: Path) -> str | None:
    # cryptography costs ~60 ms to import: only a client with a certificate pays it.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
