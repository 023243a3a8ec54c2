"""The engine: one object that owns the tunnel server, the tunnel client, the router and the
local listeners, and starts and stops them in order.

    async with autovpn.Engine(config) as engine:
        print(engine.listeners[0].bound_port)
        await engine.serve_forever()

Start order is server → tunnel client → listeners, so that a listener never accepts a
connection it cannot route; stop order is the reverse.  A failure while starting (a taken
port, say) stops what was already started and raises the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autovpn import __version__, sysproxy
from autovpn.config import (
    DEFAULT_USER,
    ClientConfig,
    Config,
    ListenSpec,
    ServerConfig,
    ServerEntry,
    ServerURL,
    server_entries,
    state_dir,
)
from autovpn.errors import ConfigError
from autovpn.monitor.api import ControlAPI
from autovpn.policy import DestinationPolicy
from autovpn.ports import bind_with_auto_port
from autovpn.proxy.dialer import Dialer, TunnelOpener
from autovpn.proxy.forward import FORWARD_LISTENER_SCHEMES, ForwardListener, StdioForward
from autovpn.proxy.listener import ListenerKind, ProxyListener
from autovpn.proxy.udp_relay import UdpRelay
from autovpn.proxy.wstunnel_udp import WstunnelUdpRelay
from autovpn.routing.dns import ResolveError, SplitResolver
from autovpn.routing.hosts import parse_hosts
from autovpn.routing.router import Action, Mode, Router
from autovpn.routing.rules import RuleKind
from autovpn.routing.scoring import SCORES_FILE, ScoreBook
from autovpn.routing.upstream import Upstream
from autovpn.stats import HEALTH_INTERVAL, HealthSample, Stats, ratio
from autovpn.tunnel.failover import Member
from autovpn.tunnel.mux.client import ClientSettings, TunnelClient
from autovpn.tunnel.mux.pool import PoolServer, ServerPool
from autovpn.tunnel.mux.server import ServerSettings, TunnelServer
from autovpn.tunnel.tls import client_context, make_private_ca, server_context, write_private
from autovpn.tunnel.wstunnel.client import client_settings
from autovpn.tunnel.wstunnel.server import WstunnelService
from autovpn.tunnel.wstunnel.servers import WstunnelServer, WstunnelServers
from autovpn.wire.auth import Credentials

log = logging.getLogger("autovpn")


def _routing_parts(
    config: Config,
) -> tuple[Router, SplitResolver, ScoreBook]:
    """The router, split resolver and IP scores that ``config.routing`` describes."""
    rc = config.routing
    router = rc.build_router(config.mode)
    for error in router.errors:
        log.warning("routing list: %s", error)  # file:line: reason; the rest loaded
    hosts: dict[str, list[str]] = {}
    if rc.hosts_file is not None:
        try:
            hosts = parse_hosts(rc.hosts_file.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            log.warning("hosts file %s not read: %s", rc.hosts_file, exc.strerror or exc)
    resolver = SplitResolver(
        router,
        local=None if rc.dns_local is None else [Upstream.parse(u) for u in rc.dns_local],
        public=[Upstream.parse(u) for u in rc.dns_public],
        hosts=hosts,
        timeout=rc.dns_timeout,
        concurrency=rc.concurrency,
    )
    geo = router.user_rules.geoip_lookup
    return router, resolver, ScoreBook(geo=geo)


STARTUP_WAIT = 3.0  # seconds to wait for the first tunnel connection when starting


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.router, self.resolver, self.scores = _routing_parts(config)
        self.api: ControlAPI | None = None
        self._warm: asyncio.Task[object] | None = None
        #: ``system_proxy``: the system's proxy setting while it points at our PAC file.
        self.system_proxy: sysproxy.Applied | None = None
        self.server: TunnelServer | None = None
        #: The tunnel servers of the native protocol (one or several, with failover).
        self.pool: ServerPool | None = None
        #: wstunnel v10 protocol: the client (``client.protocol = "wstunnel"``: one or several
        #: servers, with failover) and the server side served on the tunnel server's port.
        self.wstunnel: WstunnelServers | None = None
        self.wstunnel_service: WstunnelService | None = None
        #: Fixed forwards (-L tcp://, unix://, stdio://): always through the tunnel.
        self.forwards: list[ForwardListener | StdioForward] = []
        self.listeners: list[ProxyListener] = []
        self.udp_relays: list[UdpRelay | WstunnelUdpRelay] = []
        self._dialers: list[Dialer] = []
        self._stopped = asyncio.Event()
        #: Traffic statistics (``autovpn.stats``); None with ``stats = false`` or
        #: ``AUTOVPN_STATS=0`` (the benchmarks' switch).
        self.stats: Stats | None = (
            Stats() if config.stats and os.environ.get("AUTOVPN_STATS", "1") != "0" else None
        )
        self._health: asyncio.Task[None] | None = None
        #: Ping and datagram counters at the previous health sample: loss is their change.
        self._last_pings: dict[int, tuple[int, int]] = {}
        self._last_datagrams = (0, 0)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def role(self) -> str:
        """``client``, ``server`` or ``embedded`` (both in this process): the name of this
        engine's record in the state directory, by which ``autovpn --role`` chooses it."""
        if self.config.client is not None and self.config.server is not None:
            return "embedded"
        return "server" if self.config.server is not None else "client"

    @property
    def mode(self) -> Mode:
        return self.router.mode

    @property
    def tunnel(self) -> TunnelClient | None:
        """The first server's tunnel client (the only one, unless several are configured)."""
        return self.pool.clients[0] if self.pool is not None else None

    def set_mode(self, mode: Mode | str) -> None:
        """Switch routing mode; established connections keep their route."""
        self.router.mode = Mode(mode)
        log.info("routing mode is now %s", self.router.mode.value)

    def list_names(self, which: str = "proxy") -> list[str]:
        """The domains of the routing lists (``proxy``, ``direct`` or ``all``), for batch
        resolution: full and suffix rules only (keywords and regexes name no host)."""
        tiers = {
            "proxy": [self.router.proxy_rules],
            "direct": [self.router.direct_rules],
            "all": [self.router.proxy_rules, self.router.direct_rules],
        }[which]
        names: dict[str, None] = {}
        for rs in tiers:
            for table, kind in ((rs.full, RuleKind.FULL), (rs.suffix, RuleKind.SUFFIX)):
                for key, rule in table.items():
                    if rule.kind is kind:
                        names.setdefault(key.lstrip("."), None)
        return list(names)

    async def explain(self, host: str, port: int, *, resolve: bool = False) -> dict[str, object]:
        """What ``autovpn route`` shows: the decision, the resolver that would be used and,
        with ``resolve``, the addresses in the order the dialer would try them, with scores."""
        decision = self.router.decide(host, port)
        upstream, _, how = self.resolver.plan(host, port)
        out: dict[str, object] = {
            "host": host,
            "port": port,
            **decision.to_json(),
            "resolver": upstream,
            "resolver_detail": how,
        }
        if decision.action is Action.PROXY:
            out["note"] = "the name travels to the tunnel server unresolved (no local DNS)"
        if resolve:
            try:
                r = await self.resolver.resolve(host, port)
            except ResolveError as exc:
                out["resolve_error"] = str(exc)
            else:
                now = time.time()
                out["resolved"] = r.to_json()
                out["addresses"] = [
                    self.scores.describe(a, now) for a in self.scores.order(r.addresses, now)
                ]
        return out

    def status(self) -> dict[str, object]:
        """What ``GET /status`` answers."""
        r = self.router
        return {
            "version": __version__,
            "mode": r.mode.value,
            "default": r.default.value,
            "listeners": [
                {"kind": lst.kind.value, "host": lst.host, "port": lst.bound_port}
                for lst in self.listeners
            ],
            "tunnel": self._tunnel_stats(),
            "server": None if self.server is None else self._server_stats(),
            "connections": {
                "accepted": sum(lst.accepted for lst in self.listeners),
                "failed": sum(lst.failed for lst in self.listeners),
                "routed": {
                    action.value: sum(d.counts[action] for d in self._dialers) for action in Action
                },
                "direct_open": sum(len(d.pipes) for d in self._dialers),
            },
            "udp_relays": [
                {
                    "listen": f"{u.host}:{u.bound_port}",
                    "target": f"{u.target[0]}:{u.target[1]}",
                    **dataclasses.asdict(u.stats),
                }
                for u in self.udp_relays
            ],
            "control": self.api.url if self.api is not None else None,
            "rules": {
                "user": len(r.user_rules),
                "reject": len(r.reject_rules),
                "direct": len(r.direct_rules),
                "proxy": len(r.proxy_rules),
                "list_errors": len(r.errors),
            },
            "dns": {
                "cache_entries": len(self.resolver.cache),
                "cache_hits": self.resolver.cache.hits,
                "queries": dict(self.resolver.queries),
                # Lookups the cache answered, of all (each query is one that it did not).
                "cache_hit_rate": ratio(
                    self.resolver.cache.hits,
                    self.resolver.cache.hits + sum(self.resolver.queries.values()),
                ),
            },
            "scored_addresses": len(self.scores.stats),
            "metrics": f"{self.api.url}/metrics" if self.api is not None else None,
            "stats": None if self.stats is None else self.stats.snapshot(),
        }

    def sample_health(self) -> None:
        """One health sample of each tunnel server (``Stats.health``): its state, the lowest
        RTT of its connections' own pings, and the share of pings lost since the previous
        sample; and the share of UDP datagrams dropped (the pool's and the servers')."""
        if self.stats is not None and self.wstunnel is not None:
            # Only the state: a wstunnel server has no connection of its own to ping.
            now = round(time.time(), 3)
            for w in self.wstunnel.clients:
                self.stats.sample_health(
                    str(w.settings.server), HealthSample(now, w.state, None, None)
                )
        if self.stats is None or self.pool is None:
            return
        pool = self.pool
        handed = sum(getattr(u.stats, "sent", 0) for u in self.udp_relays)
        dropped = pool.datagrams_dropped + sum(c.datagrams_dropped for c in pool.clients)
        d_handed, d_dropped = handed - self._last_datagrams[0], dropped - self._last_datagrams[1]
        self._last_datagrams = (handed, dropped)
        datagram_loss = ratio(d_dropped, d_handed + d_dropped)
        now_pings: dict[int, tuple[int, int]] = {}
        now = round(time.time(), 3)
        for client in pool.clients:
            conns = [c for c in client.connections if not c.closed]
            sent = answered = 0
            for c in conns:
                was = self._last_pings.get(id(c), (0, 0))
                now_pings[id(c)] = (c.pings_sent, c.pings_answered)
                sent += c.pings_sent - was[0]
                answered += c.pings_answered - was[1]
            rtts = [c.rtt for c in conns if c.rtt is not None]
            self.stats.sample_health(
                str(client.settings.server),
                HealthSample(
                    time=now,
                    state=client.state,
                    rtt_ms=round(min(rtts) * 1000, 2) if rtts else None,
                    loss=ratio(sent - answered, sent),
                    datagram_loss=datagram_loss,
                ),
            )
        self._last_pings = now_pings

    async def _sample_health_forever(self) -> None:
        while True:
            self.sample_health()
            await asyncio.sleep(HEALTH_INTERVAL)

    def _tunnel_stats(self) -> dict[str, object] | None:
        if self.wstunnel is not None:
            return self._wstunnel_stats(self.wstunnel)
        if self.pool is None:
            return None
        pool = self.pool
        t = pool.clients[0]
        return {
            "server": str(t.settings.server),
            "up": pool.up,
            "connects": sum(c.connects for c in pool.clients),
            "last_error": None if pool.up else str(pool.unavailable()),
            "datagrams_dropped": pool.datagrams_dropped
            + sum(c.datagrams_dropped for c in pool.clients),
            "retried": pool.retried,
            "fallback_direct": pool.fallback_direct,
            "servers": pool.servers_status(),
            "connections": [
                {
                    "streams": len(c.streams),
                    "rtt_ms": None if c.rtt is None else round(c.rtt * 1000, 2),
                    "bytes_in": c.bytes_in,
                    "bytes_out": c.bytes_out,
                }
                for client in pool.clients
                for c in client.connections
            ],
        }

    @staticmethod
    def _wstunnel_stats(servers: WstunnelServers) -> dict[str, object]:
        """The same shape as our own protocol's: no connection outlives a wstunnel tunnel, so
        ``connections`` is empty and each server counts its open ``tunnels``."""
        return {
            "protocol": "wstunnel",
            "server": str(servers.clients[0].settings.server),
            "up": servers.up,
            "connects": sum(c.connects for c in servers.clients),
            "last_error": None if servers.up else str(servers.unavailable()),
            "datagrams_dropped": 0,  # counted by each UDP relay
            "retried": servers.retried,
            "fallback_direct": servers.fallback_direct,
            "servers": servers.servers_status(),
            "connections": [],
        }

    def _server_stats(self) -> dict[str, object]:
        assert self.server is not None
        srv = self.server
        return {
            "connections": len(srv.connections),
            "streams_open": sum(len(c.streams) for c in srv.connections),
            "streams_opened": srv.streams_opened,
            "streams_failed": srv.streams_failed,
            "upgrades_refused": srv.refused,
            "udp": None if srv.udp is None else dataclasses.asdict(srv.udp.stats),
        }

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        if cfg.system_proxy and (cfg.client is None or cfg.control is None):
            raise ConfigError(
                "system_proxy",
                "the system proxy points at the PAC file of the control API and the local"
                " proxies: it needs both (a client, and control not false)",
            )
        self.scores.load(state_dir() / SCORES_FILE)
        if cfg.server is not None:
            self.server = TunnelServer(_server_settings(cfg.server))
            self.server.stats = self.stats
            await self.server.start()
            options = cfg.server.wstunnel
            if options.enabled:
                self.wstunnel_service = WstunnelService(
                    self.server, options, allow_anonymous=cfg.server.allow_anonymous
                ).install()
                level, line = self.wstunnel_service.describe_access()
                log.log(level, line)
        client = cfg.client
        if client is not None and client.protocol == "wstunnel":
            await self._start_wstunnel_client(client)
        elif client is not None:
            servers = [
                PoolServer(_client_settings(client, url), entry.priority, entry.weight)
                for entry, url in self._server_urls(client)
            ]
            self.pool = pool = ServerPool(
                servers,
                retries=client.retries,
                fallback_direct_after=client.fallback_direct_after,
            )
            self.resolver.opener = pool.open_socket_stream
            dialer = await self._start_servers(pool, client)
            for spec in client.listen:
                if spec.scheme == "udp":
                    relay = _make_udp_relay(spec, pool)
                    await relay.start()
                    self.udp_relays.append(relay)
                    continue
                if spec.scheme in FORWARD_LISTENER_SCHEMES:
                    await self._start_forward(spec, pool)
                    continue
                await self._start_listener(spec, dialer, client)
        if cfg.control is not None:
            self.api = ControlAPI(
                self,
                cfg.control,
                state_dir(),
                cfg.control_hosts,
                role=self.role,
                auto_port=cfg.auto_port,
            )
            await self.api.start()
            if cfg.system_proxy:
                # Blocking (a few gsettings/networksetup runs): once, at start.
                self.system_proxy = sysproxy.point_at(f"{self.api.url}/proxy.pac", state_dir())
        if self.stats is not None and (self.pool is not None or self.wstunnel is not None):
            self._health = asyncio.get_running_loop().create_task(
                self._sample_health_forever(), name="tunnel-health"
            )
        if cfg.routing.warm_at_start:
            self._warm = asyncio.get_running_loop().create_task(
                self.resolver.resolve_many(self.list_names("all")), name="dns-warm-up"
            )

    async def _start_servers(
        self, servers: ServerPool | WstunnelServers, client: ClientConfig
    ) -> Dialer:
        """Start the client's servers and the dialer through them."""
        servers.start()
        # Give the first tunnel connection (or probe) a moment, so that the first connections
        # and datagrams do not race it; a server that is down only delays start-up this long.
        if not await servers.wait_up(STARTUP_WAIT):
            log.warning(
                "no tunnel connection yet (%s); retrying in the background",
                servers.unavailable(),
            )
        dialer = Dialer(
            self.router,
            servers,
            client.connect_timeout,
            resolver=self.resolver,
            scores=self.scores,
            retries=client.retries,
            fallback_direct=lambda: servers.fallback_direct,
            stats=self.stats,
            idle_timeout=client.idle_timeout,
        )
        self._dialers.append(dialer)
        return dialer

    def _server_urls(self, client: ClientConfig) -> list[tuple[ServerEntry, ServerURL]]:
        """The client's servers and the URL to dial for each: an in-process server bound on
        port 0 (embedded) is dialled on the port it got."""
        out = []
        for entry in server_entries(client):
            url = entry.url
            if url.port == 0 and self.server is not None:
                url = dataclasses.replace(url, port=self.server.port)
            out.append((entry, url))
        return out

    async def _start_wstunnel_client(self, client: ClientConfig) -> None:
        options = client.wstunnel
        self.wstunnel = servers = WstunnelServers(
            [
                WstunnelServer(client_settings(client, url), entry.priority, entry.weight)
                for entry, url in self._server_urls(client)
            ],
            reverse=options.remote_to_local,
            reverse_max_backoff=options.reverse_max_backoff,
            retries=client.retries,
            fallback_direct_after=client.fallback_direct_after,
        )
        dialer = await self._start_servers(servers, client)
        for spec in client.listen:
            if spec.scheme in FORWARD_LISTENER_SCHEMES:
                await self._start_forward(spec, self.wstunnel)
                continue
            if spec.scheme == "udp":
                assert spec.target_host is not None and spec.target_port is not None
                wrelay = WstunnelUdpRelay(
                    spec.host,
                    spec.port,
                    spec.target_host,
                    spec.target_port,
                    self.wstunnel,
                    float(spec.option("timeout_sec") or 30),
                )
                await wrelay.start()
                self.udp_relays.append(wrelay)
                continue
            await self._start_listener(spec, dialer, client)

    async def _start_listener(self, spec: ListenSpec, dialer: Dialer, client: ClientConfig) -> None:
        """A SOCKS5 or HTTP proxy listener; with ``auto_port``, on the next free port if its
        own is taken (status, the PAC files and the banner report the bound one).

        Only these move: a forward's or UDP relay's port is written in another program's
        configuration (an ssh command, a WireGuard Endpoint), which a moved port would break
        without a word, while browsers and the system find the proxies through the PAC."""

        async def start(port: int) -> ProxyListener:
            listener = _make_listener(dataclasses.replace(spec, port=port), dialer, client)
            await listener.start()
            return listener

        listener = await bind_with_auto_port(start, spec.port, self.config.auto_port)
        self.listeners.append(listener)

    async def _start_forward(self, spec: ListenSpec, opener: TunnelOpener) -> None:
        forward: ForwardListener | StdioForward
        if spec.scheme == "stdio":
            forward = StdioForward(spec, opener, self.stop, self.stats)
        else:
            forward = ForwardListener(spec, opener, self.stats)
        await forward.start()
        self.forwards.append(forward)

    async def close(self) -> None:
        if self.system_proxy is not None:
            # First, while the PAC file is still served; synchronous, so that a second
            # Ctrl-C during the closing cannot leave the system pointing at nothing.
            try:
                self.system_proxy.restore()
            except sysproxy.SystemProxyError as exc:
                log.error("%s; the next --set-system-proxy run restores it", exc)
            self.system_proxy = None
        if self.api is not None:
            await self.api.close()
            self.api = None
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        if self._warm is not None:
            self._warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warm
            self._warm = None
        if self.scores.stats:
            try:
                self.scores.save(state_dir() / SCORES_FILE)
            except OSError as exc:
                log.warning("IP scores not saved: %s", exc)
        for relay in self.udp_relays:
            await relay.close()
        self.udp_relays.clear()
        for forward in reversed(self.forwards):
            await forward.close()
        self.forwards.clear()
        for listener in reversed(self.listeners):
            await listener.close()
        self.listeners.clear()
        for dialer in self._dialers:
            dialer.close()
        self._dialers.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.wstunnel is not None:
            await self.wstunnel.close()
            self.wstunnel = None
        if self.wstunnel_service is not None:
            await self.wstunnel_service.close()
            self.wstunnel_service = None
        if self.server is not None:
            await self.server.close()
            self.server = None
        self._stopped.set()

    def stop(self) -> None:
        """Make ``serve_forever`` return (the caller's ``async with`` then closes)."""
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def describe(self) -> list[str]:
        """One human line per running part, for the CLI's start-up message."""
        lines = []
        if self.server is not None:
            s = self.server.settings
            lines.append(
                f"tunnel server  {'wss' if s.ssl_context else 'ws'}://{s.host}:{self.server.port}"
            )
        if self.pool is not None:
            servers = _servers_line(self.pool.members)
            lines.append(f"tunnel client  -> {servers}  (mode {self.router.mode.value})")
        for relay in self.udp_relays:
            lines.append(
                f"udp    relay   {relay.host}:{relay.bound_port} -> {relay.target[0]}:"
                f"{relay.target[1]} (through the tunnel)"
            )
        if self.api is not None:
            lines.append(f"control api    {self.api.url}  (PAC: {self.api.url}/proxy.pac)")
        if self.system_proxy is not None:
            lines.append(
                f"system proxy   {self.system_proxy.backend.name} -> {self.system_proxy.pac_url}"
                "  (restored on exit)"
            )
        for listener in self.listeners:
            auth = " (auth)" if listener.credentials else ""
            lines.append(
                f"{listener.kind.value:<6} proxy   {listener.host}:{listener.bound_port}{auth}"
            )
        for forward in self.forwards:
            spec = forward.spec
            where = spec.host if spec.scheme == "unix" else f"{spec.host}:{forward.bound_port}"
            lines.append(
                f"{spec.scheme:<6} forward {where} -> {spec.target_host}:{spec.target_port}"
                " (through the tunnel)"
            )
        if self.wstunnel is not None:
            servers = _servers_line(self.wstunnel.members)
            lines.append(f"tunnel client  -> {servers}  (wstunnel protocol)")
        return lines


