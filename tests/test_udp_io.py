"""Batched UDP sends (UDP GSO on Linux) over real loopback sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from autovpn.udp_io import BatchFlusher, DatagramBatch, enlarge_buffers, gso_socket
from tests.conftest import run

_SO_NO_CHECK = 11  # asm-generic/socket.h: a socket sending without UDP checksums


def _datagrams() -> list[bytes]:
    """Runs of one size broken by shorter and longer datagrams, each tagged with its index."""
    sizes = [1400] * 50 + [600] + [1400] * 30 + [200] * 5 + [1500] + [1400] * 70 + [9000] * 3
    return [i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4) for i, size in enumerate(sizes)]


async def _send_and_receive(
    *, connected: bool, refuse_gso: bool = False
) -> tuple[list[bytes], DatagramBatch]:
    loop = asyncio.get_running_loop()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.setblocking(False)
    target = receiver.getsockname()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol,
        remote_addr=target if connected else None,
        local_addr=None if connected else ("127.0.0.1", 0),
    )
    sock = gso_socket(transport)
    try:
        if refuse_gso and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, _SO_NO_CHECK, 1)  # the kernel refuses GSO: EINVAL
        batch = DatagramBatch(transport, sock, BatchFlusher(loop), None if connected else target)
        sent = _datagrams()
        for data in sent:
            batch.send(data)
        assert batch.sent == 0  # nothing leaves before the end of this loop iteration
        got: list[bytes] = []
        async with asyncio.timeout(10):
            while len(got) < len(sent):
                got.append(await loop.sock_recv(receiver, 65536))
        assert batch.sent == len(sent)
        return got, batch
    finally:
        if sock is not None:
            sock.close()
        transport.close()
        receiver.close()


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "to-address"])
def test_every_datagram_arrives_whole_separate_and_in_order(connected: bool) -> None:
    got, batch = run(_send_and_receive(connected=connected))
    assert got == _datagrams()
    if batch.sock is not None:
        # 50, then 600 closes that run; 30+5 (200s close it); 70 → 64+6; 1500 and 9000s alone
        # or in runs: at least the three long runs went out as one sendmsg each.
        assert batch.gso_sends >= 3


@pytest.mark.skipif(sys.platform != "linux", reason="UDP GSO is Linux-only")
def test_a_socket_that_refuses_gso_falls_back_to_one_send_per_datagram() -> None:
    got, batch = run(_send_and_receive(connected=True, refuse_gso=True))
    assert got == _datagrams()
    assert batch.sock is None and batch.gso_sends == 0


def test_a_closing_transport_drops_the_batch_quietly() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", 9)
        )
        batch = DatagramBatch(transport, None, BatchFlusher(loop))
        batch.send(b"late")
        transport.close()
        await asyncio.sleep(0.01)
        assert batch.sent == 0 and not batch.pending

    run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="Linux buffer options and accounting")
def test_relay_buffers_are_enlarged_past_the_system_default() -> None:
    with open("/proc/sys/net/core/rmem_max") as f:
        system_max = int(f.read())

    async def main() -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        try:
            enlarge_buffers(transport, 6 << 20)
            got: int = transport.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF
            )
            return got
        finally:
            transport.close()

    got = run(main())
    # Linux reports twice the size set (its bookkeeping overhead).
    if os.geteuid() == 0:  # CAP_NET_ADMIN: forced past net.core.rmem_max
        assert got == 2 * (6 << 20)
    else:
        assert got == 2 * min(6 << 20, system_max)
