"""Capture summaries for `vpn-packet inspect`: stream a pcap/pcapng file through the native batch parser.

The native `CaptureReader` reads the file in Rust (streaming, bounded memory; gzip-compressed or not; `-` is
standard input) and strips the link layer and the encapsulations inside it (VLAN, MPLS, PPPoE, LLC/SNAP, PBB,
Cisco HDLC); each batch of IP packets is parsed and tallied per destination natively
(`CaptureReader.next_tally`: the packets never become Python objects), and this module only merges the
tallies: per destination key (packets, bytes, protocols), malformed packets by reason, and the reader's frame
counters.

Errors: `CaptureError` (a `ValueError`) for a file that is not a capture, or one that cannot be read on;
`OSError` (`FileNotFoundError`, ...) when the file cannot be opened. A capture that ends early (truncated by
a capture still being written, or corrupt further on) is not an error for `summarize_capture`: the summary
covers the packets before the problem and records it in `error`/`error_kind`. Nor does a capture from
which nothing could be read raise: its summary says why in `error`, with `error_kind` `no_frames` when it
holds only pcapng blocks this reader does not decode, and `no_readable_frames` when it has frames and not
one of them could be read (each too short for its link header, of an unsupported link type, or a malformed
IP packet); the command line turns these into a failure, never a silent zero. A valid capture that holds no
packet records at all is not an error: `error` stays None and `frames` is 0 (the command says so).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from vpn_packet._native import CaptureReader, link_type_name, pcapng_block_name

TYPE_CHECKING = False  # not `typing`'s: `vpn-packet inspect` does not load `typing` (its start-up time)
if TYPE_CHECKING:
    from typing import Any

    from vpn_packet.errors import CaptureError
else:
    # `CaptureError` stays importable from here, loaded on first use: `vpn-packet inspect` of a good
    # capture never loads the error taxonomy (milliseconds of a command measured against tshark). The
    # native reader imports it itself when it raises one.

    def __getattr__(name: str) -> object:
        if name == "CaptureError":
            from vpn_packet.errors import CaptureError

            return CaptureError
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "NO_FRAMES",
    "NO_READABLE_FRAMES",
    "PROTOCOL_NAMES",
    "CaptureReader",
    "CaptureSummary",
    "DestinationStats",
    "block_type_label",
    "protocol_name",
    "summarize_capture",
]

NO_FRAMES = "no_frames"
"""`CaptureSummary.error_kind` of a capture read to its end that held only blocks this reader does not
decode: packets may be in them, but none could be read."""
NO_READABLE_FRAMES = "no_readable_frames"
"""`CaptureSummary.error_kind` of a capture read to its end whose frames were all unreadable: too short for
their link header, of an unsupported link type, or malformed IP packets."""


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


class DestinationStats:
    """Traffic to one destination key: packets, IP bytes (as captured) and the protocols seen.

    This module's classes are plain classes, not dataclasses: `dataclasses` loads `inspect`, about a tenth
    of `vpn-packet inspect`'s whole run (a start-up race against tshark, issue 22)."""

    __slots__ = ("bytes", "packets", "protocols")

    def __init__(self, packets: int = 0, bytes: int = 0, protocols: set[int] | None = None) -> None:
        self.packets = packets
        self.bytes = bytes
        self.protocols: set[int] = set() if protocols is None else protocols

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DestinationStats):
            return NotImplemented
        return (self.packets, self.bytes, self.protocols) == (other.packets, other.bytes, other.protocols)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"DestinationStats(packets={self.packets}, bytes={self.bytes}, protocols={self.protocols!r})"

    def protocol_names(self) -> list[str]:
        """Protocol names, in protocol-number order."""
        return [protocol_name(p) for p in sorted(self.protocols)]


