"""Node-to-node throughput over loopback TCP, beside raw asyncio sockets moving the same framed bytes.

Everything runs in one process and one event loop (sender and receiver compete for the same core, as they
would not on two machines). For 64-byte and 1400-byte IPv4/UDP packets to 16 destinations, one round moves
`ROUND[size]` packets, handed over in batches of `BATCH`:

- raw asyncio sockets: the batches pre-encoded (length-prefixed frames, hello first), a plain
  `asyncio.Protocol` writer doing `transport.write(buffer)` with flow control, and a reader protocol that
  only counts bytes. The floor of what any framed transport in asyncio costs: no parsing, no objects.
- vpn_packet stream: `TcpStream.write_many(batch)` (native framing, one write per batch) into a `Receiver`
  (native decoding, anti-spoofing filter, batches to a sink that counts packets).
- vpn_packet node-to-node: `Node.send_batch(batch)` on node A (native grouping by destination, per-destination
  workers, stream pool, TCP) until node B's sink has received every packet: end to end.

A round is timed from the first write until the receiving side has counted everything. `test_zz_summary`
prints Mpps, Gbit/s (of IP packet bytes) and the ratios to raw sockets. Nothing here asserts a timing.

    python -m pytest benches/bench_transport.py -s --benchmark-group-by=group
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from vpn_packet.node.node import Node
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.framing import encode_frames, encode_hello
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService

SIZES = (64, 1400)
ROUND = {64: 200_000, 1400: 40_000}
BATCH = 1024
DESTINATIONS = 16
ROUNDS = 7
WINDOW = 8 * BATCH  # node-to-node: packets in flight at most
A_NETS = ["10.1.0.0/16"]
B_NETS = ["10.2.0.0/16"]

_results: dict[tuple[int, str], float] = {}  # (size, name) -> packets per second (median round)


def _packets(size: int) -> list[bytes]:
    """One round of packets of `size` bytes, round-robin over the destinations."""
    templates = [
        ipv4_packet("10.1.0.1", f"10.2.0.{d + 1}", UDP, 4000, 53, bytes(size - 28))
        for d in range(DESTINATIONS)
    ]
    assert all(len(t) == size for t in templates)
    return [templates[i % DESTINATIONS] for i in range(ROUND[size])]


def _batches(packets: list[bytes]) -> list[list[bytes]]:
    return [packets[i : i + BATCH] for i in range(0, len(packets), BATCH)]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _record(benchmark: BenchmarkFixture, size: int, name: str) -> None:
    benchmark.extra_info["packets_per_round"] = ROUND[size]
    if benchmark.stats is not None:
        pps = ROUND[size] / benchmark.stats.stats.median
        benchmark.extra_info["mpps"] = round(pps / 1e6, 3)
        benchmark.extra_info["gbps"] = round(pps * size * 8 / 1e9, 3)
        _results[(size, name)] = pps


def _bench(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    round_: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    benchmark.pedantic(lambda: loop.run_until_complete(round_()), rounds=ROUNDS, warmup_rounds=1)


class _Target:
    """What the receiving side counted, and an event set when a round's target is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.event = asyncio.Event()

    def expect(self, n: int) -> None:
        self.target = self.count + n
        self.event.clear()

    def add(self, n: int) -> None:
        self.count += n
        if self.count >= self.target:
            self.event.set()

    async def wait(self) -> None:
        async with asyncio.timeout(60):
            await self.event.wait()

    async def wait_for(self, count: int) -> None:
        """Wait until at least `count` were counted (then the round's target applies again)."""
        target = self.target
        self.target = count
        self.event.clear()
        if self.count < count:
            await self.wait()
        self.target = target
        self.event.clear()
        if self.count >= target:
            self.event.set()


# --- raw asyncio sockets ---------------------------------------------------------------------------------


class _ByteCounter(asyncio.Protocol):
    def __init__(self, target: _Target) -> None:
        self.target = target

    def data_received(self, data: bytes) -> None:
        self.target.add(len(data))


class _RawWriter(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.resumed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def pause_writing(self) -> None:
        self.resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)
        self.resumed = None


