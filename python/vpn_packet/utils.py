"""Packet extraction: single and batch forms, destination keys. All work is done natively.

Batch forms: `extract_batch` returns a list (a `PacketInfo`, or a `PacketError` in a bad packet's place);
`parse_batch` returns a `PacketBatch` that keeps the parsed batch natively and makes Python objects only for
what is asked (an item, or a column such as `destination_keys()`), several times cheaper per packet.
"""

from __future__ import annotations

from vpn_packet._native import (
    PacketBatch,
    destination_key,
    destination_key_and_ip,
    extract_batch,
    extract_batch_from_buffer,
    extract_ip_and_ports,
    group_by_destination,
    parse_batch,
    parse_batch_from_buffer,
)

__all__ = [
    "PacketBatch",
    "destination_key",
    "destination_key_and_ip",
    "extract_batch",
    "extract_batch_from_buffer",
    "extract_ip_and_ports",
    "group_by_destination",
    "parse_batch",
    "parse_batch_from_buffer",
]
