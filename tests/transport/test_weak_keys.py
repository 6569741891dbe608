"""Weak keys (issue 19): a public key that is not a canonical point of Ed25519's prime-order subgroup is
refused wherever a key is read, and no forged signature verifies.

The attack: a node whose config gives a peer a small-order key (32 zero bytes, say) accepted a forged hello
for that peer (R = identity, s = 0) about one time in four, with no private key at all. Here: the config
refuses such a key naming `peers[i].public_key`; `vpn-packet node` exits with that line; a real receiver
answers every forged hello carrying such a key `bad_key` and counts it; the verifier refuses the forgery and
the Wycheproof-style edge cases (non-canonical s, non-canonical R, small-order R); a certificate holding such
a key is refused before it is compared with the configured key.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from vpn_packet.cli import main
from vpn_packet.errors import ConfigError, IdentityError
from vpn_packet.node.config import load_config
from vpn_packet.testutil import attackers
from vpn_packet.testutil.keys import identities, key_securities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.sinks import RecordingSink
from vpn_packet.testutil.weak_keys import FORGED_SIGNATURE, mixed_order_key, small_order_keys
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import (
    certificate_file_key_problem,
    certificate_key_problem,
    decode_public_key,
    encode_public_key,
    generate_identity,
    key_problem,
    verify_signature,
)
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tls import check_server_key

# The group order L, for the second encoding s + L of a signature's s.
L = 2**252 + 27742317777372353535851937790883648493


def weak_keys(tmp_path: Path) -> list[bytes]:
    """Every small-order encoding and the seven mixed-order variants of one honest key."""
    honest = identities(tmp_path, "honest")["honest"].public_key_bytes
    return [*small_order_keys(), *(mixed_order_key(honest, t) for t in range(1, 8))]


def test_the_weak_key_set_is_what_it_claims(tmp_path: Path) -> None:
    keys = weak_keys(tmp_path)
    assert bytes(32) in keys  # the "AAAA...A=" key
    assert len(set(keys)) == len(keys) == len(small_order_keys()) + 7
    assert len(small_order_keys()) >= 8


def test_every_weak_key_is_refused_with_its_reason(tmp_path: Path) -> None:
    honest = generate_identity("honest2", tmp_path)
    assert key_problem(honest.public_key_bytes) is None
    for key in weak_keys(tmp_path):
        problem = key_problem(key)
        assert problem is not None, key.hex()
        assert any(word in problem for word in ("small order", "canonical", "prime-order")), problem
        with pytest.raises(IdentityError, match="not a usable public key"):
            decode_public_key(encode_public_key(key))


CONFIG = """\
[interface]
name = "vpn0"
address = "10.8.0.1/24"

[listen]
address = "127.0.0.1:7000"

[node]
key = "node-a.key"

[[peers]]
id = "node-b"
endpoint = "127.0.0.1:7001"
allowed_ips = ["10.8.0.2/32"]
public_key = "{b}"