def _servers_line(members: Sequence[Member[Any]]) -> str:
    """The servers of the banner's line, with their priority and weight when several."""
    return ", ".join(
        str(m.client.settings.server)
        + (f" (priority {m.priority}, weight {m.weight})" if len(members) > 1 else "")
        for m in members
    )


def _server_settings(sc: ServerConfig) -> ServerSettings:
    ctx = None
    if sc.listen.tls:
        assert sc.tls_certificate is not None and sc.tls_private_key is not None
        ctx = server_context(sc.tls_certificate, sc.tls_private_key, sc.tls_client_ca_certs)
    return ServerSettings(
        host=sc.listen.host,
        port=sc.listen.port,
        users=dict(sc.users),
        ssl_context=ctx,
        path_prefix=sc.path_prefix,
        policy=DestinationPolicy(sc.allow, block_private=not sc.allow_all),
        reverse_binds=tuple(sc.reverse_binds),
        keepalive_interval=sc.keepalive_interval,
        keepalive_timeout=sc.keepalive_timeout,
        idle_timeout=sc.idle_timeout,
        max_reverse_listeners_per_client=sc.max_reverse_listeners_per_client,
        auth_failure_limit=sc.auth_failure_limit,
        auth_failure_window=sc.auth_failure_window,
        handshake_timeout=sc.handshake_timeout,
        listen_fds=sc.listen_fds,
        max_connections_per_address=sc.max_connections_per_address,
        max_streams_per_connection=sc.max_streams_per_connection,
        max_pending_opens=sc.max_pending_opens,
        lookup_timeout=sc.lookup_timeout,
        max_lookups_per_address=sc.max_lookups_per_address,
    )


