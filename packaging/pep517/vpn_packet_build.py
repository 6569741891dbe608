"""The build backend of vpn-packet (PEP 517): maturin, once it is sure that there is a Rust toolchain.

Why a wrapper: where no prebuilt wheel fits (another platform, or `pip install .` from a checkout or the
sdist), pip builds the native core from source. Without `cargo`, maturin would quietly download a Rust
toolchain into a temporary directory (and, offline, end in a page-long network traceback). Building needs a
toolchain the user chose to install, so each hook first checks for `cargo` and, if it is missing, stops with
one line saying what is needed. Everything else is maturin's (`[tool.maturin]` in pyproject.toml).

An editable build also removes the native modules that earlier builds for another ABI left in the source
tree: Python prefers `_native.cpython-311-x86_64-linux-gnu.so` to `_native.abi3.so`, so a stale one would
silently shadow every later build.

maturin is imported only after the check, so the check runs (and is tested) where maturin is not installed.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The one line a build without Rust ends with.
RUST_NEEDED = (
    "vpn-packet: building from source needs Rust (cargo and rustc 1.80+, https://rustup.rs) and a C linker "
    "(cc); install them and retry, or install a prebuilt wheel (README.md: Installing from a wheel)."
)


def cargo_path() -> str | None:
    """The `cargo` a build would run: the one on PATH (where maturin looks for it too)."""
    return shutil.which("cargo")


def require_rust() -> None:
    """Stops the build with `RUST_NEEDED` (one line on stderr, exit status 1) when there is no cargo."""
    if cargo_path() is None:
        sys.stderr.write(RUST_NEEDED + "\n")
        sys.stderr.flush()
        raise SystemExit(1)


def remove_shadowing_native_modules(package_dir: Path, built: str) -> list[Path]:
    """Deletes the `_native` modules in `package_dir` other than `built` (a file name); returns them."""
    stale = [path for path in package_dir.glob("_native.*.so") if path.name != built]
    for path in stale:
        path.unlink()
    return stale


#: Where an editable build puts the native module ([tool.maturin] python-source and module-name).
EDITABLE_PACKAGE_DIR = Path("python/vpn_packet")

Settings = Mapping[str, Any] | None


def get_requires_for_build_wheel(config_settings: Settings = None) -> list[str]:
    require_rust()
    import maturin

    return list(maturin.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings: Settings = None) -> list[str]:
    require_rust()
    import maturin

    return list(maturin.get_requires_for_build_editable(config_settings))


def get_requires_for_build_sdist(config_settings: Settings = None) -> list[str]:
    require_rust()  # maturin reads the crates' metadata with cargo to write an sdist
    import maturin

    return list(maturin.get_requires_for_build_sdist(config_settings))


def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Settings = None) -> str:
    require_rust()
    import maturin

    return str(maturin.prepare_metadata_for_build_wheel(metadata_directory, config_settings))


def prepare_metadata_for_build_editable(metadata_directory: str, config_settings: Settings = None) -> str:
    require_rust()
    import maturin

    return str(maturin.prepare_metadata_for_build_editable(metadata_directory, config_settings))


def build_wheel(
    wheel_directory: str, config_settings: Settings = None, metadata_directory: str | None = None
) -> str:
    require_rust()
    import maturin

    return str(maturin.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(
    wheel_directory: str, config_settings: Settings = None, metadata_directory: str | None = None
) -> str:
    require_rust()
    import maturin

    wheel = str(maturin.build_editable(wheel_directory, config_settings, metadata_directory))
    built = sorted(EDITABLE_PACKAGE_DIR.glob("_native.*.so"), key=lambda path: path.stat().st_mtime)
    if built:
        for path in remove_shadowing_native_modules(EDITABLE_PACKAGE_DIR, built[-1].name):
            print(f"vpn-packet: removed {path}, an earlier build's module that would shadow {built[-1].name}")
    return wheel


def build_sdist(sdist_directory: str, config_settings: Settings = None) -> str:
    require_rust()
    import maturin

    return str(maturin.build_sdist(sdist_directory, config_settings))
