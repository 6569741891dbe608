"""`TunNode` and `vpn-packet node` around the TUN device (the device itself: tests/transport/test_tun.py).

- The command's errors are one line and exit status 2: no TUN driver, not root.
- Two `TunNode`s on loopback with fake TUN devices (no root), in each security mode (keys, the default; a
  CA; insecure, which warns): what one "reads" the other writes, a spoofed packet is dropped and counted,
  the shutdown is ordered and clean, drops are logged once per report.
- The metrics endpoint, the shutdown deadline, a start failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.errors import ConfigError
from vpn_packet.node.config import NodeConfig, parse_config
from vpn_packet.node.tun_node import INSECURE_WARNING, TunNode, drop_counters
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.netns import skip_or_fail
from vpn_packet.testutil.packets import ICMP, UDP, icmp_echo, ipv4_packet
from vpn_packet.transport.identity import NodeIdentity, generate_identity, load_identity
from vpn_packet.transport.tun import TunDevice

HAVE_TUN = os.path.exists("/dev/net/tun")


# --- the command's errors ---------------------------------------------------------------------------------

_NOT_ROOT_CONFIG = """\
[interface]
name = "vpnp-noroot"
address = "10.99.0.1/24"

[listen]
address = "127.0.0.1:7999"

[node]
key = "node-a.key"

[[peers]]
id = "node-b"
endpoint = "127.0.0.1:7998"
allowed_ips = ["10.99.0.2/32"]
public_key = "{public_key}"
"""


def _write_not_root_config(directory: Path) -> Path:
    """The contract config (keys) in `directory`, with node-a.key beside it."""
    generate_identity("node-a", directory)
    config = directory / "node.toml"
    config.write_text(_NOT_ROOT_CONFIG.format(public_key=generate_identity("node-b", directory).public_key))
    return config


def test_cli_missing_device_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write_not_root_config(tmp_path)
    original = TunDevice.open.__func__  # type: ignore[attr-defined]

    def open_missing(cls: type[TunDevice], /, name: str, **kwargs: Any) -> TunDevice:
        return original(cls, name, path=str(tmp_path / "no-tun"), **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(TunDevice, "open", classmethod(open_missing))
    assert main(["node", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    missing = "the TUN device is missing: no TUN driver here (modprobe tun)"
    assert err == f"vpn-packet node: error: {tmp_path / 'no-tun'}: {missing}\n"


def test_cli_not_root_is_one_line_exit_2() -> None:
    if not HAVE_TUN:
        skip_or_fail("/dev/net/tun is missing")
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # readable by nobody, unlike tmp_path
        os.chmod(directory, 0o755)
        config = _write_not_root_config(Path(directory))
        config.chmod(0o644)
        if os.geteuid() == 0:  # the key stays 0600, owned by the user the command runs as (nobody)
            os.chown(Path(directory) / "node-a.key", 65534, 65534)
        result = _run_cli_unprivileged(config)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("vpn-packet node: error: ")
    assert "needs root or CAP_NET_ADMIN" in result.stderr
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    if mode & 0o006 != 0o006:  # its mode refuses nobody: the message names the cause (issue 22, point 3)
        assert f"/dev/net/tun is mode {mode:04o} owned by " in result.stderr


def test_a_tun_device_file_whose_mode_refuses_us_is_named_with_its_mode_and_owner() -> None:
    """With CAP_NET_ADMIN but a device file of mode 0600 (Debian 12's /dev/net/tun) the cause is the file's
    mode, not a missing capability: the error says so, with the mode, the owner and what to do."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (to run as nobody against a file of root's)")
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # nobody may look into it, unlike tmp_path
        os.chmod(directory, 0o755)
        device = Path(directory) / "tun"
        device.write_bytes(b"")
        device.chmod(0o600)  # root:root, 0600
        result = _run_as_nobody(device)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert f"{device} is mode 0600 owned by root:root" in message
    assert "CAP_NET_ADMIN does not override a file's mode" in message
    assert f"chmod 0666 {device}" in message
    assert "a restart alone does not fix this" in message


