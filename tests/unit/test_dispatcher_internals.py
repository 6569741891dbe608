"""The dispatcher's internals that the contract tests cannot see: the single enqueue path (every dispatch form
admits, rejects and counts alike), the background-task helper shared with the stream pool, the one stream
close helper, and the one-way dependency between `metrics` and `worker`. No real time passes: loop
iterations, events and zero deadlines only."""

# ruff: noqa: F403, F405
from __future__ import annotations

import ast
import asyncio
import inspect
import logging
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vpn_packet.metrics
import vpn_packet.worker
from vpn_packet import tuning
from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.metrics import WorkerMetrics
from vpn_packet.tasks import TaskSet, close_quietly
from vpn_packet.testutil.fakes import FakePeerDiscovery, FakeStreamPool, FakeStreamService, ManualClock
from vpn_packet.testutil.fixtures import *
from vpn_packet.testutil.packets import UDP, ipv4_packet

# --- one enqueue path ---------------------------------------------------------------------------------------

FORMS = ("dispatch_packet", "dispatch_packet_with_callback", "dispatch", "dispatch_batch", "dispatch_buffer")


def _packet(dest: int, seq: int) -> bytes:
    return ipv4_packet("10.0.0.1", f"10.9.0.{dest + 1}", UDP, 40000, 443, bytes([seq % 256]))


def _state(d: Dispatcher) -> tuple[object, ...]:
    m = d.metrics()
    queues = {w.sync_key: [p.data for p in w.pending()] for w in d.workers()}
    drops = {w.sync_key: w.drop_count for w in d.workers()}
    return m.accepted, m.queued, m.rejected_by_reason, m.workers, m.workers_evicted, queues, drops


async def _offer(form: str, bursts: list[list[int]], *, buffer: int, max_workers: int) -> tuple[object, ...]:
    """Offer the same packets through one form, without letting the loop run: what is admitted, rejected and
    counted depends only on the enqueue rules."""
    pool = FakeStreamPool(FakeStreamService())
    d = Dispatcher(FakePeerDiscovery(), None, pool, worker_buffer_size=buffer, max_workers=max_workers)
    await d.start()
    futures = []
    seq = 0
    for burst in bursts:
        packets = []
        for dest in burst:
            packets.append(_packet(dest, seq))
            seq += 1
        if form == "dispatch_batch":
            d.dispatch_batch(packets)
            continue
        if form == "dispatch_buffer":
            d.dispatch_buffer(b"".join(packets), array("I", map(len, packets)))
            continue
        for packet in packets:
            if form == "dispatch":
                d.dispatch(packet)
            else:
                key, ip = destination_key_and_ip(packet)
                if form == "dispatch_packet":
                    d.dispatch_packet(key, ip, packet)
                else:
                    futures.append(d.dispatch_packet_with_callback(key, ip, packet))
    state = _state(d)
    d.check_accounting()
    await d.stop(timeout=0)
    assert all(f.done() for f in futures)
    return state


@settings(max_examples=60, deadline=None)
@given(
    bursts=st.lists(st.lists(st.integers(0, 5), max_size=12), max_size=6),
    buffer=st.integers(1, 6),
    max_workers=st.integers(1, 4),
)
def test_every_dispatch_form_admits_rejects_and_counts_alike(
    bursts: list[list[int]], buffer: int, max_workers: int
) -> None:
    # dispatch_batch and dispatch_buffer take a burst key by key (in order of first appearance), the other
    # forms packet by packet: make each burst's packets to one destination consecutive so that all see the
    # same sequence.
    bursts = [sorted(burst, key=burst.index) for burst in bursts]
    results = {
        form: asyncio.run(_offer(form, bursts, buffer=buffer, max_workers=max_workers)) for form in FORMS
    }
    assert len(set(map(repr, results.values()))) == 1, results


async def test_rejected_futures_name_their_reason(dispatcher_factory: DispatcherFactory) -> None:
    d = await dispatcher_factory(worker_buffer_size=1, max_workers=1)
    assert d.dispatch_packet("a", "10.0.0.1", b"1")
    full = d.dispatch_packet_with_callback("a", "10.0.0.1", b"2")
    limited = d.dispatch_packet_with_callback("b", "10.0.0.2", b"3")  # "a" is busy: nothing to evict
    assert type(full.exception()).__name__ == "QueueFullError"
    assert type(limited.exception()).__name__ == "WorkerLimitError"
    await d.flush()
    assert d.check_accounting().rejected_by_reason["queue_full"] == 1


async def test_a_lone_packet_drains_after_one_coalescing_tick(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool
) -> None:
    """The wake-up counts the packet that caused it as seen: the first tick finds nothing more and starts the
    pump (iteration 1), which writes the packet (iteration 2)."""
    dispatcher.dispatch_packet("k", "10.0.0.1", b"x")
    assert dispatcher.dispatch_batch([]) == 0  # an empty batch changes nothing
    await asyncio.sleep(0)  # iteration 1: the coalescing tick
    await asyncio.sleep(0)  # iteration 2: the pump
    assert fake_pool.written() == [b"x"]


async def test_a_batch_group_that_overflows_keeps_its_oldest_packets(
    dispatcher_factory: DispatcherFactory, fake_pool: FakeStreamPool
) -> None:
    d = await dispatcher_factory(worker_buffer_size=3)
    packets = [_packet(0, i) for i in range(5)]
    assert d.dispatch_batch(packets) == 3
    await d.flush()
    assert fake_pool.written() == packets[:3]
    m = d.check_accounting()
    assert m.rejected_by_reason["queue_full"] == 2
    assert d.worker_metrics()[destination_key_and_ip(packets[0])[0]].drop_count == 2


