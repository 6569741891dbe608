"""The dispatcher: routes packets to per-destination workers and drains them to peers' streams.

How a packet travels:

1. `dispatch_packet` (or `dispatch`, `dispatch_batch`, `dispatch_buffer`, `dispatch_packet_with_callback`)
   is synchronous and cheap: one native call routes the packet, or the whole batch, to the per-destination
   queues (`vpn_packet._native.DestinationQueues`: parsed, bounded, framed for the wire, rejections counted
   by reason, no Python object per packet) and reports only the keys whose queue was empty before, and the
   keys that have no worker yet. The Python side then works per key, never per packet: a new key gets a
   worker (`_new_worker`: at the cap an idle worker is evicted, else the key is rejected); a worker that was
   idle is marked busy and put on the *ready* deque; if no pump is free, one pump task is created. That is one
   task wake-up per burst of packets, not per packet.
2. The wake-up first lets the producer run a few more loop iterations while packets keep coming
   (`coalesce`; plain `call_soon` callbacks), so that each worker has several packets per write. Then a pump
   task takes ready workers one by one and runs `Worker.drain()` eagerly (it steps the coroutine itself):
   a drain whose writes complete without suspending (in-memory streams, a socket with room in its buffer)
   costs no task switch at all. When a drain does suspend (a slow peer, a backoff, a blocked stream),
   the pump stays with it and hands the rest of the ready deque to a new pump: a stuck destination delays no
   other (isolation), and there are only as many pump tasks as drains currently waiting, plus one.
3. The drain writes everything the worker has queued (one framed buffer) with one write per batch, through
   the `ResilienceService` (breaker per peer, retries on a fresh stream), and resolves the batch's futures.

Idle workers are plain objects with no task; idle cleanup runs from a `loop.call_later` timer (or directly,
via `run_cleanup`). So a started dispatcher with nothing to do owns no task at all.

Accounting: see `vpn_packet.metrics`. At every instant ``accepted == sent + failed + discarded + queued``
(`check_accounting()` verifies it); rejected packets are counted by reason and were never accepted (the
native queues count `invalid_packet` and `queue_full`, the dispatcher the reasons it decides).

All methods must be called from the event loop's thread (use `loop.call_soon_threadsafe` from others).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

from vpn_packet import tuning
from vpn_packet._native import (
    PUSH_FULL,
    PUSH_INVALID,
    PUSH_PRESSURE,
    PUSH_READY,
    PUSH_UNKNOWN,
    DestinationQueues,
    TunFeed,
    TunIo,
)
from vpn_packet.api import PeerDiscovery, StreamPoolService, StreamService
from vpn_packet.errors import (
    DispatcherStoppedError,
    PacketError,
    QueueFullError,
    WorkerLimitError,
)
from vpn_packet.metrics import REJECT_REASONS, DispatcherMetrics
from vpn_packet.resilience import ResilienceService
from vpn_packet.tasks import TaskSet
from vpn_packet.worker import Worker, WorkerContext, WorkerMetrics

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Dispatcher", "DispatcherState", "NewDispatcher"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS: Final = tuning.MAX_WORKERS
DEFAULT_COALESCE: Final = tuning.COALESCE
_PACKETS_PER_WRITE: Final = 32  # coalescing stops once the ready workers have this many packets each


class DispatcherState(enum.Enum):
    """Lifecycle: NEW -> RUNNING -> STOPPING -> STOPPED (or NEW -> STOPPED). A stopped dispatcher stays so."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_NEW: Final = DispatcherState.NEW
_RUNNING: Final = DispatcherState.RUNNING
_STOPPING: Final = DispatcherState.STOPPING
_STOPPED: Final = DispatcherState.STOPPED


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    """Finish driving `coro`, which suspended on `yielded` while being stepped by hand.

    Equivalent to the rest of an ``await coro``: values and exceptions (a cancellation) sent to the awaiting
    task are passed on to `coro`.
    """
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(value)
            except StopIteration:
                return


