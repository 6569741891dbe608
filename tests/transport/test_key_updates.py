"""A peer joining and leaving changes the trusted keys in place (issue 21 item 8: a join and a leave cost the
same with 10 peers known or 10,000), and trust follows at once.

- The native TLS core's `TlsSecurity.update_keys` over real loopback socket pairs: a key added is accepted
  from the next hello on, a key removed refused, a session made before the removal keeps working, an
  invalid change raises and changes nothing.
- Real nodes over loopback, in key and in CA mode: a peer added live (the discovery path,
  `Node.update_peers`) after the receiver made its native setup gets its handshake accepted and its packets
  delivered, then, removed, its connection closed and its next handshake refused; the unchanged peer's
  traffic keeps flowing all along, and the receiver's native setup is the same object throughout (changed
  in place, not made again).
- The discovery keeps what the receiver asks per connection (peers at a host, the peers' indexes) as peers
  join and leave.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tests.transport.test_native_tls import Side, pkt, pump

from vpn_packet._native import Established, Refused, TlsSecurity
from vpn_packet.errors import IdentityError
from vpn_packet.node.node import Node
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.testutil.certs import write_test_pki
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import ca_securities, identities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.testutil.weak_keys import small_order_keys
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity

FAST = ResilienceConfig(initial_interval=0.001, max_interval=0.002, failure_threshold=1000, max_attempts=3)


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _connect(server: TlsSecurity, client: TlsSecurity) -> tuple[Side, Side]:
    """A client of `client` dialling node-b (`server`) over a fresh socket pair, pumped until both sides
    have an outcome."""
    client_sock, server_sock = _pair()
    c = Side(client.client("node-b", 1), client_sock)
    s = Side(server.server(), server_sock)
    pump([c, s], lambda: bool(s.events) and bool(c.events))
    return c, s


def test_update_keys_trusts_at_once_and_forgets_at_once(tmp_path: Path) -> None:
    ids: dict[str, NodeIdentity] = identities(tmp_path, "node-a", "node-b", "node-c")
    b = TlsSecurity.with_keys(
        "node-b", ids["node-b"].path.read_bytes(), [("node-a", ids["node-a"].public_key_bytes)]
    )
    c = TlsSecurity.with_keys(
        "node-c", ids["node-c"].path.read_bytes(), [("node-b", ids["node-b"].public_key_bytes)]
    )
    client, server = _connect(b, c)
    assert isinstance(server.events[0], Refused)
    assert server.events[0].reason == "unknown_peer"
    for side in (client, server):
        side.sock.close()

    b.update_keys([("node-c", ids["node-c"].public_key_bytes)])
    assert b.peer_count == 2
    client, server = _connect(b, c)
    assert isinstance(server.events[0], Established)
    assert server.events[0].peer_id == "node-c"

    # Removed: a new handshake is refused; the session made before keeps carrying frames.
    b.update_keys([], ["node-c"])
    assert b.peer_count == 1
    late_client, late_server = _connect(b, c)
    assert isinstance(late_server.events[0], Refused)
    assert late_server.events[0].reason == "unknown_peer"
    assert client.conn.send_packets([pkt(1), pkt(2)]) == 2
    pump([client, server], lambda: client.conn.acked == 2)
    assert server.frames == [pkt(1), pkt(2)]
    for side in (client, server, late_client, late_server):
        side.sock.close()


def test_an_invalid_key_update_changes_nothing(tmp_path: Path) -> None:
    ids: dict[str, NodeIdentity] = identities(tmp_path, "node-a", "node-b", "node-c")
    a_key, c_key = ids["node-a"].public_key_bytes, ids["node-c"].public_key_bytes
    b = TlsSecurity.with_keys("node-b", ids["node-b"].path.read_bytes(), [("node-a", a_key)])
    with pytest.raises(IdentityError, match="same public key"):
        b.update_keys([("node-c", a_key)])
    with pytest.raises(IdentityError):
        b.update_keys([("node-c", c_key), ("node-d", small_order_keys()[0])])
    with pytest.raises(IdentityError, match="twice"):
        b.update_keys([("node-c", c_key), ("node-c", c_key)])
    assert b.peer_count == 1
    c = TlsSecurity.with_keys(
        "node-c", ids["node-c"].path.read_bytes(), [("node-b", ids["node-b"].public_key_bytes)]
    )
    client, server = _connect(b, c)
    assert isinstance(server.events[0], Refused)  # node-c was not added by the refused changes
    for side in (client, server):
        side.sock.close()
    # A key freed in the same change may be given again: node-a's key moves to node-c.
    b.update_keys([("node-c", a_key)], ["node-a"])
    assert b.peer_count == 1
    creds = write_test_pki(tmp_path / "pki", ["node-b"])
    node_b = creds.nodes["node-b"]
    ca = TlsSecurity.with_ca(
        "node-b", node_b.cert.read_bytes(), node_b.key.read_bytes(), creds.ca_cert.read_bytes(), []
    )
    with pytest.raises(ValueError, match="CA mode"):
        ca.update_keys([("node-c", c_key)])


def _packet(src: str, seq: int) -> bytes:
    return ipv4_packet(src, "10.9.0.1", UDP, 4000, 53, seq.to_bytes(4, "big"))


def _settled(node: Node) -> bool:
    """Every packet `node` accepted has an outcome (acknowledged, failed or discarded)."""
    m = node.metrics().dispatcher
    return m.queued == 0 and m.in_flight == 0 and m.sent + m.failed + m.discarded == m.accepted


@pytest.mark.parametrize("mode", ["key", "ca"])
async def test_a_peer_added_then_removed_live(tmp_path: Path, mode: str) -> None:
    ids: dict[str, NodeIdentity] = identities(tmp_path, "node-a", "node-b", "node-c")
    keys = {name: identity.public_key_bytes for name, identity in ids.items()}
    cas = ca_securities(tmp_path, "node-a", "node-b", "node-c") if mode == "ca" else {}

    def security(name: str, *peers: str) -> Security:
        if mode == "ca":
            return cas[name]
        return Security.with_keys(ids[name], {peer: keys[peer] for peer in peers})

    received: dict[str, list[int]] = {"node-b": [], "node-c": []}

    def sink(peer_id: str, packets: list[bytes]) -> None:
        received[peer_id] += [int.from_bytes(p[28:32], "big") for p in packets]

    a = Node(
        security("node-a", "node-b"), ("127.0.0.1", 0), [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"])], sink
    )
    await a.start()
    to_a = [Peer("node-a", a.endpoint, ["10.9.0.1/32"])]
    b, c = (
        Node(security(name, "node-a"), ("127.0.0.1", 0), to_a, resilience=FAST)
        for name in ("node-b", "node-c")
    )
    await b.start()
    await c.start()
    try:
        assert b.send(_packet("10.9.0.2", 0))
        await wait_until(lambda: received["node-b"] == [0])
        native = a.receiver._native()  # made for node-b's connection: changed in place from now on
        assert native is not None

        # node-c is not a peer yet: refused.
        c.send(_packet("10.9.0.3", 0))
        await wait_until(lambda: a.receiver.metrics().refused.get("unknown_peer", 0) >= 1)

        # It joins, as discovery adds a peer: its handshake is accepted, its packets delivered.
        await a.update_peers(
            [Peer("node-c", "127.0.0.1:9", ["10.9.0.3/32"])],
            keys={"node-c": keys["node-c"]} if mode == "key" else None,
            source="discovery",
        )
        assert a.receiver._native() is native
        assert native.peer_count == 2
        for seq in range(1, 4):
            assert b.send(_packet("10.9.0.2", seq))
        await wait_until(lambda: received["node-b"] == [0, 1, 2, 3])
        # node-c's keeper may have had a handshake in flight, judged before the join: a packet that rode on
        # it fails as refused. Every packet's outcome is waited for; node-c sends until one arrives.
        for seq in range(1, 20):
            assert c.send(_packet("10.9.0.3", seq))
            await wait_until(lambda: _settled(c))
            if seq in received["node-c"]:
                break
        assert received["node-c"]
        assert received["node-c"] == sorted(received["node-c"])

        # It leaves: its connection closes and its next handshake is refused; node-b's traffic flows on.
        refused = a.receiver.metrics().refused.get("unknown_peer", 0)
        changes = await a.update_peers(removed=["node-c"], source="discovery")
        assert changes.closed >= 1
        assert a.receiver._native() is native
        assert native.peer_count == 1
        c.send(_packet("10.9.0.3", 99))
        await wait_until(lambda: a.receiver.metrics().refused.get("unknown_peer", 0) > refused)
        for seq in range(4, 8):
            assert b.send(_packet("10.9.0.2", seq))
        await wait_until(lambda: received["node-b"] == list(range(8)))
        assert 99 not in received["node-c"]
        if mode == "key":
            assert a.security.peer_keys == {"node-b": keys["node-b"]}
    finally:
        for node in (b, c, a):
            await node.stop()


def test_the_discovery_keeps_its_hosts_and_indexes_as_peers_join_and_leave() -> None:
    """What the receiver asks per connection (whether a source is a peer's host, the peers' indexes) is
    kept by `update` in place, not found by a scan of every peer."""
    discovery = StaticPeerDiscovery([Peer("a", "127.0.0.1:1", ["10.8.0.1/32"])])
    assert discovery.peers_at("127.0.0.1") == ["a"]
    discovery.update(
        added=[Peer("b", "127.0.0.2:2", ["10.8.0.2/32"]), Peer("c", "127.0.0.1:3", ["10.8.0.3/32"])]
    )
    assert discovery.peers_at("127.0.0.1") == ["a", "c"]
    assert discovery.peers_at("127.0.0.2") == ["b"]
    discovery.update(updated=[Peer("a", "127.0.0.3:1", ["10.8.0.1/32"])], removed=["b"])
    assert discovery.peers_at("127.0.0.1") == ["c"]
    assert discovery.peers_at("127.0.0.2") == []
    assert discovery.peers_at("127.0.0.3") == ["a"]
    assert discovery.indexes == {peer.id: discovery.index_of(peer.id) for peer in discovery.peers}
    discovery.replace([Peer("d", "127.0.0.4:4", ["10.8.0.4/32"])])
    assert discovery.peers_at("127.0.0.1") == []
    assert discovery.peers_at("127.0.0.4") == ["d"]
    assert discovery.indexes == {"d": 0}
