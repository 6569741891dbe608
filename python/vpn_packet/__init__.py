"""vpn-packet: the packet layer of a VPN data plane, with a Rust core.

The root re-exports the public names of the subpackages and keeps the Go spellings of the original package
as aliases for existing callers.
"""

from __future__ import annotations

from vpn_packet import errors, types, utils
from vpn_packet._native import __version__
from vpn_packet.errors import PacketError, VpnPacketError
from vpn_packet.types import PacketInfo, QueuedPacket
from vpn_packet.utils import (
    destination_key,
    destination_key_and_ip,
    extract_batch,
    extract_batch_from_buffer,
    extract_ip_and_ports,
    group_by_destination,
)

# Go spellings, kept for callers of the original package.
ExtractIPAndPorts = extract_ip_and_ports

__all__ = [
    "ExtractIPAndPorts",
    "PacketError",
    "PacketInfo",
    "QueuedPacket",
    "VpnPacketError",
    "__version__",
    "destination_key",
    "destination_key_and_ip",
    "errors",
    "extract_batch",
    "extract_batch_from_buffer",
    "extract_ip_and_ports",
    "group_by_destination",
    "types",
    "utils",
]
