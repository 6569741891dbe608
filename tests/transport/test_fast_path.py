"""The dispatcher's native fast path (issue 20, item 3) over real loopback TLS (key mode): a batch push (the
shape of a TUN read) to a destination whose worker is idle on an established connection is written into
that connection in the push itself, without waking the worker; its fate is counted natively.

Each test compares the peer's own count (a counting sink behind a real `Receiver`) with the sender's:
"sent" is what the peer acknowledged, whichever way a packet went, and order holds across the two ways.
Waits are on events and polled state (`wait_until`); the only timeouts are configuration (`ack_timeout`)
when they are the behaviour under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.dispatcher import Dispatcher
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import FakePeerDiscovery, LoopbackEndpoint
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.plane import Plane
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

A_SRC = "10.8.0.2"
DEST = "10.8.0.3"


def pkt(seq: int, size: int = 100) -> bytes:
    payload = struct.pack("!I", seq) + bytes(max(0, size - 32))
    return ipv4_packet(A_SRC, DEST, UDP, 1000, 7, payload)


def tun_read(packets: list[bytes]) -> tuple[bytes, array[int]]:
    """The packets as one batched TUN read gives them: end to end, with their lengths."""
    return b"".join(packets), array("I", [len(p) for p in packets])


class CountingSink:
    """The peer's own count, in order; `block_after`: the sink freezes (no more acks) past that count."""

    def __init__(self, block_after: int | None = None) -> None:
        self.taken: list[bytes] = []
        self.block_after = block_after
        self.release = asyncio.Event()

    async def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        if self.block_after is not None and len(self.taken) + len(packets) > self.block_after:
            await self.release.wait()
        self.taken.extend(packets)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-a", "node-b")


class Lab:
    def __init__(self, receiver: Receiver, service: TcpStreamService, dispatcher: Dispatcher) -> None:
        self.receiver = receiver
        self.service = service
        self.d = dispatcher

    def push(self, packets: list[bytes]) -> int:
        data, lengths = tun_read(packets)
        return self.d.dispatch_buffer(data, lengths)

    @property
    def key(self) -> str:
        (key,) = self.d._workers
        return key

    def fast(self) -> bool:
        return self.d._queues.has_fast(self.key)

    def stream(self) -> TcpStream:
        (stream,) = self.service.stats("node-b").streams
        return stream

    async def first_batch(self, packets: list[bytes]) -> None:
        """The destination's first packets go through its worker, which then offers the fast route."""
        assert self.push(packets) == len(packets)
        async with asyncio.timeout(10):  # a hang guard
            await wait_until(self.fast)


@contextlib.asynccontextmanager
async def lab(keys: dict[str, Security], sink: CountingSink, **options: float) -> AsyncIterator[Lab]:
    discovery = StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:9", [f"{A_SRC}/32"]), Peer("node-b", "127.0.0.1:9", [f"{DEST}/32"])]
    )
    async with Receiver(discovery, sink, security=keys["node-b"]) as receiver:
        service = TcpStreamService(LoopbackEndpoint(receiver.address[1]), keys["node-a"], **options)  # type: ignore[arg-type]
        d = Dispatcher(
            FakePeerDiscovery(default="node-b"),
            service,
            None,
            worker_buffer_size=10_000,
            resilience_service=ResilienceService(ResilienceConfig(), random=random.Random(0).random),
        )
        async with d:
            yield Lab(receiver, service, d)


async def test_packets_to_an_established_destination_are_written_in_the_push_and_counted_sent(
    keys: dict[str, Security],
) -> None:
    sink = CountingSink()
    packets = [pkt(i, 60 + i % 1300) for i in range(2000)]
    async with lab(keys, sink) as lab_:
        await lab_.first_batch(packets[:10])
        stream = lab_.stream()
        worker = lab_.d._workers[lab_.key]
        for start in range(10, len(packets), 37):
            batch = packets[start : start + 37]
            assert lab_.push(batch) == len(batch)
            # Written in the push: the worker was not woken, nothing waits in its queue.
            assert not worker.busy
            assert worker.depth == 0
        assert stream.packets_sent == len(packets)
        async with asyncio.timeout(10):  # a hang guard
            assert await lab_.d.flush()
        m = lab_.d.check_accounting()
        payload = sum(map(len, packets))
        assert (m.accepted, m.sent, m.in_flight, m.failed) == (len(packets), len(packets), 0, 0)
        assert m.bytes_sent == payload
        wm = worker.metrics()
        assert (wm.packet_count, wm.byte_count, wm.error_count) == (len(packets), payload, 0)
        stats = lab_.service.stats("node-b")
        assert (stats.tx_packets, stats.tx_bytes, stats.lost_in_flight) == (len(packets), payload, 0)
        assert worker.fast_counts == (0, len(packets) - 10, payload - sum(map(len, packets[:10])), 0)
    assert sink.taken == packets  # the peer's count is ours, in order
    assert lab_.receiver.metrics().packets_delivered == len(packets)


