"""Real data plane transports: framing, static peer discovery and the receiving side.

TCP/TLS client streams and the stream pool live in `transport.tcp`, `transport.tls`, `transport.pool`.
"""

from __future__ import annotations

from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery, parse_endpoint
from vpn_packet.transport.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FramingError,
    HelloTimeoutError,
    encode_frames,
    encode_hello,
    parse_hello,
    read_hello,
)
from vpn_packet.transport.receiver import PeerReceiverMetrics, Receiver, ReceiverMetrics

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "FramingError",
    "HelloTimeoutError",
    "Peer",
    "PeerReceiverMetrics",
    "Receiver",
    "ReceiverMetrics",
    "StaticPeerDiscovery",
    "encode_frames",
    "encode_hello",
    "parse_endpoint",
    "parse_hello",
    "read_hello",
]
