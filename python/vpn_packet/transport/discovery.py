"""Static peer discovery: a fixed set of peers, each with an id, an endpoint and the prefixes it owns.

`StaticPeerDiscovery` implements `vpn_packet.api.PeerDiscovery`: `get_peer_id(dest_ip)` answers with the peer
whose allowed prefix is the longest match for the address (a native `PrefixTable`: a few hash probes per
lookup, however many prefixes). The same table is what the receiver checks source addresses against: a packet
from peer P is accepted only when its source's longest match is one of P's prefixes.

Prefixes are strict: host bits set (`10.0.0.1/24`) is a configuration error (`ValueError`), as is the same
prefix given to two peers. Overlapping prefixes of different lengths are fine (the longest wins).
IPv4 and IPv6 are separate spaces: an IPv4-mapped IPv6 address matches IPv6 prefixes only.

The rules for a peer's id, endpoint and prefixes are `vpn_packet.tuning`'s (`check_peer_id`,
`parse_endpoint`, `check_prefix`), the ones the node configuration applies too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vpn_packet._native import PrefixTable
from vpn_packet.errors import PeerNotFoundError
from vpn_packet.tuning import check_peer_id, check_prefix, parse_endpoint

__all__ = ["Peer", "StaticPeerDiscovery", "parse_endpoint"]


@dataclass(frozen=True)
class Peer:
    """A peer: `id` (1..255 bytes of UTF-8, sent in the hello), `endpoint` (`"host:port"` or `"[v6]:port"`)
    and `allowed_ips`, the prefixes it owns (normalised to `ipaddress` text, e.g. `"10.8.0.2/32"`).
    """

    id: str
    endpoint: str
    allowed_ips: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        try:
            check_peer_id(self.id)
        except ValueError as exc:
            raise ValueError(f"peer id: {exc}") from None
        parse_endpoint(self.endpoint)
        if isinstance(self.allowed_ips, str):
            raise TypeError(f"peer {self.id}: allowed_ips is a sequence of prefixes, not one str")
        normalised = []
        for prefix in self.allowed_ips:
            try:
                normalised.append(check_prefix(prefix))
            except ValueError as exc:
                raise ValueError(f"peer {self.id}: allowed_ips: {exc}") from None
        object.__setattr__(self, "allowed_ips", tuple(normalised))

    @property
    def address(self) -> tuple[str, int]:
        """The endpoint as `(host, port)`."""
        return parse_endpoint(self.endpoint)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Peer:
        """From a config table with keys `id`, `endpoint`, `allowed_ips` (other keys are ignored)."""
        missing = [key for key in ("id", "endpoint") if key not in entry]
        if missing:
            raise ValueError(f"peer entry {dict(entry)!r}: missing {', '.join(missing)}")
        return cls(
            id=entry["id"], endpoint=entry["endpoint"], allowed_ips=tuple(entry.get("allowed_ips", ()))
        )


def _host(peer: Peer) -> str:
    """The host of `peer`'s endpoint, or the endpoint itself when it does not parse."""
    try:
        return peer.address[0]
    except ValueError:
        return peer.endpoint


