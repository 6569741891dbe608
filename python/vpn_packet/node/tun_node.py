"""`vpn-packet node --config FILE.toml`: a VPN node on a Linux TUN device.

`TunNode` = a `TunDevice` + a `vpn_packet.node.node.Node`: every readiness event of the TUN reads all
ready packets and hands them to `Node.send_batch` (the dispatcher: per-destination workers, stream pool, TCP
or mutual-TLS streams to the peer owning each destination); the node's receiver checks each received packet's
source against the sending peer's allowed prefixes and its sink writes the accepted batches to the TUN.

Lifecycle: `start()` opens the TUN (so the interface and its addresses exist), starts the node (receiver
first), then starts reading the TUN. `shutdown()` goes in order under one deadline (`node.shutdown_timeout`):
stop reading the TUN, drain the dispatcher and close the streams (buffered bytes flushed), stop the receiver,
close the TUN. The command runs until SIGINT or SIGTERM, logs live metrics on SIGUSR1 (and writes them to
`node.metrics_file` when configured; `node.metrics_listen` serves them over HTTP as /metrics in the
Prometheus text format and /metrics.json), warns about drops at most once per `node.drop_log_interval` and
prints a metrics summary at exit. Exit status: 0 after a clean shutdown, 1 when the shutdown deadline was
hit or the TUN device failed (deleted under the node), 2 for a bad configuration or a missing privilege (one
line on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vpn_packet.node.config import NodeConfig

if TYPE_CHECKING:
    import ssl

    from vpn_packet.node.node import Node
    from vpn_packet.transport.tun import TunDevice

__all__ = ["TunNode", "drop_counters", "prometheus_text", "run_node", "tls_contexts"]

_log = logging.getLogger("vpn_packet.node")

#: `run_node` exit statuses (the command's): 0 clean, 1 shutdown deadline hit or TUN device failed.
EXIT_OK = 0
EXIT_DEADLINE = 1
EXIT_FAILED = 1


def tls_contexts(config: NodeConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) contexts from `[tls]`, or (None, None)."""
    tls = config.tls
    if tls is None:
        return None, None
    from vpn_packet.transport.tls import client_context, fingerprint, server_context

    if tls.ca is not None:
        return (
            server_context(tls.cert, tls.key, ca=tls.ca),
            client_context(tls.cert, tls.key, ca=tls.ca),
        )
    certs = {peer.id: peer.cert for peer in config.peers if peer.cert is not None}
    return (
        server_context(tls.cert, tls.key, pinned_certs=list(certs.values())),
        client_context(tls.cert, tls.key, pinned={pid: fingerprint(path) for pid, path in certs.items()}),
    )


def drop_counters(metrics: dict[str, Any]) -> dict[str, int]:
    """Every packet drop counter of a `TunNode.metrics()` snapshot, flattened (`rejected.queue_full`, ...)."""
    out: dict[str, int] = {}
    dispatcher = metrics["node"]["dispatcher"]
    for group in ("rejected", "failed", "discarded"):
        for reason, n in dispatcher[f"{group}_by_reason"].items():
            out[f"{group}.{reason}"] = int(n)
    receiver = metrics["node"]["receiver"]
    for key in ("spoofed_dropped", "unparsable_dropped", "sink_failed"):
        out[f"receiver.{key}"] = int(receiver[key])
    tun = metrics["tun"]
    if tun is not None:
        out["tun.write_dropped"] = int(tun["write_dropped"])
        out["tun.write_errors"] = int(tun["write_errors"])
    return out


