"""Mesh memberships, revocations and store entries: their bytes, their signatures and when they count.

One module holds the whole format (issue 21; docs/commands.md `sign`, `revoke`). Why Python and not the
Rust core like the hello (`rust/core/src/handshake.rs`): these records are read at control-plane rates (a
node's start, an etcd event), never per packet; what decides whether one is trusted is policy next to them
(clocks, a list of authorities, revocations kept in a state file, which of two entries wins) that the
registry in Python applies; and the part that must be exact, the strict Ed25519 verifier and the weak-key
checks, is already native and shared (`vpn_packet.transport.identity.verify_signature` and `key_problem`,
`rust/core/src/ed25519.rs`). Every record is parsed with explicit bounds and refused whole on any excess.

Three signed records, each `body | signature (64)`; every body starts with `"VPNM" | version (1) | kind (1)`
and integers are big-endian:

```text
membership  'M'  authority key (32) | issued (8) | expires (8) | L (1) | id (L, UTF-8) | member key (32)
                 | N (1, 1..255) | N x (family (1: 4 or 6) | length (1) | address (4 or 16))
                 signed by the authority
revocation  'R'  authority key (32) | issued (8) | target ('I' id or 'K' key) | L (1) | target (L)
                 signed by the authority
entry       'E'  sequence (8) | L (1) | endpoint (L, "host:port") | M (2) | membership record (M)
                 signed by the member's own key (the one in the membership)
```

Each signature covers its own domain-separation context followed by the body (`MEMBERSHIP_CONTEXT`,
`REVOCATION_CONTEXT`, `ENTRY_CONTEXT`): distinct from each other and from the hello's
(`b"vpn-packet hello v2\\0"`), so that no signature made for one purpose verifies for another. Times are
whole seconds since the Unix epoch. Prefixes are in canonical order (family, address, length) without
repeats or host bits, so one content has one encoding.

When they count (`verify_membership`, `verify_revocation`, `verify_entry`): the authority key is one of the
configured ones (a list, so the authority can be rotated); every key passes `key_problem`; a member key
equal to its authority key is refused; a membership is valid from `issued` to `expires`, with `CLOCK_SKEW`
seconds of tolerance at both ends, and for at most `MAX_MEMBERSHIP_DAYS`. A revocation, signed by any
configured authority, covers every membership of its id (or key) issued no later than the revocation
(plus the clock skew: fail closed); it is kept until every membership it covers has expired
(`Revocation.held_until`). For one id, a membership with a later issue time supersedes the older, and
between entries of the same membership the higher sequence wins (`Entry.outranks`).

Files (`vpn-packet sign --out`, `vpn-packet revoke --out`): comment lines (`#`, a summary for people,
never read) and one line of standard base64 of the record.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import os
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from vpn_packet.errors import MembershipError
from vpn_packet.transport.identity import (
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    NodeIdentity,
    encode_public_key,
    key_problem,
    verify_signature,
)
from vpn_packet.tuning import (
    CLOCK_SKEW,
    MAX_MEMBERSHIP_DAYS,
    MAX_MEMBERSHIP_PREFIXES,
    check_peer_id,
    check_prefix,
    parse_endpoint,
)

__all__ = [
    "ANY_AUTHORITY",
    "ENTRY_CONTEXT",
    "MAX_RECORD_LEN",
    "MEMBERSHIP_CONTEXT",
    "REVOCATION_CONTEXT",
    "Entry",
    "Membership",
    "MembershipError",
    "Revocation",
    "Revocations",
    "decode_record_text",
    "encode_record_text",
    "read_record_file",
    "sign_entry",
    "sign_membership",
    "sign_revocation",
    "verify_entry",
    "verify_membership",
    "verify_revocation",
    "write_record_file",
]

MAGIC: Final = b"VPNM"
VERSION: Final = 1
MEMBERSHIP_CONTEXT: Final = b"vpn-packet membership v1\0"
REVOCATION_CONTEXT: Final = b"vpn-packet revocation v1\0"
ENTRY_CONTEXT: Final = b"vpn-packet entry v1\0"
_KIND_MEMBERSHIP: Final = ord("M")
_KIND_REVOCATION: Final = ord("R")
_KIND_ENTRY: Final = ord("E")
_TARGET_ID: Final = ord("I")
_TARGET_KEY: Final = ord("K")
_DAY: Final = 86_400
_K = TypeVar("_K", str, bytes)
#: The longest record of any kind: an entry with the longest membership fits (about 5 KB).
MAX_RECORD_LEN: Final = 8192
_MAX_FILE_LEN: Final = 4 * MAX_RECORD_LEN  # base64 and the comment lines
_MAX_ENDPOINT_LEN: Final = 255


class _AnyAuthority(frozenset[bytes]):
    """Every key counts as an authority: `[discovery] trust_store = true` (labs only, warned at every start).
    Signatures are still verified, keys still checked: the store is trusted to say who is a member."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes)


