"""Packet extraction: single and batch forms, destination keys. All work is done natively."""

from __future__ import annotations

from vpn_packet._native import (
    destination_key,
    destination_key_and_ip,
    extract_batch,
    extract_batch_from_buffer,
    extract_ip_and_ports,
    group_by_destination,
)

__all__ = [
    "destination_key",
    "destination_key_and_ip",
    "extract_batch",
    "extract_batch_from_buffer",
    "extract_ip_and_ports",
    "group_by_destination",
]