def _client_settings(cc: ClientConfig, server: ServerURL) -> ClientSettings:
    ctx = None
    if server.tls:
        # The client certificate too: a server with --tls-client-ca-certs asks every client
        # for one, native clients included (without it the TLS handshake fails).
        ctx = client_context(
            cc.tls_ca,
            insecure=cc.insecure,
            certificate=cc.tls_certificate,
            private_key=cc.tls_private_key,
        )
    return ClientSettings(
        server=server,
        user=cc.user,
        secret=cc.secret,
        ssl_context=ctx,
        sni=cc.sni,
        path_prefix=cc.path_prefix,
        pool_size=cc.pool_size,
        connect_timeout=cc.connect_timeout,
        open_timeout=cc.open_timeout,
        keepalive_interval=cc.keepalive_interval,
        keepalive_timeout=cc.keepalive_timeout,
        idle_timeout=cc.idle_timeout,
        permanent_backoff=cc.retry_refused_after,
        reverse=tuple(cc.reverse),
    )


def _make_udp_relay(spec: ListenSpec, tunnel: ServerPool) -> UdpRelay:
    assert spec.target_host is not None and spec.target_port is not None
    # wstunnel's default idle timeout for UDP is 30 s; timeout_sec=0 means none.
    timeout = float(spec.option("timeout_sec") or 30)
    return UdpRelay(spec.host, spec.port, spec.target_host, spec.target_port, tunnel, timeout)


