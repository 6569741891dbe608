"""Capture reading: the native `CaptureReader` and `summarize_capture`, against files written by the
plain-Python writers in `vpn_packet.testutil.pcap`.

Error policy under test: a file that is not a capture (or whose file header is cut short) raises
`CaptureError` at construction; a capture that ends early (cut mid-record, or corrupt further on) yields the
packets before the problem, then raises `CaptureError` from the iterator; `summarize_capture` turns that late
error into `summary.error` and keeps the counts.
"""

from __future__ import annotations

import errno
import io
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet.capture import CaptureError, CaptureReader, protocol_name, summarize_capture
from vpn_packet.errors import VpnPacketError
from vpn_packet.testutil.packets import (
    DEST_OPTIONS,
    FRAGMENT,
    ICMP,
    TCP,
    UDP,
    ExtensionHeader,
    icmp_echo,
    ipv4_packet,
    ipv6_packet,
)
from vpn_packet.testutil.pcap import (
    ETHERTYPE_ARP,
    ETHERTYPE_QINQ,
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    PcapNgWriter,
    PcapWriter,
    arp_frame,
    encapsulate,
    ethernet_frame,
    null_frame,
    pcap_bytes,
    pcapng_bytes,
    sll2_frame,
    sll_frame,
    write_sample_capture,
)

PACKETS = [
    ipv4_packet("10.0.0.2", "10.0.0.1", TCP, 40000, 80, b"GET / HTTP/1.1\r\n\r\n"),
    ipv6_packet("2001:db8::2", "2001:db8::1", UDP, 5353, 53, b"q" * 30),
    ipv4_packet("10.0.0.2", "192.0.2.7", ICMP, transport=icmp_echo(7, 1, b"ping")),
    ipv6_packet("fd00::2", "fd00::1", TCP, 1234, 443, extension_headers=[ExtensionHeader(DEST_OPTIONS)]),
]

LINK_TYPES = [
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    12,
    14,
    LINKTYPE_NULL,
    LINKTYPE_LOOP,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
]

# (format, options) for every flavour the writers produce.
FLAVOURS = [
    ("pcap", {}),
    ("pcap", {"big_endian": True}),
    ("pcap", {"nanosecond": True}),
    ("pcap", {"big_endian": True, "nanosecond": True}),
    ("pcapng", {}),
    ("pcapng", {"big_endian": True}),
]


def write(tmp_path: Path, data: bytes, name: str = "capture.pcap") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def split(buffer: bytes, lengths: list[int]) -> list[bytes]:
    out, start = [], 0
    for length in lengths:
        out.append(buffer[start : start + length])
        start += length
    assert start == len(buffer)
    return out


def read_all(path: Path, batch_size: int = 1024) -> tuple[list[bytes], CaptureReader]:
    reader = CaptureReader(path, batch_size)
    packets: list[bytes] = []
    for buffer, lengths in reader:
        assert 0 < len(lengths) <= batch_size
        packets += split(buffer, lengths)
    return packets, reader


def capture(fmt: str, linktype: int, frames: list[bytes], **options: bool) -> bytes:
    if fmt == "pcap":
        return pcap_bytes(frames, linktype, **options)
    return pcapng_bytes(frames, [linktype], **options)


# ---- formats and link types ----


@pytest.mark.parametrize(("fmt", "options"), FLAVOURS)
@pytest.mark.parametrize("linktype", LINK_TYPES)
def test_every_link_type_in_every_format(
    tmp_path: Path, fmt: str, options: dict[str, bool], linktype: int
) -> None:
    frames = [encapsulate(linktype, p) for p in PACKETS]
    packets, reader = read_all(write(tmp_path, capture(fmt, linktype, frames, **options)))
    assert packets == PACKETS
    assert reader.format == fmt
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames) == (4, 4, 0)
    assert reader.ip_bytes == sum(map(len, PACKETS))
    assert reader.link_types == {linktype: 4}
    if fmt == "pcap":
        endian = "big-endian" if options.get("big_endian") else "little-endian"
        resolution = "nanosecond" if options.get("nanosecond") else "microsecond"
        assert reader.format_detail == f"pcap ({endian}, {resolution})"


