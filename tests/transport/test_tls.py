"""`vpn_packet.transport.tls` over real loopback TLS: key-mode contexts and `check_server_key`, CA-mode
contexts and `verify_server_name`, the one naming rule `certificate_names`, and CA mode end to end between
`TcpStreamService` and the `Receiver` (key mode end to end is in test_receiver and test_tcp)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.errors import (
    HandshakeRefusedError,
    IdentityError,
    NetworkError,
    TlsError,
    is_handshake_refused_error,
    is_network_error,
    is_retriable_error,
)
from vpn_packet.testutil import attackers
from vpn_packet.testutil.certs import CertificateAuthority, TestPki, write_test_pki
from vpn_packet.testutil.fakes import LoopbackEndpoint
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity, encode_public_key
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService
from vpn_packet.transport.tls import (
    ca_client_context,
    ca_server_context,
    certificate_names,
    check_server_key,
    key_client_context,
    key_server_context,
    verify_server_name,
)

PACKET = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1000, 53, b"hello")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return write_test_pki(tmp_path_factory.mktemp("pki"), ["node-a", "node-b", "node-c"])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeIdentity]:
    return identities(tmp_path_factory.mktemp("keys"), "node-a", "node-b", "node-c")


# --- certificate_names -------------------------------------------------------------------------------------


def test_certificate_names_dns_entries_first_common_name_only_without_them() -> None:
    cn_only = {"subject": ((("commonName", "node-x"),),)}
    with_san = {"subject": ((("commonName", "cn"),),), "subjectAltName": (("DNS", "node-y"),)}
    several = {
        "subject": ((("organizationName", "o"),), (("commonName", "cn"),)),
        "subjectAltName": (("IP Address", "10.0.0.1"), ("DNS", "node-a"), ("DNS", "node-b")),
    }
    ip_only = {"subject": ((("commonName", "node-z"),),), "subjectAltName": (("IP Address", "10.0.0.1"),)}
    assert certificate_names(cn_only) == ["node-x"]
    assert certificate_names(with_san) == ["node-y"]  # the common name does not count beside a DNS SAN
    assert certificate_names(several) == ["node-a", "node-b"]  # every DNS entry, in order; no IP entry
    assert certificate_names(ip_only) == ["node-z"]  # no DNS entry: the common name
    assert certificate_names({}) == []
    assert certificate_names(None) == []


# --- loopback TLS between two contexts ---------------------------------------------------------------------


@dataclass
class Server:
    """An asyncio TLS server that records what it saw of each client (its decoded certificate)."""

    server: asyncio.Server | None = None
    client_certs: list[dict[str, Any] | None] = field(default_factory=list)
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.client_certs.append(writer.get_extra_info("peercert"))
        self.seen.set()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read()
        writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[Server] = []

    async def start(ctx: ssl.SSLContext) -> Server:
        s = Server()
        s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()
        for writer in s.writers:
            writer.transport.abort()
        await s.server.wait_closed()


async def dial(
    server: Server, ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(10):  # a hang guard
        return await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname=server_hostname
        )


async def test_key_mode_client_proves_the_server_key(serve: Any, keys: dict[str, NodeIdentity]) -> None:
    server = await serve(key_server_context(keys["node-b"]))
    _reader, writer = await dial(server, key_client_context(keys["node-a"]), None)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.3"
    # The right key: accepted, and returned.
    b_key = keys["node-b"].public_key_bytes
    assert check_server_key(ssl_object, b_key, "node-b") == b_key
    # Another node's key configured for node-b: refused, naming both keys.
    c_key = keys["node-c"].public_key_bytes
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        check_server_key(ssl_object, c_key, "node-b")
    message = str(info.value)
    assert "node-b" in message
    assert encode_public_key(b_key) in message  # what it presented
    assert encode_public_key(c_key) in message  # what is configured
    # The server asks no certificate of key-mode clients: they prove their key in the signed hello.
    async with asyncio.timeout(10):
        await server.seen.wait()
    assert server.client_certs == [None]
    writer.close()


def test_check_server_key_without_a_certificate_fails_closed(
    pki: TestPki, keys: dict[str, NodeIdentity]
) -> None:
    expected = keys["node-b"].public_key_bytes
    with pytest.raises(ssl.SSLCertVerificationError, match="node-b presented no Ed25519 key"):
        check_server_key(None, expected, "node-b")

    class NoCertificate:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    class EcdsaCertificate:  # a CA-issued certificate holds a P-256 key, not an Ed25519 one
        def getpeercert(self, binary_form: bool = False) -> bytes:
            assert binary_form
            return ssl.PEM_cert_to_DER_cert(pki.nodes["node-b"].cert.read_text())

    for ssl_object in (NoCertificate(), EcdsaCertificate()):
        with pytest.raises(ssl.SSLCertVerificationError, match="no Ed25519 key"):
            check_server_key(ssl_object, expected, "node-b")


def test_key_contexts(keys: dict[str, NodeIdentity]) -> None:
    server = key_server_context(keys["node-a"])
    client = key_client_context(keys["node-a"])
    for ctx in (server, client):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.options & ssl.OP_NO_TICKET  # no resumption: every connection proves its keys
        assert ctx.verify_mode is ssl.CERT_NONE  # trust is the key, checked by value, not a chain
    assert not client.check_hostname


async def test_key_mode_refuses_a_tls_1_2_only_peer(serve: Any, keys: dict[str, NodeIdentity]) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server = await serve(key_server_context(keys["node-b"]))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await dial(server, old, None)


async def test_ca_mode_checks_the_chain_and_the_name(serve: Any, pki: TestPki) -> None:
    a, b = pki.nodes["node-a"], pki.nodes["node-b"]
    server = await serve(ca_server_context(b.cert, b.key, pki.ca_cert))
    client = ca_client_context(a.cert, a.key, pki.ca_cert)
    _reader, writer = await dial(server, client, "node-b")
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() in ("TLSv1.3", "TLSv1.2")
    verify_server_name(ssl_object, "node-b")  # the name dialled: no error
    with pytest.raises(ssl.SSLCertVerificationError, match="names node-b, not the peer id 'node-c'"):
        verify_server_name(ssl_object, "node-c")
    with pytest.raises(ssl.SSLCertVerificationError, match="nobody"):
        verify_server_name(None, "node-b")
    # The server required and verified the client's certificate; it names node-a.
    async with asyncio.timeout(10):
        await server.seen.wait()
    assert certificate_names(server.client_certs[0]) == ["node-a"]
    writer.close()
    # OpenSSL itself refuses a server whose certificate does not name the peer dialled.
    with pytest.raises(ssl.SSLCertVerificationError):
        await dial(server, client, "node-c")


async def test_ca_mode_refuses_a_server_of_another_ca(serve: Any, pki: TestPki, tmp_path: Path) -> None:
    rogue = CertificateAuthority("rogue CA").issue("node-b", tmp_path)
    server = await serve(ca_server_context(rogue.cert, rogue.key, pki.ca_cert))
    a = pki.nodes["node-a"]
    with pytest.raises(ssl.SSLCertVerificationError):
        await dial(server, ca_client_context(a.cert, a.key, pki.ca_cert), "node-b")


async def test_ca_mode_names_from_the_common_name_without_a_san(
    serve: Any, pki: TestPki, tmp_path: Path
) -> None:
    """A CN-only certificate names its common name for OpenSSL and `certificate_names` alike."""
    ca = CertificateAuthority("cn CA")
    ca_file = ca.write(tmp_path)
    server_creds = ca.issue("node-b", tmp_path, san=False)
    client_creds = ca.issue("node-a", tmp_path)
    server = await serve(ca_server_context(server_creds.cert, server_creds.key, ca_file))
    _reader, writer = await dial(
        server, ca_client_context(client_creds.cert, client_creds.key, ca_file), "node-b"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    assert certificate_names(ssl_object.getpeercert()) == ["node-b"]
    verify_server_name(ssl_object, "node-b")
    writer.close()


def test_ca_contexts(pki: TestPki) -> None:
    a = pki.nodes["node-a"]
    client = ca_client_context(a.cert, a.key, pki.ca_cert)
    server = ca_server_context(a.cert, a.key, pki.ca_cert)
    for ctx in (client, server):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_TICKET
    assert client.check_hostname
    assert client.hostname_checks_common_name  # the same rule as certificate_names


# --- CA mode end to end: TcpStreamService -> Receiver ------------------------------------------------------


class Harness:
    """A CA-mode receiver for node-b (knowing node-a and node-c) and what it delivered."""

    def __init__(self, pki: TestPki) -> None:
        self.pki = pki
        self.delivered: list[tuple[str, bytes]] = []
        self.got = asyncio.Event()
        self.receivers: list[Receiver] = []
        self.discovery = StaticPeerDiscovery(
            [
                Peer("node-a", "127.0.0.1:9", ["10.1.0.0/16"]),
                Peer("node-b", "127.0.0.1:9", ["10.2.0.0/16"]),
                Peer("node-c", "127.0.0.1:9", ["10.3.0.0/16"]),
            ]
        )

    def sink(self, peer_id: str, packets: list[bytes]) -> None:
        self.delivered += [(peer_id, p) for p in packets]
        self.got.set()

    def security(self, local_id: str, cert: Path, key: Path, ca: Path | None = None) -> Security:
        return Security.with_ca(local_id, cert, key, ca or self.pki.ca_cert)

    def node(self, name: str, local_id: str | None = None) -> Security:
        creds = self.pki.nodes[name]
        return self.security(local_id or name, creds.cert, creds.key)

    async def receiver(self, security: Security) -> Receiver:
        receiver = Receiver(self.discovery, self.sink, security=security, hello_timeout=5.0)
        await receiver.start()
        self.receivers.append(receiver)
        return receiver

    async def wait_delivered(self) -> None:
        async with asyncio.timeout(10):  # a hang guard, not a threshold
            await self.got.wait()


@pytest.fixture
async def harness(pki: TestPki) -> AsyncIterator[Harness]:
    h = Harness(pki)
    yield h
    for receiver in h.receivers:
        await receiver.stop()


def service(receiver: Receiver, security: Security) -> TcpStreamService:
    return TcpStreamService(LoopbackEndpoint(receiver.address[1]), security, connect_timeout=10)


async def test_mutual_tls_with_a_ca(harness: Harness) -> None:
    receiver = await harness.receiver(harness.node("node-b"))
    stream = await service(receiver, harness.node("node-a")).create_stream("node-b")
    assert stream.peer_names == ["node-b"]
    assert " tls " in repr(stream)
    await stream.write_many([PACKET, PACKET])
    await harness.wait_delivered()
    await stream.close()
    assert harness.delivered[0] == ("node-a", PACKET)
    assert receiver.peer_metrics()["node-a"].connections == 1


async def test_server_from_an_untrusted_ca_is_refused(harness: Harness, tmp_path: Path) -> None:
    rogue = CertificateAuthority("rogue CA").issue("node-b", tmp_path)
    security = harness.security("node-b", rogue.cert, rogue.key)
    # A receiver does not start with a certificate its own CA does not vouch for (the native TLS core
    # checks it with webpki at start) ...
    with pytest.raises(IdentityError, match="UnknownIssuer"):
        await harness.receiver(security)
    # ... and a client refuses a server presenting one (a bare TLS server standing in for it).
    assert security.server_context is not None
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=security.server_context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = TcpStreamService(LoopbackEndpoint(port), harness.node("node-a"), connect_timeout=10)
        with pytest.raises(NetworkError) as info:
            await client.create_stream("node-b")
    assert isinstance(info.value.cause, TlsError)
    assert info.value.cause.reason == "tls_certificate", info.value.cause  # webpki: UnknownIssuer
    assert is_network_error(info.value)
    assert not is_retriable_error(info.value)  # a bad certificate does not get better by retrying
    assert client.connect_failures == 1


async def test_server_whose_certificate_names_another_peer_is_refused(harness: Harness) -> None:
    security = harness.node("node-c", local_id="node-b")  # node-c's certificate
    with pytest.raises(IdentityError, match="names node-c"):  # named at start by the native TLS core
        await harness.receiver(security)
    assert security.server_context is not None
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=security.server_context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = TcpStreamService(LoopbackEndpoint(port), harness.node("node-a"), connect_timeout=10)
        with pytest.raises(NetworkError) as info:
            await client.create_stream("node-b")
    assert isinstance(info.value.cause, TlsError)
    assert info.value.cause.reason == "identity_mismatch"
    assert "names node-c" in str(info.value.cause)
    assert not is_handshake_refused_error(info.value)


async def test_client_from_an_untrusted_ca_is_refused_and_counted(harness: Harness, tmp_path: Path) -> None:
    receiver = await harness.receiver(harness.node("node-b"))
    rogue = CertificateAuthority("rogue CA").issue("node-a", tmp_path)
    rogue_security = harness.security("node-a", rogue.cert, rogue.key)
    # Our own sending side does not dial with a certificate its CA does not vouch for (the native core
    # checks it as at a node's start) ...
    with pytest.raises(IdentityError, match="UnknownIssuer"):
        await service(receiver, rogue_security).create_stream("node-b")
    # ... so another client (Python's ssl) presents it: the receiver refuses it in TLS. TLS 1.3 refuses
    # after the client's finish, so the client sees the connection end before the vpn-packet handshake.
    assert rogue_security.client_context is not None
    with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        async with asyncio.timeout(10):  # a hang guard
            reader, writer = await asyncio.open_connection(
                *receiver.address, ssl=rogue_security.client_context, server_hostname="node-b"
            )
            await reader.read()
            writer.close()
    await wait_until(lambda: receiver.metrics().handshake_failures == {"tls_failed": 1})
    assert harness.delivered == []
    assert receiver.peer_metrics() == {}


async def test_client_whose_certificate_is_not_its_hello_id_is_refused(harness: Harness) -> None:
    receiver = await harness.receiver(harness.node("node-b"))
    impostor = harness.node("node-a", local_id="node-c")  # node-a's cert, claims node-c
    # Our own sending side does not dial under an id its certificate does not name (checked as at start) ...
    with pytest.raises(IdentityError, match="names node-a, not its id"):
        await service(receiver, impostor).create_stream("node-b")
    # ... so another client (Python's ssl and handshake) claims it: the receiver refuses, with the reason.
    with pytest.raises(HandshakeRefusedError) as info:
        await attackers.misconfigured(receiver.address, impostor, "node-b")
    assert info.value.reason == "identity_mismatch"
    assert "node-a" in info.value.detail
    assert receiver.metrics().refused == {"identity_mismatch": 1}
    assert harness.delivered == []


async def test_certificate_naming_two_peers_is_refused(harness: Harness, tmp_path: Path) -> None:
    """One certificate, one peer: a certificate that also names another configured peer is refused, even
    when the hello claims one of its names."""
    ca = CertificateAuthority("two-names CA")
    ca_file = ca.write(tmp_path)
    server = ca.issue("node-b", tmp_path)
    two = ca.issue("node-a", tmp_path, names=["node-a", "node-c"])
    receiver = await harness.receiver(harness.security("node-b", server.cert, server.key, ca_file))
    client = service(receiver, harness.security("node-a", two.cert, two.key, ca_file))
    with pytest.raises(HandshakeRefusedError) as info:
        await client.create_stream("node-b")
    assert info.value.reason == "identity_mismatch"
    assert "node-c" in info.value.detail
    assert receiver.metrics().refused == {"identity_mismatch": 1}
    assert harness.delivered == []
    # A second name that is no configured peer does not matter.
    other = ca.issue("node-a2", tmp_path, names=["node-a", "www.example"])
    stream = await service(
        receiver, harness.security("node-a", other.cert, other.key, ca_file)
    ).create_stream("node-b")
    await stream.write(PACKET)
    await harness.wait_delivered()
    await stream.close()
    assert harness.delivered == [("node-a", PACKET)]
