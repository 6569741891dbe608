"""Pcap and pcapng writers, link-layer framing, and a realistic synthetic capture.

Plain Python with `struct`, independent of the native reader, so tests can use them as ground truth and
`vpn-packet sample-capture` can write a demo file. Link types: ETHERNET (optionally VLAN-tagged), RAW,
IPV4/IPV6, NULL, LOOP, LINUX_SLL and LINUX_SLL2; inside Ethernet, the encapsulations real networks put
before IP: MPLS label stacks, PPPoE sessions, 802.2 LLC/SNAP and 802.1ah PBB. pcapng files may also hold
the obsolete Packet Block and blocks of any other type.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from vpn_packet.packets import (
    DEST_OPTIONS,
    FRAGMENT,
    HOP_BY_HOP,
    ICMP,
    ICMPV6,
    ROUTING,
    TCP,
    UDP,
    ExtensionHeader,
    icmp_echo,
    ipv4_packet,
    ipv6_packet,
    udp_header,
)

__all__ = [
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ETHERTYPE_MPLS",
    "ETHERTYPE_MPLS_MULTICAST",
    "ETHERTYPE_PBB",
    "ETHERTYPE_PPPOE_DISCOVERY",
    "ETHERTYPE_PPPOE_SESSION",
    "ETHERTYPE_QINQ",
    "ETHERTYPE_VLAN",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_IPV4",
    "LINKTYPE_IPV6",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_LOOP",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "PcapNgWriter",
    "PcapWriter",
    "SampleCapture",
    "arp_frame",
    "encapsulate",
    "ethernet_frame",
    "llc_snap_frame",
    "loop_frame",
    "mpls_frame",
    "null_frame",
    "pbb_frame",
    "pcap_bytes",
    "pcapng_bytes",
    "pppoe_frame",
    "sll2_frame",
    "sll_frame",
    "write_sample_capture",
]

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_QINQ = 0x88A8
ETHERTYPE_MPLS = 0x8847
ETHERTYPE_MPLS_MULTICAST = 0x8848
ETHERTYPE_PPPOE_DISCOVERY = 0x8863
ETHERTYPE_PPPOE_SESSION = 0x8864
ETHERTYPE_PBB = 0x88E7

PPP_IPV4 = 0x0021
PPP_IPV6 = 0x0057

AF_INET = 2
AF_INET6_DARWIN = 30

_SRC_MAC = bytes.fromhex("02000000aa01")
_DST_MAC = bytes.fromhex("02000000bb02")


def _ethertype_of(packet: bytes) -> int:
    """IPv6 when the version nibble says 6, else IPv4 (malformed packets still need some EtherType)."""
    return ETHERTYPE_IPV6 if packet[:1] and packet[0] >> 4 == 6 else ETHERTYPE_IPV4


def ethernet_frame(
    payload: bytes,
    *,
    ethertype: int | None = None,
    vlans: Sequence[int | tuple[int, int]] = (),
    src_mac: bytes = _SRC_MAC,
    dst_mac: bytes = _DST_MAC,
) -> bytes:
    """An Ethernet II frame. `vlans` are outermost first: a VLAN id (tagged 0x8100) or `(tpid, vlan_id)`.

    `ethertype` defaults to IPv4 or IPv6 from the payload's version nibble.
    """
    kind = _ethertype_of(payload) if ethertype is None else ethertype
    tags = b""
    for vlan in vlans:
        tpid, vid = (ETHERTYPE_VLAN, vlan) if isinstance(vlan, int) else vlan
        tags += struct.pack("!HH", tpid, vid & 0x0FFF)
    return dst_mac + src_mac + tags + struct.pack("!H", kind) + payload


def mpls_frame(
    payload: bytes,
    labels: Sequence[int] = (16,),
    *,
    ethertype: int = ETHERTYPE_MPLS,
    vlans: Sequence[int | tuple[int, int]] = (),
    control_word: bool = False,
) -> bytes:
    """An Ethernet frame carrying `payload` under an MPLS label stack (outermost label first; the last one
    has the bottom-of-stack bit). `control_word` puts a pseudowire control word (4 zero bytes) before the
    payload, as an Ethernet pseudowire does: `payload` is then the customer's Ethernet frame."""
    stack = b"".join(
        struct.pack("!I", (label & 0xFFFFF) << 12 | (i == len(labels) - 1) << 8 | 64)
        for i, label in enumerate(labels)
    )
    body = stack + (b"\0\0\0\0" if control_word else b"") + payload
    return ethernet_frame(body, ethertype=ethertype, vlans=vlans)


