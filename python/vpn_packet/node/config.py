"""The node configuration file (TOML), parsed into typed dataclasses with errors that name the key.

The contract (docs/config.md, every key)::

    [interface]
    name = "vpn0"
    address = "10.8.0.1/24"          # or a list of addresses
    mtu = 1400
    txqueuelen = 1000                # optional
    offload = true                   # optional: TSO/USO super-packets through the tunnel (the default)

    [listen]
    address = "0.0.0.0:7000"

    [node]
    id = "node-a"                    # optional with a key: the name `genkey` put in it
    key = "node-a.key"               # written by `vpn-packet genkey node-a`
    # insecure = true                # plaintext, unauthenticated: for tests only, warned at every start

    [[peers]]
    id = "node-b"
    endpoint = "192.168.77.2:7000"
    allowed_ips = ["10.8.0.2/32"]
    public_key = "..."               # the last line `vpn-packet genkey node-b` printed

A node is secure unless it says otherwise: it needs `[node] key` and a `public_key` for every peer, or a CA
(`[tls]` with `ca`, `cert`, `key` and `[node] id`, the name its certificate carries), or
`[node] insecure = true`. Without any of them the file is refused with a line that says how to make keys.

Optional keys of `[node]`::

    log_level = "info"               # debug, info, warning, error
    metrics_file = "/run/vpn-packet/vpn0.json"  # on SIGUSR1, every metrics_interval and at exit
    metrics_interval = 0             # seconds; 0: only on SIGUSR1 and at exit
    metrics_listen = "127.0.0.1:9108"  # optional HTTP endpoint: /metrics (Prometheus text), /metrics.json
    shutdown_timeout = 5.0           # seconds for the whole ordered shutdown
    drop_log_interval = 5.0          # at most one drop warning per interval
    control_socket = "/run/vpn-packet/vpn0.sock"  # `vpn-packet status`/`reload` (default: by interface name)

    [tls]                            # instead of keys: mutual TLS with certificates from a CA
    cert = "node-a.pem"              # names this node's id (subjectAltName DNS, else common name)
    key = "node-a-cert.key"
    ca = "ca.pem"

    [tuning]                         # see `vpn_packet.tuning.Tuning`: every field, with its range

    [resilience]                     # per-peer circuit breaker and retry (vpn_packet.resilience)
    failure_threshold = 5            # consecutive failures that open a peer's breaker
    reset_timeout = 2.0              # seconds open before probing again (the library's default: a
                                     # restarted peer is found again within seconds)
    success_threshold = 2
    max_attempts = 3                 # write attempts per batch, the first included
    initial_interval = 0.1           # retry backoff, seconds (full jitter)
    max_interval = 2.0
    max_elapsed = 10.0               # time budget of one batch, retries included

Relative file paths are relative to the configuration file. `load_config(path)` raises `ConfigError` whose
message starts with the key, e.g. ``peers[1].allowed_ips[0]: '10.8.0.300/32' is not an IP prefix``.

This module only maps TOML onto the settings: every default and every rule (ranges, interface name, MTU,
peer id, endpoint, prefix, seconds) is `vpn_packet.tuning`'s, the same ones `Node`, `TunNode`, `Peer` and
`TunDevice` apply, so a value the file accepts is one the node runs with.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vpn_packet import tuning
from vpn_packet.errors import ConfigError
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.handshake import Security, SecurityMode
from vpn_packet.transport.identity import (
    NodeIdentity,
    certificate_file_key_problem,
    decode_public_key,
    load_identity,
)
from vpn_packet.tuning import LOG_LEVELS, NODE_RESILIENCE, Tuning, parse_endpoint

if TYPE_CHECKING:
    from vpn_packet.mesh.config import DiscoveryConfig

__all__ = [
    "ConfigError",
    "InterfaceConfig",
    "NodeConfig",
    "NODE_RESILIENCE",
    "NodeSection",
    "PeerConfig",
    "TlsConfig",
    "Tuning",
    "ConfigDiff",
    "diff_configs",
    "load_config",
    "parse_config",
    "start_warnings",
]


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    name: str
    addresses: tuple[str, ...]
    mtu: int = tuning.MTU
    txqueuelen: int = tuning.TXQUEUELEN
    offload: bool = True


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    public_key: bytes | None = None  # raw Ed25519 key (key mode)

    def to_peer(self) -> Peer:
        return Peer(self.id, self.endpoint, self.allowed_ips)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """CA mode: this node's CA-issued certificate and key, and the CA that peers' certificates chain to."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class NodeSection:
    id: str
    key: Path | None = None
    insecure: bool = False
    log_level: str = "info"
    metrics_file: Path | None = None
    metrics_interval: float = 0.0
    metrics_listen: tuple[str, int] | None = None
    shutdown_timeout: float = tuning.SHUTDOWN_TIMEOUT
    drop_log_interval: float = 5.0
    control_socket: Path | None = None


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
    identity: NodeIdentity | None = field(default=None, repr=False)
    discovery: DiscoveryConfig | None = None

    @property
    def mode(self) -> SecurityMode:
        """How peers are authenticated: `key`, `ca` or `insecure`."""
        if self.node.insecure:
            return "insecure"
        return "ca" if self.tls is not None else "key"

    def security(self) -> Security:
        """The `Security` this configuration describes (builds the TLS contexts)."""
        if self.mode == "insecure":
            return Security.insecure(self.node.id)
        if self.tls is not None:
            return Security.with_ca(self.node.id, self.tls.cert, self.tls.key, self.tls.ca)
        assert self.identity is not None
        keys = {peer.id: peer.public_key for peer in self.peers if peer.public_key is not None}
        return Security.with_keys(self.identity, keys, self.node.id)


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


