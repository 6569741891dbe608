"""A receiver's TLS connections run on the native core (issue 20, item 3, receiving side): one native call
per socket readiness event reads, decrypts, judges the hello, decodes, checks sources, writes the TUN (or
collects the packets for a library sink) and sends the ack. Real loopback TCP and TLS (a native client on
the other side); the TUN is `FakeTun` (the real `TunDevice` on a socket pair).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

from tests.transport.test_native_tls import Side, pump

from vpn_packet._native import Established, TlsSecurity
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.receiver import Receiver, TunTarget


def pkt(src: str, seq: int) -> bytes:
    return ipv4_packet(src, "10.8.0.1", src_port=seq, dst_port=7, payload=seq.to_bytes(4, "big"))


def nodes(tmp_path: Path) -> tuple[TlsSecurity, Security, StaticPeerDiscovery]:
    """node-a's native client setup, node-b's security, and node-b's peers (node-a owns 10.8.0.2/32,
    node-c 10.8.0.3/32)."""
    sec = key_securities(tmp_path, "node-a", "node-b", "node-c")
    ida, idb = sec["node-a"].identity, sec["node-b"].identity
    assert ida is not None
    assert idb is not None
    client = TlsSecurity.with_keys("node-a", ida.path.read_bytes(), [("node-b", idb.public_key_bytes)])
    peers = StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32"]), Peer("node-c", "127.0.0.1:1", ["10.8.0.3/32"])]
    )
    return client, sec["node-b"], peers


def send(client: TlsSecurity, address: tuple[str, int], packets: list[bytes]) -> int:
    """Connects as node-a, sends `packets`, returns how many the receiver acknowledged."""
    with socket.create_connection(address) as sock:
        side = Side(client.client("node-b", epoch=1), sock)
        pump([side], lambda: bool(side.events))
        assert [type(e) for e in side.events] == [Established], side.events
        assert side.conn.send_packets(packets) == len(packets)
        pump([side], lambda: side.conn.acked == len(packets))
        return side.conn.acked


async def test_tls_frames_go_from_the_socket_to_the_tun_in_native_calls(tmp_path: Path) -> None:
    client, security, peers = nodes(tmp_path)
    good = [pkt("10.8.0.2", i) for i in range(20)]
    spoofed = [pkt("10.8.0.3", 100 + i) for i in range(3)]  # node-c's address, sent by node-a
    unparsable = [b"\x00" * 40]
    tun = FakeTun("native0")

    def no_sink(peer_id: str, packets: list[bytes]) -> None:
        raise AssertionError("the TUN path does not call the sink")

    try:
        async with Receiver(peers, no_sink, security=security) as rx:
            rx.tun_target = TunTarget(tun.fd, tun.vnet_header)
            mix = good[:10] + spoofed + good[10:] + unparsable
            acked = await asyncio.to_thread(send, client, rx.address, mix)
            assert acked == len(mix)  # every frame taken: written to the TUN, or dropped and counted
            await wait_until(lambda: len(tun.written) == len(good))
            assert tun.written == good
            conns = list(rx._connections.values())
            assert all(conn.session.encrypted for conn in conns)  # TLS on the native core
            peer = rx.peer_metrics()["node-a"]
        assert (peer.frames, peer.packets_delivered) == (len(mix), len(good))
        assert (peer.spoofed_dropped, peer.unparsable_dropped) == (3, 1)
        assert peer.frames == peer.packets_delivered + peer.dropped
        assert rx.tun_target.packets_written == len(good)
    finally:
        tun.close()


async def test_an_awaitable_sink_has_the_packets_before_they_are_acknowledged(tmp_path: Path) -> None:
    client, security, peers = nodes(tmp_path)
    packets = [pkt("10.8.0.2", i) for i in range(5)]
    release = asyncio.Event()
    delivered: list[bytes] = []
    acknowledged = threading.Event()

    async def sink(peer_id: str, batch: list[bytes]) -> None:
        assert peer_id == "node-a"
        await release.wait()
        delivered.extend(batch)

    def run(address: tuple[str, int]) -> int:
        acked = send(client, address, packets)
        acknowledged.set()
        return acked

    async with Receiver(peers, sink, security=security) as rx:
        sending = asyncio.create_task(asyncio.to_thread(run, rx.address))
        await wait_until(lambda: rx.metrics().frames == len(packets))
        # The receiver has decoded the frames and waits for the sink: the ack is held back, unwritten.
        [conn] = rx._connections.values()
        assert conn.session.encrypted
        assert conn.session.unsent > 0
        # Acks go out at once when written (the sender's window waits for them): no Nagle delay.
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert not acknowledged.is_set()
        assert delivered == []
        release.set()
        assert await sending == len(packets)
        assert delivered == packets
        assert rx.peer_metrics()["node-a"].packets_delivered == len(packets)


async def test_a_sink_call_cancelled_by_stop_is_counted(tmp_path: Path) -> None:
    """The receiver stops while its sink holds a batch: the batch is `sink_cancelled` (never acknowledged,
    so the sender counts it lost) and the stop does not wait for the sink."""
    client, security, peers = nodes(tmp_path)
    called = asyncio.Event()

    async def sink(peer_id: str, batch: list[bytes]) -> None:
        called.set()
        await asyncio.Event().wait()  # nobody sets it: only the stop ends this call

    packets = [pkt("10.8.0.2", i) for i in range(5)]
    rx = Receiver(peers, sink, security=security)
    async with rx:
        sock = await asyncio.to_thread(socket.create_connection, rx.address)
        side = Side(client.client("node-b", epoch=1), sock)
        await asyncio.to_thread(pump, [side], lambda: bool(side.events))
        side.conn.send_packets(packets)
        side.flush()
        async with asyncio.timeout(10):  # a hang guard
            await called.wait()
    sock.close()
    peer = rx.peer_metrics()["node-a"]
    assert peer.frames == len(packets)
    assert (peer.sink_cancelled, peer.packets_delivered) == (len(packets), 0)
    assert side.conn.acked == 0
