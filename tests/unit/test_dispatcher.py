"""Dispatcher API and lifecycle: names, signatures, states, dispatch forms, metrics."""

# ruff: noqa: F403, F405
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import pickle

import pytest

import vpn_packet
from vpn_packet import api
from vpn_packet.dispatcher import Dispatcher, DispatcherState, NewDispatcher
from vpn_packet.errors import DispatcherStoppedError, QueueFullError, WorkerLimitError
from vpn_packet.metrics import DispatcherMetrics, prometheus_samples
from vpn_packet.testutil.fakes import FakePeerDiscovery, FakeStream, FakeStreamPool, FakeStreamService
from vpn_packet.testutil.fixtures import *
from vpn_packet.testutil.packets import TCP, UDP, ipv4_packet, ipv6_packet
from vpn_packet.types import QueuedPacket
from vpn_packet.worker import Worker, WorkerMetrics


def test_public_names_are_exported() -> None:
    for name in ("Dispatcher", "NewDispatcher", "Worker", "WorkerMetrics", "QueuedPacket", "DispatcherState"):
        assert hasattr(vpn_packet, name), name
    assert vpn_packet.NewDispatcher is Dispatcher is NewDispatcher
    assert {"PeerDiscovery", "Stream", "StreamService", "StreamPoolService"} <= set(api.__all__)
    assert vpn_packet.QueuedPacket is QueuedPacket


def test_constructor_follows_the_contract() -> None:
    params = inspect.signature(Dispatcher).parameters
    positional = [
        "peer_discovery",
        "stream_service",
        "pool_service",
        "worker_idle_timeout",
        "worker_cleanup_interval",
        "worker_buffer_size",
        "resilience_service",
    ]
    assert list(params)[: len(positional)] == positional
    assert params["worker_idle_timeout"].default == 300.0
    assert params["worker_cleanup_interval"].default == 60.0
    assert params["worker_buffer_size"].default == 100
    assert params["resilience_service"].default is None
    assert params["max_workers"].kind is inspect.Parameter.KEYWORD_ONLY


def test_fakes_satisfy_the_protocols() -> None:
    service = FakeStreamService()
    assert isinstance(FakePeerDiscovery(), api.PeerDiscovery)
    assert isinstance(FakeStream(), api.Stream)
    assert isinstance(service, api.StreamService)
    assert isinstance(FakeStreamPool(service), api.StreamPoolService)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"worker_buffer_size": 0},
        {"max_workers": 0},
        {"max_consecutive_failures": 0},
        {"worker_idle_timeout": 0},
        {"coalesce": -1},
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, int]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"^{name}(:| must)"):  # the setting is named first
        Dispatcher(FakePeerDiscovery(), FakeStreamService(), None, **kwargs)  # type: ignore[arg-type]


def test_a_stream_source_is_required() -> None:
    with pytest.raises(ValueError, match="stream_service or a pool_service"):
        Dispatcher(FakePeerDiscovery(), None, None)


async def test_lifecycle_states_and_async_with(
    fake_discovery: FakePeerDiscovery, fake_pool: FakeStreamPool
) -> None:
    d = Dispatcher(fake_discovery, None, fake_pool)
    assert d.state is DispatcherState.NEW
    assert not d.running
    async with d as entered:
        assert entered is d
        assert d.state.value == "running"
        assert d.running
        await d.start()  # idempotent while running
        assert d.running
    assert d.state is DispatcherState.STOPPED
    assert not d.running
    with pytest.raises(DispatcherStoppedError, match="cannot be restarted"):
        await d.start()
    d.check_accounting()


async def test_stop_before_start_and_twice(
    fake_discovery: FakePeerDiscovery, fake_pool: FakeStreamPool
) -> None:
    d = Dispatcher(fake_discovery, None, fake_pool)
    await d.stop()
    await d.stop()
    assert d.state is DispatcherState.STOPPED
    assert d.dispatch_packet("k", "10.0.0.1", b"x") is False
    assert d.check_accounting().rejected_by_reason["stopped"] == 1


async def test_dispatch_before_start_is_refused_and_counted(
    fake_discovery: FakePeerDiscovery, fake_pool: FakeStreamPool, make_packet: PacketMaker
) -> None:
    d = Dispatcher(fake_discovery, None, fake_pool)
    assert d.dispatch_packet("k", "10.0.0.1", b"x") is False
    assert d.dispatch(make_packet("10.0.0.1", 80)) is False
    assert d.dispatch_batch([make_packet("10.0.0.1", 80)] * 3) == 0
    future = d.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    with pytest.raises(DispatcherStoppedError):
        await future
    m = d.check_accounting()
    assert m.rejected_by_reason["not_started"] == 6
    assert m.accepted == 0
    await d.stop()


async def test_dispatch_after_stop_never_hangs(dispatcher: Dispatcher, make_packet: PacketMaker) -> None:
    await dispatcher.stop()
    assert dispatcher.dispatch_packet("k", "10.0.0.1", b"x") is False
    assert dispatcher.dispatch(make_packet("10.0.0.1", 80)) is False
    assert dispatcher.dispatch_batch(iter([make_packet("10.0.0.1", 80)] * 2)) == 0
    with pytest.raises(DispatcherStoppedError):
        await dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"x")
    assert dispatcher.check_accounting().rejected_by_reason["stopped"] == 5


