"""TcpStreamService and TcpStream against a plain asyncio server that reads frames back with `struct`."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vpn_packet.api import Stream, StreamService
from vpn_packet.errors import (
    FramingError,
    NetworkError,
    ServiceError,
    is_connection_reset_error,
    is_network_error,
    is_retriable_error,
    is_temporary_error,
)
from vpn_packet.transport.tcp import TcpStream, TcpStreamService


class Endpoints:
    """A discovery stand-in: peer id -> (host, port)."""

    def __init__(self, **ports: int) -> None:
        self.ports = ports

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[peer_id])


@dataclass
class FakePeer:
    """A server that records the hello and the frames of each connection (a test fake, not the Receiver)."""

    read: bool = True
    hellos: list[bytes] = field(default_factory=list)
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
            head = await reader.readexactly(6)
            self.hellos.append(head + await reader.readexactly(head[5]))
            if not self.read:
                await self.stopping.wait()  # never read again
            while True:
                (n,) = struct.unpack("!I", await reader.readexactly(4))
                self.frames.append(await reader.readexactly(n))
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


@pytest.fixture
async def peer() -> AsyncIterator[FakePeer]:
    fake = FakePeer()
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    yield fake
    await fake.kill()


async def test_hello_then_frames_in_order(peer: FakePeer) -> None:
    service = TcpStreamService(Endpoints(b=peer.port), "node-a")
    assert isinstance(service, StreamService)
    stream = await service.create_stream("b")
    assert isinstance(stream, Stream)
    assert stream.peer_id == "b"
    await stream.write(b"first")
    await stream.write_many([b"\x45" * 40, b"x" * 1400, b"y"])
    await stream.write_many([])
    await peer.wait_frames(4)
    assert peer.hellos == [b"VPNP\x01\x06node-a"]
    assert peer.frames == [b"first", b"\x45" * 40, b"x" * 1400, b"y"]
    assert (stream.packets_sent, stream.writes) == (4, 2)
    assert "TcpStream to b open" in repr(stream)
    assert "plain" in repr(service)
    await stream.close()
    await stream.close()  # idempotent
    assert stream.closed
    assert "closed" in repr(stream)
    with pytest.raises(NetworkError) as info:
        await stream.write(b"late")
    assert info.value.stream_closed


def _wmem_max() -> int:
    try:
        return int(Path("/proc/sys/net/core/wmem_max").read_text())
    except OSError:  # pragma: no cover - not Linux
        return 1 << 20


async def test_socket_options(peer: FakePeer) -> None:
    service = TcpStreamService(Endpoints(b=peer.port), "a", send_buffer=1 << 20)
    stream = await service.create_stream("b")
    sock = stream._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    # Linux caps the request at net.core.wmem_max (without privileges), then doubles it.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= min(1 << 20, _wmem_max())
    await stream.close()


async def test_bad_packet_is_refused_before_writing(peer: FakePeer) -> None:
    stream = await TcpStreamService(Endpoints(b=peer.port), "a").create_stream("b")
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
        service = TcpStreamService(Endpoints(b=port), "a")
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
        await TcpStreamService(Endpoints(), "a").create_stream("nobody")
    assert info.value.service == "peer_discovery"
    assert info.value.peer_id == "nobody"
    assert not is_retriable_error(info.value)


async def test_connect_timeout_is_temporary(peer: FakePeer) -> None:
    """A server that accepts TCP but never answers the TLS handshake: the connect times out."""
    import ssl

    ctx = ssl.create_default_context()
    service = TcpStreamService(Endpoints(b=peer.port), "a", ssl_context=ctx, connect_timeout=0.05)
    with pytest.raises(NetworkError) as info:
        await service.create_stream("b")
    assert is_temporary_error(info.value)
    assert is_retriable_error(info.value)
    assert "timed out" in str(info.value)


async def test_peer_gone_mid_stream_fails_the_next_write(peer: FakePeer) -> None:
    stream = await TcpStreamService(Endpoints(b=peer.port), "a").create_stream("b")
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
    fake = FakePeer(read=False)
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        service = TcpStreamService(
            Endpoints(b=fake.port), "a", write_timeout=0.05, send_buffer=64 * 1024, high_water=64 * 1024
        )
        stream = await service.create_stream("b")
        batch = [bytes(1400)] * 256

        async def fill() -> None:
            for _ in range(10_000):  # the kernel buffers fill up within a few dozen batches
                await stream.write_many(batch)

        with pytest.raises(NetworkError) as info:
            await fill()
        assert is_temporary_error(info.value)
        assert info.value.operation == "write"
        assert stream.closed  # the stuck connection was aborted
    finally:
        await fake.kill()


async def test_concurrent_writers_never_interleave_inside_a_batch(peer: FakePeer) -> None:
    stream: TcpStream = await TcpStreamService(Endpoints(b=peer.port), "a").create_stream("b")

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
        TcpStreamService(Endpoints(), "a", connect_timeout=0)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    fake = FakePeer()
    fake.server = await asyncio.start_server(fake.handle, "::1", 0)
    try:

        class V6:
            def endpoint(self, peer_id: str) -> tuple[str, int]:
                return ("::1", fake.port)

        stream = await TcpStreamService(V6(), "a").create_stream("b")
        await stream.write_many([b"six"])
        await fake.wait_frames(1)
        assert fake.frames == [b"six"]
        await stream.close()
    finally:
        await fake.kill()
