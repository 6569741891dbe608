"""The built distributions (issue 14), as CI builds them with packaging/build-wheel and tests them:
`VPN_PACKET_SDIST` and `VPN_PACKET_WHEEL` name the files, and the wheel is installed in the environment
running these tests (without Rust on PATH). Where the variables are unset (a developer's editable install),
these tests skip, saying so; .ci/run sets them.

- The sdist carries what building and testing it from a clean unpack needs: the crates and Cargo.lock, the
  Python sources, every test of this tree, the examples, the systemd unit, LICENSE, README and CHANGELOG.
- The wheel is the one wheel for every CPython from 3.11 (abi3) on glibc 2.17 and later (manylinux2014),
  and carries the license.
- The package these tests import is that wheel's, installed in site-packages, not the source tree.
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

import vpn_packet
from vpn_packet import _native

ROOT = Path(__file__).resolve().parents[2]
WHEEL_TAG = "cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64"


def _artifact(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: no built distribution to check (.ci/run sets it)")
    path = Path(value)
    assert path.is_file(), f"{variable}={value} is not a file"
    return path


def _sdist_members() -> set[str]:
    sdist = _artifact("VPN_PACKET_SDIST")
    with tarfile.open(sdist) as tar:
        names = [member.name for member in tar.getmembers() if member.isfile()]
    prefix = names[0].split("/", 1)[0] + "/"
    assert all(name.startswith(prefix) for name in names)
    return {name.removeprefix(prefix) for name in names}


def _tree_files(directory: str, suffixes: tuple[str, ...]) -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / directory).rglob("*")
        if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts
    }


def test_sdist_has_what_a_build_and_the_tests_need() -> None:
    members = _sdist_members()
    required = {
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "Cargo.toml",
        "Cargo.lock",
        "PKG-INFO",
        "rust/core/Cargo.toml",
        "rust/core/src/lib.rs",
        "rust/python/Cargo.toml",
        "rust/python/src/lib.rs",
        "python/vpn_packet/__init__.py",
        "python/vpn_packet/_native.pyi",
        "python/vpn_packet/py.typed",
        "packaging/pep517/vpn_packet_build.py",
        "packaging/systemd/vpn-packet@.service",
        "examples/node-a.toml",
        "examples/node-b.toml",
    }
    assert required <= members, sorted(required - members)
    tests = _tree_files("tests", (".py", ".md"))
    assert tests <= members, sorted(tests - members)
    assert _tree_files("rust", (".rs", ".toml")) <= members
    docs = _tree_files("docs", (".md",))  # the contracts the code and README cite (issue 22)
    assert {"docs/config.md", "docs/status-json.md", "docs/extraction.md"} <= docs <= members, sorted(
        docs - members
    )
    assert not [name for name in members if "__pycache__" in name or name.endswith(".pyc")]


def test_wheel_is_abi3_manylinux2014_with_the_license() -> None:
    wheel = _artifact("VPN_PACKET_WHEEL")
    assert wheel.name == f"vpn_packet-{vpn_packet.__version__}-{WHEEL_TAG}.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = f"vpn_packet-{vpn_packet.__version__}.dist-info"
        wheel_file = archive.read(f"{dist_info}/WHEEL").decode()
    assert {
        "vpn_packet/_native.abi3.so",
        "vpn_packet/_native.pyi",
        "vpn_packet/py.typed",
        f"{dist_info}/licenses/LICENSE",
    } <= names
    assert {"Tag: cp311-abi3-manylinux2014_x86_64", "Tag: cp311-abi3-manylinux_2_17_x86_64"} <= set(
        wheel_file.splitlines()
    )


def test_tests_run_against_the_installed_wheel() -> None:
    _artifact("VPN_PACKET_WHEEL")
    package = Path(vpn_packet.__file__).resolve().parent
    assert "site-packages" in package.parts
    assert not package.is_relative_to(ROOT), f"vpn_packet imported from the source tree: {package}"
    direct_url = json.loads(distribution("vpn-packet").read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable", False), direct_url
    assert Path(_native.__file__).resolve().parent == package
