"""Dispatch throughput and worker cost: our Dispatcher beside a plain asyncio dispatcher, in one run.

Setup (the same for every row): 100 destinations, in-memory streams, packets of 60 bytes (IPv4/UDP). The
producer dispatches a burst of 64 packets, then yields to the loop once (as a TUN reader does per readiness
event); a round is `ROUND` packets, timed until every packet has been written to its stream. Two traffic
shapes: `uniform` (each packet to a random destination: the worst case for batching, a burst touches ~48
destinations) and `flows` (each burst is 8 runs of 8 packets to one destination, as bulk TCP flows give).
Rounds are timed in CPU time of the process (`time.process_time`): everything runs on one thread without I/O
waits, and on a shared machine CPU time is far less noisy than wall time.

- plain (keys given): an `asyncio.Queue` and a task per key, one awaited `write` per packet.
- plain (Python keys): the same, computing each key in plain Python (`struct` + `ipaddress`).
- vpn_packet dispatch_packet: our `Dispatcher.dispatch_packet`, keys given.
- vpn_packet dispatch: one packet at a time, key computed natively.
- vpn_packet dispatch_batch: 64-packet batches, routed to the native queues in one call.
- vpn_packet dispatch_buffer: the same batches as a TUN read gives them (one buffer, a u32 lengths array).
- `_framed` rows: the same with streams that take the framed buffer as it is (`write_framed`, as the TCP
  stream does) instead of a list of packets (`write_many`, what the other rows' streams take).

`test_zz_summary` prints Mpps and the ratios of the goals (dispatch_packet vs plain, dispatch_batch vs plain
with Python keys). Two more benchmarks report memory, not time: bytes per idle worker (tracemalloc) and RSS
over ten cycles of creating and cleaning up 100,000 destinations. Nothing here asserts a timing.

    python -m pytest benches/bench_dispatch.py --benchmark-group-by=group -s
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import random
import struct
import time
from array import array
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.testutil.memory import idle_worker_bytes
from vpn_packet.testutil.packets import UDP, ipv4_packet

DESTINATIONS = 100
ROUND = 20_000
BURST = 64
BUFFER = 100

_results: dict[str, float] = {}  # name -> packets per second (median round), for the summary


# --- shared pieces ------------------------------------------------------------------------------------------


class MemStream:
    """An in-memory stream: counts what it is given (in its pool, which wakes whoever waits for a total)."""

    __slots__ = ("pool",)

    def __init__(self, pool: MemPool) -> None:
        self.pool = pool

    async def write(self, packet: bytes) -> None:
        pool = self.pool
        pool.written += 1
        if pool.written >= pool.target:
            pool.reached()

    async def write_many(self, packets: Sequence[bytes]) -> None:
        pool = self.pool
        pool.written += len(packets)
        if pool.written >= pool.target:
            pool.reached()

    async def close(self) -> None:
        return None


class MemFramedStream(MemStream):
    """A `MemStream` that also takes framed buffers (`write_framed`), as the TCP stream does."""

    __slots__ = ()

    async def write_framed(self, data: bytes, count: int) -> None:
        pool = self.pool
        pool.written += count
        if pool.written >= pool.target:
            pool.reached()


class MemPool:
    """One stream per peer, shared by the workers of that peer; `wait_for(total)` waits for that many writes.

    Both dispatchers are timed until their packets reached the streams this way (no `Queue.join()` or
    `flush()` bookkeeping in the measured path of either).
    """

    def __init__(self, *, framed: bool = False) -> None:
        self.framed = framed
        self.streams: dict[str, MemStream] = {}
        self.written = 0
        self.target = 1 << 62
        self._waiter: asyncio.Future[None] | None = None

    async def get_stream(self, peer_id: str) -> MemStream:
        stream = self.streams.get(peer_id)
        if stream is None:
            stream = self.streams[peer_id] = MemFramedStream(self) if self.framed else MemStream(self)
        return stream

    def release_stream(self, peer_id: str, stream: Any, healthy: bool) -> None:
        return None

    def reached(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_for(self, total: int) -> None:
        if self.written >= total:
            return
        self.target = total
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self.target = 1 << 62


class OnePeer:
    async def get_peer_id(self, dest_ip: str) -> str:
        return "peer"


def _packets(n: int = ROUND, destinations: int = DESTINATIONS, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    dests = [f"10.8.{i // 250}.{i % 250 + 1}" for i in range(destinations)]
    return [
        ipv4_packet("10.0.0.1", dests[rng.randrange(destinations)], UDP, 40000, 443, bytes(32))
        for _ in range(n)
    ]


def python_key(packet: bytes) -> tuple[str, str]:
    """Destination key and address in plain Python (IPv4/IPv6 fixed header, TCP/UDP ports)."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 15) * 4
        dst = str(ipaddress.IPv4Address(packet[16:20]))
        proto, offset, fmt = packet[9], ihl, "{}:{}"
    elif version == 6:
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        proto, offset, fmt = packet[6], 40, "[{}]:{}"
    else:
        raise ValueError("not an IP packet")
    if proto in (6, 17) and len(packet) >= offset + 4:
        (port,) = struct.unpack_from("!H", packet, offset + 2)
        return fmt.format(dst, port), dst
    return dst, dst


