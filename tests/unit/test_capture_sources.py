"""Capture reading beyond the plain case: pcapng blocks the reader does not decode (counted by type) and the
obsolete Packet Block (decoded), corrupt record lengths (reported with their offset after the frames before
them), gzip-compressed captures and standard input. Every capture is written here by the testutil writers.
"""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vpn_packet.capture import CaptureError, CaptureReader, block_type_label, summarize_capture
from vpn_packet.testutil.packets import TCP, UDP, ipv4_packet, ipv6_packet
from vpn_packet.testutil.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_RAW,
    PcapNgWriter,
    ethernet_frame,
    pcap_bytes,
    pcapng_bytes,
)

V4 = ipv4_packet("10.8.0.2", "10.0.0.1", TCP, 40000, 443, b"x" * 40)
V6 = ipv6_packet("fd00::2", "2001:db8::53", UDP, 5000, 53, b"q" * 20)


def write(tmp_path: Path, data: bytes, name: str = "capture.pcapng") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def packets_of(reader: CaptureReader) -> list[bytes]:
    out: list[bytes] = []
    for buffer, lengths in reader:
        start = 0
        for length in lengths:
            out.append(buffer[start : start + length])
            start += length
    return out


# ---- pcapng: the Packet Block and blocks not decoded ----


@pytest.mark.parametrize("big_endian", [False, True])
def test_packet_blocks_are_decoded_like_enhanced_packet_blocks(tmp_path: Path, big_endian: bool) -> None:
    out = io.BytesIO()
    writer = PcapNgWriter(out, big_endian=big_endian)
    eth = writer.add_interface(LINKTYPE_ETHERNET)
    tun = writer.add_interface(LINKTYPE_RAW)
    for i in range(200):
        if i % 2:
            writer.write_packet_block(ethernet_frame(V4), interface=eth)
        else:
            writer.write_packet_block(V6, interface=tun, drops=i)
    reader = CaptureReader(write(tmp_path, out.getvalue()))
    assert packets_of(reader) == [V6, V4] * 100
    assert (reader.frames, reader.ip_packets, reader.undecoded_blocks) == (200, 200, {})
    assert reader.link_types == {LINKTYPE_ETHERNET: 100, LINKTYPE_RAW: 100}
    summary = summarize_capture(reader.path)
    assert (summary.frames, summary.error) == (200, None)
    assert summary.destinations["10.0.0.1:443"].packets == 100


@pytest.mark.parametrize("big_endian", [False, True])
def test_blocks_not_decoded_are_counted_by_type(tmp_path: Path, big_endian: bool) -> None:
    out = io.BytesIO()
    writer = PcapNgWriter(out, big_endian=big_endian)
    writer.add_interface(LINKTYPE_RAW)
    writer.write(V4)
    writer.write_block(4, b"\0\0\0\0")  # name resolution, end of records only
    for _ in range(3):
        writer.write_block(5, struct.pack(">I" if big_endian else "<I", 0) + b"\0" * 8)  # statistics
    writer.write_block(0x0BAD, b"\0\0\0\0custom")
    writer.write_block(0x42424242, b"who knows")
    writer.write(V6)
    summary = summarize_capture(write(tmp_path, out.getvalue()))
    assert (summary.frames, summary.ip_packets, summary.error) == (2, 2, None)
    assert summary.undecoded_blocks == {4: 1, 5: 3, 0x0BAD: 1, 0x42424242: 1}
    assert summary.to_dict()["undecoded_blocks"] == [
        {"block_type": 4, "name": "Name Resolution", "blocks": 1},
        {"block_type": 5, "name": "Interface Statistics", "blocks": 3},
        {"block_type": 0x0BAD, "name": "Custom", "blocks": 1},
        {"block_type": 0x42424242, "name": None, "blocks": 1},
    ]
    assert block_type_label(0x42424242) == "unknown (0x42424242)"
    assert block_type_label(2) == "Packet (2)"


