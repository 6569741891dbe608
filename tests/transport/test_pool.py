"""StreamPool: leases on shared connections, bounds, unhealthy release, idle cleanup (injected clock),
lifecycle, and how it serves the dispatcher's workers (a worker keeps its stream: no reordering)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from vpn_packet.api import Stream, StreamPoolService
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import NetworkError, ServiceError, is_temporary_error
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.pool import PooledStream, StreamPool


class FakeConn:
    """A connection: records what is written, can be closed or broken."""

    def __init__(self, peer_id: str, n: int) -> None:
        self.peer_id = peer_id
        self.n = n
        self.closed = False
        self.written: list[bytes] = []
        self.fail = False
        self.closed_event = asyncio.Event()

    async def write(self, packet: bytes) -> None:
        await self.write_many([packet])

    async def write_many(self, packets: Sequence[bytes]) -> None:
        if self.closed or self.fail:
            raise NetworkError(ConnectionResetError(), peer_id=self.peer_id)
        self.written.extend(packets)

    def close_nowait(self) -> None:
        self.closed = True
        self.closed_event.set()

    def abort(self) -> None:
        self.close_nowait()

    async def close(self) -> None:
        self.close_nowait()


class FakeService:
    def __init__(self) -> None:
        self.made: list[FakeConn] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def create_stream(self, peer_id: str) -> FakeConn:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise NetworkError(ConnectionRefusedError(), peer_id=peer_id, operation="connect")
        conn = FakeConn(peer_id, len(self.made))
        self.made.append(conn)
        return conn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def conn(lease: Stream) -> FakeConn:
    assert isinstance(lease, PooledStream)
    stream = lease.stream
    assert isinstance(stream, FakeConn)
    return stream


async def test_implements_protocol_and_reuses_idle_connection() -> None:
    service = FakeService()
    async with StreamPool(service) as pool:
        assert isinstance(pool, StreamPoolService)
        lease = await pool.get_stream("b")
        assert isinstance(lease, Stream)
        await lease.write_many([b"x", b"y"])
        first = conn(lease)
        pool.release_stream("b", lease, True)
        again = await pool.get_stream("b")
        assert conn(again) is first
        m = pool.metrics()
        assert (m.created, m.reused, m.in_use, m.idle) == (1, 1, 1, 0)
        pool.release_stream("b", again, True)
        assert pool.metrics().idle == 1
        assert "StreamPool running" in repr(pool)
    assert first.closed


async def test_spreads_up_to_the_bound_then_shares() -> None:
    service = FakeService()
    async with StreamPool(service, max_streams_per_peer=3) as pool:
        leases = [await pool.get_stream("b") for _ in range(9)]
        assert len(service.made) == 3
        loads = sorted(sum(conn(lease) is c for lease in leases) for c in service.made)
        assert loads == [3, 3, 3]
        m = pool.metrics()
        assert (m.streams, m.in_use, m.created) == (3, 9, 3)
        other = await pool.get_stream("c")  # the bound is per peer
        assert len(service.made) == 4
        assert conn(other).peer_id == "c"


async def test_concurrent_first_requests_share_the_connections_being_opened() -> None:
    service = FakeService()
    service.gate = asyncio.Event()
    async with StreamPool(service, max_streams_per_peer=2) as pool:
        tasks = [asyncio.create_task(pool.get_stream("b")) for _ in range(50)]
        await asyncio.sleep(0)  # one loop iteration: every task asks for its stream
        assert pool.metrics().waiting == 48
        service.gate.set()
        leases = await asyncio.gather(*tasks)
        assert len(service.made) == 2
        assert pool.metrics().in_use == 50
        assert pool.metrics().waiting == 0
        for lease in leases:
            pool.release_stream("b", lease, True)
        assert pool.metrics().idle == 2


async def test_waiters_time_out_with_a_typed_retriable_error() -> None:
    service = FakeService()
    async with StreamPool(
        service, max_streams_per_peer=1, max_leases_per_stream=1, acquire_timeout=0.01
    ) as pool:
        held = await pool.get_stream("b")
        with pytest.raises(ServiceError) as info:
            await pool.get_stream("b")
        assert info.value.service == "stream_pool"
        assert is_temporary_error(info.value)
        assert pool.metrics().timeouts == 1
        # A release hands the connection to the next waiter.
        waiter = asyncio.create_task(pool.get_stream("b"))
        await asyncio.sleep(0)  # one loop iteration: the waiter queues
        pool.release_stream("b", held, True)
        assert conn(await waiter) is conn(held)


async def test_unhealthy_release_closes_and_replaces() -> None:
    service = FakeService()
    async with StreamPool(service, max_streams_per_peer=1) as pool:
        a = await pool.get_stream("b")
        b = await pool.get_stream("b")  # shares the one connection
        assert conn(a) is conn(b)
        broken = conn(a)
        pool.release_stream("b", a, False)
        assert broken.closed
        assert pool.metrics().closed_unhealthy == 1
        with pytest.raises(NetworkError):  # the other lease fails over on its next write
            await b.write_many([b"x"])
        pool.release_stream("b", b, False)
        pool.release_stream("b", b, False)  # a second release is ignored
        assert pool.metrics().closed_unhealthy == 1
        fresh = await pool.get_stream("b")
        assert conn(fresh) is not broken
        assert len(service.made) == 2
        assert pool.metrics().in_use == 1


async def test_connection_closed_by_peer_is_not_lent_again() -> None:
    service = FakeService()
    async with StreamPool(service) as pool:
        lease = await pool.get_stream("b")
        first = conn(lease)
        pool.release_stream("b", lease, True)
        first.closed = True  # the peer went away while it was idle
        lease = await pool.get_stream("b")
        assert conn(lease) is not first
        assert pool.metrics().closed_dead == 1


async def test_idle_cleanup_with_injected_clock() -> None:
    clock = Clock()
    service = FakeService()
    pool = StreamPool(service, max_streams_per_peer=2, idle_timeout=30.0, clock=clock)
    await pool.start()
    try:
        a = await pool.get_stream("b")
        b = await pool.get_stream("b")
        assert conn(a) is not conn(b)
        pool.release_stream("b", a, True)
        clock.now += 29
        assert pool.run_cleanup() == 0
        clock.now += 1
        assert pool.run_cleanup() == 1  # a's connection idled 30 s; b's is leased
        async with asyncio.timeout(10):  # a hang guard: the graceful close runs in the background
            await conn(a).closed_event.wait()
        assert not conn(b).closed
        m = pool.metrics()
        assert (m.closed_idle, m.streams, m.in_use) == (1, 1, 1)
        pool.release_stream("b", b, True)
        clock.now += 100
        assert pool.run_cleanup() == 1
        assert pool.metrics().peers == 0
    finally:
        await pool.stop()


async def test_connect_failure_propagates_and_wakes_waiters() -> None:
    service = FakeService()
    service.gate = asyncio.Event()
    service.fail = True
    async with StreamPool(service, max_streams_per_peer=1) as pool:
        first = asyncio.create_task(pool.get_stream("b"))
        second = asyncio.create_task(pool.get_stream("b"))
        await asyncio.sleep(0)  # one loop iteration: both tasks ask for their stream
        service.gate.set()
        with pytest.raises(NetworkError):
            await first
        with pytest.raises(NetworkError):  # it was waiting for that connection: same verdict
            await second
        assert pool.metrics().create_failures == 1
        service.fail = False
        assert conn(await pool.get_stream("b")).peer_id == "b"


async def test_stop_closes_everything_fails_waiters_and_leaves_no_task() -> None:
    service = FakeService()
    pool = StreamPool(service, max_streams_per_peer=1, max_leases_per_stream=1)
    before = asyncio.all_tasks()
    await pool.start()
    held = await pool.get_stream("b")
    waiter = asyncio.create_task(pool.get_stream("b"))
    await asyncio.sleep(0)  # one loop iteration: the waiter queues
    await pool.stop()
    with pytest.raises(ServiceError):
        await waiter
    assert conn(held).closed
    pool.release_stream("b", held, True)  # late release: harmless
    with pytest.raises(ServiceError):
        await pool.get_stream("b")
    await pool.stop()  # idempotent
    assert asyncio.all_tasks() - before == set()
    with pytest.raises(RuntimeError):
        await pool.start()


async def test_foreign_stream_is_closed_on_release() -> None:
    pool = StreamPool(FakeService())
    stranger = FakeConn("b", 99)
    pool.release_stream("b", stranger, True)
    async with asyncio.timeout(10):  # a hang guard: a healthy stream's close runs in the background
        await stranger.closed_event.wait()


def test_validation() -> None:
    service = FakeService()
    with pytest.raises(ValueError, match="max_streams_per_peer"):
        StreamPool(service, max_streams_per_peer=0)
    with pytest.raises(ValueError, match="max_leases_per_stream"):
        StreamPool(service, max_leases_per_stream=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        StreamPool(service, idle_timeout=0)


class Discovery:
    async def get_peer_id(self, dest_ip: str) -> str:
        return "b"


async def test_dispatcher_workers_keep_their_stream_and_stay_in_order() -> None:
    """Hundreds of destinations on one peer with 2 connections: nobody waits, every destination's packets
    go down one connection in dispatch order."""
    service = FakeService()
    pool = StreamPool(service, max_streams_per_peer=2)
    dispatcher = Dispatcher(Discovery(), service, pool, worker_buffer_size=1000)
    await pool.start()
    await dispatcher.start()
    packets = [
        ipv4_packet("10.1.0.1", f"10.2.{d // 250}.{d % 250 + 1}", UDP, 1000, 53, seq.to_bytes(4, "big"))
        for seq in range(5)
        for d in range(300)
    ]
    for i in range(0, len(packets), 100):
        assert dispatcher.dispatch_batch(packets[i : i + 100]) == 100
        await asyncio.sleep(0)  # one loop iteration: the workers start their drains
    assert await dispatcher.flush(5)
    assert len(service.made) == 2
    assert pool.metrics().in_use == 300  # each worker holds its lease
    per_dest: dict[bytes, list[tuple[int, int]]] = {}
    for c in service.made:
        for packet in c.written:
            per_dest.setdefault(packet[16:20], []).append((c.n, int.from_bytes(packet[-4:], "big")))
    assert len(per_dest) == 300
    for seen in per_dest.values():
        assert len({n for n, _ in seen}) == 1  # one connection per destination
        assert [s for _, s in seen] == [0, 1, 2, 3, 4]
    await dispatcher.stop()
    assert pool.metrics().in_use == 0
    assert pool.metrics().idle == 2
    await pool.stop()


async def test_background_cleanup_runs_between_start_and_stop() -> None:
    service = FakeService()
    before = asyncio.all_tasks()
    async with StreamPool(service, idle_timeout=0.001, cleanup_interval=0.001) as pool:
        lease = await pool.get_stream("b")
        pool.release_stream("b", lease, True)
        async with asyncio.timeout(5):  # a safety net, not a threshold
            await conn(lease).closed_event.wait()
        assert pool.metrics().closed_idle == 1
        assert pool.metrics().streams == 0
    assert asyncio.all_tasks() - before == set()


async def test_a_waiter_cancelled_after_its_wake_up_passes_it_on() -> None:
    service = FakeService()
    async with StreamPool(service, max_streams_per_peer=1, max_leases_per_stream=1) as pool:
        held = await pool.get_stream("b")
        first = asyncio.create_task(pool.get_stream("b"))
        second = asyncio.create_task(pool.get_stream("b"))
        await asyncio.sleep(0)  # one loop iteration: both tasks ask for their stream
        pool.release_stream("b", held, True)  # wakes `first` ...
        first.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        lease = await second
        assert conn(lease) is conn(held)
