"""The one add/update/remove path of the peer set (issue 21 item 2): `Node.update_peers`, which a reload
(`reconfigure`, with its diff) and discovery take. It changes the peer table in place: unchanged peers keep
their index (the receiver's connections stay valid, no table swap), added peers get new ones, invalid changes
raise before anything changes; a reload of the static peers leaves discovered peers alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from vpn_packet.node.node import Node
from vpn_packet.testutil.keys import identities
from vpn_packet.transport import Peer, Security
from vpn_packet.transport.discovery import StaticPeerDiscovery


def test_the_table_changes_in_place_and_indexes_stay() -> None:
    discovery = StaticPeerDiscovery(
        [Peer("a", "127.0.0.1:1", ["10.8.0.1/32"]), Peer("b", "127.0.0.1:2", ["10.8.0.2/32"])]
    )
    table, index_b = discovery.table, discovery.index_of("b")
    discovery.update(
        added=[Peer("c", "127.0.0.1:3", ["10.8.0.3/32"])],
        updated=[Peer("b", "127.0.0.1:22", ["10.8.0.2/32", "10.8.2.0/24"])],
        removed=["a"],
    )
    assert discovery.table is table
    assert discovery.generation == 0
    assert discovery.index_of("b") == index_b
    assert discovery.index_of("c") not in (index_b, 0)  # never a removed peer's index
    assert [p.id for p in discovery.peers] == ["b", "c"]
    assert discovery.lookup("10.8.0.1") is None
    assert discovery.lookup("10.8.2.7") == "b"
    assert discovery.lookup("10.8.0.3") == "c"
    assert discovery.endpoint("b") == ("127.0.0.1", 22)
    assert len(discovery) == 2
    assert "a" not in discovery


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"added": [Peer("a", "127.0.0.1:9", ["10.8.0.9/32"])]}, "duplicate"),
        ({"updated": [Peer("z", "127.0.0.1:9", ["10.8.0.9/32"])]}, "unknown"),
        ({"removed": ["z"]}, "unknown"),
        ({"added": [Peer("c", "127.0.0.1:9", ["10.8.0.2/32"])]}, "given to both"),
        (
            {"added": [Peer("c", "127.0.0.1:9", ["10.8.0.9/32"]), Peer("d", "127.0.0.1:8", ["10.8.0.9/32"])]},
            "given to both",
        ),
    ],
)
def test_an_invalid_change_raises_and_changes_nothing(change: dict[str, list[object]], message: str) -> None:
    discovery = StaticPeerDiscovery(
        [Peer("a", "127.0.0.1:1", ["10.8.0.1/32"]), Peer("b", "127.0.0.1:2", ["10.8.0.2/32"])]
    )
    with pytest.raises(ValueError, match=message):
        discovery.update(**change)  # type: ignore[arg-type]
    assert [p.id for p in discovery.peers] == ["a", "b"]
    assert discovery.lookup("10.8.0.2") == "b"
    assert discovery.lookup("10.8.0.9") is None


def test_a_prefix_moves_between_peers_in_one_change() -> None:
    discovery = StaticPeerDiscovery([Peer("a", "127.0.0.1:1", ["10.8.0.1/32"])])
    discovery.update(added=[Peer("b", "127.0.0.1:2", ["10.8.0.1/32"])], removed=["a"])
    assert discovery.lookup("10.8.0.1") == "b"


def test_many_removals_compact_the_table() -> None:
    discovery = StaticPeerDiscovery(
        [Peer(f"p{i}", f"127.0.0.1:{i + 1}", [f"10.9.{i // 250}.{i % 250}/32"]) for i in range(200)]
    )
    discovery.update(removed=[f"p{i}" for i in range(150)])
    assert discovery.generation == 1  # rebuilt: the receivers fetch the table and indexes again
    assert discovery.lookup("10.9.0.199") == "p199"
    assert len(discovery) == 50


async def test_discovered_peers_survive_a_reload_of_the_static_ones(tmp_path: Path) -> None:
    keys = identities(tmp_path, "self", "s1", "s2", "d1")
    security = Security.with_keys(keys["self"], {"s1": keys["s1"].public_key_bytes})
    node = Node(security, peers=[Peer("s1", "127.0.0.1:9", ["10.8.0.11/32"])], keep_connections=False)
    async with node:
        changes = await node.update_peers(
            added=[Peer("d1", "127.0.0.1:8", ["10.8.0.21/32"])],
            keys={"d1": keys["d1"].public_key_bytes},
            source="discovery",
        )
        assert changes.added == ("d1",)
        assert node.peer_source("d1") == "discovery"
        assert {p["id"]: p["source"] for p in node.peer_status()} == {"s1": "static", "d1": "discovery"}
        # A reload: s1 goes, s2 comes; d1 stays, with its key.
        changes = await node.reconfigure(
            [Peer("s2", "127.0.0.1:7", ["10.8.0.12/32"])], {"s2": keys["s2"].public_key_bytes}
        )
        assert (changes.added, changes.removed) == (("s2",), ("s1",))
        assert {p.id for p in node.peers} == {"s2", "d1"}
        assert node.security.peer_keys == {
            "s2": keys["s2"].public_key_bytes,
            "d1": keys["d1"].public_key_bytes,
        }
        # Discovery moves d1 and then removes it.
        changes = await node.update_peers(
            updated=[Peer("d1", "127.0.0.1:6", ["10.8.0.21/32"])], source="discovery"
        )
        assert changes.changed == {"d1": ("endpoint",)}
        changes = await node.update_peers(removed=["d1"], source="discovery")
        assert changes.removed == ("d1",)
        assert set(node.security.peer_keys) == {"s2"}
        assert node.peer_source("d1") == "static"  # unknown ids read as static: nothing is left of d1


async def test_a_key_given_twice_is_refused_before_anything_changes(tmp_path: Path) -> None:
    keys = identities(tmp_path, "self", "s1", "d1")
    security = Security.with_keys(keys["self"], {"s1": keys["s1"].public_key_bytes})
    node = Node(security, peers=[Peer("s1", "127.0.0.1:9", ["10.8.0.11/32"])], keep_connections=False)
    with pytest.raises(ValueError, match="same public key"):
        await node.update_peers(
            added=[Peer("d1", "127.0.0.1:8", ["10.8.0.21/32"])], keys={"d1": keys["s1"].public_key_bytes}
        )
    assert [p.id for p in node.peers] == ["s1"]


async def test_the_first_peers_are_warm_static_first_then_discovered_in_join_order(tmp_path: Path) -> None:
    """One warm rule for static and discovered peers (`Tuning.warm_peers`): the first ones in the node's
    order, static peers first; the others connect on demand."""
    from vpn_packet.tuning import WARM_PEERS

    keys = identities(tmp_path, "self")
    node = Node(Security.with_keys(keys["self"], {}), peers=[], keep_connections=True)
    discovered = [Peer(f"d{i}", f"127.0.0.1:{9000 + i}", [f"10.9.0.{i + 1}/32"]) for i in range(20)]
    await node.update_peers(added=discovered, source="discovery")
    await node.update_peers(added=[Peer("s1", "127.0.0.1:8999", ["10.8.0.11/32"])])
    assert node.keeper is not None
    assert node.keeper.warm() == ["s1", *[f"d{i}" for i in range(WARM_PEERS - 1)]]
    await node.update_peers(removed=["d0"], source="discovery")  # the next one to have joined becomes warm
    assert node.keeper.warm()[-1] == f"d{WARM_PEERS - 1}"
    assert len(node.keeper.warm()) == WARM_PEERS
    statics = [Peer(f"s{i}", f"127.0.0.1:{8000 + i}", [f"10.8.1.{i}/32"]) for i in range(2, 12)]
    await node.update_peers(added=statics)
    assert node.keeper.warm() == ["s1", *[f"s{i}" for i in range(2, WARM_PEERS + 1)]]  # static peers too


def test_security_key_changes_check_only_the_changed_keys(tmp_path: Path) -> None:
    from vpn_packet.errors import IdentityError
    from vpn_packet.testutil.weak_keys import small_order_keys

    keys = identities(tmp_path, "self", "a", "b", "c")
    security = Security.with_keys(keys["self"], {"a": keys["a"].public_key_bytes})
    changed = security.with_key_changes({"b": keys["b"].public_key_bytes})
    assert changed.peer_keys == {"a": keys["a"].public_key_bytes, "b": keys["b"].public_key_bytes}
    assert changed.peer_of_key(keys["b"].public_key_bytes) == "b"
    assert changed.server_context is security.server_context
    assert security.peer_keys == {"a": keys["a"].public_key_bytes}  # the original is unchanged
    with pytest.raises(IdentityError):
        changed.with_key_changes({"c": small_order_keys()[0]})
    with pytest.raises(ValueError, match="same public key"):
        changed.with_key_changes({"c": keys["a"].public_key_bytes})
    # A key freed by a removal (or a rekey) can be given again in the same change.
    moved = changed.with_key_changes({"c": keys["a"].public_key_bytes}, removed=["a"])
    assert moved.peer_keys == {"b": keys["b"].public_key_bytes, "c": keys["a"].public_key_bytes}
    assert moved.peer_of_key(keys["a"].public_key_bytes) == "c"
    rekeyed = moved.with_key_changes({"b": keys["c"].public_key_bytes})
    assert rekeyed.peer_of_key(keys["b"].public_key_bytes) is None
    assert rekeyed.peer_of_key(keys["c"].public_key_bytes) == "b"
