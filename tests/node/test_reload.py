"""`Node.reconfigure` (what `vpn-packet reload` and SIGHUP apply) on real nodes over loopback, in key mode.

- Under traffic: a peer added, a prefix moved from one peer to another, a peer removed; traffic to the
  unchanged peer arrives complete and in order, every packet is accounted for (accepted == sent + failed +
  discarded + queued + in_flight, nothing queued or in flight at the end), each peer's own count of what it
  received from us is what our status says it acknowledged, and packets for the removed peer fail as
  `no_peer`.
- A peer's key changed: its connections close, the receiver refuses the old key at once and takes the new.
- A bad reconfiguration (a prefix given twice) changes nothing.
- `diff_configs`: peers apply live, anything else needs a restart.
- A real `vpn-packet node` on a TUN in a network namespace (root): SIGHUP reloads instead of killing it,
  `vpn-packet reload` applies and says what changed, a file that does not validate (or that changes what
  needs a restart) is refused with the one line a start prints, and the running config stays.

The traffic generator yields to the loop between batches (`asyncio.sleep(0)`); nothing waits for time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.node.config import ConfigDiff, diff_configs, parse_config
from vpn_packet.node.control import request
from vpn_packet.node.node import Node
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.netns import NodeProcess, netns_unavailable, skip_or_fail
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity

Ids = dict[str, NodeIdentity]
FAST = ResilienceConfig(initial_interval=0.001, max_interval=0.002, failure_threshold=1000, max_attempts=3)
A_IP = "10.9.0.1"
STAY = "10.9.0.2"  # node-b's, unchanged all along
MOVED = "10.9.1.5"  # in 10.9.1.0/24: node-b's, then node-c's, then nobody's (node-c removed)
GONE = "10.9.0.3"  # node-c's, until node-c is removed
NEW = "10.9.0.4"  # node-d's, once node-d is added


class Sink:
    """What a node received, per destination address, as sequence numbers in arrival order."""

    def __init__(self) -> None:
        self.by_dest: dict[str, list[int]] = defaultdict(list)

    def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        for p in packets:
            dest = ".".join(str(b) for b in p[16:20])
            self.by_dest[dest].append(int.from_bytes(p[28:32], "big"))

    def count(self) -> int:
        return sum(len(v) for v in self.by_dest.values())


def packet(dest: str, seq: int) -> bytes:
    return ipv4_packet(A_IP, dest, UDP, 4000, 53, seq.to_bytes(4, "big"))


@pytest.fixture
def ids(tmp_path: Path) -> Ids:
    return dict(identities(tmp_path, "node-a", "node-b", "node-c", "node-d"))


def _security(ids: Ids, me: str, *peers: str) -> Security:
    return Security.with_keys(ids[me], {p: ids[p].public_key_bytes for p in peers})


async def _peer_node(ids: Ids, me: str, sink: Sink) -> Node:
    node = Node(
        _security(ids, me, "node-a"), ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", [f"{A_IP}/32"])], sink
    )
    await node.start()
    return node


def _status(a: Node) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in a.peer_status()}


async def test_reload_under_traffic_keeps_order_and_accounting(ids: Ids) -> None:
    sinks = {name: Sink() for name in ("node-b", "node-c", "node-d")}
    peers = {name: await _peer_node(ids, name, sinks[name]) for name in sinks}
    b, c, d = peers["node-b"], peers["node-c"], peers["node-d"]
    a = Node(
        _security(ids, "node-a", "node-b", "node-c"),
        ("127.0.0.1", 0),
        [
            Peer("node-b", b.endpoint, [f"{STAY}/32", "10.9.1.0/24"]),
            Peer("node-c", c.endpoint, [f"{GONE}/32"]),
        ],
        resilience=FAST,
    )
    await a.start()
    accepted: dict[str, list[int]] = defaultdict(list)  # sequence numbers accepted, per destination
    next_seq: dict[str, int] = defaultdict(int)
    stop = asyncio.Event()
    phase_done = [asyncio.Event(), asyncio.Event(), asyncio.Event()]
    rounds = 0

    async def traffic() -> None:
        nonlocal rounds
        while not stop.is_set():
            for dest in (STAY, MOVED, GONE, NEW):
                for _ in range(4):
                    seq = next_seq[dest]
                    next_seq[dest] += 1
                    if a.send(packet(dest, seq)):  # a full queue rejects (counted, never accepted)
                        accepted[dest].append(seq)
            rounds += 1
            for i, n in enumerate((50, 100, 150)):
                if rounds == n:
                    phase_done[i].set()
            await asyncio.sleep(0)  # let the loop run the dispatcher and the sockets

    task = asyncio.create_task(traffic())
    try:
        await phase_done[0].wait()
        # Reload 1: node-d added (with its key), 10.9.1.0/24 moves from node-b to node-c.
        keys1 = {p: ids[p].public_key_bytes for p in ("node-b", "node-c", "node-d")}
        changes = await a.reconfigure(
            [
                Peer("node-b", b.endpoint, [f"{STAY}/32"]),
                Peer("node-c", c.endpoint, [f"{GONE}/32", "10.9.1.0/24"]),
                Peer("node-d", d.endpoint, [f"{NEW}/32"]),
            ],
            keys1,
        )
        assert changes.added == ("node-d",)
        assert changes.changed == {"node-b": ("allowed_ips",), "node-c": ("allowed_ips",)}
        await phase_done[1].wait()
        # Reload 2: node-c removed (and with it 10.9.0.3 and 10.9.1.0/24).
        changes = await a.reconfigure(
            [Peer("node-b", b.endpoint, [f"{STAY}/32"]), Peer("node-d", d.endpoint, [f"{NEW}/32"])],
            {p: ids[p].public_key_bytes for p in ("node-b", "node-d")},
        )
        assert changes.removed == ("node-c",)
        await phase_done[2].wait()
    finally:
        stop.set()
        await task
    assert await a.flush(timeout=30)  # a hang guard, not a threshold

    def all_acknowledged() -> bool:  # (the pool's leases do not hand receipts back yet: ask the streams)
        return all(s.in_flight == 0 for st in a.stream_service.peer_stats.values() for s in st.streams)

    await wait_until(all_acknowledged)

    m = a.dispatcher.check_accounting()  # accepted == sent + failed + discarded + queued + in_flight
    assert m.queued == 0
    assert m.in_flight == 0
    assert m.discarded == 0
    assert m.accepted == sum(len(v) for v in accepted.values()) == m.sent + m.failed
    assert m.failed_by_reason["no_peer"] > 0  # 10.9.0.4 before node-d came, 10.9.0.3 after node-c left
    # The unchanged destination: every packet accepted, in order, at node-b.
    assert sinks["node-b"].by_dest[STAY] == accepted[STAY]
    # The moved one: in order at each owner in turn, nothing twice, all of it before node-c left.
    moved = sinks["node-b"].by_dest[MOVED] + sinks["node-c"].by_dest[MOVED]
    assert sinks["node-b"].by_dest[MOVED] == sorted(sinks["node-b"].by_dest[MOVED])
    assert sinks["node-c"].by_dest[MOVED] == sorted(sinks["node-c"].by_dest[MOVED])
    assert len(set(moved)) == len(moved)
    assert sinks["node-b"].by_dest[MOVED]
    assert sinks["node-c"].by_dest[MOVED]
    # node-d got its destination only, in order, from the reload on.
    assert sinks["node-d"].by_dest[NEW] == sorted(sinks["node-d"].by_dest[NEW])
    assert sinks["node-d"].by_dest[NEW]
    assert set(sinks["node-d"].by_dest) == {NEW}
    # Every packet the peers received is one we counted sent, and the other way round.
    assert sum(s.count() for s in sinks.values()) == m.sent
    status = _status(a)
    assert set(status) == {"node-b", "node-d"}
    for name in ("node-b", "node-d"):
        theirs = peers[name].receiver.peer_metrics()["node-a"]
        assert status[name]["tx_packets"] == theirs.frames == sinks[name].count()
        assert status[name]["tx_bytes"] == theirs.bytes
        assert status[name]["connected"] is True
        assert status[name]["last_error"] is None
    await a.stop()
    for node in peers.values():
        await node.stop()


async def test_key_change_closes_the_peer_and_refuses_its_old_key(ids: Ids, tmp_path: Path) -> None:
    """node-b gets a new key: A's receiver refuses node-b's old one at once (its connection is closed) and
    accepts the new one."""
    sink = Sink()
    b_peer = [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"])]
    a = Node(_security(ids, "node-a", "node-b"), ("127.0.0.1", 0), b_peer, sink)
    await a.start()
    a_peer = [Peer("node-a", a.endpoint, [f"{A_IP}/32"])]
    old_b = Node(_security(ids, "node-b", "node-a"), ("127.0.0.1", 0), a_peer, resilience=FAST)
    await old_b.start()
    reply = ipv4_packet("10.9.0.2", A_IP, UDP, 53, 4000, (0).to_bytes(4, "big"))
    assert old_b.send(reply)
    await wait_until(lambda: sink.count() == 1)
    assert _status(a)["node-b"]["connected"] is True

    new_key = identities(tmp_path / "new", "node-b")["node-b"]
    changes = await a.reconfigure(
        [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"])], {"node-b": new_key.public_key_bytes}
    )
    assert changes.changed == {"node-b": ("public_key",)}
    assert changes.closed == 1
    await wait_until(lambda: not _status(a)["node-b"]["connected"])
    # The old key is refused from now on.
    old_b.send(reply)
    await wait_until(lambda: a.receiver.metrics().refused.get("key_mismatch", 0) >= 1)
    assert sink.count() == 1
    # The new key is accepted.
    new_b = Node(Security.with_keys(new_key, {"node-a": ids["node-a"].public_key_bytes}), ("127.0.0.1", 0),
                 [Peer("node-a", a.endpoint, [f"{A_IP}/32"])], resilience=FAST)  # fmt: skip
    await new_b.start()
    assert new_b.send(reply)
    await wait_until(lambda: sink.count() == 2)
    for node in (old_b, new_b, a):
        await node.stop()


async def test_bad_reconfigure_changes_nothing(ids: Ids) -> None:
    a = Node(
        _security(ids, "node-a", "node-b"), ("127.0.0.1", 0), [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"])]
    )
    await a.start()
    before = (a.peers, a.discovery.generation, a.security)
    with pytest.raises(ValueError, match="given to both"):
        await a.reconfigure(
            [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"]), Peer("node-c", "127.0.0.1:10", ["10.9.0.2/32"])],
            {"node-b": ids["node-b"].public_key_bytes, "node-c": ids["node-c"].public_key_bytes},
        )
    with pytest.raises(ValueError, match="same public key"):
        await a.reconfigure(
            [Peer("node-b", "127.0.0.1:9", ["10.9.0.2/32"]), Peer("node-c", "127.0.0.1:10", ["10.9.0.3/32"])],
            {"node-b": ids["node-b"].public_key_bytes, "node-c": ids["node-b"].public_key_bytes},
        )
    assert (a.peers, a.discovery.generation, a.security) == before
    assert a.discovery.lookup("10.9.0.2") == "node-b"
    assert a.discovery.lookup("10.9.0.3") is None
    await a.stop()


def test_diff_configs(tmp_path: Path) -> None:
    base = {
        "interface": {"name": "vpn0", "address": "10.8.0.1/24"},
        "listen": {"address": "127.0.0.1:7000"},
        "node": {"id": "node-a", "insecure": True},
        "peers": [
            {"id": "node-b", "endpoint": "127.0.0.1:7001", "allowed_ips": ["10.8.0.2/32"]},
            {"id": "node-c", "endpoint": "127.0.0.1:7002", "allowed_ips": ["10.8.0.3/32"]},
        ],
    }
    old = parse_config(base, base=tmp_path)
    assert diff_configs(old, old) == ConfigDiff()
    changed = {
        **base,
        "peers": [
            {"id": "node-b", "endpoint": "127.0.0.1:7009", "allowed_ips": ["10.8.0.2/32", "10.8.1.0/24"]},
            {"id": "node-d", "endpoint": "127.0.0.1:7004", "allowed_ips": ["10.8.0.4/32"]},
        ],
    }
    diff = diff_configs(old, parse_config(changed, base=tmp_path))
    assert diff.added == ("node-d",)
    assert diff.removed == ("node-c",)
    assert diff.changed == {"node-b": ("endpoint", "allowed_ips")}
    assert diff.restart == ()
    assert diff.describe() == "added node-d; removed node-c; node-b: endpoint, allowed_ips changed"
    restart = {**base, "interface": {"name": "vpn0", "address": "10.8.0.1/24", "mtu": 1300},
               "listen": {"address": "127.0.0.1:7100"}}  # fmt: skip
    diff = diff_configs(old, parse_config(restart, base=tmp_path))
    assert diff.restart == ("interface.mtu", "listen.address")
    assert not diff.peers_changed
    assert dataclasses.asdict(diff)["restart"] == ("interface.mtu", "listen.address")


# --- a real node: SIGHUP and `vpn-packet reload` ------------------------------------------------------------

_CLI = "import sys; from vpn_packet.cli import main; sys.exit(main())"


def _config(sock: Path, peers: list[tuple[str, str, str]], *, mtu: int = 1400) -> str:
    text = f"""\
