"""TUN nodes (on FakeTun devices: no root) that find each other through a real etcd (issue 21 items 2, 3 and
the shape of 6, without namespaces): no `[[peers]]` at all, packets cross; a node that joins later is
reached without any other node's config changing; one that stops is dropped by the others; an intruder with
a membership of another authority claiming a member's prefix reaches nobody and disturbs nothing; status
shows each peer's source and the discovery state. Waits are on conditions with a hang guard, never sleeps."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.mesh.membership import sign_entry, sign_membership, write_record_file
from vpn_packet.node.config import parse_config
from vpn_packet.node.tun_node import TunNode
from vpn_packet.testutil.etcd import ETCD, EtcdCluster
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.identity import NodeIdentity

pytest.importorskip("aetcd", reason="the mesh extra is not installed (pip install 'vpn-packet[mesh]')")
pytestmark = pytest.mark.skipif(
    ETCD is None and os.environ.get("CI") != "true",
    reason="etcd is not installed (apt-get install etcd-server)",
)

PREFIX = "/vpn-packet/mesh-test/"
Start = Callable[[str, str], Awaitable[TunNode]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.start(tmp_path / "etcd")
    yield cluster
    cluster.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, NodeIdentity]:
    return identities(tmp_path, "authority", "stranger", "node-a", "node-b", "node-c", "intruder")


def _member_file(
    tmp_path: Path, keys: dict[str, NodeIdentity], name: str, address: str, authority: str = "authority"
) -> Path:
    membership = sign_membership(
        keys[authority], member_id=name, public_key=keys[name].public_key_bytes, allowed_ips=[address],
        issued=int(time.time()), days=1,
    )  # fmt: skip
    return write_record_file(tmp_path / f"{name}.member", membership.record, membership.summary())


@pytest.fixture
async def start(
    tmp_path: Path, keys: dict[str, NodeIdentity], etcd: EtcdCluster
) -> AsyncIterator[tuple[Start, dict[str, FakeTun]]]:
    tuns: dict[str, FakeTun] = {}
    nodes: list[TunNode] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns[name] = FakeTun(name, **kwargs)
        return tuns[name]

    async def make(name: str, ip: str) -> TunNode:
        member = _member_file(tmp_path, keys, name, f"{ip}/32")
        data = {
            "interface": {"name": f"tun-{name}", "address": f"{ip}/24"},
            "listen": {"address": f"127.0.0.1:{_free_port()}"},
            "node": {"key": str(keys[name].path), "shutdown_timeout": 3,
                     "control_socket": str(tmp_path / f"{name}.sock")},
            "discovery": {"etcd": etcd.client_urls, "authority": keys["authority"].public_key,
                          "membership": str(member), "prefix": PREFIX, "ttl": 2,
                          "state": str(tmp_path / f"{name}.state")},
            "tuning": {"connect_timeout": 2},
        }  # fmt: skip
        node = TunNode(parse_config(data, base=tmp_path), tun_factory=factory, manage_routes=False)
        await node.start()
        nodes.append(node)
        return node

    yield make, tuns
    for node in nodes:
        await node.shutdown()


def _knows(node: TunNode, *ids: str) -> Callable[[], bool]:
    return lambda: {p.id for p in node.node.discovery.peers} == set(ids)


async def test_nodes_find_each_other_in_etcd_and_traffic_flows(
    start: tuple[Start, dict[str, FakeTun]], etcd: EtcdCluster, keys: dict[str, NodeIdentity]
) -> None:
    make, tuns = start
    a = await make("node-a", "10.8.0.1")
    b = await make("node-b", "10.8.0.2")
    await wait_until(_knows(a, "node-b"))
    await wait_until(_knows(b, "node-a"))
    packets = [ipv4_packet("10.8.0.1", "10.8.0.2", UDP, 1000 + i, 53, bytes([i]) * 64) for i in range(20)]
    tuns["tun-node-a"].inject(packets)
    await wait_until(lambda: len(tuns["tun-node-b"].written) >= 20)
    assert tuns["tun-node-b"].written == packets

    # A third joins: a reaches it, nobody's config changed.
    c = await make("node-c", "10.8.0.3")
    await wait_until(_knows(a, "node-b", "node-c"))
    to_c = [ipv4_packet("10.8.0.1", "10.8.0.3", UDP, 7, 7, b"hello c")]
    tuns["tun-node-a"].inject(to_c)
    await wait_until(lambda: tuns["tun-node-c"].written == to_c)

    # An intruder with another authority's membership claiming b's prefix: refused, b untouched.
    from vpn_packet.mesh.etcd import TlsEtcdClient

    intruder = sign_membership(
        keys["stranger"], member_id="intruder", public_key=keys["intruder"].public_key_bytes,
        allowed_ips=["10.8.0.2/32"], issued=int(time.time()), days=1,
    )  # fmt: skip
    client = TlsEtcdClient(etcd.client_urls)
    entry = sign_entry(keys["intruder"], intruder, endpoint="127.0.0.1:9", sequence=1)
    await client.put(f"{PREFIX}members/intruder".encode(), entry.record)
    await client.close()
    await wait_until(lambda: a.metrics()["discovery"]["refused"].get("unknown_authority", 0) >= 1)
    assert {p.id for p in a.node.discovery.peers} == {"node-b", "node-c"}
    more = [ipv4_packet("10.8.0.1", "10.8.0.2", UDP, 8, 8, b"still b")]
    tuns["tun-node-a"].inject(more)
    await wait_until(lambda: tuns["tun-node-b"].written[-1:] == more)

    # Status: the source of each peer and the discovery state.
    snapshot = a.metrics()
    assert {p["id"]: p["source"] for p in snapshot["peers"]} == {"node-b": "discovery", "node-c": "discovery"}
    assert snapshot["discovery"]["connected"] is True
    assert snapshot["discovery"]["members"] == 2
    assert snapshot["discovery"]["revision"] > 0
    from vpn_packet.node.metrics_endpoint import node_samples

    samples = {
        (name, tuple(sorted(labels.items()))): value for name, _, labels, value in node_samples(snapshot)
    }
    assert samples[("vpn_packet_discovery_connected", ())] == 1
    assert samples[("vpn_packet_discovery_members", ())] == 2
    assert samples[("vpn_packet_discovery_refused_total", (("reason", "unknown_authority"),))] >= 1
    assert samples[("vpn_packet_peer_connected", (("peer", "node-b"), ("source", "discovery")))] in (0, 1)

    # c stops: it leaves the others.
    await c.shutdown()
    await wait_until(_knows(a, "node-b"))
    await wait_until(_knows(b, "node-a"))
