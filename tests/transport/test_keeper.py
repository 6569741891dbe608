"""ConnectionKeeper: connections to configured peers made at start and kept (keepalives, reconnects with a
doubling backoff), so the first packet to a peer never waits for a connection and a handshake.

Unit tests drive `run_once()` with an injected clock against a fake stream service; the end-to-end tests run
two real nodes over loopback TCP with TLS (key mode, the default of a real node)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

from vpn_packet.errors import NetworkError
from vpn_packet.node.node import Node
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.keeper import ConnectionKeeper
from vpn_packet.transport.pool import StreamPool


class Conn:
    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.closed = False
        self.keepalive_asks: list[float] = []

    async def write(self, packet: bytes) -> None:
        return None

    async def write_many(self, packets: Sequence[bytes]) -> None:
        return None

    def send_keepalive(self, idle_for: float) -> bool:
        self.keepalive_asks.append(idle_for)
        return True

    async def close(self) -> None:
        self.closed = True


class Service:
    def __init__(self) -> None:
        self.made: list[Conn] = []
        self.attempts: dict[str, int] = {}
        self.down: set[str] = set()

    async def create_stream(self, peer_id: str) -> Conn:
        self.attempts[peer_id] = self.attempts.get(peer_id, 0) + 1
        if peer_id in self.down:
            raise NetworkError(ConnectionRefusedError(), peer_id=peer_id, operation="connect")
        conn = Conn(peer_id)
        self.made.append(conn)
        return conn


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_connects_every_peer_at_start_and_keeps_one_connection() -> None:
    service, clock = Service(), Clock()
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: ["b", "c"], keepalive_interval=25, clock=clock)
    assert keeper.run_once() == 2
    await settle()
    assert sorted(c.peer_id for c in service.made) == ["b", "c"]
    assert keeper.metrics.opened == 2
    # Connected: later ticks open nothing, but ask the kept connection for a keepalive (it decides by its
    # own last write) and keep it from idle cleanup.
    clock.now += 1000
    assert keeper.run_once() == 0
    assert all(c.keepalive_asks == [25.0] for c in service.made)
    assert pool.run_cleanup() == 0
    # The peer closed it: the next tick replaces it.
    service.made[0].closed = True
    assert keeper.run_once() == 1
    await settle()
    assert len(service.made) == 3
    # A lease goes to the kept connection: no connection is made for the first packet.
    lease = await pool.get_stream("c")
    assert len(service.made) == 3
    assert pool.metrics().reused == 1
    await lease.close()
    await pool.stop()


async def test_a_peer_that_is_down_is_retried_with_a_doubling_backoff() -> None:
    service, clock = Service(), Clock()
    service.down.add("b")
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: ["b"], backoff=0.5, backoff_max=4, clock=clock, rng=lambda: 1.0)
    attempts_at: list[float] = []
    for _ in range(320):  # 40 s of ticks every 0.125 s (exact in binary: no rounding drift)
        if keeper.run_once():
            attempts_at.append(clock.now - 100.0)
        await settle()
        clock.now += 0.125
    gaps = [b - a for a, b in itertools.pairwise(attempts_at)]
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]  # doubling (rng 1.0: the top of the jitter range) ...
    assert set(gaps[4:]) == {4.0}  # ... up to the max: one attempt per backoff, never one per tick
    assert keeper.metrics.failures["b"] == len(attempts_at)
    # Back up: the next attempt succeeds and the backoff starts over.
    service.down.clear()
    clock.now += 4
    keeper.run_once()
    await settle()
    assert [c.peer_id for c in service.made] == ["b"]
    await pool.stop()


async def test_removed_peers_are_forgotten_and_stop_leaves_no_task() -> None:
    service, clock = Service(), Clock()
    service.down.add("b")
    peers = ["b"]
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: peers, clock=clock)
    await keeper.start()
    await settle()
    peers.clear()
    clock.now += 100
    assert keeper.run_once() == 0
    await keeper.stop()
    await pool.stop()
    assert service.attempts == {"b": 1}


async def test_two_nodes_connect_at_start_and_the_first_packet_uses_that_connection(tmp_path: Path) -> None:
    keys = key_securities(tmp_path, "node-a", "node-b")
    got: list[bytes] = []
    b = Node(
        keys["node-b"],
        ("127.0.0.1", 0),
        [Peer("node-a", "127.0.0.1:9", ["10.1.0.0/16"])],  # B never sends here: no connection kept
        lambda _peer, packets: got.extend(packets),
        keep_connections=False,
    )
    await b.start()
    a = Node(keys["node-a"], ("127.0.0.1", 0), [Peer("node-b", b.endpoint, ["10.2.0.0/16"])])
    try:
        await a.start()
        # Connected (TLS and the answered handshake) before any packet was sent.
        await wait_until(lambda: a.stream_service.connects == 1)
        assert a.dispatcher.metrics().accepted == 0
        packet = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1, 2, b"first")
        assert a.send(packet)
        await wait_until(lambda: got == [packet])
        assert a.stream_service.connects == 1  # the kept connection carried it
        # A keepalive on the quiet connection: the receiver skips it (no frame, no error), the stream goes on.
        (stream,) = a.pool.streams("node-b")
        assert stream.send_keepalive(0.0)  # type: ignore[attr-defined]
        second = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1, 2, b"second")
        assert a.send(second)
        await wait_until(lambda: len(got) == 2)
        assert got == [packet, second]
        assert b.receiver.peer_metrics()["node-a"].frames == 2
        assert b.receiver.metrics().protocol_errors == {}
        assert a.stream_service.connects == 1
    finally:
        await a.stop()
        await b.stop()


async def test_a_peer_that_connects_to_us_is_tried_at_once_whatever_its_backoff() -> None:
    service, clock = Service(), Clock()
    service.down.add("b")
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: ["b"], backoff=8, clock=clock)
    await keeper.start()
    await settle()
    assert service.attempts == {"b": 1}  # failed: the next attempt is about 8 s away
    service.down.clear()
    keeper.poke("b")  # b connected to us: it is up
    assert await keeper.settle(1.0) == (1, 1)
    assert service.attempts == {"b": 2}
    keeper.poke("b")  # connected already: nothing to do
    keeper.poke("x")  # not a configured peer
    await settle()
    assert service.attempts == {"b": 2}
    await keeper.stop()
    await pool.stop()


# --- warm, on demand, idle close (issue 21 item 8) ---------------------------------------------------------


async def test_only_the_first_warm_peers_are_connected_the_others_on_demand() -> None:
    """The warm rule: the first `warm_peers` of the node's order, whatever their traffic; no connection, no
    reconnect loop for the others."""
    service, clock = Service(), Clock()
    peers = [f"p{i}" for i in range(20)]
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: iter(peers), warm_peers=3, clock=clock)
    assert keeper.warm() == ["p0", "p1", "p2"]
    assert keeper.run_once() == 3
    await settle()
    assert sorted(service.attempts) == ["p0", "p1", "p2"]
    # A cold peer that is down costs nothing: no attempt, tick after tick.
    for _ in range(10):
        clock.now += 60
        keeper.run_once()
        await settle()
    assert sorted(service.attempts) == ["p0", "p1", "p2"]
    # Warm peers are never closed as idle, however long they are quiet.
    assert keeper.metrics.idle_closed == 0
    assert all(not c.closed for c in service.made)
    await pool.stop()


async def test_a_cold_peer_in_use_is_kept_then_closed_when_idle_keepalives_not_counting() -> None:
    service, clock = Service(), Clock()
    packets = {"warm": 0, "cold": 0}
    closed: list[list[str]] = []
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(
        pool,
        lambda: iter(["warm", "cold"]),
        traffic=packets.__getitem__,
        known=lambda p: p in ("warm", "cold"),
        on_idle_close=closed.append,
        warm_peers=1,
        keepalive_interval=25,
        idle_close=100,
        clock=clock,
    )
    await keeper.start()
    await settle()
    assert [c.peer_id for c in service.made] == ["warm"]
    # A worker asks for the cold peer (its first packet waits in the worker meanwhile): that is use.
    lease = await pool.get_stream("cold")
    assert keeper.in_use() == ["cold"]
    (cold,) = [c for c in service.made if c.peer_id == "cold"]
    # Traffic for a while: kept, and asked for keepalives like any kept connection.
    for _ in range(5):
        clock.now += 50
        packets["cold"] += 1
        keeper.run_once()
    assert not cold.closed
    assert keeper.in_use() == ["cold"]
    assert cold.keepalive_asks == [25.0] * 5
    # Quiet: only keepalives go out (the fake says it sent one every tick); they are not use.
    for step in (50, 49):
        clock.now += step
        keeper.run_once()
    assert cold.keepalive_asks == [25.0] * 7
    assert not cold.closed  # 99 s after its last packet: not yet
    clock.now += 1
    keeper.run_once()
    await settle()
    assert cold.closed
    assert lease.closed
    assert closed == [["cold"]]
    assert keeper.metrics.idle_closed == 1
    assert pool.metrics().closed_idle == 1
    assert keeper.in_use() == []
    assert pool.streams("cold") == []
    assert [c.peer_id for c in service.made if not c.closed] == ["warm"]  # warm: never closed
    await lease.close()  # the worker gives it back later: harmless
    await keeper.stop()
    await pool.stop()


async def test_a_peer_that_connects_to_us_is_in_use_and_connected_back() -> None:
    service, clock = Service(), Clock()
    pool = StreamPool(service, clock=clock)
    keeper = ConnectionKeeper(pool, lambda: iter(["a", "b"]), warm_peers=0, idle_close=100, clock=clock)
    await keeper.start()
    await settle()
    assert service.attempts == {}
    keeper.poke("b")
    await settle()
    assert service.attempts == {"b": 1}
    assert keeper.in_use() == ["b"]
    clock.now += 101  # and nothing since: idle
    keeper.run_once()
    await settle()
    assert service.made[0].closed
    assert keeper.in_use() == []
    await keeper.stop()
    await pool.stop()


async def test_a_cold_peer_first_packet_is_queued_then_delivered_and_idle_close_loses_nothing(
    tmp_path: Path,
) -> None:
    """Real nodes over loopback TLS. A cold peer (warm_peers = 0) has no connection; its first packet waits
    in its worker while one is made, then goes. Without traffic for `idle_close` (an injected clock: no
    waiting) the connection is closed gracefully, keepalives or not; the next packet opens a new one. Every
    packet is delivered and counted sent; nothing is lost in flight."""
    keys = key_securities(tmp_path, "node-a", "node-b")
    got: list[bytes] = []
    b = Node(
        keys["node-b"],
        ("127.0.0.1", 0),
        [Peer("node-a", "127.0.0.1:9", ["10.1.0.0/16"])],
        lambda _peer, packets: got.extend(packets),
        keep_connections=False,
    )
    await b.start()
    a = Node(
        keys["node-a"],
        ("127.0.0.1", 0),
        [Peer("node-b", b.endpoint, ["10.2.0.0/16"])],
        warm_peers=0,
        idle_close=30,
        keepalive_interval=1e-6,  # a keepalive at every tick: they must not keep the connection open
    )
    clock = Clock()
    assert a.keeper is not None
    a.keeper.clock = clock
    try:
        await a.start()
        assert await a.keeper.settle(0.1) == (0, 0)
        assert a.stream_service.connects == 0  # cold: not connected at start
        first = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1, 2, b"first")
        assert a.send(first)  # queued in its worker while the connection is made
        await wait_until(lambda: got == [first])
        assert a.stream_service.connects == 1
        assert a.keeper.in_use() == ["node-b"]
        (stream,) = a.pool.streams("node-b")
        # Ticks: the packet's acknowledgement is traffic; then only keepalives go out.
        for _ in range(3):
            clock.now += 10
            a.keeper.run_once()
        await wait_until(lambda: stream.keepalives >= 2)  # type: ignore[attr-defined]
        assert a.pool.streams("node-b") == [stream]
        clock.now += 21  # 31 s after the last packet
        a.keeper.run_once()
        await wait_until(lambda: stream.closed)
        assert a.pool.metrics().closed_idle == 1
        assert a.keeper.metrics.idle_closed == 1
        await wait_until(lambda: b.receiver.metrics().active_connections == 0)
        # The next packet opens a new connection; nothing was lost or failed on the way.
        second = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1, 2, b"second")
        assert a.send(second)
        await wait_until(lambda: got == [first, second])
        assert a.stream_service.connects == 2
        assert await a.flush(5)
        m = a.dispatcher.metrics()
        assert (m.accepted, m.sent, m.failed, m.rejected) == (2, 2, 0, 0)
        assert a.stream_service.peer_stats["node-b"].lost_in_flight == 0
        assert b.receiver.peer_metrics()["node-a"].frames == 2  # keepalives are not frames
    finally:
        await a.stop()
        await b.stop()