def prometheus_text(metrics: dict[str, Any], prefix: str = "vpn_packet") -> str:
    """A `TunNode.metrics()` snapshot in the Prometheus text exposition format: the dispatcher's samples
    (`vpn_packet.metrics.prometheus_samples`), the receiver's and the TUN device's counters."""
    from vpn_packet.metrics import DispatcherMetrics, prometheus_samples

    node = metrics["node"]
    dispatcher = DispatcherMetrics(**node["dispatcher"])
    samples: list[tuple[str, str, dict[str, str], float]] = list(
        prometheus_samples(dispatcher, prefix=prefix)
    )
    receiver = node["receiver"]
    for key in (
        "connections",
        "frames",
        "bytes",
        "packets_delivered",
        "spoofed_dropped",
        "unparsable_dropped",
        "sink_failed",
        "connection_errors",
        "rejected_connections",
        "identity_mismatch",
        "unknown_peer",
    ):
        samples.append((f"{prefix}_receiver_{key}_total", "counter", {}, receiver[key]))
    samples.append((f"{prefix}_receiver_active_connections", "gauge", {}, receiver["active_connections"]))
    for reason, n in receiver["protocol_errors"].items():
        samples.append((f"{prefix}_receiver_protocol_errors_total", "counter", {"reason": reason}, n))
    tun = metrics["tun"] or {}
    for key in (
        "packets_read",
        "bytes_read",
        "read_events",
        "read_errors",
        "packets_written",
        "bytes_written",
        "write_errors",
        "write_dropped",
    ):
        if key in tun:
            samples.append((f"{prefix}_tun_{key}_total", "counter", {}, tun[key]))
    if "backlog" in tun:
        samples.append((f"{prefix}_tun_write_backlog", "gauge", {}, tun["backlog"]))
    samples.append((f"{prefix}_connects_total", "counter", {}, node["connects"]))
    samples.append((f"{prefix}_connect_failures_total", "counter", {}, node["connect_failures"]))
    samples.append((f"{prefix}_uptime_seconds", "gauge", {}, metrics["uptime"]))
    lines: list[str] = []
    typed: set[str] = set()
    for name, kind, labels, value in samples:
        if name not in typed:
            typed.add(name)
            lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(lines) + "\n"


