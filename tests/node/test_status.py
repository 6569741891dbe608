"""`vpn-packet status` against a live `vpn-packet node` on a real TUN device in a network namespace (root).

The node's peer node-b is a plain `Node` in a script in the same namespace; node-c is configured but nobody
listens there. Datagrams sent into the TUN reach node-b; the status (both forms) shows node-b connected with
exactly what node-b counted, node-c down with the connect error; a missing node is one line and exit 1.
Also the control socket's permissions and its protocol's bounds (no root needed for those).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.node.control import ControlServer, request
from vpn_packet.testutil.netns import NodeProcess, netns_unavailable, skip_or_fail

PEER_SCRIPT = r"""
import asyncio, json, sys
from vpn_packet.node.node import Node
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.handshake import Security

async def main():
    got = []
    peers = [Peer("node-a", "127.0.0.1:7100", ["10.77.0.1/32"])]
    sink = lambda peer, packets: got.extend(packets)
    node = Node(Security.insecure("node-b"), ("127.0.0.1", 7101), peers, sink)
    await node.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    print(json.dumps({"received": len(got)}), flush=True)
    await node.stop()

asyncio.run(main())
"""

SEND_SCRIPT = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    sock.sendto(i.to_bytes(4, "big") * 8, (sys.argv[1], 9))
"""

_CLI = "import sys; from vpn_packet.cli import main; sys.exit(main())"


def node_config(sock: Path, peers: str, *, mtu: int = 1400) -> str:
    return f"""\
[interface]
name = "vpnst0"
address = "10.77.0.1/24"
mtu = {mtu}

[listen]
address = "127.0.0.1:7100"

[node]
id = "node-a"
insecure = true
control_socket = "{sock}"

{peers}"""


PEER_B = """\
[[peers]]
id = "node-b"
endpoint = "127.0.0.1:7101"
allowed_ips = ["10.77.0.2/32"]
"""
PEER_C = """\
[[peers]]
id = "node-c"
endpoint = "127.0.0.1:7102"
allowed_ips = ["10.77.0.3/32"]
"""


@pytest.fixture
def netns() -> Iterator[str]:
    reason = netns_unavailable()
    if reason is not None:
        skip_or_fail(reason)
    name = f"vpnp-st-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_node(netns: str, config: Path, log: Path) -> NodeProcess:
    """`vpn-packet node --config CONFIG` in `netns`, running (its "running" line logged)."""
    node = NodeProcess("node-a", netns, config, log, log.with_suffix(".json"))
    node.process = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _CLI, "node", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert node.process.stdout is not None
    node.follow(node.process.stdout)
    node.wait_for_line(lambda line: " running: " in line, timeout=30)
    return node


def stop_node(node: NodeProcess) -> int:
    assert node.process is not None
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
    node.wait_output_closed()
    return node.process.returncode


def poll(predicate: Callable[[], bool], *, hang_guard: float = 20.0) -> None:
    """Until `predicate()` holds (asked again every few ms); `hang_guard` only bounds a hang."""
    deadline = time.monotonic() + hang_guard
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        time.sleep(0.01)


def peers_of(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in snapshot["peers"]}


