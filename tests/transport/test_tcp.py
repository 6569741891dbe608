"""TcpStreamService and TcpStream: against a fake peer (a plain asyncio server that speaks the v2 handshake
in plaintext and reads frames back with `struct`) for the stream mechanics, and against the real `Receiver`
over key-mode TLS (the default) for what the handshake proves and refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vpn_packet._native import (
    ANSWER_REASONS,
    MAX_HELLO_LEN,
    encode_ack,
    encode_answer,
    encode_challenge,
    parse_hello,
)
from vpn_packet.api import Stream, StreamService
from vpn_packet.errors import (
    FramingError,
    HandshakeRefusedError,
    NetworkError,
    ServiceError,
    TlsError,
    is_connection_reset_error,
    is_handshake_refused_error,
    is_network_error,
    is_retriable_error,
    is_temporary_error,
)
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security, read_message
from vpn_packet.transport.identity import encode_public_key
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

A = Security.insecure("node-a")


class Endpoints:
    """A discovery stand-in: peer id -> (host, port)."""

    def __init__(self, host: str = "127.0.0.1", **ports: int) -> None:
        self.host = host
        self.ports = ports

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        return (self.host, self.ports[peer_id])


@dataclass
class FakePeer:
    """A plaintext server that speaks the handshake and records the hello and frames of each connection
    (a test fake, not the Receiver).

    `answer`: a reason of `ANSWER_REASONS` ("accepted" or a refusal), "silent" (no challenge, ever),
    "hang" (reads the hello, never answers), "close" (closes after the hello) or "garbage" (answers with
    bytes that are not the protocol). `read=False`: after accepting, never reads again. `ack`: acknowledges
    each frame it reads (as the receiver does per read), else never acknowledges anything.
    """

    answer: str = "accepted"
    read: bool = True
    ack: bool = True
    hellos: list[tuple[str, int, bytes | None, bytes | None]] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None
    got_frame: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            if self.answer == "silent":
                await self.stopping.wait()
                return
            writer.write(encode_challenge(os.urandom(32)))
            hello, _ = await read_message(reader.readexactly, parse_hello, MAX_HELLO_LEN)
            self.hellos.append(hello)
            if self.answer == "hang":
                await self.stopping.wait()
                return
            if self.answer == "close":
                return
            if self.answer == "garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
                await self.stopping.wait()
                return
            code = ANSWER_REASONS.index(self.answer)
            writer.write(encode_answer(code, "fake-b" if code == 0 else f"the fake says {self.answer}"))
            if code != 0:
                return
            if not self.read:
                await self.stopping.wait()  # never read again
            taken = 0
            while True:
                (n,) = struct.unpack("!I", await reader.readexactly(4))
                self.frames.append(await reader.readexactly(n))
                taken += 1
                if self.ack:
                    writer.write(encode_ack(taken))
                self.got_frame.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def wait_frames(self, n: int) -> None:
        async with asyncio.timeout(10):  # a hang guard
            while len(self.frames) < n:
                self.got_frame.clear()
                await self.got_frame.wait()

    async def kill(self) -> None:
        """The peer goes away: listener and connections closed."""
        assert self.server is not None
        self.server.close()
        self.stopping.set()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def start_fake(host: str = "127.0.0.1", **options: object) -> FakePeer:
    fake = FakePeer(**options)  # type: ignore[arg-type]
    fake.server = await asyncio.start_server(fake.handle, host, 0)
    return fake


@pytest.fixture
async def peer() -> AsyncIterator[FakePeer]:
    fake = await start_fake()
    yield fake
    await fake.kill()


async def test_hello_then_frames_in_order(peer: FakePeer) -> None:
    service = TcpStreamService(Endpoints(b=peer.port), A)
    assert isinstance(service, StreamService)
    assert service.local_peer_id == "node-a"
    stream = await service.create_stream("b")
    assert isinstance(stream, Stream)
    assert stream.peer_id == "b"
    first = await stream.write(b"first")
    second = await stream.write_many([b"\x45" * 40, b"x" * 1400, b"y"])
    assert await (await stream.write_many([])) == 0  # nothing written: resolved at once
    await peer.wait_frames(4)
    assert (await first, await second) == (1, 3)  # the peer acknowledged every frame
    assert (stream.acknowledged, stream.in_flight) == (4, 0)
    ((peer_id, epoch, key, signature),) = peer.hellos
    assert (peer_id, key, signature) == ("node-a", None, None)  # insecure: no key, no signature
    assert peer.frames == [b"first", b"\x45" * 40, b"x" * 1400, b"y"]
    assert (stream.packets_sent, stream.writes) == (4, 2)
    assert "TcpStream to b open" in repr(stream)
    assert " tls" not in repr(stream)
    assert "insecure" in repr(service)
    # A later connection carries a larger epoch (the receiver orders a sender's connections by it).
    second = await service.create_stream("b")
    assert peer.hellos[1][1] > epoch
    assert (service.connects, service.connect_failures, service.refusals) == (2, 0, {})
    await second.close()
    await stream.close()
    await stream.close()  # idempotent
    assert stream.closed
    assert "closed" in repr(stream)
    with pytest.raises(NetworkError) as info:
        await stream.write(b"late")
    assert info.value.stream_closed  # closed by us, gracefully: not a reset for want of acks


def _wmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/wmem_max").read_text())
    except OSError:  # pragma: no cover - not Linux
        return 1 << 20


async def test_socket_options(peer: FakePeer) -> None:
    service = TcpStreamService(Endpoints(b=peer.port), A, send_buffer=1 << 20)
    stream = await service.create_stream("b")
    sock = stream.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    # Linux caps the request at net.core.wmem_max (without privileges), then doubles it.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= min(1 << 20, _wmem_max())
    await stream.close()


async def test_bad_packet_is_refused_before_writing(peer: FakePeer) -> None:
    stream = await TcpStreamService(Endpoints(b=peer.port), A).create_stream("b")
    with pytest.raises(FramingError):
        await stream.write_many([b"ok", b""])
    await stream.write(b"after")
    await peer.wait_frames(1)
    assert peer.frames == [b"after"]  # nothing of the refused batch went out
    await stream.close()


async def test_connection_refused_is_a_typed_network_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connecting is refused
        service = TcpStreamService(Endpoints(b=port), A)
        with pytest.raises(NetworkError) as info:
            await service.create_stream("b")
    err = info.value
    assert err.peer_id == "b"
    assert err.operation == "connect"
    assert isinstance(err.cause, ConnectionRefusedError)
    assert is_network_error(err)
    assert service.connect_failures == 1


async def test_unknown_peer_is_a_typed_discovery_error() -> None:
    with pytest.raises(ServiceError) as info:
        await TcpStreamService(Endpoints(), A).create_stream("nobody")
    assert info.value.service == "peer_discovery"
    assert info.value.peer_id == "nobody"
    assert not is_retriable_error(info.value)


async def test_a_server_that_never_starts_the_handshake_times_out(tmp_path: Path) -> None:
    """A server that accepts TCP but says nothing: without TLS no challenge comes, with TLS no ServerHello;
    either way the connect times out, as a temporary error that says what was waited for."""
    silent = await start_fake(answer="silent")
    try:
        plain = TcpStreamService(Endpoints(b=silent.port), A, connect_timeout=0.05)
        with pytest.raises(NetworkError) as info:
            await plain.create_stream("b")
        assert (info.value.operation, is_temporary_error(info.value)) == ("handshake", True)
        assert is_retriable_error(info.value)
        assert "no handshake answer from" in str(info.value)
        assert "does the peer expect TLS?" in str(info.value)  # the hint for an insecure node
        sec = key_securities(tmp_path, "a", "b")["a"]
        tls = TcpStreamService(Endpoints(b=silent.port), sec, connect_timeout=0.05)
        with pytest.raises(NetworkError) as info:
            await tls.create_stream("b")
        assert is_temporary_error(info.value)
        assert "within 0.05s" in str(info.value)
        assert (plain.connect_failures, tls.connect_failures) == (1, 1)
    finally:
        await silent.kill()


async def test_a_server_that_reads_the_hello_and_never_answers_times_out() -> None:
    fake = await start_fake(answer="hang")
    try:
        service = TcpStreamService(Endpoints(b=fake.port), A, connect_timeout=0.05)
        with pytest.raises(NetworkError) as info:
            await service.create_stream("b")
        assert fake.hellos[0][0] == "node-a"  # the hello went out; the answer never came
        assert is_temporary_error(info.value)
        assert not is_handshake_refused_error(info.value)
    finally:
        await fake.kill()


async def test_refusal_is_typed_counted_logged_once_and_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    fake = await start_fake(answer="key_mismatch")
    try:
        service = TcpStreamService(Endpoints(b=fake.port), A)
        with caplog.at_level(logging.WARNING, logger="vpn_packet.transport.tcp"):
            for _ in range(3):
                with pytest.raises(HandshakeRefusedError) as info:
                    await service.create_stream("b")
        err = info.value
        assert (err.peer_id, err.reason, err.local_id) == ("b", "key_mismatch", "node-a")
        assert err.detail == "the fake says key_mismatch"
        assert str(err).startswith("b refused us: our key is not the one it has for node-a")
        assert is_handshake_refused_error(err)
        assert not is_retriable_error(err)  # a wrong key stays wrong: the breaker, not a retry loop
        assert (service.connects, service.connect_failures, service.refusals) == (0, 3, {"key_mismatch": 3})
        assert "refusals=3" in repr(service)
        lines = [r.getMessage() for r in caplog.records if r.name == "vpn_packet.transport.tcp"]
        assert lines == [str(err)]  # one line while the peer's reason stays the same
        assert caplog.records[0].levelno == logging.WARNING
        assert fake.frames == []
    finally:
        await fake.kill()


async def test_a_passing_refusal_is_retriable() -> None:
    fake = await start_fake(answer="too_many_connections")
    try:
        with pytest.raises(HandshakeRefusedError) as info:
            await TcpStreamService(Endpoints(b=fake.port), A).create_stream("b")
        assert info.value.reason == "too_many_connections"
        assert is_retriable_error(info.value)
    finally:
        await fake.kill()


async def test_a_server_closing_inside_the_handshake_is_a_reset() -> None:
    fake = await start_fake(answer="close")
    try:
        with pytest.raises(NetworkError) as info:
            await TcpStreamService(Endpoints(b=fake.port), A).create_stream("b")
        err = info.value
        assert err.operation == "handshake"
        assert isinstance(err.cause, ConnectionResetError)
        assert "closed the connection during the handshake" in str(err)
        assert is_connection_reset_error(err)
        assert is_retriable_error(err)
    finally:
        await fake.kill()


async def test_a_server_that_is_not_a_vpn_packet_node_is_a_framing_error() -> None:
    fake = await start_fake(answer="garbage")
    try:
        with pytest.raises(NetworkError) as info:
            await TcpStreamService(Endpoints(b=fake.port), A).create_stream("b")
        assert isinstance(info.value.cause, FramingError)
        assert info.value.cause.reason == "bad_magic"
        assert info.value.operation == "handshake"
    finally:
        await fake.kill()


async def test_peer_gone_mid_stream_fails_the_next_write(peer: FakePeer) -> None:
    stream = await TcpStreamService(Endpoints(b=peer.port), A).create_stream("b")
    await stream.write_many([b"one", b"two"])
    await peer.wait_frames(2)
    await peer.kill()
    async with asyncio.timeout(5):  # a safety net, not a threshold
        await stream.wait_closed()
    assert stream.closed
    with pytest.raises(NetworkError) as info:
        await stream.write_many([b"three"])
    err = info.value
    assert err.peer_id == "b"
    assert is_connection_reset_error(err) or err.stream_closed
    assert is_retriable_error(err)  # the resilience layer retries it on a fresh stream


async def test_peer_that_stops_reading_fails_the_write_instead_of_hanging() -> None:
    fake = await start_fake(read=False)
    try:
        service = TcpStreamService(
            Endpoints(b=fake.port), A, write_timeout=0.05, send_buffer=64 * 1024, high_water=64 * 1024
        )
        stream = await service.create_stream("b")
        batch = [bytes(1400)] * 256
        receipts = []

        async def fill() -> None:
            for _ in range(10_000):  # the kernel buffers fill up within a few dozen batches
                receipts.append(await stream.write_many(batch))

        with pytest.raises(NetworkError) as info:
            await fill()
        # A write that went out is never failed (its receipt says what the peer took); the stuck connection
        # was reset after write_timeout, and the next write fails, naming why.
        assert is_temporary_error(info.value)
        assert info.value.operation == "write_many"
        assert isinstance(info.value.cause, TimeoutError)
        assert "did not read for 0.05s" in str(info.value.cause)
        assert stream.closed
        await stream.wait_closed()  # the connection is gone: every receipt resolved
        assert receipts
        assert [r.result() for r in receipts] == [0] * len(receipts)  # nothing acknowledged: all lost
        assert stream.in_flight == 0
    finally:
        await fake.kill()


async def test_output_drained_by_the_ack_read_wakes_the_writer() -> None:
    """Bulk writes to a live `Receiver` whose socket takes less than the in-flight window: the session's
    output passes high_water (the write waits for it to drain), and the ack read's pump, which also writes
    the output, often drains it whole. That must wake the waiting writer: it used to be woken only by a
    writability callback, which never came once the output was gone, so a healthy connection waited out
    write_timeout and was reset, its packets counted lost (found by benches/ack_cost.py with a 32 MiB
    window; with the default window on a host whose `net.core.wmem_max` is Linux's default, 212992)."""
    delivered = 0

    def sink(peer_id: str, packets: list[bytes]) -> None:
        nonlocal delivered
        delivered += len(packets)

    security = Security.insecure("node-b")
    async with Receiver(discovery(), sink, security=security, host="127.0.0.1", port=0) as rx:
        # SO_SNDBUF as the kernel grants it under the default wmem_max; the default window (4 MiB).
        service = TcpStreamService(node_b_at(rx.address[1]), A, send_buffer=212_992, write_timeout=5.0)
        stream = await service.create_stream("node-b")
        batch = [ipv4_packet(A_SRC, "10.8.0.3", UDP, 1, 2, bytes(1372))] * 1024
        receipts = [await stream.write_many(batch) for _ in range(60)]
        async with asyncio.timeout(30):  # a hang guard
            taken = await asyncio.gather(*receipts)
        assert not stream.closed
        assert taken == [len(batch)] * len(receipts)
        assert delivered == len(batch) * len(receipts)
        assert service.stats("node-b").lost_in_flight == 0
        await stream.close()


async def test_any_call_that_finds_the_output_drained_wakes_the_writers(peer: FakePeer) -> None:
    """The same rule on the link alone, without timing: output above high_water pauses the writers; a call
    that reports it drained (as `_readable` does after a pump that wrote everything) wakes them."""
    stream = await TcpStreamService(Endpoints(b=peer.port), A, high_water=64 * 1024).create_stream("b")
    link = stream._link
    link._want_write(64 * 1024 + 1)
    assert link.paused
    waiter = link.drain_waiter()
    link._want_write(0)
    assert not link.paused
    assert waiter.done()
    assert waiter.result() is None
    await stream.close()


async def test_concurrent_writers_never_interleave_inside_a_batch(peer: FakePeer) -> None:
    stream: TcpStream = await TcpStreamService(Endpoints(b=peer.port), A).create_stream("b")

    async def writer(tag: int) -> None:
        for i in range(50):
            await stream.write_many([bytes([tag, i, k]) for k in range(20)])

    await asyncio.gather(*(writer(t) for t in range(4)))
    await peer.wait_frames(4 * 50 * 20)
    # Each batch arrives contiguous; each writer's batches in order.
    batches = [peer.frames[i : i + 20] for i in range(0, len(peer.frames), 20)]
    seen: dict[int, list[int]] = {}
    for batch in batches:
        tag, i = batch[0][0], batch[0][1]
        assert batch == [bytes([tag, i, k]) for k in range(20)]
        seen.setdefault(tag, []).append(i)
    assert all(v == list(range(50)) for v in seen.values())
    await stream.close()


def test_validation() -> None:
    with pytest.raises(ValueError, match="connect_timeout"):
        TcpStreamService(Endpoints(), A, connect_timeout=0)
    with pytest.raises(ValueError, match="write_timeout"):
        TcpStreamService(Endpoints(), A, write_timeout=0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    fake = await start_fake("::1")
    try:
        stream = await TcpStreamService(Endpoints("::1", b=fake.port), A).create_stream("b")
        await stream.write_many([b"six"])
        await fake.wait_frames(1)
        assert fake.frames == [b"six"]
        await stream.close()
    finally:
        await fake.kill()


# --- key mode (the default) against the real receiver ------------------------------------------------------

A_SRC = "10.8.0.2"


def discovery() -> StaticPeerDiscovery:
    return StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:9", [f"{A_SRC}/32"]), Peer("node-b", "127.0.0.1:9", ["10.8.0.3/32"])]
    )


class Delivered:
    def __init__(self) -> None:
        self.packets: list[tuple[str, bytes]] = []
        self._changed = asyncio.Condition()

    async def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        async with self._changed:
            self.packets += [(peer_id, p) for p in packets]
            self._changed.notify_all()

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(10), self._changed:  # a hang guard
            await self._changed.wait_for(lambda: len(self.packets) >= n)


def node_b_at(port: int) -> Endpoints:
    endpoints = Endpoints()
    endpoints.ports["node-b"] = port
    return endpoints


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-a", "node-b", "node-x")


async def test_key_mode_stream_is_encrypted_and_delivered(keys: dict[str, Security]) -> None:
    sink = Delivered()
    async with Receiver(discovery(), sink, security=keys["node-b"]) as rx:
        service = TcpStreamService(node_b_at(rx.address[1]), keys["node-a"])
        stream = await service.create_stream("node-b")
        assert stream.tls  # TLS 1.3 on the native core (rustls offers no other version)
        assert stream.key_exchange_group == "X25519MLKEM768"
        assert " tls " in repr(stream)
        assert "key" in repr(service)
        packets = [ipv4_packet(A_SRC, "10.8.0.3", UDP, 1000, i, bytes(100)) for i in range(500)]
        for start in range(0, 500, 50):
            await stream.write_many(packets[start : start + 50])
        await sink.wait(500)
        await stream.close()
        assert sink.packets == [("node-a", p) for p in packets]
        assert rx.metrics().refused == {}


async def test_key_mode_refuses_a_server_with_another_key(keys: dict[str, Security], tmp_path: Path) -> None:
    """The server presents node-x's key where node-b's is configured: refused in TLS, before any hello."""
    sink = Delivered()
    async with Receiver(discovery(), sink, security=keys["node-x"]) as rx:
        service = TcpStreamService(node_b_at(rx.address[1]), keys["node-a"])
        with pytest.raises(NetworkError) as info:
            await service.create_stream("node-b")
        err = info.value
        assert isinstance(err.cause, TlsError)
        assert err.cause.reason == "key_mismatch"
        assert err.operation == "handshake"
        assert encode_public_key(keys["node-x"].identity.public_key_bytes) in str(err)  # type: ignore[union-attr]
        assert encode_public_key(keys["node-a"].peer_keys["node-b"]) in str(err)
        assert is_network_error(err)
        assert not is_retriable_error(err)
        assert rx.metrics().packets_delivered == 0


async def test_key_mode_without_a_configured_key_fails_closed(keys: dict[str, Security]) -> None:
    async with Receiver(discovery(), Delivered(), security=keys["node-b"]) as rx:
        only_x = Security.with_keys(keys["node-a"].identity, {"node-x": keys["node-a"].peer_keys["node-x"]})  # type: ignore[arg-type]
        service = TcpStreamService(node_b_at(rx.address[1]), only_x)
        with pytest.raises(NetworkError, match="no public_key is configured for peer 'node-b'"):
            await service.create_stream("node-b")


async def test_a_key_the_receiver_does_not_have_is_refused_on_both_sides(
    keys: dict[str, Security], tmp_path: Path
) -> None:
    """node-a's key is not the one node-b has for node-a: both sides say so, with the reason, and count it."""
    impostor = key_securities(tmp_path / "other", "node-a")["node-a"]
    # The impostor trusts node-b's real key (it checks the server like any client would).
    impostor = Security.with_keys(impostor.identity, {"node-b": keys["node-a"].peer_keys["node-b"]})  # type: ignore[arg-type]
    sink = Delivered()
    async with Receiver(discovery(), sink, security=keys["node-b"]) as rx:
        service = TcpStreamService(node_b_at(rx.address[1]), impostor)
        with pytest.raises(HandshakeRefusedError) as info:
            await service.create_stream("node-b")
        assert info.value.reason == "key_mismatch"
        assert service.refusals == {"key_mismatch": 1}
        assert rx.metrics().refused == {"key_mismatch": 1}
        assert rx.peer_metrics() == {}
        assert sink.packets == []
