"""Nothing before authentication can exhaust a node, over real sockets and real TLS (key mode).

- A flood of TCP connections that never start TLS stays within `max_silent_pending` (beyond it, or beyond
  `max_silent_pending_per_source` for one address, the oldest silent one is closed; nobody is turned away),
  holds no TLS buffer, and a legitimate peer still connects and delivers meanwhile. (The floods against a
  node in its own process, with the kernel's deferred accept, are `test_flood.py`.)
- A peer's connection slots are held only by that peer's key: a new connection of the peer at its limit
  supersedes its oldest one, and nobody else can take one; an authenticated connection that stays silent
  for `idle_timeout` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vpn_packet import tuning
from vpn_packet.testutil import attackers
from vpn_packet.testutil.fixtures import settle, wait_until
from vpn_packet.testutil.keys import identities, key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.sinks import RecordingSink
from vpn_packet.transport import receiver as receiver_module
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

A_SRC = "10.8.0.2"
B_DST = "10.8.0.1"
KIB = 1024
MIB = 1024 * KIB


def pkt(seq: int = 0) -> bytes:
    return ipv4_packet(A_SRC, B_DST, src_port=seq & 0xFFFF, dst_port=7, payload=seq.to_bytes(4, "big"))


def b_peers() -> StaticPeerDiscovery:
    return StaticPeerDiscovery([Peer("node-a", "127.0.0.1:1", [f"{A_SRC}/32"])])


def to_b(address: tuple[str, int]) -> StaticPeerDiscovery:
    return StaticPeerDiscovery([Peer("node-b", f"{address[0]}:{address[1]}", [f"{B_DST}/32"])])


Sink = RecordingSink


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-a", "node-b")


@pytest.fixture
def sink() -> Sink:
    return Sink()


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def open_files_at_least(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- 4. a flood of connections that never start TLS --------------------------------------------------------

FLOOD = 4000
SOURCES = [f"127.0.0.{i}" for i in range(2, 102)]  # 100 source addresses, 40 connections each
TLS_BUFFER = 256 * KIB  # asyncio's SSLProtocol buffer, allocated when TLS starts on a connection
PER_CONNECTION = 16 * KIB  # Python objects of one connection (socket, transport, task, ...), generously
# What the flood may cost: every connection's own objects; a silent connection never gets a TLS buffer.
# 4000 x 16 KiB = 62.5 MiB. If every connection held a TLS buffer it would be 4000 x 256 KiB = 1000 MiB.
RSS_BOUND = FLOOD * PER_CONNECTION


@pytest.fixture
def no_deferred_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listening socket hands over connections that have sent nothing at once (no `TCP_DEFER_ACCEPT`),
    as the kernel does after the deferral or past its SYN queue: the receiver's own silent tier is tested."""
    monkeypatch.setattr(receiver_module, "_DEFER_ACCEPT", 0)