def _run_as_nobody(device: Path) -> subprocess.CompletedProcess[str]:
    script = (
        "import os\n"
        "from vpn_packet.transport.tun import TunDevice\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    TunDevice.open('vpnp-mode0', path={str(device)!r})\n"
        "except PermissionError as exc:\n"
        "    print(exc)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def _run_cli_unprivileged(config: Path) -> subprocess.CompletedProcess[str]:
    # Everything is imported before dropping to nobody (who may not read the Python installation).
    script = (
        "import asyncio, os, sys\n"
        "import vpn_packet.node.config, vpn_packet.node.node, vpn_packet.node.tun_node\n"
        "import vpn_packet.transport.tls, vpn_packet.transport.tun\n"
        "from vpn_packet.cli import build_parser, main\n"
        "build_parser()\n"
        "if os.geteuid() == 0:\n"
        "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"sys.exit(main(['node', '--config', {str(config)!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


# --- TunNode on FakeTun devices (no root: the real TunDevice on a socket pair) -----------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_holder(host: str) -> socket.socket:
    """A listening socket holding a port it chose itself: a port from `_free_ports` bound here could be taken
    by another process in between (that race failed these tests once on a busy machine)."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


def _identity(tmp: Path, name: str) -> NodeIdentity:
    """`name`'s key file under `tmp` (made on first use: both nodes' configs share it)."""
    path = tmp / "keys" / f"{name}.key"
    if path.exists():
        return load_identity(path)
    path.parent.mkdir(exist_ok=True)
    return generate_identity(name, path.parent)


def _config(
    me: str,
    other: str,
    my_ip: str,
    other_ip: str,
    port: int,
    other_port: int,
    tmp: Path,
    mode: str = "key",
    pki: Any = None,
) -> NodeConfig:
    """`me`'s config: keys (the default; no [node] id, it comes from the key file), a CA (`pki`, a
    `TestPki`), or insecure."""
    peer: dict[str, Any] = {
        "id": other,
        "endpoint": f"127.0.0.1:{other_port}",
        "allowed_ips": [f"{other_ip}/32"],
    }
    node: dict[str, Any] = {"metrics_file": f"metrics-{me}.json", "shutdown_timeout": 3}
    data: dict[str, Any] = {
        "interface": {"name": f"tun-{me}", "address": f"{my_ip}/24", "mtu": 1400},
        "listen": {"address": f"127.0.0.1:{port}"},
        "node": node,
        "peers": [peer],
        "tuning": {"connect_timeout": 2},
    }
    if mode == "key":
        node["key"] = str(_identity(tmp, me).path)
        peer["public_key"] = _identity(tmp, other).public_key
    elif mode == "ca":
        node["id"] = me
        data["tls"] = {"cert": str(pki.nodes[me].cert), "key": str(pki.nodes[me].key), "ca": str(pki.ca_cert)}
    else:
        node.update(id=me, insecure=True)
    config = parse_config(data, base=tmp)
    assert (config.node.id, config.mode) == (me, mode)
    return config


@pytest.mark.parametrize("mode", ["key", "ca", "insecure"])
async def test_tun_nodes_over_loopback(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    pki = None
    if mode == "ca":
        from vpn_packet.testutil.certs import write_test_pki

        pki = write_test_pki(tmp_path / "pki", ["node-a", "node-b"])
    port_a, port_b = _free_ports(2)
    tuns: dict[str, FakeTun] = {}

    def factory(name: str, **kwargs: Any) -> Any:
        tuns[name] = FakeTun(name, **kwargs)
        return tuns[name]

    a = TunNode(
        _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path, mode, pki),
        tun_factory=factory,
    )
    b = TunNode(
        _config("node-b", "node-a", "10.8.0.2", "10.8.0.1", port_b, port_a, tmp_path, mode, pki),
        tun_factory=factory,
    )
    with caplog.at_level(logging.INFO, logger="vpn_packet.node"):
        await a.start()
        await b.start()
    warned = [r for r in caplog.records if r.getMessage() == INSECURE_WARNING]
    assert [r.levelno for r in warned] == ([logging.WARNING] * 2 if mode == "insecure" else [])
    running = [r.getMessage() for r in caplog.records if " running: " in r.getMessage()]
    assert len(running) == 2
    assert all(a.node.security.describe() in line for line in running), running
    caplog.clear()
    try:
        assert a.running
        assert b.running
        assert a.node.security.mode == b.node.security.mode == mode
        assert a.node.stream_service.security is a.node.receiver.security is a.node.security
        assert (a.node.security.client_context is not None) == (mode != "insecure")
        assert (b.node.security.server_context is not None) == (mode != "insecure")
        assert tuns["tun-node-a"].opened_with == {
            "address": ["10.8.0.1/24"],
            "mtu": 1400,
            "txqueuelen": 1000,
            "offload": True,
        }
        good = [ipv4_packet("10.8.0.1", "10.8.0.2", UDP, 1000 + i, 53, bytes([i]) * 100) for i in range(50)]
        no_peer = ipv4_packet("10.8.0.1", "10.77.0.9", UDP, 1, 2, b"nowhere")
        tuns["tun-node-a"].inject([*good, no_peer])
        tun_b = tuns["tun-node-b"]
        await wait_until(lambda: len(tun_b.written) >= 50)
        assert tun_b.written == good

        # B answers; A gets it.
        reply = ipv4_packet("10.8.0.2", "10.8.0.1", ICMP, transport=icmp_echo(1, 1))
        tuns["tun-node-b"].inject([reply])
        await wait_until(lambda: bool(tuns["tun-node-a"].written))
        assert tuns["tun-node-a"].written == [reply]

        # A packet whose source is B's address, sent by A: B refuses it.
        spoofed = ipv4_packet("10.8.0.2", "10.8.0.2", UDP, 9, 9, b"spoof")
        tuns["tun-node-a"].inject([spoofed])
        await wait_until(lambda: b.metrics()["node"]["receiver"]["spoofed_dropped"] >= 1)
        assert tun_b.written == good

        with caplog.at_level(logging.WARNING, logger="vpn_packet.node"):
            assert b.log_drops() == {"receiver.spoofed_dropped": 1}
            assert b.log_drops() == {}  # nothing new: no second line
        assert sum("receiver.spoofed_dropped=1" in r.getMessage() for r in caplog.records) == 1
        await wait_until(lambda: a.metrics()["node"]["dispatcher"]["failed"] >= 1)
        assert drop_counters(a.metrics())["failed.no_peer"] == 1

        # The kernel dropped packets on A's device (its queue was full): the summary says so.
        assert "tun.kernel_tx_dropped" not in a.metrics()["totals"]["drops"]
        tuns["tun-node-a"].kernel["tx_dropped"] = 175
        assert a.metrics()["totals"]["drops"]["tun.kernel_tx_dropped"] == 175
        assert a.log_drops()["tun.kernel_tx_dropped"] == 175

        snapshot = b.report_metrics()
        on_disk = json.loads((tmp_path / "metrics-node-b.json").read_text())
        assert on_disk["node"]["receiver"]["spoofed_dropped"] == 1
        assert snapshot["node"]["receiver_peers"]["node-a"]["packets_delivered"] == 50
    finally:
        assert await a.shutdown()
        assert await b.shutdown()
    assert await a.shutdown()  # idempotent
    for tun in tuns.values():
        assert tun.events == ["start_reading", "stop_reading", "close"]
    summary = a.summary()
    assert "node node-a" in summary
    assert "failed.no_peer=1" in summary
    assert not a.running
    assert a.metrics()["state"] == "stopped"


async def _http_get(address: tuple[str, int], path: str) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


async def test_metrics_endpoint(tmp_path: Path) -> None:
    port_a, port_b, port_m = _free_ports(3)
    config = _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path)
    config = dataclasses.replace(
        config, node=dataclasses.replace(config.node, metrics_listen=("127.0.0.1", port_m))
    )
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    node = TunNode(config, tun_factory=factory)
    await node.start()
    try:
        assert node.metrics_address == ("127.0.0.1", port_m)
        tuns[0].inject([ipv4_packet("10.8.0.1", "10.77.0.1", UDP, 1, 2, b"no peer")])
        await wait_until(lambda: node.metrics()["node"]["dispatcher"]["failed"] == 1)
        status, body = await _http_get(node.metrics_address, "/metrics")
        assert status == "HTTP/1.0 200 OK"
        text = body.decode()
        assert "# TYPE vpn_packet_packets_failed_total counter" in text
        assert 'vpn_packet_packets_failed_total{reason="no_peer"} 1' in text
        assert "vpn_packet_receiver_spoofed_dropped_total 0" in text
        assert "vpn_packet_tun_packets_written_total 0" in text
        status, body = await _http_get(node.metrics_address, "/metrics.json")
        assert status == "HTTP/1.0 200 OK"
        assert json.loads(body)["node"]["dispatcher"]["failed_by_reason"]["no_peer"] == 1
        status, _ = await _http_get(node.metrics_address, "/other")
        assert status == "HTTP/1.0 404 Not Found"
    finally:
        assert await node.shutdown()
    with pytest.raises(ConnectionRefusedError):
        await _http_get(("127.0.0.1", port_m), "/metrics")


async def test_shutdown_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain that never ends (a peer that never takes its packets): `shutdown` gives up at its deadline and
    says so (False, an error line), cancels the drain, and still stops the receiver and closes the TUN."""
    port_a, port_b = _free_ports(2)
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    node = TunNode(
        _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path), tun_factory=factory
    )
    await node.start()
    drain_cancelled = asyncio.Event()

    async def never_drains(timeout: float | None = None) -> None:  # noqa: ASYNC109 - the signature it replaces
        try:
            await asyncio.Event().wait()  # nobody sets it: only the shutdown deadline ends this
        except asyncio.CancelledError:
            drain_cancelled.set()
            raise

    monkeypatch.setattr(node.node, "stop_sending", never_drains)
    with caplog.at_level(logging.ERROR, logger="vpn_packet.node"):
        # A hang guard only: without its deadline the shutdown would wait for the drain forever.
        async with asyncio.timeout(30):
            assert await node.shutdown(timeout=0.05) is False
    assert drain_cancelled.is_set()
    assert "shutdown deadline of 0.05s reached" in caplog.text
    assert tuns[0].closed
    assert not node.node.receiver.running
    assert not node.running


async def test_start_failure_closes_the_tun(tmp_path: Path) -> None:
    (other,) = _free_ports(1)
    blocker = _port_holder("127.0.0.1")
    port = blocker.getsockname()[1]
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    try:
        node = TunNode(
            _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port, other, tmp_path), tun_factory=factory
        )
        # The port in use is a configuration error naming the key and the address (issue 11).
        in_use = rf"^listen\.address: 127\.0\.0\.1:{port} is in use \(EADDRINUSE\)$"
        with pytest.raises(ConfigError, match=in_use):
            await node.start()
    finally:
        blocker.close()
    assert tuns[0].closed
    assert not node.running


# --- the host refuses a setting at start: port in use, interface name taken (issue 11) --------------------

_IN_USE_CONFIG = """\
[interface]
name = "{name}"
address = "10.99.0.1/24"

[listen]
address = "0.0.0.0:{port}"

[node]
id = "node-a"
insecure = true

[[peers]]
id = "node-b"
endpoint = "127.0.0.1:{other}"
allowed_ips = ["10.99.0.2/32"]
"""


def test_cli_listen_port_in_use_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (other,) = _free_ports(1)
    config = tmp_path / "node.toml"
    tuns: list[FakeTun] = []

    def open_fake(cls: type[TunDevice], /, name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    monkeypatch.setattr(TunDevice, "open", classmethod(open_fake))
    with _port_holder("0.0.0.0") as blocker:
        port = blocker.getsockname()[1]
        config.write_text(_IN_USE_CONFIG.format(name="vpnp-inuse", port=port, other=other))
        assert main(["node", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"vpn-packet node: error: {config}: listen.address: 0.0.0.0:{port} is in use (EADDRINUSE)\n"
    assert tuns[0].closed


async def test_metrics_listen_in_use_names_its_key(tmp_path: Path) -> None:
    port_a, port_b = _free_ports(2)
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    with _port_holder("127.0.0.1") as blocker:
        port_m = blocker.getsockname()[1]
        config = _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path)
        config = dataclasses.replace(
            config, node=dataclasses.replace(config.node, metrics_listen=("127.0.0.1", port_m))
        )
        node = TunNode(config, tun_factory=factory)
        with pytest.raises(ConfigError, match=rf"^node\.metrics_listen: 127\.0\.0\.1:{port_m} is in use"):
            await node.start()
    assert tuns[0].closed
    assert not node.node.receiver.running


@pytest.fixture
def netns() -> Iterator[str]:
    """A throwaway network namespace (root only), deleted with everything in it."""
    if not HAVE_TUN:
        skip_or_fail("/dev/net/tun is missing")
    if os.geteuid() != 0:
        skip_or_fail("needs root (network namespace)")
    name = f"vpnp-tunnode-test-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        skip_or_fail(f"ip netns add fails: {result.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# Runs `vpn-packet node` in the namespace; with a second argument, first opens a TUN of that name and holds
# it: the node cannot attach to a TUN that is open already (EBUSY), as if another process had it.
_RUN_NODE = """\
import sys
from vpn_packet.cli import main
from vpn_packet.transport.tun import TunDevice
holder = TunDevice.open(sys.argv[2]) if len(sys.argv) > 2 else None
sys.exit(main(["node", "--config", sys.argv[1]]))
"""


def test_cli_interface_name_taken_is_one_line_naming_the_key(netns: str, tmp_path: Path) -> None:
    add = ["ip", "-n", netns, "link", "add", "vpnp-dummy0", "type"]
    if subprocess.run([*add, "dummy"], capture_output=True).returncode != 0:
        subprocess.run([*add, "bridge"], check=True)  # a kernel without the dummy driver: any other kind
    cases = [
        ("vpnp-dummy0", [], "it is not a TUN device: EINVAL"),
        ("vpnp-busy0", ["vpnp-busy0"], "a TUN device another process has open: EBUSY"),
    ]
    for name, holder, reason in cases:
        config = tmp_path / f"{name}.toml"
        config.write_text(_IN_USE_CONFIG.format(name=name, port=7000, other=7001))
        result = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _RUN_NODE, str(config), *holder],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"vpn-packet node: error: {config}: interface.name: {name} exists and is not ours ({reason})\n"
        )
    # The dummy device is left as it was: the node neither took nor deleted it.
    link = subprocess.run(["ip", "-n", netns, "link", "show", "vpnp-dummy0"], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
