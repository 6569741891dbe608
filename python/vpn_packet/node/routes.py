"""Routes through the node's TUN for the peers' prefixes (issue 12, item 3).

    routes = PeerRoutes("vpn0", ["10.8.0.1/24"])                # plans nothing yet
    changes = routes.apply({"node-b": ["10.99.0.0/16"]})         # adds what is missing, removes what is stale
    routes.apply({...})                                          # on reload: the difference only
    routes.remove_all()                                          # at shutdown: idempotent, never raises

What gets a route: every peer prefix that the interface's own subnets do not cover. `10.8.0.2/32` on an
interface `10.8.0.1/24` needs none (the kernel's connected route `10.8.0.0/24 dev vpn0` covers it);
`10.99.0.0/16` and `10.0.0.0/8` (wider than the subnet: the connected route stays the more specific) do.
IPv4 and IPv6 alike. An IPv6 prefix on an interface without an IPv6 address gets no route: `TunDevice`
turns IPv6 off on such an interface, so the kernel refuses one (EACCES). It is logged at WARNING and listed
in `RouteChanges.skipped`, not an error, so that a WireGuard-style `allowed_ips = ["0.0.0.0/0", "::/0"]`
keeps working on an IPv4-only interface.

A default route as a peer prefix (a gateway peer: `0.0.0.0/0`, `::/0`) becomes its two halves,
`0.0.0.0/1` + `128.0.0.0/1` (`::/1` + `8000::/1`), as OpenVPN's `redirect-gateway def1` and wg-quick do: more
specific than the host's default route, so they win without replacing or deleting it, and the host's
default route is back untouched when the node stops. The halves would also capture the underlay traffic to
the peers; the configuration refuses a peer prefix that contains a peer's endpoint (`peers[i].allowed_ips`
against `peers[k].endpoint`), so with IP endpoints that cannot happen. (A peer endpoint given as a host
name is only resolved when connecting: it needs a host route of its own through the underlay.)

Ownership: every route is added to the main table with `proto` `RTPROT_VPN_PACKET` and the TUN as its only
device; removing one names that protocol and device, so the node only ever removes routes it added (the
kernel matches both). `remove_all` removes exactly the routes of this object.

Conflicts: before changing anything `apply` dumps the main table. A route for the same prefix through
another device, via a gateway, or of another type (blackhole, unreachable, ...) is a `ConfigError` naming
the configuration key, the prefix, the peer and the existing route as `ip route` shows it; nothing is
changed then (the routes of the previous `apply` stay as they were). A route for the same prefix through our
own TUN alone (left by an earlier run, or added by hand, with a gateway or not) is taken over: replaced by
ours, so it is removed with the others. Only exact prefixes conflict: a more specific host route inside a
peer prefix (a LAN inside a gateway peer's 0.0.0.0/0) is the usual case and stays more specific. If adding
a route fails midway, the routes added by that call are removed again before the error is raised.

pyroute2's synchronous `IPRoute` runs an event loop of its own: called from asyncio code the netlink work
runs in a short-lived thread (as `vpn_packet.transport.tun` configures the device).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from vpn_packet.errors import ConfigError
from vpn_packet.tuning import prefix_bounds

__all__ = ["RTPROT_VPN_PACKET", "PeerRoutes", "PlannedRoute", "RouteChanges", "plan_routes"]

_log = logging.getLogger(__name__)

# The `proto` (rtm_protocol) of every route the node adds. The kernel interprets only 0..4 (unspec,
# redirect, kernel, boot, static) and passes higher values through untouched; the others are names given
# to routing daemons in <linux/rtnetlink.h> and iproute2's /etc/iproute2/rt_protos (8 gated ... 18
# keepalived, 42 babel, 99 openr, 186..192 bgp/isis/ospf/rip/eigrp). 86 ("V") is none of them. With
# `echo "86 vpn-packet" >> /etc/iproute2/rt_protos`, `ip route` shows `proto vpn-packet`;
# `ip route show proto 86` lists the node's routes.
RTPROT_VPN_PACKET: Final = 86

_MAIN_TABLE: Final = 254  # RT_TABLE_MAIN
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_NOWHERE: Final = 255  # in a delete request: any scope (otherwise IPv4 matches scope 0 only)
_RTN_UNICAST: Final = 1
_TYPE_NAMES: Final = {2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
                      7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}  # fmt: skip
_PROTO_NAMES: Final = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
                       10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk",
                       16: "dhcp", 17: "mrouted", 18: "keepalived", 42: "babel", 99: "openr", 186: "bgp",
                       187: "isis", 188: "ospf", 189: "rip", 192: "eigrp",
                       RTPROT_VPN_PACKET: "vpn-packet"}  # fmt: skip
_NEEDS_ROOT: Final = "needs root or CAP_NET_ADMIN"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    """One route through the TUN: `destination`, for `prefix` of peer `peer_id`, configured at `key`
    (`peers[1].allowed_ips[0]`). A default prefix gives two of them (its halves)."""

    destination: Network
    peer_id: str
    prefix: str
    key: str


@dataclass(frozen=True, slots=True)
class RouteChanges:
    """What one `apply` (or `remove_all`) did; destinations as text (`"10.99.0.0/16"`)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    taken_over: tuple[str, ...] = ()  # existed through our TUN already (an earlier run): now ours
    skipped: tuple[str, ...] = ()  # IPv6 prefixes on an interface without IPv6 (warned)
    failed: tuple[str, ...] = ()  # `remove_all` could not remove them (warned)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.taken_over)

    def describe(self) -> str:
        """`added 10.99.0.0/16; removed 10.98.0.0/16` (empty when nothing changed)."""
        parts = [
            f"{label} {', '.join(items)}"
            for label, items in (
                ("added", self.added),
                ("taken over", self.taken_over),
                ("removed", self.removed),
                ("skipped", self.skipped),
                ("not removed", self.failed),
            )
            if items
        ]
        return "; ".join(parts)


