"""Moving bytes between nodes, and nothing else: the handshake and identities, framing, TCP/TLS streams,
the stream pool, static peer discovery, the receiving side and the TUN device.

Assembling them into a node is `vpn_packet.node`'s job.
"""

from __future__ import annotations

from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery, parse_endpoint
from vpn_packet.transport.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FramingError, encode_frames
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity, generate_identity, load_identity
from vpn_packet.transport.pool import PooledStream, StreamPool, StreamPoolMetrics
from vpn_packet.transport.receiver import PeerReceiverMetrics, Receiver, ReceiverMetrics
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FrameDecoder",
    "FramingError",
    "NodeIdentity",
    "Peer",
    "PeerReceiverMetrics",
    "PooledStream",
    "Receiver",
    "ReceiverMetrics",
    "Security",
    "StaticPeerDiscovery",
    "StreamPool",
    "StreamPoolMetrics",
    "TcpStream",
    "TcpStreamService",
    "encode_frames",
    "generate_identity",
    "load_identity",
    "parse_endpoint",
]
