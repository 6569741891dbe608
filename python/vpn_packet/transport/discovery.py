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


class StaticPeerDiscovery:
    """A fixed set of peers; longest-prefix match from destination address to peer id.

    Peers are numbered in the order given (`index_of`); the native `table` maps each allowed prefix to its
    peer's index. `replace(peers)` swaps the whole set at once (a reload) and bumps `generation`: the table
    and the indexes of before no longer apply.
    """

    def __init__(self, peers: Iterable[Peer]) -> None:
        self._peers, self._index, self._table = self._build(peers)
        self.generation = 0

    @staticmethod
    def _build(peers: Iterable[Peer]) -> tuple[tuple[Peer, ...], dict[str, int], PrefixTable]:
        """The peers, their index and the native table; raises (`ValueError`, `TypeError`) before anything
        is swapped in."""
        listed: tuple[Peer, ...] = tuple(peers)
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
        return listed, index, table

    def replace(self, peers: Iterable[Peer]) -> None:
        """Swap in a new set of peers at once (a reload): lookups after this call see only the new ones, and
        `generation` grows by one so that holders of `table` or `index_of` results know to fetch them again.
        Validated first: on `ValueError`/`TypeError` nothing changes."""
        self._peers, self._index, self._table = self._build(peers)
        self.generation += 1

    @classmethod
    def from_config(cls, entries: Iterable[Mapping[str, Any]]) -> StaticPeerDiscovery:
        """From config tables such as TOML `[[peers]]` (`id`, `endpoint`, `allowed_ips`)."""
        return cls(Peer.from_dict(entry) for entry in entries)

    @property
    def peers(self) -> tuple[Peer, ...]:
        return self._peers

    @property
    def table(self) -> PrefixTable:
        """The native table: allowed prefix -> peer index. Do not modify it."""
        return self._table

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._index

    def index_of(self, peer_id: str) -> int:
        """The peer's index in `table`; raises `KeyError` for an unknown id."""
        return self._index[peer_id]

    def peer(self, peer_id: str) -> Peer:
        """The peer with this id; raises `KeyError` for an unknown id."""
        return self._peers[self._index[peer_id]]

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        """Where to connect to the peer, as `(host, port)`; raises `KeyError` for an unknown id."""
        return self.peer(peer_id).address

    def lookup(self, ip: str | bytes) -> str | None:
        """The id of the peer owning `ip` (text or packed bytes), or `None` (also for a malformed address)."""
        try:
            index = self._table.lookup(ip)
        except (ValueError, TypeError):
            return None
        return None if index is None else self._peers[index].id

    async def get_peer_id(self, dest_ip: str) -> str:
        """The peer owning `dest_ip` by longest-prefix match; raises `PeerNotFoundError` when none does."""
        peer_id = self.lookup(dest_ip)
        if peer_id is None:
            raise PeerNotFoundError(dest_ip)
        return peer_id

    def __repr__(self) -> str:
        ids = ", ".join(peer.id for peer in self._peers[:5])
        more = ", ..." if len(self._peers) > 5 else ""
        return f"StaticPeerDiscovery({len(self._peers)} peers [{ids}{more}], {len(self._table)} prefixes)"
