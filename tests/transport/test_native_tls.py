"""The native TLS connection core (`TlsSecurity`, `TlsConnection`) over real loopback TCP sockets.

Two binding objects talk through a connected socket pair: TLS 1.3 (rustls, X25519MLKEM768), the signed
hello, frames and acks; refusals and failures arrive as named event types. A `Receiver` runs its TLS
connections on this core (`test_native_receive.py`), and so does a `TcpStream` (`test_native_send.py`); the
last tests check the wire both ways against Python's `ssl`, which other implementations may use.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vpn_packet._native import (
    CONNECTION_FAILURE_REASONS,
    KEY_EXCHANGE_GROUPS,
    AckDecoder,
    Closed,
    Established,
    Failed,
    Refused,
    TlsConnection,
    TlsSecurity,
    check_ca_files,
    encode_frames,
)
from vpn_packet.errors import IdentityError
from vpn_packet.testutil.certs import write_test_pki
from vpn_packet.testutil.keys import identities, key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.sinks import RecordingSink
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import client_handshake, server_public_key
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tls import check_server_key

HANG_GUARD = 10.0  # seconds a pump may wait for the other side: a hang guard, not an assertion
Event = Established | Refused | Failed | Closed


def pkt(seq: int) -> bytes:
    return ipv4_packet("10.8.0.2", "10.8.0.1", src_port=seq, dst_port=7, payload=seq.to_bytes(4, "big"))


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


class Side:
    """One connection object and its socket, with everything it reported."""

    def __init__(self, conn: TlsConnection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self.events: list[Event] = []
        self.frames: list[bytes] = []
        self.eof = False

    def flush(self) -> None:
        out = self.conn.take_output()
        if out:
            self.sock.sendall(out)

    def read(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.events += self.conn.receive(data)
        else:
            self.eof = True
            self.events += self.conn.receive_eof()
        self.frames += self.conn.take_frames()


def pump(sides: list[Side], until: Callable[[], bool]) -> None:
    """Writes each side's output and feeds it what its socket reads, until `until()` holds."""
    with selectors.DefaultSelector() as selector:
        for side in sides:
            selector.register(side.sock, selectors.EVENT_READ, side)
        while True:
            for side in sides:
                side.flush()
            if until():
                return
            ready = selector.select(HANG_GUARD)
            assert ready, "neither side said anything"
            for key, _ in ready:
                side = key.data
                assert isinstance(side, Side)
                if side.eof:
                    selector.unregister(side.sock)
                    continue
                side.read()


def key_nodes(tmp_path: Path, *, b_trusts_a: bool = True) -> tuple[TlsSecurity, TlsSecurity]:
    ids: dict[str, NodeIdentity] = identities(tmp_path, "node-a", "node-b", "stranger")
    a = TlsSecurity.with_keys(
        "node-a", ids["node-a"].path.read_bytes(), [("node-b", ids["node-b"].public_key_bytes)]
    )
    trusted = ids["node-a"] if b_trusts_a else ids["stranger"]
    b = TlsSecurity.with_keys(
        "node-b", ids["node-b"].path.read_bytes(), [("node-a", trusted.public_key_bytes)]
    )
    return a, b


def test_handshake_frames_and_acks_over_a_socket_pair(
    tmp_path: Path, sockets: tuple[socket.socket, socket.socket]
) -> None:
    a, b = key_nodes(tmp_path)
    assert (a.mode, a.local_id) == ("key", "node-a")
    client = Side(a.client("node-b", epoch=42), sockets[0])
    server = Side(b.server(), sockets[1])
    pump([client, server], lambda: bool(client.events and server.events))
    [ce] = client.events
    [se] = server.events
    assert isinstance(ce, Established)
    assert isinstance(se, Established)
    assert (ce.peer_id, ce.announced_id, ce.epoch) == ("node-b", "node-b", 42)
    assert (se.peer_id, se.announced_id, se.epoch) == ("node-a", "node-a", 42)
    assert client.conn.key_exchange_group == server.conn.key_exchange_group == KEY_EXCHANGE_GROUPS[0]
    assert KEY_EXCHANGE_GROUPS[0] == "X25519MLKEM768"
    assert client.conn.stage == server.conn.stage == "established"

    packets = [pkt(i) for i in range(5)]
    assert client.conn.send_packets(packets[:3]) == 3
    client.conn.send_keepalive()
    assert client.conn.send_packets(iter([bytearray(p) for p in packets[3:]])) == 2
    assert client.conn.in_flight == 5
    pump([client, server], lambda: client.conn.acked == 5)
    assert server.frames == packets
    assert (server.conn.frames, server.conn.acked, server.conn.keepalives) == (5, 5, 1)
    assert (client.conn.frames, client.conn.in_flight) == (5, 0)

    client.conn.close()
    pump([client, server], lambda: bool(server.events[1:]))
    assert [type(e) for e in server.events] == [Established, Closed]
    with pytest.raises(ValueError, match="closed"):
        client.conn.send_packets([pkt(9)])


def test_a_refusal_arrives_with_its_reason(
    tmp_path: Path, sockets: tuple[socket.socket, socket.socket]
) -> None:
    a, b = key_nodes(tmp_path, b_trusts_a=False)  # b has "node-a" with another key
    client = Side(a.client("node-b", epoch=1), sockets[0])
    server = Side(b.server(), sockets[1])
    pump([client, server], lambda: bool(client.events and server.events))
    [refused] = client.events
    assert isinstance(refused, Refused)
    assert (refused.reason, refused.code) == ("key_mismatch", 2)
    assert "node-a" in refused.text
    assert isinstance(server.events[0], Refused)
    assert client.conn.stage == "closed"
    with pytest.raises(ValueError, match="not a refusal reason"):
        b.server(refuse="accepted")


