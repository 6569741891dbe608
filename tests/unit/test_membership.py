"""Mesh memberships, revocations and entries (issue 21 item 1): what is trusted and what is refused, why.

Every refusal is a `MembershipError` with a stable `reason`: forged (a byte changed, another key's
signature, a signature made for another context, the small-order forgery), unknown authority, weak keys,
the authority as a member, expired or not yet valid (with the clock skew tolerated exactly), revoked (by id,
by key, by any configured authority, not a membership issued after), superseded (`Entry.outranks`), and
malformed bytes of every length (never another exception).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet.errors import MembershipError, UsageError
from vpn_packet.mesh import membership as mm
from vpn_packet.mesh.membership import (
    Membership,
    Revocations,
    read_record_file,
    sign_entry,
    sign_membership,
    sign_revocation,
    verify_entry,
    verify_membership,
    verify_revocation,
    write_record_file,
)
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.weak_keys import FORGED_SIGNATURE, mixed_order_key, small_order_keys
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.tuning import CLOCK_SKEW, MAX_MEMBERSHIP_DAYS

DAY = 86_400
T0 = 1_800_000_000  # a fixed issue time: every clock in these tests is injected


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    return identities(
        tmp_path_factory.mktemp("keys"), "authority", "authority2", "stranger", "node-a", "node-b"
    )


def _member(
    keys: dict[str, NodeIdentity],
    *,
    authority: str = "authority",
    node: str = "node-a",
    member_id: str = "node-a",
    issued: int = T0,
    days: int = 90,
    allowed_ips: tuple[str, ...] = ("10.8.0.1/32",),
) -> Membership:
    return sign_membership(
        keys[authority],
        member_id=member_id,
        public_key=keys[node].public_key_bytes,
        allowed_ips=allowed_ips,
        issued=issued,
        days=days,
    )


def _reason(call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(MembershipError) as caught:
        call(*args, **kwargs)
    return caught.value.reason


def _resign(authority: NodeIdentity, body: bytes, context: bytes = mm.MEMBERSHIP_CONTEXT) -> bytes:
    return body + authority.sign(context + body)


def test_a_signed_membership_verifies_with_its_fields(keys: dict[str, NodeIdentity]) -> None:
    membership = _member(keys, allowed_ips=("fd00::1/128", "10.8.1.0/24", "10.8.0.1/32"), days=30)
    trusted = verify_membership(membership.record, {keys["authority"].public_key_bytes}, T0 + DAY)
    assert trusted == membership
    assert trusted.id == "node-a"
    assert trusted.public_key == keys["node-a"].public_key_bytes
    assert trusted.authority == keys["authority"].public_key_bytes
    assert trusted.allowed_ips == ("10.8.0.1/32", "10.8.1.0/24", "fd00::1/128")  # canonical order
    assert (trusted.issued, trusted.expires) == (T0, T0 + 30 * DAY)
    assert "node-a" in trusted.summary()


def test_any_configured_authority_is_trusted_so_the_authority_can_rotate(
    keys: dict[str, NodeIdentity],
) -> None:
    old, new = keys["authority"].public_key_bytes, keys["authority2"].public_key_bytes
    for name in ("authority", "authority2"):
        assert verify_membership(_member(keys, authority=name).record, [old, new], T0).authority in (old, new)


def test_a_membership_from_another_authority_is_refused(keys: dict[str, NodeIdentity]) -> None:
    record = _member(keys, authority="stranger").record
    assert _reason(verify_membership, record, {keys["authority"].public_key_bytes}, T0) == "unknown_authority"


def test_every_changed_byte_of_a_membership_is_refused(keys: dict[str, NodeIdentity]) -> None:
    record = _member(keys).record
    authorities = {keys["authority"].public_key_bytes}
    for index in range(len(record)):
        tampered = bytearray(record)
        tampered[index] ^= 0x01
        with pytest.raises(MembershipError):
            verify_membership(bytes(tampered), authorities, T0)


def test_a_body_signed_by_another_key_or_for_another_context_is_refused(
    keys: dict[str, NodeIdentity],
) -> None:
    record = _member(keys).record
    body = record[: -mm.SIGNATURE_LEN]
    authorities = {keys["authority"].public_key_bytes}
    assert _reason(verify_membership, _resign(keys["stranger"], body), authorities, T0) == "bad_signature"
    for context in (b"vpn-packet hello v2\0", mm.ENTRY_CONTEXT, mm.REVOCATION_CONTEXT, b""):
        forged = _resign(keys["authority"], body, context)
        assert _reason(verify_membership, forged, authorities, T0) == "bad_signature"
    # The contexts are distinct from each other and from the hello's.
    contexts = {mm.MEMBERSHIP_CONTEXT, mm.REVOCATION_CONTEXT, mm.ENTRY_CONTEXT, b"vpn-packet hello v2\0"}
    assert len(contexts) == 4


def _membership_body(authority: bytes, member: bytes, *, issued: int = T0, expires: int = T0 + DAY) -> bytes:
    member_id = b"node-a"
    prefix = bytes([4, 32, 10, 8, 0, 1])
    return (
        mm.MAGIC
        + bytes([mm.VERSION, ord("M")])
        + authority
        + struct.pack(">QQ", issued, expires)
        + bytes([len(member_id)])
        + member_id
        + member
        + bytes([1])
        + prefix
    )


def test_the_small_order_forgery_is_refused_whatever_the_configuration(keys: dict[str, NodeIdentity]) -> None:
    """Without any private key: a small-order 'authority' and the identity signature. Configured or not, the
    weak key is refused (`bad_key`, or `unknown_authority` before any verification)."""
    member = keys["node-a"].public_key_bytes
    for weak in small_order_keys():
        record = _membership_body(weak, member) + FORGED_SIGNATURE
        assert _reason(verify_membership, record, {weak}, T0) == "bad_key"
        assert (
            _reason(verify_membership, record, {keys["authority"].public_key_bytes}, T0)
            == "unknown_authority"
        )


def test_weak_member_keys_are_refused_when_signing_and_when_verifying(keys: dict[str, NodeIdentity]) -> None:
    authority = keys["authority"]
    weak = [*small_order_keys()[:3], mixed_order_key(keys["node-a"].public_key_bytes, 1)]
    for key in weak:
        reason = _reason(
            sign_membership,
            authority,
            member_id="x",
            public_key=key,
            allowed_ips=["10.8.0.1/32"],
            issued=T0,
            days=1,
        )
        assert reason == "bad_key"
        record = _resign(authority, _membership_body(authority.public_key_bytes, key))
        assert _reason(verify_membership, record, {authority.public_key_bytes}, T0) == "bad_key"


def test_the_authority_key_is_refused_as_a_member(keys: dict[str, NodeIdentity]) -> None:
    authority = keys["authority"]
    reason = _reason(
        sign_membership,
        authority,
        member_id="authority",
        public_key=authority.public_key_bytes,
        allowed_ips=["10.8.0.9/32"],
        issued=T0,
        days=1,
    )
    assert reason == "authority_as_member"
    record = _resign(authority, _membership_body(authority.public_key_bytes, authority.public_key_bytes))
    assert _reason(verify_membership, record, {authority.public_key_bytes}, T0) == "authority_as_member"


def test_validity_and_the_clock_skew_tolerated(keys: dict[str, NodeIdentity]) -> None:
    membership = _member(keys, days=1)
    authorities = {keys["authority"].public_key_bytes}
    expires = T0 + DAY
    for now in (T0 - CLOCK_SKEW, T0, expires, expires + CLOCK_SKEW):
        assert verify_membership(membership.record, authorities, now) == membership
    assert _reason(verify_membership, membership.record, authorities, T0 - CLOCK_SKEW - 1) == "not_yet_valid"
    assert _reason(verify_membership, membership.record, authorities, expires + CLOCK_SKEW + 1) == "expired"


def test_validity_is_one_to_365_days(keys: dict[str, NodeIdentity]) -> None:
    assert _member(keys, days=MAX_MEMBERSHIP_DAYS).expires == T0 + MAX_MEMBERSHIP_DAYS * DAY
    for days in (0, MAX_MEMBERSHIP_DAYS + 1):
        assert _reason(_member, keys, days=days) == "validity_too_long"
    authority = keys["authority"]
    long = _membership_body(
        authority.public_key_bytes, keys["node-a"].public_key_bytes, expires=T0 + 366 * DAY
    )
    assert (
        _reason(verify_membership, _resign(authority, long), {authority.public_key_bytes}, T0)
        == "validity_too_long"
    )
    backwards = _membership_body(authority.public_key_bytes, keys["node-a"].public_key_bytes, expires=T0)
    assert (
        _reason(verify_membership, _resign(authority, backwards), {authority.public_key_bytes}, T0)
        == "malformed"
    )


def test_bad_ids_and_prefixes_are_refused_when_signing(keys: dict[str, NodeIdentity]) -> None:
    assert _reason(_member, keys, member_id="") == "malformed"
    assert _reason(_member, keys, member_id="x" * 256) == "malformed"
    assert _reason(_member, keys, allowed_ips=()) == "malformed"
    assert _reason(_member, keys, allowed_ips=("10.8.0.1/24",)) == "malformed"  # host bits
    assert _reason(_member, keys, allowed_ips=("nonsense",)) == "malformed"
    # Repeats collapse to one.
    assert _member(keys, allowed_ips=("10.8.0.1/32", "10.8.0.1/32")).allowed_ips == ("10.8.0.1/32",)


def test_prefixes_out_of_canonical_order_are_malformed_even_when_signed(
    keys: dict[str, NodeIdentity],
) -> None:
    authority = keys["authority"]
    body = _membership_body(authority.public_key_bytes, keys["node-a"].public_key_bytes)
    two = body[:-7] + bytes([2]) + bytes([4, 32, 10, 8, 0, 2]) + bytes([4, 32, 10, 8, 0, 1])
    assert (
        _reason(verify_membership, _resign(authority, two), {authority.public_key_bytes}, T0) == "malformed"
    )
    repeated = body[:-7] + bytes([2]) + bytes([4, 32, 10, 8, 0, 1]) * 2
    assert (
        _reason(verify_membership, _resign(authority, repeated), {authority.public_key_bytes}, T0)
        == "malformed"
    )


def test_every_truncation_and_any_trailing_byte_is_malformed(keys: dict[str, NodeIdentity]) -> None:
    record = _member(keys).record
    authorities = {keys["authority"].public_key_bytes}
    for length in range(len(record)):
        assert _reason(verify_membership, record[:length], authorities, T0) == "malformed"
    assert _reason(verify_membership, record + b"\0", authorities, T0) == "malformed"
    assert _reason(verify_membership, bytes(mm.MAX_RECORD_LEN + 1), authorities, T0) == "malformed"


@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_with_a_reason(data: bytes) -> None:
    for verify in (verify_membership, verify_revocation, verify_entry):
        with pytest.raises(MembershipError):
            verify(data, {bytes(32)}, T0)
        with pytest.raises(MembershipError):
            verify(mm.MAGIC + bytes([mm.VERSION]) + data, {bytes(32)}, T0)


# --- revocations -------------------------------------------------------------------------------------------


def test_a_revocation_by_id_covers_memberships_issued_up_to_it(keys: dict[str, NodeIdentity]) -> None:
    authorities = {keys["authority"].public_key_bytes}
    revocation = verify_revocation(
        sign_revocation(keys["authority"], member_id="node-a", issued=T0 + DAY).record, authorities, T0 + DAY
    )
    held = Revocations([revocation])
    before = _member(keys, issued=T0)
    assert _reason(verify_membership, before.record, authorities, T0 + DAY, held) == "revoked"
    other = _member(keys, member_id="node-b", node="node-b", issued=T0)
    assert verify_membership(other.record, authorities, T0 + DAY, held) == other
    within_skew = _member(keys, issued=T0 + DAY + CLOCK_SKEW)
    assert _reason(verify_membership, within_skew.record, authorities, T0 + DAY, held) == "revoked"
    after = _member(keys, issued=T0 + DAY + CLOCK_SKEW + 1)
    assert verify_membership(after.record, authorities, T0 + DAY + CLOCK_SKEW + 1, held) == after


def test_a_revocation_by_key_covers_that_key_under_any_id(keys: dict[str, NodeIdentity]) -> None:
    authorities = {keys["authority"].public_key_bytes}
    revocation = sign_revocation(keys["authority"], public_key=keys["node-a"].public_key_bytes, issued=T0)
    held = Revocations([verify_revocation(revocation.record, authorities, T0)])
    renamed = _member(keys, member_id="node-a-renamed")
    assert _reason(verify_membership, renamed.record, authorities, T0, held) == "revoked"
    assert verify_membership(_member(keys, node="node-b").record, authorities, T0, held).id == "node-a"


def test_a_revocation_by_the_rotated_authority_covers_the_old_one_s_memberships(
    keys: dict[str, NodeIdentity],
) -> None:
    authorities = {keys["authority"].public_key_bytes, keys["authority2"].public_key_bytes}
    revocation = sign_revocation(keys["authority2"], member_id="node-a", issued=T0)
    held = Revocations([verify_revocation(revocation.record, authorities, T0)])
    assert _reason(verify_membership, _member(keys).record, authorities, T0, held) == "revoked"


def test_revocations_are_refused_from_strangers_forged_or_when_nothing_is_left_to_revoke(
    keys: dict[str, NodeIdentity],
) -> None:
    authorities = {keys["authority"].public_key_bytes}
    stranger = sign_revocation(keys["stranger"], member_id="node-a", issued=T0)
    assert _reason(verify_revocation, stranger.record, authorities, T0) == "unknown_authority"
    revocation = sign_revocation(keys["authority"], member_id="node-a", issued=T0)
    body = revocation.record[: -mm.SIGNATURE_LEN]
    for context in (mm.MEMBERSHIP_CONTEXT, mm.ENTRY_CONTEXT):
        assert (
            _reason(verify_revocation, _resign(keys["authority"], body, context), authorities, T0)
            == "bad_signature"
        )
    assert verify_revocation(revocation.record, authorities, revocation.held_until) == revocation
    assert _reason(verify_revocation, revocation.record, authorities, revocation.held_until + 1) == "expired"
    # Kept until every membership it covers has expired: the longest, issued at the last second it covers.
    last = _member(keys, issued=T0 + CLOCK_SKEW, days=MAX_MEMBERSHIP_DAYS)
    assert revocation.covers(last)
    assert revocation.held_until >= last.expires + CLOCK_SKEW


def test_a_revocation_names_exactly_one_target_and_no_weak_key(keys: dict[str, NodeIdentity]) -> None:
    assert _reason(sign_revocation, keys["authority"], issued=T0) == "malformed"
    both = {"member_id": "node-a", "public_key": keys["node-a"].public_key_bytes}
    assert _reason(sign_revocation, keys["authority"], issued=T0, **both) == "malformed"
    assert _reason(sign_revocation, keys["authority"], public_key=bytes(32), issued=T0) == "bad_key"


def test_held_revocations_are_deduplicated_and_expire(keys: dict[str, NodeIdentity]) -> None:
    first = sign_revocation(keys["authority"], member_id="node-a", issued=T0)
    second = sign_revocation(keys["authority"], public_key=keys["node-b"].public_key_bytes, issued=T0 + DAY)
    held = Revocations()
    assert held.add(first)
    assert held.add(second)
    assert not held.add(first)
    assert len(held) == 2
    assert set(held) == {first, second}
    assert held.expire(first.held_until) == 0
    assert held.expire(first.held_until + 1) == 1
    assert list(held) == [second]


# --- entries -----------------------------------------------------------------------------------------------


def test_an_entry_signed_by_its_member_verifies(keys: dict[str, NodeIdentity]) -> None:
    membership = _member(keys)
    entry = sign_entry(keys["node-a"], membership, endpoint="192.168.77.1:7000", sequence=3)
    trusted = verify_entry(entry.record, {keys["authority"].public_key_bytes}, T0)
    assert (trusted.membership, trusted.endpoint, trusted.sequence) == (membership, "192.168.77.1:7000", 3)


def test_nobody_but_the_member_can_move_its_endpoint(keys: dict[str, NodeIdentity]) -> None:
    membership = _member(keys)
    authorities = {keys["authority"].public_key_bytes}
    entry = sign_entry(keys["node-a"], membership, endpoint="192.168.77.1:7000", sequence=3)
    moved = entry.record.replace(b"192.168.77.1:7000", b"192.168.77.6:7000")
    assert _reason(verify_entry, moved, authorities, T0) == "bad_signature"
    body = entry.record[: -mm.SIGNATURE_LEN]
    assert (
        _reason(verify_entry, _resign(keys["node-b"], body, mm.ENTRY_CONTEXT), authorities, T0)
        == "bad_signature"
    )
    assert _reason(verify_entry, _resign(keys["node-a"], body, mm.MEMBERSHIP_CONTEXT), authorities, T0) == (
        "bad_signature"
    )
    with pytest.raises(MembershipError, match="another key"):
        sign_entry(keys["node-b"], membership, endpoint="192.168.77.1:7000", sequence=1)


def test_an_entry_carries_its_membership_s_refusals(keys: dict[str, NodeIdentity]) -> None:
    authorities = {keys["authority"].public_key_bytes}
    entry = sign_entry(keys["node-a"], _member(keys, days=1), endpoint="192.168.77.1:7000", sequence=1)
    assert _reason(verify_entry, entry.record, authorities, T0 + 2 * DAY) == "expired"
    held = Revocations([sign_revocation(keys["authority"], member_id="node-a", issued=T0)])
    assert _reason(verify_entry, entry.record, authorities, T0, held) == "revoked"
    assert _reason(verify_entry, entry.record, {keys["stranger"].public_key_bytes}, T0) == "unknown_authority"


def test_a_later_issue_time_then_a_higher_sequence_supersedes(keys: dict[str, NodeIdentity]) -> None:
    old = sign_entry(keys["node-a"], _member(keys, issued=T0), endpoint="192.168.77.1:7000", sequence=9)
    rotated = sign_entry(
        keys["node-b"], _member(keys, node="node-b", issued=T0 + 1), endpoint="192.168.77.1:7000", sequence=0
    )
    assert rotated.outranks(old)
    assert not old.outranks(rotated)
    moved = sign_entry(keys["node-a"], old.membership, endpoint="192.168.77.2:7000", sequence=10)
    assert moved.outranks(old)
    assert not old.outranks(moved)
    assert not old.outranks(old)  # a replayed copy changes nothing


# --- files -------------------------------------------------------------------------------------------------


def test_files_round_trip_and_bad_files_are_refused(keys: dict[str, NodeIdentity], tmp_path: Path) -> None:
    membership = _member(keys)
    path = write_record_file(tmp_path / "node-a.member", membership.record, membership.summary())
    assert read_record_file(path) == membership.record
    assert path.read_text().startswith("# vpn-packet membership of node-a")
    for bad in ("", "# only a comment\n", "not base64!\n", "AAAA\nAAAA\n"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(MembershipError) as caught:
            read_record_file(tmp_path / "bad")
        assert isinstance(caught.value, UsageError)
    (tmp_path / "big").write_bytes(b"A" * 100_000)
    assert _reason(read_record_file, tmp_path / "big") == "malformed"
