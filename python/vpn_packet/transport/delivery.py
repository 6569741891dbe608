"""What one connection has written and the peer has not acknowledged yet, in write order.

"Sent" means "the peer has it". A `TcpStream` hands every framed batch it writes to its `InFlight` and gets a
`Receipt` back; the receiving side acknowledges cumulative frame counts (`rust/core/src/ack.rs`), and each ack
resolves the receipts it covers with their full size. When the connection dies (reset, closed, or the peer
stopped acknowledging for `ack_timeout`), every open receipt resolves with how many of its frames the
peer had acknowledged by then: all of them, none, or - for the one batch an ack ended inside - the first
part. Whoever waits on a receipt (a dispatcher worker) counts that many packets as sent and the rest as
failed (`lost_in_flight`), so nothing written is ever left uncounted, and nothing unacknowledged is ever
called sent.

This module is bookkeeping only (no I/O, no clock), so a state-machine test can drive it with random
writes, acks, resets and stops; `vpn_packet.transport.tcp` does the I/O around it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["InFlight", "Receipt"]


class Receipt(asyncio.Future[int]):
    """Resolves with how many frames of one written batch the peer acknowledged (all of them, unless the
    connection died first). `give_up()` abandons the connection it was written on (at a stop that cannot wait
    longer for acks): its receipts resolve at once with what was acknowledged."""

    def __init__(self, give_up: Callable[[], None], *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self._give_up = give_up

    def give_up(self) -> None:
        if not self.done():
            self._give_up()


@dataclass(slots=True)
class _Batch:
    end: int  # the connection's frame count after this batch
    frames: int
    size: int  # bytes on the wire
    receipt: Receipt


class InFlight:
    """Batches written on one connection, oldest first, until acknowledged; bounded by `window` bytes.

    - `add(frames, size, receipt)` after a batch is written;
    - `ack(taken)` when the peer acknowledges `taken` frames in all: resolves every batch it covers;
    - `fail()` when the connection is gone: resolves every open batch with its acknowledged part.
    """

    __slots__ = ("_batches", "acked", "bytes", "window", "written")

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1 byte")
        self.window = window
        self.written = 0  # frames written on this connection
        self.acked = 0  # frames the peer acknowledged
        self.bytes = 0  # bytes written and not acknowledged
        self._batches: deque[_Batch] = deque()

    @property
    def frames(self) -> int:
        """Frames written and not acknowledged, up to the end of the last batch written here (acks of other
        writers' frames after it can pass it: then 0)."""
        return max(0, self.written - self.acked)

    @property
    def full(self) -> bool:
        """Whether the unacknowledged bytes reached the window: the writer must wait for acks."""
        return self.bytes >= self.window

    def fits(self, size: int, in_flight: int | None = None) -> bool:
        """Whether a batch of `size` bytes may be written now without passing the window. A batch larger
        than the whole window fits only when nothing is in flight (else it could never be written).
        `in_flight`: the connection's unacknowledged bytes, when other writers share it (the native fast
        path); else this ledger's."""
        held = self.bytes if in_flight is None else in_flight
        return not held or held + size <= self.window

    def __len__(self) -> int:
        """Open batches."""
        return len(self._batches)

    def add(self, frames: int, size: int, receipt: Receipt, end: int | None = None) -> None:
        """A batch of `frames` frames (`size` bytes) was written. `end`: the connection's frame count after
        it, when other writers share the connection (the native fast path, `rust/core/src/ledger.rs`);
        else this ledger counts the frames itself."""
        self.written = self.written + frames if end is None else end
        self.bytes += size
        self._batches.append(_Batch(self.written, frames, size, receipt))

    def ack(self, taken: int, written: int | None = None) -> int:
        """The peer has taken `taken` frames of this connection in all. Resolves the batches it covers and
        returns how many frames this ack newly acknowledged (other writers' included). Raises `ValueError`
        for an ack beyond what was written (`written`: the connection's count, when it has other writers):
        the peer contradicts us, and the caller drops the connection."""
        limit = self.written if written is None else max(written, self.written)
        if taken > limit:
            raise ValueError(f"the peer acknowledged {taken} frames, only {limit} were written")
        if taken <= self.acked:
            return 0
        newly = taken - self.acked
        self.acked = taken
        batches = self._batches
        while batches and batches[0].end <= taken:
            batch = batches.popleft()
            self.bytes -= batch.size
            _resolve(batch.receipt, batch.frames)
        return newly

    def fail(self) -> int:
        """The connection is gone: resolves every open batch with the part of it that was acknowledged;
        returns the frames of these batches lost (written, never acknowledged)."""
        lost = 0
        acked = self.acked
        batches = self._batches
        while batches:
            batch = batches.popleft()
            taken = min(batch.frames, max(0, acked - (batch.end - batch.frames)))
            lost += batch.frames - taken
            _resolve(batch.receipt, taken)
        self.bytes = 0
        self.written = self.acked  # nothing is in flight any more
        return lost

    def __repr__(self) -> str:
        return f"<InFlight written={self.written} acked={self.acked} bytes={self.bytes}/{self.window}>"


def _resolve(receipt: asyncio.Future[Any], taken: int) -> None:
    if not receipt.done():
        receipt.set_result(taken)
