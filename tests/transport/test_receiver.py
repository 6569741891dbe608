"""The receiver over real loopback TCP (and key-mode TLS): delivery, anti-spoofing, protocol errors, the
handshake's refusals and failures, pending and connection limits, idle connections, bounds, lifecycle.

Tests that are not about authentication run the receiver insecure (`Security.insecure`): a fake sender is
`asyncio.open_connection` doing the plaintext handshake by hand (read the challenge, send a hello, read the
answer) and writing `encode_frames`. The key-mode tests at the end use the real client handshake over TLS.
To know the receiver is done with a connection without sleeping, the sender half-closes and reads until the
receiver closes its side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpn_packet._native import (
    ACK_LEN,
    ANSWER_REASONS,
    CHALLENGE_LEN,
    MAX_ANSWER_LEN,
    AckDecoder,
    encode_hello,
    parse_answer,
    parse_challenge,
)
from vpn_packet.errors import HandshakeRefusedError
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import ipv4_packet, ipv6_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import (
    Security,
    client_handshake,
    new_epoch,
    read_message,
    server_public_key,
)
from vpn_packet.transport.receiver import Receiver, TunTarget

A_SRC = "10.8.0.2"
B_SRC = "10.8.0.3"
INSECURE = Security.insecure("node-r")


def pkt(src: str, seq: int = 0, size: int = 0) -> bytes:
    payload = seq.to_bytes(4, "big") + bytes(max(0, size - 32))
    if ":" in src:
        return ipv6_packet(src, "fd00::1", src_port=seq & 0xFFFF, dst_port=7, payload=payload)
    return ipv4_packet(src, "10.8.0.1", src_port=seq & 0xFFFF, dst_port=7, payload=payload)


def make_discovery() -> StaticPeerDiscovery:
    return StaticPeerDiscovery(
        [
            Peer("node-a", "127.0.0.1:7001", [f"{A_SRC}/32", "fd00::2/128"]),
            Peer("node-b", "127.0.0.1:7002", [f"{B_SRC}/32", "10.8.0.0/24"]),
        ]
    )


class Collector:
    """A sink recording `(peer_id, packets)` calls; optionally blocked until `gate` is set."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []
        self.gate = gate
        self.called = asyncio.Event()
        self._changed = asyncio.Condition()

    async def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        self.calls.append((peer_id, list(packets)))
        self.called.set()
        async with self._changed:
            self._changed.notify_all()
        if self.gate is not None:
            await self.gate.wait()

    async def wait_calls(self, n: int) -> None:
        """Until the sink has been called `n` times (for TLS, where the sender cannot half-close)."""
        async with asyncio.timeout(10), self._changed:  # the timeout is a hang guard
            await self._changed.wait_for(lambda: len(self.calls) >= n)

    def packets(self, peer_id: str | None = None) -> list[bytes]:
        return [p for who, batch in self.calls if peer_id in (None, who) for p in batch]


@pytest.fixture
async def collector() -> Collector:
    return Collector()


@pytest.fixture
async def receiver(collector: Collector) -> AsyncIterator[Receiver]:
    async with Receiver(
        make_discovery(), collector, security=INSECURE, max_batch=64, hello_timeout=5.0
    ) as rx:
        yield rx


