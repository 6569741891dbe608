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
from vpn_packet.transport.pool import PooledStream, StreamPool, StreamPoolMetrics
from vpn_packet.transport.receiver import PeerReceiverMetrics, Receiver, ReceiverMetrics
from vpn_packet.transport.tcp import TcpStream, TcpStreamService
from vpn_packet.transport.tls import client_context, fingerprint, peer_identity, server_context

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "FramingError",
    "HelloTimeoutError",
    "Peer",
    "PeerReceiverMetrics",
    "PooledStream",
    "Receiver",
    "ReceiverMetrics",
    "StaticPeerDiscovery",
    "StreamPool",
    "StreamPoolMetrics",
    "TcpStream",
    "TcpStreamService",
    "client_context",
    "encode_frames",
    "encode_hello",
    "fingerprint",
    "parse_endpoint",
    "parse_hello",
    "peer_identity",
    "read_hello",
    "server_context",
]