def test_raw_ipv4_link_type(tmp_path: Path) -> None:
    packets, reader = read_all(write(tmp_path, pcap_bytes([PACKETS[0], PACKETS[2]], LINKTYPE_IPV4)))
    assert packets == [PACKETS[0], PACKETS[2]]
    assert reader.link_types == {LINKTYPE_IPV4: 2}


def test_null_family_in_either_byte_order(tmp_path: Path) -> None:
    frames = [
        null_frame(PACKETS[0], big_endian=True),
        null_frame(PACKETS[1], family=24),
        null_frame(PACKETS[3]),
    ]
    packets, _ = read_all(write(tmp_path, pcap_bytes(frames, LINKTYPE_NULL)))
    assert packets == [PACKETS[0], PACKETS[1], PACKETS[3]]


def test_stacked_vlan_tags(tmp_path: Path) -> None:
    frames = [
        ethernet_frame(PACKETS[0], vlans=[100]),
        ethernet_frame(PACKETS[1], vlans=[(ETHERTYPE_QINQ, 200), 100]),
        ethernet_frame(PACKETS[2], vlans=[(0x9100, 5), 6, 7]),
        ethernet_frame(PACKETS[3]),
        ethernet_frame(b"\0" * 28, ethertype=ETHERTYPE_ARP, vlans=[100]),  # ARP inside a VLAN: not IP
    ]
    packets, reader = read_all(write(tmp_path, pcap_bytes(frames)))
    assert packets == PACKETS
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames) == (5, 4, 1)


def test_non_ip_short_and_unsupported_frames_are_skipped_and_counted(tmp_path: Path) -> None:
    frames = [
        arp_frame(),
        ethernet_frame(PACKETS[0]),
        ethernet_frame(b"\x02" * 40, ethertype=0x88CC),  # LLDP
        b"\x01\x02\x03",  # shorter than an Ethernet header
        arp_frame("10.0.0.9", "10.0.0.1"),
    ]
    packets, reader = read_all(write(tmp_path, pcap_bytes(frames)))
    assert packets == [PACKETS[0]]
    assert (reader.frames, reader.ip_packets, reader.non_ip_frames, reader.short_frames) == (5, 1, 3, 1)

    sll = [sll_frame(PACKETS[1]), sll_frame(b"\0" * 28, protocol=ETHERTYPE_ARP)]
    packets, reader = read_all(write(tmp_path, pcap_bytes(sll, LINKTYPE_LINUX_SLL)))
    assert (packets, reader.non_ip_frames) == ([PACKETS[1]], 1)
    sll2 = [sll2_frame(b"\0" * 28, protocol=ETHERTYPE_ARP), sll2_frame(PACKETS[2])]
    packets, reader = read_all(write(tmp_path, pcap_bytes(sll2, LINKTYPE_LINUX_SLL2)))
    assert (packets, reader.non_ip_frames) == ([PACKETS[2]], 1)

    # IEEE 802.11: an unsupported link type is counted, never fatal.
    packets, reader = read_all(write(tmp_path, pcap_bytes([b"\0" * 40] * 3, 105)))
    assert (packets, reader.unsupported_link_frames, reader.link_types) == ([], 3, {105: 3})


