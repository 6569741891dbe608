"""`[discovery]` of the node configuration: membership in etcd, trust from an authority key (issue 21).

```toml
[discovery]
etcd = ["http://192.168.77.100:2379"]  # the etcd cluster's client URLs
authority = "..."                      # the authority's public key string, or a list (rotation)
membership = "node-a.member"           # this node's membership, from `vpn-packet sign`
# prefix = "/vpn-packet/default/"      # where the members live in etcd
# ttl = 10                             # seconds: a node that stops renewing leaves the others within this
# endpoint = "192.168.77.1:7000"       # what to publish (default: the listen address, if not a wildcard)
# state = "/var/lib/vpn-packet/vpn0.state"  # last memberships seen and revocations, for a start without etcd
# ca / cert / key                      # TLS to etcd
# trust_store = true                   # accept entries of any authority: labs only, warned at every start
```

The node's own membership is checked here, at load: signed by a configured authority, unexpired, naming
this node's key and id. A node refuses to start otherwise (revocations held in the state file are checked
when the registry starts). Discovery needs key mode (`[node] key`): a membership names a key.

The rules and defaults are `vpn_packet.tuning`'s; this module maps the TOML table onto `DiscoveryConfig` and
raises `ConfigError` naming the key, like the rest of `vpn_packet.node.config`, which calls it.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vpn_packet import tuning
from vpn_packet.errors import ConfigError, IdentityError, MembershipError
from vpn_packet.mesh.membership import ANY_AUTHORITY, Membership, read_record_file, verify_membership
from vpn_packet.transport.identity import NodeIdentity, decode_public_key

__all__ = ["DISCOVERY_KEYS", "DiscoveryConfig", "parse_discovery"]

#: Every key `[discovery]` accepts.
DISCOVERY_KEYS = frozenset(
    {
        "etcd",
        "authority",
        "membership",
        "prefix",
        "ttl",
        "endpoint",
        "state",
        "ca",
        "cert",
        "key",
        "trust_store",
    }
)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """A checked `[discovery]` table. `authorities` is empty exactly when `trust_store` is true;
    `membership` is this node's own, verified at load (its file is `membership_path`)."""

    etcd: tuple[str, ...]
    authorities: tuple[bytes, ...]
    membership_path: Path
    membership: Membership
    prefix: str = tuning.DISCOVERY_PREFIX
    ttl: int = tuning.DISCOVERY_TTL
    endpoint: str = ""
    state: Path = Path(tuning.DISCOVERY_STATE_DIR)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    trust_store: bool = False

    @property
    def trusted(self) -> frozenset[bytes]:
        """The authority keys entries are checked against (`ANY_AUTHORITY` with `trust_store`)."""
        return ANY_AUTHORITY if self.trust_store else frozenset(self.authorities)


def _url(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"expected a URL like 'http://192.168.77.100:2379', got {value!r}")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or parts.path not in ("", "/")
    ):
        raise ConfigError(where, f"{value!r} is not an etcd client URL like 'http://192.168.77.100:2379'")
    return value


def _etcd(table: Mapping[str, Any]) -> tuple[str, ...]:
    raw = table.get("etcd")
    if raw is None:
        raise ConfigError("discovery.etcd", "missing: the etcd cluster's client URLs")
    urls = [raw] if isinstance(raw, str) else raw
    if not isinstance(urls, list) or not urls:
        raise ConfigError("discovery.etcd", "expected a URL or a non-empty array of URLs")
    checked = tuple(_url(url, f"discovery.etcd[{i}]") for i, url in enumerate(urls))
    schemes = {urlsplit(url).scheme for url in checked}
    if len(schemes) > 1:
        raise ConfigError("discovery.etcd", "mixes http and https: one cluster speaks one of them")
    return checked


def _authorities(table: Mapping[str, Any], identity: NodeIdentity) -> tuple[bytes, ...]:
    raw = table["authority"]
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise ConfigError("discovery.authority", "expected a public key string or a non-empty array of them")
    keys: list[bytes] = []
    for i, text in enumerate(texts):
        where = "discovery.authority" if isinstance(raw, str) else f"discovery.authority[{i}]"
        if not isinstance(text, str):
            raise ConfigError(where, f"expected a public key string, got {text!r}")
        try:
            key = decode_public_key(text)
        except IdentityError as exc:
            raise ConfigError(where, str(exc)) from None
        if key in keys:
            raise ConfigError(where, "given twice")
        if key == identity.public_key_bytes:
            raise ConfigError(where, "this node's own key: an authority key is kept off the nodes")
        keys.append(key)
    return tuple(keys)


