"""Acknowledgements over real loopback sockets: `TcpStream` (and the dispatcher over it) against the real
`Receiver`, insecure (the plaintext handshake) except for one test over key-mode TLS.

What "sent" means is only visible with a real peer: the receiver's own count (a counting sink) is compared
with what the sender counts sent, and a receiver that stops acknowledging (its sink blocks) is what trips
the sender's watchdog, bounds its window, and decides whether `close()` ends with a FIN or a reset.
Waits are on events, futures and polled socket state (`wait_until`, one loop iteration at a time); the
only timeouts are configuration (`ack_timeout`, `close_timeout`) when they are the behaviour under test.
"""

from __future__ import annotations

import asyncio
import fcntl
import random
import socket
import struct
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import NetworkError
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import FakePeerDiscovery, LoopbackEndpoint
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.delivery import Receipt
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

A_SRC = "10.8.0.2"  # node-a's (the sender's) address: the receiver delivers only packets from it
TCP_CLOSE = 7  # tcpi_state after a reset (a FIN leaves the receiving side in CLOSE_WAIT until it closes)


def pkt(seq: int, size: int = 64) -> bytes:
    payload = struct.pack("!I", seq) + bytes(max(0, size - 32))
    return ipv4_packet(A_SRC, "10.8.0.3", UDP, 1000, 7, payload)


def discovery() -> StaticPeerDiscovery:
    return StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:9", [f"{A_SRC}/32"]), Peer("node-b", "127.0.0.1:9", ["10.8.0.3/32"])]
    )


class CountingSink:
    """The peer's own count: `taken` has every packet a sink call returned from (in order).

    `block_after`: a call that would take the count beyond it blocks until `release` is set (never, unless
    the test sets it) - the receiver is stuck in its sink and stops acknowledging. `blocked` is set then."""

    def __init__(self, block_after: int | None = None) -> None:
        self.taken: list[bytes] = []
        self.block_after = block_after
        self.called = asyncio.Event()
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        assert peer_id == "node-a"
        self.called.set()
        if self.block_after is not None and len(self.taken) + len(packets) > self.block_after:
            self.blocked.set()
            await self.release.wait()
        self.taken.extend(packets)


INSECURE_RX = Security.insecure("node-b")
INSECURE_TX = Security.insecure("node-a")


@pytest.fixture
async def sink() -> CountingSink:
    return CountingSink()


@pytest.fixture
async def rx(sink: CountingSink) -> AsyncIterator[Receiver]:
    async with Receiver(discovery(), sink, security=INSECURE_RX) as receiver:
        yield receiver


def service_for(receiver: Receiver, **options: float) -> TcpStreamService:
    return TcpStreamService(LoopbackEndpoint(receiver.address[1]), INSECURE_TX, **options)  # type: ignore[arg-type]


def rx_socket(receiver: Receiver) -> socket.socket:
    """The receiver's socket of its one authenticated connection."""
    (conn,) = [c for c in receiver._connections.values() if c.peer_id is not None]
    sock: socket.socket = conn.sock
    return sock


def tcp_state(sock: socket.socket) -> int:
    """`tcpi_state` of `struct tcp_info` (reading it does not clear a pending error, unlike SO_ERROR)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def unread_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue, not read by the process yet."""
    out = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", out)[0])


# --- acks arrive: receipts, counts ------------------------------------------------------------------------


async def test_acks_resolve_receipts_with_full_counts(rx: Receiver, sink: CountingSink) -> None:
    stream = await service_for(rx).create_stream("node-b")
    batches = [[pkt(i * 100 + k, 64 + k * 13) for k in range(1 + i % 37)] for i in range(60)]
    receipts = [await stream.write_many(batch) for batch in batches]
    assert all(isinstance(r, Receipt) for r in receipts)
    async with asyncio.timeout(10):  # a hang guard
        taken = await asyncio.gather(*receipts)
    assert taken == [len(b) for b in batches]
    total = sum(map(len, batches))
    # The peer's own count is ours: what it acknowledged is exactly what its sink took, in order.
    assert (stream.acknowledged, stream.in_flight, stream.packets_sent) == (total, 0, total)
    assert sink.taken == [p for b in batches for p in b]
    assert rx.metrics().packets_delivered == total
    await stream.close()
    assert stream._error is None  # everything acknowledged: closed with a FIN, not reset


