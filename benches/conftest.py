"""Shared benchmark inputs: a deterministic mix of real-looking packets (IPv4, IPv6, options, fragments,
extension-header chains) built with vpn_packet.testutil."""

from __future__ import annotations

import random

import pytest

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

MIX_SIZE = 1024


def build_mix(size: int = MIX_SIZE, seed: int = 7) -> list[bytes]:
    """About 55% IPv4 (10% with options, 10% fragments, some ICMP) and 45% IPv6 (chains, fragments)."""
    rng = random.Random(seed)
    packets = []
    for i in range(size):
        roll = rng.random()
        a, b = rng.randrange(1, 255), rng.randrange(1, 255)
        sport, dport = rng.randrange(1024, 65535), rng.choice([53, 80, 443, 51820, rng.randrange(1, 65535)])
        payload = bytes(rng.randrange(0, 1200))
        if roll < 0.35:
            packets.append(
                ipv4_packet(f"10.0.{a}.1", f"10.8.{b}.2", rng.choice([TCP, UDP]), sport, dport, payload)
            )
        elif roll < 0.45:
            packets.append(
                ipv4_packet(
                    "10.0.0.1", f"10.8.0.{b}", TCP, sport, dport, payload, options=b"\x94\x04\0\0" * 3
                )
            )
        elif roll < 0.50:
            packets.append(
                ipv4_packet("10.0.0.1", f"10.8.1.{b}", ICMP, transport=icmp_echo(i, i, payload[:56]))
            )
        elif roll < 0.55:
            packets.append(
                ipv4_packet(
                    "10.0.0.1",
                    f"10.8.2.{b}",
                    UDP,
                    sport,
                    dport,
                    payload,
                    fragment_offset=rng.choice([0, 185]),
                )
            )
        elif roll < 0.80:
            packets.append(
                ipv6_packet(
                    f"2001:db8::{a:x}", f"2001:db8:8::{b:x}", rng.choice([TCP, UDP]), sport, dport, payload
                )
            )
        elif roll < 0.95:
            chain = [
                ExtensionHeader(HOP_BY_HOP),
                ExtensionHeader(ROUTING, 24),
                ExtensionHeader(DEST_OPTIONS),
                ExtensionHeader(AH, 24),
            ]
            packets.append(
                ipv6_packet(
                    "2001:db8::1",
                    f"2001:db8:9::{b:x}",
                    UDP,
                    sport,
                    dport,
                    payload,
                    extension_headers=chain[: rng.randrange(1, 5)],
                )
            )
        else:
            frag = ExtensionHeader(FRAGMENT, fragment_offset=rng.choice([0, 0, 181]), more_fragments=True)
            packets.append(
                ipv6_packet(
                    "2001:db8::1", f"2001:db8:a::{b:x}", UDP, sport, dport, payload, extension_headers=[frag]
                )
            )
    return packets


def routed_mix(size: int = MIX_SIZE, destinations: int = 16, seed: int = 11) -> list[bytes]:
    """`size` packets to exactly `destinations` destination keys (half IPv4, half IPv6 with extension
    headers), in random order: the shape of a batch a dispatcher routes."""
    rng = random.Random(seed)
    chain = [ExtensionHeader(HOP_BY_HOP), ExtensionHeader(DEST_OPTIONS)]
    packets = []
    for _ in range(size):
        d = rng.randrange(destinations)
        payload = bytes(rng.randrange(0, 1400))
        if d % 2:
            packets.append(
                ipv6_packet(
                    "2001:db8::1", f"2001:db8:8::{d:x}", UDP, 4000, 443, payload, extension_headers=chain
                )
            )
        else:
            packets.append(ipv4_packet("10.0.0.1", f"10.8.{d >> 8}.{d & 255}", TCP, 4000, 443, payload))
    return packets


@pytest.fixture(scope="session")
def mix() -> list[bytes]:
    return build_mix()
