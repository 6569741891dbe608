"""Per-destination workers: an ordered queue for one sync key, drained in batches to a peer's stream.

A `Worker` is a plain object (slots), not a task: an idle worker costs a few hundred bytes and no scheduling
at all. Its packets wait in the native per-destination queues (`vpn_packet._native.DestinationQueues`, shared
by the workers of a dispatcher, keyed by sync key), already framed for the wire in one buffer per worker: no
Python object per packet. The dispatcher routes packets there and marks the worker busy; a pump of the
dispatcher then runs `Worker.drain()`, which takes everything queued at once (one framed buffer) and writes it
with one call per batch, until the queue is empty: `write_framed(data, count)` when the stream has it (the
TCP stream sends the buffer as it is), else `write_many` with the packets split back out (the `Stream`
protocol). Only one drain runs per worker at a time, so packets of one key reach the stream in dispatch order.

A drain looks the peer up (`PeerDiscovery.get_peer_id`, cached per worker), then writes through the
`ResilienceService`: the peer's circuit breaker may reject the batch at once, and retriable errors are retried
on a fresh stream (a failed stream is released as unhealthy). A batch that still fails fails its packets;
retries are not counted as errors. After `max_consecutive_failures` failed batches in a row, the worker is
recycled: it forgets its peer id and stream and looks both up again.

A worker keeps its stream while writes on it succeed (so its packets never race each other over two
connections) and gives it back, healthy, when it is removed (idle cleanup, eviction, `stop()`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from vpn_packet._native import (
    LENGTH_PREFIX_LEN,
    DestinationQueues,
    FastCounters,
    framed_payload_bytes,
    framed_without,
    split_framed,
)
from vpn_packet.api import PeerDiscovery, Stream, StreamPoolService, StreamService
from vpn_packet.errors import (
    CircuitOpenError,
    DispatcherStoppedError,
    NetworkError,
    PeerNotFoundError,
    ServiceError,
    VpnPacketError,
    is_handshake_refused_error,
    is_network_error,
)
from vpn_packet.metrics import DISCARD_REASONS, FAILURE_REASONS, WorkerMetrics
from vpn_packet.tasks import close_quietly
from vpn_packet.types import QueuedPacket

# `WorkerMetrics` is defined in `vpn_packet.metrics` (plain data that depends on nothing here) and is
# re-exported here, where the contract (docs/library.md) names it.
__all__ = ["Worker", "WorkerMetrics"]

_CREATE = ("stream_service", "create_stream")
_STREAM_SERVICES = ("stream_pool", "stream_service")

_log = logging.getLogger(__name__)


class _Resilience(Protocol):
    async def call(self, peer_id: str, operation: Callable[[], Awaitable[None]]) -> None: ...


class WorkerContext:
    """What the workers of one dispatcher share: services, settings and outcome counters.

    Counters: `sent`/`bytes_sent` (acknowledged by the peer, or written on a stream without acks),
    `unacknowledged` (written, waiting for the peer's ack: its receipts are in `receipts`), `failed` and
    `discarded` (per reason), `recycled`. `busy` is the
    number of workers queued for, or in, a drain; `on_idle` is called when it falls to zero. `queues` holds
    the packets of every worker (native, framed; one queue per sync key, `capacity` packets at most).

    `idle_log` lists workers in the order they went idle (oldest first), for idle cleanup and eviction in
    least-recently-active order without touching every worker. A worker is appended each time it goes idle
    (and when it is created); `Worker.log_entries` counts its entries, so all but its last are known stale.
    It is compacted once it holds more than twice as many entries as there are workers. (A plain dict plus
    this log, rather than an `OrderedDict` moved-to-end per drain: the latter's per-entry nodes fragment
    pymalloc arenas under create/remove churn, so that RSS creeps up cycle after cycle.)
    """

    __slots__ = (
        "busy",
        "bytes_sent",
        "capacity",
        "clock",
        "discarded",
        "discovery",
        "failed",
        "fast_streams",
        "idle_log",
        "log_limit",
        "max_consecutive_failures",
        "on_idle",
        "pool",
        "queues",
        "receipts",
        "recycled",
        "resilience",
        "route_epoch",
        "sent",
        "spawn",
        "stream_service",
        "unacknowledged",
        "workers",
    )

    def __init__(
        self,
        discovery: PeerDiscovery,
        stream_service: StreamService | None,
        pool: StreamPoolService | None,
        resilience: _Resilience,
        *,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        capacity: int = 100,
        max_consecutive_failures: int = 5,
    ) -> None:
        if stream_service is None and pool is None:
            raise ValueError("a stream_service or a pool_service is needed to reach peers")
        self.discovery = discovery
        self.stream_service = stream_service
        self.pool = pool
        self.resilience = resilience
        self.clock = clock
        self.spawn = spawn
        self.max_consecutive_failures = max_consecutive_failures
        self.capacity = capacity
        self.queues = DestinationQueues(capacity)
        self.workers: dict[str, Worker] = {}
        self.idle_log: deque[Worker] = deque()
        self.log_limit = 1024  # compact idle_log beyond this many entries
        self.busy = 0
        self.on_idle: Callable[[], None] | None = None
        self.sent = 0
        self.bytes_sent = 0
        self.unacknowledged = 0
        self.receipts: set[asyncio.Future[int]] = set()
        # Connections given to the queues' fast path (`Worker._offer_fast`): `Dispatcher.flush` waits for
        # what the fast path has in flight on them, and a stop that cannot wait gives up on them.
        self.fast_streams: weakref.WeakSet[Any] = weakref.WeakSet()
        # Bumped when peers' prefixes change (a reload): a worker whose lookup is older asks again.
        self.route_epoch = 0
        self.failed = dict.fromkeys(FAILURE_REASONS, 0)
        self.discarded = dict.fromkeys(DISCARD_REASONS, 0)
        self.recycled = 0

    def log_idle(self, worker: Worker) -> None:
        """Note that `worker` just went idle (or was created). (`Worker.drain` has this inline.)"""
        log = self.idle_log
        log.append(worker)
        worker.log_entries += 1
        if len(log) > self.log_limit:
            self.compact_log()

    def compact_log(self) -> None:
        """Keep only the last entry of each live worker, in order."""
        kept: deque[Worker] = deque()
        for worker in self.idle_log:
            worker.log_entries -= 1
            if worker.log_entries == 0 and not worker.closed:
                kept.append(worker)
        for worker in kept:
            worker.log_entries = 1
        self.idle_log = kept
        self.log_limit = 2 * len(self.workers) + 1024

    def pop_idle(self, cutoff: float | None = None) -> Worker | None:
        """Take the least recently active idle worker off the log (if idle since `cutoff` or earlier).

        Stale entries met on the way are dropped, and so are the entries of busy workers (a worker logs
        itself again when its drain ends). None when there is no such worker.
        """
        log = self.idle_log
        while log:
            worker = log[0]
            if worker.closed or worker.busy or worker.log_entries > 1:
                log.popleft()
                worker.log_entries -= 1
                continue
            if cutoff is not None and worker.last_activity > cutoff:
                return None
            log.popleft()
            worker.log_entries -= 1
            return worker
        return None

    async def acquire(self, peer_id: str, worker: Worker) -> Stream:
        """A stream to `peer_id`: from the pool if there is one, else a new one. Raises `ServiceError`."""
        try:
            if self.pool is not None:
                return await self.pool.get_stream(peer_id)
            assert self.stream_service is not None
            return await self.stream_service.create_stream(peer_id)
        except Exception as exc:
            if isinstance(exc, ServiceError):
                raise
            service, op = ("stream_pool", "get_stream") if self.pool is not None else _CREATE
            raise ServiceError(
                exc, service, op, worker_id=worker.sync_key, peer_id=peer_id, dest_ip=worker.dest_ip
            ) from exc

    def release(self, peer_id: str, stream: Stream, healthy: bool) -> None:
        """Give a stream back to the pool (or close it when it came from the stream service)."""
        if self.pool is not None:
            try:
                self.pool.release_stream(peer_id, stream, healthy)
            except Exception:
                _log.exception("release_stream(%r) failed", peer_id)
        else:
            self.spawn(close_quietly(stream))


def _stream_error(exc: BaseException, worker: Worker, peer_id: str) -> VpnPacketError:
    """A write failure as a typed error: `NetworkError` for a network cause, else `ServiceError`."""
    if is_network_error(exc):
        return NetworkError(
            exc, worker_id=worker.sync_key, peer_id=peer_id, dest_ip=worker.dest_ip, operation="write_many"
        )
    return ServiceError(
        exc, "stream", "write_many", worker_id=worker.sync_key, peer_id=peer_id, dest_ip=worker.dest_ip
    )


def _failure_reason(exc: BaseException) -> str:
    """The failure reason counted for a batch that failed with `exc`."""
    if isinstance(exc, PeerNotFoundError):
        return "no_peer"
    if isinstance(exc, CircuitOpenError):
        return "circuit_open"
    if is_handshake_refused_error(exc):
        return "refused"
    if isinstance(exc, ServiceError):
        if exc.service == "peer_discovery":
            return "discovery_error"
        if exc.service in _STREAM_SERVICES:
            return "stream_error"
    return "write_error"


def _really_cancelled() -> bool:
    """Whether the current task is being cancelled (as opposed to a CancelledError leaking from a callee)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class Worker:
    """The state of one sync key; its packets wait in the context's native queues, under its key. Created and
    driven by a `Dispatcher`; not used on its own.

    The queue holds at most the capacity minus the packets in flight (being written). `busy` is true from the
    moment the worker is queued for a drain until its drain finds the queue empty; a worker with packets
    queued is always busy.
    """

    __slots__ = (
        "_batch",
        "_batch_count",
        "_closed_drops",
        "_ctx",
        "_fast_counters",
        "_fast_route_of",
        "_fast_seen",
        "_framed_write",
        "_future_positions",
        "_futures",
        "_inflight",
        "_inflight_count",
        "_inflight_futures",
        "_receipt",
        "_route_epoch",
        "_stream",
        "busy",
        "byte_count",
        "closed",
        "consecutive_failures",
        "created_at",
        "dest_ip",
        "discard_count",
        "error_count",
        "last_activity",
        "log_entries",
        "packet_count",
        "peer_id",
        "recycle_count",
        "sync_key",
    )

    def __init__(self, sync_key: str, dest_ip: str, ctx: WorkerContext, now: float) -> None:
        self.sync_key = sync_key
        self.dest_ip = dest_ip
        self._ctx = ctx
        ctx.queues.add(sync_key)  # its queue (or the one a batch push just made for the key, adopted)
        # (position in the queue, future) of packets dispatched with a callback; None while there are none.
        self._futures: list[tuple[int, asyncio.Future[None]]] | None = None
        self._inflight: bytes | None = None  # the framed batch being written
        self._inflight_count = 0
        self._inflight_futures: list[asyncio.Future[None]] | None = None
        # Made by _take_futures; None (not an empty list) keeps an idle worker small.
        self._future_positions: list[int] | None = None
        self._batch = b""  # the framed batch of the current write attempt
        self._batch_count = 0
        self._closed_drops: int | None = None  # drop_count once the queue is gone (close)
        self._receipt: Awaitable[int] | None = None  # what the last write returned
        self._stream: Stream | None = None
        # The stream's `write_framed` when it has one (looked up once per stream acquired), else None.
        self._framed_write: Callable[[bytes, int], Awaitable[Awaitable[int] | None]] | None = None
        # The stream's `fast_route` when it has one (looked up once per stream acquired), else None.
        self._fast_route_of: Callable[[], tuple[Any, int, Callable[[int], None], Any] | None] | None = None
        # What the queues' fast path sent for this destination (made at the first fast route).
        self._fast_counters: FastCounters | None = None
        self._fast_seen = 0  # packets the fast path had written at the last `fast_since` look
        self.peer_id: str | None = None
        self._route_epoch = 0  # the context's route_epoch when `peer_id` was looked up
        self.busy = False
        self.closed = False
        self.packet_count = 0
        self.byte_count = 0
        self.error_count = 0
        self.discard_count = 0
        self.consecutive_failures = 0
        self.recycle_count = 0
        self.log_entries = 0  # entries in the context's idle_log
        self.created_at = now
        self.last_activity = now

    # --- queueing (called by the dispatcher) ---------------------------------------------------------------

    def attach_future(self, future: asyncio.Future[None]) -> None:
        """Tie `future` to the packet queued last, to be resolved when that packet is written (or fails).

        Futures are kept apart from the queue, by position, so that the queue stays native and framed: the
        common case (no future) costs nothing per packet and a drain hands the buffer to the stream as is.
        """
        futures = self._futures
        if futures is None:
            futures = self._futures = []
        futures.append((self._ctx.queues.depth(self.sync_key) - 1, future))

    @property
    def depth(self) -> int:
        """Packets queued (not counting those being written)."""
        return self._ctx.queues.depth(self.sync_key)

    @property
    def in_flight(self) -> int:
        """Packets taken from the queue and being written now."""
        return self._inflight_count

    @property
    def drop_count(self) -> int:
        """Packets rejected because this worker's queue was full."""
        closed_drops = self._closed_drops
        if closed_drops is not None:
            return closed_drops
        return self._ctx.queues.dropped(self.sync_key)

    @property
    def idle(self) -> bool:
        """Nothing queued and no drain running or pending."""
        return not self.busy and not self.depth

    def pending(self) -> list[QueuedPacket]:
        """The packets waiting (in flight first), as `QueuedPacket`s; for inspection, not for the hot path."""
        futures = dict(self._futures or ())
        key, ip = self.sync_key, self.dest_ip
        inflight = self._inflight
        out = [QueuedPacket(key, ip, data) for data in (split_framed(inflight) if inflight else ())]
        queued = split_framed(self._ctx.queues.peek(key))
        out += [QueuedPacket(key, ip, data, futures.get(i)) for i, data in enumerate(queued)]
        return out

    # --- draining -------------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Write everything queued, batch by batch, until the queue is empty (or the worker is closed).

        This is the hot path: one pass per batch, so the success path is kept inline.
        """
        ctx = self._ctx
        queues = ctx.queues
        key = self.sync_key
        wrote = False  # the last batch of this drain went out on the worker's stream (not failed)
        try:
            while not self.closed:
                batch, n = queues.take(key)  # the framed packets; in flight (against the bound) from now
                if not n:
                    if wrote:
                        self._offer_fast()
                    break
                futures = None
                if self._futures is not None:
                    batch, n, futures = self._take_futures(batch, n)
                    if not n:
                        continue
                self._inflight = batch
                self._inflight_count = n
                self._inflight_futures = futures
                if self._route_epoch != ctx.route_epoch and self.peer_id is not None:
                    # The peers changed since our lookup: give the stream back (healthy: it is fine, it
                    # may just not be our destination's any more) and ask again, between two batches.
                    self._drop_stream(healthy=True)
                    self.peer_id = None
                peer_id = self.peer_id
                error = None
                if peer_id is None:
                    error = await self._lookup()
                    peer_id = self.peer_id  # None if the lookup failed
                if peer_id is not None:
                    self._batch = batch
                    self._batch_count = n
                    try:
                        await ctx.resilience.call(peer_id, self._attempt)
                    except asyncio.CancelledError as exc:
                        if _really_cancelled():
                            raise
                        error = _stream_error(exc, self, peer_id)
                    except Exception as exc:
                        error = exc
                self._inflight = None
                self._inflight_count = 0
                self._inflight_futures = None
                # The native in-flight count (the bound) is reset by the next `take`, which follows without
                # anything else running in between: no extra call per batch.
                wrote = error is None
                if error is None:
                    self.consecutive_failures = 0
                    receipt, self._receipt = self._receipt, None
                    if receipt is None:  # a stream without acknowledgements: written is sent
                        self._sent(batch, n, futures, n)
                    else:
                        self._await_receipt(receipt, batch, n, futures)
                else:
                    self._failed(n, futures, error)
        except asyncio.CancelledError:
            self._abandon_inflight()
            raise
        finally:
            self._batch = b""
            self._batch_count = 0
            self.busy = False
            self.last_activity = ctx.clock()
            if not self.closed:  # a closed worker was already written off by stop()
                ctx.busy -= 1
                log = ctx.idle_log
                log.append(self)
                self.log_entries += 1
                if len(log) > ctx.log_limit:
                    ctx.compact_log()
                if ctx.busy == 0 and ctx.on_idle is not None:
                    ctx.on_idle()

    def _sent(
        self,
        batch: bytes,
        n: int,
        futures: list[asyncio.Future[None]] | None,
        taken: int,
        positions: Sequence[int] = (),
    ) -> None:
        """The first `taken` of the `n` packets of the framed `batch` reached the peer; the rest (if any) were
        lost in flight. `positions`: where each future's packet is in `batch` (needed only when some were
        lost). Bytes counted are frame payloads: the packets (with the virtio header of offload frames)."""
        ctx = self._ctx
        size = len(batch) - LENGTH_PREFIX_LEN * n if taken >= n else framed_payload_bytes(batch, taken)
        self.packet_count += taken
        self.byte_count += size
        ctx.sent += taken
        ctx.bytes_sent += size
        lost = n - taken
        if lost:
            self.error_count += lost
            ctx.failed["lost_in_flight"] += lost
        if futures:
            error = self._lost_error(lost) if lost else None
            for i, future in enumerate(futures):
                if not future.done():
                    if error is None or positions[i] < taken:
                        future.set_result(None)
                    else:
                        future.set_exception(error)

    def _lost_error(self, lost: int) -> NetworkError:
        cause = ConnectionResetError(
            errno.ECONNRESET, f"{lost} packet(s) written but never acknowledged: the connection ended"
        )
        return NetworkError(cause, worker_id=self.sync_key, peer_id=self.peer_id, dest_ip=self.dest_ip)

    def _await_receipt(
        self, receipt: Awaitable[int], batch: bytes, n: int, futures: list[asyncio.Future[None]] | None
    ) -> None:
        """The batch is written; it counts as in flight until the peer acknowledges it (or the connection
        ends). The worker goes on with its next batch meanwhile: the acks pipeline."""
        ctx = self._ctx
        future = asyncio.ensure_future(receipt)
        positions = self._future_positions if futures and self._future_positions is not None else ()
        ctx.unacknowledged += n
        ctx.receipts.add(future)

        def settled(done: asyncio.Future[int]) -> None:
            ctx.receipts.discard(done)
            ctx.unacknowledged -= n
            taken = 0 if done.cancelled() or done.exception() is not None else min(done.result(), n)
            self._sent(batch, n, futures, taken, positions)

        future.add_done_callback(settled)

    def _take_futures(self, batch: bytes, n: int) -> tuple[bytes, int, list[asyncio.Future[None]] | None]:
        """Split off the futures of the framed `batch` of `n` packets; packets whose future is already done
        (cancelled) are skipped. `_future_positions` keeps where each remaining future's packet sits in the
        returned batch (a partial acknowledgement resolves a future by its packet's position)."""
        pairs = self._futures
        assert pairs is not None
        self._futures = None
        futures = [f for _, f in pairs if not f.done()]
        skipped = len(pairs) - len(futures)
        if skipped:
            dropped = [i for i, f in pairs if f.done()]
            batch, n = framed_without(batch, dropped)
            self._ctx.queues.set_in_flight(self.sync_key, n)
            self.discard_count += skipped
            self._ctx.discarded["cancelled"] += skipped
            kept = [i for i, f in pairs if not f.done()]
            self._future_positions = [i - sum(1 for d in dropped if d < i) for i in kept]
        else:
            self._future_positions = [i for i, _ in pairs]
        return batch, n, futures

    async def _lookup(self) -> BaseException | None:
        """Find and cache the peer of `dest_ip`; the error (as the batch's failure) if there is none."""
        try:
            self._route_epoch = self._ctx.route_epoch
            self.peer_id = await self._ctx.discovery.get_peer_id(self.dest_ip)
        except PeerNotFoundError as exc:
            return exc
        except asyncio.CancelledError as exc:
            if _really_cancelled():
                raise
            return ServiceError(
                exc, "peer_discovery", "get_peer_id", worker_id=self.sync_key, dest_ip=self.dest_ip
            )
        except Exception as exc:
            return ServiceError(
                exc, "peer_discovery", "get_peer_id", worker_id=self.sync_key, dest_ip=self.dest_ip
            )
        return None

    async def _attempt(self) -> None:
        """One attempt: the worker's stream (or a fresh one) and one write (`write_framed` or `write_many`);
        a failed stream is released as unhealthy so that the next attempt gets a fresh one."""
        peer_id = self.peer_id
        assert peer_id is not None
        stream = self._stream
        if stream is None:
            stream = self._stream = await self._ctx.acquire(peer_id, self)
            self._framed_write = getattr(stream, "write_framed", None)
            self._fast_route_of = getattr(stream, "fast_route", None)
        try:
            write_framed = self._framed_write
            if write_framed is not None:  # the buffer as it is: no packet object at all
                self._receipt = await write_framed(self._batch, self._batch_count)
            else:  # the `Stream` protocol: a list of packets
                self._receipt = await stream.write_many(split_framed(self._batch))
        except BaseException as exc:
            if self._stream is stream:
                self._stream = None
                self._framed_write = None
                self._fast_route_of = None
            self._ctx.release(peer_id, stream, False)
            if isinstance(exc, Exception) and not isinstance(exc, VpnPacketError):
                raise _stream_error(exc, self, peer_id) from exc
            raise

    def _failed(self, n: int, futures: list[asyncio.Future[None]] | None, error: BaseException) -> None:
        reason = _failure_reason(error)
        self.error_count += n
        self._ctx.failed[reason] += n
        if futures:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self.consecutive_failures += 1
        if self.consecutive_failures >= self._ctx.max_consecutive_failures:
            self.recycle()

    def recycle(self) -> None:
        """Forget the peer id and give the stream back (as unhealthy): the next batch looks both up again."""
        self.consecutive_failures = 0
        self.recycle_count += 1
        self._ctx.recycled += 1
        self._drop_stream(healthy=False)
        self.peer_id = None

    def _offer_fast(self) -> None:
        """The queue is empty and the last batch went out on the worker's stream (a failed one, a breaker's
        refusal included, offers nothing: the next batch goes through resilience again): let the queues write
        this destination's next packets into that connection themselves, in the push that brings them (the
        TUN read), while it is established and within its window: no task wakes up, no Python object is
        made (issue 20, item 3). The route is withdrawn when the worker takes a batch (the queues could not
        write one, or a packet came with a future), drops its stream, or routes change; so a destination's
        packets stay in order across the two ways."""
        route_of = self._fast_route_of
        if (
            route_of is None
            or self._futures is not None
            or self.closed
            or self._route_epoch != self._ctx.route_epoch
        ):
            return
        route = route_of()
        if route is None:
            return
        session, window, on_blocked, connection = route
        counters = self._fast_counters
        if counters is None:
            counters = self._fast_counters = FastCounters()
        if self._ctx.queues.set_fast(self.sync_key, session, counters, window, on_blocked):
            self._ctx.fast_streams.add(connection)

    def fast_since(self) -> bool:
        """Whether the fast path wrote packets for this destination since the last look: such a worker is
        not idle (it never wakes up for them, so `last_activity` does not move), and idle cleanup and
        eviction pass it over."""
        counters = self._fast_counters
        if counters is None:
            return False
        in_flight, sent, _, lost = counters.counts()
        written = in_flight + sent + lost
        if written == self._fast_seen:
            return False
        self._fast_seen = written
        return True

    @property
    def fast_counts(self) -> tuple[int, int, int, int]:
        """`(in_flight, sent, sent_bytes, lost)` of the packets the queues' fast path wrote for this
        destination (see `_offer_fast`)."""
        counters = self._fast_counters
        return (0, 0, 0, 0) if counters is None else counters.counts()

    def _drop_stream(self, *, healthy: bool) -> None:
        stream = self._stream
        if stream is not None:
            self._ctx.queues.clear_fast(self.sync_key)
            self._stream = None
            self._framed_write = None
            self._fast_route_of = None
            assert self.peer_id is not None
            self._ctx.release(self.peer_id, stream, healthy)

    def _abandon_inflight(self) -> None:
        """The drain was cancelled by `stop()`: the batch being written is discarded as stopped."""
        if self._inflight is None:
            return
        n = self._inflight_count
        futures = self._inflight_futures
        self._inflight = None
        self._inflight_count = 0
        self._inflight_futures = None
        self._ctx.queues.set_in_flight(self.sync_key, 0)
        self._discard(n, futures, "stopped")

    def _discard(self, n: int, futures: list[asyncio.Future[None]] | None, reason: str) -> None:
        if not n:
            return
        cancelled = 0
        if futures:
            error = DispatcherStoppedError("dispatcher stopped before the packet was written")
            for future in futures:
                if future.done():
                    cancelled += 1
                else:
                    future.set_exception(error)
        self.discard_count += n
        self._ctx.discarded[reason] += n - cancelled
        self._ctx.discarded["cancelled"] += cancelled

    # --- shutdown (called by the dispatcher) ------------------------------------------------------------

    def discard_queue(self) -> int:
        """Fail everything queued with `DispatcherStoppedError` (counted as discarded: stopped)."""
        n = self._ctx.queues.discard(self.sync_key)
        pairs = self._futures
        self._futures = None
        self._discard(n, [f for _, f in pairs] if pairs else None, "stopped")
        return n

    def close(self) -> None:
        """Detach from the dispatcher: its queue goes (it is empty: idle, or discarded at stop) and the stream
        goes back healthy (it did not fail)."""
        self.closed = True
        if self._closed_drops is None:  # (idempotent: a second close must not read a new worker's queue)
            self._closed_drops = self._ctx.queues.dropped(self.sync_key)
            self._ctx.queues.remove(self.sync_key)
        self._drop_stream(healthy=True)

    # --- metrics --------------------------------------------------------------------------------------------

    def metrics(self) -> WorkerMetrics:
        """A plain-data snapshot of this worker (the fast path's packets included)."""
        _, fast_sent, fast_bytes, fast_lost = self.fast_counts
        return WorkerMetrics(  # positional: the field order of WorkerMetrics
            self.sync_key,
            self.dest_ip,
            self.peer_id,
            self.packet_count + fast_sent,
            self.byte_count + fast_bytes,
            self.error_count + fast_lost,
            self.drop_count,
            self.discard_count,
            self.depth,
            self._inflight_count,
            self.busy,
            self.last_activity,
            self.created_at,
            self.consecutive_failures,
            self.recycle_count,
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "busy" if self.busy else "idle"
        return (
            f"<Worker {self.sync_key} -> {self.peer_id or '?'} {state} queued={self.depth} "
            f"in_flight={self.in_flight} sent={self.packet_count} errors={self.error_count}>"
        )
