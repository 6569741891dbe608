"""End to end, issue 21 item 6: five nodes in five network namespaces join one etcd (in a hub namespace on a
bridge) with `[discovery]` only, and reach each other pairwise through their tunnels; one is killed and the
others drop it within its lease TTL; a sixth joins and is reachable without any other node's file
changing; an intruder with a membership from another authority, claiming a member's prefix, reaches nobody
and disturbs nothing.

Needs root, `/dev/net/tun`, `ip netns` and etcd: skipped without them, except when `CI=true`, where a missing
prerequisite fails. Waits are on the nodes' log lines and the probes' replies, with hang guards only."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpn_packet.testutil.etcd import ETCD
from vpn_packet.testutil.meshlab import MeshLab
from vpn_packet.testutil.netns import netns_unavailable, skip_or_fail

TTL = 2


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[MeshLab]:
    reason = netns_unavailable() or (None if ETCD is not None else "etcd is not installed")
    if reason is not None:
        skip_or_fail(reason)
    pytest.importorskip("aetcd", reason="the mesh extra is not installed")
    with MeshLab(tmp_path, ttl=TTL) as mesh:
        yield mesh


def test_five_nodes_find_each_other_in_etcd_and_a_sixth_joins(lab: MeshLab) -> None:
    names = [f"node-{i}" for i in range(1, 6)]
    for i, name in enumerate(names, 1):
        lab.add_node(name, i)
    for name in names:
        lab.wait_running(name)
    for name in names:
        lab.wait_members(name, set(names) - {name})
    for (_i, a), (j, _b) in itertools.permutations(enumerate(names, 1), 2):
        answer = lab.ping(a, f"10.8.0.{j}", count=1)
        assert answer["received"] == 1, (a, j, answer)

    # node-5 crashes: the others drop it within the TTL (its lease expires).
    lab.kill("node-5")
    killed = time.monotonic()
    for name in names[:4]:
        lab.wait_members(name, set(names[:4]) - {name})
    print(f"crash dropped by all four after {time.monotonic() - killed:.2f} s (ttl {TTL} s)")

    # A sixth joins: reachable without any other node's file changing.
    lab.add_node("node-6", 6)
    lab.wait_running("node-6")
    lab.wait_members("node-1", {"node-2", "node-3", "node-4", "node-6"})
    lab.wait_members("node-6", {"node-1", "node-2", "node-3", "node-4"})
    assert lab.ping("node-1", "10.8.0.6", count=1)["received"] == 1
    assert lab.ping("node-6", "10.8.0.1", count=1)["received"] == 1

    # An intruder: a membership of another authority, claiming node-2's prefix.
    lab.add_node("intruder", 7, authority="stranger", claim="10.8.0.2/32")
    lab.wait_running("intruder")
    lab.wait_members("intruder", set())  # it trusts only its own authority: nobody is a member for it
    node_1 = lab.nodes["node-1"]
    node_1.wait_for_line(lambda line: "refused" in line and "intruder" in line, timeout=30)
    assert lab.members("node-1") == {"node-2", "node-3", "node-4", "node-6"}
    assert lab.ping("intruder", "10.8.0.1", count=1, timeout=1.0)["received"] == 0
    assert lab.ping("node-1", "10.8.0.2", count=1)["received"] == 1  # node-2 undisturbed
