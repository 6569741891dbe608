"""vpn-packet: the packet layer of a VPN data plane, with a Rust core.

The root re-exports the public names of each subpackage (their `__all__`) and keeps the Go spellings of the
original package (`ExtractIPAndPorts`, `IsNetworkError`, ...) as aliases for existing callers.
The transport (`vpn_packet.transport`: TCP/TLS streams, pool, discovery, receiver, node, TUN) is imported
explicitly, so that `import vpn_packet` stays light.
"""

# ruff: noqa: F403, F405
from __future__ import annotations

from vpn_packet import api, capture, dispatcher, errors, metrics, resilience, types, utils, worker
from vpn_packet._native import __version__
from vpn_packet.api import *
from vpn_packet.capture import *
from vpn_packet.dispatcher import *
from vpn_packet.errors import *
from vpn_packet.metrics import *
from vpn_packet.resilience import *
from vpn_packet.types import *
from vpn_packet.utils import *
from vpn_packet.worker import *

# Go spellings, kept for callers of the original package.
ExtractIPAndPorts = extract_ip_and_ports

__all__ = [
    "ExtractIPAndPorts",
    "__version__",
    "errors",
    "types",
    "utils",
    "api",
    "capture",
    "dispatcher",
    "metrics",
    "resilience",
    "worker",
    *api.__all__,
    *capture.__all__,
    *dispatcher.__all__,
    *metrics.__all__,
    *resilience.__all__,
    *worker.__all__,
    *errors.__all__,
    *types.__all__,
    *utils.__all__,
]
