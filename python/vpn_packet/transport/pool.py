"""A bounded pool of streams per peer, shaped for how workers use streams.

A `Worker` asks the pool for a stream once and keeps it for as long as it stays healthy (every batch of its
destination goes down the same TCP connection, so nothing is reordered); it gives it back only when a write
failed (`healthy=False`), or when the worker is removed (`healthy=True`). With hundreds of destinations per
peer, lending each connection to one worker at a time would need hundreds of connections - or leave workers
waiting for ever. So the pool lends *leases*: a `PooledStream` is one worker's handle on a shared connection.
Each `write_many` is one contiguous write on the connection, so leases sharing it never interleave inside a
batch, and each worker's packets stay in order.

- At most `max_streams_per_peer` connections per peer (connections being opened count). A lease goes to a
  connection with no lease (reuse of an idle one), else to a new connection while under the bound, else to the
  least loaded connection with fewer than `max_leases_per_stream` leases. When none has room, the caller
  waits (at most `acquire_timeout`, then `ServiceError(TimeoutError)`, retriable) for a release.
- A connection attempt that fails fails the callers waiting for it with the same error (one attempt per
  wave, not one per waiting worker, towards a dead peer).
- A healthy release returns the lease; a connection with no lease left becomes idle and is reused first.
- An unhealthy release closes the connection at once and removes it; the other leases on it fail their next
  write with a `NetworkError` (stream closed: retriable), so their workers move to a fresh connection too.
- Idle connections (no lease) unused for `idle_timeout` seconds are closed by `run_cleanup()`, which a
  background task runs every `cleanup_interval` between `start()` and `stop()`. Connections closed by the
  peer are dropped as soon as they are seen.
- `close_peer(peer_id)` closes a peer's connections, leases or not, gracefully (what is in flight may still
  be acknowledged): the keeper's idle close. `on_demand` (set by the keeper) hears of every `get_stream`: a
  worker wants that peer, which is use.

Metrics: `created`, `reused`, `closed_unhealthy`, `closed_idle`, `in_use` (leases), `idle` (connections
without a lease), and more; see `StreamPoolMetrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vpn_packet import tuning
from vpn_packet._native import split_framed
from vpn_packet.api import Stream, StreamService
from vpn_packet.errors import ServiceError
from vpn_packet.tasks import TaskSet, close_quietly

__all__ = ["PooledStream", "StreamPool", "StreamPoolMetrics"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamPoolMetrics:
    """Counters and gauges of a `StreamPool`.

    `created`: connections opened; `create_failures`: attempts that failed; `reused`: leases served by an
    existing connection; `closed_unhealthy`: connections closed after a failed write; `closed_idle`: closed by
    idle cleanup; `closed_dead`: dropped because the peer closed them; `in_use`: leases out now; `idle`:
    connections with no lease; `streams`: connections open; `waiting`: callers waiting for room;
    `timeouts`: waits that timed out.
    """

    created: int
    create_failures: int
    reused: int
    closed_unhealthy: int
    closed_idle: int
    closed_dead: int
    in_use: int
    idle: int
    streams: int
    waiting: int
    timeouts: int
    peers: int


class _Entry:
    """One pooled connection."""

    __slots__ = ("dead", "idle_since", "leases", "peer_id", "stream")

    def __init__(self, peer_id: str, stream: Stream) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.leases = 0
        self.idle_since = 0.0
        self.dead = False

    def alive(self) -> bool:
        return not self.dead and not getattr(self.stream, "closed", False)


class PooledStream:
    """A lease on a pooled connection; implements `vpn_packet.api.Stream`.

    Writes go straight to the connection. `close()` gives the lease back (healthy) - it does not close the
    shared connection; to report a failure use `StreamPool.release_stream(peer_id, lease, healthy=False)`.
    """

    __slots__ = ("_entry", "_pool", "released")

    def __init__(self, pool: StreamPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self.released = False

    @property
    def peer_id(self) -> str:
        return self._entry.peer_id

    @property
    def stream(self) -> Stream:
        """The underlying connection."""
        return self._entry.stream

    @property
    def closed(self) -> bool:
        """True once released, or when the underlying connection is closed."""
        return self.released or not self._entry.alive()

    async def write(self, packet: bytes) -> Awaitable[int] | None:
        return await self._entry.stream.write(packet)

    async def write_many(self, packets: Sequence[bytes]) -> Awaitable[int] | None:
        """The connection's `write_many`, and its receipt: the pool lends connections, it does not stand
        between a packet and its acknowledgement."""
        return await self._entry.stream.write_many(packets)

    async def write_framed(self, data: bytes, count: int) -> Awaitable[int] | None:
        """The connection's `write_framed` (`count` packets already framed in `data`), and its receipt; for
        a connection without one, its `write_many` of the packets."""
        stream = self._entry.stream
        # getattr, not isinstance: a runtime-checkable Protocol's isinstance walks its members on every call.
        write_framed = getattr(stream, "write_framed", None)
        if write_framed is not None:
            return await write_framed(data, count)  # type: ignore[no-any-return]
        return await stream.write_many(split_framed(data))

    def fast_route(self) -> tuple[Any, int, Callable[[int], None], Any] | None:
        """The connection's fast route (see `TcpStream.fast_route`) while this lease holds it; else None."""
        route_of = getattr(self._entry.stream, "fast_route", None)
        if self.released or route_of is None:
            return None
        route: tuple[Any, int, Callable[[int], None], Any] | None = route_of()
        return route

    async def close(self) -> None:
        """Give the lease back as healthy (idempotent)."""
        self._pool.release_stream(self._entry.peer_id, self, True)

    def __repr__(self) -> str:
        state = "released" if self.released else "leased"
        return f"<PooledStream {state} {self._entry.stream!r}>"