#: The authorities of a node that trusts its store (`trust_store = true`).
ANY_AUTHORITY: Final[frozenset[bytes]] = _AnyAuthority()


def _timestamp(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Reader:
    """Bounds-checked reads from a record; any overrun is `malformed`."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field_name: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise MembershipError("malformed", f"{self.what}: truncated in its {field_name}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self, field_name: str) -> int:
        return self.take(1, field_name)[0]

    def u64(self, field_name: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, field_name))[0]
        return value

    def text(self, n: int, field_name: str) -> str:
        try:
            return self.take(n, field_name).decode("utf-8")
        except UnicodeDecodeError:
            raise MembershipError("malformed", f"{self.what}: its {field_name} is not UTF-8") from None

    def header(self, kind: int) -> None:
        if self.take(4, "magic") != MAGIC:
            raise MembershipError("malformed", f"{self.what}: not a vpn-packet mesh record")
        version = self.byte("version")
        if version != VERSION:
            raise MembershipError(
                "malformed", f"{self.what}: format version {version}, this node reads {VERSION}"
            )
        got = self.byte("kind")
        if got != kind:
            raise MembershipError(
                "malformed", f"{self.what}: a record of kind {chr(got)!r} where a {chr(kind)!r} belongs"
            )

    def split_signature(self) -> tuple[bytes, bytes]:
        """The body read so far and the signature that must end the record exactly."""
        body = self.data[: self.pos]
        signature = self.take(SIGNATURE_LEN, "signature")
        if self.pos != len(self.data):
            raise MembershipError(
                "malformed", f"{self.what}: {len(self.data) - self.pos} bytes after the signature"
            )
        return body, signature


def _check_key(raw: bytes, whose: str) -> None:
    problem = key_problem(raw)
    if problem is not None:
        raise MembershipError("bad_key", f"the {whose} key is refused: {problem}")


def _check_authority(raw: bytes, authorities: Collection[bytes], what: str) -> None:
    if raw not in authorities:
        raise MembershipError(
            "unknown_authority",
            f"{what} is signed by {encode_public_key(raw)}, which is no configured authority",
        )


def _verify(public_key: bytes, context: bytes, body: bytes, signature: bytes, what: str) -> None:
    if not verify_signature(public_key, context + body, signature):
        raise MembershipError("bad_signature", f"{what}: the signature does not verify")


# --- prefixes ----------------------------------------------------------------------------------------------


def _prefix_sort_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, bytes, int]:
    return (network.version, network.network_address.packed, network.prefixlen)


def _canonical_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    networks = {ipaddress.ip_network(check_prefix(prefix)) for prefix in prefixes}
    if not networks:
        raise MembershipError("malformed", "a membership names at least one prefix")
    if len(networks) > MAX_MEMBERSHIP_PREFIXES:
        raise MembershipError("malformed", f"a membership names at most {MAX_MEMBERSHIP_PREFIXES} prefixes")
    return tuple(str(network) for network in sorted(networks, key=_prefix_sort_key))


def _encode_prefixes(prefixes: tuple[str, ...]) -> bytes:
    out = bytearray([len(prefixes)])
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix)
        out += bytes([network.version, network.prefixlen]) + network.network_address.packed
    return bytes(out)


def _read_prefixes(reader: _Reader) -> tuple[str, ...]:
    count = reader.byte("prefix count")
    if count == 0:
        raise MembershipError("malformed", f"{reader.what}: no allowed prefix")
    prefixes: list[str] = []
    previous: tuple[int, bytes, int] | None = None
    for _ in range(count):
        family = reader.byte("prefix family")
        length = reader.byte("prefix length")
        if family not in (4, 6):
            raise MembershipError("malformed", f"{reader.what}: prefix family {family}")
        address = reader.take(4 if family == 4 else 16, "prefix address")
        try:
            network: ipaddress.IPv4Network | ipaddress.IPv6Network = (
                ipaddress.IPv4Network((address, length))
                if family == 4
                else ipaddress.IPv6Network((address, length))
            )
        except ValueError:
            raise MembershipError(
                "malformed", f"{reader.what}: a prefix with a bad length or host bits set"
            ) from None
        key = _prefix_sort_key(network)
        if previous is not None and key <= previous:
            raise MembershipError("malformed", f"{reader.what}: prefixes out of canonical order or repeated")
        previous = key
        prefixes.append(str(network))
    return tuple(prefixes)


# --- memberships -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """A member of the mesh as an authority signed it: `id`, its `public_key` (32 raw bytes), the prefixes
    it owns (`allowed_ips`), `issued` and `expires` (Unix seconds), the `authority` key that signed it, and
    `record`, the exact signed bytes (what is published and compared)."""

    id: str
    public_key: bytes
    allowed_ips: tuple[str, ...]
    issued: int
    expires: int
    authority: bytes
    record: bytes = field(repr=False)

    def valid_at(self, now: float) -> bool:
        """Whether `now` is within the validity, with `CLOCK_SKEW` of tolerance at both ends."""
        return self.issued - CLOCK_SKEW <= now <= self.expires + CLOCK_SKEW

    def summary(self) -> str:
        """One line for people: who, which key and prefixes, when, by whom."""
        return (
            f"membership of {self.id} (key {encode_public_key(self.public_key)}, "
            f"allowed {', '.join(self.allowed_ips)}), issued {_timestamp(self.issued)}, "
            f"expires {_timestamp(self.expires)}, authority {encode_public_key(self.authority)}"
        )


def sign_membership(
    authority: NodeIdentity,
    *,
    member_id: str,
    public_key: bytes,
    allowed_ips: Iterable[str],
    issued: int,
    days: int,
) -> Membership:
    """A membership for `member_id` with `public_key`, valid `days` (1..`MAX_MEMBERSHIP_DAYS`) from
    `issued`, signed by `authority`. The member's key must pass `key_problem` and differ from the
    authority's (an authority that is also a member would be one stolen key from owning the mesh)."""
    try:
        check_peer_id(member_id)
    except ValueError as exc:
        raise MembershipError("malformed", f"id: {exc}") from None
    if not 1 <= days <= MAX_MEMBERSHIP_DAYS:
        raise MembershipError(
            "validity_too_long", f"--expires {days}: a membership lasts 1..{MAX_MEMBERSHIP_DAYS} days"
        )
    _check_key(public_key, "member's")
    if public_key == authority.public_key_bytes:
        raise MembershipError(
            "authority_as_member", "the member's key is the authority's own: use a node key"
        )
    try:
        prefixes = _canonical_prefixes(allowed_ips)
    except ValueError as exc:
        raise MembershipError("malformed", f"allowed-ips: {exc}") from None
    encoded_id = member_id.encode()
    body = (
        MAGIC
        + bytes([VERSION, _KIND_MEMBERSHIP])
        + authority.public_key_bytes
        + struct.pack(">QQ", issued, issued + days * _DAY)
        + bytes([len(encoded_id)])
        + encoded_id
        + public_key
        + _encode_prefixes(prefixes)
    )
    record = body + authority.sign(MEMBERSHIP_CONTEXT + body)
    return _decode_membership(record)


def _decode_membership(record: bytes, what: str = "membership") -> Membership:
    """A membership's fields, structure checked (not its signature or authority)."""
    if len(record) > MAX_RECORD_LEN:
        raise MembershipError("malformed", f"{what}: {len(record)} bytes, at most {MAX_RECORD_LEN}")
    reader = _Reader(record, what)
    reader.header(_KIND_MEMBERSHIP)
    authority = reader.take(PUBLIC_KEY_LEN, "authority key")
    issued = reader.u64("issue time")
    expires = reader.u64("expiry")
    member_id = reader.text(reader.byte("id length"), "id")
    try:
        check_peer_id(member_id)
    except ValueError as exc:
        raise MembershipError("malformed", f"{what}: id: {exc}") from None
    public_key = reader.take(PUBLIC_KEY_LEN, "member key")
    prefixes = _read_prefixes(reader)
    reader.split_signature()
    if expires <= issued:
        raise MembershipError("malformed", f"{what} of {member_id}: it expires before it is issued")
    if expires - issued > MAX_MEMBERSHIP_DAYS * _DAY:
        raise MembershipError(
            "validity_too_long", f"{what} of {member_id}: valid for more than {MAX_MEMBERSHIP_DAYS} days"
        )
    return Membership(member_id, public_key, prefixes, issued, expires, authority, record)


def verify_membership(
    record: bytes,
    authorities: Collection[bytes],
    now: float,
    revocations: Revocations | None = None,
) -> Membership:
    """The membership in `record` if it is trusted at `now`: well formed, its authority one of
    `authorities`, every key sound, signed by that authority, within its validity (with `CLOCK_SKEW`), and
    not covered by one of `revocations`. Otherwise `MembershipError`, whose `reason` says why. The
    authority is looked up before the signature is verified: a record of a stranger costs no verification."""
    membership = _decode_membership(record)
    what = f"membership of {membership.id}"
    _check_authority(membership.authority, authorities, what)
    _check_key(membership.authority, "authority")
    _check_key(membership.public_key, "member's")
    if membership.public_key == membership.authority:
        raise MembershipError("authority_as_member", f"{what}: the member's key is its authority's")
    body = record[: len(record) - SIGNATURE_LEN]
    _verify(membership.authority, MEMBERSHIP_CONTEXT, body, record[-SIGNATURE_LEN:], what)
    if now < membership.issued - CLOCK_SKEW:
        raise MembershipError(
            "not_yet_valid", f"{what}: issued {_timestamp(membership.issued)}, in the future"
        )
    if now > membership.expires + CLOCK_SKEW:
        raise MembershipError("expired", f"{what}: expired {_timestamp(membership.expires)}")
    if revocations is not None:
        revocation = revocations.covering(membership)
        if revocation is not None:
            raise MembershipError("revoked", f"{what}: {revocation.summary()}")
    return membership


# --- revocations -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocation:
    """An authority's word that a member is out: by `id` or by `public_key` (exactly one is set). It covers
    every membership of that id or key issued no later than `issued` + `CLOCK_SKEW`, and is kept until
    `held_until`, when every membership it covers has expired anyway."""

    authority: bytes
    issued: int
    id: str | None
    public_key: bytes | None
    record: bytes = field(repr=False)

    @property
    def held_until(self) -> int:
        """When no membership it covers can still be valid: nothing is left to revoke after this."""
        return self.issued + CLOCK_SKEW + MAX_MEMBERSHIP_DAYS * _DAY + CLOCK_SKEW

    def covers(self, membership: Membership) -> bool:
        """Whether `membership` is revoked by this."""
        if membership.issued > self.issued + CLOCK_SKEW:
            return False
        if self.id is not None:
            return membership.id == self.id
        return membership.public_key == self.public_key

    def target(self) -> str:
        """What it revokes, for people: `id node-a` or `key ...`."""
        if self.id is not None:
            return f"id {self.id}"
        assert self.public_key is not None
        return f"key {encode_public_key(self.public_key)}"

    def summary(self) -> str:
        """One line for people."""
        return (
            f"revocation of {self.target()}, issued {_timestamp(self.issued)} "
            f"by authority {encode_public_key(self.authority)}"
        )


def sign_revocation(
    authority: NodeIdentity, *, member_id: str | None = None, public_key: bytes | None = None, issued: int
) -> Revocation:
    """A revocation of `member_id` or of `public_key` (exactly one), signed by `authority`."""
    if (member_id is None) == (public_key is None):
        raise MembershipError("malformed", "a revocation names an id or a public key, exactly one")
    if member_id is not None:
        try:
            check_peer_id(member_id)
        except ValueError as exc:
            raise MembershipError("malformed", f"id: {exc}") from None
        target = bytes([_TARGET_ID, len(member_id.encode())]) + member_id.encode()
    else:
        assert public_key is not None
        _check_key(public_key, "revoked")
        target = bytes([_TARGET_KEY, len(public_key)]) + public_key
    body = (
        MAGIC
        + bytes([VERSION, _KIND_REVOCATION])
        + authority.public_key_bytes
        + struct.pack(">Q", issued)
        + target
    )
    return _decode_revocation(body + authority.sign(REVOCATION_CONTEXT + body))


def _decode_revocation(record: bytes) -> Revocation:
    what = "revocation"
    if len(record) > MAX_RECORD_LEN:
        raise MembershipError("malformed", f"{what}: {len(record)} bytes, at most {MAX_RECORD_LEN}")
    reader = _Reader(record, what)
    reader.header(_KIND_REVOCATION)
    authority = reader.take(PUBLIC_KEY_LEN, "authority key")
    issued = reader.u64("issue time")
    kind = reader.byte("target kind")
    length = reader.byte("target length")
    member_id: str | None = None
    public_key: bytes | None = None
    if kind == _TARGET_ID:
        member_id = reader.text(length, "id")
        try:
            check_peer_id(member_id)
        except ValueError as exc:
            raise MembershipError("malformed", f"{what}: id: {exc}") from None
    elif kind == _TARGET_KEY and length == PUBLIC_KEY_LEN:
        public_key = reader.take(length, "key")
    else:
        raise MembershipError("malformed", f"{what}: target kind {kind} of {length} bytes")
    reader.split_signature()
    return Revocation(authority, issued, member_id, public_key, record)


def verify_revocation(record: bytes, authorities: Collection[bytes], now: float) -> Revocation:
    """The revocation in `record` if a configured authority signed it and it still matters at `now`
    (before `held_until`: after, every membership it covers has expired, reason `expired`). A revocation
    dated in the future is applied (it fails closed: its authority signed it)."""
    revocation = _decode_revocation(record)
    what = f"revocation of {revocation.target()}"
    _check_authority(revocation.authority, authorities, what)
    _check_key(revocation.authority, "authority")
    if revocation.public_key is not None:
        _check_key(revocation.public_key, "revoked")
    _verify(
        revocation.authority,
        REVOCATION_CONTEXT,
        record[: len(record) - SIGNATURE_LEN],
        record[-SIGNATURE_LEN:],
        what,
    )
    if now > revocation.held_until:
        raise MembershipError("expired", f"{what}: every membership it covers has expired")
    return revocation


class Revocations:
    """The revocations a node holds, looked up by id and by key: `covering` costs two dict probes and a
    scan of that id's (or key's) revocations, however many are held."""

    def __init__(self, revocations: Iterable[Revocation] = ()) -> None:
        self._by_id: dict[str, list[Revocation]] = {}
        self._by_key: dict[bytes, list[Revocation]] = {}
        for revocation in revocations:
            self.add(revocation)

    def add(self, revocation: Revocation) -> bool:
        """Holds `revocation`; False when the same record was held already."""
        if revocation.id is not None:
            bucket = self._by_id.setdefault(revocation.id, [])
        else:
            assert revocation.public_key is not None
            bucket = self._by_key.setdefault(revocation.public_key, [])
        if any(held.record == revocation.record for held in bucket):
            return False
        bucket.append(revocation)
        return True

    def covering(self, membership: Membership) -> Revocation | None:
        """A held revocation that covers `membership`, or None."""
        for bucket in (self._by_id.get(membership.id, ()), self._by_key.get(membership.public_key, ())):
            for revocation in bucket:
                if revocation.covers(membership):
                    return revocation
        return None

    def expire(self, now: float) -> int:
        """Drops the revocations past their `held_until`; returns how many."""
        return _expire(self._by_id, now) + _expire(self._by_key, now)

    def __iter__(self) -> Iterator[Revocation]:
        for table in (self._by_id, self._by_key):
            for bucket in table.values():
                yield from bucket

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._by_id.values()) + sum(
            len(b) for b in self._by_key.values()
        )


