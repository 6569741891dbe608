"""Peers of the parser, for side-by-side benchmarks: plain-Python struct extractors, dpkt and scapy.

Each returns (src, dst, sport, dport, protocol) with address strings, or None for a bad packet, so all do
comparable work.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import dpkt
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from vpn_packet.testutil.reference import ReferenceError, reference_extract

Result = tuple[str, str, int | None, int | None, int] | None
_PORTS = struct.Struct("!HH")


def struct_full(packet: bytes) -> Result:
    """The full plain-Python reference (IPv6 extension-header walk, fragments, every rule of DESIGN §3)."""
    try:
        r = reference_extract(packet)
    except ReferenceError:
        return None
    return r.src_ip, r.dst_ip, r.src_port, r.dst_port, r.protocol


def struct_minimal(packet: bytes) -> Result:
    """A minimal struct extractor: fixed header and ports, no extension-header walk (cheaper but wrong on
    chains); the kind of code a Python VPN would start with."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 15) * 4
        protocol = packet[9]
        src, dst = (
            socket.inet_ntop(socket.AF_INET, packet[12:16]),
            socket.inet_ntop(socket.AF_INET, packet[16:20]),
        )
        if protocol in (6, 17) and not (packet[6] & 0x1F or packet[7]) and len(packet) >= ihl + 4:
            sport, dport = _PORTS.unpack_from(packet, ihl)
            return src, dst, sport, dport, protocol
        return src, dst, None, None, protocol
    if version == 6 and len(packet) >= 40:
        protocol = packet[6]
        src, dst = (
            socket.inet_ntop(socket.AF_INET6, packet[8:24]),
            socket.inet_ntop(socket.AF_INET6, packet[24:40]),
        )
        if protocol in (6, 17) and len(packet) >= 44:
            sport, dport = _PORTS.unpack_from(packet, 40)
            return src, dst, sport, dport, protocol
        return src, dst, None, None, protocol
    return None


def dpkt_extract(packet: bytes) -> Result:
    """dpkt 1.9: IP / IP6 objects (which walk IPv6 extension headers), ports from the transport object."""
    try:
        if packet[0] >> 4 == 4:
            ip = dpkt.ip.IP(packet)
            family = socket.AF_INET
        else:
            ip = dpkt.ip6.IP6(packet)
            family = socket.AF_INET6
    except (dpkt.UnpackError, IndexError, struct.error):
        return None
    l4 = ip.data
    sport = getattr(l4, "sport", None)
    dport = getattr(l4, "dport", None)
    return socket.inet_ntop(family, ip.src), socket.inet_ntop(family, ip.dst), sport, dport, ip.p


def scapy_extract(packet: bytes) -> Result:
    """scapy 2.x: IP / IPv6 dissection, ports from the payload layer."""
    try:
        ip = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    except Exception:
        return None
    l4 = ip.payload
    sport = getattr(l4, "sport", None)
    dport = getattr(l4, "dport", None)
    protocol = ip.proto if packet[0] >> 4 == 4 else ip.nh
    return ip.src, ip.dst, sport, dport, protocol


def key_of(extract: Callable[[bytes], Result]) -> Callable[[bytes], str | None]:
    """The destination key built in plain Python on top of a peer's extraction."""

    def key(packet: bytes) -> str | None:
        r = extract(packet)
        if r is None:
            return None
        dst, dport = r[1], r[3]
        if dport is None:
            return dst
        return f"[{dst}]:{dport}" if ":" in dst else f"{dst}:{dport}"

    return key
