"""The mesh at size, simulated without TUN devices (issue 21 item 7): N registered members (plausible
prefixes and keys, real signed entries) in a real etcd, watched by one node.

    python benches/mesh_scale.py --peers 10000          # needs etcd (apt-get install etcd-server)

Reports (it asserts nothing):
- the initial convergence: from the registry's start to all N members applied to a running `Node`
  (verification, the member table, `Node.update_peers`);
- memory per member: the process's RSS growth over those N members, divided by N (and with `--tracemalloc`
  the Python heap's growth: what the member table, the entries and the peer set hold);
- a join: from a put in etcd to the member applied at the watcher (p50, p99 over `--joins`);
- a leave: from a delete to the member removed;
- a peer lookup: `StaticPeerDiscovery.lookup` with the N discovered members, and with the same N as
  static peers from the start (the goal: within 1.2x).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vpn_packet.mesh.config import DiscoveryConfig
from vpn_packet.mesh.members import PeerSetChange
from vpn_packet.mesh.membership import Membership, sign_entry, sign_membership
from vpn_packet.mesh.registry import Registry
from vpn_packet.node.node import Node
from vpn_packet.testutil.etcd import EtcdCluster
from vpn_packet.transport import Peer, Security
from vpn_packet.transport.discovery import StaticPeerDiscovery
from vpn_packet.transport.identity import generate_identity

PREFIX = "/vpn-packet/scale/"


class _Key:
    """A signing key with the two things `sign_membership`/`sign_entry` use (no key file: N of them)."""

    def __init__(self) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()
        self.public_key_bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _address(i: int) -> str:
    """The i-th member's tunnel address: 10.64.0.0/10 (4 M addresses), one /32 each."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.64.0.0")) + 1 + i))


def _entry(authority: Any, i: int, now: int) -> tuple[str, bytes, Membership]:
    key = _Key()
    member_id = f"member-{i:06d}"
    membership = sign_membership(
        authority, member_id=member_id, public_key=key.public_key_bytes, allowed_ips=[f"{_address(i)}/32"],
        issued=now, days=30,
    )  # fmt: skip
    endpoint = f"198.18.{(i >> 8) & 0xFF}.{i & 0xFF}:7000"  # the benchmarking range (RFC 2544)
    entry = sign_entry(key, membership, endpoint=endpoint, sequence=1)  # type: ignore[arg-type]
    return f"{PREFIX}members/{member_id}", entry.record, membership


async def _put_all(client: Any, items: list[tuple[str, bytes]]) -> None:
    for start in range(0, len(items), 256):
        await asyncio.gather(*(client.put(key.encode(), value) for key, value in items[start : start + 256]))


def _lookup_costs(tables: list[StaticPeerDiscovery], addresses: list[str], rounds: int = 15) -> list[float]:
    """Seconds per lookup in each table: the best of `rounds` passes over `addresses`, the tables taking
    turns (a shared, noisy machine: both see the same moments)."""
    best = [float("inf")] * len(tables)
    for _ in range(rounds):
        for i, table in enumerate(tables):
            started = time.perf_counter()
            for address in addresses:
                table.lookup(address)
            best[i] = min(best[i], (time.perf_counter() - started) / len(addresses))
    return best