def _expire(table: dict[_K, list[Revocation]], now: float) -> int:
    dropped = 0
    for key in list(table):
        kept = [revocation for revocation in table[key] if now <= revocation.held_until]
        dropped += len(table[key]) - len(kept)
        if kept:
            table[key] = kept
        else:
            del table[key]
    return dropped


# --- entries -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """What a node publishes in the store: its `membership`, the `endpoint` to reach it at and a
    `sequence` number, signed by the member's own key (so nobody else can move its endpoint)."""

    membership: Membership
    endpoint: str
    sequence: int
    record: bytes = field(repr=False)

    def outranks(self, other: Entry) -> bool:
        """Whether this entry replaces `other` (of the same id): a later membership issue time, then a
        higher sequence. Equal means a copy or a replay: it changes nothing."""
        return (self.membership.issued, self.sequence) > (other.membership.issued, other.sequence)


def sign_entry(identity: NodeIdentity, membership: Membership, *, endpoint: str, sequence: int) -> Entry:
    """This node's entry: `membership` (which must name `identity`'s key), `endpoint`, `sequence`."""
    if membership.public_key != identity.public_key_bytes:
        raise MembershipError(
            "key_mismatch", f"the membership of {membership.id} names another key than this node's"
        )
    parse_endpoint(endpoint)
    encoded_endpoint = endpoint.encode()
    if len(encoded_endpoint) > _MAX_ENDPOINT_LEN:
        raise MembershipError(
            "malformed", f"endpoint {endpoint[:20]!r}...: at most {_MAX_ENDPOINT_LEN} bytes"
        )
    body = (
        MAGIC
        + bytes([VERSION, _KIND_ENTRY])
        + struct.pack(">QB", sequence, len(encoded_endpoint))
        + encoded_endpoint
        + struct.pack(">H", len(membership.record))
        + membership.record
    )
    record = body + identity.sign(ENTRY_CONTEXT + body)
    return Entry(membership, endpoint, sequence, record)