async def test_order_holds_when_the_window_sends_packets_back_through_the_worker(
    keys: dict[str, Security],
) -> None:
    """A window of 64 KiB (the smallest allowed): many pushes find it full, so their packets queue for the
    worker (which waits for acks), and the route comes back once the worker is idle again. Every packet
    arrives once, in order."""
    sink = CountingSink()
    packets = [pkt(i, 1400) for i in range(600)]
    async with lab(keys, sink, window=64 * 1024) as lab_:
        await lab_.first_batch(packets[:5])
        worker = lab_.d._workers[lab_.key]
        fell_back = 0
        for start in range(5, len(packets), 5):
            lab_.push(packets[start : start + 5])
            fell_back += worker.busy
            if start % 100 == 0:
                await asyncio.sleep(0)  # let acks in now and then: both ways get used
        async with asyncio.timeout(10):  # a hang guard
            assert await lab_.d.flush()
        m = lab_.d.check_accounting()
        assert (m.sent, m.in_flight, m.failed) == (len(packets), 0, 0)
        fast_in_flight, fast_sent, _, fast_lost = worker.fast_counts
        assert fell_back > 0  # both ways carried packets
        assert 0 < fast_sent < len(packets)
        assert (fast_in_flight, fast_lost) == (0, 0)
    assert sink.taken == packets


async def test_what_a_frozen_peer_never_acknowledged_is_lost_in_flight_exactly(
    keys: dict[str, Security],
) -> None:
    sink = CountingSink(block_after=100)
    packets = [pkt(i, 200) for i in range(400)]
    async with lab(keys, sink, ack_timeout=0.3) as lab_:
        await lab_.first_batch(packets[:10])
        async with asyncio.timeout(10):  # a hang guard
            assert await lab_.d.flush()  # the first 10 are taken (and acknowledged) before the freeze
        stream = lab_.stream()
        for start in range(10, len(packets), 10):
            lab_.push(packets[start : start + 10])
        async with asyncio.timeout(10):  # a hang guard: the watchdog ends the connection
            await wait_until(lambda: stream.closed)
            assert await lab_.d.flush()
        m = lab_.d.check_accounting()
        written = stream.packets_sent
        taken = len(sink.taken)
        assert 10 <= taken <= 100
        assert m.sent == taken == lab_.receiver.metrics().packets_delivered
        assert m.failed_by_reason["lost_in_flight"] == written - taken
        assert m.in_flight == 0
        assert isinstance(stream._error, TimeoutError)
        stats = lab_.service.stats("node-b")
        assert (stats.tx_packets, stats.lost_in_flight) == (taken, written - taken)
        sink.release.set()


async def test_a_stop_that_cannot_wait_gives_up_on_the_fast_paths_packets(
    keys: dict[str, Security],
) -> None:
    sink = CountingSink(block_after=20)
    packets = [pkt(i, 200) for i in range(200)]
    async with lab(keys, sink, ack_timeout=60.0) as lab_:
        await lab_.first_batch(packets[:10])
        for start in range(10, len(packets), 10):
            lab_.push(packets[start : start + 10])
        stream = lab_.stream()
        async with asyncio.timeout(10):  # a hang guard
            await lab_.d.stop(timeout=0.05)  # configuration: far below the peer's freeze
        m = lab_.d.check_accounting()
        taken = len(sink.taken)
        assert m.sent == taken
        assert m.failed_by_reason["lost_in_flight"] == stream.packets_sent - taken
        assert m.in_flight == 0
        sink.release.set()


async def test_changed_routes_withdraw_the_fast_route(keys: dict[str, Security]) -> None:
    sink = CountingSink()
    packets = [pkt(i) for i in range(30)]
    async with lab(keys, sink) as lab_:
        await lab_.first_batch(packets[:10])
        lab_.d.invalidate_routes()
        assert not lab_.fast()
        lab_.push(packets[10:20])  # through the worker again: it looks the owner up, then offers the route
        async with asyncio.timeout(10):  # a hang guard
            await wait_until(lab_.fast)
        lab_.push(packets[20:])
        async with asyncio.timeout(10):
            assert await lab_.d.flush()
        assert lab_.d.check_accounting().sent == len(packets)
    assert sink.taken == packets


async def test_a_connection_that_ends_sends_packets_back_through_the_worker_which_reconnects(
    keys: dict[str, Security],
) -> None:
    """The connection under the fast route ends (closed here, as a peer's idle close or a reload would): the
    next push finds the session closed, so its packets stay queued for the worker, which writes them on a
    fresh connection and offers that one. Nothing is lost or reordered."""
    sink = CountingSink()
    packets = [pkt(i) for i in range(60)]
    async with lab(keys, sink) as lab_:
        await lab_.first_batch(packets[:20])
        async with asyncio.timeout(10):  # a hang guard
            assert await lab_.d.flush()
        first = lab_.stream()
        await first.close()
        worker = lab_.d._workers[lab_.key]
        assert not worker.busy
        lab_.push(packets[20:40])
        assert worker.busy  # the worker's again, not the fast path's
        assert not lab_.fast()
        async with asyncio.timeout(10):
            await wait_until(lab_.fast)  # offered again, on the new connection
        assert lab_.stream() is not first
        lab_.push(packets[40:])
        async with asyncio.timeout(10):
            assert await lab_.d.flush()
        m = lab_.d.check_accounting()
        assert (m.sent, m.failed) == (len(packets), 0)
    assert sink.taken == packets