def pppoe_frame(
    packet: bytes,
    *,
    session_id: int = 1,
    protocol: int | None = None,
    vlans: Sequence[int | tuple[int, int]] = (),
) -> bytes:
    """An Ethernet PPPoE session frame carrying `packet` in PPP; `protocol` defaults to IPv4 (0x0021) or
    IPv6 (0x0057) from the version nibble."""
    if protocol is None:
        protocol = PPP_IPV6 if _ethertype_of(packet) == ETHERTYPE_IPV6 else PPP_IPV4
    ppp = struct.pack("!H", protocol) + packet
    header = struct.pack("!BBHH", 0x11, 0x00, session_id, len(ppp))
    return ethernet_frame(header + ppp, ethertype=ETHERTYPE_PPPOE_SESSION, vlans=vlans)


def llc_snap_frame(
    packet: bytes,
    *,
    ethertype: int | None = None,
    oui: bytes = b"\0\0\0",
    vlans: Sequence[int | tuple[int, int]] = (),
) -> bytes:
    """An 802.3 frame (a length, not an EtherType) with an LLC/SNAP header (RFC 1042) carrying `packet`."""
    kind = _ethertype_of(packet) if ethertype is None else ethertype
    body = b"\xaa\xaa\x03" + oui + struct.pack("!H", kind) + packet
    if len(body) > 1500:
        raise ValueError(f"an 802.3 frame carries at most 1500 bytes, not {len(body)}")
    return ethernet_frame(body, ethertype=len(body), vlans=vlans)


def pbb_frame(
    packet: bytes,
    *,
    service_id: int = 0x10203,
    backbone_vlan: int | None = 100,
    customer_vlans: Sequence[int] = (),
) -> bytes:
    """An 802.1ah (provider backbone bridging) frame: backbone header with an optional B-TAG (0x88a8), the
    I-TAG (0x88e7, a 24-bit service id), then the customer's Ethernet frame carrying `packet`."""
    customer = ethernet_frame(packet, vlans=customer_vlans)
    itag = struct.pack("!I", service_id & 0xFFFFFF) + customer
    vlans: list[int | tuple[int, int]] = [] if backbone_vlan is None else [(ETHERTYPE_QINQ, backbone_vlan)]
    return ethernet_frame(itag, ethertype=ETHERTYPE_PBB, vlans=vlans)


def arp_frame(sender_ip: str = "10.0.0.1", target_ip: str = "10.0.0.2") -> bytes:
    """A broadcast Ethernet ARP request (who-has `target_ip`, tell `sender_ip`)."""
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETHERTYPE_IPV4,
        6,
        4,
        1,
        _SRC_MAC,
        ipaddress.IPv4Address(sender_ip).packed,
        b"\0" * 6,
        ipaddress.IPv4Address(target_ip).packed,
    )
    return ethernet_frame(body, ethertype=ETHERTYPE_ARP, dst_mac=b"\xff" * 6)


def _family_of(packet: bytes) -> int:
    return AF_INET6_DARWIN if _ethertype_of(packet) == ETHERTYPE_IPV6 else AF_INET


def null_frame(packet: bytes, *, family: int | None = None, big_endian: bool = False) -> bytes:
    """A BSD loopback (NULL) frame: the address family in the capturing host's byte order, then the packet.

    `family` defaults to AF_INET, or Darwin's AF_INET6 (30) for an IPv6 packet.
    """
    value = _family_of(packet) if family is None else family
    return struct.pack(">I" if big_endian else "<I", value) + packet


def loop_frame(packet: bytes, *, family: int | None = None) -> bytes:
    """An OpenBSD loopback (LOOP) frame: the address family in network byte order, then the packet."""
    value = _family_of(packet) if family is None else family
    return struct.pack("!I", value) + packet