def verify_entry(
    record: bytes, authorities: Collection[bytes], now: float, revocations: Revocations | None = None
) -> Entry:
    """The entry in `record` if its membership passes `verify_membership` and the member's own key signed
    the entry; `MembershipError` otherwise (`reason` says why)."""
    if len(record) > MAX_RECORD_LEN:
        raise MembershipError("malformed", f"entry: {len(record)} bytes, at most {MAX_RECORD_LEN}")
    reader = _Reader(record, "entry")
    reader.header(_KIND_ENTRY)
    sequence = reader.u64("sequence")
    endpoint = reader.text(reader.byte("endpoint length"), "endpoint")
    (length,) = struct.unpack(">H", reader.take(2, "membership length"))
    membership_record = reader.take(length, "membership")
    body, signature = reader.split_signature()
    membership = verify_membership(membership_record, authorities, now, revocations)
    try:
        parse_endpoint(endpoint)
    except ValueError as exc:
        raise MembershipError("malformed", f"entry of {membership.id}: {exc}") from None
    _verify(membership.public_key, ENTRY_CONTEXT, body, signature, f"entry of {membership.id}")
    return Entry(membership, endpoint, sequence, record)


# --- files -------------------------------------------------------------------------------------------------


def encode_record_text(record: bytes, summary: str) -> str:
    """A record as a file's text: the summary as a comment (for people; never read) and the base64."""
    return f"# vpn-packet {summary}\n{base64.b64encode(record).decode('ascii')}\n"


