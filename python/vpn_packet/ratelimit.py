"""Rate-limited warnings: one line per key and interval, with a count of what was held back; and the log of
failed connections to peers, with one budget for all of them and a periodic summary.

A refused peer that retries ten times a second, or a scanner hitting the listen port, must be visible in
the log without flooding it: the first event of a key logs at once, later ones within `interval` seconds
are counted, and the next line that gets through says how many were held back (`LogLimiter`).

A per-key limit is not enough for our own failed connections: with 10,000 peers down, one line per peer and
interval is still a thousand lines a second. `FailureLog` logs a peer's failure when it is new (the peer
was reachable, or failed for another reason), within one budget shared by every peer (a token bucket:
`rate` lines a second on average, `burst` at once), and then, every `summary_interval` while peers are
unreachable, one line that counts them by reason and says how many lines it held back. The per-peer detail
stays where it is cheap to keep: `vpn-packet status` and the Prometheus export.

The clocks are injected so that tests need no sleeps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable

from vpn_packet import tuning

__all__ = ["FailureLog", "LogLimiter"]


class LogLimiter:
    """Logs at most one line per key every `interval` seconds; remembers at most `max_keys` keys (the
    least recently logged are forgotten first, so a flood of distinct keys cannot grow it)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def log(self, level: int, key: Hashable, message: str, *args: object) -> bool:
        """Logs `message % args` unless `key` logged within the interval; True when it was logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        if held:
            message += " (%d more like it in the last %gs)"
            args = (*args, held, self.interval)
        self._logger.log(level, message, *args)
        return True

    def warning(self, key: Hashable, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, message, *args)


class FailureLog:
    """Failed connections to peers, logged with one overall budget and a periodic summary; see the module
    docstring.

    `failed(peer_id, reason, message, *args)` records that `peer_id` is unreachable for `reason` (a short
    kind: `ECONNREFUSED`, `refused:key_mismatch`) and logs `message % args` when the peer's reason is new
    and the budget allows; `succeeded(peer_id)` records that it is reachable again. `tick()` (the node calls
    it every second) logs the summary when one is due. Memory: one entry per unreachable peer.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        rate: float = tuning.FAILURE_LOG_RATE,
        burst: int = tuning.FAILURE_LOG_BURST,
        summary_interval: float = tuning.FAILURE_SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.rate = float(rate)
        self.burst = float(burst)
        self.summary_interval = float(summary_interval)
        self._clock = clock
        self._tokens = self.burst
        self._refilled = clock()
        self._summary_due = self._refilled + self.summary_interval
        self.unreachable: dict[str, str] = {}  # peer id -> the reason of its last failure
        self.held = 0  # lines held back since the last summary
        self._failures = 0  # failures since the last summary (logged or not)
        self.lines = 0  # lines logged, summaries included (for tests and benchmarks)

    def failed(self, peer_id: str, reason: str, message: str, *args: object) -> bool:
        """Records a failure; logs it (WARNING) when it is news and the budget allows. True when logged."""
        self._failures += 1
        news = self.unreachable.get(peer_id) != reason
        self.unreachable[peer_id] = reason
        logged = False
        if news:
            if self._take():
                self._logger.warning(message, *args)
                self.lines += 1
                logged = True
            else:
                self.held += 1
        self.tick()
        return logged

    def succeeded(self, peer_id: str) -> None:
        """`peer_id` is reachable again: it leaves the summary's count."""
        self.unreachable.pop(peer_id, None)

    def forget(self, peer_id: str) -> None:
        """`peer_id` is no longer a peer."""
        self.unreachable.pop(peer_id, None)

    def tick(self) -> bool:
        """Logs the summary when due: every `summary_interval`, when a failure happened since the last one
        (peers that stay down but are not tried any more need no reminder). True when it logged."""
        now = self._clock()
        if now < self._summary_due:
            return False
        self._summary_due = now + self.summary_interval
        if not self._failures:
            return False
        line = self.summary()
        self._failures = 0
        self.held = 0
        self._logger.warning("%s", line)
        self.lines += 1
        return True

    def summary(self) -> str:
        """`3 peers unreachable (ECONNREFUSED 2, ETIMEDOUT 1); 40 lines held back since the last summary`."""
        by_reason = Counter(self.unreachable.values())
        n = len(self.unreachable)
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(by_reason.items()))
        line = f"{n} peer{'' if n == 1 else 's'} unreachable" + (f" ({reasons})" if reasons else "")
        line += f"; {self._failures} failed connection attempts in the last {self.summary_interval:g}s"
        if self.held:
            line += f", {self.held} lines held back"
        return line + " (each peer: vpn-packet status)"

    def _take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
