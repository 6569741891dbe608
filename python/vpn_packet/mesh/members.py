"""The members a node knows from the store, validated one event at a time (issue 21 item 3).

`MemberTable` takes what etcd says (a put or a delete under the prefix, a revocation) and answers with the
change to apply to the node's peer set (`PeerSetChange`: added, updated, removed), never more. It does no
I/O and keeps no clock of its own (every call takes `now`), so every rule is tested without etcd.

The rules (trust separate from reachability: whoever writes to etcd can delete or copy entries, but cannot
make anyone trusted, move a member's endpoint or lock a member out):

- an entry lives at `PREFIX/members/ID` and names that id (an entry under another key is refused,
  `wrong_key`: a copy elsewhere cannot keep a dead member alive or stand in for it);
- its membership is signed by a configured authority, unexpired, not revoked, and the entry by the
  membership's own key (`vpn_packet.mesh.membership.verify_entry`);
- for one id, a later membership issue time wins, then a higher sequence; anything not newer than the best
  seen for that id (kept until that membership expires, also after a delete) is refused `superseded`, so a
  replayed entry changes nothing;
- prefixes come from the membership only. An entry overlapping this node's own prefixes (its membership's,
  and the static peers') is refused (`overlaps_own`, `overlaps_static`); the id of a static peer or this
  node's own is refused (`static_id`, `own_id`). When two ids claim overlapping prefixes, neither
  overlapping entry is applied and an alarm is counted until one expires, is revoked, or leaves;
- a revocation (at `PREFIX/revoked/...`, signed by a configured authority) removes what it covers at once
  and is held until every membership it covers has expired, so deleting it from etcd revokes nothing back;
- a membership that expires is removed like a departure (`expire`, driven by the caller's timer).

Cost: an event costs, per prefix of its entry, one dict probe per prefix length in use and one binary
search, whatever the number of members (overlaps are found through an exact-prefix index for the wider
prefixes and a sorted list of ranges for the narrower ones); inserting into that sorted list moves its tail
(a memmove, O(n) bytes but no Python work per member).
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from vpn_packet.errors import MembershipError
from vpn_packet.mesh.membership import Entry, Membership, Revocations, verify_entry, verify_revocation

__all__ = ["MEMBERS_DIR", "REVOKED_DIR", "DiscoveredPeer", "MemberTable", "PeerSetChange"]

MEMBERS_DIR = "members/"
REVOKED_DIR = "revoked/"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DiscoveredPeer:
    """A member applied as a peer: what the node's peer set needs (id, endpoint, prefixes, key)."""

    id: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    public_key: bytes
    expires: int

    @classmethod
    def of(cls, entry: Entry) -> DiscoveredPeer:
        membership = entry.membership
        return cls(
            membership.id, entry.endpoint, membership.allowed_ips, membership.public_key, membership.expires
        )


@dataclass(slots=True)
class PeerSetChange:
    """What one event changes in the peer set: `added` and `updated` peers by id, `removed` ids."""

    added: dict[str, DiscoveredPeer] = field(default_factory=dict)
    updated: dict[str, DiscoveredPeer] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def merge(self, later: PeerSetChange) -> None:
        """Folds `later` (which happened after this) into this change."""
        for peer_id in later.removed:
            if self.added.pop(peer_id, None) is None:
                self.updated.pop(peer_id, None)
                self.removed.add(peer_id)
        for peer_id, peer in later.added.items():
            if peer_id in self.removed:
                self.removed.discard(peer_id)
                self.updated[peer_id] = peer
            else:
                self.added[peer_id] = peer
        for peer_id, peer in later.updated.items():
            if peer_id in self.added:
                self.added[peer_id] = peer
            else:
                self.updated[peer_id] = peer


