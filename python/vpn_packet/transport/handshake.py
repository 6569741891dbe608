"""Who is talking: the handshake that opens every node-to-node connection, and how a node proves itself.

The messages (challenge, hello, answer) are encoded and parsed natively; `rust/core/src/handshake.rs` draws
them and is the one description of the wire format. This module holds what is not bytes:

- `Security`: how this node proves itself and how it trusts its peers, one object that both the sending
  side (`TcpStreamService`) and the receiving side (`Receiver`) take. Three modes:
  - `key` (the default of `vpn-packet node`): TLS 1.3 for secrecy, each node an Ed25519 key
    (`vpn_packet.transport.identity`), each peer trusted by its public key string. The client checks the
    server's key in TLS; the server checks the client's key by the signature in the hello. A peer is who its
    key proves: the id in a hello is only a label.
  - `ca`: mutual TLS with certificates issued by a CA; a peer is the one identity its certificate names
    (`vpn_packet.transport.tls.certificate_names`).
  - `insecure`: plaintext, and a peer is whoever it claims to be. Only on explicit request
    (`[node] insecure = true`, `Security.insecure()`), and said loudly.
- The verdict on a hello, and the whole exchange on a node's connections, TLS and plaintext alike, are the
  native connection core's (`rust/core/src/connection.rs`: one rule per mode, `Security.native_tls` hands
  it this node's identity and trust).
- `client_handshake` / `read_message`: the sending side's exchange over asyncio, for Python clients (tests,
  tools, the attackers of `vpn_packet.testutil`), bounded in bytes; a node dials on the native core.

A refused client gets the reason on the wire before the connection closes, so both sides can say why
(`HandshakeRefusedError` on the sending side, a counter and a rate-limited WARNING on the receiving side).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import immutables

from vpn_packet._native import (
    ANSWER_REASONS,
    CHALLENGE_LEN,
    MAX_ANSWER_LEN,
    TlsSecurity,
    encode_hello,
    hello_transcript,
    parse_answer,
    parse_challenge,
)
from vpn_packet.errors import FramingError, HandshakeRefusedError, IdentityError
from vpn_packet.transport.identity import (
    NodeIdentity,
    certificate_public_key,
    key_problem,
)

__all__ = [
    "Security",
    "SecurityMode",
    "client_handshake",
    "new_epoch",
    "read_message",
]

SecurityMode = Literal["key", "ca", "insecure"]

_CODES: Final = {reason: code for code, reason in enumerate(ANSWER_REASONS)}

# Epochs order the connections of one sender (a later connection supersedes an earlier one): nanoseconds
# of wall-clock time at the first connection, then +1 per connection, so they grow across restarts too.
_epochs = itertools.count(time.time_ns())


def new_epoch() -> int:
    """A fresh connection epoch, larger than any this process gave before."""
    return next(_epochs)


_K = TypeVar("_K")
_V = TypeVar("_V")


class KeyMap(Mapping[_K, _V]):
    """A read-only mapping whose changed copy (`changed`) costs O(log n) and shares the rest with the
    original (a hash array mapped trie, `immutables.Map`): a `Security` derived for one peer joining keeps
    the one it came from valid, without copying 10,000 keys. Equal to any mapping with the same items."""

    __slots__ = ("_map",)

    def __init__(self, items: Mapping[_K, _V] | immutables.Map[_K, _V] | None = None) -> None:
        self._map: immutables.Map[_K, _V] = (
            items if isinstance(items, immutables.Map) else immutables.Map(items or {})
        )

    def __getitem__(self, key: _K) -> _V:
        return self._map[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __eq__(self, other: object) -> bool:
        if isinstance(other, KeyMap):
            return self._map == other._map  # a trie compares shared branches at once
        return Mapping.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, like dict: not hashable

    def __repr__(self) -> str:
        return f"KeyMap({dict(self._map)!r})"

    def changed(self, set_items: Mapping[_K, _V], removed: Iterable[_K] = ()) -> KeyMap[_K, _V]:
        """A copy with `removed` dropped (absent keys ignored), then `set_items` set."""
        mutation = self._map.mutate()
        for key in removed:
            mutation.pop(key, None)
        for key, value in set_items.items():
            mutation[key] = value
        return KeyMap(mutation.finish())


@dataclass(frozen=True, slots=True)
class Security:
    """How a node proves itself and trusts its peers; see the module docstring. Build one with
    `Security.with_keys`, `Security.with_ca` or `Security.insecure`.

    - `local_id`: the id this node announces (a label in key mode);
    - `identity`: this node's key (key mode);
    - `peer_keys`: peer id -> raw public key (key mode);
    - `server_context` / `client_context`: TLS contexts from `vpn_packet.transport.tls` (None: plaintext).
    """

    mode: SecurityMode
    local_id: str
    identity: NodeIdentity | None = None
    peer_keys: Mapping[str, bytes] = field(default_factory=KeyMap)
    server_context: ssl.SSLContext | None = field(default=None, repr=False)
    client_context: ssl.SSLContext | None = field(default=None, repr=False)
    #: CA mode: the certificate, key and CA files' bytes, for the native TLS core (`native_tls`).
    ca_files: tuple[bytes, bytes, bytes] | None = field(default=None, repr=False, compare=False)
    _ids_by_key: KeyMap[bytes, str] = field(default_factory=KeyMap, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode == "key" and self.identity is None:
            raise ValueError("key mode needs this node's identity")
        if (self.server_context is None) != (self.mode == "insecure"):
            raise ValueError(f"{self.mode} mode {'needs' if self.mode != 'insecure' else 'has no'} TLS")
        by_key: dict[bytes, str] = {}
        for peer_id, key in self.peer_keys.items():
            problem = key_problem(key)
            if problem is not None:  # a library caller's keys get the check a config's get
                raise IdentityError(f"peer {peer_id!r}'s public key cannot be trusted: {problem}")
            if key in by_key:
                raise ValueError(f"peers {by_key[key]!r} and {peer_id!r} have the same public key")
            by_key[key] = peer_id
        object.__setattr__(self, "peer_keys", KeyMap(dict(self.peer_keys)))
        object.__setattr__(self, "_ids_by_key", KeyMap(by_key))

    @classmethod
    def with_keys(
        cls, identity: NodeIdentity, peer_keys: Mapping[str, bytes], local_id: str | None = None
    ) -> Security:
        """Key mode: TLS 1.3 with this node's key, peers trusted by their public keys."""
        from vpn_packet.transport.tls import key_client_context, key_server_context

        return cls(
            "key",
            local_id or identity.name,
            identity,
            dict(peer_keys),
            key_server_context(identity),
            key_client_context(identity),
        )

    @classmethod
    def with_ca(
        cls,
        local_id: str,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str],
    ) -> Security:
        """CA mode: mutual TLS, certificates chained to `ca` and naming their node's id."""
        from vpn_packet.transport.tls import ca_client_context, ca_server_context

        files = (Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes())
        return cls(
            "ca",
            local_id,
            None,
            {},
            ca_server_context(cert, key, ca),
            ca_client_context(cert, key, ca),
            ca_files=files,
        )

    @classmethod
    def insecure(cls, local_id: str) -> Security:
        """Plaintext and unauthenticated: a peer is whoever it claims to be. For tests and comparisons."""
        return cls("insecure", local_id)

    def with_peer_keys(self, peer_keys: Mapping[str, bytes]) -> Security:
        """The same node and TLS contexts, trusting `peer_keys` instead (key mode; a reload that changes the
        peers). Raises `ValueError` for two peers with one key, or outside key mode, and its subclass
        `IdentityError` for a key that cannot be trusted."""
        if self.mode != "key":
            raise ValueError(f"{self.mode} mode has no peer keys")
        return dataclasses.replace(self, peer_keys=dict(peer_keys))

    def with_key_changes(self, keys: Mapping[str, bytes], removed: Iterable[str] = ()) -> Security:
        """The same, with the keys of `keys`' peers set and `removed`'s dropped: the two key maps are
        persistent (`KeyMap`), so the copy costs O(the peers changed) and this `Security` stays as it was;
        only the changed keys get the strict check, so a change costs the same with 10 peers or 10,000
        (issue 21). Raises like `with_peer_keys`, before anything changed."""
        if self.mode != "key":
            raise ValueError(f"{self.mode} mode has no peer keys")
        peer_keys, by_key = self.peer_keys, self._ids_by_key
        gone = [*removed, *keys]
        freed = {old: peer_id for peer_id in set(gone) if (old := peer_keys.get(peer_id)) is not None}
        claimed: dict[bytes, str] = {}
        for peer_id, key in keys.items():
            problem = key_problem(key)
            if problem is not None:
                raise IdentityError(f"peer {peer_id!r}'s public key cannot be trusted: {problem}")
            holder = claimed.get(key) or by_key.get(key)
            if holder is not None and not (key not in claimed and freed.get(key) == holder):
                raise ValueError(f"peers {holder!r} and {peer_id!r} have the same public key")
            claimed[key] = peer_id
        assert isinstance(peer_keys, KeyMap)  # made so by __post_init__
        derived = copy.copy(self)  # the same contexts and identity; no __post_init__ (checked above)
        object.__setattr__(derived, "peer_keys", peer_keys.changed(keys, gone))
        object.__setattr__(derived, "_ids_by_key", by_key.changed(claimed, freed))
        return derived

    def native_tls(self, peers: Iterable[str], max_frame_size: int) -> TlsSecurity:
        """The same identity and trust for the native connection core (`vpn_packet._native.TlsSecurity`),
        which runs every node-to-node connection, plaintext ones too; `peers` are the configured peer ids
        (CA and insecure modes: who may connect)."""
        if self.mode == "key":
            assert self.identity is not None
            return TlsSecurity.with_keys(
                self.local_id,
                self.identity.path.read_bytes(),
                list(self.peer_keys.items()),
                max_frame_size=max_frame_size,
            )
        if self.mode == "ca":
            assert self.ca_files is not None
            cert, key, ca = self.ca_files
            return TlsSecurity.with_ca(
                self.local_id, cert, key, ca, list(peers), max_frame_size=max_frame_size
            )
        return TlsSecurity.insecure(self.local_id, list(peers), max_frame_size=max_frame_size)

    @property
    def encrypted(self) -> bool:
        return self.mode != "insecure"

    def peer_of_key(self, public_key: bytes) -> str | None:
        """The configured peer that has `public_key`, if any."""
        return self._ids_by_key.get(public_key)

    def describe(self) -> str:
        """One phrase for logs: what protects a connection."""
        return {
            "key": "TLS 1.3, peers authenticated by public key",
            "ca": "mutual TLS, peers authenticated by CA certificate",
            "insecure": "PLAINTEXT, peers NOT authenticated",
        }[self.mode]


