"""`PeerRoutes`: the routes through the node's TUN for the peers' prefixes (vpn_packet/node/routes.py).

- Planning (no root): prefixes inside the interface's subnets need no route, a default prefix becomes its
  halves, IPv6 prefixes on an IPv4-only interface are skipped, a destination wanted twice is one route.
- In a throwaway network namespace with a real TUN (root): routes added for outside prefixes (IPv4 and IPv6)
  and none for covered ones, `remove_all` removes exactly ours (idempotent, never raises), `apply` is
  idempotent and applies the difference on reload, a conflicting route through another device or via a
  gateway is one clear `ConfigError` with nothing half-applied, a route left through our own TUN is taken
  over, a gateway peer's 0.0.0.0/0 wins over the host's default route without touching it.

The namespace tests switch this test's thread into the namespace (`setns`) and back, so everything (the TUN,
pyroute2, `ip route`) runs here, with the namespace's routing table. Without root or /dev/net/tun they skip,
and fail instead when `CI=true`.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from vpn_packet.errors import ConfigError
from vpn_packet.node.routes import RTPROT_VPN_PACKET, PeerRoutes, RouteChanges, plan_routes
from vpn_packet.testutil.netns import skip_or_fail
from vpn_packet.transport.tun import TunDevice

HAVE_TUN = os.path.exists("/dev/net/tun")
IS_ROOT = os.geteuid() == 0
_CLONE_NEWNET = 0x40000000
TUN = "vpnp-rt0"
ADDRESSES = ("10.8.0.1/24", "fd00:8::1/64")


# --- planning (no root) -----------------------------------------------------------------------------------


def _planned(addresses: tuple[str, ...], peers: dict[str, list[str]]) -> dict[str, tuple[str, str, str]]:
    routes, _ = plan_routes(addresses, peers)
    return {str(d): (r.peer_id, r.prefix, r.key) for d, r in routes.items()}


def test_plan_routes_only_prefixes_outside_the_interface_subnets() -> None:
    peers = {
        "node-b": ["10.8.0.2/32", "10.99.0.0/16", "fd00:8::2/128"],
        "node-c": ["10.8.0.0/24", "10.0.0.0/8", "fd00:99::/64", "fd00:8::/64"],
    }
    assert _planned(ADDRESSES, peers) == {
        "10.99.0.0/16": ("node-b", "10.99.0.0/16", "peers[0].allowed_ips[1]"),
        "10.0.0.0/8": ("node-c", "10.0.0.0/8", "peers[1].allowed_ips[1]"),  # wider than the subnet
        "fd00:99::/64": ("node-c", "fd00:99::/64", "peers[1].allowed_ips[2]"),
    }


def test_plan_routes_default_prefix_becomes_its_halves() -> None:
    planned = _planned(ADDRESSES, {"gw": ["0.0.0.0/0", "::/0"]})
    assert planned == {
        "0.0.0.0/1": ("gw", "0.0.0.0/0", "peers[0].allowed_ips[0]"),
        "128.0.0.0/1": ("gw", "0.0.0.0/0", "peers[0].allowed_ips[0]"),
        "::/1": ("gw", "::/0", "peers[0].allowed_ips[1]"),
        "8000::/1": ("gw", "::/0", "peers[0].allowed_ips[1]"),
    }


def test_plan_routes_same_destination_twice_is_one_route_for_the_first_peer() -> None:
    planned = _planned(ADDRESSES, {"gw": ["0.0.0.0/0"], "half": ["0.0.0.0/1"]})
    assert planned["0.0.0.0/1"] == ("gw", "0.0.0.0/0", "peers[0].allowed_ips[0]")
    assert len(planned) == 2


def test_plan_routes_ipv6_on_an_ipv4_only_interface_is_skipped() -> None:
    routes, skipped = plan_routes(["10.8.0.1/24"], {"gw": ["0.0.0.0/0", "::/0"], "b": ["fd00:99::/64"]})
    assert sorted(str(d) for d in routes) == ["0.0.0.0/1", "128.0.0.0/1"]
    assert [(str(r.destination), r.peer_id, r.key) for r in skipped] == [
        ("::/0", "gw", "peers[0].allowed_ips[1]"),
        ("fd00:99::/64", "b", "peers[1].allowed_ips[0]"),
    ]


def test_plan_routes_bad_prefix_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^peers\[0\]\.allowed_ips\[1\]: '10\.0\.0\.300/8' is not an IP"):
        plan_routes(ADDRESSES, {"b": ["10.99.0.0/16", "10.0.0.300/8"]})


def test_route_changes_describe() -> None:
    assert not RouteChanges()
    assert not RouteChanges(skipped=("::/0",))
    changes = RouteChanges(added=("10.97.0.0/16",), removed=("10.98.0.0/16", "fd00:98::/64"))
    assert changes
    assert changes.describe() == "added 10.97.0.0/16; removed 10.98.0.0/16, fd00:98::/64"


def test_proto_is_not_one_the_kernel_or_iproute2_names() -> None:
    reserved = {0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 42, 99, 186, 187, 188, 189, 192}
    assert 4 < RTPROT_VPN_PACKET < 256
    assert RTPROT_VPN_PACKET not in reserved


# --- in a throwaway namespace (root) ----------------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """This thread inside a fresh network namespace for the test; back and the namespace deleted after."""
    if not HAVE_TUN:
        skip_or_fail("/dev/net/tun is missing")
    if not IS_ROOT:
        skip_or_fail("needs root (network namespace, TUN device, routes)")
    name = f"vpnp-routes-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        skip_or_fail(f"ip netns add fails: {result.stderr.strip()}")
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield name
        finally:
            _setns(original)
    finally:
        os.close(original)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def tun(netns: str) -> Iterator[TunDevice]:
    device = TunDevice.open(TUN, address=list(ADDRESSES))
    try:
        yield device
    finally:
        device.close()


def _routes(*selector: str, family: str = "-4") -> list[dict[str, Any]]:
    """`ip -j route show ...` in this namespace (the main table)."""
    return list(json.loads(_ip("-j", family, "route", "show", *selector) or "[]"))


def _ours(family: str = "-4") -> set[str]:
    """Destinations of the routes with our proto, all through our TUN."""
    found = _routes("proto", str(RTPROT_VPN_PACKET), family=family)
    assert all(r.get("dev") == TUN and "gateway" not in r for r in found), found
    return {r["dst"] for r in found}


def _other_device(name: str, address: str) -> None:
    """A veth pair `name` <-> `name`p, up, with `address` on `name`."""
    _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    _ip("addr", "add", address, "dev", name)
    _ip("link", "set", name, "up")
    _ip("link", "set", f"{name}p", "up")


def test_routes_added_for_outside_prefixes_and_removed(tun: TunDevice) -> None:
    routes = PeerRoutes(TUN, ADDRESSES)
    peers = {
        "node-b": ["10.8.0.2/32", "10.99.0.0/16", "fd00:8::2/128"],
        "node-c": ["10.98.0.0/16", "fd00:99::/64", "10.8.0.0/25"],
    }
    changes = routes.apply(peers)
    assert sorted(changes.added) == ["10.98.0.0/16", "10.99.0.0/16", "fd00:99::/64"]
    assert changes.removed == changes.taken_over == changes.skipped == ()
    assert _ours() == {"10.98.0.0/16", "10.99.0.0/16"}
    assert _ours("-6") == {"fd00:99::/64"}
    assert routes.routes == {"10.99.0.0/16": "node-b", "10.98.0.0/16": "node-c", "fd00:99::/64": "node-c"}
    # The kernel sends traffic for them into the TUN; a covered address goes by the connected route.
    assert "dev vpnp-rt0" in _ip("route", "get", "10.99.3.4")
    assert "dev vpnp-rt0" in _ip("-6", "route", "get", "fd00:99::7")
    assert {r["dst"] for r in _routes("dev", TUN)} == {"10.8.0.0/24", "10.98.0.0/16", "10.99.0.0/16"}

    assert not routes.apply(peers)  # idempotent: nothing to do

    removed = routes.remove_all()
    assert sorted(removed.removed) == ["10.98.0.0/16", "10.99.0.0/16", "fd00:99::/64"]
    assert removed.failed == ()
    assert _ours() == set()
    assert _ours("-6") == set()
    assert [r["dst"] for r in _routes("dev", TUN)] == ["10.8.0.0/24"]  # the connected route stays
    assert routes.remove_all() == RouteChanges()  # idempotent
    assert routes.routes == {}


def test_apply_on_reload_adds_new_and_removes_stale(tun: TunDevice) -> None:
    routes = PeerRoutes(TUN, ADDRESSES)
    routes.apply({"node-b": ["10.99.0.0/16", "fd00:99::/64"], "node-c": ["10.98.0.0/16"]})
    # node-c removed, node-d added, a prefix of node-b changed, one moved from node-b to node-d.
    changes = routes.apply(
        {"node-b": ["10.99.0.0/16", "10.96.0.0/16"], "node-d": ["fd00:99::/64", "10.97.0.0/16"]}
    )
    assert sorted(changes.added) == ["10.96.0.0/16", "10.97.0.0/16"]
    assert changes.removed == ("10.98.0.0/16",)
    assert _ours() == {"10.99.0.0/16", "10.96.0.0/16", "10.97.0.0/16"}
    assert _ours("-6") == {"fd00:99::/64"}
    assert routes.routes["fd00:99::/64"] == "node-d"
    assert sorted(routes.remove_all().removed) == [
        "10.96.0.0/16",
        "10.97.0.0/16",
        "10.99.0.0/16",
        "fd00:99::/64",
    ]


def test_conflicting_route_through_another_device_is_refused_with_nothing_applied(tun: TunDevice) -> None:
    _other_device("vpnp-eth0", "192.168.50.1/24")
    _ip("route", "add", "10.77.0.0/16", "via", "192.168.50.254")
    routes = PeerRoutes(TUN, ADDRESSES)
    routes.apply({"node-b": ["10.99.0.0/16"]})
    before = _routes()
    with pytest.raises(ConfigError) as info:
        routes.apply({"node-b": ["10.99.0.0/16", "10.96.0.0/16"], "node-c": ["fd00:98::/64", "10.77.0.0/16"]})
    assert str(info.value) == (
        "peers[1].allowed_ips[1]: 10.77.0.0/16 of peer 'node-c' needs the route 10.77.0.0/16 dev vpnp-rt0, "
        "but the route 10.77.0.0/16 via 192.168.50.254 dev vpnp-eth0 proto boot exists already: remove it "
        "or change allowed_ips"
    )
    assert info.value.key == "peers[1].allowed_ips[1]"
    assert "\n" not in str(info.value)
    assert _routes() == before  # nothing added (10.96.0.0/16), nothing removed, theirs untouched
    assert _ours("-6") == set()
    assert routes.routes == {"10.99.0.0/16": "node-b"}
    routes.remove_all()
    assert _routes("10.77.0.0/16") == [r for r in before if r["dst"] == "10.77.0.0/16"]


def test_conflicting_ipv6_route_and_device_route_are_refused(tun: TunDevice) -> None:
    _other_device("vpnp-eth0", "192.168.50.1/24")
    _ip("-6", "route", "add", "fd00:77::/64", "dev", "vpnp-eth0", "metric", "100")
    routes = PeerRoutes(TUN, ADDRESSES)
    with pytest.raises(
        ConfigError, match=r"^peers\[0\]\.allowed_ips\[0\]: fd00:77::/64 of peer 'node-b' "
    ) as info:
        routes.apply({"node-b": ["fd00:77::/64"]})
    assert "the route fd00:77::/64 dev vpnp-eth0 proto boot metric 100 exists already" in str(info.value)
    # A connected route of another interface is a conflict too.
    with pytest.raises(ConfigError, match=r"192\.168\.50\.0/24 dev vpnp-eth0 proto kernel exists already"):
        routes.apply({"node-b": ["192.168.50.0/24"]})
    # So is a blackhole; and the half of a default prefix names both.
    _ip("route", "add", "blackhole", "128.0.0.0/1")
    with pytest.raises(ConfigError) as info:
        routes.apply({"gw": ["0.0.0.0/0"]})
    assert str(info.value) == (
        "peers[0].allowed_ips[0]: 0.0.0.0/0 of peer 'gw' needs the route 128.0.0.0/1 (half of 0.0.0.0/0) dev "
        "vpnp-rt0, but the route blackhole 128.0.0.0/1 proto boot exists already: remove it or change "
        "allowed_ips"
    )
    assert _ours() == set()
    assert _ours("-6") == set()


def test_route_left_through_our_tun_is_taken_over(tun: TunDevice) -> None:
    _ip("route", "add", "10.99.0.0/16", "dev", TUN, "proto", str(RTPROT_VPN_PACKET))  # a crashed run's
    _ip("route", "add", "10.98.0.0/16", "dev", TUN)  # by hand (proto boot)
    _ip("route", "add", "10.95.0.0/16", "via", "10.8.0.2", "dev", TUN)  # by hand, with a gateway
    _ip("route", "add", "10.50.0.0/16", "dev", TUN, "proto", "static")  # not a peer's: never touched
    routes = PeerRoutes(TUN, ADDRESSES)
    changes = routes.apply({"node-b": ["10.99.0.0/16", "10.98.0.0/16", "10.97.0.0/16", "10.95.0.0/16"]})
    assert changes.added == ("10.97.0.0/16",)
    assert sorted(changes.taken_over) == ["10.95.0.0/16", "10.98.0.0/16", "10.99.0.0/16"]
    assert _ours() == {"10.99.0.0/16", "10.98.0.0/16", "10.97.0.0/16", "10.95.0.0/16"}
    assert len(_routes("10.98.0.0/16")) == len(_routes("10.95.0.0/16")) == 1  # replaced, not doubled
    removed = routes.remove_all().removed
    assert sorted(removed) == ["10.95.0.0/16", "10.97.0.0/16", "10.98.0.0/16", "10.99.0.0/16"]
    assert {r["dst"] for r in _routes("dev", TUN)} == {"10.8.0.0/24", "10.50.0.0/16"}


def test_remove_all_tolerates_routes_gone_and_never_raises(
    tun: TunDevice, caplog: pytest.LogCaptureFixture
) -> None:
    routes = PeerRoutes(TUN, ADDRESSES)
    routes.apply({"node-b": ["10.99.0.0/16", "10.98.0.0/16"]})
    _ip("route", "del", "10.98.0.0/16", "dev", TUN)  # by hand
    # A route removed under us comes back with the next apply.
    assert routes.apply({"node-b": ["10.99.0.0/16", "10.98.0.0/16"]}).added == ("10.98.0.0/16",)
    _ip("route", "del", "10.98.0.0/16", "dev", TUN)
    with caplog.at_level(logging.DEBUG, logger="vpn_packet.node.routes"):
        changes = routes.remove_all()
    assert changes.removed == ("10.99.0.0/16",)
    assert changes.failed == ()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # After the device is gone (the kernel removed its routes with it): nothing to do, no error.
    routes.apply({"node-b": ["10.99.0.0/16"]})
    tun.close()
    assert routes.remove_all() == RouteChanges()
    with pytest.raises(OSError, match="interface 'vpnp-rt0' is missing"):
        routes.apply({"node-b": ["10.99.0.0/16"]})


def test_gateway_peer_default_route_wins_without_touching_the_host_default(tun: TunDevice) -> None:
    _other_device("vpnp-eth0", "192.168.50.1/24")
    _ip("route", "add", "default", "via", "192.168.50.254")
    routes = PeerRoutes(TUN, ADDRESSES)
    changes = routes.apply({"gw": ["0.0.0.0/0", "::/0"]})
    assert sorted(changes.added) == ["0.0.0.0/1", "128.0.0.0/1", "8000::/1", "::/1"]
    assert "dev vpnp-rt0" in _ip("route", "get", "8.8.8.8")
    assert "dev vpnp-rt0" in _ip("route", "get", "200.1.2.3")
    assert "dev vpnp-eth0" in _ip("route", "get", "192.168.50.7")  # the LAN stays more specific
    assert "dev vpnp-rt0" in _ip("-6", "route", "get", "2001:db8::1")
    default = _routes("default")
    assert [(r.get("gateway"), r.get("dev")) for r in default] == [("192.168.50.254", "vpnp-eth0")]
    routes.remove_all()
    assert _routes("default") == default
    assert "dev vpnp-eth0" in _ip("route", "get", "8.8.8.8")


def test_ipv6_prefix_on_an_ipv4_only_interface_is_skipped_with_a_warning(
    netns: str, caplog: pytest.LogCaptureFixture
) -> None:
    with TunDevice.open(TUN, address="10.8.0.1/24"):
        routes = PeerRoutes(TUN, ["10.8.0.1/24"])
        with caplog.at_level(logging.WARNING, logger="vpn_packet.node.routes"):
            changes = routes.apply({"node-b": ["10.99.0.0/16", "fd00:99::/64"]})
            assert not routes.apply({"node-b": ["10.99.0.0/16", "fd00:99::/64"]})
        assert changes.added == ("10.99.0.0/16",)
        assert changes.skipped == ("fd00:99::/64",)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [  # once, not at every apply
            "peers[0].allowed_ips[1]: fd00:99::/64 of peer node-b gets no route: the interface vpnp-rt0 has "
            "no IPv6 address (interface.address), so IPv6 is off on it"
        ]
        routes.remove_all()


def test_apply_from_asyncio_code(tun: TunDevice) -> None:
    routes = PeerRoutes(TUN, ADDRESSES)

    async def main() -> tuple[RouteChanges, RouteChanges]:
        added = routes.apply({"node-b": ["10.99.0.0/16", "fd00:99::/64"]})
        return added, routes.remove_all()

    added, removed = asyncio.run(main())
    assert sorted(added.added) == sorted(removed.removed) == ["10.99.0.0/16", "fd00:99::/64"]
    assert _ours() == set()


def test_a_tun_node_adds_its_peers_routes_at_start_and_removes_them_at_shutdown(netns: str) -> None:
    """The wiring in `TunNode`: routes for prefixes outside the interface's subnet exist while it runs."""
    from vpn_packet.node.config import parse_config
    from vpn_packet.node.tun_node import TunNode

    config = parse_config(
        {
            "interface": {"name": TUN, "address": list(ADDRESSES)},
            # The fresh namespace's loopback is down; its only address is the TUN's (and no port is taken).
            "listen": {"address": "10.8.0.1:7000"},
            "node": {"id": "node-a", "insecure": True},
            "peers": [
                {"id": "node-b", "endpoint": "192.0.2.2:7000", "allowed_ips": ["10.8.0.2/32", "10.99.0.0/16"]}
            ],
        }
    )

    async def main() -> tuple[set[str], set[str]]:
        node = TunNode(config)
        await node.start()
        try:
            running = _ours()
        finally:
            await node.shutdown()
        return running, _ours()

    running, after = asyncio.run(main())
    assert running == {"10.99.0.0/16"}  # 10.8.0.2/32 is inside the interface's own 10.8.0.0/24
    assert after == set()


def test_affects_says_when_a_change_can_change_the_routes() -> None:
    """Issue 21: discovery skips `apply` (which plans from every peer) when no route can change."""
    routes = PeerRoutes("vpnp-none", ["10.8.0.1/24", "fd00:8::1/64"])
    assert not routes.affects({"m1": ["10.8.0.7/32"], "m2": ["fd00:8::9/128"]})
    assert not routes.affects({}, removed=["m1"])
    assert routes.affects({"gw": ["10.8.0.7/32", "192.168.0.0/16"]})
    assert routes.affects({"gw": ["0.0.0.0/0"]})
    routes._routes = plan_routes(routes.interface_addresses, {"gw": ["192.168.0.0/16"]})[0]  # as if applied
    assert routes.affects({}, removed=["gw"])
    assert routes.affects({"gw": ["10.8.0.9/32"]})  # its route must go
    assert not routes.affects({"m1": ["10.8.0.7/32"]}, removed=["m2"])
