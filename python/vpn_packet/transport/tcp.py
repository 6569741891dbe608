"""TCP streams to peers, on asyncio, over TLS on the native core (or plaintext for an insecure node, on the
same core).

`TcpStreamService.create_stream(peer_id)` resolves the peer's endpoint through the discovery (an IP literal
without a thread-pool `getaddrinfo`), connects (with a timeout, `TCP_NODELAY`, a large send buffer and TCP
keepalives), then hands the socket to a native `SendSession` (rust/core/src/send.rs): with TLS, rustls
runs TLS 1.3 and checks that the server holds the key configured for `peer_id` (or, with a CA, that its
certificate names `peer_id`); then (at once in plaintext) the core answers the server's challenge with this
node's hello (signed in key mode) and takes its answer, one native call per socket readiness event. Only
an accepted connection becomes a `TcpStream`; a refusal raises `HandshakeRefusedError` with the server's
reason, before any packet is counted as sent.
Failures are logged through one `FailureLog` (a budget shared by every peer, and a periodic summary), not
one line per peer. Python's `ssl` is not used.

`TcpStream.write_framed(data, count)` (what a dispatcher's worker calls with its queue's framed batch) is one
native call that encrypts the batch (with TLS) and writes it to the socket (`write_many` frames the packets
first); what the socket does not take waits in the session, and only when that is above the high-water mark
does the writer wait for it to drain - bounded by `write_timeout`, so a peer that stops reading fails the
write with a typed error instead of hanging. After the handshake the peer sends only acks, read by one native
call per readiness event; its EOF or a reset marks the stream closed, and every later write raises
`NetworkError` (classified as a reset or a closed stream, so the resilience layer retries on a fresh stream).

Every failure but a refusal is a `vpn_packet.errors.NetworkError(cause, peer_id=..., operation=...)` whose
cause is the underlying exception (`ConnectionRefusedError`, `TimeoutError`, `TlsError` with the core's
reason such as `key_mismatch`, ...), so `is_temporary_error`, `is_connection_reset_error` and
`is_stream_closed_error` classify it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol

from vpn_packet import tuning
from vpn_packet._native import Closed, Established, Failed, Refused, SendSession, TlsSecurity
from vpn_packet.errors import FramingError, HandshakeRefusedError, NetworkError, ServiceError, TlsError
from vpn_packet.ratelimit import FailureLog
from vpn_packet.transport.delivery import InFlight, Receipt
from vpn_packet.transport.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    encode_frames,
)
from vpn_packet.transport.handshake import Security, new_epoch
from vpn_packet.transport.plane import Plane

__all__ = ["DEFAULT_SEND_BUFFER", "EndpointResolver", "PeerSendStats", "TcpStream", "TcpStreamService"]

_log = logging.getLogger(__name__)

DEFAULT_SEND_BUFFER: Final = tuning.SEND_BUFFER
_HIGH_WATER: Final = 1024 * 1024  # bytes waiting for the socket above which writes wait for them to drain
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_MAX_INBOX: Final = 4096  # bytes of handshake a server may send before we read them (an answer is < 300)


_KEEPALIVE_PROBE_INTERVAL = 5  # seconds between TCP keepalive probes once the connection is idle
_KEEPALIVE_PROBES = 3


class EndpointResolver(Protocol):
    """What `TcpStreamService` needs from the discovery: the `(host, port)` to dial for a peer id."""

    def endpoint(self, peer_id: str) -> tuple[str, int]: ...


@dataclass(eq=False, slots=True)
class PeerSendStats:
    """The sending side's view of one peer, kept by `TcpStreamService` (live, not a copy).

    `tx_packets`/`tx_bytes`: packets (and their bytes, without framing) the peer acknowledged, over all
    connections; `lost_in_flight`: packets written that no ack covered when their connection ended;
    `connects`/`connect_failures`: connection attempts, `refusals` the peer's refusals by reason and
    `failures` the other failed attempts by kind (`ECONNREFUSED`, `TimeoutError`, ...); `streams`: the open
    connections; `last_error`: the last connect, handshake or write failure (cleared by a successful
    connect); `last_handshake`/`last_tx`: `time.monotonic()` of the last accepted handshake and of the
    last acknowledgement (None: never).
    """

    tx_packets: int = 0
    tx_bytes: int = 0
    lost_in_flight: int = 0
    connects: int = 0
    connect_failures: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_handshake: float | None = None
    last_tx: float | None = None
    streams: set[TcpStream] = field(default_factory=set)


_PumpResult = tuple[list[Established | Refused | Failed | Closed] | None, int, int, int]
"""`(events, read, unsent, acked)` of `SendSession.pump` (and `take_parked`)."""


class _Link:
    """The connection under a `TcpStream`, on the native core after its handshake (TLS, or an insecure
    node's plaintext): `write` hands a framed batch to the `SendSession`, which encrypts it (with TLS) and
    writes it to the socket in that call; what the socket does not take waits in the session, written at
    writability (`paused` above `high_water` until it is under a quarter of that; `drain_waiter` resolves
    then). One native call per readiness event (`_readable`) reads the acks and tells the stream how many
    frames the peer acknowledged (`on_acked`), that the peer broke the protocol (`on_broken`) and that
    the connection ended (`on_lost`). Nothing per packet here. The socket is ours (the session only
    borrows its descriptor): closed here, after the reader and writer are removed.

    On a node's data plane (`plane`): while the stream has none of its own batches waiting for acks
    (`may_rest`), only the fast path's, the ack reads go to the plane's thread (`_rest`), where the native
    ledger settles them without the loop; the thread hands them back at anything else (an event, the end,
    an error, output waiting), and the stream takes them back before it writes or waits (`take_back`). The
    acks the thread read are counted here when someone looks (`sync`)."""

    def __init__(self, sock: socket.socket, session: SendSession, high_water: int) -> None:
        self.lost = False
        self.paused = False
        self.exc: BaseException | None = None  # why the connection ended (None: clean EOF or local close)
        self.peer_eof = False
        self._waiters: list[asyncio.Future[None]] = []
        self.on_lost: Callable[[], None] | None = None
        self.on_acked: Callable[[int], None] | None = None  # the frames the peer has taken in all
        self.on_broken: Callable[[BaseException], None] | None = None  # acks that contradict themselves
        self.tls = session.encrypted
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._session = session
        self._high_water = high_water
        self._low_water = high_water // 4
        self._writing = False
        self._closing = False
        self._closed = self._loop.create_future()
        self.acked = 0
        self.sockname = sock.getsockname()
        self.plane: Plane | None = None
        self.may_rest: Callable[[], bool] | None = None
        self._on_plane = False
        self._loop.add_reader(self._fd, self._readable)

    @property
    def key_exchange_group(self) -> str | None:
        return self._session.key_exchange_group

    @property
    def peer_names(self) -> list[str]:
        return self._session.peer_names

    def socket(self) -> socket.socket:
        return self._sock

    def write(self, data: bytes, count: int) -> None:
        """Raises `FramingError` (nothing taken) for bytes that are not `count` whole frames, and
        `ConnectionResetError` (nothing taken) when the session's connection has ended already."""
        self.take_back()  # the stream waits for this batch's acks: they are read on the loop
        try:
            unsent = self._session.send_framed(data, count)
        except ValueError as exc:
            if isinstance(exc, FramingError):
                raise
            # The connection ended inside the core before the stream heard of it (its end is on its way).
            raise ConnectionResetError(errno.ECONNRESET, f"connection closed: {exc}") from exc
        except OSError as exc:  # taken, then the socket failed: the receipt learns it from on_lost
            self._loop.call_soon(self._ended_socket, exc)
            return
        if unsent:
            self._want_write(unsent)

    def write_keepalive(self) -> None:
        try:
            unsent = self._session.send_keepalive()
        except OSError as exc:
            self._loop.call_soon(self._ended_socket, exc)
            return
        if unsent:
            self._want_write(unsent)

    def buffered(self) -> int:
        return self._session.unsent

    # What the stream cannot see of the other writer of this connection, the queues' fast path
    # (`DestinationQueues.set_fast`): the session's ledger counts every writer's batches.

    def fast_route(self) -> tuple[SendSession, Callable[[int], None]] | None:
        """The session the fast path may write to now, and what it calls when the socket pushes back;
        None when it may not (not established, ending)."""
        if self.lost or self._closing or self._session.stage != "established":
            return None
        return self._session, self._want_write

    def frames_written(self) -> int:
        """Frames written on the connection, by either writer."""
        return self._session.frames

    def acked_payload(self) -> int:
        return self._session.acked_payload

    def fast_in_flight(self) -> int:
        return self._session.fast_in_flight

    def wire_in_flight(self) -> int:
        return self._session.wire_in_flight

    def fast_frames(self) -> int:
        return self._session.fast_frames

    def fast_wire_bytes(self) -> int:
        return self._session.fast_wire_bytes

    def fail_fast_in_flight(self) -> int:
        """The connection ended: the fast path's batches in flight resolve (their destinations count
        them); returns the frames lost."""
        return self._session.fail_in_flight()

    def _readable(self) -> None:
        """One readiness event: one native call (read, decrypt, acks), then what it reported."""
        if not self.lost:
            self._handle(self._session.pump)

    # --- the data plane's thread (see the class docstring) ---

    def _rest(self) -> None:
        """Hands the ack reads to the data plane's thread, when there is one and nothing here waits on
        them."""
        if (
            self.plane is None
            or self._on_plane
            or self.lost
            or self._closing
            or self._writing
            or self.may_rest is None
            or not self.may_rest()
            or self._sock.fileno() < 0
        ):
            return
        self._loop.remove_reader(self._fd)
        if self.plane.watch_send(self._session, self._parked):
            self._on_plane = True
        else:
            self._loop.add_reader(self._fd, self._readable)

    def _leave_plane(self) -> None:
        """The thread no longer reads the acks (none of its calls touches the session after this); the acks
        it read are counted."""
        if self._on_plane:
            self._on_plane = False
            assert self.plane is not None
            self.plane.unwatch_send(self._session)
            self.sync()

    def take_back(self) -> None:
        """The ack reads back on the loop (the stream is about to write, or waits on acks)."""
        if self._on_plane:
            self._leave_plane()
            if not self.lost:
                self._loop.add_reader(self._fd, self._readable)

    def sync(self) -> None:
        """Counts the acks the data plane's thread read meanwhile."""
        if not self.lost:
            self._count_acks(self._session.acked)

    def _parked(self) -> None:
        """The thread handed the ack reads back: what its read met is handled as `_readable` handles a pump;
        the reads stay on the loop until nothing waits on them again."""
        self._on_plane = False
        if self.lost:
            return
        self._loop.add_reader(self._fd, self._readable)
        self._handle(self._session.take_parked)

    def _handle(self, pump: Callable[[], _PumpResult]) -> None:
        """What a pump of the session reported (on this loop, or on the thread: `take_parked`); then, if
        nothing here waits on the acks, the reads go to the thread."""
        try:
            result = pump()
        except OSError as exc:
            self._ended_socket(exc)
            return
        self._pumped(result)
        self._rest()

    def _pumped(self, result: _PumpResult) -> None:
        events, read, unsent, acked = result
        self._count_acks(acked)
        if events is not None:
            for event in events:
                if isinstance(event, Failed):  # acks that contradict themselves, a bad record
                    broken = _failure_cause(event)
                    if self.on_broken is not None:
                        self.on_broken(broken)
                    self._ended_socket(broken)
                    return
                if isinstance(event, Closed):  # close_notify: the peer is done with this connection
                    self.peer_eof = True
        if read < 0 or self.peer_eof:
            self.peer_eof = True
            self._finish(None)
            return
        self._want_write(unsent)

    def _want_write(self, unsent: int) -> None:
        if unsent and not self._writing and not self.lost:
            self._loop.add_writer(self._fd, self._writable)
            self._writing = True
        elif not unsent and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if unsent > self._high_water:
            self.paused = True
        elif self.paused and unsent <= self._low_water:
            # Whichever call found the output drained wakes the writers, not only `_writable`: the ack
            # read's pump writes the output too (rust/core/src/send.rs), and when it leaves none the writer
            # watch is removed above, so no writability callback would come to wake a writer in `_drain`
            # (which then waited out write_timeout and reset a healthy connection).
            self.paused = False
            self._wake(None)

    def _writable(self) -> None:
        try:
            unsent = self._session.flush()
        except OSError as exc:
            self._ended_socket(exc)
            return
        self._want_write(unsent)
        if self._closing and not unsent:
            self._finish(None)
        elif not unsent:
            self._rest()

    def close(self) -> None:
        if self._closing or self.lost:
            return
        self._closing = True
        if self._on_plane:
            self._leave_plane()
        else:
            self._loop.remove_reader(self._fd)
        self._session.close()
        self._writable()

    def abort(self) -> None:
        if self.lost:
            return
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close_socket()
        self._loop.call_soon(self._ended, None)  # as asyncio's abort: the stream hears of it next

    def _count_acks(self, acked: int) -> None:
        if acked > self.acked:
            self.acked = acked
            if self.on_acked is not None:
                self.on_acked(acked)

    def _ended_socket(self, exc: BaseException) -> None:
        # Acks are counted by `_readable` before a failed write ends the socket: the session reports a write
        # that fails after its read at the next call (rust/core/src/send.rs).
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        self._close_socket()
        self._ended(exc)

    def _close_socket(self) -> None:
        if self._sock.fileno() < 0:
            return
        if self._on_plane:
            self._leave_plane()  # before the descriptor closes: the thread must be done with it
        else:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._session.forget_socket()  # the descriptor's number may be reused once closed
        self._sock.close()

    def _ended(self, exc: BaseException | None) -> None:
        """The connection is gone: wake every waiter, then tell the stream."""
        if self.lost:
            return
        self.lost = True
        self.paused = False
        if exc is not None:
            self.exc = exc
        self._wake(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def _wake(self, exc: BaseException | None) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def drain_waiter(self) -> asyncio.Future[None]:
        """Resolves once the buffer is small again (fails when the connection ends meanwhile)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)


#: Failure reasons of our check of the server's certificate: the dial failed on who answered, after TLS
#: itself worked (counted under the "handshake" operation, as the identity check belongs to it).
_CERTIFICATE_REASONS: Final = frozenset({"key_mismatch", "identity_mismatch", "no_ed25519_key", "weak_key"})


def _failure_cause(failed: Failed, peer_id: str = "") -> BaseException:
    """The exception that says what a core `Failed` event means, of a type `vpn_packet.errors` classifies:
    `TlsError` for TLS (`tls_*`) and our checks of the server's certificate, `ConnectionResetError` for a
    connection closed before the handshake was done, and `FramingError` for the rest: bytes inside TLS that
    break the protocol (a handshake message of another version or none at all, acks that contradict
    themselves or count more than was sent)."""
    reason, detail = failed.reason, failed.detail
    if reason == "closed_early":
        return ConnectionResetError(
            errno.ECONNRESET, f"{peer_id or 'the peer'} closed the connection during the handshake"
        )
    if (
        not (reason.startswith("tls_") or reason in _CERTIFICATE_REASONS)
        or reason == "tls_expected_plaintext"
    ):
        return FramingError(detail, reason)
    if reason == "key_mismatch" and peer_id:
        # One line that says what to do: the common cause is a peer whose key was made anew.
        detail = (
            f"{detail}: if {peer_id}'s key changed, put its new public key (`vpn-packet pubkey` of its key "
            f"file) as public_key of peer {peer_id} in this node's config; otherwise something else answers "
            f"at {peer_id}'s endpoint"
        )
    return TlsError(detail, reason)


class _Dial:
    """The client handshake of a connection on the native core: TLS (rustls: the server must prove the
    key configured for the peer dialled, or in CA mode a certificate naming it; an insecure node has none),
    then the hello (signed in key mode) and the server's answer, driven by one `SendSession.pump` per
    readiness event. `handshake()` returns the established connection as a `_Link`, or raises what ended
    it: `HandshakeRefusedError` with the server's reason, else the cause `_failure_cause` names (or the
    socket's `OSError`). The caller bounds it in time. `operation` says how far it got: `"tls"`, or
    `"handshake"` once TLS is done (at once in plaintext; or when our check of the server's certificate
    refused it)."""

    def __init__(
        self, sock: socket.socket, tls: TlsSecurity, peer_id: str, local_id: str, epoch: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._peer_id = peer_id
        self._local_id = local_id
        self._session = SendSession(tls, self._fd, peer_id, epoch)
        self.operation = "tls" if self._session.encrypted else "handshake"
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._writing = False

    async def handshake(self, high_water: int) -> _Link:
        loop, fd = self._loop, self._fd
        loop.add_reader(fd, self._readable)
        try:
            self._flush()  # the ClientHello (plaintext: nothing; the server speaks first)
            await self._done
        except BaseException:
            self._unwatch()
            self._session.forget_socket()
            self._sock.close()
            raise
        self._unwatch()
        return _Link(self._sock, self._session, high_water)

    def _unwatch(self) -> None:
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False

    def _flush(self) -> None:
        try:
            unsent = self._session.flush()
        except OSError as exc:
            self._fail(exc)
            return
        if unsent and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not unsent and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        if self._done.done():
            return
        try:
            events, read, unsent, _acked = self._session.pump()
        except OSError as exc:
            self._fail(exc)
            return
        stage = self._session.stage
        if stage in ("challenge", "answer", "established"):
            self.operation = "handshake"
        for event in events or ():
            if isinstance(event, Established):
                self._done.set_result(None)
            elif isinstance(event, Refused):
                self._fail(
                    HandshakeRefusedError(self._peer_id, event.reason, event.text, local_id=self._local_id)
                )
            elif isinstance(event, Failed):
                if event.reason in _CERTIFICATE_REASONS:
                    self.operation = "handshake"
                self._fail(_failure_cause(event, self._peer_id))
            if self._done.done():
                return
        if read < 0:  # the core reports the end as closed_early; a guard all the same
            self._fail(ConnectionResetError(errno.ECONNRESET, f"{self._peer_id} closed the connection"))
            return
        if unsent:
            self._flush()

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)


class TcpStream:
    """An ordered stream of framed packets to one peer over TCP (or TLS over TCP), acknowledged by the peer.

    Implements `vpn_packet.api.Stream`. Not created directly: `TcpStreamService.create_stream` makes them.
    Several coroutines may write to one stream; each `write_many` goes out as one contiguous write, so the
    packets of one call are never interleaved with another's.

    `write_many` returns a `Receipt` (see `vpn_packet.transport.delivery`): it resolves with how many of the
    batch's packets the peer acknowledged. The peer acknowledges what it has taken; at most `window` bytes
    may be written and unacknowledged (a writer waits for acks beyond that, so memory stays bounded
    whatever the peer does), and a peer that acknowledges nothing for `ack_timeout` seconds while something
    is in flight is taken for dead (frozen, blackholed, or not reading): the connection is reset and every
    receipt resolves with what was acknowledged. The reset matters: a peer that wakes up later finds its
    connection reset and discards what it had not taken (`Receiver` checks before delivering), so a packet
    counted lost is never delivered after all, and never after packets of a newer connection.
    """

    __slots__ = (
        "__weakref__",  # a dispatcher keeps the connections it gave to its fast path in a WeakSet
        "_ack_timeout",
        "_ack_waiters",
        "_acked_payload_seen",
        "_bytes_written",
        "_close_timeout",
        "_error",
        "_fast",
        "_fast_waiters",
        "_frames_seen",
        "_idle_at_check",
        "_inflight",
        "_last_write",
        "_link",
        "_local_close",
        "_loop",
        "_packets_written",
        "_progress_at",
        "_retiring",
        "_stats",
        "_watchdog",
        "_write_timeout",
        "keepalives",
        "peer_id",
        "sockname",
        "writes",
    )

    def __init__(
        self,
        peer_id: str,
        link: _Link,
        *,
        write_timeout: float,
        close_timeout: float = 1.0,
        window: int = tuning.IN_FLIGHT_WINDOW,
        ack_timeout: float = tuning.ACK_TIMEOUT,
        stats: PeerSendStats | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._stats = stats
        self._retiring = False
        self._link = link
        self._loop = asyncio.get_running_loop()
        self._write_timeout = write_timeout
        self._close_timeout = close_timeout
        self._ack_timeout = ack_timeout
        self._local_close = False
        self._error: BaseException | None = None  # why the stream gave up on the connection, if it did
        self._inflight = InFlight(window)
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress_at = 0.0
        self._ack_waiters: list[asyncio.Future[None]] = []  # woken by ack progress, failed at the end
        self._last_write = self._loop.time()
        # The native fast path (`fast_route`): writes this stream does not see, only their effects.
        self._fast = False  # a route was given out: the watchdog keeps ticking
        self._fast_waiters: list[asyncio.Future[None]] = []  # `fast_settled()`
        self._frames_seen = 0  # the connection's frame count at the last keepalive check
        self._idle_at_check = True  # the watchdog's last tick saw nothing in flight
        self._acked_payload_seen = 0  # the link's acknowledged payload bytes already counted
        self.keepalives = 0
        self._packets_written = 0  # by this stream (the fast path's are the link's to count)
        self._bytes_written = 0
        self.writes = 0
        self.sockname: Any = link.sockname
        link.on_acked = self._on_acked
        link.on_broken = self._give_up_because
        link.on_lost = self._on_lost
        link.may_rest = self._may_rest
        if stats is not None:
            stats.streams.add(self)

    @property
    def closed(self) -> bool:
        """True once the stream was closed locally (or is retiring), or the peer closed or reset it."""
        return self._retiring or self._ended

    @property
    def _ended(self) -> bool:
        return self._local_close or self._link.lost or self._link.peer_eof

    def _may_rest(self) -> bool:
        """Nothing of this stream waits on acks (only the fast path has packets in flight, if anything): its
        link may hand the ack reads to the data plane's thread."""
        return not self._inflight and not self._ack_waiters and not self._fast_waiters and not self.closed

    def sync_acks(self) -> None:
        """Counts the acks the data plane's thread read meanwhile (`_Link.sync`)."""
        self._link.sync()

    @property
    def in_flight(self) -> int:
        """Packets written and not acknowledged yet (the fast path's included)."""
        self._link.sync()
        if self._link.lost:  # the rest was resolved (sent or lost) when the connection ended
            return 0
        return max(0, self._link.frames_written() - self._inflight.acked)

    # --- the native fast path -----------------------------------------------------------------------------

    def fast_route(self) -> tuple[SendSession, int, Callable[[int], None], TcpStream] | None:
        """What the dispatcher's fast path needs to write a destination's packets into this connection
        without its worker (`DestinationQueues.set_fast`): the session, the in-flight window, the call for
        a socket that pushes back, and this stream (what a dispatcher's stop waits for). None when this
        connection cannot take them now. From the first route on, the ack watchdog keeps ticking (every
        `ack_timeout`) to watch writes it does not see."""
        if self.closed:
            return None
        route = self._link.fast_route()
        if route is None:
            return None
        if not self._fast:
            self._fast = True
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(self._loop.time() + self._ack_timeout, self._check_acks)
        session, on_blocked = route
        return session, self._inflight.window, on_blocked, self

    @property
    def fast_in_flight(self) -> int:
        """Packets the fast path wrote here that the peer has not acknowledged yet."""
        return self._link.fast_in_flight()

    def fast_settled(self) -> asyncio.Future[None]:
        """Resolves once the fast path's packets on this connection are all acknowledged, or lost with it
        (a dispatcher's `flush` and `stop` wait for it)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        if not self._link.fast_in_flight() or self._link.lost:
            waiter.set_result(None)
        else:
            self._fast_waiters.append(waiter)
            self._link.take_back()  # the acks that resolve it are read on the loop
        return waiter

    def give_up(self) -> None:
        """Abandon the connection at a stop that cannot wait longer for acks (as a receipt's `give_up`)."""
        self._give_up()

    def _wake_fast_waiters(self) -> None:
        waiters, self._fast_waiters = self._fast_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def packets_sent(self) -> int:
        """Packets written (handed to the kernel), the fast path's included; the peer's acks say what it
        has."""
        return self._packets_written + self._link.fast_frames()

    @property
    def bytes_sent(self) -> int:
        """Bytes written on the wire (framed), the fast path's included."""
        return self._bytes_written + self._link.fast_wire_bytes()

    @property
    def acknowledged(self) -> int:
        """Packets the peer acknowledged on this connection."""
        self._link.sync()
        return self._inflight.acked

    async def write(self, packet: bytes) -> Receipt:
        """Send one packet (framed); see `write_many`."""
        return await self.write_many((packet,))

    async def write_many(self, packets: Sequence[bytes]) -> Receipt:
        """Send `packets` in order as one framed write. Waits (bounded) only while the in-flight window is
        full or the connection pushes back. Returns the batch's `Receipt` (once written, a batch's fate is its
        receipt's, even if the connection dies right after); raises `NetworkError` when the stream is closed,
        reset or stuck before writing (nothing of the batch was written then)."""
        if self.closed:
            raise self._closed_error("write_many")
        if not packets:
            receipt = Receipt(self._give_up, loop=self._loop)
            receipt.set_result(0)
            return receipt
        # One native call frames the batch; FramingError (nothing written) for an empty or oversized packet.
        data = encode_frames(packets)
        return await self._write(data, len(packets))

    async def write_framed(self, data: bytes, count: int) -> Receipt:
        """Send `count` packets already framed in `data` (the dispatcher's native queues frame them as they
        queue them); otherwise like `write_many`."""
        if self.closed:
            raise self._closed_error("write_framed")
        if not count:
            receipt = Receipt(self._give_up, loop=self._loop)
            receipt.set_result(0)
            return receipt
        return await self._write(data, count)

    async def _write(self, data: bytes, count: int) -> Receipt:
        receipt = Receipt(self._give_up, loop=self._loop)
        if not self._fits(len(data)):
            await self._wait_for_space(len(data))
            if self.closed:  # closed while we waited for acks
                raise self._closed_error("write")
        was_idle = not self.in_flight
        try:
            self._link.write(data, count)
        except ConnectionError as exc:  # nothing of the batch was taken: a fresh stream may carry it
            raise NetworkError(exc, peer_id=self.peer_id, operation="write") from exc
        loop_time = self._loop.time()
        self._last_write = loop_time
        if was_idle:
            self._progress_at = loop_time  # the ack clock starts with the first unacked frame
            self._idle_at_check = False
        self._inflight.add(count, len(data), receipt, self._link.frames_written())
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._progress_at + self._ack_timeout, self._check_acks)
        self.writes += 1
        self._packets_written += count
        self._bytes_written += len(data)
        if self._link.paused:
            await self._drain()
        return receipt

    def send_keepalive(self, idle_for: float) -> bool:
        """Write a keepalive frame when nothing was written for `idle_for` seconds (the peer's receiver
        closes a connection that stays silent for its idle timeout). True when one was written."""
        written = self._link.frames_written()
        if written != self._frames_seen:  # the fast path wrote since the last look
            self._frames_seen = written
            self._last_write = self._loop.time()
        if self.closed or self._loop.time() - self._last_write < idle_for:
            return False
        self._link.write_keepalive()
        self._last_write = self._loop.time()
        self.keepalives += 1
        return True

    # --- acknowledgements -----------------------------------------------------------------------------------

    def _on_acked(self, taken: int) -> None:
        """The peer has taken `taken` frames of this connection in all."""
        try:
            newly = self._inflight.ack(taken, self._link.frames_written())
        except ValueError as exc:  # acks beyond what we wrote: a broken peer
            self._give_up_because(exc)
            return
        if newly:
            self._progress_at = self._loop.time()
            if self._stats is not None:
                self._count_acked(taken, newly)
            self._wake_ack_waiters()
            if self._fast_waiters and not self._link.fast_in_flight():
                self._wake_fast_waiters()

    def _count_acked(self, taken: int, newly: int) -> None:
        """Adds the `newly` acknowledged packets (the peer has taken `taken` in all) to the peer's
        `PeerSendStats`, and the payload bytes of every batch the acks now cover whole (a batch an ack ends
        inside adds its bytes when its last packet is acknowledged: framed batches carry no per-packet
        sizes, and `tx_bytes` lags by at most one batch)."""
        stats = self._stats
        assert stats is not None
        acked_payload = self._link.acked_payload()  # the native ledger counts every writer's batches
        acked_bytes = acked_payload - self._acked_payload_seen
        self._acked_payload_seen = acked_payload
        stats.tx_packets += newly
        stats.tx_bytes += acked_bytes
        stats.last_tx = time.monotonic()

    def _check_acks(self) -> None:
        """The watchdog: while something is in flight, acks must progress within `ack_timeout`."""
        self._watchdog = None
        if self.closed:
            return
        self._link.sync()  # the acks the data plane's thread read since the last tick: progress
        now = self._loop.time()
        if not self.in_flight:
            self._idle_at_check = True
            if self._fast:  # the fast path writes without telling: look again later
                self._watchdog = self._loop.call_at(now + self._ack_timeout, self._check_acks)
            return
        if self._fast and self._idle_at_check:
            # In flight since the last tick, written by the fast path unseen (or by the stream): the clock
            # starts at the latest now. So a peer that stops acknowledging the fast path's packets is taken
            # for dead within ack_timeout to twice that.
            self._idle_at_check = False
            self._progress_at = max(self._progress_at, now)
        due = self._progress_at + self._ack_timeout
        if self._loop.time() < due:
            self._watchdog = self._loop.call_at(due, self._check_acks)
            return
        self._give_up_because(
            TimeoutError(
                errno.ETIMEDOUT,
                f"{self.peer_id} acknowledged nothing for {self._ack_timeout:g}s "
                f"({self.in_flight} packets in flight): taken for dead",
            )
        )

    def _next_ack(self) -> asyncio.Future[None]:
        """Resolves at the next ack progress; fails when the connection ends (the watchdog bounds it)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._ack_waiters.append(waiter)
        self._link.take_back()  # the acks that resolve it are read on the loop
        return waiter

    def _fits(self, size: int) -> bool:
        """Whether a batch of `size` bytes fits the in-flight window now (the fast path's bytes included)."""
        return self._inflight.fits(size, self._link.wire_in_flight())

    async def _wait_for_space(self, size: int) -> None:
        try:
            while not self._fits(size):
                await self._next_ack()
        except Exception as exc:
            raise NetworkError(exc, peer_id=self.peer_id, operation="write") from exc

    def _wake_ack_waiters(self) -> None:
        waiters, self._ack_waiters = self._ack_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_lost(self) -> None:
        """The connection ended (either side): every open receipt resolves with what was acknowledged."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        lost = self._inflight.fail() + self._link.fail_fast_in_flight()
        self._wake_fast_waiters()
        error = (
            self._error
            or self._link.exc
            or ConnectionResetError(errno.ECONNRESET, f"connection to {self.peer_id} closed")
        )
        stats = self._stats
        if stats is not None:
            stats.streams.discard(self)
            stats.lost_in_flight += lost
            if self._error is not None or self._link.exc is not None:
                stats.last_error = f"connection lost: {error}"
            elif self._link.peer_eof and not self._local_close:
                stats.last_error = "connection closed by the peer"
        waiters, self._ack_waiters = self._ack_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)

    def _give_up_because(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            _log.warning("stream to %s: %s; connection reset", self.peer_id, error)
        self.abort()

    def _give_up(self) -> None:
        self._give_up_because(OSError(errno.ECANCELED, "gave up waiting for acknowledgements (stopping)"))

    # --- closing --------------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait (at most `write_timeout`) for the bytes waiting for the socket to fall under the low-water
        mark (a quarter of the high-water mark).

        Called after a batch is written, so it never raises: the batch's fate is its receipt's. A peer that
        does not read for `write_timeout` gets its connection reset (the receipts resolve with what it
        acknowledged), and the next write fails; raising here would count the batch failed while the peer
        may have part of it, and a retry would deliver that part twice."""
        waiter = self._link.drain_waiter()
        try:
            async with asyncio.timeout(self._write_timeout):
                await waiter
        except TimeoutError:
            self._give_up_because(
                TimeoutError(
                    errno.ETIMEDOUT,
                    f"peer did not read for {self._write_timeout:g}s "
                    f"({self._link.buffered()} bytes buffered)",
                )
            )
        except Exception:  # the connection was lost while we waited: the receipts say the rest
            pass

    def _closed_error(self, operation: str) -> NetworkError:
        link = self._link
        cause: BaseException
        if self._error is not None:
            cause = self._error
        elif link.exc is not None:
            cause = link.exc
        elif link.peer_eof:
            cause = BrokenPipeError(errno.EPIPE, f"peer {self.peer_id} closed the stream")
        else:
            cause = OSError(errno.ESHUTDOWN, "stream is closed")
        return NetworkError(cause, peer_id=self.peer_id, operation=operation)

    def close_nowait(self) -> None:
        """Start closing: what is buffered is still sent, then the connection closes. Idempotent. Packets
        not acknowledged by then resolve as lost; `close()` waits for their acks first."""
        if not self._local_close:
            self._local_close = True
            self._link.close()

    def abort(self) -> None:
        """Reset the connection at once (RST, not FIN: the peer discards what it has not taken yet)."""
        self._local_close = True
        self._link.abort()

    async def close(self) -> None:
        """Close gracefully: wait (at most `close_timeout`) until the peer acknowledged everything written,
        then close; reset the connection if it does not. Idempotent."""
        try:
            async with asyncio.timeout(self._close_timeout):
                while self.in_flight and not self._ended:
                    with contextlib.suppress(Exception):  # the connection ended: nothing left to wait for
                        await self._next_ack()
                self.close_nowait()
                await self._link.wait_closed()
        except TimeoutError:
            self._give_up_because(
                TimeoutError(
                    errno.ETIMEDOUT,
                    f"closing: {self.in_flight} packets still unacknowledged after {self._close_timeout:g}s",
                )
            )

    async def retire(self) -> None:
        """Take no more writes (they fail as on a closed stream, so writers move to a fresh connection), let
        the peer acknowledge what is in flight, then close: `close()` for a connection whose peer changed
        (a reload) without turning packets the peer has into "lost"."""
        self._retiring = True
        await self.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is gone (closed by either side)."""
        await self._link.wait_closed()

    def write_buffer_size(self) -> int:
        """Bytes accepted but not yet handed to the kernel."""
        return self._link.buffered()

    @property
    def tls(self) -> bool:
        """Whether the connection runs TLS (on the native core)."""
        return self._link.tls

    @property
    def key_exchange_group(self) -> str | None:
        """The TLS key exchange group negotiated (`"X25519MLKEM768"`, `"X25519"`); None in plaintext."""
        return self._link.key_exchange_group

    @property
    def peer_names(self) -> list[str]:
        """The names the peer's TLS certificate carries (CA mode: what its id was checked against)."""
        return self._link.peer_names

    def socket(self) -> socket.socket | None:
        """The connection's socket (for its options; reading or writing it would break the stream)."""
        return self._link.socket()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        tls = " tls" if self._link.tls else ""
        return (
            f"<TcpStream to {self.peer_id} {state}{tls} local={self.sockname} "
            f"packets={self.packets_sent} bytes={self.bytes_sent}>"
        )


def _failure_kind(exc: BaseException) -> str:
    """A short name for a connect failure: the errno's name (`ECONNREFUSED`), else the exception type's."""
    if isinstance(exc, TlsError):
        return exc.reason
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


def _error_text(exc: BaseException) -> str:
    """An error for people: `ECONNREFUSED (Connection refused)`, `ETIMEDOUT: no handshake answer from ...`,
    else the exception's own text."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in errno.errorcode:
        assert isinstance(code, int)
        name, standard = errno.errorcode[code], os.strerror(code)
        text = exc.strerror
        if not text or text == standard or text.startswith("Connect call failed"):  # asyncio's wording
            return f"{name} ({standard})"
        return f"{name}: {text}"
    return str(exc) or type(exc).__name__


class TcpStreamService:
    """Opens `TcpStream`s to peers, each behind an answered handshake. Implements
    `vpn_packet.api.StreamService`.

    - `discovery`: anything with `endpoint(peer_id) -> (host, port)` (a `StaticPeerDiscovery`).
    - `security`: how we prove ourselves and check the server (`vpn_packet.transport.handshake.Security`);
      its `local_id` is the id our hello announces.
    - `connect_timeout`: seconds for TCP connect, TLS and the handshake together.
    - `write_timeout`: seconds a write may wait for a peer that does not read before failing.
    - `ack_timeout`: seconds a peer may acknowledge nothing while packets are in flight before its
      connection is taken for dead and reset; `window`: bytes written and unacknowledged at most, per
      connection (a writer waits beyond it).
    - `send_buffer`: `SO_SNDBUF` in bytes (the kernel may cap it; None leaves the default).
    - `keepalive_interval`: TCP keepalive idle time (then 3 probes 5 s apart): a peer that vanished while
      nothing was in flight is noticed, and the connection replaced, within about that.
    - `failure_log`: where failed connections are logged (`vpn_packet.ratelimit.FailureLog`: one budget for
      every peer and a periodic summary, which the node's keeper ticks); default: a new one.

    Counters: `connects`, `connect_failures`, and `refusals` (by the server's reason); per peer,
    `peer_stats` (`PeerSendStats`: what the peer acknowledged, its open connections, its last error).

    A reload swaps `security` (`Security.with_peer_keys`) and the discovery's peers; `retire_peer(peer_id)`
    then closes the connections of a peer that was removed or whose endpoint or key changed. A connection
    that was being opened meanwhile is abandoned when it completes (`ConnectionAbortedError`): it was made
    with what no longer applies.
    """

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {
        "connect_timeout": "connect_timeout",
        "write_timeout": "write_timeout",
        "ack_timeout": "ack_timeout",
        "window": "window",
        "send_buffer": "send_buffer",
        "keepalive_interval": "keepalive_interval",
    }

    def __init__(
        self,
        discovery: EndpointResolver,
        security: Security,
        *,
        connect_timeout: float = tuning.CONNECT_TIMEOUT,
        write_timeout: float = tuning.WRITE_TIMEOUT,
        ack_timeout: float = tuning.ACK_TIMEOUT,
        window: int = tuning.IN_FLIGHT_WINDOW,
        send_buffer: int | None = DEFAULT_SEND_BUFFER,
        keepalive_interval: float = tuning.KEEPALIVE_INTERVAL,
        high_water: int = _HIGH_WATER,
        failure_log: FailureLog | None = None,
    ) -> None:
        tuning.Tuning.check_fields(
            connect_timeout=connect_timeout,
            write_timeout=write_timeout,
            ack_timeout=ack_timeout,
            window=window,
            keepalive_interval=keepalive_interval,
        )
        self.keepalive_interval = float(keepalive_interval)
        self.ack_timeout = float(ack_timeout)
        self.window = window
        self.discovery = discovery
        self.security = security
        self.connect_timeout = float(connect_timeout)
        self.write_timeout = float(write_timeout)
        self.send_buffer = send_buffer
        self.high_water = high_water
        self.connects = 0
        self.connect_failures = 0
        self.refusals: dict[str, int] = {}
        self.peer_stats: dict[str, PeerSendStats] = {}
        # A node's data plane: its thread reads a connection's acks while only the fast path waits on them.
        self.plane: Plane | None = None
        # Failed connections: one budget for every peer and a periodic summary (vpn_packet.ratelimit).
        self.failure_log = failure_log if failure_log is not None else FailureLog(_log)
        self._native: tuple[Security, TlsSecurity] | None = None

    def sync_acks(self, peer_id: str | None = None) -> None:
        """Counts the acks the data plane's thread read meanwhile, on `peer_id`'s connections (all peers'
        without), so that `peer_stats` is up to date."""
        for stats in (
            self.peer_stats.values() if peer_id is None else filter(None, [self.peer_stats.get(peer_id)])
        ):
            for stream in stats.streams:
                stream.sync_acks()

    def stats(self, peer_id: str) -> PeerSendStats:
        """The live `PeerSendStats` of `peer_id` (created empty on first use)."""
        stats = self.peer_stats.get(peer_id)
        if stats is None:
            stats = self.peer_stats[peer_id] = PeerSendStats()
        return stats

    async def retire_peer(self, peer_id: str, *, forget: bool = False) -> int:
        """Close every open connection to `peer_id`, gracefully (`TcpStream.retire`: no new writes, what is
        in flight may still be acknowledged, bounded by the close timeout); returns how many there were.
        `forget`: drop the peer's stats too (it was removed)."""
        stats = self.peer_stats.get(peer_id)
        if stats is None:
            return 0
        streams = list(stats.streams)
        if forget:
            del self.peer_stats[peer_id]
            self.failure_log.forget(peer_id)
        if streams:
            await asyncio.gather(*(stream.retire() for stream in streams), return_exceptions=True)
        return len(streams)

    @property
    def local_peer_id(self) -> str:
        """The id our hello announces."""
        return self.security.local_id

    async def create_stream(self, peer_id: str) -> TcpStream:
        """A new stream to `peer_id`, accepted by it. Raises `HandshakeRefusedError` when the peer refused
        us (its reason inside), `NetworkError` on any other failure, and `ServiceError` of the discovery for
        an unknown peer (not retriable)."""
        try:
            host, port = self.discovery.endpoint(peer_id)
        except (KeyError, ValueError) as exc:
            raise ServiceError(exc, "peer_discovery", "endpoint", peer_id=peer_id) from exc
        loop = asyncio.get_running_loop()
        link: _Link | None = None
        operation = "connect"
        security = self.security
        stats = self.stats(peer_id)
        dial: _Dial | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                native = self._native_tls(security, peer_id)
                sock = await self._connect_socket(loop, host, port)
                dial = _Dial(sock, native, peer_id, security.local_id, new_epoch())
                operation = dial.operation
                link = await dial.handshake(self.high_water)
                link.plane = self.plane
                self._check_unchanged(peer_id, host, port, security)
        except HandshakeRefusedError as exc:
            self.connect_failures += 1
            self.refusals[exc.reason] = self.refusals.get(exc.reason, 0) + 1
            stats.connect_failures += 1
            stats.refusals[exc.reason] = stats.refusals.get(exc.reason, 0) + 1
            stats.last_error = f"refused by the peer: {exc.reason}: {exc}"
            self.failure_log.failed(
                peer_id, f"refused:{exc.reason}", "%s%s", exc, self._refusal_advice(peer_id, exc.reason)
            )
            if link is not None:
                link.abort()
            raise
        except BaseException as exc:
            self.connect_failures += 1
            stats.connect_failures += 1
            if link is not None:
                link.abort()
            if dial is not None:
                operation = dial.operation
            if isinstance(exc, (OSError, TlsError, TimeoutError, EOFError, FramingError)):
                cause = self._explain(exc, host, port, operation)
                kind = _failure_kind(cause)
                stats.failures[kind] = stats.failures.get(kind, 0) + 1
                stats.last_error = f"{operation} to {host}:{port}: {_error_text(cause)}"
                # A line when the peer's failure is news, within one budget for all peers, then a summary:
                # a peer that is down shows in the log without a line per retry, 10,000 without a flood.
                self.failure_log.failed(
                    peer_id,
                    kind,
                    "cannot open a stream to %s at %s:%d (%s): %s",
                    peer_id,
                    host,
                    port,
                    operation,
                    _error_text(cause),
                )
                raise NetworkError(cause, peer_id=peer_id, operation=operation) from exc
            raise
        self.connects += 1
        if self.peer_stats.get(peer_id) is not stats:  # the peer was removed and added again meanwhile
            stats = self.stats(peer_id)
        stats.connects += 1
        stats.last_error = None
        self.failure_log.succeeded(peer_id)
        stats.last_handshake = time.monotonic()
        stream = TcpStream(
            peer_id,
            link,
            write_timeout=self.write_timeout,
            window=self.window,
            ack_timeout=self.ack_timeout,
            stats=stats,
        )
        return stream

    def _check_unchanged(self, peer_id: str, host: str, port: int, security: Security) -> None:
        """Raises `ConnectionAbortedError` when a reload changed the peer's endpoint or this node's trust
        (`security`) while the connection was being made: it was made with what no longer applies."""
        try:
            now = self.discovery.endpoint(peer_id)
        except (KeyError, ValueError):
            now = None
        current = self.security
        trust_changed = current is not security and (
            current.mode != security.mode or current.peer_keys.get(peer_id) != security.peer_keys.get(peer_id)
        )
        if now != (host, port) or trust_changed:
            raise ConnectionAbortedError(
                errno.ECONNABORTED, f"the configuration of peer {peer_id} changed (reload) while connecting"
            )

    def _refusal_advice(self, peer_id: str, reason: str) -> str:
        """What to do about a refusal a config change fixes, for the log line (empty for the others)."""
        identity = self.security.identity
        if reason in ("key_mismatch", "unknown_peer") and identity is not None:
            return (
                f": put our public key {identity.public_key} as public_key of peer "
                f"{self.security.local_id} in {peer_id}'s config (or, if ours changed by mistake, restore "
                "our old key file)"
            )
        return ""

    def _native_tls(self, security: Security, peer_id: str) -> TlsSecurity:
        """The native core's setup for dialling with `security`, made once per `security` (a reload swaps
        it). Key mode: raises `TlsError` for a peer without a configured key (fail closed, before
        dialling)."""
        if security.mode == "key" and peer_id not in security.peer_keys:
            raise TlsError(f"no public_key is configured for peer {peer_id!r}", "key_mismatch")
        made = self._native
        if made is None or made[0] is not security:
            # A client checks the server it dials by that peer's key or name alone (or, insecure, not at
            # all): no peer list needed.
            made = (security, security.native_tls((), DEFAULT_MAX_FRAME_SIZE))
            self._native = made
        return made[1]

    def _explain(self, exc: BaseException, host: str, port: int, operation: str) -> BaseException:
        """A cause that says what happened, for the bare exceptions that do not."""
        if isinstance(exc, TimeoutError) and not exc.args:
            what = {
                "connect": "connect to",
                "tls": "no TLS handshake with",
                "handshake": "no handshake answer from",
            }[operation]
            hint = ""
            if operation == "handshake" and not self.security.encrypted:
                hint = " (this node is insecure: does the peer expect TLS?)"
            return TimeoutError(
                errno.ETIMEDOUT, f"{what} {host}:{port} within {self.connect_timeout:g}s{hint}"
            )
        if isinstance(exc, asyncio.IncompleteReadError):
            return ConnectionResetError(
                errno.ECONNRESET, f"{host}:{port} closed the connection during the handshake"
            )
        return exc

    async def _connect_socket(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
        addresses: list[tuple[socket.AddressFamily, Any]]
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            addresses = [(info[0], info[4]) for info in infos]
        else:  # an IP literal needs no resolver (getaddrinfo runs in a thread: ~0.1 ms and a context switch)
            addresses = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, (host, port))]
        if not addresses:  # pragma: no cover - getaddrinfo raises instead
            raise OSError(errno.EHOSTUNREACH, f"no address for {host}")
        error: OSError | None = None
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(self.keepalive_interval)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_PROBE_INTERVAL)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_PROBES)
                if self.send_buffer:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        assert error is not None
        raise error

    def __repr__(self) -> str:
        return (
            f"<TcpStreamService {self.local_peer_id} {self.security.mode} connects={self.connects} "
            f"failures={self.connect_failures} refusals={sum(self.refusals.values())}>"
        )
