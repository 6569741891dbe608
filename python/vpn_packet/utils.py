"""Packet extraction: one packet, a destination key, and one batch form. All work is done natively.

- `extract_ip_and_ports(packet) -> PacketInfo` and `destination_key(packet) -> str` (docs/extraction.md);
- `parse_batch(packets) -> PacketBatch`: the batch form. It parses every packet in one native call and never
  fails the batch for a bad packet: `batch[i]` is a `PacketInfo`, or the `PacketError` of a bad packet in its
  place (`to_list()` gives them all, `errors()` only the bad ones with their index). The batch stays native
  and makes Python objects only for what is asked: an item, or a column such as `destination_keys()`,
  `protocols()`, `sizes()`, or the per-destination tally `by_destination()`;
- `group_by_destination(packets) -> (groups, rejected)`: routes a batch, as the dispatcher does. `groups` is
  `[(key, dest_ip, [packets...]), ...]` in first-seen order, keeping the order of packets within a
  destination and the very objects passed in; `rejected` is `[(index, PacketError), ...]`.

Lower-level native variants (packets laid end to end in one buffer, a list of results instead of a batch)
stay in the private `vpn_packet._native` for the capture reader, the TUN path and the benchmarks.
"""

from __future__ import annotations

from vpn_packet._native import (
    PacketBatch,
    destination_key,
    extract_ip_and_ports,
    group_by_destination,
    parse_batch,
)

__all__ = [
    "extract_ip_and_ports",
    "destination_key",
    "parse_batch",
    "PacketBatch",
    "group_by_destination",
]
