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
import re
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


# ---- issue 22: readable at 80 columns, a clear line for a user who may not look, one socket per netns ----

SNAPSHOT: dict[str, Any] = {
    "id": "node-a",
    "interface": "vpn0",
    "listen": "0.0.0.0:7000",
    "state": "running",
    "uptime": 86400.0,
    "peers": [
        {
            "id": "branch-office-gateway",
            "endpoint": "[2001:db8:1234:5678::77]:7000",
            "allowed_ips": ["10.8.0.2/32", "192.168.50.0/24"],
            "connected": True,
            "last_error": None,
            "last_handshake": 12.0,
            "last_tx": 0.5,
            "last_rx": 0.2,
            "tx_packets": 123_456_789,
            "tx_bytes": 98_765_432_100,
            "rx_packets": 87_654_321,
            "rx_bytes": 65_432_109_876,
            "drops": {},
            "breaker": "closed",
            "connections": {"out": 4, "in": 4},
        },
        {
            "id": "node-c",
            "endpoint": "192.168.77.3:7000",
            "allowed_ips": ["10.8.0.3/32"],
            "connected": False,
            "last_error": "connect to 192.168.77.3:7000: ECONNREFUSED (Connection refused)",
            "last_handshake": None,
            "last_tx": None,
            "last_rx": None,
            "tx_packets": 0,
            "tx_bytes": 0,
            "rx_packets": 0,
            "rx_bytes": 0,
            "drops": {"connect_failed.ECONNREFUSED": 3},
            "breaker": "open",
            "connections": {"out": 0, "in": 0},
        },
    ],
    "totals": {"tx_packets": 123_456_789, "tx_bytes": 98_765_432_100, "rx_packets": 87_654_321},
}


def rendered(wide: bool, width: int) -> list[str]:
    from rich.console import Console

    from vpn_packet.cli.status import render

    console = Console(width=width, record=True, highlight=False, color_system=None)
    with console.capture() as captured:
        console.print(render(SNAPSHOT, wide=wide))
    return captured.get().splitlines()


def test_status_fits_80_columns_with_every_number_whole() -> None:
    lines = rendered(wide=False, width=80)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    header = next(line for line in lines if line.lstrip().startswith("peer"))
    assert header.split() == ["peer", "state", "handshake", "tx", "rx"]
    row = next(line for line in lines if "connected" in line)
    assert row.startswith("branch-")  # a long name folds onto the next lines, the numbers stay whole
    assert "123.5M (92.0 GiB)" in row  # not cut to a few characters
    assert "87.7M (60.9 GiB)" in row
    assert "12s ago" in row
    assert "node-c: breaker open" in text  # left out of the narrow table, said below it
    assert "node-c: last error: connect to 192.168.77.3:7000: ECONNREFUSED" in text.replace("\n", " ")


def test_status_wide_shows_every_column() -> None:
    from vpn_packet.cli.status import wide_width

    width = wide_width(SNAPSHOT)
    lines = rendered(wide=True, width=width)
    assert max(len(line.rstrip()) for line in lines if not line.startswith("totals")) <= width
    header = next(line for line in lines if line.lstrip().startswith("peer"))
    assert header.split() == [
        *["peer", "source", "endpoint", "state", "handshake", "tx", "rx", "last", "tx", "last", "rx"],
        *["in/out", "breaker"],
    ]
    row = next(line for line in lines if "connected" in line)
    assert "[2001:db8:1234:5678::77]:7000" in row
    assert "123,456,789 (92.0 GiB)" in row


def test_the_command_picks_the_layout_by_the_terminal_width_unless_wide(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vpn_packet.cli import status

    monkeypatch.setattr(status, "socket_for", lambda name: Path("/nonexistent"))
    monkeypatch.setattr("vpn_packet.node.control.request", lambda path, command: {"status": SNAPSHOT})
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "endpoint" not in out
    assert max(map(len, out.splitlines())) <= 80
    assert main(["status", "--wide"]) == 0
    assert "endpoint" in capsys.readouterr().out
    monkeypatch.setenv("COLUMNS", str(status.wide_width(SNAPSHOT)))
    assert main(["status"]) == 0
    assert "endpoint" in capsys.readouterr().out


def test_a_user_who_may_not_read_the_control_directory_is_told_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Issue 22: a non-root `status` said "no node is running" while one ran. (Root reads any directory, so
    the directory's answer to this test's root user is replaced by the one a user gets.)"""
    from vpn_packet.node import control

    monkeypatch.setattr(control, "CONTROL_DIR", tmp_path)

    def denied(self: Path) -> Iterator[Path]:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    monkeypatch.setattr(sys, "argv", ["/opt/vpn-packet/bin/vpn-packet", "status"])
    assert main(["status"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"vpn-packet status: error: cannot read {tmp_path}: permission denied (the nodes' control directory "
        "is root-only, mode 0700); run it as root: sudo /opt/vpn-packet/bin/vpn-packet status\n"
    )


def documented_top_level_keys() -> set[str]:
    """The keys of docs/status-json.md's "Top level" table."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "status-json.md").read_text()
    table = text.split("## Top level", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))


def test_two_nodes_in_two_network_namespaces_each_have_their_control_socket(tmp_path: Path) -> None:
    """Issue 22: two nodes on `vpnns0` in two namespaces sharing /run: the second ran without a control
    socket. Each now has its own default socket, and `status vpnns0` in each namespace reaches its own."""
    reason = netns_unavailable()
    if reason is not None:
        skip_or_fail(reason)
    names = [f"vpnp-cs{i}-{os.getpid()}" for i in (1, 2)]
    nodes: list[NodeProcess] = []
    try:
        for i, ns in enumerate(names):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            config = tmp_path / f"node{i}.toml"
            # node-c is a gateway (a network behind it), and a new namespace does not forward: warned.
            peer = PEER_C.replace('["10.77.0.3/32"]', '["10.77.0.3/32", "192.168.99.0/24"]')
            text = node_config(Path("unused"), peer).replace('name = "vpnst0"', 'name = "vpnns0"')
            text = text.replace('id = "node-a"', f'id = "node-{ns}"')
            config.write_text("\n".join(line for line in text.splitlines() if "control_socket" not in line))
            nodes.append(start_node(ns, config, tmp_path / f"node{i}.log"))
        for ns in names:
            sock = Path(f"/run/vpn-packet/vpnns0@{ns}.sock")
            assert sock.is_socket(), [node.log_text() for node in nodes]
            result = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", _CLI, "status", "vpnns0", "--json"],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            snapshot = json.loads(result.stdout)
            assert snapshot["id"] == f"node-{ns}"
            assert set(snapshot) - {"node", "tun"} == documented_top_level_keys()
            # Without NAME: the only node of this namespace, though two run on the host.
            result = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", _CLI, "status", "--json"],
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["id"] == f"node-{ns}"
        for node in nodes:
            assert "no control socket" not in node.log_text()
            warning = "peers[0].allowed_ips: 'node-c' owns 192.168.99.0/24, beyond this tunnel's subnets"
            assert warning in node.log_text()
            assert "net.ipv4.ip_forward is 0 here" in node.log_text()
    finally:
        for node in nodes:
            stop_node(node)
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
