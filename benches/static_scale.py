"""A node with N static `[[peers]]`, none reachable and none in use (issue 21, item 8 and its goals).

    python benches/static_scale.py --peers 10000 [--idle 30] [--json]

One process, one node on a `FakeTun` (no TUN device, no root), its config written as a TOML file of N peers
(keys, /32 prefixes in the interface's subnet, endpoints on loopback addresses where nothing listens: every
connection attempt is refused at once). Reports (it asserts nothing):

- start: from reading the config file (parse and checks included) to the node's "running" line;
- idle CPU: the process's CPU time over `--idle` seconds of running with nothing to send, as a share of
  one core;
- log lines: records at INFO and above, during the start and per second while idle (the goal: at most
  one a second on average);
- status: `vpn-packet status --json` over the control socket (the command in a subprocess, the way an
  operator runs it: its own start-up included) listing all N peers, and `metrics()` in process;
- memory per peer: the RSS growth from before the config is read to running, over N;
- lookup, join, leave: `StaticPeerDiscovery.lookup` of a peer's address, and `Node.update_peers` adding and
  removing one peer (the path a reload and discovery take), at this N. A join and a leave include the
  receiver's native TLS setup being made ready for the next connection (`Receiver._native()`, which main
  made again from every key after a change): until the new peer's first handshake could be accepted,
  or the removed one's refused. `accept_setup`: a receiver's native session for one accepted connection
  made as `Receiver._open_native` makes it (with the peers' index map), at this N.

    python benches/static_scale.py --peers 10 --idle 1 --status-runs 1   # lookup/join/leave at small N

Run it on two branches to compare (it uses only what main has too).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vpn_packet._native import ReceiveSession
from vpn_packet.node.config import load_config
from vpn_packet.node.tun_node import TunNode
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.transport import Peer
from vpn_packet.transport.identity import encode_public_key, generate_identity


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _public_key() -> str:
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return encode_public_key(raw)


def _peer_ip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.0") + 2 + i)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, n: int) -> Path:
    """A node config with `n` static peers, none reachable: TOML, as an operator would write it."""
    identity = generate_identity("scale-node", directory, force=True)
    lines = [
        "[node]",
        f'key = "{identity.path}"',
        f'control_socket = "{directory / "control.sock"}"',
        "[interface]",
        'name = "vpnscale0"',
        'address = "10.64.0.1/16"',
        "[listen]",
        f'address = "127.0.0.1:{_free_port()}"',
    ]
    for i in range(n):
        # 127.1.x.y: loopback addresses where nothing listens (refused at once); port 9 (discard).
        lines += [
            "[[peers]]",
            f'id = "peer-{i}"',
            f'endpoint = "127.1.{i // 250}.{i % 250 + 1}:9"',
            f'allowed_ips = ["{_peer_ip(i)}/32"]',
            f'public_key = "{_public_key()}"',
        ]
    path = directory / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _per_op(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def run(n: int, idle: float, status_runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"peers": n, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = write_config(directory, n)
        counter = _Count()
        logging.getLogger("vpn_packet").addHandler(counter)
        logging.getLogger("vpn_packet").setLevel(logging.INFO)
        rss_before = _rss_kib()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        config = load_config(path)
        out["parse_s"] = round(time.perf_counter() - t0, 3)
        node = TunNode(config, tun_factory=lambda name, **kw: FakeTun(name, **kw))
        await node.start()
        out["start_to_running_s"] = round(time.perf_counter() - t0, 3)
        out["start_cpu_s"] = round(time.process_time() - cpu0, 3)
        out["start_log_lines"] = len(counter.records)
        running = [r.getMessage() for r in counter.records if " running: " in r.getMessage()]
        out["running_line"] = running[0] if running else None
        try:
            out["rss_mib"] = round(_rss_kib() / 1024, 1)
            out["memory_per_peer_kib"] = round((_rss_kib() - rss_before) / max(n, 1), 2)
            # Idle: nothing to send.
            lines_before = len(counter.records)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(idle)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            out["idle_s"] = round(wall, 1)
            out["idle_cpu_pct_of_core"] = round(100 * cpu / wall, 2)
            idle_records = counter.records[lines_before:]
            out["idle_log_lines_per_s"] = round(len(idle_records) / wall, 3)
            out["idle_log_sample"] = [r.getMessage()[:160] for r in idle_records[:5]]
            # Status: the command, as an operator runs it.
            socket_path = str(directory / "control.sock")
            times = []
            listed = 0
            for _ in range(status_runs):
                s0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "vpn_packet",
                    "status",
                    socket_path,
                    "--json",
                    stdout=asyncio.subprocess.PIPE,
                )
                stdout, _ = await proc.communicate()
                times.append(time.perf_counter() - s0)
                listed = len(json.loads(stdout)["peers"])
            out["status_json_s"] = round(statistics.median(times), 3)
            out["status_json_peers"] = listed
            s0 = time.perf_counter()
            node.metrics()
            out["metrics_in_process_s"] = round(time.perf_counter() - s0, 3)
            # Lookup, join, leave.
            discovery = node.node.discovery
            ips = [_peer_ip(i) for i in range(0, n, max(n // 1000, 1))]
            samples = []
            for _ in range(5):
                s0 = time.perf_counter()
                for ip in ips:
                    discovery.lookup(ip)
                samples.append((time.perf_counter() - s0) / len(ips))
            out["lookup_us"] = round(_per_op(samples), 3)
            receiver = node.node.receiver
            receiver._native()  # made once, as the first connection would
            joins, leaves = [], []
            for j in range(50):
                raw = ed25519.Ed25519PrivateKey.generate().public_key()
                key = raw.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                peer = Peer(f"extra-{j}", "127.2.0.1:9", [f"10.65.{j // 250}.{j % 250 + 1}/32"])
                s0 = time.perf_counter()
                await node.node.update_peers([peer], keys={peer.id: key})
                receiver._native()  # ready for the new peer's first handshake
                joins.append(time.perf_counter() - s0)
                s0 = time.perf_counter()
                await node.node.update_peers(removed=[peer.id])
                receiver._native()
                leaves.append(time.perf_counter() - s0)
            out["join_us"] = round(_per_op(joins), 1)
            out["leave_us"] = round(_per_op(leaves), 1)
            samples = []
            tls = receiver._native()
            discovery_now = node.node.discovery
            for _ in range(20):
                left, right = socket.socketpair()
                with left, right:
                    s0 = time.perf_counter()
                    ReceiveSession(tls, right.fileno(), None, discovery_now.table, receiver._peer_indexes())
                    samples.append(time.perf_counter() - s0)
            out["accept_setup_us"] = round(_per_op(samples), 1)
        finally:
            await node.shutdown()
            logging.getLogger("vpn_packet").removeHandler(counter)
    out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle running measured")
    parser.add_argument("--status-runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.peers, args.idle, args.status_runs))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