class _Prefixes:
    """Which ids claim which prefixes, and which claims overlap a given prefix: prefixes either nest or are
    disjoint, so the claims overlapping Q are Q's supernets (one exact probe per prefix length in use, as
    integers: no `ipaddress` object per probe) and the claims starting inside Q's range (found sorted)."""

    def __init__(self) -> None:
        self._exact: dict[tuple[int, int, int], set[str]] = {}  # (version, network as int, length) -> ids
        self._lengths: dict[int, Counter[int]] = {4: Counter(), 6: Counter()}  # the lengths in use
        self._starts: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}

    @staticmethod
    def _key(network: _Network) -> tuple[int, int, int]:
        return (network.version, int(network.network_address), network.prefixlen)

    def add(self, network: _Network, owner: str) -> None:
        key = self._key(network)
        self._exact.setdefault(key, set()).add(owner)
        self._lengths[key[0]][key[2]] += 1
        bisect.insort(self._starts[key[0]], (key[1], key[2], owner))

    def remove(self, network: _Network, owner: str) -> None:
        key = self._key(network)
        owners = self._exact.get(key)
        if owners is None or owner not in owners:
            return
        owners.discard(owner)
        if not owners:
            del self._exact[key]
        lengths = self._lengths[key[0]]
        lengths[key[2]] -= 1
        if not lengths[key[2]]:
            del lengths[key[2]]
        starts = self._starts[key[0]]
        item = (key[1], key[2], owner)
        index = bisect.bisect_left(starts, item)
        if index < len(starts) and starts[index] == item:
            del starts[index]

    def overlapping(self, network: _Network) -> set[str]:
        """The owners of every claim overlapping `network` (equal, wider or narrower)."""
        version, address, length = self._key(network)
        bits = 32 if version == 4 else 128
        owners: set[str] = set()
        for wider in self._lengths[version]:
            if wider <= length:
                mask = ((1 << wider) - 1) << (bits - wider)
                owners |= self._exact.get((version, address & mask, wider), set())
        starts = self._starts[version]
        last = address | ((1 << (bits - length)) - 1)
        index = bisect.bisect_left(starts, (address, -1, ""))
        while index < len(starts) and starts[index][0] <= last:
            owners.add(starts[index][2])
            index += 1
        return owners


def _networks(prefixes: Iterable[str]) -> list[_Network]:
    return [ipaddress.ip_network(prefix) for prefix in prefixes]


