"""`vpn-packet revoke --authority AUTH.key (--id ID | --public-key STRING) [--out FILE] [--etcd URL[,URL...]
[--prefix PREFIX] [--ca FILE --cert FILE --key FILE]]`: writes a revocation signed by an authority key, to a
file, or under the mesh's prefix in etcd (`PREFIX/revoked/...`), or both; with neither, to stdout (the
contract's form, for a pipe).

A revocation covers every membership of that id (or key) issued up to now; nodes keep it until every such
membership has expired, so deleting it from the store later revokes nothing back. The format and the rules
are `vpn_packet.mesh.membership`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, Subcommand

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--authority", metavar="AUTH.key", type=Path, required=True, help="the authority's key file (genkey)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--id", metavar="ID", help="revoke every membership of this id issued up to now")
    target.add_argument("--public-key", metavar="STRING", help="revoke every membership naming this key")
    parser.add_argument("--out", metavar="FILE", type=Path, help="where to write the revocation")
    parser.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="put it under the mesh's prefix in etcd (the nodes apply it at once)",
    )
    parser.add_argument(
        "--prefix", metavar="PREFIX", help="the mesh's prefix in etcd (default /vpn-packet/default/)"
    )
    for name, what in (
        ("ca", "the CA of etcd's server"),
        ("cert", "a client certificate"),
        ("key", "its key"),
    ):
        parser.add_argument(f"--{name}", metavar="FILE", type=Path, help=f"TLS to etcd: {what}")


def _run(args: argparse.Namespace) -> int:
    import sys
    import time

    from vpn_packet.errors import UsageError
    from vpn_packet.mesh.membership import encode_record_text, sign_revocation, write_record_file
    from vpn_packet.transport.identity import decode_public_key, load_identity
    from vpn_packet.tuning import DISCOVERY_PREFIX

    prefix = args.prefix or DISCOVERY_PREFIX
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise UsageError(f"--prefix {prefix!r}: a key prefix like /vpn-packet/default/")
    authority = load_identity(args.authority)
    revocation = sign_revocation(
        authority,
        member_id=args.id,
        public_key=None if args.public_key is None else decode_public_key(args.public_key),
        issued=int(time.time()),
    )
    if args.out is None and args.etcd is None:  # the contract's form: the record on stdout, for a pipe
        sys.stdout.write(encode_record_text(revocation.record, revocation.summary()))
    if args.out is not None:
        path = write_record_file(args.out, revocation.record, revocation.summary())
        print(f"wrote {path}: {revocation.summary()}", file=sys.stderr)
    if args.etcd is not None:
        import asyncio
        import hashlib

        key = f"{prefix}revoked/{hashlib.sha256(revocation.record).hexdigest()[:32]}"
        error = asyncio.run(_put(args, key, revocation.record))
        if error is not None:
            print(f"vpn-packet revoke: etcd {args.etcd}: {error}", file=sys.stderr)
            return EXIT_FAILED
        print(f"put {key} in etcd: {revocation.summary()}", file=sys.stderr)
    return EXIT_OK


async def _put(args: argparse.Namespace, key: str, record: bytes) -> str | None:
    """Puts the revocation; the error in one line, or None."""
    from vpn_packet.mesh.etcd import TlsEtcdClient

    urls = [url.strip() for url in args.etcd.split(",") if url.strip()]
    client = TlsEtcdClient(urls, ca=args.ca, cert=args.cert, key=args.key)
    try:
        await client.put(key.encode(), record)
    except Exception as exc:  # grpc's and aetcd's errors, whatever their class
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        await client.close()
    return None


COMMAND = Subcommand(
    name="revoke",
    help="revoke a mesh membership by id or public key",
    description=(
        "Writes a revocation signed by the authority key, of every membership of ID (or naming the\n"
        "public key) issued up to now: to FILE (--out), and/or under the mesh's prefix in etcd (--etcd),\n"
        "where the nodes apply it at once; with neither, to standard output. Nodes keep a revocation\n"
        "until every membership it covers has expired. To re-admit an id, sign its new membership more\n"
        "than 5 minutes (the clock skew tolerated) after the revocation."
    ),
    add_arguments=_arguments,
    run=_run,
)
