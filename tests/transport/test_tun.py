"""TUN device and TunNode.

- Errors without root or without /dev/net/tun are clear (`PermissionError` / `FileNotFoundError`).
- In a throwaway network namespace (root): the interface comes up with its address, MTU and txqueuelen; echo
  requests written to the TUN come back as the kernel's replies, read in batches on readiness events;
  `close()` is idempotent and removes the interface.
- Without root: two `TunNode`s on loopback with fake TUN devices - what one "reads" the other writes, a
  spoofed packet is dropped and counted, the shutdown is ordered and clean, drops are logged once per report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.node.config import NodeConfig, parse_config
from vpn_packet.node.tun_node import TunNode, drop_counters
from vpn_packet.testutil.packets import ICMP, UDP, icmp_echo, ipv4_packet
from vpn_packet.transport.tun import TunDevice, TunMetrics

HAVE_TUN = os.path.exists("/dev/net/tun")
IS_ROOT = os.geteuid() == 0


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"the TUN device is missing: no TUN driver here") as info:
        TunDevice.open("vpnp0", address="10.99.0.1/24", path=str(tmp_path / "no-tun"))
    assert info.value.filename == str(tmp_path / "no-tun")


def test_cli_missing_device_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(_NOT_ROOT_CONFIG)
    original = TunDevice.open.__func__  # type: ignore[attr-defined]

    def open_missing(cls: type[TunDevice], name: str, **kwargs: Any) -> TunDevice:
        return original(cls, name, path=str(tmp_path / "no-tun"), **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(TunDevice, "open", classmethod(open_missing))
    assert main(["node", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    missing = "the TUN device is missing: no TUN driver here (modprobe tun)"
    assert err == f"vpn-packet node: error: {tmp_path / 'no-tun'}: {missing}\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "interface name"),
        ({"name": "x" * 16}, "interface name"),
        ({"name": "a/b"}, "interface name"),
        ({"name": "ok", "mtu": 20}, "mtu 20"),
        ({"name": "ok", "txqueuelen": 0}, "txqueuelen 0"),
        ({"name": "ok", "address": "10.0.0.300/24"}, "10.0.0.300"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        TunDevice.open(name, path="/nonexistent/tun", **kwargs)


def _open_unprivileged() -> str:
    """Tries to open a TUN device without privileges: in this process when not root, else in a child that
    dropped to nobody. Returns the exception's type and message."""
    if not IS_ROOT:
        try:
            TunDevice.open("vpnp-noroot", address="10.99.0.1/24")
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "opened"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                TunDevice.open("vpnp-noroot", address="10.99.0.1/24")
                text = "opened"
            except OSError as exc:
                text = f"{type(exc).__name__}: {exc}"
            os.write(write_end, text.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(not HAVE_TUN, reason="/dev/net/tun is missing")
def test_not_root_is_a_clear_error() -> None:
    text = _open_unprivileged()
    assert text.startswith("PermissionError: "), text
    assert "needs root or CAP_NET_ADMIN" in text


_NOT_ROOT_CONFIG = """\
[interface]
name = "vpnp-noroot"
address = "10.99.0.1/24"

[listen]
address = "127.0.0.1:7999"

[[peers]]
id = "node-b"
endpoint = "127.0.0.1:7998"
allowed_ips = ["10.99.0.2/32"]
"""


@pytest.mark.skipif(not HAVE_TUN, reason="/dev/net/tun is missing")
def test_cli_not_root_is_one_line_exit_2() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # readable by nobody, unlike tmp_path
        os.chmod(directory, 0o755)
        config = Path(directory) / "node.toml"
        config.write_text(_NOT_ROOT_CONFIG)
        config.chmod(0o644)
        result = _run_cli_unprivileged(config)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("vpn-packet node: error: ")
    assert "needs root or CAP_NET_ADMIN" in result.stderr


def _run_cli_unprivileged(config: Path) -> subprocess.CompletedProcess[str]:
    # Everything is imported before dropping to nobody (who may not read the Python installation).
    script = (
        "import asyncio, os, sys\n"
        "import vpn_packet.node.node, vpn_packet.transport.tun\n"
        "from vpn_packet.cli import build_parser, main\n"
        "build_parser()\n"
        "if os.geteuid() == 0:\n"
        "    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        f"sys.exit(main(['node', '--config', {str(config)!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


# --- a real TUN in a throwaway namespace ------------------------------------------------------------------

_IN_NAMESPACE = textwrap.dedent(
    """
    import asyncio, json, os, subprocess
    from pyroute2 import IPRoute
    from vpn_packet.testutil.packets import ICMP, icmp_echo, ipv4_packet
    from vpn_packet.transport.tun import TunDevice

    N = 200
    out = {}
    tun = TunDevice.open("vpnp-t0", address=["10.99.0.1/24"], mtu=1400, txqueuelen=5000, max_backlog=64)
    with IPRoute() as ipr:
        link = ipr.get_links(ifname="vpnp-t0")[0]
        out["mtu"] = link.get("mtu") if hasattr(link, "get") else None
        out["txqlen"] = link.get("txqlen")
        out["flags_up"] = bool(link["flags"] & 1)
        out["addresses"] = [a.get("address") for a in ipr.get_addr(index=link["index"])
                            if a.get("family") == 2]
    # No IPv6 address configured: IPv6 is off, so no link-local chatter to read.
    with open("/proc/sys/net/ipv6/conf/vpnp-t0/disable_ipv6") as f:
        out["ipv6_disabled"] = f.read().strip() == "1"
    out["empty_read"] = tun.read_batch()
    requests = [ipv4_packet("10.99.0.2", "10.99.0.1", ICMP, transport=icmp_echo(7, seq, b"x" * 56))
                for seq in range(N)]

    async def main():
        replies, batches = [], []
        done = asyncio.Event()
        def on_batch(packets):
            batches.append(len(packets))
            replies.extend(packets)
            if len(replies) >= N:
                done.set()
        tun.start_reading(on_batch, max_packets=64)
        out["written"] = tun.write_batch(requests)
        await asyncio.wait_for(done.wait(), 5)
        tun.stop_reading()
        return replies, batches

    replies, batches = asyncio.run(main())
    out["replies"] = len(replies)
    out["reply_ok"] = all(
        r[9] == ICMP and r[12:16] == bytes([10, 99, 0, 1]) and r[16:20] == bytes([10, 99, 0, 2])
        and r[20] == 0 for r in replies
    )
    out["seqs"] = sorted(int.from_bytes(r[26:28], "big") for r in replies)
    out["batches"] = batches
    m = tun.metrics()
    out["metrics"] = {"packets_read": m.packets_read, "packets_written": m.packets_written,
                      "read_events": m.read_events, "max_batch_seen": m.max_batch_seen,
                      "write_errors": m.write_errors}
    # A packet the kernel refuses is counted, not raised.
    tun.write_batch([b"\\x00" * 30])  # no IP version: EINVAL
    out["write_errors_after_bad"] = tun.metrics().write_errors
    tun.close()
    tun.close()
    out["closed"] = tun.closed
    out["after_close_dropped"] = (tun.write_batch([requests[0]]), tun.metrics().write_dropped)
    with IPRoute() as ipr:
        out["gone"] = not ipr.link_lookup(ifname="vpnp-t0")
    # Dual stack: both addresses, IPv6 left on.
    tun6 = TunDevice.open("vpnp-t6", address=["10.98.0.1/24", "fd00:98::1/64"], mtu=1500)
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname="vpnp-t6")[0]
        out["dual"] = sorted(a.get("address") for a in ipr.get_addr(index=index) if a.get("prefixlen") != 64
                             or not a.get("address", "").startswith("fe80"))
    with open("/proc/sys/net/ipv6/conf/vpnp-t6/disable_ipv6") as f:
        out["dual_ipv6_on"] = f.read().strip() == "0"
    tun6.close()
    # Deleted under us: reading stops and on_error is called once, no busy loop on the dead descriptor.
    dead = TunDevice.open("vpnp-td", address="10.97.0.1/24")

    async def deleted():
        failed = asyncio.Event()
        errors = []
        def on_error(exc):
            errors.append(exc.errno)
            failed.set()
        dead.start_reading(lambda packets: None, on_error=on_error)
        subprocess.run(["ip", "link", "del", "vpnp-td"], check=True)
        await asyncio.wait_for(failed.wait(), 5)
        await asyncio.sleep(0.2)  # would be thousands of read events if it spun
        return errors

    out["deleted_errors"] = asyncio.run(deleted())
    out["deleted_read_events"] = dead.read_events
    dead.close()
    print(json.dumps(out))
    """
)


@pytest.fixture
def netns() -> Iterator[str]:
    if not HAVE_TUN:
        pytest.skip("/dev/net/tun is missing")
    if not IS_ROOT:
        pytest.skip("needs root (network namespace)")
    name = f"vpnp-tun-test-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"ip netns add fails: {result.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_real_tun_round_trip(netns: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", _IN_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mtu"] == 1400
    assert out["txqlen"] == 5000
    assert out["flags_up"]
    assert out["addresses"] == ["10.99.0.1"]
    assert out["ipv6_disabled"]
    assert out["empty_read"] == []
    assert out["written"] == 200
    assert out["replies"] == 200
    assert out["reply_ok"]
    assert out["seqs"] == list(range(200))
    assert max(out["batches"]) <= 64  # max_packets honoured
    assert sum(out["batches"]) == 200
    assert out["metrics"]["packets_read"] == 200
    assert out["metrics"]["packets_written"] == 200
    assert out["metrics"]["read_events"] <= len(out["batches"]) + 1
    assert out["metrics"]["write_errors"] == 0
    assert out["write_errors_after_bad"] == 1
    assert out["closed"]
    assert out["after_close_dropped"] == [0, 1]
    assert out["gone"]
    assert out["dual"] == ["10.98.0.1", "fd00:98::1"]
    assert out["dual_ipv6_on"]
    assert out["deleted_errors"] == [errno.EBADFD]
    assert out["deleted_read_events"] <= 2


# --- TunNode with fake devices (no root) ------------------------------------------------------------------


class FakeTun:
    """Stands in for `TunDevice`: `inject` is what the kernel would have routed into it; `written` what the
    node wrote to it."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.kwargs = kwargs
        self.written: list[bytes] = []
        self.on_batch: Callable[[list[bytes]], object] | None = None
        self.on_error: Callable[[OSError], object] | None = None
        self.closed = False
        self.reading = False
        self.events: list[str] = []
        self.arrived = asyncio.Event()

    def start_reading(
        self,
        on_batch: Callable[[list[bytes]], object],
        *,
        max_packets: int = 256,
        on_error: Callable[[OSError], object] | None = None,
    ) -> None:
        self.on_batch = on_batch
        self.on_error = on_error
        self.reading = True
        self.events.append("start_reading")

    def stop_reading(self) -> None:
        self.reading = False
        self.events.append("stop_reading")

    def inject(self, packets: list[bytes]) -> None:
        assert self.reading
        assert self.on_batch is not None
        self.on_batch(packets)

    def write_batch(self, packets: Iterable[bytes]) -> int:
        packets = list(packets)
        self.written += packets
        self.arrived.set()
        return len(packets)

    def close(self) -> None:
        if not self.closed:
            self.events.append("close")
        self.closed = True

    def metrics(self) -> TunMetrics:
        return TunMetrics(self.name, 0, 0, 0, 0, len(self.written), 0, 0, 0, 0, 0)


async def eventually(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _config(
    me: str,
    other: str,
    my_ip: str,
    other_ip: str,
    port: int,
    other_port: int,
    tmp: Path,
    tls: tuple[str, Any] | None = None,
) -> NodeConfig:
    peer: dict[str, Any] = {
        "id": other,
        "endpoint": f"127.0.0.1:{other_port}",
        "allowed_ips": [f"{other_ip}/32"],
    }
    data: dict[str, Any] = {
        "interface": {"name": f"tun-{me}", "address": f"{my_ip}/24", "mtu": 1400},
        "listen": {"address": f"127.0.0.1:{port}"},
        "node": {"id": me, "metrics_file": f"metrics-{me}.json", "shutdown_timeout": 3},
        "peers": [peer],
        "tuning": {"connect_timeout": 2},
    }
    if tls is not None:  # (mode, TestPki)
        mode, pki = tls
        data["tls"] = {"cert": str(pki.nodes[me].cert), "key": str(pki.nodes[me].key)}
        if mode == "ca":
            data["tls"]["ca"] = str(pki.ca_cert)
        else:
            peer["cert"] = str(pki.nodes[other].cert)
    return parse_config(data, base=tmp)


@pytest.mark.parametrize("tls", [None, "ca", "pinned"])
async def test_tun_nodes_over_loopback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str | None
) -> None:
    if tls is not None:
        from vpn_packet.testutil.certs import write_test_pki

        settings: tuple[str, Any] | None = (tls, write_test_pki(tmp_path / "pki", ["node-a", "node-b"]))
    else:
        settings = None
    port_a, port_b = _free_ports(2)
    tuns: dict[str, FakeTun] = {}

    def factory(name: str, **kwargs: Any) -> Any:
        tuns[name] = FakeTun(name, **kwargs)
        return tuns[name]

    a = TunNode(
        _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path, settings),
        tun_factory=factory,
    )
    b = TunNode(
        _config("node-b", "node-a", "10.8.0.2", "10.8.0.1", port_b, port_a, tmp_path, settings),
        tun_factory=factory,
    )
    await a.start()
    await b.start()
    try:
        assert a.running
        assert b.running
        assert (a.node.stream_service.ssl_context is not None) == (tls is not None)
        assert (b.node.receiver.ssl_context is not None) == (tls is not None)
        assert tuns["tun-node-a"].kwargs == {
            "address": ["10.8.0.1/24"],
            "mtu": 1400,
            "txqueuelen": 1000,
            "max_backlog": 4096,
        }
        good = [ipv4_packet("10.8.0.1", "10.8.0.2", UDP, 1000 + i, 53, bytes([i]) * 100) for i in range(50)]
        no_peer = ipv4_packet("10.8.0.1", "10.77.0.9", UDP, 1, 2, b"nowhere")
        tuns["tun-node-a"].inject([*good, no_peer])
        tun_b = tuns["tun-node-b"]
        async with asyncio.timeout(5):
            while len(tun_b.written) < 50:
                tun_b.arrived.clear()
                await tun_b.arrived.wait()
        assert tun_b.written == good

        # B answers; A gets it.
        reply = ipv4_packet("10.8.0.2", "10.8.0.1", ICMP, transport=icmp_echo(1, 1))
        tuns["tun-node-b"].inject([reply])
        await eventually(lambda: bool(tuns["tun-node-a"].written))
        assert tuns["tun-node-a"].written == [reply]

        # A packet whose source is B's address, sent by A: B refuses it.
        spoofed = ipv4_packet("10.8.0.2", "10.8.0.2", UDP, 9, 9, b"spoof")
        tuns["tun-node-a"].inject([spoofed])
        await eventually(lambda: b.metrics()["node"]["receiver"]["spoofed_dropped"] >= 1)
        assert tun_b.written == good

        with caplog.at_level(logging.WARNING, logger="vpn_packet.node"):
            assert b.log_drops() == {"receiver.spoofed_dropped": 1}
            assert b.log_drops() == {}  # nothing new: no second line
        assert sum("receiver.spoofed_dropped=1" in r.getMessage() for r in caplog.records) == 1
        await eventually(lambda: a.metrics()["node"]["dispatcher"]["failed"] >= 1)
        assert drop_counters(a.metrics())["failed.no_peer"] == 1

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
        await eventually(lambda: node.metrics()["node"]["dispatcher"]["failed"] == 1)
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


async def test_shutdown_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port_a, port_b = _free_ports(2)
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    node = TunNode(
        _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port_a, port_b, tmp_path), tun_factory=factory
    )
    await node.start()

    async def stuck(timeout: float | None = None) -> None:  # noqa: ASYNC109 - the signature it replaces
        await asyncio.sleep(60)

    monkeypatch.setattr(node.node, "stop_sending", stuck)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await node.shutdown(timeout=0.3) is False
    assert loop.time() - started < 2.0
    assert tuns[0].closed
    assert not node.node.receiver.running


async def test_start_failure_closes_the_tun(tmp_path: Path) -> None:
    (port,) = _free_ports(1)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    tuns: list[FakeTun] = []

    def factory(name: str, **kwargs: Any) -> Any:
        tuns.append(FakeTun(name, **kwargs))
        return tuns[-1]

    try:
        node = TunNode(
            _config("node-a", "node-b", "10.8.0.1", "10.8.0.2", port, port, tmp_path), tun_factory=factory
        )
        with pytest.raises(OSError, match=r"address already in use|Errno 98"):
            await node.start()
    finally:
        blocker.close()
    assert tuns[0].closed
