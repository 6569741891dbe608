"""DESIGN.md section 5, one behaviour per test: order, isolation, bounds, futures, accounting, idle cleanup,
peer lookup, stop, cancellation. No real time passes: gates, manual clocks and loop iterations only."""

# ruff: noqa: F403, F405
from __future__ import annotations

import asyncio
import functools
import random
import struct
from collections import defaultdict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher, DispatcherState
from vpn_packet.errors import DispatcherStoppedError, PeerNotFoundError, ServiceError
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import (
    FakePeerDiscovery,
    FakeStreamPool,
    FakeStreamService,
    ManualClock,
    RecordingSleep,
)
from vpn_packet.testutil.fixtures import *
from vpn_packet.testutil.packets import UDP, ipv4_packet

# --- 1. order per key ---------------------------------------------------------------------------------------


def _seq_packet(dest: int, seq: int) -> bytes:
    return ipv4_packet("10.9.0.1", f"10.0.0.{dest + 1}", UDP, 1000, 80, struct.pack("!I", seq))


def _seq_of(packet: bytes) -> int:
    return int(struct.unpack("!I", packet[-4:])[0])


_ops = st.lists(
    st.tuples(
        st.sampled_from(["packet", "callback", "batch", "yield"]), st.integers(0, 4), st.integers(1, 6)
    ),
    max_size=120,
)


@given(
    ops=_ops,
    suspend=st.booleans(),
    failure_rate=st.sampled_from([0.0, 0.2]),
    coalesce=st.sampled_from([0, 16]),
    seed=st.integers(0, 99),
)
def test_order_per_key_under_random_interleavings(
    ops: list[tuple[str, int, int]], suspend: bool, failure_rate: float, coalesce: int, seed: int
) -> None:
    """Whatever the interleaving of single, callback and batch dispatches, suspending writes and retried
    failures, the packets of one key reach the streams in dispatch order (failed ones are left out)."""

    async def scenario() -> None:
        clock = ManualClock()
        sleep = RecordingSleep(clock)
        service = FakeStreamService(
            seed=seed, sleep=sleep, stream_latency=0.001 if suspend else 0.0, write_failure_rate=failure_rate
        )
        resilience = ResilienceService(
            ResilienceConfig(failure_threshold=1000),
            clock=clock,
            sleep=sleep,
            random=random.Random(seed).random,
        )
        d = Dispatcher(
            FakePeerDiscovery(prefixes={"10.0.0.0/30": "p1", "10.0.0.0/24": "p2"}),
            None,
            FakeStreamPool(service),
            worker_buffer_size=10_000,
            resilience_service=resilience,
            clock=clock,
            coalesce=coalesce,
        )
        dispatched: dict[int, list[int]] = defaultdict(list)
        seq = 0
        async with d:
            for op, dest, n in ops:
                if op == "yield":
                    await asyncio.sleep(0)  # one loop iteration: pending drains progress
                    continue
                packets = []
                for _ in range(n):
                    packets.append(_seq_packet(dest, seq))
                    dispatched[dest].append(seq)
                    seq += 1
                if op == "batch":
                    assert d.dispatch_batch(packets) == n
                else:
                    key, ip = destination_key_and_ip(packets[0])
                    for p in packets:
                        if op == "packet":
                            assert d.dispatch_packet(key, ip, p)
                        else:
                            d.dispatch_packet_with_callback(key, ip, p)
            await d.flush()
            m = d.check_accounting()
        written: dict[int, list[int]] = defaultdict(list)
        for p in service.log:
            written[p[19] - 1].append(_seq_of(p))
        for dest, seqs in dispatched.items():
            got = written[dest]
            assert got == sorted(got)
            assert set(got) <= set(seqs)
            if failure_rate == 0.0:
                assert got == seqs
        assert m.sent == len(service.log)
        assert m.sent + m.failed == seq

    asyncio.run(scenario())


# --- 2. isolation -------------------------------------------------------------------------------------------


