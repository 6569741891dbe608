"""Mutual TLS between TcpStreamService and the Receiver: CA mode, pinned mode, and every refusal."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vpn_packet.errors import NetworkError, is_network_error, is_retriable_error
from vpn_packet.testutil.certs import CertificateAuthority, TestPki, write_self_signed, write_test_pki
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService
from vpn_packet.transport.tls import (
    check_pinned,
    client_context,
    fingerprint,
    identity_matches,
    normalize_fingerprint,
    peer_identity,
    server_context,
)

PACKET = ipv4_packet("10.1.0.1", "10.2.0.1", UDP, 1000, 53, b"hello")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return write_test_pki(tmp_path_factory.mktemp("pki"), ["node-a", "node-b", "node-c"])


class Endpoints:
    def __init__(self, port: int) -> None:
        self.port = port

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


class Harness:
    """A receiver for node-b (knowing node-a and node-c) and what it delivered."""

    def __init__(self) -> None:
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

    async def receiver(self, ctx: ssl.SSLContext) -> Receiver:
        receiver = Receiver(self.discovery, self.sink, host="127.0.0.1", port=0, ssl_context=ctx)
        await receiver.start()
        self.receivers.append(receiver)
        return receiver

    async def wait_delivered(self) -> None:
        async with asyncio.timeout(5):  # a safety net, not a threshold
            await self.got.wait()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    for receiver in h.receivers:
        await receiver.stop()


def service(port: int, local: str, ctx: ssl.SSLContext) -> TcpStreamService:
    return TcpStreamService(Endpoints(port), local, ssl_context=ctx, connect_timeout=5)


async def test_mutual_tls_with_a_ca(pki: TestPki, harness: Harness) -> None:
    a, b = pki.nodes["node-a"], pki.nodes["node-b"]
    receiver = await harness.receiver(server_context(b.cert, b.key, ca=pki.ca_cert))
    stream = await service(
        receiver.address[1], "node-a", client_context(a.cert, a.key, ca=pki.ca_cert)
    ).create_stream("node-b")
    ssl_object = stream._transport.get_extra_info("ssl_object")
    assert peer_identity(ssl_object) == "node-b"
    assert ssl_object.version() in ("TLSv1.3", "TLSv1.2")
    assert " tls " in repr(stream)
    await stream.write_many([PACKET, PACKET])
    await harness.wait_delivered()
    await stream.close()
    assert harness.delivered[0] == ("node-a", PACKET)


async def test_server_from_an_untrusted_ca_is_refused(pki: TestPki, harness: Harness, tmp_path: Path) -> None:
    rogue = CertificateAuthority("rogue CA").issue("node-b", tmp_path)
    receiver = await harness.receiver(server_context(rogue.cert, rogue.key, ca=pki.ca_cert))
    a = pki.nodes["node-a"]
    with pytest.raises(NetworkError) as info:
        await service(
            receiver.address[1], "node-a", client_context(a.cert, a.key, ca=pki.ca_cert)
        ).create_stream("node-b")
    assert isinstance(info.value.cause, ssl.SSLCertVerificationError)
    assert is_network_error(info.value)
    assert not is_retriable_error(info.value)  # a bad certificate does not get better by retrying


async def test_server_whose_identity_is_not_the_peer_id_is_refused(pki: TestPki, harness: Harness) -> None:
    c = pki.nodes["node-c"]  # a valid certificate of the right CA, but for node-c
    receiver = await harness.receiver(server_context(c.cert, c.key, ca=pki.ca_cert))
    a = pki.nodes["node-a"]
    with pytest.raises(NetworkError) as info:
        await service(
            receiver.address[1], "node-a", client_context(a.cert, a.key, ca=pki.ca_cert)
        ).create_stream("node-b")
    assert isinstance(info.value.cause, ssl.SSLCertVerificationError)


async def test_client_from_an_untrusted_ca_is_refused(pki: TestPki, harness: Harness, tmp_path: Path) -> None:
    b = pki.nodes["node-b"]
    receiver = await harness.receiver(server_context(b.cert, b.key, ca=pki.ca_cert))
    rogue = CertificateAuthority("rogue CA").issue("node-a", tmp_path)
    client = service(receiver.address[1], "node-a", client_context(rogue.cert, rogue.key, ca=pki.ca_cert))
    try:
        stream = await client.create_stream("node-b")
    except NetworkError:
        pass  # refused during the handshake (TLS 1.2)
    else:  # TLS 1.3: the server refuses after the client's handshake completed; the stream dies
        async with asyncio.timeout(5):
            await stream.wait_closed()
        with pytest.raises(NetworkError):
            await stream.write(PACKET)
    assert harness.delivered == []
    assert receiver.metrics().packets_delivered == 0


async def test_client_whose_certificate_is_not_its_hello_id_is_refused(
    pki: TestPki, harness: Harness
) -> None:
    a, b = pki.nodes["node-a"], pki.nodes["node-b"]
    receiver = await harness.receiver(server_context(b.cert, b.key, ca=pki.ca_cert))
    # node-a's certificate, but the hello claims to be node-c.
    stream = await service(
        receiver.address[1], "node-c", client_context(a.cert, a.key, ca=pki.ca_cert)
    ).create_stream("node-b")
    async with asyncio.timeout(5):
        await stream.wait_closed()
    with pytest.raises(NetworkError):
        await stream.write(PACKET)
    assert receiver.metrics().identity_mismatch == 1
    assert harness.delivered == []


async def test_pinned_certificates(harness: Harness, tmp_path: Path) -> None:
    a = write_self_signed("node-a", tmp_path / "a")
    b = write_self_signed("node-b", tmp_path / "b")
    receiver = await harness.receiver(server_context(b.cert, b.key, pinned_certs=[a.cert]))
    port = receiver.address[1]
    good = client_context(a.cert, a.key, pinned={"node-b": b.fingerprint.upper()})
    stream = await service(port, "node-a", good).create_stream("node-b")
    await stream.write(PACKET)
    await harness.wait_delivered()
    await stream.close()
    assert harness.delivered == [("node-a", PACKET)]

    other = write_self_signed("node-b", tmp_path / "other")  # same name, different certificate
    wrong = client_context(a.cert, a.key, pinned={"node-b": other.fingerprint})
    with pytest.raises(NetworkError) as info:
        await service(port, "node-a", wrong).create_stream("node-b")
    assert "not pinned" in str(info.value)
    unpinned = client_context(a.cert, a.key, pinned={"node-x": b.fingerprint})
    with pytest.raises(NetworkError, match="no pinned certificate"):
        await service(port, "node-a", unpinned).create_stream("node-b")


async def test_pinned_server_refuses_an_unpinned_client(harness: Harness, tmp_path: Path) -> None:
    a = write_self_signed("node-a", tmp_path / "a")
    b = write_self_signed("node-b", tmp_path / "b")
    stranger = write_self_signed("node-a", tmp_path / "stranger")
    receiver = await harness.receiver(server_context(b.cert, b.key, pinned_certs=[a.cert]))
    ctx = client_context(stranger.cert, stranger.key, pinned={"node-b": b.fingerprint})
    try:
        stream = await service(receiver.address[1], "node-a", ctx).create_stream("node-b")
    except NetworkError:
        pass
    else:
        async with asyncio.timeout(5):
            await stream.wait_closed()
    assert receiver.metrics().packets_delivered == 0


def test_helpers(pki: TestPki) -> None:
    node = pki.nodes["node-a"]
    assert fingerprint(node.cert) == node.fingerprint
    assert fingerprint(node.cert.read_bytes()) == node.fingerprint
    colons = ":".join(node.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == node.fingerprint
    with pytest.raises(ValueError, match="SHA-256"):
        normalize_fingerprint("abc")
    ctx = client_context(node.cert, node.key, ca=pki.ca_cert)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname
    with pytest.raises(ValueError, match="exactly one"):
        client_context(node.cert, node.key)
    with pytest.raises(ValueError, match="exactly one"):
        server_context(node.cert, node.key, ca=pki.ca_cert, pinned_certs=[node.cert])
    assert server_context(node.cert, node.key, ca=pki.ca_cert).verify_mode is ssl.CERT_REQUIRED
    assert peer_identity(None) is None
    with pytest.raises(ssl.SSLCertVerificationError):
        check_pinned(None, [node.fingerprint])


def test_identity_falls_back_to_the_common_name(tmp_path: Path) -> None:
    ca = CertificateAuthority()
    ca.issue("node-x", tmp_path, san=False)

    class Fake:
        def getpeercert(self) -> dict[str, object]:
            return {"subject": ((("commonName", "node-x"),),)}

    class WithSan:
        def getpeercert(self) -> dict[str, object]:
            return {"subject": ((("commonName", "cn"),),), "subjectAltName": (("DNS", "node-y"),)}

    assert peer_identity(Fake()) == "node-x"
    assert peer_identity(WithSan()) == "node-y"
    assert identity_matches(Fake(), "node-x")
    assert identity_matches(WithSan(), "node-y")
    assert not identity_matches(WithSan(), "cn")  # the common name counts only without DNS entries
    assert not identity_matches(None, "node-x")

    class TwoNames:
        def getpeercert(self) -> dict[str, object]:
            return {"subjectAltName": (("DNS", "other"), ("DNS", "node-z"))}

    assert identity_matches(TwoNames(), "node-z")
