"""The measurements of the tunnel comparison (`tunnel.py`): iperf3, ping and CPU time, run in namespaces.

Each function runs one client in namespace A against a server or address in namespace B and returns plain
numbers (JSON-ready). They only measure; they never judge a figure.

- `iperf3_tcp`: throughput as the iperf3 *receiver* measured it (`end.sum_received`), 1 or more streams.
- `iperf3_udp`: 64-byte IP packets (36-byte UDP payload) sent as fast as the client can (`-b 0`, or a rate);
  delivered packets per second and loss as the iperf3 *server* counted them (sequence gaps; the client's
  JSON carries the server's figures in `end.sum_received`, filled from iperf3's results exchange).
- `ping_series` / `first_ping`: `ping` from iputils (kernel timestamps, microsecond resolution).
- `redis_requests`: a real request/response application: `redis-benchmark` GET requests per second against a
  `redis-server` started for it in namespace B (one client waiting a round trip per request, or many clients
  pipelining), as redis-benchmark counted them.
- `cpu_hog`: a process that keeps one core busy while a measurement runs (latency on a loaded machine).
- `cpu_seconds`: user + system time of a process and all its threads, from /proc.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IPERF_PORT = 5201
REDIS_PORT = 6379
UDP_PAYLOAD = 36  # + 8 UDP + 20 IPv4 = a 64-byte IP packet
_RTT = re.compile(r"icmp_seq=(\d+) .*time=([0-9.]+) ms")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _netns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _iperf3(
    ns_client: str, ns_server: str, server_ip: str, client_args: list[str], duration: int
) -> dict[str, Any]:
    """One iperf3 test against a one-off server (`-1`) started for it; returns the client's JSON."""
    server = subprocess.Popen(
        _netns(ns_server, "iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:  # the server prints this once its socket listens
            if "Server listening" in line:
                break
        else:
            raise RuntimeError(f"iperf3 server did not start (exit {server.wait()})")
        result = subprocess.run(
            _netns(
                ns_client,
                "iperf3",
                "-c",
                server_ip,
                "-p",
                str(IPERF_PORT),
                "-t",
                str(duration),
                "-J",
                "--connect-timeout",
                "5000",
                *client_args,
            ),
            capture_output=True,
            text=True,
            timeout=duration + 30,
        )
        report: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip() else {}
        if result.returncode != 0 or "error" in report:
            raise RuntimeError(
                f"iperf3 {' '.join(client_args)}: {report.get('error') or result.stderr.strip()}"
            )
        return report
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def iperf3_tcp(
    ns_client: str, ns_server: str, server_ip: str, *, streams: int, duration: int
) -> dict[str, Any]:
    """Bulk TCP from A to B, `streams` parallel streams; the receiver's bit rate and bytes."""
    report = _iperf3(ns_client, ns_server, server_ip, ["-P", str(streams)], duration)
    received = report["end"]["sum_received"]
    return {
        "gbps": float(received["bits_per_second"]) / 1e9,
        "bytes": int(received["bytes"]),
        "seconds": float(received["seconds"]),
        "retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
    }


def iperf3_udp(
    ns_client: str, ns_server: str, server_ip: str, *, duration: int, bitrate: str = "0"
) -> dict[str, Any]:
    """64-byte IP packets from A to B at iperf3's `-b bitrate` of payload ("0": as fast as the client can);
    what the server received, per second, and what it lost."""
    report = _iperf3(ns_client, ns_server, server_ip, ["-u", "-b", bitrate, "-l", str(UDP_PAYLOAD)], duration)
    server = report["end"]["sum_received"]  # the server's counts (iperf3's results exchange)
    sent = report["end"]["sum_sent"]
    packets, lost, seconds = int(server["packets"]), int(server["lost_packets"]), float(server["seconds"])
    delivered = packets - lost
    return {
        "delivered_pps": delivered / seconds if seconds > 0 else 0.0,
        "delivered": delivered,
        "lost": lost,
        "loss": lost / packets if packets else 0.0,
        "sent": int(sent["packets"]),
        "seconds": seconds,
    }


def udp_receive_buffer_errors(ns: str) -> int:
    """The namespace's count of UDP datagrams dropped because a socket's receive buffer was full."""
    lines = [line.split() for line in _run_text(_netns(ns, "cat", "/proc/net/snmp")).splitlines()]
    header, values = (line for line in lines if line[0] == "Udp:")
    return int(values[header.index("RcvbufErrors")])


def _run_text(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def ping_series(ns: str, address: str, *, count: int, interval: float) -> dict[str, Any]:
    """`count` echo requests every `interval` seconds; the round-trip times (ms) of those answered."""
    result = subprocess.run(
        _netns(ns, "ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", address),
        capture_output=True,
        text=True,
        timeout=count * interval + 30,
    )
    rtts = [float(m.group(2)) for m in _RTT.finditer(result.stdout)]
    return {"sent": count, "received": len(rtts), "rtt_ms": rtts}


def first_ping(ns: str, address: str, *, timeout: float = 5.0) -> float | None:
    """The round-trip time (ms) of one echo request, or None when no answer came within `timeout` seconds."""
    result = subprocess.run(
        _netns(ns, "ping", "-n", "-c", "1", "-W", f"{timeout:g}", address),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    match = _RTT.search(result.stdout)
    return float(match.group(2)) if match else None


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (`fraction` in 0..1) of `values`, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil(n * fraction), at least 1
    return ordered[int(rank) - 1]


def redis_requests(
    ns_client: str, ns_server: str, server_ip: str, *, clients: int, pipeline: int, requests: int
) -> dict[str, Any]:
    """GET requests per second through the tunnel: a `redis-server` started for this test in namespace B
    (no persistence, listening on `server_ip`), `redis-benchmark -t get` from namespace A with `clients`
    connections each pipelining `pipeline` requests; redis-benchmark's own count."""
    server = subprocess.Popen(
        _netns(
            ns_server,
            "redis-server",
            "--bind",
            server_ip,
            "--port",
            str(REDIS_PORT),
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:  # redis prints this once its socket listens
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"redis-server did not start (exit {server.wait()})")
        argv = ["redis-benchmark", "-h", server_ip, "-p", str(REDIS_PORT), "-t", "get", "-q", "--csv"]
        argv += ["-n", str(requests), "-c", str(clients), "-P", str(pipeline)]
        result = subprocess.run(_netns(ns_client, *argv), capture_output=True, text=True, timeout=300)
        rows = [row for row in csv.reader(io.StringIO(result.stdout)) if row and row[0] == "GET"]
        if result.returncode != 0 or not rows:
            raise RuntimeError(f"redis-benchmark: {result.stderr.strip() or result.stdout.strip()}")
        return {"requests_per_s": float(rows[0][1]), "requests": requests}
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def cpu_hog() -> Iterator[None]:
    """One process spinning on a core for as long as the block runs: the "one core busy" condition."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()
