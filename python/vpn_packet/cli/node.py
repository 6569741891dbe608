"""`vpn-packet node --config FILE`: runs a VPN node on a TUN device until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TextIO

from vpn_packet.cli._command import Subcommand
from vpn_packet.errors import ConfigError, UsageError
from vpn_packet.tuning import LOG_LEVELS

__all__ = ["COMMAND", "LIBRARY_LOG_LEVEL", "LOG_FORMAT", "setup_logging"]

#: One line per event: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: The level of every logger outside `vpn_packet` (pyroute2's netlink internals, asyncio) unless
#: `--log-libraries`: their debug and info lines flood the log and say nothing an operator can act on.
LIBRARY_LOG_LEVEL = logging.WARNING


def setup_logging(level: str, *, libraries: bool = False, stream: TextIO | None = None) -> None:
    """The node's logging: `level` (a config level name) for `vpn_packet`'s own loggers; every other
    logger at `LIBRARY_LOG_LEVEL` or `level`, whichever is higher, unless `libraries` gives them `level`
    too. One line per event on `stream` (default stderr).

    The rule is on the root logger, not on `pyroute2`'s: pyroute2 resets its own logger's level when it is
    imported, and every library inherits from the root. Like `logging.basicConfig`, does nothing when the
    root logger already has handlers (the program embedding the node, or pytest, configured logging).
    """
    from vpn_packet.node.config import level_number

    root = logging.getLogger()
    if root.handlers:
        return
    number = level_number(level)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(number if libraries else max(number, LIBRARY_LOG_LEVEL))
    logging.getLogger("vpn_packet").setLevel(number)


def _node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", type=Path, required=True, help="the node's TOML file")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="the level of the node's own messages; overrides node.log_level of the config",
    )
    parser.add_argument(
        "--log-libraries",
        action="store_true",
        help="log the libraries (pyroute2's netlink, asyncio) at --log-level too; by default only their "
        "warnings and errors",
    )


def _run_node_command(args: argparse.Namespace) -> int:
    from vpn_packet.node.config import load_config, start_warnings
    from vpn_packet.node.tun_node import run_node

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise UsageError(f"{args.config}: {exc}" if exc.key else str(exc)) from None
    setup_logging(args.log_level or config.node.log_level, libraries=args.log_libraries)
    for warning in start_warnings(config):  # valid, but may not work as meant: IP forwarding off
        logging.getLogger("vpn_packet.node").warning("%s: %s", args.config, warning)
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
        "node.metrics_listen serves them over HTTP (/metrics, /metrics.json).\n\n"
        "Logs go to stderr, one line per event: peers connecting and disconnecting (INFO), failed\n"
        "connections with the errno name (WARNING, rate-limited). --log-level (else node.log_level) sets\n"
        "the level of the node's own messages; libraries (pyroute2's netlink, asyncio) log only warnings\n"
        "and errors, whatever the level, unless --log-libraries.\n"
        "Exit status: 0 clean shutdown, 1 shutdown deadline hit or TUN device failed, 2 bad config,\n"
        "missing privilege, listen port in use or interface name taken by another device."
    ),
    add_arguments=_node_arguments,
    run=_run_node_command,
)