async def connect(
    rx: Receiver, ssl_ctx: ssl.SSLContext | None = None, *, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = rx.address
    async with asyncio.timeout(10):  # a hang guard
        return await asyncio.open_connection(
            host, port, ssl=ssl_ctx, local_addr=(source, 0) if source else None
        )


async def challenge(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):  # a hang guard
        nonce, _ = await read_message(reader.readexactly, parse_challenge, CHALLENGE_LEN)
    assert isinstance(nonce, bytes)
    return nonce


async def answer(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The receiver's answer: `(reason, text)`."""
    async with asyncio.timeout(10):  # a hang guard
        (code, text), _ = await read_message(reader.readexactly, parse_answer, MAX_ANSWER_LEN)
    return ANSWER_REASONS[code], text


async def hello(
    rx: Receiver, peer_id: str, frames: bytes = b"", *, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, str]:
    """Connects, does the plaintext handshake as `peer_id` and, when accepted, writes `frames`."""
    reader, writer = await connect(rx, source=source)
    await challenge(reader)
    writer.write(encode_hello(peer_id, new_epoch()))
    reason, text = await answer(reader)
    if reason == "accepted":
        writer.write(frames)
    return reader, writer, reason, text


async def open_as(
    rx: Receiver, peer_id: str, frames: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer, reason, text = await hello(rx, peer_id, frames)
    assert (reason, text) == ("accepted", rx.security.local_id)
    return reader, writer


async def until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, half_close: bool
) -> bytes:
    """Waits until the receiver closes the connection (EOF or reset); `half_close` first signals our end.
    Returns what the receiver still sent (ack records only, after the handshake)."""
    rest = b""
    try:
        if half_close and writer.can_write_eof():
            await writer.drain()
            writer.write_eof()
        async with asyncio.timeout(10):  # a hang guard
            rest = await reader.read()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
    return rest


def acks(data: bytes) -> list[int]:
    """The counts of the ack records in `data` (what a receiver sends after its answer), in order; fails
    on anything that is not whole ack records."""
    assert len(data) % ACK_LEN == 0, data
    decoder = AckDecoder()
    return [decoder.feed(data[i : i + ACK_LEN]) for i in range(0, len(data), ACK_LEN)]


async def send_all(rx: Receiver, peer_id: str, packets: list[bytes]) -> None:
    """Sends `packets` on a new connection of `peer_id` and waits until the receiver closed it; the
    receiver acknowledged every frame it took (delivered or dropped and counted), and nothing else."""
    reader, writer = await open_as(rx, peer_id, encode_frames(packets))
    counts = acks(await until_closed(reader, writer, half_close=True))
    assert counts == sorted(counts)  # cumulative: never decreasing
    assert counts[-1:] == [len(packets)]


async def test_delivers_in_order_in_bounded_batches(receiver: Receiver, collector: Collector) -> None:
    packets = [pkt(A_SRC, i, size=64 + i % 1400) for i in range(1000)] + [pkt("fd00::2", 1000)]
    await send_all(receiver, "node-a", packets)
    assert collector.packets("node-a") == packets
    assert all(1 <= len(batch) <= 64 for _, batch in collector.calls)
    m = receiver.metrics()
    assert (m.connections, m.frames, m.packets_delivered, m.dropped) == (1, 1001, 1001, 0)
    assert m.bytes == sum(map(len, packets))
    assert m.batches_delivered == len(collector.calls)
    peer = receiver.peer_metrics()["node-a"]
    assert (peer.connections, peer.active_connections, peer.packets_delivered) == (1, 0, 1001)
    assert m.protocol_errors == {}
    assert "delivered=1001" in repr(receiver)


async def test_any_read_boundaries(receiver: Receiver, collector: Collector) -> None:
    packets = [pkt(A_SRC, 1), pkt("fd00::2", 2), pkt(A_SRC, 3)]
    reader, writer = await connect(receiver)
    await challenge(reader)
    wire = encode_hello("node-a", new_epoch()) + encode_frames(packets)
    for i in range(0, len(wire), 7):  # hello and frames split across many small TCP segments
        writer.write(wire[i : i + 7])
        await writer.drain()
    assert await answer(reader) == ("accepted", "node-r")
    await until_closed(reader, writer, half_close=True)
    assert collector.packets() == packets
    assert receiver.metrics().protocol_errors == {}


async def test_spoofed_and_unparsable_sources_are_dropped_and_counted(
    receiver: Receiver, collector: Collector
) -> None:
    own = [pkt(A_SRC, 1), pkt("fd00::2", 2), pkt(A_SRC, 3)]
    spoofed = [pkt(B_SRC, 9), pkt("192.0.2.7", 9), pkt("fd00::3", 9)]  # another peer's, nobody's
    garbage = [b"\x45" + bytes(10), b"\x00" * 40]
    await send_all(
        receiver,
        "node-a",
        [own[0], spoofed[0], garbage[0], own[1], spoofed[1], spoofed[2], own[2], garbage[1]],
    )
    assert collector.packets() == own
    peer = receiver.peer_metrics()["node-a"]
    assert (peer.frames, peer.packets_delivered, peer.spoofed_dropped, peer.unparsable_dropped) == (
        8,
        3,
        3,
        2,
    )
    totals = receiver.metrics()
    assert (totals.spoofed_dropped, totals.unparsable_dropped, totals.dropped) == (3, 2, 5)
    # node-b owns 10.8.0.0/24, but 10.8.0.2/32 is node-a's (longest match): node-b may not send from it.
    await send_all(receiver, "node-b", [pkt(A_SRC, 1), pkt("10.8.0.77", 2)])
    assert collector.packets("node-b") == [pkt("10.8.0.77", 2)]
    assert receiver.peer_metrics()["node-b"].spoofed_dropped == 1


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"\x80\x00\x00\x05", "short_offload"),  # an offload frame too short for its virtio header
        (b"\xff\xff\xff\xff", "too_large"),
        (b"\x00\x01\x00\x00", "too_large"),
    ],
)
async def test_bad_length_prefix_cuts_the_peer_off(
    receiver: Receiver, collector: Collector, prefix: bytes, reason: str
) -> None:
    first = pkt(A_SRC, 1)
    reader, writer = await open_as(receiver, "node-a", encode_frames([first]) + prefix + b"\x45" * 100)
    # No half-close: the receiver closes on its own, without waiting for the 4 GB it was promised.
    await until_closed(reader, writer, half_close=False)
    assert collector.packets() == [first]
    peer = receiver.peer_metrics()["node-a"]
    assert peer.protocol_errors == {reason: 1}
    assert receiver.metrics().protocol_errors == {reason: 1}
    assert receiver.buffered_bytes() == 0
    assert peer.active_connections == 0