def _own_membership(
    path: Path, trusted: frozenset[bytes], identity: NodeIdentity, node_id: str
) -> Membership:
    where = "discovery.membership"
    try:
        membership = verify_membership(read_record_file(path), trusted, time.time())
    except MembershipError as exc:
        raise ConfigError(where, f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(where, f"{path}: {exc.strerror or exc}") from None
    if membership.public_key != identity.public_key_bytes:
        raise ConfigError(where, f"{path} names another key than this node's ([node] key)")
    if membership.id != node_id:
        raise ConfigError(
            where, f"{path} is the membership of {membership.id!r}, and this node is {node_id!r}"
        )
    return membership


def _endpoint(table: Mapping[str, Any], listen: tuple[str, int]) -> str:
    if "endpoint" not in table:
        host, port = listen
        if ipaddress.ip_address(host).is_unspecified:
            raise ConfigError(
                "discovery.endpoint",
                f"missing: listen.address is the wildcard {host}, so say which address the others reach "
                "this node at",
            )
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    value = table["endpoint"]
    if not isinstance(value, str):
        raise ConfigError("discovery.endpoint", f"expected 'host:port', got {value!r}")
    try:
        host, _port = tuning.parse_endpoint(value)
    except ValueError as exc:
        raise ConfigError("discovery.endpoint", str(exc)) from None
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False  # a host name
    if wildcard:
        raise ConfigError("discovery.endpoint", f"{host} is a wildcard, not an address others can reach")
    return value


def _file(base: Path | None, value: object, where: str, *, exists: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"expected a file path, got {value!r}")
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    if exists and not path.is_file():
        raise ConfigError(where, f"file not found: {path}")
    return path


def parse_discovery(
    table: Mapping[str, Any],
    *,
    base: Path | None,
    identity: NodeIdentity | None,
    node_id: str,
    listen: tuple[str, int],
    interface_name: str,
) -> DiscoveryConfig:
    """The `[discovery]` table checked (see the module docstring); `ConfigError` naming the key."""
    for key in table:
        if key not in DISCOVERY_KEYS:
            raise ConfigError(
                f"discovery.{key}", f"unknown key (expected one of: {', '.join(sorted(DISCOVERY_KEYS))})"
            )
    if identity is None:
        raise ConfigError(
            "discovery",
            "needs key mode ([node] key): a membership names this node's key (not [tls], not insecure)",
        )
    trust_store = table.get("trust_store", False)
    if not isinstance(trust_store, bool):
        raise ConfigError("discovery.trust_store", f"expected true or false, got {trust_store!r}")
    if trust_store and "authority" in table:
        raise ConfigError(
            "discovery.trust_store", "set together with authority: trust the authority, or the store"
        )
    if not trust_store and "authority" not in table:
        raise ConfigError(
            "discovery.authority",
            "missing: the authority's public key string (`vpn-packet genkey authority` printed it); "
            "or trust_store = true to accept any entry in the store (labs only)",
        )
    etcd = _etcd(table)
    authorities = () if trust_store else _authorities(table, identity)
    if "membership" not in table:
        raise ConfigError("discovery.membership", "missing: this node's membership, from `vpn-packet sign`")
    membership_path = _file(base, table["membership"], "discovery.membership")
    trusted = ANY_AUTHORITY if trust_store else frozenset(authorities)
    membership = _own_membership(membership_path, trusted, identity, node_id)
    prefix = table.get("prefix", tuning.DISCOVERY_PREFIX)
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("/")
        or not prefix.endswith("/")
        or len(prefix) < 2
    ):
        raise ConfigError(
            "discovery.prefix", f"expected a key prefix like '/vpn-packet/default/', got {prefix!r}"
        )
    try:
        ttl = tuning.check_int(
            table.get("ttl", tuning.DISCOVERY_TTL), tuning.MIN_DISCOVERY_TTL, tuning.MAX_DISCOVERY_TTL
        )
    except ValueError as exc:
        raise ConfigError("discovery.ttl", str(exc)) from None
    tls = {
        name: _file(base, table[name], f"discovery.{name}") for name in ("ca", "cert", "key") if name in table
    }
    if ("cert" in tls) != ("key" in tls):
        raise ConfigError("discovery.cert" if "key" in tls else "discovery.key", "cert and key go together")
    if tls and any(urlsplit(url).scheme != "https" for url in etcd):
        raise ConfigError("discovery.etcd", "ca, cert or key are set: TLS to etcd needs https:// URLs")
    state = (
        _file(base, table["state"], "discovery.state", exists=False)
        if "state" in table
        else Path(tuning.DISCOVERY_STATE_DIR) / f"{interface_name}.state"
    )
    return DiscoveryConfig(
        etcd=etcd,
        authorities=authorities,
        membership_path=membership_path,
        membership=membership,
        prefix=prefix,
        ttl=ttl,
        endpoint=_endpoint(table, listen),
        state=state,
        ca=tls.get("ca"),
        cert=tls.get("cert"),
        key=tls.get("key"),
        trust_store=trust_store,
    )
