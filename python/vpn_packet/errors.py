"""Typed errors of vpn-packet.

Skeleton: the full taxonomy and predicates arrive with issue 3. `PacketError` is raised by the native
module (see rust/python/src/errors.rs), which imports it from here.
"""

from __future__ import annotations

__all__ = ["PacketError", "VpnPacketError"]


class VpnPacketError(Exception):
    """Base class of every error raised by vpn-packet."""

    retriable: bool = False


class PacketError(VpnPacketError, ValueError):
    """A packet has no trustworthy addresses (empty, wrong version, shorter than its fixed header, bad IHL).

    `reason` is a short stable name (`empty`, `unsupported_version`, `truncated`, `invalid_ihl`) for
    counting drops by reason.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message, reason)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message
