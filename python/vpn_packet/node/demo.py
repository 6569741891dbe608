"""`vpn-packet demo`: two nodes on loopback, a realistic workload through the real TCP transport, verified.

No root and no configuration: node A and node B listen on 127.0.0.1 (ephemeral ports); B's sink is an
in-process callback. A sends a mixed workload - hundreds of destinations inside B's prefixes, IPv4 and IPv6,
TCP and UDP, packets of 40 to 1400 bytes, from source addresses inside A's prefixes (so B's anti-spoofing
check accepts them) - through its dispatcher, stream pool and TCP streams: TLS 1.3 with throwaway keys, each
node trusting the other's public key, as a real node does (or plaintext and unauthenticated with
`secure=False`, for comparison). Every packet ends with its destination's index and a per-destination
sequence number; B's sink checks that each one arrives intact (CRC-32 of the whole packet) and in order per
destination, and that none is missing. A progress bar runs meanwhile; the end is a table of the busiest
workers, throughput and drops by reason. Exit status 0 only when every packet arrived intact and in order;
1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import tempfile
import time
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vpn_packet.packets import TCP, UDP, ipv4_packet, ipv6_packet

if TYPE_CHECKING:
    from vpn_packet.node.node import Node
    from vpn_packet.transport.handshake import Security

__all__ = ["DemoResult", "Flow", "Verifier", "Workload", "run_demo"]

EXIT_LOST = 1

A_ID, B_ID = "node-a", "node-b"
A_PREFIXES = ["10.1.0.0/16", "fd00:a::/64"]
B_PREFIXES = ["10.2.0.0/16", "fd00:b::/64"]

_MARK = struct.Struct("!II")  # destination index, sequence number: the last 8 bytes of every packet
# Packet sizes drawn from, by weight: many small (ACKs, DNS), some medium, many near the MTU.
_SIZES = (
    [(s, 6) for s in (40, 44, 52, 60, 64, 76, 90, 100)]
    + [(s, 2) for s in range(128, 1200, 48)]
    + [(s, 5) for s in (1200, 1240, 1280, 1300, 1350, 1380, 1400)]
)
_PORTS = (53, 80, 123, 443, 853, 993, 3478, 5060, 8080, 51820)
_CHUNK = 4096  # packets handed to send_batch at once


@dataclass(frozen=True, slots=True)
class Flow:
    """One destination of the workload: addresses, protocol and ports."""

    index: int
    src: str
    dst: str
    protocol: int
    src_port: int
    dst_port: int

    @property
    def v6(self) -> bool:
        return ":" in self.dst

    @property
    def header_len(self) -> int:
        return (40 if self.v6 else 20) + (20 if self.protocol == TCP else 8)

    @property
    def key(self) -> str:
        return f"[{self.dst}]:{self.dst_port}" if self.v6 else f"{self.dst}:{self.dst_port}"


class Workload:
    """`packets` packets over `destinations` flows, deterministic for a seed, built in chunks.

    Sources are inside `src_prefixes`, destinations inside `dst_prefixes` (an IPv4 and an IPv6 prefix each).

    Destinations are weighted (a few busy ones, a long tail). `crcs[i][seq]` is the CRC-32 of packet `seq`
    of destination `i`, for the receiver's check.
    """

    def __init__(
        self,
        packets: int,
        destinations: int,
        seed: int,
        src_prefixes: Sequence[str] = A_PREFIXES,
        dst_prefixes: Sequence[str] = B_PREFIXES,
    ) -> None:
        self.total = packets
        self.rng = random.Random(seed)
        rng = self.rng
        self.flows: list[Flow] = []
        a4, a6 = (ipaddress.ip_network(p) for p in src_prefixes)
        b4, b6 = (ipaddress.ip_network(p) for p in dst_prefixes)
        for i in range(destinations):
            v6 = rng.random() < 0.4
            src_net, dst_net = (a6, b6) if v6 else (a4, b4)
            self.flows.append(
                Flow(
                    index=i,
                    src=str(src_net[rng.randrange(1, 60000)]),
                    dst=str(dst_net[i + 1]),  # distinct addresses: one destination key each
                    protocol=TCP if rng.random() < 0.55 else UDP,
                    src_port=rng.randrange(1024, 65535),
                    dst_port=rng.choice(_PORTS),
                )
            )
        self.weights = [1.0 / (rank + 1) ** 0.7 for rank in range(destinations)]
        self.sizes = [s for s, _ in _SIZES]
        self.size_weights = [w for _, w in _SIZES]
        self.sent = [0] * destinations
        self.crcs: list[array[int]] = [array("I") for _ in range(destinations)]
        self._templates: dict[tuple[int, int], bytes] = {}
        self.bytes = 0

    def _template(self, flow: Flow, size: int) -> bytes:
        key = (flow.index, size)
        template = self._templates.get(key)
        if template is None:
            filler = self.rng.randbytes(size - flow.header_len)
            build = ipv6_packet if flow.v6 else ipv4_packet
            template = build(flow.src, flow.dst, flow.protocol, flow.src_port, flow.dst_port, filler)
            self._templates[key] = template
        return template

    def chunks(self, size: int = _CHUNK) -> Iterator[list[bytes]]:
        """The packets, `size` at a time (built lazily so memory stays small)."""
        rng = self.rng
        flows, sent, crcs = self.flows, self.sent, self.crcs
        done = 0
        while done < self.total:
            n = min(size, self.total - done)
            picks = rng.choices(flows, self.weights, k=n)
            sizes = rng.choices(self.sizes, self.size_weights, k=n)
            chunk = []
            for flow, want in zip(picks, sizes, strict=True):
                packet_size = max(want, flow.header_len + _MARK.size)
                template = self._template(flow, packet_size)
                seq = sent[flow.index]
                sent[flow.index] = seq + 1
                packet = template[:-8] + _MARK.pack(flow.index, seq)
                crcs[flow.index].append(zlib.crc32(packet))
                chunk.append(packet)
                self.bytes += packet_size
            done += n
            yield chunk


@dataclass
class Verifier:
    """The receiving node's sink: checks every packet against the workload of `sender`."""

    workload: Workload
    sender: str = A_ID
    received: int = 0
    received_bytes: int = 0
    corrupt: int = 0
    out_of_order: int = 0
    wrong_peer: int = 0
    next_seq: list[int] = field(default_factory=list)
    target: int = 0
    done: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.next_seq = [0] * len(self.workload.flows)

    def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        crcs = self.workload.crcs
        next_seq = self.next_seq
        flows = len(next_seq)
        unpack = _MARK.unpack_from
        if peer_id != self.sender:
            self.wrong_peer += len(packets)
        for packet in packets:
            self.received += 1
            self.received_bytes += len(packet)
            if len(packet) < 28:
                self.corrupt += 1
                continue
            index, seq = unpack(packet, len(packet) - 8)
            if index >= flows or seq >= len(crcs[index]) or zlib.crc32(packet) != crcs[index][seq]:
                self.corrupt += 1
                continue
            if seq != next_seq[index]:
                self.out_of_order += 1
            next_seq[index] = seq + 1
        if self.done is not None and self.received >= self.target:
            self.done.set()

    @property
    def missing(self) -> int:
        return sum(s - n for s, n in zip(self.workload.sent, self.next_seq, strict=True) if s > n)


