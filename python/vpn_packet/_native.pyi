"""Type stubs of the native module `vpn_packet._native` (hand-written; checked by mypy.stubtest)."""

from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeAlias, TypeVar, final

from typing_extensions import Buffer

from vpn_packet.errors import PacketError

__all__ = [
    "__version__",
    "PacketInfo",
    "extract_ip_and_ports",
    "destination_key",
    "destination_key_and_ip",
    "extract_batch",
    "extract_batch_from_buffer",
    "group_by_destination",
    "PacketBatch",
    "parse_batch",
    "parse_batch_from_buffer",
]

__version__: str

_P = TypeVar("_P", bound=Buffer)

@final
class PacketInfo:
    """Addresses, ports and protocol of an IP packet. Frozen, hashable, equal by value, picklable."""

    def __new__(
        cls,
        version: int,
        src_ip: str | bytes | IPv4Address | IPv6Address,
        dst_ip: str | bytes | IPv4Address | IPv6Address,
        src_port: int | None,
        dst_port: int | None,
        protocol: int,
    ) -> PacketInfo: ...
    @property
    def version(self) -> int: ...
    @property
    def src_ip(self) -> IPv4Address | IPv6Address: ...
    @property
    def dst_ip(self) -> IPv4Address | IPv6Address: ...
    @property
    def src_port(self) -> int | None: ...
    @property
    def dst_port(self) -> int | None: ...
    @property
    def protocol(self) -> int: ...
    @property
    def destination_key(self) -> str: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[Any, ...]: ...

def extract_ip_and_ports(packet: Buffer) -> PacketInfo: ...
def destination_key(packet: Buffer) -> str: ...
def destination_key_and_ip(packet: Buffer) -> tuple[str, str]: ...
def extract_batch(packets: Iterable[Buffer]) -> list[PacketInfo | PacketError]: ...
def extract_batch_from_buffer(buffer: Buffer, lengths: Sequence[int]) -> list[PacketInfo | PacketError]: ...
def group_by_destination(
    packets: Iterable[_P],
) -> tuple[list[tuple[str, str, list[_P]]], list[tuple[int, PacketError]]]: ...

