"""The answered handshake over real sockets and real TLS: who may talk as whom, and what each side says.

The receiving node is `node-b` (a `Receiver`); `node-a` and `node-c` are its configured peers; `mallory`
has a key of its own and knows node-a's public key (public keys are not secrets). Misbehaving clients come
from `vpn_packet.testutil.attackers`; every refusal is checked on the wire (the answer the client got) and
on the receiver (its counters, its sink, its log).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vpn_packet._native import hello_transcript
from vpn_packet.errors import (
    HandshakeRefusedError,
    IdentityError,
    NetworkError,
    TlsError,
    is_handshake_refused_error,
)
from vpn_packet.metrics import FAILURE_REASONS
from vpn_packet.node.node import Node
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.testutil import attackers
from vpn_packet.testutil.certs import CertificateAuthority
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import identities, key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.sinks import RecordingSink
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity, encode_public_key
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService

A_SRC = "10.8.0.2"  # node-a's tunnel address: the source an impostor of node-a would use
C_SRC = "10.8.0.3"
B_DST = "10.8.0.1"
LONG = 3600.0  # a log interval no test outlives: a second identical failure is held back


def pkt(src: str = A_SRC, seq: int = 0) -> bytes:
    return ipv4_packet(src, B_DST, src_port=seq & 0xFFFF, dst_port=7, payload=seq.to_bytes(4, "big"))


def b_peers() -> StaticPeerDiscovery:
    """node-b's view: its peers and the sources each may use."""
    return StaticPeerDiscovery(
        [Peer("node-a", "127.0.0.1:1", [f"{A_SRC}/32"]), Peer("node-c", "127.0.0.1:1", [f"{C_SRC}/32"])]
    )


def to_b(address: tuple[str, int]) -> StaticPeerDiscovery:
    """A sender's view: where node-b listens."""
    return StaticPeerDiscovery([Peer("node-b", f"{address[0]}:{address[1]}", [f"{B_DST}/32"])])


Sink = RecordingSink


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Security]:
    """Key-mode securities of node-a, node-b and node-c, each trusting the others by public key."""
    return key_securities(tmp_path, "node-a", "node-b", "node-c")


@pytest.fixture
def mallory(tmp_path: Path) -> NodeIdentity:
    """A key nobody configured."""
    return identities(tmp_path, "mallory")["mallory"]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
async def rx(keys: dict[str, Security], sink: Sink) -> AsyncIterator[Receiver]:
    """node-b's receiver in key mode (the default of `vpn-packet node`), default limits."""
    async with Receiver(b_peers(), sink, security=keys["node-b"], log_interval=LONG) as receiver:
        yield receiver


def identity_of(security: Security) -> NodeIdentity:
    assert security.identity is not None
    return security.identity


# --- 1. a claimed id without its key --------------------------------------------------------------------


async def test_own_key_claiming_a_peer_is_refused_key_mismatch_and_injects_nothing(
    rx: Receiver, sink: Sink, keys: dict[str, Security], mallory: NodeIdentity
) -> None:
    attempt = await attackers.claim(
        rx.address,
        "node-a",
        tls=attackers.attacker_tls(),
        public_key=mallory.public_key_bytes,
        sign=mallory.sign,
        inject=[pkt(seq=i) for i in range(10)],
    )
    assert attempt.answer is not None
    assert attempt.answer.reason == "key_mismatch"
    m = rx.metrics()
    assert m.refused == {"key_mismatch": 1}
    assert m.frames == 0
    assert m.packets_delivered == 0
    assert sink.packets == []
    assert "node-a" not in rx.peer_metrics()

    # Control: the same client with node-a's real key is accepted and its frames arrive (so the refusal
    # above is the key, not a client that cannot inject).
    a = identity_of(keys["node-a"])
    ok = await attackers.claim(
        rx.address,
        "node-a",
        tls=attackers.attacker_tls(),
        public_key=a.public_key_bytes,
        sign=a.sign,
        inject=[pkt(seq=i) for i in range(10)],
    )
    assert ok.answer is not None
    assert ok.answer.accepted
    await sink.wait(10)
    assert {who for who, _ in sink.packets} == {"node-a"}
    assert rx.metrics().refused == {"key_mismatch": 1}


