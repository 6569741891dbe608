"""The registry against a real etcd (Debian's etcd-server, started by the tests on loopback): members join
and leave through leases and watches; whoever writes to the store cannot add a stranger, move an endpoint
or undo a revocation; etcd down at start, lost while running, and a three-member cluster losing one.

Every wait is on an event (a change applied, the registry in sync) with a hang guard, never a sleep."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from vpn_packet.mesh.config import DiscoveryConfig
from vpn_packet.mesh.members import DiscoveredPeer, PeerSetChange
from vpn_packet.mesh.membership import sign_entry, sign_membership, sign_revocation
from vpn_packet.mesh.registry import Registry
from vpn_packet.testutil.etcd import ETCD, EtcdCluster
from vpn_packet.testutil.keys import identities
from vpn_packet.transport.identity import NodeIdentity

# CI installs etcd (.ci/run): there a missing etcd fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    ETCD is None and os.environ.get("CI") != "true",
    reason="etcd is not installed (apt-get install etcd-server)",
)
aetcd = pytest.importorskip(
    "aetcd", reason="the mesh extra is not installed (pip install 'vpn-packet[mesh]')"
)

PREFIX = "/vpn-packet/test/"
TTL = 2
GUARD = 15.0  # hang guard of every wait: not an assertion of speed


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.start(tmp_path / "etcd")
    yield cluster
    cluster.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, NodeIdentity]:
    return identities(tmp_path, "authority", "stranger", "a", "b", "c")


class Peers:
    """What `apply` received, folded into the current set, with an event per change."""

    def __init__(self) -> None:
        self.current: dict[str, DiscoveredPeer] = {}
        self.changed = asyncio.Condition()

    async def apply(self, change: PeerSetChange) -> None:
        for peer_id in change.removed:
            self.current.pop(peer_id, None)
        self.current.update(change.added)
        self.current.update(change.updated)
        async with self.changed:
            self.changed.notify_all()

    async def until(self, predicate: object) -> None:
        assert callable(predicate)
        async with asyncio.timeout(GUARD), self.changed:
            await self.changed.wait_for(lambda: predicate(self.current))


def _config(
    tmp_path: Path, keys: dict[str, NodeIdentity], name: str, address: str, urls: list[str],
    *, endpoint: str | None = None, days: int = 1,
) -> DiscoveryConfig:  # fmt: skip
    membership = sign_membership(
        keys["authority"], member_id=name, public_key=keys[name].public_key_bytes, allowed_ips=[address],
        issued=int(time.time()), days=days,
    )  # fmt: skip
    return DiscoveryConfig(
        etcd=tuple(urls), authorities=(keys["authority"].public_key_bytes,),
        membership_path=tmp_path / "unused", membership=membership, prefix=PREFIX, ttl=TTL,
        endpoint=endpoint or f"127.0.0.1:{7000 + ord(name)}", state=tmp_path / f"{name}.state",
    )  # fmt: skip


class Node:
    def __init__(self, registry: Registry, peers: Peers) -> None:
        self.registry = registry
        self.peers = peers


@pytest.fixture
async def start(tmp_path: Path, keys: dict[str, NodeIdentity], etcd: EtcdCluster) -> AsyncIterator[object]:
    started: list[Registry] = []

    async def make(
        name: str, address: str, urls: list[str] | None = None, *, wait: bool = True,
        endpoint: str | None = None, days: int = 1, clock: Callable[[], float] = time.time,
    ) -> Node:  # fmt: skip
        peers = Peers()
        config = _config(
            tmp_path, keys, name, address, urls or etcd.client_urls, endpoint=endpoint, days=days
        )
        registry = Registry(config, keys[name], peers.apply, clock=clock)
        await registry.start()
        started.append(registry)
        if wait:
            async with asyncio.timeout(GUARD):
                await registry.synced.wait()
        return Node(registry, peers)

    yield make
    for registry in started:
        await registry.stop()


async def _raw_client(etcd: EtcdCluster) -> object:
    from vpn_packet.mesh.etcd import TlsEtcdClient

    return TlsEtcdClient(etcd.client_urls)


async def test_members_join_see_each_other_and_leave(start: object, etcd: EtcdCluster) -> None:
    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    b = await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    await b.peers.until(lambda peers: "a" in peers)
    assert a.peers.current["b"].allowed_ips == ("10.8.0.2/32",)
    assert a.peers.current["b"].endpoint == b.registry.config.endpoint
    assert a.registry.status()["connected"] is True
    assert a.registry.status()["revision"] >= 2
    await b.registry.stop()  # a goodbye: the lease is revoked, the others drop it at once
    await a.peers.until(lambda peers: "b" not in peers)


async def test_a_crashed_member_leaves_within_its_ttl(start: object) -> None:
    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    b = await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    # A crash: b's tasks end and its connection closes without revoking the lease.
    for task in (b.registry._task, b.registry._expiry_task):
        assert task is not None
        task.cancel()
    await b.registry._client.close()
    b.registry._client = None
    crashed = time.monotonic()
    await a.peers.until(lambda peers: "b" not in peers)
    print(f"crash removed after {time.monotonic() - crashed:.2f} s (ttl {TTL} s)")


async def test_a_store_writer_cannot_add_a_stranger_move_an_endpoint_or_undo_a_revocation(
    start: object, etcd: EtcdCluster, keys: dict[str, NodeIdentity]
) -> None:
    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    b = await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    client = await _raw_client(etcd)
    now = int(time.time())
    # An intruder with a membership of another authority, claiming b's prefix.
    intruder = sign_membership(
        keys["stranger"], member_id="c", public_key=keys["c"].public_key_bytes, allowed_ips=["10.8.0.2/32"],
        issued=now, days=1,
    )  # fmt: skip
    await client.put(
        f"{PREFIX}members/c".encode(),
        sign_entry(keys["c"], intruder, endpoint="127.0.0.1:9", sequence=1).record,
    )
    # b's entry with its endpoint moved (the signature no longer holds).
    record = (await client.get(f"{PREFIX}members/b".encode())).value
    moved = record.replace(b.registry.config.endpoint.encode(), b"127.0.0.1:6666")
    await client.put(f"{PREFIX}members/b".encode(), moved)
    # A copy of b's entry elsewhere.
    await client.put(f"{PREFIX}members/b-copy".encode(), record)
    # Then the authority revokes b, and the revocation is deleted again.
    revocation = sign_revocation(keys["authority"], member_id="b", issued=now + 1)
    await client.put(f"{PREFIX}revoked/b".encode(), revocation.record)
    await a.peers.until(lambda peers: "b" not in peers)
    await client.delete(f"{PREFIX}revoked/b".encode())
    await client.put(f"{PREFIX}members/b".encode(), record)  # b's genuine entry, replayed
    # A marker put: once a has seen it, it has seen everything before it.
    c_membership = sign_membership(
        keys["authority"], member_id="c", public_key=keys["c"].public_key_bytes, allowed_ips=["10.8.0.3/32"],
        issued=now, days=1,
    )  # fmt: skip
    await client.put(
        f"{PREFIX}members/c".encode(),
        sign_entry(keys["c"], c_membership, endpoint="127.0.0.1:9", sequence=2).record,
    )
    await a.peers.until(lambda peers: "c" in peers)
    assert set(a.peers.current) == {"c"}
    refused = a.registry.status()["refused"]
    assert refused["unknown_authority"] == 1
    assert refused["bad_signature"] == 1
    assert refused["wrong_key"] == 1
    assert refused["revoked"] >= 1
    await client.close()


async def test_etcd_lost_while_running_freezes_the_membership_and_recovers(
    start: object, etcd: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    assert callable(start)
    caplog.set_level(logging.WARNING, "vpn_packet.mesh")
    a = await start("a", "10.8.0.1/32")
    b = await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    etcd.stop(0)
    async with asyncio.timeout(GUARD):
        await a.registry.lost.wait()
        await b.registry.lost.wait()
    assert a.registry.status()["connected"] is False
    assert set(a.peers.current) == {"b"}  # frozen: nobody is removed because etcd went away
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 2  # one WARNING per node
    etcd.restart(0)  # same data dir and ports: both reconnect, publish again and stay members
    async with asyncio.timeout(GUARD):
        await a.registry.synced.wait()
        await b.registry.synced.wait()
    assert set(a.peers.current) == {"b"}
    assert a.registry.status()["connected"] is True
    assert any("back" in r.getMessage() for r in caplog.records)


async def test_etcd_down_at_start_starts_from_the_state_file(start: object, etcd: EtcdCluster) -> None:
    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    await a.registry.stop()  # writes the state file (b's entry)
    etcd.stop(0)
    again = await start("a", "10.8.0.1/32", wait=False)
    assert set(again.peers.current) == {"b"}  # from the state file, before any etcd
    assert again.registry.status()["connected"] is False
    etcd.restart(0)
    async with asyncio.timeout(GUARD):
        await again.registry.synced.wait()
    assert "b" in again.peers.current


async def test_a_three_member_cluster_losing_one_keeps_the_mesh(
    tmp_path: Path, keys: dict[str, NodeIdentity]
) -> None:
    cluster = EtcdCluster.start(tmp_path / "etcd3", members=3)
    registries: list[Registry] = []
    try:
        views = {name: Peers() for name in ("a", "b", "c")}
        for i, name in enumerate(("a", "b", "c")):
            config = _config(tmp_path, keys, name, f"10.8.0.{i + 1}/32", cluster.client_urls)
            registry = Registry(config, keys[name], views[name].apply)
            registries.append(registry)
            await registry.start()
        await views["a"].until(lambda peers: set(peers) == {"b", "c"})
        cluster.stop(0)  # the first endpoint of every node's list
        await registries[2].stop()  # c leaves: the change is seen through the two members left
        await views["a"].until(lambda peers: set(peers) == {"b"})
        await views["b"].until(lambda peers: set(peers) == {"a"})
    finally:
        for registry in registries:
            await registry.stop()
        cluster.close()


async def test_revoke_puts_the_revocation_in_etcd_and_the_members_apply_it(
    start: object, etcd: EtcdCluster, keys: dict[str, NodeIdentity], tmp_path: Path
) -> None:
    from vpn_packet.cli import main

    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    await start("b", "10.8.0.2/32")
    await a.peers.until(lambda peers: "b" in peers)
    args = [
        "revoke",
        "--authority",
        str(keys["authority"].path),
        "--id",
        "b",
        "--etcd",
        ",".join(etcd.client_urls),
    ]
    status = await asyncio.to_thread(main, [*args, "--prefix", PREFIX])
    assert status == 0
    await a.peers.until(lambda peers: "b" not in peers)
    assert a.registry.status()["revocations"] == 1
    dead = await asyncio.to_thread(main, ["revoke", "--authority", str(keys["authority"].path), "--id", "b",
                                          "--etcd", "http://127.0.0.1:1", "--prefix", PREFIX])  # fmt: skip
    assert dead == 1


async def test_a_member_that_restarts_with_a_new_endpoint_is_reached_there(start: object) -> None:
    assert callable(start)
    a = await start("a", "10.8.0.1/32")
    b = await start("b", "10.8.0.2/32", endpoint="127.0.0.1:7101")
    await a.peers.until(lambda peers: "b" in peers)
    await b.registry.stop()
    await a.peers.until(lambda peers: "b" not in peers)
    await start("b", "10.8.0.2/32", endpoint="127.0.0.1:7202")
    await a.peers.until(lambda peers: peers.get("b") is not None and peers["b"].endpoint == "127.0.0.1:7202")


async def test_a_membership_that_expires_while_running_is_removed_like_a_departure(start: object) -> None:
    """a's clock is injected: it jumps two days ahead; b's membership (one day) has expired, c's (30 days)
    has not. The expiry timer is re-armed by the next change (c joining) and removes b."""
    assert callable(start)
    now = [time.time()]
    a = await start("a", "10.8.0.1/32", days=30, clock=lambda: now[0])
    await start("b", "10.8.0.2/32", days=1)
    await a.peers.until(lambda peers: "b" in peers)
    now[0] += 2 * 86_400
    await start("c", "10.8.0.3/32", days=30)
    await a.peers.until(lambda peers: set(peers) == {"c"})


async def test_tls_to_etcd_with_a_client_certificate(tmp_path: Path, keys: dict[str, NodeIdentity]) -> None:
    """etcd with TLS and client-certificate authentication: the registry with `ca`, `cert` and `key` joins;
    one without a client certificate cannot (it stays unconnected, retrying)."""
    import dataclasses

    from vpn_packet.testutil.certs import CertificateAuthority

    ca = CertificateAuthority("etcd test CA")
    ca_path = ca.write(tmp_path)
    server = ca.issue("localhost", tmp_path / "server")
    client = ca.issue("node-a", tmp_path / "client")
    cluster = EtcdCluster.start(tmp_path / "etcd-tls", tls=(server.cert, server.key, ca_path))
    registries: list[Registry] = []
    try:
        peers = Peers()
        config = dataclasses.replace(
            _config(tmp_path, keys, "a", "10.8.0.1/32", cluster.client_urls),
            ca=ca_path, cert=client.cert, key=client.key,
        )  # fmt: skip
        registry = Registry(config, keys["a"], peers.apply)
        registries.append(registry)
        await registry.start()
        async with asyncio.timeout(GUARD):
            await registry.synced.wait()
        assert registry.status()["connected"] is True
        anonymous = Registry(
            dataclasses.replace(config, cert=None, key=None, state=tmp_path / "anonymous.state"),
            keys["b"],
            Peers().apply,
        )
        registries.append(anonymous)
        await anonymous.start()
        async with asyncio.timeout(GUARD):
            await anonymous.lost.wait()
        assert anonymous.status()["connected"] is False
    finally:
        for r in registries:
            await r.stop()
        cluster.close()


async def test_a_node_whose_own_membership_is_revoked_in_its_state_refuses_to_start(
    tmp_path: Path, keys: dict[str, NodeIdentity]
) -> None:
    import base64
    import json

    from vpn_packet.errors import MembershipError

    config = _config(tmp_path, keys, "a", "10.8.0.1/32", ["http://127.0.0.1:1"])
    revocation = sign_revocation(keys["authority"], member_id="a", issued=int(time.time()))
    config.state.write_text(
        json.dumps(
            {"entries": [], "revocations": [base64.b64encode(revocation.record).decode()], "sequence": 0}
        )
    )
    with pytest.raises(MembershipError, match="own membership is revoked"):
        await Registry(config, keys["a"], Peers().apply).start()


async def test_refusals_are_counted_each_and_logged_once_per_reason_and_interval(
    start: object, etcd: EtcdCluster, caplog: pytest.LogCaptureFixture, keys: dict[str, NodeIdentity]
) -> None:
    """Whoever can write to etcd cannot flood the log: 20 garbage entries are 20 counts and one line."""
    assert callable(start)
    caplog.set_level(logging.WARNING, "vpn_packet.mesh")
    a = await start("a", "10.8.0.1/32")
    client = await _raw_client(etcd)
    for i in range(20):
        await client.put(f"{PREFIX}members/junk-{i}".encode(), b"not an entry %d" % i)
    marker = sign_membership(
        keys["authority"], member_id="c", public_key=keys["c"].public_key_bytes, allowed_ips=["10.8.0.3/32"],
        issued=int(time.time()), days=1,
    )  # fmt: skip
    await client.put(
        f"{PREFIX}members/c".encode(),
        sign_entry(keys["c"], marker, endpoint="127.0.0.1:9", sequence=1).record,
    )
    await a.peers.until(lambda peers: "c" in peers)
    await client.close()
    assert a.registry.status()["refused"] == {"malformed": 20}
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