def _checked(where: str, rule: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`rule(*args, **kwargs)` (a `vpn_packet.tuning` rule), a `ValueError` turned into a `ConfigError`."""
    try:
        return rule(*args, **kwargs)
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from None


def _default(cls: type, name: str) -> Any:
    """The default of dataclass field `name`: the parser never restates a default."""
    for f in fields(cls):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(name)  # pragma: no cover - a programming error


def _int(table: Mapping[str, Any], key: str, where: str, default: int, low: int, high: int) -> int:
    return _checked(where, tuning.check_int, table.get(key, default), low, high)


def _seconds(table: Mapping[str, Any], key: str, where: str, default: float, *, zero: bool = False) -> float:
    return _checked(where, tuning.check_seconds, table.get(key, default), zero=zero)


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


def _writable(path: Path, where: str) -> Path:
    """A file the node writes later (`metrics_file`, on SIGUSR1 and at exit, through a temporary file in the
    same directory and a rename): checked now, so that a path this process cannot write is refused at start
    with its reason instead of a warning at exit (issue 22: under the shipped systemd unit only
    /run/vpn-packet is writable, and `/run/vpn0.json` failed only when the node stopped)."""
    directory = path.parent
    if path.is_dir():
        raise ConfigError(where, f"{path} is a directory, not a file")
    if not directory.is_dir():
        raise ConfigError(where, f"cannot write {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            where,
            f"cannot write {path}: this process (uid {os.getuid()}) may not create files in {directory} "
            "(the file is replaced through a temporary file there); under the systemd unit "
            "(packaging/systemd) only /run/vpn-packet is writable: use /run/vpn-packet/NAME.json",
        )
    return path


# --- sections ---------------------------------------------------------------------------------------------


def _interface(data: Mapping[str, Any]) -> InterfaceConfig:
    table = _table(data, "interface", required=True)
    _unknown(table, "interface", {"name", "address", "mtu", "txqueuelen", "offload"})
    name = _checked("interface.name", tuning.check_interface_name, _str(table, "name", "interface.name"))
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
    addresses = [_checked(where, tuning.check_interface_address, value) for where, value in items]
    ipv6 = any(":" in a for a in addresses)
    mtu = _checked("interface.mtu", tuning.check_mtu, table.get("mtu", tuning.MTU), ipv6=ipv6)
    txqueuelen = _int(
        table, "txqueuelen", "interface.txqueuelen", tuning.TXQUEUELEN, 1, tuning.MAX_TXQUEUELEN
    )
    offload = table.get("offload", True)
    if not isinstance(offload, bool):
        raise ConfigError("interface.offload", f"expected true or false, got {offload!r}")
    return InterfaceConfig(name, tuple(addresses), mtu, txqueuelen, offload)


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


def _peers(data: Mapping[str, Any], base: Path | None, *, required: bool = True) -> tuple[PeerConfig, ...]:
    if "peers" not in data and not required:
        return ()
    if "peers" not in data:
        raise ConfigError("peers", "missing: a node without [[peers]] has nobody to forward packets to")
    raw = data["peers"]
    if not isinstance(raw, list):
        raise ConfigError("peers", "expected an array of tables ([[peers]])")
    if not raw:
        raise ConfigError("peers", "empty: a node without [[peers]] has nobody to forward packets to")
    peers: list[PeerConfig] = []
    seen_ids: dict[str, int] = {}
    owners: dict[str, str] = {}
    for i, entry in enumerate(raw):
        where = f"peers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a table")
        _unknown(entry, where, {"id", "endpoint", "allowed_ips", "public_key"})
        peer_id = _checked(f"{where}.id", tuning.check_peer_id, _str(entry, "id", f"{where}.id"))
        if peer_id in seen_ids:
            raise ConfigError(f"{where}.id", f"{peer_id!r} is already the id of peers[{seen_ids[peer_id]}]")
        seen_ids[peer_id] = i
        endpoint = _str(entry, "endpoint", f"{where}.endpoint")
        _checked(f"{where}.endpoint", parse_endpoint, endpoint)
        allowed = entry.get("allowed_ips")
        if allowed is None:
            raise ConfigError(f"{where}.allowed_ips", "missing (the prefixes this peer owns)")
        if not isinstance(allowed, list):
            raise ConfigError(f"{where}.allowed_ips", f"expected an array of prefixes, got {allowed!r}")
        if not allowed:
            raise ConfigError(
                f"{where}.allowed_ips", "empty: a peer that owns no prefix is never sent to or accepted from"
            )
        prefixes = []
        for j, prefix in enumerate(allowed):
            key = f"{where}.allowed_ips[{j}]"
            text = _checked(key, tuning.check_prefix, prefix)
            if text in owners:
                raise ConfigError(key, f"{text} is already given to peer {owners[text]!r}")
            owners[text] = peer_id
            prefixes.append(text)
        public_key = None
        if "public_key" in entry:
            key_text = _str(entry, "public_key", f"{where}.public_key")
            public_key = _checked(f"{where}.public_key", decode_public_key, key_text)
        peers.append(PeerConfig(peer_id, endpoint, tuple(prefixes), public_key))
    return tuple(peers)


def _endpoint_key(host: str, port: int) -> tuple[str, int]:
    """An endpoint in one spelling, so that `[fd00::3]:7000` and `[fd00:0::3]:7000` compare equal."""
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return host.lower().rstrip("."), port


def _is_local(host: str, interface: InterfaceConfig) -> bool:
    """Whether `host` is an address of this host that needs no configuration to exist: the unspecified
    address (connecting to it reaches this host), a loopback address, `localhost`, or the interface's own."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    own = {ipaddress.ip_interface(a).ip for a in interface.addresses}
    return ip.is_unspecified or ip.is_loopback or ip in own


def _check_routes(interface: InterfaceConfig, listen: tuple[str, int], peers: tuple[PeerConfig, ...]) -> None:
    """The rules between keys that each look fine alone but together cannot work (issue 11):

    - a peer's endpoint is this node's own listen address (the same IP and port, or a local address on the
      listen port when listening on 0.0.0.0 or ::): the node would connect to itself;
    - two peers with the same endpoint: both would reach one node, which is only one of them;
    - a peer's allowed_ips contains this node's own interface address within the interface's subnet (a
      wider prefix, like a gateway's 0.0.0.0/0, is fine): the peer could send packets from it, which the
      kernel drops as martians while the peer counts them delivered;
    - a peer's allowed_ips contains a peer's endpoint: the tunnel would route its own (underlay) traffic to
      that peer into itself.
    """
    own = [ipaddress.ip_interface(a) for a in interface.addresses]
    listen_ip = ipaddress.ip_address(listen[0])
    shown_listen = f"[{listen_ip}]:{listen[1]}" if listen_ip.version == 6 else f"{listen_ip}:{listen[1]}"
    endpoints: dict[tuple[str, int], int] = {}
    underlay: list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    for i, peer in enumerate(peers):
        where = f"peers[{i}].endpoint"
        host, port = parse_endpoint(peer.endpoint)
        if port == listen[1]:
            same = _endpoint_key(host, port) == _endpoint_key(listen[0], listen[1])
            wildcard = listen_ip.is_unspecified and _is_local(host, interface)
            if wildcard and listen_ip.version == 4 and ":" in host:
                wildcard = False  # 0.0.0.0 does not accept IPv6 connections
            if same or wildcard:
                raise ConfigError(
                    where,
                    f"{peer.endpoint} is this node's own listen address ({shown_listen}, "
                    "listen.address): the node would connect to itself",
                )
        key = _endpoint_key(host, port)
        if key in endpoints:
            k = endpoints[key]
            raise ConfigError(
                where,
                f"{peer.endpoint} is already the endpoint of peers[{k}] ({peers[k].id!r}): one address "
                "reaches one node",
            )
        endpoints[key] = i
        with contextlib.suppress(ValueError):  # a host name: its address is only known when connecting
            underlay.append((i, ipaddress.ip_address(host)))
    # Endpoint addresses sorted per IP version: a prefix finds those inside it by binary search, so the
    # check is linear in the peers (issue 21: it was every prefix against every endpoint).
    endpoint_index: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for k, ip in underlay:
        endpoint_index[ip.version].append((int(ip), k))
    for entries in endpoint_index.values():
        entries.sort()
    # The interface's addresses and subnets as integers: each prefix is compared by integers, not parsed
    # into an `ipaddress` network (the most of a 10,000-peer config's checks went there).
    own_bounds = [
        (a.version, int(a.ip), int(a.network.network_address), int(a.network.broadcast_address), a)
        for a in own
    ]
    for i, peer in enumerate(peers):
        for j, prefix in enumerate(peer.allowed_ips):
            where = f"peers[{i}].allowed_ips[{j}]"
            version, first, last = tuning.prefix_bounds(prefix)  # normalised by _peers already
            for own_version, own_ip, subnet_first, subnet_last, address in own_bounds:
                if own_version != version or not first <= own_ip <= last:
                    continue
                # A prefix wider than the interface's own subnet (a gateway peer's 0.0.0.0/0, 10.0.0.0/8)
                # is fine: the subnet's connected route is more specific, and only a peer forging our own
                # address as its source would be dropped. A prefix inside our subnet that holds our
                # address hands our own address to that peer: refused.
                wider = first <= subnet_first and subnet_last <= last
                if not wider or (first, last) == (subnet_first, subnet_last):
                    raise ConfigError(
                        where,
                        f"{prefix} contains this node's own address {address.ip} (interface.address): "
                        "packets from it would be dropped by the kernel as martians",
                    )
            inside = _endpoints_in(endpoint_index, version, first, last)
            if inside is not None:
                k, ip = inside
                raise ConfigError(
                    where,
                    f"{prefix} contains {ip}, the endpoint of peer {peers[k].id!r} "
                    f"(peers[{k}].endpoint): the tunnel would route its own traffic to that peer "
                    "into itself",
                )


def _endpoints_in(
    index: Mapping[int, list[tuple[int, int]]], version: int, first: int, last: int
) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The first peer (by position) whose endpoint address is inside the prefix `first..last` of IP
    `version`, with that address."""
    entries = index[version]
    start = bisect.bisect_left(entries, (first, -1))
    stop = bisect.bisect_right(entries, (last, sys.maxsize))
    if start >= stop:
        return None
    value, k = min(entries[start:stop], key=lambda entry: entry[1])
    return k, ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value)


def _node(data: Mapping[str, Any], base: Path | None) -> NodeSection:
    table = _table(data, "node", required=False)
    known = {f.name for f in fields(NodeSection)}
    _unknown(table, "node", known)
    insecure = table.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError("node.insecure", f"expected true or false, got {insecure!r}")
    key = _existing(base, table["key"], "node.key") if "key" in table else None
    peer_id = _checked("node.id", tuning.check_peer_id, table["id"]) if "id" in table else ""
    level = _str(table, "log_level", "node.log_level", "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError("node.log_level", f"{level!r}: expected one of {', '.join(LOG_LEVELS)}")
    metrics_file = (
        _writable(_path(base, table["metrics_file"], "node.metrics_file"), "node.metrics_file")
        if "metrics_file" in table
        else None
    )
    return NodeSection(
        id=peer_id,
        key=key,
        insecure=insecure,
        log_level=level,
        metrics_file=metrics_file,
        metrics_interval=_seconds(
            table,
            "metrics_interval",
            "node.metrics_interval",
            _default(NodeSection, "metrics_interval"),
            zero=True,
        ),
        metrics_listen=_address(table, "metrics_listen", "node.metrics_listen")
        if "metrics_listen" in table
        else None,
        shutdown_timeout=_seconds(
            table, "shutdown_timeout", "node.shutdown_timeout", _default(NodeSection, "shutdown_timeout")
        ),
        drop_log_interval=_seconds(
            table, "drop_log_interval", "node.drop_log_interval", _default(NodeSection, "drop_log_interval")
        ),
        control_socket=_path(base, table["control_socket"], "node.control_socket")
        if "control_socket" in table
        else None,
    )


def _tls(data: Mapping[str, Any], base: Path | None) -> TlsConfig | None:
    if "tls" not in data:
        return None
    table = _table(data, "tls", required=True)
    _unknown(table, "tls", {"cert", "key", "ca"})
    for key in ("cert", "key", "ca"):
        if key not in table:
            what = "the CA that peers' certificates chain to" if key == "ca" else f"this node's {key}"
            raise ConfigError(
                f"tls.{key}", f"missing ({what}); or drop [tls] and use keys (vpn-packet genkey)"
            )
    cert = _existing(base, table["cert"], "tls.cert")
    problem = certificate_file_key_problem(cert)
    if problem is not None:
        raise ConfigError("tls.cert", f"the certificate's key cannot be trusted: {problem}")
    return TlsConfig(cert, _existing(base, table["key"], "tls.key"), _existing(base, table["ca"], "tls.ca"))


_NO_IDENTITY = (
    "missing: this node has no identity. Make one with `vpn-packet genkey NAME` and set "
    'key = "NAME.key" in [node]; or set insecure = true to run plaintext and unauthenticated (tests only)'
)


def _security(
    node: NodeSection, tls: TlsConfig | None, peers: tuple[PeerConfig, ...]
) -> tuple[NodeSection, NodeIdentity | None]:
    """Checks that the file describes exactly one way to authenticate, and completes `[node] id`.

    Key mode (the default): `[node] key` and every peer's `public_key`; the id defaults to the name in the
    key file. CA mode (`[tls]`): `[node] id`, the name the certificate carries; no public keys. Insecure:
    `[node] id` (peers know an insecure node only by the id it claims), no key, no `[tls]`.
    """
    if node.insecure:
        for name, present in (("node.key", node.key is not None), ("tls", tls is not None)):
            if present:
                raise ConfigError(name, "set, but node.insecure = true turns authentication off: pick one")
        for i, peer in enumerate(peers):
            if peer.public_key is not None:
                raise ConfigError(f"peers[{i}].public_key", "set, but node.insecure = true ignores keys")
        if not node.id:
            raise ConfigError(
                "node.id", "missing: an insecure node is known to its peers by the id it claims"
            )
        return node, None
    if tls is not None:
        if node.key is not None:
            raise ConfigError("node.key", "set together with [tls]: use keys or a CA, not both")
        for i, peer in enumerate(peers):
            if peer.public_key is not None:
                raise ConfigError(f"peers[{i}].public_key", "set, but [tls] trusts peers through its CA")
        if not node.id:
            raise ConfigError("node.id", "missing: with [tls] it is the name this node's certificate carries")
        return node, None
    if node.key is None:
        raise ConfigError("node.key", _NO_IDENTITY)
    identity = _checked("node.key", load_identity, node.key)
    owners: dict[bytes, str] = {identity.public_key_bytes: "this node ([node] key)"}
    for i, peer in enumerate(peers):
        where = f"peers[{i}].public_key"
        if peer.public_key is None:
            raise ConfigError(where, f"missing: the key string `vpn-packet genkey` printed for {peer.id}")
        if peer.public_key in owners:
            raise ConfigError(where, f"the same key as {owners[peer.public_key]}")
        owners[peer.public_key] = f"peer {peer.id!r}"
    if not node.id:
        node = dataclasses.replace(node, id=_checked("node.id", tuning.check_peer_id, identity.name))
    return node, identity


def _tuning(data: Mapping[str, Any]) -> Tuning:
    """Each key is checked by the field's own rule (`Tuning.spec`), so the error names `tuning.<key>`."""
    from vpn_packet.deprecation import TUNING_ALIASES

    table = _table(data, "tuning", required=False)
    _unknown({k: v for k, v in table.items() if k not in TUNING_ALIASES}, "tuning", set(Tuning.names()))
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = TUNING_ALIASES.get(key, key)  # a deprecated key: its new name's rule, its own name in errors
        values[key] = value if name is None else _checked(f"tuning.{key}", Tuning.spec(name).check, value)
    try:
        return Tuning(**Tuning.resolve_aliases(values))
    except ValueError as exc:  # a rule between fields: its message starts with the field it names
        name, _, message = str(exc).partition(": ")
        raise ConfigError(
            f"tuning.{name}", message.replace("keepalive_interval", "tuning.keepalive_interval")
        ) from None


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
        values[key] = _seconds(table, key, f"resilience.{key}", getattr(NODE_RESILIENCE, key), zero=zero)
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
        if key not in {"interface", "listen", "peers", "node", "tls", "tuning", "resilience", "discovery"}:
            raise ConfigError(
                key,
                "unknown key (expected interface, listen, peers, node, tls, tuning, resilience, discovery)",
            )
    interface = _interface(data)
    listen = _listen(data)
    # With [discovery], static [[peers]] are optional: the mesh's members come from etcd.
    peers = _peers(data, base, required="discovery" not in data)
    _check_routes(interface, listen, peers)
    tls = _tls(data, base)
    node, identity = _security(_node(data, base), tls, peers)
    if node.id in {p.id for p in peers}:
        raise ConfigError("node.id", f"{node.id!r} is also the id of a peer")
    tuning = _tuning(data)
    resilience = _resilience(data)
    discovery = None
    if "discovery" in data:
        # Imported only when configured: a node without [discovery] does not load the mesh.
        from vpn_packet.mesh.config import parse_discovery

        discovery = parse_discovery(
            _table(data, "discovery", required=True),
            base=base,
            identity=identity,
            node_id=node.id,
            listen=listen,
            interface_name=interface.name,
        )
    return NodeConfig(interface, listen, peers, node, tls, tuning, path, resilience, identity, discovery)


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
        # With a key, the message is like every other key's (the caller names the file in front of it).
        key = _toml_error_key(text, str(exc))
        raise ConfigError(
            key, f"not valid TOML: {exc}" if key else f"{path}: not valid TOML: {exc}"
        ) from None
    return parse_config(data, base=path.resolve().parent, path=path)


_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]")
_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=")


