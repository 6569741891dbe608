"""The TUN device, `TunDevice` (the node around it: tests/node/test_tun_node.py).

- Errors without root or without /dev/net/tun are clear (`PermissionError` / `FileNotFoundError`).
- In a throwaway network namespace (root): the interface comes up with its address, MTU and txqueuelen; echo
  requests written to the TUN come back as the kernel's replies, read in batches on readiness events;
  `close()` is idempotent and removes the interface; a device deleted under the reader stops the reading.

Tests needing /dev/net/tun or root skip (with the reason) without them, and fail instead when `CI=true`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.testutil.netns import skip_or_fail
from vpn_packet.transport.tun import TunDevice

HAVE_TUN = os.path.exists("/dev/net/tun")
IS_ROOT = os.geteuid() == 0


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"the TUN device is missing: no TUN driver here") as info:
        TunDevice.open("vpnp0", address="10.99.0.1/24", path=str(tmp_path / "no-tun"))
    assert info.value.filename == str(tmp_path / "no-tun")


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


def test_not_root_is_a_clear_error() -> None:
    if not HAVE_TUN:
        skip_or_fail("/dev/net/tun is missing")
    text = _open_unprivileged()
    assert text.startswith("PermissionError: "), text
    assert "needs root or CAP_NET_ADMIN" in text


# --- a real TUN in a throwaway namespace ------------------------------------------------------------------

_IN_NAMESPACE = textwrap.dedent(
    """
    import asyncio, json, os, subprocess
    from pyroute2 import IPRoute
    from vpn_packet.testutil.faketun import split_packets
    from vpn_packet.testutil.packets import ICMP, icmp_echo, ipv4_packet
    from vpn_packet.transport.tun import BufferReader, TunDevice

    N = 200
    out = {}
    tun = TunDevice.open("vpnp-t0", address=["10.99.0.1/24"], mtu=1400, txqueuelen=5000)
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
    out["empty_read"] = [len(part) for part in tun.read_buffer()]
    requests = [ipv4_packet("10.99.0.2", "10.99.0.1", ICMP, transport=icmp_echo(7, seq, b"x" * 56))
                for seq in range(N)]

    async def main():
        replies, batches = [], []
        done = asyncio.Event()
        def on_batch(data, lengths):
            packets = split_packets(data, lengths)
            batches.append(len(packets))
            replies.extend(packets)
            if len(replies) >= N:
                done.set()
        tun.start_reading(BufferReader(on_batch), max_packets=64)
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
        dead.start_reading(BufferReader(lambda data, lengths: None), on_error=on_error)
        subprocess.run(["ip", "link", "del", "vpnp-td"], check=True)
        await asyncio.wait_for(failed.wait(), 5)  # a hang guard
        events = dead.read_events
        # The reader is off the loop (remove_reader finds nothing to remove), so the dead descriptor, which
        # polls readable forever, wakes nobody: 100 loop iterations (each polls the descriptors) add no event.
        still_registered = asyncio.get_running_loop().remove_reader(dead.fd)
        for _ in range(100):
            await asyncio.sleep(0)
        return errors, still_registered, dead.read_events - events

    deleted_result = asyncio.run(deleted())
    out["deleted_errors"], out["deleted_still_registered"], out["deleted_events_after"] = deleted_result
    out["deleted_read_events"] = dead.read_events
    dead.close()
    print(json.dumps(out))
    """
)


@pytest.fixture
def netns() -> Iterator[str]:
    if not HAVE_TUN:
        skip_or_fail("/dev/net/tun is missing")
    if not IS_ROOT:
        skip_or_fail("needs root (network namespace)")
    name = f"vpnp-tun-test-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        skip_or_fail(f"ip netns add fails: {result.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _run_in(netns: str, script: str) -> dict[str, Any]:
    """Runs `script` in the namespace; its last stdout line is its findings, as JSON."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_real_tun_round_trip(netns: str) -> None:
    out = _run_in(netns, _IN_NAMESPACE)
    assert out["mtu"] == 1400
    assert out["txqlen"] == 5000
    assert out["flags_up"]
    assert out["addresses"] == ["10.99.0.1"]
    assert out["ipv6_disabled"]
    assert out["empty_read"] == [0, 0]
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
    assert out["deleted_still_registered"] is False
    assert out["deleted_events_after"] == 0
    assert out["deleted_read_events"] <= 2


_KERNEL_COUNTERS = textwrap.dedent(
    """
    import json, socket
    from vpn_packet.testutil.packets import ICMP, icmp_echo, ipv4_packet
    from vpn_packet.transport.tun import TunDevice

    out = {}
    # A device queue of 16 that nobody reads: the kernel drops the rest, and only its own counters know.
    tun = TunDevice.open("vpnp-k0", address=["10.96.0.1/24"], mtu=1400, txqueuelen=16)
    out["before"] = tun.kernel_counters()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(200):
        udp.sendto(b"x" * 100, ("10.96.0.2", 9000))
    data, lengths = tun.read_buffer(max_packets=1000)
    out["read"] = len(lengths) // 4
    out["after"] = tun.kernel_counters()
    tun.close()
    out["closed"] = tun.kernel_counters()
    # Offloads: the kernel grants them, and every read carries a virtio header (all zero for a plain packet).
    off = TunDevice.open("vpnp-k1", address=["10.95.0.1/24"], mtu=1400, offload=True)
    out["offloads"] = off.offloads
    off.write_batch([ipv4_packet("10.95.0.2", "10.95.0.1", ICMP, transport=icmp_echo(7, 1, b"x" * 56))])
    import select
    select.select([off.fd], [], [], 5)
    data, lengths = off.read_buffer()
    out["vnet_read"] = [len(lengths) // 4, list(data[:10]), data[10] >> 4, data[10 + 20]]
    off.close()
    print(json.dumps(out))
    """
)


def test_kernel_counters_and_offloads(netns: str) -> None:
    """What the kernel dropped on our device is read from its own counters (a summary must never say
    `drops: none` while it dropped); offloads are granted and reads carry their virtio header."""
    out = _run_in(netns, _KERNEL_COUNTERS)
    assert out["before"] == {"rx_errors": 0, "rx_dropped": 0, "tx_errors": 0, "tx_dropped": 0}
    # Every datagram is accounted for: read by us, or dropped by the kernel at the device queue.
    assert out["read"] + out["after"]["tx_dropped"] == 200
    assert out["after"]["tx_dropped"] > 0
    # The device is gone with its descriptor, but its counters were read at the close: an exit summary
    # written after it still has every drop.
    assert out["closed"] == out["after"]
    assert "tso4" in out["offloads"].split()
    count, header, version, icmp_type = out["vnet_read"]
    assert (count, header, version, icmp_type) == (1, [0] * 10, 4, 0)  # the echo reply, plain
