"""`vpn-packet sample-capture FILE`: writes a realistic synthetic capture, for trying `inspect`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_OK, Subcommand, positive_int

__all__ = ["COMMAND"]


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", type=Path, help="where to write the capture")
    parser.add_argument(
        "--packets", metavar="N", type=positive_int, default=2000, help="number of frames (default 2000)"
    )
    parser.add_argument(
        "--format",
        choices=("pcap", "pcapng"),
        default=None,
        help="file format (default: pcapng for a .pcapng file name, else pcap)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed: the same seed writes the same file")


def _run_sample(args: argparse.Namespace) -> int:
    from vpn_packet.pcap_writer import write_sample_capture

    fmt = args.format or ("pcapng" if args.file.suffix.lower() == ".pcapng" else "pcap")
    with args.file.open("wb") as out:
        sample = write_sample_capture(out, packets=args.packets, fmt=fmt, seed=args.seed)
    print(
        f"wrote {args.file} ({fmt}): {sample.frames:,} frames, {sample.ip_packets:,} IP packets "
        f"({sample.malformed_packets} malformed, {sample.fragments} fragments), "
        f"{sample.arp_frames} ARP frames"
    )
    return EXIT_OK


COMMAND = Subcommand(
    name="sample-capture",
    help="write a realistic synthetic capture (for trying `inspect`)",
    description=(
        "Writes mixed IPv4/IPv6 traffic (TCP, UDP, ICMP, ESP) to about 300 destinations, with some\n"
        "fragments, IPv6 extension headers, VLAN tags, a few malformed packets and a few ARP frames.\n"
        "Try: vpn-packet sample-capture demo.pcapng && vpn-packet inspect demo.pcapng"
    ),
    add_arguments=_sample_arguments,
    run=_run_sample,
)
