"""The routing decision: DIRECT, PROXY or REJECT for every connection the engine receives.

This module is pure (no I/O).  The engine asks ``Router.decide(host, port)`` once per
connection; the listeners never route on their own, so a mode switch at run time changes
what new connections do without touching established ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.Enum):
    DIRECT = "direct"
    PROXY = "proxy"
    REJECT = "reject"


class Mode(enum.Enum):
    GLOBAL = "global"  # everything through the tunnel, local addresses included
    SMART = "smart"  # rules decide
    DIRECT = "direct"  # nothing through the tunnel


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # human-readable: which mode, rule and list decided


class Router:
    """Decides how one connection is carried.  Cheap enough to call per connection."""

    def __init__(self, mode: Mode = Mode.GLOBAL) -> None:
        self.mode = mode

    def decide(self, host: str, port: int) -> Decision:
        if self.mode is Mode.GLOBAL:
            return Decision(Action.PROXY, "mode global")
        if self.mode is Mode.DIRECT:
            return Decision(Action.DIRECT, "mode direct")
        return Decision(Action.PROXY, "mode smart: no rules loaded, default proxy")