class PlainDispatcher:
    """The baseline: an `asyncio.Queue` and a task per key, one awaited write per packet."""

    def __init__(self, pool: MemPool, buffer: int = BUFFER) -> None:
        self.pool = pool
        self.buffer = buffer
        self.queues: dict[str, asyncio.Queue[bytes]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    def dispatch_packet(self, key: str, dest_ip: str, data: bytes) -> bool:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = asyncio.Queue(self.buffer)
            self.tasks.append(asyncio.get_running_loop().create_task(self._work(queue)))
        try:
            queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def _work(self, queue: asyncio.Queue[bytes]) -> None:
        stream = await self.pool.get_stream("peer")
        while True:
            data = await queue.get()
            await stream.write(data)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _run(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    name: str,
    round_: Callable[[], Coroutine[Any, Any, None]],
    written: Callable[[], int],
) -> None:
    loop.run_until_complete(round_())  # warm-up: workers created, peers looked up
    start = written()
    benchmark(lambda: loop.run_until_complete(round_()))
    rounds = (written() - start) // ROUND
    assert written() - start == rounds * ROUND, "every packet must reach a stream"
    benchmark.extra_info["packets_per_round"] = ROUND
    if benchmark.stats is not None:
        pps = ROUND / benchmark.stats.stats.median
        benchmark.extra_info["mpps"] = round(pps / 1e6, 3)
        _results[name] = pps


# --- throughput ---------------------------------------------------------------------------------------------

GROUP = f"dispatch end to end, {DESTINATIONS} destinations, bursts of {BURST} (per packet)"
TRAFFIC = ["uniform", "flows"]


def _traffic(kind: str) -> list[bytes]:
    """`uniform`: each packet to a random destination; `flows`: each burst is 8 runs of 8 packets, each run
    to one random destination (bulk flows, as TCP windows produce)."""
    if kind == "uniform":
        return _packets()
    rng = random.Random(2)
    pool = _packets(DESTINATIONS * 4)
    by_dest: dict[str, list[bytes]] = {}
    for packet in pool:
        by_dest.setdefault(destination_key_and_ip(packet)[0], []).append(packet)
    dests = list(by_dest.values())
    out: list[bytes] = []
    while len(out) < ROUND:
        run = rng.choice(dests)
        out += [run[0]] * 8
    return out[:ROUND]


def _plain_round(plain: PlainDispatcher, packets: list[bytes], python_keys: bool) -> Callable[[], Any]:
    keys = None if python_keys else [destination_key_and_ip(p) for p in packets]

    async def round_() -> None:
        target = plain.pool.written + ROUND
        dispatch = plain.dispatch_packet
        for i in range(0, ROUND, BURST):
            for j in range(i, min(i + BURST, ROUND)):
                key, ip = python_key(packets[j]) if keys is None else keys[j]
                dispatch(key, ip, packets[j])
            await asyncio.sleep(0)
        await plain.pool.wait_for(target)

    return round_


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_plain_keys_given(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str) -> None:
    pool = MemPool()
    plain = PlainDispatcher(pool)
    _run(
        benchmark,
        loop,
        f"plain[{traffic}]",
        _plain_round(plain, _traffic(traffic), False),
        lambda: pool.written,
    )
    assert plain.dropped == 0
    loop.run_until_complete(plain.stop())


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_plain_python_keys(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    packets = _traffic(traffic)
    assert [python_key(p) for p in packets[:200]] == [destination_key_and_ip(p) for p in packets[:200]]
    pool = MemPool()
    plain = PlainDispatcher(pool)
    _run(
        benchmark,
        loop,
        f"plain_python_keys[{traffic}]",
        _plain_round(plain, packets, True),
        lambda: pool.written,
    )
    assert plain.dropped == 0
    loop.run_until_complete(plain.stop())


def _dispatcher(pool: MemPool, **kwargs: Any) -> Dispatcher:
    return Dispatcher(OnePeer(), None, pool, worker_buffer_size=BUFFER, **kwargs)


def _ours(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    name: str,
    form: str,
    traffic: str,
    *,
    framed: bool = False,
    **kwargs: Any,
) -> None:
    if form == "dispatch_buffer" and not hasattr(Dispatcher, "dispatch_buffer"):
        pytest.skip("this Dispatcher has no dispatch_buffer")
    packets = _traffic(traffic)
    keys = [destination_key_and_ip(p) for p in packets]
    batches = [packets[i : i + BURST] for i in range(0, ROUND, BURST)]
    reads = [(b"".join(batch), array("I", map(len, batch))) for batch in batches]
    pool = MemPool(framed=framed)
    d = _dispatcher(pool, **kwargs)

    async def round_() -> None:
        target = pool.written + ROUND
        if form == "dispatch_packet":
            dispatch_packet = d.dispatch_packet
            for i in range(0, ROUND, BURST):
                for j in range(i, min(i + BURST, ROUND)):
                    key, ip = keys[j]
                    dispatch_packet(key, ip, packets[j])
                await asyncio.sleep(0)
        elif form == "dispatch":
            dispatch = d.dispatch
            for batch in batches:
                for packet in batch:
                    dispatch(packet)
                await asyncio.sleep(0)
        elif form == "dispatch_buffer":
            dispatch_buffer = d.dispatch_buffer
            for buffer, lengths in reads:
                dispatch_buffer(buffer, lengths)
                await asyncio.sleep(0)
        else:
            dispatch_batch = d.dispatch_batch
            for batch in batches:
                dispatch_batch(batch)
                await asyncio.sleep(0)
        await pool.wait_for(target)

    loop.run_until_complete(d.start())
    _run(benchmark, loop, f"{name}[{traffic}]", round_, lambda: pool.written)
    loop.run_until_complete(d.stop())
    m = d.check_accounting()
    assert m.rejected == 0
    benchmark.extra_info["packets_per_write"] = round(m.sent / max(1, m.resilience.get("successes", 1)), 1)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_packet(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_packet", "dispatch_packet", traffic)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch", "dispatch", traffic)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_batch(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_batch", "dispatch_batch", traffic)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_buffer(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_buffer", "dispatch_buffer", traffic)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_packet_framed(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_packet_framed", "dispatch_packet", traffic, framed=True)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_batch_framed(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_batch_framed", "dispatch_batch", traffic, framed=True)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_buffer_framed(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    _ours(benchmark, loop, "dispatch_buffer_framed", "dispatch_buffer", traffic, framed=True)


@pytest.mark.parametrize("traffic", TRAFFIC)
@pytest.mark.benchmark(group=GROUP, timer=time.process_time)
def test_vpn_packet_dispatch_batch_no_coalescing(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, traffic: str
) -> None:
    """The same with `coalesce=0`: every burst drained at once (one write per worker per burst)."""
    _ours(benchmark, loop, "dispatch_batch_coalesce0", "dispatch_batch", traffic, coalesce=0)


def test_zz_summary() -> None:
    """The ratios of the issue's goals, from the rows above (same run)."""
    if not _results:
        pytest.skip("throughput benchmarks were disabled or deselected")
    print()
    for name, pps in _results.items():
        print(f"  {name:36s} {pps / 1e6:6.2f} Mpps")
    for traffic in TRAFFIC:
        r = {name.split("[")[0]: pps for name, pps in _results.items() if name.endswith(f"[{traffic}]")}
        if {"plain", "plain_python_keys", "dispatch_packet", "dispatch_batch"} <= set(r):
            print(
                f"  {traffic}: dispatch_packet / plain = {r['dispatch_packet'] / r['plain']:.1f}x (goal 2x); "
                "dispatch_batch / plain with Python keys = "
                f"{r['dispatch_batch'] / r['plain_python_keys']:.1f}x (goal 10x)"
            )


# --- memory -------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.benchmark(group="memory (bytes, not time)")
def test_idle_worker_bytes(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    """Bytes per idle worker (worker, its empty queue, its dict slot), by tracemalloc over 10,000 workers."""

    async def measure() -> float:
        async with _dispatcher(MemPool()) as d:
            return await idle_worker_bytes(d, 10_000)

    per_worker = benchmark.pedantic(  # type: ignore[no-untyped-call]
        lambda: loop.run_until_complete(measure()), rounds=1, iterations=1
    )
    benchmark.extra_info["bytes_per_idle_worker"] = round(per_worker)
    print(f"\n  idle worker: {per_worker:.0f} bytes (goal <= 1024)")


@pytest.mark.benchmark(group="memory (bytes, not time)")
def test_rss_flat_over_create_and_cleanup_cycles(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop
) -> None:
    """RSS after each of ten cycles of creating 100,000 destinations and cleaning them all up."""
    n = 100_000 if benchmark.enabled else 2_000
    keys = [
        (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:443", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        for i in range(n)
    ]

    async def cycles() -> list[int]:
        clock = [0.0]
        d = _dispatcher(MemPool(), worker_idle_timeout=10, max_workers=200_000, clock=lambda: clock[0])
        rss = []
        async with d:
            for _ in range(10):
                for i, (key, ip) in enumerate(keys):
                    d.dispatch_packet(key, ip, b"x")
                    if i % BURST == BURST - 1:
                        await asyncio.sleep(0)
                await d.flush()
                clock[0] += 11
                assert d.run_cleanup() == n
                gc.collect()
                rss.append(_rss_bytes())
        d.check_accounting()
        return rss

    rss = benchmark.pedantic(  # type: ignore[no-untyped-call]
        lambda: loop.run_until_complete(cycles()), rounds=1, iterations=1
    )
    mib = [round(r / 2**20, 1) for r in rss]
    benchmark.extra_info["rss_mib_per_cycle"] = mib
    print(f"\n  RSS after each cycle of {n:,} destinations created and cleaned up (MiB): {mib}")