class MemberTable:
    """The store's members as this node judges them (see the module docstring).

    - `own`: this node's membership (its id and prefixes are reserved);
    - `authorities`: the configured authority keys (`DiscoveryConfig.trusted`);
    - `static`: the static peers' ids and prefixes (`{id: prefixes}`): reserved too, static wins.
    """

    def __init__(
        self,
        own: Membership,
        authorities: Collection[bytes],
        *,
        prefix: str,
        static: dict[str, tuple[str, ...]] | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.own = own
        self.authorities = authorities
        self.prefix = prefix
        self.revocations = revocations if revocations is not None else Revocations()
        self.refused: Counter[str] = Counter()
        #: Overlap alarms raised (a count: each time a pair of ids starts overlapping).
        self.overlap_alarms = 0
        #: The last refusal and the last alarm, one line each, for the log.
        self.last_refusal = ""
        self.last_refusal_reason = ""
        self.last_alarm = ""
        self._reserved = _Prefixes()
        for network in _networks(own.allowed_ips):
            self._reserved.add(network, "\0own")
        self._static_ids = set(static or ())
        for peer_id, prefixes in (static or {}).items():
            for network in _networks(prefixes):
                self._reserved.add(network, peer_id)
        #: Valid entries by id (applied or in conflict).
        self._candidates: dict[str, Entry] = {}
        #: Ids in conflict with each id (overlapping prefixes).
        self._conflicts: dict[str, set[str]] = {}
        self._claims = _Prefixes()
        self._ids_by_key: dict[bytes, str] = {}
        #: The best (issue time, sequence) seen per id and when that membership expires.
        self._high_water: dict[str, tuple[int, int, int]] = {}
        self._expiries: list[tuple[int, str, int]] = []  # (expires, id, issued): a heap, stale items skipped

    # --- what is applied ------------------------------------------------------------------------------------

    def applied(self) -> dict[str, DiscoveredPeer]:
        """Every member applied as a peer now."""
        return {
            peer_id: DiscoveredPeer.of(entry)
            for peer_id, entry in self._candidates.items()
            if not self._conflicts.get(peer_id)
        }

    def entries(self) -> Iterator[Entry]:
        """Every valid entry held (applied or in conflict): what the state file keeps."""
        return iter(self._candidates.values())

    def conflicts(self) -> dict[str, set[str]]:
        """Ids whose prefixes overlap another id's: none of them is applied."""
        return {peer_id: set(others) for peer_id, others in self._conflicts.items() if others}

    def _is_applied(self, peer_id: str) -> bool:
        return peer_id in self._candidates and not self._conflicts.get(peer_id)

    # --- events ---------------------------------------------------------------------------------------------

    def _refuse(self, reason: str) -> PeerSetChange:
        self.refused[reason] += 1
        self.last_refusal_reason = reason
        return PeerSetChange()

    def put(self, key: str, value: bytes, now: float) -> PeerSetChange:
        """A put under the prefix: an entry (`members/ID`) or a revocation (`revoked/...`)."""
        name = key[len(self.prefix) :] if key.startswith(self.prefix) else None
        if name is not None and name.startswith(REVOKED_DIR):
            return self.revoke(value, now)
        try:
            entry = verify_entry(value, self.authorities, now, self.revocations)
        except MembershipError as exc:
            self.last_refusal = f"{key}: {exc}"
            return self._refuse(exc.reason)
        membership = entry.membership
        if name != MEMBERS_DIR + membership.id:
            self.last_refusal = (
                f"{key}: the entry of {membership.id!r} belongs at {self.prefix}{MEMBERS_DIR}{membership.id}"
            )
            return self._refuse("wrong_key")
        if membership.id == self.own.id:
            if membership.public_key == self.own.public_key:
                return PeerSetChange()  # this node's own entry
            self.last_refusal = f"{key}: claims this node's id"
            return self._refuse("own_id")
        if membership.id in self._static_ids:
            self.last_refusal = f"{key}: {membership.id!r} is a static peer's id"
            return self._refuse("static_id")
        reserved = set().union(*(self._reserved.overlapping(n) for n in _networks(membership.allowed_ips)))
        if reserved:
            reason = "overlaps_own" if "\0own" in reserved else "overlaps_static"
            whose = "this node" if reason == "overlaps_own" else "a static peer"
            self.last_refusal = f"{key}: {membership.id!r} claims prefixes of {whose}"
            return self._refuse(reason)
        mark = (membership.issued, entry.sequence)
        seen = self._high_water.get(membership.id)
        if seen is not None and mark <= seen[:2]:
            if entry.record == (held.record if (held := self._candidates.get(membership.id)) else None):
                return PeerSetChange()  # the same entry again (a re-put, a compaction replay)
            self.last_refusal = f"{key}: an entry of {membership.id!r} not newer than one seen"
            return self._refuse("superseded")
        self._high_water[membership.id] = (*mark, membership.expires)
        heapq.heappush(self._expiries, (membership.expires, membership.id, membership.issued))
        return self._set(entry)

    def delete(self, key: str) -> PeerSetChange:
        """A delete under the prefix (a lease that expired, a node that left): the id leaves. The best
        issue time and sequence seen are kept, so the old entry cannot be replayed back."""
        name = key[len(self.prefix) :] if key.startswith(self.prefix) else ""
        if not name.startswith(MEMBERS_DIR):
            return PeerSetChange()  # a revocation deleted from etcd revokes nothing back
        return self._drop(name[len(MEMBERS_DIR) :])

    def revoke(self, record: bytes, now: float) -> PeerSetChange:
        """A revocation: held, and whatever it covers leaves at once."""
        try:
            revocation = verify_revocation(record, self.authorities, now)
        except MembershipError as exc:
            self.last_refusal = f"revocation: {exc}"
            return self._refuse(exc.reason)
        if not self.revocations.add(revocation):
            return PeerSetChange()
        change = PeerSetChange()
        targets = [revocation.id] if revocation.id is not None else []
        if revocation.public_key is not None and revocation.public_key in self._ids_by_key:
            targets.append(self._ids_by_key[revocation.public_key])
        for peer_id in targets:
            entry = self._candidates.get(peer_id)
            if entry is not None and revocation.covers(entry.membership):
                change.merge(self._drop(peer_id))
        return change

    def expire(self, now: float) -> PeerSetChange:
        """Removes the members whose membership expired (with the clock skew) by `now`."""
        from vpn_packet.tuning import CLOCK_SKEW

        change = PeerSetChange()
        while self._expiries and self._expiries[0][0] + CLOCK_SKEW < now:
            _expires, peer_id, issued = heapq.heappop(self._expiries)
            entry = self._candidates.get(peer_id)
            if entry is not None and entry.membership.issued == issued:
                change.merge(self._drop(peer_id))
            seen = self._high_water.get(peer_id)
            if seen is not None and seen[2] + CLOCK_SKEW < now:
                del self._high_water[peer_id]
        self.revocations.expire(now)
        return change

    def next_expiry(self) -> int | None:
        """When the next membership held expires (Unix seconds), for the caller's timer."""
        return self._expiries[0][0] if self._expiries else None

    # --- the one path that changes the set ------------------------------------------------------------------

    def _set(self, entry: Entry) -> PeerSetChange:
        peer_id = entry.membership.id
        old = self._candidates.get(peer_id)
        was_applied = self._is_applied(peer_id)
        affected = self._withdraw(peer_id) if old is not None else {}
        self._candidates[peer_id] = entry
        self._ids_by_key[entry.membership.public_key] = peer_id
        overlapping: set[str] = set()
        for network in _networks(entry.membership.allowed_ips):
            overlapping |= self._claims.overlapping(network) - {peer_id}
            self._claims.add(network, peer_id)
        before = {other: self._is_applied(other) for other in overlapping}
        for other in overlapping:
            self._conflicts.setdefault(other, set()).add(peer_id)
        if overlapping:
            self._conflicts[peer_id] = overlapping
            self.overlap_alarms += len(overlapping)
            others = ", ".join(repr(other) for other in sorted(overlapping))
            self.last_alarm = f"{peer_id!r} and {others} claim overlapping prefixes: none of them is applied"
        change = PeerSetChange()
        for other, applied in {**affected, **before}.items():
            self._note(change, other, applied)
        if self._is_applied(peer_id):
            if was_applied:
                change.updated[peer_id] = DiscoveredPeer.of(entry)
            else:
                change.added[peer_id] = DiscoveredPeer.of(entry)
        elif was_applied:
            change.removed.add(peer_id)
        return change

    def _withdraw(self, peer_id: str) -> dict[str, bool]:
        """Takes `peer_id`'s claims out; returns the ids it was in conflict with and whether each was
        applied before (they may be applied now)."""
        entry = self._candidates.pop(peer_id)
        if self._ids_by_key.get(entry.membership.public_key) == peer_id:
            del self._ids_by_key[entry.membership.public_key]
        for network in _networks(entry.membership.allowed_ips):
            self._claims.remove(network, peer_id)
        others = self._conflicts.pop(peer_id, set())
        before = {other: self._is_applied(other) for other in others}
        for other in others:
            partners = self._conflicts.get(other)
            if partners is not None:
                partners.discard(peer_id)
                if not partners:
                    del self._conflicts[other]
        return before

    def _note(self, change: PeerSetChange, peer_id: str, was_applied: bool) -> None:
        now_applied = self._is_applied(peer_id)
        if now_applied and not was_applied:
            change.added[peer_id] = DiscoveredPeer.of(self._candidates[peer_id])
        elif was_applied and not now_applied:
            change.removed.add(peer_id)

    def _drop(self, peer_id: str) -> PeerSetChange:
        change = PeerSetChange()
        if peer_id not in self._candidates:
            return change
        was_applied = self._is_applied(peer_id)
        freed = self._withdraw(peer_id)
        for other, applied in freed.items():
            self._note(change, other, applied)
        if was_applied:
            change.removed.add(peer_id)
        return change