async def test_an_unknown_peer_is_refused_with_an_answer(
    receiver: Receiver, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="vpn_packet.transport.receiver"):
        for _ in range(2):
            reader, writer, reason, text = await hello(receiver, "mallory", encode_frames([pkt(A_SRC)]))
            assert reason == "unknown_peer"
            assert "mallory" in text
            assert await until_closed(reader, writer, half_close=False) == b""
    m = receiver.metrics()
    assert (m.refused, m.handshake_failures, m.connections, m.packets_delivered) == (
        {"unknown_peer": 2},
        {},
        2,
        0,
    )
    assert (m.pending, m.active_connections) == (0, 0)
    assert receiver.peer_metrics() == {}
    assert collector.calls == []
    # One WARNING line per reason and address per interval, naming both.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1
    assert "unknown_peer" in lines[0]
    assert "127.0.0.1" in lines[0]
    assert "mallory" in lines[0]
    assert "refused=2" in repr(receiver)


@pytest.mark.parametrize(
    ("data", "reason", "answered"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad_magic", None),  # not a vpn-packet node: no answer
        # A TLS client: the start of its ClientHello record.
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), "tls_expected_plaintext", None),
        # A v1 node (its hello, then frames at once): told why.
        (b"VPNP\x01\x06node-a" + encode_frames([pkt(A_SRC)]), "unsupported_version", "unsupported_version"),
        # A v2 node: frames of version 3 (keepalives, offload frames) would be errors to it; told why.
        (b"VPNP\x02H" + bytes(8) + b"\x01a\x05" + bytes(5), "unsupported_version", "unsupported_version"),
        (b"VPNP\x03H" + bytes(8) + b"\x01a\x05" + bytes(5), "bad_field_length", "bad_hello"),
    ],
)
async def test_a_bad_hello_is_counted_by_reason(
    receiver: Receiver, collector: Collector, data: bytes, reason: str, answered: str | None
) -> None:
    reader, writer = await connect(receiver)
    await challenge(reader)
    writer.write(data)
    rest = await until_closed(reader, writer, half_close=False)
    if answered is None:
        assert rest == b""
    else:
        parsed, _ = parse_answer(rest)
        assert parsed is not None
        assert ANSWER_REASONS[parsed[0]] == answered
    m = receiver.metrics()
    assert (m.handshake_failures, m.refused, m.pending, m.packets_delivered) == ({reason: 1}, {}, 0, 0)
    assert collector.calls == []


async def test_a_connection_closed_inside_the_hello_is_counted(receiver: Receiver) -> None:
    reader, writer = await connect(receiver)
    await challenge(reader)
    writer.write(encode_hello("node-a", 1)[:9])
    await until_closed(reader, writer, half_close=True)
    assert receiver.metrics().handshake_failures == {"closed_early": 1}


async def test_hello_timeout(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, security=INSECURE, hello_timeout=0.05) as rx:
        reader, writer = await connect(rx)
        await challenge(reader)
        writer.write(b"VPNP")  # a valid start, then silence
        await until_closed(reader, writer, half_close=False)
        m = rx.metrics()
    assert (m.handshake_failures, m.pending) == ({"timeout": 1}, 0)


async def test_an_authenticated_connection_that_goes_silent_is_closed(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, security=INSECURE, idle_timeout=0.05) as rx:
        reader, writer = await open_as(rx, "node-a", encode_frames([pkt(A_SRC, 1)]))
        await until_closed(reader, writer, half_close=False)  # we never send again: the receiver closes
        peer = rx.peer_metrics()["node-a"]
        m = rx.metrics()
    assert (peer.idle_closed, peer.active_connections, peer.packets_delivered) == (1, 0, 1)
    assert m.idle_closed == 1
    assert m.protocol_errors == {}


