"""The HTTP proxy listener's connection handling: CONNECT, and absolute-form forwarding.

The first request head is parsed here.  CONNECT (RFC 9110 §9.3.6): route and connect, answer
200, and hand the socket to the upstream, which relays it from then on.  An absolute-form
request (``GET http://host/path``) hands the socket to an ``HttpForwarder``
(``autovpn.proxy.http_forward``), which carries it and the following requests of the
connection with keep-alive.
"""

from __future__ import annotations

import logging

from autovpn.errors import RemoteProtocolError
from autovpn.proxy.handshake import HandshakeBase, ListenerSide
from autovpn.proxy.http_forward import (
    HttpForwarder,
    authorization_problem,
    error_response,
    stream_error_response,
)
from autovpn.wire import http_proxy

log = logging.getLogger("autovpn.proxy")


class HttpHandshake(HandshakeBase):
    def __init__(self, listener: ListenerSide) -> None:
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
        problem = authorization_problem(self.listener, head)
        if problem is not None:
            self.fail(http_proxy.proxy_auth_required(), problem, "auth")
            return
        if head.is_connect:
            self.listener.spawn(self._connect(head), f"http-{self.peer}")
        elif head.form is not http_proxy.TargetForm.ABSOLUTE:
            # A proxy only forwards absolute-form requests; anything else was meant for an
            # origin server, and we are none.
            self.fail(error_response(400), "request is not in absolute form")
        else:
            self.stop_timer()
            forwarder = HttpForwarder(self.listener, self.transport, self.peer)
            self.transport.set_protocol(forwarder)
            forwarder.start(head, self._parser.trailing_data)

    async def _connect(self, head: http_proxy.HttpRequestHead) -> None:
        assert self.transport is not None
        upstream = await self.dial(
            head.host,
            head.port,
            self._parser.trailing_data,
            stream_error_response,
        )
        if upstream is not None:
            self.transport.write(http_proxy.CONNECTION_ESTABLISHED)
            upstream.attach(self.transport)