@final
class PacketBatch:
    """A parsed batch kept natively; items become Python objects only when asked for."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> PacketInfo | PacketError: ...
    @property
    def valid_count(self) -> int: ...
    @property
    def error_count(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    def to_list(self) -> list[PacketInfo | PacketError]: ...
    def errors(self) -> list[tuple[int, PacketError]]: ...
    def error_counts(self) -> dict[str, int]: ...
    def destination_keys(self) -> list[str | None]: ...
    def protocols(self) -> list[int | None]: ...
    def sizes(self) -> list[int]: ...
    def by_destination(self) -> dict[str, tuple[int, int, dict[int, int]]]: ...

def parse_batch(packets: Iterable[Buffer]) -> PacketBatch: ...
def parse_batch_from_buffer(buffer: Buffer, lengths: Sequence[int]) -> PacketBatch: ...

# --- capture (owned by capture reader) ---

from collections.abc import Iterator as _Iterator  # noqa: E402
from os import PathLike as _PathLike  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

__all__ += ["CaptureReader", "link_type_name", "pcapng_block_name"]

@final
class CaptureReader(_Iterator[tuple[bytes, list[int]]]):
    """Streams the IP packets of a pcap/pcapng file (gzip-compressed or not; `-`: standard input) in
    batches of `(buffer, lengths)`.

    Raises `vpn_packet.capture.CaptureError` for a file that is not a capture (at construction) or that
    cannot be read on (after yielding the packets before the problem); `OSError` when it cannot be opened.
    """

    def __new__(
        cls, path: str | _PathLike[str], batch_size: int = 1024, batch_bytes: int = 4194304
    ) -> CaptureReader: ...
    def __iter__(self) -> CaptureReader: ...
    def __next__(self) -> tuple[bytes, list[int]]: ...
    def next_tally(
        self,
    ) -> tuple[dict[str, tuple[int, int, dict[int, int]]], dict[str, int]] | None: ...
    @property
    def path(self) -> _Path: ...
    @property
    def name(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def format_detail(self) -> str: ...
    @property
    def compression(self) -> str | None: ...
    @property
    def frames(self) -> int: ...
    @property
    def ip_packets(self) -> int: ...
    @property
    def ip_bytes(self) -> int: ...
    @property
    def non_ip_frames(self) -> int: ...
    @property
    def short_frames(self) -> int: ...
    @property
    def unsupported_link_frames(self) -> int: ...
    @property
    def link_types(self) -> dict[int, int]: ...
    @property
    def encapsulations(self) -> dict[str, int]: ...
    @property
    def link_encapsulations(self) -> dict[int, dict[str, int]]: ...
    @property
    def undecoded_blocks(self) -> dict[int, int]: ...
    @property
    def batches(self) -> int: ...
    @property
    def position(self) -> int: ...

def link_type_name(link: int) -> str | None: ...
def pcapng_block_name(kind: int) -> str | None: ...

# --- framing and prefix match (transport receiving side) ---

__all__ += ["FrameDecoder", "PrefixTable", "encode_frames", "filter_sources"]
__all__ += ["DEFAULT_MAX_FRAME_SIZE", "KEEPALIVE_FRAME", "LENGTH_PREFIX_LEN", "MAX_FRAME_SIZE_LIMIT"]

# The wire constants of `vpn_packet_core::framing` (values in the comments, for readers of this stub).
DEFAULT_MAX_FRAME_SIZE: Final[int]  # 65535: the largest IP packet without jumbograms
MAX_FRAME_SIZE_LIMIT: Final[int]  # 1 << 24: the largest max_frame_size a decoder accepts
LENGTH_PREFIX_LEN: Final[int]  # 4: big-endian length before each frame
KEEPALIVE_FRAME: Final[bytes]  # b"\0\0\0\0": a length prefix of 0, no payload (wire version 3)

def encode_frames(packets: Iterable[Buffer], max_frame_size: int = 65535) -> bytes:
    """The frames of `packets` (4-byte big-endian length, then the packet); raises `FramingError`."""

@final
class FrameDecoder:
    """Splits a byte stream into packets across any read boundaries; holds at most one partial frame."""

    def __new__(cls, max_frame_size: int = 65535) -> FrameDecoder: ...
    def feed(self, data: Buffer) -> list[bytes]: ...
    @property
    def buffered(self) -> int: ...
    @property
    def max_frame_size(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def payload_bytes(self) -> int: ...
    @property
    def keepalives(self) -> int: ...
    @property
    def offload_invalid(self) -> int: ...
    @property
    def at_boundary(self) -> bool: ...
    @property
    def error(self) -> str | None: ...

@final
class PrefixTable:
    """Longest-prefix match from IPv4/IPv6 prefixes to non-negative integers."""

    def __new__(cls) -> PrefixTable: ...
    def insert(self, prefix: str, value: int, *, strict: bool = True) -> int | None: ...
    def remove(self, prefix: str) -> int | None: ...
    def lookup(self, ip: str | Buffer) -> int | None: ...
    def lookup_prefix(self, ip: str | Buffer) -> tuple[int, int] | None: ...
    def __len__(self) -> int: ...

def filter_sources(packets: Iterable[_P], table: PrefixTable, peer: int) -> tuple[list[_P], int, int]:
    """`(accepted, spoofed, unparsable)`: the packets whose source's longest prefix maps to `peer`."""

# --- TUN I/O with the GIL released (rust/python/src/tun_io.rs, rust/core/src/inbound.rs) ---

__all__ += ["TUN_FATAL_ERRNOS", "TunFeed", "TunIo"]

