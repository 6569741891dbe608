"""Node-to-node throughput over loopback TCP, encrypted (key mode, the default) beside plaintext (insecure)
and beside raw asyncio sockets moving the same framed bytes; and the time from a fresh node's first packet to
its delivery (handshake included).

Everything runs in one process and one event loop (sender and receiver compete for the same core, as they
would not on two machines). For 64-byte and 1400-byte IPv4/UDP packets to 16 destinations, one round moves
`ROUND[size]` packets, handed over in batches of `BATCH`:

- raw asyncio sockets: the batches pre-encoded (length-prefixed frames), a plain `asyncio.Protocol` writer
  doing `transport.write(buffer)` with flow control, and a reader protocol that only counts bytes. The floor
  of what any framed transport in asyncio costs: no parsing, no objects, no TLS.
- vpn_packet stream: `TcpStream.write_many(batch)` (native framing, one write per batch) into a `Receiver`
  (native decoding, anti-spoofing filter, batches to a sink that counts packets), plaintext and with keys.
- vpn_packet node-to-node: `Node.send_batch(batch)` on node A (native grouping by destination, per-destination
  workers, stream pool, TCP) until node B's sink has received every packet: end to end. `insecure`
  (plaintext) first, then `key` (TLS 1.3, Ed25519 keys: what `vpn-packet node` runs by default), whose
  `extra_info` carries `ratio_to_plaintext` (issue 10 goal: >= 0.70).
- handshake to first delivery: 100 times, a fresh node A (its pool empty) sends one packet to node B; the
  time from `send` to B's sink (TCP connect, TLS, challenge/hello/answer, write, receive). `extra_info`:
  p50, p90 and max in milliseconds, per mode.

A round is timed from the first write until the receiving side has counted everything. `test_zz_summary`
prints Mpps, Gbit/s, the ratios to raw sockets, encrypted/plaintext, and the handshake p50. Nothing here
asserts a timing.

    python -m pytest benches/bench_transport.py -s --benchmark-group-by=group
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

import ack_cost
from vpn_packet.node.node import Node
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport import receiver as receiver_module
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

SIZES = (64, 1400)
ROUND = {64: 200_000, 1400: 40_000}
BATCH = 1024
DESTINATIONS = 16
ROUNDS = 7
WINDOW = 8 * BATCH  # node-to-node: packets in flight at most
A_NETS = ["10.1.0.0/16"]
B_NETS = ["10.2.0.0/16"]
MODES = ("insecure", "key")  # plaintext first: the key-mode run reports its ratio to it
MODE_NAMES = {"insecure": "plaintext", "key": "TLS+keys"}
CONNECTIONS = 100  # handshake to first delivery: fresh connections timed

_results: dict[tuple[int, str], float] = {}  # (size, name) -> packets per second (median round)
_handshakes: dict[str, list[float]] = {}  # mode -> seconds from send to delivery, per fresh connection


@pytest.fixture(scope="module")
def securities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Security]]:
    """mode -> node id -> `Security`: throwaway keys (each node trusting the other's), or insecure."""
    keys = key_securities(Path(tmp_path_factory.mktemp("keys")), "node-a", "node-b")
    return {
        "key": keys,
        "insecure": {name: Security.insecure(name) for name in ("node-a", "node-b")},
    }


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_vpn_packet_stream(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    securities: dict[str, dict[str, Security]],
    size: int,
    mode: str,
) -> None:
    """TcpStream.write_many into a Receiver: the transport alone, without the dispatcher."""
    benchmark.group = f"transport {size}-byte packets"
    batches = _batches(_packets(size))
    target = _Target()

    def sink(peer_id: str, packets: list[bytes]) -> None:
        target.add(len(packets))

    receiver = Receiver(_discovery(), sink, security=securities[mode]["node-b"], host="127.0.0.1", port=0)
    loop.run_until_complete(receiver.start())
    service = TcpStreamService(_discovery(receiver.address[1]), securities[mode]["node-a"])
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
    _record(benchmark, size, f"vpn_packet stream {MODE_NAMES[mode]}")


async def _node_pair(
    securities: dict[str, Security], sink: Callable[[str, list[bytes]], None], **tuning: Any
) -> tuple[Node, Node]:
    b = Node(securities["node-b"], ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
    await b.start()
    a = Node(securities["node-a"], ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)], **tuning)
    await a.start()
    return a, b


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_vpn_packet_node_to_node(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    securities: dict[str, dict[str, Security]],
    size: int,
    mode: str,
) -> None:
    """Node A's send_batch until node B's sink has every packet: dispatcher, workers, pool, TCP (TLS with
    keys), receiver."""
    benchmark.group = f"transport {size}-byte packets"
    batches = _batches(_packets(size))
    target = _Target()

    def sink(peer_id: str, packets: list[bytes]) -> None:
        target.add(len(packets))

    a, b = loop.run_until_complete(_node_pair(securities[mode], sink, worker_buffer_size=WINDOW + BATCH))
    assert a.security.mode == b.security.mode == mode
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
        assert a.metrics().refusals == {}
        assert b.metrics().receiver.refused == {}
    finally:
        loop.run_until_complete(a.stop())
        loop.run_until_complete(b.stop())
    _record(benchmark, size, f"vpn_packet node-to-node {MODE_NAMES[mode]}")
    plaintext = _results.get((size, f"vpn_packet node-to-node {MODE_NAMES['insecure']}"))
    if mode == "key" and plaintext and (size, f"vpn_packet node-to-node {MODE_NAMES['key']}") in _results:
        ratio = _results[(size, f"vpn_packet node-to-node {MODE_NAMES['key']}")] / plaintext
        benchmark.extra_info["ratio_to_plaintext"] = round(ratio, 3)


