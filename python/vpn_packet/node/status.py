"""The one status snapshot of a TUN node and everything made from it: `vpn-packet status`, the SIGUSR1 line,
the metrics file, the metrics endpoint, the drop warnings and the exit summary.

Why one module of functions: these all read the same state (the node's counters, the TUN device's, the
kernel's), and each used to be a method of `TunNode` beside its lifecycle, reload and control socket. Here
they are functions of that state (`snapshot(node)`) and of the snapshot itself (`summary`, `DropLog`,
`write_metrics_file`), so each has one definition and none needs a running node to be tested.

Accounting, as the snapshot reports it:

- `totals.drops`: packets, by what happened (`node_drops`, then the TUN's: `tun.write_dropped`,
  `tun.write_errors`, and the kernel's own `tun.kernel_tx_dropped`, ...). `totals.drops["receiver.<x>"]`
  is the sum of the peers' `drops[<x>]` (the same counter under the peer's name: `PEER_RECEIVE_DROPS`).
- `totals.connection_failures`: connections refused or failed, either way (`node_connection_failures`):
  never mixed with packets.
- Each peer: `drops`, `connection_failures`, and `never_connected` (why, until its first handshake).
- `deprecated`: old name -> what replaced it, for every deprecated alias the snapshot still carries
  (`vpn_packet.deprecation`).

The kernel's counters are read by `TunDevice` before it closes the device, so a snapshot taken after the
shutdown (the exit summary, the final metrics file) still includes every drop up to the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpn_packet.deprecation import RECEIVER_ALIASES, TUN_GAUGE_ALIASES, add_receiver_aliases
from vpn_packet.node.node import node_connection_failures, node_drops

if TYPE_CHECKING:
    from vpn_packet.node.tun_node import TunNode

__all__ = [
    "DropLog",
    "connection_failures",
    "counters",
    "drop_counters",
    "snapshot",
    "summary",
    "write_metrics_file",
]

_log = logging.getLogger("vpn_packet.node")


def snapshot(node: TunNode) -> dict[str, Any]:
    """The node's snapshot, plain nested dicts: `peers` (`Node.peer_status`) and `totals` (the stable part,
    documented in `vpn_packet.cli.status`), then `node` (dispatcher, pool, connections, receiver) and `tun`
    in detail, and `deprecated`."""
    inner = node.node
    detail = inner.metrics().as_dict()
    detail["receiver_peers"] = {
        peer_id: dataclasses.asdict(m) for peer_id, m in inner.receiver.peer_metrics().items()
    }
    deprecated = _add_receiver_aliases(detail)
    address = inner.address or node.config.listen
    out: dict[str, Any] = {
        "id": node.config.node.id,
        "interface": node.config.interface.name,
        "listen": f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}",
        "state": node.state,
        "uptime": node.uptime,
        "peers": inner.peer_status(),
        "totals": inner.totals(detail),
        "discovery": node.registry.status() if node.registry is not None else None,
        "tun": tun_metrics(node),
        "node": detail,
        "data_plane": data_plane(node),
    }
    if out["tun"] is not None:
        for name, value in TUN_GAUGE_ALIASES.items():
            out["tun"][name] = value
            deprecated[f"tun.{name}"] = "removed: the TUN has no write backlog"
    out["totals"]["drops"] = {k: v for k, v in drop_counters(out).items() if v}
    out["deprecated"] = deprecated
    return out


def data_plane(node: TunNode) -> dict[str, Any]:
    """The data plane's thread (`vpn_packet.transport.plane`): whether it runs, the sources on it now (the
    TUN and the authenticated connections), the readiness events it handled and how often it handed a
    source back to the event loop (a lifecycle event, a new destination, a busy worker)."""
    plane = node.node.receiver.plane
    watched, events, parks = plane.stats()
    return {"running": plane.running, "watched": watched, "events": events, "handed_back": parks}


def counters(node: TunNode) -> dict[str, Any]:
    """The part of `snapshot` that `DropLog`, `drop_counters` and `connection_failures` read (`node`, `tun`):
    the node's totals, O(1) in the peers (the periodic drop warning reads it, and a node may have 10,000)."""
    return {"node": node.node.metrics().as_dict(), "tun": tun_metrics(node)}


def _add_receiver_aliases(detail: dict[str, Any]) -> dict[str, str]:
    """The receiver's deprecated counters (`RECEIVER_ALIASES`) on each peer's counters (the totals have them
    from `NodeMetrics.as_dict`); returns old name -> what replaced it, for the snapshot's `deprecated`."""
    for counters in detail["receiver_peers"].values():
        add_receiver_aliases(counters)
    return {f"node.receiver.{old}": " + ".join(parts) for old, parts in RECEIVER_ALIASES.items()}


def tun_metrics(node: TunNode) -> dict[str, Any] | None:
    """The TUN device's counters, with what the receiver wrote to it natively, and the kernel's."""
    tun = node.tun
    if tun is None:
        return None
    out = dataclasses.asdict(tun.metrics())
    receiver = node.node.receiver
    receiver.sync_counts()  # what its data plane's thread wrote meanwhile
    target = receiver.tun_target
    if target is not None:  # what the receiver wrote to the device natively
        out["packets_written"] += target.packets_written
        out["bytes_written"] += target.bytes_written
    out["kernel"] = tun.kernel_counters()  # after the close: as they were when it closed
    return out