def test_pcapng_interfaces_simple_packets_and_sections(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = PcapNgWriter(out)
    eth = writer.add_interface(LINKTYPE_ETHERNET, name="eth0")
    tun = writer.add_interface(LINKTYPE_RAW, name="tun0")
    writer.write(ethernet_frame(PACKETS[0]), interface=eth)
    writer.write(PACKETS[1], interface=tun)
    writer.write_simple(ethernet_frame(PACKETS[2]))  # interface 0
    writer.write_block(0x0BAD, b"skip me")  # an unknown block type
    writer.write(PACKETS[0], interface=9)  # an interface never described
    writer.new_section()  # forgets eth0 and tun0
    writer.add_interface(LINKTYPE_LINUX_SLL2)
    writer.write(sll2_frame(PACKETS[3]))
    packets, reader = read_all(write(tmp_path, out.getvalue(), "multi.pcapng"))
    assert packets == PACKETS
    assert (reader.frames, reader.unsupported_link_frames) == (5, 1)
    assert reader.link_types == {LINKTYPE_ETHERNET: 2, LINKTYPE_RAW: 1, LINKTYPE_LINUX_SLL2: 1}


@given(
    packets=st.lists(st.sampled_from(PACKETS), max_size=30),
    linktype=st.sampled_from(LINK_TYPES),
    flavour=st.sampled_from(FLAVOURS),
    batch_size=st.integers(1, 8),
)
def test_reader_returns_exactly_the_packets_written(
    tmp_path_factory: pytest.TempPathFactory,
    packets: list[bytes],
    linktype: int,
    flavour: tuple[str, dict[str, bool]],
    batch_size: int,
) -> None:
    fmt, options = flavour
    data = capture(fmt, linktype, [encapsulate(linktype, p) for p in packets], **options)
    path = write(tmp_path_factory.mktemp("prop"), data)
    got, reader = read_all(path, batch_size)
    assert got == packets
    assert reader.batches == -(-len(packets) // batch_size)


# ---- streaming ----


def test_a_large_capture_is_streamed_in_bounded_batches(tmp_path: Path) -> None:
    count = 50_000
    packet = PACKETS[0]
    record = struct.pack("<IIII", 1_700_000_000, 0, len(packet), len(packet)) + packet
    header = pcap_bytes([], LINKTYPE_RAW)
    path = write(tmp_path, header + record * count)
    reader = CaptureReader(path)
    batches = 0
    total = 0
    for buffer, lengths in reader:
        batches += 1
        total += len(lengths)
        assert len(lengths) <= 1024
        assert len(buffer) == sum(lengths)
    assert (total, reader.ip_packets, reader.batches, batches) == (count, count, 49, 49)
    assert reader.position == len(header) + len(record) * count

    small = CaptureReader(path, batch_size=100_000, batch_bytes=64 * 1024)
    sizes = [len(lengths) for _, lengths in small]
    assert sum(sizes) == count
    assert len(sizes) > 1
    assert max(sizes) * len(packet) <= 64 * 1024


def test_batch_size_must_be_positive(tmp_path: Path) -> None:
    path = write(tmp_path, pcap_bytes([PACKETS[0]]))
    with pytest.raises(ValueError, match="at least 1"):
        CaptureReader(path, 0)


# ---- errors ----


def test_truncated_capture_yields_the_packets_before_the_cut_then_raises(tmp_path: Path) -> None:
    frames = [ethernet_frame(PACKETS[i % 4]) for i in range(10)]
    data = pcap_bytes(frames)
    record_sizes = [16 + len(f) for f in frames]
    cut_record = 6
    start = 24 + sum(record_sizes[:cut_record])
    path = write(tmp_path, data[: start + 20])

    reader = CaptureReader(path)
    packets: list[bytes] = []
    for buffer, lengths in itertools.islice(reader, 1):  # everything before the cut fits in one batch
        packets += split(buffer, lengths)
    with pytest.raises(CaptureError) as caught:
        next(reader)
    assert packets == [PACKETS[i % 4] for i in range(cut_record)]
    err = caught.value
    assert (err.kind, err.offset) == ("truncated", start)
    assert str(err) == (
        f"{path}: truncated capture: the record at byte offset {start} is cut short by the end of the file "
        f"at byte {start + 20}"
    )
    assert list(reader) == []  # exhausted after the error

    summary = summarize_capture(path)
    assert (summary.frames, summary.parsed_packets, summary.error_kind) == (
        cut_record,
        cut_record,
        "truncated",
    )
    assert summary.error == str(err)


def test_truncated_pcapng(tmp_path: Path) -> None:
    data = pcapng_bytes([PACKETS[0], PACKETS[1], PACKETS[2]], [LINKTYPE_RAW])
    summary = summarize_capture(write(tmp_path, data[:-5], "cut.pcapng"))
    assert (summary.ip_packets, summary.error_kind) == (2, "truncated")


def test_corrupt_pcapng_block_after_good_ones(tmp_path: Path) -> None:
    data = pcapng_bytes([PACKETS[0]], [LINKTYPE_RAW]) + struct.pack("<III", 6, 4, 4)
    summary = summarize_capture(write(tmp_path, data, "bad.pcapng"))
    assert (summary.ip_packets, summary.error_kind) == (1, "corrupt")
    assert "corrupt capture at byte offset" in (summary.error or "")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            b"hello, this is a text file\n",
            'it starts with 68 65 6c 6c 6f 2c 20 74 68 69 73 20 69 73 20 61 ("hello, t',
        ),
        (b"PK\x03\x04" + b"\0" * 40, "it starts with 50 4b 03 04"),
        (b"", "the file is empty"),
        (b"\xd4\xc3", "it starts with d4 c3"),
    ],
)
def test_not_a_capture(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = write(tmp_path, data, "notes.txt")
    with pytest.raises(CaptureError) as caught:
        CaptureReader(path)
    err = caught.value
    assert isinstance(err, ValueError)
    assert isinstance(err, VpnPacketError)
    assert err.kind == "not_a_capture"
    assert str(err).startswith(f"{path}: not a pcap or pcapng capture: ")
    assert fragment in str(err)
    with pytest.raises(CaptureError):
        summarize_capture(path)


def test_truncated_file_header(tmp_path: Path) -> None:
    path = write(tmp_path, pcap_bytes([])[:10])
    with pytest.raises(CaptureError, match="ends inside its header, after 10 bytes") as caught:
        CaptureReader(path)
    assert caught.value.kind == "truncated_header"


def test_empty_capture_reads_fine_and_is_no_error(tmp_path: Path) -> None:
    """A valid capture without packet records is an answer (no packets), not a failure (issue 22)."""
    for data in (pcap_bytes([]), pcapng_bytes([], [LINKTYPE_RAW])):
        packets, reader = read_all(write(tmp_path, data))
        assert (packets, reader.frames, reader.batches) == ([], 0, 0)
        summary = summarize_capture(tmp_path / "capture.pcap")
        assert (summary.frames, summary.destinations) == (0, {})
        assert (summary.error, summary.error_kind) == (None, None)


def test_frames_of_which_none_is_readable_say_why(tmp_path: Path) -> None:
    """Frames that are all too short, of an unknown link type or malformed IP: an error, with the counts."""
    path = write(tmp_path, pcap_bytes([b"\x45\x00", b"\x70" + b"\0" * 30], LINKTYPE_RAW))
    summary = summarize_capture(path)
    assert (summary.frames, summary.malformed_packets, summary.error_kind) == (2, 2, "no_readable_frames")
    assert summary.error == f"{path}: none of its 2 frames could be read (malformed IP packets 2)"
    path = write(tmp_path, pcap_bytes([b"\0" * 10], 147))  # LINKTYPE_USER0: not one this reader strips
    summary = summarize_capture(path)
    assert summary.error == f"{path}: none of its 1 frames could be read (unsupported link type 1)"
    # One readable frame (an ARP frame is read fine, it just carries no IP) is enough.
    path = write(tmp_path, pcap_bytes([b"\0" * 28], 1))
    assert summarize_capture(path).error is None


def test_missing_file_and_directory_are_os_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pcap"
    with pytest.raises(FileNotFoundError) as caught:
        CaptureReader(missing)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOENT, str(missing))
    assert caught.value.strerror == "No such file or directory"
    with pytest.raises(IsADirectoryError):
        CaptureReader(tmp_path)


