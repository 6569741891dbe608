"""Circuit breaker, breaker manager, retry policy and ResilienceService, on a fake clock (no real sleep)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
from collections.abc import Awaitable, Callable, Iterable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vpn_packet import CircuitOpenError, NetworkError, PacketError, QueueFullError
from vpn_packet.resilience import (
    CircuitBreaker,
    CircuitBreakerManager,
    CircuitState,
    ResilienceConfig,
    ResilienceMetrics,
    ResilienceService,
    RetryPolicy,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FakeSleep:
    """An injected `sleep` that records the delays and moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)  # yields once, as a real sleep would


def cycle(values: Iterable[float]) -> Callable[[], float]:
    """A deterministic stand-in for `random.random`."""
    it = itertools.cycle(values)
    return lambda: next(it)


class Script:
    """An operation whose attempts raise or return, in order, what the script says; counts the calls."""

    def __init__(self, *outcomes: BaseException | object, clock: FakeClock | None = None, takes: float = 0.0):
        self.outcomes = list(outcomes)
        self.calls = 0
        self.clock = clock
        self.takes = takes

    async def __call__(self) -> object:
        self.calls += 1
        if self.clock is not None:
            self.clock.advance(self.takes)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def make_service(**config: float) -> tuple[ResilienceService, FakeClock, FakeSleep]:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    service = ResilienceService(ResilienceConfig(**config), clock=clock, sleep=sleep, random=lambda: 1.0)  # type: ignore[arg-type]
    return service, clock, sleep


# --- configuration --------------------------------------------------------------------------------------


def test_config_defaults_are_the_design_values() -> None:
    config = ResilienceConfig()
    assert (
        config.failure_threshold,
        config.reset_timeout,
        config.success_threshold,
        config.max_attempts,
        config.initial_interval,
        config.max_interval,
    ) == (5, 2.0, 2, 3, 0.1, 2.0)  # reset_timeout 2 s, not DESIGN's 30 s: issue 11
    assert config.half_open_max_probes == 1
    assert config.max_elapsed == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.failure_threshold = 1  # type: ignore[misc]


def test_default_breaker_probes_a_peer_that_is_back_within_seconds() -> None:
    """Issue 11: with the old 30 s default a peer that came up after the node was first reached after 29.5 s.
    With the default now, a breaker opened by a dead peer admits a probe 2 s later, and a peer that is back
    is used again at once (`success_threshold` probes)."""
    breaker, clock = make_breaker()
    for _ in range(ResilienceConfig().failure_threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(2.0)
    clock.advance(1.9)
    assert not breaker.allow()  # still no hammering
    clock.advance(0.1)
    assert breaker.allow()  # 2 s after opening: a probe
    breaker.record_success()
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", 2.5),
        ("failure_threshold", True),
        ("reset_timeout", -1.0),
        ("reset_timeout", float("nan")),
        ("reset_timeout", float("inf")),
        ("success_threshold", 0),
        ("max_attempts", 0),
        ("initial_interval", -0.1),
        ("max_interval", 0.05),  # below initial_interval
        ("half_open_max_probes", 0),
        ("max_elapsed", 0.0),
        ("max_breakers", 0),
        ("breaker_idle_timeout", 0.0),
        ("reset_timeout", "30"),
    ],
)
def test_config_validation_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ResilienceConfig(**{field: value})  # type: ignore[arg-type]


def test_config_accepts_unbounded_budget_and_idle_timeout() -> None:
    config = ResilienceConfig(max_elapsed=float("inf"), breaker_idle_timeout=float("inf"), reset_timeout=0.0)
    assert config.max_elapsed == float("inf")