def sll_frame(packet: bytes, *, protocol: int | None = None, packet_type: int = 0) -> bytes:
    """A Linux cooked capture v1 frame (16-byte header; ARPHRD_ETHER, a 6-byte address)."""
    kind = _ethertype_of(packet) if protocol is None else protocol
    return struct.pack("!HHH8sH", packet_type, 1, 6, _SRC_MAC + b"\0\0", kind) + packet


def sll2_frame(
    packet: bytes, *, protocol: int | None = None, interface_index: int = 1, packet_type: int = 0
) -> bytes:
    """A Linux cooked capture v2 frame (20-byte header; ARPHRD_ETHER, a 6-byte address)."""
    kind = _ethertype_of(packet) if protocol is None else protocol
    return struct.pack("!HHIHBB8s", kind, 0, interface_index, 1, packet_type, 6, _SRC_MAC + b"\0\0") + packet


def encapsulate(linktype: int, packet: bytes) -> bytes:
    """The frame of link type `linktype` that carries the IP packet `packet`."""
    if linktype == LINKTYPE_ETHERNET:
        return ethernet_frame(packet)
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, 12, 14):
        return packet
    if linktype == LINKTYPE_NULL:
        return null_frame(packet)
    if linktype == LINKTYPE_LOOP:
        return loop_frame(packet)
    if linktype == LINKTYPE_LINUX_SLL:
        return sll_frame(packet)
    if linktype == LINKTYPE_LINUX_SLL2:
        return sll2_frame(packet)
    raise ValueError(f"no framing for link type {linktype}")


