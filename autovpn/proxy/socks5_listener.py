"""The SOCKS5 listener's connections (RFC 1928, RFC 1929): CONNECT and UDP ASSOCIATE.

The sans-I/O state machine is ``autovpn.wire.socks5``; this module feeds it from the socket and
acts on what it decides: route and connect (``HandshakeBase.dial``), answer, hand the socket to
the upstream; or open a UDP association that lives as long as its control connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from autovpn.proxy.handshake import HandshakeBase, ListenerSide
from autovpn.proxy.udp_relay import DatagramTunnel, Socks5UdpAssociation
from autovpn.wire import socks5

log = logging.getLogger("autovpn.proxy")


class Socks5Handshake(HandshakeBase):
    def __init__(self, listener: ListenerSide) -> None:
        super().__init__(listener)
        self._parser = socks5.Socks5ServerHandshake(listener.credentials or None)
        self._done = False

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        assert self.transport is not None
        try:
            request = self._parser.receive_data(data)
        except socks5.Socks5Error as exc:
            self._done = True
            # A pipelined greeting + bad auth: the method selection precedes the error reply.
            self.fail(self._parser.data_to_send() + exc.reply, f"SOCKS5 error: {exc}")
            return
        out = self._parser.data_to_send()
        if out:
            self.transport.write(out)
        if request is None:
            return
        self._done = True
        self.transport.pause_reading()
        self.listener.spawn(self._serve(request), f"socks5-{self.peer}")

    async def _serve(self, request: socks5.Socks5Request) -> None:
        assert self.transport is not None
        if request.command is socks5.Command.UDP_ASSOCIATE:
            await self._associate(request)
            return
        if request.command is not socks5.Command.CONNECT:
            self.fail(
                socks5.encode_reply(socks5.Reply.COMMAND_NOT_SUPPORTED),
                f"command {request.command.name} not supported",
            )
            return
        upstream = await self.dial(
            request.host,
            request.port,
            self._parser.trailing_data,
            lambda exc: socks5.encode_reply(exc.reason.socks5_reply),
        )
        if upstream is not None:
            self.transport.write(socks5.encode_reply(socks5.Reply.SUCCEEDED))
            upstream.attach(self.transport)

    async def _associate(self, request: socks5.Socks5Request) -> None:
        """UDP ASSOCIATE (RFC 1928 section 7): a relay socket for this client, alive as long
        as this TCP connection is."""
        assert self.transport is not None
        dialer = self.listener.dialer
        peer = self.transport.get_extra_info("peername")
        tunnel = dialer.tunnel if hasattr(dialer.tunnel, "open_flow") else None
        association = Socks5UdpAssociation(
            self.listener.host,
            (str(peer[0]), request.port),
            dialer.router,
            cast(DatagramTunnel | None, tunnel),
            self.listener.udp_stats,
        )
        try:
            host, port = await association.start()
        except OSError as exc:
            association.close()
            self.fail(socks5.encode_reply(socks5.Reply.GENERAL_FAILURE), f"UDP bind: {exc}")
            return
        self.stop_timer()
        if self.transport.is_closing():
            association.close()
            return
        log.info("socks5 client %s: UDP association on %s:%d", self.peer, host, port)
        self.transport.write(socks5.encode_reply(socks5.Reply.SUCCEEDED, host, port))
        self.transport.set_protocol(_AssociationControl(association))
        self.transport.resume_reading()


class _AssociationControl(asyncio.Protocol):
    """The TCP connection of a UDP association: its end ends the association (section 7)."""

    def __init__(self, association: Socks5UdpAssociation) -> None:
        self.association = association

    def data_received(self, data: bytes) -> None:
        pass  # nothing is expected on the control connection; ignore it

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.close()
