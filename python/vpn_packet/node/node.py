"""A node: everything one host needs to send packets to its peers and receive theirs, minus the TUN device.

`Node` wires a `StaticPeerDiscovery` (the peers and their allowed prefixes), a `TcpStreamService` and a
`StreamPool` (sending), a `ResilienceService` and a `Dispatcher` (per-destination ordering, retry, breaker),
and a `Receiver` (listening, framing, anti-spoofing) that hands received packets to `sink`. A TUN-backed
node (a later issue) wraps one: its TUN reader calls `send_batch`, its sink writes to the device.

    node = Node("node-a", ("127.0.0.1", 7000), peers=[Peer("node-b", "127.0.0.1:7001", ["10.8.0.2/32"])],
                sink=on_packets)
    async with node:
        node.send_batch(packets)

`start()` brings the parts up receiver first; `stop()` takes them down in the order that loses nothing
still deliverable: stop dispatching and drain the workers (bounded by `stop_timeout`), close the pool
(buffered bytes are flushed before the sockets close), then stop the receiver.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vpn_packet.dispatcher import DEFAULT_MAX_WORKERS, Dispatcher
from vpn_packet.metrics import DispatcherMetrics
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.pool import StreamPool, StreamPoolMetrics
from vpn_packet.transport.receiver import Receiver, ReceiverMetrics, Sink
from vpn_packet.transport.tcp import DEFAULT_SEND_BUFFER, TcpStreamService
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
        }
        out["receiver"] = dataclasses.asdict(self.receiver)
        return out


class Node:
    """One host of the data plane: sends to peers through a dispatcher, receives from them into `sink`.

    - `peer_id`, `listen`: our id and the `(host, port)` the receiver binds (port 0: any free port; see
      `address` after `start()`).
    - `peers`: the other nodes (id, endpoint, allowed prefixes): where to send a destination, and which
      source addresses each may use when it sends to us.
    - `sink`: gets `(peer_id, packets)` for what arrives (default: discarded).
    - `ssl_server` / `ssl_client`: contexts from `vpn_packet.transport.tls` for mutual TLS (both or none).
    - sending options: `connect_timeout`, `write_timeout`, `send_buffer`, `max_streams_per_peer`,
      `stream_idle_timeout`; dispatcher options: `worker_buffer_size`, `worker_idle_timeout`,
      `worker_cleanup_interval`, `max_workers`, `coalesce` (None: the dispatcher's default); `resilience`
      (a config or a service); `receiver_options` (extra keyword arguments for `Receiver`); `stop_timeout`:
      how long `stop()` drains.
    """

    def __init__(
        self,
        peer_id: str,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        peers: Iterable[Peer] = (),
        sink: Sink | None = None,
        *,
        ssl_server: ssl.SSLContext | None = None,
        ssl_client: ssl.SSLContext | None = None,
        connect_timeout: float = 5.0,
        write_timeout: float = 10.0,
        send_buffer: int | None = DEFAULT_SEND_BUFFER,
        max_streams_per_peer: int = 4,
        stream_idle_timeout: float = 60.0,
        worker_buffer_size: int = 1024,
        worker_idle_timeout: float = 300.0,
        worker_cleanup_interval: float = 60.0,
        max_workers: int = DEFAULT_MAX_WORKERS,
        coalesce: int | None = None,
        resilience: ResilienceConfig | ResilienceService | None = None,
        receiver_options: Mapping[str, Any] | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        if (ssl_server is None) != (ssl_client is None):
            raise ValueError("mutual TLS needs both ssl_server and ssl_client (or neither)")
        self.peer_id = peer_id
        self.listen = listen
        self.peers: list[Peer] = list(peers)
        self.stop_timeout = stop_timeout
        self.discovery = StaticPeerDiscovery(self.peers)
        self.stream_service = TcpStreamService(
            self.discovery,
            peer_id,
            ssl_context=ssl_client,
            connect_timeout=connect_timeout,
            write_timeout=write_timeout,
            send_buffer=send_buffer,
        )
        self.pool = StreamPool(
            self.stream_service, max_streams_per_peer=max_streams_per_peer, idle_timeout=stream_idle_timeout
        )
        if isinstance(resilience, ResilienceService):
            self.resilience = resilience
        else:
            self.resilience = ResilienceService(resilience)
        extra: dict[str, Any] = {} if coalesce is None else {"coalesce": coalesce}
        self.dispatcher = Dispatcher(
            self.discovery,
            self.stream_service,
            self.pool,
            worker_idle_timeout=worker_idle_timeout,
            worker_cleanup_interval=worker_cleanup_interval,
            worker_buffer_size=worker_buffer_size,
            resilience_service=self.resilience,
            max_workers=max_workers,
            **extra,
        )
        host, port = listen
        self.receiver = Receiver(
            self.discovery,
            sink if sink is not None else _discard,
            host=host,
            port=port,
            ssl_context=ssl_server,
            **dict(receiver_options or {}),
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
            receiver=self.receiver.metrics(),
        )

    def worker_metrics(self) -> dict[str, WorkerMetrics]:
        return self.dispatcher.worker_metrics()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._stopped else "new"
        return f"<Node {self.peer_id} {state} listen={self.address or self.listen} peers={len(self.peers)}>"
