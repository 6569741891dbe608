"""Mutual TLS for node-to-node streams, with the standard library's `ssl` module.

Every node has a private key and a certificate whose identity (a subjectAltName DNS entry, else the subject's
common name) is its peer id. Two ways to trust peers:

- CA mode (`ca=`): peers' certificates must chain to the CA. The client dials with `server_hostname=peer_id`
  and `check_hostname=True`, so OpenSSL itself checks that the server is the peer it meant to reach; the
  server requires a client certificate and the receiver checks that its identity equals the id in the hello
  (`peer_identity`).
- Pinned mode (`pinned=` / `pinned_certs=`): the SHA-256 fingerprint of each peer's DER certificate is known
  in advance. The client does not verify a chain; after the handshake `verify_server_identity` compares the
  server's certificate fingerprint with the pins of the peer id it dialled, failing closed (no certificate,
  no pin, or a different fingerprint: refused). The server side loads the pinned certificates themselves as
  trust anchors (partial-chain verification), so only those exact certificates are accepted.

TLS 1.2 is the minimum; 1.3 is negotiated whenever both sides have it.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PinnedClientContext",
    "check_pinned",
    "client_context",
    "fingerprint",
    "identity_matches",
    "normalize_fingerprint",
    "peer_identity",
    "server_context",
    "verify_server_identity",
]

StrPath = str | os.PathLike[str]


class PinnedClientContext(ssl.SSLContext):
    """A client context that trusts peers by certificate fingerprint (see `client_context(pinned=...)`).

    `pins` maps a peer id to the SHA-256 fingerprints (lowercase hex) its certificate may have.
    """

    pins: dict[str, frozenset[str]]


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits; accepts `AB:CD:...`, spaces and upper case."""
    digits = text.replace(":", "").replace(" ", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {text!r}")
    return digits


def fingerprint(cert: bytes | StrPath) -> str:
    """SHA-256 of a certificate's DER encoding, as 64 lowercase hex digits.

    `cert` is DER bytes, PEM bytes, or the path of a PEM/DER file (the first certificate is used).
    """
    data = cert if isinstance(cert, bytes) else Path(cert).read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        start = data.index(b"-----BEGIN CERTIFICATE-----")
        end = data.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
        data = ssl.PEM_cert_to_DER_cert(data[start:end].decode("ascii"))
    return hashlib.sha256(data).hexdigest()


def _base(purpose: ssl.Purpose, cert: StrPath, key: StrPath, cls: type[ssl.SSLContext]) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER
    ctx = cls(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


def client_context(
    cert: StrPath,
    key: StrPath,
    *,
    ca: StrPath | None = None,
    pinned: Mapping[str, str | Iterable[str]] | None = None,
) -> ssl.SSLContext:
    """A client context for dialling peers: our certificate and key, and how to trust the servers.

    Exactly one of `ca` (a PEM file of trusted CA certificates) or `pinned` (peer id -> fingerprint, or
    several) must be given. Use it as `TcpStreamService(..., ssl_context=...)`.
    """
    if (ca is None) == (pinned is None):
        raise ValueError("client_context needs exactly one of ca= or pinned=")
    if pinned is not None:
        pctx = _base(ssl.Purpose.SERVER_AUTH, cert, key, PinnedClientContext)
        assert isinstance(pctx, PinnedClientContext)
        pctx.check_hostname = False
        pctx.verify_mode = (
            ssl.CERT_NONE
        )  # verified by fingerprint after the handshake (verify_server_identity)
        pins: dict[str, frozenset[str]] = {}
        for peer_id, prints in pinned.items():
            values = [prints] if isinstance(prints, str) else list(prints)
            pins[peer_id] = frozenset(normalize_fingerprint(p) for p in values)
        pctx.pins = pins
        return pctx
    ctx = _base(ssl.Purpose.SERVER_AUTH, cert, key, ssl.SSLContext)
    assert ca is not None
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = True  # identity: SAN DNS, else CN
    return ctx


def server_context(
    cert: StrPath,
    key: StrPath,
    *,
    ca: StrPath | None = None,
    pinned_certs: Iterable[StrPath] | None = None,
) -> ssl.SSLContext:
    """A server context for the receiver: our certificate and key, and a client certificate is required.

    `ca`: clients must chain to these CA certificates. `pinned_certs`: the exact certificates (PEM files)
    of the peers allowed to connect, used as trust anchors. Exactly one must be given. The receiver then
    checks that `peer_identity(ssl_object)` equals the id the client sent in its hello.
    """
    if (ca is None) == (pinned_certs is None):
        raise ValueError("server_context needs exactly one of ca= or pinned_certs=")
    ctx = _base(ssl.Purpose.CLIENT_AUTH, cert, key, ssl.SSLContext)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca is not None:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    else:
        assert pinned_certs is not None
        pems = [Path(p).read_text("ascii") for p in pinned_certs]
        if not pems:
            raise ValueError("server_context: pinned_certs is empty, no client could connect")
        ctx.load_verify_locations(cadata="\n".join(pems))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf is a trust anchor by itself
    return ctx


def peer_identity(ssl_object: Any) -> str | None:
    """The verified identity of the other side of a TLS connection: its first subjectAltName DNS entry,
    else its subject common name; None when there is no verified certificate.

    `ssl_object` is what `transport.get_extra_info("ssl_object")` returns (or an `ssl.SSLSocket`).
    """
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


def identity_matches(ssl_object: Any, peer_id: str) -> bool:
    """Whether the verified certificate of the other side is `peer_id`: one of its subjectAltName DNS entries
    equals it, or - only when it has no DNS entry - its common name does (as OpenSSL checks a host name)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return False
    dns = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if dns:
        return peer_id in dns
    return any(
        name == "commonName" and value == peer_id for rdn in cert.get("subject", ()) for name, value in rdn
    )


def check_pinned(ssl_object: Any, fingerprints: Iterable[str]) -> str:
    """Raise `ssl.SSLCertVerificationError` unless the peer's certificate has one of `fingerprints`;
    returns the fingerprint. Fails closed: no certificate, or no fingerprints, is a refusal."""
    allowed = {normalize_fingerprint(f) for f in fingerprints}
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ssl.SSLCertVerificationError("peer presented no certificate")
    actual = hashlib.sha256(der).hexdigest()
    if actual not in allowed:
        raise ssl.SSLCertVerificationError(f"peer certificate fingerprint {actual} is not pinned")
    return actual


def verify_server_identity(ctx: ssl.SSLContext, ssl_object: Any, peer_id: str) -> None:
    """After a client handshake: check that the server is `peer_id`. Raises `ssl.SSLCertVerificationError`.

    Pinned contexts: the certificate fingerprint must be one of the pins of `peer_id` (no pin: refused).
    CA contexts: OpenSSL already checked the chain and the name; this checks the identity once more.
    """
    if isinstance(ctx, PinnedClientContext):
        pins = ctx.pins.get(peer_id)
        if not pins:
            raise ssl.SSLCertVerificationError(f"no pinned certificate for peer {peer_id!r}")
        check_pinned(ssl_object, pins)
        return
    if not identity_matches(ssl_object, peer_id):
        raise ssl.SSLCertVerificationError(
            f"server identity {peer_identity(ssl_object)!r} does not match the peer id {peer_id!r} "
            "it was dialled as"
        )
