"""`vpn-packet reload [NAME] [--json]`: make a running node re-read its config file, as SIGHUP does.

The node applies the difference in `[[peers]]` (added, removed, endpoint, allowed_ips, public_key changed)
without a restart and answers with what changed. A file that does not validate is refused with the line a
start would print, and the node keeps running its current config; so is a change outside `[[peers]]`
(`[interface]`, `[listen]`, `[node]`, ...), which needs a restart: the answer names those keys.

Exit status: 0 applied (or nothing to change); 1 when no node answers; 2 when the node refused the file.
"""

from __future__ import annotations

import argparse
import json
import sys

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, PROG, Subcommand

__all__ = ["COMMAND"]


def _arguments(parser: argparse.ArgumentParser) -> None:
    from vpn_packet.cli.status import node_arguments

    node_arguments(parser, "print the node's answer as JSON")


def _run(args: argparse.Namespace) -> int:
    from vpn_packet.cli.status import socket_for
    from vpn_packet.node.control import request

    try:
        answer = request(socket_for(args.name), "reload")["reload"]
    except ConnectionError as exc:  # no node: the command ran and failed
        print(f"{PROG} reload: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # A refused file is a `UsageError`: `vpn-packet` prints its line and exits 2, as a start would.
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"reloaded: {answer.get('message', 'done')}")
    return EXIT_OK


COMMAND = Subcommand(
    name="reload",
    help="apply a changed config file to a running node (peers), as SIGHUP does",
    description=(
        "Makes the node on interface NAME (or the control socket at a path) re-read its config file and\n"
        "apply the difference in [[peers]] without a restart: peers added or removed, endpoint, allowed_ips\n"
        "or public_key changed. Traffic to unchanged peers keeps flowing. A file that does not validate,\n"
        "or that changes anything needing a restart ([interface], [listen], [node], ...), is refused and\n"
        "the node keeps its current config.\n"
        "Exit status: 0 applied; 1 when no node answers; 2 when the node refused the file."
    ),
    add_arguments=_arguments,
    run=_run,
)