def _make_listener(spec: ListenSpec, dialer: Dialer, client: ClientConfig) -> ProxyListener:
    kind = ListenerKind(spec.scheme)
    creds = Credentials(dict(spec.users)) if spec.users else None
    return ProxyListener(
        kind,
        spec.host,
        spec.port,
        dialer,
        creds,
        allow_open=client.allow_open,
        handshake_timeout=client.handshake_timeout,
        max_connections_per_address=client.max_connections_per_address,
    )


def embedded_config(state: Path, *, socks_port: int = 1080, http_port: int = 8080) -> Config:
    """The out-of-the-box set-up: a loopback tunnel server and a client that trusts only the
    private CA made for it on first run, with SOCKS5 on 1080 and HTTP on 8080.

    The embedded server runs on the user's own machine, so its destination policy allows
    everything the user could reach anyway (loopback included); a real server keeps the default.
    """
    tls_dir, secret_path = state / "embedded-tls", state / "embedded-secret"
    ca, cert, key = tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key"
    if not (ca.is_file() and cert.is_file() and key.is_file()):
        make_private_ca(tls_dir, ["localhost", "127.0.0.1", "::1"], days=3650)
    if not secret_path.is_file():
        write_private(secret_path, secrets.token_urlsafe(32).encode())
    secret = secret_path.read_bytes().strip()
    server = ServerConfig(
        listen=ServerURL(True, "127.0.0.1", 0),
        users={DEFAULT_USER: secret},
        tls_certificate=cert,
        tls_private_key=key,
        allow_all=True,
    )
    server.wstunnel.enabled = False  # only our own client talks to it
    client = ClientConfig(
        server=ServerURL(True, "127.0.0.1", 0),
        secret=secret,
        tls_ca=ca,
        listen=[
            ListenSpec("socks5", "127.0.0.1", socks_port),
            ListenSpec("http", "127.0.0.1", http_port),
        ],
    )
    return Config(client=client, server=server, mode=Mode.GLOBAL)
