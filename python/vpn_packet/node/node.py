"""A node: everything one host needs to send packets to its peers and receive theirs, minus the TUN device.

`Node` wires a `StaticPeerDiscovery` (the peers and their allowed prefixes), a `TcpStreamService` and a
`StreamPool` (sending), a `ResilienceService` and a `Dispatcher` (per-destination ordering, retry, breaker),
and a `Receiver` (listening, framing, anti-spoofing) that hands received packets to `sink`. It is apart from
the TUN device so that it runs without root (the demo, the tests and the benchmarks use it on loopback);
`vpn_packet.node.tun_node.TunNode` wraps one: its TUN reader calls `send_batch`, its sink writes to the
device.

    security = Security.with_keys(load_identity("node-a.key"), {"node-b": decode_public_key("...")})
    node = Node(security, ("127.0.0.1", 7000), peers=[Peer("node-b", "127.0.0.1:7001", ["10.8.0.2/32"])],
                sink=on_packets, tuning=Tuning(write_timeout=2.0))
    async with node:
        node.send_batch(packets)

Every knob comes from one `vpn_packet.tuning.Tuning`, the object the config file fills, so a `Node` built
in Python and one built from a config file with the same values behave the same.

`start()` brings the parts up receiver first; `stop()` takes them down in the order that loses nothing
still deliverable: stop dispatching and drain the workers (bounded by `stop_timeout`), close the pool
(buffered bytes are flushed before the sockets close), then stop the receiver.

Status: `peer_status()` is the one per-peer snapshot (`vpn-packet status`, the SIGUSR1 dump, the metrics
file and endpoint all read it through `TunNode.metrics()`); `totals()` the node's own. Times are seconds
since the event (`last_handshake`, `last_tx`, `last_rx`), None for never.

Reload: `reconfigure(peers, peer_keys)` swaps the peer set while running (`vpn-packet reload`, SIGHUP).
The dispatcher, its counters and every connection of an unchanged peer stay as they are, so traffic to
unchanged peers keeps flowing in order and the accounting identity holds across it. Then:

- removed peers: their connections are closed both ways (receiving: reset at once, the old key is refused
  from now on; sending: no new writes, what is in flight may still be acknowledged, then closed); a worker
  whose destination belonged to one fails its next batch as `no_peer` (counted) and looks up again.
- a changed `public_key` or `endpoint`: the peer's connections are closed the same way and its breaker is
  reset; the next batch connects anew with the new key or address.
- changed `allowed_ips`: a worker whose destination now belongs to another peer (or none) gives its stream
  back and writes its next batch to the new owner (`no_peer` if none); the receiver checks sources against
  the new prefixes from its next read on.

Every worker looks its destination's owner up again before its next batch (`Dispatcher.invalidate_routes`:
a route epoch each worker compares once per batch), never inside one, so its packets stay in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vpn_packet.deprecation import add_receiver_aliases
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.metrics import DispatcherMetrics
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.keeper import ConnectionKeeper
from vpn_packet.transport.pool import StreamPool, StreamPoolMetrics
from vpn_packet.transport.receiver import PeerReceiverMetrics, Receiver, ReceiverMetrics, Sink
from vpn_packet.transport.tcp import PeerSendStats, TcpStreamService
from vpn_packet.tuning import (
    DEFAULT_TUNING,
    NODE_RESILIENCE,
    SHUTDOWN_TIMEOUT,
    Tuning,
    build,
)
from vpn_packet.worker import WorkerMetrics

__all__ = [
    "PEER_RECEIVE_DROPS",
    "Node",
    "NodeMetrics",
    "PeerChanges",
    "node_connection_failures",
    "node_drops",
]

_log = logging.getLogger("vpn_packet.node")


def _discard(peer_id: str, packets: list[bytes]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """A snapshot of a node: its dispatcher, stream pool, connections and receiver."""

    peer_id: str
    address: tuple[str, int] | None
    dispatcher: DispatcherMetrics
    pool: StreamPoolMetrics
    connects: int
    connect_failures: int
    refusals: dict[str, int]
    receiver: ReceiverMetrics
    #: Our failed connection attempts (not refusals) by kind (`ECONNREFUSED`, `TimeoutError`, ...), summed
    #: over the peers: the totals are the sum of each peer's `connect_failed.<kind>`.
    connect_failures_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dicts (for JSON)."""
        out = {
            "peer_id": self.peer_id,
            "address": self.address,
            "dispatcher": dataclasses.asdict(self.dispatcher),
            "pool": dataclasses.asdict(self.pool),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "refusals": dict(self.refusals),
            "connect_failures_by_kind": dict(self.connect_failures_by_kind),
        }
        # With the deprecated `sink_failed` (vpn_packet.deprecation) for one release.
        out["receiver"] = add_receiver_aliases(dataclasses.asdict(self.receiver))
        return out


