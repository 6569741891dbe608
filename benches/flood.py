"""A key-holding peer's delivery and latency while an attacker without a key floods the receiver, and the
receiver's memory before and after (issue 22).

    python benches/flood.py                      # every scenario, the issue's sizes scaled as below
    python benches/flood.py --scenario tls --rounds 120 --batches 10 --batch 10   # the issue's 12,000

The receiver is a real `Node` in its own process (`vpn_packet.testutil.peer_process`, key mode: TLS and a
signed hello), the attacker another process (`vpn_packet.testutil.flood`), and the peer this one: fresh
connections one after another, each sending batches and waiting for each acknowledgement
(`legit_rounds`; nothing retried, so a connection refused or evicted shows as failed packets).

Scenarios:

- `baseline`: no flood (the latency to compare with);
- `same-source`: silent connections from the peer's own address (127.0.0.1), `--hold` of them, each
  replaced as soon as the receiver closes it (the issue: 16 held, the peer delivered 0 of 12,000);
- `tls`: TLS handshakes from `--addresses` loopback addresses as fast as one process makes them, each held
  open after TLS without a hello (the issue: about 800/s, the peer delivered 0 of 12,000, or lost 256);
- `silent`: `--silent-count` connections from many addresses that never start TLS (the issue: 4,000).

Each flood lasts `--seconds` (the silent one holds its connections that long once all are open); the peer
makes at least `--rounds` connections, and goes on until the flood has ended.

For each: packets attempted, sent (acknowledged), failed, delivered (counted by the receiver's sink); the
flood's connections opened and its rate; per batch the time from write to acknowledgement (p50/p99, and
what the flood added to the baseline's); the receiver's RSS before the flood, at its end, and
`--settle` seconds after it ended. Reports; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vpn_packet.testutil.flood import FloodProcess, LegitResult, legit_rounds
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.peer_process import PeerProcess, mark_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStreamService

MIB = 1024 * 1024
TEMPLATE = ipv4_packet("10.1.0.2", "10.2.0.1", src_port=4000, dst_port=7, payload=bytes(64))


def rss(pid: int) -> int:
    """VmRSS of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def start_flood(name: str, target: tuple[str, int], args: argparse.Namespace) -> FloodProcess | None:
    if name == "same-source":
        return await FloodProcess.start(
            target, mode="silent", hold=args.hold, count=10**9, warm=args.hold, duration=args.seconds
        )
    if name == "tls":
        return await FloodProcess.start(
            target,
            mode="tls",
            sources="127.1.0.0/16",
            addresses=args.addresses,
            hold=4000,
            count=10**9,
            warm=200,
            duration=args.seconds,
        )
    if name == "silent":
        return await FloodProcess.start(
            target,
            mode="silent",
            sources="127.2.0.0/16",
            addresses=args.addresses,
            hold=args.silent_count,
            count=args.silent_count,
            warm=args.silent_count,
            linger=args.seconds,
            duration=60,
        )
    return None


