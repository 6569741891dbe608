"""The receiver over real loopback TCP (and TLS): delivery, anti-spoofing, protocol errors, bounds, lifecycle.

A fake sender is `asyncio.open_connection` writing a hello and `encode_frames`. To know the receiver is done
with a connection without sleeping, the sender half-closes and reads until the receiver closes its side.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.packets import ipv4_packet, ipv6_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.framing import encode_frames, encode_hello
from vpn_packet.transport.receiver import Receiver

A_SRC = "10.8.0.2"
B_SRC = "10.8.0.3"


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
    async with Receiver(make_discovery(), collector, max_batch=64, hello_timeout=2.0) as rx:
        yield rx


async def connect(
    rx: Receiver, hello: bytes | None, ssl_ctx: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = rx.address
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None
    )
    if hello is not None:
        writer.write(hello)
    return reader, writer


async def until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, half_close: bool
) -> None:
    """Waits until the receiver closes the connection (EOF or reset); `half_close` first signals our end."""
    try:
        if half_close and writer.can_write_eof():
            await writer.drain()
            writer.write_eof()
        assert await reader.read() == b""
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def send_all(rx: Receiver, peer_id: str, packets: list[bytes]) -> None:
    reader, writer = await connect(rx, encode_hello(peer_id) + encode_frames(packets))
    await until_closed(reader, writer, half_close=True)


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
    wire = encode_hello("node-a") + encode_frames(packets)
    reader, writer = await connect(receiver, None)
    for i in range(0, len(wire), 7):  # hello and frames split across many small TCP segments
        writer.write(wire[i : i + 7])
        await writer.drain()
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
        (b"\x00\x00\x00\x00", "zero_length"),
        (b"\xff\xff\xff\xff", "too_large"),
        (b"\x00\x01\x00\x00", "too_large"),
    ],
)
async def test_bad_length_prefix_cuts_the_peer_off(
    receiver: Receiver, collector: Collector, prefix: bytes, reason: str
) -> None:
    first = pkt(A_SRC, 1)
    reader, writer = await connect(
        receiver, encode_hello("node-a") + encode_frames([first]) + prefix + b"\x45" * 100
    )
    # No half-close: the receiver closes on its own, without waiting for the 4 GB it was promised.
    await until_closed(reader, writer, half_close=False)
    assert collector.packets() == [first]
    peer = receiver.peer_metrics()["node-a"]
    assert peer.protocol_errors == {reason: 1}
    assert receiver.metrics().protocol_errors == {reason: 1}
    assert receiver.buffered_bytes() == 0
    assert peer.active_connections == 0


async def test_unknown_peer_and_bad_hello_are_refused(receiver: Receiver, collector: Collector) -> None:
    reader, writer = await connect(receiver, encode_hello("mallory") + encode_frames([pkt(A_SRC)]))
    await until_closed(reader, writer, half_close=False)
    reader, writer = await connect(receiver, b"GET / HTTP/1.1\r\n\r\n")
    await until_closed(reader, writer, half_close=False)
    reader, writer = await connect(receiver, b"VPNP\x01\x05no")
    await until_closed(reader, writer, half_close=True)
    m = receiver.metrics()
    assert (m.unknown_peer, m.connections, m.packets_delivered) == (1, 3, 0)
    assert m.protocol_errors == {"bad_magic": 1, "hello_truncated": 1}
    assert receiver.peer_metrics() == {}
    assert collector.calls == []


async def test_hello_timeout(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, hello_timeout=0.05) as rx:
        reader, writer = await connect(rx, b"VPNP")  # a valid start, then silence
        await until_closed(reader, writer, half_close=False)
        assert rx.metrics().protocol_errors == {"hello_timeout": 1}


async def test_disconnect_mid_frame_is_counted_and_isolated(receiver: Receiver, collector: Collector) -> None:
    b_reader, b_writer = await connect(receiver, encode_hello("node-b") + encode_frames([pkt(B_SRC, 1)]))
    wire = encode_frames([pkt(A_SRC, 1), pkt(A_SRC, 2)])
    a_reader, a_writer = await connect(receiver, encode_hello("node-a") + wire[:-10])
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

    async with Receiver(make_discovery(), sink, max_batch=1) as rx:
        await send_all(rx, "node-a", [pkt(A_SRC, 1), pkt(A_SRC, 2)])
        m = rx.metrics()
    assert seen == [pkt(A_SRC, 2)]
    assert (m.sink_failed, m.packets_delivered) == (1, 1)


async def test_flood_while_the_sink_blocks_stays_bounded() -> None:
    gate = asyncio.Event()
    sink = Collector(gate)
    read_size = 64 * 1024
    async with Receiver(make_discovery(), sink, read_size=read_size, max_batch=1024) as rx:
        # Small kernel buffers on both sides (accepted sockets inherit the listener's), so that TCP pushes
        # back soon; without this, loopback autotuning can absorb megabytes before the sender notices.
        assert rx._server is not None
        rx._server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        reader, writer = await connect(rx, encode_hello("node-a"))
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
        # The receiver's connection stops reading the socket (its stream buffer is full while the sink
        # blocks) and the sender's writes back up above their high-water mark. Both last while the gate is
        # closed: nothing reads the socket, so the flood is stuck for good.
        assert len(rx._readers) == 1
        ((rx_stream, _),) = rx._readers.values()
        rx_transport = rx_stream._transport  # type: ignore[attr-defined]
        await wait_until(
            lambda: not rx_transport.is_reading() and writer.transport.get_write_buffer_size() > 64 * 1024
        )
        assert not flooding.done()
        assert sent < total_chunks
        assert len(sink.calls) == 1  # one read's packets, waiting in the sink
        assert sum(map(len, sink.calls[0][1])) <= read_size
        # Stream buffer (~read_size plus one socket read of at most 256 KiB) + one partial frame.
        assert rx.buffered_bytes() <= read_size + 256 * 1024 + 65535 + 4
        gate.set()
        await asyncio.wait_for(flooding, 10)
        await until_closed(reader, writer, half_close=True)
    assert sink.packets() == chunk_packets * total_chunks
    assert rx.metrics().packets_delivered == 256 * total_chunks


async def test_max_connections(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, max_connections=1) as rx:
        first = await connect(rx, encode_hello("node-a"))
        second = await connect(rx, encode_hello("node-b"))
        await until_closed(*second, half_close=False)
        assert rx.metrics().rejected_connections == 1
        first[1].write(encode_frames([pkt(A_SRC, 1)]))
        await until_closed(*first, half_close=True)
    assert collector.packets() == [pkt(A_SRC, 1)]


async def test_max_connections_per_peer(collector: Collector) -> None:
    async with Receiver(make_discovery(), collector, max_connections_per_peer=2) as rx:
        held = [await connect(rx, encode_hello("node-a") + encode_frames([pkt(A_SRC, i)])) for i in range(2)]
        await collector.wait_calls(2)  # both are past their hello
        third = await connect(rx, encode_hello("node-a") + encode_frames([pkt(A_SRC, 3)]))
        await until_closed(*third, half_close=False)
        await send_all(rx, "node-b", [pkt(B_SRC, 4)])  # other peers are not affected
        for conn in held:
            await until_closed(*conn, half_close=True)
        peer = rx.peer_metrics()["node-a"]
    assert (peer.connections, peer.rejected_connections, peer.packets_delivered) == (2, 1, 2)
    assert sorted(collector.packets()) == sorted([pkt(A_SRC, 0), pkt(A_SRC, 1), pkt(B_SRC, 4)])


async def test_stop_closes_everything_and_leaves_no_task() -> None:
    gate = asyncio.Event()
    sink = Collector(gate)
    rx = Receiver(make_discovery(), sink)
    with pytest.raises(RuntimeError, match="not started"):
        _ = rx.address
    await rx.start()
    assert rx.running
    busy = await connect(rx, encode_hello("node-a") + encode_frames([pkt(A_SRC, 1)]))  # sink blocked
    idle = await connect(rx, encode_hello("node-b") + encode_frames([pkt(B_SRC, 1)])[:7])  # mid-frame
    silent = await connect(rx, None)  # no hello yet
    await asyncio.wait_for(sink.called.wait(), 5)
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
    with pytest.raises(ValueError, match="max_frame_size"):
        Receiver(discovery, lambda p, b: None, max_frame_size=0)
    with pytest.raises(ValueError, match="at least 1"):
        Receiver(discovery, lambda p, b: None, max_batch=0)
    with pytest.raises(ValueError, match="at least 1"):
        Receiver(discovery, lambda p, b: None, max_connections_per_peer=0)
    with pytest.raises(ValueError, match="CERT_REQUIRED"):
        Receiver(
            discovery, lambda p, b: None, ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        )


# --- TLS ---------------------------------------------------------------------------------------------------


class Pki:
    """A throwaway CA that issues certificates into a directory (ECDSA P-256: fast)."""

    def __init__(self, directory: Path, name: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.hashes, self.ec, self.NameOID = x509, hashes, ec, NameOID
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.validity[0])
            .not_valid_after(self.validity[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self._write(f"{name}.pem", [self.cert])

    def _write(self, filename: str, certs: list[object], key: object = None) -> Path:
        from cryptography.hazmat.primitives import serialization

        path = self.directory / filename
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)  # type: ignore[attr-defined]
        if key is not None:
            data += key.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        path.write_bytes(data)
        return path

    def issue(self, common_name: str, dns: list[str]) -> Path:
        """A PEM file with the certificate and its key."""
        x509 = self.x509
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self.NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.validity[0])
            .not_valid_after(self.validity[1])
        )
        if dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in dns]), critical=False
            )
        cert = builder.sign(self.key, self.hashes.SHA256())
        return self._write(f"{self.name.rfc4514_string()}-{common_name}-{len(dns)}.pem", [cert], key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("cryptography")
    directory = tmp_path_factory.mktemp("pki")
    ca = Pki(directory, "test-ca")
    rogue = Pki(directory, "rogue-ca")
    return {
        "ca": ca.ca_file,
        "server": ca.issue("receiver", ["localhost"]),
        "node-a": ca.issue("whatever", ["node-a"]),  # identity from the subjectAltName
        "node-b-cn": ca.issue("node-b", []),  # no SAN: identity from the commonName
        "node-a-cn-b": ca.issue("node-b", ["node-a"]),  # a SAN: the commonName does not count
        "rogue-node-a": rogue.issue("node-a", ["node-a"]),  # right name, wrong CA
    }


def server_context(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(pki["server"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki: dict[str, Path], cert: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(pki[cert])
    return ctx


async def test_tls_identity_must_match_the_hello(pki: dict[str, Path], collector: Collector) -> None:
    async with Receiver(
        make_discovery(), collector, ssl_context=server_context(pki), hello_timeout=2.0
    ) as rx:
        # SAN matches the hello: accepted.
        hello_a = encode_hello("node-a") + encode_frames([pkt(A_SRC, 1)])
        conn = await connect(rx, hello_a, client_context(pki, "node-a"))
        await collector.wait_calls(1)
        conn[1].close()
        # A CN-only certificate for node-b: accepted as node-b.
        hello_b = encode_hello("node-b") + encode_frames([pkt(B_SRC, 2)])
        conn = await connect(rx, hello_b, client_context(pki, "node-b-cn"))
        await collector.wait_calls(2)
        conn[1].close()
        # node-a's valid certificate, claiming to be node-b: refused.
        conn = await connect(
            rx, encode_hello("node-b") + encode_frames([pkt(B_SRC, 3)]), client_context(pki, "node-a")
        )
        await until_closed(*conn, half_close=False)
        # SAN node-a, CN node-b, claiming node-b: refused (with a SAN the commonName does not count).
        conn = await connect(
            rx, encode_hello("node-b") + encode_frames([pkt(B_SRC, 4)]), client_context(pki, "node-a-cn-b")
        )
        await until_closed(*conn, half_close=False)
        m = rx.metrics()
    assert m.identity_mismatch == 2
    assert collector.packets() == [pkt(A_SRC, 1), pkt(B_SRC, 2)]


async def test_tls_certificate_from_another_ca_is_refused(pki: dict[str, Path], collector: Collector) -> None:
    async with Receiver(
        make_discovery(), collector, ssl_context=server_context(pki), hello_timeout=2.0
    ) as rx:
        try:
            conn = await connect(
                rx,
                encode_hello("node-a") + encode_frames([pkt(A_SRC, 1)]),
                client_context(pki, "rogue-node-a"),
            )
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the handshake (TLS 1.2 style)
        else:
            await until_closed(*conn, half_close=False)  # TLS 1.3: refused right after the client's finish
        # Without a client certificate at all: refused too.
        plain = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        try:
            conn = await connect(rx, encode_hello("node-a") + encode_frames([pkt(A_SRC, 2)]), plain)
        except (ssl.SSLError, ConnectionError):
            pass
        else:
            await until_closed(*conn, half_close=False)
        m = rx.metrics()
    assert collector.calls == []
    assert (m.packets_delivered, m.connections) == (0, 0)


async def test_stop_with_a_connected_peer_logs_no_error(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    """An orderly stop with a peer still connected ends its connection task without an error log line."""
    rx = Receiver(make_discovery(), collector)
    await rx.start()
    _reader, writer = await connect(rx, encode_hello("node-a"))
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