@dataclass
class DemoResult:
    """What a run measured (summed over the directions): the verifiers, both nodes' metrics, the top workers
    and timings. `packets` is the total over all directions."""

    packets: int
    destinations: int
    secure: bool
    both_ways: bool
    sent_accepted: int
    received: int
    received_bytes: int
    corrupt: int
    out_of_order: int
    missing: int
    wrong_peer: int
    elapsed: float
    generate_time: float
    drops: dict[str, int]
    top_workers: list[tuple[str, int, int, int]]
    streams_created: int
    sender: dict[str, Any]
    receiver: dict[str, Any]

    @property
    def ok(self) -> bool:
        return (
            self.received == self.packets
            and self.sent_accepted == self.packets
            and not (self.corrupt or self.out_of_order or self.missing or self.wrong_peer)
            and not any(self.drops.values())
        )

    @property
    def transfer_time(self) -> float:
        return max(self.elapsed - self.generate_time, 1e-9)

    @property
    def pps(self) -> float:
        return self.received / self.transfer_time

    @property
    def mbps(self) -> float:
        return self.received_bytes * 8 / self.transfer_time / 1e6


def _securities(directory: Path, *, secure: bool) -> tuple[Security, Security]:
    """Both nodes' `Security`: throwaway keys (each trusts the other's public key), or insecure plaintext."""
    from vpn_packet.transport.handshake import Security
    from vpn_packet.transport.identity import generate_identity

    if not secure:
        return Security.insecure(A_ID), Security.insecure(B_ID)
    a = generate_identity(A_ID, directory)
    b = generate_identity(B_ID, directory)
    return (
        Security.with_keys(a, {B_ID: b.public_key_bytes}),
        Security.with_keys(b, {A_ID: a.public_key_bytes}),
    )


