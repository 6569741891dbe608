"""The `vpn-packet` command.

Each subcommand is a `Subcommand`: a name, a help line, a function that adds its arguments and a function
that runs it and returns the exit status. `inspect` and `sample-capture` are defined here; another module
adds one by calling `register(Subcommand(...))` at import and being listed in `EXTENSION_MODULES` (imported
when the parser is built, so `vpn-packet inspect` does not pay for what `node` imports).

Exit status: 0 success, 2 bad usage or an unreadable input file (one line on stderr, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from vpn_packet._native import link_type_name
from vpn_packet.capture import CaptureError, CaptureSummary, summarize_capture

__all__ = ["EXTENSION_MODULES", "Subcommand", "UsageError", "build_parser", "main", "register"]

PROG = "vpn-packet"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A bad argument or input noticed by a subcommand: reported on one line, exit status 2."""


@dataclass(frozen=True, slots=True)
class Subcommand:
    """One `vpn-packet` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


_SUBCOMMANDS: dict[str, Subcommand] = {}

# Modules that register more subcommands when imported (for instance the node and demo commands).
EXTENSION_MODULES: tuple[str, ...] = ("vpn_packet.demo", "vpn_packet.tun_node")


def register(command: Subcommand) -> Subcommand:
    """Adds (or replaces) a subcommand."""
    _SUBCOMMANDS[command.name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    for module in EXTENSION_MODULES:
        import_module(module)
    parser = argparse.ArgumentParser(
        prog=PROG, description="The packet layer of a VPN data plane: tools around the vpn-packet library."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _SUBCOMMANDS.values():
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
    return parser


def _error_line(exc: BaseException) -> str:
    """One line for an input error: `CaptureError` messages already name the file; `OSError` gets it."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `vpn-packet` with `argv` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = _SUBCOMMANDS[args.command]
    try:
        return command.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into something that stopped reading (`| head`): not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OK
    except (CaptureError, UsageError, OSError) as exc:
        print(f"{PROG} {command.name}: error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


# ---- inspect ----

_DEFAULT_TOP = 20


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", type=Path, help="a pcap or pcapng capture")
    parser.add_argument(
        "--top",
        metavar="N",
        type=_non_negative,
        default=None,
        help=f"show the N busiest destinations (0: all; default {_DEFAULT_TOP} in the table, all in --json)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _link_label(link: int) -> str:
    name = link_type_name(link)
    return f"{name} ({link})" if name else f"unsupported ({link})"


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
    console.print(Text(f"{summary.path}: {summary.format_detail}, {shown} destinations"), soft_wrap=True)
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
    console.print(totals)


def _run_inspect(args: argparse.Namespace) -> int:
    summary = summarize_capture(args.file)
    if args.json:
        json.dump(summary.to_dict(args.top or None), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(summary, _DEFAULT_TOP if args.top is None else args.top)
    if summary.error is not None:
        print(
            f"{PROG} inspect: warning: {summary.error} (the counts cover the packets before it)",
            file=sys.stderr,
        )
    return EXIT_OK


register(
    Subcommand(
        name="inspect",
        help="summarise a pcap/pcapng capture per destination",
        description=(
            "Reads a pcap or pcapng capture (Ethernet with VLAN tags, Linux cooked SLL/SLL2, raw IP, BSD\n"
            "loopback), parses every IP packet natively and prints a per-destination table (packets, bytes,\n"
            "protocols), the number of malformed packets by reason, and the frames skipped.\n\n"
            "A file that is not a capture, or cannot be opened, is an error (exit status 2). A capture that\n"
            "ends early (cut mid-record, as when it is still being written, or corrupt further on) is\n"
            "summarised up to that point, with a warning on stderr (exit status 0)."
        ),
        add_arguments=_inspect_arguments,
        run=_run_inspect,
    )
)


# ---- sample-capture ----


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", type=Path, help="where to write the capture")
    parser.add_argument(
        "--packets", metavar="N", type=_positive, default=2000, help="number of frames (default 2000)"
    )
    parser.add_argument(
        "--format",
        choices=("pcap", "pcapng"),
        default=None,
        help="file format (default: pcapng for a .pcapng file name, else pcap)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed: the same seed writes the same file")


def _run_sample(args: argparse.Namespace) -> int:
    from vpn_packet.testutil.pcap import write_sample_capture

    fmt = args.format or ("pcapng" if args.file.suffix.lower() == ".pcapng" else "pcap")
    with args.file.open("wb") as out:
        sample = write_sample_capture(out, packets=args.packets, fmt=fmt, seed=args.seed)
    print(
        f"wrote {args.file} ({fmt}): {sample.frames:,} frames, {sample.ip_packets:,} IP packets "
        f"({sample.malformed_packets} malformed, {sample.fragments} fragments), "
        f"{sample.arp_frames} ARP frames"
    )
    return EXIT_OK


register(
    Subcommand(
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
)


if __name__ == "__main__":
    # Run the imported module's main: subcommands (`node`, `demo`) register into `vpn_packet.cli`, which is a
    # different module object from this `__main__`.
    from vpn_packet.cli import main as _main

    sys.exit(_main())