TUN_FATAL_ERRNOS: Final[tuple[int, ...]]  # errnos after which a TUN descriptor cannot work again

@final
class TunIo:
    """Batch reads and writes on a TUN descriptor (owned and closed by the caller)."""

    def __new__(cls, fd: int, *, vnet_header: bool = False, packet_size: int = 65545) -> TunIo: ...
    def read_batch(self, max_packets: int = 1024, max_bytes: int = 4194304) -> tuple[bytes, bytes, int]:
        """`(data, lengths, errno)`: packets ready now, lengths as native-endian u32, the stopping errno."""
    def read_into(
        self,
        queues: DestinationQueues,
        *,
        vnet_header: bool = False,
        max_packets: int = 1024,
        max_bytes: int = 4194304,
    ) -> tuple[_Pushed, int, int, int]:
        """Reads like `read_batch` and routes the packets into `queues` in the same call:
        `(pushed, packets, bytes, errno)`."""
    def write_packets(self, packets: Iterable[Buffer]) -> tuple[int, int, int, int, int]:
        """`(written, bytes, refused, dropped, fatal_errno)`; the batch stops at the first packet the device
        has no room for, or at a fatal error, and `dropped` counts the rest."""

@final
class TunFeed:
    """A TUN descriptor's reads on a `DataPlane`'s thread, into a dispatcher's queues (see
    `DataPlane.watch_tun`)."""

    def __new__(
        cls,
        fd: int,
        queues: DestinationQueues,
        *,
        vnet_header: bool = False,
        packet_size: int = 65545,
        max_packets: int = 1024,
        max_bytes: int = 4194304,
        flood_batch: int = 16,
        flood_pause: float = 0.0001,
    ) -> TunFeed: ...
    def take_parked(self, accepting: bool) -> tuple[_Pushed | None, int, int, int]:
        """`(pushed, packets, bytes, errno)`: what the thread left when it handed the feed back, pushed."""
    def take_stats(self) -> tuple[int, int, int, int]:
        """`(events, packets, bytes, max_batch)` of the reads the thread pushed itself since the last call."""
    @property
    def on_data_plane(self) -> bool: ...

# --- the connection handshake (rust/core/src/handshake.rs draws the messages) ---

__all__ += [
    "ANSWER_REASONS",
    "CHALLENGE_LEN",
    "MAX_ANSWER_LEN",
    "MAX_HELLO_LEN",
    "MAX_PEER_ID_LEN",
    "NONCE_LEN",
    "PROTOCOL_MAGIC",
    "PROTOCOL_VERSION",
    "PUBLIC_KEY_LEN",
    "SIGNATURE_LEN",
    "encode_answer",
    "encode_challenge",
    "encode_hello",
    "hello_transcript",
    "parse_answer",
    "parse_challenge",
    "parse_hello",
]

PROTOCOL_MAGIC: Final[bytes]  # b"VPNP": every handshake message starts with it
PROTOCOL_VERSION: Final[int]  # 2
NONCE_LEN: Final[int]  # 32
CHALLENGE_LEN: Final[int]  # 38: header and nonce
PUBLIC_KEY_LEN: Final[int]  # 32: Ed25519
SIGNATURE_LEN: Final[int]  # 64: Ed25519
MAX_PEER_ID_LEN: Final[int]  # 255 bytes of UTF-8
MAX_HELLO_LEN: Final[int]  # the longest hello
MAX_ANSWER_LEN: Final[int]  # the longest answer
ANSWER_REASONS: Final[tuple[str, ...]]  # answer code -> reason name; 0 is "accepted"

def encode_challenge(nonce: bytes) -> bytes:
    """The challenge a server sends first, carrying 32 random bytes."""

def parse_challenge(data: Buffer) -> tuple[bytes | None, int]:
    """`(nonce, consumed)` for a complete challenge, `(None, needed)` for a valid beginning."""

