"""The wstunnel v10 protocol client: one stock wstunnel server (``--protocol wstunnel``).

Each tunnelled connection gets its own TCP(+TLS) connection and WebSocket
(docs/wstunnel-protocol.md section 0.1): ``open_upstream(host, port, early)`` takes a
pre-connected stream from the idle pool (or dials one), sends the upgrade request with the JWT
for ``Tcp{proxy_protocol}`` to host:port, waits for the 101 and returns an ``Upstream`` that
relays the application's socket once attached.  Several servers, the choice among them and the
retries are ``autovpn.tunnel.wstunnel.servers``'s; this client is one server's.

**Health.** wstunnel has no connection that outlives a tunnel and no pings of its own outside
one, so a server's health is what its connects say.  A connect that works makes the server
*up*; one that fails makes it *connecting* (a transient error: refused, unreachable, timed out,
reset, or an upgrade answered 429 or 5xx by the server or a proxy in front of it) or *down*
(a permanent one, see ``refusal``: the certificate is not trusted, or the upgrade was answered
401, 403 or 404).  A server that is not up is probed, one TCP/TLS connect with nothing sent,
after ``PROBE_FIRST_INTERVAL`` doubling up to ``PROBE_MAX_INTERVAL`` (or ``max_backoff`` if
lower), or after ``permanent_backoff`` (minutes) when it refused us; a connection waiting for it
cuts the wait short (``kick``).  A server that is up is not probed: every new connection is a
probe, and one that fails is tried again on the next server at once.  A ``400`` says nothing
about the server: wstunnel answers every refusal with it, an unreachable destination included.

As in wstunnel (section 5.7) the idle pool holds ``min_idle`` connected streams with no HTTP
sent yet, each used once and dropped after 30 s, while the server is up.  The headers file is
re-read for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from autovpn.config import DEFAULT_PING_INTERVAL, IDLE_TIMEOUT, ServerURL
from autovpn.errors import ConfigError, RemoteProtocolError, ResetReason, StreamError
from autovpn.idle import IdleSweep
from autovpn.stats import Flow
from autovpn.tunnel.failover import Attempting, Attempts
from autovpn.tunnel.failures import Failing, certificate_reason
from autovpn.tunnel.tls import client_context
from autovpn.tunnel.wstunnel.access import path_safe
from autovpn.tunnel.wstunnel.relay import WsSide, tcp_tunnels
from autovpn.wire import http1, wstunnel
from autovpn.wire.handshake import RESPONSE_LIMITS
from autovpn.wire.wstunnel import Claims, LocalProtocol, Session, WstunnelRejected

if TYPE_CHECKING:
    from autovpn.config import ClientConfig

log = logging.getLogger("autovpn.tunnel.wstunnel")

#: Pooled streams older than this are dropped (bb8 ``max_lifetime``).
POOL_MAX_LIFETIME: Final = 30.0
#: A server that is not up is probed again after this many seconds, doubling each time up to
#: PROBE_MAX_INTERVAL (or ``max_backoff`` if lower): how late a fail-back can be at most.
PROBE_FIRST_INTERVAL: Final = 0.5
PROBE_MAX_INTERVAL: Final = 30.0
#: What one connect may raise; anything else is a bug and propagates.
CONNECT_ERRORS: Final = (OSError, TimeoutError, ssl.SSLError)


def _server_trouble(status: int) -> bool:
    """An upgrade answer that says the server (or a proxy in front of it) is not serving now:
    429 or 5xx, unlike wstunnel's 400, which may be about the destination.  The next server is
    tried, and this one probed."""
    return status == 429 or 500 <= status <= 599


def refusal(status: int) -> str:
    """Why an upgrade answered ``status`` means the server refused us for good, as one line
    that says what to do; "" for any other status.  A stock wstunnel server answers every
    refusal with 400 (a wrong ``-P`` too), so these come from an autovpn server (403 to a path
    prefix that is nobody's secret) or a proxy in front of the server."""
    if status == 401:
        return (
            "server refused the credentials (check --http-upgrade-credentials, or the proxy"
            " in front of the server)"
        )
    if status == 403:
        return "server refused the secret (check --secret-file or -P/--http-upgrade-path-prefix)"
    if status == 404:
        return "server has no tunnel at this path (check -P/--http-upgrade-path-prefix)"
    return ""


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
    #: After a permanent refusal (see ``refusal``, and an untrusted certificate): minutes.
    permanent_backoff: float = 300.0
    ping_interval: float = DEFAULT_PING_INTERVAL
    proxy_protocol: bool = False
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
        self.status = 0  # the answer's, once its head is read
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
            self.status = head.status
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


class WstunnelClient(Attempting):
    """One wstunnel server: ``async with WstunnelClient(settings) as client``; see the module
    docstring.  Its health is what ``autovpn.tunnel.failover.ServerHealth`` reads."""

    def __init__(self, settings: WstunnelClientSettings) -> None:
        self.settings = settings
        self.tunnels: set[WsSide] = set()
        self.opened = 0  # tunnels opened (101 received)
        self.connects = 0  # connects that worked (TCP, and TLS for wss://)
        self.failures = 0  # connects and upgrades that failed because of the server
        self.idle = IdleSweep(
            settings.idle_timeout, lambda: tcp_tunnels(self.tunnels), "wstunnel tunnels"
        )
        self.last_error = ""
        self.failing = Failing()  # the run of failed connection attempts, for last_error
        #: Why the server refused us for good (``refusal``, an untrusted certificate), until a
        #: connect works again after ``permanent_backoff``.
        self.permanent = ""
        #: Called whenever the state may have changed (see ``autovpn.tunnel.failover``).
        self.on_change: Callable[[], None] | None = None
        self.attempts = Attempts()  # connects under way and done; the probe's pause
        self._healthy: bool | None = None  # None: no connect has ended yet
        self._probe: asyncio.Task[None] | None = None
        self._kicked = False  # a connection waits for the scheduled probe: no pause
        self._pool: list[tuple[asyncio.Transport, _Idle]] = []
        self._pool_task: asyncio.Task[None] | None = None
        self._pool_wakeup = asyncio.Event()
        self._closing = False

    async def __aenter__(self) -> WstunnelClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Probe the server at once (its first state), and keep the idle pool filled."""
        self._probe_soon(0.0)
        if self.settings.min_idle > 0:
            self._pool_task = asyncio.get_running_loop().create_task(
                self._fill_pool(), name="wstunnel-pool"
            )

    async def close(self) -> None:
        self._closing = True
        for task in (self._pool_task, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._pool_task = self._probe = None
        for transport, _ in self._pool:
            transport.abort()
        self._pool.clear()
        self.idle.close()
        for ws in list(self.tunnels):
            ws.abort()

    # -- health (autovpn.tunnel.failover.ServerHealth) ------------------------------------------

    @property
    def up(self) -> bool:
        """Its last connect worked (and it has not refused us since)."""
        return bool(self._healthy) and not self.permanent and not self._closing

    @property
    def state(self) -> str:
        """``up``, ``down`` (it refused us for good: ``permanent`` says why) or ``connecting``
        (not tried yet, or ``last_error`` says what failed last)."""
        if self.up:
            return "up"
        return "down" if self.permanent else "connecting"

    @property
    def reason(self) -> str:
        """Why it takes no connection now ("" when it is up)."""
        if self.up:
            return ""
        return self.permanent or self.last_error

    def stall_reason(self) -> str:
        return ""  # no connection outlives its tunnel: nothing can stall unseen

    def kick(self) -> bool:
        """A connection is waiting for this server: probe now (DEMAND_RETRY_GAP after the last
        attempt at the soonest).  False after a permanent refusal, or when closing."""
        if self._closing or self.permanent:
            return False
        if self.attempts.kick():
            return True
        probe = self._probe
        if probe is not None and not probe.done():  # scheduled, not pausing yet
            self._kicked = True
            return True
        return False

    def _signal(self) -> None:
        if self.on_change is not None and not self._closing:
            self.on_change()

    def _worked(self) -> None:
        self.connects += 1
        changed = not self._healthy or self.permanent
        self._healthy = True
        self.permanent = ""
        self.failing.ended()
        if changed:
            self._signal()

    def _failed(self, exc: BaseException) -> str:
        """A connect (or an upgrade, for trouble on the server's side) failed: the server is
        not up until a probe says so; the line that says why."""
        self.failures += 1
        self.last_error = self.failing.failed(exc, self.settings.server)
        if isinstance(exc, ssl.SSLCertVerificationError):
            self._refused(certificate_reason(exc))
            return self.last_error
        if self._healthy is not False:
            log.warning("wstunnel server %s: %s", self.settings.server, self.last_error)
        self._healthy = False
        self._probe_soon(self._probe_interval(self.failing.attempts))
        self._signal()
        return self.last_error

    def _refused(self, reason: str) -> None:
        """The server refused us for good: no connection tries it before ``permanent_backoff``
        has passed (then a probe connect does)."""
        if reason != self.permanent:
            log.error(
                "wstunnel server %s: %s; retrying in %.0f s",
                self.settings.server,
                reason,
                self.settings.permanent_backoff,
            )
        self.permanent = reason
        if not self.last_error.startswith(reason):
            self.last_error = reason
        self._healthy = False
        self._probe_soon(self.settings.permanent_backoff, restart=True)
        self._signal()

    def _probe_interval(self, failures: int) -> float:
        cap = min(PROBE_MAX_INTERVAL, max(self.settings.max_backoff, PROBE_FIRST_INTERVAL))
        return float(min(PROBE_FIRST_INTERVAL * 2 ** max(0, failures - 1), cap))

    def _probe_soon(self, delay: float, *, restart: bool = False) -> None:
        """Probe the server after ``delay`` (or sooner, if ``kick`` asks), unless a probe is
        already waiting (``restart``: replace it, for a permanent refusal's longer wait)."""
        if self._closing:
            return
        probe = self._probe
        if probe is not None and not probe.done() and probe is not asyncio.current_task():
            if not restart:
                return
            probe.cancel()
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_after(delay), name="wstunnel-probe"
        )

    async def _probe_after(self, delay: float) -> None:
        if delay > 0 and not self._kicked:
            await self.attempts.pause(delay)
        self._kicked = False
        if self.up:
            return  # a connection of a user's said so meanwhile
        try:
            transport, idle = await self._connect()
        except CONNECT_ERRORS:
            return  # _connect recorded it and scheduled the next probe
        if not self._closing and len(self._pool) < self.settings.min_idle:
            self._pool.append((transport, idle))
        else:
            transport.close()

    @property
    def pool_size(self) -> int:
        return sum(1 for _, idle in self._pool if not idle.lost)

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.Transport, _Idle]:
        """One TCP(+TLS) connection to the server; its success or failure is the server's
        health.  Raises one of CONNECT_ERRORS."""
        s = self.settings
        loop = asyncio.get_running_loop()
        ctx = s.ssl_context if s.server.tls else None
        if s.server.tls and ctx is None:
            ctx = client_context()
        server_hostname: str | None = None
        if ctx is not None:
            server_hostname = s.server.host if s.sni is None else s.sni
        error: BaseException | None = None
        with self.attempts.attempt():
            try:
                async with asyncio.timeout(s.connect_timeout):
                    transport, idle = await loop.create_connection(
                        _Idle,
                        s.server.host,
                        s.server.port,
                        ssl=ctx,
                        server_hostname=server_hostname,
                    )
            except CONNECT_ERRORS as exc:
                error = exc
        # Recorded once the attempt is counted as ended: whoever waits on this server sees
        # both at once (``ServerSet.choose`` gives up when no attempt is left under way).
        if error is not None:
            if not self._closing:
                self._failed(error)
            raise error
        self._worked()
        return transport, idle

    async def _fill_pool(self) -> None:
        while not self._closing:
            now = time.monotonic()
            keep = []
            for transport, idle in self._pool:
                if idle.lost or now - idle.created > POOL_MAX_LIFETIME:
                    transport.abort()
                else:
                    keep.append((transport, idle))
            self._pool = keep
            # Only while the server is up: the probe finds out when it is back.
            if self.up and len(self._pool) < self.settings.min_idle:
                with contextlib.suppress(*CONNECT_ERRORS):
                    self._pool.append(await self._connect())
                continue
            self._pool_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._pool_wakeup.wait()

    async def _stream(self) -> tuple[asyncio.Transport, _Idle]:
        """A pooled stream if one is fresh, else a new one.  Raises StreamError (``tunnel``:
        another server may do) when the server cannot be reached."""
        while self._pool:
            transport, idle = self._pool.pop(0)
            self._pool_wakeup.set()
            if not idle.lost and time.monotonic() - idle.created <= POOL_MAX_LIFETIME:
                return transport, idle
            transport.abort()
        if self.permanent:
            raise self._down()
        try:
            return await self._connect()
        except CONNECT_ERRORS:
            if self.permanent:
                raise self._down() from None
            raise StreamError(
                ResetReason.TUNNEL_LOST,
                f"no connection to {self.settings.server}: {self.last_error}",
                tunnel=True,
                public=f"tunnel down: {self.last_error}",
            ) from None

    def _down(self) -> StreamError:
        return StreamError(
            ResetReason.TUNNEL_LOST,
            f"{self.settings.server}: {self.permanent}",
            tunnel=True,
            public=f"tunnel down: {self.permanent}",
        )

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
        until the server's listener accepts a connection).  Raises StreamError: ``tunnel``
        when the server failed (unreachable, lost, refused us, no answer), so that another
        server may be tried; GENERAL_FAILURE for a refusal of this tunnel (wstunnel's 400,
        which may be about the destination)."""
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
        except WstunnelRejected as exc:
            transport.abort()
            raise self._rejected(exc, upgrade.status) from None
        except TimeoutError:
            transport.abort()
            self.failures += 1
            self.last_error = f"no answer to the upgrade from {self.settings.server} in time"
            raise StreamError(ResetReason.TIMED_OUT, self.last_error, tunnel=True) from None
        except (OSError, RemoteProtocolError) as exc:
            transport.abort()
            raise StreamError(ResetReason.TUNNEL_LOST, self._failed(exc), tunnel=True) from None
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
        self.opened += 1
        self.idle.start()
        ws.start(transport, rest)
        return ws, answer

    def _rejected(self, exc: WstunnelRejected, status: int) -> StreamError:
        """The StreamError for an upgrade answered ``status`` (not 101)."""
        reason = refusal(status)
        if reason:
            self.failures += 1
            self._refused(reason)
            return self._down()
        if _server_trouble(status):
            return StreamError(ResetReason.TUNNEL_LOST, self._failed(exc), tunnel=True)
        # wstunnel answers every failure (policy, unreachable, refused) with one 400.
        return StreamError(ResetReason.GENERAL_FAILURE, str(exc))

    async def open_upstream(
        self, host: str, port: int, early: bytes = b"", *, proxy_protocol: bool | None = None
    ) -> WsUpstream:
        """For the dialer and the forwards: a Tcp tunnel to host:port (``proxy_protocol``:
        ask for a PROXY v2 header, default the client's setting).  Raises StreamError."""
        if proxy_protocol is None:
            proxy_protocol = self.settings.proxy_protocol
        protocol = LocalProtocol(wstunnel.Kind.TCP, proxy_protocol=proxy_protocol)
        ws, _ = await self.open_tunnel(protocol, host, port)
        if early:
            ws.send_data(early)
        return WsUpstream(ws)


def client_settings(cc: ClientConfig, server: ServerURL | None = None) -> WstunnelClientSettings:
    """The client's settings for ``server`` (default: the first) from the config
    (``client.protocol = "wstunnel"``).

    Certificate verification stays on (as everywhere in autovpn) unless ``insecure``; wstunnel
    itself does not verify by default (``--tls-verify-certificate`` turns it on there).
    """
    w = cc.wstunnel
    server = server or cc.server
    ctx = None
    if server.tls:
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
        server=server,
        ssl_context=ctx,
        sni="" if w.sni_disable else cc.sni,
        path_prefix=prefix,
        headers=w.headers,
        headers_file=Path(w.headers_file) if w.headers_file else None,
        credentials=w.credentials,
        min_idle=w.min_idle,
        max_backoff=w.max_backoff,
        connect_timeout=cc.connect_timeout,
        permanent_backoff=cc.retry_refused_after,
        ping_interval=w.ping_interval,
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