def test_malformed_bytes_fail_by_reason(tmp_path: Path, sockets: tuple[socket.socket, socket.socket]) -> None:
    _, b = key_nodes(tmp_path)
    server = b.server()
    [failed] = server.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(failed, Failed)
    assert failed.reason == "tls_bad_record"
    assert failed.reason in CONNECTION_FAILURE_REASONS
    assert server.failure is not None
    assert server.failure.reason == "tls_bad_record"
    assert server.take_output(), "a TLS alert is queued for the peer"
    [early] = b.server().receive_eof()
    assert isinstance(early, Failed)
    assert early.reason == "closed_early"


def test_ca_mode_with_the_test_pki(tmp_path: Path, sockets: tuple[socket.socket, socket.socket]) -> None:
    pki = write_test_pki(tmp_path / "pki", ["node-a", "node-b"])
    ca = pki.ca_cert.read_bytes()

    def node(name: str, peer: str) -> TlsSecurity:
        creds = pki.nodes[name]
        assert check_ca_files(creds.cert.read_bytes(), creds.key.read_bytes(), ca) == [name]
        return TlsSecurity.with_ca(name, creds.cert.read_bytes(), creds.key.read_bytes(), ca, [peer])

    a, b = node("node-a", "node-b"), node("node-b", "node-a")
    assert a.mode == "ca"
    client = Side(a.client("node-b", epoch=1), sockets[0])
    server = Side(b.server(), sockets[1])
    pump([client, server], lambda: bool(client.events and server.events))
    assert [type(e) for e in client.events + server.events] == [Established, Established]
    creds = pki.nodes["node-a"]
    with pytest.raises(IdentityError, match="names node-a, not its id"):
        TlsSecurity.with_ca("node-b", creds.cert.read_bytes(), creds.key.read_bytes(), ca, [])
    with pytest.raises(IdentityError, match="no certificate in the CA file"):
        check_ca_files(pki.nodes["node-a"].cert.read_bytes(), pki.nodes["node-a"].key.read_bytes(), b"")


async def test_a_native_client_delivers_to_a_receiver(tmp_path: Path) -> None:
    """A native client completes TLS with a `Receiver` (whose TLS connections run on the native core), is
    accepted by its signed hello, and its frames are delivered and acknowledged."""
    sec = key_securities(tmp_path, "node-a", "node-b")
    ida, idb = sec["node-a"].identity, sec["node-b"].identity
    assert ida is not None
    assert idb is not None
    native = TlsSecurity.with_keys("node-a", ida.path.read_bytes(), [("node-b", idb.public_key_bytes)])
    sink = RecordingSink()
    peers = StaticPeerDiscovery([Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32"])])
    async with Receiver(peers, sink, security=sec["node-b"]) as receiver:

        def run() -> tuple[list[Event], int]:
            with socket.create_connection(receiver.address) as sock:
                side = Side(native.client("node-b", epoch=5), sock)
                pump([side], lambda: bool(side.events))
                if not isinstance(side.events[0], Established):
                    return side.events, 0
                side.conn.send_packets([pkt(i) for i in range(4)])
                pump([side], lambda: side.conn.acked == 4)
                return side.events, side.conn.acked

        events, acked = await asyncio.to_thread(run)
        assert [type(e) for e in events] == [Established], events
        assert acked == 4
        await sink.wait(4)
        assert sink.packets == [("node-a", pkt(i)) for i in range(4)]


async def test_todays_python_client_is_accepted_by_a_native_server(tmp_path: Path) -> None:
    """The other direction: a client on Python's `ssl` (OpenSSL) and `client_handshake` completes TLS with
    the native server, proves its key in the hello, and gets its frames acknowledged."""
    sec = key_securities(tmp_path, "node-a", "node-b")
    ida, idb = sec["node-a"].identity, sec["node-b"].identity
    assert ida is not None
    assert idb is not None
    native = TlsSecurity.with_keys("node-b", idb.path.read_bytes(), [("node-a", ida.public_key_bytes)])
    packets = [pkt(i) for i in range(3)]
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> Side:
            sock, _ = listener.accept()
            with sock:
                side = Side(native.server(), sock)
                pump([side], lambda: len(side.frames) == len(packets))
                return side

        served = asyncio.ensure_future(asyncio.to_thread(serve))
        reader, writer = await asyncio.open_connection(
            *listener.getsockname(), ssl=sec["node-a"].client_context, server_hostname=""
        )
        ssl_object = writer.get_extra_info("ssl_object")
        check_server_key(ssl_object, idb.public_key_bytes, "node-b")
        server_id = await client_handshake(
            sec["node-a"], "node-b", reader.readexactly, writer.write, server_public_key(ssl_object), 9
        )
        assert server_id == "node-b"
        writer.write(encode_frames(packets))
        acks = AckDecoder()
        while acks.taken < len(packets):
            data = await reader.read(1024)
            assert data, "the native server closed before acknowledging"
            acks.feed(data)
        writer.close()
        side = await served
    [established] = side.events
    assert isinstance(established, Established)
    assert (established.peer_id, established.epoch) == ("node-a", 9)
    assert side.frames == packets