# --- the exchanges --------------------------------------------------------------------------------------


async def read_message(
    read: Callable[[int], Awaitable[bytes]],
    parse: Callable[[bytes], tuple[Any, int]],
    limit: int,
) -> tuple[Any, int]:
    """Reads one handshake message with `read(n)` (exactly n bytes or an exception), parsing as bytes come:
    never more than `limit` bytes, never a byte past the message. Returns `(message, consumed)`."""
    data = b""
    while True:
        message, count = parse(data)
        if message is not None:
            return message, count
        if len(data) + count > limit:  # pragma: no cover - the parsers' own bounds come first
            raise FramingError(f"handshake message longer than {limit} bytes", "too_large")
        data += await read(count)


def server_public_key(ssl_object: Any) -> bytes | None:
    """The raw Ed25519 key of the server certificate a TLS client connection saw (key mode)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return certificate_public_key(der)


async def client_handshake(
    security: Security,
    peer_id: str,
    read: Callable[[int], Awaitable[bytes]],
    write: Callable[[bytes], None],
    server_key: bytes | None,
    epoch: int,
) -> str:
    """The sending side, after TLS (whose server key the caller already checked): read the challenge,
    send the hello (signed in key mode), read the answer. Returns the server's own id when accepted;
    raises `HandshakeRefusedError` (with the server's reason) when refused, `FramingError` for bytes that
    are not this protocol."""
    nonce, _ = await read_message(read, parse_challenge, CHALLENGE_LEN)
    identity = security.identity
    if security.mode == "key":
        assert identity is not None
        assert server_key is not None
        transcript = hello_transcript(nonce, server_key, security.local_id, epoch, identity.public_key_bytes)
        write(encode_hello(security.local_id, epoch, identity.public_key_bytes, identity.sign(transcript)))
    else:
        write(encode_hello(security.local_id, epoch))
    (code, text), _ = await read_message(read, parse_answer, MAX_ANSWER_LEN)
    if code == 0:
        return str(text)
    reason = ANSWER_REASONS[code] if code < len(ANSWER_REASONS) else f"refused_{code}"
    raise HandshakeRefusedError(peer_id, reason, str(text), local_id=security.local_id)
