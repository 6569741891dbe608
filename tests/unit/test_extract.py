"""Extraction rules of DESIGN.md §3, PacketInfo semantics, batch forms and grouping."""

from __future__ import annotations

import copy
import ipaddress
import pickle

import pytest

import vpn_packet
from vpn_packet import (
    PacketError,
    PacketInfo,
    VpnPacketError,
    destination_key,
    extract_ip_and_ports,
    group_by_destination,
    parse_batch,
)
from vpn_packet._native import (
    destination_key_and_ip,
    extract_batch,
    extract_batch_from_buffer,
    parse_batch_from_buffer,
)
from vpn_packet.testutil.packets import (
    AH,
    DEST_OPTIONS,
    FRAGMENT,
    HOP_BY_HOP,
    ICMP,
    ROUTING,
    TCP,
    UDP,
    ExtensionHeader,
    icmp_echo,
    ipv4_packet,
    ipv6_packet,
)

A6, B6 = "2001:db8::1", "2001:db8::2"


def info(packet: bytes) -> tuple[int | None, int | None, int]:
    result = extract_ip_and_ports(packet)
    return result.src_port, result.dst_port, result.protocol


# --- IPv4 -----------------------------------------------------------------------------------------------


def test_ipv4_tcp() -> None:
    result = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 40000, 443))
    assert result.version == 4
    assert result.src_ip == ipaddress.IPv4Address("10.0.0.1")
    assert result.dst_ip == ipaddress.IPv4Address("10.0.0.2")
    assert (result.src_port, result.dst_port, result.protocol) == (40000, 443, TCP)
    assert result.destination_key == "10.0.0.2:443"


@pytest.mark.parametrize("protocol", [6, 17, 33, 132, 136])
def test_ports_for_every_port_protocol(protocol: int) -> None:
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", protocol, 1, 2)) == (1, 2, protocol)
    assert info(ipv6_packet(A6, B6, protocol, 1, 2)) == (1, 2, protocol)


@pytest.mark.parametrize("protocol", [1, 2, 47, 50, 58, 89, 255])
def test_no_ports_for_other_protocols(protocol: int) -> None:
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", protocol, transport=b"\x01\x02\x03\x04" * 4)) == (
        None,
        None,
        protocol,
    )


def test_ipv4_options_are_skipped() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 53, 5353, options=b"\x94\x04\x00\x00" + b"\x01" * 36)
    assert packet[0] == 0x4F
    assert info(packet) == (53, 5353, UDP)


def test_ipv4_options_running_past_the_buffer_keep_addresses() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2, options=b"\x01" * 20)[:30]
    result = extract_ip_and_ports(packet)
    assert (result.dst_ip, result.protocol, result.dst_port) == (ipaddress.IPv4Address("10.0.0.2"), TCP, None)


def test_ipv4_fragments() -> None:
    first = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, b"x" * 32, more_fragments=True)
    later = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, b"x" * 32, fragment_offset=5)
    last_looking_like_ports = ipv4_packet(
        "10.0.0.1", "10.0.0.2", TCP, transport=b"\x00\x50\x01\xbb", fragment_offset=1
    )
    assert info(first) == (1, 2, UDP)
    assert info(later) == (None, None, UDP)
    assert info(last_looking_like_ports) == (None, None, TCP)
    assert extract_ip_and_ports(later).destination_key == "10.0.0.2"


def test_ipv4_total_length() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, b"payload")
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, total_length=0)) == (1, 2, UDP)
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, total_length=23)) == (None, None, UDP)
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, total_length=24)) == (1, 2, UDP)
    # Longer than the buffer: the buffer bounds it; trailing bytes beyond the total length are ignored.
    assert info(ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2, total_length=1500)) == (1, 2, UDP)
    assert info(packet + b"\xff" * 10) == (1, 2, UDP)


def test_ipv4_truncated_transport() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2)
    for cut in range(20, 24):
        assert info(packet[:cut]) == (None, None, TCP)
    assert info(packet[:24]) == (1, 2, TCP)


# --- IPv6 -----------------------------------------------------------------------------------------------


def test_ipv6_udp_key_is_bracketed() -> None:
    result = extract_ip_and_ports(ipv6_packet(A6, "2001:db8::2", UDP, 5000, 443))
    assert result.version == 6
    assert result.dst_ip == ipaddress.IPv6Address("2001:db8::2")
    assert result.destination_key == "[2001:db8::2]:443"


