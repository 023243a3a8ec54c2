"""GEOIP lookups backed by the ``geoip2fast`` package, which ships its country database.

Kept apart from ``rules`` so the rule set stays pure: a ``RuleSet`` receives the lookup as a
plain callable (``GeoLookup``).  The database is loaded once, on the first call of
``geoip2fast_lookup`` (about 0.1 s here); it is never downloaded at run time.
"""

from __future__ import annotations

import functools
from typing import Any

from .rules import GeoLookup

__all__ = ["geoip2fast_lookup"]


@functools.cache
def _database() -> Any:
    # Loaded on first use: an optional dependency, and its database takes a while to load.
    from geoip2fast import GeoIP2Fast

    return GeoIP2Fast()


def geoip2fast_lookup() -> GeoLookup:
    """A ``GeoLookup``: IP text -> upper-case ISO country code, or None when unknown/private.

    Raises ``ImportError`` when ``geoip2fast`` is not installed.
    """
    db = _database()

    def lookup(address: str) -> str | None:
        try:
            result = db.lookup(address)
        except Exception:  # the library reports bad input in several ways
            return None
        code = getattr(result, "country_code", "") or ""
        if len(code) != 2 or not code.isalpha():
            return None
        return str(code).upper()

    return lookup
