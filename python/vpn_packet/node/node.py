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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpn_packet.dispatcher import Dispatcher
from vpn_packet.metrics import DispatcherMetrics
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.pool import StreamPool, StreamPoolMetrics
from vpn_packet.transport.receiver import Receiver, ReceiverMetrics, Sink
from vpn_packet.transport.tcp import TcpStreamService
from vpn_packet.tuning import DEFAULT_TUNING, NODE_RESILIENCE, SHUTDOWN_TIMEOUT, Tuning
from vpn_packet.worker import WorkerMetrics

__all__ = ["Node", "NodeMetrics"]


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
        }
        out["receiver"] = dataclasses.asdict(self.receiver)
        return out


def node_drops(metrics: Mapping[str, Any]) -> dict[str, int]:
    """Every drop counter of a node, from `NodeMetrics.as_dict()`, flattened (`rejected.queue_full`, ...):
    packets (rejected, failed, discarded by the dispatcher; spoofed, unparsable, refused by the sink at the
    receiver) and connections refused either way (`refused_by_peer.key_mismatch`: a peer refused us;
    `receiver.refused.unknown_peer`: we refused a connection; `receiver.handshake_failures.timeout`), so that
    a tunnel that never came up cannot end with `drops: none`. The one place drops are summed up (the node's
    summary, its warnings and the demo's table read it)."""
    out: dict[str, int] = {}
    dispatcher = metrics["dispatcher"]
    for group in ("rejected", "failed", "discarded"):
        for reason, n in dispatcher[f"{group}_by_reason"].items():
            out[f"{group}.{reason}"] = int(n)
    receiver = metrics["receiver"]
    for key in ("spoofed_dropped", "unparsable_dropped", "sink_failed"):
        out[f"receiver.{key}"] = int(receiver[key])
    for family in ("protocol_errors", "refused", "handshake_failures"):
        for reason, n in receiver[family].items():
            out[f"receiver.{family}.{reason}"] = int(n)
    for key in ("rejected_pending", "evicted_pending"):
        out[f"receiver.{key}"] = int(receiver[key])
    for reason, n in metrics["refusals"].items():
        out[f"refused_by_peer.{reason}"] = int(n)
    return out


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
        **changes: Any,
    ) -> None:
        t = self.tuning = tuning.with_changes(**changes)
        self.security = security
        self.peer_id = security.local_id
        self.listen = listen
        self.peers: list[Peer] = list(peers)
        self.stop_timeout = stop_timeout
        self.discovery = StaticPeerDiscovery(self.peers)
        self.stream_service = TcpStreamService(
            self.discovery,
            security,
            connect_timeout=t.connect_timeout,
            write_timeout=t.write_timeout,
            send_buffer=t.send_buffer,
        )
        self.pool = StreamPool(
            self.stream_service,
            max_streams_per_peer=t.max_streams_per_peer,
            idle_timeout=t.stream_idle_timeout,
        )
        if isinstance(resilience, ResilienceService):
            self.resilience = resilience
        else:
            self.resilience = ResilienceService(NODE_RESILIENCE if resilience is None else resilience)
        self.dispatcher = Dispatcher(
            self.discovery,
            self.stream_service,
            self.pool,
            worker_idle_timeout=t.worker_idle_timeout,
            worker_cleanup_interval=t.worker_cleanup_interval,
            worker_buffer_size=t.worker_buffer_size,
            resilience_service=self.resilience,
            max_workers=t.max_workers,
            coalesce=t.coalesce,
        )
        host, port = listen
        self.receiver = Receiver(
            self.discovery,
            sink if sink is not None else _discard,
            host=host,
            port=port,
            security=security,
            hello_timeout=t.hello_timeout,
            idle_timeout=t.idle_timeout,
            max_pending=t.max_pending,
            max_pending_per_source=t.max_pending_per_source,
            max_batch=t.receive_batch,
            max_connections=t.max_connections,
            max_connections_per_peer=t.max_connections_per_peer,
            read_size=t.read_size,
        )
        self._started = False
        self._stopped = False
        self._sending_stopped = False

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
        )

    def worker_metrics(self) -> dict[str, WorkerMetrics]:
        return self.dispatcher.worker_metrics()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopped else "new"
        return f"<Node {self.peer_id} {state} listen={self.address or self.listen} peers={len(self.peers)}>"
