"""Tunnel goodput under pytest: one round of `tunnel_goodput.py` (two namespaces, a node in each, bulk TCP
through the tunnel beside the bare veth pair), so the CI benchmark smoke run exercises it too.

The numbers go into `extra_info` (`tunnel_gbps`, `veth_gbps`, `fraction`); the benchmark's own time includes
starting the namespaces and nodes and is not the quantity of interest. For the table, run the script:
`python benches/tunnel_goodput.py`. Skipped without root, `/dev/net/tun` or `ip netns`.
"""

from __future__ import annotations

import os

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tunnel_goodput import run_mtu
from vpn_packet.testutil.netns import netns_unavailable

NBYTES = int(float(os.environ.get("VPN_PACKET_TUNNEL_BYTES", "50e6")))


@pytest.mark.parametrize("mtu", [1400, 9000])
def test_tunnel_goodput(benchmark: BenchmarkFixture, mtu: int) -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = benchmark.pedantic(run_mtu, args=(mtu, NBYTES, 1), rounds=1, iterations=1)
    tunnel, veth = result["tunnel"][0], result["veth"][0]
    benchmark.extra_info.update(
        tunnel_gbps=round(tunnel, 3), veth_gbps=round(veth, 3), fraction=round(tunnel / veth, 4), ours=True
    )
    print(f"\nMTU {mtu}: tunnel {tunnel:.2f} Gbit/s, bare veth {veth:.2f} Gbit/s ({tunnel / veth:.1%})")