@pytest.mark.parametrize(
    "chain",
    [
        [HOP_BY_HOP],
        [HOP_BY_HOP, ROUTING, FRAGMENT, AH, DEST_OPTIONS],
        [DEST_OPTIONS, HOP_BY_HOP, DEST_OPTIONS],  # any order
        [AH, AH, FRAGMENT, ROUTING],
        [FRAGMENT],
    ],
)
def test_ipv6_extension_chains_are_walked(chain: list[int]) -> None:
    headers = [ExtensionHeader(kind, size=16 if kind == AH else 8 * (i + 1)) for i, kind in enumerate(chain)]
    assert info(ipv6_packet(A6, B6, TCP, 1234, 80, extension_headers=headers)) == (1234, 80, TCP)


def test_ipv6_non_first_fragment_anywhere_in_chain() -> None:
    headers = [
        ExtensionHeader(HOP_BY_HOP),
        ExtensionHeader(FRAGMENT, fragment_offset=100),
        ExtensionHeader(AH, 12),
    ]
    assert info(ipv6_packet(A6, B6, UDP, 1, 2, extension_headers=headers)) == (None, None, AH)
    first = [ExtensionHeader(DEST_OPTIONS), ExtensionHeader(FRAGMENT, more_fragments=True)]
    assert info(ipv6_packet(A6, B6, UDP, 1, 2, extension_headers=first)) == (1, 2, UDP)


@pytest.mark.parametrize("ends_walk", [50, 59, 135, 58, 4, 41])
def test_ipv6_walk_ends_at_other_headers(ends_walk: int) -> None:
    packet = ipv6_packet(A6, B6, ends_walk, transport=b"\x06\x00\x00\x50\x00\x50" + b"\0" * 10)
    assert info(packet) == (None, None, ends_walk)


def test_ipv6_extension_cut_short_reports_named_protocol() -> None:
    packet = ipv6_packet(A6, B6, UDP, 1, 2, extension_headers=[ExtensionHeader(HOP_BY_HOP, size=64)])
    assert info(packet[:48]) == (None, None, UDP)  # the header names UDP but runs past the end
    assert info(packet[:41]) == (None, None, UDP)  # only its next-header byte is there
    assert info(packet[:40]) == (None, None, HOP_BY_HOP)  # nothing after the fixed header


def test_ipv6_payload_length() -> None:
    assert info(ipv6_packet(A6, B6, UDP, 1, 2, payload_length=0)) == (1, 2, UDP)  # jumbogram: use the buffer
    assert info(ipv6_packet(A6, B6, UDP, 1, 2, payload_length=3)) == (None, None, UDP)
    assert info(ipv6_packet(A6, B6, UDP, 1, 2, b"x" * 100, payload_length=4)) == (1, 2, UDP)


def test_icmp_has_no_ports() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", ICMP, transport=icmp_echo(7, 9, b"ping"))
    result = extract_ip_and_ports(packet)
    assert (result.src_port, result.dst_port, result.destination_key) == (None, None, "10.0.0.2")


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "reason", "words"),
    [
        (b"", "empty", ["0 bytes"]),
        (b"\x45" + b"\0" * 18, "truncated", ["19 bytes", "20"]),
        (b"\x60" + b"\0" * 38, "truncated", ["39 bytes", "40"]),
        (b"\x70" + b"\0" * 59, "unsupported_version", ["version 7", "60-byte"]),
        (b"\x00" * 40, "unsupported_version", ["version 0"]),
        (b"\x43" + b"\0" * 59, "invalid_ihl", ["IHL 3", "12 bytes", "60-byte"]),
    ],
)
def test_errors_are_typed_and_explain_sizes(packet: bytes, reason: str, words: list[str]) -> None:
    with pytest.raises(PacketError) as caught:
        extract_ip_and_ports(packet)
    err = caught.value
    assert isinstance(err, ValueError)
    assert isinstance(err, VpnPacketError)
    assert err.reason == reason
    for word in words:
        assert word in str(err)
    with pytest.raises(PacketError):
        destination_key(packet)


def test_wrong_input_type_is_a_type_error() -> None:
    for value in ["45000014", 12, None, [0x45] * 20]:
        with pytest.raises(TypeError, match="bytes"):
            extract_ip_and_ports(value)  # type: ignore[arg-type]


# --- input types ------------------------------------------------------------------------------------------


def test_bytes_bytearray_memoryview_agree() -> None:
    packet = ipv6_packet(A6, B6, TCP, 1, 2, extension_headers=[ExtensionHeader(HOP_BY_HOP)])
    expected = extract_ip_and_ports(packet)
    assert extract_ip_and_ports(bytearray(packet)) == expected
    assert extract_ip_and_ports(memoryview(packet)) == expected
    # A slice of a larger buffer, without copying.
    framed = b"\xaa\xbb" + packet + b"\xcc"
    assert extract_ip_and_ports(memoryview(framed)[2:-1]) == expected


