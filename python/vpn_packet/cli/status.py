"""`vpn-packet status [NAME] [--json]`: a running node's peers and totals, over its control socket.

NAME is the node's interface name (its socket is `/run/vpn-packet/NAME.sock`), or the path of a socket
(`node.control_socket`, any NAME with a `/`); without NAME, the only socket in /run/vpn-packet. The human form
is a table; `--json` prints the node's snapshot, the one its SIGUSR1 line, metrics file and metrics endpoint
(/metrics.json) give too.

`--json` (**contract**, docs/status-json.md): one object. Stable keys:

- `id` (this node's id), `interface`, `listen` (`host:port`), `state` (`running`), `uptime` (seconds);
- `peers`: a list, one object per configured peer, in config order:
  - `id`, `endpoint` (`host:port` as configured), `allowed_ips` (list of prefixes);
  - `connected` (bool): an authenticated connection either way, or an open sending stream;
  - `last_error` (string or null): the last connect, handshake or write failure towards the peer
    (`connect to 10.0.0.2:7000: [Errno 111] Connection refused`, `refused by the peer: key_mismatch: ...`),
    null again after a successful connect;
  - `last_handshake`, `last_tx`, `last_rx` (seconds ago, or null for never): the last accepted handshake
    either way, the last acknowledgement from the peer, the last packet from the peer;
  - `tx_packets`, `tx_bytes`: packets (and their bytes, without framing) the peer acknowledged;
    `rx_packets`, `rx_bytes`: packets received from it (delivered or dropped); `rx_delivered`;
  - `drops` (object, reason -> count, zeros left out), packets only: `lost_in_flight` (written, never
    acknowledged), and received packets dropped: `spoofed` (source outside its allowed_ips), `unparsable`,
    `offload_invalid`, `tun_dropped` (the TUN had no room), `tun_refused` (the kernel refused it),
    `sink_raised` (a library sink raised);
  - `connection_failures` (object, reason -> count, zeros left out): `refused_by_peer.<reason>`,
    `connect_failed.<errno name or error>`, `receiver.protocol_errors.<reason>` (the keys of the totals');
  - `never_connected` (string or null): until the peer's first accepted handshake either way, why not;
  - `breaker`: `closed`, `open` or `half_open` (the peer's circuit breaker);
  - `connections`: `{"out": n, "in": n}` open now; `connects`, `connect_failures` (attempts from here).
- `totals`: `tx_packets`, `tx_bytes` (acknowledged, all peers), `rx_packets`, `rx_bytes`, `rx_delivered`,
  the dispatcher's `accepted`, `rejected`, `failed`, `discarded`, `queued`, `in_flight` (accepted ==
  tx_packets + failed + discarded + queued + in_flight), `drops` (every packet drop counter of the node by
  reason, zeros left out: `failed.no_peer`, `receiver.spoofed_dropped`, `tun.write_dropped`, the kernel's own
  `tun.kernel_tx_dropped` (packets it dropped because the node did not read them in time), ...; each
  `receiver.<counter>` is the sum of the peers'), `connection_failures` (refused or failed connections
  either way, by reason: `receiver.refused.<reason>`, `receiver.handshake_failures.<reason>`,
  `refused_by_peer.<reason>`, `connect_failed.<kind>`, ...; a key a peer has too is the sum of the peers')
  and `connections`.
- `deprecated`: old key -> what replaced it, for the deprecated aliases the snapshot still carries.

The keys `node` and `tun` hold the detailed counters of the parts (not part of the contract).

Exit status: 0; 1 when no node answers (one line on stderr); 2 for bad usage (several nodes and no NAME).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from vpn_packet.cli._command import EXIT_FAILED, EXIT_OK, PROG, Subcommand

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["COMMAND", "PEER_MIN_WIDTH", "node_arguments", "render", "socket_for", "wide_width"]


def node_arguments(parser: argparse.ArgumentParser, json_help: str) -> None:
    """NAME (which node) and --json: the arguments of every command that talks to a running node."""
    parser.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        help="the node's interface name, or its control socket's path (default: the only node running)",
    )
    parser.add_argument("--json", action="store_true", help=json_help)


def _arguments(parser: argparse.ArgumentParser) -> None:
    node_arguments(parser, "print the snapshot as JSON (docs/status-json.md)")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="every column (endpoint, last tx/rx, connections, breaker), however wide the terminal; "
        "by default they are shown only when the terminal has room for them",
    )


#: The peer column's width at least (a longer name folds): the narrow table then fits 80 columns with
#: tx and rx of billions of packets and GiB (issue 22: at 80 every column was cut to a few characters).
PEER_MIN_WIDTH = 10


def wide_width(snapshot: dict[str, Any]) -> int:
    """The columns the wide table of `snapshot` needs (about 125 with typical values): the command shows it
    when the terminal has them, else the narrow one."""
    from rich.console import Console

    table = render(snapshot, wide=True).renderables[1]
    return int(Console(width=1000).measure(table).maximum)


def socket_for(name: str | None) -> Path:
    """The control socket of NAME (an interface name or a path); without NAME, the only one running.
    Raises `ConnectionError` when there is none, `UsageError` when there are several."""
    from pathlib import Path

    from vpn_packet.errors import UsageError
    from vpn_packet.node import control

    if name is not None:
        return Path(name) if "/" in name else control.default_socket_path(name)
    try:
        found = control.find_sockets()
    except PermissionError:
        # Not "no node is running" (issue 22): a node may well run, this user just may not look.
        raise ConnectionError(
            f"cannot read {control.CONTROL_DIR}: permission denied (the nodes' control directory is "
            f"root-only, mode 0700); run it as root: {control.sudo_hint('status')}"
        ) from None
    if not found:
        raise ConnectionError(f"no node is running (no control socket in {control.CONTROL_DIR})")
    if len(found) > 1:
        names = ", ".join(control.interface_of(p) for p in found)
        first = control.interface_of(found[0])
        raise UsageError(f"several nodes run ({names}): say which, e.g. {PROG} status {first}")
    return found[0]


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.0f}s ago" if seconds >= 1 else "now"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _count(n: int) -> str:
    """A packet count in at most 6 characters (`9,999`, `12.3k`, `123.5M`), for the narrow table."""
    if n < 10_000:
        return f"{n:,}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9)):
        if n < scale * 1000 or unit == "G":
            return f"{n / scale:.1f}{unit}"
    return str(n)  # pragma: no cover


def _drops(drops: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in sorted(drops.items())) if drops else "-"


def render(snapshot: dict[str, Any], *, wide: bool = True) -> Any:
    """The human form of a status snapshot: a `rich` renderable (a header line, the peer table, totals).

    `wide`: every column. Narrow (for 80 columns): peer, state, handshake, tx and rx (packet counts as
    `123.5M`); the endpoint, the last packet each way and the connections are left out, and a breaker that
    is not closed gets a note."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    uptime = float(snapshot.get("uptime", 0.0))
    header = Text.assemble(
        ("node ", "bold"),
        (str(snapshot.get("id", "?")), "bold cyan"),
        f" on {snapshot.get('interface', '?')}, listening on {snapshot.get('listen', '?')}, "
        f"{snapshot.get('state', '?')}, up {uptime:.0f}s",
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1) if wide else (0, 0))
    columns = (
        ("peer", "left", True),
        ("source", "left", False),
        ("endpoint", "left", False),
        ("state", "left", True),
        ("handshake", "right", True),
        ("tx", "right", True),
        ("rx", "right", True),
        ("last tx", "right", False),
        ("last rx", "right", False),
        ("in/out", "right", False),
        ("breaker", "left", False),
    )
    shown = [wide or narrow for _, _, narrow in columns]
    longest = max((len(str(peer["id"])) for peer in snapshot.get("peers", [])), default=4)
    for (column, justify, _), show in zip(columns, shown, strict=True):
        if not show:
            continue
        if column == "peer":  # a long name folds onto more lines rather than pushing the numbers out
            table.add_column(column, overflow="fold", min_width=min(longest, PEER_MIN_WIDTH))
        else:
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    notes: list[Text] = []
    count = (lambda n: f"{n:,}") if wide else _count
    for peer in snapshot.get("peers", []):
        name = str(peer["id"])
        state = "[green]connected[/green]" if peer["connected"] else "[red]down[/red]"  # (not "up": uptime)
        breaker = peer.get("breaker", "closed")
        conns = peer.get("connections", {"out": 0, "in": 0})
        cells = (
            escape(name),
            escape(str(peer.get("source", "static"))),
            escape(str(peer.get("endpoint", ""))),
            state,
            _ago(peer.get("last_handshake")),
            f"{count(peer['tx_packets'])} ({_size(peer['tx_bytes'])})",
            f"{count(peer['rx_packets'])} ({_size(peer['rx_bytes'])})",
            _ago(peer.get("last_tx")),
            _ago(peer.get("last_rx")),
            f"{conns['in']}/{conns['out']}",
            breaker if breaker == "closed" else f"[yellow]{breaker}[/yellow]",
        )
        table.add_row(*(cell for cell, show in zip(cells, shown, strict=True) if show))
        if not wide and breaker != "closed":
            notes.append(Text.assemble((name, "bold"), ": breaker ", (str(breaker), "yellow")))
        if peer.get("last_error"):
            notes.append(Text.assemble((name, "bold"), ": last error: ", (str(peer["last_error"]), "red")))
        if peer.get("drops"):
            notes.append(Text.assemble((name, "bold"), f": drops: {_drops(peer['drops'])}"))
        if peer.get("connection_failures"):
            failures = _drops(peer["connection_failures"])
            notes.append(Text.assemble((name, "bold"), f": connection failures: {failures}"))
    t = snapshot.get("totals", {})
    totals = Text(
        f"totals: tx {t.get('tx_packets', 0):,} packets ({_size(t.get('tx_bytes', 0))}), "
        f"rx {t.get('rx_packets', 0):,} packets ({_size(t.get('rx_bytes', 0))}); "
        f"accepted {t.get('accepted', 0):,}, failed {t.get('failed', 0):,}, queued {t.get('queued', 0):,}, "
        f"in flight {t.get('in_flight', 0):,}; drops: {_drops(t.get('drops', {}))}"
    )
    lines = [header]
    discovery = snapshot.get("discovery")
    if discovery:
        refused = discovery.get("refused") or {}
        lines.append(
            Text(
                f"discovery: {'connected to etcd' if discovery.get('connected') else 'etcd unreachable'}, "
                f"revision {discovery.get('revision', 0)}, {discovery.get('members', 0)} members; "
                f"refused: {_drops(refused)}; overlap alarms {discovery.get('overlap_alarms', 0)}"
            )
        )
    return Group(*lines, table, *notes, totals)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vpn_packet.node.control import request

    try:
        snapshot = request(socket_for(args.name), "status")["status"]
    except ConnectionError as exc:
        print(f"{PROG} status: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(snapshot, indent=2, default=str))
    else:
        console = Console(highlight=False)
        console.print(render(snapshot, wide=args.wide or wide_width(snapshot) <= console.width))
    return EXIT_OK


COMMAND = Subcommand(
    name="status",
    help="show a running node's peers: connected, last handshake, traffic, drops",
    description=(
        "Asks the node on interface NAME (its control socket /run/vpn-packet/NAME.sock, or a socket path)\n"
        "for its status: per peer, whether it is connected or why not, the last handshake and packet each\n"
        "way, packets and bytes each way, drops by reason, breaker state, connections; then the node's\n"
        "totals. --json prints the same as one documented JSON object (top level `peers`, `totals`).\n"
        "The table fits 80 columns (peer, state, handshake, tx, rx); a terminal wide enough, or --wide,\n"
        "adds the endpoint, the last packet each way, the connections and the breaker.\n"
        "Exit status: 0; 1 when no node answers; 2 for bad usage (several nodes and no NAME)."
    ),
    add_arguments=_arguments,
    run=_run,
)