async def test_a_peers_public_key_signed_by_another_key_is_refused_bad_signature(
    rx: Receiver, sink: Sink, keys: dict[str, Security], mallory: NodeIdentity
) -> None:
    attempt = await attackers.claim(
        rx.address,
        "node-a",
        tls=attackers.attacker_tls(),
        public_key=identity_of(keys["node-a"]).public_key_bytes,  # public: anyone can present it
        sign=mallory.sign,
        inject=[pkt(seq=i) for i in range(10)],
    )
    assert attempt.answer is not None
    assert attempt.answer.reason == "bad_signature"
    m = rx.metrics()
    assert m.refused == {"bad_signature": 1}
    assert m.frames == 0
    assert sink.packets == []
    assert "node-a" not in rx.peer_metrics()


async def test_the_key_decides_and_a_signature_counts_for_its_connection_only(
    rx: Receiver, sink: Sink, keys: dict[str, Security], mallory: NodeIdentity
) -> None:
    """The key-mode verdicts of the native receiver (`rust/core/src/connection.rs`, `judge`), each on the
    wire and in the counters: the claimed id is a label, the key proved is the peer; a signature replayed
    from another connection (another challenge) or made for another server does not verify."""
    a = identity_of(keys["node-a"])
    b_key = identity_of(keys["node-b"]).public_key_bytes
    tls = attackers.attacker_tls()

    async def reason(
        claimed: str, key: bytes | None, sign: Callable[[bytes], bytes] | None = None
    ) -> str | None:
        attempt = await attackers.claim(rx.address, claimed, tls=tls, public_key=key, sign=sign)
        return None if attempt.answer is None else attempt.answer.reason

    def replayed(_transcript: bytes) -> bytes:  # node-a's genuine signature, for another challenge
        return a.sign(hello_transcript(os.urandom(32), b_key, "node-a", 1, a.public_key_bytes))

    def for_another_server(_transcript: bytes) -> bytes:
        return a.sign(hello_transcript(bytes(32), os.urandom(32), "node-a", 1, a.public_key_bytes))

    assert await reason("mallory", mallory.public_key_bytes, mallory.sign) == "unknown_peer"
    assert await reason("node-a", a.public_key_bytes, replayed) == "bad_signature"
    assert await reason("node-a", a.public_key_bytes, for_another_server) == "bad_signature"
    assert await reason("node-a", None) == "key_required"
    assert rx.metrics().refused == {"unknown_peer": 1, "bad_signature": 2, "key_required": 1}
    assert rx.metrics().frames == 0
    # node-a's key under another name: accepted as node-a (the name is a label).
    assert await reason("alpha", a.public_key_bytes, a.sign) == "accepted"
    await wait_until(lambda: "node-a" in rx.peer_metrics())
    assert sink.packets == []


async def test_plaintext_client_against_a_key_mode_receiver_fails_the_handshake(
    rx: Receiver, sink: Sink
) -> None:
    sent_back = await attackers.blind_plaintext(rx.address, "node-a", [pkt(seq=i) for i in range(10)])
    assert not sent_back.startswith(b"VPNP")  # no challenge, no answer: plaintext never got that far
    m = rx.metrics()
    assert sum(m.handshake_failures.values()) == 1
    assert set(m.handshake_failures) <= {"tls_failed", "timeout"}
    assert m.refused == {}
    assert m.frames == 0
    assert sink.packets == []
    assert rx.peer_metrics() == {}


async def test_an_insecure_receiver_takes_the_claimed_id_at_its_word(sink: Sink) -> None:
    """The contrast: what `insecure` gives up. Anyone saying "node-a" is node-a."""
    async with Receiver(b_peers(), sink, security=Security.insecure("node-b")) as insecure:
        attempt = await attackers.claim(insecure.address, "node-a", inject=[pkt(seq=i) for i in range(10)])
        assert attempt.answer is not None
        assert attempt.answer.accepted
        await sink.wait(10)
        assert {who for who, _ in sink.packets} == {"node-a"}
        assert insecure.peer_metrics()["node-a"].packets_delivered == 10


