"""The node configuration file (TOML), parsed into typed dataclasses with errors that name the key.

The contract (DESIGN.md section 6)::

    [interface]
    name = "vpn0"
    address = "10.8.0.1/24"          # or a list of addresses
    mtu = 1400
    txqueuelen = 1000                # optional

    [listen]
    address = "0.0.0.0:7000"

    [[peers]]
    id = "node-b"
    endpoint = "192.168.77.2:7000"
    allowed_ips = ["10.8.0.2/32"]
    cert = "node-b.pem"              # optional: pinned TLS, this peer's certificate

Optional tables::

    [node]
    id = "node-a"                    # our peer id, sent in the hello (default: the host name)
    log_level = "info"               # debug, info, warning, error
    metrics_file = "/run/vpn0.json"  # written on SIGUSR1, every metrics_interval seconds and at exit
    metrics_interval = 0             # seconds; 0: only on SIGUSR1 and at exit
    metrics_listen = "127.0.0.1:9108"  # optional HTTP endpoint: /metrics (Prometheus text), /metrics.json
    shutdown_timeout = 5.0           # seconds for the whole ordered shutdown
    drop_log_interval = 5.0          # at most one drop warning per interval

    [tls]                            # mutual TLS: cert + key, and ca or every peer's `cert` (pinned)
    cert = "node-a.pem"
    key = "node-a.key"
    ca = "ca.pem"

    [tuning]                         # see `Tuning`

    [resilience]                     # per-peer circuit breaker and retry (vpn_packet.resilience)
    failure_threshold = 5            # consecutive failures that open a peer's breaker
    reset_timeout = 2.0              # seconds open before probing again (a restarted peer is found again)
    success_threshold = 2
    max_attempts = 3                 # write attempts per batch, the first included
    initial_interval = 0.1           # retry backoff, seconds (full jitter)
    max_interval = 2.0
    max_elapsed = 10.0               # time budget of one batch, retries included

Relative file paths are relative to the configuration file. `load_config(path)` raises `ConfigError` whose
message starts with the key, e.g. ``peers[1].allowed_ips[0]: '10.8.0.300/32' is not an IP prefix``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vpn_packet.errors import ConfigError
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.transport.discovery import Peer, parse_endpoint

__all__ = [
    "ConfigError",
    "InterfaceConfig",
    "NodeConfig",
    "NODE_RESILIENCE",
    "NodeSection",
    "PeerConfig",
    "TlsConfig",
    "Tuning",
    "load_config",
    "parse_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")

#: The node's breaker and retry defaults: the library's, except that an open breaker probes again after 2 s
#: instead of 30 s, so a peer that restarts is reachable again within seconds.
NODE_RESILIENCE = ResilienceConfig(reset_timeout=2.0)


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    name: str
    addresses: tuple[str, ...]
    mtu: int = 1400
    txqueuelen: int = 1000


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    cert: Path | None = None

    def to_peer(self) -> Peer:
        return Peer(self.id, self.endpoint, self.allowed_ips)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    ca: Path | None = None  # None: pinned mode, every peer has `cert`


@dataclass(frozen=True, slots=True)
class NodeSection:
    id: str
    log_level: str = "info"
    metrics_file: Path | None = None
    metrics_interval: float = 0.0
    metrics_listen: tuple[str, int] | None = None
    shutdown_timeout: float = 5.0
    drop_log_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Tuning:
    """Performance knobs, all optional.

    - `worker_buffer_size`: packets a destination worker holds; `max_workers`: destinations at once.
    - `coalesce`: dispatcher loop iterations to wait for more packets (None: its default).
    - `read_batch`: TUN packets read per readiness event at most; `write_backlog`: TUN packets waiting for a
      writable device at most (beyond: dropped, counted).
    - `max_streams_per_peer`, `send_buffer` (SO_SNDBUF bytes), `connect_timeout`, `write_timeout`,
      `stream_idle_timeout`: the TCP side.
    - `receive_batch` (packets per sink call), `read_size` (bytes per socket read), `max_connections`,
      `max_connections_per_peer`, `hello_timeout`: the receiver.
    """

    worker_buffer_size: int = 4096
    max_workers: int = 10_000
    coalesce: int | None = None
    read_batch: int = 256
    write_backlog: int = 4096
    max_streams_per_peer: int = 4
    send_buffer: int = 4 * 1024 * 1024
    connect_timeout: float = 5.0
    write_timeout: float = 10.0
    stream_idle_timeout: float = 60.0
    receive_batch: int = 256
    read_size: int = 256 * 1024
    max_connections: int = 1024
    max_connections_per_peer: int = 16
    hello_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    interface: InterfaceConfig
    listen: tuple[str, int]
    peers: tuple[PeerConfig, ...]
    node: NodeSection
    tls: TlsConfig | None = None
    tuning: Tuning = field(default_factory=Tuning)
    path: Path | None = None
    resilience: ResilienceConfig = field(default_factory=lambda: NODE_RESILIENCE)


# --- helpers ----------------------------------------------------------------------------------------------


def _table(data: Mapping[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(key, "missing table")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _unknown(table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", f"unknown key (expected one of: {', '.join(sorted(known))})")


def _str(table: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in table:
        if default is None:
            raise ConfigError(where, "missing")
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"expected a non-empty string, got {value!r}")
    return value


def _int(table: Mapping[str, Any], key: str, where: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(where, f"{value} is out of range {low}..{high}")
    return value


def _float(table: Mapping[str, Any], key: str, where: str, default: float, *, zero: bool = False) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(where, f"{value} must be {'0 or more' if zero else 'positive'}")
    return float(value)


def _path(base: Path | None, value: object, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"expected a file path, got {value!r}")
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def _existing(base: Path | None, value: object, where: str) -> Path:
    path = _path(base, value, where)
    if not path.is_file():
        raise ConfigError(where, f"file not found: {path}")
    return path


# --- sections ---------------------------------------------------------------------------------------------


def _interface(data: Mapping[str, Any]) -> InterfaceConfig:
    table = _table(data, "interface", required=True)
    _unknown(table, "interface", {"name", "address", "mtu", "txqueuelen"})
    name = _str(table, "name", "interface.name")
    if len(name.encode()) > 15 or "/" in name or any(c.isspace() for c in name):
        raise ConfigError(
            "interface.name", f"{name!r} is not an interface name (1..15 bytes, no '/' or spaces)"
        )
    if "address" not in table:
        raise ConfigError("interface.address", "missing")
    raw = table["address"]
    items: list[tuple[str, object]]
    if isinstance(raw, list):
        if not raw:
            raise ConfigError("interface.address", "empty list")
        items = [(f"interface.address[{i}]", a) for i, a in enumerate(raw)]
    else:
        items = [("interface.address", raw)]
    addresses = []
    for where, value in items:
        if not isinstance(value, str):
            raise ConfigError(
                where, f"expected an address with prefix length like '10.8.0.1/24', got {value!r}"
            )
        try:
            interface = ipaddress.ip_interface(value)
        except ValueError:
            raise ConfigError(
                where, f"{value!r} is not an address with prefix length like '10.8.0.1/24'"
            ) from None
        if "/" not in value:
            raise ConfigError(where, f"{value!r} needs a prefix length, like '10.8.0.1/24'")
        addresses.append(str(interface))
    mtu = _int(table, "mtu", "interface.mtu", 1400, 576, 65535)
    if any(":" in a for a in addresses) and mtu < 1280:
        raise ConfigError("interface.mtu", f"{mtu} is below 1280, the IPv6 minimum")
    txqueuelen = _int(table, "txqueuelen", "interface.txqueuelen", 1000, 1, 1_000_000)
    return InterfaceConfig(name, tuple(addresses), mtu, txqueuelen)


def _address(table: Mapping[str, Any], key: str, where: str) -> tuple[str, int]:
    value = _str(table, key, where)
    try:
        host, port = parse_endpoint(value)
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(where, f"{value!r} is not an IP address and port ({exc})") from None
    return host, port


def _listen(data: Mapping[str, Any]) -> tuple[str, int]:
    table = _table(data, "listen", required=True)
    _unknown(table, "listen", {"address"})
    return _address(table, "address", "listen.address")


def _peers(data: Mapping[str, Any], base: Path | None) -> tuple[PeerConfig, ...]:
    raw = data.get("peers", [])
    if not isinstance(raw, list):
        raise ConfigError("peers", "expected an array of tables ([[peers]])")
    peers: list[PeerConfig] = []
    seen_ids: dict[str, int] = {}
    owners: dict[str, str] = {}
    for i, entry in enumerate(raw):
        where = f"peers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a table")
        _unknown(entry, where, {"id", "endpoint", "allowed_ips", "cert"})
        peer_id = _str(entry, "id", f"{where}.id")
        if len(peer_id.encode()) > 255:
            raise ConfigError(f"{where}.id", "at most 255 bytes of UTF-8")
        if peer_id in seen_ids:
            raise ConfigError(f"{where}.id", f"{peer_id!r} is already the id of peers[{seen_ids[peer_id]}]")
        seen_ids[peer_id] = i
        endpoint = _str(entry, "endpoint", f"{where}.endpoint")
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise ConfigError(f"{where}.endpoint", str(exc)) from None
        allowed = entry.get("allowed_ips")
        if allowed is None:
            raise ConfigError(f"{where}.allowed_ips", "missing (the prefixes this peer owns)")
        if not isinstance(allowed, list):
            raise ConfigError(f"{where}.allowed_ips", f"expected an array of prefixes, got {allowed!r}")
        prefixes = []
        for j, prefix in enumerate(allowed):
            key = f"{where}.allowed_ips[{j}]"
            if not isinstance(prefix, str):
                raise ConfigError(key, f"{prefix!r} is not an IP prefix")
            try:
                network = ipaddress.ip_network(prefix, strict=True)
            except ValueError:
                try:
                    loose = ipaddress.ip_network(prefix, strict=False)
                except ValueError:
                    raise ConfigError(key, f"{prefix!r} is not an IP prefix") from None
                raise ConfigError(key, f"{prefix!r} has host bits set (did you mean {loose}?)") from None
            text = str(network)
            if text in owners:
                raise ConfigError(key, f"{text} is already given to peer {owners[text]!r}")
            owners[text] = peer_id
            prefixes.append(text)
        cert = _existing(base, entry["cert"], f"{where}.cert") if "cert" in entry else None
        peers.append(PeerConfig(peer_id, endpoint, tuple(prefixes), cert))
    return tuple(peers)


def _node(data: Mapping[str, Any], base: Path | None) -> NodeSection:
    table = _table(data, "node", required=False)
    known = {f.name for f in fields(NodeSection)}
    _unknown(table, "node", known)
    peer_id = _str(table, "id", "node.id", socket.gethostname() or "node")
    if len(peer_id.encode()) > 255:
        raise ConfigError("node.id", "at most 255 bytes of UTF-8")
    level = _str(table, "log_level", "node.log_level", "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError("node.log_level", f"{level!r}: expected one of {', '.join(LOG_LEVELS)}")
    metrics_file = (
        _path(base, table["metrics_file"], "node.metrics_file") if "metrics_file" in table else None
    )
    return NodeSection(
        id=peer_id,
        log_level=level,
        metrics_file=metrics_file,
        metrics_interval=_float(table, "metrics_interval", "node.metrics_interval", 0.0, zero=True),
        metrics_listen=_address(table, "metrics_listen", "node.metrics_listen")
        if "metrics_listen" in table
        else None,
        shutdown_timeout=_float(table, "shutdown_timeout", "node.shutdown_timeout", 5.0),
        drop_log_interval=_float(table, "drop_log_interval", "node.drop_log_interval", 5.0),
    )


def _tls(data: Mapping[str, Any], base: Path | None, peers: tuple[PeerConfig, ...]) -> TlsConfig | None:
    if "tls" not in data:
        return None
    table = _table(data, "tls", required=True)
    _unknown(table, "tls", {"cert", "key", "ca"})
    for key in ("cert", "key"):
        if key not in table:
            raise ConfigError(f"tls.{key}", "missing")
    cert_path = _existing(base, table["cert"], "tls.cert")
    key_path = _existing(base, table["key"], "tls.key")
    ca = _existing(base, table["ca"], "tls.ca") if "ca" in table else None
    if ca is None:
        for i, peer in enumerate(peers):
            if peer.cert is None:
                raise ConfigError(
                    f"peers[{i}].cert", "missing: [tls] without ca pins every peer's certificate"
                )
        if not peers:
            raise ConfigError("tls.ca", "missing: without ca, peers must give their pinned cert")
    return TlsConfig(cert_path, key_path, ca)


_TUNING_INT: dict[str, tuple[int, int]] = {
    "worker_buffer_size": (1, 1 << 20),
    "max_workers": (1, 1 << 24),
    "read_batch": (1, 1 << 16),
    "write_backlog": (1, 1 << 22),
    "max_streams_per_peer": (1, 1024),
    "send_buffer": (4096, 1 << 30),
    "receive_batch": (1, 1 << 16),
    "read_size": (1024, 1 << 26),
    "max_connections": (1, 1 << 20),
    "max_connections_per_peer": (1, 1 << 16),
}
_TUNING_FLOAT = ("connect_timeout", "write_timeout", "stream_idle_timeout", "hello_timeout")


def _tuning(data: Mapping[str, Any]) -> Tuning:
    table = _table(data, "tuning", required=False)
    known = {f.name for f in fields(Tuning)}
    _unknown(table, "tuning", known)
    defaults = Tuning()
    values: dict[str, Any] = {}
    for key, (low, high) in _TUNING_INT.items():
        values[key] = _int(table, key, f"tuning.{key}", getattr(defaults, key), low, high)
    for key in _TUNING_FLOAT:
        values[key] = _float(table, key, f"tuning.{key}", getattr(defaults, key))
    if "coalesce" in table:
        values["coalesce"] = _int(table, "coalesce", "tuning.coalesce", 0, 0, 10_000)
    return Tuning(**values)


_RESILIENCE_INT = {
    "failure_threshold": (1, 1 << 20),
    "success_threshold": (1, 1 << 20),
    "max_attempts": (1, 100),
}
_RESILIENCE_FLOAT = ("reset_timeout", "initial_interval", "max_interval", "max_elapsed")


def _resilience(data: Mapping[str, Any]) -> ResilienceConfig:
    table = _table(data, "resilience", required=False)
    _unknown(table, "resilience", set(_RESILIENCE_INT) | set(_RESILIENCE_FLOAT))
    values: dict[str, Any] = {}
    for key, (low, high) in _RESILIENCE_INT.items():
        values[key] = _int(table, key, f"resilience.{key}", getattr(NODE_RESILIENCE, key), low, high)
    for key in _RESILIENCE_FLOAT:
        zero = key != "max_elapsed"
        values[key] = _float(table, key, f"resilience.{key}", getattr(NODE_RESILIENCE, key), zero=zero)
    if values["max_interval"] < values["initial_interval"]:
        raise ConfigError("resilience.max_interval", "must be at least resilience.initial_interval")
    try:
        return ResilienceConfig(**values)
    except ValueError as exc:  # pragma: no cover - the checks above come first
        raise ConfigError("resilience", str(exc)) from None


# --- entry points -----------------------------------------------------------------------------------------


def parse_config(
    data: Mapping[str, Any], *, base: Path | None = None, path: Path | None = None
) -> NodeConfig:
    """A `NodeConfig` from parsed TOML; relative paths are relative to `base`. Raises `ConfigError`."""
    for key in data:
        if key not in {"interface", "listen", "peers", "node", "tls", "tuning", "resilience"}:
            raise ConfigError(
                key, "unknown key (expected interface, listen, peers, node, tls, tuning, resilience)"
            )
    interface = _interface(data)
    listen = _listen(data)
    peers = _peers(data, base)
    node = _node(data, base)
    if node.id in {p.id for p in peers}:
        raise ConfigError("node.id", f"{node.id!r} is also the id of a peer")
    tls = _tls(data, base, peers)
    tuning = _tuning(data)
    resilience = _resilience(data)
    return NodeConfig(interface, listen, peers, node, tls, tuning, path, resilience)


def load_config(path: str | Path) -> NodeConfig:
    """Reads and validates a node configuration file. Raises `ConfigError` (a `ValueError`) naming the
    key, or for a file that cannot be read or is not TOML."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"{path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, base=path.resolve().parent, path=path)


def level_number(level: str) -> int:
    """The `logging` level of a config level name."""
    return int(getattr(logging, level.upper()))
