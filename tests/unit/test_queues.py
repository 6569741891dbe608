"""The native per-destination queues (`vpn_packet._native.DestinationQueues`) and the dispatcher paths built
on them: `dispatch_buffer` (a TUN read, with or without virtio headers), streams that take framed buffers
(`write_framed`) beside those that take lists (`write_many`), and the bounds and counts of the queues. No
real time passes: loop iterations and `flush()` only."""

# ruff: noqa: F403, F405
from __future__ import annotations

import asyncio
import gc
import struct
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpn_packet._native import (
    OFFLOAD_FLAG,
    PUSH_FULL,
    PUSH_INVALID,
    PUSH_PRESSURE,
    PUSH_QUEUED,
    PUSH_READY,
    PUSH_UNKNOWN,
    VNET_HDR_LEN,
    DestinationQueues,
    destination_key_and_ip,
    encode_frames,
    framed_payload_bytes,
    framed_without,
    split_framed,
)
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import PacketError
from vpn_packet.testutil.fakes import (
    FakeFramedStream,
    FakePeerDiscovery,
    FakeStream,
    FakeStreamPool,
    FakeStreamService,
)
from vpn_packet.testutil.fixtures import *
from vpn_packet.testutil.packets import UDP, ipv4_packet, ipv6_packet


def _packet(dest: int, seq: int, size: int = 1) -> bytes:
    return ipv4_packet("10.0.0.1", f"10.9.0.{dest + 1}", UDP, 40000, 443, bytes([seq % 256]) * size)


def _key(packet: bytes) -> str:
    return destination_key_and_ip(packet)[0]


def _read(packets: list[bytes], headers: list[bytes] | None = None) -> tuple[bytes, array[int]]:
    """What a batched TUN read gives: the entries end to end and their lengths (u32)."""
    entries = packets if headers is None else [h + p for h, p in zip(headers, packets, strict=True)]
    return b"".join(entries), array("I", map(len, entries))


class _FramedService(FakeStreamService):
    """A stream service whose streams take framed buffers (`write_framed`), as the TCP stream does."""

    async def create_stream(self, peer_id: str) -> FakeFramedStream:
        self.calls.append(peer_id)
        stream = FakeFramedStream(peer_id, log=self.log)
        self.created.append(stream)
        return stream


# --- the native queues --------------------------------------------------------------------------------------


def test_a_batch_push_reports_new_keys_then_only_queues_that_became_ready() -> None:
    q = DestinationQueues(8)
    a, b = _packet(0, 0), _packet(1, 1)
    accepted, ready, new, pressure = q.push([a, b"\x45", b, a])
    assert (accepted, ready, pressure) == (0, [], False)  # new keys are provisional: not accepted yet
    assert new == [(_key(a), "10.9.0.1", 2, 0), (_key(b), "10.9.0.2", 1, 0)]
    assert q.rejected() == {"invalid_packet": 1, "queue_full": 0}
    assert q.add(_key(a)) is True  # adopted
    assert q.remove(_key(b)) == 1  # refused: its packet is the caller's to count
    assert _key(b) not in q
    assert q.push([a]) == (1, [], None, False)  # not empty before: nothing to report
    framed, count = q.take(_key(a))
    assert (split_framed(framed), count) == ([a, a, a], 3)
    assert framed == encode_frames([a, a, a])  # the wire framing, ready to write
    assert q.push([a]) == (1, [_key(a)], None, False)  # empty before: ready again


def test_the_bound_counts_packets_being_written() -> None:
    q = DestinationQueues(4)
    q.add("k")
    assert [q.push_keyed("k", b"x") for _ in range(3)] == [PUSH_READY, PUSH_QUEUED, PUSH_PRESSURE]
    assert q.take("k")[1] == 3  # in flight: room for one more
    assert [q.push_keyed("k", b"y") for _ in range(2)] == [PUSH_READY, PUSH_FULL]
    q.set_in_flight("k", 0)  # the write is over
    assert q.push_keyed("k", b"z") == PUSH_QUEUED
    assert (q.depth("k"), q.dropped("k"), q.rejected()["queue_full"]) == (2, 1, 1)
    assert q.push_keyed("other", b"x") == PUSH_UNKNOWN
    assert q.push_keyed("k", b"") == PUSH_INVALID
    assert q.push_keyed("k", bytes(65536)) == PUSH_INVALID
    assert q.rejected()["invalid_packet"] == 2