def encode_hello(
    peer_id: str, epoch: int, public_key: bytes | None = None, signature: bytes | None = None
) -> bytes:
    """A hello; `public_key` (32 bytes) and `signature` (64 bytes) in key mode. Raises `FramingError`."""

def parse_hello(
    data: Buffer,
) -> tuple[tuple[str, int, bytes | None, bytes | None] | None, int]:
    """`((peer_id, epoch, public_key, signature), consumed)` or `(None, needed)`; raises `FramingError`."""

def hello_transcript(
    nonce: bytes, server_public_key: bytes, peer_id: str, epoch: int, client_public_key: bytes
) -> bytes:
    """The exact bytes a client signs in its hello."""

def encode_answer(code: int, text: str) -> bytes:
    """An answer: `code` (0 accepts, else an index of `ANSWER_REASONS`) and a text of at most 255 bytes."""

def parse_answer(data: Buffer) -> tuple[tuple[int, str] | None, int]:
    """`((code, text), consumed)` or `(None, needed)`; raises `FramingError`."""

# --- strict Ed25519 (rust/core/src/ed25519.rs): which keys are keys, which signatures are signatures ---

__all__ += ["public_key_problem", "verify_signature"]

def public_key_problem(key: bytes) -> str | None:
    """Why a raw public key cannot be trusted (wrong length, not a point, not canonical, small order,
    mixed order), in one sentence; None when it is a key."""

def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is a strict Ed25519 signature of `message` by `public_key`."""

# --- acknowledgements (rust/core/src/ack.rs) ---

__all__ += ["ACK_LEN", "AckDecoder", "encode_ack"]

ACK_LEN: Final[int]  # 9: 'K' and the count

def encode_ack(taken: int) -> bytes:
    """The ack record for `taken` frames of a connection."""

@final
class AckDecoder:
    """Reads ack records across any read boundaries; holds at most one partial record."""

    def __new__(cls) -> AckDecoder: ...
    def feed(self, data: Buffer) -> int: ...
    @property
    def taken(self) -> int: ...
    @property
    def buffered(self) -> int: ...

# --- per-destination queues (rust/core/src/queues.rs) ---

__all__ += ["DestinationQueues", "FastCounters", "framed_payload_bytes", "framed_without", "split_framed"]
__all__ += ["OFFLOAD_FLAG", "VNET_HDR_LEN", "PUSH_QUEUED", "PUSH_READY", "PUSH_PRESSURE"]
__all__ += ["PUSH_FULL", "PUSH_UNKNOWN", "PUSH_INVALID"]

OFFLOAD_FLAG: Final[int]  # 1 << 31: length-prefix bit of an offload frame (virtio_net_hdr, then the packet)
VNET_HDR_LEN: Final[int]  # 10: bytes of a virtio_net_hdr
# `DestinationQueues.push_keyed` results.
PUSH_QUEUED: Final[int]  # 0: queued behind other packets
PUSH_READY: Final[int]  # 1: queued on an empty queue
PUSH_PRESSURE: Final[int]  # 2: queued, the queue is at least half full
PUSH_FULL: Final[int]  # 3: rejected, the queue is full (counted)
PUSH_UNKNOWN: Final[int]  # 4: no queue for the key (not counted)
PUSH_INVALID: Final[int]  # 5: rejected, empty or too large (counted)

# `(accepted, ready keys, new, pressure)`; `new` is None or `(key, dest_ip, queued, overflow)` per new key.
_Pushed = tuple[int, list[str], list[tuple[str, str, int, int]] | None, bool]

@final
class DestinationQueues:
    """Per-destination bounded queues of framed packets; see `vpn_packet_core::queues`."""

    def __new__(cls, capacity: int, max_packet_size: int = 65535) -> DestinationQueues: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_packet_size(self) -> int: ...
    @property
    def offload_frames(self) -> int: ...
    def rejected(self) -> dict[str, int]: ...
    def push(self, packets: Iterable[Buffer]) -> _Pushed: ...
    def push_buffer(
        self, buffer: Buffer, lengths: Buffer | Sequence[int], *, vnet_header: bool = False
    ) -> _Pushed: ...
    def push_keyed(self, key: str, packet: Buffer) -> int: ...
    def add(self, key: str) -> bool: ...
    def remove(self, key: str) -> int: ...
    def clear(self) -> None: ...
    def discard(self, key: str) -> int: ...
    def take(self, key: str) -> tuple[bytes, int]: ...
    def set_in_flight(self, key: str, count: int) -> None: ...
    def depth(self, key: str) -> int: ...
    def dropped(self, key: str) -> int: ...
    def peek(self, key: str) -> bytes: ...
    def set_fast(
        self,
        key: str,
        session: SendSession,
        counters: FastCounters,
        window: int,
        on_blocked: Callable[[int], object],
    ) -> bool:
        """Lets `key`'s packets skip its worker while its queue is empty: a batch push writes them to
        `session` in the push itself (see `Worker._offer_fast`)."""
    def clear_fast(self, key: str) -> None: ...
    def clear_all_fast(self) -> None: ...
    def has_fast(self, key: str) -> bool: ...
    @property
    def fast_totals(self) -> FastCounters: ...
    @property
    def accepted_off_loop(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: str, /) -> bool: ...

@final
class FastCounters:
    """Packets a destination (or a dispatcher) sent on the queues' fast path, by fate; moved by sessions."""

    def __new__(cls) -> FastCounters: ...
    def counts(self) -> tuple[int, int, int, int]:
        """`(in_flight, sent, sent_bytes, lost)`."""
    @property
    def in_flight(self) -> int: ...

