"""A node's identity: an Ed25519 key pair, shaped like WireGuard's keys, on the standard `ssl` machinery.

`vpn-packet genkey NAME` writes one PEM file (mode 0600) holding the private key (PKCS#8) and a self-signed
certificate for it. The certificate exists only because TLS servers must present one: nothing trusts it by
its name, its issuer or its dates. A peer is trusted by its **public key string**: the raw 32-byte Ed25519
public key in standard base64, 44 characters, the same shape as a WireGuard key (`vpn-packet pubkey FILE`
prints it). Why Ed25519: small keys that fit that string, fast signatures, deterministic (no nonce to get
wrong), and supported by OpenSSL 1.1.1+ in TLS 1.3.

How a connection proves both ends (the wire messages are in `vpn_packet.transport.handshake`):

- the server presents its certificate in the TLS handshake; the client checks that the certificate's
  public key is the one configured for the peer it dialled (`check_server_key`): TLS itself proves that the
  server holds the matching private key;
- the client proves its key in the hello: it signs `hello_transcript(...)`, which covers a fresh random nonce
  the server sent first (no replay), the server's public key as the client verified it (a signature made
  for one server is useless to any other), the client's id, epoch and public key. The receiver looks the
  public key up among its peers' keys; the claimed id is only a label.

Keys and signatures are checked strictly, wherever a key is read (a config, a key file, a hello, a
certificate): a public key must be a canonical encoding of a point in Ed25519's prime-order subgroup, and a
signature must have a canonical `s` and a `R` not of small order. Plain Ed25519 (OpenSSL's, so
`cryptography`'s) accepts the small-order keys, such as 32 zero bytes, under which anyone can forge a
signature without a private key. The rules and the verifier are native (`rust/core/src/ed25519.rs`, one
verifier for the whole project); `key_problem` and `verify_signature` here call them.

This module reads and writes key files with the `cryptography` package (well kept, and already what the
Python world uses for X.509); TLS contexts are built in `vpn_packet.transport.tls`.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from vpn_packet._native import PUBLIC_KEY_LEN, SIGNATURE_LEN, public_key_problem
from vpn_packet._native import verify_signature as _verify_strict
from vpn_packet.errors import IdentityError

__all__ = [
    "KEY_FILE_SUFFIX",
    "PUBLIC_KEY_LEN",
    "SIGNATURE_LEN",
    "IdentityError",
    "NodeIdentity",
    "certificate_file_key_problem",
    "certificate_key_problem",
    "certificate_public_key",
    "decode_public_key",
    "encode_public_key",
    "generate_identity",
    "key_problem",
    "load_identity",
    "verify_signature",
]

KEY_FILE_SUFFIX: Final = ".key"
_PEM_KEY_MARK: Final = b"-----BEGIN PRIVATE KEY-----"
_PEM_CERT_MARK: Final = b"-----BEGIN CERTIFICATE-----"
# The certificate is a container for the key, not a credential: valid from the epoch to the end of X.509
# time, so that no clock skew or expiry ever breaks a tunnel (trust is the key, checked by value).
_NOT_BEFORE: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER: Final = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def encode_public_key(raw: bytes) -> str:
    """The public key string of 32 raw Ed25519 public key bytes (standard base64, 44 characters)."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise IdentityError(f"an Ed25519 public key has {PUBLIC_KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def key_problem(raw: bytes) -> str | None:
    """Why the raw public key `raw` cannot be trusted, in one sentence (wrong length, not a point, not
    canonical, small order, mixed order); None when it is a key. The one check for every key read."""
    return public_key_problem(raw)


def decode_public_key(text: str) -> bytes:
    """The 32 raw bytes of a public key string; `IdentityError` says what is wrong with a bad one, including
    a key that decodes but cannot be trusted (`key_problem`)."""
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(
            f"{text!r} is not a public key (expected 44 characters of base64, as `vpn-packet genkey` prints)"
        ) from None
    if len(raw) != PUBLIC_KEY_LEN:
        raise IdentityError(
            f"{text!r} decodes to {len(raw)} bytes; a public key is {PUBLIC_KEY_LEN} bytes "
            "(44 characters of base64, as `vpn-packet genkey` prints)"
        )
    problem = key_problem(raw)
    if problem is not None:
        raise IdentityError(f"{stripped!r} is not a usable public key: {problem}")
    return raw


def certificate_public_key(der: bytes | None) -> bytes | None:
    """The raw Ed25519 public key of a DER certificate (as TLS presented it), or None when there is no
    certificate, it does not parse, or its key is not Ed25519."""
    if not der:
        return None
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_key_problem(der: bytes | None) -> str | None:
    """Why a certificate's Ed25519 key cannot be trusted (`key_problem`); None when it can, and for keys of
    other types (a CA may issue ECDSA or RSA certificates: OpenSSL checks that an ECDSA key is a point of
    its curve, and P-256's cofactor of 1 leaves no small subgroup; RSA has no such weakness)."""
    raw = certificate_public_key(der)
    return None if raw is None else key_problem(raw)


def certificate_file_key_problem(path: str | os.PathLike[str]) -> str | None:
    """`certificate_key_problem` of the first certificate in a PEM file (CA mode's `[tls] cert`); None also
    when the file holds no readable certificate (loading it into TLS says why)."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return certificate_key_problem(cert.public_bytes(serialization.Encoding.DER))


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is a strict Ed25519 signature of `message` by `public_key` (32 raw bytes): the
    key passes `key_problem`, `s` is canonical, `R` is not of small order, and the equation holds."""
    return _verify_strict(public_key, message, signature)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A loaded key file: the name it was made for, its public key, and the means to sign.

    `path` is the PEM file (private key + certificate) that `ssl.SSLContext.load_cert_chain` takes as is.
    The private key is kept out of `repr`.
    """

    path: Path
    name: str
    public_key_bytes: bytes
    _private_key: ed25519.Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def public_key(self) -> str:
        """The public key string peers put in their config (`public_key = "..."`)."""
        return encode_public_key(self.public_key_bytes)

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of `message`."""
        return self._private_key.sign(message)


def _certificate(name: str, key: ed25519.Ed25519PrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    return builder.sign(key, None)  # Ed25519 signs without a separate hash


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > 255 or "/" in name or name in (".", "..") or not name.isprintable():
        raise IdentityError(
            f"{name!r} is not a usable node name (1..255 bytes, printable, no '/'): it names the key file"
        )


def generate_identity(
    name: str, directory: str | os.PathLike[str] = ".", *, force: bool = False
) -> NodeIdentity:
    """Writes `DIRECTORY/NAME.key` (private key and self-signed certificate, PEM, mode 0600) and returns it.

    The file is created with mode 0600 from the first byte (never world-readable, not even briefly) and
    an existing file is refused unless `force` (a key overwritten by mistake locks a node out of every peer).
    """
    _check_name(name)
    path = Path(directory) / f"{name}{KEY_FILE_SUFFIX}"
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + _certificate(name, key).public_bytes(serialization.Encoding.PEM)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} exists already; keep it, or pass --force to replace it") from None
    try:
        os.fchmod(fd, 0o600)  # also when --force replaced a file that had looser permissions
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return load_identity(path)


def load_identity(path: str | os.PathLike[str]) -> NodeIdentity:
    """Reads a key file written by `generate_identity` (`vpn-packet genkey`).

    Refuses a file that others can read (group or world permission bits), as ssh does for private keys:
    a leaked key lets anyone pose as this node.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{path}: {exc.strerror or exc}") from None
    # What the file is comes first: advising `chmod 600` for a file that is no key at all (a config
    # given by mistake) sends the user the wrong way (issue 22).
    if _PEM_KEY_MARK not in data or _PEM_CERT_MARK not in data:
        raise IdentityError(
            f"{path}: not a key file written by `vpn-packet genkey` (PEM key and certificate)"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path}: permissions {stat.filemode(mode)} let others read the private key; run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
        cert = x509.load_pem_x509_certificate(data[data.index(_PEM_CERT_MARK) :])
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{path}: unreadable key file ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path}: the private key is not Ed25519 (make one with `vpn-packet genkey`)")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if certificate_public_key(cert.public_bytes(serialization.Encoding.DER)) != raw:
        raise IdentityError(f"{path}: the certificate is not the one of this private key")
    problem = key_problem(raw)
    if problem is not None:  # a key derived from a private key always passes; a crafted file may not
        raise IdentityError(f"{path}: the public key cannot be trusted: {problem}")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else path.stem
    return NodeIdentity(path, name, raw, key)
