"""`vpn-packet node --config FILE.toml`: a VPN node on a Linux TUN device.

`TunNode` = a `TunDevice` + a `vpn_packet.node.node.Node`: every readiness event of the TUN reads all
ready packets and hands them to `Node.send_batch` (the dispatcher: per-destination workers, stream pool, TCP
or mutual-TLS streams to the peer owning each destination); the node's receiver checks each received packet's
source against the sending peer's allowed prefixes and its sink writes the accepted batches to the TUN.

Lifecycle: `start()` opens the TUN (so the interface and its addresses exist), starts the node (receiver
first), then starts reading the TUN. `shutdown()` goes in order under one deadline (`node.shutdown_timeout`):
stop reading the TUN, drain the dispatcher and close the streams (buffered bytes flushed), stop the receiver,
close the TUN. The command runs until SIGINT or SIGTERM, logs live metrics on SIGUSR1 (and writes them to
`node.metrics_file` when configured; `node.metrics_listen` serves them over HTTP, see
`vpn_packet.node.metrics_endpoint`), warns about drops at most once per `node.drop_log_interval` and
prints a metrics summary at exit.

Operating it: the node serves `vpn-packet status` and `vpn-packet reload` on its control socket
(`vpn_packet.node.control`; `/run/vpn-packet/NAME.sock` or `node.control_socket`). `status` answers with
`metrics()`, the same snapshot as the SIGUSR1 line, the metrics file and the metrics endpoint (`peers`: the
per-peer snapshot of `Node.peer_status`; `totals`). `reload()` (also on SIGHUP) re-reads the config file
and applies the difference in `[[peers]]` without a restart (`Node.reconfigure`); a file that does not
validate is refused with the one-line error a start gives, and a change anywhere else (`[interface]`,
`[listen]`, `[node]`, `[tls]`, `[tuning]`, `[resilience]`) refuses the whole reload, naming the keys that
need a restart: nothing is half applied, and the running config stays as it was.

The periodic jobs (drop warnings, the metrics file) run in one `asyncio.TaskGroup` owned by one background
task: `shutdown()` cancels that task and so every job, and a job that fails takes the others down with it
(logged) instead of dying unnoticed. Every knob comes from the config's `vpn_packet.tuning.Tuning`.

Exit status: 0 after a clean shutdown, 1 when the shutdown deadline was hit or the TUN device failed
(deleted under the node), 2 for a bad configuration or a missing privilege (one line on stderr). A start
that fails because of the host's state is a `ConfigError` naming the key: the listen port is taken
(`listen.address: 0.0.0.0:7000 is in use (EADDRINUSE)`, also `node.metrics_listen`), or the interface name
is another device's (`interface.name: vpn0 exists and is not ours (...)`: not a TUN device, or a TUN another
process has open).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from vpn_packet import tuning
from vpn_packet.errors import ConfigError, UsageError
from vpn_packet.node.config import NodeConfig, diff_configs, load_config
from vpn_packet.node.control import ControlServer, default_socket_path
from vpn_packet.node.node import node_drops

if TYPE_CHECKING:
    from vpn_packet.node.metrics_endpoint import MetricsEndpoint
    from vpn_packet.node.node import Node
    from vpn_packet.node.routes import PeerRoutes
    from vpn_packet.transport.tun import TunDevice

__all__ = ["INSECURE_WARNING", "TunNode", "drop_counters", "run_node"]

_log = logging.getLogger("vpn_packet.node")

#: `run_node` exit statuses (the command's): 0 clean, 1 shutdown deadline hit or TUN device failed.
EXIT_OK = 0
EXIT_DEADLINE = 1
EXIT_FAILED = 1

#: Logged at every start of an insecure node, so that nobody runs one without knowing what it gives up.
INSECURE_WARNING = (
    "INSECURE: [node] insecure = true. Traffic is plaintext, and anyone who reaches the listen port can "
    "claim to be a peer and inject packets with its addresses. Use keys (vpn-packet genkey) outside of tests."
)


#: `TUNSETIFF` errors on an interface name that existed before the node started: someone else's device.
_TAKEN: Final = {
    errno.EINVAL: "it is not a TUN device: EINVAL",
    errno.EBUSY: "a TUN device another process has open: EBUSY",
}
#: Errors binding a listening socket that a configuration change fixes, and what they mean.
_BIND_ERRORS: Final = {
    errno.EADDRINUSE: "is in use",
    errno.EADDRNOTAVAIL: "is not an address of this host",
    errno.EACCES: "needs root or CAP_NET_BIND_SERVICE (a port below 1024)",
}


def _interface_exists(name: str) -> bool:
    """Whether network interface `name` exists in this network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _raise_bind_error(key: str, address: tuple[str, int], exc: OSError) -> None:
    """A `ConfigError` naming `key` and the address for a bind error a config change fixes (the port is
    taken, ...): `listen.address: 0.0.0.0:7000 is in use (EADDRINUSE)`. Other errors: returns."""
    if exc.errno not in _BIND_ERRORS:
        return
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise ConfigError(key, f"{shown} {_BIND_ERRORS[exc.errno]} ({errno.errorcode[exc.errno]})") from exc