@pytest.mark.usefixtures("no_deferred_accept")
async def test_4000_silent_connections_stay_bounded_and_a_real_peer_still_gets_through(
    keys: dict[str, Security], sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vpn_packet.transport.receiver")
    assert RSS_BOUND < FLOOD * TLS_BUFFER // 10
    held: list[socket.socket] = []
    with open_files_at_least(2 * FLOOD + 1024):
        async with Receiver(b_peers(), sink, security=keys["node-b"]) as receiver:
            # The defaults are what is under test.
            assert (receiver.max_silent_pending, receiver.max_silent_pending_per_source) == (
                tuning.MAX_SILENT_PENDING,
                tuning.MAX_SILENT_PENDING_PER_SOURCE,
            )
            address = receiver.address
            gc.collect()
            before = rss_bytes()
            peak = before
            most_pending = 0
            try:
                # Source by source, 40 each: beyond the per-address limit each new one displaces that
                # address's oldest silent one, beyond the total limit the oldest of all.
                for n in range(FLOOD):
                    source = SOURCES[n * len(SOURCES) // FLOOD]
                    held.append(await attackers.silent_socket(address, source=source))
                    # The receiver has taken this connection (admitted, displacing another).
                    await wait_until(lambda n=n: receiver.metrics().connections >= n + 1)  # type: ignore[misc]
                    most_pending = max(most_pending, receiver.metrics().pending)
                    if n % 100 == 99:
                        peak = max(peak, rss_bytes())

                m = receiver.metrics()
                assert m.connections == FLOOD
                assert most_pending == receiver.max_silent_pending  # silent: none has a TLS buffer
                assert m.pending == receiver.max_silent_pending
                assert m.rejected_pending == 0  # nobody is refused at accept
                # Every connection is pending, or was displaced, or timed out waiting.
                gave_up = sum(m.handshake_failures.values())
                assert set(m.handshake_failures) <= {"timeout"}
                assert m.pending + m.evicted_pending + gave_up == FLOOD

                # With all 4,000 sockets still open, node-a connects and delivers.
                service = TcpStreamService(to_b(address), keys["node-a"])
                stream = await service.create_stream("node-b")
                try:
                    await stream.write_many([pkt(i) for i in range(100)])
                    await sink.wait(100)
                finally:
                    await stream.close()
                assert {who for who, _ in sink.packets} == {"node-a"}
                assert receiver.peer_metrics()["node-a"].packets_delivered == 100
                peak = max(peak, rss_bytes())
            finally:
                for sock in held:  # with a reset: no TIME_WAIT left on 4,000 local ports
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
        gc.collect()  # what the flood left behind goes now, within this test
    growth = peak - before
    print(f"RSS growth over {FLOOD} silent connections: {growth / MIB:.1f} MiB, bound {RSS_BOUND / MIB:.1f}")
    assert growth <= RSS_BOUND, f"RSS grew {growth / MIB:.1f} MiB, above {RSS_BOUND / MIB:.1f} MiB"
    # Logged, but rate-limited: at most one line per reason of displacing.
    lines = [r for r in caplog.records if r.name == "vpn_packet.transport.receiver"]
    assert 0 < len(lines) <= 2, len(lines)


async def test_an_evicted_pending_connection_ends_quietly_inside_tls(
    keys: dict[str, Security], sink: Sink
) -> None:
    """Displaced inside `start_tls` (a ClientHello begun, never finished): its task ends cleanly."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    partial_client_hello = b"\x16\x03\x01\x02\x00\x01"  # a TLS record header and one byte of 512
    try:
        async with Receiver(b_peers(), sink, security=keys["node-b"], max_pending=1) as receiver:
            first = await attackers.silent_socket(receiver.address)
            await loop.sock_sendall(first, partial_client_hello)
            await wait_until(lambda: receiver._admission.handshaking == 1)
            second = await attackers.silent_socket(receiver.address)
            await loop.sock_sendall(second, partial_client_hello)
            try:
                await wait_until(lambda: receiver.metrics().evicted_pending == 1)
                # The evicted one sees its connection closed; then its task gets a few loop iterations.
                async with asyncio.timeout(10):  # hang guard
                    with contextlib.suppress(ConnectionError):
                        assert await loop.sock_recv(first, 1) == b""
                await settle()
                assert unhandled == []
                assert receiver.metrics().pending == 1
            finally:
                first.close()
                second.close()
    finally:
        loop.set_exception_handler(previous)


# --- 5. a peer's slots belong to its key ------------------------------------------------------------------


@pytest.fixture
async def rx(keys: dict[str, Security], sink: Sink) -> AsyncIterator[Receiver]:
    async with Receiver(b_peers(), sink, security=keys["node-b"], max_connections_per_peer=3) as receiver:
        yield receiver


async def test_a_new_connection_of_a_peer_at_its_limit_supersedes_its_oldest(
    rx: Receiver, sink: Sink, keys: dict[str, Security], tmp_path: Path
) -> None:
    service = TcpStreamService(to_b(rx.address), keys["node-a"])
    limit = rx.max_connections_per_peer
    streams: list[TcpStream] = []
    try:
        for _ in range(limit):  # the peer's own idle connections fill its slots
            streams.append(await service.create_stream("node-b"))
        await wait_until(lambda: rx.metrics().active_connections == limit)

        # Someone without node-a's key: refused, and the slots are untouched.
        mallory = identities(tmp_path, "mallory")["mallory"]
        attempt = await attackers.claim(
            rx.address,
            "node-a",
            tls=attackers.attacker_tls(),
            public_key=mallory.public_key_bytes,
            sign=mallory.sign,
            inject=[pkt(i) for i in range(5)],
        )
        assert attempt.answer is not None
        assert attempt.answer.reason == "key_mismatch"
        silent = [await attackers.silent_socket(rx.address) for _ in range(5)]
        try:
            await wait_until(lambda: rx.metrics().pending == len(silent))
            peer = rx.peer_metrics()["node-a"]
            assert peer.active_connections == limit
            assert peer.superseded == 0

            # node-a's own connection past its limit: accepted, and its oldest is closed.
            streams.append(await service.create_stream("node-b"))
            async with asyncio.timeout(10):  # hang guard
                await streams[0].wait_closed()
            peer = rx.peer_metrics()["node-a"]
            assert peer.superseded == 1
            assert rx.metrics().superseded == 1
            assert peer.active_connections == limit
            assert peer.connections == limit + 1
            assert rx.metrics().refused == {"key_mismatch": 1}
        finally:
            for sock in silent:
                sock.close()

        # Every connection node-a still holds delivers.
        for i, stream in enumerate(streams[1:]):
            await stream.write_many([pkt(i)])
        await sink.wait(limit)
        assert sorted(p for _, p in sink.packets) == sorted(pkt(i) for i in range(limit))
        assert {who for who, _ in sink.packets} == {"node-a"}
    finally:
        for stream in streams:
            await stream.close()


async def test_a_silent_authenticated_connection_is_closed_after_idle_timeout(
    keys: dict[str, Security], sink: Sink
) -> None:
    # idle_timeout is the behaviour under test (a small one so the test is quick), not a duration asserted.
    async with Receiver(b_peers(), sink, security=keys["node-b"], idle_timeout=0.2) as receiver:
        service = TcpStreamService(to_b(receiver.address), keys["node-a"])
        stream = await service.create_stream("node-b")
        try:
            await stream.write_many([pkt(0)])
            await sink.wait(1)
            async with asyncio.timeout(10):  # hang guard: the receiver closes it, we only wait
                await stream.wait_closed()
        finally:
            await stream.close()
        assert receiver.metrics().idle_closed == 1
        peer = receiver.peer_metrics()["node-a"]
        assert peer.idle_closed == 1
        assert peer.active_connections == 0
        assert peer.packets_delivered == 1