def _halves(network: Network) -> list[Network]:
    if network.prefixlen:
        return [network]
    return list(network.subnets(prefixlen_diff=1))


def plan_routes(
    interface_addresses: Iterable[str], peers: Mapping[str, Iterable[str]]
) -> tuple[dict[Network, PlannedRoute], list[PlannedRoute]]:
    """The routes the peers' prefixes need, without touching the system: `(routes, skipped)`.

    `peers` maps each peer id to its prefixes, in the configuration's order (`key` is computed from the
    positions: `peers[i].allowed_ips[j]`). A prefix inside one of the interface's own subnets needs no route;
    a default prefix becomes its two halves; a destination wanted twice (`0.0.0.0/0` of one peer and
    `0.0.0.0/1` of another) is one route, planned for the first. `skipped`: IPv6 prefixes when the interface
    has no IPv6 address. Raises `ConfigError` for a prefix that is not one."""
    own = [ipaddress.ip_interface(a).network for a in interface_addresses]
    ipv6 = any(n.version == 6 for n in own)
    # The subnets as integers: a prefix inside one (most of a large mesh's) is skipped without being parsed
    # into an `ipaddress` network, which would be most of a 10,000-peer node's start.
    subnets = [(n.version, int(n.network_address), int(n.broadcast_address)) for n in own]
    routes: dict[Network, PlannedRoute] = {}
    skipped: list[PlannedRoute] = []
    for i, (peer_id, prefixes) in enumerate(peers.items()):
        for j, prefix in enumerate(prefixes):
            try:
                version, first, last = prefix_bounds(prefix)
            except ValueError:
                pass  # not normalised (or not a prefix): ip_network below says which
            else:
                if any(v == version and lo <= first and last <= hi for v, lo, hi in subnets):
                    continue  # the connected route of the interface's subnet covers it
            key = f"peers[{i}].allowed_ips[{j}]"
            try:
                network = ipaddress.ip_network(prefix)
            except ValueError:
                raise ConfigError(key, f"{prefix!r} is not an IP prefix") from None
            if any(n.version == network.version and network.subnet_of(n) for n in own):  # type: ignore[arg-type]
                continue  # the connected route of the interface's subnet covers it
            if network.version == 6 and not ipv6:
                skipped.append(PlannedRoute(network, peer_id, str(network), key))
                continue
            for destination in _halves(network):
                routes.setdefault(destination, PlannedRoute(destination, peer_id, str(network), key))
    return routes, skipped


