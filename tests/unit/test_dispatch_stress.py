"""Stress: 100,000 packets over 1,000 keys with random write failures, peer-lookup failures,
caller cancellations, a blocked peer and a `stop()` in the middle. Every future resolves exactly once, the
accounting identity is exact, every stream goes back to the pool and no task is left behind."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import PeerNotFoundError, VpnPacketError
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import (
    FakePeerDiscovery,
    FakeStreamPool,
    FakeStreamService,
    ManualClock,
    RecordingSleep,
)
from vpn_packet.testutil.packets import UDP, ipv4_packet

PACKETS = 100_000
KEYS = 1_000
PEERS = 10
STOP_AT = PACKETS // 2


def _counter(resolutions: Counter[int], n: int) -> Callable[[asyncio.Future[None]], None]:
    def resolved(_future: asyncio.Future[None]) -> None:
        resolutions[n] += 1

    return resolved


async def test_stress_100k_packets_1k_keys_with_failures_cancellations_and_stop() -> None:
    before = asyncio.all_tasks()
    rng = random.Random(2024)
    clock = ManualClock()
    sleep = RecordingSleep(clock)
    discovery = FakePeerDiscovery(
        prefixes={f"10.{p}.0.0/16": f"peer-{p}" for p in range(PEERS)}, seed=1, sleep=sleep
    )
    discovery.failures.fail_randomly(0.02, lambda: PeerNotFoundError("?"))
    errors = random.Random(5)
    service = FakeStreamService(
        seed=2,
        sleep=sleep,
        write_failure_rate=0.03,  # resets (retried on a fresh stream) and corrupt writes (not retried)
        write_error=lambda: ConnectionResetError() if errors.random() < 0.7 else ValueError("corrupt"),
    )
    pool = FakeStreamPool(service, seed=3, sleep=sleep)
    pool.failures.fail_randomly(0.01, TimeoutError)
    resilience = ResilienceService(
        ResilienceConfig(failure_threshold=8, reset_timeout=5.0, max_attempts=3),
        clock=clock,
        sleep=sleep,
        random=rng.random,
    )
    dispatcher = Dispatcher(
        discovery,
        None,
        pool,
        worker_buffer_size=64,
        resilience_service=resilience,
        max_workers=150,
        clock=clock,
    )
    packets = []
    for i in range(KEYS):
        peer, host = i % PEERS, i // PEERS
        packets.append(ipv4_packet("192.168.0.1", f"10.{peer}.{host >> 8}.{host & 255}", UDP, 4000, 53))
    keys = [destination_key_and_ip(p) for p in packets]
    service.gate_for("peer-9").close()  # one peer never answers: stop() has to give up on it

    futures: list[asyncio.Future[None]] = []
    resolutions: Counter[int] = Counter()
    offered = 0
    stopping: asyncio.Task[None] | None = None
    async with dispatcher:
        while offered < PACKETS:
            roll = rng.random()
            if roll < 0.45:
                i = rng.randrange(KEYS)
                dispatcher.dispatch_packet(*keys[i], packets[i])
                offered += 1
            elif roll < 0.75:
                i = rng.randrange(KEYS)
                future = dispatcher.dispatch_packet_with_callback(*keys[i], packets[i])
                future.add_done_callback(_counter(resolutions, len(futures)))
                futures.append(future)
                offered += 1
            elif roll < 0.80:
                batch = [packets[rng.randrange(KEYS)] for _ in range(rng.randrange(1, 65))]
                dispatcher.dispatch_batch(batch)
                offered += len(batch)
            elif roll < 0.83 and futures:
                rng.choice(futures).cancel()
            elif roll < 0.90:
                await asyncio.sleep(0)  # one loop iteration: drains progress
                clock.advance(0.05)
            if stopping is None and offered >= STOP_AT:
                stopping = asyncio.create_task(dispatcher.stop(timeout=0.05))
            if offered % 1000 == 0:
                dispatcher.check_accounting()
        assert stopping is not None
        await stopping
    await asyncio.sleep(0)  # the futures' done callbacks run on the next iteration

    m = dispatcher.check_accounting()
    assert m.offered == offered
    assert m.accepted == m.sent + m.failed + m.discarded
    assert m.queued == 0
    assert m.sent == len(service.log)  # what the streams received is exactly what was counted as sent
    assert all(f.done() for f in futures)
    assert set(resolutions) == set(range(len(futures)))
    assert set(resolutions.values()) == {1}
    outcomes = Counter(
        "cancelled" if f.cancelled() else type(f.exception()).__name__ if f.exception() else "sent"
        for f in futures
    )
    assert outcomes["sent"] > 0
    assert outcomes["cancelled"] > 0
    assert outcomes["DispatcherStoppedError"] > 0
    assert all(
        f.cancelled() or f.exception() is None or isinstance(f.exception(), VpnPacketError) for f in futures
    )
    assert m.rejected_by_reason["stopped"] > 0
    assert m.discarded_by_reason["stopped"] > 0
    assert m.failed_by_reason["no_peer"] > 0
    assert m.failed_by_reason["write_error"] > 0
    assert m.rejected_by_reason["worker_limit"] > 0
    assert m.workers_evicted > 0
    assert resilience.metrics().retries > 0
    assert pool.outstanding == 0
    assert asyncio.all_tasks() == before
