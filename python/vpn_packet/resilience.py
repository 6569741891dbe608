"""Circuit breaking and retry for calls to peers.

One `CircuitBreaker` per peer (kept by a bounded `CircuitBreakerManager`) stops hammering a peer that keeps
failing, and lets it recover: after `reset_timeout` seconds open, a limited number of probe calls go through
(half-open) and `success_threshold` successful probes close it again. `RetryPolicy` retries retriable errors
(timeouts, resets, closed streams; see `vpn_packet.errors.is_retriable_error`) with full-jitter exponential
backoff, bounded in attempts and in total time. `ResilienceService.call` combines both for one operation.

Everything runs on one event loop, so there are no locks. Clock, sleep and random source are injected (tests
never sleep for real). On the success path a call costs a clock read, a dictionary lookup and a few attribute
updates; the retry machinery only runs once an attempt has failed.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import random as _random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from vpn_packet.errors import CircuitOpenError, is_retriable_error

__all__ = [
    "CircuitBreaker",
    "CircuitBreakerManager",
    "CircuitState",
    "ResilienceConfig",
    "ResilienceMetrics",
    "ResilienceService",
    "RetryPolicy",
]

_T = TypeVar("_T")

Clock = Callable[[], float]
TransitionListener = Callable[["CircuitBreaker", "CircuitState", "CircuitState"], None]


def _require_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


def _require_seconds(owner: str, name: str, value: object, *, positive: bool, infinite: bool = False) -> None:
    ok = False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        ok = (value > 0 if positive else value >= 0) and (infinite or math.isfinite(value))
    if not ok:
        bound = "> 0" if positive else ">= 0"
        kind = "a number of seconds" if infinite else "a finite number of seconds"
        raise ValueError(f"{owner}.{name} must be {kind} {bound}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ResilienceConfig:
    """Breaker and retry settings, in seconds. Every value here is the one used.

    - `failure_threshold`: consecutive failures that open a peer's breaker.
    - `reset_timeout`: how long a breaker stays open before admitting probes (half-open). 2 s: the
      breaker's job is to stop hammering a failing peer (a connect attempt per packet batch), and one probe
      every 2 s is not hammering; a longer wait only delays a peer that is back (with 30 s, a peer that came
      up just after the node was first used half a minute later, and every packet meanwhile failed
      `circuit_open`). So a peer back within a few seconds is used within a few seconds. The node uses this
      default too (`vpn_packet.tuning.NODE_RESILIENCE`, `[resilience] reset_timeout`).
    - `success_threshold`: successful probes that close a half-open breaker.
    - `max_attempts`: attempts per call, the first one included (1 disables retry).
    - `initial_interval`, `max_interval`: backoff ceiling for retry n is
      `min(max_interval, initial_interval * 2**n)`; the actual delay is uniform below it (full jitter).
    - `half_open_max_probes`: calls admitted at once while half-open.
    - `max_elapsed`: total time budget of one call, retries and backoff included (may be `inf`).
    - `max_breakers`: breakers kept at most; `breaker_idle_timeout`: unused breakers are dropped after this.
    """

    failure_threshold: int = 5
    reset_timeout: float = 2.0
    success_threshold: int = 2
    max_attempts: int = 3
    initial_interval: float = 0.1
    max_interval: float = 2.0
    half_open_max_probes: int = 1
    max_elapsed: float = 10.0
    max_breakers: int = 10_000
    breaker_idle_timeout: float = 600.0

    def __post_init__(self) -> None:
        owner = "ResilienceConfig"
        _require_int(owner, "failure_threshold", self.failure_threshold, 1)
        _require_seconds(owner, "reset_timeout", self.reset_timeout, positive=False)
        _require_int(owner, "success_threshold", self.success_threshold, 1)
        _require_int(owner, "max_attempts", self.max_attempts, 1)
        _require_seconds(owner, "initial_interval", self.initial_interval, positive=False)
        _require_seconds(owner, "max_interval", self.max_interval, positive=False)
        if self.max_interval < self.initial_interval:
            raise ValueError(
                f"{owner}.max_interval must be >= initial_interval ({self.initial_interval!r}), "
                f"got {self.max_interval!r}"
            )
        _require_int(owner, "half_open_max_probes", self.half_open_max_probes, 1)
        _require_seconds(owner, "max_elapsed", self.max_elapsed, positive=True, infinite=True)
        _require_int(owner, "max_breakers", self.max_breakers, 1)
        _require_seconds(
            owner, "breaker_idle_timeout", self.breaker_idle_timeout, positive=True, infinite=True
        )


class CircuitState(enum.Enum):
    """State of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN
_HALF_OPEN: Final = CircuitState.HALF_OPEN


class CircuitBreaker:
    """Per-peer circuit breaker: closed -> open -> half-open -> closed (or back to open).

    - closed: every call is allowed; `failure_threshold` consecutive failures open it.
    - open: calls are rejected; after `reset_timeout` seconds it turns half-open (lazily, when looked at).
    - half-open: up to `half_open_max_probes` calls at once are allowed as probes; `success_threshold`
      successes close it, any failure re-opens it. A probe that never reports back (a lost task) stops
      counting after `reset_timeout`, so a breaker cannot stay stuck.

    Outcomes reported while open are ignored (they belong to calls admitted before it opened). Use `allow()`
    before a call and exactly one of `record_success()`, `record_failure()` or `release_probe()` (the call was
    cancelled, no verdict) after it. Not thread-safe: one event loop.
    """

    __slots__ = (
        "_clock",
        "_epoch",
        "_failure_threshold",
        "_failures",
        "_last_used",
        "_listener",
        "_max_probes",
        "_opened_at",
        "_probe_at",
        "_probes",
        "_reset_timeout",
        "_state",
        "_success_threshold",
        "_successes",
        "name",
    )

    def __init__(
        self,
        config: ResilienceConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        name: str = "",
        on_transition: TransitionListener | None = None,
    ) -> None:
        config = config if config is not None else ResilienceConfig()
        self.name = name
        self._clock = clock
        self._failure_threshold = config.failure_threshold
        self._reset_timeout = config.reset_timeout
        self._success_threshold = config.success_threshold
        self._max_probes = config.half_open_max_probes
        self._listener = on_transition
        self._state = _CLOSED
        self._epoch = 0  # bumped on every transition; lets callers spot outcomes from an earlier period
        self._failures = 0  # consecutive failures while closed
        self._successes = 0  # successful probes while half-open
        self._probes = 0  # probes in flight while half-open
        self._opened_at = 0.0
        self._probe_at = 0.0
        self._last_used = 0.0  # maintained by CircuitBreakerManager

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose `reset_timeout` has elapsed turns half-open here."""
        if self._state is _OPEN and self._clock() - self._opened_at >= self._reset_timeout:
            self._transition(_HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    @property
    def probes_in_flight(self) -> int:
        """Probe calls admitted in half-open state that have not reported yet."""
        return self._probes

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open state this takes a probe slot if one is free."""
        state = self._state
        if state is _CLOSED:
            return True
        now = self._clock()
        if state is _OPEN:
            if now - self._opened_at < self._reset_timeout:
                return False
            self._transition(_HALF_OPEN)
        if self._probes >= self._max_probes:
            if now - self._probe_at < self._reset_timeout:
                return False
            self._probes = 0  # the probes in flight never reported back: stop waiting for them
        self._probes += 1
        self._probe_at = now
        return True

    def record_success(self) -> None:
        """A call succeeded: resets the failure count, or counts towards closing a half-open breaker."""
        if self._state is _CLOSED:
            self._failures = 0
            return
        if self.state is _HALF_OPEN:
            if self._probes:
                self._probes -= 1
            self._successes += 1
            if self._successes >= self._success_threshold:
                self._transition(_CLOSED)

    def record_failure(self) -> None:
        """A call failed: counts towards opening a closed breaker, re-opens a half-open one."""
        if self._state is _CLOSED:
            self._failures += 1
            if self._failures >= self._failure_threshold:
                self._transition(_OPEN)
            return
        if self.state is _HALF_OPEN:
            self._transition(_OPEN)

    def release_probe(self) -> None:
        """Give back a probe slot without a verdict (the probe call was cancelled)."""
        if self._state is _HALF_OPEN and self._probes:
            self._probes -= 1

    def retry_after(self) -> float | None:
        """Seconds until an open breaker admits a probe; None when it is not open."""
        if self.state is _OPEN:
            return max(0.0, self._opened_at + self._reset_timeout - self._clock())
        return None

    def reset(self) -> None:
        """Force the breaker closed, forgetting failures (an operator override)."""
        if self._state is not _CLOSED:
            self._transition(_CLOSED)
        self._failures = 0

    def _transition(self, new: CircuitState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._failures = 0
        self._successes = 0
        self._probes = 0
        if new is _OPEN:
            self._opened_at = self._clock()
        if self._listener is not None:
            self._listener(self, old, new)

    def __repr__(self) -> str:
        detail = {
            _CLOSED: f"failures={self._failures}/{self._failure_threshold}",
            _OPEN: f"opened_at={self._opened_at:.3f}, reset_timeout={self._reset_timeout}",
            _HALF_OPEN: (
                f"probes={self._probes}/{self._max_probes}, "
                f"successes={self._successes}/{self._success_threshold}"
            ),
        }[self._state]
        return f"CircuitBreaker(name={self.name!r}, state={self._state.value}, {detail})"


class CircuitBreakerManager:
    """One `CircuitBreaker` per peer id, created on first use.

    Bounded: at most `max_breakers` are kept. Breakers unused for `breaker_idle_timeout` seconds are dropped
    (checked every quarter of that timeout during `get`, or on `evict_idle()`), except open ones still in
    their `reset_timeout`. When full, a new peer first evicts idle breakers, then the least recently used
    closed one (looking at the `_EVICTION_SCAN` least recently used), else the least recently used of all.
    Counts transitions over all breakers, evicted ones included.
    """

    _EVICTION_SCAN: Final = 64

    __slots__ = (
        "_breakers",
        "_clock",
        "_config",
        "_next_sweep",
        "_sweep_interval",
        "closed",
        "evicted",
        "half_opened",
        "opened",
    )

    def __init__(self, config: ResilienceConfig | None = None, clock: Clock = time.monotonic) -> None:
        self._config = config if config is not None else ResilienceConfig()
        self._clock = clock
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()  # least recently used first
        self._sweep_interval = self._config.breaker_idle_timeout / 4
        self._next_sweep = clock() + self._sweep_interval
        self.opened = 0
        self.closed = 0
        self.half_opened = 0
        self.evicted = 0

    @property
    def config(self) -> ResilienceConfig:
        return self._config

    def get(self, peer_id: str) -> CircuitBreaker:
        """The breaker of `peer_id`, created closed if there is none; marks it used now."""
        return self._get_at(peer_id, self._clock())

    def peek(self, peer_id: str) -> CircuitBreaker | None:
        """The breaker of `peer_id` if there is one, without creating it or marking it used."""
        return self._breakers.get(peer_id)

    def _get_at(self, peer_id: str, now: float) -> CircuitBreaker:
        breaker = self._breakers.get(peer_id)
        if breaker is None:
            return self._create(peer_id, now)
        breaker._last_used = now
        self._breakers.move_to_end(peer_id)
        if now >= self._next_sweep:
            self.evict_idle(now)
        return breaker

    def _create(self, peer_id: str, now: float) -> CircuitBreaker:
        if now >= self._next_sweep:
            self.evict_idle(now)
        if len(self._breakers) >= self._config.max_breakers:
            self.evict_idle(now)
            if len(self._breakers) >= self._config.max_breakers:
                self._evict_one()
        breaker = CircuitBreaker(self._config, clock=self._clock, name=peer_id, on_transition=self._count)
        breaker._last_used = now
        self._breakers[peer_id] = breaker
        return breaker

    def evict_idle(self, now: float | None = None) -> int:
        """Drop breakers idle longer than `breaker_idle_timeout`; returns how many.

        Open breakers still within their `reset_timeout` stay, so eviction never cuts an open period short.
        """
        if now is None:
            now = self._clock()
        self._next_sweep = now + self._sweep_interval
        cutoff = now - self._config.breaker_idle_timeout
        victims = []
        for peer_id, breaker in self._breakers.items():
            if breaker._last_used > cutoff:
                break  # least recently used first: the rest are fresher
            if breaker._state is _OPEN and now - breaker._opened_at < breaker._reset_timeout:
                continue
            victims.append(peer_id)
        for peer_id in victims:
            del self._breakers[peer_id]
        self.evicted += len(victims)
        return len(victims)

    def _evict_one(self) -> None:
        candidates = itertools.islice(self._breakers.items(), self._EVICTION_SCAN)
        victim = next((peer_id for peer_id, b in candidates if b._state is _CLOSED), None)
        if victim is None:
            victim = next(iter(self._breakers))
        del self._breakers[victim]
        self.evicted += 1

    def _count(self, breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        if new is _OPEN:
            self.opened += 1
        elif new is _CLOSED:
            self.closed += 1
        else:
            self.half_opened += 1

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._breakers

    def __repr__(self) -> str:
        return (
            f"CircuitBreakerManager(breakers={len(self._breakers)}/{self._config.max_breakers}, "
            f"opened={self.opened}, closed={self.closed}, evicted={self.evicted})"
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time.

    `backoff(n)` is the delay before retry n (n = 0 before the first retry): uniform in
    `[0, min(max_interval, initial_interval * 2**n)]`. `retriable(error)` says whether an error is worth
    another attempt (default: `is_retriable_error`).
    """

    max_attempts: int = 3
    initial_interval: float = 0.1
    max_interval: float = 2.0
    max_elapsed: float = 10.0
    random: Callable[[], float] = _random.random
    retriable: Callable[[BaseException], bool] = is_retriable_error

    def __post_init__(self) -> None:
        owner = "RetryPolicy"
        _require_int(owner, "max_attempts", self.max_attempts, 1)
        _require_seconds(owner, "initial_interval", self.initial_interval, positive=False)
        _require_seconds(owner, "max_interval", self.max_interval, positive=False)
        _require_seconds(owner, "max_elapsed", self.max_elapsed, positive=True, infinite=True)

    @classmethod
    def from_config(
        cls, config: ResilienceConfig, random: Callable[[], float] = _random.random
    ) -> RetryPolicy:
        """The retry policy that `config` describes."""
        return cls(
            config.max_attempts, config.initial_interval, config.max_interval, config.max_elapsed, random
        )

    def ceiling(self, attempt: int) -> float:
        """Largest delay before retry `attempt` (0-based)."""
        return min(self.max_interval, self.initial_interval * 2.0 ** min(attempt, 64))

    def backoff(self, attempt: int) -> float:
        """Delay before retry `attempt` (0-based): uniform in `[0, ceiling(attempt)]`."""
        return self.random() * self.ceiling(attempt)


@dataclass(frozen=True, slots=True)
class ResilienceMetrics:
    """Counters of a `ResilienceService`.

    `opened`/`closed`/`half_opened`: breaker transitions. `rejected`: calls refused up front by an open
    breaker (`CircuitOpenError`). `retries`: attempts after the first. `successes`: calls that succeeded.
    `failures`: failed attempts (each counted against the breaker) - not failed calls, which are `errors`.
    `breakers`: breakers currently kept; `evicted`: breakers dropped.
    """

    opened: int
    closed: int
    half_opened: int
    rejected: int
    retries: int
    successes: int
    failures: int
    errors: int
    breakers: int
    evicted: int


class ResilienceService:
    """Circuit breaking per peer plus retry, for operations towards peers.

    `await call(peer_id, operation)` rejects at once with `CircuitOpenError` if the peer's breaker is open;
    otherwise awaits `operation()` - called afresh for each attempt, so it can fetch a fresh stream - and
    retries retriable errors with backoff while attempts, time budget and the breaker allow. Cancellation is
    neither retried nor counted as a failure.
    """

    __slots__ = (
        "_clock",
        "_errors",
        "_failures",
        "_rejected",
        "_retries",
        "_sleep",
        "_successes",
        "breakers",
        "config",
        "policy",
    )

    def __init__(
        self,
        config: ResilienceConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.config = config if config is not None else ResilienceConfig()
        self.policy = RetryPolicy.from_config(self.config, random)
        self.breakers = CircuitBreakerManager(self.config, clock)
        self._clock = clock
        self._sleep = sleep
        self._rejected = 0
        self._retries = 0
        self._successes = 0
        self._failures = 0
        self._errors = 0

    def breaker(self, peer_id: str) -> CircuitBreaker:
        """The circuit breaker of `peer_id` (created closed on first use)."""
        return self.breakers.get(peer_id)

    async def call(self, peer_id: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Run `operation()` towards `peer_id` under its breaker, retrying retriable errors.

        Raises `CircuitOpenError` without calling `operation` if the breaker rejects the call; otherwise
        returns the first successful result or raises the last error.
        """
        start = self._clock()
        breaker = self.breakers._get_at(peer_id, start)
        if not breaker.allow():
            self._rejected += 1
            raise CircuitOpenError(peer_id, breaker.retry_after())
        epoch = breaker._epoch
        try:
            result = await operation()
        except Exception as exc:
            error = exc
        except BaseException:
            _abandon(breaker, epoch)
            raise
        else:
            if breaker._epoch == epoch:
                breaker.record_success()
            self._successes += 1
            return result
        return await self._retry(breaker, epoch, operation, error, start)

    async def _retry(
        self,
        breaker: CircuitBreaker,
        epoch: int,
        operation: Callable[[], Awaitable[_T]],
        error: Exception,
        start: float,
    ) -> _T:
        """The failure path of `call`: record, then retry while allowed."""
        policy = self.policy
        attempts = 1
        while True:
            self._failures += 1
            if breaker._epoch == epoch:  # else: the outcome of a period the breaker has left
                breaker.record_failure()
            if attempts >= policy.max_attempts or breaker._state is _OPEN or not policy.retriable(error):
                break
            delay = policy.backoff(attempts - 1)
            if self._clock() - start + delay > policy.max_elapsed:
                break
            await self._sleep(delay)
            if not breaker.allow():
                break
            epoch = breaker._epoch
            attempts += 1
            self._retries += 1
            try:
                result = await operation()
            except Exception as exc:
                error = exc
                continue
            except BaseException:
                _abandon(breaker, epoch)
                raise
            if breaker._epoch == epoch:
                breaker.record_success()
            self._successes += 1
            return result
        self._errors += 1
        raise error

    def metrics(self) -> ResilienceMetrics:
        """A snapshot of the counters."""
        manager = self.breakers
        return ResilienceMetrics(
            opened=manager.opened,
            closed=manager.closed,
            half_opened=manager.half_opened,
            rejected=self._rejected,
            retries=self._retries,
            successes=self._successes,
            failures=self._failures,
            errors=self._errors,
            breakers=len(manager),
            evicted=manager.evicted,
        )

    def __repr__(self) -> str:
        return (
            f"ResilienceService(breakers={len(self.breakers)}, successes={self._successes}, "
            f"failures={self._failures}, retries={self._retries}, rejected={self._rejected})"
        )


def _abandon(breaker: CircuitBreaker, epoch: int) -> None:
    """A call admitted in `epoch` ended without a verdict (cancelled): give its probe slot back."""
    if breaker._epoch == epoch and breaker._state is _HALF_OPEN:
        breaker.release_probe()