[[peers]]
id = "node-c"
endpoint = "127.0.0.1:7002"
allowed_ips = ["10.8.0.3/32"]
public_key = "{c}"
"""


def test_a_config_with_a_weak_peer_key_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generate_identity("node-a", tmp_path)
    good = identities(tmp_path, "node-b")["node-b"].public_key
    path = tmp_path / "node.toml"
    for key in weak_keys(tmp_path):
        path.write_text(CONFIG.format(b=good, c=encode_public_key(key)))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.key == "peers[1].public_key"
        assert "not a usable public key" in str(caught.value)
    # `vpn-packet node` stops with that one line (before it touches a TUN), exit status 2.
    path.write_text(CONFIG.format(b=good, c="A" * 43 + "="))
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "peers[1].public_key" in err
    assert "small order" in err


def test_a_library_security_refuses_a_weak_peer_key(tmp_path: Path) -> None:
    me = identities(tmp_path, "me")["me"]
    with pytest.raises(IdentityError, match="peer 'zero'"):
        Security.with_keys(me, {"zero": bytes(32)})
    ok = Security.with_keys(me, {"fine": identities(tmp_path, "fine")["fine"].public_key_bytes})
    with pytest.raises(IdentityError):
        ok.with_peer_keys({"mixed": mixed_order_key(ok.peer_keys["fine"], 3)})


# --- the forged hello through a real receiver ------------------------------------------------------------


async def test_forged_hellos_with_weak_keys_are_refused_bad_key_every_time(tmp_path: Path) -> None:
    """The issue's attack: R = identity, s = 0, signed by nobody, with each weak key, several times each
    (a lax verifier accepted about one in four). Every one is answered `bad_key`, counted, and delivers
    nothing, whatever id it claims."""
    securities = key_securities(tmp_path, "node-a", "node-b")
    sink = RecordingSink()
    peers = StaticPeerDiscovery([Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32"])])
    frames = [ipv4_packet("10.8.0.2", "10.8.0.1", src_port=i, dst_port=7) for i in range(4)]
    attempts = 0
    async with Receiver(peers, sink, security=securities["node-b"], log_interval=3600.0) as rx:
        for key in weak_keys(tmp_path):
            for claimed in ("node-a", "nobody", "node-a", "node-a"):
                attempt = await attackers.claim(
                    rx.address,
                    claimed,
                    tls=attackers.attacker_tls(),
                    public_key=key,
                    sign=lambda _transcript: FORGED_SIGNATURE,
                    inject=frames,
                )
                attempts += 1
                assert attempt.answer is not None
                assert attempt.answer.reason == "bad_key", (key.hex(), attempt.answer)
                assert "cannot be trusted" in attempt.answer.text
        m = rx.metrics()
    assert m.refused == {"bad_key": attempts}
    assert m.frames == 0
    assert m.packets_delivered == 0
    assert sink.packets == []


async def test_a_refused_weak_key_is_logged_once_per_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    securities = key_securities(tmp_path, "node-b")
    peers = StaticPeerDiscovery([Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32"])])
    caplog.set_level(logging.WARNING, logger="vpn_packet.transport.receiver")
    async with Receiver(peers, RecordingSink(), security=securities["node-b"], log_interval=3600.0) as rx:
        for _ in range(5):
            await attackers.claim(
                rx.address,
                "node-a",
                tls=attackers.attacker_tls(),
                public_key=bytes(32),
                sign=lambda _transcript: FORGED_SIGNATURE,
            )
        assert rx.metrics().refused == {"bad_key": 5}
    lines = [r.getMessage() for r in caplog.records if "bad_key" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "small order" in lines[0]


# --- the verifier -----------------------------------------------------------------------------------------


def _signer() -> tuple[bytes, ed25519.Ed25519PrivateKey]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), key


def test_the_forgery_never_verifies_under_any_weak_key(tmp_path: Path) -> None:
    # 300 messages per key here; the native tests try 10,000 per small-order encoding.
    for key in weak_keys(tmp_path):
        for n in range(300):
            assert not verify_signature(key, n.to_bytes(4, "little"), FORGED_SIGNATURE)


def test_honest_signatures_verify_and_edge_cases_do_not() -> None:
    public, private = _signer()
    message = b"a hello transcript"
    signature = private.sign(message)
    assert verify_signature(public, message, signature)
    assert not verify_signature(public, message + b"!", signature)
    assert not verify_signature(public, message, signature[:63])

    # Non-canonical s: s + L is the same scalar, a second encoding a lax verifier accepts.
    s = int.from_bytes(signature[32:], "little")
    if s + L < 2**256:
        assert not verify_signature(public, message, signature[:32] + (s + L).to_bytes(32, "little"))
    assert not verify_signature(public, message, signature[:32] + b"\xff" * 32)

    # Small-order R (every encoding) with any s, and non-canonical R encodings.
    for r in small_order_keys():
        for s_bytes in (bytes(32), signature[32:]):
            assert not verify_signature(public, message, r + s_bytes)
    # R with y >= p (no canonical point has it): the encoding of y = p + 1 (the identity, again).
    assert not verify_signature(public, message, (2**255 - 18).to_bytes(32, "little") + bytes(32))


# --- keys in certificates ---------------------------------------------------------------------------------


def _certificate_with_key(public_key: bytes) -> bytes:
    """A DER certificate holding `public_key` (any 32 bytes), signed by some other key: what a server
    could present."""
    signer = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ed25519.Ed25519PublicKey.from_public_bytes(public_key))
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


class _PresentedCertificate:
    """What `check_server_key` reads of a TLS connection: the server's certificate in DER."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.der if binary_form else {}


def test_a_certificate_with_a_weak_key_is_refused_before_the_key_comparison(tmp_path: Path) -> None:
    for key in (bytes(32), mixed_order_key(generate_identity("c", tmp_path).public_key_bytes, 5)):
        der = _certificate_with_key(key)
        assert certificate_key_problem(der) is not None
        # Even when the configured key is that same weak key (as a lax config once allowed).
        with pytest.raises(ssl.SSLCertVerificationError, match="cannot be trusted"):
            check_server_key(_PresentedCertificate(der), key, "node-b")
    honest = generate_identity("h", tmp_path).public_key_bytes
    assert check_server_key(_PresentedCertificate(_certificate_with_key(honest)), honest, "node-b") == honest


def test_a_ca_mode_certificate_file_with_a_weak_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weak.pem"
    der = _certificate_with_key(bytes(32))
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    problem = certificate_file_key_problem(path)
    assert problem is not None
    assert "small order" in problem
