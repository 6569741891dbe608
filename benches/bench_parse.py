"""Packet extraction side by side: vpn_packet (native) vs plain-Python struct, dpkt and scapy, one run.

Each benchmark processes the same 1,024-packet mix; `per_packet_ns` in extra_info is the figure to compare.
Run: python -m pytest benches/bench_parse.py --benchmark-json=bench-parse.json
     python benches/report.py bench-parse.json
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import routed_mix
from peers_parse import dpkt_extract, key_of, scapy_extract, struct_full, struct_minimal
from vpn_packet import destination_key, extract_ip_and_ports, group_by_destination, parse_batch
from vpn_packet._native import extract_batch, extract_batch_from_buffer, parse_batch_from_buffer
from vpn_packet.testutil.reference import reference_destination_key

SINGLE: dict[str, Callable[[bytes], Any]] = {
    "vpn_packet": extract_ip_and_ports,
    "struct-full": struct_full,
    "struct-minimal": struct_minimal,
    "dpkt": dpkt_extract,
    "scapy": scapy_extract,
}

KEYS: dict[str, Callable[[bytes], Any]] = {
    "vpn_packet": destination_key,
    "struct-full": reference_destination_key,
    "struct-minimal": key_of(struct_minimal),
    "dpkt": key_of(dpkt_extract),
}


def _run(benchmark: Any, fn: Callable[[], Any], n: int, slow: bool) -> None:
    benchmark.extra_info["packets_per_round"] = n
    if slow:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.mark.benchmark(group="extract")
@pytest.mark.parametrize("impl", list(SINGLE))
def test_extract_single(benchmark: Any, mix: list[bytes], impl: str) -> None:
    fn = SINGLE[impl]  # the mix holds only valid packets: no error handling needed by anyone
    _run(benchmark, lambda: [fn(p) for p in mix], len(mix), impl == "scapy")


@pytest.mark.benchmark(group="destination_key")
@pytest.mark.parametrize("impl", list(KEYS))
def test_destination_key(benchmark: Any, mix: list[bytes], impl: str) -> None:
    fn = KEYS[impl]
    _run(benchmark, lambda: [fn(p) for p in mix], len(mix), False)


@pytest.mark.benchmark(group="batch")
@pytest.mark.parametrize(
    "impl",
    [
        "vpn_packet.extract_batch",
        "vpn_packet.extract_batch_from_buffer",
        "vpn_packet.group_by_destination",
        "vpn_packet.parse_batch",
        "vpn_packet.parse_batch_from_buffer",
        "vpn_packet.parse_batch+destination_keys",
        "struct-full",
        "dpkt",
    ],
)
def test_batch(benchmark: Any, mix: list[bytes], impl: str) -> None:
    buffer, lengths = b"".join(mix), [len(p) for p in mix]
    fns: dict[str, Callable[[], Any]] = {
        "vpn_packet.extract_batch": lambda: extract_batch(mix),
        "vpn_packet.extract_batch_from_buffer": lambda: extract_batch_from_buffer(buffer, lengths),
        "vpn_packet.group_by_destination": lambda: group_by_destination(mix),
        "vpn_packet.parse_batch": lambda: parse_batch(mix),
        "vpn_packet.parse_batch_from_buffer": lambda: parse_batch_from_buffer(buffer, lengths),
        "vpn_packet.parse_batch+destination_keys": lambda: parse_batch(mix).destination_keys(),
        "struct-full": lambda: [struct_full(p) for p in mix],
        "dpkt": lambda: [dpkt_extract(p) for p in mix],
    }
    _run(benchmark, fns[impl], len(mix), False)


def test_peers_agree_with_us_on_the_mix(mix: list[bytes]) -> None:
    """Sanity: the peers are doing the same job (addresses and ports) on the plain packets of the mix."""
    for packet in mix:
        ours = extract_ip_and_ports(packet)
        full = struct_full(packet)
        assert full is not None
        assert (full[2], full[3], full[4]) == (ours.src_port, ours.dst_port, ours.protocol)


@pytest.mark.benchmark(group="grouping")
@pytest.mark.parametrize("destinations", [16, 1024])
@pytest.mark.parametrize("impl", ["vpn_packet.group_by_destination", "struct-full+dict"])
def test_group_by_destination(benchmark: Any, impl: str, destinations: int) -> None:
    """Routing a 1,024-packet batch: the dispatcher's usual case (few destinations) and a worst case."""
    mix = routed_mix(destinations=destinations)

    def plain() -> dict[str, list[bytes]]:
        groups: dict[str, list[bytes]] = {}
        for packet in mix:
            groups.setdefault(reference_destination_key(packet), []).append(packet)
        return groups

    fn = (lambda: group_by_destination(mix)) if impl.startswith("vpn_packet") else plain
    benchmark.extra_info["packets_per_round"] = len(mix)
    benchmark.name = f"{impl}[{destinations} destinations]"
    benchmark(fn)