class StaticPeerDiscovery:
    """A fixed set of peers; longest-prefix match from destination address to peer id.

    Peers are numbered in the order given (`index_of`); the native `table` maps each allowed prefix to its
    peer's index. `replace(peers)` swaps the whole set at once (a reload) and bumps `generation`: the table
    and the indexes of before no longer apply.
    """

    def __init__(self, peers: Iterable[Peer]) -> None:
        self._slots, self._index, self._table, self._owner = self._build(peers)
        self._listed: tuple[Peer, ...] | None = None
        # Endpoint host -> ids of the peers there (`peers_at`): made at the first question, then kept by
        # `update` in O(the peers changed).
        self._hosts: dict[str, dict[str, None]] | None = None
        self.generation = 0

    @staticmethod
    def _build(
        peers: Iterable[Peer],
    ) -> tuple[list[Peer | None], dict[str, int], PrefixTable, dict[str, str]]:
        """The peers, their index and the native table; raises (`ValueError`, `TypeError`) before anything
        is swapped in."""
        listed: list[Peer | None] = list(peers)
        index: dict[str, int] = {}
        table = PrefixTable()
        owner: dict[str, str] = {}
        for i, peer in enumerate(listed):
            if not isinstance(peer, Peer):
                raise TypeError(f"expected Peer, got {type(peer).__name__}")
            if peer.id in index:
                raise ValueError(f"duplicate peer id {peer.id!r}")
            index[peer.id] = i
            for prefix in peer.allowed_ips:
                if prefix in owner:
                    raise ValueError(f"prefix {prefix} is given to both {owner[prefix]!r} and {peer.id!r}")
                owner[prefix] = peer.id
                table.insert(prefix, i)
        return listed, index, table, owner

    def replace(self, peers: Iterable[Peer]) -> None:
        """Swap in a new set of peers at once (a reload): lookups after this call see only the new ones, and
        `generation` grows by one so that holders of `table` or `index_of` results know to fetch them again.
        Validated first: on `ValueError`/`TypeError` nothing changes."""
        self._slots, self._index, self._table, self._owner = self._build(peers)
        self._listed = None
        self._hosts = None
        self.generation += 1

    def update(
        self, added: Iterable[Peer] = (), updated: Iterable[Peer] = (), removed: Iterable[str] = ()
    ) -> None:
        """Adds, updates and removes peers in place: O(the peers changed), whatever the number known.

        The native table is changed in place and every unchanged peer keeps its index, so `generation` does
        not move and the holders of `table` and `index_of` results (the receiver's connections) stay valid. An
        added peer gets a new index (never a removed peer's: a connection of the removed peer still closing
        must not speak for another); an updated one keeps its own. Validated first: a duplicate or unknown
        id, or a prefix another peer holds, raises `ValueError` (`TypeError` for a non-`Peer`) and nothing
        changes. When removed slots outnumber the peers, the table is rebuilt compactly (`replace`)."""
        added, updated, removed = list(added), list(updated), list(removed)
        gone = set(removed)
        for peer in (*added, *updated):
            if not isinstance(peer, Peer):
                raise TypeError(f"expected Peer, got {type(peer).__name__}")
        for peer_id in gone:
            if peer_id not in self._index:
                raise ValueError(f"unknown peer id {peer_id!r}")
        seen: set[str] = set()
        for peer in added:
            if peer.id in seen or (peer.id in self._index and peer.id not in gone):
                raise ValueError(f"duplicate peer id {peer.id!r}")
            seen.add(peer.id)
        for peer in updated:
            if peer.id in seen or peer.id not in self._index or peer.id in gone:
                raise ValueError(f"unknown or repeated peer id {peer.id!r}")
            seen.add(peer.id)
        leaving = gone | {peer.id for peer in updated}
        claimed: dict[str, str] = {}
        for peer in (*added, *updated):
            for prefix in peer.allowed_ips:
                holder = self._owner.get(prefix)
                if (holder is not None and holder not in leaving) or prefix in claimed:
                    other = claimed.get(prefix, holder)
                    raise ValueError(f"prefix {prefix} is given to both {other!r} and {peer.id!r}")
                claimed[prefix] = peer.id
        # Validated: apply. Removed and updated peers' prefixes out first, then the new ones in.
        hosts = self._hosts
        for peer_id in leaving:
            index = self._index[peer_id]
            old = self._slots[index]
            assert old is not None
            if hosts is not None:
                self._forget_host(hosts, old)
            for prefix in old.allowed_ips:
                self._table.remove(prefix)
                del self._owner[prefix]
            if peer_id in gone:
                self._slots[index] = None
                del self._index[peer_id]
        for peer in updated:
            index = self._index[peer.id]
            self._slots[index] = peer
            for prefix in peer.allowed_ips:
                self._table.insert(prefix, index)
                self._owner[prefix] = peer.id
        for peer in added:
            index = len(self._slots)
            self._slots.append(peer)
            self._index[peer.id] = index
            for prefix in peer.allowed_ips:
                self._table.insert(prefix, index)
                self._owner[prefix] = peer.id
        if hosts is not None:
            for peer in (*updated, *added):
                hosts.setdefault(_host(peer), {})[peer.id] = None
        self._listed = None
        if len(self._slots) > 64 and len(self._slots) > 2 * len(self._index):
            self.replace(self.peers)

    @classmethod
    def from_config(cls, entries: Iterable[Mapping[str, Any]]) -> StaticPeerDiscovery:
        """From config tables such as TOML `[[peers]]` (`id`, `endpoint`, `allowed_ips`)."""
        return cls(Peer.from_dict(entry) for entry in entries)

    @property
    def peers(self) -> tuple[Peer, ...]:
        """The peers in the order they were added (built once per change)."""
        if self._listed is None:
            self._listed = tuple(peer for peer in self._slots if peer is not None)
        return self._listed

    @staticmethod
    def _forget_host(hosts: dict[str, dict[str, None]], peer: Peer) -> None:
        host = _host(peer)
        there = hosts.get(host)
        if there is not None:
            there.pop(peer.id, None)
            if not there:
                del hosts[host]

    def peers_at(self, host: str) -> list[str]:
        """The ids of the peers whose endpoint is at `host` (as written: a name matches only itself), in
        the order they joined there. O(1) after the first call."""
        if self._hosts is None:
            hosts: dict[str, dict[str, None]] = {}
            for peer in self.peers:
                hosts.setdefault(_host(peer), {})[peer.id] = None
            self._hosts = hosts
        return list(self._hosts.get(host, ()))

    @property
    def indexes(self) -> dict[str, int]:
        """Peer id -> its index in `table` (the live map, kept by `update`; do not modify it)."""
        return self._index

    @property
    def table(self) -> PrefixTable:
        """The native table: allowed prefix -> peer index. Do not modify it."""
        return self._table

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index

    def index_of(self, peer_id: str) -> int:
        """The peer's index in `table`; raises `KeyError` for an unknown id."""
        return self._index[peer_id]

    def peer(self, peer_id: str) -> Peer:
        """The peer with this id; raises `KeyError` for an unknown id."""
        peer = self._slots[self._index[peer_id]]
        assert peer is not None  # the index holds live peers only
        return peer

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        """Where to connect to the peer, as `(host, port)`; raises `KeyError` for an unknown id."""
        return self.peer(peer_id).address

    def lookup(self, ip: str | bytes) -> str | None:
        """The id of the peer owning `ip` (text or packed bytes), or `None` (also for a malformed address)."""
        try:
            index = self._table.lookup(ip)
        except (ValueError, TypeError):
            return None
        if index is None:
            return None
        peer = self._slots[index]
        return None if peer is None else peer.id

    async def get_peer_id(self, dest_ip: str) -> str:
        """The peer owning `dest_ip` by longest-prefix match; raises `PeerNotFoundError` when none does."""
        peer_id = self.lookup(dest_ip)
        if peer_id is None:
            raise PeerNotFoundError(dest_ip)
        return peer_id

    def __repr__(self) -> str:
        ids = ", ".join(peer.id for peer in self.peers[:5])
        more = ", ..." if len(self) > 5 else ""
        return f"StaticPeerDiscovery({len(self)} peers [{ids}{more}], {len(self._table)} prefixes)"