class TunNode:
    """A node on a TUN device, from a `NodeConfig`; see the module docstring.

    `tun_factory` opens the device (default `TunDevice.open`; tests pass a fake).
    """

    def __init__(self, config: NodeConfig, *, tun_factory: Callable[..., TunDevice] | None = None) -> None:
        from vpn_packet.node.node import Node
        from vpn_packet.transport.tun import TunDevice

        self.config = config
        self._tun_factory = tun_factory if tun_factory is not None else TunDevice.open
        self.tun: TunDevice | None = None
        t = config.tuning
        ssl_server, ssl_client = tls_contexts(config)
        self.node: Node = Node(
            config.node.id,
            config.listen,
            [peer.to_peer() for peer in config.peers],
            self._sink,
            ssl_server=ssl_server,
            ssl_client=ssl_client,
            connect_timeout=t.connect_timeout,
            write_timeout=t.write_timeout,
            send_buffer=t.send_buffer,
            max_streams_per_peer=t.max_streams_per_peer,
            stream_idle_timeout=t.stream_idle_timeout,
            worker_buffer_size=t.worker_buffer_size,
            max_workers=t.max_workers,
            coalesce=t.coalesce,
            resilience=config.resilience,
            receiver_options={
                "max_batch": t.receive_batch,
                "read_size": t.read_size,
                "max_connections": t.max_connections,
                "max_connections_per_peer": t.max_connections_per_peer,
                "hello_timeout": t.hello_timeout,
            },
            stop_timeout=config.node.shutdown_timeout,
        )
        self._started_at: float | None = None
        self._state = "new"
        self._last_drops: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.error: OSError | None = None  # the TUN failed for good
        self._metrics_server: asyncio.Server | None = None
        self.failed = asyncio.Event()  # set when it does

    # --- data path ------------------------------------------------------------------------------------------

    def _sink(self, peer_id: str, packets: list[bytes]) -> None:
        tun = self.tun
        if tun is not None:
            tun.write_batch(packets)

    def _on_tun_batch(self, packets: list[bytes]) -> None:
        self.node.send_batch(packets)

    def _on_tun_error(self, error: OSError) -> None:
        """The TUN device is gone (deleted under us): the node cannot work; `failed` is set."""
        self.error = error
        self.failed.set()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the TUN, start the node, start reading. On failure everything started is undone."""
        if self._state != "new":
            raise RuntimeError(f"TunNode is {self._state}; it is started once")
        self._state = "starting"
        iface = self.config.interface
        try:
            self.tun = self._tun_factory(
                iface.name,
                address=list(iface.addresses),
                mtu=iface.mtu,
                txqueuelen=iface.txqueuelen,
                max_backlog=self.config.tuning.write_backlog,
            )
        except BaseException:
            self._state = "stopped"
            raise
        try:
            await self.node.start()
        except BaseException:
            self.tun.close()
            self._state = "stopped"
            raise
        self.tun.start_reading(
            self._on_tun_batch, max_packets=self.config.tuning.read_batch, on_error=self._on_tun_error
        )
        self._started_at = time.monotonic()
        self._state = "running"
        self._spawn(self._drop_logger())
        if self.config.node.metrics_listen is not None:
            try:
                await self._start_metrics_server(*self.config.node.metrics_listen)
            except BaseException:
                await self.shutdown()
                raise
        if self.config.node.metrics_interval > 0 and self.config.node.metrics_file is not None:
            self._spawn(self._metrics_writer())
        _log.info(
            "node %s running: %s on %s, listening on %s:%d, %d peers%s",
            self.config.node.id,
            ", ".join(iface.addresses),
            self.tun.name,
            *(self.node.address or self.config.listen),
            len(self.config.peers),
            ", mutual TLS" if self.config.tls is not None else "",
        )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a deadline, documented
        """Stop reading, drain and close the streams, stop the receiver, close the TUN - all within
        `timeout` seconds (default `node.shutdown_timeout`). True when it finished in time. Idempotent."""
        if self._state in ("stopping", "stopped"):
            return True
        self._state = "stopping"
        timeout = self.config.node.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        clean = True
        for task in list(self._tasks):
            task.cancel()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self.tun is not None:
            self.tun.stop_reading()
        _log.info(
            "shutting down: stopped reading %s, draining (deadline %gs)", self.config.interface.name, timeout
        )
        try:
            async with asyncio.timeout(timeout):
                # Most of the deadline for the drain; the receiver and the rest get what is left.
                await self.node.stop_sending(timeout * 0.8)
                await self.node.stop(max(deadline - time.monotonic(), 0.01))
        except TimeoutError:
            clean = False
            _log.error("shutdown deadline of %gs reached; closing what is left", timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.node.receiver.stop(0.1), 0.5)
        finally:
            if self.tun is not None:
                self.tun.close()
            self._state = "stopped"
        return clean

    @property
    def running(self) -> bool:
        return self._state == "running"

    # --- metrics and logging --------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Plain nested dicts: `node` (dispatcher, pool, connections, receiver), `tun`, uptime."""
        node = self.node.metrics().as_dict()
        node["receiver_peers"] = {
            peer_id: dataclasses.asdict(m) for peer_id, m in self.node.receiver.peer_metrics().items()
        }
        return {
            "id": self.config.node.id,
            "state": self._state,
            "uptime": 0.0 if self._started_at is None else round(time.monotonic() - self._started_at, 3),
            "tun": dataclasses.asdict(self.tun.metrics()) if self.tun is not None else None,
            "node": node,
        }

    def report_metrics(self) -> dict[str, Any]:
        """Logs the live metrics (one JSON line) and writes `metrics_file` when configured."""
        snapshot = self.metrics()
        _log.info("metrics %s", json.dumps(snapshot, separators=(",", ":"), default=str))
        self.write_metrics_file(snapshot)
        return snapshot

    def write_metrics_file(self, snapshot: dict[str, Any] | None = None) -> None:
        path = self.config.node.metrics_file
        if path is None:
            return
        snapshot = self.metrics() if snapshot is None else snapshot
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot, indent=1, default=str) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            _log.warning("cannot write metrics file %s: %s", path, exc)

    def log_drops(self) -> dict[str, int]:
        """Logs one warning with every drop counter that grew since the last call; returns the increases."""
        current = drop_counters(self.metrics())
        grown = {
            k: v - self._last_drops.get(k, 0) for k, v in current.items() if v > self._last_drops.get(k, 0)
        }
        self._last_drops = current
        if grown:
            text = ", ".join(f"{k}={v}" for k, v in sorted(grown.items()))
            _log.warning("dropped %d packets since the last report: %s", sum(grown.values()), text)
        return grown

    async def _drop_logger(self) -> None:
        interval = self.config.node.drop_log_interval
        while True:
            await asyncio.sleep(interval)
            self.log_drops()

    async def _metrics_writer(self) -> None:
        while True:
            await asyncio.sleep(self.config.node.metrics_interval)
            self.write_metrics_file()

    # --- metrics endpoint -----------------------------------------------------------------------------------

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens (`node.metrics_listen`, port 0 resolved), or None."""
        if self._metrics_server is None or not self._metrics_server.sockets:
            return None
        name = self._metrics_server.sockets[0].getsockname()
        return name[0], name[1]

    async def _start_metrics_server(self, host: str, port: int) -> None:
        self._metrics_server = await asyncio.start_server(self._serve_metrics, host, port)
        _log.info(
            "metrics on http://%s:%d/metrics (and /metrics.json)", *(self.metrics_address or (host, port))
        )

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 responder: GET /metrics (Prometheus text format) and GET /metrics.json."""
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("ascii", "replace").split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != b"GET":
                status, kind, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, kind = "200 OK", "text/plain; version=0.0.4"
                body = prometheus_text(self.metrics()).encode()
            elif path == "/metrics.json":
                status, kind = "200 OK", "application/json"
                body = json.dumps(self.metrics(), default=str).encode()
            else:
                status, kind, body = "404 Not Found", "text/plain", b"try /metrics or /metrics.json\n"
            head = f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def summary(self) -> str:
        """A few human-readable lines: traffic both ways, drops, connections."""
        m = self.metrics()
        d = m["node"]["dispatcher"]
        r = m["node"]["receiver"]
        t = m["tun"] or {}
        uptime = max(m["uptime"], 1e-9)
        drops = {k: v for k, v in drop_counters(m).items() if v}
        lines = [
            f"node {m['id']}: up {m['uptime']:.1f}s",
            f"  tun read    {t.get('packets_read', 0):>12,} packets {t.get('bytes_read', 0):>15,} bytes"
            f"  ({t.get('bytes_read', 0) * 8 / uptime / 1e6:.1f} Mbit/s avg)",
            f"  sent        {d['sent']:>12,} packets {d['bytes_sent']:>15,} bytes"
            f"  (accepted {d['accepted']:,}, rejected {d['rejected']:,}, failed {d['failed']:,})",
            f"  received    {r['packets_delivered']:>12,} packets {r['bytes']:>15,} bytes"
            f"  (frames {r['frames']:,}, connections {r['connections']:,})",
            f"  tun written {t.get('packets_written', 0):>12,} packets"
            f" {t.get('bytes_written', 0):>15,} bytes",
            f"  connects {m['node']['connects']:,}, connect failures {m['node']['connect_failures']:,}",
            "  drops: " + (", ".join(f"{k}={v:,}" for k, v in sorted(drops.items())) if drops else "none"),
        ]
        return "\n".join(lines)


async def run_node(config: NodeConfig, *, ready: Callable[[TunNode], None] | None = None) -> int:
    """Runs a `TunNode` until SIGINT/SIGTERM; returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    node = TunNode(config)
    await node.start()
    handled: list[signal.Signals] = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        loop.add_signal_handler(signal.SIGUSR1, node.report_metrics)
        handled.append(signal.SIGUSR1)
        if ready is not None:
            ready(node)
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(node.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if node.error is not None:
            _log.error("TUN %s failed (%s); shutting down", config.interface.name, node.error)
        else:
            _log.info("signal received")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        # A second SIGINT/SIGTERM during the shutdown ends the process the default way.
        clean = await node.shutdown()
        node.log_drops()
        node.write_metrics_file()
        print(node.summary(), flush=True)
    if node.error is not None:
        return EXIT_FAILED
    return EXIT_OK if clean else EXIT_DEADLINE
