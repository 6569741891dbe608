"""Workers: batching with write_many, the ResilienceService they are given (breaker per peer, retry on a
fresh stream for retriable errors only), retries not counted as errors, recycling after consecutive failures
and what an idle worker costs."""

# ruff: noqa: F403, F405
from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import CircuitOpenError, NetworkError, ServiceError
from vpn_packet.resilience import CircuitState, ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import (
    FakePeerDiscovery,
    FakeStreamPool,
    FakeStreamService,
    ManualClock,
    RecordingSleep,
)
from vpn_packet.testutil.fixtures import *
from vpn_packet.testutil.memory import idle_worker_footprint
from vpn_packet.worker import Worker


def _resilience(clock: ManualClock, sleep: RecordingSleep, **config: float) -> ResilienceService:
    return ResilienceService(
        ResilienceConfig(**config),  # type: ignore[arg-type]
        clock=clock,
        sleep=sleep,
        random=random.Random(1).random,
    )


async def test_a_burst_is_written_with_one_write_many(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    for i in range(10):
        dispatcher.dispatch_packet("k", "10.0.0.1", bytes([i]))
    await dispatcher.flush()
    (stream,) = fake_stream_service.created
    assert stream.batches == [[bytes([i]) for i in range(10)]]


async def test_packets_queued_during_a_write_go_in_the_next_batch(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    dispatcher.dispatch_packet("k", "10.0.0.1", b"1")
    await settle()
    for data in (b"2", b"3", b"4"):
        dispatcher.dispatch_packet("k", "10.0.0.1", data)
    gate.open()
    await dispatcher.flush()
    assert fake_stream_service.created[0].batches == [[b"1"], [b"2", b"3", b"4"]]


async def test_breaker_per_peer_opens_and_rejects_without_writing(
    dispatcher_factory: DispatcherFactory,
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(manual_clock, recording_sleep, failure_threshold=2, max_attempts=1)
    d = await dispatcher_factory(resilience_service=resilience, max_consecutive_failures=100)
    fake_discovery.set_peer("10.0.0.66", "bad")
    await d.dispatch_packet_with_callback("10.0.0.1:1", "10.0.0.1", b"warm")
    fake_stream_service.write_failure_rate = 1.0  # streams created from now on (those of "bad") always fail
    failing = []
    for _ in range(2):
        failing.append(d.dispatch_packet_with_callback("10.0.0.66:1", "10.0.0.66", b"x"))
        await d.flush()
    attempts = sum(s.failures.calls for s in fake_stream_service.streams("bad"))
    rejected = d.dispatch_packet_with_callback("10.0.0.66:1", "10.0.0.66", b"x")
    healthy = d.dispatch_packet_with_callback("10.0.0.1:1", "10.0.0.1", b"y")
    await d.flush()
    assert isinstance(rejected.exception(), CircuitOpenError)
    assert sum(s.failures.calls for s in fake_stream_service.streams("bad")) == attempts == 2  # none tried
    assert healthy.exception() is None  # the other peer's breaker is closed
    assert resilience.breaker("bad").state is CircuitState.OPEN
    assert resilience.breaker("peer-1").state is CircuitState.CLOSED
    m = d.check_accounting()
    assert m.failed_by_reason["circuit_open"] == 1
    assert m.failed_by_reason["write_error"] == 2
    assert all(isinstance(f.exception(), NetworkError) for f in failing)


async def test_an_open_breaker_recovers_after_reset_timeout(
    dispatcher_factory: DispatcherFactory,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(
        manual_clock,
        recording_sleep,
        failure_threshold=1,
        max_attempts=1,
        reset_timeout=30,
        success_threshold=2,
    )
    d = await dispatcher_factory(resilience_service=resilience, max_consecutive_failures=100)
    fake_stream_service.write_failure_rate = 1.0
    first = d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    await d.flush()
    assert isinstance(first.exception(), NetworkError)
    fake_stream_service.write_failure_rate = 0.0
    early = d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    await d.flush()
    assert isinstance(early.exception(), CircuitOpenError)
    manual_clock.advance(30)
    for _ in range(2):  # two successful probes close it
        await d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    assert resilience.breaker("peer-1").state is CircuitState.CLOSED


async def test_retriable_errors_are_retried_on_a_fresh_stream(
    dispatcher_factory: DispatcherFactory,
    fake_stream_service: FakeStreamService,
    fake_pool: FakeStreamPool,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(
        manual_clock, recording_sleep, max_attempts=3, initial_interval=0.5, max_interval=4
    )
    d = await dispatcher_factory(resilience_service=resilience)
    await d.dispatch_packet_with_callback("k", "10.0.0.1", b"warm")
    (first,) = fake_stream_service.created
    first.failures.fail_next(ConnectionResetError)
    await d.dispatch_packet_with_callback("k", "10.0.0.1", b"retried")
    assert len(fake_stream_service.created) == 2
    assert first.written == [b"warm"]
    assert fake_stream_service.created[1].written == [b"retried"]
    assert (fake_pool.releases[-1][1], fake_pool.releases[-1][2]) == (first, False)  # released unhealthy
    assert len(recording_sleep.delays) == 1
    assert 0 <= recording_sleep.delays[0] <= 0.5
    w = d.worker_metrics()["k"]
    assert (w.packet_count, w.error_count, w.consecutive_failures) == (2, 0, 0)  # a retry is not an error
    assert resilience.metrics().retries == 1
    assert d.check_accounting().failed == 0


async def test_non_retriable_errors_are_not_retried(
    dispatcher_factory: DispatcherFactory,
    fake_stream_service: FakeStreamService,
    fake_pool: FakeStreamPool,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    d = await dispatcher_factory(
        resilience_service=_resilience(manual_clock, recording_sleep, max_attempts=5)
    )
    await d.dispatch_packet_with_callback("k", "10.0.0.1", b"warm")
    fake_stream_service.created[0].failures.fail_next(ValueError("corrupt frame"))
    futures = [d.dispatch_packet_with_callback("k", "10.0.0.1", bytes([i])) for i in range(3)]
    await d.flush()
    for f in futures:
        error = f.exception()
        assert isinstance(error, ServiceError)
        assert not error.retriable
        assert (error.service, error.operation, error.peer_id) == ("stream", "write_many", "peer-1")
    assert recording_sleep.delays == []
    assert len(fake_stream_service.created) == 1
    assert fake_pool.unhealthy_releases == 1
    assert d.worker_metrics()["k"].error_count == 3
    assert d.check_accounting().failed_by_reason["write_error"] == 3


async def test_configured_max_attempts_is_used(
    dispatcher_factory: DispatcherFactory,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(manual_clock, recording_sleep, max_attempts=4, failure_threshold=100)
    d = await dispatcher_factory(resilience_service=resilience)
    fake_stream_service.write_failure_rate = 1.0
    f = d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    await d.flush()
    error = f.exception()
    assert isinstance(error, NetworkError)
    assert error.connection_reset
    assert len(fake_stream_service.created) == 4  # one fresh stream per attempt
    assert len(recording_sleep.delays) == 3
    assert d.worker_metrics()["k"].error_count == 1  # one packet failed, whatever the attempts


async def test_a_retriable_stream_acquisition_failure_is_retried(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool
) -> None:
    fake_pool.failures.fail_next(TimeoutError)
    await dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    fake_pool.failures.fail_next(PermissionError("no"), times=5)
    f = dispatcher.dispatch_packet_with_callback("k2", "10.0.0.2", b"x")
    await dispatcher.flush()
    error = f.exception()
    assert isinstance(error, ServiceError)
    assert (error.service, error.operation) == (
        "stream_pool",
        "get_stream",
    )
    assert dispatcher.check_accounting().failed_by_reason["stream_error"] == 1


async def test_worker_is_recycled_after_consecutive_failures(
    dispatcher_factory: DispatcherFactory,
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(manual_clock, recording_sleep, max_attempts=1, failure_threshold=100)
    d = await dispatcher_factory(resilience_service=resilience, max_consecutive_failures=3)
    fake_stream_service.write_failure_rate = 1.0
    for i in range(3):
        d.dispatch_packet("k", "10.0.0.1", b"x")
        await d.flush()
        assert d.worker_metrics()["k"].recycle_count == (1 if i == 2 else 0)
    w = d.worker_metrics()["k"]
    assert (w.consecutive_failures, w.peer_id, w.error_count) == (0, None, 3)
    fake_stream_service.write_failure_rate = 0.0
    d.dispatch_packet("k", "10.0.0.1", b"x")
    await d.flush()
    assert fake_discovery.calls == ["10.0.0.1", "10.0.0.1"]  # looked up again after the recycle
    assert d.metrics().workers_recycled == 1


async def test_recycling_counts_consecutive_failures_not_cumulative_ones(
    dispatcher_factory: DispatcherFactory,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    resilience = _resilience(manual_clock, recording_sleep, max_attempts=1, failure_threshold=100)
    d = await dispatcher_factory(resilience_service=resilience, max_consecutive_failures=2)
    for i in range(20):
        fake_stream_service.write_failure_rate = 1.0 if i % 2 else 0.0
        for s in fake_stream_service.created:
            s.failures.fail_randomly(fake_stream_service.write_failure_rate, ConnectionResetError)
        d.dispatch_packet("k", "10.0.0.1", b"x")
        await d.flush()
    w = d.worker_metrics()["k"]
    assert w.error_count == 10
    assert w.packet_count == 10
    assert w.recycle_count == 0


async def test_streams_from_the_stream_service_are_closed_when_they_fail(
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
    manual_clock: ManualClock,
    recording_sleep: RecordingSleep,
) -> None:
    d = Dispatcher(
        fake_discovery,
        fake_stream_service,
        None,
        resilience_service=_resilience(manual_clock, recording_sleep),
    )
    async with d:
        await d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
        fake_stream_service.created[0].failures.fail_next(BrokenPipeError)
        await d.dispatch_packet_with_callback("k", "10.0.0.1", b"y")
        await settle()
        assert [s.closed for s in fake_stream_service.created] == [True, False]
    assert all(s.closed for s in fake_stream_service.created)
    d.check_accounting()


def test_worker_is_a_plain_object() -> None:
    assert "__dict__" not in dir(Worker)
    assert not asyncio.iscoroutinefunction(Worker.__init__)


class _SharedStream:
    async def write(self, packet: bytes) -> None:
        return None

    async def write_many(self, packets: Sequence[bytes]) -> None:
        return None

    async def close(self) -> None:
        return None


class _SharedPool:
    """One stream per peer, shared: a worker then owns nothing but its own state."""

    def __init__(self) -> None:
        self.stream = _SharedStream()

    async def get_stream(self, peer_id: str) -> _SharedStream:
        return self.stream

    def release_stream(self, peer_id: str, stream: object, healthy: bool) -> None:
        return None


async def test_an_idle_worker_is_small_and_holds_no_task() -> None:
    """Counted structurally (objects only the worker references, `sys.getsizeof`), not by tracemalloc, whose
    figure depends on the Python version's allocator: the worker itself, its empty queue, its two key strings
    and its two timestamps; no task, future, coroutine or packet; under 1 KiB with its table slots."""
    async with Dispatcher(FakePeerDiscovery(default="p"), None, _SharedPool()) as d:
        footprint = await idle_worker_footprint(d, 2000)
        assert d.check_accounting().workers == 2001
    assert footprint.workers == 2000
    assert footprint.tasks_added == 0
    assert footprint.owned_types <= {"Worker", "list", "str", "float"}, footprint.owned_types
    assert footprint.max_objects <= 6, footprint
    assert footprint.bytes_per_worker <= 1024, footprint


class _TimeoutStream:
    """A stream whose writes use `asyncio.timeout`: the first one times out while suspended."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.calls = 0
        self.never = asyncio.Event()

    async def write(self, packet: bytes) -> None:
        await self.write_many([packet])

    async def write_many(self, packets: Sequence[bytes]) -> None:
        self.calls += 1
        async with asyncio.timeout(0 if self.calls == 1 else 60):
            if self.calls == 1:
                await self.never.wait()  # suspends; the timeout (due at once) cancels it
            self.written.extend(packets)

    async def close(self) -> None:
        return None


async def test_streams_may_use_asyncio_timeout_inside_drains(
    fake_discovery: FakePeerDiscovery, manual_clock: ManualClock, recording_sleep: RecordingSleep
) -> None:
    """Drains run inside a pump task (never in a bare callback), so `asyncio.timeout` works in a stream,
    whether the write completes at once or times out while suspended."""
    stream = _TimeoutStream()

    class Pool:
        async def get_stream(self, peer_id: str) -> _TimeoutStream:
            return stream

        def release_stream(self, peer_id: str, s: object, healthy: bool) -> None:
            return None

    d = Dispatcher(
        fake_discovery, None, Pool(), resilience_service=_resilience(manual_clock, recording_sleep)
    )
    async with d:
        await d.dispatch_packet_with_callback("k", "10.0.0.1", b"1")  # timed out once, retried
        await d.dispatch_packet_with_callback("k", "10.0.0.1", b"2")
    assert stream.written == [b"1", b"2"]
    assert stream.calls == 3
    assert d.resilience.metrics().retries == 1
    d.check_accounting()