def test_non_contiguous_memoryview_is_refused() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2) * 2
    with pytest.raises(TypeError, match="contiguous"):
        extract_ip_and_ports(memoryview(packet)[::2])


def test_bytearray_is_not_resized_while_read() -> None:
    buffer = bytearray(ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 2))
    view = memoryview(buffer)
    assert extract_ip_and_ports(view).dst_port == 2
    view.release()
    buffer.extend(b"more")  # the native side released its export
    assert extract_ip_and_ports(buffer).dst_port == 2


# --- PacketInfo semantics ---------------------------------------------------------------------------------


def test_packet_info_is_frozen_hashable_equal_by_value() -> None:
    a = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2))
    b = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2, b"other payload"))
    c = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 3))
    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert a != "not a packet"
    with pytest.raises(AttributeError):
        a.dst_port = 5  # type: ignore[misc]


def test_packet_info_repr_is_readable_and_evaluable() -> None:
    result = extract_ip_and_ports(ipv6_packet(A6, B6, UDP, 1, 2))
    text = repr(result)
    assert text == (
        "PacketInfo(version=6, src_ip='2001:db8::1', dst_ip='2001:db8::2', "
        "src_port=1, dst_port=2, protocol=17)"
    )
    assert eval(text, {"PacketInfo": PacketInfo}) == result


def test_packet_info_pickles_and_copies() -> None:
    for packet in [ipv4_packet("10.0.0.1", "10.0.0.2", ICMP), ipv6_packet("::ffff:1.2.3.4", B6, TCP, 1, 2)]:
        result = extract_ip_and_ports(packet)
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            assert pickle.loads(pickle.dumps(result, protocol)) == result
        assert copy.deepcopy(result) == result


def test_packet_info_constructor_accepts_text_packed_and_objects() -> None:
    expected = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2))
    assert PacketInfo(4, "10.0.0.1", "10.0.0.2", 1, 2, 6) == expected
    assert PacketInfo(4, b"\x0a\0\0\x01", ipaddress.IPv4Address("10.0.0.2"), 1, 2, 6) == expected
    with pytest.raises(ValueError, match="version"):
        PacketInfo(6, "10.0.0.1", "10.0.0.2", 1, 2, 6)
    with pytest.raises(ValueError, match="not an IP address"):
        PacketInfo(4, "10.0.0.300", "10.0.0.2", 1, 2, 6)
    with pytest.raises(OverflowError):
        PacketInfo(4, "10.0.0.1", "10.0.0.2", 70000, 2, 6)


def test_ip_objects_are_cached() -> None:
    result = extract_ip_and_ports(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 2))
    assert result.src_ip is result.src_ip
    assert result.destination_key is result.destination_key


# --- destination keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "port", "key"),
    [
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("2001:db8::2", 80, "[2001:db8::2]:80"),  # the Go original's ambiguous 2001:db8::2:80
        ("2001:0db8:0000:0000:0000:0000:0002:0080", None, "2001:db8::2:80"),
        ("2001:db8:0:0:1:0:0:1", None, "2001:db8::1:0:0:1"),  # RFC 5952: first longest run
        ("::ffff:1.2.3.4", 53, "[::ffff:1.2.3.4]:53"),  # IPv4-mapped in mixed notation
        ("::", 0, "[::]:0"),
        ("fe80::1", None, "fe80::1"),
    ],
)
def test_destination_key_format(dst: str, port: int | None, key: str) -> None:
    if ":" in dst:
        packet = ipv6_packet(A6, dst, UDP if port is not None else 58, 1 if port is not None else None, port)
    else:
        packet = ipv4_packet("10.9.9.9", dst, UDP, 1, port)
    assert destination_key(packet) == key
    assert extract_ip_and_ports(packet).destination_key == key
    ip_text = key.rsplit(":", 1)[0].strip("[]") if port is not None else key
    assert destination_key_and_ip(packet) == (key, ip_text)


# --- batches ----------------------------------------------------------------------------------------------


def _mixed() -> list[bytes]:
    return [
        ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 80),
        b"",
        ipv6_packet(A6, B6, UDP, 1, 53),
        b"\x45\x00",
        ipv4_packet("10.0.0.1", "10.0.0.3", ICMP, transport=icmp_echo()),
    ]


def _normal(results: list[PacketInfo | PacketError]) -> list[object]:
    return [r if isinstance(r, PacketInfo) else ("error", r.reason) for r in results]


