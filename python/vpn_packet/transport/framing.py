"""Stream framing: the wire protocol between nodes, encoded and decoded natively.

A connection opens with the handshake (`vpn_packet.transport.handshake`; the messages are drawn in
rust/core/src/handshake.rs); then the connecting side sends frames until the stream ends:

    frame:      L (4 bytes, big-endian) | payload            (wire version 3)
    L == 0:     a keepalive (no payload): keeps an idle connection from being closed as idle
    bit 31 = 0: N = L (1..max_frame_size) bytes: one IP packet
    bit 31 = 1: N = L & 0x7fffffff (11..10 + 65535) bytes: a virtio_net_hdr and a TUN super-packet

A packet frame above the receiver's `max_frame_size` (default 65535), or an offload frame too short or too
long, is a protocol error: the stream cannot be resynchronised, so the receiver counts it and closes the
connection. A stream that ends inside a frame is counted as truncated.

- `encode_frames(packets, max_frame_size=65535) -> bytes`: a batch in one buffer; refuses (with
  `FramingError`) an empty packet or one larger than `max_frame_size`, which the receiver would refuse.
- `FrameDecoder(max_frame_size=65535)`: `feed(data) -> list[bytes]` splits a byte stream into packets across
  any read boundaries (keepalives are skipped, offload frames come out segmented into plain packets). It
  keeps at most one partial frame (`buffered <= 4 + max(max_frame_size, 10 + 65535)`) and checks a length
  prefix as soon as its 4 bytes arrive, before buffering any of the payload: a 4 GB length prefix is
  refused at once. On a bad prefix `feed` raises `FramingError` whose `frames` holds the packets that came
  before it in that chunk; the decoder then stays failed.

The wire constants (`DEFAULT_MAX_FRAME_SIZE`, `LENGTH_PREFIX_LEN`, `MAX_FRAME_SIZE_LIMIT`) are the Rust core's
(`vpn_packet_core::framing`), re-exported: the format is written down once, where it is encoded.
"""

from __future__ import annotations

from vpn_packet._native import (
    DEFAULT_MAX_FRAME_SIZE,
    KEEPALIVE_FRAME,
    LENGTH_PREFIX_LEN,
    MAX_FRAME_SIZE_LIMIT,
    FrameDecoder,
    encode_frames,
)
from vpn_packet.errors import FramingError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "KEEPALIVE_FRAME",
    "LENGTH_PREFIX_LEN",
    "MAX_FRAME_SIZE_LIMIT",
    "FrameDecoder",
    "FramingError",
    "encode_frames",
]
