"""Where the log goes and how it looks: text or JSON lines, stderr or a rotated file, and the
secrets that must never appear in it.

Two kinds of lines share one destination: the access log (logger ``autovpn.access``, one line
per connection at its end, written by ``autovpn.stats``: client, host, port, route, rule,
server, user, bytes up and down, duration, result) and everything else (the error log:
``autovpn.*`` warnings and errors, with info and debug at those levels).  In JSON each line is
one object; an access line carries its fields as keys, so a log pipeline needs no parsing.

Secrets (user secrets, the control token, a secret path prefix, proxy passwords) are never
logged on purpose; ``redact`` registers them anyway, and every record is checked at output, so
that a secret that reaches a message by accident (a URL in an exception, a library's debug
line) is replaced by ``[redacted]`` rather than written.  The check runs per line written,
not per line skipped, so it costs nothing at the levels that are off.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["JsonFormatter", "RedactingFilter", "configure", "redact"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REDACTED = "[redacted]"
#: Secrets shorter than this are not looked for: a 3-character "secret" would redact every
#: word containing it, and such a secret protects nothing anyway.
MIN_SECRET = 6

_secrets: set[str] = set()
_lock = threading.Lock()
_installed: logging.Handler | None = None  # the handler of the last ``configure``


def redact(*values: str | bytes | None) -> None:
    """Never write these in the log (each, and its text form if it was bytes)."""
    with _lock:
        for value in values:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value and len(value) >= MIN_SECRET:
                _secrets.add(value)


def _scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Replaces registered secrets in a record's final text (message, arguments and
    traceback): attached to the handlers, so it sees every record they write."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        message = record.getMessage()
        clean = _scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            record.access = {k: _scrub(v) if isinstance(v, str) else v for k, v in access.items()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, and for an
    access line its fields (``access``); a traceback as ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(
    level: str = "info",
    *,
    fmt: str = "text",
    file: Path | None = None,
    max_bytes: int = 10 << 20,
    backups: int = 5,
) -> logging.Handler:
    """Set up the root logger: ``level``, ``fmt`` ``text`` or ``json``, to ``file`` (rotated
    past ``max_bytes``, keeping ``backups`` old files; 0 never rotates) or stderr.  Replaces
    handlers set by an earlier call.  Returns the handler."""
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter())
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    _installed = handler
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