def test_a_provisional_overflow_counts_once_decided() -> None:
    q = DestinationQueues(2)
    packets = [_packet(0, i) for i in range(5)]
    _, _, new, pressure = q.push(packets)
    assert new == [(_key(packets[0]), "10.9.0.1", 2, 3)]
    assert pressure
    assert q.rejected()["queue_full"] == 0  # the caller may still refuse the key (worker limit)
    assert q.remove(_key(packets[0])) == 5
    q.push(packets)
    q.add(_key(packets[0]))
    assert (q.rejected()["queue_full"], q.dropped(_key(packets[0]))) == (3, 3)


def test_keyed_and_parsed_packets_of_one_key_share_a_queue_in_order() -> None:
    q = DestinationQueues(8)
    a = _packet(0, 0)
    q.add(_key(a))
    assert q.push_keyed(_key(a), b"raw") == PUSH_READY
    assert q.push([a])[0] == 1
    assert split_framed(q.peek(_key(a))) == [b"raw", a]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_a_buffer_push_is_a_list_push(as_bytes: bool) -> None:
    packets = [_packet(i % 3, i) for i in range(10)] + [b"\x60\x00"]
    buffer, lengths = _read(packets)
    by_list, by_buffer = DestinationQueues(4), DestinationQueues(4)
    expected = by_list.push(packets)
    assert by_buffer.push_buffer(buffer, lengths.tobytes() if as_bytes else lengths) == expected
    for key, *_ in expected[2] or ():
        assert by_buffer.peek(key) == by_list.peek(key)
    assert by_buffer.rejected() == by_list.rejected() == {"invalid_packet": 1, "queue_full": 0}


def test_lengths_beyond_the_buffer_raise_and_queue_nothing() -> None:
    q = DestinationQueues(4)
    a = _packet(0, 0)
    with pytest.raises(ValueError, match="buffer holds"):
        q.push_buffer(a, array("I", [len(a), 1]))
    with pytest.raises(ValueError, match="u32"):
        q.push_buffer(a, b"\x01\x02\x03")
    assert len(q) == 0
    assert q.rejected() == {"invalid_packet": 0, "queue_full": 0}


def test_virtio_headers_give_plain_or_offload_frames() -> None:
    q = DestinationQueues(8)
    a = _packet(0, 0, size=100)
    # A super-packet's header (gso_type TCPV4): it travels with the packet. A header asking only for a
    # checksum is completed by the sender instead (rust/core/src/queues.rs tests that).
    gso = bytes([1, 1, 40, 0, 0x40, 0x05, 20, 0, 16, 0])
    buffer, lengths = _read([a, a, b"\x45"], [bytes(VNET_HDR_LEN), gso, bytes(VNET_HDR_LEN)])
    buffer += b"short"  # an entry shorter than its header
    lengths.append(5)
    _, _, new, _ = q.push_buffer(buffer, lengths, vnet_header=True)
    assert new == [(_key(a), "10.9.0.1", 2, 0)]
    assert (q.offload_frames, q.rejected()["invalid_packet"]) == (1, 2)
    framed = q.peek(_key(a))
    offload = struct.pack("!I", (VNET_HDR_LEN + len(a)) | OFFLOAD_FLAG) + gso + a
    assert framed == encode_frames([a]) + offload
    assert split_framed(framed) == [a, a]  # a list stream gets the packets
    assert framed_payload_bytes(framed) == 2 * len(a) + VNET_HDR_LEN  # the header travels too
    assert framed_payload_bytes(framed, 1) == len(a)
    assert framed_without(framed, [0]) == (offload, 1)