async def run(peers: int, joins: int, workdir: Path, *, trace: bool = False) -> dict[str, Any]:
    from vpn_packet.mesh.etcd import TlsEtcdClient

    cluster = EtcdCluster.start(workdir / "etcd")
    try:
        authority = generate_identity("authority", workdir, force=True)
        me = generate_identity("observer", workdir, force=True)
        now = int(time.time())
        started = time.perf_counter()
        generated = [_entry(authority, i, now) for i in range(peers + joins)]
        sign_seconds = time.perf_counter() - started
        client = TlsEtcdClient(cluster.client_urls, timeout=30)
        started = time.perf_counter()
        await _put_all(client, [(key, record) for key, record, _ in generated[:peers]])
        put_seconds = time.perf_counter() - started

        own = sign_membership(
            authority, member_id="observer", public_key=me.public_key_bytes, allowed_ips=["10.0.0.1/32"],
            issued=now, days=30,
        )  # fmt: skip
        config = DiscoveryConfig(
            etcd=tuple(cluster.client_urls), authorities=(authority.public_key_bytes,),
            membership_path=workdir / "unused", membership=own, prefix=PREFIX, ttl=10,
            endpoint="127.0.0.1:1", state=workdir / "observer.state",
        )  # fmt: skip
        node = Node(Security.with_keys(me, {}), keep_connections=False)
        await node.start()
        applied: dict[str, float] = {}
        removed: dict[str, float] = {}
        everyone = asyncio.Event()
        changed = asyncio.Condition()

        async def apply(change: PeerSetChange) -> None:
            added = [Peer(m.id, m.endpoint, m.allowed_ips) for m in change.added.values()]
            keys = {m.id: m.public_key for m in change.added.values()}
            await node.update_peers(added, (), sorted(change.removed), keys, source="discovery")
            stamp = time.perf_counter()
            for peer_id in change.added:
                applied[peer_id] = stamp
            for peer_id in change.removed:
                removed[peer_id] = stamp
            if len(node.discovery) >= peers:
                everyone.set()
            async with changed:
                changed.notify_all()

        if trace:
            tracemalloc.start()
        rss_before = _rss()
        traced_before = tracemalloc.get_traced_memory()[0] if trace else 0
        registry = Registry(config, me, apply)
        started = time.perf_counter()
        await registry.start()
        await asyncio.wait_for(everyone.wait(), 600)
        converge_seconds = time.perf_counter() - started
        rss_after = _rss()
        traced = (tracemalloc.get_traced_memory()[0] - traced_before) if trace else None
        if trace:
            tracemalloc.stop()

        join_latencies = []
        for key, record, membership in generated[peers:]:
            put_at = time.perf_counter()
            await client.put(key.encode(), record)
            async with changed:
                await changed.wait_for(lambda m=membership: m.id in applied)  # type: ignore[misc]
            join_latencies.append(applied[membership.id] - put_at)
        leave_latencies = []
        leaves = min(joins, peers // 2)  # members left for the lookups
        for key, _record, membership in generated[:leaves]:
            delete_at = time.perf_counter()
            await client.delete(key.encode())
            async with changed:
                await changed.wait_for(lambda m=membership: m.id in removed)  # type: ignore[misc]
            leave_latencies.append(removed[membership.id] - delete_at)

        addresses = [_address(i) for i in range(leaves, peers)]
        static = StaticPeerDiscovery(
            Peer(f"member-{i:06d}", f"198.18.0.1:{7000 + i % 1000}", [f"{_address(i)}/32"])
            for i in range(peers)
        )
        discovered_cost, static_cost = _lookup_costs([node.discovery, static], addresses)
        await registry.stop()
        await node.stop(1.0)
        await client.close()
        join_latencies.sort()
        leave_latencies.sort()
        return {
            "peers": peers,
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "sign_seconds_total": round(sign_seconds, 2),
            "etcd_put_seconds_total": round(put_seconds, 2),
            "initial_convergence_seconds": round(converge_seconds, 3),
            "rss_per_member_bytes": round((rss_after - rss_before) / peers),
            "python_heap_per_member_bytes": None if traced is None else round(traced / peers),
            "join_ms_p50": round(statistics.median(join_latencies) * 1000, 2),
            "join_ms_p99": round(join_latencies[int(len(join_latencies) * 0.99) - 1] * 1000, 2),
            "leave_ms_p50": round(statistics.median(leave_latencies) * 1000, 2),
            "lookup_ns_discovered": round(discovered_cost * 1e9, 1),
            "lookup_ns_static": round(static_cost * 1e9, 1),
            "lookup_ratio": round(discovered_cost / static_cost, 2),
            "refused": registry.status()["refused"],
        }
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--joins", type=int, default=50)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also the Python heap per member (slows the convergence)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        result = asyncio.run(run(args.peers, args.joins, Path(workdir), trace=args.tracemalloc))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
