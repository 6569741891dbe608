"""Node: two real nodes on loopback (dispatcher, pool, TCP streams, receiver), a peer that disappears and
comes back, a peer that refuses our key, lifecycle and metrics.

The pair runs in key mode (TLS 1.3, each node trusting the other's public key: the default of a real node);
the tests that are not about the transport's security use `Security.insecure`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vpn_packet.errors import VpnPacketError, is_handshake_refused_error, is_network_error
from vpn_packet.node.node import Node
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.testutil.keys import identities, key_securities
from vpn_packet.testutil.packets import TCP, UDP, ipv4_packet, ipv6_packet
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStream

A_NETS = ["10.1.0.0/16", "fd00:a::/64"]
B_NETS = ["10.2.0.0/16", "fd00:b::/64"]
FAST = ResilienceConfig(initial_interval=0.001, max_interval=0.002, failure_threshold=1000, max_attempts=3)


@dataclass
class Collector:
    packets: list[bytes] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0

    def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        self.peers.add(peer_id)
        self.packets += packets
        if len(self.packets) >= self.want:
            self.event.set()

    async def wait_for(self, n: int) -> None:
        self.want = n
        if len(self.packets) < n:
            self.event.clear()
            async with asyncio.timeout(10):  # a safety net, not a threshold
                await self.event.wait()


def packet(dst: int, seq: int, *, v6: bool = False) -> bytes:
    payload = seq.to_bytes(4, "big")
    if v6:
        return ipv6_packet("fd00:a::1", f"fd00:b::{dst + 1:x}", TCP, 4000, 443, payload)
    return ipv4_packet("10.1.0.1", f"10.2.0.{dst + 1}", UDP, 4000, 53, payload)


async def make_b(sink: Collector, security: Security, port: int = 0) -> Node:
    node = Node(security, ("127.0.0.1", port), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
    await node.start()
    return node


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-a", "node-b")


@pytest.fixture
async def pair(keys: dict[str, Security]) -> AsyncIterator[tuple[Node, Node, Collector]]:
    sink = Collector()
    b = await make_b(sink, keys["node-b"])
    a = Node(keys["node-a"], ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)], None, resilience=FAST)
    await a.start()
    yield a, b, sink
    await a.stop()
    await b.stop()


async def test_packets_arrive_in_order_per_destination(pair: tuple[Node, Node, Collector]) -> None:
    a, b, sink = pair
    sent = [packet(d, s, v6=d % 3 == 0) for s in range(20) for d in range(40)]
    assert a.send(sent[0])
    assert a.send_batch(sent[1:]) == len(sent) - 1
    assert await a.flush(10)
    await sink.wait_for(len(sent))
    assert sink.peers == {"node-a"}
    per_dest: dict[bytes, list[int]] = {}
    for p in sink.packets:
        per_dest.setdefault(p[24:40] if p[0] >> 4 == 6 else p[16:20], []).append(
            int.from_bytes(p[-4:], "big")
        )
    assert all(seqs == list(range(20)) for seqs in per_dest.values())
    m = a.metrics()
    assert m.dispatcher.sent == len(sent)
    assert m.dispatcher.accounting_ok
    assert m.pool.created >= 1
    assert m.connects == m.pool.created
    assert m.refusals == {}
    assert a.stream_service.security.mode == "key"
    assert b.metrics().receiver.packets_delivered == len(sent)
    assert b.metrics().receiver.refused == {}
    assert "node-a" in repr(a)
    assert m.as_dict()["pool"]["created"] == m.pool.created


async def test_spoofed_source_is_dropped_by_the_receiver(pair: tuple[Node, Node, Collector]) -> None:
    a, b, sink = pair
    spoofed = ipv4_packet("10.9.0.1", "10.2.0.1", UDP, 1, 2, b"x")  # source outside node-a's prefixes
    assert a.send(spoofed)
    assert a.send(packet(0, 0))
    await a.flush(10)
    await sink.wait_for(1)
    for _ in range(100):  # let the receiver count what came in the same read
        if b.metrics().receiver.spoofed_dropped:
            break
        await asyncio.sleep(0)
    assert b.metrics().receiver.spoofed_dropped == 1
    assert sink.packets == [packet(0, 0)]


async def test_unknown_destination_fails_with_no_peer(pair: tuple[Node, Node, Collector]) -> None:
    a, _b, _sink = pair
    assert a.send(ipv4_packet("10.1.0.1", "192.0.2.1", UDP, 1, 2))
    await a.flush(10)
    assert a.metrics().dispatcher.failed_by_reason["no_peer"] == 1


async def test_peer_disappears_then_comes_back(keys: dict[str, Security]) -> None:
    """Packets to a peer that went away fail with a typed error; once it is back, the same worker sends on a
    new stream."""
    sink = Collector()
    b = await make_b(sink, keys["node-b"])
    port = b.address[1] if b.address else 0
    a = Node(keys["node-a"], ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)], None, resilience=FAST)
    await a.start()
    try:
        key_packet = packet(7, 0)
        assert a.send(key_packet)
        await a.flush(10)
        await sink.wait_for(1)
        (old,) = a.pool.streams("node-b")
        assert isinstance(old, TcpStream)

        await b.stop()  # the peer disappears mid-stream
        async with asyncio.timeout(10):
            await old.wait_closed()
        sync_key, dest_ip = "10.2.0.8:53", "10.2.0.8"
        future = a.dispatcher.dispatch_packet_with_callback(sync_key, dest_ip, packet(7, 1))
        with pytest.raises(VpnPacketError) as info:
            async with asyncio.timeout(10):
                await future
        assert is_network_error(info.value)
        failed = a.metrics().dispatcher.failed
        assert failed == 1

        sink2 = Collector()
        b = await make_b(sink2, keys["node-b"], port)  # back, on the same address
        future = a.dispatcher.dispatch_packet_with_callback(sync_key, dest_ip, packet(7, 2))
        async with asyncio.timeout(10):
            await future
        await sink2.wait_for(1)
        assert sink2.packets == [packet(7, 2)]
        (new,) = a.pool.streams("node-b")
        assert new is not old
        assert a.pool.metrics().created == 2
        workers = a.worker_metrics()
        assert workers[sync_key].packet_count == 2
        assert workers[sync_key].error_count == 1
    finally:
        await a.stop()
        await b.stop()


async def test_lifecycle_leaves_no_task_behind() -> None:
    before = asyncio.all_tasks()
    sink = Collector()
    b = await make_b(sink, Security.insecure("node-b"))
    async with Node(Security.insecure("node-a"), ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)]) as a:
        assert a.running
        assert a.send_batch([packet(d, 0) for d in range(10)]) == 10
        await a.flush(10)
        await sink.wait_for(10)
    assert not a.running
    await a.stop()  # idempotent
    with pytest.raises(RuntimeError, match="restarted"):
        await a.start()
    assert not a.send(packet(0, 1))
    assert a.metrics().dispatcher.rejected_by_reason["stopped"] == 1
    await b.stop()
    await asyncio.sleep(0)  # one loop iteration: the tasks the stops cancelled finish
    assert asyncio.all_tasks() - before == set()


def test_a_new_node_is_not_listening() -> None:
    node = Node(Security.insecure("a"))
    assert node.peer_id == "a"
    assert node.address is None
    with pytest.raises(RuntimeError, match="not listening"):
        _ = node.endpoint
    assert "new" in repr(node)


async def test_stop_sending_keeps_receiving(pair: tuple[Node, Node, Collector]) -> None:
    a, b, sink = pair
    await b.stop_sending()
    await b.stop_sending()  # idempotent
    assert a.send(packet(1, 0))  # b still receives
    await a.flush(10)
    await sink.wait_for(1)
    assert b.dispatcher.state.value == "stopped"
    assert b.receiver.running


def test_node_takes_its_knobs_from_one_tuning() -> None:
    """Every part of the node gets the value of the `Tuning` (the config's), not a default of its own."""
    from vpn_packet.tuning import DEFAULT_TUNING, NODE_RESILIENCE, Tuning

    node = Node(Security.insecure("a"))
    assert node.tuning == DEFAULT_TUNING
    assert node.dispatcher.worker_buffer_size == DEFAULT_TUNING.worker_buffer_size
    assert node.dispatcher.max_workers == DEFAULT_TUNING.max_workers
    assert node.resilience.config == NODE_RESILIENCE  # the config file's default too
    tuning = Tuning(
        worker_buffer_size=7,
        max_workers=9,
        write_timeout=1.5,
        hello_timeout=0.5,
        read_size=4096,
        receive_idle_timeout=30,
        max_pending=5,
        max_pending_per_source=3,
    )
    security = Security.insecure("a")
    node = Node(security, tuning=tuning, max_streams_per_peer=2)  # a field name changes that field
    assert node.tuning == Tuning(
        worker_buffer_size=7,
        max_workers=9,
        write_timeout=1.5,
        hello_timeout=0.5,
        read_size=4096,
        receive_idle_timeout=30,
        max_pending=5,
        max_pending_per_source=3,
        max_streams_per_peer=2,
    )
    assert (node.dispatcher.worker_buffer_size, node.dispatcher.max_workers) == (7, 9)
    assert node.stream_service.write_timeout == 1.5
    assert node.pool.max_streams_per_peer == 2
    assert (node.receiver.hello_timeout, node.receiver.read_size) == (0.5, 4096)
    assert (node.receiver.idle_timeout, node.receiver.max_pending, node.receiver.max_pending_per_source) == (
        30,
        5,
        3,
    )
    assert node.stream_service.security is security
    assert node.receiver.security is security
    with pytest.raises(TypeError):
        Node(security, turbo=True)
    with pytest.raises(ValueError, match="worker_buffer_size: 0 is out of range"):
        Node(security, worker_buffer_size=0)


async def test_a_peer_that_does_not_know_our_key_refuses_us(tmp_path: Path) -> None:
    """Node B has another key on file for node-a: A's packets fail with reason `refused` (not `sent`), A
    counts the refusal by B's reason, B counts it too, and nothing reaches B's sink."""
    ids = identities(tmp_path, "node-a", "node-b", "stranger")
    b_security = Security.with_keys(ids["node-b"], {"node-a": ids["stranger"].public_key_bytes})
    a_security = Security.with_keys(ids["node-a"], {"node-b": ids["node-b"].public_key_bytes})
    sink = Collector()
    b = await make_b(sink, b_security)
    a = Node(a_security, ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)], None, resilience=FAST)
    await a.start()
    try:
        future = a.dispatcher.dispatch_packet_with_callback("10.2.0.1:53", "10.2.0.1", packet(0, 0))
        with pytest.raises(VpnPacketError) as info:
            async with asyncio.timeout(10):  # a hang guard
                await future
        assert is_handshake_refused_error(info.value)
        m = a.metrics()
        assert m.dispatcher.sent == 0
        assert m.dispatcher.failed_by_reason["refused"] == 1
        assert m.refusals.get("key_mismatch", 0) >= 1
        assert m.pool.created == 0
        assert b.metrics().receiver.refused.get("key_mismatch", 0) >= 1
        assert b.metrics().receiver.packets_delivered == 0
        assert sink.packets == []
    finally:
        await a.stop()
        await b.stop()
