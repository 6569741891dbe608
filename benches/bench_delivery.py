"""Honest delivery (issue 11): what acknowledgements cost, and how fast a dead peer is noticed.

- node-to-node throughput with acknowledgements (the current code), 64-byte and 1400-byte IPv4/UDP packets to
  16 destinations, plaintext (insecure), in one process and one event loop: node A's `send_batch` until
  node B's sink has every packet, then until A counts every packet sent (acknowledged). The comparison with
  the code before acknowledgements (commit 861c860) is a one-off measurement recorded in benches/README.md.
- dead-peer detection: a receiving node in a subprocess (`vpn_packet.testutil.peer_process`) takes a
  continuous stream of packets; we SIGSTOP it and time until our `TcpStream` gives up on the connection (the
  ack watchdog resets it), `TRIALS` times for each ack_timeout (2 s, the default, and 0.5 s); `extra_info`
  holds p50 and p99 in seconds. The peer is resumed between trials (it discards the reset connection).

With `--benchmark-disable` (the CI smoke run) each benchmark runs once and detection takes one trial per
ack_timeout. Nothing here asserts a timing.

    python -m pytest benches/bench_delivery.py -s
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from vpn_packet.errors import NetworkError
from vpn_packet.node.node import Node
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.testutil.peer_process import PeerProcess, mark_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

SIZES = (64, 1400)
ROUND = {64: 200_000, 1400: 40_000}
BATCH = 1024
DESTINATIONS = 16
ROUNDS = 7
WINDOW = 8 * BATCH  # packets between A's dispatch and B's sink at most
A_NETS = ["10.1.0.0/16"]
B_NETS = ["10.2.0.0/16"]
ACK_TIMEOUTS = (2.0, 0.5)
TRIALS = 20


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _batches(size: int) -> list[list[bytes]]:
    templates = [
        ipv4_packet("10.1.0.1", f"10.2.0.{d + 1}", UDP, 4000, 53, bytes(size - 28))
        for d in range(DESTINATIONS)
    ]
    packets = [templates[i % DESTINATIONS] for i in range(ROUND[size])]
    return [packets[i : i + BATCH] for i in range(0, len(packets), BATCH)]


@pytest.mark.parametrize("size", SIZES)
def test_node_to_node_acknowledged(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, size: int
) -> None:
    """A round ends when B's sink has every packet and A counts every packet sent (acknowledged)."""
    benchmark.group = f"delivery {size}-byte packets"
    batches = _batches(size)
    received = [0]
    arrived = asyncio.Event()
    want = [0]

    def sink(peer_id: str, packets: list[bytes]) -> None:
        received[0] += len(packets)
        if received[0] >= want[0]:
            arrived.set()

    async def wait_received(count: int) -> None:
        want[0] = count
        arrived.clear()
        if received[0] < count:
            async with asyncio.timeout(60):
                await arrived.wait()

    async def pair() -> tuple[Node, Node]:
        b = Node(Security.insecure("node-b"), ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
        await b.start()
        a = Node(
            Security.insecure("node-a"),
            ("127.0.0.1", 0),
            [Peer("node-b", b.endpoint, B_NETS)],
            worker_buffer_size=WINDOW + BATCH,
        )
        await a.start()
        return a, b

    a, b = loop.run_until_complete(pair())

    async def round_() -> None:
        start = received[0]
        dispatched = 0
        for batch in batches:
            dispatched += a.send_batch(batch)
            if dispatched - (received[0] - start) > WINDOW:
                await wait_received(start + dispatched - WINDOW // 2)
            else:
                await asyncio.sleep(0)
        await wait_received(start + dispatched)
        assert await a.flush(60)  # every receipt resolved: counted sent only once acknowledged

    try:
        benchmark.pedantic(lambda: loop.run_until_complete(round_()), rounds=ROUNDS, warmup_rounds=1)
        m = a.metrics().dispatcher
        assert m.accounting_ok, m
        assert m.sent == m.accepted, m
    finally:
        loop.run_until_complete(a.stop())
        loop.run_until_complete(b.stop())
    benchmark.extra_info["packets_per_round"] = ROUND[size]
    if benchmark.stats is not None:
        pps = ROUND[size] / benchmark.stats.stats.median
        benchmark.extra_info["mpps"] = round(pps / 1e6, 3)
        benchmark.extra_info["gbps"] = round(pps * size * 8 / 1e9, 3)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


async def _detection_times(ack_timeout: float, trials: int) -> list[float]:
    peer = await PeerProcess.start(sender_prefixes=A_NETS)
    loop = asyncio.get_running_loop()
    templates = [ipv4_packet("10.1.0.1", f"10.2.0.{d + 1}", UDP, 4000, 53, bytes(172)) for d in range(4)]
    seq = [0] * len(templates)
    discovery = StaticPeerDiscovery([Peer("node-b", peer.endpoint, B_NETS)])
    service = TcpStreamService(discovery, Security.insecure("node-a"), ack_timeout=ack_timeout)
    times: list[float] = []

    async def write(stream: TcpStream) -> None:
        with contextlib.suppress(NetworkError):
            while not stream.closed:
                batch = []
                for i in range(256):
                    d = i % len(templates)
                    batch.append(mark_packet(templates[d], d, seq[d]))
                    seq[d] += 1
                await stream.write_many(batch)
                await asyncio.sleep(0)

    try:
        for _ in range(trials):
            stream = await service.create_stream("node-b")
            writer = asyncio.ensure_future(write(stream))
            try:
                async with asyncio.timeout(60):
                    while stream.acknowledged < 10_000:  # noqa: ASYNC110 - the stream has no ack event
                        await asyncio.sleep(0.001)
                    frozen_at = loop.time()
                    os.kill(peer.pid, signal.SIGSTOP)
                    await stream.wait_closed()  # the watchdog reset it
                    times.append(loop.time() - frozen_at)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                peer.resume()
    finally:
        await peer.close()
    return times


@pytest.mark.parametrize("ack_timeout", ACK_TIMEOUTS)
def test_dead_peer_detection(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, ack_timeout: float
) -> None:
    """Seconds from SIGSTOP of a peer under load to our stream giving up on it; p50 and p99 in extra_info."""
    benchmark.group = "dead-peer detection"
    trials = 1 if benchmark.disabled else TRIALS
    times: list[float] = []

    def run() -> None:
        times.extend(loop.run_until_complete(_detection_times(ack_timeout, trials)))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["ack_timeout_s"] = ack_timeout
    benchmark.extra_info["trials"] = len(times)
    benchmark.extra_info["p50_s"] = round(statistics.median(times), 4)
    benchmark.extra_info["p99_s"] = round(_percentile(times, 99), 4)
    benchmark.extra_info["max_s"] = round(max(times), 4)
    print(
        f"\ndead-peer detection, ack_timeout {ack_timeout:g}s: p50 {statistics.median(times):.3f}s "
        f"p99 {_percentile(times, 99):.3f}s over {len(times)} trials"
    )
