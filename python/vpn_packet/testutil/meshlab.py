"""A mesh in network namespaces (root only): a hub namespace with a bridge and one etcd, and a `vpn-packet
node` per namespace that knows nobody but etcd (`[discovery]`, no `[[peers]]`). For issue 21's end-to-end
test.

    with MeshLab(tmp_path) as lab:             # hub namespace, bridge 172.30.0.254/24, etcd on it
        lab.add_node("node-1", 1)              # namespace, veth on the bridge, 172.30.0.1, tunnel 10.8.0.1
        lab.wait_members("node-1", {"node-2"}) # from its log lines: members applied by discovery
        lab.ping("node-1", "10.8.0.2")         # ICMP through the tunnel

Each node gets a key (`generate_identity`) and a membership signed by the lab's authority (or by another
authority, for an intruder). Nodes are processes followed like `TunnelLab`'s (`NodeProcess`): waiting is on
their log lines, never a sleep. Everything is removed on exit (namespaces, processes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vpn_packet.mesh.membership import sign_membership, write_record_file
from vpn_packet.testutil.etcd import EtcdCluster
from vpn_packet.testutil.netns import _CLI, ICMP_ECHO_SCRIPT, NodeProcess, _ip
from vpn_packet.transport.identity import NodeIdentity, generate_identity

__all__ = ["HUB", "MeshLab"]

HUB = "172.30.0.254"
_PORT = 7000
_instances = itertools.count()
_CHANGED = "peers changed by discovery: "


class MeshLab:
    """Namespaces on a bridge, etcd in the hub, nodes with `[discovery]` only; see the module docstring."""

    def __init__(self, workdir: Path, *, ttl: int = 2) -> None:
        tag = f"{os.getpid() % 10000}{next(_instances)}"
        self.workdir = Path(workdir)
        self.ttl = ttl
        self.tag = tag
        self.hub = f"vpnm-hub-{tag}"
        self.bridge = "br0"
        self.nodes: dict[str, NodeProcess] = {}
        self.identities: dict[str, NodeIdentity] = {}
        self.etcd: EtcdCluster | None = None
        self._namespaces: list[str] = []
        self._authorities: dict[str, NodeIdentity] = {}

    def __enter__(self) -> MeshLab:
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def authority(self, name: str = "authority") -> NodeIdentity:
        """An authority key, made on first use."""
        if name not in self._authorities:
            folder = self.workdir / "authorities"
            folder.mkdir(exist_ok=True)
            self._authorities[name] = generate_identity(name, folder, force=True)
        return self._authorities[name]

    def setup(self) -> None:
        _ip("netns", "add", self.hub)
        self._namespaces.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{HUB}/24", "dev", self.bridge)
        _ip("-n", self.hub, "link", "set", self.bridge, "up")
        self.etcd = EtcdCluster.start(self.workdir / "etcd", host=HUB, netns=self.hub)

    def add_node(
        self, name: str, index: int, *, authority: str = "authority", claim: str | None = None
    ) -> NodeProcess:
        """A namespace on the bridge (underlay 172.30.0.INDEX), and a node in it (tunnel 10.8.0.INDEX/24,
        claiming `claim` or its own /32), with a membership signed by `authority`; started, not waited."""
        assert self.etcd is not None
        ns = f"vpnm-{index}-{self.tag}"
        inside, outside = f"vm{index}i{self.tag}"[:15], f"vm{index}o{self.tag}"[:15]
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", outside, "master", self.bridge)
        _ip("-n", self.hub, "link", "set", outside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"172.30.0.{index}/24", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        folder = self.workdir / name
        folder.mkdir(exist_ok=True)
        identity = self.identities[name] = generate_identity(name, folder, force=True)
        membership = sign_membership(
            self.authority(authority),
            member_id=name,
            public_key=identity.public_key_bytes,
            allowed_ips=[claim or f"10.8.0.{index}/32"],
            issued=int(time.time()),
            days=1,
        )
        write_record_file(folder / f"{name}.member", membership.record, membership.summary())
        config = folder / "node.toml"
        config.write_text(
            f"""\
[interface]
name = "vpn0"
address = "10.8.0.{index}/24"

[listen]
address = "172.30.0.{index}:{_PORT}"

[node]
key = "{name}.key"
log_level = "info"
metrics_file = "{folder / "metrics.json"}"
control_socket = "{folder / "control.sock"}"
shutdown_timeout = 3.0

[discovery]
etcd = {json.dumps(self.etcd.client_urls)}
authority = "{self.authority(authority).public_key}"
membership = "{name}.member"
prefix = "/vpn-packet/lab-{self.tag}/"
ttl = {self.ttl}
state = "{folder / "node.state"}"
"""
        )
        log = folder / "node.log"
        node = NodeProcess(name, ns, config, log, folder / "metrics.json")
        log.write_bytes(b"")
        node.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _CLI, "node", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        assert node.process.stdout is not None
        node.follow(node.process.stdout)
        self.nodes[name] = node
        return node

    def wait_running(self, name: str, timeout: float = 30.0) -> None:
        self.nodes[name].wait_for_line(lambda line: " running: " in line, timeout=timeout)

    def members(self, name: str, upto: int | None = None) -> set[str]:
        """The members node `name` has applied, from its log lines (`peers changed by discovery`)."""
        node = self.nodes[name]
        with node._changed:
            lines = list(node._lines[:upto])
        current: set[str] = set()
        for line in lines:
            if _CHANGED in line:
                change = json.loads(line[line.index(_CHANGED) + len(_CHANGED) :])
                current |= set(change["added"])
                current -= set(change["removed"])
        return current

    def wait_members(self, name: str, expected: set[str], timeout: float = 30.0) -> None:
        """Until node `name`'s discovered members are `expected` (a hang guard raises with its log)."""
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while self.members(name) != expected:
            after = node.line_count()
            if self.members(name) == expected:
                return
            node.wait_for_line(
                lambda line: _CHANGED in line, after=after, timeout=max(0.1, deadline - time.monotonic())
            )

    def ping(self, name: str, destination: str, count: int = 3, timeout: float = 2.0) -> dict[str, Any]:
        """ICMP echo from node `name`'s namespace through its tunnel; the script's JSON answer."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.nodes[name].netns, sys.executable, "-c", ICMP_ECHO_SCRIPT,
             destination, str(count), str(timeout)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ping from {name} failed: {result.stderr.strip()}")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, no goodbye (its lease expires after the TTL)."""
        process = self.nodes[name].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def cleanup(self) -> None:
        for node in self.nodes.values():
            process = node.process
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(8)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.etcd is not None:
            self.etcd.close()
        for ns in self._namespaces:
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
