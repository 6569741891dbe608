"""Data types shared across vpn-packet: `PacketInfo` (native) and `QueuedPacket`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from vpn_packet._native import PacketInfo

__all__ = ["PacketInfo", "QueuedPacket"]


@dataclass(slots=True)
class QueuedPacket:
    """A packet waiting in a worker's queue.

    `done` resolves once the packet was written to a stream (or fails); `deadline` is in loop time.
    """

    sync_key: str
    dest_ip: str
    data: bytes
    done: asyncio.Future[None] | None = None
    deadline: float | None = None
