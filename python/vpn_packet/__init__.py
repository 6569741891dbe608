"""vpn-packet: the packet layer of a VPN data plane, with a Rust core.

The root re-exports the public library API (docs/library.md), each name from the module that owns it, and
keeps the Go spellings of the original package (`ExtractIPAndPorts`, `NewDispatcher`, `IsNetworkError`,
...) as aliases for existing callers. The modules stay importable on their own (`vpn_packet.errors`,
`vpn_packet.dispatcher`, ..., `vpn_packet.testutil`).

The re-exports are lazy (PEP 562): `import vpn_packet` loads only the native module, and a name such as
`vpn_packet.Dispatcher` imports its module on first use. Why: every `vpn-packet` command imports this
package first, and loading the dispatcher (asyncio), the error taxonomy and the rest up front cost about
55 ms of a command that otherwise runs in tens of milliseconds (`vpn-packet inspect`). `from vpn_packet
import X`, `dir(vpn_packet)` and `__all__` behave as before; type checkers read the imports below
`if TYPE_CHECKING:`.

Not re-exported here, so that the root stays the library: the transport (`vpn_packet.transport`: framing,
TCP/TLS streams, pool, discovery, receiver, TUN), the node assembly (`vpn_packet.node`), the command line
(`vpn_packet.cli`), and the test utilities (`vpn_packet.testutil`).
"""

from importlib import import_module as _import_module

from vpn_packet._native import __version__

# Not `typing.TYPE_CHECKING`: loading `typing` alone costs milliseconds, and type checkers treat any name
# `TYPE_CHECKING` as true (mypy, pyright).
TYPE_CHECKING = False

if TYPE_CHECKING:
    from vpn_packet.api import PeerDiscovery, Stream, StreamPoolService, StreamService
    from vpn_packet.capture import CaptureSummary, DestinationStats, summarize_capture
    from vpn_packet.dispatcher import Dispatcher, DispatcherState, NewDispatcher
    from vpn_packet.errors import (
        CaptureError,
        CircuitOpenError,
        DetachedCause,
        DispatcherStoppedError,
        IsConnectionResetError,
        IsNetworkError,
        IsServiceError,
        IsStreamClosedError,
        IsTemporaryError,
        NetworkError,
        PacketError,
        PeerNotFoundError,
        QueueFullError,
        ServiceError,
        VpnPacketError,
        WorkerLimitError,
        is_connection_reset_error,
        is_network_error,
        is_retriable_error,
        is_service_error,
        is_stream_closed_error,
        is_temporary_error,
        register_error_kind,
        unregister_error_kind,
    )
    from vpn_packet.metrics import DispatcherMetrics
    from vpn_packet.resilience import (
        CircuitBreaker,
        CircuitBreakerManager,
        CircuitState,
        ResilienceConfig,
        ResilienceMetrics,
        ResilienceService,
        RetryPolicy,
    )
    from vpn_packet.types import PacketInfo, QueuedPacket
    from vpn_packet.utils import (
        PacketBatch,
        destination_key,
        extract_ip_and_ports,
        group_by_destination,
        parse_batch,
    )
    from vpn_packet.worker import Worker, WorkerMetrics

    # Go spelling of `extract_ip_and_ports`; the others are defined beside their functions.
    ExtractIPAndPorts = extract_ip_and_ports