def _toml_error_key(text: bytes, message: str) -> str:
    """The dotted key (`tuning.ack_timeout`, `peers[1].allowed_ips`) a TOML syntax error is in, as the
    other errors name it: the key on the error's line or the nearest one above it (a value may span lines),
    under the table header above that. `tomllib` gives only a line and column (issue 22); "" when no key
    can be told (an error in a table header, or before any key)."""
    lines = text.decode("utf-8", "replace").splitlines()
    found = _TOML_POSITION.search(message)
    line = int(found[1]) - 1 if found else len(lines) - 1  # "at end of document": the last line
    key = ""
    for index in range(min(line, len(lines) - 1), -1, -1):
        if _TOML_HEADER.match(lines[index]):
            if index == line:
                return ""  # the header itself is broken
            break
        matched = _TOML_KEY.match(lines[index])
        if matched:
            key, line = re.sub(r"\s+", "", matched[1]), index
            break
    if not key:
        return ""
    arrays: dict[str, int] = {}
    table = ""
    for header_line in lines[:line]:
        header = _TOML_HEADER.match(header_line)
        if header:
            name = re.sub(r"\s+", "", header[2])
            if header[1] == "[[":
                arrays[name] = arrays.get(name, -1) + 1
                table = f"{name}[{arrays[name]}]"
            else:
                table = name
    return f"{table}.{key}" if table else key


