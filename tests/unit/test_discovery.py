"""Static peer discovery and the native longest-prefix-match table."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet._native import PrefixTable, filter_sources
from vpn_packet.api import PeerDiscovery
from vpn_packet.errors import PeerNotFoundError
from vpn_packet.testutil.packets import ipv4_packet, ipv6_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery, parse_endpoint

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def naive_lookup(entries: list[tuple[Net, int]], ip: str) -> int | None:
    addr = ipaddress.ip_address(ip)
    best: tuple[int, int] | None = None
    for net, value in entries:
        if addr.version == net.version and addr in net and (best is None or net.prefixlen >= best[0]):
            best = (net.prefixlen, value)
    return None if best is None else best[1]


def test_longest_prefix_wins_with_overlaps() -> None:
    table = PrefixTable()
    for prefix, value in [
        ("0.0.0.0/0", 0),
        ("10.0.0.0/8", 1),
        ("10.1.0.0/16", 2),
        ("10.1.2.3/32", 3),
        ("::/0", 10),
        ("2001:db8::/32", 11),
        ("2001:db8::1/128", 12),
    ]:
        assert table.insert(prefix, value) is None
    assert len(table) == 7
    assert "7 prefixes" in repr(table)
    expected = {
        "192.0.2.1": 0,
        "10.200.0.1": 1,
        "10.1.9.9": 2,
        "10.1.2.3": 3,
        "10.1.2.4": 2,
        "2001:db8::1": 12,
        "2001:db8::2": 11,
        "2001:db9::": 10,
        "::ffff:10.1.2.3": 10,  # IPv4-mapped: an IPv6 address, matched against IPv6 prefixes
    }
    for ip, value in expected.items():
        assert table.lookup(ip) == value, ip
        assert table.lookup(ipaddress.ip_address(ip).packed) == value, ip
    assert table.lookup_prefix("10.1.2.4") == (16, 2)
    assert table.insert("10.0.0.0/8", 5) == 1  # replaces
    assert table.remove("10.0.0.0/8") == 5
    assert table.lookup("10.200.0.1") == 0


def test_empty_table_and_separate_families() -> None:
    table = PrefixTable()
    assert table.lookup("1.2.3.4") is None
    table.insert("10.0.0.0/8", 1)
    assert table.lookup("::a00:1") is None
    assert table.lookup("11.0.0.0") is None


def test_host_bits_are_refused_unless_not_strict() -> None:
    table = PrefixTable()
    with pytest.raises(ValueError, match="host bits"):
        table.insert("10.0.0.1/8", 1)
    assert table.insert("10.0.0.1/8", 1, strict=False) is None
    assert table.lookup("10.9.9.9") == 1
    for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "nonsense", "10.0.0.0/"]:
        with pytest.raises(ValueError, match="prefix"):
            table.insert(bad, 1)
    with pytest.raises(ValueError, match="not an IP address"):
        table.lookup("not-an-ip")
    with pytest.raises(ValueError, match="4 or 16 bytes"):
        table.lookup(b"\x01\x02\x03")
    with pytest.raises(OverflowError):
        table.insert("10.0.0.0/8", -1)


def _networks() -> st.SearchStrategy[Net]:
    v4 = st.builds(
        lambda hi, length: ipaddress.IPv4Network(((hi << 28) & (~0 << (32 - length)) & 0xFFFFFFFF, length)),
        st.integers(0, 15),
        st.integers(0, 32),
    )
    v6 = st.builds(
        lambda hi, length: ipaddress.IPv6Network(
            ((hi << 124) & (((1 << 128) - 1) << (128 - length)), length)
        ),
        st.integers(0, 15),
        st.integers(0, 128),
    )
    return st.one_of(v4, v6)


def _addresses() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(
            lambda hi, lo: str(ipaddress.IPv4Address((hi << 28) | lo)),
            st.integers(0, 15),
            st.integers(0, 255),
        ),
        st.builds(
            lambda hi, lo: str(ipaddress.IPv6Address((hi << 124) | lo)),
            st.integers(0, 15),
            st.integers(0, 255),
        ),
    )


@given(st.lists(st.tuples(_networks(), st.integers(0, 7)), max_size=40), st.lists(_addresses(), max_size=30))
def test_matches_a_naive_scan(entries: list[tuple[Net, int]], addresses: list[str]) -> None:
    table = PrefixTable()
    for net, value in entries:
        table.insert(str(net), value)
    for ip in addresses:
        assert table.lookup(ip) == naive_lookup(entries, ip), ip


def test_ten_thousand_prefixes_agree_with_ipaddress() -> None:
    rng = random.Random(5)
    table = PrefixTable()
    entries: list[tuple[Net, int]] = []
    seen: set[Net] = set()
    while len(entries) < 10_000:
        length = rng.choice([8, 12, 16, 20, 24, 28, 32])
        net = ipaddress.IPv4Network(
            (rng.getrandbits(32) & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF, length)
        )
        if net not in seen:
            seen.add(net)
            entries.append((net, len(entries)))
            table.insert(str(net), len(entries) - 1)
    assert len(table) == 10_000
    for net, _ in rng.sample(entries, 100):
        ip = str(net.network_address + rng.randrange(net.num_addresses))
        assert table.lookup(ip) == naive_lookup(entries, ip)


def test_filter_sources_keeps_the_peers_own_sources() -> None:
    table = PrefixTable()
    table.insert("10.8.0.2/32", 1)
    table.insert("10.8.0.0/24", 0)
    table.insert("fd00::/64", 1)
    own = ipv4_packet("10.8.0.2", "10.8.0.1", src_port=1, dst_port=2)
    own6 = ipv6_packet("fd00::5", "fd00::1", src_port=1, dst_port=2)
    other_peer = ipv4_packet("10.8.0.3", "10.8.0.1", src_port=1, dst_port=2)
    nobody = ipv4_packet("192.0.2.1", "10.8.0.1", src_port=1, dst_port=2)
    packets = [own, other_peer, b"\x45" + bytes(5), own6, nobody, b""]
    accepted, spoofed, unparsable = filter_sources(packets, table, 1)
    assert accepted == [own, own6]
    assert accepted[0] is own  # the same objects, not copies
    assert (spoofed, unparsable) == (2, 2)
    assert filter_sources([], table, 1) == ([], 0, 0)


def test_peer_validation_and_normalisation() -> None:
    peer = Peer("node-b", "192.168.77.2:7000", ["10.8.0.2/32", "FD00::/64"])
    assert peer.allowed_ips == ("10.8.0.2/32", "fd00::/64")
    assert peer.address == ("192.168.77.2", 7000)
    assert hash(peer) == hash(Peer("node-b", "192.168.77.2:7000", ("10.8.0.2/32", "fd00::/64")))
    with pytest.raises(ValueError, match="host bits"):
        Peer("x", "h:1", ["10.8.0.1/24"])
    with pytest.raises(ValueError, match="non-empty"):
        Peer("", "h:1")
    with pytest.raises(ValueError, match="255 bytes"):
        Peer("x" * 256, "h:1")
    with pytest.raises(TypeError):
        Peer("x", "h:1", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("192.168.77.2:7000", ("192.168.77.2", 7000)),
        ("[::1]:9", ("::1", 9)),
        ("node-b.lan:1", ("node-b.lan", 1)),
    ],
)
def test_endpoints(endpoint: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    "endpoint", ["host", ":80", "host:0", "host:65536", "::1:80", "[::1]80", "[x]:1", "h:-1"]
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(endpoint)


def _discovery() -> StaticPeerDiscovery:
    return StaticPeerDiscovery.from_config(
        [
            {"id": "node-b", "endpoint": "127.0.0.1:7001", "allowed_ips": ["10.8.0.2/32", "10.9.0.0/16"]},
            {"id": "gw", "endpoint": "[::1]:7002", "allowed_ips": ["0.0.0.0/0", "::/0"], "extra": "ignored"},
            {"id": "node-c", "endpoint": "127.0.0.1:7003", "allowed_ips": ["10.9.1.0/24"]},
        ]
    )


async def test_get_peer_id_by_longest_prefix() -> None:
    discovery = _discovery()
    assert isinstance(discovery, PeerDiscovery)
    assert await discovery.get_peer_id("10.8.0.2") == "node-b"
    assert await discovery.get_peer_id("10.9.1.7") == "node-c"
    assert await discovery.get_peer_id("10.9.2.7") == "node-b"
    assert await discovery.get_peer_id("8.8.8.8") == "gw"
    assert await discovery.get_peer_id("2001:db8::1") == "gw"
    assert discovery.endpoint("gw") == ("::1", 7002)
    assert discovery.peer("node-c").allowed_ips == ("10.9.1.0/24",)
    assert [discovery.index_of(p.id) for p in discovery.peers] == [0, 1, 2]
    assert len(discovery.table) == 5
    assert "node-b" in discovery
    assert "3 peers" in repr(discovery)
    with pytest.raises(KeyError):
        discovery.endpoint("nope")


async def test_get_peer_id_miss_raises_peer_not_found() -> None:
    discovery = StaticPeerDiscovery([Peer("node-b", "127.0.0.1:7001", ["10.8.0.2/32"])])
    for miss in ["10.8.0.3", "::1", "not-an-ip"]:
        with pytest.raises(PeerNotFoundError) as info:
            await discovery.get_peer_id(miss)
        assert info.value.dest_ip == miss
        assert isinstance(info.value, LookupError)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="duplicate peer id"):
        StaticPeerDiscovery([Peer("a", "h:1"), Peer("a", "h:2")])
    with pytest.raises(ValueError, match="given to both"):
        StaticPeerDiscovery([Peer("a", "h:1", ["10.0.0.0/8"]), Peer("b", "h:2", ["10.0.0.0/8"])])
    with pytest.raises(ValueError, match="missing endpoint"):
        StaticPeerDiscovery.from_config([{"id": "a"}])