async def test_disconnect_mid_frame_is_counted_and_isolated(receiver: Receiver, collector: Collector) -> None:
    b_reader, b_writer = await open_as(receiver, "node-b", encode_frames([pkt(B_SRC, 1)]))
    wire = encode_frames([pkt(A_SRC, 1), pkt(A_SRC, 2)])
    a_reader, a_writer = await open_as(receiver, "node-a", wire[:-10])
    await until_closed(a_reader, a_writer, half_close=True)
    assert receiver.peer_metrics()["node-a"].protocol_errors == {"truncated": 1}
    assert collector.packets("node-a") == [pkt(A_SRC, 1)]
    # node-b's connection is unaffected.
    b_writer.write(encode_frames([pkt(B_SRC, 2)]))
    await until_closed(b_reader, b_writer, half_close=True)
    assert collector.packets("node-b") == [pkt(B_SRC, 1), pkt(B_SRC, 2)]
    assert receiver.peer_metrics()["node-b"].protocol_errors == {}


async def test_sink_errors_are_counted_and_the_stream_goes_on() -> None:
    seen: list[bytes] = []

    def sink(peer_id: str, packets: list[bytes]) -> None:  # a plain (non-async) sink
        if packets[0] == pkt(A_SRC, 1):
            raise RuntimeError("sink down")
        seen.extend(packets)

    async with Receiver(make_discovery(), sink, security=INSECURE, max_batch=1) as rx:
        await send_all(rx, "node-a", [pkt(A_SRC, 1), pkt(A_SRC, 2)])
        m = rx.metrics()
    assert seen == [pkt(A_SRC, 2)]
    assert (m.sink_raised, m.packets_delivered) == (1, 1)