async def scenario(name: str, args: argparse.Namespace, keys: Path) -> dict[str, Any]:
    ids = identities(keys, "node-a", "node-b")
    tuning = {"max_pending": args.max_pending} if args.max_pending else None
    victim = await PeerProcess.start(
        key=ids["node-b"].path,
        peer_key=ids["node-a"].public_key,
        tuning=tuning,
        sender_endpoint=args.endpoint,
    )
    try:
        security = Security.with_keys(ids["node-a"], {"node-b": ids["node-b"].public_key_bytes})
        service = TcpStreamService(
            StaticPeerDiscovery([Peer("node-b", victim.endpoint, ["10.2.0.0/16"])]), security
        )

        def open_stream() -> Any:
            return service.create_stream("node-b")

        # Warm up: one connection, so the victim's one-off allocations are not counted as the flood's.
        await legit_rounds(open_stream, packet, rounds=1, batches=1, batch=1)
        delivered_before = (await victim.report())["delivered"]
        before = peak = rss(victim.pid)
        flood = await start_flood(name, ("127.0.0.1", victim.port), args)
        done = asyncio.create_task(flood.finished()) if flood is not None else None
        started = time.perf_counter()
        result = LegitResult()
        rounds = 0
        # At least --rounds connections, and more until the flood (at most --seconds) has ended.
        while rounds < args.rounds or (done is not None and not done.done()):
            await legit_rounds(
                open_stream, packet, rounds=1, batches=args.batches, batch=args.batch, result=result
            )
            rounds += 1
            peak = max(peak, rss(victim.pid))
        seconds = time.perf_counter() - started
        stats = await done if done is not None else None
        ended = time.perf_counter()
        await asyncio.sleep(max(0.0, args.settle - (time.perf_counter() - ended)))
        after = rss(victim.pid)
        report = await victim.report()
    finally:
        await victim.close()
    delivered = report["delivered"] - delivered_before
    return {
        "scenario": name,
        "attempted": result.attempted,
        "sent": result.sent,
        "failed": result.failed,
        "delivered": delivered,
        "delivered_pct": round(100 * delivered / result.attempted, 2) if result.attempted else 0,
        "connects": result.connects,
        "connect_errors": result.connect_errors[:3],
        "connect_p50_ms": round(1000 * percentile(result.connect_seconds, 0.5), 2),
        "connect_p99_ms": round(1000 * percentile(result.connect_seconds, 0.99), 2),
        "ack_p50_ms": round(1000 * percentile(result.ack_seconds, 0.5), 2),
        "ack_p99_ms": round(1000 * percentile(result.ack_seconds, 0.99), 2),
        "seconds": round(seconds, 2),
        "flood": None
        if stats is None
        else {
            "opened": stats.opened,
            "failed": stats.failed,
            "closed_by_receiver": stats.closed,
            "per_second": round((stats.opened + stats.failed) / stats.seconds, 1) if stats.seconds else 0,
        },
        "receiver": {k: report["receiver"].get(k) for k in ("evicted_pending", "handshake_failures")},
        "rss_mb": {
            "before": round(before / MIB, 1),
            "peak": round(peak / MIB, 1),
            "after": round(after / MIB, 1),
            "growth_after": round((after - before) / MIB, 1),
        },
    }


def packet(n: int) -> bytes:
    return mark_packet(TEMPLATE, 0, n)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", action="append", choices=("baseline", "same-source", "tls", "silent"), default=None
    )
    parser.add_argument("--rounds", type=int, default=40, help="fresh connections of the peer, at least")
    parser.add_argument("--batches", type=int, default=10, help="batches per connection")
    parser.add_argument("--batch", type=int, default=10, help="packets per batch")
    parser.add_argument("--hold", type=int, default=64, help="same-source: silent connections held")
    parser.add_argument("--addresses", type=int, default=250, help="tls, silent: source addresses")
    parser.add_argument("--silent-count", type=int, default=4000, help="silent: connections held")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds after the flood to measure RSS")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each flood lasts at most")
    parser.add_argument("--max-pending", type=int, default=0, help="the receiver's max_pending (0: default)")
    parser.add_argument(
        "--endpoint",
        default="127.0.0.9:9",
        help="the peer's endpoint in the receiver's config; 127.0.0.1:9, the address it connects from, earns "
        "it the admission's favour",
    )
    args = parser.parse_args()
    names = args.scenario or ["baseline", "same-source", "tls", "silent"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results.append(await scenario(name, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["scenario"] == "baseline"), None)
    if base is not None:
        for r in results:
            r["added_p50_ms"] = round(r["ack_p50_ms"] - base["ack_p50_ms"], 2)
            r["added_p99_ms"] = round(r["ack_p99_ms"] - base["ack_p99_ms"], 2)
    print()
    print(
        "| scenario | delivered | failed | flood conns/s | ack p50 / p99 ms | added p50 / p99 ms "
        f"| RSS before / peak / {args.settle:g}s after (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        flood = r["flood"]
        rate = f"{flood['per_second']:.0f}" if flood else "-"
        rss_mb = r["rss_mb"]
        print(
            f"| {r['scenario']} | {r['delivered']}/{r['attempted']} ({r['delivered_pct']}%) | {r['failed']} "
            f"| {rate} | {r['ack_p50_ms']} / {r['ack_p99_ms']} "
            f"| {r.get('added_p50_ms', '-')} / {r.get('added_p99_ms', '-')} "
            f"| {rss_mb['before']} / {rss_mb['peak']} / {rss_mb['after']} |"
        )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
