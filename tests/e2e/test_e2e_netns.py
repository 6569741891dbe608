"""End to end: two network namespaces joined by a veth pair, a `vpn-packet node` in each (from TOML files),
real traffic through the tunnel.

- ICMP echo from A to B's tunnel address (a raw ICMP socket in namespace A; no `ping` binary needed);
- a 24 MB TCP transfer A -> B through the tunnel, SHA-256 checked on both sides;
- a spoofed packet: a client on the underlay claims to be node A (the hello is unauthenticated without TLS)
  and sends a packet whose source is outside A's allowed_ips; node B drops it and counts it (read back with
  SIGUSR1 and its metrics file);
- node B restarting: node A reaches it again within seconds;
- an orderly shutdown (SIGINT for one, SIGTERM for the other): exit status 0, a metrics summary, no
  namespace left behind.

Needs root, `/dev/net/tun` and `ip netns`: skipped (with the reason) without them, except when `CI=true`,
where a missing prerequisite fails the test instead. Nothing here sleeps: the lab waits for the nodes' log
lines (ready, metrics) and the probes wait for their replies, each with a timeout that only guards a hang.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpn_packet.testutil.netns import (
    ICMP_ECHO_SCRIPT,
    PORT,
    SPOOF_SCRIPT,
    TUNNEL_A,
    TUNNEL_B,
    UNDERLAY_A,
    UNDERLAY_B,
    TunnelLab,
    netns_unavailable,
    skip_or_fail,
    transfer,
)

TRANSFER_BYTES = 24 * 1000 * 1000


def _require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        skip_or_fail(reason)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelLab]:
    _require_netns()
    workdir = tmp_path_factory.mktemp("e2e-netns")
    with TunnelLab(workdir) as lab:
        yield lab
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.ns_a not in leftovers
    assert lab.ns_b not in leftovers


def test_underlay_is_private(lab: TunnelLab) -> None:
    # The underlay addresses exist in the two namespaces only.
    host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert UNDERLAY_A not in host
    assert UNDERLAY_B not in host
    inside = subprocess.run(["ip", "-n", lab.ns_a, "-o", "addr"], capture_output=True, text=True).stdout
    assert f"{UNDERLAY_A}/30" in inside
    assert f"{TUNNEL_A}/24" in inside


def test_icmp_echo_across_the_tunnel(lab: TunnelLab) -> None:
    result = lab.run_python(lab.ns_a, ICMP_ECHO_SCRIPT, TUNNEL_B, "3", "2")
    assert result["received"] == 3, result
    print(f"ICMP echo {TUNNEL_A} -> {TUNNEL_B}: rtt ms {[round(r, 3) for r in result['rtt_ms']]}")
    # ... and the other way.
    assert lab.run_python(lab.ns_b, ICMP_ECHO_SCRIPT, TUNNEL_A, "1", "2")["received"] == 1


def test_tcp_transfer_through_the_tunnel(lab: TunnelLab) -> None:
    before = lab.metrics("b")["node"]["receiver"]["packets_delivered"]
    result = transfer(lab, TUNNEL_B, TRANSFER_BYTES, verify=True)
    sent, received = result["sent"], result["received"]
    assert sent["bytes"] == received["bytes"] == TRANSFER_BYTES
    assert received["sha256"] == sent["sha256"]
    seconds = sent["seconds"]
    rate = TRANSFER_BYTES * 8 / seconds / 1e9
    print(f"TCP {TRANSFER_BYTES / 1e6:.0f} MB through the tunnel: {seconds:.3f}s, {rate:.2f} Gbit/s")
    metrics = lab.metrics("b")
    # The data really crossed node B's receiver (about 1400-byte packets).
    assert metrics["node"]["receiver"]["packets_delivered"] - before >= TRANSFER_BYTES // 1400
    assert metrics["tun"]["packets_written"] >= metrics["node"]["receiver"]["packets_delivered"]


def test_spoofed_packet_is_dropped_and_counted(lab: TunnelLab) -> None:
    before = lab.metrics("b")["node"]["receiver"]
    # Claims to be node-a (allowed 10.8.0.1/32) but sends from 10.8.0.77. The script returns once node B has
    # closed the connection, which it does after filtering (and counting) what came on it.
    lab.run_python(lab.ns_a, SPOOF_SCRIPT, UNDERLAY_B, str(PORT), "node-a", "10.8.0.77", TUNNEL_B)
    metrics = lab.metrics("b")
    after = metrics["node"]["receiver"]
    assert after["spoofed_dropped"] == before["spoofed_dropped"] + 1
    assert after["packets_delivered"] == before["packets_delivered"]
    assert metrics["node"]["receiver_peers"]["node-a"]["spoofed_dropped"] >= 1


def test_peer_restart_recovers(lab: TunnelLab) -> None:
    """Node B goes away and comes back (same config): A finds it again within seconds (its breaker probes
    again after resilience.reset_timeout, 2 s by default)."""
    assert lab.stop_node("b") == 0
    assert lab.run_python(lab.ns_a, ICMP_ECHO_SCRIPT, TUNNEL_B, "2", "0.3")["received"] == 0
    previous_log = lab.nodes["b"].log_text()
    lab.start_node("b")
    lab.wait_ready("b")
    # Echo requests until one is answered: those sent while A's breaker is still open are dropped. 30 tries
    # of 0.5 s bound a hang; A's breaker probes again after 2 s.
    answered = [lab.run_python(lab.ns_a, ICMP_ECHO_SCRIPT, TUNNEL_B, "1", "0.5")["received"]]
    while answered[-1] == 0 and len(answered) < 30:
        answered.append(lab.run_python(lab.ns_a, ICMP_ECHO_SCRIPT, TUNNEL_B, "1", "0.5")["received"])
    assert answered[-1] == 1, lab.nodes["a"].log_text()
    assert "node node-b: up" in previous_log


def test_orderly_shutdown(lab: TunnelLab) -> None:
    for which, sig in (("a", signal.SIGINT), ("b", signal.SIGTERM)):
        assert lab.stop_node(which, sig=sig) == 0, lab.nodes[which].log_text()
        log = lab.nodes[which].log_text()
        assert "shutting down: stopped reading vpn0" in log
        assert f"node node-{which}: up" in log  # the summary
        assert "Traceback" not in log, log
    # Node A's drops are the packets sent while B was away (circuit open, failed connects): counted.
    assert "drops: none" in lab.nodes["b"].log_text()
    assert "failed.stream_error=" in lab.nodes["a"].log_text()
    # Each node wrote its final metrics file on the way out.
    for which in ("a", "b"):
        final = json.loads(lab.nodes[which].metrics_file.read_text())
        assert (final["id"], final["state"]) == (f"node-{which}", "stopped")


def test_nothing_left_behind(tmp_path: Path) -> None:
    _require_netns()
    with TunnelLab(tmp_path, start_nodes=False) as lab:
        names = (lab.ns_a, lab.ns_b)
        assert all(
            n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout for n in names
        )
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listing for n in names)


def test_tun_deleted_under_the_node(lab: TunnelLab) -> None:
    """Someone deletes the node's interface: the node notices (no busy loop on the dead descriptor), shuts
    down and exits with status 1."""
    node = lab.start_node("a")
    lab.wait_ready("a")
    subprocess.run(["ip", "-n", lab.ns_a, "link", "del", "vpn0"], check=True)
    assert node.process is not None
    assert node.process.wait(timeout=15) == 1  # a hang guard
    node.wait_output_closed()  # every line it wrote is in its log file
    log = node.log_text()
    assert "TUN vpn0 failed" in log
    assert "node node-a: up" in log  # still the ordered shutdown and its summary
    assert "Traceback" not in log, log