# --- 2. a wrong public_key, on either side ----------------------------------------------------------------


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_sender_with_the_wrong_key_for_the_receiver_refuses_it_and_both_sides_count_it(
    rx: Receiver, keys: dict[str, Security], mallory: NodeIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = identity_of(keys["node-a"])
    b_key = identity_of(keys["node-b"]).public_key_bytes
    wrong = Security.with_keys(a, {"node-b": mallory.public_key_bytes})  # A's config: a wrong key for B
    service = TcpStreamService(to_b(rx.address), wrong)

    for attempt in (1, 2):
        with pytest.raises(NetworkError) as info:
            await service.create_stream("node-b")
        cause = info.value.cause
        assert isinstance(cause, TlsError)
        assert cause.reason == "key_mismatch"
        assert encode_public_key(b_key) in str(cause)  # what node-b presented
        assert encode_public_key(mallory.public_key_bytes) in str(cause)  # what A's config expected
        assert not is_handshake_refused_error(info.value)  # A refused B, not the other way round
        assert service.connect_failures == attempt
        # node-b only sees a client that left inside the handshake (it cannot know why).
        await wait_until(lambda n=attempt: sum(rx.metrics().handshake_failures.values()) == n)  # type: ignore[misc]

    assert set(rx.metrics().handshake_failures) <= {"closed_early", "tls_failed"}
    assert rx.metrics().refused == {}
    assert service.connects == 0
    assert service.refusals == {}
    failed = warnings_from(caplog, "vpn_packet.transport.receiver")
    assert len(failed) == 1, failed  # two failures, one line (rate-limited)
    assert "handshake from 127.0.0.1 failed" in failed[0]


async def test_receiver_with_the_wrong_key_for_the_sender_refuses_it_and_both_sides_say_why(
    keys: dict[str, Security], sink: Sink, mallory: NodeIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    b = identity_of(keys["node-b"])
    c_key = identity_of(keys["node-c"]).public_key_bytes
    wrong = Security.with_keys(b, {"node-a": mallory.public_key_bytes, "node-c": c_key})  # B: wrong key for A
    async with Receiver(b_peers(), sink, security=wrong, log_interval=LONG) as receiver:
        service = TcpStreamService(to_b(receiver.address), keys["node-a"])
        for attempt in (1, 2):
            with pytest.raises(HandshakeRefusedError) as info:
                await service.create_stream("node-b")
            refusal = info.value
            assert is_handshake_refused_error(refusal)
            assert refusal.reason == "key_mismatch"
            assert refusal.peer_id == "node-b"
            assert not refusal.retriable
            assert str(refusal).startswith("node-b refused us: our key is not the one it has for node-a")
            assert service.refusals == {"key_mismatch": attempt}
            assert receiver.metrics().refused == {"key_mismatch": attempt}
        assert service.connects == 0
        assert receiver.metrics().frames == 0
        assert sink.packets == []
        assert receiver.peer_metrics() == {}

    sent = warnings_from(caplog, "vpn_packet.transport.tcp")
    assert len(sent) == 1, sent  # two refusals, one line on each side
    assert sent[0].startswith("node-b refused us: our key is not the one it has for node-a")
    received = warnings_from(caplog, "vpn_packet.transport.receiver")
    assert len(received) == 1, received
    assert "key_mismatch" in received[0]
    assert "127.0.0.1" in received[0]
    assert "'node-a'" in received[0]


# --- 3. CA mode: one certificate, one peer ----------------------------------------------------------------


def issue_with_names(ca: CertificateAuthority, names: list[str], directory: Path) -> tuple[Path, Path]:
    """A certificate from `ca` whose SAN lists every name in `names` (its subject: the first)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "multi.crt", directory / "multi.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_ca_certificate_naming_another_peer_too_is_refused_whatever_it_claims(
    tmp_path: Path, sink: Sink
) -> None:
    ca = CertificateAuthority()
    ca_path = ca.write(tmp_path)
    b = ca.issue("node-b", tmp_path / "b")
    a = ca.issue("node-a", tmp_path / "a")
    multi_cert, multi_key = issue_with_names(ca, ["node-c", "node-a"], tmp_path / "c")
    security_b = Security.with_ca("node-b", b.cert, b.key, ca_path)
    async with Receiver(b_peers(), sink, security=security_b, log_interval=LONG) as receiver:
        where = to_b(receiver.address)
        for claimed in ("node-c", "node-a"):
            impostor = TcpStreamService(where, Security.with_ca(claimed, multi_cert, multi_key, ca_path))
            with pytest.raises(HandshakeRefusedError) as info:
                await impostor.create_stream("node-b")
            assert info.value.reason == "identity_mismatch"
        # A valid certificate naming someone else alone (another peer, or nobody configured), claiming
        # node-a: refused too (by a client on Python's ssl: our sending side does not dial under an id its
        # certificate does not name).
        for name in ("node-c", "node-z"):
            creds = ca.issue(name, tmp_path / f"{name}-only")
            other = Security.with_ca("node-a", creds.cert, creds.key, ca_path)
            with pytest.raises(IdentityError, match="not its id"):
                await TcpStreamService(where, other).create_stream("node-b")
            with pytest.raises(HandshakeRefusedError) as info:
                await attackers.misconfigured(receiver.address, other, "node-b")
            assert info.value.reason == "identity_mismatch"
        assert receiver.metrics().refused == {"identity_mismatch": 4}
        assert receiver.peer_metrics() == {}

        # The same CA, a certificate naming node-a alone: accepted, and its packets arrive as node-a's.
        honest = TcpStreamService(where, Security.with_ca("node-a", a.cert, a.key, ca_path))
        stream = await honest.create_stream("node-b")
        try:
            await stream.write_many([pkt(seq=i) for i in range(5)])
            await sink.wait(5)
        finally:
            await stream.close()
        assert {who for who, _ in sink.packets} == {"node-a"}
        assert receiver.metrics().refused == {"identity_mismatch": 4}


# --- 6. a refusal through the dispatcher ------------------------------------------------------------------


async def test_a_node_refused_by_its_peer_fails_its_packets_as_refused_and_stops_asking(
    keys: dict[str, Security], sink: Sink
) -> None:
    b = identity_of(keys["node-b"])
    c_key = identity_of(keys["node-c"]).public_key_bytes
    not_a = Security.with_keys(b, {"node-c": c_key})  # node-b does not know node-a's key
    threshold = 2
    async with Receiver(b_peers(), sink, security=not_a, log_interval=LONG) as receiver:
        host, port = receiver.address
        node = Node(
            keys["node-a"],
            peers=[Peer("node-b", f"{host}:{port}", ["10.8.0.0/24"])],
            resilience=ResilienceConfig(failure_threshold=threshold, reset_timeout=LONG),
        )
        async with node:
            # One destination after the other, each flushed: every packet gets its own chance to open a
            # stream, so without a breaker node-b would see one refused connection per packet.
            total = 20
            for i in range(total):
                assert node.send(ipv4_packet("10.8.0.2", f"10.8.0.{10 + i}", src_port=i, dst_port=7))
                assert await node.flush(timeout=10)  # hang guard
            m = node.metrics()
        d = m.dispatcher
        assert d.accepted == total
        assert d.sent == 0
        assert d.failed == total
        assert d.accepted == d.sent + d.failed + d.discarded + d.queued
        assert d.accounting_ok
        assert d.failed_by_reason.get("refused", 0) >= 1
        assert set(d.failed_by_reason) <= set(FAILURE_REASONS)
        assert d.failed_by_reason.get("refused", 0) + d.failed_by_reason.get("circuit_open", 0) == total
        refused = receiver.metrics().refused
        assert set(refused) == {"unknown_peer"}
        assert refused["unknown_peer"] <= threshold + 2  # the breaker opened: node-b was not hammered
        assert m.refusals == {"unknown_peer": refused["unknown_peer"]}
        assert sink.packets == []


# --- 7. other versions and other protocols ----------------------------------------------------------------


V1_HELLO = b"VPNP\x01\x06node-a"  # version 1: magic, version, id length, id (no challenge, no key)


async def test_a_v1_client_is_answered_unsupported_version(rx: Receiver) -> None:
    """A v1 client as it really behaves: its hello, then its frames at once."""
    v1_frames = b"".join(len(p).to_bytes(4, "big") + p for p in [pkt(seq=i) for i in range(3)])
    attempt = await attackers.after_challenge(rx.address, V1_HELLO + v1_frames, tls=attackers.attacker_tls())
    assert attempt.answer is not None
    assert attempt.answer.reason == "unsupported_version"
    m = rx.metrics()
    assert m.handshake_failures == {"unsupported_version": 1}
    assert m.refused == {}
    assert m.frames == 0
    assert rx.peer_metrics() == {}


async def test_a_v1_hello_alone_is_answered_unsupported_version(rx: Receiver) -> None:
    """The 12 bytes of a v1 hello and nothing more: answered as soon as the version byte is read."""
    attempt = await attackers.after_challenge(rx.address, V1_HELLO, tls=attackers.attacker_tls())
    assert attempt.answer is not None
    assert attempt.answer.reason == "unsupported_version"
    assert rx.metrics().handshake_failures == {"unsupported_version": 1}


async def test_bytes_that_are_not_a_handshake_are_counted_bad_magic(rx: Receiver) -> None:
    attempt = await attackers.after_challenge(
        rx.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", tls=attackers.attacker_tls()
    )
    assert attempt.answer is None  # not our protocol: nothing to answer
    m = rx.metrics()
    assert m.handshake_failures == {"bad_magic": 1}
    assert m.refused == {}
    assert rx.peer_metrics() == {}