_FORWARDING_SYSCTL = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def _read_sysctl(name: str) -> str | None:
    """The value of sysctl `name` in this network namespace, or None when it cannot be read."""
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def start_warnings(
    config: NodeConfig, *, read_sysctl: Callable[[str], str | None] = _read_sysctl
) -> list[str]:
    """What may not work although the file is valid, one line each, for the node to log at start.

    `[node] id` different from the name in the key file: allowed (the id is a label), said (issue 22).

    A gateway peer (allowed_ips beyond the interface's own subnets, like `0.0.0.0/0` or a LAN behind it)
    carries traffic between the tunnel and other networks: the host that forwards it needs IP forwarding
    (issue 22: nothing said so). This node can see only its own sysctl: it warns when forwarding of that IP
    version is off here (this node forwards when it routes other hosts' traffic into the tunnel, or theirs
    out of it), and names the peer, which must forward too."""
    warnings = []
    identity = config.identity
    if identity is not None and identity.name and config.node.id != identity.name:
        # The key proves who this node is and the id is only a label, so it runs; but peers' configs and
        # logs name it by the name `genkey` put in its key, and a different id is a node named two ways
        # (a copied config whose id was not changed, say).
        warnings.append(
            f"node.id: {config.node.id!r} is not the name in the key file {config.node.key} "
            f"({identity.name!r}): peers know this node by its key and name it {identity.name!r}, this "
            f"node's logs and status say {config.node.id!r}; remove node.id (it defaults to the key's "
            "name) or make the two agree"
        )
    if config.discovery is not None and config.discovery.trust_store:
        warnings.append(
            "discovery.trust_store = true: any entry in etcd that is signed by its own membership's key is "
            "accepted, so whoever can write to etcd can make a trusted peer (labs only; set authority)"
        )
    own = [ipaddress.ip_interface(a).network for a in config.interface.addresses]
    for i, peer in enumerate(config.peers):
        for version in (4, 6):
            beyond = [
                prefix
                for prefix in peer.allowed_ips
                if ipaddress.ip_network(prefix).version == version
                and not any(
                    net.version == version and ipaddress.ip_network(prefix).subnet_of(net)  # type: ignore[arg-type]
                    for net in own
                )
            ]
            if not beyond:
                continue
            sysctl = _FORWARDING_SYSCTL[version]
            if read_sysctl(sysctl) != "0":
                continue
            shown = ", ".join(beyond[:3]) + (", ..." if len(beyond) > 3 else "")
            warnings.append(
                f"peers[{i}].allowed_ips: {peer.id!r} owns {shown}, beyond this tunnel's subnets: traffic "
                f"between the tunnel and other networks needs IP forwarding on the host that routes it, and "
                f"{sysctl} is 0 here (sysctl -w {sysctl}=1 if this node routes other hosts' traffic; "
                f"{peer.id} needs it too, to forward what it receives)"
            )
    return warnings


