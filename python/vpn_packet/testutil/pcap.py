"""pcap/pcapng writers and link-layer framing, re-exported from `vpn_packet.pcap_writer` (where the
`sample-capture` command also finds them)."""

# ruff: noqa: F403
from __future__ import annotations

from vpn_packet.pcap_writer import *
from vpn_packet.pcap_writer import __all__ as __all__
