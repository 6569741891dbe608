"""The root package's public surface (DESIGN.md sections 2 and 4): what it exports, and what it does not."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

import vpn_packet

# DESIGN.md section 4: the contract names, by the module that owns them.
CONTRACT = {
    "vpn_packet.types": ["PacketInfo", "QueuedPacket"],
    "vpn_packet.utils": ["extract_ip_and_ports", "destination_key", "parse_batch"],
    "vpn_packet.errors": [
        "VpnPacketError",
        "PacketError",
        "NetworkError",
        "ServiceError",
        "QueueFullError",
        "DispatcherStoppedError",
        "PeerNotFoundError",
        "CircuitOpenError",
        "is_network_error",
        "is_service_error",
        "is_temporary_error",
        "is_connection_reset_error",
        "is_stream_closed_error",
    ],
    "vpn_packet.api": ["PeerDiscovery", "Stream", "StreamService", "StreamPoolService"],
    "vpn_packet.dispatcher": ["Dispatcher"],
    "vpn_packet.worker": ["Worker", "WorkerMetrics"],
    "vpn_packet.resilience": [
        "CircuitBreaker",
        "CircuitBreakerManager",
        "RetryPolicy",
        "ResilienceConfig",
        "ResilienceService",
    ],
}

# Public library names beyond the contract, also re-exported by the root.
LIBRARY = {
    "vpn_packet.utils": ["PacketBatch", "group_by_destination"],
    "vpn_packet.errors": [
        "WorkerLimitError",
        "CaptureError",
        "DetachedCause",
        "is_retriable_error",
        "register_error_kind",
        "unregister_error_kind",
    ],
    "vpn_packet.dispatcher": ["DispatcherState"],
    "vpn_packet.metrics": ["DispatcherMetrics"],
    "vpn_packet.resilience": ["CircuitState", "ResilienceMetrics"],
    "vpn_packet.capture": ["summarize_capture", "CaptureSummary", "DestinationStats"],
}

GO_ALIASES = {
    "ExtractIPAndPorts": "extract_ip_and_ports",
    "NewDispatcher": "Dispatcher",
    "IsNetworkError": "is_network_error",
    "IsServiceError": "is_service_error",
    "IsTemporaryError": "is_temporary_error",
    "IsConnectionResetError": "is_connection_reset_error",
    "IsStreamClosedError": "is_stream_closed_error",
}

# DESIGN.md section 2: the seed's subpackages, importable (contract).
SEED_MODULES = ["dispatcher", "worker", "errors", "utils", "types", "testutil"]

# Application layers: never re-exported by the root, never imported by `import vpn_packet`.
APPLICATION = ("vpn_packet.transport", "vpn_packet.node", "vpn_packet.cli", "vpn_packet.testutil")


def _pairs(table: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(module, name) for module, names in table.items() for name in names]


@pytest.mark.parametrize(("module", "name"), _pairs(CONTRACT) + _pairs(LIBRARY))
def test_name_is_importable_from_the_root_and_from_its_module(module: str, name: str) -> None:
    owner = importlib.import_module(module)
    assert name in owner.__all__
    assert name in vpn_packet.__all__
    assert getattr(vpn_packet, name) is getattr(owner, name)


@pytest.mark.parametrize(("alias", "name"), GO_ALIASES.items())
def test_go_alias_is_the_same_object(alias: str, name: str) -> None:
    assert alias in vpn_packet.__all__
    assert getattr(vpn_packet, alias) is getattr(vpn_packet, name)


def test_all_lists_exactly_the_exported_names() -> None:
    exported = vpn_packet.__all__
    assert len(exported) == len(set(exported))
    expected = {name for _, name in _pairs(CONTRACT) + _pairs(LIBRARY)} | set(GO_ALIASES) | {"__version__"}
    assert set(exported) == expected
    for name in exported:  # the re-exports are lazy: load them all first
        getattr(vpn_packet, name)
    public = {
        name
        for name, value in vars(vpn_packet).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(exported) - {"__version__"}
    assert set(exported) <= set(dir(vpn_packet))
    assert isinstance(vpn_packet.__version__, str)


def test_utils_has_one_batch_form() -> None:
    assert sorted(vpn_packet.utils.__all__) == sorted(
        ["PacketBatch", "destination_key", "extract_ip_and_ports", "group_by_destination", "parse_batch"]
    )


@pytest.mark.parametrize("name", SEED_MODULES)
def test_seed_subpackages_are_importable(name: str) -> None:
    module = importlib.import_module(f"vpn_packet.{name}")
    assert getattr(vpn_packet, name) is module


def test_modules_are_attributes_after_a_bare_import() -> None:
    code = (
        "import vpn_packet as v; "
        "print(all(hasattr(v, m) for m in "
        "('api', 'capture', 'dispatcher', 'errors', 'metrics', 'resilience', 'types', 'utils', 'worker')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_nothing_from_the_application_layers_at_the_root() -> None:
    for name in vpn_packet.__all__:
        owner = getattr(getattr(vpn_packet, name), "__module__", "") or ""
        assert not owner.startswith(APPLICATION), (name, owner)
    # Errors of the node and its transport live in the one errors module, not at the root (which is the
    # dispatcher library's API); the handshake refusal is the transport's.
    for name in (
        "ConfigError",
        "UsageError",
        "FramingError",
        "HandshakeRefusedError",
        "is_handshake_refused_error",
    ):
        assert name not in vpn_packet.__all__
        assert not hasattr(vpn_packet, name)
        assert name in vpn_packet.errors.__all__  # kept in the one errors module
    # The v1 hello's timeout error is gone with the v1 hello (a timeout is a `handshake_failures` reason).
    assert not hasattr(vpn_packet.errors, "HelloTimeoutError")


def test_import_stays_light() -> None:
    code = "import sys, vpn_packet; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = [m for m in out.split() if m.startswith(APPLICATION)]
    assert loaded == []


# Measured against what the interpreter had loaded before the statement: site-packages' `.pth` files run
# at start-up and differ between machines (one that imports certifi brings `typing` in with it), and they
# are not ours to answer for.
_LOADED_BY = (
    "import sys; _before = set(sys.modules); {statement}; "
    "print('\\n'.join(sorted(set(sys.modules) - _before)))"
)


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter loads to run `statement`, beyond those it had loaded at start-up."""
    code = _LOADED_BY.format(statement=statement)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


