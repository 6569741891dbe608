"""`vpn-packet node --config FILE`: runs a VPN node on a TUN device until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from vpn_packet.cli._command import Subcommand
from vpn_packet.errors import ConfigError, UsageError
from vpn_packet.tuning import LOG_LEVELS

__all__ = ["COMMAND"]


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path, required=True, help="the node's TOML file")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default=None, help="overrides node.log_level of the config"
    )


def _run_node_command(args: argparse.Namespace) -> int:
    from vpn_packet.node.config import level_number, load_config
    from vpn_packet.node.tun_node import run_node

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise UsageError(f"{args.config}: {exc}" if exc.key else str(exc)) from None
    level = args.log_level or config.node.log_level
    logging.basicConfig(
        level=level_number(level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.tls is not None:
        try:
            config.security()  # loads the certificates now: a bad file is a one-line error, not a traceback
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise UsageError(f"{args.config}: tls: {exc}") from None
    try:
        return asyncio.run(run_node(config))
    except ConfigError as exc:  # the host refused a setting at start: the port is taken, the interface name
        raise UsageError(f"{args.config}: {exc}") from None


COMMAND = Subcommand(
    name="node",
    help="run a VPN node on a TUN device (needs root or CAP_NET_ADMIN)",
    description=(
        "Creates the TUN interface of the config's [interface], listens on [listen].address for the\n"
        "[[peers]], and forwards: packets read from the TUN go to the peer owning their destination\n"
        "(longest prefix of its allowed_ips), packets received from a peer are written to the TUN when\n"
        "their source is inside that peer's allowed_ips (else dropped and counted).\n\n"
        "Runs until SIGINT or SIGTERM, then shuts down in order within node.shutdown_timeout and prints\n"
        "a metrics summary. SIGUSR1 logs live metrics (and writes node.metrics_file when set);\n"
        "node.metrics_listen serves them over HTTP (/metrics, /metrics.json).\n"
        "Exit status: 0 clean shutdown, 1 shutdown deadline hit or TUN device failed, 2 bad config,\n"
        "missing privilege, listen port in use or interface name taken by another device."
    ),
    add_arguments=_node_arguments,
    run=_run_node_command,
)
