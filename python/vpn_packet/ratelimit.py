"""Rate-limited warnings: one line per key and interval, with a count of what was held back.

A refused peer that retries ten times a second, or a scanner hitting the listen port, must be visible in
the log without flooding it: the first event of a key logs at once, later ones within `interval` seconds
are counted, and the next line that gets through says how many were held back. The clock is injected so
that tests need no sleeps.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["LogLimiter"]


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
