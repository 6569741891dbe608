"""A pytest plugin with fixtures for code that drives a vpn-packet `Dispatcher`.

Load it from your root ``conftest.py``::

    pytest_plugins = ["vpn_packet.testutil.fixtures"]

(or ``pytest -p vpn_packet.testutil.fixtures``). Needs pytest-asyncio. Fixtures:

- `manual_clock`: a `ManualClock` at 0; `recording_sleep`: a `RecordingSleep` advancing it.
- `fake_discovery` (every address -> ``"peer-1"``), `fake_stream_service`, `fake_pool` (over that service).
- `fake_resilience`: a `ResilienceService` with default settings on the manual clock, whose backoffs cost no
  time, with a seeded jitter.
- `dispatcher_factory`: ``await dispatcher_factory(**kwargs)`` gives a started `Dispatcher` over the fakes
  above (any argument can be overridden); at teardown each one is stopped, its accounting checked and the
  pool checked for leaked streams.
- `dispatcher`: one such dispatcher with the defaults.
- `make_packet`: ``make_packet("10.0.0.2", 80)`` builds an IPv4 or IPv6 UDP (or `protocol=TCP`) packet.
- `no_task_leaks`: fails the test if it leaves an asyncio task behind.

And two helpers: ``await settle()`` lets the loop run a few dozen iterations, without time passing;
``await wait_until(predicate)`` runs the loop one iteration at a time until a condition holds (for counters
that grow on real I/O and have no event to wait on), with a hang guard only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from vpn_packet.dispatcher import Dispatcher
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import (
    FakePeerDiscovery,
    FakeStreamPool,
    FakeStreamService,
    ManualClock,
    RecordingSleep,
)
from vpn_packet.testutil.packets import UDP, ipv4_packet, ipv6_packet

__all__ = [
    "DispatcherFactory",
    "PacketMaker",
    "dispatcher",
    "dispatcher_factory",
    "fake_discovery",
    "fake_pool",
    "fake_resilience",
    "fake_stream_service",
    "make_packet",
    "manual_clock",
    "no_task_leaks",
    "recording_sleep",
    "settle",
    "wait_until",
]

DispatcherFactory = Callable[..., Awaitable[Dispatcher]]
PacketMaker = Callable[..., bytes]


async def settle(rounds: int = 50) -> None:
    """Let the event loop run `rounds` iterations (no time passes): pending drains get to run."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(predicate: Callable[[], bool], *, hang_guard: float = 10.0) -> None:
    """Runs the event loop one iteration at a time (no sleeping) until `predicate()` holds.

    For conditions with no event to wait on, such as a counter that grows when real I/O arrives. `hang_guard`
    (seconds) is not an assertion: reaching it raises `TimeoutError` because the condition never came.
    """
    async with asyncio.timeout(hang_guard):
        while True:
            if predicate():
                return
            await asyncio.sleep(0)  # one loop iteration: I/O callbacks and ready tasks run


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock that moves only when the test calls `advance()`."""
    return ManualClock()


@pytest.fixture
def recording_sleep(manual_clock: ManualClock) -> RecordingSleep:
    """A sleep that records delays and advances `manual_clock` instead of waiting."""
    return RecordingSleep(manual_clock)


@pytest.fixture
def fake_discovery() -> FakePeerDiscovery:
    """Discovery answering ``"peer-1"`` for every address (set `default`, `peers`, prefixes to change it)."""
    return FakePeerDiscovery(default="peer-1", seed=0)


@pytest.fixture
def fake_stream_service() -> FakeStreamService:
    """A stream service creating recording `FakeStream`s."""
    return FakeStreamService(seed=0)


@pytest.fixture
def fake_pool(fake_stream_service: FakeStreamService) -> FakeStreamPool:
    """A stream pool over `fake_stream_service`, tracking outstanding streams."""
    return FakeStreamPool(fake_stream_service, seed=0)


@pytest.fixture
def fake_resilience(manual_clock: ManualClock, recording_sleep: RecordingSleep) -> ResilienceService:
    """Default breaker and retry settings on the manual clock; backoffs are recorded, not slept."""
    return ResilienceService(
        ResilienceConfig(), clock=manual_clock, sleep=recording_sleep, random=random.Random(0).random
    )


@pytest_asyncio.fixture
async def dispatcher_factory(
    fake_discovery: FakePeerDiscovery,
    fake_stream_service: FakeStreamService,
    fake_pool: FakeStreamPool,
    fake_resilience: ResilienceService,
    manual_clock: ManualClock,
) -> AsyncIterator[DispatcherFactory]:
    """Builds started dispatchers over the fakes; stops them at teardown and checks accounting and leaks."""
    made: list[Dispatcher] = []

    async def make(**kwargs: Any) -> Dispatcher:
        kwargs.setdefault("peer_discovery", fake_discovery)
        kwargs.setdefault("stream_service", fake_stream_service)
        kwargs.setdefault("pool_service", fake_pool)
        kwargs.setdefault("resilience_service", fake_resilience)
        kwargs.setdefault("clock", manual_clock)
        dispatcher = Dispatcher(**kwargs)
        made.append(dispatcher)
        await dispatcher.start()
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.stop(timeout=0)
        dispatcher.check_accounting()
    fake_pool.assert_no_leaks()


@pytest_asyncio.fixture
async def dispatcher(dispatcher_factory: DispatcherFactory) -> Dispatcher:
    """A started dispatcher over the fakes (stopped and checked at teardown)."""
    return await dispatcher_factory()


@pytest.fixture
def make_packet() -> PacketMaker:
    """``make_packet(dst, dst_port=None, *, src=None, protocol=UDP, payload=b"")``: an IPv4/IPv6 packet."""

    def make(
        dst: str,
        dst_port: int | None = None,
        *,
        src: str | None = None,
        protocol: int = UDP,
        src_port: int = 40000,
        payload: bytes = b"",
    ) -> bytes:
        if ipaddress.ip_address(dst).version == 6:
            return ipv6_packet(src or "2001:db8::1", dst, protocol, src_port, dst_port, payload)
        return ipv4_packet(src or "10.0.0.1", dst, protocol, src_port, dst_port, payload)

    return make


@pytest_asyncio.fixture
async def no_task_leaks() -> AsyncIterator[None]:
    """Fails the test if an asyncio task it started is still pending at the end."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)  # one loop iteration: tasks cancelled at the end of the test finish
    left = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    if left:
        pytest.fail(f"{len(left)} task(s) left behind: {left!r}")
