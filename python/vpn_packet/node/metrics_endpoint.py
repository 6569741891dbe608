"""The metrics endpoint of a node (`node.metrics_listen`): GET /metrics and GET /metrics.json over HTTP.

- /metrics is `prometheus_client`'s own exposition (`make_wsgi_app` on a registry holding one
  `NodeCollector`): the text format, OpenMetrics when the scraper asks for it, gzip. The samples are
  `vpn_packet.metrics.prometheus_samples` for the dispatcher plus the node's own (`node_samples`), so there
  is one sample builder, not a second exporter.
- /metrics.json is the same snapshot as `TunNode.metrics()`, as JSON (for `curl` and scripts).
- Anything else is 404.

Why a thread: prometheus_client serves from a threaded WSGI server (the standard library's `wsgiref`), and a
scrape runs in one of its threads while the node's counters belong to the asyncio loop. The scrape thread
therefore never reads them itself: it asks the loop for a snapshot (`asyncio.run_coroutine_threadsafe`) and
waits at most `timeout` seconds, so a busy loop delays a scrape a little and a stuck one fails it (HTTP 500)
instead of hanging the scraper or racing the data path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from vpn_packet.metrics import DispatcherMetrics, Sample, prometheus_samples

__all__ = ["MetricsEndpoint", "NodeCollector", "node_samples"]

_log = logging.getLogger("vpn_packet.node")

Snapshot = Callable[[], Mapping[str, Any]]
"""A `TunNode.metrics()`-shaped snapshot: `node` (dispatcher, receiver, connects), `tun`, `uptime`."""

_RECEIVER_COUNTERS = (
    "connections",
    "frames",
    "bytes",
    "packets_delivered",
    "extra_segments",
    "spoofed_dropped",
    "unparsable_dropped",
    "offload_invalid",
    "sink_raised",
    "sink_cancelled",
    "tun_dropped",
    "tun_refused",
    "sink_failed",  # deprecated alias (vpn_packet.deprecation): the four above it together
    "connection_errors",
    "idle_closed",
    "superseded",
    "rejected_pending",
    "evicted_pending",
)
_PEER_COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
_TUN_COUNTERS = (
    "packets_read",
    "bytes_read",
    "read_events",
    "read_errors",
    "packets_written",
    "bytes_written",
    "write_errors",
    "write_dropped",
)


def node_samples(snapshot: Mapping[str, Any], prefix: str = "vpn_packet") -> Iterator[Sample]:
    """The samples of a node snapshot: the dispatcher's (`prometheus_samples`), then the receiver's, the TUN
    device's, connections, each peer's (labelled `peer`, from the snapshot's `peers`) and uptime."""
    node = snapshot["node"]
    yield from prometheus_samples(DispatcherMetrics(**node["dispatcher"]), prefix=prefix)
    receiver = node["receiver"]
    for key in _RECEIVER_COUNTERS:
        if key in receiver:
            yield f"{prefix}_receiver_{key}_total", "counter", {}, receiver[key]
    yield f"{prefix}_receiver_active_connections", "gauge", {}, receiver["active_connections"]
    yield f"{prefix}_receiver_pending_connections", "gauge", {}, receiver.get("pending", 0)
    for family in ("protocol_errors", "refused", "handshake_failures"):
        for reason, n in receiver.get(family, {}).items():
            yield f"{prefix}_receiver_{family}_total", "counter", {"reason": reason}, n
    tun = snapshot.get("tun") or {}
    for key in _TUN_COUNTERS:
        if key in tun:
            yield f"{prefix}_tun_{key}_total", "counter", {}, tun[key]
    if "backlog" in tun:  # deprecated alias (vpn_packet.deprecation): always 0, there is no backlog
        yield f"{prefix}_tun_write_backlog", "gauge", {}, tun["backlog"]
    for key, n in (tun.get("kernel") or {}).items():  # the kernel's own counters of the device
        yield f"{prefix}_tun_kernel_{key}_total", "counter", {}, n
    yield f"{prefix}_connects_total", "counter", {}, node["connects"]
    yield f"{prefix}_connect_failures_total", "counter", {}, node["connect_failures"]
    for reason, n in node.get("refusals", {}).items():  # peers that refused our handshake, by their reason
        yield f"{prefix}_refused_by_peer_total", "counter", {"reason": reason}, n
    discovery = snapshot.get("discovery")
    if discovery is not None:  # [discovery]: the mesh's state (etcd, refusals by reason, alarms)
        yield f"{prefix}_discovery_connected", "gauge", {}, int(discovery["connected"])
        yield f"{prefix}_discovery_revision", "gauge", {}, discovery["revision"]
        yield f"{prefix}_discovery_members", "gauge", {}, discovery["members"]
        yield f"{prefix}_discovery_overlap_alarms_total", "counter", {}, discovery["overlap_alarms"]
        for reason, n in discovery["refused"].items():
            yield f"{prefix}_discovery_refused_total", "counter", {"reason": reason}, n
    for peer in snapshot.get("peers", ()):  # `Node.peer_status`: the snapshot `vpn-packet status` shows
        labels = {"peer": peer["id"], "source": peer.get("source", "static")}
        for key in _PEER_COUNTERS:
            yield f"{prefix}_peer_{key}_total", "counter", labels, peer[key]
        yield f"{prefix}_peer_connected", "gauge", labels, int(peer["connected"])
        for direction, n in peer["connections"].items():
            yield f"{prefix}_peer_connections", "gauge", {**labels, "direction": direction}, n
        for reason, n in peer["drops"].items():
            yield f"{prefix}_peer_drops_total", "counter", {**labels, "reason": reason}, n
        breaker = peer["breaker"]
        for state in ("closed", "open", "half_open"):
            yield f"{prefix}_peer_breaker_state", "gauge", {**labels, "state": state}, int(breaker == state)
    yield f"{prefix}_uptime_seconds", "gauge", {}, snapshot["uptime"]


class NodeCollector:
    """A `prometheus_client` custom collector of a node: one metric family per sample name.

    `snapshot` is called on every scrape from the scrape's thread; `MetricsEndpoint` passes one that fetches
    the snapshot on the asyncio loop.
    """

    def __init__(self, snapshot: Snapshot, *, prefix: str = "vpn_packet") -> None:
        self._snapshot = snapshot
        self._prefix = prefix

    def describe(self) -> list[Any]:
        """Nothing up front: the label sets depend on the data (prometheus_client then calls `collect`)."""
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        families: dict[str, Metric] = {}
        for name, kind, labels, value in node_samples(self._snapshot(), self._prefix):
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(name, name.replace("_", " "), labels=sorted(labels))
                families[name] = family
            family.add_metric([labels[k] for k in sorted(labels)], value)  # type: ignore[attr-defined]
        return list(families.values())


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, daemon threads (a stuck scrape never holds up the process's exit)."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes come every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


class MetricsEndpoint:
    """Serves a node's metrics over HTTP from a thread; see the module docstring.

    `snapshot` runs on the asyncio loop that called `start()`; `timeout` bounds how long a scrape waits for
    it. `start(host, port)` binds (port 0: any free port, see `address`); `stop()` closes the socket and
    waits for the server thread. Both are idempotent.
    """

    def __init__(self, snapshot: Snapshot, *, timeout: float = 2.0, prefix: str = "vpn_packet") -> None:
        self._snapshot = snapshot
        self.timeout = timeout
        self._prefix = prefix
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound `(host, port)`, or None when not serving."""
        if self._server is None:
            return None
        name = self._server.socket.getsockname()
        return name[0], name[1]

    def snapshot(self) -> Mapping[str, Any]:
        """The node's snapshot, taken on its loop; callable from any thread. Raises `TimeoutError` when the
        loop does not answer within `timeout` seconds."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the metrics endpoint is not started")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # already on the loop: waiting for it would deadlock
            return self._snapshot()

        async def take() -> Mapping[str, Any]:
            return self._snapshot()

        future = asyncio.run_coroutine_threadsafe(take(), loop)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"the node did not give a metrics snapshot within {self.timeout:g}s") from None

    def _app(self) -> Callable[..., Iterable[bytes]]:
        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(self.snapshot, prefix=self._prefix))
        prometheus_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                result: Iterable[bytes] = prometheus_app(environ, start_response)
                return result
            if path == "/metrics.json" and environ.get("REQUEST_METHOD") == "GET":
                body = json.dumps(self.snapshot(), default=str).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
                return [body]
            if path == "/metrics.json":
                start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Type", "text/plain")])
                return [b"GET only\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"try /metrics or /metrics.json\n"]

        return app

    async def start(self, host: str, port: int) -> None:
        """Bind `host:port` and serve from a daemon thread. Raises `OSError` when the address is taken."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        server_class = _Server6 if ":" in host else _Server
        server = make_server(host, port, self._app(), server_class=server_class, handler_class=_QuietHandler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-endpoint", daemon=True
        )
        self._thread.start()
        _log.info("metrics on http://%s:%d/metrics (and /metrics.json)", *(self.address or (host, port)))

    async def stop(self) -> None:
        """Stop serving and close the socket (the port is free when this returns)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        # `shutdown` waits for `serve_forever` to notice; off the loop, so that a scrape waiting for a
        # snapshot from the loop can still get it meanwhile.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join)
