"""The `vpn-packet` command: `inspect` and `sample-capture`, exit statuses and error lines."""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vpn_packet.cli import main
from vpn_packet.testutil.packets import ICMP, TCP, UDP, icmp_echo, ipv4_packet, ipv6_packet
from vpn_packet.testutil.pcap import (
    ETHERTYPE_QINQ,
    LINKTYPE_RAW,
    PcapNgWriter,
    arp_frame,
    ethernet_frame,
    mpls_frame,
    pcap_bytes,
    pppoe_frame,
)

WEB = ipv4_packet("10.8.0.2", "10.0.0.1", TCP, 40000, 443, b"x" * 100)
DNS = ipv6_packet("fd00::2", "2001:db8::53", UDP, 5000, 53, b"q" * 30)
PING = ipv4_packet("10.8.0.2", "192.0.2.9", ICMP, transport=icmp_echo())


@pytest.fixture
def capture_file(tmp_path: Path) -> Path:
    """3 packets to 10.0.0.1:443, 2 to [2001:db8::53]:53, 1 ping, 1 ARP frame, 1 malformed packet."""
    frames = [ethernet_frame(p) for p in [WEB, DNS, WEB, PING, WEB, DNS]]
    frames += [arp_frame(), ethernet_frame(bytes([0x45, 0, 0, 20]))]
    path = tmp_path / "traffic.pcap"
    path.write_bytes(pcap_bytes(frames))
    return path


def test_inspect_prints_a_table_of_destinations(
    capture_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(capture_file)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    web = next(line for line in lines if "10.0.0.1:443" in line)
    dns = next(line for line in lines if "[2001:db8::53]:53" in line)
    ping = next(line for line in lines if "192.0.2.9" in line)
    assert lines.index(web) < lines.index(dns) < lines.index(ping)  # sorted by packets
    assert web.split()[-3:] == ["3", f"{3 * len(WEB):,}", "TCP"]
    assert dns.split()[-1] == "UDP"
    assert ping.split()[-1] == "ICMP"
    totals = totals_of(out)
    assert totals["frames"] == ("8", "non-IP 1, too short for their link header 0, unsupported link type 0")
    assert totals["IP packets"] == ("7", f"{3 * len(WEB) + 2 * len(DNS) + len(PING) + 4:,} bytes")
    assert totals["parsed"] == ("6", "")
    assert totals["malformed"] == ("1", "truncated 1")
    assert totals["link types"] == ("", "ETHERNET (1) 8")


def totals_of(out: str) -> dict[str, tuple[str, str]]:
    """The totals under the table: label -> (number, details)."""
    labels = "frames|IP packets|parsed|malformed|link types|encapsulations|blocks not decoded"
    pattern = re.compile(rf"^({labels}) +([\d,]*) *(.*?)\s*$")
    return {m[1]: (m[2], m[3]) for m in map(pattern.match, out.splitlines()) if m}


def test_inspect_top_limits_the_table(capture_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(capture_file), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "10.0.0.1:443" in out
    assert "2001:db8::53" not in out
    assert f"{capture_file}: pcap (little-endian, microsecond), top 1 of 3 destinations" in out


def test_inspect_json(capture_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(capture_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["frames"], data["ip_packets"], data["parsed_packets"]) == (8, 7, 6)
    assert (data["malformed_packets"], data["malformed_by_reason"]) == (1, {"truncated": 1})
    assert data["non_ip_frames"] == 1
    assert [d["destination"] for d in data["destinations"]] == [
        "10.0.0.1:443",
        "[2001:db8::53]:53",
        "192.0.2.9",
    ]
    assert data["destinations"][0] == {
        "destination": "10.0.0.1:443",
        "packets": 3,
        "bytes": 3 * len(WEB),
        "protocols": ["TCP"],
        "protocol_numbers": [6],
    }
    assert data["format"] == "pcap"
    assert data["error"] is None


def test_not_a_capture_is_exit_2_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some notes\n")
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(
        f"vpn-packet inspect: error: {path}: not a pcap or pcapng capture: it starts with 6a 75"
    )


def test_missing_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pcap"
    assert main(["inspect", str(missing)]) == 2
    assert capsys.readouterr().err == f"vpn-packet inspect: error: {missing}: No such file or directory\n"


def test_truncated_capture_prints_the_summary_and_a_warning(
    capture_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = capture_file.read_bytes()
    capture_file.write_bytes(data[:-10])
    assert main(["inspect", str(capture_file)]) == 0
    out, err = capsys.readouterr()
    assert "10.0.0.1:443" in out
    assert err.startswith("vpn-packet inspect: warning: ")
    assert "truncated capture: the record at byte offset" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["inspect"],
        ["inspect", "x.pcap", "--top", "-1"],
        ["frobnicate"],
        ["sample-capture", "x", "--packets", "0"],
    ],
)
def test_usage_errors_are_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: vpn-packet" in capsys.readouterr().err


def test_help_is_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out
    assert "sample-capture" in out


@pytest.mark.parametrize(
    ("name", "magic"), [("demo.pcapng", b"\x0a\x0d\x0d\x0a"), ("demo.pcap", b"\xd4\xc3\xb2\xa1")]
)
def test_sample_capture_then_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, magic: bytes
) -> None:
    path = tmp_path / name
    assert main(["sample-capture", str(path), "--packets", "1500"]) == 0
    assert path.read_bytes()[:4] == magic
    assert "1,500 frames" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["frames"] == 1500
    assert data["malformed_packets"] > 0
    assert data["non_ip_frames"] > 0
    assert data["destination_count"] > 100


def test_sample_capture_format_flag_wins_over_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "demo.pcap"
    assert main(["sample-capture", str(path), "--packets", "60", "--format", "pcapng"]) == 0
    assert path.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"


def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The real process: exit status and a single error line, no traceback."""
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "vpn_packet.cli", "inspect", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"vpn-packet inspect: error: {bad}: not a pcap or pcapng capture")
    assert "Traceback" not in proc.stderr


def test_ipv6_keys_are_printed_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bracketed IPv6 keys are neither rich markup (`[fd00:b::1]` is a valid tag name) nor emoji (`:b:`)."""
    packet = ipv6_packet("fd00::2", "fd00:b::1", UDP, 5000, 853)
    path = tmp_path / "v6.pcap"
    path.write_bytes(pcap_bytes([ethernet_frame(packet)]))
    assert main(["inspect", str(path)]) == 0
    assert "[fd00:b::1]:853" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["vpn_packet", "vpn_packet.cli"])