def decode_record_text(text: str, source: str) -> bytes:
    """The record of a file's text (`encode_record_text`): its one line of base64, comments ignored."""
    lines = [line.strip() for line in text.splitlines()]
    data = [line for line in lines if line and not line.startswith("#")]
    if len(data) != 1:
        raise MembershipError(
            "malformed", f"{source}: expected one line of base64 (as `vpn-packet sign` writes)"
        )
    try:
        return base64.b64decode(data[0], validate=True)
    except (binascii.Error, ValueError):
        raise MembershipError("malformed", f"{source}: not base64 (as `vpn-packet sign` writes)") from None


def write_record_file(path: str | os.PathLike[str], record: bytes, summary: str) -> Path:
    """Writes a membership or revocation file (not secret: mode 0644, replaced atomically)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(encode_record_text(record, summary))
    os.replace(temporary, path)
    return path


def read_record_file(path: str | os.PathLike[str]) -> bytes:
    """The record in a file written by `write_record_file` (at most a few KB are read)."""
    path = Path(path)
    with path.open("rb") as file:
        data = file.read(_MAX_FILE_LEN + 1)
    if len(data) > _MAX_FILE_LEN:
        raise MembershipError("malformed", f"{path}: larger than any membership file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MembershipError("malformed", f"{path}: not a membership file (not ASCII text)") from None
    return decode_record_text(text, str(path))