def split_framed(data: Buffer) -> list[bytes]:
    """The packets of a framed buffer, in order (an offload frame gives its packet without the header)."""

def framed_payload_bytes(data: Buffer, count: int | None = None) -> int:
    """Payload bytes of the first `count` frames (all when None): without prefixes, with offload headers."""

def framed_without(data: Buffer, positions: Sequence[int]) -> tuple[bytes, int]:
    """`data` without the frames at `positions`: `(framed, count)` of what is left."""

# --- the connection core: TLS 1.3, handshake, frames and acks without I/O (rust/core/src/connection.rs) ---

__all__ += ["KEY_EXCHANGE_GROUPS", "CONNECTION_FAILURE_REASONS", "MAX_OUTPUT", "TlsSecurity", "TlsConnection"]
__all__ += ["Established", "Refused", "Failed", "Closed", "check_ca_files"]

KEY_EXCHANGE_GROUPS: Final[tuple[str, ...]]  # ("X25519MLKEM768", "X25519"): preferred first
CONNECTION_FAILURE_REASONS: Final[tuple[str, ...]]  # every `Failed.reason`
MAX_OUTPUT: Final[int]  # ciphertext bytes `send_packets` lets wait in the output

def check_ca_files(cert: bytes, key: bytes, ca: bytes) -> list[str]:
    """Checks CA-mode PEM files as a node does at start (raises `IdentityError` naming what is refused);
    returns the names the certificate carries."""