async def test_dispatch_packet_writes_to_the_peer(dispatcher: Dispatcher, fake_pool: FakeStreamPool) -> None:
    assert dispatcher.dispatch_packet("10.0.0.2:80", "10.0.0.2", b"a")
    await dispatcher.dispatch_packet_with_callback("10.0.0.2:80", "10.0.0.2", b"b")
    assert fake_pool.written("peer-1") == [b"a", b"b"]
    m = dispatcher.check_accounting()
    assert (m.accepted, m.sent, m.bytes_sent, m.queued) == (2, 2, 2, 0)


async def test_dispatch_keys_natively(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool, fake_discovery: FakePeerDiscovery
) -> None:
    v4 = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1234, 443)
    v6 = ipv6_packet("2001:db8::1", "2001:db8::2", UDP, 5000, 53)
    assert dispatcher.dispatch(v4)
    assert dispatcher.dispatch(v6)
    assert set(dispatcher.worker_metrics()) == {"10.0.0.2:443", "[2001:db8::2]:53"}
    await dispatcher.flush()
    assert sorted(fake_discovery.calls) == ["10.0.0.2", "2001:db8::2"]
    assert sorted(fake_pool.written()) == sorted([v4, v6])


async def test_dispatch_rejects_an_invalid_packet(dispatcher: Dispatcher) -> None:
    assert dispatcher.dispatch(b"") is False
    assert dispatcher.dispatch(b"\x45\x00") is False
    assert dispatcher.check_accounting().rejected_by_reason["invalid_packet"] == 2


async def test_dispatch_batch_groups_in_order_and_counts(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool, make_packet: PacketMaker
) -> None:
    a = [make_packet("10.0.0.2", 80, payload=bytes([i])) for i in range(5)]
    b = [make_packet("2001:db8::9", 53, payload=bytes([i])) for i in range(3)]
    batch = [a[0], b[0], b"", a[1], a[2], b[1], b"\x60", a[3], b[2], a[4]]
    assert dispatcher.dispatch_batch(batch) == 8
    await dispatcher.flush()
    written = fake_pool.written()
    assert [p for p in written if p in a] == a
    assert [p for p in written if p in b] == b
    m = dispatcher.check_accounting()
    assert m.rejected_by_reason["invalid_packet"] == 2
    assert m.sent == 8


async def test_dispatch_batch_overflow_is_counted_queue_full(
    dispatcher_factory: DispatcherFactory, fake_pool: FakeStreamPool, make_packet: PacketMaker
) -> None:
    d = await dispatcher_factory(worker_buffer_size=4)
    packets = [make_packet("10.0.0.2", 80, payload=bytes([i])) for i in range(10)]
    assert d.dispatch_batch(packets[:3]) == 3
    assert d.dispatch_batch(packets[3:]) == 1  # one slot left
    await d.flush()
    assert fake_pool.written() == packets[:4]
    m = d.check_accounting()
    assert m.rejected_by_reason["queue_full"] == 6
    assert d.worker_metrics()["10.0.0.2:80"].drop_count == 6


async def test_rejected_futures_carry_the_reason(dispatcher_factory: DispatcherFactory) -> None:
    d = await dispatcher_factory(worker_buffer_size=1, max_workers=1)
    first = d.dispatch_packet_with_callback("a", "10.0.0.1", b"1")
    with pytest.raises(QueueFullError) as full:
        await d.dispatch_packet_with_callback("a", "10.0.0.1", b"2")
    assert (full.value.sync_key, full.value.capacity) == ("a", 1)
    with pytest.raises(WorkerLimitError) as limit:
        await d.dispatch_packet_with_callback("b", "10.0.0.2", b"3")
    assert (limit.value.sync_key, limit.value.limit) == ("b", 1)
    await first
    d.check_accounting()


