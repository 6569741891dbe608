"""The node's edge as an operator sees it (issue 22, item 3 and operator points 3 and 6; issue 20, item 5):

- the exit summary and the final metrics file include the kernel's drops up to the end (read before the TUN
  closes), not `kernel: {}`;
- refused and failed connections are connection failures, logged and counted apart from packet drops; a
  peer that never came up says so, and why; the totals of the receiver's drops are the sum of the peers';
- the deprecated names (`[tuning] write_backlog`, `[tuning] idle_timeout`, `sink_failed`, the
  `tun_write_backlog` gauge) keep working for one release and say so once.

Two `TunNode`s on loopback, each on a `FakeTun` (the real `TunDevice` on a socket pair: no root).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from tests.node.test_tun_node import _config, _free_ports

from vpn_packet import deprecation
from vpn_packet.node.config import parse_config
from vpn_packet.node.metrics_endpoint import node_samples
from vpn_packet.node.node import PEER_RECEIVE_DROPS
from vpn_packet.node.tun_node import TunNode
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.tuning import Tuning


def _node(tmp_path: Path, me: str = "node-a", port: int | None = None, other: int | None = None) -> TunNode:
    mine, theirs = _free_ports(2)
    ips = {"node-a": ("10.8.0.1", "10.8.0.2"), "node-b": ("10.8.0.2", "10.8.0.1")}
    peer = "node-b" if me == "node-a" else "node-a"
    config = _config(me, peer, *ips[me], port or mine, other or theirs, tmp_path)
    return TunNode(config, tun_factory=FakeTun.open)


async def test_the_summary_after_shutdown_has_the_kernels_drops_up_to_the_end(tmp_path: Path) -> None:
    node = _node(tmp_path)
    await node.start()
    tun = node.tun
    assert isinstance(tun, FakeTun)
    try:
        # A flood in the last interval: the kernel dropped what the node could not read, until the end.
        tun.kernel["tx_dropped"] = 642_958
    finally:
        assert await node.shutdown()
    assert tun.closed
    tun.kernel["tx_dropped"] = 0  # the device is gone: nothing can be read from it any more
    snapshot = node.metrics()
    assert snapshot["tun"]["kernel"]["tx_dropped"] == 642_958
    assert snapshot["totals"]["drops"]["tun.kernel_tx_dropped"] == 642_958
    assert "tun.kernel_tx_dropped=642,958" in node.summary()
    node.write_metrics_file()
    on_disk = json.loads((tmp_path / "metrics-node-a.json").read_text())
    assert on_disk["tun"]["kernel"]["tx_dropped"] == 642_958


async def test_connection_failures_are_not_packet_drops_and_a_peer_that_never_came_up_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node(tmp_path)  # its peer never runs: every connection to it is refused
    await node.start()
    try:
        await wait_until(lambda: node.metrics()["node"]["connect_failures"] >= 1)
        # Three connections that end inside the handshake: failed handshakes, not packets.
        for _ in range(3):
            _reader, writer = await asyncio.open_connection(*node.node.address)
            writer.close()
        await wait_until(
            lambda: node.metrics()["node"]["receiver"]["handshake_failures"].get("closed_early", 0) == 3
        )
        with caplog.at_level(logging.WARNING, logger="vpn_packet.node"):
            grown = node.log_drops()
        snapshot = node.metrics()
    finally:
        assert await node.shutdown()
    assert grown["receiver.handshake_failures.closed_early"] == 3
    assert grown["connect_failed.ECONNREFUSED"] >= 1
    lines = [r.getMessage() for r in caplog.records]
    assert not any(line.startswith("dropped") for line in lines), lines  # no packet was dropped
    assert any(
        line.startswith("connection failures since") or " connection failures since " in line
        for line in lines
    ), lines
    totals = snapshot["totals"]
    assert totals["drops"] == {}
    assert totals["connection_failures"]["receiver.handshake_failures.closed_early"] == 3
    (peer,) = snapshot["peers"]
    assert peer["drops"] == {}
    assert peer["connection_failures"]["connect_failed.ECONNREFUSED"] >= 1
    assert (
        peer["connection_failures"]["connect_failed.ECONNREFUSED"]
        == totals["connection_failures"]["connect_failed.ECONNREFUSED"]
    )  # the totals are the sum of the peers
    assert "ECONNREFUSED" in peer["never_connected"]
    summary = node.summary()
    assert "  drops: none" in summary
    assert "receiver.handshake_failures.closed_early=3" in summary
    assert "peer node-b: never connected: connect to 127.0.0.1:" in summary


async def test_the_receivers_totals_are_the_sum_of_the_peers_and_deprecated_names_still_answer(
    tmp_path: Path,
) -> None:
    port_a, port_b = _free_ports(2)
    a = _node(tmp_path, "node-a", port_a, port_b)
    b = _node(tmp_path, "node-b", port_b, port_a)
    await a.start()
    await b.start()
    try:
        tun_a, tun_b = a.tun, b.tun
        assert isinstance(tun_a, FakeTun)
        assert isinstance(tun_b, FakeTun)
        good = [ipv4_packet("10.8.0.1", "10.8.0.2", UDP, 1, 2, bytes([i]) * 50) for i in range(20)]
        spoofed = [ipv4_packet("10.8.0.2", "10.8.0.2", UDP, 3, 4, b"not yours") for _ in range(4)]
        tun_a.inject(good + spoofed)
        await wait_until(lambda: b.metrics()["node"]["receiver"]["spoofed_dropped"] == 4)
        await wait_until(lambda: len(tun_b.written) == 20)
        snapshot = b.metrics()
        prometheus = {
            (name, tuple(sorted(labels.items()))): value for name, _, labels, value in node_samples(snapshot)
        }
    finally:
        assert await a.shutdown()
        assert await b.shutdown()
    receiver = snapshot["node"]["receiver"]
    assert receiver["frames"] == receiver["packets_delivered"] + sum(receiver[k] for k in PEER_RECEIVE_DROPS)
    for counter, key in PEER_RECEIVE_DROPS.items():
        total = snapshot["totals"]["drops"].get(f"receiver.{counter}", 0)
        assert total == sum(peer["drops"].get(key, 0) for peer in snapshot["peers"]), counter
    assert snapshot["totals"]["drops"]["receiver.spoofed_dropped"] == 4
    # Deprecated for one release: still there, listed, and the same sum as before the rename.
    assert (
        receiver["sink_failed"]
        == receiver["tun_dropped"]
        + receiver["tun_refused"]
        + receiver["offload_invalid"]
        + receiver["sink_raised"]
    )
    assert snapshot["node"]["receiver_peers"]["node-a"]["sink_failed"] == 0
    assert snapshot["tun"]["backlog"] == 0
    assert set(snapshot["deprecated"]) == {"node.receiver.sink_failed", "tun.backlog"}
    assert prometheus[("vpn_packet_receiver_sink_failed_total", ())] == 0
    assert prometheus[("vpn_packet_receiver_spoofed_dropped_total", ())] == 4
    assert prometheus[("vpn_packet_tun_write_backlog", ())] == 0


def test_deprecated_tuning_keys_are_accepted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    deprecation._forget_warnings()
    data = {
        "interface": {"name": "vpn0", "address": "10.8.0.1/24"},
        "listen": {"address": "127.0.0.1:7000"},
        "node": {"id": "node-a", "insecure": True},
        "peers": [{"id": "node-b", "endpoint": "127.0.0.1:7001", "allowed_ips": ["10.8.0.2/32"]}],
        "tuning": {"write_backlog": 64, "idle_timeout": 30},
    }
    with caplog.at_level(logging.WARNING, logger="vpn_packet.deprecation"):
        config = parse_config(data, base=tmp_path)
        parse_config(data, base=tmp_path)  # a second time (a reload): no second warning
    assert config.tuning.receive_idle_timeout == 30.0
    assert config.tuning == Tuning(receive_idle_timeout=30)
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 2
    assert "tuning.idle_timeout is now tuning.receive_idle_timeout" in messages[0]
    assert "tuning.write_backlog has no effect any more" in messages[1]
    # A bad value under the old name is refused under the name the file used.
    data["tuning"] = {"idle_timeout": 0}
    with pytest.raises(Exception, match=r"tuning\.idle_timeout: 0 must be positive"):
        parse_config(data, base=tmp_path)
    # In Python too: the old keyword and the old attribute, warned once each.
    assert Tuning(idle_timeout=32).receive_idle_timeout == 32.0  # type: ignore[call-arg]
    assert Tuning().with_changes(idle_timeout=33).receive_idle_timeout == 33.0
    assert Tuning(receive_idle_timeout=34).idle_timeout == 34.0
    warned = [str(w.message) for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert sum("Tuning.idle_timeout" in m for m in warned) == 1
    assert "write_backlog" not in Tuning.names()
