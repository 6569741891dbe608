"""Test utilities for vpn-packet users and for our own tests: packet builders (and, as they land, fakes of
the dispatcher's Protocols and pytest fixtures)."""

# ruff: noqa: F403, F405
from __future__ import annotations

from vpn_packet.testutil import packets
from vpn_packet.testutil.packets import *

__all__ = ["packets", *packets.__all__]
