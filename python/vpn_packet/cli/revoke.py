"""`vpn-packet revoke --authority AUTH.key (--id ID | --public-key STRING) --out FILE`: writes a revocation
signed by an authority key.

A revocation covers every membership of that id (or key) issued up to now; nodes keep it until every such
membership has expired, so deleting it from the store later revokes nothing back. The format and the rules
are `vpn_packet.mesh.membership`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_OK, Subcommand

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--authority", metavar="AUTH.key", type=Path, required=True, help="the authority's key file (genkey)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", metavar="ID", help="revoke every membership of this id issued up to now")
    target.add_argument("--public-key", metavar="STRING", help="revoke every membership naming this key")
    parser.add_argument(
        "--out", metavar="FILE", type=Path, required=True, help="where to write the revocation"
    )


def _run(args: argparse.Namespace) -> int:
    import sys
    import time

    from vpn_packet.mesh.membership import sign_revocation, write_record_file
    from vpn_packet.transport.identity import decode_public_key, load_identity

    authority = load_identity(args.authority)
    revocation = sign_revocation(
        authority,
        member_id=args.id,
        public_key=None if args.public_key is None else decode_public_key(args.public_key),
        issued=int(time.time()),
    )
    path = write_record_file(args.out, revocation.record, revocation.summary())
    print(f"wrote {path}: {revocation.summary()}", file=sys.stderr)
    return EXIT_OK


COMMAND = Subcommand(
    name="revoke",
    help="revoke a mesh membership by id or public key",
    description=(
        "Writes FILE: a revocation signed by the authority key, of every membership of ID (or naming the\n"
        "public key) issued up to now. Nodes keep a revocation until every membership it covers has\n"
        "expired. To re-admit an id, sign its new membership more than 5 minutes (the clock skew\n"
        "tolerated) after the revocation."
    ),
    add_arguments=_arguments,
    run=_run,
)
