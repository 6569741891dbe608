"""Memory measurements shared by the tests (which assert bounds) and the benchmarks (which report them)."""

from __future__ import annotations

import gc
import tracemalloc

from vpn_packet.dispatcher import Dispatcher

__all__ = ["idle_worker_bytes"]


async def idle_worker_bytes(dispatcher: Dispatcher, count: int) -> float:
    """Bytes that one idle worker costs (the worker, its empty queue, its dict slot), by tracemalloc.

    Creates `count` workers on a running `dispatcher` (one packet each to a new destination, written and
    flushed, so every worker ends idle) after a warm-up packet pays the dispatcher's one-off allocations.
    """
    keys = [
        (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:443", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        for i in range(count)
    ]
    dispatcher.dispatch_packet("warm", "10.255.255.255", b"x")
    await dispatcher.flush()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for key, ip in keys:
            dispatcher.dispatch_packet(key, ip, b"x")
        await dispatcher.flush()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / count