async def test_a_stuck_destination_delays_no_other(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery, fake_stream_service: FakeStreamService
) -> None:
    fake_discovery.set_peer("10.0.0.66", "slow")
    fake_stream_service.gate_for("slow").close()
    slow = dispatcher.dispatch_packet_with_callback("10.0.0.66:80", "10.0.0.66", b"stuck")
    fast = [
        dispatcher.dispatch_packet_with_callback(f"10.0.0.{i}:80", f"10.0.0.{i}", b"go") for i in range(10)
    ]
    await settle()
    assert all(f.done() and f.exception() is None for f in fast)
    assert not slow.done()
    more = dispatcher.dispatch_packet_with_callback("10.0.0.1:80", "10.0.0.1", b"again")
    await settle()
    assert more.done()
    assert not slow.done()
    fake_stream_service.gate_for("slow").open()
    await slow


async def test_a_slow_peer_lookup_delays_no_other(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery
) -> None:
    fake_discovery.gate_for("10.0.0.66").close()
    slow = dispatcher.dispatch_packet_with_callback("10.0.0.66:80", "10.0.0.66", b"x")
    fast = dispatcher.dispatch_packet_with_callback("10.0.0.1:80", "10.0.0.1", b"y")
    await settle()
    assert fast.done()
    assert not slow.done()
    fake_discovery.gate_for("10.0.0.66").open()
    await slow


async def test_a_retry_backoff_delays_no_other(
    dispatcher_factory: DispatcherFactory,
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
) -> None:
    hold = asyncio.Event()

    async def blocking_sleep(delay: float) -> None:
        await hold.wait()

    d = await dispatcher_factory(resilience_service=ResilienceService(sleep=blocking_sleep))
    fake_discovery.set_peer("10.0.0.66", "flaky")
    flaky = d.dispatch_packet_with_callback("10.0.0.66:80", "10.0.0.66", b"x")
    await settle()
    (stream,) = fake_stream_service.streams("flaky")
    stream.failures.fail_next(ConnectionResetError)  # the next write fails: the retry sleeps on `hold`
    flaky = d.dispatch_packet_with_callback("10.0.0.66:80", "10.0.0.66", b"y")
    await settle()
    fast = d.dispatch_packet_with_callback("10.0.0.1:80", "10.0.0.1", b"z")
    await settle()
    assert fast.done()
    assert not flaky.done()
    hold.set()
    await flaky


# --- 3. bounds ----------------------------------------------------------------------------------------------


async def test_a_worker_holds_at_most_buffer_size_packets(
    dispatcher_factory: DispatcherFactory, fake_stream_service: FakeStreamService
) -> None:
    d = await dispatcher_factory(worker_buffer_size=3)
    fake_stream_service.gate_for("peer-1").close()
    results = [d.dispatch_packet("k", "10.0.0.1", bytes([i])) for i in range(3)]
    await settle()  # the three are now in flight
    results += [d.dispatch_packet("k", "10.0.0.1", bytes([i])) for i in range(3, 5)]
    assert results == [True, True, True, False, False]
    w = d.worker_metrics()["k"]
    assert w.in_flight + w.queue_depth == 3
    assert w.drop_count == 2
    assert d.check_accounting().rejected_by_reason["queue_full"] == 2
    fake_stream_service.gate_for("peer-1").open()
    await d.flush()
    assert d.dispatch_packet("k", "10.0.0.1", b"room again")


async def test_worker_cap_evicts_the_least_recently_active_idle_worker(
    dispatcher_factory: DispatcherFactory, manual_clock: ManualClock, fake_pool: FakeStreamPool
) -> None:
    d = await dispatcher_factory(max_workers=3)
    for key in ("a", "b", "c"):
        d.dispatch_packet(key, "10.0.0.1", b"x")
        await d.flush()
        manual_clock.advance(1)
    d.dispatch_packet("a", "10.0.0.1", b"x")  # a is now the most recently active
    await d.flush()
    assert d.dispatch_packet("d", "10.0.0.1", b"x")
    assert set(d.worker_metrics()) == {"c", "a", "d"}  # b was least recently active
    m = d.metrics()
    assert (m.workers_evicted, m.rejected_by_reason["worker_limit"]) == (1, 0)
    await d.flush()
    assert fake_pool.outstanding == 3  # the evicted worker gave its stream back


