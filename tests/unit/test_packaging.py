"""Packaging (issue 14): what a package index shows and what a source build does, checked on the installed
package and the source tree (a checkout or an unpacked sdist) these tests run from.

- One version, `version` in the workspace Cargo.toml: the installed metadata, `vpn_packet.__version__`,
  `vpn-packet --version` and the changelog all say it.
- The metadata an index page needs: license expression and file, project URLs, classifiers, keywords.
- The native module is built for the stable ABI (`*.abi3.so`): one wheel serves CPython 3.11 and later.
- Building from source without Rust stops with one line saying so (packaging/pep517/vpn_packet_build.py),
  instead of maturin's silent toolchain download.
- The sdist is configured to carry the tests, examples, license and changelog.

The built sdist and wheel themselves are checked by test_packaging_dist.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import metadata, version
from pathlib import Path
from typing import Any

import pytest

import vpn_packet
from vpn_packet import _native
from vpn_packet.cli import main

ROOT = Path(__file__).resolve().parents[2]
BACKEND_DIR = ROOT / "packaging" / "pep517"
DISTRIBUTION = "vpn-packet"


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / name).read_text())


def _cargo_version() -> str:
    version_: str = _toml("Cargo.toml")["workspace"]["package"]["version"]
    return version_


# --- one version ------------------------------------------------------------------------------------------


def test_the_version_is_declared_once_in_the_workspace_cargo_toml() -> None:
    project = _toml("pyproject.toml")["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    for crate in ("rust/core/Cargo.toml", "rust/python/Cargo.toml"):
        assert _toml(crate)["package"]["version"] == {"workspace": True}, crate


def test_installed_metadata_and_module_report_the_cargo_version() -> None:
    assert version(DISTRIBUTION) == _cargo_version()
    assert vpn_packet.__version__ == _native.__version__ == _cargo_version()


def test_version_option_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vpn-packet {_cargo_version()}\n"


def test_installed_command_prints_the_version() -> None:
    command = Path(sys.executable).parent / "vpn-packet"  # the console script of this environment
    result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"vpn-packet {_cargo_version()}\n", "")


def test_changelog_has_a_section_for_the_version() -> None:
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings, "CHANGELOG.md has no version sections"
    assert headings[0].startswith(f"## {_cargo_version()} "), headings[0]


# --- metadata for an index page ---------------------------------------------------------------------------


def test_license_is_mit_with_the_file() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The vpn-packet authors" in text
    assert _toml("Cargo.toml")["workspace"]["package"]["license"] == "MIT"
    meta = metadata(DISTRIBUTION)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]


def test_metadata_has_urls_classifiers_and_keywords() -> None:
    meta = metadata(DISTRIBUTION)
    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values()), urls
    classifiers = set(meta.get_all("Classifier") or [])
    python = "Programming Language :: Python :: "
    python_versions = {c.removeprefix(python) for c in classifiers if c.startswith(python + "3.")}
    assert {"3.11", "3.12", "3.13"} <= python_versions
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    # The license is the License-Expression (PEP 639); PyPI refuses "License ::" classifiers beside one.
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert {"vpn", "packet"} <= set((meta["Keywords"] or "").split(","))
    assert meta["Requires-Python"] == ">=3.11"


# --- one wheel for 3.11 and later -------------------------------------------------------------------------


def test_native_module_is_built_for_the_stable_abi() -> None:
    assert Path(_native.__file__).name == "_native.abi3.so"
    pyo3 = _toml("rust/python/Cargo.toml")["dependencies"]["pyo3"]
    assert "abi3-py311" in pyo3["features"]


# --- building from source ---------------------------------------------------------------------------------


def test_pyproject_builds_with_the_in_tree_backend() -> None:
    build_system = _toml("pyproject.toml")["build-system"]
    assert build_system["build-backend"] == "vpn_packet_build"
    assert build_system["backend-path"] == ["packaging/pep517"]
    assert (BACKEND_DIR / "vpn_packet_build.py").is_file()
    assert _toml("pyproject.toml")["tool"]["maturin"]["locked"] is True  # Cargo.lock as committed


def _run_backend_hook(hook: str, args: str, path: str) -> subprocess.CompletedProcess[str]:
    """Calls one PEP 517 hook of the in-tree backend as a frontend would, with PATH set to `path`."""
    code = f"import vpn_packet_build as backend; backend.{hook}({args})"
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(BACKEND_DIR)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.parametrize(
    ("hook", "args"),
    [
        ("get_requires_for_build_wheel", ""),
        ("get_requires_for_build_editable", ""),
        ("get_requires_for_build_sdist", ""),
        ("prepare_metadata_for_build_wheel", "'meta'"),
        ("prepare_metadata_for_build_editable", "'meta'"),
        ("build_wheel", "'out'"),
        ("build_editable", "'out'"),
        ("build_sdist", "'out'"),
    ],
)
def test_building_without_rust_stops_with_one_line(hook: str, args: str, tmp_path: Path) -> None:
    result = _run_backend_hook(hook, args, path=str(tmp_path))  # an empty PATH directory: no cargo
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs Rust" in lines[0]
    assert "https://rustup.rs" in lines[0]


def test_backend_finds_cargo_on_path(tmp_path: Path) -> None:
    """The check looks where maturin will look: a `cargo` on PATH passes it (this fake one is never run)."""
    cargo = tmp_path / "cargo"
    cargo.write_text("#!/bin/sh\nexit 1\n")
    cargo.chmod(0o755)
    code = "import vpn_packet_build as backend; backend.require_rust(); print(backend.cargo_path())"
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(BACKEND_DIR)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{cargo}\n", "")


def test_sdist_is_configured_with_tests_examples_license_and_changelog() -> None:
    maturin = _toml("pyproject.toml")["tool"]["maturin"]
    included = {item["path"] for item in maturin["include"] if item.get("format") == "sdist"}
    assert {"tests/**/*", "examples/**/*", "packaging/**/*", "LICENSE", "CHANGELOG.md"} <= included


def test_editable_build_removes_modules_that_would_shadow_the_new_one(tmp_path: Path) -> None:
    """An editable build for abi3 after one for cpython-311 leaves both; Python would import the old one."""
    for name in ("_native.cpython-311-x86_64-linux-gnu.so", "_native.abi3.so", "other.so", "_native.pyi"):
        (tmp_path / name).write_bytes(b"")
    code = (
        "import sys, pathlib, vpn_packet_build as backend; "
        "print(sorted(p.name for p in backend.remove_shadowing_native_modules("
        "pathlib.Path(sys.argv[1]), '_native.abi3.so')))"
    )
    env = {**os.environ, "PYTHONPATH": str(BACKEND_DIR)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "['_native.cpython-311-x86_64-linux-gnu.so']\n",
        "",
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["_native.abi3.so", "_native.pyi", "other.so"]
