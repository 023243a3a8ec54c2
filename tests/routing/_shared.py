"""Where the real list snapshots live (../shared/data next to the checkout); never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("AUTOVPN_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real list snapshot {path} not present (set AUTOVPN_SHARED_DATA)")
    return path
