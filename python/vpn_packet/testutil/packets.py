"""Packet builders, re-exported from `vpn_packet.packets` (where the demo also finds them)."""

# ruff: noqa: F403
from __future__ import annotations

from vpn_packet.packets import *
from vpn_packet.packets import __all__ as __all__
