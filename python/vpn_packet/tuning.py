"""Every tunable default and every validation rule of a setting, in one file.

Why one file: the node configuration parser, `Node`, `TunNode` and the library classes (dispatcher, stream
pool, TCP streams, receiver, TUN device) used to state their defaults and range checks each on its own, and
they drifted apart (an MTU floor of 576 in one place and 68 in another, three different worker buffer
sizes). Here each value is picked once, with the reason for it, and each rule is one function; the other
layers import them. (wireguard-go keeps its tunables in `device/constants.go` for the same reason.)

- `Tuning`: the performance knobs of a node, one dataclass. Each field carries its range (`spec(name)`),
  and `Tuning(...)` checks every value against it, so a bad value fails the same way from a config file
  (`tuning.write_timeout: ...`, the parser names the key) or from Python (`ValueError`).
- Library defaults (`WORKER_BUFFER_SIZE`, `MAX_WORKERS`, ...): what the classes use when given nothing.
  They equal `Tuning`'s, except where a node needs more (`NODE_WORKER_BUFFER_SIZE`). `NODE_RESILIENCE` is
  the library's `ResilienceConfig()` itself: the breaker and retry defaults have one source.
- Rules: `check_int`, `check_seconds` (at most `MAX_SECONDS`; a field may have a floor, as `ack_timeout`
  has `MIN_ACK_TIMEOUT`), `check_idle_after_keepalive` and `check_idle_close_after_keepalive` (between two
  fields), `check_interface_name`, `check_interface_address`, `check_mtu`, `check_peer_id`,
  `parse_endpoint`, `check_prefix`. Each raises `ValueError` with a message that does not name the
  setting, so that the caller can put its own name in front (`interface.mtu: 100 is out of range
  576..65535`). Rules between settings (a peer's prefix against
  the node's own address, endpoints against the listen address) name several keys, so they live with the
  parser that knows the keys (`vpn_packet.node.config`).

The wire format's constants (frame size, hello) are not here: they are the Rust core's, exported through
`vpn_packet.transport.framing`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

from vpn_packet._native import MAX_PEER_ID_LEN
from vpn_packet.resilience import ResilienceConfig

__all__ = [
    "ACK_BYTES",
    "ACK_DELAY",
    "ACK_TIMEOUT",
    "CLOCK_SKEW",
    "CONNECT_TIMEOUT",
    "COALESCE",
    "COALESCE_QUIET",
    "DEFAULT_TUNING",
    "DISCOVERY_PREFIX",
    "DISCOVERY_STATE_DIR",
    "DISCOVERY_TTL",
    "MAX_DISCOVERY_TTL",
    "MIN_DISCOVERY_TTL",
    "FAILURE_LOG_BURST",
    "FAILURE_LOG_RATE",
    "FAILURE_SUMMARY_INTERVAL",
    "HELLO_TIMEOUT",
    "IDLE_CLOSE",
    "LOG_INTERVAL",
    "LOG_LEVELS",
    "IFNAMSIZ",
    "IN_FLIGHT_WINDOW",
    "IPV6_MIN_MTU",
    "MAX_CONNECTIONS",
    "MAX_MEMBERSHIP_DAYS",
    "MAX_MEMBERSHIP_PREFIXES",
    "MAX_CONNECTIONS_PER_PEER",
    "MAX_MTU",
    "MAX_PENDING",
    "MAX_PENDING_PER_SOURCE",
    "MAX_SILENT_PENDING",
    "MAX_SILENT_PENDING_PER_SOURCE",
    "MAX_SECONDS",
    "MAX_STREAMS_PER_PEER",
    "MAX_TXQUEUELEN",
    "MAX_WORKERS",
    "MEMBERSHIP_DAYS",
    "MIN_ACK_TIMEOUT",
    "MIN_MTU",
    "MTU",
    "NODE_RESILIENCE",
    "NODE_WORKER_BUFFER_SIZE",
    "DATA_PLANE_THREADS",
    "FLOOD_BATCH",
    "FLOOD_PAUSE",
    "READ_BATCH",
    "READ_SIZE",
    "RECEIVE_IDLE_TIMEOUT",
    "RECEIVE_BATCH",
    "SEND_BUFFER",
    "SHUTDOWN_TIMEOUT",
    "STREAM_IDLE_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "KEEPER_START_WAIT",
    "RECONNECT_BACKOFF",
    "RECONNECT_BACKOFF_MAX",
    "Spec",
    "TXQUEUELEN",
    "Tuning",
    "WARM_PEERS",
    "WORKER_BUFFER_SIZE",
    "WORKER_CLEANUP_INTERVAL",
    "WORKER_IDLE_TIMEOUT",
    "WRITE_TIMEOUT",
    "build",
    "check_idle_after_keepalive",
    "check_idle_close_after_keepalive",
    "check_int",
    "check_interface_address",
    "check_interface_name",
    "check_mtu",
    "check_peer_id",
    "check_prefix",
    "check_seconds",
    "parse_endpoint",
    "prefix_bounds",
]

T = TypeVar("T")

# --- the values -------------------------------------------------------------------------------------------

#: Packets one destination worker holds (docs/dispatcher.md: the `Dispatcher` contract's default).
WORKER_BUFFER_SIZE: Final = 100
#: A node's worker buffer: one TUN read hands up to `READ_BATCH` packets at once, often all for one
#: destination (a single TCP flow), so a buffer smaller than a few reads would reject most of a burst.
NODE_WORKER_BUFFER_SIZE: Final = 4096
#: Destination workers at once. Idle ones are evicted first; an idle worker costs about a kilobyte, so the
#: cap bounds memory at about 100 MB while leaving room for a gateway with many destinations.
MAX_WORKERS: Final = 100_000
#: Dispatcher loop iterations to wait for more packets before writing (batches form under load).
COALESCE: Final = 32
#: Seconds without a dispatcher wake-up after which a device read counts as "lone" and is written at the next
#: loop iteration (no coalescing): a ping after a pause, not a flood. 0.5 ms is well above
#: the gap between a flood's TUN reads and well below any interactive traffic's.
COALESCE_QUIET: Final = 0.0005
#: Seconds without traffic before a worker is removed, and how often that is checked.
WORKER_IDLE_TIMEOUT: Final = 300.0
WORKER_CLEANUP_INTERVAL: Final = 60.0

#: Streams a node keeps per peer; a worker keeps its stream while healthy, so this bounds parallelism.
MAX_STREAMS_PER_PEER: Final = 4
#: Seconds a pooled stream may stay unused before it is closed.
STREAM_IDLE_TIMEOUT: Final = 60.0
#: Seconds without a write after which a kept connection to a configured peer sends a keepalive frame (the
#: peer's receiver closes a connection silent for `RECEIVE_IDLE_TIMEOUT`); WireGuard's persistent keepalive
#: uses 25 s for the same reason (NAT state). It is also the TCP keepalive idle time, so a peer that vanished
#: while nothing was sent is noticed within about this plus 3 probes 5 s apart.
KEEPALIVE_INTERVAL: Final = 25.0
#: Seconds a starting node waits for its warm peers' connections before it says it is running (the data path
#: runs already; a peer that is down only delays the line). Half a second: a reachable peer on a LAN or
#: loopback answers in milliseconds, and a node of 10,000 peers must still say "running" within 2 s.
KEEPER_START_WAIT: Final = 0.5
#: Peers kept connected from the start, whatever their traffic (`vpn_packet.transport.keeper`): the first
#: ones in the node's order (static peers in config order, then discovered ones in the order they joined).
#: A small mesh has them all warm, so its first packet never waits for a handshake; a node of thousands keeps
#: a few connections, not thousands (each costs a socket, TLS state and a reconnect loop while it is down).
WARM_PEERS: Final = 8
#: Seconds without traffic (a packet either way; keepalives do not count) after which the connections to a
#: peer that is not warm are closed; it is connected again by its next packet, or when it connects to us.
#: Two minutes: a few keepalive intervals, so a peer in occasional use (a poll a minute) keeps its
#: connection, and an idle one costs nothing after a while.
IDLE_CLOSE: Final = 120.0
#: Seconds before retrying a configured peer whose connection failed, doubled per failure up to the max.
RECONNECT_BACKOFF: Final = 0.5
RECONNECT_BACKOFF_MAX: Final = 30.0
#: SO_SNDBUF: about 30 ms at 1 Gbit/s, so one writer keeps a fast link busy (the kernel may cap it).
SEND_BUFFER: Final = 4 * 1024 * 1024
#: Seconds for TCP connect, TLS handshake and hello together.
CONNECT_TIMEOUT: Final = 5.0
#: Seconds a write may wait for a peer that does not read before the stream counts as failed.
WRITE_TIMEOUT: Final = 10.0
#: Seconds a peer may acknowledge nothing while packets are in flight before its connection is taken for
#: dead (frozen, blackholed, not reading) and reset. A live receiver acknowledges every read (~ms); 2 s
#: tolerates scheduling hiccups and still tells a user within seconds, not after 90 MB "sent".
ACK_TIMEOUT: Final = 2.0
#: The shortest `ack_timeout` accepted. An acknowledgement needs a round trip and a read on the peer; below a
#: tenth of a second (0.001 was accepted once) none comes back in time on any real path, so every connection
#: with packets in flight would be reset as dead and its packets counted lost, over and over.
MIN_ACK_TIMEOUT: Final = 0.1
#: Seconds a receiver holds the ack of a read on the TUN path before writing it: the reply that the delivered
#: packets provoke goes first, and the acks of the reads within it go as one write (one segment and one
#: wake-up of the sender instead of one per read), unless `ACK_BYTES` of payload came meanwhile: then at
#: once, so that a bulk flow's window keeps moving. 2 ms: well under anything the sender waits on
#: (`ack_timeout`; the default window passes 4 MiB in 6 ms at 5 Gbit/s, and a bulk flow is acknowledged
#: every `ACK_BYTES` anyway), and each ack wakes the sender's event loop, which a request/response flow pays
#: for: redis GET through the tunnel, one client, 7,500-7,600/s against 6,800-7,100/s at 0.5 ms (two
#: alternating runs each, benches/README.md). A window below `rate x (round trip + ACK_DELAY)` is what slows
#: a flow whose reads stay under `ACK_BYTES`.
ACK_DELAY: Final = 0.002
ACK_BYTES: Final = 256 * 1024
#: Bytes written and not yet acknowledged, per connection, at most: the memory a dead peer can cost us.
#: 4 MiB keeps a 1 Gbit/s link busy at 30 ms of round trip.
IN_FLIGHT_WINDOW: Final = 4 * 1024 * 1024

#: Packets per sink call on the receiving side, bytes per socket read.
RECEIVE_BATCH: Final = 256
READ_SIZE: Final = 256 * 1024
#: Connections the receiver accepts at once, in total and from one peer (a peer uses `MAX_STREAMS_PER_PEER`;
#: the margin covers reconnects whose old connection is not closed yet).
MAX_CONNECTIONS: Final = 1024
MAX_CONNECTIONS_PER_PEER: Final = 16
#: Seconds a new connection has for TLS, challenge and hello together: a real peer needs milliseconds.
HELLO_TIMEOUT: Final = 5.0
#: Connections not authenticated yet that have sent something (TLS under way, then the hello), in all and
#: from one source address. Each may hold asyncio's 256 KiB TLS buffer, so 128 bound them to about 32 MiB.
#: At either limit the stalest one (the longest without a step of progress) is closed to make room: a new
#: connection is never refused, and a peer's, which makes a step every round trip, is not the one to go
#: (`vpn_packet.transport.admission`).
MAX_PENDING: Final = 128
MAX_PENDING_PER_SOURCE: Final = 16
#: Connections accepted that have not sent a byte yet, in all and from one source address. Held as bare
#: sockets (a descriptor and a few hundred bytes each, no TLS buffer), so a flood of them costs little; at
#: either limit the oldest silent one is closed. 512 in all stays well under the usual 1024 descriptors
#: of a process, with the handshaking and authenticated connections beside them; 32 per address lets a few
#: peers behind one NAT connect at once while one address floods.
MAX_SILENT_PENDING: Final = 512
MAX_SILENT_PENDING_PER_SOURCE: Final = 32
#: Seconds an authenticated connection may send nothing before the receiver closes it. Above the sender's
#: `STREAM_IDLE_TIMEOUT`, so a healthy sender closes its unused streams first.
RECEIVE_IDLE_TIMEOUT: Final = 180.0
#: Seconds between two warnings about the same peer/address and reason (refusals, failed handshakes).
LOG_INTERVAL: Final = 10.0
#: Failed connections to peers (`vpn_packet.ratelimit.FailureLog`): lines a second on average over all peers
#: (not per peer), with a burst of a few at once, then one summary line (peers unreachable, by reason) per
#: interval. Half a line a second leaves room for the node's other warnings (its drop report, at most two
#: lines every `drop_log_interval`) within one line a second with 10,000 peers down; the per-peer detail
#: is in `vpn-packet status` and the Prometheus export, not in the log.
FAILURE_LOG_RATE: Final = 0.5
FAILURE_LOG_BURST: Final = 10
FAILURE_SUMMARY_INTERVAL: Final = 60.0

#: TUN packets read per readiness event at most (one `dispatch_batch` call).
READ_BATCH: Final = 256
#: Threads that do a node's steady data-plane work off the event loop (`vpn_packet.transport.plane`): the TUN
#: reads of established destinations and the authenticated connections' reads, acks included. 0 keeps it
#: all on the event loop (what every version before did); one thread serves both directions.
DATA_PLANE_THREADS: Final = 1
#: On that thread, a TUN read of at least `FLOOD_BATCH` packets is a flood: the next read waits
#: `FLOOD_PAUSE` seconds for its batch to gather, so that a flood goes in fewer, bigger batches (fewer
#: sends and TLS records per packet) instead of one wake-up for every few packets. A light flow (a ping,
#: request/response) reads fewer at a time and is never held.
FLOOD_BATCH: Final = 16
FLOOD_PAUSE: Final = 0.0001

#: The interface: a common tunnel MTU (1500 minus outer IP/TCP/TLS overhead) and queue length.
MTU: Final = 1400
TXQUEUELEN: Final = 1000
MAX_TXQUEUELEN: Final = 1_000_000
#: The lowest MTU accepted: 576, the datagram size every IPv4 host must accept (RFC 791). The kernel would
#: take 68, but a tunnel below 576 breaks ordinary traffic (DNS over UDP, TCP handshakes with options).
MIN_MTU: Final = 576
MAX_MTU: Final = 65535
#: IPv6 needs links of at least 1280 bytes (RFC 8200).
IPV6_MIN_MTU: Final = 1280
#: Linux's IFNAMSIZ: an interface name is at most 15 bytes and a NUL.
IFNAMSIZ: Final = 16

#: The node's log levels (`[node] log_level`, `vpn-packet node --log-level`).
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

#: Seconds for the whole ordered shutdown of a node (and `Node.stop`'s drain).
SHUTDOWN_TIMEOUT: Final = 5.0

#: The node's breaker and retry defaults: the library's own (`ResilienceConfig()`, whose docstring gives the
#: reasons; an open breaker probes again after 2 s, so a peer that restarts is reachable within seconds).
#: Kept as a name for the node and its config parser, never as a second set of values.
NODE_RESILIENCE: Final = ResilienceConfig()

#: Mesh memberships (`vpn_packet.mesh.membership`): how long `vpn-packet sign` makes one valid by default
#: (90 days, as Let's Encrypt's certificates: short enough that a forgotten node falls out, long enough that
#: re-signing is a quarterly chore, not a daily one), and the longest it may (a year: a membership is a
#: credential, and a revocation must be kept until every membership it covers has expired).
MEMBERSHIP_DAYS: Final = 90
MAX_MEMBERSHIP_DAYS: Final = 365
#: Clock skew tolerated between the authority that signed and the node that checks: a membership issued up
#: to this many seconds "in the future", or expired less than this long ago, is still accepted.
CLOCK_SKEW: Final = 300
#: The most prefixes one membership may name (a node with more is a gateway that should own a larger one).
MAX_MEMBERSHIP_PREFIXES: Final = 255

#: `[discovery]`: where the members live in etcd, and the lease TTL in seconds: a node that stops renewing
#: leaves the others within it. At least 2 s (the lease is renewed every third of it, and one lost renewal
#: must not drop a live node), at most an hour (a dead node's tunnels would linger longer than anyone waits).
DISCOVERY_PREFIX: Final = "/vpn-packet/default/"
DISCOVERY_TTL: Final = 10
MIN_DISCOVERY_TTL: Final = 2
MAX_DISCOVERY_TTL: Final = 3600
#: Where a node keeps the last memberships seen and its revocations (`StateDirectory=vpn-packet`).
DISCOVERY_STATE_DIR: Final = "/var/lib/vpn-packet"

#: The longest duration any setting in seconds may have: one day. Larger values cannot be meant, and they
#: break timers: `asyncio` (`call_at`, `wait_for`) adds them to the loop's clock, where 1e308 overflows to
#: inf or raises `OverflowError` deep in the loop, and a timer of years never fires, so the setting is
#: silently "off" instead of refused.
MAX_SECONDS: Final = 86_400.0

# --- the rules --------------------------------------------------------------------------------------------


def check_int(value: object, low: int, high: int) -> int:
    """`value` when it is an integer (not a bool) in `low..high`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range {low}..{high}")
    return value


