"""Property tests: the native parser agrees with the plain-Python reference on any input, round-trips built
packets, never fails past the fixed header, and batch forms agree with single calls."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from vpn_packet import (
    PacketError,
    PacketInfo,
    destination_key,
    extract_ip_and_ports,
    group_by_destination,
)
from vpn_packet._native import extract_batch, extract_batch_from_buffer
from vpn_packet.testutil.packets import (
    AH,
    DEST_OPTIONS,
    FRAGMENT,
    HOP_BY_HOP,
    ROUTING,
    ExtensionHeader,
    ipv4_packet,
    ipv6_packet,
)
from vpn_packet.testutil.reference import ReferenceError, reference_extract

PORT_PROTOCOLS = [6, 17, 33, 132, 136]
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)) | st.builds(
    lambda n: f"::ffff:{ipaddress.IPv4Address(n)}", st.integers(0, 2**32 - 1)
)
ports = st.integers(0, 65535)

# Random bytes, biased to look like IP so the walk gets deep.
ip_like = st.one_of(
    st.binary(max_size=128),
    st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x60]), st.binary(max_size=160)).map(
        lambda t: bytes([t[0]]) + t[1]
    ),
    st.tuples(
        st.binary(min_size=6, max_size=6).map(lambda b: b"\x60" + b[1:]),
        st.sampled_from([0, 6, 17, 43, 44, 51, 60, 59, 132]),
        st.binary(min_size=33, max_size=200),
    ).map(lambda t: t[0] + bytes([t[1]]) + t[2]),
)


def observed(packet: bytes) -> tuple[object, ...] | None:
    try:
        r = extract_ip_and_ports(packet)
    except PacketError:
        return None
    return (r.version, r.src_ip, r.dst_ip, r.src_port, r.dst_port, r.protocol, r.destination_key)


def reference(packet: bytes) -> tuple[object, ...] | None:
    try:
        r = reference_extract(packet)
    except ReferenceError:
        return None
    ip = ipaddress.ip_address
    return (r.version, ip(r.src_ip), ip(r.dst_ip), r.src_port, r.dst_port, r.protocol, r.destination_key)


@given(ip_like)
def test_any_bytes_give_packet_info_or_packet_error_agreeing_with_reference(packet: bytes) -> None:
    try:
        result = extract_ip_and_ports(packet)
    except PacketError:
        result = None
    assert result is None or isinstance(result, PacketInfo)
    assert observed(packet) == reference(packet)


extension = (
    st.builds(
        ExtensionHeader,
        kind=st.sampled_from([HOP_BY_HOP, ROUTING, DEST_OPTIONS]),
        size=st.sampled_from([8, 16, 24, 64]),
    )
    | st.builds(ExtensionHeader, kind=st.just(AH), size=st.sampled_from([12, 16, 24]))
    | st.builds(
        ExtensionHeader,
        kind=st.just(FRAGMENT),
        fragment_offset=st.integers(0, 8191),
        more_fragments=st.booleans(),
    )
)


@given(
    src=ipv6,
    dst=ipv6,
    protocol=st.sampled_from([*PORT_PROTOCOLS, 1, 58, 50, 59, 47]),
    sport=ports,
    dport=ports,
    chain=st.lists(extension, max_size=6),
    payload=st.binary(max_size=64),
)
def test_built_ipv6_packets_round_trip(
    src: str, dst: str, protocol: int, sport: int, dport: int, chain: list[ExtensionHeader], payload: bytes
) -> None:
    packet = ipv6_packet(src, dst, protocol, sport, dport, payload, extension_headers=chain)
    r = extract_ip_and_ports(packet)
    assert (r.version, r.src_ip, r.dst_ip) == (6, ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst))
    non_first = next((i for i, h in enumerate(chain) if h.kind == FRAGMENT and h.fragment_offset), None)
    if non_first is not None:
        kinds = [h.kind for h in chain] + [protocol]
        assert (r.protocol, r.src_port, r.dst_port) == (kinds[non_first + 1], None, None)
    else:
        assert r.protocol == protocol
        expected_ports = (sport, dport) if protocol in PORT_PROTOCOLS else (None, None)
        assert (r.src_port, r.dst_port) == expected_ports
    key = f"[{ipaddress.IPv6Address(dst)}]:{r.dst_port}" if r.dst_port is not None else None
    if key is not None and not ipaddress.IPv6Address(dst).ipv4_mapped:
        assert r.destination_key == key


@given(
    src=ipv4,
    dst=ipv4,
    protocol=st.sampled_from([*PORT_PROTOCOLS, 1, 2, 47, 50]),
    sport=ports,
    dport=ports,
    options=st.binary(max_size=40).map(lambda b: b[: len(b) // 4 * 4]),
    offset=st.integers(0, 8191),
    more=st.booleans(),
)
def test_built_ipv4_packets_round_trip(
    src: str, dst: str, protocol: int, sport: int, dport: int, options: bytes, offset: int, more: bool
) -> None:
    packet = ipv4_packet(
        src, dst, protocol, sport, dport, options=options, fragment_offset=offset, more_fragments=more
    )
    r = extract_ip_and_ports(packet)
    assert (r.version, str(r.src_ip), str(r.dst_ip), r.protocol) == (4, src, dst, protocol)
    has_ports = protocol in PORT_PROTOCOLS and offset == 0
    assert (r.src_port, r.dst_port) == ((sport, dport) if has_ports else (None, None))
    assert r.destination_key == (f"{dst}:{dport}" if has_ports else dst)
    assert destination_key(packet) == r.destination_key


@given(
    st.one_of(
        st.builds(
            lambda s, d, c: ipv6_packet(s, d, 6, 1, 2, extension_headers=c),
            ipv6,
            ipv6,
            st.lists(extension, max_size=4),
        ),
        st.builds(
            lambda s, d, o: ipv4_packet(s, d, 17, 1, 2, options=o * 4), ipv4, ipv4, st.binary(max_size=10)
        ),
    ),
    st.data(),
)
def test_truncation_after_fixed_header_never_fails(packet: bytes, data: st.DataObject) -> None:
    fixed = 40 if packet[0] >> 4 == 6 else 20
    cut = data.draw(st.integers(fixed, len(packet)))
    whole = extract_ip_and_ports(packet)
    part = extract_ip_and_ports(packet[:cut])
    assert (part.src_ip, part.dst_ip) == (whole.src_ip, whole.dst_ip)
    if part.dst_port is not None:
        assert (part.src_port, part.dst_port, part.protocol) == (
            whole.src_port,
            whole.dst_port,
            whole.protocol,
        )


@given(st.lists(ip_like, max_size=40))
def test_batch_forms_agree_with_single_calls(packets: list[bytes]) -> None:
    single = [observed(p) for p in packets]
    batch = [
        None
        if isinstance(r, PacketError)
        else (r.version, r.src_ip, r.dst_ip, r.src_port, r.dst_port, r.protocol, r.destination_key)
        for r in extract_batch(packets)
    ]
    assert batch == single
    from_buffer = extract_batch_from_buffer(b"".join(packets), [len(p) for p in packets])
    assert [isinstance(r, PacketError) for r in from_buffer] == [s is None for s in single]


@given(st.lists(ip_like, max_size=60))
def test_grouping_is_an_ordered_partition(raw: list[bytes]) -> None:
    packets = [bytearray(p) for p in raw]  # distinct objects, so identity tells them apart
    position = {id(p): i for i, p in enumerate(packets)}
    groups, rejected = group_by_destination(packets)
    rejected_indices = [i for i, _ in rejected]
    assert rejected_indices == [i for i, p in enumerate(raw) if observed(p) is None]
    seen: list[int] = []
    keys = set()
    for key, _ip, members in groups:
        assert key not in keys
        keys.add(key)
        indices = [position[id(m)] for m in members]  # the very objects passed in
        assert indices == sorted(indices)  # in batch order
        assert all(destination_key(raw[i]) == key for i in indices)
        seen.extend(indices)
    assert sorted(seen + rejected_indices) == list(range(len(packets)))
