"""Giving back to the system the memory a burst of connections freed.

After a flood of connections is over, the receiver holds none of them, yet the process's resident size
stays tens of megabytes above where it was: glibc's malloc keeps what was freed in its heaps for reuse.
asyncio's TLS transports allocate a 256 KiB buffer each; after the first few are freed glibc raises its
mmap threshold and serves the next ones from the heap, where, freed in random order among smaller objects,
they leave free pages that the heap top cannot give back. `malloc_trim(0)` returns every whole free page of
every arena to the kernel, wherever it lies (`release_heap` runs the cycle collector first: closed
transports wait for it). Python's own small-object allocator gives back an arena once it is empty; it is
not what held the memory.

`HeapRelease` decides when: after at least `churn` connections have gone since the last release, once the
pending connections are all gone (the flood is over: `release_soon`), and at most every `interval` seconds
while a long flood goes on (`note_closed`), so that trimming, which walks the heap, stays rare. Where glibc's
`malloc_trim` does not exist (musl, macOS), releasing does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from typing import Final

__all__ = ["HeapRelease", "malloc_trim", "release_heap"]

#: Connections closed between two releases at least: fewer cannot have left much behind (32 TLS buffers
#: are 8 MiB), and a port scanner's lone connections do not make the receiver walk its heap each time.
RELEASE_CHURN: Final = 32
#: Seconds between two releases at least, while connections keep closing.
RELEASE_INTERVAL: Final = 1.0
#: Seconds from "nothing is pending" to the release: the closed connections' transports let go of their
#: buffers a few loop iterations after their tasks end.
RELEASE_DELAY: Final = 0.1


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def malloc_trim() -> bool:
    """glibc's `malloc_trim(0)`: free pages of every malloc arena go back to the kernel. True when memory
    was released; False when there was none or there is no glibc."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def release_heap() -> None:
    """Frees what only reference cycles still hold, then gives the free pages back (`malloc_trim`).

    The cycles matter: Python 3.11's selector transport refers to itself through a bound method
    (`_read_ready_cb`), so every closed connection's transport waits for the cycle collector; and freeing
    them first lets the trim give back the pages they sat in."""
    gc.collect()
    malloc_trim()


class HeapRelease:
    """When to call `release` (default `release_heap`): see the module docstring. `clock` is injectable."""

    def __init__(
        self,
        *,
        churn: int = RELEASE_CHURN,
        interval: float = RELEASE_INTERVAL,
        delay: float = RELEASE_DELAY,
        release: Callable[[], object] = release_heap,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.churn = churn
        self.interval = interval
        self.delay = delay
        self._release = release
        self._clock = clock
        self._closed = 0  # connections gone since the last release
        self._last = clock()
        self._scheduled: asyncio.TimerHandle | None = None
        self.releases = 0

    def note_closed(self, n: int = 1) -> None:
        """`n` connections went; in a long flood, release every `interval` seconds."""
        self._closed += n
        if self._closed >= self.churn and self._clock() - self._last >= self.interval:
            self.release_now()

    def release_soon(self) -> None:
        """Nothing is pending any more: release `delay` seconds later (once the closed connections'
        transports are gone) when enough connections went since the last release."""
        if self._closed >= self.churn and self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_later(self.delay, self._release_scheduled)

    def _release_scheduled(self) -> None:
        self._scheduled = None
        self.release_now()

    def cancel(self) -> None:
        """Drop a release that `release_soon` scheduled (the receiver stopped)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def release_now(self) -> None:
        """Release whatever was freed, now."""
        self.cancel()
        self._closed = 0
        self._last = self._clock()
        self.releases += 1
        self._release()
