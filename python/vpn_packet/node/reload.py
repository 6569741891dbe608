"""`vpn-packet reload` and SIGHUP: re-read a TUN node's config file and apply the difference in `[[peers]]`.

A file that does not validate is refused with the one-line error a start gives, and a change anywhere else
(`[interface]`, `[listen]`, `[node]`, `[tls]`, `[tuning]`, `[resilience]`) refuses the whole reload, naming
the keys that need a restart: nothing is half applied, and the running config stays as it was. The routes
through the TUN change first (a conflict refuses the reload with the old routes intact), then the peers
(`Node.reconfigure`).

Why apart from `TunNode`: it is one job (read, compare, apply in order) on the node's state, and the node's
lifecycle does not need to know its steps.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vpn_packet.errors import ConfigError, UsageError
from vpn_packet.node.config import NodeConfig, diff_configs, load_config

if TYPE_CHECKING:
    from vpn_packet.node.tun_node import TunNode

__all__ = ["peer_prefixes", "reload"]

_log = logging.getLogger("vpn_packet.node")


def peer_prefixes(config: NodeConfig) -> dict[str, tuple[str, ...]]:
    """Each peer's prefixes, in config order (route conflicts name `peers[i].allowed_ips[j]` by position)."""
    return {peer.id: peer.allowed_ips for peer in config.peers}


async def reload(node: TunNode) -> dict[str, Any]:
    """Re-reads `node`'s config file and applies the difference (see the module docstring). Returns what
    changed (`applied`, `message`, `added`, `removed`, `changed`, ...); raises `UsageError` with one line
    when the file is refused (the running config stays). One reload at a time."""
    async with node.reload_lock:
        path = node.config.path
        if path is None:
            raise UsageError("this node was not started from a config file: nothing to reload")
        if node.state != "running":
            raise UsageError(f"the node is {node.state}")
        try:
            new = load_config(path)
            if new.tls is not None:
                new.security()  # loads the certificates: a bad file is refused here, not half applied
        except ConfigError as exc:
            raise UsageError(f"{path}: {exc}" if exc.key else str(exc)) from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: tls: {exc}") from None
        diff = diff_configs(node.config, new)
        if diff.restart:
            keys = ", ".join(diff.restart)
            raise UsageError(
                f"{path}: not applied: {keys} changed, which needs a restart (the running config stays)"
            )
        answer: dict[str, Any] = {"applied": True, "message": diff.describe(), **diff.as_dict()}
        if not diff.peers_changed:
            node.config = new
            return answer
        peer_keys = (
            {p.id: p.public_key for p in new.peers if p.public_key is not None} if new.mode == "key" else None
        )
        if node.routes is not None:
            try:  # before the peers change: a conflict refuses the reload with the old routes intact
                prefixes = peer_prefixes(new)
                for peer in node.node.discovery.peers:  # discovered peers keep their routes
                    if node.node.peer_source(peer.id) != "static":
                        prefixes.setdefault(peer.id, tuple(peer.allowed_ips))
                answer["routes"] = node.routes.apply(prefixes).describe()
            except ConfigError as exc:
                raise UsageError(f"{path}: {exc}") from None
        try:
            changes = await node.node.reconfigure([p.to_peer() for p in new.peers], peer_keys)
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        node.config = new
        answer.update(changes.as_dict())
        answer["message"] = diff.describe()
        return answer