# ---- summary ----


def test_summary_numbers_are_exact(tmp_path: Path) -> None:
    web = [ipv4_packet("10.8.0.2", "10.0.0.1", TCP, 40000 + i, 80, b"x" * (10 * i)) for i in range(3)]
    dns = [ipv6_packet("fd00::2", "2001:db8::1", UDP, 5000, 53, b"q" * 20) for _ in range(2)]
    ping = ipv4_packet("10.8.0.2", "10.0.0.9", ICMP, transport=icmp_echo())
    # A non-first fragment to 10.0.0.1: no ports, so its key is the bare address.
    fragment = ipv4_packet("10.8.0.2", "10.0.0.1", UDP, transport=b"y" * 100, fragment_offset=100)
    v6_fragment = ipv6_packet(
        "fd00::2",
        "2001:db8::1",
        UDP,
        transport=b"z" * 16,
        extension_headers=[ExtensionHeader(FRAGMENT, 8, 5)],
    )
    esp = ipv4_packet("10.8.0.3", "203.0.113.250", 50, transport=b"\0\0\x10\0" + b"e" * 60)
    bad_ihl = bytes([0x43]) + b"\0" * 39
    bad_version = bytes([0x50]) + b"\0" * 39
    frames = [ethernet_frame(p) for p in [*web, *dns, ping, fragment, v6_fragment, esp, bad_ihl, bad_version]]
    frames.insert(3, arp_frame())
    summary = summarize_capture(write(tmp_path, pcap_bytes(frames)))
    assert (summary.frames, summary.ip_packets, summary.non_ip_frames) == (12, 11, 1)
    assert (summary.parsed_packets, summary.malformed_packets) == (9, 2)
    assert summary.malformed_by_reason == {"invalid_ihl": 1, "unsupported_version": 1}
    assert summary.ip_bytes == sum(len(f) - 14 for f in frames if f[12:14] != b"\x08\x06")
    view = {key: (s.packets, s.bytes, sorted(s.protocols)) for key, s in summary.destinations.items()}
    assert view == {
        "10.0.0.1:80": (3, sum(map(len, web)), [TCP]),
        "[2001:db8::1]:53": (2, 2 * len(dns[0]), [UDP]),
        "10.0.0.9": (1, len(ping), [ICMP]),
        "10.0.0.1": (1, len(fragment), [UDP]),
        "2001:db8::1": (1, len(v6_fragment), [UDP]),
        "203.0.113.250": (1, len(esp), [50]),
    }
    assert [key for key, _ in summary.top(2)] == ["10.0.0.1:80", "[2001:db8::1]:53"]
    assert summary.link_types == {LINKTYPE_ETHERNET: 12}
    as_dict = summary.to_dict(top=1)
    assert as_dict["destination_count"] == 6
    assert as_dict["destinations"] == [
        {
            "destination": "10.0.0.1:80",
            "packets": 3,
            "bytes": sum(map(len, web)),
            "protocols": ["TCP"],
            "protocol_numbers": [6],
        }
    ]
    assert as_dict["link_types"] == [{"linktype": 1, "name": "ETHERNET", "frames": 12, "encapsulations": {}}]
    assert (as_dict["encapsulations"], as_dict["undecoded_blocks"], as_dict["compression"]) == ({}, [], None)
    assert as_dict["error"] is None