#: A peer's received-packet drops as its `peer_status()` names them: receiver counter -> key. The node's
#: totals name them `receiver.<counter>`, and each total is the sum of the peers' (`node_drops`).
PEER_RECEIVE_DROPS: Final = {
    "spoofed_dropped": "spoofed",
    "unparsable_dropped": "unparsable",
    "offload_invalid": "offload_invalid",
    "sink_raised": "sink_raised",
    "sink_cancelled": "sink_cancelled",
    "tun_dropped": "tun_dropped",
    "tun_refused": "tun_refused",
}


def node_drops(metrics: Mapping[str, Any]) -> dict[str, int]:
    """Every packet drop counter of a node, from `NodeMetrics.as_dict()`, flattened (`rejected.queue_full`,
    ...): packets rejected, failed or discarded by the dispatcher, and packets received but not delivered
    (`receiver.spoofed_dropped`, `receiver.tun_dropped`, ...: `PEER_RECEIVE_DROPS`). Connections that failed
    are not packets: they are `node_connection_failures`. The one place drops are summed up (the node's
    summary, its warnings and the demo's table read it)."""
    out: dict[str, int] = {}
    dispatcher = metrics["dispatcher"]
    for group in ("rejected", "failed", "discarded"):
        for reason, n in dispatcher[f"{group}_by_reason"].items():
            out[f"{group}.{reason}"] = int(n)
    receiver = metrics["receiver"]
    for key in PEER_RECEIVE_DROPS:
        out[f"receiver.{key}"] = int(receiver[key])
    return out


def node_connection_failures(metrics: Mapping[str, Any]) -> dict[str, int]:
    """Every connection failure of a node, from `NodeMetrics.as_dict()`, flattened: connections we refused
    (`receiver.refused.unknown_peer`), handshakes that failed (`receiver.handshake_failures.timeout`),
    connections closed for a protocol error (`receiver.protocol_errors.too_large`) or at the pending limits
    (`receiver.rejected_pending`, `receiver.evicted_pending`), and our connections a peer refused
    (`refused_by_peer.key_mismatch`) or that failed (`connect_failed.<kind>`, summed over the peers, whose
    `connection_failures` name the same keys). Counted apart from packet drops:
    a refused connection carried no packet."""
    out: dict[str, int] = {}
    receiver = metrics["receiver"]
    for family in ("refused", "handshake_failures", "protocol_errors"):
        for reason, n in receiver[family].items():
            out[f"receiver.{family}.{reason}"] = int(n)
    for key in ("rejected_pending", "evicted_pending"):
        out[f"receiver.{key}"] = int(receiver[key])
    for reason, n in metrics["refusals"].items():
        out[f"refused_by_peer.{reason}"] = int(n)
    by_kind = metrics.get("connect_failures_by_kind", {})
    for kind, n in by_kind.items():
        out[f"connect_failed.{kind}"] = int(n)
    # Attempts that failed otherwise (cancelled by a stop, ...): no peer names a kind for them.
    refused = sum(int(n) for n in metrics["refusals"].values())
    named = sum(int(n) for n in by_kind.values())
    out["connect_failed.other"] = int(metrics["connect_failures"]) - refused - named
    return out