# --- retry policy ---------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_below_a_capped_exponential_ceiling() -> None:
    policy = RetryPolicy(5, 0.1, 1.0, 10.0, lambda: 1.0)
    assert [policy.ceiling(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert [policy.backoff(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert RetryPolicy(5, 0.1, 1.0, 10.0, lambda: 0.0).backoff(3) == 0.0
    assert RetryPolicy(5, 0.1, 1.0, 10.0, lambda: 0.25).backoff(2) == pytest.approx(0.1)
    assert policy.backoff(10_000) == 1.0  # no overflow


def test_retry_policy_from_config_uses_the_configured_values() -> None:
    config = ResilienceConfig(max_attempts=7, initial_interval=0.5, max_interval=4.0, max_elapsed=60.0)
    policy = RetryPolicy.from_config(config, random=lambda: 0.5)
    assert (policy.max_attempts, policy.initial_interval, policy.max_interval, policy.max_elapsed) == (
        7,
        0.5,
        4.0,
        60.0,
    )
    assert policy.backoff(1) == pytest.approx(0.5)


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="max_elapsed"):
        RetryPolicy(max_elapsed=-1.0)


# --- circuit breaker ------------------------------------------------------------------------------------


def make_breaker(
    listener: Callable[[CircuitBreaker, CircuitState, CircuitState], None] | None = None, **config: float
) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    cfg = ResilienceConfig(**config)  # type: ignore[arg-type]
    return CircuitBreaker(cfg, clock=clock, name="node-b", on_transition=listener), clock


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make_breaker(failure_threshold=3)
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()  # breaks the run
    assert breaker.state is CLOSED
    assert breaker.failures == 0
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow()


def test_open_breaker_recovers_after_reset_timeout() -> None:
    transitions: list[tuple[CircuitState, CircuitState]] = []
    breaker, clock = make_breaker(
        lambda b, old, new: transitions.append((old, new)), failure_threshold=1, reset_timeout=30.0
    )
    breaker.record_failure()
    assert breaker.retry_after() == 30.0
    clock.advance(29.9)
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN  # lazily, on the clock
    assert breaker.retry_after() is None
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is HALF_OPEN  # success_threshold=2
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_half_open_admits_a_limited_number_of_concurrent_probes() -> None:
    breaker, clock = make_breaker(failure_threshold=1, reset_timeout=5.0, half_open_max_probes=2)
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.allow()
    assert breaker.allow()
    assert not breaker.allow()
    assert breaker.probes_in_flight == 2
    breaker.release_probe()  # a cancelled probe gives its slot back, without a verdict
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_any_failure_in_half_open_reopens_for_a_full_reset_timeout() -> None:
    breaker, clock = make_breaker(failure_threshold=2, reset_timeout=10.0, success_threshold=3)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    clock.advance(9.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_a_lost_probe_does_not_keep_the_breaker_stuck() -> None:
    breaker, clock = make_breaker(failure_threshold=1, reset_timeout=10.0)
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow()  # this probe never reports back
    clock.advance(9.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_outcomes_reported_while_open_are_ignored() -> None:
    breaker, clock = make_breaker(failure_threshold=1, reset_timeout=10.0)
    breaker.record_failure()
    clock.advance(5.0)
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == 5.0


def test_reset_closes_and_repr_is_informative() -> None:
    breaker, _ = make_breaker(failure_threshold=1)
    breaker.record_failure()
    assert "state=open" in repr(breaker)
    assert "node-b" in repr(breaker)
    breaker.reset()
    assert breaker.state is CLOSED
    assert "failures=0/1" in repr(breaker)


# --- the breaker against a small model ------------------------------------------------------------------

RESET = 10.0


class BreakerModel:
    """The breaker state machine of DESIGN.md, written plainly: what the breaker must do."""

    def __init__(self, failure_threshold: int, success_threshold: int, max_probes: int) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.max_probes = max_probes
        self.mode = CLOSED
        self.failures = self.successes = self.probes = 0
        self.opened_at = self.probe_at = 0.0

    def state(self, now: float) -> CircuitState:
        if self.mode is OPEN and now >= self.opened_at + RESET:
            self.mode, self.successes, self.probes = HALF_OPEN, 0, 0
        return self.mode

    def open(self, now: float) -> None:
        self.mode, self.opened_at, self.failures, self.probes = OPEN, now, 0, 0

    def allow(self, now: float) -> bool:
        state = self.state(now)
        if state is not HALF_OPEN:
            return state is CLOSED
        if self.probes < self.max_probes:
            self.probes += 1
        elif now >= self.probe_at + RESET:  # the earlier probes are presumed lost
            self.probes = 1
        else:
            return False
        self.probe_at = now
        return True

    def success(self, now: float) -> None:
        state = self.state(now)
        if state is CLOSED:
            self.failures = 0
        elif state is HALF_OPEN:
            self.probes = max(0, self.probes - 1)
            self.successes += 1
            if self.successes >= self.success_threshold:
                self.mode, self.failures, self.probes = CLOSED, 0, 0

    def failure(self, now: float) -> None:
        state = self.state(now)
        if state is CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self.open(now)
        elif state is HALF_OPEN:
            self.open(now)

    def release(self, now: float) -> None:
        if self.state(now) is HALF_OPEN and self.probes:
            self.probes -= 1


class BreakerMachine(RuleBasedStateMachine):
    clock: FakeClock
    breaker: CircuitBreaker
    model: BreakerModel

    @initialize(
        failure_threshold=st.integers(1, 4), success_threshold=st.integers(1, 3), max_probes=st.integers(1, 3)
    )
    def setup(self, failure_threshold: int, success_threshold: int, max_probes: int) -> None:
        config = ResilienceConfig(
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            half_open_max_probes=max_probes,
            reset_timeout=RESET,
        )
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(config, clock=self.clock)
        self.model = BreakerModel(failure_threshold, success_threshold, max_probes)

    @rule(seconds=st.sampled_from([0.5, 3.0, RESET - 0.5, RESET, RESET + 2.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def allow(self) -> None:
        assert self.breaker.allow() == self.model.allow(self.clock.now)

    @rule()
    def success(self) -> None:
        self.breaker.record_success()
        self.model.success(self.clock.now)

    @rule()
    def failure(self) -> None:
        self.breaker.record_failure()
        self.model.failure(self.clock.now)

    @precondition(lambda self: self.breaker.probes_in_flight > 0)
    @rule()
    def release(self) -> None:
        self.breaker.release_probe()
        self.model.release(self.clock.now)

    @rule()
    def recovers_with_healthy_peer(self) -> None:
        """Whatever the state, after reset_timeout a healthy peer closes it in success_threshold calls."""
        self.clock.advance(RESET)
        for _ in range(self.model.success_threshold):
            assert self.breaker.allow()
            assert self.model.allow(self.clock.now)
            self.breaker.record_success()
            self.model.success(self.clock.now)
        assert self.breaker.state is CLOSED

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.breaker.state is self.model.state(self.clock.now)
        assert self.breaker.probes_in_flight == self.model.probes
        if self.model.mode is CLOSED:
            assert self.breaker.failures == self.model.failures < self.model.failure_threshold

    @invariant()
    def probes_are_bounded(self) -> None:
        assert 0 <= self.breaker.probes_in_flight <= self.model.max_probes


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBreakerStateMachine = BreakerMachine.TestCase


# --- manager --------------------------------------------------------------------------------------------


def test_manager_keeps_one_breaker_per_peer() -> None:
    clock = FakeClock()
    manager = CircuitBreakerManager(ResilienceConfig(failure_threshold=2), clock)
    a = manager.get("a")
    assert manager.get("a") is a
    assert manager.get("b") is not a
    assert len(manager) == 2
    assert "a" in manager
    assert manager.peek("zzz") is None
    assert "zzz" not in manager
    assert a.name == "a"
    assert "breakers=2" in repr(manager)


def test_manager_evicts_idle_breakers() -> None:
    clock = FakeClock()
    manager = CircuitBreakerManager(ResilienceConfig(breaker_idle_timeout=100.0), clock)
    for peer in "abc":
        manager.get(peer)
    clock.advance(60.0)
    manager.get("c")
    clock.advance(50.0)  # a and b idle for 110 s, c for 50 s
    manager.get("d")  # a sweep is due (every quarter of the idle timeout)
    assert sorted(p for p in "abcd" if p in manager) == ["c", "d"]
    assert manager.evicted == 2
    clock.advance(101.0)
    assert manager.evict_idle() == 2
    assert len(manager) == 0


def test_idle_eviction_spares_open_breakers_until_they_cool_down() -> None:
    clock = FakeClock()
    manager = CircuitBreakerManager(
        ResilienceConfig(breaker_idle_timeout=10.0, reset_timeout=100.0, failure_threshold=1), clock
    )
    manager.get("bad").record_failure()
    manager.get("good")
    clock.advance(50.0)
    assert manager.evict_idle() == 1
    assert "bad" in manager
    assert manager.get("bad").state is OPEN
    clock.advance(100.0)
    assert manager.evict_idle() == 1
    assert "bad" not in manager


def test_manager_is_bounded_and_evicts_least_recently_used_closed_first() -> None:
    clock = FakeClock()
    config = ResilienceConfig(max_breakers=3, failure_threshold=1, reset_timeout=30.0)  # still open after 3 s
    manager = CircuitBreakerManager(config, clock)
    manager.get("open-1").record_failure()  # least recently used, but open: kept
    clock.advance(1.0)
    manager.get("a")
    clock.advance(1.0)
    manager.get("b")
    clock.advance(1.0)
    manager.get("a")  # now b is the least recently used closed breaker
    manager.get("c")
    assert len(manager) == 3
    assert "b" not in manager
    assert {"open-1", "a", "c"} <= {p for p in ("open-1", "a", "b", "c") if p in manager}
    assert manager.get("open-1").state is OPEN


def test_manager_evicts_the_least_recently_used_when_none_is_closed() -> None:
    clock = FakeClock()
    manager = CircuitBreakerManager(ResilienceConfig(max_breakers=2, failure_threshold=1), clock)
    manager.get("x").record_failure()
    manager.get("y").record_failure()
    manager.get("z")
    assert len(manager) == 2
    assert "x" not in manager
    assert manager.opened == 2  # counters outlive evicted breakers


# --- service --------------------------------------------------------------------------------------------


async def test_success_path_returns_the_result_and_counts() -> None:
    service, _, sleep = make_service()
    op = Script("ok")
    assert await service.call("node-b", op) == "ok"
    assert op.calls == 1
    assert sleep.delays == []
    metrics = service.metrics()
    assert isinstance(metrics, ResilienceMetrics)
    assert (metrics.successes, metrics.failures, metrics.retries, metrics.errors) == (1, 0, 0, 0)
    assert service.breaker("node-b").state is CLOSED


async def test_retriable_errors_are_retried_with_configured_backoff_on_a_fresh_operation() -> None:
    service, _, sleep = make_service(
        max_attempts=4, initial_interval=0.5, max_interval=1.5, failure_threshold=10, max_elapsed=100.0
    )
    reset = ConnectionResetError(errno.ECONNRESET, "reset")
    op = Script(reset, TimeoutError(), asyncio.IncompleteReadError(b"", 4), "ok")
    assert await service.call("node-b", op) == "ok"
    assert op.calls == 4  # operation() called afresh for every attempt
    assert sleep.delays == [0.5, 1.0, 1.5]  # random()=1.0: the ceilings, capped at max_interval
    metrics = service.metrics()
    assert (metrics.retries, metrics.failures, metrics.successes, metrics.errors) == (3, 3, 1, 0)


async def test_jitter_comes_from_the_injected_random() -> None:
    clock = FakeClock()
    sleep = FakeSleep(clock)
    service = ResilienceService(
        ResilienceConfig(initial_interval=1.0, max_interval=8.0, max_attempts=3),
        clock=clock,
        sleep=sleep,
        random=cycle([0.25, 0.75]),
    )
    op = Script(TimeoutError(), TimeoutError(), "ok")
    await service.call("p", op)
    assert sleep.delays == [0.25, 1.5]


async def test_max_attempts_is_honoured_and_the_last_error_raised() -> None:
    service, _, sleep = make_service(max_attempts=5, failure_threshold=100)
    errors = [ConnectionResetError(f"reset {i}") for i in range(6)]
    op = Script(*errors)
    with pytest.raises(ConnectionResetError) as info:
        await service.call("node-b", op)
    assert info.value is errors[4]
    assert op.calls == 5
    assert len(sleep.delays) == 4
    metrics = service.metrics()
    # Five failed attempts against the breaker, but one failed call: retries are not extra errors.
    assert (metrics.failures, metrics.retries, metrics.errors) == (5, 4, 1)


async def test_max_attempts_one_disables_retry() -> None:
    service, _, sleep = make_service(max_attempts=1)
    op = Script(TimeoutError())
    with pytest.raises(TimeoutError):
        await service.call("p", op)
    assert op.calls == 1
    assert sleep.delays == []


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bug"),
        PacketError("bad packet", "truncated"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        NetworkError(ConnectionRefusedError()),
        OSError(errno.ENOENT, "no such file"),
    ],
    ids=repr,
)
async def test_non_retriable_errors_are_not_retried(error: Exception) -> None:
    service, _, sleep = make_service()
    op = Script(error, "ok")
    with pytest.raises(type(error)) as info:
        await service.call("node-b", op)
    assert info.value is error
    assert op.calls == 1
    assert sleep.delays == []
    assert service.metrics().failures == 1


async def test_errors_declaring_themselves_retriable_are_retried() -> None:
    service, _, _ = make_service()
    op = Script(QueueFullError("k", 1), NetworkError(BrokenPipeError(), peer_id="p"), "ok")
    assert await service.call("p", op) == "ok"
    assert op.calls == 3


async def test_total_time_budget_stops_retries() -> None:
    service, clock, _ = make_service(max_attempts=10, initial_interval=1.0, max_interval=1.0, max_elapsed=5.0)
    op = Script(TimeoutError(), clock=clock, takes=1.0)  # each attempt takes 1 s, each backoff 1 s
    with pytest.raises(TimeoutError):
        await service.call("p", op)
    # t=1 fail, sleep -> 2, t=3 fail, sleep -> 4, t=5 fail: another backoff would exceed 5 s.
    assert op.calls == 3
    assert clock.now - 1000.0 == 5.0


async def test_breaker_opening_stops_retries_and_then_rejects() -> None:
    # Binary-exact intervals keep the fake clock's arithmetic exact.
    service, clock, sleep = make_service(
        failure_threshold=2, max_attempts=5, reset_timeout=30.0, initial_interval=0.125
    )
    op = Script(TimeoutError())
    with pytest.raises(TimeoutError):
        await service.call("node-b", op)
    assert op.calls == 2  # the second failure opened the breaker
    assert len(sleep.delays) == 1

    fresh = Script("ok")
    with pytest.raises(CircuitOpenError) as info:
        await service.call("node-b", fresh)
    assert fresh.calls == 0
    assert info.value.peer_id == "node-b"
    assert info.value.retry_after == pytest.approx(30.0)  # opened by the second attempt, just now
    metrics = service.metrics()
    assert (metrics.opened, metrics.rejected) == (1, 1)

    # The open breaker recovers after reset_timeout: two successful probes close it.
    clock.advance(30.0)
    assert await service.call("node-b", fresh) == "ok"
    assert service.breaker("node-b").state is HALF_OPEN
    assert await service.call("node-b", fresh) == "ok"
    assert service.breaker("node-b").state is CLOSED
    metrics = service.metrics()
    assert (metrics.half_opened, metrics.closed) == (1, 1)


async def test_configured_breaker_values_are_used() -> None:
    service, clock, _ = make_service(
        failure_threshold=3, reset_timeout=7.0, success_threshold=1, max_attempts=1
    )
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await service.call("p", Script(TimeoutError()))
    assert service.breaker("p").state is CLOSED
    with pytest.raises(TimeoutError):
        await service.call("p", Script(TimeoutError()))
    assert service.breaker("p").state is OPEN
    clock.advance(6.9)
    with pytest.raises(CircuitOpenError):
        await service.call("p", Script("ok"))
    clock.advance(0.1)
    await service.call("p", Script("ok"))
    assert service.breaker("p").state is CLOSED  # success_threshold=1


async def test_failed_probe_is_not_retried() -> None:
    service, clock, _ = make_service(failure_threshold=1, reset_timeout=1.0)
    with pytest.raises(TimeoutError):
        await service.call("p", Script(TimeoutError()))
    clock.advance(1.0)
    probe = Script(TimeoutError(), "ok")
    with pytest.raises(TimeoutError):
        await service.call("p", probe)
    assert probe.calls == 1
    assert service.breaker("p").state is OPEN


async def test_half_open_admits_one_probe_at_a_time_through_the_service() -> None:
    service, clock, _ = make_service(failure_threshold=1, reset_timeout=1.0)
    with pytest.raises(TimeoutError):
        await service.call("p", Script(TimeoutError()))
    clock.advance(1.0)
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    probe = asyncio.create_task(service.call("p", slow))
    await asyncio.sleep(0)  # one loop iteration: the probe starts and takes the half-open slot
    with pytest.raises(CircuitOpenError) as info:
        await service.call("p", Script("ok"))
    assert info.value.retry_after is None  # half-open, probe slot taken
    gate.set()
    assert await probe == "ok"
    assert await service.call("p", Script("ok")) == "ok"
    assert service.breaker("p").state is CLOSED


async def test_cancellation_is_not_retried_nor_counted_and_releases_the_probe() -> None:
    service, clock, sleep = make_service(failure_threshold=1, reset_timeout=1.0)
    with pytest.raises(TimeoutError):
        await service.call("p", Script(TimeoutError()))
    clock.advance(1.0)
    started = asyncio.Event()
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(service.call("p", hangs))
    await started.wait()
    assert service.breaker("p").probes_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert sleep.delays == []
    breaker = service.breaker("p")
    assert breaker.state is HALF_OPEN
    assert breaker.probes_in_flight == 0
    assert service.metrics().failures == 1  # only the original failure
    assert await service.call("p", Script("ok")) == "ok"  # the slot is free again


async def test_cancellation_during_backoff_propagates() -> None:
    clock = FakeClock()
    backoff_started = asyncio.Event()
    delays: list[float] = []

    async def endless_backoff(delay: float) -> None:
        delays.append(delay)
        backoff_started.set()
        await asyncio.Event().wait()  # only the cancellation ends this backoff

    service = ResilienceService(ResilienceConfig(failure_threshold=10), clock=clock, sleep=endless_backoff)
    op = Script(TimeoutError())
    task = asyncio.create_task(service.call("p", op))
    await backoff_started.wait()
    assert len(delays) == 1
    assert op.calls == 1
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert op.calls == 1
    assert service.metrics().failures == 1


async def test_outcome_of_a_call_admitted_before_the_breaker_opened_is_ignored() -> None:
    service, clock, _ = make_service(failure_threshold=1, reset_timeout=5.0, max_attempts=1)
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "late"

    old = asyncio.create_task(service.call("p", slow))  # admitted while closed
    await asyncio.sleep(0)  # one loop iteration: the call starts and waits on its gate
    with pytest.raises(TimeoutError):
        await service.call("p", Script(TimeoutError()))  # opens the breaker
    clock.advance(5.0)
    probe_gate = asyncio.Event()

    async def probe_op() -> str:
        await probe_gate.wait()
        return "probe"

    probe = asyncio.create_task(service.call("p", probe_op))
    await asyncio.sleep(0)  # one loop iteration: the probe starts and takes the half-open slot
    breaker = service.breaker("p")
    assert breaker.probes_in_flight == 1
    gate.set()
    assert await old == "late"
    # The late success neither took the probe's slot nor counted as a probe success.
    assert breaker.state is HALF_OPEN
    assert breaker.probes_in_flight == 1
    probe_gate.set()
    assert await probe == "probe"


async def test_one_breaker_per_peer_and_repr() -> None:
    service, _, _ = make_service(failure_threshold=1, max_attempts=1)
    with pytest.raises(TimeoutError):
        await service.call("bad", Script(TimeoutError()))
    assert await service.call("good", Script("ok")) == "ok"
    assert service.breaker("bad").state is OPEN
    assert service.breaker("good").state is CLOSED
    assert service.metrics().breakers == 2
    assert "ResilienceService(" in repr(service)


async def test_default_service_uses_default_config() -> None:
    service = ResilienceService()
    assert service.config == ResilienceConfig()
    assert service.policy.max_attempts == 3
    run: Callable[[], Awaitable[int]] = Script(42)  # type: ignore[assignment]
    assert await service.call("p", run) == 42