def test_a_malformed_framed_buffer_raises() -> None:
    with pytest.raises(ValueError, match="truncated or malformed"):
        split_framed(b"\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="truncated or malformed"):  # an offload frame without its header
        framed_payload_bytes(b"\x80\x00\x00\x02ab")


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["push", "keyed", "take", "done"]), st.integers(0, 3), st.integers(0, 4)),
        max_size=60,
    ),
    capacity=st.integers(1, 5),
)
def test_the_queues_keep_order_bounds_and_counts(ops: list[tuple[str, int, int]], capacity: int) -> None:
    """Against a model: per key, the packets taken are the packets accepted, in order; a key holds at most
    `capacity` packets minus those in flight; every offered packet is accepted or counted by reason."""
    q = DestinationQueues(capacity)
    model: dict[str, list[bytes]] = {}
    in_flight: dict[str, int] = {}
    offered = accepted = seq = 0
    for op, dest, n in ops:
        key = _key(_packet(dest, 0))
        if op in ("push", "keyed"):
            packets = [_packet(dest, seq + i) for i in range(n)]
            seq += n
            offered += n
            if op == "push":
                got, _, new, _ = q.push(packets)
                for new_key, *_ in new or ():
                    got += q.depth(new_key)
                    q.add(new_key)
            else:
                q.add(key)
                got = sum(q.push_keyed(key, p) <= PUSH_PRESSURE for p in packets)
            accepted += got
            queue = model.setdefault(key, [])
            room = max(0, capacity - in_flight.get(key, 0) - len(queue))
            assert got == min(n, room)
            queue += packets[:got]
        elif op == "take":
            framed, count = q.take(key)
            assert split_framed(framed) == model.get(key, [])
            in_flight[key] = count if key in q else 0
            model[key] = []
        else:
            q.set_in_flight(key, 0)
            in_flight[key] = 0
        assert q.depth(key) == len(model.get(key, []))
        assert offered == accepted + sum(q.rejected().values())


# --- the dispatcher on the native queues --------------------------------------------------------------------


async def test_a_framed_stream_gets_each_batch_as_one_buffer() -> None:
    service = _FramedService()
    pool = FakeStreamPool(service)
    packets = [_packet(i % 2, i) for i in range(12)]
    async with Dispatcher(FakePeerDiscovery(default="p"), None, pool) as d:
        assert d.dispatch_batch(packets) == 12
        assert await d.flush(timeout=None)
        m = d.check_accounting()
    streams = [s for s in service.created if isinstance(s, FakeFramedStream)]
    assert len(streams) == len(service.created) == 2  # a stream per worker
    assert [(s.framed_calls, s.list_calls) for s in streams] == [(1, 0), (1, 0)]  # one buffer per destination
    for key in {_key(p) for p in packets}:
        assert [p for p in service.log if _key(p) == key] == [p for p in packets if _key(p) == key]
    assert all(data == encode_frames(split_framed(data)) for s in streams for data, _ in s.framed)
    assert (m.sent, m.bytes_sent) == (12, sum(map(len, packets)))


async def test_dispatch_buffer_routes_a_tun_read_like_dispatch_batch(
    dispatcher: Dispatcher, fake_pool: FakeStreamPool
) -> None:
    packets = [_packet(i % 3, i) for i in range(20)] + [b"\x45\x00"]
    buffer, lengths = _read(packets)
    assert dispatcher.dispatch_buffer(buffer, lengths) == 20
    assert await dispatcher.flush(timeout=None)
    written = fake_pool.written()
    for key in {_key(p) for p in packets[:-1]}:
        assert [p for p in written if _key(p) == key] == [p for p in packets[:-1] if _key(p) == key]
    m = dispatcher.check_accounting()
    assert (m.accepted, m.sent, m.rejected_by_reason["invalid_packet"]) == (20, 20, 1)


async def test_dispatch_buffer_keeps_no_python_object_per_packet(
    dispatcher_factory: DispatcherFactory, fake_stream_service: FakeStreamService
) -> None:
    """The queued packets live in the native queues: dispatching 2000 of them to two known destinations
    leaves no Python allocation behind per packet (a list of `bytes` would leave 2000 blocks)."""
    d = await dispatcher_factory(worker_buffer_size=5000)
    fake_stream_service.gate_for("peer-1").close()  # nothing is written: every packet stays queued
    packets = [_packet(i % 2, i) for i in range(2000)]
    assert d.dispatch_buffer(*_read(packets[:2])) == 2  # the two workers exist
    buffer, lengths = _read(packets)
    gc.collect()
    before = sys.getallocatedblocks()
    assert d.dispatch_buffer(buffer, lengths) == 2000
    assert sys.getallocatedblocks() - before < 100
    assert d.check_accounting().queued == 2002