@pytest.mark.parametrize("size", SIZES)
def test_raw_asyncio_sockets(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, size: int) -> None:
    benchmark.group = f"transport {size}-byte packets"
    buffers = [encode_frames(batch) for batch in _batches(_packets(size))]
    total = sum(map(len, buffers))
    target = _Target()

    async def setup() -> tuple[asyncio.Server, asyncio.Transport, _RawWriter]:
        server = await loop.create_server(lambda: _ByteCounter(target), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, writer = await loop.create_connection(_RawWriter, "127.0.0.1", port)
        assert isinstance(transport, asyncio.Transport)
        target.expect(len(encode_hello("node-a")))
        transport.write(encode_hello("node-a"))
        await target.wait()
        return server, transport, writer

    server, transport, writer = loop.run_until_complete(setup())

    async def round_() -> None:
        target.expect(total)
        for buffer in buffers:
            transport.write(buffer)
            if writer.resumed is not None:
                await writer.resumed
        await target.wait()

    try:
        _bench(benchmark, loop, round_)
    finally:
        transport.close()
        server.close()
        loop.run_until_complete(server.wait_closed())
    _record(benchmark, size, "raw asyncio sockets")


# --- vpn_packet -----------------------------------------------------------------------------------------


def _discovery(port: int = 9) -> StaticPeerDiscovery:
    return StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:9", A_NETS), Peer("node-b", f"127.0.0.1:{port}", B_NETS)]
    )


@pytest.mark.parametrize("size", SIZES)
def test_vpn_packet_stream(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, size: int) -> None:
    """TcpStream.write_many into a Receiver: the transport alone, without the dispatcher."""
    benchmark.group = f"transport {size}-byte packets"
    batches = _batches(_packets(size))
    target = _Target()

    def sink(peer_id: str, packets: list[bytes]) -> None:
        target.add(len(packets))

    receiver = Receiver(_discovery(), sink, host="127.0.0.1", port=0)
    loop.run_until_complete(receiver.start())
    service = TcpStreamService(_discovery(receiver.address[1]), "node-a")
    stream = loop.run_until_complete(service.create_stream("node-b"))

    async def round_() -> None:
        target.expect(ROUND[size])
        for batch in batches:
            await stream.write_many(batch)
        await target.wait()

    try:
        _bench(benchmark, loop, round_)
    finally:
        loop.run_until_complete(stream.close())
        loop.run_until_complete(receiver.stop())
    _record(benchmark, size, "vpn_packet stream")


@pytest.mark.parametrize("size", SIZES)
def test_vpn_packet_node_to_node(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, size: int
) -> None:
    """Node A's send_batch until node B's sink has every packet: dispatcher, workers, pool, TCP, receiver."""
    benchmark.group = f"transport {size}-byte packets"
    batches = _batches(_packets(size))
    target = _Target()

    def sink(peer_id: str, packets: list[bytes]) -> None:
        target.add(len(packets))

    async def setup() -> tuple[Node, Node]:
        b = Node("node-b", ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
        await b.start()
        a = Node(
            "node-a",
            ("127.0.0.1", 0),
            [Peer("node-b", b.endpoint, B_NETS)],
            worker_buffer_size=WINDOW + BATCH,
        )
        await a.start()
        return a, b

    a, b = loop.run_until_complete(setup())
    dispatcher = a.dispatcher

    async def round_() -> None:
        target.expect(ROUND[size])
        start = target.count
        sent = 0
        for batch in batches:
            accepted = a.send_batch(batch)
            assert accepted == len(batch), dispatcher.metrics().rejected_by_reason
            sent += accepted
            # A window, as a TUN reader would have: at most WINDOW packets between A's dispatch and B's sink.
            if sent - (target.count - start) > WINDOW:
                await target.wait_for(start + sent - WINDOW // 2)
            else:
                await asyncio.sleep(0)
        await target.wait()

    try:
        _bench(benchmark, loop, round_)
    finally:
        loop.run_until_complete(a.stop())
        loop.run_until_complete(b.stop())
    _record(benchmark, size, "vpn_packet node-to-node")


def test_zz_summary() -> None:
    """Mpps, Gbit/s and the ratio to raw asyncio sockets, per packet size (same run)."""
    if not _results:
        pytest.skip("transport benchmarks were disabled or deselected")
    print()
    for size in SIZES:
        raw = _results.get((size, "raw asyncio sockets"))
        for (s, name), pps in _results.items():
            if s != size:
                continue
            ratio = f"  {pps / raw:6.1%} of raw" if raw and name != "raw asyncio sockets" else ""
            print(
                f"  {size:5d} B  {name:26s} {pps / 1e6:6.2f} Mpps  {pps * size * 8 / 1e9:6.2f} Gbit/s{ratio}"
            )
    node64 = _results.get((64, "vpn_packet node-to-node"))
    if node64:
        print(f"  goal: >= 1 Mpps of 64-byte packets node-to-node: {node64 / 1e6:.2f} Mpps")
