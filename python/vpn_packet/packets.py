"""Packet builders for tests: IPv4/IPv6 with TCP, UDP, ICMP, extension headers and fragments.

Plain Python with `struct`, independent of the native parser, so tests can use them as ground truth.
Checksums are filled in where cheap (IPv4 header); transport checksums are left zero (the parser never reads
them).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AH",
    "DEST_OPTIONS",
    "FRAGMENT",
    "HOP_BY_HOP",
    "ICMP",
    "ICMPV6",
    "ROUTING",
    "TCP",
    "UDP",
    "ExtensionHeader",
    "icmp_echo",
    "ipv4_checksum",
    "ipv4_packet",
    "ipv6_packet",
    "tcp_header",
    "udp_header",
]

ICMP = 1
TCP = 6
UDP = 17
ICMPV6 = 58
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
AH = 51
DEST_OPTIONS = 60


def tcp_header(src_port: int, dst_port: int, *, seq: int = 0, ack: int = 0, flags: int = 0x18) -> bytes:
    """A 20-byte TCP header (PSH|ACK by default, window 65535, checksum 0)."""
    return struct.pack("!HHIIBBHHH", src_port, dst_port, seq, ack, 5 << 4, flags, 65535, 0, 0)


def udp_header(src_port: int, dst_port: int, payload_len: int = 0) -> bytes:
    """An 8-byte UDP header whose length covers `payload_len` bytes of payload (checksum 0)."""
    return struct.pack("!HHHH", src_port, dst_port, 8 + payload_len, 0)


def icmp_echo(ident: int = 1, seq: int = 1, payload: bytes = b"", *, v6: bool = False) -> bytes:
    """An ICMP (or ICMPv6) echo request with an IPv4-style checksum (ICMPv6's pseudo-header is not summed)."""
    kind = 128 if v6 else 8
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    if v6:
        return body
    return body[:2] + struct.pack("!H", ipv4_checksum(body)) + body[4:]


def ipv4_checksum(data: bytes) -> int:
    """The ones'-complement checksum of the Internet protocols."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _transport(protocol: int, src_port: int | None, dst_port: int | None, payload: bytes) -> bytes:
    if protocol == TCP and src_port is not None and dst_port is not None:
        return tcp_header(src_port, dst_port) + payload
    if protocol == UDP and src_port is not None and dst_port is not None:
        return udp_header(src_port, dst_port, len(payload)) + payload
    if src_port is not None and dst_port is not None:
        # DCCP, SCTP, UDP-Lite and others: the ports are the first four bytes.
        return struct.pack("!HH", src_port, dst_port) + payload
    return payload


def ipv4_packet(
    src: str,
    dst: str,
    protocol: int = UDP,
    src_port: int | None = None,
    dst_port: int | None = None,
    payload: bytes = b"",
    *,
    options: bytes = b"",
    fragment_offset: int = 0,
    more_fragments: bool = False,
    dont_fragment: bool = False,
    ttl: int = 64,
    ident: int = 0,
    total_length: int | None = None,
    transport: bytes | None = None,
) -> bytes:
    """An IPv4 packet. `fragment_offset` is in 8-byte units; `transport` replaces the built transport part.

    `options` is padded to a multiple of 4 bytes. `total_length` overrides the header field (0 for
    segmentation offload, or a wrong value to test bounds).
    """
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    body = transport if transport is not None else _transport(protocol, src_port, dst_port, payload)
    ihl = 5 + len(options) // 4
    length = ihl * 4 + len(body) if total_length is None else total_length
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0) | (fragment_offset & 0x1FFF)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        length,
        ident,
        flags,
        ttl,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header += options
    checksum = ipv4_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + body


@dataclass(frozen=True, slots=True)
class ExtensionHeader:
    """An IPv6 extension header to put in a chain; its next-header byte is filled in by `ipv6_packet`.

    `kind` is HOP_BY_HOP, ROUTING, DEST_OPTIONS, FRAGMENT or AH. `size` is the header length in bytes
    (a multiple of 8; for AH a multiple of 4, at least 12). For FRAGMENT, `fragment_offset` (8-byte units)
    and `more_fragments` set the fragment fields.
    """

    kind: int
    size: int = 8
    fragment_offset: int = 0
    more_fragments: bool = False
    identification: int = 1

    def encode(self, next_header: int) -> bytes:
        if self.kind == FRAGMENT:
            field = (self.fragment_offset << 3) | (1 if self.more_fragments else 0)
            return struct.pack("!BBHI", next_header, 0, field, self.identification)
        if self.kind == AH:
            if self.size < 12 or self.size % 4:
                raise ValueError("an AH header is a multiple of 4 bytes, at least 12")
            return struct.pack("!BBH", next_header, self.size // 4 - 2, 0) + b"\0" * (self.size - 4)
        if self.size < 8 or self.size % 8:
            raise ValueError("an IPv6 extension header is a multiple of 8 bytes, at least 8")
        body = bytes([next_header, self.size // 8 - 1])
        pad = self.size - 2
        # PadN option covering the rest (routing headers get type/segments-left bytes that read as padding).
        options = bytes([1, pad - 2]) + b"\0" * (pad - 2) if pad >= 2 else b"\0" * pad
        return body + options


def ipv6_packet(
    src: str,
    dst: str,
    protocol: int = UDP,
    src_port: int | None = None,
    dst_port: int | None = None,
    payload: bytes = b"",
    *,
    extension_headers: Sequence[ExtensionHeader] = (),
    hop_limit: int = 64,
    payload_length: int | None = None,
    transport: bytes | None = None,
) -> bytes:
    """An IPv6 packet with an optional chain of extension headers before the transport header.

    `payload_length` overrides the header field (0 for a jumbogram-style "use the buffer").
    """
    body = transport if transport is not None else _transport(protocol, src_port, dst_port, payload)
    chain = b""
    kinds = [h.kind for h in extension_headers] + [protocol]
    for header, following in zip(extension_headers, kinds[1:], strict=True):
        chain += header.encode(following)
    rest = chain + body
    length = len(rest) if payload_length is None else payload_length
    fixed = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        length,
        kinds[0],
        hop_limit,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return fixed + rest