def drop_counters(metrics: dict[str, Any]) -> dict[str, int]:
    """Every packet drop counter of a `snapshot`, flattened: the node's (`node_drops`), the TUN device's as
    we saw them (`tun.write_dropped`, `tun.write_errors`) and the kernel's own counters of the device
    (`tun.kernel_tx_dropped`: packets the kernel dropped because we did not read them in time;
    `tun.kernel_rx_dropped`: packets we wrote that the kernel dropped; errors likewise), so that a summary
    never says `drops: none` while the kernel dropped packets on our device."""
    out = node_drops(metrics["node"])
    tun = metrics["tun"]
    if tun is not None:
        out["tun.write_dropped"] = int(tun["write_dropped"])
        out["tun.write_errors"] = int(tun["write_errors"])
        for key, value in (tun.get("kernel") or {}).items():
            out[f"tun.kernel_{key}"] = int(value)
    return out


def connection_failures(metrics: dict[str, Any]) -> dict[str, int]:
    """Every connection failure of a `snapshot`, flattened (`node_connection_failures`)."""
    return node_connection_failures(metrics["node"])


class DropLog:
    """The periodic drop warning: one line for the packet drops that grew since the last call, one for the
    connection failures (never summed with packets)."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, int]] = {"drops": {}, "failures": {}}

    def log(self, metrics: dict[str, Any]) -> dict[str, int]:
        """Logs what grew (WARNING); returns the growth of the packet drops and of the connection failures
        together (their keys never collide)."""
        grown_drops = self._grown("drops", drop_counters(metrics))
        grown_failures = self._grown("failures", connection_failures(metrics))
        if grown_drops:
            n = sum(grown_drops.values())
            _log.warning(
                "dropped %d %s since the last report: %s",
                n,
                "packet" if n == 1 else "packets",
                _list(grown_drops),
            )
        if grown_failures:
            n = sum(grown_failures.values())
            _log.warning(
                "%d connection %s since the last report: %s",
                n,
                "failure" if n == 1 else "failures",
                _list(grown_failures),
            )
        return {**grown_drops, **grown_failures}

    def _grown(self, kind: str, current: dict[str, int]) -> dict[str, int]:
        last = self._last[kind]
        grown = {k: v - last.get(k, 0) for k, v in current.items() if v > last.get(k, 0)}
        self._last[kind] = current
        return grown


def _list(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items()))


def write_metrics_file(path: Path | None, metrics: dict[str, Any]) -> None:
    """Writes `metrics` as JSON to `path` (atomically: a temporary file renamed over it); a failure is
    logged, not raised (the node goes on)."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(metrics, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        _log.warning("cannot write metrics file %s: %s", path, exc)


def summary(metrics: dict[str, Any]) -> str:
    """A few human-readable lines: traffic both ways, packet drops, connection failures, and each peer that
    dropped packets, failed or never connected."""
    node = metrics["node"]
    d = node["dispatcher"]
    r = node["receiver"]
    t = metrics["tun"] or {}
    uptime = max(metrics["uptime"], 1e-9)
    drops = {k: v for k, v in drop_counters(metrics).items() if v}
    failures = {k: v for k, v in connection_failures(metrics).items() if v}
    lines = [
        f"node {metrics['id']}: up {metrics['uptime']:.1f}s",
        f"  tun read    {t.get('packets_read', 0):>12,} packets {t.get('bytes_read', 0):>15,} bytes"
        f"  ({t.get('bytes_read', 0) * 8 / uptime / 1e6:.1f} Mbit/s avg)",
        f"  sent        {d['sent']:>12,} packets {d['bytes_sent']:>15,} bytes"
        f"  (acknowledged by the peers; accepted {d['accepted']:,}, rejected {d['rejected']:,},"
        f" failed {d['failed']:,}, in flight {d.get('in_flight', 0):,})",
        f"  received    {r['packets_delivered']:>12,} packets {r['bytes']:>15,} bytes"
        f"  (frames {r['frames']:,}, connections {r['connections']:,})",
        f"  tun written {t.get('packets_written', 0):>12,} packets {t.get('bytes_written', 0):>15,} bytes",
        f"  connects {node['connects']:,}, connect failures {node['connect_failures']:,}",
        "  drops: " + (_list(drops) if drops else "none"),
        "  connection failures: " + (_list(failures) if failures else "none"),
    ]
    for peer in metrics.get("peers", ()):
        why = peer.get("never_connected")
        if why is not None:
            lines.append(f"  peer {peer['id']}: never connected: {why}")
            continue
        notes = []
        if peer.get("drops"):
            notes.append("drops: " + _list(peer["drops"]))
        if peer.get("connection_failures"):
            notes.append("connection failures: " + _list(peer["connection_failures"]))
        if notes:
            lines.append(f"  peer {peer['id']}: " + "; ".join(notes))
    return "\n".join(lines)


def uptime_since(started_at: float | None) -> float:
    """Seconds since `started_at` (`time.monotonic()`), 0 before a start."""
    return 0.0 if started_at is None else round(time.monotonic() - started_at, 3)