def level_number(level: str) -> int:
    """The `logging` level of a config level name."""
    return int(getattr(logging, level.upper()))


# --- reload -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What changed between a running configuration and a reloaded one (`diff_configs`).

    `added`/`removed`: peer ids; `changed`: peer id -> the fields that changed (`endpoint`, `allowed_ips`,
    `public_key`); `restart`: the keys outside `[[peers]]` that changed, which only a restart applies
    (`interface.mtu`, `listen.address`, `node.key`, `tuning.*`, ...).
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    restart: tuple[str, ...] = ()

    @property
    def peers_changed(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": {peer_id: list(keys) for peer_id, keys in self.changed.items()},
            "restart_needed": list(self.restart),
        }

    def describe(self) -> str:
        """One line: what changed (or `no change`)."""
        parts = []
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed))
        for peer_id, keys in self.changed.items():
            parts.append(f"{peer_id}: {', '.join(keys)} changed")
        if self.restart:
            parts.append(f"needs a restart: {', '.join(self.restart)}")
        return "; ".join(parts) if parts else "no change"


def _section_changes(prefix: str, old: object, new: object) -> list[str]:
    """The dotted keys of dataclass section `prefix` whose values differ."""
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        return [
            f"{prefix}.{f.name}"
            for f in fields(old)
            if f.repr and getattr(old, f.name) != getattr(new, f.name)
        ]
    return [prefix]


