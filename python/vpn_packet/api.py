"""The four services a `Dispatcher` talks to, as `typing.Protocol`s (structural: implement the methods).

- `PeerDiscovery` tells which peer owns a destination address;
- `Stream` carries packets to one peer, in order;
- `StreamService` opens a new stream to a peer;
- `StreamPoolService` lends streams and takes them back, marked healthy or not;
- `FramedStream` (optional) is a `Stream` that also writes batches already framed.

They are `runtime_checkable`, so `isinstance(obj, Stream)` checks that the methods exist (not their
signatures). Fakes of all four, with failure injection, live in `vpn_packet.testutil`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["FramedStream", "PeerDiscovery", "Stream", "StreamPoolService", "StreamService"]


@runtime_checkable
class PeerDiscovery(Protocol):
    """Maps a destination IP address to the id of the peer that owns it."""

    async def get_peer_id(self, dest_ip: str) -> str:
        """The peer owning `dest_ip` (RFC 5952 text); raises `PeerNotFoundError` when there is none."""
        ...


@runtime_checkable
class Stream(Protocol):
    """An ordered channel of packets to one peer."""

    async def write(self, packet: bytes) -> Awaitable[int] | None:
        """Send one packet; see `write_many`."""
        ...

    async def write_many(self, packets: Sequence[bytes]) -> Awaitable[int] | None:
        """Send packets in order. After a failure it is unknown how many went out: the stream is unhealthy.

        A stream whose peer acknowledges what it received returns a receipt: an awaitable that resolves with
        how many of these packets (from the first) the peer acknowledged; the dispatcher counts only those
        as sent, the rest as failed (`lost_in_flight`). A stream without acknowledgements returns None, and
        a packet written counts as sent.
        """
        ...

    async def close(self) -> None:
        """Close the stream; idempotent."""
        ...


@runtime_checkable
class FramedStream(Stream, Protocol):
    """A `Stream` that also takes batches already framed for the wire (`vpn_packet.transport.framing`):
    the dispatcher's native queues frame packets as they queue them, so a worker's drain writes one buffer
    as is. Optional: a worker checks for `write_framed` and splits the buffer for a plain `Stream`."""

    async def write_framed(self, data: bytes, count: int) -> Awaitable[int] | None:
        """Write `count` packets framed in `data`, in order, as one write; returns like `write_many`."""
        ...


@runtime_checkable
class StreamService(Protocol):
    """Opens streams."""

    async def create_stream(self, peer_id: str) -> Stream:
        """A new stream to `peer_id`; the caller owns it and closes it."""
        ...


@runtime_checkable
class StreamPoolService(Protocol):
    """Lends streams to peers and takes them back."""

    async def get_stream(self, peer_id: str) -> Stream:
        """A stream to `peer_id`, for the caller's use until it releases it."""
        ...

    def release_stream(self, peer_id: str, stream: Stream, healthy: bool) -> None:
        """Give `stream` back; `healthy=False` means a write failed on it and it must not be lent again."""
        ...
