"""The receiving side of the data plane: accepts peer streams and hands their packets to a sink.

Per connection (see `vpn_packet.transport.framing` for the wire protocol):

1. TLS, when an `ssl.SSLContext` is given (it must require client certificates): the handshake must succeed
   within `hello_timeout`.
2. The hello, within `hello_timeout`. The id must be a known peer (else the connection is closed and counted
   as `unknown_peer`). With TLS it must also be the identity of the client certificate: a subjectAltName DNS
   entry equal to the id, or, for a certificate without DNS entries, its commonName (else closed, counted as
   `identity_mismatch`).
   **Without TLS the id is unauthenticated**: anyone can claim any peer. What still holds is the anti-spoofing
   check below: a liar can only inject packets with sources inside the claimed peer's own prefixes.
3. Frames, decoded natively across any read boundaries. Each decoded packet's source address is checked
   natively against the peer table: a packet whose source's longest prefix is not one of the sending peer's is
   dropped and counted (`spoofed_dropped`); one without a readable IP header is dropped and counted
   (`unparsable_dropped`). Accepted packets go to `sink(peer_id, packets)` in batches of at most `max_batch`,
   in stream order.

A protocol error (bad hello, frame length 0 or above `max_frame_size`, a stream ending inside a frame) is
counted by reason and closes that connection only; packets framed correctly before it are still delivered.

Memory is bounded per connection: the receiver reads at most `read_size` bytes at a time and does not read
again until the sink has taken the packets of that read (when the sink returns an awaitable, it is awaited:
that is the backpressure). While it waits, asyncio's stream flow control pauses the socket once about
`read_size` bytes are buffered, so TCP pushes back on the sender. The native decoder holds at most one partial
frame (`max_frame_size + 4` bytes) and refuses a bad length prefix before buffering any of it. So a connection
holds O(read_size + max_frame_size) bytes: about the stream buffer (`read_size` plus one socket read), one
chunk being decoded and its packets (`read_size` each), and the partial frame. `max_connections` caps the
number of connections and `max_connections_per_peer` the connections of one peer (beyond them new ones are
closed at once and counted as `rejected_connections`), so the whole receiver holds at most about
`max_connections * (3 * read_size + 256 KiB + max_frame_size)` bytes, and one peer's connections at most
`max_connections_per_peer` times the per-connection amount. Connections that have not sent their hello yet
are bounded by `max_connections` and `hello_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from vpn_packet._native import FrameDecoder, filter_sources
from vpn_packet.errors import FramingError
from vpn_packet.transport.discovery import StaticPeerDiscovery
from vpn_packet.transport.framing import DEFAULT_MAX_FRAME_SIZE, read_hello

__all__ = ["PeerReceiverMetrics", "Receiver", "ReceiverMetrics", "Sink", "certificate_identities"]

_log = logging.getLogger(__name__)

Sink = Callable[[str, list[bytes]], Awaitable[None] | None]
"""`sink(peer_id, packets)`: takes a batch of accepted packets; may return an awaitable (awaited)."""


@dataclass
class PeerReceiverMetrics:
    """Counters of one peer (from its connections after a valid hello), as plain data.

    `frames` and `bytes` count every decoded frame and its payload bytes (dropped ones included);
    `packets_delivered` and `batches_delivered` what the sink took; `spoofed_dropped`, `unparsable_dropped`
    and `sink_failed` (the sink raised) are packets dropped; `connection_errors` connections lost to a reset
    or TLS error; `protocol_errors` counts wire-protocol violations by reason (`zero_length`, `too_large`,
    `truncated`: the stream ended inside a frame).
    """

    connections: int = 0
    active_connections: int = 0
    frames: int = 0
    bytes: int = 0
    packets_delivered: int = 0
    batches_delivered: int = 0
    spoofed_dropped: int = 0
    unparsable_dropped: int = 0
    sink_failed: int = 0
    connection_errors: int = 0
    rejected_connections: int = 0
    protocol_errors: dict[str, int] = field(default_factory=dict)

    def _copy(self) -> PeerReceiverMetrics:
        return dataclasses.replace(self, protocol_errors=dict(self.protocol_errors))


@dataclass
class ReceiverMetrics(PeerReceiverMetrics):
    """Totals over all connections, plus what happens before a peer is known.

    `connections` counts every accepted TCP connection (also the ones refused later); `protocol_errors`
    includes hello errors (`bad_magic`, `hello_timeout`, `hello_truncated`, ...); `identity_mismatch`,
    `unknown_peer` and `rejected_connections` (over `max_connections` or `max_connections_per_peer`) count
    refused connections.
    """

    identity_mismatch: int = 0
    unknown_peer: int = 0

    def _copy(self) -> ReceiverMetrics:
        return dataclasses.replace(self, protocol_errors=dict(self.protocol_errors))

    @property
    def dropped(self) -> int:
        """Packets received but not delivered: spoofed, unparsable or refused by the sink."""
        return self.spoofed_dropped + self.unparsable_dropped + self.sink_failed


def certificate_identities(cert: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """The subjectAltName DNS entries and the commonNames of a certificate as `SSLSocket.getpeercert()`
    decodes it (`({}, {})` shapes tolerated)."""
    if not cert:
        return [], []
    dns = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    common_names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return dns, common_names


def _identity_matches(cert: dict[str, Any] | None, peer_id: str) -> bool:
    """A subjectAltName DNS entry equals `peer_id`; the commonName counts only when there is no DNS entry
    (RFC 6125, and what OpenSSL's host name check does on the connecting side)."""
    dns, common_names = certificate_identities(cert)
    return peer_id in dns if dns else peer_id in common_names


class _Refused(Exception):
    """A connection refused during its opening; the reason is already counted."""


class Receiver:
    """Accepts peer streams on `host:port` and delivers their packets to `sink(peer_id, packets)`.

    Lifecycle: `await start()` binds (then `address` is the bound `(host, port)`), `await stop()` closes the
    listener and every connection and leaves no task; `stop` is idempotent, and `async with Receiver(...)`
    does both. A receiver is started once.
    """

    def __init__(
        self,
        discovery: StaticPeerDiscovery,
        sink: Sink,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        hello_timeout: float = 5.0,
        max_batch: int = 256,
        max_connections: int = 1024,
        max_connections_per_peer: int = 16,
        read_size: int = 256 * 1024,
    ) -> None:
        if not 0 < max_frame_size <= 1 << 24:
            raise ValueError("max_frame_size must be 1..16 MiB")
        if hello_timeout <= 0:
            raise ValueError("hello_timeout must be positive")
        if min(max_batch, max_connections, max_connections_per_peer, read_size) < 1:
            raise ValueError(
                "max_batch, max_connections, max_connections_per_peer and read_size must be at least 1"
            )
        if ssl_context is not None and ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("ssl_context must require client certificates (verify_mode = CERT_REQUIRED)")
        self.discovery = discovery
        self.sink = sink
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_frame_size = max_frame_size
        self.hello_timeout = hello_timeout
        self.max_batch = max_batch
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.read_size = read_size
        self._server: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._state = "new"  # new -> running -> stopped
        self._tasks: set[asyncio.Task[None]] = set()
        self._readers: dict[asyncio.Task[None], tuple[asyncio.StreamReader, FrameDecoder | None]] = {}
        self._totals = ReceiverMetrics()
        self._per_peer: dict[str, PeerReceiverMetrics] = {}

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Binds and starts accepting connections."""
        if self._state != "new":
            raise RuntimeError(f"receiver is {self._state}; a receiver is started once")
        self._state = "running"
        try:
            self._server = await asyncio.start_server(
                self._on_connection,
                self.host,
                self.port,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.hello_timeout if self.ssl_context is not None else None,
                # The stream pauses the socket above 2 * limit buffered bytes.
                limit=max(self.read_size // 2, 1024),
            )
        except BaseException:
            self._state = "stopped"
            raise
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        _log.debug("receiver listening on %s:%d", *self._address)

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - like Dispatcher.stop
        """Stops listening, closes every connection and waits (at most `timeout` seconds) for their tasks.

        Idempotent. A sink call in progress is cancelled.
        """
        if self._state == "stopped":
            return
        self._state = "stopped"
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Connections accepted just now have their task created but not started: let them start (they see
        # the stopped state and leave at once), then cancel the rest.
        await asyncio.sleep(0)
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                _log.warning(
                    "receiver stop: %d connection tasks did not finish in %gs", len(pending), timeout
                )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await server.wait_closed()

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
        return self._totals._copy()

    def peer_metrics(self) -> dict[str, PeerReceiverMetrics]:
        """A snapshot of the counters of every peer that has had a connection."""
        return {peer_id: m._copy() for peer_id, m in self._per_peer.items()}

    def buffered_bytes(self) -> int:
        """Bytes the open connections hold right now: stream buffers plus partial frames (introspection)."""
        total = 0
        for reader, decoder in self._readers.values():
            total += len(getattr(reader, "_buffer", b""))
            if decoder is not None:
                total += decoder.buffered
        return total

    def __repr__(self) -> str:
        where = f"{self._address[0]}:{self._address[1]}" if self._address else f"{self.host}:{self.port}"
        t = self._totals
        return (
            f"<Receiver {self._state} on {where} tls={self.ssl_context is not None} "
            f"peers={len(self.discovery)} active={len(self._tasks)} connections={t.connections} "
            f"delivered={t.packets_delivered} spoofed={t.spoofed_dropped} unparsable={t.unparsable_dropped} "
            f"protocol_errors={sum(t.protocol_errors.values())}>"
        )

    # --- connections -----------------------------------------------------------------------------------

    def _protocol_error(self, peer: PeerReceiverMetrics | None, reason: str) -> None:
        for m in (self._totals, peer):
            if m is not None:
                m.protocol_errors[reason] = m.protocol_errors.get(reason, 0) + 1

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._totals.connections += 1
        if self._state != "running" or len(self._tasks) >= self.max_connections:
            self._totals.rejected_connections += 1
            writer.transport.abort()
            return
        self._tasks.add(task)
        self._readers[task] = (reader, None)
        peer: PeerReceiverMetrics | None = None
        clean = False
        try:
            peer_id = await self._open(reader, writer)
            peer = self._per_peer.setdefault(peer_id, PeerReceiverMetrics())
            if peer.active_connections >= self.max_connections_per_peer:
                peer.rejected_connections += 1
                self._totals.rejected_connections += 1
                peer = None
                raise _Refused
            peer.connections += 1
            peer.active_connections += 1
            self._totals.active_connections += 1
            decoder = FrameDecoder(self.max_frame_size)
            self._readers[task] = (reader, decoder)
            clean = await self._pump(peer_id, peer, reader, decoder)
        except _Refused:
            pass
        except asyncio.CancelledError:
            if self._state != "stopped":
                raise
            # Cancelled by our own stop(): end normally. Python 3.11's stream protocol logs a cancelled
            # connection task as an error in a done callback ("Exception in callback ..."), which would turn
            # every orderly shutdown with a connected peer into an alarming log line.
        except (ConnectionError, OSError) as exc:
            # Reset, broken pipe, TLS failure: the peer's side went away, not a protocol violation.
            _log.debug("receiver connection error: %r", exc)
            self._totals.connection_errors += 1
            if peer is not None:
                peer.connection_errors += 1
        finally:
            self._tasks.discard(task)
            self._readers.pop(task, None)
            if peer is not None:
                peer.active_connections -= 1
                self._totals.active_connections -= 1
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Reads the hello and checks who is talking; returns the peer id or raises `_Refused` (counted)."""
        try:
            peer_id = await read_hello(reader, self.hello_timeout)
        except FramingError as exc:
            self._protocol_error(None, exc.reason or "bad_hello")
            _log.debug("receiver: refused a connection: %s", exc)
            raise _Refused from None
        if peer_id not in self.discovery:
            self._totals.unknown_peer += 1
            _log.debug("receiver: refused unknown peer %r", peer_id)
            raise _Refused
        if self.ssl_context is not None:
            cert = writer.get_extra_info("peercert")
            if not _identity_matches(cert, peer_id):
                self._totals.identity_mismatch += 1
                dns, common_names = certificate_identities(cert)
                _log.warning(
                    "receiver: hello says %r but the client certificate is DNS=%s CN=%s; refused",
                    peer_id,
                    dns,
                    common_names,
                )
                raise _Refused
        return peer_id

    async def _pump(
        self, peer_id: str, peer: PeerReceiverMetrics, reader: asyncio.StreamReader, decoder: FrameDecoder
    ) -> bool:
        """Reads, decodes, filters and delivers until the stream ends; True when it ended cleanly."""
        table = self.discovery.table
        index = self.discovery.index_of(peer_id)
        totals = self._totals
        while True:
            data = await reader.read(self.read_size)
            if not data:
                if decoder.buffered:
                    self._protocol_error(peer, "truncated")
                    return False
                return True
            error: FramingError | None = None
            frames_before = decoder.frames
            bytes_before = decoder.payload_bytes
            try:
                frames = decoder.feed(data)
            except FramingError as exc:
                frames = exc.frames or []
                error = exc
            frame_count = decoder.frames - frames_before
            payload = decoder.payload_bytes - bytes_before
            peer.frames += frame_count
            totals.frames += frame_count
            peer.bytes += payload
            totals.bytes += payload
            if frames:
                accepted, spoofed, unparsable = filter_sources(frames, table, index)
                if spoofed or unparsable:
                    peer.spoofed_dropped += spoofed
                    totals.spoofed_dropped += spoofed
                    peer.unparsable_dropped += unparsable
                    totals.unparsable_dropped += unparsable
                if accepted:
                    await self._deliver(peer_id, peer, accepted)
            if error is not None:
                self._protocol_error(peer, error.reason or "framing")
                _log.debug("receiver: peer %s: %s; connection closed", peer_id, error)
                return False

    async def _deliver(self, peer_id: str, peer: PeerReceiverMetrics, packets: list[bytes]) -> None:
        totals = self._totals
        step = self.max_batch
        for start in range(0, len(packets), step):
            batch = packets if len(packets) <= step else packets[start : start + step]
            try:
                result = self.sink(peer_id, batch)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("receiver: sink failed on %d packets from %s; dropped", len(batch), peer_id)
                peer.sink_failed += len(batch)
                totals.sink_failed += len(batch)
                continue
            peer.packets_delivered += len(batch)
            totals.packets_delivered += len(batch)
            peer.batches_delivered += 1
            totals.batches_delivered += 1
