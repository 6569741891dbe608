"""`vpn-packet genkey NAME [--dir DIR]`: writes a node identity and prints its public key string.

A mesh's authority key is made the same way (`vpn-packet genkey authority`): the same file format, used by
`vpn-packet sign` and `revoke` instead of a node.

Like `wg genkey | wg pubkey` in one step: the key file (`NAME.key`, mode 0600: the private key and a
self-signed certificate that carries it) stays on this host; the last line printed is the public key string
that peers put in their config (`public_key = "..."`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_OK, Subcommand

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the node's name: the key file is NAME.key")
    parser.add_argument(
        "--dir", metavar="DIR", type=Path, default=Path("."), help="where to write NAME.key (default: here)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing NAME.key")


def _run(args: argparse.Namespace) -> int:
    import sys

    from vpn_packet.transport.identity import generate_identity

    identity = generate_identity(args.name, args.dir, force=args.force)
    print(f"wrote {identity.path} (private: keep it on this host, mode 0600)", file=sys.stderr)
    print(f'peers trust this node with: public_key = "{identity.public_key}"', file=sys.stderr)
    print(identity.public_key)
    return EXIT_OK


COMMAND = Subcommand(
    name="genkey",
    help="write a node identity (NAME.key) and print its public key string",
    description=(
        "Writes NAME.key (mode 0600): an Ed25519 private key and a self-signed certificate carrying it.\n"
        "Point [node] key at it. The last line printed is the public key string, 44 characters of base64\n"
        "like a WireGuard key: peers trust this node by putting it in its [[peers]] entry as\n"
        'public_key = "...". An existing file is kept unless --force.\n'
        "A mesh authority key is made the same way (`vpn-packet genkey authority`: an authority key is a\n"
        "node key file); `vpn-packet sign --authority authority.key` signs memberships with it, and nodes\n"
        "trust it by its public key string ([discovery] authority). Keep it off the nodes."
    ),
    add_arguments=_arguments,
    run=_run,
)