def test_python_dash_m_lists_every_subcommand(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ["inspect", "sample-capture", "demo", "node"]:
        assert command in result.stdout


# ---- no silent zero, encapsulations, blocks not decoded, gzip and standard input ----


def test_a_valid_capture_without_packets_is_exit_0_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(pcap_bytes([]))
    assert main(["inspect", str(empty)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert (
        out
        == f"{empty}: pcap (little-endian, microsecond), no packets: the capture holds no packet records\n"
    )
    assert main(["inspect", str(empty), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["frames"], data["error"]) == (0, None)


def test_frames_of_which_none_is_readable_are_exit_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "garbage.pcap"
    path.write_bytes(pcap_bytes([b"\x45\x00", b"\x45\x00\x00"], LINKTYPE_RAW))
    assert main(["inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"vpn-packet inspect: error: {path}: none of its 2 frames could be read (malformed IP packets 2)\n"
    )


def test_a_capture_of_blocks_not_decoded_is_exit_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    # Only blocks the reader does not decode: the JSON is still printed, with the reason.
    out_ng = io.BytesIO()
    writer = PcapNgWriter(out_ng)
    writer.add_interface(LINKTYPE_RAW)
    writer.write_block(0x42424242, b"x" * 8)
    blocks = tmp_path / "blocks.pcapng"
    blocks.write_bytes(out_ng.getvalue())
    assert main(["inspect", str(blocks), "--json"]) == 1
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert (data["frames"], data["error"]["kind"]) == (0, "no_frames")
    assert data["undecoded_blocks"] == [{"block_type": 0x42424242, "name": None, "blocks": 1}]
    assert err.startswith(f"vpn-packet inspect: error: {blocks}: no frame could be read: ")
    assert "unknown (0x42424242) 1" in err


def test_a_capture_corrupt_at_its_first_record_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "corrupt.pcap"
    path.write_bytes(pcap_bytes([]) + struct.pack("<IIII", 0, 0, 1_400_000_000, 1_400_000_000))
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"vpn-packet inspect: error: {path}: corrupt capture at byte offset 24: the record claims 1400000000 "
        "bytes, more than 262144 (the largest record this reader accepts)\n"
    )


def test_packet_blocks_encapsulations_and_blocks_not_decoded_in_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_ng = io.BytesIO()
    writer = PcapNgWriter(out_ng)
    writer.add_interface(1)
    for _ in range(3):
        writer.write_packet_block(mpls_frame(WEB, [16, 17]))
    writer.write_packet_block(pppoe_frame(DNS, vlans=[(ETHERTYPE_QINQ, 5), 6]))
    writer.write_block(4, b"\0\0\0\0")
    path = tmp_path / "old.pcapng"
    path.write_bytes(out_ng.getvalue())
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    totals = totals_of(out)
    assert totals["frames"][0] == "4"
    assert totals["encapsulations"] == ("", "mpls 3, pppoe 1, qinq 1, vlan 1")
    assert totals["blocks not decoded"] == ("1", "Name Resolution (4) 1")
    assert "10.0.0.1:443" in out


def test_gzip_capture_on_standard_input_end_to_end(tmp_path: Path) -> None:
    """The real process reading `-`: a gzip-compressed capture piped in."""
    data = gzip.compress(pcap_bytes([ethernet_frame(p) for p in [WEB, DNS, WEB]]))
    proc = subprocess.run(
        [sys.executable, "-m", "vpn_packet.cli", "inspect", "-", "--json"],
        input=data,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["path"], summary["compression"], summary["frames"]) == ("-", "gzip", 3)
    assert summary["destinations"][0]["destination"] == "10.0.0.1:443"

    proc = subprocess.run(
        [sys.executable, "-m", "vpn_packet.cli", "inspect", "-"],
        input="",
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr == "vpn-packet inspect: error: <stdin>: not a pcap or pcapng capture: the file is empty\n"
    )