async def test_dispatcher_counts_sent_what_the_peer_took(rx: Receiver, sink: CountingSink) -> None:
    service = service_for(rx)
    d = Dispatcher(FakePeerDiscovery(default="node-b"), service, None, worker_buffer_size=10_000)
    packets = [pkt(i, 64 + i % 1300) for i in range(3000)]
    async with d:
        for p in packets:
            key, ip = destination_key_and_ip(p)
            assert d.dispatch_packet(key, ip, p)
        async with asyncio.timeout(10):  # a hang guard
            assert await d.flush()
        m = d.check_accounting()
        assert (m.sent, m.in_flight, m.failed) == (len(packets), 0, 0)
    assert sink.taken == packets  # one key: in order, and the peer's count is ours
    m = d.check_accounting()
    assert (m.sent, m.in_flight, m.failed_by_reason["lost_in_flight"]) == (len(packets), 0, 0)


async def test_acks_over_key_mode_tls(tmp_path: Path) -> None:
    keys = key_securities(tmp_path, "node-a", "node-b")
    sink = CountingSink()
    async with Receiver(discovery(), sink, security=keys["node-b"]) as receiver:
        service = TcpStreamService(LoopbackEndpoint(receiver.address[1]), keys["node-a"])
        stream = await service.create_stream("node-b")
        assert stream.tls
        batches = [[pkt(i * 50 + k, 1400) for k in range(50)] for i in range(20)]
        receipts = [await stream.write_many(b) for b in batches]
        async with asyncio.timeout(10):  # a hang guard
            assert await asyncio.gather(*receipts) == [50] * 20
        assert stream.acknowledged == len(sink.taken) == 1000
        await stream.close()
        assert stream._error is None


async def test_frames_taken_whose_ack_cannot_leave_are_counted_unacknowledged(tmp_path: Path) -> None:
    """The sender resets the connection while the receiver's sink takes a batch (the sink itself resets it,
    so the order is certain): the ack that follows cannot leave. The sender counts the batch lost, the
    receiver counts it delivered and `unacknowledged`: sent + unacknowledged = delivered, exactly. (Key
    mode: its stream's abort sends the reset at once; asyncio's plaintext transport closes a turn later,
    after the ack got through to a sender that no longer reads it.)"""
    securities = key_securities(tmp_path, "node-a", "node-b")
    streams: list[TcpStream] = []
    taken: list[bytes] = []

    def sink(peer_id: str, packets: list[bytes]) -> None:
        taken.extend(packets)
        streams[0].abort()  # RST now: the receiver's ack for these packets finds the connection reset

    async with Receiver(discovery(), sink, security=securities["node-b"]) as receiver:
        service = TcpStreamService(LoopbackEndpoint(receiver.address[1]), securities["node-a"])
        streams.append(await service.create_stream("node-b"))
        receipt = await streams[0].write_many([pkt(i) for i in range(10)])
        async with asyncio.timeout(10):  # a hang guard
            assert await receipt == 0
            await wait_until(lambda: receiver.metrics().active_connections == 0)
        metrics = receiver.metrics()
        assert len(taken) == metrics.packets_delivered == 10
        assert metrics.unacknowledged == 10
        stats = service.stats("node-b")
        assert (stats.tx_packets, stats.lost_in_flight) == (0, 10)


# --- a receiver that stops acknowledging ------------------------------------------------------------------


async def test_a_peer_that_stops_acknowledging_trips_the_watchdog() -> None:
    sink = CountingSink(block_after=50)  # takes (and acknowledges) some packets, then freezes in its sink
    async with Receiver(discovery(), sink, security=INSECURE_RX, read_size=4096) as receiver:
        stream = await service_for(receiver, ack_timeout=0.3).create_stream("node-b")
        loop = asyncio.get_running_loop()
        batch = [pkt(i, 1000) for i in range(100)]  # ~100 KB: the receiver reads it 4 KiB at a time
        written_at = loop.time()
        receipt = await stream.write_many(batch)
        async with asyncio.timeout(10):  # a hang guard: the watchdog resolves it after 0.3 s
            taken = await receipt
        await stream.wait_closed()
        closed_at = loop.time()
        # Resolved with the acknowledged part: exactly what the frozen peer's sink took before it froze.
        assert taken == len(sink.taken)
        assert 0 < taken <= 50
        assert sink.taken == batch[:taken]
        assert (stream.acknowledged, stream.in_flight) == (taken, 0)  # the rest is lost, not in flight
        assert stream.closed
        assert isinstance(stream._error, TimeoutError)
        assert "acknowledged nothing for 0.3s" in str(stream._error)
        assert closed_at - written_at >= 0.3  # not before ack_timeout (a lower bound: it cannot flake)
        with pytest.raises(NetworkError):
            await stream.write(pkt(999))