async def test_dispatch_buffer_with_virtio_headers(dispatcher_factory: DispatcherFactory) -> None:
    service = _FramedService()
    d = await dispatcher_factory(pool_service=FakeStreamPool(service))
    a = _packet(0, 0, size=50)
    gso = bytes([1, 1, 40, 0, 0x40, 0x05, 20, 0, 16, 0])  # a super-packet's header (gso_type TCPV4)
    buffer, lengths = _read([a, a], [bytes(VNET_HDR_LEN), gso])
    assert d.dispatch_buffer(buffer, lengths, vnet_header=True) == 2
    assert await d.flush(timeout=None)
    ((data, count),) = service.created[0].framed
    assert count == 2
    assert data == encode_frames([a]) + struct.pack("!I", (VNET_HDR_LEN + len(a)) | OFFLOAD_FLAG) + gso + a
    assert d.check_accounting().bytes_sent == 2 * len(a) + VNET_HDR_LEN  # frame payloads, header included


async def test_dispatch_buffer_counts_a_stopped_dispatcher_and_rejects_bad_lengths(
    dispatcher_factory: DispatcherFactory,
) -> None:
    d = await dispatcher_factory()
    with pytest.raises(ValueError, match="buffer holds"):
        d.dispatch_buffer(b"\x45" * 20, array("I", [30]))
    await d.stop()
    buffer, lengths = _read([_packet(0, 0), _packet(1, 1)])
    assert d.dispatch_buffer(buffer, lengths) == 0
    m = d.check_accounting()
    assert (m.accepted, m.rejected_by_reason["stopped"]) == (0, 2)


async def test_a_packet_no_frame_can_carry_is_rejected_as_invalid(dispatcher: Dispatcher) -> None:
    assert dispatcher.dispatch_packet("k", "10.0.0.1", b"") is False
    assert dispatcher.dispatch_packet("k", "10.0.0.1", bytes(65536)) is False
    future = dispatcher.dispatch_packet_with_callback("k", "10.0.0.1", b"")
    assert isinstance(future.exception(), PacketError)
    m = dispatcher.check_accounting()
    assert (m.accepted, m.rejected_by_reason["invalid_packet"]) == (0, 3)


async def test_a_cancelled_future_skips_its_packet_in_a_framed_write() -> None:
    service = _FramedService()
    async with Dispatcher(FakePeerDiscovery(default="p"), None, FakeStreamPool(service)) as d:
        futures = [d.dispatch_packet_with_callback("k", "10.0.0.1", bytes([i]) * 3) for i in range(4)]
        futures[1].cancel()
        assert await d.flush(timeout=None)
        assert [f.result() for i, f in enumerate(futures) if i != 1] == [None] * 3
        m = d.check_accounting()
    ((data, count),) = service.created[0].framed
    assert (split_framed(data), count) == ([b"\0\0\0", b"\2\2\2", b"\3\3\3"], 3)
    assert (m.sent, m.discarded_by_reason["cancelled"]) == (3, 1)


async def test_a_list_stream_still_gets_lists(fake_pool: FakeStreamPool, dispatcher: Dispatcher) -> None:
    """Streams without `write_framed` (the `Stream` protocol) get `write_many` with the packets."""
    packets = [ipv6_packet("fd00::1", "fd00::2", UDP, 1, 2, bytes([i])) for i in range(3)]
    assert dispatcher.dispatch_batch(packets) == 3
    assert await dispatcher.flush(timeout=None)
    (stream,) = fake_pool.service.created  # type: ignore[attr-defined]
    assert isinstance(stream, FakeStream)
    assert not hasattr(stream, "write_framed")
    assert stream.batches == [packets]


async def test_workers_removed_take_their_queues_with_them(dispatcher: Dispatcher) -> None:
    """Idle cleanup and eviction remove the worker's native queue: nothing per destination outlives it."""
    queues = dispatcher._ctx.queues
    for i in range(5):
        dispatcher.dispatch(_packet(i, i))
    assert len(queues) == 5
    assert await dispatcher.flush(timeout=None)
    assert dispatcher.run_cleanup(now=dispatcher._ctx.clock() + 10 * dispatcher.worker_idle_timeout) == 5
    assert len(queues) == 0
    await asyncio.sleep(0)