def check_seconds(value: object, *, zero: bool = False) -> float:
    """`value` as float when it is a finite number of seconds, positive (or 0 or more with `zero`), and at
    most `MAX_SECONDS` (one day)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{value} must be {'0 or more' if zero else 'positive'}")
    if value > MAX_SECONDS:
        raise ValueError(f"{value} is more than {MAX_SECONDS:g} seconds (one day), the most a timer may wait")
    return float(value)


def check_interface_name(name: object) -> str:
    """A Linux interface name: 1..15 bytes, no '/' and no white space (what the kernel accepts)."""
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode()) >= IFNAMSIZ
        or "/" in name
        or any(c.isspace() for c in name)
    ):
        raise ValueError(f"{name!r} is not an interface name (1..{IFNAMSIZ - 1} bytes, no '/' or spaces)")
    return name


def check_interface_address(value: object) -> str:
    """An address of this node's interface with its prefix length (`"10.8.0.1/24"`), normalized.

    Refused, because the kernel cannot use them as a tunnel address: no prefix length; a /0 prefix (it
    claims every address, so the interface route would swallow all traffic, the underlay included); the
    unspecified address (0.0.0.0, ::), a loopback or multicast address; the network address of its prefix
    (10.8.0.0/24: that names the network, not a host) and, for IPv4, the broadcast address (10.8.0.255/24).
    /31, /32 (RFC 3021) and IPv6 /127, /128 have no network or broadcast address to avoid."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address with prefix length like '10.8.0.1/24', got {value!r}")
    try:
        interface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an address with prefix length like '10.8.0.1/24'") from None
    if "/" not in value:
        raise ValueError(f"{value!r} needs a prefix length, like '10.8.0.1/24'")
    ip, network = interface.ip, interface.network
    if network.prefixlen == 0:
        raise ValueError(f"{value!r}: a /0 prefix covers every address, the underlay's too")
    if ip.is_unspecified:
        raise ValueError(f"{value!r}: {ip} is the unspecified address, not one a host can have")
    if ip.is_loopback or ip.is_multicast:
        kind = "a loopback" if ip.is_loopback else "a multicast"
        raise ValueError(f"{value!r}: {ip} is {kind} address, not one a tunnel can use")
    if network.num_addresses > 2 and ip == network.network_address:
        raise ValueError(f"{value!r}: {ip} is the network address of {network}, not a host's")
    if ip.version == 4 and network.num_addresses > 2 and ip == network.broadcast_address:
        raise ValueError(f"{value!r}: {ip} is the broadcast address of {network}, not a host's")
    return str(interface)


