"""Every frame from an authenticated peer is accounted for (issue 22, item 3): frames + extra segments ==
delivered + every drop by reason, on the library path (a sink) and on the TUN path (the receiver writes to
the device itself), under a mix of good, spoofed, unparsable, invalid offload and valid offload frames, and a
sink that fails once. Real loopback TCP; the TUN is `FakeTun` (the real `TunDevice` on a socket pair), with
and without virtio headers.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest
from tests.transport.test_receiver import (
    A_SRC,
    B_SRC,
    INSECURE,
    acks,
    make_discovery,
    open_as,
    pkt,
    until_closed,
)

from vpn_packet._native import OFFLOAD_FLAG
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.packets import TCP, ipv4_packet, tcp_header
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.receiver import PACKET_DROPS, PeerReceiverMetrics, Receiver, TunTarget

MSS = 1000


def offload_frame(header: bytes, packet: bytes) -> bytes:
    """One offload frame: the length prefix with `OFFLOAD_FLAG`, the virtio_net_hdr, the packet."""
    return struct.pack(">I", OFFLOAD_FLAG | (len(header) + len(packet))) + header + packet


def super_packet(payload: int = 3 * MSS, *, gso_size: int = MSS) -> tuple[bytes, bytes]:
    """A TCPv4 super-packet from A (as a TUN with TSO hands it out) and its virtio_net_hdr: NEEDS_CSUM,
    GSO TCPv4, header length 40, the segment size, checksum at 20 + 16."""
    packet = ipv4_packet(
        A_SRC,
        "10.8.0.1",
        TCP,
        transport=tcp_header(40000, 80, seq=1) + bytes(i % 251 for i in range(payload)),
        dont_fragment=True,
    )
    header = struct.pack("<BBHHHH", 1, 1, 40, gso_size, 20, 16)
    return header, packet


def the_mix() -> tuple[bytes, int, dict[str, int]]:
    """The wire bytes of the mix, the number of packet frames, and the drops each reason must show.

    The mix ends with an offload frame whose virtio header cannot be honoured: counted (a frame, dropped
    as `offload_invalid`) and, like every frame the peer cannot have meant, the end of the connection
    (issue 20, item 6), after the frames before it were taken and acknowledged."""
    good = [pkt(A_SRC, i, size=100) for i in range(10)]
    spoofed = [pkt(B_SRC, 100 + i) for i in range(3)]
    unparsable = [b"\x00" * 40, b"\x45"]
    header, packet = super_packet()
    bad_header, _ = super_packet(gso_size=0)  # a segment size of 0: refused, never handed to the kernel
    wire = (
        encode_frames(good[:5] + spoofed[:1] + unparsable[:1])
        + offload_frame(header, packet)
        + encode_frames(good[5:] + spoofed[1:] + unparsable[1:])
        + offload_frame(bad_header, packet)
    )
    frames = len(good) + len(spoofed) + len(unparsable) + 2
    return wire, frames, {"spoofed_dropped": 3, "unparsable_dropped": 2, "offload_invalid": 1}


def check_accounting(peer: PeerReceiverMetrics, frames: int, drops: dict[str, int]) -> None:
    assert peer.frames == frames
    for name, n in drops.items():
        assert getattr(peer, name) == n, name
    assert peer.frames + peer.extra_segments == peer.packets_delivered + peer.dropped
    assert peer.dropped == sum(peer.drops.values())
    assert set(peer.drops) == set(PACKET_DROPS)


async def send(rx: Receiver, wire: bytes, frames: int) -> None:
    reader, writer = await open_as(rx, "node-a", wire)
    counts = acks(await until_closed(reader, writer, half_close=True))
    assert counts[-1:] == [frames]  # every frame acknowledged: taken, delivered or dropped and counted


async def send_mix(rx: Receiver, wire: bytes, frames: int) -> None:
    """`send` for `the_mix`: every frame before the bad offload frame acknowledged (taken: delivered, or
    dropped and counted); the bad one ended the connection (the sender counts it lost)."""
    await send(rx, wire, frames - 1)
    peer = rx.peer_metrics()["node-a"]
    assert peer.protocol_errors == {"offload_invalid": 1}
    assert peer.unacknowledged == 0  # the ack of every frame taken left before the connection closed


async def test_library_path_counts_every_frame_by_reason() -> None:
    wire, frames, drops = the_mix()
    calls: list[int] = []

    async def sink(peer_id: str, packets: list[bytes]) -> None:
        calls.append(len(packets))
        if len(calls) == 2:
            raise RuntimeError("the sink fails once")  # a batch of max_batch packets, counted as raised
        await asyncio.sleep(0)  # an awaitable sink: the receiver waits for it (backpressure)

    async with Receiver(make_discovery(), sink, security=INSECURE, max_batch=4) as rx:
        await send_mix(rx, wire, frames)
        peer = rx.peer_metrics()["node-a"]
    check_accounting(peer, frames, {**drops, "sink_raised": calls[1]})
    assert peer.extra_segments == 2  # the valid super-packet: 3 segments, one frame
    assert peer.packets_delivered == sum(calls) - calls[1] == 10 + 3 - calls[1]
    assert (peer.tun_dropped, peer.tun_refused) == (0, 0)
    totals = rx.metrics()
    assert totals.frames + totals.extra_segments == totals.packets_delivered + totals.dropped


@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
async def test_tun_path_counts_every_frame_by_reason(vnet: bool) -> None:
    wire, frames, drops = the_mix()
    tun = FakeTun("acct0", offload=vnet)
    fatal: list[int] = []

    def no_sink(peer_id: str, packets: list[bytes]) -> None:
        raise AssertionError("the TUN path does not call the sink")

    try:
        async with Receiver(make_discovery(), no_sink, security=INSECURE) as rx:
            rx.tun_target = TunTarget(tun.fd, tun.vnet_header, on_fatal=fatal.append)
            await send_mix(rx, wire, frames)
            peer = rx.peer_metrics()["node-a"]
            # Whole on a TUN with virtio headers; segmented (3 packets) on a plain one.
            written = 10 + (1 if vnet else 3)
            await wait_until(lambda: len(tun.written) == written)
        check_accounting(peer, frames, {**drops, "sink_raised": 0, "tun_dropped": 0, "tun_refused": 0})
        assert peer.extra_segments == (0 if vnet else 2)
        assert peer.packets_delivered == written
        assert fatal == []
    finally:
        tun.close()


async def test_a_gone_tun_is_counted_as_tun_dropped_not_as_the_sinks() -> None:
    tun = FakeTun("acct1")
    fatal: list[int] = []
    packets = [pkt(A_SRC, i) for i in range(5)]
    async with Receiver(make_discovery(), lambda *_: None, security=INSECURE) as rx:
        rx.tun_target = TunTarget(tun.fd, on_fatal=fatal.append)
        tun.unplug()  # the device goes away: every write fails
        await send(rx, encode_frames(packets), len(packets))
        peer = rx.peer_metrics()["node-a"]
    tun.close()
    check_accounting(peer, 5, {"tun_dropped": 5, "sink_raised": 0})
    assert len(fatal) == 1


def test_sink_failed_is_a_deprecated_alias_of_the_four_counters(recwarn: pytest.WarningsRecorder) -> None:
    from vpn_packet import deprecation

    deprecation._forget_warnings()
    peer = PeerReceiverMetrics(
        sink_raised=1, tun_dropped=2, tun_refused=3, offload_invalid=4, spoofed_dropped=9
    )
    read: Callable[[], int] = lambda: peer.sink_failed  # noqa: E731
    assert read() == 10
    assert read() == 10
    warned = [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert len(warned) == 1  # once
    assert "sink_raised, tun_dropped, tun_refused, offload_invalid" in str(warned[0].message)


async def test_a_sink_call_cancelled_by_stop_is_counted() -> None:
    """The receiver stops while its sink holds a batch: that batch and the rest of the read are
    `sink_cancelled`, so the frames still add up (and the sender, never acknowledged, counts them lost)."""
    gate, called = asyncio.Event(), asyncio.Event()

    async def sink(peer_id: str, packets: list[bytes]) -> None:
        called.set()
        await gate.wait()  # nobody sets it: only the stop ends this call

    packets = [pkt(A_SRC, i) for i in range(10)]
    rx = Receiver(make_discovery(), sink, security=INSECURE, max_batch=4)
    async with rx:
        _reader, writer = await open_as(rx, "node-a", encode_frames(packets))
        async with asyncio.timeout(10):  # a hang guard
            await called.wait()
    writer.close()
    peer = rx.peer_metrics()["node-a"]
    # Reading pauses while the sink holds a read: only the frames of reads taken so far were decoded.
    assert 4 <= peer.frames <= 10
    check_accounting(peer, peer.frames, {"sink_cancelled": peer.frames, "sink_raised": 0})
    assert peer.packets_delivered == 0
