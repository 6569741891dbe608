"""The receiving side of the data plane: accepts peer connections, proves who they are, and hands their
packets to a sink.

Per connection (the wire messages are drawn in `rust/core/src/handshake.rs` and `framing`):

1. **Pending** (not authenticated yet): from TCP accept to an accepting answer. Anyone can open one without a
   key, so pending connections are bounded in count, time and memory, and which one is closed at a bound is
   the admission policy of `vpn_packet.transport.admission`: a connection that has sent nothing yet is held
   as a bare socket (no session, no task, no TLS buffer), within `max_silent_pending` in all and
   `max_silent_pending_per_source` per address; one whose bytes arrived is handshaking, within `max_pending`
   and `max_pending_per_source`. At a bound the oldest silent, or the stalest handshaking connection (the
   longest without a step of progress) is closed, never the newcomer, and connections from the addresses of
   configured peers' endpoints go last, so no flood without a key keeps a real peer out. With TLS the
   kernel holds a connection that has sent nothing (`TCP_DEFER_ACCEPT`); in plaintext the server speaks
   first, so a connection is handshaking from its accept. `hello_timeout` covers the silent wait, TLS,
   challenge and hello together. Memory per pending connection is bounded (rustls' buffer while a
   handshake message is joined, at most 64 KiB, and at most one hello: `rust/core/src/connection.rs`);
   once the pending connections are gone after a flood, the heap's free pages go back to the system
   (`vpn_packet.heap`).
2. **Handshake**: every connection runs on the native core from its first byte
   (`vpn_packet._native.ReceiveSession`, `rust/core/src/receive.rs`): with TLS (key or CA mode) rustls,
   then the challenge, the hello judged by the rules of `rust/core/src/connection.rs`, the answer; in
   plaintext (`insecure`) the same stages without TLS (a peer is the configured id it claims). Python's
   `ssl` is not on the path. The answer is sent before closing a refused connection so the sender knows
   why. A refusal is counted by reason (`refused`) and logged at WARNING once per reason and address per
   interval; so is a failed handshake (`handshake_failures`: `timeout`, `tls_failed`, `closed_early`, wire
   errors such as `bad_magic`, `tls_expected_plaintext`, `unsupported_version`). With keys the peer is the
   one its key (or CA certificate) proved, never the id it claims.
3. **Frames**: one pump per connection (`_Pump`), TLS and plaintext alike: one native call per socket
   readiness event (`_Pump.readable`) reads, decrypts (with TLS), decodes the frames (across any read
   boundaries), checks every packet's source against the peer table, writes the TUN and sends the ack;
   Python sees the counts of that call and the lifecycle events (established, refused, failed, closed),
   never a packet on the TUN path. A packet whose source's longest prefix is not one of the sending peer's
   is dropped and counted (`spoofed_dropped`); one without a readable IP header is dropped and counted
   (`unparsable_dropped`). On a node with a TUN (`tun_target` set) the accepted packets are written to the
   TUN in that same call (no Python object per packet; `sink` is not called; what the TUN did not take is
   counted in `tun_dropped` or `tun_refused`), offload frames (super-packets from a peer's TUN) whole when
   the TUN takes virtio headers, else segmented. Without one they go to `sink(peer_id, packets)` in batches
   of at most `max_batch`, in stream order (a sink that raises: `sink_raised`), and the ack follows once the
   sink took them. Every frame is counted as delivered or as a drop by reason (`PeerReceiverMetrics`). A
   connection that sends nothing for `idle_timeout` seconds is closed (`idle_closed`; the senders'
   keepalive frames count as something).
4. **The data plane** (TUN path): once a connection is authenticated and steady (no output waiting, no
   deferred ack pending, no sink call), its reads move off the event loop to the receiver's `DataPlane`, a
   Rust thread with its own `epoll` (`rust/core/src/data_plane.rs`): it pumps the same session (the same
   call as `readable`, with the GIL never taken), writes the acks `tuning.ACK_DELAY` later, and hands the
   connection back to the loop (`_Pump.parked`) at anything that is not steady work: a lifecycle event, the
   end of the stream, a reset, a socket error, a TUN gone, acks the socket would not take. So a packet
   from a peer reaches the TUN without an iteration of the loop or a line of Python. The thread counts
   natively; the counters here catch up when someone looks (`sync_counts`: `metrics`, `peer_metrics`,
   `frames_from`, a status snapshot) and when the connection is handed back or ends. A reload that changes
   the routing table in place applies to the thread at once (the table is shared); one that replaces it
   is given to the connections on the thread by `peers_changed`.

Connection slots are held only by authenticated connections: at most `max_connections` in all (beyond: the
new one is refused, `too_many_connections`), and `max_connections_per_peer` per peer, where a new
connection of a peer at its limit closes that peer's oldest one (the peer proved its key; a fresh connection
means it lost an old one), so nobody else can lock a peer out.

A protocol error (frame length 0 or above `max_frame_size`, a stream ending inside a frame, an offload frame
whose virtio header cannot be honoured: counted as a frame dropped, `offload_invalid`, too) is counted by
reason and closes that connection only; packets framed correctly before it are still delivered and
acknowledged.

Memory is bounded per authenticated connection: the receiver reads at most `read_size` bytes at a time and
does not read again until the sink has taken the packets of that read (an awaitable sink is awaited with
reading paused: that is the backpressure, and TCP pushes back on the sender). A connection holds one
`read_size` buffer, rustls' one record (18.4 KiB, with TLS), one partial frame (`max_frame_size + 4`
bytes), the packets of one read (library path) and the output waiting for the socket (acks; above 64 KiB
reading stops until it drains): see `rust/core/src/connection.rs` for the whole bound; the receiver holds
at most `max_connections` times that plus the pending ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import logging
import socket
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Final

from vpn_packet import tuning
from vpn_packet._native import (
    NO_PEER,
    Closed,
    Established,
    Failed,
    ReceiveSession,
    Refused,
    TlsSecurity,
)
from vpn_packet.heap import HeapRelease
from vpn_packet.ratelimit import LogLimiter
from vpn_packet.transport.admission import Admission, Ticket
from vpn_packet.transport.discovery import StaticPeerDiscovery
from vpn_packet.transport.framing import DEFAULT_MAX_FRAME_SIZE
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.plane import Plane

__all__ = ["PACKET_DROPS", "PeerReceiverMetrics", "Receiver", "ReceiverMetrics", "Sink", "TunTarget"]

_log = logging.getLogger(__name__)

#: Connections taken per wake-up of the listening socket at most (asyncio's servers take their backlog, 100).
_ACCEPT_BATCH = 128
#: accept() errors that mean "out of descriptors or kernel memory": shed a silent connection, else pause.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors of a client that went away before it was taken: skip it.
_ACCEPT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: Seconds the kernel holds a new TLS connection that has sent nothing before handing it to us anyway
#: (`TCP_DEFER_ACCEPT`; it counts SYN-ACK retransmissions, so the real wait is a few seconds).
_DEFER_ACCEPT = 1
#: Silent connections looked at (a peeked byte) before the oldest is closed to make room for a new one.
_LOOK_BEFORE_EVICTING = 4
#: Seconds to stop accepting after an accept() error with nothing to shed (asyncio's servers wait 1 s).
_ACCEPT_RETRY_DELAY = 0.5

Counts = tuple[int, int, int, int, int, int, int, int, int, int, int]
"""What a native pump counted (`ReceiveSession.pump`, `take_counts`): `(frames, payload_bytes, delivered,
delivered_bytes, extra_segments, spoofed, unparsable, offload_invalid, tun_dropped, tun_refused, batches)`."""

PumpResult = tuple[list[Established | Refused | Failed | Closed] | None, int, int, Counts]
"""`(events, read, unsent, counts)` of one native pump (see `ReceiveSession.pump`)."""

Sink = Callable[[str, list[bytes]], Awaitable[None] | None]
"""`sink(peer_id, packets)`: takes a batch of accepted packets; may return an awaitable (awaited)."""


@dataclass(slots=True)
class TunTarget:
    """Where a node's receiver writes accepted packets itself, natively (`Receiver.tun_target`): the TUN's
    descriptor, whether it takes virtio headers, and who to tell when a write finds the device gone; and
    what was written there (`packets_written`, `bytes_written`: the device's own counters do not see it)."""

    fd: int
    vnet_header: bool = False
    on_fatal: Callable[[int], object] | None = None
    packets_written: int = 0
    bytes_written: int = 0


#: The packet drop counters of `PeerReceiverMetrics`, by what happened.
PACKET_DROPS: Final = (
    "spoofed_dropped",
    "unparsable_dropped",
    "offload_invalid",
    "sink_raised",
    "sink_cancelled",
    "tun_dropped",
    "tun_refused",
)


@dataclass(eq=False, slots=True)
class _Silent:
    """An accepted connection that has sent nothing yet: the bare socket, watched for readability, and the
    timer of its `hello_timeout`. No transport, stream or task exists for it until its first bytes come."""

    sock: socket.socket
    ticket: Ticket
    timer: asyncio.TimerHandle | None = None


def _bump(counts: dict[str, int], reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


@dataclass
class PeerReceiverMetrics:
    """Counters of one authenticated peer, as plain data.

    Every frame is accounted for: `frames + extra_segments == packets_delivered + dropped` (`dropped`: the
    sum of the drop counters below), on the sink path and the TUN path alike.

    `frames` and `bytes` count every decoded packet frame and its payload bytes (dropped ones included;
    keepalives are not frames); `extra_segments` the packets beyond the first that segmenting a peer's
    super-packets made (one frame, n packets); `packets_delivered` and `batches_delivered` what the sink or
    the TUN took. Packets dropped, by what happened: `spoofed_dropped` (source outside the peer's prefixes),
    `unparsable_dropped` (no readable IP header), `offload_invalid` (an offload frame whose virtio header
    could not be honoured), `sink_raised` (the library sink raised), `sink_cancelled` (a sink call was
    cancelled: the receiver stopped), `tun_dropped` (the TUN had no room, or was gone), `tun_refused` (the
    kernel refused the packet). `sink_failed` is the deprecated name of the
    last four together. `connection_errors` counts connections lost to a reset
    or TLS error; `idle_closed` connections closed for sending nothing for `idle_timeout`; `superseded`
    connections closed because the peer opened a new one at its limit; `discarded_after_reset` bytes read
    but not delivered because the sender had reset the connection meanwhile; `unacknowledged` frames taken
    (delivered, or dropped and counted) whose ack never left because the connection broke first (a reset,
    an error): the sender counted them `lost_in_flight`, so its `sent` plus this is what was taken here;
    `protocol_errors` counts
    wire-protocol violations by reason (`zero_length`, `too_large`, `truncated`); `last_handshake` and
    `last_packet` are the `time.monotonic()` of the last accepted handshake and of the last frame received
    (None: never).
    """

    connections: int = 0
    active_connections: int = 0
    frames: int = 0
    bytes: int = 0
    packets_delivered: int = 0
    batches_delivered: int = 0
    extra_segments: int = 0
    spoofed_dropped: int = 0
    unparsable_dropped: int = 0
    offload_invalid: int = 0
    sink_raised: int = 0
    sink_cancelled: int = 0
    tun_dropped: int = 0
    tun_refused: int = 0
    connection_errors: int = 0
    idle_closed: int = 0
    superseded: int = 0
    discarded_after_reset: int = 0
    unacknowledged: int = 0
    protocol_errors: dict[str, int] = field(default_factory=dict)
    last_handshake: float | None = None
    last_packet: float | None = None

    def _copy(self) -> PeerReceiverMetrics:
        return dataclasses.replace(self, protocol_errors=dict(self.protocol_errors))

    @property
    def drops(self) -> dict[str, int]:
        """Every packet drop counter by name (zeros included): what `dropped` sums."""
        return {name: getattr(self, name) for name in PACKET_DROPS}

    @property
    def dropped(self) -> int:
        """Packets received but not delivered, every reason together."""
        return sum(getattr(self, name) for name in PACKET_DROPS)

    @property
    def sink_failed(self) -> int:
        """Deprecated: `sink_raised + tun_dropped + tun_refused + offload_invalid` (what it counted before
        they had names of their own; warned once)."""
        from vpn_packet.deprecation import RECEIVER_ALIASES, warn_once

        parts = RECEIVER_ALIASES["sink_failed"]
        warn_once("ReceiverMetrics.sink_failed", f"sink_failed is now {', '.join(parts)}")
        return sum(getattr(self, name) for name in parts)


@dataclass
class ReceiverMetrics(PeerReceiverMetrics):
    """Totals over all connections, plus what happens before a peer is proven.

    `connections` counts every accepted TCP connection; `pending` the connections not authenticated yet
    (now, silent and handshaking: `vpn_packet.transport.admission`); `evicted_pending` those closed to make
    room for a newer one; `rejected_pending` those refused at accept, which the admission policy no longer
    does (a newcomer always gets a place): it stays 0, kept for the metrics' names; `handshake_failures`
    counts handshakes that ended without a verdict, by reason; `refused` counts hellos refused with an
    answer, by reason (`unknown_peer`, `key_mismatch`, ...).
    """

    pending: int = 0
    rejected_pending: int = 0
    evicted_pending: int = 0
    handshake_failures: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)

    def _copy(self) -> ReceiverMetrics:
        return dataclasses.replace(
            self,
            protocol_errors=dict(self.protocol_errors),
            handshake_failures=dict(self.handshake_failures),
            refused=dict(self.refused),
        )


def _queued_bytes(fd: int) -> int:
    """Bytes waiting in the kernel's receive queue of socket `fd` (0 when unknown)."""
    try:
        answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", answer)[0])


#: Failure reasons of the TLS layer (rustls, and our certificate verifiers): counted together as
#: `tls_failed` among the handshake failures (the exact reason is in the log line).
_TLS_REASONS: Final = frozenset({"key_mismatch", "identity_mismatch", "no_ed25519_key", "weak_key"})
#: Output bytes (acks) a native connection lets wait for a slow socket before it stops reading.
_MAX_UNSENT = 64 * 1024


def _handshake_reason(reason: str) -> str:
    """The handshake failure a core reason counts as: TLS's together (`tls_failed`), the others by name (a
    TLS client at an insecure node, `tls_expected_plaintext`, is a wire error, not a TLS failure)."""
    if reason == "tls_expected_plaintext":
        return reason
    return "tls_failed" if reason.startswith("tls_") or reason in _TLS_REASONS else reason


@dataclass(eq=False, slots=True)
class _Connection:
    """One accepted connection on the native core (`vpn_packet._native.ReceiveSession`): TLS (or an
    insecure node's plaintext), the hello, frames, the source check, the TUN write and the ack run in one
    native call per socket readiness event (`_Pump`); the task waits for its end."""

    sock: socket.socket
    session: ReceiveSession
    source: str
    ticket: Ticket
    reloads: int
    task: asyncio.Task[None] = field(init=False)
    pump: _Pump = field(init=False)
    peer_id: str | None = None
    closed_because: str | None = None

    def close(self, because: str) -> None:
        """Close at once: another connection needs the slot, or the peer was removed. An authenticated
        one is reset (what it read and did not acknowledge is counted by the sender); one still in its
        handshake has taken nothing, and ends with a plain close."""
        self.closed_because = because
        self.pump.finish(self.peer_id is None)

    @property
    def buffered(self) -> int:
        return self.session.buffered


class _Pump:
    """The one receive pump, for TLS and plaintext alike: the readiness callbacks of one `_Connection`.
    `readable` pumps the session once (one native call: read, decrypt, judge, decode, check, write the
    TUN, send the ack), handles the lifecycle events it returns (established, refused, failed, closed) and
    counts what the call did. On the library path the packets go to the sink and the ack is written once
    the sink took them (reading paused while an awaitable sink is pending: that is the backpressure, and
    TCP pushes back on the sender). `done` resolves with True when the connection ended cleanly.

    The idle rule: the timer runs at most once per idle period (not per read), re-armed from the last data
    seen; time spent waiting for the sink is not silence from the sender."""

    conn: _Connection

    def __init__(self, receiver: Receiver, conn: _Connection, target: TunTarget | None) -> None:
        self.receiver = receiver
        self.conn = conn
        self.target = target
        self.peer: PeerReceiverMetrics | None = None
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[bool] = self._loop.create_future()
        self._fd = conn.sock.fileno()
        self._generation = receiver.discovery.generation
        self._reading = False
        self._writing = False
        self._stage = "tls"
        self._last_data = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = self._loop.call_at(
            conn.ticket.accepted + receiver.hello_timeout, self._hello_timed_out
        )
        self._sink_task: asyncio.Task[None] | None = None
        self._ack_handle: asyncio.TimerHandle | None = None  # the deferred write of the output (the acks)
        self._unacked_bytes = 0  # payload taken since the last ack written whole (`tuning.ACK_BYTES`)
        self._on_plane = False  # pumped by the receiver's data plane, not by this loop (`_place`)
        self.reset = False  # how the socket ends (`finish`)
        self._watch(True)

    def _watch(self, reading: bool) -> None:
        """Reads on this loop (`reading`), or not at all; `_place` moves a steady connection's reads to the
        data plane, and this takes them back."""
        if reading and not self._reading and not self.done.done():
            self._loop.add_reader(self._fd, self.readable)
        elif not reading and self._reading:
            if self._on_plane:
                self._on_plane = False
                self.receiver._leave_plane(self)
            else:
                self._loop.remove_reader(self._fd)
        self._reading = reading and not self.done.done()

    def _place(self) -> None:
        """Hands the reads to the receiver's data plane once the connection is steady: authenticated, on the
        TUN path, read on this loop, no output waiting and no deferred ack pending. From then on its thread
        pumps the session (read, decrypt, check, TUN write, ack) and no callback runs here per read, until
        it meets something for Python (`_parked`)."""
        if (
            self._reading
            and not self._on_plane
            and not self._writing
            and self._ack_handle is None
            and self.peer is not None
            and self.target is not None
            and self._sink_task is None
            and not self.done.done()
            and not self.conn.session.fatal_errno
        ):
            self._loop.remove_reader(self._fd)
            self._on_plane = True
            if not self.receiver._enter_plane(self):
                self._on_plane = False
                self._loop.add_reader(self._fd, self.readable)

    def parked(self) -> None:
        """The data plane handed the connection back: what its thread met (an event, the end, an error, output
        the socket would not take) is handled as `readable` handles a pump's answer; the reads stay on this
        loop until the connection is steady again (`_place`)."""
        self._on_plane = False
        self._reading = False
        if self.done.done():
            return
        self._watch(True)
        try:
            result = self.conn.session.take_parked()
        except OSError as exc:
            self._socket_failed(exc)
            return
        self._pumped(result, defer=True)

    def sync(self) -> None:
        """Counts what the data plane's thread did since the last look (it counts natively, not here)."""
        peer = self.peer
        if peer is not None:
            session = self.conn.session
            counts = session.take_counts()
            if counts[0]:
                self.receiver._count_pump(peer, counts, self.target, session.fatal_errno)
                quiet = session.quiet_for or 0.0
                peer.last_packet = time.monotonic() - quiet

    def check_routes(self) -> bool:
        """A reload that replaced the routing table: the session is given the new one (False: the peer is
        gone, and the connection with it)."""
        receiver, conn = self.receiver, self.conn
        discovery = receiver.discovery
        if discovery.generation != self._generation:
            self._generation = discovery.generation
            if conn.peer_id is not None and conn.peer_id not in discovery:
                conn.closed_because = "peer removed"
                self.finish(False)
                return False
            conn.session.set_route(discovery.table, receiver._peer_indexes())
        return True

    def _want_write(self, unsent: int) -> None:
        """After every write of the session's output: watch for room while some waits."""
        if unsent and not self._writing and not self.done.done():
            self._loop.add_writer(self._fd, self._writable)
            self._writing = True
            if unsent > _MAX_UNSENT:
                self._watch(False)
        elif not unsent and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _flush(self) -> int | None:
        """Writes what output the socket takes and watches for room while some waits: the bytes still
        waiting, or None when the socket failed (the connection is finished then)."""
        try:
            unsent = self.conn.session.flush()
        except OSError as exc:
            self._socket_failed(exc)
            return None
        if not unsent:
            self._unacked_bytes = 0
        self._want_write(unsent)
        return unsent

    def _writable(self) -> None:
        unsent = self._flush()
        if unsent == 0 and self._sink_task is None and not self.done.done():
            self._watch(True)
            self._place()

    def readable(self) -> None:
        """One readiness event: one native call, then the lifecycle it reports."""
        if self.done.done() or not self.check_routes():
            return
        # On the TUN path of an established connection the output (the ack) is written after what the loop
        # found ready meanwhile (`_ack_soon`): the reply the delivered packets provoke leaves first.
        defer = self.target is not None and self.peer is not None
        try:
            result = self.conn.session.pump(not defer)
        except OSError as exc:
            self._socket_failed(exc)
            return
        self._pumped(result, defer)
        self._place()

    def _pumped(self, result: PumpResult, defer: bool) -> None:
        """What one native pump (on this loop or the data plane's thread) reported: its lifecycle events,
        counts, packets for a sink, the output it left, the end of the stream."""
        receiver, conn = self.receiver, self.conn
        session = conn.session
        events, read, unsent, counts = result
        if read < -1:  # the sender reset the connection: what waits behind the reset is counted lost there
            if counts[0] and self.peer is not None:  # what the data plane's reads before it delivered
                receiver._count_pump(self.peer, counts, self.target, session.fatal_errno)
            self._reset_by_sender(-2 - read)
            return
        if events is not None:
            for event in events:
                self._event(event)
        if read:
            self._last_data = self._loop.time()
        if conn.peer_id is None and read > 0 and not self.done.done():
            stage = session.stage
            if stage != self._stage or stage == "challenge":  # TLS done, or a part of the hello: a step
                receiver._admission.progress(conn.ticket)
            self._stage = stage
        peer = self.peer
        if counts[0] and peer is not None:
            receiver._count_pump(peer, counts, self.target, session.fatal_errno)
            peer.last_packet = time.monotonic()
        if self.target is None and peer is not None and counts[0]:
            packets = session.take_packets()
            if packets:
                assert conn.peer_id is not None
                pending = receiver._deliver(conn.peer_id, peer, packets)
                if pending is not None:  # an awaitable sink: wait for it, reading paused, then the ack
                    self._watch(False)
                    self._sink_task = self._loop.create_task(self._after_sink(pending, read < 0))
                    return
        if defer and unsent and events is None and read > 0:
            self._unacked_bytes += counts[1]
            if self._unacked_bytes < tuning.ACK_BYTES:
                self._ack_soon()
                return
        if self.target is None or defer:
            if self._flush() is None:
                return
        else:
            self._want_write(unsent)
        if read < 0 and not self.done.done():
            self._end_of_stream()

    def _ack_soon(self) -> None:
        """Writes the output `tuning.ACK_DELAY` later (at once past `tuning.ACK_BYTES`: `_pumped`), after the
        readiness callbacks that came due (asyncio runs the readiness callbacks of a select before the
        timers that came due). So the TUN read of the reply that a delivered packet provoked (an echo reply,
        a TCP ack, a server's answer) is sent before this ack, which a request's round trip does not wait
        for; the acks of the reads meanwhile go as one write."""
        if self._ack_handle is None:
            self._ack_handle = self._loop.call_later(tuning.ACK_DELAY, self._write_acks)

    def _write_acks(self) -> None:
        self._ack_handle = None
        if not self.done.done():
            self._flush()
            self._place()

    async def _after_sink(self, pending: Awaitable[None], eof: bool) -> None:
        try:
            await pending
        finally:
            self._sink_task = None
        self._last_data = self._loop.time()
        if self.done.done():
            return
        sock = self.conn.sock
        try:
            reset = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        except OSError:
            reset = True
        if reset:  # the sender reset the connection while the sink held us: not acknowledged, discarded
            self._reset_by_sender(_queued_bytes(sock.fileno()))
            return
        unsent = self._flush()
        if unsent is None:
            return
        if eof:
            self._end_of_stream()
        elif unsent <= _MAX_UNSENT:
            self._watch(True)
            self._place()

    def _end_of_stream(self) -> None:
        if self.peer is not None and self.conn.session.buffered:
            self.receiver._protocol_error(self.peer, "truncated")
            self.finish(False, reset=False)
        else:
            self.finish(self.peer is not None)

    def _event(self, event: Established | Refused | Failed | Closed) -> None:
        receiver, conn = self.receiver, self.conn
        if isinstance(event, Established):
            self._cancel_hello_timer()
            receiver._leave_pending(conn)
            if conn.reloads != receiver._reloads or event.peer_id not in receiver.discovery:
                conn.closed_because = "reloaded during the handshake"
                self.finish(False)
                return
            if event.announced_id != event.peer_id and receiver.security.mode == "key":
                _log.info(
                    "peer %s connects under the name %r (its key decides)", event.peer_id, event.announced_id
                )
            self.peer = receiver._enter_peer(conn, event.peer_id)
            self._arm_idle(self._loop.time() + receiver.idle_timeout)
        elif isinstance(event, Refused):
            self._cancel_hello_timer()
            receiver._refused(conn.source, event.claimed or "?", event.reason, event.text)
            self.finish(True)  # gracefully: the answer must reach the client
        elif isinstance(event, Failed):
            if self.peer is None:
                self._cancel_hello_timer()
                detail = event.detail
                if event.reason == "closed_early":
                    detail = receiver._why_closed_early(conn)
                elif event.reason == "tls_alert" and "Certificate" in detail:  # BadCertificate, ...
                    detail = receiver._why_certificate_refused(conn, detail)
                reason = _handshake_reason(event.reason)
                receiver._count_failure(conn.source, reason, detail)
                # Bytes that are not a hello of this version may have been answered (why, on the wire):
                # closed gracefully, so that the answer reaches the client before the end.
                self.finish(reason not in ("tls_failed", "closed_early"))
            else:
                if event.reason == "offload_invalid":  # a frame received and dropped: counted as both
                    receiver._count(self.peer, "frames", 1)
                    receiver._count(self.peer, "offload_invalid", 1)
                receiver._framing_broken(conn, self.peer, event.reason)
                self.finish(False, reset=False)
        else:  # Closed: the peer ended an established connection (inside a frame: truncated)
            self._end_of_stream()

    def _reset_by_sender(self, unread: int) -> None:
        receiver, conn = self.receiver, self.conn
        if self.peer is not None:
            receiver._discard_after_reset(conn, self.peer, unread)
        else:  # inside the handshake: it ended early (a client that refuses our key hangs up so)
            self._cancel_hello_timer()
            receiver._count_failure(conn.source, "closed_early", receiver._why_closed_early(conn))
        self.finish(False)

    def _socket_failed(self, exc: OSError) -> None:
        """Reset, broken pipe: the peer's side went away, not a protocol violation."""
        receiver, conn = self.receiver, self.conn
        _log.debug("receiver connection error from %s: %r", conn.source, exc)
        if self.peer is not None:
            receiver._totals.connection_errors += 1
            self.peer.connection_errors += 1
        else:
            self._cancel_hello_timer()
            receiver._count_failure(conn.source, "closed_early", receiver._why_closed_early(conn))
        self.finish(False)

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        if self.conn.peer_id is None and not self.done.done():
            timeout = self.receiver.hello_timeout
            self.receiver._count_failure(
                self.conn.source, "timeout", f"no complete handshake within {timeout:g}s"
            )
            self.finish(False)

    def _cancel_hello_timer(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _idle_peer(self) -> PeerReceiverMetrics:
        assert self.peer is not None  # the idle timer is armed once the hello is accepted
        return self.peer

    def finish(self, clean: bool, *, reset: bool | None = None) -> None:
        """Stops watching the socket; `done` says whether the end is clean. `reset`: the socket is then
        reset (default: when the end is not clean), so that the sender discards what it sent and we did not
        acknowledge; a protocol error has acknowledged all it took, and its end is a plain close, so that
        the last ack reaches the sender. Acks still deferred (`_ack_soon`) leave first on a plain close."""
        self._watch(False)  # off the data plane first (its counts caught up): only this loop touches it now
        if not self.done.done():
            self.reset = not clean if reset is None else reset
            if self._ack_handle is not None:
                self._ack_handle.cancel()
                self._ack_handle = None
            if not self.reset:  # a plain close: the last ack (queued by the core) goes out first
                with contextlib.suppress(OSError):
                    self.conn.session.flush()
            if not clean:
                self._count_unacknowledged(self.peer, self.conn.session.frames)
        self._cancel_hello_timer()
        self._cancel_idle()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if not self.done.done():
            self.done.set_result(clean)

    def _arm_idle(self, when: float) -> None:
        self._idle_timer = self._loop.call_at(when, self._check_idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _check_idle(self) -> None:
        self._idle_timer = None
        receiver = self.receiver
        quiet = self.conn.session.quiet_for  # reads on the data plane's thread count too
        if quiet is not None:
            self._last_data = max(self._last_data, self._loop.time() - quiet)
        deadline = self._last_data + receiver.idle_timeout
        if self._sink_task is not None or self._loop.time() < deadline:
            self._arm_idle(max(deadline, self._loop.time() + receiver.idle_timeout / 4))
            return
        self._idle_peer().idle_closed += 1
        receiver._totals.idle_closed += 1
        self.conn.closed_because = "idle"
        self.finish(True)

    async def sink_taken(self) -> None:
        """Returns when no sink call is pending."""
        task = self._sink_task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    def cancel_sink(self) -> None:
        """The connection ends: a sink call in progress is cancelled."""
        if self._sink_task is not None:
            self._sink_task.cancel()

    def _count_unacknowledged(self, peer: PeerReceiverMetrics | None, taken: int) -> None:
        """The connection broke: the frames taken whose ack never left (the kernel took acks up to
        `acked_out`) are counted (`unacknowledged`)."""
        n = taken - self.conn.session.acked_out
        if peer is not None and n > 0:
            peer.unacknowledged += n
            self.receiver._totals.unacknowledged += n


class Receiver:
    """Accepts peer connections on `host:port` and delivers their packets to `sink(peer_id, packets)`.

    `security` says how peers prove who they are (`vpn_packet.transport.handshake.Security`). Lifecycle:
    `await start()` binds (then `address` is the bound `(host, port)`), `await stop()` closes the listener
    and every connection and leaves no task; `stop` is idempotent, and `async with Receiver(...)` does both.
    A receiver is started once.
    """

    #: The constructor keywords a node's `Tuning` sets (`vpn_packet.tuning.build`): keyword -> field.
    TUNING_FIELDS: ClassVar[dict[str, str]] = {
        "hello_timeout": "hello_timeout",
        "idle_timeout": "receive_idle_timeout",
        "max_batch": "receive_batch",
        "max_connections": "max_connections",
        "max_connections_per_peer": "max_connections_per_peer",
        "max_pending": "max_pending",
        "max_pending_per_source": "max_pending_per_source",
        "max_silent_pending": "max_silent_pending",
        "max_silent_pending_per_source": "max_silent_pending_per_source",
        "read_size": "read_size",
        "data_plane_threads": "data_plane_threads",
    }

    def __init__(
        self,
        discovery: StaticPeerDiscovery,
        sink: Sink,
        *,
        security: Security,
        host: str = "127.0.0.1",
        port: int = 0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        hello_timeout: float = tuning.HELLO_TIMEOUT,
        idle_timeout: float = tuning.RECEIVE_IDLE_TIMEOUT,
        max_batch: int = tuning.RECEIVE_BATCH,
        max_connections: int = tuning.MAX_CONNECTIONS,
        max_connections_per_peer: int = tuning.MAX_CONNECTIONS_PER_PEER,
        max_pending: int = tuning.MAX_PENDING,
        max_pending_per_source: int = tuning.MAX_PENDING_PER_SOURCE,
        max_silent_pending: int = tuning.MAX_SILENT_PENDING,
        max_silent_pending_per_source: int = tuning.MAX_SILENT_PENDING_PER_SOURCE,
        read_size: int = tuning.READ_SIZE,
        log_interval: float = tuning.LOG_INTERVAL,
        data_plane_threads: int = tuning.DATA_PLANE_THREADS,
    ) -> None:
        if not 0 < max_frame_size <= 1 << 24:
            raise ValueError("max_frame_size must be 1..16 MiB")
        tuning.Tuning.check_fields(
            hello_timeout=hello_timeout,
            receive_idle_timeout=idle_timeout,
            receive_batch=max_batch,
            max_connections=max_connections,
            max_connections_per_peer=max_connections_per_peer,
            max_pending=max_pending,
            max_pending_per_source=max_pending_per_source,
            max_silent_pending=max_silent_pending,
            max_silent_pending_per_source=max_silent_pending_per_source,
            read_size=read_size,
            data_plane_threads=data_plane_threads,
        )
        self.discovery = discovery
        self.sink = sink
        self.security = security
        self.host = host
        self.port = port
        self.max_frame_size = max_frame_size
        self.hello_timeout = hello_timeout
        self.idle_timeout = idle_timeout
        self.max_batch = max_batch
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.max_silent_pending = max_silent_pending
        self.max_silent_pending_per_source = max_silent_pending_per_source
        self.read_size = read_size
        self._warn = LogLimiter(_log, log_interval)
        self._listeners: list[socket.socket] = []
        self._address: tuple[str, int] | None = None
        self._state = "new"  # new -> running -> stopped
        # Every connection task, pending or authenticated (per peer, oldest first).
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        # Who holds a pending place, silent or handshaking (see `vpn_packet.transport.admission`).
        self._admission = Admission(
            max_silent=max_silent_pending,
            max_silent_per_source=max_silent_pending_per_source,
            max_pending=max_pending,
            max_pending_per_source=max_pending_per_source,
            favoured=self._is_peer_address,
        )
        self._heap = HeapRelease()
        self._by_peer: dict[str, OrderedDict[asyncio.Task[None], _Connection]] = {}
        self._authenticated = 0
        self._totals = ReceiverMetrics()
        self._per_peer: dict[str, PeerReceiverMetrics] = {}
        self._reloads = 0  # `update_security` calls: a handshake that spans one is not trusted
        # The native TLS core's setup, for (reloads, discovery generation) it was made at (see `_native`).
        self._native_tls: tuple[int, int, TlsSecurity] | None = None
        # Set before `start()` by a node on a TUN: packets then go from socket to TUN in one native call per
        # read, without the sink (see `_Pump`).
        self.tun_target: TunTarget | None = None
        # The thread that pumps the steady connections of the TUN path (`_Pump._place`; a node's TUN reads
        # share it).
        self.plane = Plane(threads=data_plane_threads)
        self._peer_entered = asyncio.Event()  # set when a peer authenticates (`wait_connected`)
        # Called with the peer id of every authenticated connection (a node's keeper connects back at once).
        self.on_authenticated: Callable[[str], object] | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Binds and starts accepting connections."""
        if self._state != "new":
            raise RuntimeError(f"receiver is {self._state}; a receiver is started once")
        self._state = "running"
        try:
            self._native()  # a certificate or key the native TLS core refuses: named at start
            self._listeners = await self._listen()
        except BaseException:
            self._state = "stopped"
            raise
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        sockname = self._listeners[0].getsockname()
        self._address = (sockname[0], sockname[1])
        _log.debug("receiver listening on %s:%d (%s)", *self._address, self.security.describe())

    async def _listen(self) -> list[socket.socket]:
        """Listening sockets on `host:port`, one per address the host resolves to (as `asyncio.start_server`
        binds them). Not an asyncio server: `_accept` takes the connections, so that one stays a bare socket
        until it sends something (see `vpn_packet.transport.admission`)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        listeners: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                if self.security.mode != "insecure" and _DEFER_ACCEPT:
                    # With TLS the client speaks first: the kernel holds a connection that has sent nothing
                    # (its request in the SYN queue, a few hundred bytes, no descriptor) until its first bytes
                    # come, so most of a flood of silent connections never reaches us; what comes after
                    # the deferral (or past the SYN queue, by SYN cookie) waits in the silent tier.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _DEFER_ACCEPT)
                # The kernel's largest accept queue: under a flood of connects a peer's SYN still finds room
                # (beyond it, SYN cookies), and `_accept` takes a batch per wake-up.
                sock.listen(socket.SOMAXCONN)
                sock.setblocking(False)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        return listeners

    async def stop(self, timeout: float = tuning.SHUTDOWN_TIMEOUT) -> None:  # noqa: ASYNC109 - like Dispatcher.stop
        """Stops listening, closes every connection and waits (at most `timeout` seconds) for their tasks.

        Idempotent. A sink call in progress is cancelled.
        """
        if self._state == "stopped":
            return
        self._state = "stopped"
        listeners, self._listeners = self._listeners, []
        if not listeners:
            return
        loop = asyncio.get_running_loop()
        for listener in listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        for ticket in self._admission.tickets():
            handle = ticket.handle
            if isinstance(handle, _Silent):
                self._admission.leave(ticket)
                self._close_silent(handle)
        # Connections started just now have their task created but not started: let them start (they see
        # the stopped state and leave at once), then cancel the rest.
        await asyncio.sleep(0)
        tasks = set(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                _log.warning(
                    "receiver stop: %d connection tasks did not finish in %gs", len(pending), timeout
                )
        self.plane.close()
        self._heap.cancel()

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def address(self) -> tuple[str, int]:
        """The bound `(host, port)`; raises `RuntimeError` before `start()`."""
        if self._address is None:
            raise RuntimeError("receiver is not started")
        return self._address

    # --- metrics ---------------------------------------------------------------------------------------

    def metrics(self) -> ReceiverMetrics:
        """A snapshot of the totals."""
        self.sync_counts()
        snapshot = self._totals._copy()
        snapshot.pending = len(self._admission)
        return snapshot

    def peer_metrics(self) -> dict[str, PeerReceiverMetrics]:
        """A snapshot of the counters of every peer that has had an authenticated connection."""
        self.sync_counts()
        return {peer_id: m._copy() for peer_id, m in self._per_peer.items()}

    def frames_from(self, peer_id: str) -> int:
        """Packets received from `peer_id` so far (keepalives are not frames): O(1), for the keeper's use
        rule, which reads it every second for the peers with a connection."""
        for conn in self._by_peer.get(peer_id, {}).values():
            if conn.pump._on_plane:
                conn.pump.sync()
        peer = self._per_peer.get(peer_id)
        return peer.frames if peer is not None else 0

    def sync_counts(self) -> None:
        """Brings the counters (and `tun_target`'s) up to date with what the data plane's thread did: it
        counts natively, and they are read here, when someone looks."""
        for pump in self._pumps_on_plane():
            pump.sync()

    # --- the data plane -------------------------------------------------------------------------------

    def _pumps_on_plane(self) -> list[_Pump]:
        """The pumps whose connection the data plane's thread drives now."""
        return [conn.pump for conn in self._connections.values() if conn.pump._on_plane]

    def _enter_plane(self, pump: _Pump) -> bool:
        """Hands `pump`'s session to the data plane; False if it cannot take it (the pump then goes on
        reading on the loop)."""
        conn = pump.conn
        index = self._peer_indexes().get(conn.peer_id or "", NO_PEER)
        return self.plane.watch_receive(conn.session, index, pump.parked)

    def _leave_plane(self, pump: _Pump) -> None:
        """Takes `pump`'s session back from the data plane (no call of its thread touches it after this),
        its counts brought up to date."""
        self.plane.unwatch_receive(pump.conn.session)
        pump.sync()

    async def wait_connected(self, peer_ids: Collection[str], timeout: float) -> bool:  # noqa: ASYNC109 - a bound
        """Wait (at most `timeout` seconds) until every peer of `peer_ids` has an authenticated connection to
        us; True when they all have. A node that says it is running after this has both directions of its
        tunnels up, so the reply to a first packet does not wait for the peer's connection either."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(self._by_peer.get(peer_id) for peer_id in peer_ids):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._peer_entered.clear()
            try:
                await asyncio.wait_for(self._peer_entered.wait(), left)
            except TimeoutError:
                return False
        return True

    def update_security(
        self, security: Security, keys: Mapping[str, bytes] | None = None, removed: Iterable[str] = ()
    ) -> None:
        """A reload: judge handshakes from now on with `security` (new peer keys take effect at once; a
        handshake in progress meanwhile is closed once it completes, and the peer connects again).

        `keys` and `removed` (key mode): the changes `security` was derived with
        (`Security.with_key_changes`); the native TLS core's peer table is then changed in place, the work
        of the peers changed, instead of being made again from every key at the next connection."""
        self.security = security
        made = self._native_tls
        current = made is not None and made[0] == self._reloads  # made from the security `security` follows
        self._reloads += 1
        if made is None:
            return
        if keys is None or not current or security.mode != "key" or made[2].mode != "key":
            self._native_tls = None  # made again, from `security`, for the next connection
            return
        try:
            made[2].update_keys(list(keys.items()), list(removed))
        except ValueError:  # IdentityError: `security` checked them already; made again all the same
            self._native_tls = None
            return
        self._native_tls = (self._reloads, made[1], made[2])

    def peers_changed(self, added: Iterable[str], removed: Iterable[str]) -> None:
        """Peers were added to or removed from `discovery` in place (`StaticPeerDiscovery.update`, which
        keeps its generation): in CA and insecure modes the native core's setup names the configured peers,
        and is changed in place to match, O(the peers changed); key mode's trusts keys (`update_security`)."""
        made = self._native_tls
        if made is not None and made[2].mode != "key":
            made[2].update_ids(list(added), list(removed))
        # An update that compacted the table replaced it (its generation moved): the connections on the data
        # plane get the new one now (those on the loop look at their next read).
        for pump in self._pumps_on_plane():
            pump.check_routes()

    def close_peer(self, peer_id: str, because: str = "reloaded") -> int:
        """Reset every authenticated connection of `peer_id` now (a reload removed it or changed its key);
        returns how many. What was read and not delivered yet is not acknowledged: the sender counts it."""
        held = self._by_peer.get(peer_id)
        if not held:
            return 0
        conns = list(held.values())
        for conn in conns:
            conn.close(because)
        return len(conns)

    def buffered_bytes(self) -> int:
        """Bytes the open connections hold right now: partial frames and handshake messages, packets not
        taken by the sink yet (introspection)."""
        return sum(conn.buffered for conn in self._connections.values())

    def __repr__(self) -> str:
        where = f"{self._address[0]}:{self._address[1]}" if self._address else f"{self.host}:{self.port}"
        t = self._totals
        return (
            f"<Receiver {self._state} on {where} {self.security.mode} peers={len(self.discovery)} "
            f"pending={len(self._admission)} authenticated={self._authenticated} connections={t.connections} "
            f"delivered={t.packets_delivered} spoofed={t.spoofed_dropped} refused={sum(t.refused.values())}>"
        )

    # --- connections -----------------------------------------------------------------------------------

    def _protocol_error(self, peer: PeerReceiverMetrics | None, reason: str) -> None:
        for m in (self._totals, peer):
            if m is not None:
                _bump(m.protocol_errors, reason)

    # --- accepting: the pending connections and their places -------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """The listening socket is readable: take up to `_ACCEPT_BATCH` new connections."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # Silent connections are the cheapest to lose: close the oldest and take this one.
                    oldest = self._admission.oldest_silent()
                    if oldest is not None:
                        handle = oldest.handle
                        self._admission.leave(oldest)
                        self._evicted(oldest, handle, "oldest silent (out of descriptors)")
                        continue
                    self._pause_accepting(listener, exc)
                    return
                if exc.errno in _ACCEPT_GONE:  # the client went away before we took it
                    continue
                self._pause_accepting(listener, exc)
                return
            self._arrived(sock, str(address[0]))

    def _is_peer_address(self, source: str) -> bool:
        """Whether `source` is the host of a configured peer's endpoint (the admission favours it: an
        attacker cannot connect from it with TCP). Endpoints given as names do not match. O(1): the
        discovery keeps its hosts as peers join and leave."""
        return bool(self.discovery.peers_at(source))

    def _pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        """accept() failed with nothing to shed (out of descriptors or memory): stop watching the listener
        for `_ACCEPT_RETRY_DELAY` seconds instead of spinning on the same error."""
        self._warn.warning(("accept", exc.errno), "receiver: cannot accept connections: %s; retrying", exc)
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener.fileno())

        def resume() -> None:
            if self._state == "running" and listener in self._listeners:
                loop.add_reader(listener.fileno(), self._accept, listener)

        loop.call_later(_ACCEPT_RETRY_DELAY, resume)

    def _arrived(self, sock: socket.socket, source: str) -> None:
        """A new connection: with TLS it waits silent (a bare socket) for its first bytes; in plaintext the
        server speaks first, so its handshake starts at once."""
        self._totals.connections += 1
        if self._state != "running":
            sock.close()
            return
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        if self.security.mode == "insecure":
            ticket, evicted = self._admission.enter(source)
            ticket.accepted = loop.time()
            self._evict(evicted, "stalest handshaking")
            self._open(ticket, sock)
            return
        # Those it would displace may have spoken since the last look (this accept batch ran first): they
        # start their handshake instead of going.
        for candidate in self._admission.next_silent_evictions(source, _LOOK_BEFORE_EVICTING):
            if isinstance(candidate.handle, _Silent):
                self._check_silent(candidate.handle)
        ticket, evicted = self._admission.arrive(source)
        ticket.accepted = loop.time()
        self._evict(evicted, "oldest silent")
        silent = _Silent(sock, ticket)
        ticket.handle = silent
        if not self._check_silent(silent):  # its ClientHello is not here yet: wait for it
            loop.add_reader(sock.fileno(), self._check_silent, silent)
            silent.timer = loop.call_later(self.hello_timeout, self._silent_timed_out, silent)

    def _check_silent(self, silent: _Silent) -> bool:
        """Whether `silent` is done waiting: its first bytes are here (its handshake starts) or it ended."""
        try:
            first = silent.sock.recv(1, socket.MSG_PEEK)  # peeked: TLS reads it again
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            first = b""
        ticket = silent.ticket
        self._unwatch(silent)
        if not first:
            self._admission.leave(ticket)
            self._count_failure(ticket.source, "closed_early", "the connection ended before TLS started")
            silent.sock.close()
            return True
        ticket.handle = None  # the socket is its session's from now on (`_open` sets the handle)
        self._evict(self._admission.start(ticket), "stalest handshaking")
        self._open(ticket, silent.sock)
        return True

    def _silent_timed_out(self, silent: _Silent) -> None:
        silent.timer = None
        if self._admission.leave(silent.ticket):
            self._count_failure(
                silent.ticket.source, "timeout", f"sent nothing within {self.hello_timeout:g}s"
            )
            self._close_silent(silent)

    def _unwatch(self, silent: _Silent) -> None:
        if silent.timer is not None:
            silent.timer.cancel()
            silent.timer = None
        if silent.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(silent.sock.fileno())

    def _close_silent(self, silent: _Silent) -> None:
        self._unwatch(silent)
        silent.sock.close()
        self._heap.note_closed()

    def _native(self) -> TlsSecurity:
        """The native core's setup for new connections: made again after a reload of the security that
        `update_security` could not apply in place, and in CA and insecure modes after a change of the peers
        (it names the configured peers; key mode's table is the keys)."""
        made = self._native_tls
        generation = self.discovery.generation if self.security.mode != "key" else -1
        if made is None or made[0] != self._reloads or made[1] != generation:
            peers = [peer.id for peer in self.discovery.peers]
            made = (self._reloads, generation, self.security.native_tls(peers, self.max_frame_size))
            self._native_tls = made
        return made[2]

    def _peer_indexes(self) -> dict[str, int]:
        """Peer id -> index in the discovery's table, for a native session (which copies it)."""
        return self.discovery.indexes

    def _open(self, ticket: Ticket, sock: socket.socket) -> None:
        """The connection on the native core: its session, pumped at once (with TLS its first bytes are
        here; in plaintext its challenge goes out) and at every readiness event; a task waits for its end
        and closes it."""
        tls = self._native()
        refuse = None if self._authenticated < self.max_connections else "too_many_connections"
        if self._state != "running":
            refuse = "shutting_down"
        target = self.tun_target
        discovery = self.discovery
        # Acks are small writes the sender's window waits for: no Nagle delay (asyncio's transports set
        # this too).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ReceiveSession(
            tls,
            sock.fileno(),
            None if target is None else target.fd,
            discovery.table,
            self._peer_indexes(),
            vnet_header=target is not None and target.vnet_header,
            read_size=self.read_size,
            refuse=refuse,
        )
        conn = _Connection(sock, session, ticket.source, ticket, self._reloads)
        ticket.handle = conn
        conn.task = asyncio.get_running_loop().create_task(self._run(conn))
        self._connections[conn.task] = conn
        conn.pump = _Pump(self, conn, target)
        conn.pump.readable()

    async def _run(self, conn: _Connection) -> None:
        pump = conn.pump
        clean = False
        try:
            try:
                clean = await pump.done
            except asyncio.CancelledError:
                if self._state != "stopped" and conn.closed_because is None:
                    raise
                clean = conn.closed_because is None  # our stop: close gracefully, so the last acks get out
                pump.cancel_sink()  # our stop cancels a sink call in progress (counted: sink_cancelled)
                with contextlib.suppress(asyncio.CancelledError):
                    await pump.sink_taken()
            # A sink call in progress when the connection ends otherwise finishes: its packets are counted.
            await pump.sink_taken()
        except asyncio.CancelledError:
            pump.cancel_sink()
            raise
        finally:
            pump.finish(clean)
            self._connections.pop(conn.task, None)
            self._leave_pending(conn)
            if conn.peer_id is not None:
                self._leave_peer(conn)
            sock = conn.sock
            if not pump.reset:
                if conn.peer_id is not None:  # before it, what is owed (an answer, an alert) is queued
                    conn.session.close()
                with contextlib.suppress(OSError):
                    conn.session.flush()  # close_notify, best effort: the socket does not block
            else:  # a reset: nothing read and not acknowledged is counted as delivered by the sender
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def _evict(self, tickets: list[Ticket], why: str) -> None:
        """Closes the connections the admission displaced (already out of its tables) to make room."""
        for ticket in tickets:
            handle, ticket.handle = ticket.handle, None
            self._evicted(ticket, handle, why)

    def _evicted(self, ticket: Ticket, handle: object, why: str) -> None:
        """Closes `handle`, the connection of `ticket` (out of the admission's tables already)."""
        self._totals.evicted_pending += 1
        self._warn.warning(
            ("evicted", why),
            "receiver: %d silent and %d handshaking connections without a key (limits %d and %d in all, "
            "%d and %d per address): closing the %s one from %s to make room",
            self._admission.silent,
            self._admission.handshaking,
            self.max_silent_pending,
            self.max_pending,
            self.max_silent_pending_per_source,
            self.max_pending_per_source,
            why,
            ticket.source,
        )
        if isinstance(handle, _Silent):
            self._close_silent(handle)
            return
        self._heap.note_closed()
        if isinstance(handle, _Connection):
            handle.close("evicted_pending")

    def _leave_pending(self, conn: _Connection) -> None:
        """Stops counting `conn` as pending (idempotent: eviction and the task's own exit both call it)."""
        if self._admission.leave(conn.ticket):
            self._heap.note_closed()
        if not self._admission:
            self._heap.release_soon()

    def _count_failure(self, source: str, reason: str, detail: object) -> None:
        _bump(self._totals.handshake_failures, reason)
        self._warn.warning(
            ("failed", source, reason),
            "receiver: handshake from %s failed (%s): %s",
            source,
            reason,
            detail,
        )

    def _refused(self, source: str, claimed: str, reason: str, detail: str) -> None:
        """A hello refused with an answer: counted by reason, logged once per reason and address."""
        _bump(self._totals.refused, reason)
        advice = ""
        if reason in ("key_mismatch", "unknown_peer"):
            advice = (
                f"; if {claimed!r} is a peer of ours whose key changed, put its new public key "
                "(`vpn-packet pubkey` of its key file) as its public_key in this node's config"
            )
        self._warn.warning(
            ("refused", source, reason),
            "receiver: refused %s (calls itself %r): %s: %s%s",
            source,
            claimed,
            reason,
            detail,
            advice,
        )

    def _why_closed_early(self, conn: _Connection) -> str:
        """What a connection that ended inside the handshake tells. In key mode, one that ended right after
        TLS, before a byte of its hello, is what a peer does when the key it has for us is not ours (it
        checks our key in TLS and hangs up): say so, name the peers configured at that address, and what
        to do."""
        if self.security.mode != "key" or conn.ticket.steps != 1:
            return "the connection ended inside the handshake"
        return self._key_advice(conn, "it hung up after TLS, before its hello")

    def _why_certificate_refused(self, conn: _Connection, alert: str) -> str:
        """What a TLS alert about our certificate tells (a native client's check of our key fails inside
        TLS and says so with an alert, where a Python one hung up after it): in key mode, the same advice."""
        if self.security.mode != "key":
            return alert
        return self._key_advice(conn, f"it refused our certificate in TLS ({alert})")

    def _key_advice(self, conn: _Connection, what: str) -> str:
        security = self.security
        assert security.identity is not None
        here = self.discovery.peers_at(conn.source)
        who = f"peer {', '.join(here)} (configured at that address)" if here else "the peer"
        return (
            f"{what}: a peer does that when the public_key it has for this node is not ours; if this is "
            f"{who}, its log says so: put our public key {security.identity.public_key} as public_key of "
            f"peer {security.local_id} in its config"
        )

    def _enter_peer(self, conn: _Connection, peer_id: str) -> PeerReceiverMetrics:
        """Counts `conn` as `peer_id`'s; at the peer's limit its oldest connection is closed."""
        peer = self._per_peer.setdefault(peer_id, PeerReceiverMetrics())
        held = self._by_peer.setdefault(peer_id, OrderedDict())
        if len(held) >= self.max_connections_per_peer:
            _task, oldest = held.popitem(last=False)
            oldest.close("superseded")
            peer.superseded += 1
            self._totals.superseded += 1
        conn.peer_id = peer_id
        held[conn.task] = conn
        if self.on_authenticated is not None:
            self.on_authenticated(peer_id)
        self._peer_entered.set()
        self._authenticated += 1
        peer.connections += 1
        peer.active_connections += 1
        peer.last_handshake = time.monotonic()
        self._totals.active_connections += 1
        _log.info(
            "peer %s connected from %s (%s)",
            peer_id,
            conn.source,
            "TLS" if self.security.encrypted else "plaintext",
        )
        return peer

    def _leave_peer(self, conn: _Connection) -> None:
        assert conn.peer_id is not None
        held = self._by_peer.get(conn.peer_id)
        if held is not None:
            held.pop(conn.task, None)
        self._authenticated -= 1
        peer = self._per_peer[conn.peer_id]
        peer.active_connections -= 1
        self._totals.active_connections -= 1
        _log.info(
            "peer %s disconnected from %s%s",
            conn.peer_id,
            conn.source,
            f" ({conn.closed_because})" if conn.closed_because else "",
        )

    def _discard_after_reset(self, conn: _Connection, peer: PeerReceiverMetrics, n: int) -> None:
        peer.discarded_after_reset += n
        self._totals.discarded_after_reset += n
        conn.closed_because = "reset by the sender"

    def _framing_broken(self, conn: _Connection, peer: PeerReceiverMetrics, reason: str) -> None:
        self._protocol_error(peer, reason)
        _log.warning("receiver: peer %s broke the framing (%s); connection closed", conn.peer_id, reason)

    def _count(self, peer: PeerReceiverMetrics, name: str, n: int) -> None:
        if n:
            setattr(peer, name, getattr(peer, name) + n)
            setattr(self._totals, name, getattr(self._totals, name) + n)

    def _count_pump(
        self,
        peer: PeerReceiverMetrics,
        counts: Counts,
        target: TunTarget | None,
        fatal_errno: int,
    ) -> None:
        """What one native call did (a TLS session's pump, or `_take`'s plaintext read), counted by
        reason: the one place the receiver's counters follow the core's counts."""
        (
            frames,
            payload,
            delivered,
            written,
            extra_segments,
            spoofed,
            unparsable,
            offload_invalid,
            tun_dropped,
            tun_refused,
            batches,
        ) = counts
        count = self._count
        count(peer, "frames", frames)
        count(peer, "bytes", payload)
        if extra_segments:
            count(peer, "extra_segments", extra_segments)
        if spoofed or unparsable or offload_invalid or tun_dropped or tun_refused:
            count(peer, "spoofed_dropped", spoofed)
            count(peer, "unparsable_dropped", unparsable)
            count(peer, "offload_invalid", offload_invalid)
            count(peer, "tun_dropped", tun_dropped)
            count(peer, "tun_refused", tun_refused)
        if target is not None:
            if delivered:
                count(peer, "packets_delivered", delivered)
                count(peer, "batches_delivered", batches)
                target.packets_written += delivered
                target.bytes_written += written
            if fatal_errno and target.on_fatal is not None:
                target.on_fatal(fatal_errno)

    def _deliver(
        self, peer_id: str, peer: PeerReceiverMetrics, packets: list[bytes]
    ) -> Awaitable[None] | None:
        """Hands `packets` to the sink in batches of `max_batch`, in order. Returns None when the sink took
        them all at once, or an awaitable that delivers the rest when the sink returned one (awaited before
        the next batch: backpressure)."""
        step = self.max_batch
        for start in range(0, len(packets), step):
            batch = packets if len(packets) <= step else packets[start : start + step]
            try:
                result = self.sink(peer_id, batch)
            except Exception:
                self._sink_raised(peer_id, peer, len(batch))
                continue
            if inspect.isawaitable(result):
                return self._deliver_async(peer_id, peer, packets, start, result)
            self._delivered(peer, len(batch))
        return None

    async def _deliver_async(
        self,
        peer_id: str,
        peer: PeerReceiverMetrics,
        packets: list[bytes],
        start: int,
        pending: Awaitable[None],
    ) -> None:
        step = self.max_batch
        while True:
            n = min(step, len(packets) - start)
            try:
                await pending
            except asyncio.CancelledError:
                # The receiver stops: this batch and the rest are not delivered.
                self._count(peer, "sink_cancelled", len(packets) - start)
                raise
            except Exception:
                self._sink_raised(peer_id, peer, n)
            else:
                self._delivered(peer, n)
            start += step
            if start >= len(packets):
                return
            while start < len(packets):
                batch = packets[start : start + step]
                try:
                    result = self.sink(peer_id, batch)
                except Exception:
                    self._sink_raised(peer_id, peer, len(batch))
                    start += step
                    continue
                if inspect.isawaitable(result):
                    pending = result
                    break
                self._delivered(peer, len(batch))
                start += step
            else:
                return

    def _delivered(self, peer: PeerReceiverMetrics, n: int) -> None:
        totals = self._totals
        peer.packets_delivered += n
        totals.packets_delivered += n
        peer.batches_delivered += 1
        totals.batches_delivered += 1

    def _sink_raised(self, peer_id: str, peer: PeerReceiverMetrics, n: int) -> None:
        _log.exception("receiver: sink failed on %d packets from %s; dropped", n, peer_id)
        peer.sink_raised += n
        self._totals.sink_raised += n