async def test_worker_cap_rejects_new_keys_when_every_worker_is_busy(
    dispatcher_factory: DispatcherFactory, fake_stream_service: FakeStreamService
) -> None:
    d = await dispatcher_factory(max_workers=2)
    fake_stream_service.gate_for("peer-1").close()
    assert d.dispatch_packet("a", "10.0.0.1", b"x")
    assert d.dispatch_packet("b", "10.0.0.1", b"x")
    assert not d.dispatch_packet("c", "10.0.0.1", b"x")
    assert d.dispatch_batch([ipv4_packet("10.0.0.1", "10.0.0.3", UDP, 1, 2)] * 4) == 0
    m = d.check_accounting()
    assert m.rejected_by_reason["worker_limit"] == 5
    assert m.workers == 2
    fake_stream_service.gate_for("peer-1").open()


# --- 4. futures ---------------------------------------------------------------------------------------------


async def test_every_future_resolves_exactly_once(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery, fake_stream_service: FakeStreamService
) -> None:
    fake_discovery.default = None
    fake_discovery.set_peer("10.0.0.1", "peer-1")
    calls: dict[int, int] = defaultdict(int)
    futures = []
    for i in range(40):
        ip = "10.0.0.1" if i % 3 else "10.0.0.9"  # every third has no peer
        f = dispatcher.dispatch_packet_with_callback(f"{ip}:{i % 4}", ip, bytes([i]))
        f.add_done_callback(functools.partial(lambda i, _f: calls.__setitem__(i, calls[i] + 1), i))
        futures.append(f)
    futures[5].cancel()
    await dispatcher.flush()
    await settle()
    assert all(f.done() for f in futures)
    assert dict(calls) == dict.fromkeys(range(40), 1)
    assert isinstance(futures[0].exception(), PeerNotFoundError)
    assert futures[1].exception() is None


async def test_no_future_is_left_pending_after_stop(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    fake_stream_service.gate_for("peer-1").close()
    futures = [
        dispatcher.dispatch_packet_with_callback(f"k{i % 3}", "10.0.0.1", bytes([i])) for i in range(9)
    ]
    await settle()
    await dispatcher.stop(timeout=0)
    assert all(f.done() for f in futures)
    assert all(isinstance(f.exception(), DispatcherStoppedError) for f in futures)
    m = dispatcher.check_accounting()
    assert m.discarded_by_reason["stopped"] == 9
    assert m.queued == 0


async def test_a_cancelled_future_skips_its_packet(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService, fake_pool: FakeStreamPool
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    first = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"1")
    await settle()  # "1" is in flight
    second = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"2")
    third = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"3")
    second.cancel()
    gate.open()
    await first
    await third
    assert fake_pool.written() == [b"1", b"3"]
    m = dispatcher.check_accounting()
    assert (m.sent, m.discarded_by_reason["cancelled"]) == (2, 1)
    assert dispatcher.worker_metrics()["k"].discard_count == 1


async def test_cancelling_a_packet_already_being_written_changes_nothing(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService, fake_pool: FakeStreamPool
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    f = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"1")
    await settle()
    f.cancel()
    gate.open()
    await dispatcher.flush()
    assert fake_pool.written() == [b"1"]
    assert dispatcher.check_accounting().sent == 1


# --- 5. accounting ------------------------------------------------------------------------------------------


