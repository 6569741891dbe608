"""Node identities (keys like WireGuard's) and the receiving side's verdict on a hello."""

from __future__ import annotations

import base64
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from vpn_packet.errors import HandshakeRefusedError, is_handshake_refused_error, is_retriable_error
from vpn_packet.transport.identity import (
    IdentityError,
    NodeIdentity,
    decode_public_key,
    encode_public_key,
    generate_identity,
    load_identity,
    verify_signature,
)


def test_generate_writes_0600_and_round_trips(tmp_path: Path) -> None:
    identity = generate_identity("node-a", tmp_path)
    path = tmp_path / "node-a.key"
    assert identity.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(identity.public_key) == 44
    assert len(base64.b64decode(identity.public_key)) == 32
    again = load_identity(path)
    assert again.public_key == identity.public_key
    assert again.name == "node-a"
    assert "PRIVATE" not in repr(again)
    assert "_private_key" not in repr(again)


def test_generate_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = generate_identity("n", tmp_path)
    with pytest.raises(IdentityError, match="exists already"):
        generate_identity("n", tmp_path)
    assert load_identity(first.path).public_key == first.public_key
    os.chmod(first.path, 0o644)
    second = generate_identity("n", tmp_path, force=True)
    assert second.public_key != first.public_key
    assert stat.S_IMODE(second.path.stat().st_mode) == 0o600


def test_load_refuses_readable_by_others_and_garbage(tmp_path: Path) -> None:
    identity = generate_identity("n", tmp_path)
    os.chmod(identity.path, 0o640)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(identity.path)
    junk = tmp_path / "junk.key"
    junk.write_bytes(b"not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(IdentityError, match="not a key file"):
        load_identity(junk)
    with pytest.raises(IdentityError, match="No such file"):
        load_identity(tmp_path / "missing.key")


@pytest.mark.parametrize("bad", ["", "abc", "!" * 44, base64.b64encode(b"x" * 31).decode()])
def test_public_key_strings_are_checked(bad: str) -> None:
    with pytest.raises(IdentityError, match="public key"):
        decode_public_key(bad)
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert decode_public_key(encode_public_key(raw)) == raw
    # 32 random bytes are rarely a key: about half are no curve point, and 7 in 8 points have a torsion part.
    with pytest.raises(IdentityError, match="not a usable public key"):
        decode_public_key(encode_public_key(bytes(32)))


def _identities(tmp_path: Path, *names: str) -> list[NodeIdentity]:
    out = []
    for name in names:
        directory = tmp_path / name
        directory.mkdir()
        out.append(generate_identity(name, directory))
    return out


def test_verify_signature_rejects_wrong_sizes() -> None:
    assert not verify_signature(b"x" * 31, b"m", b"s" * 64)
    assert not verify_signature(b"x" * 32, b"m", b"s" * 63)


def test_handshake_refused_error_reads_well_and_classifies() -> None:
    exc = HandshakeRefusedError("node-b", "key_mismatch", "your key is not ...", local_id="node-a")
    assert str(exc).startswith("node-b refused us: our key is not the one it has for node-a")
    assert is_handshake_refused_error(exc)
    assert not is_retriable_error(exc)
    assert is_retriable_error(HandshakeRefusedError("node-b", "too_many_connections"))
    outer = RuntimeError("wrapped")
    outer.__cause__ = exc
    assert is_handshake_refused_error(outer)

    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == str(exc)
    assert back.reason == "key_mismatch"