def check_mtu(mtu: object, *, ipv6: bool = False) -> int:
    """An interface MTU in `MIN_MTU..MAX_MTU`, at least `IPV6_MIN_MTU` when the interface has IPv6."""
    value = check_int(mtu, MIN_MTU, MAX_MTU)
    if ipv6 and value < IPV6_MIN_MTU:
        raise ValueError(f"{value} is below {IPV6_MIN_MTU}, the IPv6 minimum")
    return value


def check_peer_id(peer_id: object) -> str:
    """A peer id: a non-empty string of at most `MAX_PEER_ID_LEN` bytes of UTF-8 (it goes in the hello)."""
    if not isinstance(peer_id, str) or not peer_id:
        raise ValueError(f"expected a non-empty string, got {peer_id!r}")
    if len(peer_id.encode()) > MAX_PEER_ID_LEN:
        raise ValueError(f"{peer_id[:20]!r}...: at most {MAX_PEER_ID_LEN} bytes of UTF-8")
    return peer_id


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`"host:port"` or `"[v6]:port"` as `(host, port)`; raises `ValueError` when malformed."""
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoint must be a str, got {type(endpoint).__name__}")
    if endpoint.startswith("["):
        host, sep, port_text = endpoint[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"endpoint {endpoint!r}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"endpoint {endpoint!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = endpoint.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint {endpoint!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"endpoint {endpoint!r}: write an IPv6 address in brackets, [addr]:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: port must be 1..65535")
    return host, int(port_text)


def check_prefix(prefix: object) -> str:
    """An IP prefix in `ipaddress` text (`"10.8.0.0/24"`); host bits set is an error, not rounded away.

    Remembered (the last `1 << 16` good ones): each prefix of a config is checked by its parser and again by
    the `Peer` it becomes, and `ipaddress` takes about 10 us a prefix, a tenth of a second at 10,000 peers."""
    if not isinstance(prefix, str):
        raise ValueError(f"{prefix!r} is not an IP prefix")
    return _check_prefix_text(prefix)


@functools.lru_cache(maxsize=1 << 16)
def _check_prefix_text(prefix: str) -> str:
    try:
        return str(ipaddress.ip_network(prefix, strict=True))
    except ValueError:
        try:
            loose = ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise ValueError(f"{prefix!r} is not an IP prefix") from None
        raise ValueError(f"{prefix!r} has host bits set (did you mean {loose}?)") from None


def prefix_bounds(prefix: str) -> tuple[int, int, int]:
    """`(version, first, last)`: the addresses of a prefix as integers, for a prefix `check_prefix` passed
    (normalised: no host bits). Containment rules then compare integers: `ipaddress` takes about 10 us to
    parse a prefix and as much again per `subnet_of`, which at 10,000 peers is most of a node's start.
    Raises `ValueError` for text that is not such a prefix."""
    address, slash, length = prefix.partition("/")
    version, family, bits = (6, socket.AF_INET6, 128) if ":" in address else (4, socket.AF_INET, 32)
    try:
        first = int.from_bytes(socket.inet_pton(family, address), "big")
    except OSError:
        raise ValueError(f"{prefix!r} is not an IP prefix") from None
    if not slash or not length.isdigit() or not 0 <= int(length) <= bits:
        raise ValueError(f"{prefix!r} is not an IP prefix")
    host = (1 << (bits - int(length))) - 1
    if first & host:
        raise ValueError(f"{prefix!r} has host bits set")
    return version, first, first | host


def check_idle_after_keepalive(receive_idle_timeout: float, keepalive_interval: float) -> None:
    """The rule between two `Tuning` fields: the receiver closes a connection silent for
    `receive_idle_timeout`, and a sender with nothing to send writes a keepalive only every
    `keepalive_interval`. At or below it, a quiet peer's connections are closed between two keepalives and
    redialled, over and over (issue 22). Peers are taken to share this node's `keepalive_interval` (the
    default everywhere). Raises `ValueError` starting with `receive_idle_timeout: `."""
    if receive_idle_timeout <= keepalive_interval:
        raise ValueError(
            f"receive_idle_timeout: {receive_idle_timeout:g} is not above keepalive_interval "
            f"({keepalive_interval:g} s): a quiet peer sends a keepalive only that often, so its connections "
            "would be closed as idle between keepalives; make receive_idle_timeout larger (the default is "
            f"{RECEIVE_IDLE_TIMEOUT:g}) or keepalive_interval smaller"
        )


def check_idle_close_after_keepalive(idle_close: float, keepalive_interval: float) -> None:
    """The rule between `idle_close` and `keepalive_interval`: a connection in use that goes quiet writes a
    keepalive after `keepalive_interval`, and keepalives do not count as use. An `idle_close` at or below it
    would close a peer's connections between two of its packets sooner than a keepalive is even due, and
    redial (TCP, TLS, hello) at its next packet: the connection the keepalive exists to keep. Raises
    `ValueError` starting with `idle_close: `."""
    if idle_close <= keepalive_interval:
        raise ValueError(
            f"idle_close: {idle_close:g} is not above keepalive_interval ({keepalive_interval:g} s): a peer "
            "in occasional use would have its connection closed and redialled between two packets; make "
            f"idle_close larger (the default is {IDLE_CLOSE:g}) or keepalive_interval smaller"
        )


# --- Tuning -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """The rule of one `Tuning` field: an integer in `low..high`, or positive seconds (`seconds=True`), at
    least `min_seconds` when that is set (`min_reason` says why a smaller value cannot work)."""

    low: int = 0
    high: int = 0
    seconds: bool = False
    doc: str = ""
    min_seconds: float = 0.0
    min_reason: str = ""

    def check(self, value: object) -> Any:
        """The value, checked (a float for seconds); raises `ValueError` without the field's name."""
        if not self.seconds:
            return check_int(value, self.low, self.high)
        seconds = check_seconds(value)
        if seconds < self.min_seconds:
            raise ValueError(f"{value} is below {self.min_seconds:g} seconds: {self.min_reason}")
        return seconds


