"""The etcd client: `aetcd` (asyncio, gRPC), with TLS and several endpoints.

Why `aetcd` (README "Mesh"): it is asyncio like the node, maintained (1.0.0, 2026), speaks etcd's v3 gRPC API
(leases, watches from a revision, prefix reads) on the official `grpcio`, and is small enough to read. Its
`connect()` opens an insecure channel to one host:port only, so `TlsEtcdClient` overrides that one method:
one gRPC channel to every configured endpoint (`ipv4:a:2379,b:2379`, gRPC's pick-first fails over in order),
secure when the URLs are `https://` (`grpc.ssl_channel_credentials` with `[discovery] ca`, `cert`, `key`).
`etcd3` (sync, unmaintained since 2020) and `etcd3-async-client` (young, few users) were the alternatives.

Imported only when a node has `[discovery]` (and by `vpn-packet revoke --etcd`): `pip install
'vpn-packet[mesh]'` brings it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]
from aetcd import rpc, watcher

from vpn_packet.errors import ConfigError

__all__ = ["TlsEtcdClient", "grpc_target"]


def grpc_target(urls: Sequence[str]) -> str:
    """One gRPC target for every endpoint: `ipv4:a:p,b:p` (or `ipv6:[a]:p,...`) when all are addresses of
    one family, else the first one by name (`dns:host:port`; gRPC resolves it)."""
    hosts: list[tuple[str, int]] = []
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ConfigError("discovery.etcd", f"{url!r} has no host and port")
        hosts.append((parts.hostname, parts.port))
    try:
        versions = {ipaddress.ip_address(host).version for host, _ in hosts}
    except ValueError:
        host, port = hosts[0]
        return f"dns:{host}:{port}"
    if versions == {4}:
        return "ipv4:" + ",".join(f"{host}:{port}" for host, port in hosts)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in hosts)
    host, port = hosts[0]
    return f"ipv{next(iter(versions))}:" + (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


class TlsEtcdClient(aetcd.Client):  # type: ignore[misc]
    """`aetcd.Client` over one channel to all `urls`, with TLS for `https://` URLs (see the module docstring).
    `timeout`: seconds per unary call (a call to a dead cluster fails instead of hanging)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(timeout=timeout)
        self._target = grpc_target(urls)
        self._secure = urlsplit(urls[0]).scheme == "https"
        self._tls_files = (ca, cert, key)

    def _channel(self) -> Any:
        # gRPC reconnects on its own; keepalive pings find a dead connection within seconds, not minutes.
        options = [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000)]
        if not self._secure:
            return rpc.insecure_channel(self._target, options=options)
        ca, cert, key = (path.read_bytes() if path is not None else None for path in self._tls_files)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        return rpc.secure_channel(self._target, credentials, options=options)

    async def connect(self) -> None:
        """Opens the channel (aetcd's `connect`, with this channel); the first call on it connects."""
        if self._connected.is_set():
            return
        self.channel = self._channel()
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()
