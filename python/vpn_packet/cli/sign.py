"""`vpn-packet sign --authority AUTH.key (--key NODE.key | --public-key STRING) --id ID --allowed-ips P[,P...]
[--expires DAYS] --out FILE`: writes a mesh membership signed by an authority key.

The authority key is a key file like a node's (`vpn-packet genkey authority`); keep it off the nodes. The
membership is not secret: it goes to the node (`[discovery] membership`), which publishes it. The format and
the rules are `vpn_packet.mesh.membership`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_OK, Subcommand, positive_int

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--authority", metavar="AUTH.key", type=Path, required=True, help="the authority's key file (genkey)"
    )
    member = parser.add_mutually_exclusive_group(required=True)
    member.add_argument("--key", metavar="NODE.key", type=Path, help="the member's key file (genkey)")
    member.add_argument(
        "--public-key", metavar="STRING", help="the member's public key string, for a key held elsewhere"
    )
    parser.add_argument("--id", metavar="ID", required=True, help="the member's id (its [node] id)")
    parser.add_argument(
        "--allowed-ips",
        metavar="P[,P...]",
        required=True,
        help="the prefixes the member owns, comma-separated (10.8.0.1/32,fd00::1/128)",
    )
    parser.add_argument(
        "--expires",
        metavar="DAYS",
        type=positive_int,
        default=None,
        help="days of validity (default 90, at most 365)",
    )
    parser.add_argument(
        "--out", metavar="FILE", type=Path, required=True, help="where to write the membership"
    )


def _run(args: argparse.Namespace) -> int:
    import sys
    import time

    from vpn_packet.mesh.membership import sign_membership, write_record_file
    from vpn_packet.transport.identity import decode_public_key, load_identity
    from vpn_packet.tuning import MEMBERSHIP_DAYS

    authority = load_identity(args.authority)
    public_key = load_identity(args.key).public_key_bytes if args.key else decode_public_key(args.public_key)
    membership = sign_membership(
        authority,
        member_id=args.id,
        public_key=public_key,
        allowed_ips=[part.strip() for part in args.allowed_ips.split(",")],
        issued=int(time.time()),
        days=MEMBERSHIP_DAYS if args.expires is None else args.expires,
    )
    path = write_record_file(args.out, membership.record, membership.summary())
    print(f"wrote {path}: {membership.summary()}", file=sys.stderr)
    return EXIT_OK


COMMAND = Subcommand(
    name="sign",
    help="sign a mesh membership with an authority key",
    description=(
        "Writes FILE: the membership of node ID (its public key, the prefixes it owns, when it was issued\n"
        "and when it expires), signed by the authority key. The authority key is a key file like a node's\n"
        "(`vpn-packet genkey authority`): keep it off the nodes; nodes trust it by its public key string\n"
        "([discovery] authority). The member's key must not be the authority's. A membership issued later\n"
        "for the same id replaces the older one (that is how a node's key is rotated)."
    ),
    add_arguments=_arguments,
    run=_run,
)