async def test_flood_while_the_sink_blocks_stays_bounded() -> None:
    gate = asyncio.Event()
    sink = Collector(gate)
    read_size = 64 * 1024
    async with Receiver(make_discovery(), sink, security=INSECURE, read_size=read_size, max_batch=1024) as rx:
        # Small kernel buffers on both sides (accepted sockets inherit the listener's), so that TCP pushes
        # back soon; without this, loopback autotuning can absorb megabytes before the sender notices.
        rx._listeners[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        reader, writer = await open_as(rx, "node-a")
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        chunk_packets = [pkt(A_SRC, i, size=1400) for i in range(256)]
        chunk = encode_frames(chunk_packets)
        total_chunks = 64  # ~23 MB
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(total_chunks):
                writer.write(chunk)
                await writer.drain()
                sent += 1

        flooding = asyncio.create_task(flood())
        await asyncio.wait_for(sink.called.wait(), 5)  # a hang guard
        # The receiver's connection stops reading the socket while the sink holds a read's packets, and the
        # sender's writes back up above their high-water mark. Both last while the gate is closed: nothing
        # reads the socket, so the flood is stuck for good.
        (conn,) = rx._connections.values()
        assert conn.peer_id == "node-a"
        await wait_until(
            lambda: not conn.pump._reading and writer.transport.get_write_buffer_size() > 64 * 1024
        )
        assert not flooding.done()
        assert sent < total_chunks
        assert len(sink.calls) == 1  # one read's packets, waiting in the sink
        assert sum(map(len, sink.calls[0][1])) <= read_size
        # The packets of one read (at most read_size bytes) + one partial frame.
        assert rx.buffered_bytes() <= read_size + 256 * 1024 + 65535 + 4
        gate.set()
        await asyncio.wait_for(flooding, 10)
        await until_closed(reader, writer, half_close=True)
    assert sink.packets() == chunk_packets * total_chunks
    assert rx.metrics().packets_delivered == 256 * total_chunks


async def test_max_connections_refuses_with_an_answer(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, security=INSECURE, max_connections=1) as rx:
        first = await open_as(rx, "node-a")
        reader, writer, reason, _text = await hello(rx, "node-b", encode_frames([pkt(B_SRC, 1)]))
        assert reason == "too_many_connections"
        await until_closed(reader, writer, half_close=False)
        assert rx.metrics().refused == {"too_many_connections": 1}
        first[1].write(encode_frames([pkt(A_SRC, 1)]))
        await until_closed(*first, half_close=True)
    assert collector.packets() == [pkt(A_SRC, 1)]


async def test_a_new_connection_of_a_peer_at_its_limit_supersedes_its_oldest(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, security=INSECURE, max_connections_per_peer=2) as rx:
        held = [await open_as(rx, "node-a", encode_frames([pkt(A_SRC, i)])) for i in range(2)]
        await collector.wait_calls(2)  # both are past their hello
        third = await open_as(rx, "node-a", encode_frames([pkt(A_SRC, 3)]))
        await until_closed(*held[0], half_close=False)  # the oldest was closed to make room
        await collector.wait_calls(3)
        await send_all(rx, "node-b", [pkt(B_SRC, 4)])  # other peers are not affected
        for conn in (held[1], third):
            await until_closed(*conn, half_close=True)
        peer = rx.peer_metrics()["node-a"]
        m = rx.metrics()
    assert (peer.connections, peer.superseded, peer.packets_delivered, peer.active_connections) == (
        3,
        1,
        3,
        0,
    )
    assert (m.superseded, m.refused) == (1, {})
    assert sorted(collector.packets()) == sorted([pkt(A_SRC, 0), pkt(A_SRC, 1), pkt(A_SRC, 3), pkt(B_SRC, 4)])


async def test_a_source_at_its_pending_limit_makes_room_from_its_own_stalest(collector: Collector) -> None:
    async with Receiver(
        make_discovery(), collector, security=INSECURE, max_pending_per_source=2, max_pending=16
    ) as rx:
        silent = [await connect(rx, source="127.0.0.2") for _ in range(2)]
        await wait_until(lambda: rx.metrics().pending == 2)
        elsewhere = await connect(rx, source="127.0.0.3")  # another address: not touched below
        await wait_until(lambda: rx.metrics().pending == 3)
        # A peer on that address (its NAT, its host) is not refused: it displaces that address's stalest
        # pending connection, and gets in.
        reader, writer, reason, _ = await hello(
            rx, "node-a", encode_frames([pkt(A_SRC, 1)]), source="127.0.0.2"
        )
        assert reason == "accepted"
        assert (await until_closed(*silent[0], half_close=False)).startswith(
            b"VPNP"
        )  # challenge, then closed
        await until_closed(reader, writer, half_close=True)
        m = rx.metrics()
        assert (m.rejected_pending, m.evicted_pending, m.packets_delivered) == (0, 1, 1)
        assert m.pending == 2  # silent[1] and elsewhere
        for conn in (silent[1], elsewhere):
            conn[1].close()
    assert collector.packets() == [pkt(A_SRC, 1)]


async def test_a_flood_of_silent_connections_cannot_keep_a_peer_out(collector: Collector) -> None:
    async with Receiver(
        make_discovery(), collector, security=INSECURE, max_pending=4, max_pending_per_source=64
    ) as rx:
        silent = [await connect(rx) for _ in range(4)]
        await wait_until(lambda: rx.metrics().pending == 4)
        await send_all(rx, "node-a", [pkt(A_SRC, 1)])  # evicts the oldest silent one to get a place
        # The oldest got its challenge, then the receiver closed it (a hang here: it was never closed).
        assert (await until_closed(*silent[0], half_close=False)).startswith(b"VPNP")
        m = rx.metrics()
        assert (m.evicted_pending, m.rejected_pending, m.packets_delivered) == (1, 0, 1)
        assert m.pending == 3
        for conn in silent[1:]:
            conn[1].close()
    assert collector.packets() == [pkt(A_SRC, 1)]


async def test_stop_closes_everything_and_leaves_no_task() -> None:
    gate = asyncio.Event()
    sink = Collector(gate)
    rx = Receiver(make_discovery(), sink, security=INSECURE)
    with pytest.raises(RuntimeError, match="not started"):
        _ = rx.address
    await rx.start()
    assert rx.running
    busy = await open_as(rx, "node-a", encode_frames([pkt(A_SRC, 1)]))  # sink blocked
    idle = await open_as(rx, "node-b", encode_frames([pkt(B_SRC, 1)])[:7])  # mid-frame
    silent = await connect(rx)  # no hello yet
    await challenge(silent[0])
    await asyncio.wait_for(sink.called.wait(), 5)
    assert rx.metrics().pending == 1
    await rx.stop(timeout=2.0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not rx.running
    for conn in (busy, idle, silent):
        await until_closed(*conn, half_close=False)
    await rx.stop()  # idempotent
    with pytest.raises(RuntimeError, match="started once"):
        await rx.start()
    with pytest.raises(OSError, match="onnect"):
        await asyncio.open_connection(*rx.address)


def test_constructor_validation() -> None:
    discovery = make_discovery()

    def sink(peer_id: str, packets: list[bytes]) -> None:
        pass

    with pytest.raises(ValueError, match="max_frame_size"):
        Receiver(discovery, sink, security=INSECURE, max_frame_size=0)
    # The rules are the `Tuning` fields' (one source): the message names the setting and its range.
    for name, setting in (
        ("max_batch", "receive_batch"),
        ("max_connections_per_peer", "max_connections_per_peer"),
        ("max_pending", "max_pending"),
        ("max_pending_per_source", "max_pending_per_source"),
        ("read_size", "read_size"),
    ):
        with pytest.raises(ValueError, match=rf"^{setting}: 0 is out of range"):
            Receiver(discovery, sink, security=INSECURE, **{name: 0})  # type: ignore[arg-type]
    for name, setting in (("hello_timeout", "hello_timeout"), ("idle_timeout", "receive_idle_timeout")):
        with pytest.raises(ValueError, match=rf"^{setting}: 0 must be positive"):
            Receiver(discovery, sink, security=INSECURE, **{name: 0})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Receiver(discovery, sink)  # type: ignore[call-arg]  # no default security: a choice, said out loud


async def test_stop_with_a_connected_peer_logs_no_error(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """An orderly stop with a peer still connected ends its connection task without an error log line."""
    rx = Receiver(make_discovery(), collector, security=INSECURE)
    await rx.start()
    _reader, writer = await open_as(rx, "node-a")
    writer.write(encode_frames([ipv4_packet(A_SRC, "10.9.0.1", 17, 1, 2)]))
    async with asyncio.timeout(10):  # a bound for a broken build, not a timing assertion
        await collector.called.wait()
    assert rx.metrics().active_connections == 1
    assert rx.peer_metrics()["node-a"].active_connections == 1
    with caplog.at_level("WARNING"):
        await rx.stop()
        await asyncio.sleep(0)  # one loop iteration: a cancelled connection task would log now
    writer.close()
    assert [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []
    assert rx.metrics().active_connections == 0


# --- key mode (the default): a peer is who its key proves --------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-r", "node-a", "node-b")


async def key_client(rx: Receiver, security: Security) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS with `security`'s client context, then the real client handshake (a signed hello) as
    `security.local_id`. Raises `HandshakeRefusedError` when refused."""
    reader, writer = await connect(rx, security.client_context)
    server_key = server_public_key(writer.get_extra_info("ssl_object"))
    assert server_key == rx.security.identity.public_key_bytes  # type: ignore[union-attr]
    try:
        async with asyncio.timeout(10):  # a hang guard
            await client_handshake(
                security, "node-r", reader.readexactly, writer.write, server_key, new_epoch()
            )
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def test_key_mode_delivers_as_the_peer_the_key_proves(
    keys: dict[str, Security], collector: Collector
) -> None:
    async with Receiver(make_discovery(), collector, security=keys["node-r"]) as rx:
        _reader, writer = await key_client(rx, keys["node-a"])
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.write(encode_frames([pkt(A_SRC, 1), pkt("fd00::2", 2)]))
        await collector.wait_calls(1)
        writer.close()
        # node-b's key, calling itself node-a: the id is a label, the key decides. Its packets are node-b's,
        # so node-a's source addresses are spoofed from it.
        b_as_a = Security.with_keys(
            keys["node-b"].identity,  # type: ignore[arg-type]
            keys["node-b"].peer_keys,
            local_id="node-a",
        )
        _reader, writer = await key_client(rx, b_as_a)
        writer.write(encode_frames([pkt(A_SRC, 3), pkt(B_SRC, 4)]))
        await collector.wait_calls(2)
        writer.close()
        await wait_until(lambda: rx.metrics().active_connections == 0)
        peers = rx.peer_metrics()
    assert collector.calls == [("node-a", [pkt(A_SRC, 1), pkt("fd00::2", 2)]), ("node-b", [pkt(B_SRC, 4)])]
    assert (peers["node-b"].spoofed_dropped, peers["node-a"].spoofed_dropped) == (1, 0)
    assert rx.metrics().refused == {}


async def test_key_mode_refuses_a_claimed_id_without_its_key(
    keys: dict[str, Security], collector: Collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client claiming node-a without node-a's key injects nothing, over TLS with its own key or without."""
    stranger = key_securities(tmp_path / "stranger", "node-a")["node-a"]  # another key, named node-a
    stranger = Security.with_keys(stranger.identity, keys["node-a"].peer_keys)  # type: ignore[arg-type]
    nobody = Security.with_keys(stranger.identity, keys["node-a"].peer_keys, local_id="mallory")  # type: ignore[arg-type]
    async with Receiver(make_discovery(), collector, security=keys["node-r"]) as rx:
        with caplog.at_level(logging.WARNING, logger="vpn_packet.transport.receiver"):
            with pytest.raises(HandshakeRefusedError) as info:
                await key_client(rx, stranger)
            assert info.value.reason == "key_mismatch"
            with pytest.raises(HandshakeRefusedError) as info:
                await key_client(rx, nobody)
            assert info.value.reason == "unknown_peer"
            # TLS, but an unsigned hello (an insecure or CA node): the key is required.
            reader, writer = await connect(rx, keys["node-a"].client_context)
            await challenge(reader)
            writer.write(encode_hello("node-a", new_epoch()) + encode_frames([pkt(A_SRC, 1)]))
            assert (await answer(reader))[0] == "key_required"
            await until_closed(reader, writer, half_close=False)
        m = rx.metrics()
    assert m.refused == {"key_mismatch": 1, "unknown_peer": 1, "key_required": 1}
    assert (m.packets_delivered, m.active_connections, m.pending) == (0, 0, 0)
    assert rx.peer_metrics() == {}
    assert collector.calls == []
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for reason in ("key_mismatch", "unknown_peer", "key_required"):
        assert reason in warned


async def test_key_mode_counts_a_plaintext_client_as_a_failed_tls_handshake(
    keys: dict[str, Security], collector: Collector
) -> None:
    async with Receiver(make_discovery(), collector, security=keys["node-r"]) as rx:
        reader, writer = await connect(rx)
        writer.write(encode_hello("node-a", new_epoch()) + encode_frames([pkt(A_SRC, 1)]))
        rest = await until_closed(reader, writer, half_close=False)
        m = rx.metrics()
    assert not rest.startswith(b"VPNP")  # no challenge in plaintext: TLS comes first
    assert m.handshake_failures == {"tls_failed": 1}
    assert (m.packets_delivered, m.refused) == (0, {})


async def test_key_mode_slots_of_a_peer_are_held_by_its_key_only(
    keys: dict[str, Security], collector: Collector, tmp_path: Path
) -> None:
    """Connections claiming node-a without its key take none of node-a's slots; node-a's own new connection
    at its limit supersedes its oldest."""
    stranger = key_securities(tmp_path / "stranger", "node-a")["node-a"]
    stranger = Security.with_keys(stranger.identity, keys["node-a"].peer_keys)  # type: ignore[arg-type]
    async with Receiver(
        make_discovery(), collector, security=keys["node-r"], max_connections_per_peer=1
    ) as rx:
        for _ in range(3):
            with pytest.raises(HandshakeRefusedError):
                await key_client(rx, stranger)
        first = await key_client(rx, keys["node-a"])
        second = await key_client(rx, keys["node-a"])
        await until_closed(*first, half_close=False)  # superseded by node-a's own new connection
        second[1].write(encode_frames([pkt(A_SRC, 7)]))
        await collector.wait_calls(1)
        second[1].close()
        peer = rx.peer_metrics()["node-a"]
        refused = rx.metrics().refused
    assert (peer.connections, peer.superseded) == (2, 1)
    assert refused == {"key_mismatch": 3}
    assert collector.packets() == [pkt(A_SRC, 7)]


# --- the TUN path: socket bytes straight to the device (one native call per read) ---------------------------


class FakeTunFd:
    """A `SOCK_SEQPACKET` socket pair standing in for a TUN descriptor: each write the native path makes is
    one message, read back whole on the other end (as the kernel takes one packet per write). Our end is
    non-blocking like a TUN's; a thread keeps draining the device end, as the kernel would."""

    def __init__(self) -> None:
        self.ours, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.taken: list[bytes] = []
        self.fatal: list[int] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                message = self.device.recv(70_000)
            except OSError:
                return
            if not message:
                return
            with self._lock:
                self.taken.append(message)

    def packets(self) -> list[bytes]:
        with self._lock:
            return list(self.taken)

    def unplug(self) -> None:
        """The device goes away: from now on writes to our descriptor fail with `EBADF`, as on a TUN whose
        device was deleted (the descriptor number stays taken: a read-only /dev/null is put in its place)."""
        read_only = os.open(os.devnull, os.O_RDONLY)
        os.dup2(read_only, self.ours.fileno())
        os.close(read_only)

    def close(self) -> None:
        self.ours.close()
        with contextlib.suppress(OSError):
            self.device.close()


@pytest.fixture
async def tun_receiver() -> AsyncIterator[tuple[Receiver, FakeTunFd]]:
    tun = FakeTunFd()

    def no_sink(peer_id: str, packets: list[bytes]) -> None:
        raise AssertionError("the TUN path does not call the sink")

    rx = Receiver(make_discovery(), no_sink, security=INSECURE, idle_timeout=30)
    rx.tun_target = TunTarget(tun.ours.fileno(), on_fatal=tun.fatal.append)
    async with rx:
        yield rx, tun
    tun.close()


async def test_tun_path_writes_in_order_drops_spoofed_and_acknowledges_every_frame(
    tun_receiver: tuple[Receiver, FakeTunFd],
) -> None:
    rx, tun = tun_receiver
    own = [pkt(A_SRC, i, size=64 + i) for i in range(300)]
    spoofed, garbage = pkt(B_SRC, 9), b"\x00" * 40
    # The frames follow the hello in the same segment: what the handshake's reader already holds goes first.
    reader, writer = await connect(rx)
    await challenge(reader)
    writer.write(encode_hello("node-a", new_epoch()) + encode_frames([own[0], spoofed, garbage, *own[1:]]))
    assert await answer(reader) == ("accepted", "node-r")
    counts = acks(await until_closed(reader, writer, half_close=True))
    assert counts[-1:] == [302]
    await wait_until(lambda: len(tun.packets()) == len(own))
    assert tun.packets() == own
    peer = rx.peer_metrics()["node-a"]
    assert (peer.frames, peer.packets_delivered, peer.spoofed_dropped, peer.unparsable_dropped) == (
        302,
        300,
        1,
        1,
    )
    assert peer.bytes == sum(map(len, own)) + len(spoofed) + len(garbage)
    assert (peer.dropped, rx.metrics().protocol_errors) == (2, {})
    assert peer.frames == peer.packets_delivered + peer.dropped


async def test_tun_path_framing_errors_and_truncation_cut_the_peer_off(
    tun_receiver: tuple[Receiver, FakeTunFd],
) -> None:
    rx, tun = tun_receiver
    first = pkt(A_SRC, 1)
    reader, writer = await open_as(rx, "node-a", encode_frames([first]) + b"\x7f\xff\xff\xff" + bytes(100))
    await until_closed(reader, writer, half_close=False)
    await wait_until(lambda: len(tun.packets()) == 1)
    assert tun.packets() == [first]
    assert rx.peer_metrics()["node-a"].protocol_errors == {"too_large": 1}
    wire = encode_frames([pkt(A_SRC, 2), pkt(A_SRC, 3)])
    reader, writer = await open_as(rx, "node-a", wire[:-10])
    await until_closed(reader, writer, half_close=True)
    await wait_until(lambda: len(tun.packets()) == 2)
    assert tun.packets() == [first, pkt(A_SRC, 2)]
    assert rx.peer_metrics()["node-a"].protocol_errors == {"too_large": 1, "truncated": 1}


async def test_tun_path_closes_a_silent_connection_and_reports_a_dead_device() -> None:
    tun = FakeTunFd()
    rx = Receiver(make_discovery(), lambda *_: None, security=INSECURE, idle_timeout=0.05)
    rx.tun_target = TunTarget(tun.ours.fileno(), on_fatal=tun.fatal.append)
    async with rx:
        reader, writer = await open_as(rx, "node-a", encode_frames([pkt(A_SRC, 1)]))
        await until_closed(reader, writer, half_close=False)  # we never send again: the receiver closes
        assert rx.peer_metrics()["node-a"].idle_closed == 1
        await wait_until(lambda: len(tun.packets()) == 1)
        assert tun.packets() == [pkt(A_SRC, 1)]
        # The device goes away: the writes fail, are counted, and the node is told once per connection.
        tun.unplug()
        reader, writer = await open_as(rx, "node-a", encode_frames([pkt(A_SRC, 2), pkt(A_SRC, 3)]))
        counts = acks(await until_closed(reader, writer, half_close=True))
    assert counts[-1:] == [2]  # taken (and counted lost): the sender must not resend them
    peer = rx.peer_metrics()["node-a"]
    assert (peer.packets_delivered, peer.tun_dropped) == (1, 2)  # the TUN was gone: not the sink's doing
    assert len(tun.fatal) == 1
    tun.close()


async def test_wait_connected_returns_once_every_peer_has_authenticated(receiver: Receiver) -> None:
    waiting = asyncio.ensure_future(receiver.wait_connected(["node-a", "node-b"], 10))  # 10 s: a hang guard
    a_reader, a_writer = await open_as(receiver, "node-a")
    await asyncio.sleep(0)
    assert not waiting.done()  # node-b has not connected
    b_reader, b_writer = await open_as(receiver, "node-b")
    assert await waiting
    assert await receiver.wait_connected([], 0)
    await until_closed(b_reader, b_writer, half_close=True)
    assert not await receiver.wait_connected(["node-b"], 0)  # gone, and no time to wait for it
    await until_closed(a_reader, a_writer, half_close=True)
