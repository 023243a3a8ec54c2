"""Serving stock wstunnel v10 clients on the tunnel server's own port, without configuration.

``WstunnelService.install(server)`` adds ``offer`` to ``TunnelServer.alternatives``: every
request whose path is not our native tunnel path and which looks like wstunnel (a path ending
in ``events``, or a bearer JWT in ``Sec-WebSocket-Protocol``) is taken over here and
answered as wstunnel answers it: the checks of docs/wstunnel-protocol.md section 1.3 in order, each
failure a ``400 Invalid request``, the destination dialled *before* the 101 (so an
unreachable destination is a 400 too), then one ``WsSide`` relay per tunnel.  Anything else
is left to the native server (404).

Access control: first who the client is (``access.identify``: a client certificate, a path
prefix that is a user's secret, the operator's ``-r``/``--restrict-config`` rules, or nobody
with ``allow_anonymous``; anything else is refused and counts as an authentication failure of
its address), then wstunnel's own checks: the mTLS CN must equal the path prefix, then the
restrictions (``--restrict-config`` file, reloaded when it changes, or ``--restrict-to``/``-r``),
then our own ``DestinationPolicy`` on the resolved addresses (private and loopback refused
unless allowed).  Anonymous clients never get reverse tunnels.  The JWT itself authenticates
nothing (section 2.2).

Statistics (``autovpn.stats``): each tunnel (WebSocket or HTTP/2 stream) is a ``Flow`` of the
listener ``wstunnel`` and its user (``Identity.label``), started once the request is authorized
(so a destination that cannot be dialled counts as a failure of that user), ended with the
relay, with its access log line then; a request refused before that counts as a failure of
the listener by reason (``auth``, ``not_allowed``, ``bad_request``...).

The path prefix may be a user's secret: no log line here shows a request path or prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from autovpn.config import WstunnelServerOptions
from autovpn.errors import ConfigError, RemoteProtocolError
from autovpn.idle import IdleSweep
from autovpn.limits import peer_key
from autovpn.net import reset_reason_for, resolve_target
from autovpn.stats import Flow
from autovpn.tunnel.wstunnel import access
from autovpn.tunnel.wstunnel.access import How, Identity
from autovpn.tunnel.wstunnel.h2 import PREFACE_LINE, H2Tunnels
from autovpn.tunnel.wstunnel.relay import UdpWsSide, WsSide, tcp_tunnels
from autovpn.tunnel.wstunnel.restrictions import Restrictions, Verdict
from autovpn.tunnel.wstunnel.reverse import ReverseListeners
from autovpn.wire import wstunnel
from autovpn.wire.http1 import RequestHead
from autovpn.wire.wstunnel import (
    Kind,
    Session,
    TunnelRequest,
    WstunnelRejected,
    WstunnelUnauthenticated,
    refusal_reason,
)

if TYPE_CHECKING:
    from autovpn.tunnel.mux.server import TunnelServer

log = logging.getLogger("autovpn.tunnel.wstunnel")

#: The listener name of wstunnel-protocol tunnels in the statistics.
LISTENER: Final = "wstunnel"


def _client_cn(transport: asyncio.BaseTransport) -> str | None:
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _client_key(who: Identity, peer: str) -> str:
    """Who a request counts against for per-client limits: its user or certificate CN, else
    its address (not X-Forwarded-For, which the client writes itself)."""
    if who.how is How.CERTIFICATE:
        return f"CN={who.name}"
    if who.how is How.SECRET:
        return f"user={who.name}"
    host, _, _ = peer.rpartition(":")
    return host or peer


#: Bytes a peer may send before its 101 that are kept for its tunnel (a wstunnel client sends
#: none: it waits for the 101); reading pauses past this.
MAX_EARLY_BYTES: Final = 64 * 1024


class _Pending(asyncio.Protocol):
    """The connection's protocol while its request is being served.

    It keeps reading, so that a peer that leaves is noticed at once, also while a reverse
    request waits for a connection (for hours, maybe): with reading paused, as it was, a FIN
    went unseen and the request, its connection and its reverse listener stayed for good.
    What arrives meanwhile is kept for the tunnel.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.early = bytearray()
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) >= MAX_EARLY_BYTES:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # a tunnel has no half-close: a peer that stopped sending has left

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()