async def test_accounting_identity_holds_at_every_step(
    dispatcher_factory: DispatcherFactory,
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
    fake_pool: FakeStreamPool,
    manual_clock: ManualClock,
) -> None:
    """Random dispatches, cancellations, failures, blocked writes and a stop: after every step the identity
    accepted = sent + failed + discarded + queued holds."""
    rng = random.Random(4)
    fake_discovery.failures.fail_randomly(0.1, PeerNotFoundError("10.0.0.1"))
    fake_pool.failures.fail_randomly(0.05, ValueError("pool broken"))
    gate = fake_stream_service.gate_for("peer-1")
    resilience = ResilienceService(
        ResilienceConfig(failure_threshold=10**6), clock=manual_clock, sleep=RecordingSleep(manual_clock)
    )
    d = await dispatcher_factory(worker_buffer_size=8, max_workers=20, resilience_service=resilience)
    futures = []
    for step in range(800):
        roll = rng.random()
        key = f"10.0.{rng.randrange(3)}.{rng.randrange(30)}"
        if roll < 0.4:
            d.dispatch_packet(key + ":1", key, b"p")
        elif roll < 0.6:
            futures.append(d.dispatch_packet_with_callback(key + ":1", key, b"f"))
        elif roll < 0.7:
            d.dispatch_batch([ipv4_packet("10.9.0.1", key, UDP, 1, 1)] * rng.randrange(1, 12) + [b""])
        elif roll < 0.75 and futures:
            rng.choice(futures).cancel()
        elif roll < 0.78:
            for s in fake_stream_service.created:
                s.failures.fail_next(ConnectionResetError)
        elif roll < 0.8:
            gate.close() if gate.is_open else gate.open()
        else:
            await asyncio.sleep(0)  # one loop iteration: pending drains progress
        d.check_accounting()
        if step == 700:
            await d.stop(timeout=0)
    m = d.check_accounting()
    assert m.queued == 0
    assert m.state == "stopped"
    assert all(f.done() for f in futures)
    for f in futures:
        if not f.cancelled():
            f.exception()
    counts = {**m.rejected_by_reason, **m.failed_by_reason}, m.discarded_by_reason
    assert {r for table in counts for r, n in table.items() if n} >= {
        "queue_full",
        "worker_limit",
        "invalid_packet",
        "stopped",
        "no_peer",
        "stream_error",
        "cancelled",
    }


# --- 6. idle cleanup ----------------------------------------------------------------------------------------


async def test_idle_cleanup_removes_only_long_idle_workers(
    dispatcher_factory: DispatcherFactory, manual_clock: ManualClock, fake_pool: FakeStreamPool
) -> None:
    d = await dispatcher_factory(worker_idle_timeout=10, worker_cleanup_interval=5)
    d.dispatch_packet("old", "10.0.0.1", b"x")
    await d.flush()
    manual_clock.advance(6)
    d.dispatch_packet("recent", "10.0.0.2", b"x")
    await d.flush()
    manual_clock.advance(5)  # old idle 11 s, recent 5 s
    assert d.run_cleanup() == 1
    assert set(d.worker_metrics()) == {"recent"}
    assert fake_pool.outstanding == 1
    manual_clock.advance(100)
    assert d.run_cleanup() == 1
    assert d.worker_metrics() == {}
    assert fake_pool.outstanding == 0
    assert d.metrics().workers_removed == 2


async def test_idle_cleanup_never_removes_a_busy_worker(
    dispatcher_factory: DispatcherFactory, manual_clock: ManualClock, fake_stream_service: FakeStreamService
) -> None:
    d = await dispatcher_factory(worker_idle_timeout=10)
    fake_stream_service.gate_for("peer-1").close()
    f = d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    manual_clock.advance(1000)
    assert d.run_cleanup() == 0  # queued, not yet drained
    await settle()
    assert d.run_cleanup() == 0  # being written
    fake_stream_service.gate_for("peer-1").open()
    await f