async def test_flush_waits_for_every_packet(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    gate = fake_stream_service.gate_for("peer-1")
    gate.close()
    futures = [dispatcher.dispatch_packet_with_callback(f"k{i}", "10.0.0.1", b"x") for i in range(3)]
    assert await dispatcher.flush(timeout=0) is False
    gate.open()
    assert await dispatcher.flush() is True
    assert all(f.done() and f.exception() is None for f in futures)


async def test_metrics_are_plain_data(dispatcher: Dispatcher) -> None:
    dispatcher.dispatch_packet("k", "10.0.0.1", b"abc")
    m = dispatcher.metrics()
    assert isinstance(m, DispatcherMetrics)
    assert dataclasses.is_dataclass(m)
    assert (m.accepted, m.queued, m.workers, m.busy_workers) == (1, 1, 1, 1)
    assert m.offered == 1
    assert m.accounting_ok
    assert pickle.loads(pickle.dumps(m)) == m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.accepted = 5  # type: ignore[misc]
    await dispatcher.flush()
    w = dispatcher.worker_metrics()["k"]
    assert isinstance(w, WorkerMetrics)
    assert (w.packet_count, w.byte_count, w.error_count, w.queue_depth, w.peer_id) == (1, 3, 0, 0, "peer-1")
    assert pickle.loads(pickle.dumps(w)) == w
    assert m.resilience == {} or "successes" in dispatcher.metrics().resilience


async def test_worker_inspection_and_reprs(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    fake_stream_service.gate_for("peer-1").close()
    dispatcher.dispatch_packet("k", "10.0.0.1", b"first")
    for _ in range(2):  # two loop iterations: the drain starts and blocks on the gate with "first" in flight
        await asyncio.sleep(0)
    future = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"second")
    (worker,) = dispatcher.workers()
    assert isinstance(worker, Worker)
    pending = worker.pending()
    assert [p.data for p in pending] == [b"first", b"second"]
    assert pending[1].done is future
    assert pending[0].sync_key == "k"
    assert "k" in repr(worker)
    assert "busy" in repr(worker)
    assert "running" in repr(dispatcher)
    assert "workers=1" in repr(dispatcher)
    fake_stream_service.gate_for("peer-1").open()
    await future


def test_prometheus_samples_cover_the_totals() -> None:
    m = DispatcherMetrics(
        state="running",
        workers=1,
        busy_workers=0,
        accepted=5,
        sent=2,
        failed=1,
        discarded=0,
        queued=0,
        rejected=1,
        in_flight=2,
        bytes_sent=20,
        rejected_by_reason={"queue_full": 1},
        failed_by_reason={"no_peer": 1},
        discarded_by_reason={},
        workers_created=1,
        workers_removed=0,
        workers_evicted=0,
        workers_recycled=0,
    )
    w = WorkerMetrics("k", "10.0.0.1", "p", 2, 20, 1, 1, 0, 0, 0, False, 1.0, 0.0, 0, 0)
    samples = {
        (name, tuple(labels.items())): value for name, _, labels, value in prometheus_samples(m, {"k": w})
    }
    assert m.accounting_ok
    assert samples[("vpn_packet_packets_sent_total", ())] == 2
    assert samples[("vpn_packet_packets_in_flight", ())] == 2  # written, not acknowledged yet
    assert samples[("vpn_packet_packets_rejected_total", (("reason", "queue_full"),))] == 1
    assert samples[("vpn_packet_packets_failed_total", (("reason", "no_peer"),))] == 1
    assert samples[("vpn_packet_worker_errors_total", (("sync_key", "k"),))] == 1


async def test_prometheus_collector(dispatcher: Dispatcher) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from vpn_packet.metrics import PrometheusCollector

    registry = prometheus_client.CollectorRegistry()
    registry.register(PrometheusCollector(dispatcher, per_worker=True))
    dispatcher.dispatch_packet("k", "10.0.0.1", b"abc")
    await dispatcher.flush()
    assert registry.get_sample_value("vpn_packet_packets_sent_total") == 1
    assert registry.get_sample_value("vpn_packet_worker_bytes_total", {"sync_key": "k"}) == 3
    text = prometheus_client.generate_latest(registry).decode()
    assert 'vpn_packet_packets_rejected_total{reason="queue_full"} 0.0' in text


async def test_a_lone_packet_is_not_held_back(dispatcher: Dispatcher, fake_pool: FakeStreamPool) -> None:
    dispatcher.dispatch_packet("k", "10.0.0.1", b"x")
    for _ in range(4):  # coalescing waits only while packets keep coming
        await asyncio.sleep(0)
    assert fake_pool.written() == [b"x"]


async def test_a_steady_producer_gets_coalesced_writes(
    dispatcher: Dispatcher, fake_stream_service: FakeStreamService
) -> None:
    for i in range(12):
        dispatcher.dispatch_packet("k", "10.0.0.1", bytes([i]))
        await asyncio.sleep(0)  # one loop iteration per packet: a steady producer
    await dispatcher.flush()
    (stream,) = fake_stream_service.created
    assert stream.written == [bytes([i]) for i in range(12)]
    assert len(stream.batches) < 12  # several packets per write_many


async def test_coalescing_stops_when_a_queue_is_half_full(dispatcher_factory: DispatcherFactory) -> None:
    d = await dispatcher_factory(worker_buffer_size=8, coalesce=1000)
    for i in range(100):
        assert d.dispatch_packet("k", "10.0.0.1", bytes([i]))
        await asyncio.sleep(0)  # one loop iteration per packet: a steady producer
    await d.flush()
    assert d.check_accounting().sent == 100


async def test_coalesce_zero_drains_at_once(
    dispatcher_factory: DispatcherFactory, fake_stream_service: FakeStreamService
) -> None:
    d = await dispatcher_factory(coalesce=0)
    for i in range(5):
        d.dispatch_packet("k", "10.0.0.1", bytes([i]))
        for _ in range(2):  # two loop iterations: this packet's drain runs before the next packet comes
            await asyncio.sleep(0)
    assert fake_stream_service.created[0].batches == [[bytes([i])] for i in range(5)]
