"""`vpn-packet inspect FILE`: a pcap/pcapng capture summarised per destination (table or JSON).

FILE may be gzip-compressed, or `-` for standard input. A capture from which no frame could be read is not a
silent zero: the command says why and exits with `EXIT_FAILED`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, PROG, Subcommand, non_negative_int

if TYPE_CHECKING:
    from vpn_packet.capture import CaptureSummary

__all__ = ["COMMAND"]

_DEFAULT_TOP = 20


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="a pcap or pcapng capture, possibly gzip-compressed; - reads standard input",
    )
    parser.add_argument(
        "--top",
        metavar="N",
        type=non_negative_int,
        default=None,
        help=f"show the N busiest destinations (0: all; default {_DEFAULT_TOP} in the table, all in --json)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _link_label(link: int) -> str:
    from vpn_packet._native import link_type_name

    name = link_type_name(link)
    return f"{name} ({link})" if name else f"unsupported ({link})"


def _source_label(summary: CaptureSummary) -> str:
    return "<stdin>" if summary.path == "-" else summary.path


def _print_table(summary: CaptureSummary, top: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(
        file=sys.stdout, highlight=False, emoji=False, width=None if sys.stdout.isatty() else 120
    )
    ranked = summary.top(top or None)
    count = len(summary.destinations)
    shown = f"top {len(ranked)} of {count:,}" if len(ranked) < count else f"{count:,}"
    console.print(
        Text(f"{_source_label(summary)}: {summary.format_detail}, {shown} destinations"), soft_wrap=True
    )
    table = Table(box=box.SIMPLE_HEAVY)
    table.add_column("#", justify="right", style="dim")
    table.add_column("destination", no_wrap=True)
    table.add_column("packets", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("protocols")
    for rank, (key, stats) in enumerate(ranked, 1):
        names = " ".join(stats.protocol_names())
        table.add_row(str(rank), Text(key), f"{stats.packets:,}", f"{stats.bytes:,}", names)
    console.print(table)

    totals = Table.grid(padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_column()
    skipped = (
        f"non-IP {summary.non_ip_frames:,}, too short for their link header {summary.short_frames:,}, "
        f"unsupported link type {summary.unsupported_link_frames:,}"
    )
    totals.add_row("frames", f"{summary.frames:,}", skipped)
    totals.add_row("IP packets", f"{summary.ip_packets:,}", f"{summary.ip_bytes:,} bytes")
    totals.add_row("parsed", f"{summary.parsed_packets:,}", "")
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(summary.malformed_by_reason.items()))
    totals.add_row("malformed", f"{summary.malformed_packets:,}", reasons)
    links = ", ".join(f"{_link_label(link)} {n:,}" for link, n in sorted(summary.link_types.items()))
    totals.add_row("link types", "", links or "none")
    if summary.encapsulations:
        layers = ", ".join(f"{name} {n:,}" for name, n in sorted(summary.encapsulations.items()))
        totals.add_row("encapsulations", "", layers)
    if summary.format == "pcapng":
        from vpn_packet.capture import block_type_label

        blocks = ", ".join(
            f"{block_type_label(kind)} {n:,}" for kind, n in sorted(summary.undecoded_blocks.items())
        )
        totals.add_row("blocks not decoded", f"{sum(summary.undecoded_blocks.values()):,}", blocks)
    console.print(totals)


def _run_inspect(args: argparse.Namespace) -> int:
    from vpn_packet.capture import summarize_capture

    summary = summarize_capture(args.file)
    if args.json:
        json.dump(summary.to_dict(args.top or None), sys.stdout, indent=2)
        sys.stdout.write("\n")
    if summary.frames == 0:
        # Nothing was read: a table of zeros would look like an answer.
        print(f"{PROG} inspect: error: {summary.error}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        _print_table(summary, _DEFAULT_TOP if args.top is None else args.top)
    if summary.error is not None:
        print(
            f"{PROG} inspect: warning: {summary.error} (the counts cover the packets before it)",
            file=sys.stderr,
        )
    return EXIT_OK


COMMAND = Subcommand(
    name="inspect",
    help="summarise a pcap/pcapng capture per destination",
    description=(
        "Reads a pcap or pcapng capture, plain or gzip-compressed, from a file or (FILE -) standard\n"
        "input: Ethernet (VLAN/QinQ tags, MPLS, PPPoE, LLC/SNAP, 802.1ah PBB), Linux cooked SLL/SLL2,\n"
        "raw IP, BSD loopback, PPP, Cisco HDLC. Parses every IP packet natively and prints a\n"
        "per-destination table (packets, bytes, protocols), the number of malformed packets by reason,\n"
        "the frames skipped, the encapsulations crossed and the pcapng blocks not decoded.\n\n"
        "A file that is not a capture, or cannot be opened, is an error (exit status 2). A capture that\n"
        "ends early (cut mid-record, as when it is still being written, or corrupt further on) is\n"
        "summarised up to that point, with a warning on stderr (exit status 0). A capture from which no\n"
        "frame could be read says why on stderr (exit status 1). Byte offsets in messages about a\n"
        "gzip-compressed capture count decompressed bytes."
    ),
    add_arguments=_inspect_arguments,
    run=_run_inspect,
)