class _Clock:
    """Timestamps for frames written without one: 1 ms apart from a fixed start (deterministic files)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def next(self, timestamp: float | None) -> float:
        if timestamp is None:
            self.now += 0.001
            return self.now
        self.now = timestamp
        return timestamp


class PcapWriter:
    """Writes a legacy pcap file: the file header at construction, then one record per `write`."""

    def __init__(
        self,
        out: BinaryIO,
        linktype: int = LINKTYPE_ETHERNET,
        *,
        snaplen: int = 262_144,
        nanosecond: bool = False,
        big_endian: bool = False,
    ) -> None:
        self._out = out
        self._order = ">" if big_endian else "<"
        self._nanosecond = nanosecond
        self._clock = _Clock()
        magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
        out.write(struct.pack(self._order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))

    def write(
        self, frame: bytes, *, timestamp: float | None = None, original_length: int | None = None
    ) -> None:
        """One record; `original_length` larger than the frame marks it as cut by the snap length."""
        when = self._clock.next(timestamp)
        seconds = int(when)
        fraction = round((when - seconds) * (1e9 if self._nanosecond else 1e6))
        length = len(frame) if original_length is None else original_length
        self._out.write(struct.pack(self._order + "IIII", seconds, fraction, len(frame), length) + frame)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


class PcapNgWriter:
    """Writes a pcapng file: a section header at construction, then interfaces and packet blocks."""

    def __init__(self, out: BinaryIO, *, big_endian: bool = False, application: str = "vpn-packet") -> None:
        self._out = out
        self._order = ">" if big_endian else "<"
        self._application = application
        self._clock = _Clock()
        self._interfaces = 0
        self.new_section()

    def _option(self, code: int, value: bytes) -> bytes:
        return struct.pack(self._order + "HH", code, len(value)) + _pad4(value)

    def _options(self, *options: bytes) -> bytes:
        return b"".join(options) + self._option(0, b"") if options else b""

    def write_block(self, block_type: int, body: bytes) -> None:
        """Any block: type, total length, the body padded to 4 bytes, total length."""
        body = _pad4(body)
        total = 12 + len(body)
        self._out.write(
            struct.pack(self._order + "II", block_type, total) + body + struct.pack(self._order + "I", total)
        )

    def new_section(self) -> None:
        """A section header block; interfaces described before it no longer apply."""
        body = struct.pack(self._order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
        body += self._options(self._option(4, self._application.encode()))
        self.write_block(0x0A0D0D0A, body)
        self._interfaces = 0

    def add_interface(self, linktype: int, *, snaplen: int = 0, name: str | None = None) -> int:
        """An interface description block; returns the interface id packets refer to."""
        options = [self._option(2, name.encode())] if name else []
        options.append(self._option(9, b"\x06"))  # if_tsresol: microseconds
        body = struct.pack(self._order + "HHI", linktype, 0, snaplen) + self._options(*options)
        self.write_block(1, body)
        self._interfaces += 1
        return self._interfaces - 1

    def write(
        self,
        frame: bytes,
        *,
        interface: int = 0,
        timestamp: float | None = None,
        original_length: int | None = None,
    ) -> None:
        """An enhanced packet block on `interface`."""
        micros = round(self._clock.next(timestamp) * 1e6)
        length = len(frame) if original_length is None else original_length
        header = struct.pack(
            self._order + "IIIII", interface, micros >> 32, micros & 0xFFFFFFFF, len(frame), length
        )
        self.write_block(6, header + frame)

    def write_simple(self, frame: bytes, *, original_length: int | None = None) -> None:
        """A simple packet block (interface 0, no timestamp)."""
        length = len(frame) if original_length is None else original_length
        self.write_block(3, struct.pack(self._order + "I", length) + frame)

    def write_packet_block(
        self,
        frame: bytes,
        *,
        interface: int = 0,
        timestamp: float | None = None,
        drops: int = 0,
        captured_length: int | None = None,
    ) -> None:
        """An obsolete Packet Block (type 2), as old tools still write: a 16-bit interface id and a drops
        count where the enhanced block has a 32-bit interface id. `captured_length` overrides the length
        field (to write a corrupt block)."""
        micros = round(self._clock.next(timestamp) * 1e6)
        caplen = len(frame) if captured_length is None else captured_length
        header = struct.pack(
            self._order + "HHIIII", interface, drops, micros >> 32, micros & 0xFFFFFFFF, caplen, len(frame)
        )
        self.write_block(2, header + frame)


def pcap_bytes(
    frames: Iterable[bytes],
    linktype: int = LINKTYPE_ETHERNET,
    *,
    nanosecond: bool = False,
    big_endian: bool = False,
) -> bytes:
    """A whole legacy pcap file, in memory."""
    import io

    out = io.BytesIO()
    writer = PcapWriter(out, linktype, nanosecond=nanosecond, big_endian=big_endian)
    for frame in frames:
        writer.write(frame)
    return out.getvalue()


def pcapng_bytes(
    frames: Iterable[bytes | tuple[int, bytes]],
    linktypes: Sequence[int] = (LINKTYPE_ETHERNET,),
    *,
    big_endian: bool = False,
) -> bytes:
    """A whole pcapng file, in memory: one interface per link type; a frame is bytes (interface 0) or
    `(interface, bytes)`."""
    import io

    out = io.BytesIO()
    writer = PcapNgWriter(out, big_endian=big_endian)
    for linktype in linktypes:
        writer.add_interface(linktype)
    for item in frames:
        interface, frame = (0, item) if isinstance(item, bytes) else item
        writer.write(frame, interface=interface)
    return out.getvalue()


# ---- a realistic synthetic capture ----


@dataclass(slots=True)
class SampleCapture:
    """What `write_sample_capture` wrote (for the CLI's message and for tests)."""

    format: str
    frames: int = 0
    ip_packets: int = 0
    malformed_packets: int = 0
    arp_frames: int = 0
    fragments: int = 0
    extension_header_packets: int = 0
    link_types: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Service:
    address: str
    protocol: int
    port: int | None

    @property
    def v6(self) -> bool:
        return ":" in self.address


def _services(rng: random.Random) -> list[_Service]:
    """About 300 destinations: web, DNS, QUIC, WireGuard, SSH, NTP, ping targets, an IPsec gateway."""
    services: list[_Service] = []
    v4_nets = ["192.0.2", "198.51.100", "203.0.113", "10.20.30"]
    for i in range(220):
        address = f"{v4_nets[i % 4]}.{1 + (i * 7) % 250}"
        protocol, port = rng.choice(
            [(TCP, 443), (TCP, 443), (TCP, 80), (TCP, 22), (UDP, 53), (UDP, 443), (UDP, 51820), (UDP, 123)]
        )
        services.append(_Service(address, protocol, port))
    for i in range(70):
        address = f"2001:db8:{i % 5:x}::{0x10 + i:x}"
        protocol, port = rng.choice([(TCP, 443), (TCP, 443), (UDP, 443), (UDP, 53), (TCP, 8443)])
        services.append(_Service(address, protocol, port))
    services += [_Service(f"198.51.100.{200 + i}", ICMP, None) for i in range(6)]
    services += [_Service(f"2001:db8:ffff::{i + 1:x}", ICMPV6, None) for i in range(4)]
    services.append(_Service("203.0.113.250", 50, None))  # ESP to an IPsec gateway
    return services


def _payload(rng: random.Random, service: _Service) -> bytes:
    if service.port == 53:
        size = rng.randint(30, 90)
    elif service.port == 51820:
        size = rng.choice([32, 148, 1200])
    elif service.protocol == TCP:
        size = rng.choice([0, 0, 0, 64, 517, 1200, 1380])
    else:
        size = rng.choice([64, 900, 1200, 1250])
    return bytes(rng.getrandbits(8) for _ in range(min(size, 16))) + b"\0" * max(0, size - 16)


def _ip_packets(rng: random.Random, service: _Service, stats: SampleCapture) -> list[bytes]:
    """One packet to `service`, or two for a fragmented datagram."""
    payload = _payload(rng, service)
    sport = rng.randint(32768, 60999)
    if service.protocol in (ICMP, ICMPV6):
        body = icmp_echo(rng.randint(1, 65535), rng.randint(1, 200), b"x" * 56, v6=service.v6)
        if service.v6:
            return [ipv6_packet("fd00:8::2", service.address, ICMPV6, transport=body)]
        return [ipv4_packet("10.8.0.2", service.address, ICMP, transport=body)]
    if service.protocol == 50:
        esp = struct.pack("!II", 0x1000, rng.randint(1, 10**6)) + payload
        return [ipv4_packet("10.8.0.3", service.address, 50, transport=esp)]
    fragment = service.protocol == UDP and len(payload) >= 900 and rng.random() < 0.15
    if service.v6:
        headers: list[ExtensionHeader] = []
        if rng.random() < 0.08:
            headers = [ExtensionHeader(rng.choice([HOP_BY_HOP, DEST_OPTIONS, ROUTING]), 8)]
            stats.extension_header_packets += 1
        if fragment:
            stats.fragments += 2
            ident = rng.randint(1, 2**31)
            udp = udp_header(sport, service.port or 0, len(payload))
            first = ipv6_packet(
                "fd00:8::2",
                service.address,
                service.protocol,
                extension_headers=[
                    *headers,
                    ExtensionHeader(FRAGMENT, more_fragments=True, identification=ident),
                ],
                transport=udp + payload[:600],
            )
            rest = ipv6_packet(
                "fd00:8::2",
                service.address,
                service.protocol,
                extension_headers=[ExtensionHeader(FRAGMENT, fragment_offset=76, identification=ident)],
                transport=payload[600:],
            )
            return [first, rest]
        return [
            ipv6_packet(
                "fd00:8::2",
                service.address,
                service.protocol,
                sport,
                service.port,
                payload,
                extension_headers=headers,
            )
        ]
    if fragment:
        stats.fragments += 2
        ident = rng.randint(1, 65535)
        udp = udp_header(sport, service.port or 0, len(payload))
        first = ipv4_packet(
            "10.8.0.2",
            service.address,
            service.protocol,
            transport=udp + payload[:600],
            ident=ident,
            more_fragments=True,
        )
        rest = ipv4_packet(
            "10.8.0.2",
            service.address,
            service.protocol,
            transport=payload[600:],
            ident=ident,
            fragment_offset=76,
        )
        return [first, rest]
    return [ipv4_packet("10.8.0.2", service.address, service.protocol, sport, service.port, payload)]


_MALFORMED = [
    bytes([0x43]) + b"\0" * 39,  # IPv4 with IHL 3
    bytes([0x45, 0, 0, 20]) + b"\0" * 8,  # IPv4 cut to 12 bytes
    bytes([0x50]) + b"\0" * 39,  # IP version 5
    bytes([0x60]) + b"\0" * 20,  # IPv6 cut to 21 bytes
]


def write_sample_capture(
    out: BinaryIO, *, packets: int = 2000, fmt: str = "pcapng", seed: int = 1
) -> SampleCapture:
    """Writes `packets` frames of realistic VPN-node traffic, deterministically for a given `seed`.

    Mixed IPv4/IPv6 to about 300 destinations with a long-tailed popularity (TCP, UDP, ICMP/ICMPv6, ESP),
    some fragmented datagrams, some IPv6 extension headers, a few malformed IP packets and a few ARP frames.
    pcapng gets two interfaces, `eth0` (Ethernet, partly VLAN-tagged) and `tun0` (raw IP); pcap is Ethernet.
    """
    if fmt not in ("pcap", "pcapng"):
        raise ValueError(f"format must be 'pcap' or 'pcapng', not {fmt!r}")
    rng = random.Random(seed)
    services = _services(rng)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(len(services))]
    rng.shuffle(services)
    stats = SampleCapture(format=fmt)
    malformed_left = max(1, packets // 300) if packets >= 50 else 0
    arp_left = max(1, packets // 200) if packets >= 50 else 0

    ng: PcapNgWriter | None = None
    legacy: PcapWriter | None = None
    if fmt == "pcapng":
        ng = PcapNgWriter(out)
        ng.add_interface(LINKTYPE_ETHERNET, name="eth0")
        ng.add_interface(LINKTYPE_RAW, name="tun0")
    else:
        legacy = PcapWriter(out, LINKTYPE_ETHERNET)
    now = 1_700_000_000.0

    def emit(frame: bytes, ethernet: bool) -> None:
        nonlocal now
        now += rng.expovariate(2000.0)
        link = LINKTYPE_ETHERNET if ethernet else LINKTYPE_RAW
        stats.link_types[link] = stats.link_types.get(link, 0) + 1
        stats.frames += 1
        if ng is not None:
            ng.write(frame, interface=0 if ethernet else 1, timestamp=now)
        elif legacy is not None:
            legacy.write(frame, timestamp=now)

    def emit_ip(packet: bytes) -> None:
        ethernet = ng is None or rng.random() < 0.7
        stats.ip_packets += 1
        if not ethernet:
            emit(packet, False)
            return
        roll = rng.random()
        vlans: list[int | tuple[int, int]] = []
        if roll < 0.02:
            vlans = [(ETHERTYPE_QINQ, 200), 100]
        elif roll < 0.12:
            vlans = [100]
        emit(ethernet_frame(packet, vlans=vlans), True)

    while stats.frames < packets:
        left = packets - stats.frames
        roll = rng.random()
        if arp_left and (roll < 0.005 or left <= arp_left + malformed_left):
            arp_left -= 1
            stats.arp_frames += 1
            emit(arp_frame(f"10.0.0.{rng.randint(1, 254)}", f"10.0.0.{rng.randint(1, 254)}"), True)
            continue
        if malformed_left and (roll > 0.997 or left <= malformed_left):
            malformed_left -= 1
            stats.malformed_packets += 1
            emit_ip(_MALFORMED[stats.malformed_packets % len(_MALFORMED)])
            continue
        service = rng.choices(services, weights)[0]
        burst = _ip_packets(rng, service, stats)
        if len(burst) > left - arp_left - malformed_left:
            burst = [_ip_packets_unfragmented(rng, service)]
        for packet in burst:
            emit_ip(packet)
    return stats


def _ip_packets_unfragmented(rng: random.Random, service: _Service) -> bytes:
    """A single small packet to `service` (to fill the last frame without splitting a fragmented pair)."""
    if service.v6:
        protocol = ICMPV6 if service.protocol == ICMPV6 else service.protocol
        if protocol in (TCP, UDP):
            return ipv6_packet("fd00:8::2", service.address, protocol, 40000, service.port)
        return ipv6_packet("fd00:8::2", service.address, protocol, transport=icmp_echo(v6=True))
    if service.protocol in (TCP, UDP):
        return ipv4_packet("10.8.0.2", service.address, service.protocol, 40000, service.port)
    return ipv4_packet("10.8.0.2", service.address, service.protocol, transport=icmp_echo())