async def test_dispatcher_counts_what_a_frozen_peer_never_acknowledged_as_lost() -> None:
    sink = CountingSink(block_after=200)
    async with Receiver(discovery(), sink, security=INSECURE_RX, read_size=4096) as receiver:
        d = Dispatcher(
            FakePeerDiscovery(default="node-b"),
            service_for(receiver, ack_timeout=0.3),
            None,
            worker_buffer_size=10_000,
            resilience_service=ResilienceService(ResilienceConfig(), random=random.Random(0).random),
        )
        packets = [pkt(i, 500) for i in range(1000)]
        futures = []
        async with d:
            for p in packets:
                key, ip = destination_key_and_ip(p)
                futures.append(d.dispatch_packet_with_callback(key, ip, p))
            async with asyncio.timeout(10):  # a hang guard: the watchdog resolves the receipts
                assert await d.flush()
            m = d.check_accounting()
        taken = len(sink.taken)
        assert 0 < taken <= 200
        assert m.sent == taken == receiver.metrics().packets_delivered
        assert m.failed_by_reason["lost_in_flight"] == len(packets) - taken
        assert m.in_flight == 0
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:taken] == [None] * taken  # the acknowledged prefix resolves None
        assert all(isinstance(r, NetworkError) for r in results[taken:])


async def _fill_window(window: int, batch: list[bytes]) -> tuple[list[int], int, int]:
    """A writer keeps writing `batch` to a peer that acknowledges nothing. Returns the unacknowledged
    bytes sampled once per loop iteration until the writer is parked waiting for acks, then for 200 more
    iterations; the batch's size on the wire; and how many writes went out."""
    sink = CountingSink(block_after=0)  # the first packet freezes the receiver: no ack, ever
    async with Receiver(discovery(), sink, security=INSECURE_RX) as receiver:
        # ack_timeout is configuration here, far beyond the test (the test aborts the stream itself).
        stream = await service_for(receiver, window=window, ack_timeout=60.0).create_stream("node-b")
        writes = 0

        async def writer() -> None:
            nonlocal writes
            while True:
                await stream.write_many(batch)
                writes += 1

        task = asyncio.create_task(writer())
        samples: list[int] = []

        def parked() -> bool:
            samples.append(stream._inflight.bytes)
            return bool(stream._ack_waiters) and not task.done()

        await wait_until(parked)
        parked_writes = writes
        for _ in range(200):  # the writer stays parked: it does not grow the window
            await asyncio.sleep(0)
            samples.append(stream._inflight.bytes)
        assert writes == parked_writes
        assert not task.done()
        assert stream.acknowledged == 0
        assert stream.in_flight == writes * len(batch)
        stream.abort()
        with pytest.raises(NetworkError):
            await task  # the parked writer fails when the connection ends; it wrote nothing more
        assert writes == parked_writes
    return samples, len(encode_frames(batch)), writes


async def test_the_window_bounds_unacknowledged_bytes_and_parks_the_writer() -> None:
    window = 64 * 1024
    batch = [pkt(i, 1000) for i in range(16)]  # 16,064 bytes framed: the window is not a multiple of it
    samples, batch_bytes, writes = await _fill_window(window, batch)
    assert max(samples) == samples[-1] == writes * batch_bytes  # no acks: it only ever grew, then stopped
    assert max(samples) > window - batch_bytes  # the writer parks only when the window has no room ...
    assert max(samples) < window + batch_bytes  # ... and never holds more than one batch beyond it


async def test_unacknowledged_bytes_never_exceed_the_window() -> None:
    window = 64 * 1024
    samples, _batch_bytes, _writes = await _fill_window(window, [pkt(i, 1000) for i in range(16)])
    assert max(samples) <= window


# --- a connection reset by the sender ---------------------------------------------------------------------


