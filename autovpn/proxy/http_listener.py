"""The HTTP proxy listener's connection handling: CONNECT and absolute-form forwarding."""

from __future__ import annotations

import logging

from autovpn.errors import RemoteProtocolError, StreamError
from autovpn.proxy import http_proxy
from autovpn.proxy.auth import parse_basic_proxy_authorization
from autovpn.proxy.listener import HandshakeBase, ProxyListener

log = logging.getLogger("autovpn.proxy")


class HttpHandshake(HandshakeBase):
    def __init__(self, listener: ProxyListener) -> None:
        super().__init__(listener)
        self._parser = http_proxy.HttpHeadParser()
        self._done = False

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        assert self.transport is not None
        try:
            head = self._parser.receive_data(data)
        except RemoteProtocolError as exc:
            self._done = True
            self.fail(exc.reply, f"HTTP error: {exc}")
            return
        if head is None:
            return
        self._done = True
        self.transport.pause_reading()
        creds = self.listener.credentials
        if creds:
            offered = parse_basic_proxy_authorization(head.headers)
            if offered is None or not creds.check(*offered):
                self.fail(
                    http_proxy.proxy_auth_required(),
                    "proxy authentication " + ("missing" if offered is None else "failed"),
                )
                return
        self.listener.spawn(self._serve(head), f"http-{self.peer}")

    async def _serve(self, head: http_proxy.HttpRequestHead) -> None:
        assert self.transport is not None
        trailing = self._parser.trailing_data
        if head.is_connect:
            early = trailing
        elif head.form is not http_proxy.TargetForm.ABSOLUTE:
            # A proxy only forwards absolute-form requests; anything else was meant for an
            # origin server, and we are none.
            self.fail(http_proxy.response(400), "request is not in absolute form")
            return
        else:
            # Absolute-form request: forward it with hop-by-hop headers removed.  The origin is
            # asked to close after its response, so the raw relay that follows carries exactly
            # one exchange; the client then opens a new connection for its next request.
            early = http_proxy.rewrite_for_origin(head, force_close=True) + trailing
        try:
            upstream, _ = await self.listener.dialer.connect(
                head.host,
                head.port,
                early,
                client=self.peer,
                via="http",
            )
        except StreamError as exc:
            status = exc.reason.http_status
            self.fail(
                http_proxy.response(status, body=f"{exc}\n".encode()),
                f"{head.host}:{head.port}: {exc}",
            )
            return
        self.stop_timer()
        if self.transport.is_closing():
            return
        if head.is_connect:
            self.transport.write(http_proxy.CONNECTION_ESTABLISHED)
        upstream.attach(self.transport)
