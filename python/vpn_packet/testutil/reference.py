"""A plain-Python reference of packet extraction (docs/extraction.md), independent of the Rust core.

Two uses: the oracle of the property tests (the native parser must agree with it on any input), and the
"plain-Python `struct` extractor" peer of the benchmarks. It returns address *strings*, as a plain-Python
extractor would, and is written to be reasonably fast (`struct.unpack_from`, `socket.inet_ntop`).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

__all__ = ["ReferenceError", "ReferenceInfo", "reference_destination_key", "reference_extract"]

_PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})
_RAW_EXTENSIONS = frozenset({0, 43, 60})
_V4_FIXED = struct.Struct("!BxHxxHxB")  # version/IHL, total length, flags/fragment, protocol
_PORTS = struct.Struct("!HH")


class ReferenceError(ValueError):
    """The packet has no trustworthy addresses."""


class ReferenceInfo(NamedTuple):
    version: int
    src_ip: str
    dst_ip: str
    src_port: int | None
    dst_port: int | None
    protocol: int

    @property
    def destination_key(self) -> str:
        if self.dst_port is None:
            return self.dst_ip
        if self.version == 6:
            return f"[{self.dst_ip}]:{self.dst_port}"
        return f"{self.dst_ip}:{self.dst_port}"


def _ipv6_text(packed: bytes) -> str:
    # RFC 5952 via inet_ntop, but IPv4-mapped addresses in mixed notation (glibc prints ::ffff:a.b.c.d).
    return socket.inet_ntop(socket.AF_INET6, packed)


def reference_extract(packet: bytes) -> ReferenceInfo:
    """Extracts version, addresses, ports and protocol, or raises `ReferenceError`."""
    size = len(packet)
    if size == 0:
        raise ReferenceError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _extract_v4(packet, size)
    if version == 6:
        return _extract_v6(packet, size)
    raise ReferenceError(f"unsupported IP version {version}")


def _extract_v4(packet: bytes, size: int) -> ReferenceInfo:
    if size < 20:
        raise ReferenceError(f"IPv4 packet of {size} bytes is shorter than 20")
    first, total_length, flags_fragment, protocol = _V4_FIXED.unpack_from(packet)
    header_length = (first & 0x0F) * 4
    if header_length < 20:
        raise ReferenceError(f"IPv4 IHL {header_length // 4} is below 5")
    src = socket.inet_ntop(socket.AF_INET, packet[12:16])
    dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
    end = size if total_length == 0 else min(size, total_length)
    src_port = dst_port = None
    if (
        header_length <= size
        and flags_fragment & 0x1FFF == 0
        and protocol in _PORT_PROTOCOLS
        and header_length + 4 <= end
    ):
        src_port, dst_port = _PORTS.unpack_from(packet, header_length)
    return ReferenceInfo(4, src, dst, src_port, dst_port, protocol)


def _extract_v6(packet: bytes, size: int) -> ReferenceInfo:
    if size < 40:
        raise ReferenceError(f"IPv6 packet of {size} bytes is shorter than 40")
    payload_length = (packet[4] << 8) | packet[5]
    end = size if payload_length == 0 else min(size, 40 + payload_length)
    src = _ipv6_text(packet[8:24])
    dst = _ipv6_text(packet[24:40])
    protocol = packet[6]
    offset = 40
    while True:
        if protocol in _RAW_EXTENSIONS:
            length = (packet[offset + 1] + 1) * 8 if offset + 2 <= end else None
        elif protocol == 51:
            length = (packet[offset + 1] + 2) * 4 if offset + 2 <= end and packet[offset + 1] > 0 else None
        elif protocol == 44:
            length = 8
            if offset + 8 <= end and ((packet[offset + 2] << 8) | packet[offset + 3]) >> 3:
                # Non-first fragment: the rest is payload, not headers.
                return ReferenceInfo(6, src, dst, None, None, packet[offset])
        else:
            break
        if length is None or offset + length > end:
            # Cut short: report the next header it names, when that byte is there.
            named = packet[offset] if offset < end else protocol
            return ReferenceInfo(6, src, dst, None, None, named)
        protocol = packet[offset]
        offset += length
    src_port = dst_port = None
    if protocol in _PORT_PROTOCOLS and offset + 4 <= end:
        src_port, dst_port = _PORTS.unpack_from(packet, offset)
    return ReferenceInfo(6, src, dst, src_port, dst_port, protocol)


def reference_destination_key(packet: bytes) -> str:
    """The destination key, built in plain Python."""
    return reference_extract(packet).destination_key
