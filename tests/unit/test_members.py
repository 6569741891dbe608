"""`MemberTable` (issue 21 item 3): trust separate from reachability, one event at a time, with injected time.

Whoever writes to etcd can delete or copy entries but cannot make anyone trusted (another authority,
forged, expired, revoked), move a member's endpoint (only the member's key signs its entry), or lock a member
out (a replay or a copy under another key changes nothing). Overlapping claims apply neither side and count
an alarm until one leaves; this node's own and static prefixes and ids are refused. Every change comes out as
an added/updated/removed set, the one input of the node's peer-set path."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet.mesh.members import DiscoveredPeer, MemberTable, PeerSetChange
from vpn_packet.mesh.membership import Entry, Membership, sign_entry, sign_membership, sign_revocation
from vpn_packet.testutil.keys import identities
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.tuning import CLOCK_SKEW

T0 = 1_800_000_000
DAY = 86_400
PREFIX = "/vpn-packet/test/"
NAMES = ("authority", "stranger", "self", "a", "b", "c", "a2")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    return identities(tmp_path_factory.mktemp("keys"), *NAMES)


def _membership(
    keys: dict[str, NodeIdentity], name: str, prefixes: tuple[str, ...], *, member_id: str | None = None,
    issued: int = T0, days: int = 30, authority: str = "authority",
) -> Membership:  # fmt: skip
    return sign_membership(
        keys[authority], member_id=member_id or name, public_key=keys[name].public_key_bytes,
        allowed_ips=prefixes, issued=issued, days=days,
    )  # fmt: skip


def _entry(
    keys: dict[str, NodeIdentity], name: str, prefixes: tuple[str, ...] = (), *, sequence: int = 1,
    endpoint: str = "192.168.77.9:7000", membership: Membership | None = None, **kwargs: object,
) -> Entry:  # fmt: skip
    if membership is None:
        membership = _membership(keys, name, prefixes, **kwargs)  # type: ignore[arg-type]
    return sign_entry(keys[name], membership, endpoint=endpoint, sequence=sequence)


def _table(keys: dict[str, NodeIdentity], static: dict[str, tuple[str, ...]] | None = None) -> MemberTable:
    own = _membership(keys, "self", ("10.8.0.1/32",), member_id="self")
    return MemberTable(own, {keys["authority"].public_key_bytes}, prefix=PREFIX, static=static)


def _key(member_id: str) -> str:
    return f"{PREFIX}members/{member_id}"


def test_a_valid_entry_is_added_then_updated_then_removed(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys)
    entry = _entry(keys, "a", ("10.8.0.2/32",))
    change = table.put(_key("a"), entry.record, T0)
    assert change.added == {
        "a": DiscoveredPeer(
            "a", "192.168.77.9:7000", ("10.8.0.2/32",), keys["a"].public_key_bytes, T0 + 30 * DAY
        )
    }
    assert not change.updated
    assert not change.removed
    moved = _entry(keys, "a", membership=entry.membership, sequence=2, endpoint="192.168.77.10:7000")
    change = table.put(_key("a"), moved.record, T0)
    assert set(change.updated) == {"a"}
    assert change.updated["a"].endpoint == "192.168.77.10:7000"
    assert table.delete(_key("a")).removed == {"a"}
    assert table.applied() == {}


def test_refusals_by_reason_change_nothing(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys, static={"static-1": ("10.8.5.0/24",)})
    good = _entry(keys, "a", ("10.8.0.2/32",))
    assert table.put(_key("a"), good.record, T0)
    cases = {
        "unknown_authority": (
            _key("b"),
            _entry(keys, "b", ("10.8.0.3/32",), authority="stranger").record,
            T0,
        ),
        "bad_signature": (_key("a"), good.record.replace(b"192.168.77.9", b"192.168.77.6"), T0),
        "expired": (_key("b"), _entry(keys, "b", ("10.8.0.3/32",), issued=T0 - 31 * DAY).record, T0),
        "malformed": (_key("b"), b"garbage", T0),
        "wrong_key": (_key("b"), _entry(keys, "c", ("10.8.0.4/32",)).record, T0),
        "overlaps_own": (_key("b"), _entry(keys, "b", ("10.8.0.0/24",)).record, T0),
        "overlaps_static": (_key("b"), _entry(keys, "b", ("10.8.5.7/32",)).record, T0),
        "static_id": (_key("static-1"), _entry(keys, "b", ("10.8.0.3/32",), member_id="static-1").record, T0),
        "own_id": (_key("self"), _entry(keys, "b", ("10.8.0.3/32",), member_id="self").record, T0),
        "superseded": (_key("a"), _entry(keys, "a", membership=good.membership, sequence=0).record, T0),
    }
    for reason, (key, value, now) in cases.items():
        before = dict(table.refused)
        assert not table.put(key, value, now), reason
        assert table.refused[reason] == before.get(reason, 0) + 1, reason
    assert set(table.applied()) == {"a"}


def test_a_replay_or_a_copy_changes_nothing(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys)
    old = _entry(keys, "a", ("10.8.0.2/32",), sequence=1, endpoint="192.168.77.9:7000")
    new = _entry(keys, "a", membership=old.membership, sequence=2, endpoint="192.168.77.10:7000")
    table.put(_key("a"), old.record, T0)
    table.put(_key("a"), new.record, T0)
    assert not table.put(_key("a"), old.record, T0)  # replayed
    assert table.refused["superseded"] == 1
    assert not table.put(_key("a"), new.record, T0)  # the same again: nothing, and no refusal
    assert table.refused["superseded"] == 1
    assert not table.put(f"{PREFIX}members/elsewhere", new.record, T0)  # a copy under another key
    assert table.refused["wrong_key"] == 1
    # After the member leaves, its old entry cannot be replayed back in.
    table.delete(_key("a"))
    assert not table.put(_key("a"), new.record, T0)
    assert table.applied() == {}


def test_a_later_membership_rotates_the_key(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys)
    table.put(_key("a"), _entry(keys, "a", ("10.8.0.2/32",), sequence=50).record, T0)
    rotated = _entry(keys, "a2", ("10.8.0.2/32",), member_id="a", issued=T0 + 60, sequence=1)
    change = table.put(_key("a"), rotated.record, T0 + 60)
    assert change.updated["a"].public_key == keys["a2"].public_key_bytes
    older = _entry(keys, "a", ("10.8.0.2/32",), issued=T0 - 60, sequence=99)
    assert not table.put(_key("a"), older.record, T0 + 60)
    assert table.refused["superseded"] == 1


def test_overlapping_ids_apply_neither_until_one_leaves(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys)
    assert table.put(_key("a"), _entry(keys, "a", ("10.8.1.0/24",)).record, T0).added
    change = table.put(_key("b"), _entry(keys, "b", ("10.8.1.7/32",)).record, T0)
    assert change.removed == {"a"}
    assert not change.added
    assert table.overlap_alarms == 1
    assert table.conflicts() == {"a": {"b"}, "b": {"a"}}
    assert "overlapping" in table.last_alarm
    # A third, disjoint member is unaffected.
    assert set(table.put(_key("c"), _entry(keys, "c", ("10.9.0.0/16",)).record, T0).added) == {"c"}
    change = table.delete(_key("b"))
    assert set(change.added) == {"a"}
    assert not change.removed  # b was never applied
    assert set(table.applied()) == {"a", "c"}


def test_a_revocation_removes_at_once_and_a_deleted_revocation_revokes_nothing_back(
    keys: dict[str, NodeIdentity],
) -> None:
    table = _table(keys)
    entry = _entry(keys, "a", ("10.8.0.2/32",))
    table.put(_key("a"), entry.record, T0)
    by_key = sign_revocation(keys["authority"], public_key=keys["a"].public_key_bytes, issued=T0 + 10)
    assert table.put(f"{PREFIX}revoked/1", by_key.record, T0 + 10).removed == {"a"}
    assert not table.delete(f"{PREFIX}revoked/1")
    again = _entry(keys, "a", membership=entry.membership, sequence=5)
    assert not table.put(_key("a"), again.record, T0 + 20)
    assert table.refused["revoked"] == 1
    # A stranger's revocation is refused and removes nothing.
    table.put(_key("b"), _entry(keys, "b", ("10.8.0.3/32",)).record, T0)
    forged = sign_revocation(keys["stranger"], member_id="b", issued=T0 + 10)
    assert not table.revoke(forged.record, T0 + 10)
    assert table.refused["unknown_authority"] == 1
    assert set(table.applied()) == {"b"}


def test_a_membership_that_expires_is_removed_like_a_departure(keys: dict[str, NodeIdentity]) -> None:
    table = _table(keys)
    table.put(_key("a"), _entry(keys, "a", ("10.8.0.2/32",), days=1).record, T0)
    table.put(_key("b"), _entry(keys, "b", ("10.8.0.3/32",), days=2).record, T0)
    assert table.next_expiry() == T0 + DAY
    assert not table.expire(T0 + DAY + CLOCK_SKEW)
    assert table.expire(T0 + DAY + CLOCK_SKEW + 1).removed == {"a"}
    assert table.next_expiry() == T0 + 2 * DAY


def test_changes_merge_in_order() -> None:
    peer = DiscoveredPeer("a", "h:1", ("10.0.0.1/32",), b"k" * 32, 0)
    change = PeerSetChange(added={"a": peer})
    change.merge(PeerSetChange(removed={"a"}))
    assert not change
    change = PeerSetChange(removed={"a"})
    change.merge(PeerSetChange(added={"a": peer}))
    assert change.updated == {"a": peer}
    assert not change.removed


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 255), st.sampled_from([8, 16, 24, 30, 32])
        ),
        max_size=12,
    ),
    st.integers(0, 255),
    st.sampled_from([0, 8, 24, 32]),
)
def test_overlaps_are_found_exactly_as_ipaddress_says(
    claims: list[tuple[str, int, int]], probe_byte: int, probe_length: int
) -> None:
    """The index's answer (supernets by integer masks, narrower claims by a sorted range) against the
    brute force of `ipaddress.overlaps`, including removals."""
    from vpn_packet.mesh.members import _Prefixes

    def network(byte: int, length: int) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((f"10.{byte}.{byte}.{byte}", length), strict=False)

    index = _Prefixes()
    held = []
    for owner, byte, length in claims:
        if (network(byte, length), owner) in held:
            continue  # an owner claims a prefix once (a membership's prefixes are distinct)
        index.add(network(byte, length), owner)
        held.append((network(byte, length), owner))
    for net, owner in held[::2]:
        index.remove(net, owner)
    remaining = held[1::2]
    probe = network(probe_byte, probe_length)
    assert index.overlapping(probe) == {owner for net, owner in remaining if net.overlaps(probe)}
    v6 = ipaddress.IPv6Network("fd00::/64")
    index.add(v6, "six")
    assert index.overlapping(ipaddress.IPv6Network("fd00::1/128")) == {"six"}
    assert "six" not in index.overlapping(probe)
