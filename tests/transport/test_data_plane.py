"""A node's steady receive connections run on the data plane's thread (issue 20, item 3: "on an established
flow no asyncio task wakes up"): once a TUN-path connection is authenticated and quiet, its reads (decrypt,
check, TUN write, ack) happen on a Rust thread, and Python's loop is entered only for the lifecycle (the end,
a reset, an error). Real loopback TCP and TLS (a native client on the other side, in a thread); the TUN is
`FakeTun` (the real `TunDevice` on a socket pair). Each test compares the sender's own count (its acks) and
the TUN's content with the receiver's counters.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from tests.transport.test_native_receive import nodes, pkt
from tests.transport.test_native_tls import Side, pump

from vpn_packet._native import Established, TlsSecurity
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.transport import receiver as receiver_module
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.receiver import Receiver, TunTarget, _Connection


def no_sink(peer_id: str, packets: list[bytes]) -> None:
    raise AssertionError("the TUN path does not call the sink")


class Client:
    """node-a's side of one connection, driven from a thread (its socket calls block)."""

    def __init__(self, security: TlsSecurity, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.side = Side(security.client("node-b", epoch=1), self.sock)
        pump([self.side], lambda: bool(self.side.events))
        assert [type(e) for e in self.side.events] == [Established], self.side.events

    def send(self, packets: list[bytes]) -> int:
        """Sends `packets` and waits until they are all acknowledged; the acked total."""
        conn = self.side.conn
        want = conn.acked + len(packets)
        assert conn.send_packets(packets) == len(packets)
        pump([self.side], lambda: conn.acked == want)
        return conn.acked

    def close(self) -> None:
        """A graceful end: close_notify, then FIN."""
        self.side.conn.close()
        self.side.flush()
        self.sock.shutdown(socket.SHUT_WR)
        pump([self.side], lambda: self.side.eof)
        self.sock.close()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


@pytest.fixture
def pumped(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the pump answers Python handles (`_Pump._pumped`): a read on the loop, or a hand-back."""
    calls = [0]
    original = receiver_module._Pump._pumped

    def counting(self: receiver_module._Pump, result: receiver_module.PumpResult, defer: bool) -> None:
        calls[0] += 1
        original(self, result, defer)

    monkeypatch.setattr(receiver_module._Pump, "_pumped", counting)
    return calls


@asynccontextmanager
async def tun_receiver(tmp_path: Path) -> AsyncIterator[tuple[Receiver, FakeTun, TlsSecurity]]:
    client, security, peers = nodes(tmp_path)
    tun = FakeTun("plane0")
    try:
        async with Receiver(peers, no_sink, security=security) as rx:
            rx.tun_target = TunTarget(tun.fd, tun.vnet_header)
            yield rx, tun, client
    finally:
        tun.close()


def only(rx: Receiver) -> _Connection:
    (conn,) = rx._connections.values()
    return conn


async def on_plane(rx: Receiver) -> _Connection:
    await wait_until(lambda: len(rx._connections) == 1 and only(rx).session.on_data_plane)
    return only(rx)


async def test_a_steady_connection_is_read_by_the_data_plane_not_the_loop(
    tmp_path: Path, pumped: list[int]
) -> None:
    async with tun_receiver(tmp_path) as (rx, tun, security):
        client = await asyncio.to_thread(Client, security, rx.address)
        first = [pkt("10.8.0.2", i) for i in range(10)]
        assert await asyncio.to_thread(client.send, first) == 10
        conn = await on_plane(rx)
        plane = rx.plane
        loop_calls, (_, events_before, _) = pumped[0], plane.stats()
        rest = [pkt("10.8.0.2", 10 + i) for i in range(300)]
        for start in range(0, len(rest), 30):  # ten reads at least, each acknowledged before the next
            await asyncio.to_thread(client.send, rest[start : start + 30])
        await wait_until(lambda: len(tun.written) == 310)
        assert tun.written == first + rest  # in order
        assert pumped[0] == loop_calls  # no read was handled on the loop
        assert plane.stats()[1] >= events_before + 10  # they were the thread's
        assert conn.session.on_data_plane
        peer = rx.peer_metrics()["node-a"]  # brings the thread's counts in
        assert (peer.frames, peer.packets_delivered, peer.dropped) == (310, 310, 0)
        assert rx.tun_target is not None
        assert rx.tun_target.packets_written == 310
        await asyncio.to_thread(client.close)
        await wait_until(lambda: not rx._connections)  # the end came through a hand-back
        assert plane.stats()[2] == 1
        totals = rx.metrics()
        assert (totals.unacknowledged, totals.connection_errors) == (0, 0)
    assert not rx.plane.running  # stopped with the receiver


async def test_drops_on_the_data_plane_are_counted_by_reason(tmp_path: Path) -> None:
    async with tun_receiver(tmp_path) as (rx, tun, security):
        client = await asyncio.to_thread(Client, security, rx.address)
        await asyncio.to_thread(client.send, [pkt("10.8.0.2", 0)])
        await on_plane(rx)
        good = [pkt("10.8.0.2", i) for i in range(1, 6)]
        spoofed = [pkt("10.8.0.3", 100 + i) for i in range(3)]  # node-c's address, sent by node-a
        assert await asyncio.to_thread(client.send, good[:2] + spoofed + good[2:] + [b"\x00" * 40]) == 10
        await wait_until(lambda: len(tun.written) == 6)
        peer = rx.peer_metrics()["node-a"]
        assert (peer.frames, peer.packets_delivered) == (10, 6)
        assert (peer.spoofed_dropped, peer.unparsable_dropped) == (3, 1)
        await asyncio.to_thread(client.close)


async def test_a_reload_changes_the_routes_the_thread_checks(tmp_path: Path) -> None:
    """`StaticPeerDiscovery.update` changes the table in place: the thread sees it at its next read."""
    async with tun_receiver(tmp_path) as (rx, tun, security):
        client = await asyncio.to_thread(Client, security, rx.address)
        await asyncio.to_thread(client.send, [pkt("10.8.0.2", 0)])
        await on_plane(rx)
        await asyncio.to_thread(client.send, [pkt("10.8.0.9", 1)])  # not node-a's yet
        rx.discovery.update(updated=[Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32", "10.8.0.9/32"])])
        rx.peers_changed([], [])
        await asyncio.to_thread(client.send, [pkt("10.8.0.9", 2)])  # node-a's now
        await wait_until(lambda: len(tun.written) == 2)
        assert tun.written == [pkt("10.8.0.2", 0), pkt("10.8.0.9", 2)]
        assert rx.peer_metrics()["node-a"].spoofed_dropped == 1
        assert only(rx).session.on_data_plane
        await asyncio.to_thread(client.close)


async def test_a_reset_by_the_sender_is_handed_back_and_counted(tmp_path: Path) -> None:
    async with tun_receiver(tmp_path) as (rx, tun, security):
        client = await asyncio.to_thread(Client, security, rx.address)
        await asyncio.to_thread(client.send, [pkt("10.8.0.2", i) for i in range(5)])
        await on_plane(rx)
        await asyncio.to_thread(client.reset)
        await wait_until(lambda: not rx._connections)
        assert rx.plane.stats()[2] == 1
        peer = rx.peer_metrics()["node-a"]
        assert (peer.frames, peer.packets_delivered) == (5, 5)
        assert len(tun.written) == 5


async def test_stop_takes_connections_back_from_the_thread(tmp_path: Path) -> None:
    async with tun_receiver(tmp_path) as (rx, _tun, security):
        client = await asyncio.to_thread(Client, security, rx.address)
        assert await asyncio.to_thread(client.send, [pkt("10.8.0.2", i) for i in range(3)]) == 3
        await on_plane(rx)
        plane = rx.plane
        await rx.stop()
        assert not plane.running
        assert plane.stats() == (0, 0, 0)
        assert not rx._connections
        assert rx.metrics().unacknowledged == 0  # every ack had left: nothing counted lost
        # The client hears the graceful end (close_notify, FIN) the stop sends.
        await asyncio.to_thread(pump, [client.side], lambda: client.side.eof)
        assert client.side.conn.acked == 3
        client.sock.close()