@final
class TlsSecurity:
    """A node's TLS setup: its key or certificate, and whom it trusts (checked when made); or, insecure,
    plaintext connections whose peers are the configured ids they claim."""

    @staticmethod
    def with_keys(
        local_id: str, key_file: bytes, peer_keys: Sequence[tuple[str, bytes]], *, max_frame_size: int = 65535
    ) -> TlsSecurity: ...
    @staticmethod
    def with_ca(
        local_id: str,
        cert: bytes,
        key: bytes,
        ca: bytes,
        peers: Sequence[str],
        *,
        max_frame_size: int = 65535,
    ) -> TlsSecurity: ...
    @staticmethod
    def insecure(local_id: str, peers: Sequence[str], *, max_frame_size: int = 65535) -> TlsSecurity: ...
    def update_keys(self, set: Sequence[tuple[str, bytes]], removed: Sequence[str] = ...) -> None:
        """Key mode: trusts `set`'s peers (added or rekeyed) and no longer `removed`'s, in place, O(the
        peers changed); raises `IdentityError` before anything changed, `ValueError` in CA mode."""
    def update_ids(self, added: Sequence[str], removed: Sequence[str] = ...) -> None:
        """CA and insecure modes: adds `added` to the configured peers and drops `removed`, in place, O(the
        peers changed); `ValueError` in key mode."""
    @property
    def peer_count(self) -> int: ...
    @property
    def local_id(self) -> str: ...
    @property
    def mode(self) -> str: ...
    def client(self, peer_id: str, epoch: int) -> TlsConnection: ...
    def server(self, refuse: str | None = None) -> TlsConnection: ...

@final
class Established:
    """The handshake is done."""

    @property
    def peer_id(self) -> str: ...
    @property
    def announced_id(self) -> str: ...
    @property
    def epoch(self) -> int: ...

@final
class Refused:
    """The server refused the client, with its reason (on the server, `claimed`: the hello's id)."""

    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def claimed(self) -> str: ...

@final
class Failed:
    """The connection failed; `reason` is one of `CONNECTION_FAILURE_REASONS`."""

    @property
    def reason(self) -> str: ...
    @property
    def detail(self) -> str: ...

@final
class Closed:
    """The peer closed an established connection."""

