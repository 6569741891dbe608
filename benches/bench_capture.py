"""`vpn-packet inspect` throughput on the same 50,000-frame pcap, in one run, beside its peers:

- `vpn_packet.summarize_capture`: the native reader + native batch parse and tally, in process;
- `dpkt`: dpkt's pcap reader + dpkt parsing doing the same aggregation, in process;
- `vpn-packet inspect` as a process (`python -m vpn_packet.cli inspect FILE --json`): what a user runs,
  interpreter start and package import included;
- `tshark -q -z endpoints,ip` (Wireshark's command line, Debian package `tshark`), the tool people reach
  for: skipped, with the reason, when it is not installed.

The goal is `inspect` at least 10x faster than tshark. Every row also records the least CPU time of its
rounds (`extra_info["cpu_s"]`: this process's for in-process rows, the child's for process rows), which a
loaded machine distorts less than wall time.
"""

from __future__ import annotations

import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dpkt
import pytest

from vpn_packet.capture import summarize_capture
from vpn_packet.testutil.pcap import write_sample_capture

FRAMES = 50_000
IMPLEMENTATIONS = [
    "vpn_packet.summarize_capture",
    "dpkt",
    "vpn-packet-inspect-process",
    "tshark-endpoints-process",
]


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("capture") / "sample.pcap"
    with path.open("wb") as out:
        write_sample_capture(out, packets=FRAMES, fmt="pcap", seed=3)
    return path


def dpkt_summary(path: Path) -> dict[str, list[Any]]:
    """Per destination key: packets, bytes, protocols, with dpkt doing the reading and the parsing."""
    destinations: dict[str, list[Any]] = {}
    with path.open("rb") as f:
        for _ts, frame in dpkt.pcap.Reader(f):
            try:
                ip = dpkt.ethernet.Ethernet(frame).data
            except dpkt.UnpackError:
                continue
            if isinstance(ip, dpkt.ip.IP):
                dst, template, protocol = socket.inet_ntop(socket.AF_INET, ip.dst), "{}:{}", ip.p
            elif isinstance(ip, dpkt.ip6.IP6):
                dst, template, protocol = socket.inet_ntop(socket.AF_INET6, ip.dst), "[{}]:{}", ip.nxt
            else:
                continue
            port = getattr(ip.data, "dport", None)
            key = template.format(dst, port) if port is not None else dst
            entry = destinations.setdefault(key, [0, 0, set()])
            entry[0] += 1
            entry[1] += len(ip)
            entry[2].add(protocol)
    return destinations


def run_process(argv: list[str]) -> bytes:
    """Runs `argv` to completion; its stdout."""
    return subprocess.run(argv, capture_output=True, check=True).stdout


def runner(impl: str, path: Path) -> Callable[[], int]:
    """The function to time for `impl`; it returns what it found, for a sanity check (over 100 lines or
    destinations)."""
    if impl == "vpn_packet.summarize_capture":
        return lambda: len(summarize_capture(path).destinations)
    if impl == "dpkt":
        return lambda: len(dpkt_summary(path))
    if impl == "vpn-packet-inspect-process":
        argv = [sys.executable, "-m", "vpn_packet.cli", "inspect", str(path), "--json"]
        return lambda: run_process(argv).count(b'"destination":')
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (Debian: apt-get install tshark); no peer to compare with")
    argv = [tshark, "-q", "-z", "endpoints,ip", "-r", str(path)]
    return lambda: run_process(argv).count(b"\n")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.mark.benchmark(group="inspect")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_inspect(benchmark: Any, capture_file: Path, impl: str) -> None:
    fn = runner(impl, capture_file)
    rounds: list[float] = []

    def timed() -> int:
        start = cpu_seconds()
        found = fn()
        rounds.append(cpu_seconds() - start)
        return found

    benchmark.extra_info["packets_per_round"] = FRAMES
    if impl == "vpn-packet-inspect-process":
        benchmark.extra_info["ours"] = True
    result = benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["cpu_s"] = min(rounds)
    assert result > 100
