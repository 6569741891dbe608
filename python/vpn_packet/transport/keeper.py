"""Connections to configured peers, made at start and kept: the first packet never waits for a handshake.

Without it a node connects on demand: the first packet to a peer waits for TCP connect, TLS and the hello
(20-55 ms measured), and the peer's reply waits for the same in the other direction. The keeper opens one
connection per configured peer when the node starts, and then, once per `tick` seconds:

- a peer with no live connection gets a new one (`StreamPool.warm`, in a task: a tick never waits for a
  connection); a failed attempt is retried after a
  backoff that doubles per failure from `RECONNECT_BACKOFF` up to `RECONNECT_BACKOFF_MAX`, with jitter (a
  peer that is down costs one attempt per backoff, not one per packet or per tick);
- a live connection (`StreamPool.keep_alive`) on which nothing was written for `keepalive_interval` seconds
  writes a keepalive frame,
  so the peer's receiver does not close it as idle (TCP keepalive probes on the same interval notice a
  peer that vanished while nothing was sent).

A peer that connects to us proves it is up: `poke(peer_id)` (the receiver calls it for every authenticated
connection) tries that peer at once, whatever its backoff, so two nodes started a moment apart are
connected both ways as soon as the second one is up, not a backoff later.

The pool stays the one owner of connections: the keeper only asks it to warm a peer. Peers come from the
discovery at every tick, so a reload's added and removed peers are followed without a call.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from vpn_packet import tuning
from vpn_packet.errors import VpnPacketError
from vpn_packet.tasks import TaskSet
from vpn_packet.transport.pool import StreamPool

__all__ = ["ConnectionKeeper", "KeeperMetrics"]

_log = logging.getLogger(__name__)


@dataclass
class KeeperMetrics:
    """`opened`: connections the keeper opened; `failures`: attempts that failed, by peer."""

    opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class ConnectionKeeper:
    """Keeps a connection open to every peer `peers()` names; see the module docstring.

    `clock` (default: the loop's) and `rng` are injectable for tests; `run_once()` does one tick's work.
    """

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {"keepalive_interval": "keepalive_interval"}

    def __init__(
        self,
        pool: StreamPool,
        peers: Callable[[], Iterable[str]],
        *,
        keepalive_interval: float = tuning.KEEPALIVE_INTERVAL,
        backoff: float = tuning.RECONNECT_BACKOFF,
        backoff_max: float = tuning.RECONNECT_BACKOFF_MAX,
        tick: float = 1.0,
        clock: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        tuning.Tuning.check_fields(keepalive_interval=keepalive_interval)
        self.pool = pool
        self.peers = peers
        self.keepalive_interval = float(keepalive_interval)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.tick = float(tick)
        self._clock = clock
        self._rng = rng
        self._retry_at: dict[str, float] = {}  # peers whose last attempt failed: when to try again
        self._delay: dict[str, float] = {}
        self._connecting: set[str] = set()
        self._attempts: dict[str, asyncio.Task[None]] = {}  # the latest attempt per peer
        self._tasks = TaskSet()
        self._loop_task: asyncio.Task[None] | None = None
        self.metrics = KeeperMetrics()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def start(self) -> None:
        """Start connecting to every peer now, and keep doing so every `tick` seconds."""
        if self._loop_task is None:
            self.run_once()
            self._loop_task = self._tasks.spawn(self._run())

    async def settle(self, timeout: float) -> tuple[int, int]:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait (at most `timeout` seconds) for the connection attempts under way; returns `(connected,
        configured)` peers. A node logs that it is running after this, so that "running" means the first
        packet to a reachable peer finds its connection made."""
        pending = {task for task in self._attempts.values() if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        wanted = list(self.peers())
        connected = sum(1 for peer_id in wanted if self.pool.keep_alive(peer_id, self.keepalive_interval))
        return connected, len(wanted)

    def poke(self, peer_id: str) -> None:
        """`peer_id` just proved it is up (it connected to us): try it now, forgetting its backoff."""
        if self._loop_task is None or peer_id not in set(self.peers()):
            return
        self._retry_at.pop(peer_id, None)
        self._delay.pop(peer_id, None)
        if peer_id not in self._connecting and not self.pool.keep_alive(peer_id, self.keepalive_interval):
            self._connect(peer_id)

    async def stop(self) -> None:
        """Stop; connection attempts under way are cancelled (the pool closes what they made)."""
        self._tasks.cancel()
        await self._tasks.wait()
        self._loop_task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.run_once()

    def run_once(self) -> int:
        """One tick: start a connection attempt for every peer due one; keepalives on quiet connections.
        Returns how many attempts were started."""
        now = self._now()
        started = 0
        wanted = set(self.peers())
        for gone in set(self._retry_at) - wanted:
            del self._retry_at[gone]
            self._delay.pop(gone, None)
        for peer_id in wanted:
            if peer_id in self._connecting or self.pool.keep_alive(peer_id, self.keepalive_interval):
                continue
            if self._retry_at.get(peer_id, now) > now:
                continue
            self._connect(peer_id)
            started += 1
        return started

    def _connect(self, peer_id: str) -> None:
        self._connecting.add(peer_id)
        self._attempts[peer_id] = self._tasks.spawn(self._warm(peer_id))

    async def _warm(self, peer_id: str) -> None:
        try:
            opened = await self.pool.warm(peer_id)
        except (VpnPacketError, OSError) as exc:
            self.metrics.failures[peer_id] = self.metrics.failures.get(peer_id, 0) + 1
            delay = min(self._delay.get(peer_id, self.backoff / 2) * 2, self.backoff_max)
            self._delay[peer_id] = delay
            self._retry_at[peer_id] = self._now() + delay * (0.5 + self._rng() / 2)
            _log.debug("keeper: %s unreachable (%s); next attempt in about %.1fs", peer_id, exc, delay)
        else:
            self._retry_at.pop(peer_id, None)
            self._delay.pop(peer_id, None)
            if opened:
                self.metrics.opened += 1
        finally:
            self._connecting.discard(peer_id)
            self._attempts.pop(peer_id, None)