class PeerRoutes:
    """The routes through TUN `ifname` for the peers' prefixes; see the module docstring.

    `interface_addresses`: the interface's own addresses with their prefix length (`InterfaceConfig.
    addresses`); prefixes inside their subnets need no route. `proto`: the routes' protocol number (tests
    may use another to keep apart from a node running on the same host)."""

    def __init__(
        self, ifname: str, interface_addresses: Iterable[str], *, proto: int = RTPROT_VPN_PACKET
    ) -> None:
        self.ifname = ifname
        self.interface_addresses = tuple(interface_addresses)
        self.proto = proto
        self._routes: dict[Network, PlannedRoute] = {}
        self._warned_skipped: set[Network] = set()

    @property
    def routes(self) -> dict[str, str]:
        """The routes this object added and has not removed: destination -> peer id."""
        return {str(d): r.peer_id for d, r in self._routes.items()}

    def apply(self, peers: Mapping[str, Iterable[str]]) -> RouteChanges:
        """Makes the routes those of `peers` (peer id -> prefixes, in the configuration's order, e.g.
        `{p.id: p.allowed_ips for p in config.peers}`): adds the missing routes, then removes those no
        peer needs any more. Idempotent; returns what it did (nothing on a second call).

        Raises `ConfigError` (one line: key, prefix, peer, the existing route) for a conflicting route, with
        nothing changed; `PermissionError` without root/`CAP_NET_ADMIN`; `OSError` when the interface is
        missing or the kernel refuses a route (the routes added by this call are removed again)."""
        wanted, skipped = plan_routes(self.interface_addresses, peers)
        for route in skipped:
            if route.destination not in self._warned_skipped:
                self._warned_skipped.add(route.destination)
                _log.warning(
                    "%s: %s of peer %s gets no route: the interface %s has no IPv6 address "
                    "(interface.address), so IPv6 is off on it",
                    route.key,
                    route.prefix,
                    route.peer_id,
                    self.ifname,
                )
        if not wanted and not self._routes:  # nothing to add, nothing of ours to remove: no netlink at all
            return RouteChanges(skipped=tuple(str(r.destination) for r in skipped))
        changes = _in_thread_if_async(self._apply_sync, wanted)
        changes = RouteChanges(
            changes.added, changes.removed, changes.taken_over, tuple(str(r.destination) for r in skipped)
        )
        if changes:
            _log.info("routes through %s: %s", self.ifname, changes.describe())
        return changes

    def affects(self, changed: Mapping[str, Iterable[str]], removed: Iterable[str] = ()) -> bool:
        """Whether a peer-set change can change the routes: a changed peer (id -> its new prefixes) has a
        prefix outside the interface's subnets, or a changed or removed peer owns a route now. False lets a
        caller skip `apply` (which plans from every peer): a mesh member with a /32 inside the tunnel's subnet
        joins and leaves at a cost that does not grow with the number of peers."""
        own = [ipaddress.ip_interface(a).network for a in self.interface_addresses]
        owners = {route.peer_id for route in self._routes.values()}
        if any(peer_id in owners for peer_id in (*changed, *removed)):
            return True
        for prefixes in changed.values():
            for prefix in prefixes:
                network = ipaddress.ip_network(prefix)
                if not any(n.version == network.version and network.subnet_of(n) for n in own):  # type: ignore[arg-type]
                    return True
        return False

    def remove_all(self) -> RouteChanges:
        """Removes every route this object added. Idempotent; never raises: a route it cannot remove is
        logged at WARNING and listed in `failed` (one already gone, with its device or by hand, is not)."""
        if not self._routes:
            return RouteChanges()
        try:
            changes = _in_thread_if_async(self._remove_all_sync)
        except Exception as exc:  # the netlink socket itself: nothing more to do at shutdown
            failed = tuple(str(d) for d in self._routes)
            _log.warning("routes through %s: cannot remove %s: %s", self.ifname, ", ".join(failed), exc)
            self._routes.clear()
            return RouteChanges(failed=failed)
        if changes.removed:
            _log.info("routes through %s: %s", self.ifname, changes.describe())
        return changes

    # --- netlink (synchronous) ------------------------------------------------------------------------------

    def _apply_sync(self, wanted: dict[Network, PlannedRoute]) -> RouteChanges:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

        with IPRoute() as ipr:
            index = self._index(ipr)
            existing = _existing_routes(ipr, {d.version for d in wanted})
            to_add: list[PlannedRoute] = []
            to_take: list[PlannedRoute] = []
            for destination, route in wanted.items():
                found = existing.get(destination, [])
                others = [m for m in found if not _through_only(m, index)]
                if others:
                    raise _conflict(ipr, route, self.ifname, others[0])
                if destination in self._routes:
                    if not found:  # removed under us (by hand): put it back
                        to_add.append(route)
                    continue
                (to_take if found else to_add).append(route)
            stale = [d for d in self._routes if d not in wanted]
            added: list[PlannedRoute] = []
            taken: list[PlannedRoute] = []
            current: PlannedRoute | None = None
            try:
                for current in to_add:
                    try:
                        self._route(ipr, "add", current.destination, index)
                        added.append(current)
                    except NetlinkError as exc:
                        if int(exc.code) != errno.EEXIST:
                            raise
                        # It appeared since the dump: a conflict, or ours to take over.
                        again = _existing_routes(ipr, {current.destination.version})
                        found = again.get(current.destination, [])
                        others = [m for m in found if not _through_only(m, index)]
                        if others:
                            raise _conflict(ipr, current, self.ifname, others[0]) from None
                        to_take.append(current)
                for current in to_take:
                    self._route(ipr, "replace", current.destination, index)
                    taken.append(current)
            except BaseException as exc:
                for done in added:
                    self._delete(ipr, done.destination, index, warn=True)
                if isinstance(exc, NetlinkError) and current is not None:
                    what = (
                        f"{current.key}: adding the route {current.destination} for peer {current.peer_id!r}"
                    )
                    raise self._os_error(exc, what) from None
                raise
            removed: list[str] = []
            kept: dict[Network, PlannedRoute] = {}
            for destination in stale:
                if self._delete(ipr, destination, index, warn=True):
                    removed.append(str(destination))
                elif _route_exists(ipr, destination, index, self.proto):
                    kept[destination] = self._routes[destination]  # warned; remove_all tries again
        self._routes = {**wanted, **kept}
        return RouteChanges(
            added=tuple(str(r.destination) for r in added),
            removed=tuple(removed),
            taken_over=tuple(str(r.destination) for r in taken),
        )

    def _remove_all_sync(self) -> RouteChanges:
        from pyroute2 import IPRoute

        removed: list[str] = []
        failed: list[str] = []
        with IPRoute() as ipr:
            links: Any = ipr.link_lookup(ifname=self.ifname)
            if not links:  # the device is gone, and the kernel removed its routes with it
                _log.debug("routes through %s: the interface is gone, so are its routes", self.ifname)
                self._routes.clear()
                return RouteChanges()
            index = int(links[0])
            for destination in list(self._routes):
                if self._delete(ipr, destination, index, warn=True):
                    removed.append(str(destination))
                elif _route_exists(ipr, destination, index, self.proto):
                    failed.append(str(destination))
        self._routes.clear()
        return RouteChanges(removed=tuple(removed), failed=tuple(failed))

    def _index(self, ipr: Any) -> int:
        links: Any = ipr.link_lookup(ifname=self.ifname)
        if not links:
            raise OSError(errno.ENODEV, f"interface {self.ifname!r} is missing: no routes through it")
        return int(links[0])

    def _route(self, ipr: Any, command: str, destination: Network, index: int) -> None:
        kwargs: dict[str, Any] = {
            "family": socket.AF_INET if destination.version == 4 else socket.AF_INET6,
            "dst": str(destination.network_address),
            "dst_len": destination.prefixlen,
            "oif": index,
            "proto": self.proto,
            "table": _MAIN_TABLE,
            "type": _RTN_UNICAST,
        }
        if destination.version == 4:
            kwargs["scope"] = _RT_SCOPE_LINK  # as `ip route add ... dev vpn0`: no gateway
        ipr.route(command, **kwargs)

    def _delete(self, ipr: Any, destination: Network, index: int, *, warn: bool) -> bool:
        """Deletes our route (our proto, our device only); True when deleted, False when it was gone or the
        kernel refused (logged at WARNING when `warn`)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            ipr.route(
                "del",
                family=socket.AF_INET if destination.version == 4 else socket.AF_INET6,
                dst=str(destination.network_address),
                dst_len=destination.prefixlen,
                oif=index,
                proto=self.proto,
                table=_MAIN_TABLE,
                scope=_RT_SCOPE_NOWHERE,
            )
        except NetlinkError as exc:
            code = int(exc.code)
            if code in (errno.ESRCH, errno.ENODEV, errno.ENOENT):  # already gone
                _log.debug("route %s dev %s was gone already", destination, self.ifname)
            elif warn:
                _log.warning(
                    "cannot remove the route %s dev %s: %s", destination, self.ifname, os.strerror(code)
                )
            return False
        return True

    def _os_error(self, exc: Any, what: str) -> OSError:
        code = int(exc.code)
        if code == errno.EPERM:
            return PermissionError(code, f"{what} through {self.ifname} {_NEEDS_ROOT}")
        return OSError(code, f"{what} through {self.ifname}: {os.strerror(code)}")

    def __repr__(self) -> str:
        return f"<PeerRoutes {self.ifname} routes={len(self._routes)} proto={self.proto}>"


# --- helpers ----------------------------------------------------------------------------------------------


def _in_thread_if_async(function: Callable[..., _T], *args: Any) -> _T:
    """`function(*args)`, in a short-lived thread when an event loop runs in this one (pyroute2's
    synchronous API runs its own loop, which it cannot do inside a running one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return function(*args)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peer-routes") as pool:
        return pool.submit(function, *args).result()


def _existing_routes(ipr: Any, versions: set[int]) -> dict[Network, list[Any]]:
    """The main table's routes of those IP versions, by destination."""
    found: dict[Network, list[Any]] = {}
    for version in sorted(versions):
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        for msg in ipr.route("dump", family=family, table=_MAIN_TABLE):
            if _table(msg) != _MAIN_TABLE:
                continue
            dst = msg.get("dst") or ("0.0.0.0" if version == 4 else "::")
            try:
                network = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
            except ValueError:
                continue
            found.setdefault(network, []).append(msg)
    return found


def _route_exists(ipr: Any, destination: Network, index: int, proto: int) -> bool:
    routes = _existing_routes(ipr, {destination.version}).get(destination, [])
    return any(m["proto"] == proto and _through_only(m, index) for m in routes)


def _table(msg: Any) -> int:
    table = msg.get("table")
    return int(table if table is not None else msg["table"])


def _through_only(msg: Any, index: int) -> bool:
    """Whether the route is a unicast route through device `index` alone (with a gateway or not: on a TUN,
    a point-to-point device, the gateway changes nothing)."""
    return msg["type"] == _RTN_UNICAST and msg.get("oif") == index and msg.get("multipath") is None


def _conflict(ipr: Any, route: PlannedRoute, ifname: str, existing: Any) -> ConfigError:
    wanted = str(route.destination)
    if str(route.destination) != route.prefix:
        wanted = f"{route.destination} (half of {route.prefix})"
    return ConfigError(
        route.key,
        f"{route.prefix} of peer {route.peer_id!r} needs the route {wanted} dev {ifname}, but the route "
        f"{_describe(ipr, existing)} exists already: remove it or change allowed_ips",
    )


def _describe(ipr: Any, msg: Any) -> str:
    """A route as `ip route` shows it: `[type] DST [via GW] [dev NAME] proto P [metric N]`."""
    names: dict[int, str] = {}
    try:
        for link in ipr.get_links():
            names[int(link["index"])] = str(link.get("ifname"))
    except Exception:  # pragma: no cover - only the names are missing then
        pass

    def dev(index: Any) -> str:
        return names.get(int(index), f"if{index}")

    family_default = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
    words: list[str] = []
    if msg["type"] != _RTN_UNICAST:
        words.append(_TYPE_NAMES.get(int(msg["type"]), f"type {msg['type']}"))
    words.append(f"{msg.get('dst') or family_default}/{msg['dst_len']}")
    if msg.get("gateway") is not None:
        words.append(f"via {msg.get('gateway')}")
    if msg.get("oif") is not None:
        words.append(f"dev {dev(msg.get('oif'))}")
    for hop in msg.get("multipath") or ():
        words.append("nexthop")
        if hop.get("gateway") is not None:
            words.append(f"via {hop.get('gateway')}")
        words.append(f"dev {dev(hop['oif'])}")
    proto = int(msg["proto"])
    words.append(f"proto {_PROTO_NAMES.get(proto, str(proto))}")
    if msg.get("priority") is not None:
        words.append(f"metric {msg.get('priority')}")
    return " ".join(words)
