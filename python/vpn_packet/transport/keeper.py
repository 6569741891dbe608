"""Which peers have a connection: a few kept warm, the others connected on demand and closed when idle.

Without a kept connection the first packet to a peer waits for TCP connect, TLS and the hello (20-55 ms
measured), and the peer's reply waits for the same in the other direction. With one to every peer, a node
of 10,000 peers holds 10,000 sockets and runs a reconnect loop for each one that is down. So one rule,
for static and discovered peers alike (`ConnectionKeeper.wanted`):

- **warm**: the first `warm_peers` peers (default 8) in the node's order (static peers in config order,
  then discovered ones in the order they joined) are connected from the start and kept, whatever their
  traffic: a small mesh has all its peers warm, so its first packet never waits for a handshake;
- **in use**: a peer with traffic (a packet either way), a worker asking the pool for it, or a connection
  from it to us (`poke`) within the last `idle_close` seconds is kept too (reconnected, kept alive);
- **cold**: any other peer has no connection. Its first packet is queued in its destination worker
  (bounded by `worker_buffer_size`, counted when rejected) while the worker's pool opens one; that makes
  it in use. After `idle_close` seconds without traffic its connections are closed gracefully
  (`StreamPool.close_peer`: what is in flight is still acknowledged, so `lost_in_flight` stays honest),
  and `on_idle_close` tells the node, whose workers give their stream back before their next batch.
  Keepalives are not traffic: they keep a connection open for the peer's receiver, never for us.

Once per `tick` seconds the keeper reads the traffic counters of the peers that have a connection (O(peers
with a connection), never O(peers known)), and for each wanted peer:

- no live connection: a new one (`StreamPool.warm`, in a task: a tick never waits for a connection); a
  failed attempt is retried after a backoff that doubles per failure from `RECONNECT_BACKOFF` up to
  `RECONNECT_BACKOFF_MAX`, with jitter (a peer that is down costs one attempt per backoff, not one per
  packet or per tick);
- a live connection (`StreamPool.keep_alive`) on which nothing was written for `keepalive_interval` seconds
  writes a keepalive frame, so the peer's receiver does not close it as idle (TCP keepalive probes on the
  same interval notice a peer that vanished while nothing was sent).

A peer that connects to us proves it is up and is in use: `poke(peer_id)` (the receiver calls it for every
authenticated connection) tries that peer at once, whatever its backoff, so two nodes started a moment
apart are connected both ways as soon as the second one is up, not a backoff later.

The pool stays the one owner of connections: the keeper only asks it to warm or close a peer. Peers come
from the node at every tick, so a reload's added and removed peers are followed without a call.
"""

from __future__ import annotations

import asyncio
import itertools
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
    """`opened`: connections the keeper opened; `failures`: attempts that failed, by peer; `idle_closed`:
    connections closed because their peer was idle (cold and without traffic for `idle_close`)."""

    opened: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    idle_closed: int = 0