class CaptureSummary:
    """What `summarize_capture` found. Frame counters come from the reader; packet counters from parsing.

    `frames` = `ip_packets` + `non_ip_frames` + `short_frames` + `unsupported_link_frames`, and
    `ip_packets` = `parsed_packets` + `malformed_packets`.

    - `encapsulations`: frames per encapsulation crossed (`vlan`, `qinq`, `mpls`, `pppoe`, `llc_snap`,
      `pbb`, ...); `link_encapsulations`: the same per link type.
    - `undecoded_blocks`: pcapng blocks this reader does not decode, per block type.
    - `error`: set when the capture ended early (truncated or corrupt): the counts cover the packets before
      it; or, with `error_kind` `no_frames`, when the whole capture was read and held no frame.
    """

    __slots__ = _FIELDS = (
        "path",
        "format",
        "format_detail",
        "compression",
        "frames",
        "ip_packets",
        "ip_bytes",
        "parsed_packets",
        "malformed_packets",
        "malformed_by_reason",
        "non_ip_frames",
        "short_frames",
        "unsupported_link_frames",
        "link_types",
        "encapsulations",
        "link_encapsulations",
        "undecoded_blocks",
        "destinations",
        "batches",
        "error",
        "error_kind",
    )

    def __init__(
        self,
        path: str,
        format: str,
        format_detail: str,
        compression: str | None = None,
        frames: int = 0,
        ip_packets: int = 0,
        ip_bytes: int = 0,
        parsed_packets: int = 0,
        malformed_packets: int = 0,
        malformed_by_reason: dict[str, int] | None = None,
        non_ip_frames: int = 0,
        short_frames: int = 0,
        unsupported_link_frames: int = 0,
        link_types: dict[int, int] | None = None,
        encapsulations: dict[str, int] | None = None,
        link_encapsulations: dict[int, dict[str, int]] | None = None,
        undecoded_blocks: dict[int, int] | None = None,
        destinations: dict[str, DestinationStats] | None = None,
        batches: int = 0,
        error: str | None = None,
        error_kind: str | None = None,
    ) -> None:
        self.path = path
        self.format = format
        self.format_detail = format_detail
        self.compression = compression
        self.frames = frames
        self.ip_packets = ip_packets
        self.ip_bytes = ip_bytes
        self.parsed_packets = parsed_packets
        self.malformed_packets = malformed_packets
        self.malformed_by_reason: dict[str, int] = malformed_by_reason or {}
        self.non_ip_frames = non_ip_frames
        self.short_frames = short_frames
        self.unsupported_link_frames = unsupported_link_frames
        self.link_types: dict[int, int] = link_types or {}
        self.encapsulations: dict[str, int] = encapsulations or {}
        self.link_encapsulations: dict[int, dict[str, int]] = link_encapsulations or {}
        self.undecoded_blocks: dict[int, int] = undecoded_blocks or {}
        self.destinations: dict[str, DestinationStats] = destinations or {}
        self.batches = batches
        self.error = error
        self.error_kind = error_kind

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaptureSummary):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self._FIELDS if name != "destinations"
        )
        return f"CaptureSummary({fields}, destinations=<{len(self.destinations)}>)"

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
    """Why a capture read to its end that holds blocks not decoded gave no frame."""
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
        # Parsed and tallied natively, batch by batch: the packets never become Python objects.
        while (tallied := reader.next_tally()) is not None:
            by_destination, error_counts = tallied
            if error_counts:
                reasons.update(error_counts)
            for key, (packets, size, protocols) in by_destination.items():
                stats = destinations.get(key)
                if stats is None:
                    stats = destinations[key] = DestinationStats()
                stats.packets += packets
                stats.bytes += size
                stats.protocols.update(protocols)
    except ValueError as exc:  # CaptureError is one; the native reader loaded its module to raise it
        errors = sys.modules.get("vpn_packet.errors")
        if errors is None or not isinstance(exc, errors.CaptureError):
            raise
        error = exc
    malformed = sum(reasons.values())
    undecoded_blocks = reader.undecoded_blocks
    message, kind = (None, None) if error is None else (error.message, error.kind)
    unreadable = reader.short_frames + reader.unsupported_link_frames + malformed if error is None else 0
    if reader.frames == 0 and error is None and undecoded_blocks:
        message, kind = f"{reader.name}: {_no_frames_reason(undecoded_blocks)}", NO_FRAMES
    elif reader.frames > 0 and unreadable == reader.frames:
        reasons_text = ", ".join(
            f"{label} {n:,}"
            for label, n in (
                ("too short for their link header", reader.short_frames),
                ("unsupported link type", reader.unsupported_link_frames),
                ("malformed IP packets", malformed),
            )
            if n
        )
        message = f"{reader.name}: none of its {reader.frames:,} frames could be read ({reasons_text})"
        kind = NO_READABLE_FRAMES
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
