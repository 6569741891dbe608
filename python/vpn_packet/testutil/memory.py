"""Memory measurements shared by the tests (which assert bounds) and the benchmarks (which report them).

- `idle_worker_footprint`: what an idle worker holds, counted structurally (the objects only it references,
  their `sys.getsizeof`, its share of the dispatcher's tables, and the tasks it keeps): the same on any
  allocator, so the tests assert on it.
- `idle_worker_bytes`: the bytes tracemalloc sees per idle worker. It includes allocator details (block
  rounding, free lists, when a table grows) that vary with the Python version: the benchmarks report it, the
  tests do not assert on it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vpn_packet.dispatcher import Dispatcher

__all__ = ["IdleWorkerFootprint", "idle_worker_bytes", "idle_worker_footprint"]


@dataclass(frozen=True)
class IdleWorkerFootprint:
    """What one idle worker holds, from `idle_worker_footprint`.

    - `workers`: how many idle workers were created and measured.
    - `max_objects`: the most objects any one worker holds alone (itself included): objects reachable from it
      that no other worker reaches (its queue, its key strings, ...). Shared things (the context, the
      stream, the peer id, small ints, None) are not counted.
    - `owned_types`: the type names of those objects, over all workers (to say what a worker holds).
    - `bytes_per_worker`: `sys.getsizeof` of those objects, averaged, plus the worker's share of the growth
      of the dispatcher's worker table and idle log.
    - `tasks_added`: asyncio tasks still pending after the workers went idle, beyond those before.
    """

    workers: int
    max_objects: int
    owned_types: frozenset[str]
    bytes_per_worker: float
    tasks_added: int


def _keys(count: int) -> list[tuple[str, str]]:
    return [
        (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:443", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        for i in range(count)
    ]


async def _warm_up(dispatcher: Dispatcher) -> None:
    """One packet to a destination of its own: pays the dispatcher's one-off allocations."""
    dispatcher.dispatch_packet("warm", "10.255.255.255", b"x")
    await dispatcher.flush()
    gc.collect()


async def _create_idle_workers(dispatcher: Dispatcher, keys: Iterable[tuple[str, str]]) -> None:
    """One packet to each new destination, written and flushed: every worker ends idle."""
    for key, ip in keys:
        dispatcher.dispatch_packet(key, ip, b"x")
    await dispatcher.flush()
    gc.collect()


def _owned_objects(roots: Sequence[object], shared: Sequence[object]) -> list[list[object]]:
    """For each root, the objects reachable from it (through `gc.get_referents`) that no other root reaches.

    Breadth first from every root at once; an object two roots reach is shared and not followed further, nor
    are the `shared` objects (the dispatcher and its context): the walk never enters the rest of the heap.
    """
    owner: dict[int, int] = {id(root): i for i, root in enumerate(roots)}  # id -> root index, -1 if shared
    owner.update((id(obj), -1) for obj in shared)
    found: dict[int, object] = {id(root): root for root in roots}  # keeps every object seen alive and unique
    owned: list[list[object]] = [[root] for root in roots]
    frontier: list[list[object]] = [[root] for root in roots]
    while any(frontier):
        reached: dict[int, int] = {}
        for i, objects in enumerate(frontier):
            for referent in gc.get_referents(*objects):
                key = id(referent)
                if key in owner:
                    if owner[key] != i:
                        owner[key] = -1
                    continue
                found[key] = referent
                reached[key] = i if reached.get(key, i) == i else -1
        frontier = [[] for _ in roots]
        for key, i in reached.items():
            owner[key] = i
            if i >= 0:
                frontier[i].append(found[key])
    for key, i in owner.items():
        if i >= 0 and found[key] is not roots[i]:
            owned[i].append(found[key])
    return owned


async def idle_worker_footprint(dispatcher: Dispatcher, count: int) -> IdleWorkerFootprint:
    """Creates `count` idle workers on a running `dispatcher` (after a warm-up packet) and counts what they
    hold: see `IdleWorkerFootprint`. Independent of the allocator: object counts and `sys.getsizeof`."""
    if count < 2:
        raise ValueError("count must be at least 2 (sharing is what two workers both reach)")
    await _warm_up(dispatcher)
    context = dispatcher._ctx
    table_before = sys.getsizeof(context.workers)
    log_before = sys.getsizeof(context.idle_log)
    tasks_before = {task for task in asyncio.all_tasks() if not task.done()}
    existing = set(context.workers)
    await _create_idle_workers(dispatcher, _keys(count))
    workers = [worker for key, worker in context.workers.items() if key not in existing]
    tasks_added = len({task for task in asyncio.all_tasks() if not task.done()} - tasks_before)
    owned = _owned_objects(workers, shared=[dispatcher, context])
    objects_bytes = sum(sys.getsizeof(obj) for objects in owned for obj in objects)
    tables_bytes = (sys.getsizeof(context.workers) - table_before) + (
        sys.getsizeof(context.idle_log) - log_before
    )
    return IdleWorkerFootprint(
        workers=len(workers),
        max_objects=max(len(objects) for objects in owned),
        owned_types=frozenset(type(obj).__name__ for objects in owned for obj in objects),
        bytes_per_worker=(objects_bytes + tables_bytes) / len(workers),
        tasks_added=tasks_added,
    )


async def idle_worker_bytes(dispatcher: Dispatcher, count: int) -> float:
    """Bytes that one idle worker costs (the worker, its empty queue, its dict slot), by tracemalloc.

    Creates `count` workers on a running `dispatcher` (one packet each to a new destination, written and
    flushed, so every worker ends idle) after a warm-up packet pays the dispatcher's one-off allocations. The
    figure depends on the Python version's allocator: for reports (benchmarks), not for assertions.
    """
    keys = _keys(count)
    await _warm_up(dispatcher)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await _create_idle_workers(dispatcher, keys)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count