class ConnectionKeeper:
    """Keeps the warm and in-use peers connected and closes the idle ones; see the module docstring.

    - `peers()`: the node's peers in its order (only the first `warm_peers` are read each tick).
    - `traffic(peer_id)`: a count of the packets exchanged with the peer either way, keepalives excluded
      (any number that grows with traffic); None: only `poke` and the pool's demand count as use.
    - `known(peer_id)`: whether it is still a peer (default: in `peers()`, O(n)); a node passes an O(1) one.
    - `on_idle_close(peer_ids)`: called after the connections of idle peers were closed.
    - `on_tick()`: called every tick (the node's failure-log summary).

    `clock` (default: the loop's) and `rng` are injectable for tests; `run_once()` does one tick's work.
    """

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {
        "keepalive_interval": "keepalive_interval",
        "warm_peers": "warm_peers",
        "idle_close": "idle_close",
    }

    def __init__(
        self,
        pool: StreamPool,
        peers: Callable[[], Iterable[str]],
        *,
        traffic: Callable[[str], int] | None = None,
        known: Callable[[str], bool] | None = None,
        on_idle_close: Callable[[list[str]], object] | None = None,
        on_tick: Callable[[], object] | None = None,
        keepalive_interval: float = tuning.KEEPALIVE_INTERVAL,
        warm_peers: int = tuning.WARM_PEERS,
        idle_close: float = tuning.IDLE_CLOSE,
        backoff: float = tuning.RECONNECT_BACKOFF,
        backoff_max: float = tuning.RECONNECT_BACKOFF_MAX,
        tick: float = 1.0,
        clock: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        tuning.Tuning.check_fields(
            keepalive_interval=keepalive_interval, warm_peers=warm_peers, idle_close=idle_close
        )
        tuning.check_idle_close_after_keepalive(idle_close, keepalive_interval)
        self.pool = pool
        self.peers = peers
        self._traffic = traffic
        self._known = known
        self.on_idle_close = on_idle_close
        self.on_tick = on_tick
        self.keepalive_interval = float(keepalive_interval)
        self.warm_peers = int(warm_peers)
        self.idle_close = float(idle_close)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.tick = float(tick)
        #: The keeper's clock (None: the loop's); a test may set one to drive idleness without waiting.
        self.clock = clock
        self._rng = rng
        self._retry_at: dict[str, float] = {}  # peers whose last attempt failed: when to try again
        self._delay: dict[str, float] = {}
        self._connecting: set[str] = set()
        self._attempts: dict[str, asyncio.Task[None]] = {}  # the latest attempt per peer
        self._used: dict[str, float] = {}  # peers in use: when they were last used
        self._seen: dict[str, int] = {}  # traffic count at the last tick, of the peers with a connection
        self._tasks = TaskSet()
        self._loop_task: asyncio.Task[None] | None = None
        self.metrics = KeeperMetrics()
        pool.on_demand = self.use  # a worker asking for a stream: the peer is in use

    def _now(self) -> float:
        return self.clock() if self.clock is not None else asyncio.get_running_loop().time()

    def _is_peer(self, peer_id: str) -> bool:
        return self._known(peer_id) if self._known is not None else peer_id in set(self.peers())

    # --- the rule -------------------------------------------------------------------------------------------

    def warm(self) -> list[str]:
        """The warm peers: the first `warm_peers` of `peers()`."""
        return list(itertools.islice(self.peers(), self.warm_peers))

    def in_use(self) -> list[str]:
        """The peers used within the last `idle_close` seconds (as of the last tick or use)."""
        return list(self._used)

    def wanted(self) -> dict[str, None]:
        """The peers to keep connected: the warm ones, then those in use (an ordered set)."""
        wanted = dict.fromkeys(self.warm())
        wanted.update(dict.fromkeys(self._used))
        return wanted

    def use(self, peer_id: str) -> None:
        """`peer_id` is in use now (a worker wants it, or it connected to us): kept for `idle_close`."""
        if self._loop_task is not None:
            self._used[peer_id] = self._now()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting to the warm peers now, and keep the rule every `tick` seconds."""
        if self._loop_task is None:
            self._loop_task = self._tasks.spawn(self._run())
            self.run_once()

    async def settle(self, timeout: float) -> tuple[int, int]:  # noqa: ASYNC109 - a bound, not a deadline
        """Wait (at most `timeout` seconds) for the connection attempts under way; returns `(connected,
        wanted)` peers (the warm ones and any in use). A node logs that it is running after this, so that
        "running" means the first packet to a reachable warm peer finds its connection made."""
        pending = {task for task in self._attempts.values() if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        wanted = self.wanted()
        connected = sum(1 for peer_id in wanted if self.pool.keep_alive(peer_id, self.keepalive_interval))
        return connected, len(wanted)

    def poke(self, peer_id: str) -> None:
        """`peer_id` just proved it is up (it connected to us): it is in use; try it now, forgetting its
        backoff."""
        if self._loop_task is None or not self._is_peer(peer_id):
            return
        self.use(peer_id)
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
        """One tick: note the traffic, close idle peers, start a connection attempt for every wanted peer due
        one, keepalives on quiet connections. Returns how many attempts were started."""
        now = self._now()
        self._note_traffic(now)
        cutoff = now - self.idle_close
        is_peer = self._known if self._known is not None else set(self.peers()).__contains__
        for peer_id in [p for p, used in self._used.items() if used <= cutoff or not is_peer(p)]:
            del self._used[peer_id]
        wanted = self.wanted()
        self._close_idle(wanted)
        for gone in [peer_id for peer_id in self._retry_at if peer_id not in wanted]:
            del self._retry_at[gone]
            self._delay.pop(gone, None)
        started = 0
        for peer_id in wanted:
            if peer_id in self._connecting or self.pool.keep_alive(peer_id, self.keepalive_interval):
                continue
            if self._retry_at.get(peer_id, now) > now:
                continue
            self._connect(peer_id)
            started += 1
        if self.on_tick is not None:
            self.on_tick()
        return started

    def _note_traffic(self, now: float) -> None:
        """A peer with a connection whose traffic count moved since the last tick is in use now."""
        if self._traffic is None:
            return
        seen: dict[str, int] = {}
        for peer_id in self.pool.peer_ids():
            count = self._traffic(peer_id)
            if self._seen.get(peer_id) != count:
                self._used[peer_id] = now
            seen[peer_id] = count
        self._seen = seen

    def _close_idle(self, wanted: dict[str, None]) -> None:
        """The connections of the peers neither warm nor in use are closed (gracefully)."""
        unwanted = [peer_id for peer_id in self.pool.peer_ids() if peer_id not in wanted]
        closed = {peer_id: self.pool.close_peer(peer_id) for peer_id in unwanted}
        idle = [peer_id for peer_id, n in closed.items() if n]
        if idle:
            self.metrics.idle_closed += sum(closed[peer_id] for peer_id in idle)
            _log.debug("keeper: closed the connections of %d idle peers", len(idle))
            if self.on_idle_close is not None:
                self.on_idle_close(idle)

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
