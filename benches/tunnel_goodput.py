"""Bulk TCP goodput through the two-namespace tunnel, beside the same transfer over the bare veth pair.

    sudo python benches/tunnel_goodput.py                     # 200 MB, tunnel MTU 1400 and 9000, 3 rounds
    sudo python benches/tunnel_goodput.py --mtu 1400 --bytes 50e6 --rounds 1
    sudo python benches/tunnel_goodput.py --mode key          # only the default (TLS, keys)

For each tunnel MTU: two namespaces joined by a veth pair (MTU 1500), a `vpn-packet node` in each (real
processes, from TOML files, as `tests/test_e2e_netns.py` runs them). Each round sends `--bytes` from namespace
A to a TCP sink in namespace B, once to B's tunnel address (through both nodes: TUN read -> dispatcher ->
framed TCP stream over the veth -> receiver -> anti-spoofing -> TUN write) and once to B's veth address
(bare kernel TCP). Goodput is payload bytes over the sender's time from connect to the receiver closing.
Also reported: the CPU time the two node processes used per tunnel round, per MB and per packet.

Each MTU runs in both modes, one lab each: `key` (the contract config: keys from `vpn-packet genkey`, TLS
1.3) and `insecure` (`[node] insecure = true`, plaintext); the last column is key/insecure tunnel goodput
(issue 10 goal: >= 70%).

A plain script, not a pytest-benchmark suite: the quantity is a rate measured across processes, and the
comparison that matters (tunnel vs bare veth) is made inside one run. Needs root and `/dev/net/tun`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from vpn_packet.testutil.netns import TUNNEL_B, UNDERLAY_B, TunnelLab, netns_unavailable, transfer


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _gbps(result: dict[str, Any]) -> float:
    sent = result["sent"]
    return float(sent["bytes"]) * 8 / float(sent["seconds"]) / 1e9


def run_mtu(mtu: int, nbytes: int, rounds: int, *, mode: str = "key") -> dict[str, Any]:
    """Rounds of tunnel and bare-veth transfers at tunnel MTU `mtu`, nodes in `mode` (key or insecure)."""
    insecure = mode == "insecure"
    with (
        tempfile.TemporaryDirectory(prefix="vpnp-bench-") as tmp,
        TunnelLab(Path(tmp), mtu=mtu, insecure=insecure) as lab,
    ):
        pids = [node.process.pid for node in lab.nodes.values() if node.process is not None]
        transfer(lab, TUNNEL_B, 4_000_000, verify=False)  # warm-up: streams connected, workers created
        transfer(lab, UNDERLAY_B, 4_000_000, verify=False)
        tunnel: list[float] = []
        veth: list[float] = []
        cpu: list[float] = []
        packets: list[int] = []
        for _ in range(rounds):
            before_cpu = sum(_cpu_seconds(pid) for pid in pids)
            before_packets = lab.metrics("a")["tun"]["packets_read"]
            tunnel.append(_gbps(transfer(lab, TUNNEL_B, nbytes, verify=False, timeout=300)))
            cpu.append(sum(_cpu_seconds(pid) for pid in pids) - before_cpu)
            packets.append(lab.metrics("a")["tun"]["packets_read"] - before_packets)
            veth.append(_gbps(transfer(lab, UNDERLAY_B, nbytes, verify=False, timeout=300)))
        drops = {}
        for which in ("a", "b"):
            m = lab.metrics(which)
            d = m["node"]["dispatcher"]
            drops[which] = {
                "rejected": d["rejected"],
                "failed": d["failed"],
                "spoofed": m["node"]["receiver"]["spoofed_dropped"],
                "tun_write_dropped": m["tun"]["write_dropped"],
            }
    return {
        "mtu": mtu,
        "mode": mode,
        "tunnel": tunnel,
        "veth": veth,
        "cpu": cpu,
        "packets": packets,
        "drops": drops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bytes", type=float, default=200e6, help="bytes per transfer (default 200e6)")
    parser.add_argument(
        "--mtu", type=int, action="append", help="tunnel MTU (repeatable; default 1400 and 9000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="transfers per path and MTU (default 3)")
    parser.add_argument(
        "--mode", choices=["key", "insecure"], action="append", help="node mode (repeatable; default both)"
    )
    args = parser.parse_args(argv)
    reason = netns_unavailable()
    if reason is not None:
        print(f"tunnel_goodput: cannot run: {reason}", file=sys.stderr)
        return 2
    nbytes = int(args.bytes)
    mtus = args.mtu or [1400, 9000]
    print(
        f"bulk TCP, {nbytes / 1e6:.0f} MB per transfer, {args.rounds} rounds, median (min..max); "
        f"{os.cpu_count()} CPUs"
    )
    modes = args.mode or ["insecure", "key"]
    header = (
        f"{'tunnel MTU':>10}  {'mode':>8}  {'tunnel Gbit/s':>22}  {'bare veth Gbit/s':>22}  {'fraction':>8}  "
        f"{'node CPU s/GB':>13}  {'CPU us/packet':>13}  {'key/insecure':>12}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for mtu in mtus:
        medians: dict[str, float] = {}
        for mode in modes:
            r = run_mtu(mtu, nbytes, args.rounds, mode=mode)
            results.append(r)
            t, v = statistics.median(r["tunnel"]), statistics.median(r["veth"])
            medians[mode] = t
            cpu = statistics.median(r["cpu"])
            pkts = statistics.median(r["packets"]) or 1
            ratio = f"{t / medians['insecure']:.1%}" if mode == "key" and "insecure" in medians else ""
            print(
                f"{mtu:>10}  {mode:>8}  {t:>6.2f} ({min(r['tunnel']):.2f}..{max(r['tunnel']):.2f}){'':>5}  "
                f"{v:>6.2f} ({min(r['veth']):.2f}..{max(r['veth']):.2f}){'':>4}  {t / v:>8.1%}  "
                f"{cpu / (nbytes / 1e9):>13.2f}  {cpu / pkts * 1e6:>13.2f}  {ratio:>12}"
            )
    for r in results:
        print(f"drops at MTU {r['mtu']} ({r['mode']}): {r['drops']}")
    print(
        "node CPU: both node processes together (A reads the TUN and sends, B receives and writes the TUN,\n"
        "plus the ACKs back); per packet: per packet A read from its TUN"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
