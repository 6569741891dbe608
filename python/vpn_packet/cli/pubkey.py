"""`vpn-packet pubkey FILE`: prints the public key string of a key file written by `genkey`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_OK, Subcommand

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", type=Path, help="a key file written by `vpn-packet genkey`")


def _run(args: argparse.Namespace) -> int:
    from vpn_packet.transport.identity import load_identity

    print(load_identity(args.file).public_key)
    return EXIT_OK


COMMAND = Subcommand(
    name="pubkey",
    help="print the public key string of a key file",
    description="Prints the public key string of FILE (written by `vpn-packet genkey`), as genkey did.",
    add_arguments=_arguments,
    run=_run,
)
