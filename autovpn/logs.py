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
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "RotatingFileHandler",
    "TextFormatter",
    "configure",
    "redact",
]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
REDACTED = "[redacted]"
#: Secrets shorter than this are not looked for: a 3-character "secret" would redact every
#: word containing it, and such a secret protects nothing anyway.
MIN_SECRET = 6

_secrets: set[str] = set()
#: What a filter iterates: a copy, replaced under the lock (a set that grows while a record
#: is checked in another thread would raise).
_secret_list: tuple[str, ...] = ()
_lock = threading.Lock()
_installed: logging.Handler | None = None  # the handler of the last ``configure``


def redact(*values: str | bytes | None) -> None:
    """Never write these in the log (each, and its text form if it was bytes)."""
    global _secret_list
    with _lock:
        for value in values:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value and len(value) >= MIN_SECRET:
                _secrets.add(value)
        _secret_list = tuple(_secrets)


def _scrub(text: str) -> str:
    for secret in _secret_list:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Replaces registered secrets in a record's final text (message, arguments and
    traceback): attached to the handlers, so it sees every record they write."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _secret_list
        if not secrets:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        access = getattr(record, "access", None)
        # One search per secret over everything the line shows (a secret within any part is
        # within the whole); only a line that has one is cleaned part by part.
        parts = [message]
        if record.exc_text:
            parts.append(record.exc_text)
        if isinstance(access, dict):
            parts.extend([v for v in access.values() if isinstance(v, str)])
        whole = "\n".join(parts)
        if not any(secret in whole for secret in secrets):
            return True
        clean = _scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        if isinstance(access, dict):
            record.access = {k: _scrub(v) if isinstance(v, str) else v for k, v in access.items()}
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with the time's date and seconds formatted once per second rather than
    once per line (an access line per connection makes many lines per second)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:  # formatted under the handler's lock: one line at a time
            self._prefix = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._prefix},{int(record.msecs):03d}"  # the standard default_msec_format


#: ``json.dumps(..., ensure_ascii=False, default=str)`` without a new encoder per line.
_json_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, and for an
    access line its fields (``access``); a traceback as ``exception``."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # once per second (see ``TextFormatter``)
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        out: dict[str, Any] = {
            "time": f"{self._prefix}.{int(record.msecs):03d}Z",
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
        return _json_encode(out)


class RotatingFileHandler(logging.handlers.RotatingFileHandler):
    """The standard rotating file, with each line formatted once (the standard handler
    formats it twice, once to measure it) and no file-system look-up per line (it asks twice
    per line whether the path is a regular file: that is asked when the file is opened; a
    FIFO or a character device is never rotated)."""

    _regular = True

    def _open(self) -> Any:
        stream = super()._open()
        self._regular = os.path.isfile(self.baseFilename)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:
                self.stream = self._open()
            if self.maxBytes > 0 and self._regular:
                self.stream.seek(0, 2)  # at the end: another writer may have written
                if self.stream.tell() + len(line) >= self.maxBytes:
                    self.doRollover()
                    if self.stream is None:
                        self.stream = self._open()
            self.stream.write(line)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


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
        handler = RotatingFileHandler(
            file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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