def _free_ports(n: int) -> list[int]:
    """`n` free TCP ports on 127.0.0.1 (bound to port 0, then released) for nodes that must know each other's
    address before either listens."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class _Direction:
    """One sender -> receiver flow of the demo."""

    name: str
    workload: Workload
    verifier: Verifier
    accepted: int = 0
    generate_time: float = 0.0


async def _send(node: Node, direction: _Direction, report: Callable[[], None]) -> None:
    """Push `direction`'s workload through `node`, keeping at most two chunks in flight (bounded memory, and
    no queue can overflow), then wait until every packet was written to a stream."""
    chunks = direction.workload.chunks()
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        direction.generate_time += time.perf_counter() - t0
        if chunk is None:
            break
        direction.accepted += node.send_batch(chunk)
        if node.dispatcher.metrics().queued > _CHUNK:
            await node.flush()
        else:
            await asyncio.sleep(0)
        report()
    await node.flush()


async def _await_delivery(
    verifiers: list[Verifier], report: Callable[[], None], delivery_timeout: float, stall_timeout: float
) -> None:
    """Wait until every verifier has its target. Gives up when nothing arrives for `stall_timeout` seconds
    (lost packets never will), or after `delivery_timeout`."""
    deadline = time.perf_counter() + delivery_timeout

    def received() -> int:
        return sum(v.received for v in verifiers)

    def complete() -> bool:
        return all(v.done is not None and v.done.is_set() for v in verifiers)

    last, last_change = received(), time.perf_counter()
    while not complete() and time.perf_counter() < deadline:
        report()
        pending = [v.done for v in verifiers if v.done is not None and not v.done.is_set()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await asyncio.gather(*(event.wait() for event in pending))
        now = time.perf_counter()
        if received() != last:
            last, last_change = received(), now
        elif now - last_change > stall_timeout:
            break


async def _quiesce(*nodes: Node) -> None:
    """Wait (at most a second) until no peer connection is open on the nodes' receivers."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            while any(node.receiver.metrics().active_connections for node in nodes):  # noqa: ASYNC110
                await asyncio.sleep(0.005)


