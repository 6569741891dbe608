"""`vpn-packet genkey` and `vpn-packet pubkey`: a node identity written with mode 0600, its public key string
printed last, printed again by pubkey; an existing key is kept unless --force; a key file others can read
is refused with the chmod to run. Also `vpn-packet --version`."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from vpn_packet.cli import main
from vpn_packet.transport.identity import load_identity


def _genkey(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["genkey", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_genkey_writes_a_private_file_and_prints_the_public_key_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _err = _genkey(capsys, "node-a", "--dir", str(tmp_path))
    assert status == 0
    path = tmp_path / "node-a.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public_key = out.splitlines()[-1]
    assert len(public_key) == 44
    assert len(base64.b64decode(public_key, validate=True)) == 32
    identity = load_identity(path)
    assert identity.public_key == public_key
    assert identity.name == "node-a"
    assert os.listdir(tmp_path) == ["node-a.key"]

    assert main(["pubkey", str(path)]) == 0
    assert capsys.readouterr().out == f"{public_key}\n"


def test_every_genkey_makes_a_new_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = set()
    for name in ("a", "b", "c"):
        status, out, _err = _genkey(capsys, name, "--dir", str(tmp_path))
        assert status == 0
        keys.add(out.splitlines()[-1])
    assert len(keys) == 3


def test_genkey_keeps_an_existing_key_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _err = _genkey(capsys, "node-a", "--dir", str(tmp_path))
    assert status == 0
    first = out.splitlines()[-1]
    path = tmp_path / "node-a.key"
    content = path.read_bytes()

    status, out, err = _genkey(capsys, "node-a", "--dir", str(tmp_path))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("vpn-packet genkey: error: ")
    assert str(path) in err
    assert "--force" in err
    assert path.read_bytes() == content  # untouched

    path.chmod(0o644)  # --force also tightens a file whose mode was loosened
    status, out, _err = _genkey(capsys, "node-a", "--dir", str(tmp_path), "--force")
    assert status == 0
    second = out.splitlines()[-1]
    assert second != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).public_key == second


def test_pubkey_refuses_a_key_file_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _genkey(capsys, "node-a", "--dir", str(tmp_path))[0] == 0
    path = tmp_path / "node-a.key"
    path.chmod(0o644)
    assert main(["pubkey", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("vpn-packet pubkey: error: ")
    assert f"chmod 600 {path}" in captured.err
    path.chmod(0o600)
    assert main(["pubkey", str(path)]) == 0


@pytest.mark.parametrize("content", [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\ngarbage\n"])
def test_pubkey_refuses_what_genkey_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "other.key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert main(["pubkey", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(path) in err


def test_pubkey_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pubkey", str(tmp_path / "absent.key")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "absent.key" in err


@pytest.mark.parametrize("name", ["", "a/b", ".."])
def test_genkey_refuses_a_name_that_is_not_a_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    status, out, err = _genkey(capsys, name, "--dir", str(tmp_path))
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vpn-packet {version('vpn-packet')}\n"


def test_pubkey_of_a_config_file_says_it_is_not_a_key_before_any_chmod_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 22: `vpn-packet pubkey node-a.toml` (mode 0644, as configs are) advised `chmod 600` first."""
    path = tmp_path / "node-a.toml"
    path.write_text('[interface]\nname = "vpn0"\n')
    path.chmod(0o644)
    assert main(["pubkey", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"vpn-packet pubkey: error: {path}: not a key file written by `vpn-packet genkey` "
        "(PEM key and certificate)\n"
    )
    assert "chmod" not in err