def _never_connected(
    peer: Peer, tx: PeerSendStats | None, rx: PeerReceiverMetrics | None, handshakes: list[float]
) -> str | None:
    """None once `peer` has had an accepted handshake either way; else why not, in a few words: the last
    error of our attempts to reach it, or that none has finished yet."""
    if handshakes:
        return None
    if tx is not None and tx.last_error:
        return tx.last_error
    if tx is not None and tx.connect_failures:
        return f"{tx.connect_failures} connection attempts to {peer.endpoint} failed"
    return f"no connection either way yet (none to {peer.endpoint} has completed, none from it)"


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(now - then, 0.0), 3)


@dataclass(frozen=True, slots=True)
class PeerChanges:
    """What `Node.reconfigure` changed: peer ids `added` and `removed`; `changed`: peer id -> the fields
    (`endpoint`, `allowed_ips`, `public_key`); `closed`: connections closed (both ways); `retargeted`:
    workers whose destination changed owner."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    closed: int = 0
    retargeted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": {peer_id: list(keys) for peer_id, keys in self.changed.items()},
            "connections_closed": self.closed,
            "workers_retargeted": self.retargeted,
        }


class Node:
    """One host of the data plane: sends to peers through a dispatcher, receives from them into `sink`.

    - `security`: who we are and how peers prove who they are (`vpn_packet.transport.handshake.Security`:
      keys, a CA, or explicitly insecure); its `local_id` is our id.
    - `listen`: the `(host, port)` the receiver binds (port 0: any free port; see `address` after `start()`).
    - `peers`: the other nodes (id, endpoint, allowed prefixes): where to send a destination, and which
      source addresses each may use when it sends to us.
    - `sink`: gets `(peer_id, packets)` for what arrives (default: discarded).
    - `tuning`: every knob of the dispatcher, the stream pool, the TCP streams and the receiver (a
      `vpn_packet.tuning.Tuning`; default `DEFAULT_TUNING`, what a config file without `[tuning]` gives).
      Keyword arguments named like its fields (`worker_buffer_size=...`) change those fields of it.
    - `resilience`: a `ResilienceConfig` or a shared `ResilienceService` (default `NODE_RESILIENCE`, the
      config file's default too).
    - `stop_timeout`: how long `stop()` drains (the config's `node.shutdown_timeout`).
    - `keep_connections`: keep the first `tuning.warm_peers` peers connected from the start, and any peer in
      use, and close the connections of idle ones (`ConnectionKeeper`), so the first packet to a warm peer
      does not wait for a connection and a handshake. False: on demand only, closed by the pool's idle rule.
    """

    def __init__(
        self,
        security: Security,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        peers: Iterable[Peer] = (),
        sink: Sink | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
        resilience: ResilienceConfig | ResilienceService | None = None,
        stop_timeout: float = SHUTDOWN_TIMEOUT,
        keep_connections: bool = True,
        **changes: Any,
    ) -> None:
        t = self.tuning = tuning.with_changes(**changes)
        self.security = security
        self.peer_id = security.local_id
        self.listen = listen
        self.stop_timeout = stop_timeout
        self.discovery = StaticPeerDiscovery(peers)
        # Peer id -> where it came from, when not `static`, in the order they came (the first few are warm).
        self._sources: dict[str, str] = {}
        self._static_ids: dict[str, None] = dict.fromkeys(peer.id for peer in self.discovery.peers)
        # Each part takes the `Tuning` whole: the part itself says which of its keywords are which knobs
        # (its `TUNING_FIELDS`), so this is not a second list of them.
        self.stream_service = build(TcpStreamService, t, self.discovery, security)
        self.pool = build(StreamPool, t, self.stream_service)
        # Which peers have a connection: the first few kept warm, the others on demand, closed when idle
        # (vpn_packet.transport.keeper: the one rule, for static and discovered peers alike).
        self.keeper = (
            build(
                ConnectionKeeper,
                t,
                self.pool,
                self._peer_order,
                traffic=self._traffic,
                known=self.discovery.__contains__,
                on_idle_close=self._on_idle_close,
                on_tick=self.stream_service.failure_log.tick,
            )
            if keep_connections
            else None
        )
        if isinstance(resilience, ResilienceService):
            self.resilience = resilience
        else:
            self.resilience = ResilienceService(NODE_RESILIENCE if resilience is None else resilience)
        self.dispatcher = build(
            Dispatcher, t, self.discovery, self.stream_service, self.pool, resilience_service=self.resilience
        )
        host, port = listen
        self.receiver = build(
            Receiver,
            t,
            self.discovery,
            sink if sink is not None else _discard,
            host=host,
            port=port,
            security=security,
        )
        if self.keeper is not None:
            self.receiver.on_authenticated = (
                self.keeper.poke
            )  # a peer that connects to us is up: connect back
        self._started = False
        self._stopped = False
        self._sending_stopped = False

    @property
    def peers(self) -> list[Peer]:
        """The peers known now, in the order they came."""
        return list(self.discovery.peers)

    def peer_source(self, peer_id: str) -> str:
        """Where a peer came from: `static` (the config, or the library caller) or `discovery` (etcd)."""
        return self._sources.get(peer_id, "static")

    def _peer_order(self) -> Iterator[str]:
        """The peers in the order the keeper's warm rule reads them (`Tuning.warm_peers`: the first ones):
        static peers in config order, then discovered ones in the order they joined. Lazy: the keeper reads
        only the first few."""
        return itertools.chain(self._static_ids, self._sources)

    def _traffic(self, peer_id: str) -> int:
        """Packets exchanged with `peer_id` either way (acknowledged by it, received from it), keepalives
        excluded: the keeper's measure of use."""
        self.stream_service.sync_acks(peer_id)
        tx = self.stream_service.peer_stats.get(peer_id)
        return (tx.tx_packets if tx is not None else 0) + self.receiver.frames_from(peer_id)

    def _on_idle_close(self, peer_ids: list[str]) -> None:
        """The keeper closed the connections of idle peers: every worker looks its peer up again before its
        next batch, and so gives back a stream that is closing instead of failing a write on it."""
        self.dispatcher.invalidate_routes()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then accept packets to send. Idempotent while running."""
        if self._stopped:
            raise RuntimeError("a stopped Node cannot be restarted; create a new one")
        if self._started:
            return
        await self.receiver.start()
        try:
            await self.pool.start()
            await self.dispatcher.start()
            if self.keeper is not None:
                await self.keeper.start()
        except BaseException:
            await self.pool.stop()
            await self.receiver.stop()
            raise
        self._started = True

    async def stop_sending(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - like stop()
        """Stop dispatching and drain for at most `timeout` (default `stop_timeout`) seconds, then close the
        pool (buffered bytes are flushed). The receiver keeps running: peers may still send to us. Idempotent.

        For an orderly shutdown of several nodes: `stop_sending()` on each, then `stop()` on each, so that no
        receiver stops while a peer is still writing to it."""
        if self._sending_stopped:
            return
        self._sending_stopped = True
        try:
            if self.keeper is not None:
                await self.keeper.stop()
            await self.dispatcher.stop(self.stop_timeout if timeout is None else timeout)
        finally:
            await self.pool.stop()

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - like Dispatcher.stop
        """`stop_sending(timeout)`, then stop the receiver. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.stop_sending(timeout)
        finally:
            await self.receiver.stop()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def address(self) -> tuple[str, int] | None:
        """The receiver's bound `(host, port)` (after `start()`)."""
        try:
            return self.receiver.address
        except RuntimeError:  # not listening (yet)
            return None

    @property
    def endpoint(self) -> str:
        """The receiver's address as a `host:port` endpoint string, for other nodes' peer lists."""
        address = self.address
        if address is None:
            raise RuntimeError("the node is not listening yet")
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- sending --------------------------------------------------------------------------------------------

    def send(self, packet: bytes) -> bool:
        """Queue one raw IP packet for the peer owning its destination; False when rejected (counted)."""
        return self.dispatcher.dispatch(packet)

    def send_batch(self, packets: Sequence[bytes]) -> int:
        """Queue many raw IP packets (grouped by destination natively); returns how many were accepted."""
        return self.dispatcher.dispatch_batch(packets)

    def send_buffer(self, data: bytes, lengths: bytes, *, vnet_header: bool = False) -> int:
        """Queue the packets of one TUN read (`data` and its native-endian u32 `lengths`; with
        `vnet_header`, each packet preceded by its virtio_net_hdr), routed natively; returns how many were
        accepted. No Python object per packet; a read after a quiet spell is written without coalescing."""
        return self.dispatcher.dispatch_buffer(data, lengths, vnet_header=vnet_header, write_lone_now=True)

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - like Dispatcher.flush
        """Wait until every accepted packet was written to a stream (or failed); False on timeout."""
        return await self.dispatcher.flush(timeout)

    # --- metrics --------------------------------------------------------------------------------------------

    def metrics(self) -> NodeMetrics:
        return NodeMetrics(
            peer_id=self.peer_id,
            address=self.address if self._started else None,
            dispatcher=self.dispatcher.metrics(),
            pool=self.pool.metrics(),
            connects=self.stream_service.connects,
            connect_failures=self.stream_service.connect_failures,
            refusals=dict(self.stream_service.refusals),
            receiver=self.receiver.metrics(),
            connect_failures_by_kind=self._connect_failures_by_kind(),
        )

    def _connect_failures_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for stats in self.stream_service.peer_stats.values():
            for kind, n in stats.failures.items():
                out[kind] = out.get(kind, 0) + n
        return out

    def worker_metrics(self) -> dict[str, WorkerMetrics]:
        return self.dispatcher.worker_metrics()

    def peer_status(self) -> list[dict[str, Any]]:
        """The per-peer snapshot, one plain dict per configured peer, in config order (see
        `vpn_packet.cli.status` for the fields): the one source of `vpn-packet status`, the SIGUSR1 dump, the
        metrics file and the metrics endpoint."""
        now = time.monotonic()
        received = self.receiver.peer_metrics()
        self.stream_service.sync_acks()  # what the data plane's thread read
        sending = self.stream_service.peer_stats
        breakers = self.resilience.breakers
        out: list[dict[str, Any]] = []
        for peer in self.peers:
            tx = sending.get(peer.id)
            rx = received.get(peer.id)
            streams_out = len(tx.streams) if tx is not None else 0
            streams_in = rx.active_connections if rx is not None else 0
            drops: dict[str, int] = {}
            failures: dict[str, int] = {}
            if tx is not None:
                drops["lost_in_flight"] = tx.lost_in_flight
                for reason, n in tx.refusals.items():
                    failures[f"refused_by_peer.{reason}"] = n
                for kind, n in tx.failures.items():
                    failures[f"connect_failed.{kind}"] = n
            if rx is not None:
                for counter, key in PEER_RECEIVE_DROPS.items():
                    drops[key] = getattr(rx, counter)
                for reason, n in rx.protocol_errors.items():  # the totals' key: they sum the peers'
                    failures[f"receiver.protocol_errors.{reason}"] = n
            handshakes = [
                t
                for t in (tx.last_handshake if tx else None, rx.last_handshake if rx else None)
                if t is not None
            ]
            breaker = breakers.peek(peer.id)
            out.append(
                {
                    "id": peer.id,
                    "source": self._sources.get(peer.id, "static"),
                    "endpoint": peer.endpoint,
                    "allowed_ips": list(peer.allowed_ips),
                    "connected": streams_out > 0 or streams_in > 0,
                    "last_error": tx.last_error if tx is not None else None,
                    "last_handshake": _ago(now, max(handshakes) if handshakes else None),
                    "last_tx": _ago(now, tx.last_tx if tx is not None else None),
                    "last_rx": _ago(now, rx.last_packet if rx is not None else None),
                    "tx_packets": tx.tx_packets if tx is not None else 0,
                    "tx_bytes": tx.tx_bytes if tx is not None else 0,
                    "rx_packets": rx.frames if rx is not None else 0,
                    "rx_bytes": rx.bytes if rx is not None else 0,
                    "rx_delivered": rx.packets_delivered if rx is not None else 0,
                    "drops": {k: v for k, v in drops.items() if v},
                    "connection_failures": {k: v for k, v in failures.items() if v},
                    "never_connected": _never_connected(peer, tx, rx, handshakes),
                    "breaker": breaker.state.value if breaker is not None else "closed",
                    "connections": {"out": streams_out, "in": streams_in},
                    "connects": tx.connects if tx is not None else 0,
                    "connect_failures": tx.connect_failures if tx is not None else 0,
                }
            )
        return out

    def totals(self, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The node's own totals (from `metrics().as_dict()`, taken now unless given): packets and bytes
        each way, the dispatcher's accounting, every drop by reason (`node_drops`), connections open."""
        m = self.metrics().as_dict() if metrics is None else metrics
        d, r = m["dispatcher"], m["receiver"]
        return {
            "tx_packets": d["sent"],
            "tx_bytes": d["bytes_sent"],
            "rx_packets": r["frames"],
            "rx_bytes": r["bytes"],
            "rx_delivered": r["packets_delivered"],
            "accepted": d["accepted"],
            "rejected": d["rejected"],
            "failed": d["failed"],
            "discarded": d["discarded"],
            "queued": d["queued"],
            "in_flight": d["in_flight"],
            "drops": {k: v for k, v in node_drops(m).items() if v},
            "connection_failures": {k: v for k, v in node_connection_failures(m).items() if v},
            "connections": {"out": m["pool"]["streams"], "in": r["active_connections"]},
        }

    # --- reload ---------------------------------------------------------------------------------------------

    async def reconfigure(
        self, peers: Iterable[Peer], peer_keys: Mapping[str, bytes] | None = None
    ) -> PeerChanges:
        """Swap in a new set of static peers while running (see the module docstring); discovered peers
        stay. `peer_keys` (key mode): the public key of every static peer, replacing the current ones. Raises
        `ValueError` (a prefix given twice, two peers with one key, ...) before changing anything. The
        difference is applied by `update_peers`, the one path every peer change takes (a reload's, and
        discovery's)."""
        new_peers = list(peers)
        # The static peers only: discovered ones (`[discovery]`) are the registry's to add and remove.
        old = {peer.id: peer for peer in self.discovery.peers if peer.id not in self._sources}
        new: dict[str, Peer] = {}
        for peer in new_peers:
            if peer.id in new:
                raise ValueError(f"duplicate peer id {peer.id!r}")
            new[peer.id] = peer
        old_keys = self.security.peer_keys
        keys = dict(peer_keys) if peer_keys is not None else None
        removed = [peer_id for peer_id in old if peer_id not in new]
        added = [peer for peer_id, peer in new.items() if peer_id not in old]
        updated = [
            peer
            for peer_id, peer in new.items()
            if peer_id in old
            and (peer != old[peer_id] or (keys is not None and keys.get(peer_id) != old_keys.get(peer_id)))
        ]
        if keys is not None:
            missing = (set(old_keys) - set(self._sources)) - set(keys) - set(removed)
            removed_keys = [*removed, *sorted(missing)]
            changed_keys = {p.id: keys[p.id] for p in (*added, *updated) if p.id in keys}
        else:
            removed_keys, changed_keys = [], {}
        return await self.update_peers(
            added,
            updated,
            removed,
            changed_keys if keys is not None else None,
            removed_keys,
            count_workers=True,
        )

    async def update_peers(
        self,
        added: Sequence[Peer] = (),
        updated: Sequence[Peer] = (),
        removed: Sequence[str] = (),
        keys: Mapping[str, bytes] | None = None,
        removed_keys: Sequence[str] | None = None,
        *,
        source: str = "static",
        count_workers: bool = False,
    ) -> PeerChanges:
        """The one add/update/remove path of the peer set: O(the peers changed), however many are known.

        `keys` (key mode): the public keys of added and updated peers (`removed_keys`: ids whose key goes,
        default `removed`). `source` is what `peer_status()` says for added and updated peers (`static` or
        `discovery`). Raises `ValueError` (an unknown or duplicate id, a prefix another peer holds, a key
        given twice) before changing anything. The connections of unchanged peers are untouched; see the
        module docstring for what happens to the changed ones. `count_workers`: also count the workers
        whose destination changed owner (a scan of the workers: a reload's report; discovery skips it)."""
        old_peers = {peer.id: self.discovery.peer(peer.id) for peer in updated if peer.id in self.discovery}
        security = self.security
        gone_keys = list(removed if removed_keys is None else removed_keys)
        if security.mode == "key" and (keys or gone_keys):
            security = security.with_key_changes(keys or {}, gone_keys)  # ValueError before anything changed
        old_keys = self.security.peer_keys
        changed: dict[str, tuple[str, ...]] = {}
        for peer in updated:
            before = old_peers.get(peer.id)
            fields = tuple(
                key
                for key, differs in (
                    ("endpoint", before is None or peer.endpoint != before.endpoint),
                    ("allowed_ips", before is None or peer.allowed_ips != before.allowed_ips),
                    ("public_key", security.peer_keys.get(peer.id) != old_keys.get(peer.id)),
                )
                if differs
            )
            if fields:
                changed[peer.id] = fields
        self.discovery.update(added, updated, removed)  # ValueError before anything changed
        self.receiver.peers_changed([peer.id for peer in added], removed)
        for peer in (*added, *updated):
            if source == "static":
                self._sources.pop(peer.id, None)
                self._static_ids[peer.id] = None
            else:
                self._static_ids.pop(peer.id, None)
                self._sources.setdefault(peer.id, source)
        for peer_id in removed:
            self._sources.pop(peer_id, None)
            self._static_ids.pop(peer_id, None)
        if security is not self.security:
            self.security = security
            self.stream_service.security = security
            self.receiver.update_security(security, keys or {}, gone_keys)
        rekeyed = {peer_id for peer_id, keys_changed in changed.items() if "public_key" in keys_changed}
        moved = {peer_id for peer_id, keys_changed in changed.items() if "endpoint" in keys_changed}
        closed = 0
        for peer_id in (*removed, *sorted(rekeyed)):
            closed += self.receiver.close_peer(peer_id, "removed" if peer_id in removed else "key changed")
        # Workers whose destination changed owner, or whose peer's connections are about to close: every
        # worker looks its destination's owner up again before its next batch (never in the middle of one).
        stale = set(removed) | rekeyed | moved
        retargeted = (
            sum(
                1
                for worker in self.dispatcher.workers()
                if worker.peer_id is not None
                and not worker.closed
                and (worker.peer_id in stale or self.discovery.lookup(worker.dest_ip) != worker.peer_id)
            )
            if count_workers
            else 0
        )
        self.dispatcher.invalidate_routes()
        for peer_id in rekeyed | moved:
            breaker = self.resilience.breakers.peek(peer_id)
            if breaker is not None:
                breaker.reset()
        retiring = [self.stream_service.retire_peer(peer_id, forget=True) for peer_id in removed]
        retiring += [self.stream_service.retire_peer(peer_id) for peer_id in sorted(rekeyed | moved)]
        if retiring:
            closed += sum(await asyncio.gather(*retiring))
        result = PeerChanges(tuple(peer.id for peer in added), tuple(removed), changed, closed, retargeted)
        _log.info(
            "peers %s: %s",
            "reconfigured" if source == "static" else f"changed by {source}",
            json.dumps(result.as_dict(), separators=(",", ":")),
        )
        return result

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopped else "new"
        return (
            f"<Node {self.peer_id} {state} listen={self.address or self.listen} peers={len(self.discovery)}>"
        )