# Issue 22: `import vpn_packet` loaded everything (asyncio, ssl, the dispatcher) and cost about 55 ms of
# every command; the re-exports are lazy now (PEP 562) and the error taxonomy needs neither ssl nor asyncio.
HEAVY = ("asyncio", "ssl", "_ssl", "cryptography", "vpn_packet.dispatcher", "vpn_packet.errors", "typing")


@pytest.mark.parametrize("module", HEAVY)
def test_a_bare_import_loads_no_heavy_module(module: str) -> None:
    loaded = modules_loaded_by("import vpn_packet")
    assert "vpn_packet._native" in loaded
    assert module not in loaded


@pytest.mark.parametrize(
    "module", ["asyncio", "ssl", "_ssl", "cryptography", "socket", "vpn_packet.dispatcher"]
)
def test_the_error_taxonomy_and_capture_summaries_load_no_network_stack(module: str) -> None:
    assert module not in modules_loaded_by("import vpn_packet.errors, vpn_packet.capture")


def test_a_lazy_name_loads_its_module_on_first_use() -> None:
    loaded = modules_loaded_by("from vpn_packet import Dispatcher")
    assert {"vpn_packet.dispatcher", "asyncio"} <= loaded
    with pytest.raises(AttributeError, match="has no attribute 'Nonexistent'"):
        vpn_packet.Nonexistent  # noqa: B018


def test_the_predicates_still_classify_tls_and_asyncio_errors_once_loaded() -> None:
    """The taxonomy looks TLS and asyncio errors up only once their modules are loaded: same answers."""
    import asyncio
    import ssl

    assert vpn_packet.is_stream_closed_error(ssl.SSLEOFError())
    assert vpn_packet.is_connection_reset_error(ssl.SSLSyscallError())
    assert vpn_packet.is_network_error(ssl.SSLCertVerificationError())
    assert not vpn_packet.is_temporary_error(ssl.SSLCertVerificationError())
    assert vpn_packet.is_network_error(asyncio.IncompleteReadError(b"", 4))
    assert not vpn_packet.is_network_error(EOFError())


def test_no_star_import_in_the_root() -> None:
    tree = ast.parse(Path(inspect.getfile(vpn_packet)).read_text())
    stars = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.names[0].name == "*"
    ]
    assert stars == []


def test_type_checkers_see_every_lazy_name_and_no_other(tmp_path: Path) -> None:
    """The lazy root must not cost the type checking: every exported name has its real type, and a
    misspelt one is an error (a module `__getattr__` visible to mypy would make it `object`)."""
    pytest.importorskip("mypy")
    code = tmp_path / "use.py"
    code.write_text(
        "import vpn_packet\n"
        "from vpn_packet import Dispatcher, ExtractIPAndPorts\n"
        "reveal_type(vpn_packet.extract_ip_and_ports)\n"
        "reveal_type(ExtractIPAndPorts)\n"
        "vpn_packet.Dispatchr\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    out = result.stdout
    assert out.count("vpn_packet._native.PacketInfo") == 2, out
    assert 'Module has no attribute "Dispatchr"' in out, out
