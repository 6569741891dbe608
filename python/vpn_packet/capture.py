"""Capture summaries for `vpn-packet inspect`: stream a pcap/pcapng file through the native batch parser.

The native `CaptureReader` reads the file in Rust (streaming, bounded memory; gzip-compressed or not; `-` is
standard input) and strips the link layer and the encapsulations inside it (VLAN, MPLS, PPPoE, LLC/SNAP, PBB);
each batch of IP packets is parsed and tallied per destination natively (`parse_batch_from_buffer` and
`PacketBatch.by_destination`), and this module only merges the tallies: per destination key (packets, bytes,
protocols), malformed packets by reason, and the reader's frame counters.

Errors: `CaptureError` (a `ValueError`) for a file that is not a capture, or one that cannot be read on;
`OSError` (`FileNotFoundError`, ...) when the file cannot be opened. A capture that ends early (truncated by
a capture still being written, or corrupt further on) is not an error for `summarize_capture`: the summary
covers the packets before the problem and records it in `error`/`error_kind`. Nor does a capture from
which no frame could be read raise: its summary says why in `error`, with `error_kind` `no_frames` when
reading itself went fine (no packet records, or only pcapng blocks this reader does not decode), and the
command line turns it into a failure, never a silent zero.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vpn_packet._native import CaptureReader, link_type_name, parse_batch_from_buffer, pcapng_block_name
from vpn_packet.errors import CaptureError

__all__ = [
    "NO_FRAMES",
    "PROTOCOL_NAMES",
    "CaptureReader",
    "CaptureSummary",
    "DestinationStats",
    "block_type_label",
    "protocol_name",
    "summarize_capture",
]

NO_FRAMES = "no_frames"
"""`CaptureSummary.error_kind` of a capture read to its end without a single frame in it."""


PROTOCOL_NAMES: dict[int, str] = {
    0: "HOPOPT",
    1: "ICMP",
    2: "IGMP",
    4: "IPIP",
    6: "TCP",
    17: "UDP",
    33: "DCCP",
    41: "IPv6",
    43: "IPv6-Route",
    44: "IPv6-Frag",
    47: "GRE",
    50: "ESP",
    51: "AH",
    58: "ICMPv6",
    59: "IPv6-NoNxt",
    60: "IPv6-Opts",
    89: "OSPF",
    103: "PIM",
    112: "VRRP",
    115: "L2TP",
    132: "SCTP",
    135: "Mobility",
    136: "UDPLite",
}


def protocol_name(number: int) -> str:
    """The usual name of an IP protocol number (`TCP`, `ICMPv6`, ...), or the number itself as text."""
    return PROTOCOL_NAMES.get(number, str(number))


def block_type_label(kind: int) -> str:
    """A pcapng block type for people: `Name Resolution (4)`, or `unknown (0x42424242)`."""
    name = pcapng_block_name(kind)
    return f"{name} ({kind})" if name else f"unknown ({kind:#x})"


@dataclass(slots=True)
class DestinationStats:
    """Traffic to one destination key: packets, IP bytes (as captured) and the protocols seen."""

    packets: int = 0
    bytes: int = 0
    protocols: set[int] = field(default_factory=set)

    def protocol_names(self) -> list[str]:
        """Protocol names, in protocol-number order."""
        return [protocol_name(p) for p in sorted(self.protocols)]


@dataclass(slots=True)
class CaptureSummary:
    """What `summarize_capture` found. Frame counters come from the reader; packet counters from parsing.

    `frames` = `ip_packets` + `non_ip_frames` + `short_frames` + `unsupported_link_frames`, and
    `ip_packets` = `parsed_packets` + `malformed_packets`.
    """

    path: str
    format: str
    format_detail: str
    compression: str | None = None
    frames: int = 0
    ip_packets: int = 0
    ip_bytes: int = 0
    parsed_packets: int = 0
    malformed_packets: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)
    non_ip_frames: int = 0
    short_frames: int = 0
    unsupported_link_frames: int = 0
    link_types: dict[int, int] = field(default_factory=dict)
    encapsulations: dict[str, int] = field(default_factory=dict)
    """Frames per encapsulation crossed (`vlan`, `qinq`, `mpls`, `pppoe`, `llc_snap`, `pbb`, ...)."""
    link_encapsulations: dict[int, dict[str, int]] = field(default_factory=dict)
    """The same per link type."""
    undecoded_blocks: dict[int, int] = field(default_factory=dict)
    """pcapng blocks this reader does not decode, per block type."""
    destinations: dict[str, DestinationStats] = field(default_factory=dict)
    batches: int = 0
    error: str | None = None
    """Set when the capture ended early (truncated or corrupt): the counts cover the packets before it; or,
    with `error_kind` `no_frames`, when the whole capture was read and held no frame."""
    error_kind: str | None = None

    def top(self, n: int | None = None) -> list[tuple[str, DestinationStats]]:
        """Destinations by packets, then bytes (descending), then key; the first `n`, or all for `None`."""
        ranked = sorted(self.destinations.items(), key=lambda kv: (-kv[1].packets, -kv[1].bytes, kv[0]))
        return ranked if n is None else ranked[:n]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """A JSON-ready view (destinations ranked as by `top`)."""
        return {
            "path": self.path,
            "format": self.format,
            "format_detail": self.format_detail,
            "compression": self.compression,
            "frames": self.frames,
            "ip_packets": self.ip_packets,
            "ip_bytes": self.ip_bytes,
            "parsed_packets": self.parsed_packets,
            "malformed_packets": self.malformed_packets,
            "malformed_by_reason": dict(sorted(self.malformed_by_reason.items())),
            "non_ip_frames": self.non_ip_frames,
            "short_frames": self.short_frames,
            "unsupported_link_frames": self.unsupported_link_frames,
            "link_types": [
                {
                    "linktype": link,
                    "name": link_type_name(link),
                    "frames": frames,
                    "encapsulations": dict(sorted(self.link_encapsulations.get(link, {}).items())),
                }
                for link, frames in sorted(self.link_types.items())
            ],
            "encapsulations": dict(sorted(self.encapsulations.items())),
            "undecoded_blocks": [
                {"block_type": kind, "name": pcapng_block_name(kind), "blocks": blocks}
                for kind, blocks in sorted(self.undecoded_blocks.items())
            ],
            "destination_count": len(self.destinations),
            "destinations": [
                {
                    "destination": key,
                    "packets": stats.packets,
                    "bytes": stats.bytes,
                    "protocols": stats.protocol_names(),
                    "protocol_numbers": sorted(stats.protocols),
                }
                for key, stats in self.top(top)
            ],
            "error": None if self.error is None else {"kind": self.error_kind, "message": self.error},
        }


def _no_frames_reason(undecoded_blocks: dict[int, int]) -> str:
    """Why a capture read to its end gave no frame."""
    if not undecoded_blocks:
        return "no frame could be read: the capture holds no packet records"
    blocks = ", ".join(f"{block_type_label(kind)} {n:,}" for kind, n in sorted(undecoded_blocks.items()))
    return (
        f"no frame could be read: the capture holds only pcapng blocks this reader does not decode ({blocks})"
    )


def summarize_capture(path: str | os.PathLike[str], *, batch_size: int = 4096) -> CaptureSummary:
    """Reads a pcap/pcapng capture (gzip-compressed or not; `-`: standard input) and counts its IP packets
    per destination key.

    Raises `CaptureError` when the file is not a capture (or its header is cut short) and `OSError` when it
    cannot be opened. An error further on ends the summary early and is recorded in `error`/`error_kind`;
    so is a capture without a single frame (`error_kind` `no_frames`, unless a read error explains it).
    """
    reader = CaptureReader(path, batch_size)
    destinations: dict[str, DestinationStats] = {}
    reasons: Counter[str] = Counter()
    error: CaptureError | None = None
    try:
        for buffer, lengths in reader:
            batch = parse_batch_from_buffer(buffer, lengths)
            if batch.error_count:
                reasons.update(batch.error_counts())
            for key, (packets, size, protocols) in batch.by_destination().items():
                stats = destinations.get(key)
                if stats is None:
                    stats = destinations[key] = DestinationStats()
                stats.packets += packets
                stats.bytes += size
                stats.protocols.update(protocols)
    except CaptureError as exc:
        error = exc
    malformed = sum(reasons.values())
    undecoded_blocks = reader.undecoded_blocks
    message, kind = (None, None) if error is None else (error.message, error.kind)
    if reader.frames == 0 and error is None:
        message, kind = f"{reader.name}: {_no_frames_reason(undecoded_blocks)}", NO_FRAMES
    return CaptureSummary(
        path=os.fspath(path),
        format=reader.format,
        format_detail=reader.format_detail,
        compression=reader.compression,
        frames=reader.frames,
        ip_packets=reader.ip_packets,
        ip_bytes=reader.ip_bytes,
        parsed_packets=reader.ip_packets - malformed,
        malformed_packets=malformed,
        malformed_by_reason=dict(reasons),
        non_ip_frames=reader.non_ip_frames,
        short_frames=reader.short_frames,
        unsupported_link_frames=reader.unsupported_link_frames,
        link_types=reader.link_types,
        encapsulations=reader.encapsulations,
        link_encapsulations=reader.link_encapsulations,
        undecoded_blocks=undecoded_blocks,
        destinations=destinations,
        batches=reader.batches,
        error=message,
        error_kind=kind,
    )
