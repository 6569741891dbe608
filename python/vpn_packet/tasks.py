"""Background tasks and stream closes: what the dispatcher, its workers and the stream pool share.

One mechanism for "tasks started from synchronous code that `stop()` must end" (`TaskSet`) and one way to
close a stream nobody waits for (`close_quietly`), so that every owner ends its tasks and streams the same
way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from vpn_packet.api import Stream

__all__ = ["TaskSet", "close_quietly"]

_log = logging.getLogger(__name__)


class TaskSet:
    """The background tasks of one owner (a dispatcher, a stream pool), so that its `stop()` can end them all.

    Why not `asyncio.TaskGroup`: these tasks are started from synchronous code (`dispatch_packet`, a loop
    callback, `release_stream`) at any time between the owner's `start()` and `stop()`, two separate
    coroutines, so no ``async with`` block spans their lifetime; and a TaskGroup cancels every task when one
    fails, whereas here one stuck or failing destination must not touch the others. What a TaskGroup gives
    and we keep: a strong reference to each task until it ends (the loop holds only weak ones, so an
    unreferenced task can be garbage-collected mid-flight), errors that are reported rather than lost, and a
    `close()` that leaves no task behind.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(
        self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Task[None]:
        """Run `coro` as a task of this set (on `loop`, default the running loop); callable from sync code."""
        task = (loop if loop is not None else asyncio.get_running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Nobody awaits these tasks for a result: an escaped error is a bug, to be seen in the logs.
            _log.error("background task %r failed", task, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"<TaskSet {self._tasks!r}>"

    def cancel(self) -> None:
        """Request cancellation of every task (they end at their next suspension point)."""
        for task in self._tasks:
            task.cancel()

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a bound, like stop()
        """Wait until the tasks running now have ended, at most `timeout` seconds; True if they all did."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def close(self, grace: float) -> None:
        """End every task: let them finish for `grace` seconds, then cancel the rest and grant them `grace`
        more. Tasks that ignore even that are logged (and stay referenced here), not waited for forever."""
        if await self.wait(grace):
            return
        self.cancel()
        if not await self.wait(grace):
            _log.warning("%d background task(s) ignored cancellation: %r", len(self._tasks), self._tasks)


async def close_quietly(stream: Stream, close_timeout: float | None = None) -> None:
    """Close `stream` in the background: a failure is logged, not raised, and the stream aborted if it can be.

    Why quietly: nobody awaits a background close for its result, and a stream being given up on (failed,
    idle, or at stop) has nothing left to report. With `close_timeout`, a close that takes longer (a peer
    that stops reading while buffered data is flushed) is abandoned, so that a `stop()` waiting for it is
    bounded.
    """
    try:
        async with asyncio.timeout(close_timeout):
            await stream.close()
    except Exception:
        _log.debug("closing %r failed", stream, exc_info=True)
        abort: Callable[[], object] | None = getattr(stream, "abort", None)
        if abort is not None:
            abort()
