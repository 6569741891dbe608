"""A node's data plane: one Rust thread (`vpn_packet._native.DataPlane`, `rust/core/src/data_plane.rs`) that
does the steady work of both directions without the interpreter, so that on an established flow no asyncio
callback runs per packet (issue 20, item 3):

- receiving: an authenticated connection's reads (decrypt, check sources, write the TUN, deferred acks),
  handed over by the receiver's pump once the connection is steady (`Receiver`, `_Pump._place`);
- sending: the TUN's reads, pushed into the dispatcher's queues when every packet is for a destination
  on the fast path (written into its connection in the push), handed over by `TunDevice.start_reading`;
  and a connection's ack reads while only the fast path has packets in flight on it (the ledger settles
  them natively), handed over by its `_Link` (`vpn_packet.transport.tcp`).

The thread hands a source back to the loop at anything else (a lifecycle event, a new destination, an
error): it becomes readable on `notify_fd`, and each source's `on_parked` runs here, on the loop. The thread
starts at the first source and stops with `close()`; one plane serves a node's receiver and its TUN.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vpn_packet import tuning
from vpn_packet._native import DataPlane, ReceiveSession, SendSession, TunFeed

__all__ = ["Plane"]

_log = logging.getLogger(__name__)


class Plane:
    """The data plane's thread, started at the first `watch_*` (see the module docstring). `watch_*` return
    False when no thread can be had, or `threads` is 0 (`tuning.data_plane_threads`): the caller then goes
    on with the loop, as before."""

    def __init__(
        self,
        *,
        threads: int = tuning.DATA_PLANE_THREADS,
        ack_delay: float = tuning.ACK_DELAY,
        ack_bytes: int = tuning.ACK_BYTES,
    ) -> None:
        self.ack_delay = ack_delay
        self.ack_bytes = ack_bytes
        self._native: DataPlane | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed = threads == 0  # off: never started

    def _started(self) -> DataPlane | None:
        if self._native is None and not self._failed:
            try:
                native = DataPlane(ack_delay=self.ack_delay, ack_bytes=self.ack_bytes)
            except OSError as exc:  # no thread or descriptors to be had
                self._failed = True
                _log.warning("no data plane thread (%s): packets are handled on the event loop", exc)
                return None
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(native.notify_fd, self._on_parked)
            self._native = native
        return self._native

    def _watch(self, what: str, watch: Callable[[DataPlane], None]) -> bool:
        """`watch(native)` on the started thread; False (logged) when there is none or it cannot watch."""
        native = self._started()
        if native is None:
            return False
        try:
            watch(native)
        except OSError as exc:
            _log.warning("the data plane cannot watch %s (%s): it stays on the event loop", what, exc)
            return False
        return True

    def watch_receive(self, session: ReceiveSession, index: int, on_parked: Callable[[], object]) -> bool:
        """The thread pumps `session` (see `DataPlane.watch`) until it hands it back to `on_parked`."""
        return self._watch("a connection", lambda native: native.watch(session, index, on_parked))

    def unwatch_receive(self, session: ReceiveSession) -> None:
        if self._native is not None:
            self._native.unwatch(session)

    def watch_tun(self, feed: TunFeed, on_parked: Callable[[], object]) -> bool:
        """The thread reads `feed`'s TUN (see `DataPlane.watch_tun`) until it hands it back to `on_parked`."""
        return self._watch("the TUN", lambda native: native.watch_tun(feed, on_parked))

    def unwatch_tun(self, feed: TunFeed) -> None:
        if self._native is not None:
            self._native.unwatch_tun(feed)

    def watch_send(self, session: SendSession, on_parked: Callable[[], object]) -> bool:
        """The thread reads `session`'s acks (see `DataPlane.watch_send`) until it hands it back to
        `on_parked`."""
        return self._watch("a connection's acks", lambda native: native.watch_send(session, on_parked))

    def unwatch_send(self, session: SendSession) -> None:
        if self._native is not None:
            self._native.unwatch_send(session)

    def _on_parked(self) -> None:
        native = self._native
        if native is None:
            return
        for on_parked in native.take_parked():
            try:
                on_parked()
            except Exception:  # one source's failure must not keep the others from being handed back
                _log.exception("handling what the data plane handed back failed")

    def stats(self) -> tuple[int, int, int]:
        """`(watched, events, parks)`: sources on the thread now, readiness events it handled, hand-backs."""
        return self._native.stats() if self._native is not None else (0, 0, 0)

    @property
    def running(self) -> bool:
        return self._native is not None

    def close(self) -> None:
        """Stops the thread (the sources still on it are forgotten: their owners took them back first).
        Idempotent; a later `watch_*` starts a new one."""
        native, self._native = self._native, None
        if native is None:
            return
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(native.notify_fd)
        native.close()
