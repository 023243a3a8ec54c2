"""``autovpn status --watch``: a live terminal view of a running engine, drawn with rich.

Every ``interval`` seconds it asks ``GET /status`` (the standard library's client, like the
other commands) and redraws: the servers with their state, RTT and loss, the traffic rates per
route (from the change of the byte counters between two answers), the busiest domains, the
open connections and the recent failures.  Only this command imports rich (about 60 ms).

``render`` is a pure function of two status answers, so it is tested without a terminal;
``watch`` runs the loop (Ctrl-C ends it; ``count`` ends it after that many screens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["human_bytes", "render", "watch"]

Status = Mapping[str, Any]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns first


def _rate(now: Mapping[str, Any], before: Mapping[str, Any] | None, key: str, dt: float) -> str:
    if before is None or dt <= 0:
        return "-"
    return human_bytes(max(now.get(key, 0) - before.get(key, 0), 0) / dt) + "/s"


def _servers(status: Status, stats: Mapping[str, Any]) -> Table:
    table = Table(title="servers", expand=True, title_justify="left")
    for column in ("server", "state", "RTT", "loss", "connections", "traffic"):
        table.add_column(column)
    health = stats.get("health", {})
    groups = stats.get("servers", {})
    tunnel = status.get("tunnel")
    # The pool's servers as they are now (state, connections), by URL.
    live = {s["url"]: s for s in tunnel.get("servers", [])} if isinstance(tunnel, dict) else {}
    for name in sorted(set(health) | set(groups) | set(live)):
        history = health.get(name) or []
        last = history[-1] if history else {}
        state = last.get("state", "?")
        rtt = "-" if last.get("rtt_ms") is None else f"{last['rtt_ms']:.1f} ms"
        now = live.get(name)
        if now is not None:
            state = now["state"]
            rtts = [c["rtt_ms"] for c in now.get("connections", []) if c["rtt_ms"] is not None]
            rtt = f"{min(rtts):.1f} ms" if rtts else rtt
        loss = "-" if last.get("loss") is None else f"{last['loss'] * 100:.0f}%"
        figures = groups.get(name, {})
        table.add_row(
            name,
            Text(state, style="green" if state == "up" else "red"),
            rtt,
            loss,
            f"{figures.get('open', 0)} open / {figures.get('total', 0)}",
            f"up {human_bytes(figures.get('bytes_up', 0))}, "
            f"down {human_bytes(figures.get('bytes_down', 0))}",
        )
    return table


def _traffic(stats: Mapping[str, Any], before: Mapping[str, Any] | None, dt: float) -> Table:
    table = Table(title="traffic", expand=True, title_justify="left")
    for column in ("route", "open", "total", "up", "down", "up rate", "down rate", "failures"):
        table.add_column(column)
    old = (before or {}).get("routes", {}) if before is not None else None
    for route, figures in sorted(stats.get("routes", {}).items()):
        was = old.get(route) if old is not None else None
        if old is not None and was is None:
            was = {}
        failures = ", ".join(f"{k} {v}" for k, v in figures["failures"].items()) or "-"
        table.add_row(
            route,
            str(figures["open"]),
            str(figures["total"]),
            human_bytes(figures["bytes_up"]),
            human_bytes(figures["bytes_down"]),
            _rate(figures, was, "bytes_up", dt),
            _rate(figures, was, "bytes_down", dt),
            failures,
        )
    return table


def _domains(stats: Mapping[str, Any], top: int) -> Table:
    table = Table(title=f"top domains (of {len(stats.get('domains', {}))})", expand=True)
    table.title_justify = "left"
    for column in ("domain", "connections", "up", "down"):
        table.add_column(column)
    for name, figures in list(stats.get("domains", {}).items())[:top]:
        table.add_row(
            name,
            f"{figures['open']} open / {figures['total']}",
            human_bytes(figures["bytes_up"]),
            human_bytes(figures["bytes_down"]),
        )
    return table


def _connections(stats: Mapping[str, Any], top: int) -> Table:
    table = Table(title=f"open connections ({stats.get('open', 0)})", expand=True)
    table.title_justify = "left"
    for column in ("client", "destination", "route", "up", "down", "seconds"):
        table.add_column(column)
    for c in stats.get("connections", [])[:top]:
        table.add_row(
            c["client"],
            f"{c['host']}:{c['port']}",
            c["route"] or (f"user {c['user']}" if c["user"] else "-"),
            human_bytes(c["bytes_up"]),
            human_bytes(c["bytes_down"]),
            f"{c['seconds']:.0f}",
        )
    return table


def _failures(stats: Mapping[str, Any], top: int) -> Table:
    table = Table(title="recent failures", expand=True, title_justify="left")
    for column in ("time", "listener", "target", "reason"):
        table.add_column(column)
    for f in list(stats.get("recent_failures", []))[-top:][::-1]:
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(f["time"])),
            f["listener"],
            f["target"],
            Text(f["reason"], style="red"),
        )
    return table


def render(
    status: Status, before: Status | None = None, dt: float = 0.0, *, top: int = 8
) -> RenderableType:
    """One screen from a ``GET /status`` answer (``before``: the previous one, ``dt`` seconds
    earlier, for the rates)."""
    head = Text.assemble(
        (f"autovpn {status.get('version')}", "bold"),
        f"  mode {status.get('mode')}",
        f"  control {status.get('control') or '-'}",
    )
    stats = status.get("stats")
    if not isinstance(stats, dict):
        return Group(head, Text("statistics are off (stats = false)"))
    prev = before.get("stats") if before is not None else None
    prev_stats = prev if isinstance(prev, dict) else None
    dns = status.get("dns") or {}
    rate = dns.get("cache_hit_rate")
    dns_line = Text(
        f"dns: {', '.join(f'{k} {v}' for k, v in dns.get('queries', {}).items())} queries,"
        f" cache hit rate {'-' if rate is None else f'{rate * 100:.0f}%'}"
    )
    parts: list[RenderableType] = [head, _servers(status, stats), _traffic(stats, prev_stats, dt)]
    parts += [_domains(stats, top), _connections(stats, top), _failures(stats, top), dns_line]
    return Group(*parts)


def watch(
    fetch: Callable[[], Status],
    *,
    interval: float = 1.0,
    count: int | None = None,
    console: Console | None = None,
) -> None:
    """Redraw ``render(fetch())`` every ``interval`` seconds until Ctrl-C (or ``count``
    screens)."""
    before: Status | None = None
    at = 0.0
    shown = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while count is None or shown < count:
            status = fetch()
            now = time.monotonic()
            live.update(render(status, before, now - at if before else 0.0), refresh=True)
            before, at = status, now
            shown += 1
            if count is None or shown < count:
                time.sleep(interval)