async def test_a_packet_racing_with_cleanup_still_goes_out(
    dispatcher_factory: DispatcherFactory, manual_clock: ManualClock, fake_pool: FakeStreamPool
) -> None:
    d = await dispatcher_factory(worker_idle_timeout=10)
    d.dispatch_packet("k", "10.0.0.1", b"before")
    await d.flush()
    manual_clock.advance(11)
    racing = d.dispatch_packet_with_callback("k", "10.0.0.1", b"racing")  # dispatched, not yet drained
    assert d.run_cleanup() == 0
    assert d.run_cleanup(now=manual_clock.now + 1000) == 0
    await racing
    manual_clock.advance(11)
    assert d.run_cleanup() == 1
    after = d.dispatch_packet_with_callback("k", "10.0.0.1", b"after")  # a fresh worker
    await after
    assert fake_pool.written() == [b"before", b"racing", b"after"]
    assert d.metrics().workers_created == 2


async def test_idle_cleanup_runs_on_its_own_timer(
    monkeypatch: pytest.MonkeyPatch, fake_discovery: FakePeerDiscovery, fake_pool: FakeStreamPool
) -> None:
    loop = asyncio.get_running_loop()
    base = loop.time()
    clock = ManualClock()
    monkeypatch.setattr(loop, "time", lambda: base + clock.now)  # the loop's own clock, fast-forwarded
    d = Dispatcher(fake_discovery, None, fake_pool, worker_idle_timeout=10, worker_cleanup_interval=4)
    async with d:
        d.dispatch_packet("k", "10.0.0.1", b"x")
        await d.flush()
        clock.advance(8)
        await settle(3)
        assert d.worker_metrics()  # idle 8 s < 10 s, though cleanup ran twice
        clock.advance(4)
        await settle(3)
        assert d.worker_metrics() == {}
        assert d.check_accounting().workers_removed == 1


# --- 7. peer lookup -----------------------------------------------------------------------------------------


async def test_peer_lookup_runs_in_the_worker_and_never_blocks_dispatch(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery
) -> None:
    fake_discovery.gate.close()  # every lookup blocks
    assert all(dispatcher.dispatch_packet(f"10.0.0.{i}:1", f"10.0.0.{i}", b"x") for i in range(20))
    assert fake_discovery.calls == []  # dispatch itself looked nothing up
    await settle()
    assert fake_discovery.gate.waiting == 20  # all lookups in flight at once: no global lock
    assert dispatcher.dispatch_packet("10.0.0.1:1", "10.0.0.1", b"more")
    fake_discovery.gate.open()
    await dispatcher.flush()
    assert dispatcher.check_accounting().sent == 21


async def test_peer_lookup_is_cached_per_worker(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery
) -> None:
    for _ in range(3):
        dispatcher.dispatch_packet("k", "10.0.0.1", b"x")
        await dispatcher.flush()
    assert fake_discovery.calls == ["10.0.0.1"]


async def test_a_missing_peer_fails_the_packets_counted_no_peer(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery
) -> None:
    fake_discovery.default = None
    futures = [dispatcher.dispatch_packet_with_callback("k", "10.0.0.7", b"x") for _ in range(3)]
    dispatcher.dispatch_packet("k", "10.0.0.7", b"y")
    await dispatcher.flush()
    for f in futures:
        error = f.exception()
        assert isinstance(error, PeerNotFoundError)
        assert error.dest_ip == "10.0.0.7"
    m = dispatcher.check_accounting()
    assert m.failed_by_reason["no_peer"] == 4
    assert m.sent == 0
    assert dispatcher.worker_metrics()["k"].error_count == 4
    fake_discovery.set_peer("10.0.0.7", "late")  # not cached: the next batch finds it
    await dispatcher.dispatch_packet_with_callback("k", "10.0.0.7", b"z")


async def test_a_failing_discovery_is_a_service_error(
    dispatcher: Dispatcher, fake_discovery: FakePeerDiscovery
) -> None:
    fake_discovery.failures.fail_next(RuntimeError("discovery down"))
    f = dispatcher.dispatch_packet_with_callback("k", "10.0.0.7", b"x")
    await dispatcher.flush()
    error = f.exception()
    assert isinstance(error, ServiceError)
    assert (error.service, error.operation, error.dest_ip) == ("peer_discovery", "get_peer_id", "10.0.0.7")
    assert dispatcher.check_accounting().failed_by_reason["discovery_error"] == 1