# --- TaskSet ------------------------------------------------------------------------------------------------


async def test_a_task_set_holds_its_tasks_until_they_end() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    task = tasks.spawn(release.wait())  # type: ignore[arg-type]
    assert len(tasks) == 1
    release.set()
    assert await tasks.wait()
    assert task.done()
    assert len(tasks) == 0


async def test_a_task_set_cancels_and_waits() -> None:
    tasks = TaskSet()
    never = asyncio.Event()
    spawned = [tasks.spawn(never.wait()) for _ in range(3)]  # type: ignore[arg-type]
    await asyncio.sleep(0)  # one loop iteration: the tasks start waiting
    tasks.cancel()
    assert await tasks.wait()
    assert all(t.cancelled() for t in spawned)
    assert len(tasks) == 0


async def test_close_returns_at_once_when_the_tasks_finish(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()
    done = asyncio.Event()

    async def quick() -> None:
        done.set()

    tasks.spawn(quick())
    await tasks.close(grace=3600)  # would hang the test if close waited out the grace period
    assert done.is_set()
    assert "ignored cancellation" not in caplog.text


async def test_a_failing_background_task_is_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet()

    async def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="vpn_packet.tasks"):
        tasks.spawn(boom())
        await tasks.wait()
        await asyncio.sleep(0)  # one loop iteration: the done callback runs
    assert "background task" in caplog.text
    assert "boom" in caplog.text
    assert len(tasks) == 0


# --- close_quietly ------------------------------------------------------------------------------------------


class _Closable:
    def __init__(self, close: Callable[[], object]) -> None:
        self._close = close
        self.aborted = False

    async def write(self, packet: bytes) -> None:  # pragma: no cover - not used
        return None

    async def write_many(self, packets: object) -> None:  # pragma: no cover - not used
        return None

    async def close(self) -> None:
        result = self._close()
        if inspect.isawaitable(result):
            await result

    def abort(self) -> None:
        self.aborted = True


async def test_close_quietly_swallows_a_failed_close_and_aborts() -> None:
    def fail() -> None:
        raise OSError("reset")

    stream = _Closable(fail)
    await close_quietly(stream)  # type: ignore[arg-type]
    assert stream.aborted


async def test_close_quietly_gives_up_on_a_close_past_its_deadline() -> None:
    stream = _Closable(asyncio.Event().wait)  # a close that never completes
    await close_quietly(stream, close_timeout=0)  # type: ignore[arg-type]  # a deadline already past
    assert stream.aborted


async def test_close_quietly_leaves_a_clean_close_alone() -> None:
    stream = _Closable(lambda: None)
    await close_quietly(stream, close_timeout=3600)  # type: ignore[arg-type]
    assert not stream.aborted


# --- one-way dependency -------------------------------------------------------------------------------------


def _package_imports(module: object) -> set[str]:
    source = Path(inspect.getfile(module)).read_text()  # type: ignore[arg-type]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("vpn_packet")}


def test_metrics_depends_on_nothing_of_the_package() -> None:
    assert _package_imports(vpn_packet.metrics) == set()
    assert "vpn_packet.metrics" in _package_imports(vpn_packet.worker)


def test_worker_metrics_is_one_class_reachable_from_both_modules() -> None:
    assert vpn_packet.worker.WorkerMetrics is WorkerMetrics
    assert "WorkerMetrics" in vpn_packet.worker.__all__


async def test_a_lone_device_read_is_written_at_the_next_loop_iteration() -> None:
    """`write_lone_now` (a node's TUN reads): after a quiet spell the read's packets are written at the next
    loop iteration (the pump starts at once, no coalescing tick); reads that follow each other closely
    coalesce as usual (a tick first, then the pump)."""
    clock = ManualClock()
    pool = FakeStreamPool(FakeStreamService())
    d = Dispatcher(FakePeerDiscovery(default="peer"), None, pool, clock=clock)
    await d.start()
    warm = [_packet(0, 0), _packet(1, 0)]  # the workers and their streams exist
    d.dispatch_buffer(b"".join(warm), array("I", map(len, warm)))
    await d.flush()
    clock.advance(1.0)
    first = [_packet(0, 1), _packet(1, 2)]
    d.dispatch_buffer(b"".join(first), array("I", map(len, first)), write_lone_now=True)
    await asyncio.sleep(0)  # one iteration: the pump
    assert set(first) <= set(pool.written())
    clock.advance(tuning.COALESCE_QUIET / 10)  # the next read comes quickly: a flood, coalesced
    close = [_packet(0, 3)]
    d.dispatch_buffer(b"".join(close), array("I", map(len, close)), write_lone_now=True)
    await asyncio.sleep(0)  # the coalescing tick: not written yet
    assert close[0] not in pool.written()
    await asyncio.sleep(0)  # the pump
    assert close[0] in pool.written()
    clock.advance(1.0)
    late = [_packet(0, 4)]
    d.dispatch_buffer(b"".join(late), array("I", map(len, late)))  # without write_lone_now: coalesced
    await asyncio.sleep(0)
    assert late[0] not in pool.written()
    await d.flush()
    d.check_accounting()
    await d.stop()
