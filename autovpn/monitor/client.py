"""The control API's client side, used by the CLI (``autovpn status``, ``mode``, ``route``...).

Standard library only (``http.client``), and blocking: a CLI command makes one or two requests,
and importing asyncio and the engine would cost it more than the requests themselves (the
start-up budget of ``autovpn status`` is about 120 ms; docs/benchmarks.md has the figures).
Which engine to ask, and its token, are in ``monitor/engines.py``.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from autovpn.errors import AutovpnError

#: Longest answer head or body line read from a control API (it is ours, but may be anything
#: when the port holds another program).
MAX_LINE = 1 << 20


class ControlUnreachable(AutovpnError):
    """Nothing answered at a control URL, or what answered is not autovpn's control API."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise ControlUnreachable(
                f"the control API answered HTTP {self.status} with a body that is not JSON "
                "(is another program listening on that port?)"
            ) from None


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ControlUnreachable(f"{url!r}: expected http://HOST:PORT")
    return parts.hostname, port


def _send(
    url: str,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str] | None,
    timeout: float,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = split_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise ControlUnreachable(f"no control API at {url}: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the engine running?)"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not HTTP (is another program listening on that port?)"
    return str(exc) or type(exc).__name__


def request(
    url: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 15.0,
) -> Reply:
    """One request to the control API at ``url`` (``http://127.0.0.1:9090``).

    Raises ``ControlUnreachable`` when nothing answers there, or something that is not HTTP.
    """
    conn, response = _send(url, method, path, body, headers, timeout)
    try:
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ControlUnreachable(f"control API at {url}: {_describe(exc)}") from None
    finally:
        conn.close()
    got = {name.lower(): value for name, value in response.getheaders()}
    return Reply(response.status, got, data)


def stream_lines(
    url: str,
    method: str,
    path: str,
    on_line: Callable[[Any], None],
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 300.0,
) -> int:
    """A streamed JSON-lines answer (``POST /resolve``): ``on_line`` gets each parsed line.
    Returns the HTTP status; an error body is passed to ``on_line`` as one object."""
    conn, response = _send(url, method, path, b"", headers, timeout)
    try:
        if response.status != 200:
            on_line(Reply(response.status, {}, response.read() or b"{}").json())
            return response.status
        while line := response.readline(MAX_LINE):
            try:
                on_line(json.loads(line))
            except ValueError:
                raise ControlUnreachable(f"control API at {url}: a line is not JSON") from None
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        raise ControlUnreachable(f"control API at {url}: {_describe(exc)}") from None
    finally:
        conn.close()