# --- 8. stop ------------------------------------------------------------------------------------------------


async def test_stop_refuses_new_packets_while_draining(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    queued = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    stopping = asyncio.ensure_future(dispatcher.stop(timeout=60))
    await settle()
    assert dispatcher.state is DispatcherState.STOPPING
    assert not dispatcher.running
    assert dispatcher.dispatch_packet("k", "10.0.0.1", b"late") is False
    gate.open()  # the drain can finish well within the timeout
    await stopping
    assert queued.exception() is None
    m = dispatcher.check_accounting()
    assert (m.sent, m.rejected_by_reason["stopped"]) == (1, 1)


async def test_stop_fails_what_it_cannot_drain_in_time_and_releases_streams(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService, fake_pool: FakeStreamPool
) -> None:
    before = asyncio.all_tasks()
    fake_stream_service.gate_for("peer-1").close()
    other = dispatcher.dispatch_packet_with_callback("other", "10.0.0.2", b"queued")
    stuck = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"in flight")
    await settle()
    queued = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"queued")
    await dispatcher.stop(timeout=0.01)  # a short real bound: the stream never unblocks
    for f in (stuck, queued, other):
        assert isinstance(f.exception(), DispatcherStoppedError)
    assert fake_pool.outstanding == 0
    assert fake_pool.unhealthy_releases == 2  # the interrupted writes' streams
    assert asyncio.all_tasks() - before == set()
    m = dispatcher.check_accounting()
    assert m.discarded_by_reason["stopped"] == 3
    assert m.workers == 0


async def test_stop_closes_streams_it_created_itself(
    fake_discovery: FakePeerDiscovery, fake_stream_service: FakeStreamService
) -> None:
    d = Dispatcher(fake_discovery, fake_stream_service, None)
    async with d:
        for i in range(3):
            d.dispatch_packet(f"k{i}", "10.0.0.1", b"x")
        await d.flush()
    assert len(fake_stream_service.created) == 3
    assert all(s.closed for s in fake_stream_service.created)
    assert d.check_accounting().sent == 3


async def test_stop_is_idempotent_and_concurrent_calls_wait(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    f = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    first = asyncio.ensure_future(dispatcher.stop())
    second = asyncio.ensure_future(dispatcher.stop())
    await settle()
    assert not first.done()
    assert not second.done()
    gate.open()
    await asyncio.gather(first, second)
    await dispatcher.stop()
    assert f.exception() is None
    assert dispatcher.state is DispatcherState.STOPPED


async def test_no_task_is_left_after_stop(
    fake_discovery: FakePeerDiscovery, fake_pool: FakeStreamPool, fake_stream_service: FakeStreamService
) -> None:
    before = asyncio.all_tasks()
    d = Dispatcher(fake_discovery, None, fake_pool)
    await d.start()
    assert asyncio.all_tasks() == before  # a started, idle dispatcher owns no task
    fake_stream_service.gate_for("peer-1").close()
    for i in range(50):
        d.dispatch_packet(f"k{i}", "10.0.0.1", b"x")
    await settle()
    assert len(asyncio.all_tasks() - before) > 1  # one pump per stuck drain
    await d.stop(timeout=0)
    assert asyncio.all_tasks() == before
    d.check_accounting()


async def test_a_stream_raising_cancelled_error_is_a_write_failure(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool, fake_stream_service: FakeStreamService
) -> None:
    await dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"1")
    fake_stream_service.created[0].failures.fail_next(asyncio.CancelledError)
    f = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"2")
    await dispatcher.flush()
    assert isinstance(f.exception(), ServiceError)
    await dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"3")
    assert dispatcher.check_accounting().failed_by_reason["write_error"] == 1