def test_status_of_a_live_node(
    netns: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "150")  # the table's width (a terminal's, else rich's 80)
    sock = tmp_path / "run" / "vpnst0.sock"
    config = tmp_path / "node.toml"
    config.write_text(node_config(sock, PEER_B + "\n" + PEER_C))
    peer = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", PEER_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    node = None
    try:
        assert peer.stdout is not None
        assert peer.stdin is not None
        assert peer.stdout.readline().strip() == "ready"
        node = start_node(netns, config, tmp_path / "node.log")
        # Root only: the socket 0600 in a 0700 directory.
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700

        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SEND_SCRIPT, "10.77.0.2", "20"],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SEND_SCRIPT, "10.77.0.3", "1"],
                       check=True)  # fmt: skip

        def settled() -> bool:
            snap = request(sock, "status")["status"]
            t, c = snap["totals"], peers_of(snap)["node-c"]
            return bool(
                t["queued"] == 0 and t["in_flight"] == 0 and t["tx_packets"] >= 20 and c["last_error"]
            )

        poll(settled)

        assert main(["status", str(sock), "--json"]) == 0
        snapshot = json.loads(capsys.readouterr().out)
        peers = peers_of(snapshot)
        assert list(peers) == ["node-b", "node-c"]
        b, c = peers["node-b"], peers["node-c"]
        for p in (b, c):  # the contract's keys
            assert {
                "id",
                "connected",
                "last_error",
                "tx_packets",
                "rx_packets",
                "tx_bytes",
                "rx_bytes",
                "drops",
                "connection_failures",
                "never_connected",
            } <= set(p)
        assert b["connected"] is True
        assert b["last_error"] is None
        assert b["tx_packets"] == 20
        assert b["tx_bytes"] == 20 * (20 + 8 + 32)  # IPv4 + UDP headers + payload, as read from the TUN
        assert b["last_handshake"] is not None
        assert b["last_tx"] is not None
        assert b["connections"]["out"] >= 1
        assert b["breaker"] == "closed"
        assert c["connected"] is False
        assert c["last_error"] == "connect to 127.0.0.1:7102: ECONNREFUSED (Connection refused)"
        # A connection that failed carried no packet: a connection failure, not a drop (issue 22, point 6).
        assert c["connection_failures"].get("connect_failed.ECONNREFUSED", 0) >= 1
        assert c["drops"] == {}
        assert c["never_connected"] == c["last_error"]
        assert b["never_connected"] is None
        failures = snapshot["totals"]["connection_failures"]
        assert failures["connect_failed.ECONNREFUSED"] >= 1
        for key in {k for p in peers.values() for k in p["connection_failures"]}:  # totals = sum of peers
            assert failures.get(key, 0) == sum(p["connection_failures"].get(key, 0) for p in peers.values())
        assert "connect_failed" not in " ".join(snapshot["totals"]["drops"])
        assert snapshot["totals"]["tx_packets"] == 20
        assert snapshot["interface"] == "vpnst0"

        assert main(["status", str(sock)]) == 0
        human = capsys.readouterr().out
        for text in ("node-a", "node-b", "connected", "node-c", "down", "refused", "totals"):
            assert text in human, human

        peer.stdin.close()
        assert json.loads(peer.stdout.readline()) == {"received": 20}  # node-b's own count
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait()
        if node is not None:
            assert stop_node(node) == 0, node.log_text()
    assert not sock.exists()  # removed at exit

    assert main(["status", str(sock)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("vpn-packet status: error: no node")


def test_status_without_a_name_needs_exactly_one_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vpn_packet.node import control

    monkeypatch.setattr(control, "CONTROL_DIR", tmp_path)
    assert main(["status"]) == 1
    assert "no node is running" in capsys.readouterr().err
    for name in ("vpn0", "vpn1"):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / f"{name}.sock"))
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "several nodes run (vpn0, vpn1)" in err
    assert err.count("\n") == 1


async def test_control_protocol_is_bounded_and_stale_sockets_are_replaced(tmp_path: Path) -> None:
    async def handler(command: str) -> dict[str, Any]:
        return {"status": {"command": command}}

    path = tmp_path / "ctl" / "x.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as stale:  # a socket file nobody answers on: a node that died
        stale.bind(str(path))
    server = ControlServer(path, handler)
    await server.start()
    try:
        answer = await asyncio.to_thread(request, path, "status")
        assert answer == {"ok": True, "status": {"command": "status"}}
        # A second server on the same path refuses: a running node's socket is never taken over.
        with pytest.raises(OSError, match="running node"):
            await ControlServer(path, handler).start()

        def raw(data: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.sendall(data)
                return dict(json.loads(s.makefile("rb").readline()))

        too_long = await asyncio.to_thread(raw, b"x" * 10_000 + b"\n")
        assert too_long["ok"] is False
        assert "longer than" in too_long["error"]
        garbage = await asyncio.to_thread(raw, b"not json\n")
        assert garbage == {"ok": False, "error": "the request is not one line of JSON"}
    finally:
        await server.stop()
    assert not path.exists()
