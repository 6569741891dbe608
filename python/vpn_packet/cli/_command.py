"""What every `vpn-packet` command module shares: the `Subcommand` record, exit statuses, argument types.

A command module defines `COMMAND = Subcommand(...)` and keeps its heavy imports inside `run`, so building
the parser (which imports every command module) stays cheap: `vpn-packet inspect` does not pay for what
`node` imports.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # not `typing`'s: every command imports this module, and `typing` is slow to load
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "Subcommand",
    "non_negative_int",
    "positive_int",
]

PROG = "vpn-packet"

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and the outcome is bad (packets lost, a node that failed)
EXIT_USAGE = 2  # bad arguments, configuration or input file; missing privilege (one line on stderr)
EXIT_INTERRUPTED = 130


class Subcommand:
    """One `vpn-packet` subcommand: its name, help, arguments and the function that runs it.

    A plain class, not a dataclass: `dataclasses` loads `inspect`, milliseconds every command would pay."""

    __slots__ = ("add_arguments", "description", "help", "name", "run")

    def __init__(
        self,
        name: str,
        help: str,
        add_arguments: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace], int],
        description: str | None = None,
    ) -> None:
        self.name = name
        self.help = help
        self.add_arguments = add_arguments
        self.run = run
        self.description = description

    def __repr__(self) -> str:
        return f"Subcommand(name={self.name!r})"


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value
