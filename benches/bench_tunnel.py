"""Tunnel goodput under pytest: one round of `tunnel_goodput.py` (two namespaces, a node in each, bulk TCP
through the tunnel beside the bare veth pair), so the CI benchmark smoke run exercises it too.

Both node modes run: `key` (the default, TLS with keys) and `insecure` (plaintext); the key-mode run's
`extra_info` has `ratio_to_insecure` when the insecure one ran first at that MTU.
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


_tunnel: dict[tuple[int, str], float] = {}  # (mtu, mode) -> tunnel Gbit/s


@pytest.mark.parametrize("mode", ["insecure", "key"])
@pytest.mark.parametrize("mtu", [1400, 9000])
def test_tunnel_goodput(benchmark: BenchmarkFixture, mtu: int, mode: str) -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = benchmark.pedantic(run_mtu, args=(mtu, NBYTES, 1), kwargs={"mode": mode}, rounds=1, iterations=1)
    tunnel, veth = result["tunnel"][0], result["veth"][0]
    _tunnel[(mtu, mode)] = tunnel
    benchmark.extra_info.update(
        tunnel_gbps=round(tunnel, 3), veth_gbps=round(veth, 3), fraction=round(tunnel / veth, 4), ours=True
    )
    ratio = ""
    if mode == "key" and (mtu, "insecure") in _tunnel:
        benchmark.extra_info["ratio_to_insecure"] = round(tunnel / _tunnel[(mtu, "insecure")], 4)
        ratio = f", {tunnel / _tunnel[(mtu, 'insecure')]:.1%} of insecure"
    print(
        f"\nMTU {mtu} {mode}: tunnel {tunnel:.2f} Gbit/s, bare veth {veth:.2f} Gbit/s "
        f"({tunnel / veth:.1%}{ratio})"
    )


def test_tunnel_comparison_smoke(benchmark: BenchmarkFixture) -> None:
    """`tunnel.py` for a second or two: our node (plaintext) beside the bare veth, one short round of every
    measurement (first ping; pings, with a core busy and 0.2 s apart; redis with one client and pipelined;
    iperf3 TCP 1 and 4 streams, UDP 64 B). Checks that each one produced a figure, so the script cannot rot
    unnoticed; the figures go into `extra_info`. Installs nothing: without iperf3, ping or redis it skips
    and says how to install them (the full comparison is `benches/tunnel.py`)."""
    from tunnel import Settings, missing_commands, run

    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    impls = ("veth", "plain")
    missing = missing_commands(impls)
    if missing:
        pytest.skip("; ".join(f"{cmd} is missing (install: {' '.join(how)})" for cmd, how in missing.items()))
    settings = Settings(
        impls=impls,
        rounds=1,
        duration=1,
        udp_duration=1,
        ping_count=5,
        idle_ping_count=2,
        redis_requests=2000,
    )
    report = benchmark.pedantic(run, args=(settings,), kwargs={"log": lambda _: None}, rounds=1, iterations=1)
    for key in impls:
        (result,) = report["rounds"][key]
        assert result["errors"] == {}, f"{key}: {result['errors']}"
        measured = report["medians"][key]
        for metric in (
            "first_ping_ms",
            "ping_p50_ms",
            "ping_busy_p99_ms",
            "ping_idle_avg_ms",
            "redis1_rps",
            "redis50_rps",
            "tcp1_gbps",
            "tcp4_gbps",
            "udp64_pps",
        ):
            assert measured[metric] is not None, f"{key}: no {metric}"
        benchmark.extra_info[key] = {m: v for m, v in measured.items() if v is not None}
    benchmark.extra_info["ours"] = True