def _peer_prefixes(config: NodeConfig) -> dict[str, tuple[str, ...]]:
    """Each peer's prefixes, in config order (route conflicts name `peers[i].allowed_ips[j]` by position)."""
    return {peer.id: peer.allowed_ips for peer in config.peers}


def drop_counters(metrics: dict[str, Any]) -> dict[str, int]:
    """Every drop counter of a `TunNode.metrics()` snapshot, flattened: the node's (`node_drops`), the TUN
    device's as we saw them (`tun.write_dropped`, `tun.write_errors`) and the kernel's own counters of the
    device (`tun.kernel_tx_dropped`: packets the kernel dropped because we did not read them in time;
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


class TunNode:
    """A node on a TUN device, from a `NodeConfig`; see the module docstring.

    `tun_factory` opens the device (default `TunDevice.open`; tests pass a fake).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        tun_factory: Callable[..., TunDevice] | None = None,
        manage_routes: bool | None = None,
    ) -> None:
        from vpn_packet.node.node import Node
        from vpn_packet.transport.tun import TunDevice

        self.config = config
        self._tun_factory = tun_factory if tun_factory is not None else TunDevice.open
        self.tun: TunDevice | None = None
        # Routes through the TUN for peer prefixes outside the interface's subnets (`node.routes`). None: only
        # for a real `TunDevice` (a fake one in tests has no interface to route through).
        self._manage_routes = manage_routes
        self.routes: PeerRoutes | None = None
        self.node: Node = Node(
            config.security(),
            config.listen,
            [peer.to_peer() for peer in config.peers],
            self._sink,
            tuning=config.tuning,
            resilience=config.resilience,
            stop_timeout=config.node.shutdown_timeout,
        )
        self._started_at: float | None = None
        self._state = "new"
        self._last_drops: dict[str, int] = {}
        self._background: asyncio.Task[None] | None = None  # runs the TaskGroup of the periodic jobs
        self.error: OSError | None = None  # the TUN failed for good
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._control: ControlServer | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()  # reloads started by SIGHUP
        self.failed = asyncio.Event()  # set when it does

    # --- data path ------------------------------------------------------------------------------------------

    def _sink(self, peer_id: str, packets: list[bytes]) -> None:
        tun = self.tun
        if tun is not None:
            tun.write_batch(packets)

    def _on_tun_batch(self, packets: list[bytes]) -> None:
        self.node.send_batch(packets)

    def _on_tun_buffer(self, data: bytes, lengths: bytes) -> None:
        """A TUN read, as one buffer and its u32 lengths, straight to the dispatcher's native queues."""
        tun = self.tun
        self.node.send_buffer(data, lengths, vnet_header=tun is not None and tun.vnet_header)

    def _on_tun_write_fatal(self, code: int) -> None:
        """A native TUN write found the device gone."""
        if self.error is None:
            self._on_tun_error(OSError(code, os.strerror(code)))

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
        existed = _interface_exists(iface.name)
        try:
            self.tun = self._tun_factory(
                iface.name,
                address=list(iface.addresses),
                mtu=iface.mtu,
                txqueuelen=iface.txqueuelen,
                max_backlog=self.config.tuning.write_backlog,
                offload=iface.offload,
            )
        except BaseException as exc:
            self._state = "stopped"
            if existed and isinstance(exc, OSError) and exc.errno in _TAKEN:
                raise ConfigError(
                    "interface.name", f"{iface.name} exists and is not ours ({_TAKEN[exc.errno]})"
                ) from exc
            raise
        try:
            from vpn_packet.transport.tun import TunDevice

            real = isinstance(self.tun, TunDevice)
            if real:
                # Received packets go from socket to TUN natively (a fake device in tests gets the sink).
                from vpn_packet.transport.receiver import TunTarget

                self.node.receiver.tun_target = TunTarget(
                    self.tun.fd, self.tun.vnet_header, on_fatal=self._on_tun_write_fatal
                )
            manage = self._manage_routes
            if manage if manage is not None else real:
                from vpn_packet.node.routes import PeerRoutes

                self.routes = PeerRoutes(self.tun.name, iface.addresses)
                self.routes.apply(_peer_prefixes(self.config))  # ConfigError on a conflict, nothing left
            try:
                await self.node.start()
            except OSError as exc:
                _raise_bind_error("listen.address", self.config.listen, exc)
                raise
        except BaseException:
            if self.routes is not None:
                self.routes.remove_all()
            self.tun.close()
            self._state = "stopped"
            raise
        if real:  # one buffer per read, no object per packet; a test's fake device hands lists
            self.tun.start_reading(
                self._on_tun_buffer,
                max_packets=self.config.tuning.read_batch,
                on_error=self._on_tun_error,
                buffers=True,
            )
        else:
            self.tun.start_reading(
                self._on_tun_batch, max_packets=self.config.tuning.read_batch, on_error=self._on_tun_error
            )
        self._started_at = time.monotonic()
        self._state = "running"
        self._background = asyncio.get_running_loop().create_task(self._run_jobs(), name="tun-node-jobs")
        if self.config.node.metrics_listen is not None:
            from vpn_packet.node.metrics_endpoint import MetricsEndpoint

            self._metrics_endpoint = MetricsEndpoint(self.metrics)
            try:
                await self._metrics_endpoint.start(*self.config.node.metrics_listen)
            except BaseException as exc:
                await self.shutdown()
                if isinstance(exc, OSError):
                    _raise_bind_error("node.metrics_listen", self.config.node.metrics_listen, exc)
                raise
        await self._start_control()
        if self.config.mode == "insecure":
            _log.warning(INSECURE_WARNING)
        # "running" once the connections to reachable peers are made both ways (bounded): a first packet
        # finds ours, and its reply the peer's.
        connected, peers = await self._settle_connections(tuning.KEEPER_START_WAIT)
        _log.info(
            "node %s running: %s on %s, listening on %s:%d, %d peer%s (%d connected), %s",
            self.config.node.id,
            ", ".join(iface.addresses),
            self.tun.name,
            *(self.node.address or self.config.listen),
            peers,
            "" if peers == 1 else "s",
            connected,
            self.node.security.describe(),
        )

    async def _settle_connections(self, bound: float) -> tuple[int, int]:
        """Wait at most `bound` seconds for the connections to the peers (`ConnectionKeeper.settle`) and from
        the peers we reached (they connect back when they see us: `ConnectionKeeper.poke`); returns
        `(connected, configured)`."""
        keeper = self.node.keeper
        if keeper is None:
            return 0, len(self.config.peers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        connected, peers = await keeper.settle(bound)
        reached = [peer.id for peer in self.config.peers if self.node.pool.streams(peer.id)]
        await self.node.receiver.wait_connected(reached, max(0.0, deadline - loop.time()))
        return connected, peers

    async def _start_control(self) -> None:
        """The control socket. A configured path that cannot be served stops the start (a `ConfigError`
        naming `node.control_socket`); the default one only warns: two nodes in two network namespaces may
        well have the same interface name, and /run is shared."""
        configured = self.config.node.control_socket
        path = configured if configured is not None else default_socket_path(self.config.interface.name)
        control = ControlServer(path, self._on_control)
        try:
            await control.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if configured is not None:
                await self.shutdown()
                raise ConfigError("node.control_socket", f"{path}: {reason}") from exc
            _log.warning(
                "no control socket (vpn-packet status and reload will not reach this node): %s: %s; "
                "set node.control_socket to another path",
                path,
                reason,
            )
            return
        self._control = control

    @property
    def control_path(self) -> Path | None:
        """Where the control socket is (None: not serving)."""
        return None if self._control is None else self._control.path

    async def _on_control(self, command: str) -> dict[str, Any]:
        if command == "status":
            return {"status": self.metrics()}
        if command == "reload":
            return {"reload": await self.reload()}
        raise UsageError(f"unknown command {command!r} (expected status or reload)")

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the difference in `[[peers]]` (see the module docstring).
        Returns what changed (`applied`, `message`, `added`, `removed`, `changed`, ...); raises
        `UsageError` with one line when the file is refused (the running config stays)."""
        async with self._reload_lock:
            path = self.config.path
            if path is None:
                raise UsageError("this node was not started from a config file: nothing to reload")
            if self._state != "running":
                raise UsageError(f"the node is {self._state}")
            try:
                new = load_config(path)
                if new.tls is not None:
                    new.security()  # loads the certificates: a bad file is refused here, not half applied
            except ConfigError as exc:
                raise UsageError(f"{path}: {exc}" if exc.key else str(exc)) from None
            except (OSError, ValueError) as exc:
                raise UsageError(f"{path}: tls: {exc}") from None
            diff = diff_configs(self.config, new)
            if diff.restart:
                keys = ", ".join(diff.restart)
                raise UsageError(
                    f"{path}: not applied: {keys} changed, which needs a restart (the running config stays)"
                )
            answer: dict[str, Any] = {"applied": True, "message": diff.describe(), **diff.as_dict()}
            if not diff.peers_changed:
                self.config = new
                return answer
            peer_keys = (
                {p.id: p.public_key for p in new.peers if p.public_key is not None}
                if new.mode == "key"
                else None
            )
            if self.routes is not None:
                try:  # before the peers change: a conflict refuses the reload with the old routes intact
                    answer["routes"] = self.routes.apply(_peer_prefixes(new)).describe()
                except ConfigError as exc:
                    raise UsageError(f"{path}: {exc}") from None
            try:
                changes = await self.node.reconfigure([p.to_peer() for p in new.peers], peer_keys)
            except ValueError as exc:
                raise UsageError(f"{path}: {exc}") from None
            self.config = new
            answer.update(changes.as_dict())
            answer["message"] = diff.describe()
            return answer

    def reload_in_background(self) -> None:
        """SIGHUP: `reload()` in a task; the outcome is logged (INFO what changed, ERROR why refused)."""

        async def run() -> None:
            try:
                answer = await self.reload()
            except UsageError as exc:
                _log.error("reload refused: %s", exc)
            except Exception:
                _log.exception("reload failed")
            else:
                _log.info("reload applied: %s", answer["message"])

        task = asyncio.get_running_loop().create_task(run(), name="tun-node-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _run_jobs(self) -> None:
        """The periodic jobs, in one task group: cancelled together by `shutdown()`."""
        try:
            async with asyncio.TaskGroup() as jobs:
                jobs.create_task(self._drop_logger())
                if self.config.node.metrics_interval > 0 and self.config.node.metrics_file is not None:
                    jobs.create_task(self._metrics_writer())
        except Exception:
            _log.exception(
                "a periodic job of node %s failed; drop warnings and metrics file stop", self.config.node.id
            )

    async def shutdown(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a deadline, documented
        """Stop reading, drain and close the streams, stop the receiver, close the TUN - all within
        `timeout` seconds (default `node.shutdown_timeout`). True when it finished in time. Idempotent."""
        if self._state in ("stopping", "stopped"):
            return True
        self._state = "stopping"
        timeout = self.config.node.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        clean = True
        background, self._background = self._background, None
        if background is not None:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        control, self._control = self._control, None
        if control is not None:
            await control.stop()
        for task in list(self._reloads):
            task.cancel()
        endpoint, self._metrics_endpoint = self._metrics_endpoint, None
        if endpoint is not None:
            await endpoint.stop()
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
            if self.routes is not None:
                self.routes.remove_all()  # before the TUN goes (with it, its routes would vanish unlogged)
            if self.tun is not None:
                self.tun.close()
            self._state = "stopped"
        return clean

    @property
    def running(self) -> bool:
        return self._state == "running"

    # --- metrics and logging --------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The node's snapshot, plain nested dicts: `peers` (`Node.peer_status`) and `totals` (the stable
        part, documented in `vpn_packet.cli.status`), then `node` (dispatcher, pool, connections, receiver)
        and `tun` in detail. What `vpn-packet status`, SIGUSR1, the metrics file and endpoint show."""
        node = self.node.metrics().as_dict()
        node["receiver_peers"] = {
            peer_id: dataclasses.asdict(m) for peer_id, m in self.node.receiver.peer_metrics().items()
        }
        address = self.node.address or self.config.listen
        snapshot: dict[str, Any] = {
            "id": self.config.node.id,
            "interface": self.config.interface.name,
            "listen": f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}",
            "state": self._state,
            "uptime": 0.0 if self._started_at is None else round(time.monotonic() - self._started_at, 3),
            "peers": self.node.peer_status(),
            "totals": self.node.totals(node),
            "tun": self._tun_metrics(),
            "node": node,
        }
        snapshot["totals"]["drops"] = {k: v for k, v in drop_counters(snapshot).items() if v}
        return snapshot

    def _tun_metrics(self) -> dict[str, Any] | None:
        tun = self.tun
        if tun is None:
            return None
        out = dataclasses.asdict(tun.metrics())
        target = self.node.receiver.tun_target
        if target is not None:  # what the receiver wrote to the device natively
            out["packets_written"] += target.packets_written
            out["bytes_written"] += target.bytes_written
        out["kernel"] = {} if tun.closed else tun.kernel_counters()
        return out

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
            n = sum(grown.values())
            what = "packet" if n == 1 else "packets"
            _log.warning("dropped %d %s since the last report: %s", n, what, text)
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

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics endpoint listens (`node.metrics_listen`, port 0 resolved), or None."""
        return None if self._metrics_endpoint is None else self._metrics_endpoint.address

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
            f"  (acknowledged by the peers; accepted {d['accepted']:,}, rejected {d['rejected']:,},"
            f" failed {d['failed']:,}, in flight {d.get('in_flight', 0):,})",
            f"  received    {r['packets_delivered']:>12,} packets {r['bytes']:>15,} bytes"
            f"  (frames {r['frames']:,}, connections {r['connections']:,})",
            f"  tun written {t.get('packets_written', 0):>12,} packets"
            f" {t.get('bytes_written', 0):>15,} bytes",
            f"  connects {m['node']['connects']:,}, connect failures {m['node']['connect_failures']:,}",
            "  drops: " + (", ".join(f"{k}={v:,}" for k, v in sorted(drops.items())) if drops else "none"),
        ]
        return "\n".join(lines)


async def run_node(config: NodeConfig, *, ready: Callable[[TunNode], None] | None = None) -> int:
    """Runs a `TunNode` until SIGINT/SIGTERM (SIGHUP reloads the config, SIGUSR1 logs the metrics); returns
    the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    node = TunNode(config)
    # SIGHUP reloads (no longer the default exit), from before the "running" line on.
    loop.add_signal_handler(signal.SIGHUP, node.reload_in_background)
    try:
        await node.start()
    except BaseException:
        loop.remove_signal_handler(signal.SIGHUP)
        raise
    handled: list[signal.Signals] = [signal.SIGHUP]
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