def diff_configs(old: NodeConfig, new: NodeConfig) -> ConfigDiff:
    """What a reload from `old` to `new` changes: peers (applied live) and everything else (needs a
    restart). The node's key counts as changed when its public key differs."""
    restart: list[str] = []
    restart += _section_changes("interface", old.interface, new.interface)
    if old.listen != new.listen:
        restart.append("listen.address")
    restart += _section_changes("node", old.node, new.node)
    old_key = old.identity.public_key_bytes if old.identity is not None else None
    new_key = new.identity.public_key_bytes if new.identity is not None else None
    if old_key != new_key and "node.key" not in restart:
        restart.append("node.key")
    if old.tls != new.tls:
        restart.append("tls")
    restart += _section_changes("tuning", old.tuning, new.tuning)
    restart += _section_changes("resilience", old.resilience, new.resilience)
    if old.discovery != new.discovery:
        restart.append("discovery")
    before = {peer.id: peer for peer in old.peers}
    after = {peer.id: peer for peer in new.peers}
    changed: dict[str, tuple[str, ...]] = {}
    for peer_id in before.keys() & after.keys():
        a, b = before[peer_id], after[peer_id]
        keys = tuple(
            key
            for key, differs in (
                ("endpoint", a.endpoint != b.endpoint),
                ("allowed_ips", a.allowed_ips != b.allowed_ips),
                ("public_key", a.public_key != b.public_key),
            )
            if differs
        )
        if keys:
            changed[peer_id] = keys
    return ConfigDiff(
        added=tuple(p.id for p in new.peers if p.id not in before),
        removed=tuple(p.id for p in old.peers if p.id not in after),
        changed={peer_id: changed[peer_id] for peer_id in after if peer_id in changed},
        restart=tuple(restart),
    )