#: Each re-exported name -> (the module that owns it, its name there).
_EXPORTS: dict[str, tuple[str, str]] = {
    **{
        name: ("vpn_packet.api", name)
        for name in ("PeerDiscovery", "Stream", "StreamPoolService", "StreamService")
    },
    **{
        name: ("vpn_packet.capture", name)
        for name in ("CaptureSummary", "DestinationStats", "summarize_capture")
    },
    **{name: ("vpn_packet.dispatcher", name) for name in ("Dispatcher", "DispatcherState", "NewDispatcher")},
    **{
        name: ("vpn_packet.errors", name)
        for name in (
            "CaptureError",
            "CircuitOpenError",
            "DetachedCause",
            "DispatcherStoppedError",
            "IsConnectionResetError",
            "IsNetworkError",
            "IsServiceError",
            "IsStreamClosedError",
            "IsTemporaryError",
            "NetworkError",
            "PacketError",
            "PeerNotFoundError",
            "QueueFullError",
            "ServiceError",
            "VpnPacketError",
            "WorkerLimitError",
            "is_connection_reset_error",
            "is_network_error",
            "is_retriable_error",
            "is_service_error",
            "is_stream_closed_error",
            "is_temporary_error",
            "register_error_kind",
            "unregister_error_kind",
        )
    },
    "DispatcherMetrics": ("vpn_packet.metrics", "DispatcherMetrics"),
    **{
        name: ("vpn_packet.resilience", name)
        for name in (
            "CircuitBreaker",
            "CircuitBreakerManager",
            "CircuitState",
            "ResilienceConfig",
            "ResilienceMetrics",
            "ResilienceService",
            "RetryPolicy",
        )
    },
    **{name: ("vpn_packet.types", name) for name in ("PacketInfo", "QueuedPacket")},
    **{
        name: ("vpn_packet.utils", name)
        for name in (
            "PacketBatch",
            "destination_key",
            "extract_ip_and_ports",
            "group_by_destination",
            "parse_batch",
        )
    },
    **{name: ("vpn_packet.worker", name) for name in ("Worker", "WorkerMetrics")},
    "ExtractIPAndPorts": ("vpn_packet.utils", "extract_ip_and_ports"),
}

#: The submodules the eager root bound as attributes (`vpn_packet.errors` after a bare `import vpn_packet`).
_SUBMODULES = frozenset(
    {"api", "capture", "dispatcher", "errors", "metrics", "resilience", "tuning", "types", "utils", "worker"}
)


# Hidden from type checkers, which see every name in the `TYPE_CHECKING` imports above: a module
# `__getattr__` would make any misspelt name (`vpn_packet.Dispatchr`) type-check as `object`.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        """PEP 562: a re-exported name or a submodule, imported on first use, then kept in the namespace."""
        target = _EXPORTS.get(name)
        if target is not None:
            value = getattr(_import_module(target[0]), target[1])
        elif name in _SUBMODULES:
            value = _import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


del TYPE_CHECKING  # not a public name of the package


__all__ = [
    "__version__",
    # vpn_packet.types
    "PacketInfo",
    "QueuedPacket",
    # vpn_packet.utils
    "extract_ip_and_ports",
    "destination_key",
    "parse_batch",
    "PacketBatch",
    "group_by_destination",
    # vpn_packet.errors
    "VpnPacketError",
    "PacketError",
    "NetworkError",
    "ServiceError",
    "QueueFullError",
    "WorkerLimitError",
    "DispatcherStoppedError",
    "PeerNotFoundError",
    "CircuitOpenError",
    "CaptureError",
    "DetachedCause",
    "is_network_error",
    "is_service_error",
    "is_temporary_error",
    "is_connection_reset_error",
    "is_stream_closed_error",
    "is_retriable_error",
    "register_error_kind",
    "unregister_error_kind",
    # vpn_packet.api
    "PeerDiscovery",
    "Stream",
    "StreamService",
    "StreamPoolService",
    # vpn_packet.dispatcher, vpn_packet.worker, vpn_packet.metrics
    "Dispatcher",
    "DispatcherState",
    "DispatcherMetrics",
    "Worker",
    "WorkerMetrics",
    # vpn_packet.resilience
    "ResilienceConfig",
    "ResilienceService",
    "ResilienceMetrics",
    "CircuitBreaker",
    "CircuitBreakerManager",
    "CircuitState",
    "RetryPolicy",
    # vpn_packet.capture
    "summarize_capture",
    "CaptureSummary",
    "DestinationStats",
    # Go spellings of the original package
    "ExtractIPAndPorts",
    "NewDispatcher",
    "IsNetworkError",
    "IsServiceError",
    "IsTemporaryError",
    "IsConnectionResetError",
    "IsStreamClosedError",
]
