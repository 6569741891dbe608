"""Throwaway node identities for tests: every node trusting every other by key, or through a test CA.

sec = key_securities(tmp_path, "node-a", "node-b")      # {"node-a": Security, "node-b": Security}
Node(sec["node-a"], ...), Receiver(..., security=sec["node-b"])

sec = ca_securities(tmp_path, "node-a", "node-b")       # mutual TLS from a fresh CA
INSECURE = Security.insecure(...)                        # for tests that are not about authentication
"""

from __future__ import annotations

from pathlib import Path

from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity, generate_identity

__all__ = ["ca_securities", "identities", "key_securities"]


def identities(directory: Path, *names: str) -> dict[str, NodeIdentity]:
    """A fresh key file per name, each in its own folder under `directory` (names may repeat across calls)."""
    out: dict[str, NodeIdentity] = {}
    for name in names:
        folder = Path(directory) / f"keys-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = generate_identity(name, folder, force=True)
    return out


def key_securities(directory: Path, *names: str) -> dict[str, Security]:
    """Key-mode `Security` for each name, each trusting all the others by public key."""
    ids = identities(directory, *names)
    return {
        name: Security.with_keys(
            identity, {other: o.public_key_bytes for other, o in ids.items() if other != name}
        )
        for name, identity in ids.items()
    }


def ca_securities(directory: Path, *names: str) -> dict[str, Security]:
    """CA-mode `Security` for each name, from a fresh test CA (`vpn_packet.testutil.certs`)."""
    from vpn_packet.testutil.certs import write_test_pki

    pki = write_test_pki(Path(directory) / "pki", list(names))
    return {
        name: Security.with_ca(name, creds.cert, creds.key, pki.ca_cert) for name, creds in pki.nodes.items()
    }