def _int(default: int, low: int, high: int, doc: str) -> Any:
    return field(default=default, metadata={"spec": Spec(low, high, doc=doc)})


def _seconds(default: float, doc: str, *, min_seconds: float = 0.0, min_reason: str = "") -> Any:
    spec = Spec(seconds=True, doc=doc, min_seconds=min_seconds, min_reason=min_reason)
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True, slots=True)
class Tuning:
    """The performance knobs of a node (the `[tuning]` table of its config), all optional.

    Defaults are the constants above; each field's range is `Tuning.spec(name)`. Construction checks every
    value (`ValueError` naming the field), so an instance is always valid. `dataclasses.replace` or
    `with_changes(**changes)` make a changed copy.
    """

    # the dispatcher
    worker_buffer_size: int = _int(NODE_WORKER_BUFFER_SIZE, 1, 1 << 20, "packets a destination worker holds")
    max_workers: int = _int(MAX_WORKERS, 1, 1 << 24, "destination workers at once")
    coalesce: int = _int(COALESCE, 0, 10_000, "dispatcher loop iterations to wait for more packets")
    worker_idle_timeout: float = _seconds(WORKER_IDLE_TIMEOUT, "seconds before an idle worker goes")
    worker_cleanup_interval: float = _seconds(WORKER_CLEANUP_INTERVAL, "seconds between idle checks")
    # the TUN device
    read_batch: int = _int(READ_BATCH, 1, 1 << 16, "TUN packets read per readiness event at most")
    data_plane_threads: int = _int(
        DATA_PLANE_THREADS, 0, 1, "threads for the steady packet work off the event loop (0: on the loop)"
    )
    # sending: the stream pool and TCP
    max_streams_per_peer: int = _int(MAX_STREAMS_PER_PEER, 1, 1024, "streams per peer")
    send_buffer: int = _int(SEND_BUFFER, 4096, 1 << 30, "SO_SNDBUF bytes")
    connect_timeout: float = _seconds(CONNECT_TIMEOUT, "seconds for connect, handshake and hello")
    write_timeout: float = _seconds(WRITE_TIMEOUT, "seconds a write may wait for a peer that does not read")
    ack_timeout: float = _seconds(
        ACK_TIMEOUT,
        "seconds a peer may acknowledge nothing while packets are out",
        min_seconds=MIN_ACK_TIMEOUT,
        min_reason="no acknowledgement comes back that fast (a round trip and a read on the peer), so "
        "every connection with packets in flight would be reset as dead and its packets counted lost",
    )
    window: int = _int(IN_FLIGHT_WINDOW, 64 * 1024, 1 << 30, "bytes in flight per connection at most")
    stream_idle_timeout: float = _seconds(STREAM_IDLE_TIMEOUT, "seconds before an unused stream is closed")
    keepalive_interval: float = _seconds(KEEPALIVE_INTERVAL, "seconds of silence before a keepalive frame")
    warm_peers: int = _int(WARM_PEERS, 0, 1 << 20, "peers kept connected whatever their traffic (the first)")
    idle_close: float = _seconds(
        IDLE_CLOSE, "seconds without traffic before the connections to a peer that is not warm are closed"
    )
    # receiving
    receive_batch: int = _int(RECEIVE_BATCH, 1, 1 << 16, "packets per sink call")
    read_size: int = _int(READ_SIZE, 1024, 1 << 26, "bytes per socket read")
    max_connections: int = _int(MAX_CONNECTIONS, 1, 1 << 20, "connections accepted at once")
    max_connections_per_peer: int = _int(MAX_CONNECTIONS_PER_PEER, 1, 1 << 16, "connections from one peer")
    hello_timeout: float = _seconds(HELLO_TIMEOUT, "seconds a new connection has for TLS and its hello")
    max_pending: int = _int(MAX_PENDING, 1, 1 << 16, "connections not authenticated yet, in all")
    max_pending_per_source: int = _int(MAX_PENDING_PER_SOURCE, 1, 1 << 16, "pending connections per address")
    max_silent_pending: int = _int(
        MAX_SILENT_PENDING, 1, 1 << 20, "accepted connections that sent nothing yet, in all"
    )
    max_silent_pending_per_source: int = _int(
        MAX_SILENT_PENDING_PER_SOURCE, 1, 1 << 16, "accepted connections that sent nothing yet, per address"
    )
    receive_idle_timeout: float = _seconds(
        RECEIVE_IDLE_TIMEOUT,
        "seconds an authenticated connection may be silent before the receiver closes it",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            try:
                value = f.metadata["spec"].check(getattr(self, f.name))
            except ValueError as exc:
                raise ValueError(f"{f.name}: {exc}") from None
            object.__setattr__(self, f.name, value)
        check_idle_after_keepalive(self.receive_idle_timeout, self.keepalive_interval)
        check_idle_close_after_keepalive(self.idle_close, self.keepalive_interval)

    @staticmethod
    def spec(name: str) -> Spec:
        """The rule of field `name`; raises `KeyError` for a name that is not a field."""
        for f in fields(Tuning):
            if f.name == name:
                spec: Spec = f.metadata["spec"]
                return spec
        raise KeyError(name)

    @staticmethod
    def check_fields(**values: object) -> None:
        """Checks keyword values against the rules of the `Tuning` fields of the same names; raises
        `ValueError` naming the first bad one. The library classes call it in their constructors, so a
        setting has one rule whether it comes from a config file, a `Tuning` or a constructor argument."""
        for name, value in values.items():
            try:
                Tuning.spec(name).check(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None

    @staticmethod
    def names() -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in fields(Tuning))

    def with_changes(self, **changes: Any) -> Tuning:
        """A copy with `changes` (field names, or a deprecated alias of one: warned once) applied and
        checked; `TypeError` for an unknown name."""
        return dataclasses.replace(self, **Tuning.resolve_aliases(changes)) if changes else self

    @staticmethod
    def resolve_aliases(values: Mapping[str, Any], where: str = "tuning") -> dict[str, Any]:
        """`values` (a `[tuning]` table, or keyword changes) with every deprecated key
        (`vpn_packet.deprecation.TUNING_ALIASES`) under its new name, or left out when its setting is gone;
        each warned once. A key given under both names keeps the new name's value."""
        from vpn_packet.deprecation import TUNING_ALIASES, warn_once

        out = dict(values)
        for old, new in TUNING_ALIASES.items():
            if old not in out:
                continue
            value = out.pop(old)
            if new is None:
                warn_once(f"{where}.{old}", f"{where}.{old} has no effect any more; remove it")
                continue
            warn_once(f"{where}.{old}", f"{where}.{old} is now {where}.{new}")
            out.setdefault(new, value)
        return out

    @property
    def idle_timeout(self) -> float:
        """Deprecated: `receive_idle_timeout` (warned once)."""
        from vpn_packet.deprecation import warn_once

        warn_once("Tuning.idle_timeout", "Tuning.idle_timeout is now Tuning.receive_idle_timeout")
        return self.receive_idle_timeout


def build(cls: Callable[..., T], settings: Tuning, /, *args: Any, **kwargs: Any) -> T:
    """`cls(*args, **kwargs)` with every constructor keyword `cls` takes from a `Tuning`
    (`cls.TUNING_FIELDS`: keyword -> field) set from `settings`: a component takes the `Tuning` whole,
    and the one list of which knob is which keyword is the component's own. `kwargs` win."""
    fields_of: Mapping[str, str] = getattr(cls, "TUNING_FIELDS")  # noqa: B009 - every component declares it
    values = {keyword: getattr(settings, name) for keyword, name in fields_of.items()}
    return cls(*args, **{**values, **kwargs})


_dataclass_init = Tuning.__init__


def _init_with_aliases(self: Tuning, *args: Any, **kwargs: Any) -> None:
    """`Tuning(...)` also takes a deprecated field name for one release (`resolve_aliases`, warned once)."""
    _dataclass_init(self, *args, **Tuning.resolve_aliases(kwargs))


Tuning.__init__ = _init_with_aliases  # type: ignore[method-assign]

#: The node's tuning when nothing is configured.
DEFAULT_TUNING: Final = Tuning()
