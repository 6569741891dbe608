"""`vpn-packet demo`: two nodes on loopback, a verified workload through the real transport (no root)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, Subcommand, positive_int
from vpn_packet.errors import UsageError

if TYPE_CHECKING:
    from vpn_packet.node.demo import DemoResult

__all__ = ["COMMAND"]


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--packets", metavar="N", type=positive_int, default=200_000, help="packets (200000)")
    parser.add_argument(
        "--destinations",
        metavar="N",
        type=positive_int,
        default=300,
        help="destinations (default 300, max 60000)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext and unauthenticated, for comparison (default: TLS 1.3 with throwaway keys)",
    )
    parser.add_argument(
        "--both-ways",
        action="store_true",
        help="B sends the same amount to A at the same time (verified too)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the workload (default 1)")


def _print_report(result: DemoResult, console: Any) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    workers = Table(title="busiest workers (node A)", box=box.SIMPLE_HEAVY)
    workers.add_column("destination", no_wrap=True)
    workers.add_column("packets", justify="right")
    workers.add_column("bytes", justify="right")
    workers.add_column("errors", justify="right")
    for key, n, size, errors in result.top_workers:
        workers.add_row(escape(key), f"{n:,}", f"{size:,}", f"{errors:,}")
    console.print(workers)

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column()
    mode = "TLS 1.3, keys" if result.secure else "PLAINTEXT, unauthenticated"
    way = "A -> B and B -> A" if result.both_ways else "A -> B"
    summary.add_row("transport", mode, f"{result.streams_created} stream(s) {way}")
    summary.add_row("destinations", f"{result.destinations:,}", "IPv4 + IPv6, TCP + UDP, 40..1400 bytes")
    summary.add_row("sent", f"{result.sent_accepted:,}", f"of {result.packets:,}")
    summary.add_row("received", f"{result.received:,}", f"{result.received_bytes:,} bytes")
    summary.add_row(
        "throughput",
        f"{result.pps:,.0f} pps",
        f"{result.mbps:,.1f} Mbit/s (transfer {result.transfer_time:.2f} s; "
        f"building packets {result.generate_time:.2f} s)",
    )
    checks = f"corrupt {result.corrupt:,}, out of order {result.out_of_order:,}, missing {result.missing:,}"
    summary.add_row("verified", "ok" if result.ok else "FAILED", checks)
    dropped = {reason: n for reason, n in result.drops.items() if n}
    summary.add_row(
        "drops", f"{sum(dropped.values()):,}", ", ".join(f"{r} {n:,}" for r, n in dropped.items())
    )
    console.print(summary)


def _run_demo_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vpn_packet.node.demo import run_demo

    if args.destinations > 60000:
        raise UsageError(f"--destinations: at most 60000, got {args.destinations}")
    console = Console(
        file=sys.stdout, highlight=False, emoji=False, width=None if sys.stdout.isatty() else 110
    )
    mode = "TLS 1.3 (throwaway keys)" if not args.insecure else "plaintext TCP (--insecure)"
    way = "node A <-> node B (each way)" if args.both_ways else "node A -> node B"
    console.print(
        f"vpn-packet demo: {way} over loopback {mode}, {args.packets:,} packets to "
        f"{args.destinations:,} destinations (seed {args.seed})"
    )
    with Progress(
        TextColumn("[bold]delivered"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("delivered", total=args.packets * (2 if args.both_ways else 1))

        def progress(received: int, total: int) -> None:
            bar.update(task, completed=received, total=total)

        result = asyncio.run(
            run_demo(
                args.packets,
                args.destinations,
                secure=not args.insecure,
                seed=args.seed,
                both_ways=args.both_ways,
                progress=progress,
            )
        )
    _print_report(result, console)
    if result.ok:
        console.print(f"OK: all {result.packets:,} packets arrived intact and in order per destination")
        return EXIT_OK
    console.print(
        f"FAILED: {result.packets - result.received:,} of {result.packets:,} packets lost, "
        f"{result.corrupt:,} corrupt, {result.out_of_order:,} out of order"
    )
    return EXIT_FAILED


COMMAND = Subcommand(
    name="demo",
    help="run two nodes on loopback and push a verified workload through the real transport (no root)",
    description=(
        "Starts node A and node B on 127.0.0.1 (ephemeral ports, no root, no configuration) and sends\n"
        "a mixed workload from A to B through the dispatcher, the stream pool and TLS 1.3 with throwaway\n"
        "keys (plaintext with --insecure, for comparison): hundreds of destinations, IPv4 and IPv6, TCP\n"
        "and UDP, 40 to 1400 bytes; with\n"
        "--both-ways B sends as much to A at the same time. The receiving side checks every packet:\n"
        "intact, in order per destination, none missing. Exit status 0 when all arrived, else 1."
    ),
    add_arguments=_demo_arguments,
    run=_run_demo_command,
)
