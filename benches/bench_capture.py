"""`vpn-packet inspect` throughput: summarize_capture (native reader + native batch parse and tally) beside
dpkt's pcap reader + dpkt parsing doing the same aggregation, on the same 50,000-frame pcap, in one run."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import dpkt
import pytest

from vpn_packet.capture import summarize_capture
from vpn_packet.testutil.pcap import write_sample_capture

FRAMES = 50_000


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


@pytest.mark.benchmark(group="inspect")
@pytest.mark.parametrize("impl", ["vpn_packet.summarize_capture", "dpkt"])
def test_inspect(benchmark: Any, capture_file: Path, impl: str) -> None:
    fn = (
        (lambda: summarize_capture(capture_file))
        if impl.startswith("vpn_packet")
        else (lambda: dpkt_summary(capture_file))
    )
    benchmark.extra_info["packets_per_round"] = FRAMES
    result = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert len(result.destinations if impl.startswith("vpn_packet") else result) > 100
