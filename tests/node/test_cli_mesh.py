"""`vpn-packet genkey authority`, `sign` and `revoke` (issue 21 item 1): the files they write verify under
the authority's public key string; bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vpn_packet.cli import build_parser, main
from vpn_packet.mesh.membership import (
    decode_record_text,
    read_record_file,
    verify_membership,
    verify_revocation,
)
from vpn_packet.transport.identity import decode_public_key
from vpn_packet.tuning import MEMBERSHIP_DAYS


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def keyfiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """name -> public key string, with the key files in tmp_path."""
    out = {}
    for name in ("authority", "node-a", "other-authority"):
        status, stdout, _ = _run(capsys, "genkey", name, "--dir", str(tmp_path))
        assert status == 0
        out[name] = stdout.splitlines()[-1]
    return out


def test_genkey_help_says_an_authority_key_is_a_node_key_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["genkey", "--help"])
    assert "authority key is a\nnode key file" in capsys.readouterr().out


def test_sign_with_a_key_file_writes_a_membership_the_authority_s_string_verifies(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "node-a.member"
    before = int(time.time())
    status, _, err = _run(
        capsys,
        "sign",
        "--authority", str(tmp_path / "authority.key"),
        "--key", str(tmp_path / "node-a.key"),
        "--id", "node-a",
        "--allowed-ips", "10.8.0.1/32, fd00::1/128",
        "--out", str(out),
    )  # fmt: skip
    after = int(time.time())
    assert status == 0, err
    assert "membership of node-a" in err
    authority = decode_public_key(keyfiles["authority"])
    membership = verify_membership(read_record_file(out), {authority}, time.time())
    assert membership.public_key == decode_public_key(keyfiles["node-a"])
    assert membership.allowed_ips == ("10.8.0.1/32", "fd00::1/128")
    assert before <= membership.issued <= after
    assert membership.expires - membership.issued == MEMBERSHIP_DAYS * 86_400


def test_sign_with_a_public_key_string_and_a_validity(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "remote.member"
    status, _, err = _run(
        capsys,
        "sign",
        "--authority", str(tmp_path / "authority.key"),
        "--public-key", keyfiles["node-a"],
        "--id", "remote",
        "--allowed-ips", "10.8.0.7/32",
        "--expires", "365",
        "--out", str(out),
    )  # fmt: skip
    assert status == 0, err
    membership = verify_membership(
        read_record_file(out), {decode_public_key(keyfiles["authority"])}, time.time()
    )
    assert membership.id == "remote"
    assert membership.expires - membership.issued == 365 * 86_400


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--expires": "366"}, "1..365 days"),
        ({"--allowed-ips": "10.8.0.1/24"}, "host bits"),
        ({"--id": ""}, "id"),
        ({"--public-key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "small order"),
        ({"--public-key": "AUTHORITY"}, "authority's own"),
    ],
)
def test_sign_refuses_bad_input_on_one_line(
    tmp_path: Path,
    keyfiles: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    options = {
        "--authority": str(tmp_path / "authority.key"),
        "--public-key": keyfiles["node-a"],
        "--id": "node-a",
        "--allowed-ips": "10.8.0.1/32",
        "--out": str(tmp_path / "x.member"),
        **change,
    }
    if options["--public-key"] == "AUTHORITY":
        options["--public-key"] = keyfiles["authority"]
    status, _, err = _run(capsys, "sign", *[part for pair in options.items() for part in pair])
    assert status == 2
    assert len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "x.member").exists()


def test_sign_refuses_the_authority_s_own_key_file_as_the_member(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    authority = str(tmp_path / "authority.key")
    status, _, err = _run(
        capsys, "sign", "--authority", authority, "--key", authority, "--id", "a",
        "--allowed-ips", "10.8.0.1/32", "--out", str(tmp_path / "x.member"),
    )  # fmt: skip
    assert status == 2
    assert "authority's own" in err


def test_revoke_by_id_and_by_key(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    authorities = {decode_public_key(keyfiles["authority"])}
    by_id, by_key = tmp_path / "a.revoked", tmp_path / "k.revoked"
    status, _, err = _run(
        capsys,
        "revoke",
        "--authority",
        str(tmp_path / "authority.key"),
        "--id",
        "node-a",
        "--out",
        str(by_id),
    )
    assert status == 0, err
    assert verify_revocation(read_record_file(by_id), authorities, time.time()).id == "node-a"
    status, _, err = _run(
        capsys,
        "revoke", "--authority", str(tmp_path / "authority.key"), "--public-key", keyfiles["node-a"],
        "--out", str(by_key),
    )  # fmt: skip
    assert status == 0, err
    revocation = verify_revocation(read_record_file(by_key), authorities, time.time())
    assert revocation.public_key == decode_public_key(keyfiles["node-a"])
    # Another authority's revocation is no revocation here.
    other = {decode_public_key(keyfiles["other-authority"])}
    with pytest.raises(ValueError, match="no configured authority"):
        verify_revocation(read_record_file(by_id), other, time.time())


def test_revoke_needs_exactly_one_target(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    authority = str(tmp_path / "authority.key")
    out = str(tmp_path / "x.revoked")
    assert _run(capsys, "revoke", "--authority", authority, "--out", out)[0] == 2
    both = ("--id", "a", "--public-key", keyfiles["node-a"])
    assert _run(capsys, "revoke", "--authority", authority, *both, "--out", out)[0] == 2
    status, _, err = _run(
        capsys, "revoke", "--authority", authority, "--public-key", "nonsense", "--out", out
    )
    assert status == 2
    assert len(err.splitlines()) == 1


def test_revoke_without_a_destination_writes_the_record_to_stdout(
    tmp_path: Path, keyfiles: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The contract's form, `revoke --authority A --id ID`: the signed record on stdout (for a pipe)."""
    authority = str(tmp_path / "authority.key")
    status, out, err = _run(capsys, "revoke", "--authority", authority, "--id", "node-a")
    assert status == 0, err
    record = decode_record_text(out, "stdout")
    authorities = {decode_public_key(keyfiles["authority"])}
    assert verify_revocation(record, authorities, time.time()).id == "node-a"