class WstunnelService:
    """wstunnel v10 tunnels on a ``TunnelServer``'s port."""

    def __init__(
        self,
        server: TunnelServer,
        options: WstunnelServerOptions | None = None,
        *,
        allow_anonymous: bool = False,
    ) -> None:
        self.server = server
        self.options = options or WstunnelServerOptions()
        #: ``server.allow_anonymous``: forward tunnels for clients with no secret prefix and no
        #: client certificate (the wstunnel protocol authenticates nobody by itself).
        self.allow_anonymous = allow_anonymous
        self.tunnels: set[WsSide] = set()
        self.idle = IdleSweep(
            server.settings.idle_timeout, lambda: tcp_tunnels(self.tunnels), "wstunnel tunnels"
        )
        self.h2_connections: set[H2Tunnels] = set()
        self.accepted = 0
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._restrictions = Restrictions.from_flags(
            self.options.restrict_to, self.options.restrict_path_prefixes
        )
        self._restrict_mtime: float | None = None
        #: The users' secrets, as ``-P SECRET`` path prefixes of stock clients.
        self._secrets = access.SecretPrefixes(server.settings.users)
        #: The operator's rules say who may connect (``-r``, ``--restrict-config``).
        self._restricted = bool(
            self.options.restrict_path_prefixes or self.options.restrict_config is not None
        )
        if self.options.restrict_config is not None:
            if self.options.restrict_to or self.options.restrict_path_prefixes:
                raise ConfigError(
                    "--restrict-config", "conflicts with --restrict-to and -r (as in wstunnel)"
                )
            self._load_restrictions()
        self.reverse = ReverseListeners(
            self.options.reverse_idle_timeout, server.settings.max_reverse_listeners_per_client
        )

    def spawn_h2(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="wstunnel-h2-stream")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def install(self) -> WstunnelService:
        self.server.alternatives.append(self.offer)
        return self

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.server.alternatives.remove(self.offer)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.idle.close()
        for ws in list(self.tunnels):
            ws.abort()
        for conn in list(self.h2_connections):
            conn.abort()
        await self.reverse.close()

    # -- restrictions ------------------------------------------------------------------------

    def _load_restrictions(self) -> None:
        path = self.options.restrict_config
        assert path is not None
        try:
            mtime = path.stat().st_mtime
            if mtime == self._restrict_mtime:
                return
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            if self._restrict_mtime is None:
                raise ConfigError("--restrict-config", f"cannot read {path}: {exc}") from None
            return  # removed or unreadable: keep the last good rules (wstunnel re-watches)
        try:
            self._restrictions = Restrictions.from_yaml(text, str(path))
        except ConfigError as exc:
            if self._restrict_mtime is None:
                raise
            log.warning("restrictions %s not reloaded: %s", path, exc)
            return
        if self._restrict_mtime is not None:
            log.info("restrictions reloaded from %s", path)
        self._restrict_mtime = mtime

    @property
    def restrictions(self) -> Restrictions:
        if self.options.restrict_config is not None:
            self._load_restrictions()
        return self._restrictions

    def describe_access(self) -> tuple[int, str]:
        """(log level, line) for the start-up log: who may use the wstunnel protocol here."""
        if self._restricted:
            open_rules = self.restrictions.anyone()
            if open_rules:
                return logging.WARNING, (
                    "wstunnel clients: restriction rule(s) "
                    + ", ".join(repr(n) for n in open_rules)
                    + " match ANY request (!Any): anyone who reaches this port may open the "
                    "tunnels they allow"
                )
            return logging.INFO, (
                "wstunnel clients: let in by a secret path prefix (-P SECRET), a client "
                "certificate, or the -r/--restrict-config rules"
            )
        if self.allow_anonymous:
            return logging.WARNING, (
                "--allow-anonymous: this server is OPEN TO ANYONE who speaks wstunnel's "
                "protocol: they may open forward tunnels (under the destination policy; "
                "reverse tunnels still need a secret or a client certificate)"
            )
        unsafe = [n for n, s in self.server.settings.users.items() if not access.path_safe(s)]
        note = (
            f" (the secret of {', '.join(unsafe)} has characters a URL path cannot carry "
            "as they are, so only native clients can use it)"
            if unsafe
            else ""
        )
        return logging.INFO, (
            "wstunnel clients: each must send a user's secret as its path prefix "
            f"(wstunnel client -P SECRET) or a client certificate{note}; nobody else gets in"
        )

    def authorize(
        self, req: TunnelRequest, client_cn: str | None, peer: str
    ) -> tuple[Identity, Verdict]:
        """Who ``req`` is and the restriction that lets it in; raises WstunnelRejected.

        A request nobody vouches for is an authentication failure of its address (the
        tunnel server refuses an address with too many at once, before this runs).
        """
        if self.server.auth_blocked(peer):
            raise WstunnelRejected("too many authentication failures from this address", "auth")
        who = access.identify(
            req.path_prefix,
            client_cn,
            self._secrets,
            restricted=self._restricted,
            allow_anonymous=self.allow_anonymous,
        )
        restrictions = self.restrictions
        if who is None or (
            who.how is How.RESTRICTION
            and not restrictions.matches(req.path_prefix, req.authorization)
        ):
            self.server.auth_failed(peer)
            raise WstunnelUnauthenticated(
                "not authenticated: its path prefix is no user's secret, it sent no client "
                "certificate" + (" and no restriction rule matches it" if self._restricted else ""),
                "auth",
            )
        verdict = restrictions.check(req.path_prefix, req.authorization, req.claims, req.host)
        if verdict is None:
            raise WstunnelRejected(
                f"no restriction allows {req.claims.protocol.kind.value} "
                f"{req.claims.host}:{req.claims.port} for {who}",
                "not_allowed",
            )
        if who.how is How.RESTRICTION:
            who = Identity(How.RESTRICTION, verdict.rule.name)
        if req.claims.protocol.kind.reverse and who.how is How.ANONYMOUS:
            raise WstunnelRejected(
                "reverse tunnels need a secret path prefix or a client certificate "
                "(--allow-anonymous opens forward tunnels only)",
                "not_allowed",
            )
        return who, verdict

    # -- statistics --------------------------------------------------------------------------

    def start_flow(self, req: TunnelRequest, who: Identity, peer: str) -> Flow | None:
        """The record of one authorized tunnel (None when statistics are off): its bytes up
        are what the client sends, written to the destination (``reverse``)."""
        stats = self.server.stats
        if stats is None:
            return None
        flow = stats.start(
            listener=LISTENER,
            client=peer,
            host=req.claims.host,
            port=req.claims.port,
            route="",
            user=who.label,
        )
        flow.reverse = True
        return flow

    def count_refusal(self, peer: str, exc: BaseException) -> None:
        """A request refused before it had a record (``start_flow``)."""
        self.refused += 1
        stats = self.server.stats
        if stats is not None:
            stats.failure(LISTENER, peer, refusal_reason(exc))

    # -- requests ----------------------------------------------------------------------------

    def _closed(self, ws: WsSide, release: Callable[[], None]) -> None:
        self.tunnels.discard(ws)
        release()  # the connection, counted per address since its accept (the server's)
        self.server.trimmer.released()

    def offer(
        self, head: RequestHead, transport: asyncio.Transport, rest: bytes, peer: str
    ) -> bool:
        """``TunnelServer.alternatives`` hook: take wstunnel-looking requests over."""
        if head.start_line == PREFACE_LINE:  # HTTP/2: h2c prior knowledge or ALPN h2
            conn = H2Tunnels(self, peer, _client_cn(transport))
            self.h2_connections.add(conn)
            conn.start(transport, PREFACE_LINE.encode() + b"\r\n\r\n" + rest)
            return True
        path = head.target.split("?", 1)[0]
        # A wstunnel client always asks for /<prefix>/events and sends its JWT; other
        # requests stay with the native server (its 404), so probes learn nothing new.
        if not (
            path.endswith("events") or wstunnel.BEARER_PREFIX in head.get("sec-websocket-protocol")
        ):
            return False
        pending = _Pending(transport)
        transport.set_protocol(pending)
        # Whichever protocol holds the connection when it ends releases it (one-shot).
        release = self.server.clients.releaser(transport)
        task = asyncio.get_running_loop().create_task(
            self._serve(head, transport, rest, peer, pending, release), name=f"wstunnel-{peer}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def lost() -> None:
            task.cancel()
            release()

        pending.on_lost = lost
        return True

    async def _serve(
        self,
        head: RequestHead,
        transport: asyncio.Transport,
        rest: bytes,
        peer: str,
        pending: _Pending,
        release: Callable[[], None],
    ) -> None:
        # Whatever ends this request before the relay owns its sockets (a refusal, the peer
        # leaving, cancellation, or a bug) goes through the ``finally``: the dialled target is
        # closed, the peer gets a 400 while it can still be answered, and one line is logged.
        # Before, an exception of an unexpected type (a non-ASCII Sec-WebSocket-Key) left the
        # dialled target open for good, one descriptor per request, until the server ran out.
        target: asyncio.Transport | None = None
        udp: asyncio.DatagramTransport | None = None
        reply: bytes | None = wstunnel.INVALID_REQUEST  # None once the 101 has gone
        relayed = False
        flow: Flow | None = None  # once authorized; the relay ends it, or the ``finally``
        result, detail = "client_gone", ""
        try:
            client_cn = _client_cn(transport)
            req = wstunnel.check_request(head, client_cn=client_cn)
            who, verdict = self.authorize(req, client_cn, peer)
            kind = req.claims.protocol.kind
            # A reverse request's record starts when a connection comes for it: waiting for
            # one (for hours, maybe) is no connection.
            flow = None if kind.reverse else self.start_flow(req, who, peer)
            ws = (UdpWsSide if kind is Kind.UDP else WsSide)(
                Session(client=False),
                ping_interval=self.options.ping_interval,
                peer=peer,
                on_closed=lambda ws: self._closed(ws, release),
            )
            cookie: str | None = None
            early = b""
            if kind is Kind.TCP:
                target = await self._dial(req, ws.local, peer)
            elif kind is Kind.UDP:
                assert isinstance(ws, UdpWsSide)
                udp = await self._dial_udp(req, ws, peer)
            elif kind.reverse:
                client = _client_key(who, peer)
                target, cookie, early = await self.reverse.wait(
                    req, verdict, ws.local, self.server, client
                )
                flow = self.start_flow(req, who, peer)
            else:
                raise WstunnelRejected(f"{kind.value} tunnels are not served here", "not_served")
            response = wstunnel.accept_upgrade(head, cookie)
            if pending.lost or transport.is_closing():
                return  # the peer left while we dialled: close the target, answer nobody
            self.accepted += 1
            log.info(
                "wstunnel peer %s (%s): %s %s:%d",
                peer,
                who,
                req.claims.protocol.kind.value,
                req.claims.host,
                req.claims.port,
            )
            transport.write(response)
            reply = None
            self.tunnels.add(ws)
            if flow is not None:
                flow.meter = ws
                ws.flow = flow  # from here the relay ends it (``WsSide.connection_lost``)
            self.idle.start()
            ws.start(transport, rest + pending.early)
            if isinstance(ws, UdpWsSide) and udp is not None:
                ws.attach_datagram(udp)
            elif target is not None:
                ws.attach_local(target, early)
            relayed = True
        except RemoteProtocolError as exc:
            result, detail = refusal_reason(exc), str(exc)
            if flow is None:
                self.count_refusal(peer, exc)
                log.info("wstunnel peer %s refused: %s", peer, exc)
            else:  # the access log line says it, once
                self.refused += 1
            reply = exc.reply or reply
        except asyncio.CancelledError:
            reply = None  # the peer is gone (or the server is closing): nobody to answer
            raise
        except Exception as exc:  # a bug, or input we did not foresee: refuse, keep serving
            result, detail = type(exc).__name__, str(exc)
            if flow is None:
                self.count_refusal(peer, exc)
            else:
                self.refused += 1
            log.warning(
                "wstunnel peer %s refused: unexpected %s: %s",
                peer,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),  # a traceback only when debugging
            )
        finally:
            if not relayed and flow is not None:
                flow.end(result, detail)
            if not relayed:
                if target is not None:
                    target.abort()
                if udp is not None:
                    udp.close()
                if reply is not None and not transport.is_closing():
                    transport.write(reply)
                    transport.close()
                else:
                    transport.abort()

    async def _dial_udp(
        self, req: TunnelRequest, ws: UdpWsSide, peer: str
    ) -> asyncio.DatagramTransport:
        """A connected UDP socket to ``r:rp`` (no idle timeout on this side, as wstunnel)."""
        loop = asyncio.get_running_loop()
        host, port = req.host, req.claims.port
        addresses = await _allowed_addresses(self.server, host, port, peer, True)
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: ws.datagram_protocol, remote_addr=(addresses[0], port)
            )
        except OSError as exc:
            raise WstunnelRejected(
                f"cannot open UDP to {host}:{port}: {exc}", reset_reason_for(exc).name.lower()
            ) from None
        return transport

    async def _dial(
        self, req: TunnelRequest, local: asyncio.BaseProtocol, peer: str
    ) -> asyncio.Transport:
        """Connect to ``r:rp`` (10 s), after our destination policy; failures are a 400."""
        loop = asyncio.get_running_loop()
        host, port = req.host, req.claims.port
        addresses = await _allowed_addresses(self.server, host, port, peer)
        last: BaseException | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    transport, _ = await loop.create_connection(lambda: local, address, port)
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            try:
                if req.claims.protocol.proxy_protocol:
                    source = _peer_address(peer, req.forwarded_for)
                    sockname = transport.get_extra_info("sockname")
                    if source is not None and sockname:
                        header = wstunnel.proxy_v2_header(source, (sockname[0], sockname[1]))
                        transport.write(header)
            except BaseException:
                transport.abort()  # not returned, so no caller could close it
                raise
            return transport
        reason = "general_failure" if last is None else reset_reason_for(last).name.lower()
        raise WstunnelRejected(f"cannot connect to {host}:{port}: {last}", reason)


async def _allowed_addresses(
    server: TunnelServer, host: str, port: int, peer: str, udp: bool = False
) -> list[str]:
    policy = server.settings.policy
    try:
        # On the server's resolver: bounded per lookup and per client address, shared with
        # its native users (net.SystemResolver).
        addresses = await resolve_target(
            host, port, udp=udp, resolver=server.lookups, client=peer_key(peer)
        )
    except OSError as exc:
        raise WstunnelRejected(f"cannot resolve {host}: {exc}", "host_unreachable") from None
    if not policy.host_allowed(host, port):
        addresses = [a for a in addresses if policy.address_allowed(a, port)]
        if not addresses:
            log.warning("policy refused %s:%d for wstunnel peer %s", host, port, peer)
            raise WstunnelRejected(
                f"destination {host}:{port} not allowed by policy", "not_allowed"
            )
    return addresses


def _peer_address(peer: str, forwarded: str | None) -> tuple[str, int] | None:
    host, _, port = peer.rpartition(":")
    if forwarded is not None:
        return forwarded, int(port) if port.isdecimal() else 0
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port) if port.isdecimal() else 0