def test_protocol_names() -> None:
    assert [protocol_name(p) for p in (1, 6, 17, 50, 58, 253)] == [
        "ICMP",
        "TCP",
        "UDP",
        "ESP",
        "ICMPv6",
        "253",
    ]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_sample_capture_summary_matches_what_was_written(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"sample.{fmt}"
    with path.open("wb") as out:
        sample = write_sample_capture(out, packets=3000, fmt=fmt, seed=7)
    summary = summarize_capture(path)
    assert summary.format == fmt
    assert summary.frames == sample.frames == 3000
    assert summary.non_ip_frames == sample.arp_frames > 0
    assert summary.ip_packets == sample.ip_packets
    assert summary.malformed_packets == sample.malformed_packets > 0
    assert sample.fragments > 0
    assert sample.extension_header_packets > 0
    assert summary.link_types == sample.link_types
    assert 150 <= len(summary.destinations) <= 400
    protocols = set().union(*(s.protocols for s in summary.destinations.values()))
    assert {1, 6, 17, 50, 58} <= protocols
    # Deterministic for a seed.
    again = io.BytesIO()
    write_sample_capture(again, packets=3000, fmt=fmt, seed=7)
    assert again.getvalue() == path.read_bytes()


def test_pcap_writer_records_snaplen_cut(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = PcapWriter(out, LINKTYPE_RAW, snaplen=64)
    writer.write(PACKETS[0][:20], original_length=len(PACKETS[0]))
    packets, _ = read_all(write(tmp_path, out.getvalue()))
    assert packets == [PACKETS[0][:20]]
    assert summarize_capture(tmp_path / "capture.pcap").destinations["10.0.0.1"].packets == 1