@final
class TlsConnection:
    """One node-to-node connection without I/O: feed `receive` what the socket read, write `take_output`."""

    def receive(self, data: Buffer) -> list[Established | Refused | Failed | Closed]: ...
    def receive_eof(self) -> list[Established | Refused | Failed | Closed]: ...
    def take_frames(self) -> list[bytes]: ...
    def take_output(self) -> bytes: ...
    def send_packets(self, packets: Iterable[Buffer]) -> int: ...
    def send_keepalive(self) -> None: ...
    def close(self) -> None: ...
    @property
    def is_client(self) -> bool: ...
    @property
    def encrypted(self) -> bool: ...
    @property
    def stage(self) -> str: ...
    @property
    def failure(self) -> Failed | None: ...
    @property
    def key_exchange_group(self) -> str | None: ...
    @property
    def frames(self) -> int: ...
    @property
    def acked(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def keepalives(self) -> int: ...
    @property
    def tls_bytes(self) -> tuple[int, int]: ...

__all__ += ["NO_PEER", "ReceiveSession"]

@final
class ReceiveSession:
    """One accepted TLS connection of a node's receiver on the native core: one `pump` per readiness event
    reads, decrypts, judges the hello, decodes, checks sources, writes the TUN and sends the ack. On a
    node's TUN path an authenticated session is pumped by a `DataPlane` instead."""

    def __new__(
        cls,
        security: TlsSecurity,
        sock: int,
        tun_fd: int | None,
        table: PrefixTable,
        indexes: dict[str, int],
        *,
        vnet_header: bool = False,
        read_size: int = 262144,
        refuse: str | None = None,
    ) -> ReceiveSession: ...
    def pump(self, flush: bool = True) -> _PumpResult: ...
    def take_parked(self) -> _PumpResult: ...
    def take_counts(self) -> _ReceiveCounts: ...
    def flush(self) -> int: ...
    def take_packets(self) -> list[bytes]: ...
    def set_route(self, table: PrefixTable, indexes: dict[str, int]) -> None: ...
    def close(self) -> None: ...
    @property
    def encrypted(self) -> bool: ...
    @property
    def stage(self) -> str: ...
    @property
    def peer_id(self) -> str | None: ...
    @property
    def failure(self) -> Failed | None: ...
    @property
    def frames(self) -> int: ...
    @property
    def acked(self) -> int: ...
    @property
    def acked_out(self) -> int: ...
    @property
    def quiet_for(self) -> float | None: ...
    @property
    def fatal_errno(self) -> int: ...
    @property
    def unsent(self) -> int: ...
    @property
    def buffered(self) -> int: ...
    @property
    def key_exchange_group(self) -> str | None: ...
    @property
    def on_data_plane(self) -> bool: ...

NO_PEER: Final[int]
"""A peer index no prefix carries (a session given it drops every packet as spoofed)."""

_ReceiveCounts: TypeAlias = tuple[int, int, int, int, int, int, int, int, int, int, int]
"""`(frames, payload_bytes, delivered, delivered_bytes, extra_segments, spoofed, unparsable,
offload_invalid, tun_dropped, tun_refused, batches)`."""

_PumpResult: TypeAlias = tuple[list[Established | Refused | Failed | Closed] | None, int, int, _ReceiveCounts]
"""`(events, read, unsent, counts)` of `ReceiveSession.pump`."""

__all__ += ["DataPlane"]

@final
class DataPlane:
    """The thread that pumps a node's authenticated receive sessions on its TUN path without the
    interpreter, until one meets something for Python (see `vpn_packet_core::data_plane`)."""

    def __new__(cls, *, ack_delay: float = 0.002, ack_bytes: int = 262144) -> DataPlane: ...
    def watch(self, session: ReceiveSession, index: int, on_parked: Callable[[], object]) -> None: ...
    def unwatch(self, session: ReceiveSession) -> None: ...
    def watch_tun(self, feed: TunFeed, on_parked: Callable[[], object]) -> None: ...
    def watch_send(self, session: SendSession, on_parked: Callable[[], object]) -> None: ...
    def unwatch_send(self, session: SendSession) -> None: ...
    def unwatch_tun(self, feed: TunFeed) -> None: ...
    def take_parked(self) -> list[Callable[[], object]]: ...
    @property
    def notify_fd(self) -> int: ...
    def stats(self) -> tuple[int, int, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

__all__ += ["SendSession"]

@final
class SendSession:
    """One connection of a node's sending side on the native core: TLS, the signed hello and the answer,
    then `send_framed` encrypts and writes a framed batch in the call, and one `pump` per readiness event
    reads the acks. The socket stays Python's."""

    def __new__(
        cls, security: TlsSecurity, sock: int, peer_id: str, epoch: int, *, read_size: int = 65536
    ) -> SendSession: ...
    def pump(self) -> tuple[list[Established | Refused | Failed | Closed] | None, int, int, int]: ...
    def take_parked(self) -> tuple[list[Established | Refused | Failed | Closed] | None, int, int, int]: ...
    @property
    def on_data_plane(self) -> bool: ...
    def send_framed(self, data: Buffer, count: int) -> int: ...
    def send_keepalive(self) -> int: ...
    def flush(self) -> int: ...
    def close(self) -> None: ...
    def forget_socket(self) -> None: ...
    def fail_in_flight(self) -> int:
        """The connection ended: the fast path's batches in flight resolve; returns the frames lost."""
    @property
    def wire_in_flight(self) -> int: ...
    @property
    def fast_in_flight(self) -> int: ...
    @property
    def fast_frames(self) -> int: ...
    @property
    def fast_wire_bytes(self) -> int: ...
    @property
    def acked_payload(self) -> int: ...
    @property
    def encrypted(self) -> bool: ...
    @property
    def stage(self) -> str: ...
    @property
    def peer_id(self) -> str | None: ...
    @property
    def failure(self) -> Failed | None: ...
    @property
    def frames(self) -> int: ...
    @property
    def acked(self) -> int: ...
    @property
    def keepalives(self) -> int: ...
    @property
    def tls_bytes(self) -> tuple[int, int]: ...
    @property
    def unsent(self) -> int: ...
    @property
    def key_exchange_group(self) -> str | None: ...
    @property
    def peer_names(self) -> list[str]: ...
