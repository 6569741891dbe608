"""The `vpn-packet` command: one module per subcommand, listed in `COMMAND_MODULES`.

Each command module defines `COMMAND` (a `Subcommand`) and imports what it needs inside its handler.
Exit status: 0 success, 1 the command ran and failed (see the command), 2 bad usage, configuration or input
(one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from vpn_packet.cli._command import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, Subcommand

TYPE_CHECKING = False  # not `typing`'s, whose loading is a cost every command would pay
if TYPE_CHECKING:
    from typing import Any

__all__ = ["COMMAND_MODULES", "Subcommand", "build_parser", "commands", "main", "module_of"]

#: The subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "vpn_packet.cli.node",
    "vpn_packet.cli.status",
    "vpn_packet.cli.reload",
    "vpn_packet.cli.example_config",
    "vpn_packet.cli.demo",
    "vpn_packet.cli.genkey",
    "vpn_packet.cli.pubkey",
    "vpn_packet.cli.sign",
    "vpn_packet.cli.revoke",
    "vpn_packet.cli.inspect",
    "vpn_packet.cli.sample_capture",
)


def commands() -> dict[str, Subcommand]:
    """Every subcommand by name."""
    found: dict[str, Subcommand] = {}
    for name in COMMAND_MODULES:
        command: Subcommand = import_module(name).COMMAND
        found[command.name] = command
    return found


def module_of(command_name: str) -> str | None:
    """The module of the command called `command_name` (`example-config`: `vpn_packet.cli.example_config`),
    or None when there is no such command. Each module is named after its command, dashes as underscores."""
    module = f"{__name__}.{command_name.replace('-', '_')}"
    return module if module in COMMAND_MODULES else None


def _chosen(argv: Sequence[str]) -> dict[str, Subcommand] | None:
    """The one command `argv` runs, imported alone; None when `argv` names none (then `--help`, `--version`
    or a usage error needs them all). Why: a command should load only what it runs; importing every command
    module made `vpn-packet inspect` pay for `node` and `demo` (asyncio, the node's settings)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first is None or first != (argv[0] if argv else None):
        return None
    module = module_of(first)
    if module is None:
        return None
    command: Subcommand = import_module(module).COMMAND
    return {command.name: command} if command.name == first else None


class _VersionAction(argparse.Action):
    """`--version`, reading the installed version only when asked (`importlib.metadata` is slow to load)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser(available: dict[str, Subcommand] | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="The packet layer of a VPN data plane: tools around the vpn-packet library."
    )
    parser.add_argument("--version", action=_VersionAction, help="show the program's version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (commands() if available is None else available).values():
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vpn-packet")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from vpn_packet._native import __version__

        return __version__


def _error_line(exc: BaseException) -> str:
    """One line for an input error: `CaptureError` messages already name the file; `OSError` gets it."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `vpn-packet` with `argv` (default: the process arguments); returns the exit status."""
    available = _chosen(sys.argv[1:] if argv is None else argv) or commands()
    parser = build_parser(available)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = available[args.command]
    try:
        return command.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into something that stopped reading (`| head`): not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        # The error taxonomy is loaded only now: a command that succeeds never pays for it (`inspect`'s
        # start-up is measured against tshark). Any of its errors raised before was loaded with it.
        from vpn_packet.errors import CaptureError, ConfigError, UsageError

        if not isinstance(exc, (CaptureError, ConfigError, UsageError, OSError)):
            raise
        print(f"{PROG} {command.name}: error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
