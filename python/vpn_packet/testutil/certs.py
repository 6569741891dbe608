"""Throwaway PKI for tests and the demo: a CA and node certificates, made with the `cryptography` package.

For CA mode (`vpn_packet.transport.handshake.Security.with_ca`; `vpn_packet.testutil.keys.ca_securities`
builds the `Security` objects from it). Key mode needs no PKI: see `vpn_packet.testutil.keys`.

`cryptography` is a test dependency (the `test` extra), not a runtime one: import this module only where it
is installed. Keys are ECDSA P-256 (fast to generate); certificates are valid from an hour ago for a day.

    pki = write_test_pki(tmp_path, ["node-a", "node-b"])
    pki.ca_cert, pki.nodes["node-a"].cert, pki.nodes["node-a"].key
    CertificateAuthority().issue("two-names", tmp_path, names=["node-a", "node-b"])  # several SAN names
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "NodeCredentials", "TestPki", "write_test_pki"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class NodeCredentials:
    """A node's certificate and key files (PEM)."""

    peer_id: str
    cert: Path
    key: Path


@dataclass
class CertificateAuthority:
    """A self-signed CA that issues node certificates."""

    name: str = "vpn-packet test CA"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        start, end = _validity()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        peer_id: str,
        directory: Path,
        *,
        san: bool = True,
        common_name: str | None = None,
        names: Sequence[str] | None = None,
    ) -> NodeCredentials:
        """Write `<peer_id>.crt` and `<peer_id>.key` to `directory`: a certificate usable as client and
        server, whose subjectAltName DNS entries are `names` (default: `[peer_id]`; none when `san` is
        False) and whose common name is `common_name` (default: `peer_id`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = _validity()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name or peer_id))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        dns = list(names) if names is not None else [peer_id]
        if san and dns:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name) for name in dns]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(directory, peer_id, cert, key)

    def write(self, directory: Path) -> Path:
        """Write the CA certificate (PEM) to `directory/ca.crt`; returns the path."""
        path = Path(directory) / "ca.crt"
        path.write_bytes(self.cert_pem)
        return path


def _write(
    directory: Path, peer_id: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> NodeCredentials:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{peer_id}.crt"
    key_path = directory / f"{peer_id}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return NodeCredentials(peer_id, cert_path, key_path)


@dataclass(frozen=True)
class TestPki:
    """A CA certificate file and the credentials of each node it issued."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    nodes: dict[str, NodeCredentials]


def write_test_pki(directory: Path, peer_ids: list[str], *, ca_name: str = "vpn-packet test CA") -> TestPki:
    """A fresh CA and one certificate per peer id, as PEM files in `directory`."""
    ca = CertificateAuthority(ca_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = ca.write(directory)
    return TestPki(ca_path, {peer_id: ca.issue(peer_id, directory) for peer_id in peer_ids})
