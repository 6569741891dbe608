"""TLS for node-to-node connections, with the standard library's `ssl` module: the contexts, and the one
rule that says whom a certificate names.

Two ways to trust peers (`vpn_packet.transport.handshake.Security` picks one):

- Key mode (the default): each node has an Ed25519 key and a self-signed certificate that only carries it
  (`vpn_packet.transport.identity`). TLS 1.3 only. The client does not check a chain or a name: after the
  handshake it checks that the server's certificate holds the public key configured for the peer it
  dialled (`check_server_key`, fail closed). The server asks for no client certificate: the client proves
  its key by signing the hello (see `handshake`). TLS gives secrecy and the server's proof of its key.
- CA mode: certificates issued by a CA. Both sides verify the chain; the client dials with
  `server_hostname=peer_id` and `check_hostname=True`, so OpenSSL checks that the server is the peer it
  meant to reach; the server requires a client certificate, and the receiver checks that it names the id
  the hello claims, and no other peer (`certificate_names`).

TLS 1.2 is the minimum in CA mode (1.3 is negotiated whenever both sides have it); key mode needs 1.3,
which every OpenSSL that signs with Ed25519 has.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from vpn_packet.transport.identity import (
    NodeIdentity,
    certificate_key_problem,
    certificate_public_key,
    encode_public_key,
    key_problem,
)

__all__ = [
    "ca_client_context",
    "ca_server_context",
    "certificate_names",
    "check_server_key",
    "key_client_context",
    "key_server_context",
    "verify_server_name",
]

StrPath = str | os.PathLike[str]


def certificate_names(cert: dict[str, Any] | None) -> list[str]:
    """The identities a certificate (as `getpeercert()` decodes it) names: its subjectAltName DNS entries,
    or, only when it has none, its subject common names (RFC 6125, and what OpenSSL's host name check does
    with `hostname_checks_common_name`). The one place this rule lives."""
    if not cert:
        return []
    dns = [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if dns:
        return dns
    return [str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]


def _context(protocol: int, minimum: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = minimum
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET  # no resumption: every connection proves keys
    return ctx


def key_server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """The receiving side in key mode: presents this node's certificate, asks none from clients."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ssl.TLSVersion.TLSv1_3)
    ctx.load_cert_chain(os.fspath(identity.path))
    ctx.verify_mode = ssl.CERT_NONE  # clients prove their key in the signed hello
    return ctx


def key_client_context(identity: NodeIdentity) -> ssl.SSLContext:
    """The sending side in key mode: no chain or name check in TLS; `check_server_key` checks the key."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ssl.TLSVersion.TLSv1_3)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # checked by value right after the handshake (check_server_key)
    return ctx


def check_server_key(ssl_object: Any, expected: bytes, peer_id: str) -> bytes:
    """After a key-mode client handshake: the server's certificate must hold `expected` (the raw public key
    configured for `peer_id`), a key that passes the strict check (`key_problem`, checked before the
    comparison). Returns it; raises `ssl.SSLCertVerificationError` otherwise (fail closed)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    actual = certificate_public_key(der)
    if actual is None:
        raise ssl.SSLCertVerificationError(f"{peer_id} presented no Ed25519 key")
    problem = key_problem(actual)
    if problem is not None:
        raise ssl.SSLCertVerificationError(f"{peer_id} presented a key that cannot be trusted: {problem}")
    if actual != expected:
        raise ssl.SSLCertVerificationError(
            f"{peer_id} presented key {encode_public_key(actual)}, but its configured public_key is "
            f"{encode_public_key(expected)}"
        )
    return actual


def ca_client_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """The sending side in CA mode: our certificate, and servers must chain to `ca` and be the peer dialled
    (`server_hostname=peer_id`)."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ssl.TLSVersion.TLSv1_2)
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = True  # the same rule as certificate_names
    return ctx


def ca_server_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """The receiving side in CA mode: our certificate, and a client certificate chained to `ca` required."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ssl.TLSVersion.TLSv1_2)
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def verify_server_name(ssl_object: Any, peer_id: str) -> None:
    """After a CA-mode client handshake: the server's certificate names `peer_id` (OpenSSL checked the
    name already; this repeats the check with `certificate_names`, so the rule cannot drift), and an Ed25519
    key in it passes the strict check (`certificate_key_problem`)."""
    problem = certificate_key_problem(ssl_object.getpeercert(binary_form=True) if ssl_object else None)
    if problem is not None:
        raise ssl.SSLCertVerificationError(
            f"{peer_id}'s certificate holds a key that cannot be trusted: {problem}"
        )
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    names = certificate_names(cert)
    if peer_id not in names:
        raise ssl.SSLCertVerificationError(
            f"server certificate names {', '.join(names) or 'nobody'}, not the peer id {peer_id!r} it was "
            "dialled as"
        )
