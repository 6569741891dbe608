"""vpn-packet: the packet layer of a VPN data plane, with a Rust core.

The root re-exports the public library API (DESIGN.md section 4), each name from the module that owns it,
and keeps the Go spellings of the original package (`ExtractIPAndPorts`, `NewDispatcher`, `IsNetworkError`,
...) as aliases for existing callers. The modules stay importable on their own (`vpn_packet.errors`,
`vpn_packet.dispatcher`, ..., `vpn_packet.testutil`).

Not re-exported here, so that `import vpn_packet` stays light and the root stays the library: the transport
(`vpn_packet.transport`: framing, TCP/TLS streams, pool, discovery, receiver, TUN), the node assembly
(`vpn_packet.node`), the command line (`vpn_packet.cli`), and the test utilities (`vpn_packet.testutil`).
"""

# Each `from vpn_packet.<module> import ...` also binds the module, so `vpn_packet.errors` etc. work after a
# bare `import vpn_packet`.
from vpn_packet._native import __version__
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
