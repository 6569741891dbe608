"""IP behind the encapsulations real networks use: MPLS label stacks (any depth, IPv4/IPv6 by the first
nibble after the bottom of the stack, an Ethernet pseudowire), PPPoE sessions (also behind VLAN/QinQ),
802.2 LLC/SNAP and 802.1ah PBB; each counted per encapsulation and per link type. The frames are built by the
testutil writers, independently of the native reader.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vpn_packet.capture import CaptureReader, summarize_capture
from vpn_packet.testutil.packets import ICMP, TCP, UDP, icmp_echo, ipv4_packet, ipv6_packet
from vpn_packet.testutil.pcap import (
    ETHERTYPE_ARP,
    ETHERTYPE_MPLS_MULTICAST,
    ETHERTYPE_QINQ,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    arp_frame,
    ethernet_frame,
    llc_snap_frame,
    mpls_frame,
    pbb_frame,
    pcap_bytes,
    pcapng_bytes,
    pppoe_frame,
    sll_frame,
)

V4 = ipv4_packet("10.8.0.2", "10.0.0.1", TCP, 40000, 443, b"x" * 40)
V6 = ipv6_packet("fd00::2", "2001:db8::53", UDP, 5000, 53, b"q" * 20)
PING = ipv4_packet("10.8.0.2", "192.0.2.9", ICMP, transport=icmp_echo())


def read(
    tmp_path: Path, frames: list[bytes], linktype: int = LINKTYPE_ETHERNET
) -> tuple[list[bytes], CaptureReader]:
    path = tmp_path / "capture.pcap"
    path.write_bytes(pcap_bytes(frames, linktype))
    reader = CaptureReader(path)
    packets: list[bytes] = []
    for buffer, lengths in reader:
        start = 0
        for length in lengths:
            packets.append(buffer[start : start + length])
            start += length
    return packets, reader


@pytest.mark.parametrize("depth", [1, 2, 3, 8])
def test_mpls_label_stacks_of_any_depth(tmp_path: Path, depth: int) -> None:
    labels = list(range(100, 100 + depth))
    frames = [
        mpls_frame(V4, labels),
        mpls_frame(V6, labels, ethertype=ETHERTYPE_MPLS_MULTICAST),
        mpls_frame(PING, labels, vlans=[7]),
        mpls_frame(b"\x10" + b"\0" * 30, labels),  # neither IPv4 nor IPv6 after the stack
    ]
    packets, reader = read(tmp_path, frames)
    assert packets == [V4, V6, PING]
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames) == (4, 3, 1)
    assert reader.encapsulations == {"mpls": 4, "vlan": 1}
    assert reader.link_encapsulations == {LINKTYPE_ETHERNET: {"mpls": 4, "vlan": 1}}


def test_mpls_ethernet_pseudowire(tmp_path: Path) -> None:
    frames = [mpls_frame(ethernet_frame(V4, vlans=[3]), [16, 17], control_word=True)]
    packets, reader = read(tmp_path, frames)
    assert packets == [V4]
    assert reader.encapsulations == {"mpls": 1, "mpls_pw_ethernet": 1, "vlan": 1}


def test_pppoe_sessions_also_behind_vlan_and_qinq(tmp_path: Path) -> None:
    frames = [
        pppoe_frame(V4),
        pppoe_frame(V6, session_id=0x1234),
        pppoe_frame(PING, vlans=[10]),
        pppoe_frame(V4, vlans=[(ETHERTYPE_QINQ, 200), 10]),
        pppoe_frame(b"\x01\x01\x00\x04", protocol=0xC021),  # LCP: not IP
    ]
    packets, reader = read(tmp_path, frames)
    assert packets == [V4, V6, PING, V4]
    assert reader.non_ip_frames == 1
    assert reader.encapsulations == {"pppoe": 5, "vlan": 2, "qinq": 1}


def test_llc_snap(tmp_path: Path) -> None:
    frames = [
        llc_snap_frame(V4),
        llc_snap_frame(V6, oui=b"\0\0\xf8"),
        llc_snap_frame(PING, vlans=[5]),
        llc_snap_frame(b"\0" * 28, ethertype=ETHERTYPE_ARP),  # ARP in SNAP: not IP
    ]
    packets, reader = read(tmp_path, frames)
    assert packets == [V4, V6, PING]
    assert reader.encapsulations == {"llc_snap": 4, "vlan": 1}
    with pytest.raises(ValueError, match="at most 1500"):
        llc_snap_frame(b"\x45" * 1500)


def test_pbb(tmp_path: Path) -> None:
    frames = [pbb_frame(V4), pbb_frame(V6, backbone_vlan=None, customer_vlans=[30])]
    packets, reader = read(tmp_path, frames)
    assert packets == [V4, V6]
    assert reader.encapsulations == {"pbb": 2, "qinq": 1, "vlan": 1}


def test_encapsulations_in_a_linux_cooked_capture(tmp_path: Path) -> None:
    mpls = struct.pack("!I", 16 << 12 | 1 << 8 | 64)
    frames = [sll_frame(mpls + V4, protocol=0x8847), sll_frame(V6)]
    packets, reader = read(tmp_path, frames, LINKTYPE_LINUX_SLL)
    assert packets == [V4, V6]
    assert reader.link_encapsulations == {LINKTYPE_LINUX_SLL: {"mpls": 1}}


def test_summary_and_json_count_encapsulations_per_link_type(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pcapng"
    frames = [mpls_frame(V4, [16, 17, 18]), pppoe_frame(V6, vlans=[4]), pbb_frame(PING), arp_frame()]
    path.write_bytes(pcapng_bytes([*frames, ethernet_frame(V4)]))
    summary = summarize_capture(path)
    assert (summary.frames, summary.ip_packets, summary.non_ip_frames) == (5, 4, 1)
    assert set(summary.destinations) == {"10.0.0.1:443", "[2001:db8::53]:53", "192.0.2.9"}
    assert summary.destinations["10.0.0.1:443"].packets == 2
    as_dict = summary.to_dict()
    expected = {"mpls": 1, "pbb": 1, "pppoe": 1, "qinq": 1, "vlan": 1}
    assert as_dict["encapsulations"] == expected
    assert as_dict["link_types"] == [
        {"linktype": 1, "name": "ETHERNET", "frames": 5, "encapsulations": expected}
    ]


# ---- PPP links: MPLS inside PPP, Cisco HDLC framing under a PPP link type ----

LINKTYPE_PPP = 9
LINKTYPE_PPP_HDLC = 50  # PPP in HDLC-like framing ("PPP serial" in Wireshark)


def mpls_stack(labels: list[int]) -> bytes:
    """Label stack entries, the last with the bottom-of-stack bit (RFC 3032), TTL 64."""
    return b"".join(
        struct.pack("!I", label << 12 | (i == len(labels) - 1) << 8 | 64) for i, label in enumerate(labels)
    )


def ppp_frame(protocol: int, payload: bytes, *, address_control: bool = True) -> bytes:
    """A PPP frame: the HDLC-like address and control bytes (0xff 0x03) unless compressed away, the
    2-byte protocol, the payload."""
    return (b"\xff\x03" if address_control else b"") + struct.pack("!H", protocol) + payload


def cisco_hdlc_frame(ethertype: int, payload: bytes, *, address: int = 0x0F) -> bytes:
    """A Cisco HDLC frame: address (0x0f unicast, 0x8f broadcast), control 0, EtherType, payload."""
    return struct.pack("!BBH", address, 0, ethertype) + payload


@pytest.mark.parametrize("linktype", [LINKTYPE_PPP, LINKTYPE_PPP_HDLC])
def test_mpls_inside_ppp_is_followed_and_counted(tmp_path: Path, linktype: int) -> None:
    frames = [
        ppp_frame(0x0281, mpls_stack([100]) + V4),  # MPLS unicast
        ppp_frame(0x0283, mpls_stack([100, 200, 300]) + V6, address_control=False),  # multicast
        ppp_frame(0x0021, PING),  # plain IPv4: no encapsulation
        ppp_frame(0x0281, mpls_stack([100]) + b"\x10" + b"\0" * 30),  # not IP at the bottom
    ]
    packets, reader = read(tmp_path, frames, linktype)
    assert packets == [V4, V6, PING]
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames) == (4, 3, 1)
    assert reader.encapsulations == {"mpls": 3}
    assert reader.link_encapsulations == {linktype: {"mpls": 3}}


@pytest.mark.parametrize("linktype", [LINKTYPE_PPP, LINKTYPE_PPP_HDLC])
def test_cisco_hdlc_framing_on_a_ppp_link_type_is_followed_and_counted(tmp_path: Path, linktype: int) -> None:
    frames = [
        cisco_hdlc_frame(0x0800, V4),
        cisco_hdlc_frame(0x86DD, V6, address=0x8F),
        cisco_hdlc_frame(0x8847, mpls_stack([16, 17]) + PING),  # MPLS behind Cisco HDLC
        cisco_hdlc_frame(0x8035, b"\0" * 20),  # SLARP, Cisco's keepalive: not IP
        ppp_frame(0x0021, V4),  # real PPP on the same link still reads as PPP
    ]
    packets, reader = read(tmp_path, frames, linktype)
    assert packets == [V4, V6, PING, V4]
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames) == (5, 4, 1)
    assert reader.encapsulations == {"cisco_hdlc": 4, "mpls": 1}


def test_ppp_encapsulations_in_the_summary_and_the_table(tmp_path: Path) -> None:
    path = tmp_path / "serial.pcap"
    frames = [cisco_hdlc_frame(0x0800, V4), ppp_frame(0x0281, mpls_stack([5]) + V6)]
    path.write_bytes(pcap_bytes(frames, LINKTYPE_PPP_HDLC))
    summary = summarize_capture(path)
    assert set(summary.destinations) == {"10.0.0.1:443", "[2001:db8::53]:53"}
    assert summary.to_dict()["link_types"] == [
        {"linktype": 50, "name": "PPP_HDLC", "frames": 2, "encapsulations": {"cisco_hdlc": 1, "mpls": 1}}
    ]