def test_a_capture_of_blocks_not_decoded_only_says_so(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = PcapNgWriter(out)
    writer.add_interface(LINKTYPE_RAW)
    for _ in range(5):
        writer.write_block(0x0BAD, b"\0\0\0\0vendor data")
    path = write(tmp_path, out.getvalue())
    summary = summarize_capture(path)
    assert (summary.frames, summary.error_kind) == (0, "no_frames")
    assert summary.error == (
        f"{path}: no frame could be read: the capture holds only pcapng blocks this reader does not decode "
        "(Custom (2989) 5)"
    )


def test_a_packet_block_longer_than_its_block_is_corrupt_after_the_frames_before_it(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = PcapNgWriter(out)
    writer.add_interface(LINKTYPE_RAW)
    writer.write_packet_block(V4)
    offset = out.tell()
    writer.write_packet_block(V6, captured_length=4000)
    writer.write_packet_block(V4)
    summary = summarize_capture(write(tmp_path, out.getvalue()))
    assert (summary.frames, summary.ip_packets, summary.error_kind) == (1, 1, "corrupt")
    assert summary.error is not None
    assert (
        f"corrupt capture at byte offset {offset}: a Packet Block whose captured length 4000" in summary.error
    )


# ---- corrupt record lengths ----


def pcap_record(length: int, data: bytes = b"") -> bytes:
    return struct.pack("<IIII", 1_700_000_000, 0, length, length) + data


@pytest.mark.parametrize("claimed", [1_400_000_000, 3_900_000_000, 300_000])
def test_a_record_longer_than_the_maximum_is_corrupt_after_the_frames_before_it(
    tmp_path: Path, claimed: int
) -> None:
    good = pcap_bytes([V4, V6, V4], LINKTYPE_RAW)
    path = write(tmp_path, good + pcap_record(claimed, b"\x45" * 2000), "big.pcap")
    reader = CaptureReader(path)
    assert packets_of_until_error(reader) == [V4, V6, V4]
    summary = summarize_capture(path)
    assert (summary.frames, summary.ip_packets, summary.error_kind) == (3, 3, "record_too_large")
    assert summary.error == (
        f"{path}: corrupt capture at byte offset {len(good)}: the record claims {claimed} bytes, more than "
        "262144 (the largest record this reader accepts)"
    )


def packets_of_until_error(reader: CaptureReader) -> list[bytes]:
    """The packets before the error, which must come (then the reader is exhausted)."""
    out: list[bytes] = []
    failed = False
    try:
        for buffer, lengths in reader:
            out += [buffer[sum(lengths[:i]) : sum(lengths[: i + 1])] for i in range(len(lengths))]
    except CaptureError:
        failed = True
    assert failed
    assert list(reader) == []
    return out


@pytest.mark.parametrize("frames", [3, 20_000])
def test_a_captured_length_past_the_end_comes_after_the_frames_before_it(tmp_path: Path, frames: int) -> None:
    good = pcap_bytes([V4] * frames, LINKTYPE_RAW)
    path = write(tmp_path, good + pcap_record(60_000, b"\x45" * 100), "cut.pcap")
    summary = summarize_capture(path)
    assert (summary.frames, summary.parsed_packets, summary.error_kind) == (frames, frames, "truncated")
    assert summary.error == (
        f"{path}: truncated capture: the record at byte offset {len(good)} is cut short by the end of the "
        f"file at byte {len(good) + 116}"
    )


def test_a_cut_record_with_an_impossible_length_is_corrupt_not_truncated(tmp_path: Path) -> None:
    """A captured length above the packet's own length: a corrupt field pointing past the end, not a cut."""
    good = pcap_bytes([V4, V6], LINKTYPE_RAW)
    record = struct.pack("<IIII", 1_700_000_000, 0, 60_000, len(V4)) + V4
    path = write(tmp_path, good + record, "bad.pcap")
    summary = summarize_capture(path)
    assert (summary.frames, summary.ip_packets, summary.error_kind) == (2, 2, "corrupt")
    assert summary.error == (
        f"{path}: corrupt capture at byte offset {len(good)}: the record claims 60000 captured bytes of a "
        f"{len(V4)}-byte packet, and the file ends at byte {len(good) + len(record)}"
    )


# ---- gzip and standard input ----


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_gzip_compressed_captures_are_read(tmp_path: Path, fmt: str) -> None:
    frames = [ethernet_frame(p) for p in [V4, V6] * 3000]
    plain = pcap_bytes(frames) if fmt == "pcap" else pcapng_bytes(frames)
    path = write(tmp_path, gzip.compress(plain, compresslevel=1), f"capture.{fmt}.gz")
    reader = CaptureReader(path, 256)
    assert (reader.format, reader.compression) == (fmt, "gzip")
    assert reader.format_detail.endswith(", gzip-compressed")
    assert packets_of(reader) == [V4, V6] * 3000
    summary = summarize_capture(path)
    assert (summary.frames, summary.compression, summary.to_dict()["compression"]) == (6000, "gzip", "gzip")
    assert summarize_capture(write(tmp_path, plain, "plain")).compression is None


def test_a_cut_gzip_capture_gives_the_packets_before_the_cut(tmp_path: Path) -> None:
    compressed = gzip.compress(pcap_bytes([V4] * 20_000, LINKTYPE_RAW), compresslevel=1)
    path = write(tmp_path, compressed[: len(compressed) // 2], "cut.pcap.gz")
    summary = summarize_capture(path)
    assert 0 < summary.frames < 20_000
    assert summary.parsed_packets == summary.frames
    assert summary.error_kind == "truncated"
    assert summary.error is not None
    assert summary.error.startswith(f"{path}: truncated gzip stream: it ends after ")

    garbage = write(tmp_path, b"\x1f\x8b\x08\x00" + b"\xff" * 60, "bad.gz")
    with pytest.raises(CaptureError) as caught:
        CaptureReader(garbage)
    assert caught.value.kind == "corrupt"
    assert str(caught.value).startswith(
        f"{garbage}: corrupt gzip stream after 0 bytes of decompressed capture"
    )


def test_zstd_is_named_not_read(tmp_path: Path) -> None:
    path = write(tmp_path, b"\x28\xb5\x2f\xfd" + b"\0" * 20, "capture.pcap.zst")
    with pytest.raises(CaptureError, match="it looks zstd-compressed: decompress it first"):
        CaptureReader(path)


def read_stdin(data: bytes, code: str) -> str:
    """Runs `code` in a fresh interpreter with `data` on its standard input; returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.mark.parametrize("compress", [False, True])
def test_dash_reads_standard_input(compress: bool) -> None:
    data = pcap_bytes([ethernet_frame(V4)] * 5000 + [ethernet_frame(V6)])
    if compress:
        data = gzip.compress(data)
    code = (
        "from vpn_packet.capture import summarize_capture\n"
        "s = summarize_capture('-')\n"
        "print(s.frames, s.compression, s.destinations['10.0.0.1:443'].packets, s.error)\n"
    )
    assert read_stdin(data, code).split() == ["5001", "gzip" if compress else "None", "5000", "None"]


def test_standard_input_is_named_in_messages() -> None:
    code = (
        "from vpn_packet.capture import CaptureReader, CaptureError\n"
        "try:\n"
        "    CaptureReader('-')\n"
        "except CaptureError as exc:\n"
        "    print(exc)\n"
    )
    assert read_stdin(b"plain text", code).startswith(
        "<stdin>: not a pcap or pcapng capture: it starts with 70"
    )