class _Peer:
    __slots__ = ("connecting", "entries", "waiters", "warming")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.connecting = 0
        self.warming = False  # `warm` is opening the peer's first connection: wait for it, open no other
        self.waiters: deque[asyncio.Future[None]] = deque()


class StreamPool:
    """Streams per peer, bounded, shared by leases, with idle cleanup. Implements `StreamPoolService`.

    - `stream_service`: where connections come from (a `TcpStreamService`).
    - `max_streams_per_peer`: connections per peer at most (including those being opened).
    - `max_leases_per_stream`: leases one connection carries at most (None: no limit).
    - `idle_timeout`: seconds a connection with no lease is kept; `cleanup_interval`: how often the
      background task checks (default: a quarter of `idle_timeout`, at most 30 s).
    - `acquire_timeout`: seconds `get_stream` waits for room before failing.
    - `close_timeout`: seconds `stop()` grants each connection to flush and close.
    - `clock`: time source for idleness (default `time.monotonic`).
    """

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {
        "max_streams_per_peer": "max_streams_per_peer",
        "idle_timeout": "stream_idle_timeout",
    }

    def __init__(
        self,
        stream_service: StreamService,
        *,
        max_streams_per_peer: int = tuning.MAX_STREAMS_PER_PEER,
        max_leases_per_stream: int | None = None,
        idle_timeout: float = tuning.STREAM_IDLE_TIMEOUT,
        cleanup_interval: float | None = None,
        acquire_timeout: float = 10.0,
        close_timeout: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        tuning.Tuning.check_fields(
            max_streams_per_peer=max_streams_per_peer, stream_idle_timeout=idle_timeout
        )
        if max_leases_per_stream is not None and max_leases_per_stream < 1:
            raise ValueError(f"max_leases_per_stream must be >= 1 or None, got {max_leases_per_stream!r}")
        if not acquire_timeout > 0:
            raise ValueError("acquire_timeout must be > 0 seconds")
        self.stream_service = stream_service
        self.max_streams_per_peer = max_streams_per_peer
        self.max_leases_per_stream = max_leases_per_stream
        self._lease_cap = math.inf if max_leases_per_stream is None else max_leases_per_stream
        self.idle_timeout = float(idle_timeout)
        self.cleanup_interval = (
            float(cleanup_interval) if cleanup_interval is not None else min(30.0, self.idle_timeout / 4)
        )
        self.acquire_timeout = float(acquire_timeout)
        self.close_timeout = float(close_timeout)
        self._clock = clock if clock is not None else time.monotonic
        self._peers: dict[str, _Peer] = {}
        self._tasks = TaskSet()  # the cleanup loop and background closes: `stop()` ends them all
        self._cleanup_task: asyncio.Task[None] | None = None
        self._closed = False
        #: Called with the peer id of every `get_stream` (a worker wants the peer: it is in use).
        self.on_demand: Callable[[str], object] | None = None
        self.created = 0
        self.create_failures = 0
        self.reused = 0
        self.closed_unhealthy = 0
        self.closed_idle = 0
        self.closed_dead = 0
        self.timeouts = 0

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the idle-cleanup task (idempotent)."""
        if self._closed:
            raise RuntimeError("a stopped StreamPool cannot be restarted")
        if self._cleanup_task is None:
            self._cleanup_task = self._tasks.spawn(self._cleanup_loop())

    async def stop(self) -> None:
        """Stop the cleanup task, fail waiters, close every connection (buffered data is flushed). Leases
        still out fail their next write; releasing them later is harmless. Idempotent."""
        self._closed = True
        task = self._cleanup_task
        self._cleanup_task = None
        if task is not None:
            task.cancel()
        streams: list[Stream] = []
        for peer in self._peers.values():
            for waiter in peer.waiters:
                if not waiter.done():
                    waiter.set_result(None)  # they wake, see the pool closed and raise
            for entry in peer.entries:
                entry.dead = True
                streams.append(entry.stream)
            peer.entries.clear()
        # Graceful closes, all at once, each bounded: buffered packets are flushed before the sockets close.
        # No grace period on top: every close is bounded by `close_timeout` already.
        for stream in streams:
            self._tasks.spawn(close_quietly(stream, self.close_timeout))
        await self._tasks.wait()

    async def __aenter__(self) -> StreamPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval)
            try:
                self.run_cleanup()
            except Exception:  # pragma: no cover - defensive: keep cleaning
                _log.exception("stream pool cleanup failed")

    # --- leasing --------------------------------------------------------------------------------------------

    async def get_stream(self, peer_id: str) -> PooledStream:
        """A lease on a connection to `peer_id`. Raises `ServiceError` when the pool is closed or no room
        frees up within `acquire_timeout`; connection failures propagate (a `NetworkError`)."""
        if self.on_demand is not None:
            self.on_demand(peer_id)
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _Peer()
        deadline: float | None = None
        while True:
            if self._closed:
                raise ServiceError(
                    RuntimeError("stream pool is stopped"), "stream_pool", "get_stream", peer_id=peer_id
                )
            entry = self._pick(peer)
            if entry is not None:
                self.reused += 1
                return self._lease(entry)
            if not peer.warming and len(peer.entries) + peer.connecting < self.max_streams_per_peer:
                return await self._open(peer_id, peer)
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.acquire_timeout
            waiter: asyncio.Future[None] = loop.create_future()
            peer.waiters.append(waiter)
            woken = False
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
                woken = True
            except TimeoutError as exc:
                self.timeouts += 1
                raise ServiceError(
                    TimeoutError(f"no stream to {peer_id} free within {self.acquire_timeout:g}s"),
                    "stream_pool",
                    "get_stream",
                    peer_id=peer_id,
                ) from exc
            finally:
                if not waiter.done():
                    waiter.cancel()
                elif not woken and not waiter.cancelled() and waiter.exception() is None:
                    self._wake(peer)  # woken, but cancelled or timed out before using it: pass it on
                with contextlib.suppress(ValueError):
                    peer.waiters.remove(waiter)

    def _pick(self, peer: _Peer) -> _Entry | None:
        """An idle live connection, else (at the bound) the least loaded one with room; None otherwise."""
        best: _Entry | None = None
        dead = False
        for entry in peer.entries:
            if not entry.alive():
                dead = True
                continue
            if entry.leases == 0:
                best = entry
                break
            if best is None or entry.leases < best.leases:
                best = entry
        if dead:
            self._drop_dead(peer)
        if best is None:
            return None
        if best.leases == 0:
            return best
        if len(peer.entries) + peer.connecting < self.max_streams_per_peer:
            return None  # room for another connection: spread the load
        return best if best.leases < self._lease_cap else None

    async def _open(self, peer_id: str, peer: _Peer) -> PooledStream:
        peer.connecting += 1
        try:
            stream = await self.stream_service.create_stream(peer_id)
        except Exception as exc:
            peer.connecting -= 1
            self.create_failures += 1
            if peer.connecting or any(e.alive() for e in peer.entries):
                self._wake(peer, everyone=True)
            else:  # the waiters were waiting for this very connection: they share its verdict
                self._fail_waiters(peer, exc)
            raise
        except BaseException:
            peer.connecting -= 1
            self._wake(peer, everyone=True)
            raise
        peer.connecting -= 1
        entry = _Entry(peer_id, stream)
        if self._closed:
            self._close_entry(entry)
            raise ServiceError(
                RuntimeError("stream pool is stopped"), "stream_pool", "get_stream", peer_id=peer_id
            )
        self.created += 1
        peer.entries.append(entry)
        lease = self._lease(entry)
        self._wake(peer, everyone=True)  # waiters may share the new connection
        return lease

    def _fail_waiters(self, peer: _Peer, exc: Exception) -> None:
        while peer.waiters:
            waiter = peer.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def _lease(self, entry: _Entry) -> PooledStream:
        entry.leases += 1
        return PooledStream(self, entry)

    def _wake(self, peer: _Peer, *, everyone: bool = False) -> None:
        while peer.waiters:
            waiter = peer.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def release_stream(self, peer_id: str, stream: Stream, healthy: bool) -> None:
        """Give a lease back. Healthy: the connection stays for reuse (idle when no lease is left).
        Unhealthy: the connection is closed and removed (other leases fail over on their next write).
        A second release of the same lease is ignored; a stream that is not a lease of this pool is closed."""
        if not isinstance(stream, PooledStream) or stream._pool is not self:
            self._spawn_close(stream)
            return
        if stream.released:
            return
        stream.released = True
        entry = stream._entry
        entry.leases -= 1
        peer = self._peers.get(entry.peer_id)
        if peer is None or entry not in peer.entries:
            if entry.leases == 0:
                self._close_entry(entry)
            return
        if not healthy or not entry.alive():
            if not entry.dead:
                if healthy:
                    self.closed_dead += 1
                else:
                    self.closed_unhealthy += 1
            peer.entries.remove(entry)
            self._close_entry(entry, reset=not healthy)
            self._wake(peer, everyone=True)  # room for a new connection
            return
        if entry.leases == 0:
            entry.idle_since = self._clock()
        self._wake(peer)

    def _drop_dead(self, peer: _Peer) -> None:
        keep = []
        for entry in peer.entries:
            if entry.alive():
                keep.append(entry)
            else:
                self.closed_dead += 1
                self._close_entry(entry)
        peer.entries[:] = keep

    def _close_entry(self, entry: _Entry, *, reset: bool = False) -> None:
        entry.dead = True
        self._spawn_close(entry.stream, reset=reset)

    def _spawn_close(self, stream: Stream, *, reset: bool = False) -> None:
        """Start closing `stream` without waiting: called from `release_stream`, which is synchronous.

        `reset`: a connection released unhealthy (a write failed on it) is reset at once (`abort()`, where
        the stream has one): the peer discards what it has not taken, as the sender counts it lost, and
        the other leases fail over on their next write. Otherwise (idle, stopped, closed by the peer) the
        full `close()` runs in the background, bounded by `close_timeout` (`stop()` waits for it): a TCP
        stream's waits for the peer to acknowledge what is in flight first, so closing never turns packets
        the peer has into "lost"."""
        abort = getattr(stream, "abort", None) if reset else None
        if abort is not None:
            try:
                abort()
            except Exception:  # pragma: no cover - closing must not raise into callers
                _log.debug("abort failed", exc_info=True)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - release outside a loop: nothing we can await
            return
        self._tasks.spawn(close_quietly(stream, self.close_timeout), loop)

    # --- warm connections -----------------------------------------------------------------------------------

    def keep_alive(self, peer_id: str, keepalive_after: float) -> bool:
        """Whether `peer_id` has a live connection (or one being opened); keeps the first live one from
        being closed as idle (its idle clock restarts), and when nothing was written on it for
        `keepalive_after` seconds makes it send a keepalive frame, so the peer's receiver does not close it
        as idle either. For `vpn_packet.transport.keeper`."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        for entry in peer.entries:
            if entry.alive():
                if entry.leases == 0:
                    entry.idle_since = self._clock()
                keepalive = getattr(entry.stream, "send_keepalive", None)
                if keepalive is not None:
                    keepalive(keepalive_after)
                return True
        return peer.connecting > 0

    async def warm(self, peer_id: str) -> bool:
        """Open a connection to `peer_id` unless it has one: the first packet to a configured peer then finds
        it made and authenticated. Returns True when one was opened; connection failures propagate."""
        if self._closed:
            return False
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _Peer()
        if peer.connecting or any(entry.alive() for entry in peer.entries):
            return False
        # A worker asking meanwhile waits for this connection instead of opening a second one.
        peer.warming = True
        try:
            lease = await self._open(peer_id, peer)
        finally:
            peer.warming = False
        self.release_stream(peer_id, lease, True)
        return True

    def peer_ids(self) -> list[str]:
        """The peers with a connection (open or being opened) or a caller waiting for one: O(those)."""
        return [
            peer_id
            for peer_id, peer in self._peers.items()
            if peer.entries or peer.connecting or peer.waiters
        ]

    def close_peer(self, peer_id: str) -> int:
        """Close every connection to `peer_id`, leased or not, gracefully (`close()`: what is in flight may
        still be acknowledged, bounded by `close_timeout`, then the connection closes; a lease's write after
        that fails as on a closed stream, and its worker moves to a fresh connection). Counted in
        `closed_idle`; returns how many. The keeper's idle close: it turns nothing in flight into "lost"."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return 0
        closed = 0
        for entry in peer.entries:
            if entry.alive():
                closed += 1
            self._close_entry(entry)
        peer.entries.clear()
        self.closed_idle += closed
        self._wake(peer, everyone=True)
        if not peer.connecting and not peer.waiters:
            del self._peers[peer_id]
        return closed

    # --- idle cleanup ---------------------------------------------------------------------------------------

    def run_cleanup(self, now: float | None = None) -> int:
        """Close connections with no lease idle for `idle_timeout` (and drop dead ones); returns how many
        idle connections were closed."""
        if now is None:
            now = self._clock()
        cutoff = now - self.idle_timeout
        closed = 0
        for peer_id, peer in list(self._peers.items()):
            keep = []
            for entry in peer.entries:
                if not entry.alive():
                    self.closed_dead += 1
                    self._close_entry(entry)
                elif entry.leases == 0 and entry.idle_since <= cutoff:
                    closed += 1
                    self._close_entry(entry)
                else:
                    keep.append(entry)
            if len(keep) != len(peer.entries):
                peer.entries[:] = keep
                self._wake(peer, everyone=True)
            if not keep and not peer.connecting and not peer.waiters:
                del self._peers[peer_id]
        self.closed_idle += closed
        return closed

    # --- metrics --------------------------------------------------------------------------------------------

    def streams(self, peer_id: str) -> list[Stream]:
        """The live connections to `peer_id` (for inspection)."""
        peer = self._peers.get(peer_id)
        return [e.stream for e in peer.entries if e.alive()] if peer else []

    def metrics(self) -> StreamPoolMetrics:
        in_use = idle = streams = waiting = 0
        for peer in self._peers.values():
            waiting += len(peer.waiters)
            for entry in peer.entries:
                streams += 1
                in_use += entry.leases
                if entry.leases == 0:
                    idle += 1
        return StreamPoolMetrics(
            created=self.created,
            create_failures=self.create_failures,
            reused=self.reused,
            closed_unhealthy=self.closed_unhealthy,
            closed_idle=self.closed_idle,
            closed_dead=self.closed_dead,
            in_use=in_use,
            idle=idle,
            streams=streams,
            waiting=waiting,
            timeouts=self.timeouts,
            peers=len(self._peers),
        )

    def __repr__(self) -> str:
        m = self.metrics()
        state = "stopped" if self._closed else "running" if self._cleanup_task is not None else "new"
        return (
            f"<StreamPool {state} peers={m.peers} streams={m.streams} in_use={m.in_use} idle={m.idle} "
            f"created={m.created} reused={m.reused} max_per_peer={self.max_streams_per_peer}>"
        )