def test_extract_batch_reports_errors_per_item() -> None:
    packets = _mixed()
    results = extract_batch(packets)
    assert [type(r).__name__ for r in results] == [
        "PacketInfo",
        "PacketError",
        "PacketInfo",
        "PacketError",
        "PacketInfo",
    ]
    assert results[0] == extract_ip_and_ports(packets[0])
    assert isinstance(results[1], PacketError)
    assert results[1].reason == "empty"
    assert _normal(extract_batch(iter(packets))) == _normal(results)
    assert _normal(extract_batch(tuple(bytearray(p) for p in packets))) == _normal(results)
    assert extract_batch([]) == []


def test_extract_batch_from_buffer() -> None:
    packets = _mixed()
    buffer = bytearray(b"".join(packets))
    results = extract_batch_from_buffer(buffer, [len(p) for p in packets])
    assert _normal(results) == _normal(extract_batch(packets))
    with pytest.raises(ValueError, match="add up to"):
        extract_batch_from_buffer(buffer, [len(buffer), 1])
    with pytest.raises(TypeError):
        extract_batch([b"ok", "not bytes"])  # type: ignore[list-item]


def test_group_by_destination_keeps_order_and_objects() -> None:
    a1 = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 80, b"1")
    b1 = ipv6_packet(A6, B6, UDP, 1, 53, b"1")
    a2 = ipv4_packet("10.0.0.9", "10.0.0.2", TCP, 7, 80, b"2")
    c1 = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 81)
    a3 = bytearray(ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 80, b"3"))
    groups, rejected = group_by_destination([a1, b1, b"\x99", a2, c1, a3, b""])
    assert [(key, ip) for key, ip, _ in groups] == [
        ("10.0.0.2:80", "10.0.0.2"),
        (f"[{B6}]:53", B6),
        ("10.0.0.2:81", "10.0.0.2"),
    ]
    assert groups[0][2][0] is a1
    assert groups[0][2][1] is a2
    assert groups[0][2][2] is a3
    assert [(i, e.reason) for i, e in rejected] == [(2, "unsupported_version"), (6, "empty")]


def test_go_alias() -> None:
    assert vpn_packet.ExtractIPAndPorts is extract_ip_and_ports


# --- PacketBatch ------------------------------------------------------------------------------------------


def test_parse_batch_is_a_lazy_sequence_equal_to_extract_batch() -> None:
    packets = _mixed()
    batch = parse_batch(packets)
    assert len(batch) == len(packets)
    assert _normal([batch[i] for i in range(len(batch))]) == _normal(extract_batch(packets))
    assert _normal(list(batch)) == _normal(batch.to_list())
    assert batch[-1] == batch[len(batch) - 1]
    with pytest.raises(IndexError, match="out of range"):
        batch[len(batch)]
    assert (batch.valid_count, batch.error_count) == (3, 2)
    assert batch.total_bytes == sum(map(len, packets))
    assert batch.sizes() == [len(p) for p in packets]
    assert [(i, e.reason) for i, e in batch.errors()] == [(1, "empty"), (3, "truncated")]
    assert batch.error_counts() == {"empty": 1, "truncated": 1}
    assert batch.destination_keys() == ["10.0.0.2:80", None, f"[{B6}]:53", None, "10.0.0.3"]
    assert batch.protocols() == [TCP, None, UDP, None, ICMP]
    assert repr(batch) == "<PacketBatch 5 packets, 2 malformed>"


def test_parse_batch_by_destination_aggregates_in_first_seen_order() -> None:
    a = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 80, b"xx")
    b = ipv4_packet("10.0.0.1", "10.0.0.2", UDP, 1, 80)
    c = ipv6_packet(A6, B6, UDP, 1, 53)
    batch = parse_batch_from_buffer(b"".join([c, a, b, a]), [len(c), len(a), len(b), len(a)])
    assert list(batch.by_destination().items()) == [
        (f"[{B6}]:53", (1, len(c), {UDP: 1})),
        ("10.0.0.2:80", (3, 2 * len(a) + len(b), {TCP: 2, UDP: 1})),
    ]
    with pytest.raises(ValueError, match="add up to"):
        parse_batch_from_buffer(b"", [1])


def test_keys_are_shared_per_destination_and_stay_right_past_the_cache_bound() -> None:
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", TCP, 1, 80)
    first = destination_key_and_ip(packet)
    again = destination_key_and_ip(bytearray(packet))
    assert first == ("10.0.0.2:80", "10.0.0.2")
    assert again[0] is first[0]  # one str per destination: dict lookups reuse its hash
    groups, _ = group_by_destination([packet])
    assert groups[0][0] is first[0]
    # More distinct destinations than the cache holds (16,384): every key is still the right one.
    for i in range(20_000):
        dst = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        assert destination_key_and_ip(ipv4_packet("10.0.0.1", dst, UDP, 1, 53)) == (f"{dst}:53", dst)
