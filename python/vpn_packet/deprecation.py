"""Names that were renamed or removed, kept for one release as deprecated aliases, and the one warning each.

Why: dashboards, alert rules and config files name counters and keys. A rename that silently drops the old
name turns an alert quiet or a config file unreadable, so the old name keeps working for one release and says
once, at WARNING (logger `vpn_packet.deprecation`) and as a `DeprecationWarning`, what replaces it.

The aliases, one table each (the modules that serve those names read them here):

- `TUNING_ALIASES`: `[tuning]` keys (and `Tuning.with_changes` names). Old key -> new key, or None for a key
  whose setting is gone (its value is accepted and ignored).
- `RECEIVER_ALIASES`: counters of the receiver in the status JSON (`node.receiver`, `node.receiver_peers`)
  and so in Prometheus (`vpn_packet_receiver_<name>_total`). Old name -> the counters whose sum it shows.
- `TUN_GAUGE_ALIASES`: the TUN's gauges in the status JSON (`tun`) and Prometheus; old name -> constant value.

Every alias is listed in the status JSON under `deprecated` (old name -> what to read instead), so a script
can see it without reading logs.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Final

__all__ = [
    "RECEIVER_ALIASES",
    "add_receiver_aliases",
    "REMOVED_IN",
    "TUNING_ALIASES",
    "TUN_GAUGE_ALIASES",
    "warn_once",
]

_log = logging.getLogger("vpn_packet.deprecation")

#: The release in which the aliases below go away.
REMOVED_IN: Final = "0.3"

TUNING_ALIASES: Final[dict[str, str | None]] = {
    # The Python write backlog of the TUN is gone (writes that find no room are dropped and counted).
    "write_backlog": None,
    # It is the receiver's idle timeout (a sender's unused streams have `stream_idle_timeout`).
    "idle_timeout": "receive_idle_timeout",
}

RECEIVER_ALIASES: Final[dict[str, tuple[str, ...]]] = {
    # It counted a library sink's exceptions and, on a node, the TUN's drops and the peers' invalid offload
    # frames; each now has a name that says what happened. The alias keeps the old sum (which now also
    # holds the library path's invalid offload frames: before, nothing counted them).
    "sink_failed": ("sink_raised", "tun_dropped", "tun_refused", "offload_invalid"),
}

TUN_GAUGE_ALIASES: Final[dict[str, int]] = {
    # Packets waiting in the TUN's write backlog: there is no backlog any more.
    "backlog": 0,
}

_warned: set[str] = set()


def warn_once(name: str, message: str) -> bool:
    """Says `message` about the deprecated `name` once per process: a WARNING log line and a
    `DeprecationWarning`. True when it did (the first time)."""
    if name in _warned:
        return False
    _warned.add(name)
    text = f"deprecated: {message} (the old name goes away in {REMOVED_IN})"
    _log.warning("%s", text)
    warnings.warn(text, DeprecationWarning, stacklevel=3)
    return True


def add_receiver_aliases(counters: dict[str, Any]) -> dict[str, Any]:
    """Adds the receiver's deprecated counters (`RECEIVER_ALIASES`) to `counters` (a receiver's counters as
    a dict: `dataclasses.asdict` of its metrics); returns it."""
    for old, parts in RECEIVER_ALIASES.items():
        counters[old] = sum(int(counters[name]) for name in parts)
    return counters


def _forget_warnings() -> None:
    """For tests: every alias warns again."""
    _warned.clear()