class Dispatcher:
    """Routes packets to one worker per sync key and writes them to the peer owning the destination.

    - `peer_discovery`: finds the peer of a destination IP (called by workers, cached per worker).
    - `stream_service`, `pool_service`: where streams come from; the pool if given, else the stream service
      (then the worker closes the streams it created).
    - `worker_idle_timeout` / `worker_cleanup_interval` (seconds): workers idle that long are removed; the
      check runs every interval.
    - `worker_buffer_size`: packets a worker holds at most (waiting plus being written).
    - `resilience_service`: breaker and retry settings; None means `ResilienceService()` with defaults.
    - `max_workers`: cap on workers; at the cap the least recently active idle worker is evicted, and when
      none is idle the new key is rejected (`worker_limit`).
    - `max_consecutive_failures`: failed batches in a row after which a worker is recycled (drops its peer id
      and stream).
    - `clock`: time source for idle cleanup and activity stamps (default: the loop's clock).
    - `coalesce`: how many loop iterations a wake-up may wait for more packets before draining, while
      packets keep arriving. It drains as soon as an iteration brings no packet, a queue is half full, or the
      ready workers have 32 packets each on average. More packets per write cost less per packet;
      0 drains at the first iteration. Under a steady flood this adds at most that many loop iterations of
      latency; a lone packet waits one iteration.
    """

    _CANCEL_GRACE: Final = 1.0  # seconds granted to cancelled drains and stream closes at stop

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {
        "worker_idle_timeout": "worker_idle_timeout",
        "worker_cleanup_interval": "worker_cleanup_interval",
        "worker_buffer_size": "worker_buffer_size",
        "max_workers": "max_workers",
        "coalesce": "coalesce",
    }

    def __init__(
        self,
        peer_discovery: PeerDiscovery,
        stream_service: StreamService | None,
        pool_service: StreamPoolService | None,
        worker_idle_timeout: float = tuning.WORKER_IDLE_TIMEOUT,
        worker_cleanup_interval: float = tuning.WORKER_CLEANUP_INTERVAL,
        worker_buffer_size: int = tuning.WORKER_BUFFER_SIZE,
        resilience_service: ResilienceService | None = None,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_consecutive_failures: int = 5,
        clock: Callable[[], float] | None = None,
        coalesce: int = DEFAULT_COALESCE,
    ) -> None:
        tuning.Tuning.check_fields(
            worker_buffer_size=worker_buffer_size,
            max_workers=max_workers,
            coalesce=coalesce,
            worker_idle_timeout=worker_idle_timeout,
            worker_cleanup_interval=worker_cleanup_interval,
        )
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures!r}")
        self.worker_idle_timeout = float(worker_idle_timeout)
        self.worker_cleanup_interval = float(worker_cleanup_interval)
        self.worker_buffer_size = worker_buffer_size
        self.max_workers = max_workers
        self.resilience = resilience_service if resilience_service is not None else ResilienceService()
        self._clock_given = clock
        self._ctx = WorkerContext(
            peer_discovery,
            stream_service,
            pool_service,
            self.resilience,
            clock=clock if clock is not None else time.monotonic,
            spawn=self._spawn,
            capacity=worker_buffer_size,
            max_consecutive_failures=max_consecutive_failures,
        )
        self._workers = self._ctx.workers
        self._queues = self._ctx.queues
        self._push_keyed = self._queues.push_keyed
        self._state = _NEW
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: deque[Worker] = deque()
        self._free_pumps = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._pressure = False  # a queue is half full: stop waiting for more packets
        self._tick_handle: asyncio.Handle | None = None  # a pending coalescing tick
        self._coalesce_left = 0
        self._last_wake = -math.inf  # the clock at the last wake-up: a wake-up after a quiet spell drains now
        self._read_path = False  # inside `dispatch_buffer` (a device read)
        self._seen = 0
        self._woken_at = 0  # self._accepted when the pending wake-up began
        self.coalesce = coalesce
        self._pumps = TaskSet()  # cancelled at stop: a pump stuck in a drain has nothing more to deliver
        self._side_jobs = TaskSet()  # stream closes: given time to finish at stop, cancelled only after
        self._cleanup_handle: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._accepted = 0
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._workers_created = 0
        self._workers_removed = 0
        self._workers_evicted = 0

    # --- lifecycle ------------------------------------------------------------------------------------------

    @property
    def state(self) -> DispatcherState:
        return self._state

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`: packets are accepted."""
        return self._state is _RUNNING

    async def start(self) -> None:
        """Start accepting packets (idempotent while running). A stopped dispatcher cannot be restarted."""
        if self._state is _RUNNING:
            return
        if self._state is not _NEW:
            raise DispatcherStoppedError("a stopped dispatcher cannot be restarted; create a new one")
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._clock_given is None:
            # The loop's clock. The stock loop's `time()` is `time.monotonic()`: call that directly.
            stock = getattr(loop.time, "__func__", None) is asyncio.BaseEventLoop.time
            self._ctx.clock = time.monotonic if stock else loop.time
        self._state = _RUNNING
        self._accepting = True
        self._arm_cleanup()

    async def stop(self, timeout: float = tuning.SHUTDOWN_TIMEOUT) -> None:  # noqa: ASYNC109 - the contract's signature
        """Stop: refuse new packets, drain for at most `timeout` seconds, then fail what is left.

        Packets still queued (and writes still in progress) after `timeout` fail with
        `DispatcherStoppedError` (counted as discarded: stopped); streams go back to the pool; no task of the
        dispatcher is left. Idempotent: a second call returns at once, a concurrent one waits for the first.
        """
        state = self._state
        if state is _STOPPED:
            return
        if state is _NEW:
            self._state = _STOPPED
            return
        if state is _STOPPING:
            assert self._stopped is not None
            await asyncio.shield(self._stopped)
            return
        loop = self._loop
        assert loop is not None
        self._state = _STOPPING
        self._accepting = False
        self._stopped = loop.create_future()
        if self._cleanup_handle is not None:
            self._cleanup_handle.cancel()
            self._cleanup_handle = None
        try:
            if timeout > 0:
                await self.flush(timeout)
        finally:
            try:
                await self._shutdown()
            finally:
                self._state = _STOPPED
                self._stopped.set_result(None)

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - like stop()
        """Wait until every accepted packet is resolved: nothing queued, being written, or in flight (written
        and waiting for the peer's acknowledgement).

        Returns False if `timeout` seconds passed first. Packets dispatched meanwhile are waited for too.
        """
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if not await self._wait_idle(None if deadline is None else max(deadline - loop.time(), 0.0)):
                return False
            receipts = self._ctx.receipts
            fast = self._fast_waiters()
            if not receipts and not fast:
                return True
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                for waiter in fast:
                    waiter.cancel()
                return False
            await asyncio.wait(set(receipts) | fast, timeout=left)
            for waiter in fast:
                waiter.cancel()

    def _fast_waiters(self) -> set[asyncio.Future[None]]:
        """One future per connection the queues' fast path has packets in flight on, resolved when they are
        all acknowledged or lost (empty when there are none: the common case costs one native read)."""
        if not self._queues.fast_totals.in_flight:
            return set()
        return {stream.fast_settled() for stream in list(self._ctx.fast_streams) if stream.fast_in_flight}

    async def _wait_idle(self, timeout: float | None) -> bool:  # noqa: ASYNC109 - a bound
        """Wait until no worker is queued for or in a drain; False on timeout."""
        if not self._ctx.busy:
            return True
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._idle_waiters.append(waiter)
        self._ctx.on_idle = self._notify_idle
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()
                self._idle_waiters.remove(waiter)
        return bool(done)

    async def _give_up_receipts(self) -> None:
        """Receipts still open at the end of `stop()`: the stream each was written on gives up on its
        connection (a reset: the peer discards what it has not taken) and resolves them with what was
        acknowledged; a receipt of another kind of stream is cancelled (counted as lost in flight)."""
        fast = [stream for stream in list(self._ctx.fast_streams) if stream.fast_in_flight]
        settled = [stream.fast_settled() for stream in fast]
        for stream in fast:
            stream.give_up()  # the fast path's packets in flight there resolve (the destinations count them)
        if settled:
            await asyncio.wait(settled)
        receipts = set(self._ctx.receipts)
        if not receipts:
            return
        for receipt in receipts:
            give_up = getattr(receipt, "give_up", None)
            if give_up is not None:
                give_up()
            else:
                receipt.cancel()
        await asyncio.wait(receipts)  # resolved above: this only lets their callbacks count them

    def _notify_idle(self) -> None:
        waiters = self._idle_waiters
        self._idle_waiters = []
        self._ctx.on_idle = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _shutdown(self) -> None:
        """The forced part of `stop()`: fail the queues, cancel drains, give up on acknowledgements still
        awaited (their packets count as lost in flight), release streams, await our tasks."""
        self._queues.clear_all_fast()  # (nothing is accepted any more anyway; no write may bypass a worker)
        workers = list(self._workers.values())
        for worker in workers:
            worker.discard_queue()
            worker.closed = True
        self._ready.clear()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self._pumps.cancel()
        await self._pumps.wait(self._CANCEL_GRACE)
        for worker in workers:
            worker._abandon_inflight()  # drains that ignored their cancellation
        # Only now, with no drain left to write another batch: every receipt still open is given up.
        await self._give_up_receipts()
        for worker in workers:
            worker.close()
        self._workers.clear()
        self._queues.clear()
        self._ctx.idle_log.clear()
        self._ctx.busy = 0
        self._free_pumps = 0
        self._notify_idle()
        await self._side_jobs.close(self._CANCEL_GRACE)  # the stream closes that worker.close() started
        await self._pumps.close(self._CANCEL_GRACE)  # returns at once unless a drain ignored its cancellation

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- dispatching ----------------------------------------------------------------------------------------

    def dispatch_packet(self, sync_key: str, dest_ip: str, data: bytes) -> bool:
        """Queue `data` for the worker of `sync_key` (created on first use, for `dest_ip`).

        Returns False when the packet is not queued (not running, queue full, worker limit, or `data` empty
        or above 65535 bytes: `invalid_packet`), counted by reason. Packets of one sync key are written in
        the order they were dispatched.
        """
        if self._accepting:
            # The flood case inline: one native call queues the packet behind others (so the worker is busy:
            # nothing to schedule). Everything else - a new key, an idle worker to schedule, a full queue - is
            # decided in `_offer`.
            status = self._push_keyed(sync_key, data)
            if not status:  # PUSH_QUEUED
                self._accepted += 1
                return True
            return self._offer(status, sync_key, dest_ip, data) <= PUSH_PRESSURE
        self._reject_not_running(1)
        return False

    def dispatch_packet_with_callback(self, sync_key: str, dest_ip: str, data: bytes) -> asyncio.Future[None]:
        """Like `dispatch_packet`, with a future: None once written, else the error.

        A rejected packet gets a future already failed (`QueueFullError`, `WorkerLimitError`,
        `DispatcherStoppedError`, `PacketError`). Cancelling the future before the packet is written skips the
        packet.
        """
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._accepting:
            self._reject_not_running(1)
            future.set_exception(DispatcherStoppedError())
            return future
        status = self._offer(self._push_keyed(sync_key, data), sync_key, dest_ip, data)
        if status <= PUSH_PRESSURE:
            # Nothing ran since the packet was queued (draining starts from the loop), so it is still last.
            self._workers[sync_key].attach_future(future)
        elif status == PUSH_FULL:
            future.set_exception(QueueFullError(sync_key, self.worker_buffer_size))
        elif status == PUSH_INVALID:
            reason = "empty" if not data else "too_large"
            future.set_exception(
                PacketError(f"a packet of {len(data)} bytes cannot be sent (1 to 65535 bytes)", reason)
            )
        else:
            future.set_exception(WorkerLimitError(sync_key, self.max_workers))
        return future

    def _offer(self, status: int, sync_key: str, dest_ip: str, data: bytes) -> int:
        """The uncommon outcomes of a keyed push (`status`, a `PUSH_*` constant): a new key gets a worker
        (then the packet is pushed again), an idle worker that just got a packet is scheduled, pressure is
        noted. Returns the final status: PUSH_PRESSURE or below when the packet was accepted, PUSH_UNKNOWN
        when the key was rejected as `worker_limit` (counted here; full and invalid packets were counted by
        the native queues)."""
        if status == PUSH_UNKNOWN:
            if self._new_worker(sync_key, dest_ip, 1) is None:
                return PUSH_UNKNOWN
            status = self._push_keyed(sync_key, data)
        if status > PUSH_PRESSURE:
            return status
        before = self._accepted
        self._accepted = before + 1
        if status == PUSH_READY:
            worker = self._workers[sync_key]
            if not worker.busy:  # (busy with an empty queue: in a drain, which will see it)
                self._schedule(worker, before)
        elif status == PUSH_PRESSURE:
            self._pressure = True
        return status

    def dispatch(self, data: bytes) -> bool:
        """Dispatch a raw IP packet, its sync key and destination computed natively.

        An unparsable packet is rejected as `invalid_packet`.
        """
        if not self._accepting:  # checked first: a stopped dispatcher counts `stopped`, whatever the bytes
            self._reject_not_running(1)
            return False
        pushed = self._queues.push((data,))
        if pushed[0] and not pushed[1]:  # queued behind others: nothing to schedule (the flood case)
            self._accepted += 1
            if pushed[3]:
                self._pressure = True
            return True
        return self._admit(pushed) != 0

    def dispatch_batch(self, packets: Iterable[bytes]) -> int:
        """Dispatch many raw IP packets; returns how many were accepted.

        One native call parses the batch and routes each packet to its destination's queue (order kept within
        each key), up to the room left (the overflow is rejected as `queue_full`); then the work is per key,
        not per packet. Unparsable packets are rejected as `invalid_packet`.
        """
        if not isinstance(packets, Sequence):
            packets = list(packets)
        if not self._accepting:
            self._reject_not_running(len(packets))
            return 0
        return self._admit(self._queues.push(packets))

    def dispatch_buffer(
        self, buffer: Buffer, lengths: Buffer, *, vnet_header: bool = False, write_lone_now: bool = False
    ) -> int:
        """Dispatch the packets of a batched TUN read: `buffer` holds them end to end, `lengths` (a buffer of
        native-endian u32, e.g. `array('I')`) their sizes. Returns how many were accepted.

        Like `dispatch_batch`, without a Python object per packet. With `vnet_header`, each entry starts with
        the 10-byte `virtio_net_hdr` of a TUN opened with `IFF_VNET_HDR`: the packet after it is routed, and
        the header travels with it unless it is all zero. Raises `ValueError`, queueing nothing, when the
        lengths need more bytes than the buffer holds.

        `write_lone_now`: the caller reads a device until it is empty (a node's TUN reads), so a read after a
        quiet spell (`tuning.COALESCE_QUIET`) is a lone packet or the start of a burst, and waiting loop
        iterations for more only adds latency: such packets are written at the next loop iteration, by a
        pump started at once (a pump is a task: drains may use `asyncio.timeout`). Under a flood, reads come
        closer together and coalesce as usual.
        """
        if not self._accepting:
            view = memoryview(lengths)
            self._reject_not_running(view.nbytes // 4)
            return 0
        self._read_path = write_lone_now
        try:
            return self._admit(self._queues.push_buffer(buffer, lengths, vnet_header=vnet_header))
        finally:
            self._read_path = False

    # --- a TUN device's reader (`vpn_packet.transport.tun.TunReader`: a node's TUN reads into this) ---

    def take_read(
        self, io: TunIo, *, vnet_header: bool, max_packets: int, max_bytes: int, write_lone_now: bool = True
    ) -> tuple[int, int, int]:
        """One read of a TUN device (its `TunIo`) routed into the queues in the same native call, as
        `dispatch_buffer` routes a read it is given: a destination with a fast route gets its packets written
        into its connection there and then (see `Worker._offer_fast`), no copy and no Python object per
        packet or read; a read after a quiet spell is written without coalescing (`write_lone_now`). Returns
        `(packets, bytes, errno)` of the read. A stopped dispatcher still reads (the device must not stay
        readable) and counts the packets rejected."""
        if not self._accepting:
            data, lengths, error = io.read_batch(max_packets, max_bytes)
            n = len(lengths) // 4
            self._reject_not_running(n)
            return n, len(data), error
        self._read_path = write_lone_now
        try:
            pushed, n, nbytes, error = io.read_into(
                self._queues, vnet_header=vnet_header, max_packets=max_packets, max_bytes=max_bytes
            )
            if n:
                self._admit(pushed)
        finally:
            self._read_path = False
        return n, nbytes, error

    def plane_queues(self) -> DestinationQueues:
        """The per-destination native queues (for a data plane's `TunFeed`, which pushes reads into them
        from its thread when every packet is for an established destination on the fast path)."""
        return self._queues

    def take_parked(self, feed: TunFeed) -> tuple[int, int, int]:
        """A read the data plane's thread handed back (`TunFeed.take_parked`), admitted as `take_read`
        admits one: pushed now unless the thread pushed it (then its result is admitted), a stopped
        dispatcher's packets counted rejected. Returns `(packets, bytes, errno)`."""
        pushed, n, nbytes, error = feed.take_parked(self._accepting)
        if pushed is None:
            if n:
                self._reject_not_running(n)
        else:
            self._read_path = True
            try:
                self._admit(pushed)
            finally:
                self._read_path = False
        return n, nbytes, error

    def plane_ready(self) -> bool:
        """Whether a TUN's reads may go to the data plane's thread: accepting, and no worker queued or in a
        drain (so the next packets are likely for destinations on the fast path, which the thread writes;
        a busy worker's would only be handed back)."""
        return self._accepting and not self._ctx.busy

    def _admit(self, pushed: tuple[int, list[str], list[tuple[str, str, int, int]] | None, bool]) -> int:
        """The Python half of a batch push: per key, never per packet. Returns how many packets were accepted.

        `pushed` is what the native push returns: the packets it queued for existing workers, the keys whose
        queue was empty before (their workers are scheduled unless in a drain already), the keys with no
        worker yet, in order of first appearance, with the packets queued and overflowed provisionally for
        each, and whether a queue is half full. The accepted total is added before anything can look: nothing
        else runs in between (draining starts from the loop), so ``accepted == sent + failed + discarded +
        queued`` holds whenever anyone can look. Ready workers are scheduled (so busy) before new keys are
        decided, so that making room for a new key never evicts a worker that just got packets.
        """
        accepted, ready, new, pressure = pushed
        if pressure:
            self._pressure = True
        before = self._accepted
        self._accepted = before + accepted
        if ready:
            workers = self._workers
            for sync_key in ready:
                worker = workers[sync_key]
                if not worker.busy:  # (busy with an empty queue: in a drain, which will see them)
                    self._schedule(worker, before)
        if new is not None:
            for sync_key, dest_ip, queued, overflow in new:
                created = self._new_worker(sync_key, dest_ip, queued + overflow)  # adopts the queue
                if created is None:
                    self._queues.remove(sync_key)  # counted as worker_limit
                    continue
                if overflow:
                    self._pressure = True  # this queue is full: draining it beats waiting for more
                self._accepted += queued
                accepted += queued
                self._schedule(created, before)
        return accepted

    def _reject_not_running(self, n: int) -> None:
        self._rejected["not_started" if self._state is _NEW else "stopped"] += n

    def _new_worker(self, sync_key: str, dest_ip: str, n: int) -> Worker | None:
        """A new worker for `sync_key` (at the cap an idle one is evicted); None if all are busy, and the `n`
        packets offered for it are counted as `worker_limit`. The worker adopts the key's native queue."""
        workers = self._workers
        if len(workers) >= self.max_workers and not self._evict_idle_worker():
            self._rejected["worker_limit"] += n
            return None
        ctx = self._ctx
        worker = Worker(sync_key, dest_ip, ctx, ctx.clock())
        workers[sync_key] = worker
        ctx.log_limit += 2
        ctx.log_idle(worker)
        self._workers_created += 1
        return worker

    def _evict_idle_worker(self) -> bool:
        """Remove the least recently active idle worker; False if every worker is busy."""
        ctx = self._ctx
        if ctx.busy >= len(self._workers):
            return False
        while True:
            worker = ctx.pop_idle()
            if worker is None:  # pragma: no cover - busy < len(workers) means an idle worker is logged
                return False
            if not worker.fast_since():
                break
            # In use on the fast path: to the back of the log (a second look in this loop finds it idle).
            worker.last_activity = ctx.clock()
            ctx.log_idle(worker)
        del self._workers[worker.sync_key]
        worker.close()
        self._workers_evicted += 1
        return True

    # --- draining -------------------------------------------------------------------------------------------

    def _schedule(self, worker: Worker, before: int) -> None:
        """Put an idle worker that just got packets on the ready deque; make sure a pump will see it.
        `before`: the accepted total before the dispatch call that brought the packets."""
        worker.busy = True
        self._ctx.busy += 1
        self._ready.append(worker)
        if self._free_pumps == 0:
            self._wake(before + self._queues.depth(worker.sync_key))

    def _wake(self, seen: int) -> None:
        """Get a pump going, after up to `coalesce` loop iterations (plain callbacks, no task) during which
        the producer keeps adding packets; at once if there is pressure or nothing to wait for.

        `seen`: the accepted total before this dispatch call plus the packets of the worker that caused this
        wake-up. Those count as seen, so that a lone packet drains at the first iteration; the rest of a batch
        and the packets the producer adds later count as "more"."""
        self._free_pumps += 1  # the pending tick counts as a pump that will look at the ready deque
        now = self._ctx.clock()
        quiet = now - self._last_wake >= tuning.COALESCE_QUIET
        self._last_wake = now
        if self.coalesce and not self._pressure and not (quiet and self._read_path):
            # (A device read after a quiet spell is a lone packet - a ping, the first of a burst - not a
            # flood: the read brought everything the device had, so waiting for company only adds latency,
            # and the pump starts at the next loop iteration. The other dispatch forms keep coalescing:
            # their callers hand packets one call at a time and expect them batched.)
            assert self._loop is not None
            self._coalesce_left = self.coalesce
            self._seen = self._woken_at = seen
            self._tick_handle = self._loop.call_soon(self._tick)
        else:
            self._start_pump()

    def _tick(self) -> None:
        self._tick_handle = None
        self._coalesce_left -= 1
        accepted = self._accepted
        more = accepted != self._seen  # the producer added packets since the last look
        enough = accepted - self._woken_at >= _PACKETS_PER_WRITE * len(self._ready)
        if more and not enough and self._coalesce_left > 0 and self._accepting and not self._pressure:
            assert self._loop is not None
            self._seen = self._accepted
            self._tick_handle = self._loop.call_soon(self._tick)
            return
        self._start_pump()

    def _spawn_pump(self) -> None:
        """A new pump for the rest of the ready deque (the current one is staying with a suspended drain)."""
        self._free_pumps += 1
        self._start_pump()

    def _start_pump(self) -> None:
        self._pressure = False
        self._pumps.spawn(self._pump(), self._loop)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        """Run a side job of the workers (closing a stream they created) as a task that `stop()` waits for."""
        return self._side_jobs.spawn(coro, self._loop)

    async def _pump(self) -> None:
        """Drain ready workers. A drain that completes without suspending costs no task switch; one that
        suspends keeps this pump (and a new pump takes the rest of the ready deque)."""
        ready = self._ready
        try:
            while ready:
                worker = ready.popleft()
                coro = worker.drain()
                try:
                    yielded = coro.send(None)
                except StopIteration:
                    continue
                except Exception:  # pragma: no cover - drain handles its errors; this is a bug guard
                    _log.exception("drain of %r failed", worker)
                    continue
                self._free_pumps -= 1
                if ready and self._free_pumps == 0:
                    self._spawn_pump()
                try:
                    await _resume(coro, yielded)
                except Exception:  # pragma: no cover - as above
                    _log.exception("drain of %r failed", worker)
                finally:
                    self._free_pumps += 1
        finally:
            self._free_pumps -= 1

    # --- idle cleanup ---------------------------------------------------------------------------------------

    def _arm_cleanup(self) -> None:
        assert self._loop is not None
        self._cleanup_handle = self._loop.call_later(self.worker_cleanup_interval, self._cleanup_tick)

    def _cleanup_tick(self) -> None:
        try:
            self.run_cleanup()
        except Exception:  # pragma: no cover - defensive: a timer must keep ticking
            _log.exception("idle cleanup failed")
        if self._state is _RUNNING:
            self._arm_cleanup()

    def run_cleanup(self, now: float | None = None) -> int:
        """Remove workers idle (nothing queued, no drain) for `worker_idle_timeout`; returns how many.

        Runs every `worker_cleanup_interval` on its own; tests may call it directly. Synchronous, so a packet
        dispatched right after simply creates a fresh worker: nothing can be lost in between.
        """
        if now is None:
            now = self._ctx.clock()
        cutoff = now - self.worker_idle_timeout
        removed = 0
        while (worker := self._ctx.pop_idle(cutoff)) is not None:  # least recently active first
            if worker.fast_since():  # in use on the fast path since the last look: active now
                worker.last_activity = now
                self._ctx.log_idle(worker)
                continue
            del self._workers[worker.sync_key]
            worker.close()
            removed += 1
        self._workers_removed += removed
        return removed

    # --- metrics --------------------------------------------------------------------------------------------

    def metrics(self) -> DispatcherMetrics:
        """Totals as plain data; see `DispatcherMetrics` for the accounting identity."""
        ctx = self._ctx
        queued = 0
        depth = self._queues.depth
        for key, worker in self._workers.items():
            if worker.busy:  # an idle worker has nothing queued or in flight
                queued += depth(key) + worker.in_flight
        fast_in_flight, fast_sent, fast_bytes, fast_lost = self._queues.fast_totals.counts()
        failed_by_reason = dict(ctx.failed)
        failed_by_reason["lost_in_flight"] += fast_lost
        resilience: dict[str, Any] = {}
        snapshot = getattr(self.resilience, "metrics", None)
        if snapshot is not None:
            data = snapshot()
            if dataclasses.is_dataclass(data) and not isinstance(data, type):
                resilience = dataclasses.asdict(data)
            else:
                resilience = dict(data)
        rejected = self._rejected_by_reason()
        return DispatcherMetrics(
            state=self._state.value,
            workers=len(self._workers),
            busy_workers=ctx.busy,
            accepted=self._accepted + self._queues.accepted_off_loop,
            sent=ctx.sent + fast_sent,
            failed=sum(failed_by_reason.values()),
            discarded=sum(ctx.discarded.values()),
            queued=queued,
            rejected=sum(rejected.values()),
            in_flight=ctx.unacknowledged + fast_in_flight,
            bytes_sent=ctx.bytes_sent + fast_bytes,
            rejected_by_reason=rejected,
            failed_by_reason=failed_by_reason,
            discarded_by_reason=dict(ctx.discarded),
            workers_created=self._workers_created,
            workers_removed=self._workers_removed,
            workers_evicted=self._workers_evicted,
            workers_recycled=ctx.recycled,
            resilience=resilience,
        )

    def _rejected_by_reason(self) -> dict[str, int]:
        """The dispatcher's rejection counts plus the native queues' (`invalid_packet`, `queue_full`)."""
        rejected = dict(self._rejected)
        for reason, n in self._queues.rejected().items():
            rejected[reason] += n
        return rejected

    def invalidate_routes(self) -> None:
        """The peers' prefixes changed (a reload): every worker looks its destination's owner up again before
        its next batch, never in the middle of one, so a destination's packets stay in order while they move
        to their new owner (or fail as `no_peer` when it has none). The queues' fast routes are withdrawn:
        the next packet of each destination goes through its worker, which looks up again."""
        self._ctx.route_epoch += 1
        self._queues.clear_all_fast()

    def check_accounting(self) -> DispatcherMetrics:
        """Raise `AssertionError` unless accepted = sent + failed + discarded + queued; else the metrics."""
        m = self.metrics()
        if not m.accounting_ok:
            raise AssertionError(
                f"accounting broken: accepted={m.accepted} sent={m.sent} failed={m.failed} "
                f"discarded={m.discarded} queued={m.queued} in_flight={m.in_flight} "
                f"(rejected={m.rejected_by_reason}, failed={m.failed_by_reason}, "
                f"discarded={m.discarded_by_reason})"
            )
        return m

    def worker_metrics(self) -> dict[str, WorkerMetrics]:
        """A plain-data snapshot of every worker, by sync key."""
        return {key: worker.metrics() for key, worker in self._workers.items()}

    def workers(self) -> list[Worker]:
        """The live workers, oldest first (for inspection)."""
        return list(self._workers.values())

    def __repr__(self) -> str:
        rejected = sum(self._rejected_by_reason().values())
        return (
            f"<Dispatcher {self._state.value} workers={len(self._workers)} busy={self._ctx.busy} "
            f"accepted={self._accepted} sent={self.metrics().sent} rejected={rejected} "
            f"buffer={self.worker_buffer_size} max_workers={self.max_workers}>"
        )


NewDispatcher = Dispatcher
"""The Go spelling, kept for callers of the original package."""