async def test_a_destination_in_use_on_the_fast_path_is_not_idle(keys: dict[str, Security]) -> None:
    """Its worker never wakes up for fast-path packets, yet idle cleanup must not take it for idle: it is
    removed only after a whole idle timeout without a packet either way."""
    sink = CountingSink()
    packets = [pkt(i) for i in range(30)]
    async with lab(keys, sink) as lab_:
        d = lab_.d
        await lab_.first_batch(packets[:10])
        key = lab_.key
        later = d._ctx.clock() + d.worker_idle_timeout + 1  # an injected "now", past the idle timeout
        lab_.push(packets[10:20])  # fast path only: the worker stays asleep
        assert d.run_cleanup(now=later) == 0
        assert key in d._workers
        lab_.push(packets[20:])
        assert d.run_cleanup(now=later + d.worker_idle_timeout + 1) == 0  # used again since the last look
        assert d.run_cleanup(now=later + 3 * d.worker_idle_timeout) == 1  # and now idle for a whole timeout
        assert key not in d._workers
        async with asyncio.timeout(10):  # a hang guard
            assert await d.flush()
        assert d.check_accounting().sent == len(packets)
    assert sink.taken == packets


async def test_close_waits_for_the_fast_paths_packets_to_be_acknowledged(keys: dict[str, Security]) -> None:
    """A graceful close right after fast-path writes: it waits for their acks (the stream did not write
    them itself), so every packet is sent, none lost, and the connection ends with a FIN, not a reset."""
    sink = CountingSink()
    packets = [pkt(i) for i in range(200)]
    async with lab(keys, sink) as lab_:
        await lab_.first_batch(packets[:10])
        async with asyncio.timeout(10):  # a hang guard
            assert await lab_.d.flush()  # the worker's own batch acknowledged: only fast packets follow
        stream = lab_.stream()
        for start in range(10, len(packets), 10):
            lab_.push(packets[start : start + 10])
        assert stream.fast_in_flight > 0
        async with asyncio.timeout(10):
            await stream.close()
        assert stream._error is None  # everything acknowledged before the close: a FIN
        m = lab_.d.check_accounting()
        assert (m.sent, m.failed_by_reason["lost_in_flight"], m.in_flight) == (len(packets), 0, 0)
    assert sink.taken == packets


async def test_tun_reads_for_an_established_destination_are_written_on_the_data_plane_thread(
    keys: dict[str, Security], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `TunDevice` read on the data plane's thread: once the destination's worker offered its fast route,
    the thread pushes each read itself, written into the connection, and the loop admits nothing; the first
    read (a new destination) and any the fast path cannot take are handed back and go through the worker.
    Order and "sent = acknowledged" hold across both ways."""
    sink = CountingSink()
    packets = [pkt(i, 60 + i % 1300) for i in range(600)]
    async with lab(keys, sink) as lab_:
        tun, plane = FakeTun("feed0"), Plane()
        admitted = [0]
        admit = lab_.d._admit

        def counting_admit(pushed: Any) -> int:
            admitted[0] += 1
            return admit(pushed)

        monkeypatch.setattr(lab_.d, "_admit", counting_admit)
        lab_.service.plane = plane  # the thread reads the acks too while only the fast path waits on them
        try:
            tun.start_reading(lab_.d, plane=plane)
            tun.inject(packets[:10])  # a new destination: handed back, through the worker
            async with asyncio.timeout(10):  # a hang guard
                await wait_until(lambda: bool(lab_.d._workers) and lab_.fast())
            before = admitted[0]
            for start in range(10, len(packets), 20):
                tun.inject(packets[start : start + 20])
                async with asyncio.timeout(10):
                    await wait_until(lambda start=start: len(sink.taken) >= min(start + 20, len(packets)))
            assert sink.taken == packets  # every packet, in order
            link = lab_.stream()._link
            async with asyncio.timeout(10):
                await wait_until(lambda: link._on_plane)  # the acks are read on the thread
                assert await lab_.d.flush()
            lab_.service.sync_acks()  # what the thread read, counted
            stats = lab_.service.stats("node-b")
            assert (stats.tx_packets, stats.lost_in_flight) == (600, 0)
            m = lab_.d.check_accounting()
            assert (m.accepted, m.sent, m.in_flight, m.failed) == (600, 600, 0, 0)
            tm = tun.metrics()
            assert tm.packets_read == 600
            assert lab_.d.plane_queues().accepted_off_loop > 0  # pushed by the thread...
            assert admitted[0] - before < tm.read_events  # ...with fewer reads admitted on the loop
        finally:
            tun.stop_reading()
            plane.close()
            tun.close()