async def run_demo(
    packets: int = 200_000,
    destinations: int = 300,
    *,
    secure: bool = True,
    seed: int = 1,
    both_ways: bool = False,
    progress: Callable[[int, int], None] | None = None,
    delivery_timeout: float = 30.0,
    stall_timeout: float = 2.0,
) -> DemoResult:
    """Run the two-node demo: `packets` from A to B (and as many from B to A with `both_ways`), over TLS
    with throwaway keys unless `secure=False` (plaintext, unauthenticated: for comparison).

        `progress(received, total)` is called as packets arrive (optional). After the last packet is written,
        waits for the receivers to take everything in: at most `delivery_timeout` seconds, and no longer than
        `stall_timeout` seconds without any packet arriving.
    """
    from vpn_packet.node.node import Node, node_drops
    from vpn_packet.transport.discovery import Peer

    ab_load = Workload(packets, destinations, seed, A_PREFIXES, B_PREFIXES)
    ab = _Direction("A -> B", ab_load, Verifier(ab_load, A_ID, target=packets, done=asyncio.Event()))
    directions = [ab]
    if both_ways:
        ba_load = Workload(packets, destinations, seed + 1, B_PREFIXES, A_PREFIXES)
        directions.append(
            _Direction("B -> A", ba_load, Verifier(ba_load, B_ID, target=packets, done=asyncio.Event()))
        )
    total = packets * len(directions)
    verifiers = [d.verifier for d in directions]

    def report() -> None:
        if progress is not None:
            progress(sum(v.received for v in verifiers), total)

    buffer = 4 * _CHUNK  # a worker never holds more than two chunks' worth: no queue_full by design
    with tempfile.TemporaryDirectory(prefix="vpn-packet-demo-") as tmp:
        a_security, b_security = _securities(Path(tmp), secure=secure)
        if both_ways:  # each node must know the other's address before either listens
            port_a, port_b = _free_ports(2)
            a_endpoint = f"127.0.0.1:{port_a}"
        else:  # B never dials A; A's entry is there for B's anti-spoofing check of A's sources
            port_a, port_b = 0, 0
            a_endpoint = "127.0.0.1:9"
        a_sink = directions[1].verifier if both_ways else None
        node_b = Node(
            b_security,
            ("127.0.0.1", port_b),
            [Peer(A_ID, a_endpoint, A_PREFIXES)],
            ab.verifier,
            worker_buffer_size=buffer,
            # B starts first, so it must not dial A at start: one way, A's endpoint is a placeholder; both
            # ways, A is not listening yet. Keeping a connection to every peer from the start made B log
            # ECONNREFUSED on every clean run (issue 22); it connects when it has something to send.
            keep_connections=False,
        )
        await node_b.start()
        try:
            node_a = Node(
                a_security,
                ("127.0.0.1", port_a),
                [Peer(B_ID, node_b.endpoint, B_PREFIXES)],
                a_sink,
                worker_buffer_size=buffer,
            )
            await node_a.start()
            try:
                start = time.perf_counter()
                senders = [_send(node_a, ab, report)]
                if both_ways:
                    senders.append(_send(node_b, directions[1], report))
                await asyncio.gather(*senders)
                await _await_delivery(verifiers, report, delivery_timeout, stall_timeout)
                elapsed = time.perf_counter() - start
                report()
                workers = [(w, "") for w in node_a.worker_metrics().values()]
                if both_ways:
                    workers = [(w, "A ") for w, _ in workers]
                    workers += [(w, "B ") for w in node_b.worker_metrics().values()]
                workers.sort(key=lambda item: -item[0].packet_count)
                top = [
                    (tag + w.sync_key, w.packet_count, w.byte_count, w.error_count) for w, tag in workers[:10]
                ]
            finally:
                # Orderly: both stop sending (their streams close), the receivers see every stream end,
                # then the nodes stop.
                await node_a.stop_sending()
                await node_b.stop_sending()
                await _quiesce(node_a, node_b)
                await node_a.stop()
            metrics_a = node_a.metrics()
        finally:
            await node_b.stop()
        metrics_b = node_b.metrics()
    drops: dict[str, int] = {}
    for m in (metrics_a, metrics_b):  # a node that only sends or only receives adds zeros
        for reason, n in node_drops(m.as_dict()).items():
            drops[reason] = drops.get(reason, 0) + n
    return DemoResult(
        packets=total,
        destinations=destinations,
        secure=secure,
        both_ways=both_ways,
        sent_accepted=sum(d.accepted for d in directions),
        received=sum(v.received for v in verifiers),
        received_bytes=sum(v.received_bytes for v in verifiers),
        corrupt=sum(v.corrupt for v in verifiers),
        out_of_order=sum(v.out_of_order for v in verifiers),
        missing=sum(v.missing for v in verifiers),
        wrong_peer=sum(v.wrong_peer for v in verifiers),
        elapsed=elapsed,
        generate_time=sum(d.generate_time for d in directions),
        drops=drops,
        top_workers=top,
        streams_created=metrics_a.pool.created + metrics_b.pool.created,
        sender=metrics_a.as_dict(),
        receiver=metrics_b.as_dict(),
    )