async def test_bytes_buffered_when_the_sender_resets_are_discarded_not_delivered() -> None:
    sink = CountingSink(block_after=0)  # blocks on the first batch until the test releases it
    # A small read size: while the sink blocks, the receiver reads nothing more after its ~4 KiB read,
    # so most of what follows stays queued in the kernel, behind the reset.
    async with Receiver(discovery(), sink, security=INSECURE_RX, read_size=4096) as receiver:
        stream = await service_for(receiver, ack_timeout=60.0).create_stream("node-b")
        first = [pkt(0)]
        later = [pkt(i, 1000) for i in range(1, 101)]
        await stream.write_many(first)
        async with asyncio.timeout(10):  # a hang guard
            await sink.blocked.wait()  # the receiver took `first` from the socket and is stuck in its sink
        receipt = await stream.write_many(later)
        sock = rx_socket(receiver)
        (conn,) = [c for c in receiver._connections.values() if c.peer_id is not None]
        # All of `later` reached the receiver (its kernel queue, and what its session holds), unprocessed.
        await wait_until(lambda: unread_bytes(sock) + conn.buffered >= len(encode_frames(later)))
        stream.abort()  # the sender gives up on the connection: RST
        await wait_until(lambda: tcp_state(sock) == TCP_CLOSE)  # the reset has arrived
        assert await receipt == 0  # nothing of `later` was acknowledged: all counted lost
        sink.release.set()  # the receiver wakes up, with `later` still buffered
        await wait_until(lambda: receiver.peer_metrics()["node-a"].active_connections == 0)
        m = receiver.peer_metrics()["node-a"]
        assert m.discarded_after_reset > 0
        assert sink.taken == first  # `first` was in the sink already; nothing of `later` was delivered
        assert m.packets_delivered == 1


# --- close --------------------------------------------------------------------------------------------


async def test_close_waits_for_the_acks_then_sends_a_fin() -> None:
    sink = CountingSink(block_after=0)  # holds the first batch until the test releases it
    async with Receiver(discovery(), sink, security=INSECURE_RX) as receiver:
        stream = await service_for(receiver).create_stream("node-b")
        batches = [[pkt(i * 10 + k, 200) for k in range(10)] for i in range(20)]
        receipts = [await stream.write_many(b) for b in batches]
        async with asyncio.timeout(10):  # a hang guard
            await sink.blocked.wait()
        closing = asyncio.create_task(stream.close())
        await wait_until(lambda: bool(stream._ack_waiters))  # close() waits for an ack ...
        assert not closing.done()
        assert not stream.closed  # ... with the connection still open (no FIN yet)
        sink.release.set()
        async with asyncio.timeout(10):  # a hang guard
            await closing
        assert [r.result() for r in receipts] == [10] * 20  # everything acknowledged before the FIN
        assert stream._error is None
        assert stream.acknowledged == len(sink.taken) == 200
        await wait_until(lambda: receiver.peer_metrics()["node-a"].active_connections == 0)
        m = receiver.peer_metrics()["node-a"]
        assert (m.connection_errors, m.discarded_after_reset, m.packets_delivered) == (0, 0, 200)


async def test_close_resets_when_the_peer_does_not_acknowledge_within_close_timeout() -> None:
    sink = CountingSink(block_after=0)  # frozen for good: no ack, ever
    async with Receiver(discovery(), sink, security=INSECURE_RX) as receiver:
        stream: TcpStream = await service_for(receiver, ack_timeout=60.0).create_stream("node-b")
        stream._close_timeout = 0.2  # no public setting (TcpStreamService passes none); the behaviour here
        receipts = [await stream.write_many([pkt(i * 10 + k) for k in range(10)]) for i in range(5)]
        async with asyncio.timeout(10):  # a hang guard
            await sink.blocked.wait()
        sock = rx_socket(receiver)
        async with asyncio.timeout(10):  # a hang guard: close() gives up after close_timeout
            await stream.close()
        assert isinstance(stream._error, TimeoutError)
        assert "still unacknowledged" in str(stream._error)
        await stream.wait_closed()
        assert [r.result() for r in receipts] == [0] * 5  # nothing acknowledged: all lost, none in flight
        assert stream.in_flight == 0
        await wait_until(lambda: tcp_state(sock) == TCP_CLOSE)  # a reset: a FIN would leave CLOSE_WAIT
