"""`vpn-packet node --config FILE.toml`: a VPN node on a Linux TUN device.

`TunNode` = a `TunDevice` + a `vpn_packet.node.node.Node`: every readiness event of the TUN reads all
ready packets and routes them into the dispatcher's native queues in one native call (the dispatcher is
the TUN's reader, `Dispatcher.take_read`: an established destination's packets are written into its
connection in that call, on the data plane's thread when it can; others wait for
per-destination workers, stream pool, TCP or mutual-TLS streams to the peer owning each destination); the
node's receiver decodes each connection's frames, checks each packet's source against the sending peer's
allowed prefixes and writes the accepted ones to the TUN's descriptor itself (`Receiver.tun_target`). One
path: tests run it on `vpn_packet.testutil.faketun.FakeTun`, the same `TunDevice` on a socket pair.

This module is the node's lifecycle, signals and control socket; its status snapshot (status, summary,
metrics file, drop log) is `vpn_packet.node.status`, its reload `vpn_packet.node.reload`.

Lifecycle: `start()` opens the TUN (so the interface and its addresses exist), starts the node (receiver
first), then starts reading the TUN. `shutdown()` goes in order under one deadline (`node.shutdown_timeout`):
stop reading the TUN, drain the dispatcher and close the streams (buffered bytes flushed), stop the receiver,
close the TUN. The command runs until SIGINT or SIGTERM, logs live metrics on SIGUSR1 (and writes them to
`node.metrics_file` when configured; `node.metrics_listen` serves them over HTTP, see
`vpn_packet.node.metrics_endpoint`), warns about packet drops and connection failures at most once per
`node.drop_log_interval` and prints a metrics summary at exit (the kernel's counters of the TUN included:
`TunDevice.close` reads them before the device goes).

Operating it: the node serves `vpn-packet status` and `vpn-packet reload` on its control socket
(`vpn_packet.node.control`; `/run/vpn-packet/NAME.sock` or `node.control_socket`). `status` answers with
`metrics()`, the same snapshot as the SIGUSR1 line, the metrics file and the metrics endpoint (`peers`: the
per-peer snapshot of `Node.peer_status`; `totals`). `reload()` (also on SIGHUP) re-reads the config file
and applies the difference in `[[peers]]` without a restart (`vpn_packet.node.reload`).

The periodic jobs (drop warnings, the metrics file) run in one `asyncio.TaskGroup` owned by one background
task: `shutdown()` cancels that task and so every job, and a job that fails takes the others down with it
(logged) instead of dying unnoticed. Every knob comes from the config's `vpn_packet.tuning.Tuning`.

Exit status: 0 after a clean shutdown, 1 when the shutdown deadline was hit or the TUN device failed
(deleted under the node), 2 for a bad configuration or a missing privilege (one line on stderr; the TUN
device file's mode and owner when those refuse us): a restart cannot fix those. A start
that fails because of the host's state is a `ConfigError` naming the key: the listen port is taken
(`listen.address: 0.0.0.0:7000 is in use (EADDRINUSE)`, also `node.metrics_listen`), or the interface name
is another device's (`interface.name: vpn0 exists and is not ours (...)`: not a TUN device, or a TUN another
process has open).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from vpn_packet.node import reload as reloading
from vpn_packet.node import status
from vpn_packet.node.config import NodeConfig
from vpn_packet.node.control import ControlServer, default_socket_path
from vpn_packet.node.status import drop_counters

if TYPE_CHECKING:
    from vpn_packet.mesh.members import PeerSetChange
    from vpn_packet.mesh.registry import Registry
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


class TunNode:
    """A node on a TUN device, from a `NodeConfig`; see the module docstring.

    `tun_factory` opens the device (default `TunDevice.open`; tests pass `FakeTun.open`, the same class on
    a socket pair). `manage_routes`: add routes through the TUN for peer prefixes outside its subnets
    (`vpn_packet.node.routes`; there are none to add when every peer prefix is inside them).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        tun_factory: Callable[..., TunDevice] | None = None,
        manage_routes: bool = True,
    ) -> None:
        from vpn_packet.node.node import Node
        from vpn_packet.transport.tun import TunDevice

        self.config = config
        self._tun_factory = tun_factory if tun_factory is not None else TunDevice.open
        self.tun: TunDevice | None = None
        self._manage_routes = manage_routes
        self.routes: PeerRoutes | None = None
        self.registry: Registry | None = None  # [discovery]: membership in etcd (vpn_packet.mesh)
        self.node: Node = Node(
            config.security(),
            config.listen,
            [peer.to_peer() for peer in config.peers],
            None,  # no sink: the receiver writes to the TUN itself (`tun_target`, set at start)
            tuning=config.tuning,
            resilience=config.resilience,
            stop_timeout=config.node.shutdown_timeout,
        )
        self._started_at: float | None = None
        self._state = "new"
        self._drop_log = status.DropLog()
        self._background: asyncio.Task[None] | None = None  # runs the TaskGroup of the periodic jobs
        self.error: OSError | None = None  # the TUN failed for good
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._control: ControlServer | None = None
        self.reload_lock = asyncio.Lock()  # one reload at a time
        self._reloads: set[asyncio.Task[None]] = set()  # reloads started by SIGHUP
        self.failed = asyncio.Event()  # set when it does

    # --- data path ------------------------------------------------------------------------------------------

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
            # Received packets go from socket to TUN natively, one call per read.
            from vpn_packet.transport.receiver import TunTarget

            self.node.receiver.tun_target = TunTarget(
                self.tun.fd, self.tun.vnet_header, on_fatal=self._on_tun_write_fatal
            )
            # One data plane thread per node: the receiver's, which the TUN's reads (below) and the acks of
            # the fast path's packets share.
            self.node.stream_service.plane = self.node.receiver.plane
            if self._manage_routes:
                from vpn_packet.node.routes import PeerRoutes

                self.routes = PeerRoutes(self.tun.name, iface.addresses)
                self.routes.apply(reloading.peer_prefixes(self.config))  # ConfigError on a conflict
            try:
                await self.node.start()
            except OSError as exc:
                _raise_bind_error("listen.address", self.config.listen, exc)
                raise
            if self.config.discovery is not None:
                await self._start_discovery()
        except BaseException:
            if self.registry is not None:
                await self.registry.stop()
            if self.routes is not None:
                self.routes.remove_all()
            self.tun.close()
            self._state = "stopped"
            raise
        # Each read straight into the dispatcher's native queues (and, for an established destination,
        # into its connection), in one native call: no object per packet or read; on the data plane's
        # thread while every packet is for an established destination.
        self.tun.start_reading(
            self.node.dispatcher,
            max_packets=self.config.tuning.read_batch,
            on_error=self._on_tun_error,
            plane=self.node.receiver.plane,  # one data plane thread for both directions
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
        # "running" once the connections to the reachable warm peers are made both ways (bounded by
        # KEEPER_START_WAIT, half a second): a first packet finds ours, and its reply the peer's.
        connected, warm = await self._settle_connections(tuning.KEEPER_START_WAIT)
        peers = len(self.node.discovery)
        _log.info(
            "node %s running: %s on %s, listening on %s:%d, %d peer%s (%d warm, %d connected), %s",
            self.config.node.id,
            ", ".join(iface.addresses),
            self.tun.name,
            *(self.node.address or self.config.listen),
            peers,
            "" if peers == 1 else "s",
            warm,
            connected,
            self.node.security.describe(),
        )

    async def _start_discovery(self) -> None:
        """Joins the mesh: the registry applies the state file's members, then etcd's, through
        `_apply_discovered` (the node's one add/update/remove path, the same a reload takes)."""
        from vpn_packet.errors import MembershipError
        from vpn_packet.mesh.registry import Registry

        discovery = self.config.discovery
        assert discovery is not None
        assert self.config.identity is not None
        self.registry = Registry(
            discovery,
            self.config.identity,
            self._apply_discovered,
            static={peer.id: peer.allowed_ips for peer in self.config.peers},
        )
        try:
            await self.registry.start()
        except MembershipError as exc:
            raise ConfigError("discovery.membership", str(exc)) from None

    async def _apply_discovered(self, change: PeerSetChange) -> None:
        """A change of discovered members, applied to the routes and the peer set. A member whose routes
        conflict with the host's is not applied (logged); the others are."""
        from vpn_packet.transport.discovery import Peer

        def peer(member: Any) -> Peer:
            return Peer(member.id, member.endpoint, member.allowed_ips)

        added = [peer(m) for m in change.added.values()]
        updated = [peer(m) for m in change.updated.values() if m.id in self.node.discovery]
        added += [peer(m) for m in change.updated.values() if m.id not in self.node.discovery]
        removed = [peer_id for peer_id in change.removed if peer_id in self.node.discovery]
        keys = {m.id: m.public_key for m in (*change.added.values(), *change.updated.values())}
        changed_prefixes = {p.id: p.allowed_ips for p in (*added, *updated)}
        if self.routes is not None and self.routes.affects(changed_prefixes, removed):
            # PeerRoutes plans from the whole peer map (netlink only for the difference): O(peers), but only
            # when a route can change (a gateway member); a /32 inside the subnet skips it.
            prefixes = {p.id: p.allowed_ips for p in self.node.discovery.peers}
            for peer_id in removed:
                prefixes.pop(peer_id, None)
            prefixes.update({p.id: p.allowed_ips for p in (*added, *updated)})
            try:
                self.routes.apply(prefixes)
            except ConfigError as exc:
                _log.warning("discovery: not applied, a route conflicts: %s", exc)
                return
        try:
            await self.node.update_peers(added, updated, removed, keys, removed, source="discovery")
        except ValueError as exc:  # e.g. a member with a static peer's key: that member is not applied
            _log.warning("discovery: not applied: %s", exc)

    async def _settle_connections(self, bound: float) -> tuple[int, int]:
        """Wait at most `bound` seconds for the connections to the warm peers (`ConnectionKeeper.settle`) and
        from the ones we reached (they connect back when they see us: `ConnectionKeeper.poke`); returns
        `(connected, warm)`. O(warm peers), not O(peers)."""
        keeper = self.node.keeper
        if keeper is None:
            return 0, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        connected, wanted = await keeper.settle(bound)
        reached = [peer_id for peer_id in keeper.wanted() if self.node.pool.streams(peer_id)]
        await self.node.receiver.wait_connected(reached, max(0.0, deadline - loop.time()))
        return connected, wanted

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
        """Re-read the config file and apply the difference in `[[peers]]` (`vpn_packet.node.reload`).
        Returns what changed; raises `UsageError` with one line when the file is refused."""
        return await reloading.reload(self)

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
        registry, self.registry = self.registry, None
        if registry is not None:
            await registry.stop()  # leaves the mesh: the others drop this node at once
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

    @property
    def state(self) -> str:
        """`new`, `starting`, `running`, `stopping` or `stopped`."""
        return self._state

    @property
    def uptime(self) -> float:
        """Seconds since the node started (0 before)."""
        return status.uptime_since(self._started_at)

    # --- status (`vpn_packet.node.status`) ------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The node's snapshot (`vpn_packet.node.status.snapshot`): what `vpn-packet status`, SIGUSR1, the
        metrics file and endpoint show."""
        return status.snapshot(self)

    def report_metrics(self) -> dict[str, Any]:
        """Logs the live metrics (one JSON line) and writes `metrics_file` when configured."""
        snapshot = self.metrics()
        _log.info("metrics %s", json.dumps(snapshot, separators=(",", ":"), default=str))
        self.write_metrics_file(snapshot)
        return snapshot

    def write_metrics_file(self, snapshot: dict[str, Any] | None = None) -> None:
        path = self.config.node.metrics_file
        if path is not None:
            status.write_metrics_file(path, self.metrics() if snapshot is None else snapshot)

    def log_drops(self) -> dict[str, int]:
        """Logs one warning with every packet drop counter that grew since the last call, one with the
        connection failures; returns the increases. Reads the node's totals only (`status.counters`), not
        the per-peer snapshot: it runs every `drop_log_interval`, and a node may know 10,000 peers."""
        return self._drop_log.log(status.counters(self))

    def summary(self) -> str:
        """A few human-readable lines (`vpn_packet.node.status.summary`)."""
        return status.summary(self.metrics())

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
