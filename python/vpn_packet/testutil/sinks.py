"""A receiver sink for tests: records what was delivered, and lets a test wait for it without sleeping."""

from __future__ import annotations

import asyncio

__all__ = ["RecordingSink"]


class RecordingSink:
    """`sink(peer_id, packets)` for a `Receiver`: keeps `(peer_id, packet)` in arrival order; `wait(n)`
    returns once `n` packets arrived (the timeout is a hang guard, not an assertion)."""

    def __init__(self, hang_guard: float = 10.0) -> None:
        self.packets: list[tuple[str, bytes]] = []
        self._changed = asyncio.Condition()
        self._hang_guard = hang_guard

    async def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        self.packets += [(peer_id, p) for p in packets]
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(self._hang_guard), self._changed:
            await self._changed.wait_for(lambda: len(self.packets) >= n)