@pytest.mark.parametrize("mode", MODES)
def test_handshake_to_first_delivery(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    securities: dict[str, dict[str, Security]],
    mode: str,
) -> None:
    """`CONNECTIONS` times: a fresh node A sends one packet; seconds from `send` to node B's sink."""
    benchmark.group = "handshake to first delivered packet"
    packet = _packets(64)[0]
    arrived: list[asyncio.Event] = []

    def sink(peer_id: str, packets: list[bytes]) -> None:
        arrived[-1].set()

    b = Node(securities[mode]["node-b"], ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
    loop.run_until_complete(b.start())
    peers = [Peer("node-b", b.endpoint, B_NETS)]

    async def one() -> float:
        a = Node(securities[mode]["node-a"], ("127.0.0.1", 0), peers)
        await a.start()
        try:
            arrived.append(asyncio.Event())
            start = time.perf_counter()
            assert a.send(packet)
            async with asyncio.timeout(30):  # a hang guard
                await arrived[-1].wait()
            elapsed = time.perf_counter() - start
            assert a.metrics().connects == 1
            return elapsed
        finally:
            await a.stop()

    async def run() -> list[float]:
        return [await one() for _ in range(CONNECTIONS)]

    try:
        times = benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=1, iterations=1)
        assert b.metrics().receiver.refused == {}
    finally:
        loop.run_until_complete(b.stop())
    _handshakes[mode] = times
    ms = sorted(t * 1000 for t in times)
    benchmark.extra_info.update(
        connections=len(ms),
        p50_ms=round(statistics.median(ms), 3),
        p90_ms=round(ms[int(len(ms) * 0.9) - 1], 3),
        max_ms=round(ms[-1], 3),
    )


def test_ack_cost_measurement() -> None:
    """benches/ack_cost.py (README: "Acks, measured apart") in miniature, so that the script and its
    bench-only injections keep working as the receiver and the stream change: one round of each variant,
    64-byte plaintext. It checks what the injections must do (the coalesced variant writes fewer acks than
    production, the timed one saw both ack handlers, everything is put back afterwards), never a timing; the
    figures come from running the script itself."""
    results = ack_cost.run([64], ["insecure"], rounds=1, delay=ack_cost.DELAY, packets={64: 20_000})
    assert receiver_module._Pump._flush is ack_cost._ORIGINAL_FLUSH
    assert TcpStream._next_ack is ack_cost._ORIGINAL_NEXT_ACK
    [result] = results
    by = {r.variant: r for r in result.rounds}
    assert sorted(by) == sorted(ack_cost.VARIANTS)
    assert all(r.packets == 20_000 for r in result.rounds)
    assert 0 < by["coalesced"].ack_writes < by["timed"].ack_writes
    assert by["timed"].flush_seconds > 0
    assert by["timed"].read_seconds > 0
    assert by["timed"].ack_reads > 0
    summary = ack_cost.summarize(result)
    assert summary["coalesced"]["packets_per_ack_write"] > summary["timed"]["packets_per_ack_write"]


def test_zz_summary() -> None:
    """Mpps, Gbit/s and the ratio to raw asyncio sockets per packet size; encrypted/plaintext node-to-node;
    handshake p50 (same run)."""
    if not _results and not _handshakes:
        pytest.skip("transport benchmarks were disabled or deselected")
    print()
    for size in SIZES:
        raw = _results.get((size, "raw asyncio sockets"))
        for (s, name), pps in _results.items():
            if s != size:
                continue
            ratio = f"  {pps / raw:6.1%} of raw" if raw and name != "raw asyncio sockets" else ""
            print(
                f"  {size:5d} B  {name:36s} {pps / 1e6:6.2f} Mpps  {pps * size * 8 / 1e9:6.2f} Gbit/s{ratio}"
            )
    for size in SIZES:
        plain = _results.get((size, f"vpn_packet node-to-node {MODE_NAMES['insecure']}"))
        keyed = _results.get((size, f"vpn_packet node-to-node {MODE_NAMES['key']}"))
        if plain and keyed:
            print(
                f"  {size:5d} B  node-to-node encrypted/plaintext: {keyed / 1e6:.3f} / {plain / 1e6:.3f} Mpps"
                f" = {keyed / plain:.1%} (goal >= 70%)"
            )
    for mode, times in _handshakes.items():
        ms = sorted(t * 1000 for t in times)
        p50, p90 = statistics.median(ms), ms[int(len(ms) * 0.9) - 1]
        print(
            f"  handshake to first delivered packet ({MODE_NAMES[mode]}, {len(ms)} connections): "
            f"p50 {p50:.2f} ms, p90 {p90:.2f} ms, max {ms[-1]:.2f} ms"
        )
    node64 = _results.get((64, f"vpn_packet node-to-node {MODE_NAMES['key']}"))
    if node64:
        print(f"  goal: >= 1 Mpps of 64-byte packets node-to-node (encrypted): {node64 / 1e6:.2f} Mpps")
