"""Differential test: every real packet of the corpus gives exactly the expected answer (DESIGN.md §3)."""

from __future__ import annotations

import ipaddress
from typing import Any

from vpn_packet import PacketError, PacketInfo, destination_key, extract_ip_and_ports
from vpn_packet._native import extract_batch
from vpn_packet.testutil.reference import ReferenceError, reference_extract


def _observed(packet: bytes) -> dict[str, Any]:
    try:
        info = extract_ip_and_ports(packet)
    except PacketError as err:
        return {"error": err.reason}
    return {
        "version": info.version,
        "src_ip": info.src_ip,
        "dst_ip": info.dst_ip,
        "src_port": info.src_port,
        "dst_port": info.dst_port,
        "protocol": info.protocol,
        "destination_key": info.destination_key,
    }


def _expected(record: dict[str, Any]) -> dict[str, Any]:
    expected = dict(record["expected"])
    if "error" in expected:
        return {"error": ...}
    # Compare addresses as objects: Python 3.11 prints IPv4-mapped IPv6 as ::ffff:102:304.
    expected["src_ip"] = ipaddress.ip_address(expected["src_ip"])
    expected["dst_ip"] = ipaddress.ip_address(expected["dst_ip"])
    return expected


def test_corpus_is_the_full_set(corpus: list[dict[str, Any]]) -> None:
    assert len(corpus) == 3420
    assert sum("error" in r["expected"] for r in corpus) > 0
    assert sum(r["expected"].get("version") == 6 for r in corpus) > 0


def test_every_corpus_packet_matches_expected(corpus: list[dict[str, Any]]) -> None:
    mismatches = []
    for record in corpus:
        observed = _observed(bytes.fromhex(record["hex"]))
        expected = _expected(record)
        ok = "error" in observed if "error" in expected else observed == expected
        if not ok:
            mismatches.append(f"{record['source']}: expected {record['expected']}, got {observed}")
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:20])


def test_corpus_destination_keys_are_formatted_natively(corpus: list[dict[str, Any]]) -> None:
    for record in corpus:
        if "error" in record["expected"]:
            continue
        assert destination_key(bytes.fromhex(record["hex"])) == record["expected"]["destination_key"]


def test_corpus_batch_agrees_with_single(corpus: list[dict[str, Any]]) -> None:
    packets = [bytes.fromhex(r["hex"]) for r in corpus]
    results = extract_batch(packets)
    assert len(results) == len(packets)
    for packet, result in zip(packets, results, strict=True):
        if isinstance(result, PacketInfo):
            assert result == extract_ip_and_ports(packet)
        else:
            assert isinstance(result, PacketError)
            assert _observed(packet) == {"error": result.reason}


def test_reference_oracle_agrees_with_corpus(corpus: list[dict[str, Any]]) -> None:
    """The plain-Python oracle of the property tests is itself right on real traffic."""
    for record in corpus:
        packet = bytes.fromhex(record["hex"])
        expected = record["expected"]
        try:
            ref = reference_extract(packet)
        except ReferenceError:
            assert "error" in expected, record["source"]
            continue
        assert ref.destination_key == expected["destination_key"], record["source"]
        assert (ref.src_port, ref.dst_port, ref.protocol) == (
            expected["src_port"],
            expected["dst_port"],
            expected["protocol"],
        ), record["source"]
