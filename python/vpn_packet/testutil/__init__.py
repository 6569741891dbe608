"""Test utilities for vpn-packet users and for our own tests: packet builders, fakes of the dispatcher's
four Protocols with failure, latency and blocking injection (`fakes`), and a pytest plugin of fixtures
(`vpn_packet.testutil.fixtures`, load it with ``pytest_plugins = ["vpn_packet.testutil.fixtures"]``)."""

# ruff: noqa: F403
from __future__ import annotations

from vpn_packet.testutil import fakes, packets
from vpn_packet.testutil.fakes import *
from vpn_packet.testutil.packets import *

__all__ = ["fakes", "packets", *fakes.__all__, *packets.__all__]
