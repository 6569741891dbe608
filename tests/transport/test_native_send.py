"""The sending side on the native core (`SendSession` under `TcpStream`) against a TLS peer that misbehaves.

The peer is the native server connection (`TlsSecurity.server()`) over a real loopback socket, driven by the
test: it completes the handshake, then reads and acknowledges, or stops reading, or writes bytes that are not
TLS records. What a `TcpStream` must do about each: bounded waits with typed errors, receipts that say what
the peer has, `lost_in_flight` for the rest. The happy paths against a real `Receiver` are in test_tcp.py,
test_acks.py and test_tls.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpn_packet._native import Established, SendSession, TlsConnection, TlsSecurity, encode_frames
from vpn_packet.errors import (
    FramingError,
    NetworkError,
    TlsError,
    is_connection_reset_error,
    is_network_error,
)
from vpn_packet.testutil.fakes import LoopbackEndpoint
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.transport.framing import DEFAULT_MAX_FRAME_SIZE
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStreamService

HANG_GUARD = 10.0  # seconds: a hang guard, not an assertion


def pkt(seq: int, size: int = 100) -> bytes:
    return ipv4_packet("10.8.0.2", "10.8.0.1", src_port=seq % 65536, dst_port=7, payload=bytes(size))


class TlsPeer:
    """node-b on the native server connection: answers the handshake, then takes frames and acknowledges
    them, until it has `stop_after` of them: then it reads nothing more, and writes `junk` once the test
    sets it."""

    def __init__(self, security: TlsSecurity) -> None:
        self.security = security
        self.stop_after: int | None = None  # frames after which it stops reading
        # Frames after which it holds its ack until `reset_now` is set, then writes it and resets at once.
        self.reset_after: int | None = None
        self.reset_now = asyncio.Event()
        self.junk: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.frames: list[bytes] = []
        self.keepalives = 0
        self.established = asyncio.Event()
        self.got = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        conn: TlsConnection = self.security.server()
        with sock:
            while True:
                out = b"" if self._holding() else conn.take_output()
                if out:
                    await loop.sock_sendall(sock, out)
                if conn.stage == "established":
                    self.established.set()
                    if self.reset_after is not None and len(self.frames) >= self.reset_after:
                        await self.reset_now.wait()
                        # The ack, then a reset in the same turn of the loop (nothing of ours runs in
                        # between): the client reads both in one readiness event.
                        sock.send(conn.take_output())
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    if self.stop_after is not None and len(self.frames) >= self.stop_after:
                        # Frozen: nothing read, nothing acknowledged; junk written when the test says.
                        await loop.sock_sendall(sock, await self.junk)
                        await asyncio.Event().wait()  # the client resets; the test's end cancels us
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    return
                for event in conn.receive(data):
                    if isinstance(event, Established):
                        self.established.set()
                async with self.got:
                    self.frames += conn.take_frames()
                    self.keepalives = conn.keepalives
                    self.got.notify_all()

    def _holding(self) -> bool:
        return self.reset_after is not None and len(self.frames) >= self.reset_after

    async def wait_for(self, frames: int) -> None:
        async with asyncio.timeout(HANG_GUARD), self.got:
            await self.got.wait_for(lambda: len(self.frames) >= frames)

    async def stop(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)
        self._listener.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    return key_securities(tmp_path, "node-a", "node-b")


@pytest.fixture
async def peer(keys: dict[str, Security]) -> AsyncIterator[TlsPeer]:
    native = keys["node-b"].native_tls(["node-a"], DEFAULT_MAX_FRAME_SIZE)
    assert native is not None
    p = TlsPeer(native)
    await p.start()
    yield p
    await p.stop()


async def test_framed_batches_offload_frames_and_keepalives_arrive_and_are_acknowledged(
    peer: TlsPeer, keys: dict[str, Security]
) -> None:
    service = TcpStreamService(LoopbackEndpoint(peer.port), keys["node-a"])
    stream = await service.create_stream("node-b")
    assert stream.tls
    packets = [pkt(i) for i in range(20)]
    # An offload frame as a dispatcher's queue frames it: bit 31 of the prefix, a virtio_net_hdr (all zero:
    # no segmentation, no checksum to complete), the packet.
    offload_payload = bytes(10) + pkt(99)
    offload = (0x8000_0000 | len(offload_payload)).to_bytes(4, "big") + offload_payload
    receipts = [await stream.write_framed(encode_frames(packets[:10]) + offload, 11)]
    receipts.append(await stream.write_many(packets[10:]))
    async with asyncio.timeout(HANG_GUARD):
        assert await asyncio.gather(*receipts) == [11, 10]
    assert peer.frames == [*packets[:10], offload_payload, *packets[10:]]
    assert service.stats("node-b").tx_packets == 21
    assert stream.send_keepalive(0.0)
    async with asyncio.timeout(HANG_GUARD), peer.got:
        await peer.got.wait_for(lambda: peer.keepalives == 1)
    assert stream.keepalives == 1
    await stream.close()
    assert service.stats("node-b").lost_in_flight == 0


async def test_bytes_that_are_not_whole_frames_are_refused_and_nothing_is_sent(
    peer: TlsPeer, keys: dict[str, Security]
) -> None:
    stream = await TcpStreamService(LoopbackEndpoint(peer.port), keys["node-a"]).create_stream("node-b")
    framed = encode_frames([pkt(1), pkt(2)])
    with pytest.raises(FramingError) as info:
        await stream.write_framed(framed[:-1], 2)
    assert info.value.reason == "truncated"
    with pytest.raises(FramingError) as info:
        await stream.write_framed(framed, 3)
    assert info.value.reason == "miscounted"
    assert (stream.packets_sent, stream.in_flight) == (0, 0)
    receipt = await stream.write_framed(framed, 2)  # the stream is unharmed
    async with asyncio.timeout(HANG_GUARD):
        assert await receipt == 2
    assert peer.frames == [pkt(1), pkt(2)]
    await stream.close()


async def test_a_tls_peer_that_stops_reading_fails_the_write_within_write_timeout(
    peer: TlsPeer, keys: dict[str, Security]
) -> None:
    service = TcpStreamService(
        LoopbackEndpoint(peer.port),
        keys["node-a"],
        write_timeout=0.2,
        window=64 << 20,
        send_buffer=64 * 1024,
        high_water=64 * 1024,
    )
    peer.stop_after = 0  # node-b freezes once established: nothing read, nothing acknowledged
    stream = await service.create_stream("node-b")
    batch = [pkt(i, 1300) for i in range(64)]
    receipts: list[asyncio.Future[int]] = []

    async def write_until_it_fails() -> None:
        while True:  # the socket buffers fill, the session's output passes high_water, the write waits
            receipts.append(await stream.write_many(batch))

    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(NetworkError) as info:
            await write_until_it_fails()
        taken = await asyncio.gather(*receipts)
    assert isinstance(info.value.cause, TimeoutError)
    assert "did not read" in str(info.value)
    assert stream.closed
    stats = service.stats("node-b")
    assert taken == [0] * len(receipts)
    assert stats.tx_packets == 0
    assert stats.lost_in_flight == 64 * len(receipts)
    assert stream not in stats.streams


async def test_acks_read_with_the_peers_reset_still_count(peer: TlsPeer, keys: dict[str, Security]) -> None:
    """A peer acknowledges what it delivered and resets the connection while our output waits for the
    socket: the native call that reads the ack then fails writing. The ack counts: those packets were
    delivered, they are sent, not lost (found by the SIGTERM delivery scenario, where they were lost)."""
    service = TcpStreamService(
        LoopbackEndpoint(peer.port),
        keys["node-a"],
        window=64 << 20,
        send_buffer=16 * 1024,
        high_water=64 << 20,
    )
    peer.reset_after = 2
    stream = await service.create_stream("node-b")
    first = await stream.write_many([pkt(1), pkt(2)])
    await peer.wait_for(2)
    batch = [pkt(i, 1300) for i in range(3, 3 + 2048)]  # more than the two sockets' buffers hold
    second = await stream.write_many(batch)
    assert stream.write_buffer_size() > 0  # output waits in the session: the next pump writes it
    peer.reset_now.set()
    async with asyncio.timeout(HANG_GUARD):
        assert await first == 2
        assert await second == 0
        await stream.wait_closed()
    stats = service.stats("node-b")
    assert (stats.tx_packets, stats.lost_in_flight) == (2, len(batch))


async def test_bytes_from_the_peer_that_are_not_tls_records_reset_the_stream(
    peer: TlsPeer, keys: dict[str, Security]
) -> None:
    """After the handshake a peer sends only acks, inside TLS records: anything else is a broken peer. The
    core fails the connection by reason, the stream resets it and later writes fail; the receipts keep
    what was acknowledged before."""
    service = TcpStreamService(LoopbackEndpoint(peer.port), keys["node-a"])
    peer.stop_after = 2
    stream = await service.create_stream("node-b")
    first = await stream.write_many([pkt(1), pkt(2)])
    async with asyncio.timeout(HANG_GUARD):
        assert await first == 2
    second = await stream.write_many([pkt(3)])
    peer.junk.set_result(b"\x17\x03\x03\x00\x05hello")  # an application-data record that does not decrypt
    async with asyncio.timeout(HANG_GUARD):
        assert await second == 0
        await stream.wait_closed()
    assert stream.closed
    with pytest.raises(NetworkError) as info:
        await stream.write_many([pkt(4)])
    cause = info.value.cause
    assert isinstance(cause, TlsError)
    assert cause.reason == "tls_bad_record"
    stats = service.stats("node-b")
    assert (stats.tx_packets, stats.lost_in_flight) == (2, 1)


async def test_the_session_reports_its_state_to_python(keys: dict[str, Security], peer: TlsPeer) -> None:
    native = keys["node-a"].native_tls((), DEFAULT_MAX_FRAME_SIZE)
    assert native is not None
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", peer.port))
    sock.setblocking(False)
    with sock:
        session = SendSession(native, sock.fileno(), "node-b", 5)
        assert (session.stage, session.peer_id, session.frames, session.acked) == ("tls", None, 0, 0)
        with pytest.raises(ValueError, match="not established"):
            session.send_framed(encode_frames([pkt(1)]), 1)
        assert session.flush() == 0
        events: list[object] = []
        async with asyncio.timeout(HANG_GUARD):
            while not events:
                await wait_readable(loop, sock)
                got, _read, _unsent, _acked = session.pump()
                events += got or []
        [established] = events
        assert isinstance(established, Established)
        assert (established.peer_id, established.epoch) == ("node-b", 5)
        assert session.key_exchange_group == "X25519MLKEM768"
        assert session.send_framed(encode_frames([pkt(1), pkt(2)]), 2) == 0
        async with asyncio.timeout(HANG_GUARD):
            while session.acked < 2:
                await wait_readable(loop, sock)
                session.pump()
        assert (session.frames, session.keepalives) == (2, 0)
        assert "established" in repr(session)


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def test_tls_errors_are_network_errors_that_do_not_retry() -> None:
    err = TlsError("node-b presented key X, but its configured public_key is Y", "key_mismatch")
    assert is_network_error(err)
    assert is_network_error(NetworkError(err, peer_id="node-b", operation="handshake"))
    assert not NetworkError(err, peer_id="node-b", operation="handshake").retriable
    assert str(err).startswith("node-b presented key X")


async def test_the_sending_side_does_not_use_pythons_ssl(peer: TlsPeer, keys: dict[str, Security]) -> None:
    """A `Security` whose Python client context trusts nothing still connects and delivers: the sending side
    dials through the native core (`Security.native_tls`), not through `client_context`."""
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded: it would refuse every server
    security = dataclasses.replace(keys["node-a"], client_context=untrusting)
    stream = await TcpStreamService(LoopbackEndpoint(peer.port), security).create_stream("node-b")
    receipt = await stream.write_many([pkt(1)])
    async with asyncio.timeout(HANG_GUARD):
        assert await receipt == 1
    await stream.close()


async def test_a_session_whose_socket_was_closed_cannot_write_into_another(
    keys: dict[str, Security], peer: TlsPeer
) -> None:
    native = keys["node-a"].native_tls((), DEFAULT_MAX_FRAME_SIZE)
    assert native is not None
    with socket.create_connection(("127.0.0.1", peer.port)) as sock:
        session = SendSession(native, sock.fileno(), "node-b", 1)
        session.forget_socket()
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            session.flush()  # the ClientHello waits: the send fails instead of going anywhere
        assert info.value.errno == errno.EBADF


async def test_a_write_after_the_core_closed_takes_nothing_and_fails_as_a_reset(
    peer: TlsPeer, keys: dict[str, Security]
) -> None:
    """The core's connection can end (a close, a failure) before the stream hears of it: a write then takes
    nothing and raises a retriable reset, so the worker carries the batch on a fresh stream."""
    stream = await TcpStreamService(LoopbackEndpoint(peer.port), keys["node-a"]).create_stream("node-b")
    stream._link._session.close()  # type: ignore[attr-defined]  # the core ends first
    with pytest.raises(NetworkError) as info:
        await stream.write_many([pkt(1)])
    assert is_connection_reset_error(info.value)
    assert (stream.packets_sent, stream.in_flight) == (0, 0)
    stream.abort()
