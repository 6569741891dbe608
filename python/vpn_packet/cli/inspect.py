"""`vpn-packet inspect FILE`: a pcap/pcapng capture summarised per destination (table or JSON).

FILE may be gzip-compressed, or `-` for standard input. A capture from which no frame could be read is not a
silent zero: the command says why and exits with `EXIT_FAILED`. A valid capture without packets is an answer:
the command says so and exits with `EXIT_OK`.
"""

from __future__ import annotations

import argparse
import sys

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, PROG, Subcommand, non_negative_int

TYPE_CHECKING = False  # not `typing`'s: this command's start-up time is measured against tshark
if TYPE_CHECKING:
    from vpn_packet.capture import CaptureSummary

__all__ = ["COMMAND"]

_DEFAULT_TOP = 20


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file",
        metavar="FILE",
        # a str, not a pathlib.Path: the command does not load pathlib (its start-up time is measured)
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


def _columns(rows: list[list[str]], right: set[int], gap: str = "  ") -> list[str]:
    """`rows` as lines of aligned columns (those in `right` right-justified), trailing blanks cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        gap.join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _print_table(summary: CaptureSummary, top: int) -> None:
    """The table as plain aligned text. Not `rich`: loading it cost a fifth of the whole command's time
    (issue 22: `inspect` is a start-up race against tshark), and a column layout needs none of it."""
    ranked = summary.top(top or None)
    count = len(summary.destinations)
    shown = f"top {len(ranked)} of {count:,}" if len(ranked) < count else f"{count:,}"
    out = [f"{_source_label(summary)}: {summary.format_detail}, {shown} destinations", ""]
    rows = [["#", "destination", "packets", "bytes", "protocols"]]
    rows += [
        [str(rank), key, f"{stats.packets:,}", f"{stats.bytes:,}", " ".join(stats.protocol_names())]
        for rank, (key, stats) in enumerate(ranked, 1)
    ]
    lines = _columns(rows, right={0, 2, 3})
    rule = "-" * max(len(line) for line in lines)
    out += [" " + lines[0], " " + rule, *(" " + line for line in lines[1:]), ""]

    skipped = (
        f"non-IP {summary.non_ip_frames:,}, too short for their link header {summary.short_frames:,}, "
        f"unsupported link type {summary.unsupported_link_frames:,}"
    )
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(summary.malformed_by_reason.items()))
    links = ", ".join(f"{_link_label(link)} {n:,}" for link, n in sorted(summary.link_types.items()))
    totals = [
        ["frames", f"{summary.frames:,}", skipped],
        ["IP packets", f"{summary.ip_packets:,}", f"{summary.ip_bytes:,} bytes"],
        ["parsed", f"{summary.parsed_packets:,}", ""],
        ["malformed", f"{summary.malformed_packets:,}", reasons],
        ["link types", "", links or "none"],
    ]
    if summary.encapsulations:
        layers = ", ".join(f"{name} {n:,}" for name, n in sorted(summary.encapsulations.items()))
        totals.append(["encapsulations", "", layers])
    if summary.format == "pcapng":
        from vpn_packet.capture import block_type_label

        blocks = ", ".join(
            f"{block_type_label(kind)} {n:,}" for kind, n in sorted(summary.undecoded_blocks.items())
        )
        totals.append(["blocks not decoded", f"{sum(summary.undecoded_blocks.values()):,}", blocks])
    out += _columns(totals, right={1})
    sys.stdout.write("\n".join(out) + "\n")


def _run_inspect(args: argparse.Namespace) -> int:
    from vpn_packet.capture import NO_FRAMES, NO_READABLE_FRAMES, summarize_capture

    summary = summarize_capture(args.file)
    if args.json:
        import json  # only here: the table does not pay for it

        # One string, one write: `json.dump` to a stream writes it in thousands of small pieces.
        sys.stdout.write(json.dumps(summary.to_dict(args.top or None), indent=2) + "\n")
    if summary.error_kind in (NO_FRAMES, NO_READABLE_FRAMES) or (summary.frames == 0 and summary.error):
        # Nothing could be read: a table of zeros would look like an answer.
        print(f"{PROG} inspect: error: {summary.error}", file=sys.stderr)
        return EXIT_FAILED
    if summary.frames == 0:
        # A valid capture without a single packet record: an answer, not a failure.
        if not args.json:
            detail = f"{summary.format_detail}, no packets: the capture holds no packet records"
            print(f"{_source_label(summary)}: {detail}")
        return EXIT_OK
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
        "summarised up to that point, with a warning on stderr (exit status 0). A valid capture with no\n"
        "packets says so (exit status 0). One whose frames are all unreadable, or that holds only blocks\n"
        "this reader does not decode, says why on stderr (exit status 1). Byte offsets in messages about a\n"
        "gzip-compressed capture count decompressed bytes."
    ),
    add_arguments=_inspect_arguments,
    run=_run_inspect,
)