[interface]
name = "vpnrl0"
address = "10.78.0.1/24"
mtu = {mtu}

[listen]
address = "127.0.0.1:7200"

[node]
id = "node-a"
insecure = true
control_socket = "{sock}"
"""
    for peer_id, endpoint, allowed in peers:
        text += f'\n[[peers]]\nid = "{peer_id}"\nendpoint = "{endpoint}"\nallowed_ips = ["{allowed}"]\n'
    return text


@pytest.fixture
def netns() -> Iterator[str]:
    reason = netns_unavailable()
    if reason is not None:
        skip_or_fail(reason)
    name = f"vpnp-rl-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_sighup_reloads_and_a_bad_file_is_refused(
    netns: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "vpnrl0.sock"
    config = tmp_path / "node.toml"
    b = ("node-b", "127.0.0.1:7201", "10.78.0.2/32")
    c = ("node-c", "127.0.0.1:7202", "10.78.0.3/32")
    config.write_text(_config(sock, [b]))
    log = tmp_path / "node.log"
    node = NodeProcess("node-a", netns, config, log, tmp_path / "metrics.json")
    node.process = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _CLI, "node", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert node.process.stdout is not None
    node.follow(node.process.stdout)

    def peer_ids() -> list[str]:
        return [p["id"] for p in request(sock, "status")["status"]["peers"]]

    try:
        node.wait_for_line(lambda line: " running: " in line, timeout=30)
        # SIGHUP: node-c added; the node stays up (it used to exit with 129).
        config.write_text(_config(sock, [b, c]))
        after = node.line_count()
        node.process.send_signal(signal.SIGHUP)
        line = node.wait_for_line(lambda text: "reload applied" in text, after=after, timeout=30)
        assert "added node-c" in line
        assert node.process.poll() is None
        assert peer_ids() == ["node-b", "node-c"]

        # `vpn-packet reload`: node-b removed, node-c's allowed_ips changed.
        config.write_text(_config(sock, [("node-c", "127.0.0.1:7202", "10.78.0.4/30")]))
        assert main(["reload", str(sock), "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["removed"] == ["node-b"]
        assert answer["changed"] == {"node-c": ["allowed_ips"]}
        assert peer_ids() == ["node-c"]

        # A file that does not validate: refused with the line a start prints; the running config stays.
        bad = _config(sock, [("node-c", "127.0.0.1:7202", "10.78.0.300/32")])
        config.write_text(bad)
        assert main(["node", "--config", str(config)]) == 2  # (fails validating, before any TUN)
        at_start = capsys.readouterr().err.strip().removeprefix("vpn-packet node: error: ")
        assert main(["reload", str(sock)]) == 2
        refused = capsys.readouterr().err.strip()
        assert refused == f"vpn-packet reload: error: {at_start}"
        assert "peers[0].allowed_ips[0]" in refused
        after = node.line_count()
        node.process.send_signal(signal.SIGHUP)
        line = node.wait_for_line(lambda text: "reload refused" in text, after=after, timeout=30)
        assert at_start in line
        # A change that needs a restart: refused as a whole, saying which key.
        config.write_text(_config(sock, [b, c], mtu=1300))
        assert main(["reload", str(sock)]) == 2
        err = capsys.readouterr().err
        assert "interface.mtu changed, which needs a restart" in err
        snapshot = request(sock, "status")["status"]
        assert [(p["id"], p["allowed_ips"]) for p in snapshot["peers"]] == [("node-c", ["10.78.0.4/30"])]
        assert node.process.poll() is None
    finally:
        if node.process.poll() is None:
            node.process.terminate()
        try:
            code = node.process.wait(15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            code = node.process.wait()
        node.wait_output_closed()
    assert code == 0, node.log_text()
