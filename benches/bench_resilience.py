"""Success-path cost of resilience: our breaker and ResilienceService beside tenacity, in one run.

Each benchmark round runs `OPS` operations, so per-operation cost is the round time divided by `OPS` (also
stored as `extra_info["us_per_op"]`). Run with::

    python -m pytest benches/bench_resilience.py --benchmark-group-by=group

The numbers that matter are ratios within one run (shared, noisy machines): breaker check+record versus
tenacity's success path, and `ResilienceService.call` versus `tenacity.AsyncRetrying` and a bare `await`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from vpn_packet.errors import is_retriable_error
from vpn_packet.resilience import CircuitBreaker, ResilienceConfig, ResilienceService

OPS = 1000
CONFIG = ResilienceConfig()


def _tenacity_kwargs() -> dict[str, object]:
    """The retry policy of ResilienceConfig's defaults, expressed for tenacity."""
    return {
        "stop": stop_after_attempt(CONFIG.max_attempts),
        "wait": wait_random_exponential(multiplier=CONFIG.initial_interval, max=CONFIG.max_interval),
        "retry": retry_if_exception(is_retriable_error),
        "reraise": True,
    }


def _record(benchmark: BenchmarkFixture, ops: int = OPS) -> None:
    benchmark.extra_info["ops_per_round"] = ops
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info["ops_per_round"] = ops
    benchmark.extra_info["us_per_op"] = round(median / ops * 1e6, 4)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop per benchmark; each round is one `run_until_complete` of OPS awaited calls."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# --- synchronous: the breaker check and record ----------------------------------------------------------


@pytest.mark.benchmark(group="success path (sync), per round of 1000 ops")
def test_loop_overhead(benchmark: BenchmarkFixture) -> None:
    """An empty loop of OPS calls to a no-op: the floor under the numbers below."""

    def noop() -> None:
        return None

    def run() -> None:
        for _ in range(OPS):
            noop()

    benchmark(run)
    _record(benchmark)


@pytest.mark.benchmark(group="success path (sync), per round of 1000 ops")
def test_breaker_allow_and_record_success(benchmark: BenchmarkFixture) -> None:
    breaker = CircuitBreaker(CONFIG, name="peer")

    def run() -> None:
        allow = breaker.allow
        record = breaker.record_success
        for _ in range(OPS):
            if allow():
                record()

    benchmark.extra_info["ours"] = True
    benchmark(run)
    _record(benchmark)


@pytest.mark.benchmark(group="success path (sync), per round of 1000 ops")
def test_tenacity_retrying_call(benchmark: BenchmarkFixture) -> None:
    retrying = Retrying(**_tenacity_kwargs())  # type: ignore[arg-type]

    def noop() -> None:
        return None

    def run() -> None:
        for _ in range(OPS):
            retrying(noop)

    benchmark(run)
    _record(benchmark)


@pytest.mark.benchmark(group="success path (sync), per round of 1000 ops")
def test_tenacity_decorated(benchmark: BenchmarkFixture) -> None:
    @retry(**_tenacity_kwargs())  # type: ignore[call-overload,untyped-decorator]
    def noop() -> None:
        return None

    def run() -> None:
        for _ in range(OPS):
            noop()

    benchmark(run)
    _record(benchmark)


# --- asynchronous: a whole call around an awaited operation ---------------------------------------------


async def _operation() -> int:
    return 1


def _run_async(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, body: Callable[[], object]
) -> None:
    def run() -> None:
        loop.run_until_complete(body())  # type: ignore[arg-type]

    benchmark(run)
    _record(benchmark)


@pytest.mark.benchmark(group="success path (async), per round of 1000 awaited calls")
def test_bare_await(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    async def body() -> None:
        for _ in range(OPS):
            await _operation()

    _run_async(benchmark, loop, body)


@pytest.mark.benchmark(group="success path (async), per round of 1000 awaited calls")
def test_resilience_service_call(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    service = ResilienceService(CONFIG)

    async def body() -> None:
        call = service.call
        for _ in range(OPS):
            await call("peer", _operation)

    benchmark.extra_info["ours"] = True
    _run_async(benchmark, loop, body)
    assert service.metrics().failures == 0


@pytest.mark.benchmark(group="success path (async), per round of 1000 awaited calls")
def test_tenacity_async_retrying(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    kwargs = _tenacity_kwargs()

    async def body() -> None:
        for _ in range(OPS):
            async for attempt in AsyncRetrying(**kwargs):  # type: ignore[arg-type]
                with attempt:
                    await _operation()

    _run_async(benchmark, loop, body)


@pytest.mark.benchmark(group="success path (async), per round of 1000 awaited calls")
def test_tenacity_async_decorated(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    @retry(**_tenacity_kwargs())  # type: ignore[call-overload,untyped-decorator]
    async def operation() -> int:
        return 1

    async def body() -> None:
        for _ in range(OPS):
            await operation()

    _run_async(benchmark, loop, body)
