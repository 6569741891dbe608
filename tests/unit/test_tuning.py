"""`vpn_packet.tuning`: one place for each default and each rule, and every layer reading it."""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet import _native, tuning
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import FramingError
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.transport import framing
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.pool import StreamPool
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService
from vpn_packet.transport.tun import TunDevice
from vpn_packet.tuning import Tuning


def _default(func: object, name: str) -> object:
    return inspect.signature(func).parameters[name].default  # type: ignore[arg-type]


def test_library_defaults_are_the_tuning_constants() -> None:
    """The classes' keyword defaults are read from `tuning`, and equal a default `Tuning`'s except the
    documented node-only difference (the worker buffer)."""
    t = Tuning()
    assert _default(Dispatcher, "worker_buffer_size") == tuning.WORKER_BUFFER_SIZE == 100  # DESIGN contract
    assert t.worker_buffer_size == tuning.NODE_WORKER_BUFFER_SIZE >= t.read_batch
    pairs = [
        (Dispatcher, "max_workers", t.max_workers),
        (Dispatcher, "coalesce", t.coalesce),
        (Dispatcher, "worker_idle_timeout", t.worker_idle_timeout),
        (Dispatcher, "worker_cleanup_interval", t.worker_cleanup_interval),
        (StreamPool, "max_streams_per_peer", t.max_streams_per_peer),
        (StreamPool, "idle_timeout", t.stream_idle_timeout),
        (TcpStreamService, "connect_timeout", t.connect_timeout),
        (TcpStreamService, "write_timeout", t.write_timeout),
        (TcpStreamService, "send_buffer", t.send_buffer),
        (Receiver, "hello_timeout", t.hello_timeout),
        (Receiver, "max_batch", t.receive_batch),
        (Receiver, "max_connections", t.max_connections),
        (Receiver, "max_connections_per_peer", t.max_connections_per_peer),
        (Receiver, "read_size", t.read_size),
        (Receiver, "max_pending", t.max_pending),
        (Receiver, "max_pending_per_source", t.max_pending_per_source),
        (Receiver, "max_silent_pending", t.max_silent_pending),
        (Receiver, "max_silent_pending_per_source", t.max_silent_pending_per_source),
        (Receiver, "idle_timeout", t.receive_idle_timeout),
        (Receiver, "log_interval", tuning.LOG_INTERVAL),
        (TunDevice.open, "mtu", tuning.MTU),
        (TunDevice.open, "txqueuelen", tuning.TXQUEUELEN),
        (TunDevice.start_reading, "max_packets", t.read_batch),
    ]
    for cls, name, expected in pairs:
        assert _default(cls, name) == expected, (cls, name)


def test_tuning_checks_every_field_against_its_spec() -> None:
    for name in Tuning.names():
        spec = Tuning.spec(name)
        bad: object = 0 if spec.seconds else spec.high + 1
        with pytest.raises(ValueError, match=f"^{name}: "):
            Tuning(**{name: bad})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=f"^{name}: "):
            Tuning(**{name: True})
    assert Tuning(write_timeout=2).write_timeout == 2.0
    assert isinstance(Tuning(write_timeout=2).write_timeout, float)
    with pytest.raises(ValueError, match="expected a number of seconds"):
        Tuning(write_timeout=math.inf)
    with pytest.raises(KeyError):
        Tuning.spec("turbo")
    assert Tuning().with_changes(coalesce=0) == dataclasses.replace(Tuning(), coalesce=0)
    with pytest.raises(TypeError):
        Tuning().with_changes(turbo=1)


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        (tuning.check_interface_name, "x" * 16, "is not an interface name"),
        (tuning.check_interface_name, "a b", "is not an interface name"),
        (tuning.check_interface_name, "", "is not an interface name"),
        (tuning.check_mtu, 575, "575 is out of range 576..65535"),
        (tuning.check_mtu, 65536, "out of range"),
        (tuning.check_mtu, "1400", "expected an integer"),
        (tuning.check_peer_id, "", "non-empty"),
        (tuning.check_peer_id, "x" * 256, "at most 255 bytes"),
        (tuning.check_prefix, "10.0.0.1/24", "has host bits set \\(did you mean 10.0.0.0/24\\?\\)"),
        (tuning.check_prefix, "10.0.0.300/32", "is not an IP prefix"),
        (tuning.parse_endpoint, "10.0.0.1", "expected host:port"),
        (tuning.check_seconds, -1, "must be positive"),
        (tuning.check_seconds, float("nan"), "expected a number of seconds"),
        (tuning.check_seconds, 1e308, "1e\\+308 is more than 86400 seconds \\(one day\\)"),
        (tuning.check_seconds, 86400.5, "is more than 86400 seconds"),
        (tuning.check_interface_address, "10.8.0.1", "needs a prefix length"),
        (tuning.check_interface_address, "10.8.0.300/24", "is not an address with prefix length"),
        (tuning.check_interface_address, 7, "expected an address with prefix length"),
        (tuning.check_interface_address, "0.0.0.0/0", "a /0 prefix covers every address"),
        (tuning.check_interface_address, "::/0", "a /0 prefix"),
        (tuning.check_interface_address, "::/64", ":: is the unspecified address"),
        (tuning.check_interface_address, "0.0.0.0/32", "0.0.0.0 is the unspecified address"),
        (tuning.check_interface_address, "10.8.0.0/24", "10.8.0.0 is the network address of 10.8.0.0/24"),
        (tuning.check_interface_address, "10.8.0.255/24", "10.8.0.255 is the broadcast address"),
        (tuning.check_interface_address, "fd00::/64", "fd00:: is the network address"),
        (tuning.check_interface_address, "::1/128", "::1 is a loopback address"),
        (tuning.check_interface_address, "ff02::1/64", "ff02::1 is a multicast address"),
    ],
)
def test_rules(rule: object, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule(value)  # type: ignore[operator]


def test_rules_accept() -> None:
    assert tuning.check_mtu(576) == 576
    assert tuning.check_mtu(1280, ipv6=True) == 1280
    with pytest.raises(ValueError, match="IPv6 minimum"):
        tuning.check_mtu(1279, ipv6=True)
    assert tuning.check_interface_name("x" * 15) == "x" * 15
    assert tuning.check_peer_id("x" * 255) == "x" * 255
    assert tuning.check_prefix("FD00::/64") == "fd00::/64"
    assert tuning.check_seconds(0, zero=True) == 0.0
    assert tuning.check_seconds(tuning.MAX_SECONDS) == 86400.0
    assert tuning.check_interface_address("10.8.0.1/24") == "10.8.0.1/24"
    assert tuning.check_interface_address("10.8.0.0/31") == "10.8.0.0/31"  # RFC 3021: no network address
    assert tuning.check_interface_address("10.8.0.1/32") == "10.8.0.1/32"
    assert tuning.check_interface_address("FD00::1/64") == "fd00::1/64"
    assert tuning.check_interface_address("fd00::/127") == "fd00::/127"


def test_seconds_have_an_upper_bound_everywhere() -> None:
    """Issue 11: `write_timeout = 1e308` was accepted (a timer that overflows or never fires). Every seconds
    field of `Tuning` refuses it, and so does `Tuning.check_fields`, the check of the library classes."""
    for name in Tuning.names():
        if Tuning.spec(name).seconds:
            Tuning.check_fields(**{name: tuning.MAX_SECONDS})
            if name != "keepalive_interval":  # a day of keepalive interval leaves no room for idle_timeout
                assert getattr(Tuning(**{name: tuning.MAX_SECONDS}), name) == tuning.MAX_SECONDS  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=f"^{name}: 1e\\+308 is more than 86400 seconds"):
                Tuning(**{name: 1e308})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"write_timeout: .* is more than 86400 seconds"):
        Tuning.check_fields(write_timeout=1e308)
    with pytest.raises(ValueError, match=r"worker_idle_timeout: .* is more than 86400 seconds"):
        Tuning.check_fields(worker_idle_timeout=86401)


def test_one_source_of_resilience_defaults() -> None:
    """Issue 11: the node's breaker defaults are the library's (they were 2 s and 30 s)."""
    assert ResilienceConfig() == tuning.NODE_RESILIENCE
    assert ResilienceConfig().reset_timeout == tuning.NODE_RESILIENCE.reset_timeout == 2.0


def test_the_same_rules_in_every_layer() -> None:
    """The TUN device and a `Peer` refuse what the config file refuses, with the same words."""
    with pytest.raises(ValueError, match=r"mtu 575 is out of range 576\.\.65535"):
        TunDevice.open("ok", mtu=575, path="/nonexistent/tun")
    with pytest.raises(ValueError, match="IPv6 minimum"):
        TunDevice.open("ok", address="fd00::1/64", mtu=1200, path="/nonexistent/tun")
    with pytest.raises(ValueError, match="is not an interface name"):
        TunDevice.open("x" * 16, path="/nonexistent/tun")
    with pytest.raises(ValueError, match="at most 255 bytes"):
        Peer("x" * 256, "10.0.0.1:1")
    with pytest.raises(ValueError, match=r"did you mean 10\.0\.0\.0/24"):
        Peer("p", "10.0.0.1:1", ["10.0.0.1/24"])


def test_wire_constants_come_from_rust() -> None:
    """Framing and handshake constants are the Rust core's, re-exported, never restated in Python."""
    for name in ("DEFAULT_MAX_FRAME_SIZE", "LENGTH_PREFIX_LEN", "MAX_FRAME_SIZE_LIMIT"):
        assert getattr(framing, name) is getattr(_native, name), name
    assert (framing.DEFAULT_MAX_FRAME_SIZE, framing.LENGTH_PREFIX_LEN) == (65535, 4)
    assert len(framing.encode_frames([b"ab"])) == framing.LENGTH_PREFIX_LEN + 2
    # The v1 hello and its constants are gone from framing: the handshake (v2) owns the hello.
    for gone in ("HELLO_MAGIC", "HELLO_VERSION", "HELLO_HEADER_LEN", "MAX_HELLO_LEN", "encode_hello"):
        assert not hasattr(framing, gone), gone
    assert (_native.PROTOCOL_MAGIC, _native.PROTOCOL_VERSION) == (b"VPNP", 3)
    assert _native.MAX_PEER_ID_LEN == 255
    longest = _native.encode_hello(
        "x" * _native.MAX_PEER_ID_LEN,
        2**64 - 1,
        bytes(_native.PUBLIC_KEY_LEN),
        bytes(_native.SIGNATURE_LEN),
    )
    assert len(longest) == _native.MAX_HELLO_LEN
    assert longest.startswith(_native.PROTOCOL_MAGIC + bytes([_native.PROTOCOL_VERSION]))
    # The config's peer id rule is the hello's: the same limit, read from the same constant.
    assert tuning.check_peer_id("é" * (_native.MAX_PEER_ID_LEN // 2)) == "é" * (_native.MAX_PEER_ID_LEN // 2)
    with pytest.raises(ValueError, match=f"at most {_native.MAX_PEER_ID_LEN} bytes"):
        tuning.check_peer_id("é" * (_native.MAX_PEER_ID_LEN // 2 + 1))  # 256 bytes in 128 characters
    with pytest.raises(FramingError):
        _native.encode_hello("x" * (_native.MAX_PEER_ID_LEN + 1), 0)


def test_every_component_takes_its_knobs_from_the_tuning_whole() -> None:
    """`tuning.build(cls, tuning, ...)`: each part of a node names which of its keywords are which `Tuning`
    fields (`TUNING_FIELDS`); every name is a real keyword and a real field, and together the parts (and
    the TUN reader's `read_batch`) take every field, so no knob is configured and then ignored."""
    from vpn_packet.transport.keeper import ConnectionKeeper

    parts = (TcpStreamService, StreamPool, ConnectionKeeper, Dispatcher, Receiver)
    taken = {"read_batch"}  # TunNode's reads
    for cls in parts:
        keywords = inspect.signature(cls).parameters
        for keyword, name in cls.TUNING_FIELDS.items():
            assert keyword in keywords, (cls, keyword)
            Tuning.spec(name)  # a field (KeyError otherwise)
            taken.add(name)
    assert taken == set(Tuning.names())
    t = Tuning(read_size=8192, receive_idle_timeout=37, max_pending=3)
    receiver = tuning.build(
        Receiver, t, StaticPeerDiscovery([]), lambda *_: None, security=Security.insecure("x")
    )
    assert (receiver.read_size, receiver.idle_timeout, receiver.max_pending) == (8192, 37.0, 3)
    explicit = tuning.build(
        Receiver, t, StaticPeerDiscovery([]), print, security=Security.insecure("x"), max_pending=9
    )
    assert explicit.max_pending == 9  # a keyword given wins


def test_settings_that_cannot_work_are_refused_naming_the_field() -> None:
    """Issue 22 item 3b: an ack_timeout no acknowledgement can meet, a receive_idle_timeout at or below the
    keepalive interval (a quiet peer's connections closed between keepalives)."""
    with pytest.raises(ValueError, match=r"^ack_timeout: 0\.001 is below 0\.1 seconds: no acknowledgement"):
        Tuning(ack_timeout=0.001)
    with pytest.raises(ValueError, match=r"^ack_timeout: 0\.05 is below"):
        Tuning.check_fields(ack_timeout=0.05)  # the library classes' check: the same rule
    assert Tuning(ack_timeout=tuning.MIN_ACK_TIMEOUT).ack_timeout == tuning.MIN_ACK_TIMEOUT
    not_above = r"^receive_idle_timeout: {} is not above keepalive_interval \({} s\)"
    with pytest.raises(ValueError, match=not_above.format(20, 25)):
        Tuning(receive_idle_timeout=20)
    with pytest.raises(ValueError, match=r"^receive_idle_timeout: 25 is not above"):
        Tuning(receive_idle_timeout=25)  # equal: closed just as the keepalive is due
    with pytest.raises(ValueError, match=not_above.format(180, 200)):
        Tuning(keepalive_interval=200)
    assert Tuning(receive_idle_timeout=26).receive_idle_timeout == 26.0
    assert Tuning(receive_idle_timeout=10, keepalive_interval=5).receive_idle_timeout == 10.0


@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_prefix_bounds_are_ipaddress_s(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int
) -> None:
    """`prefix_bounds` (integers, for the config's and the routes' containment rules at 10,000 peers) says
    what `ipaddress` says of every prefix, and refuses host bits as `check_prefix` does."""
    length = min(length, address.max_prefixlen)
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    text = tuning.check_prefix(str(network))
    assert tuning.prefix_bounds(text) == (
        network.version,
        int(network.network_address),
        int(network.broadcast_address),
    )
    if network.network_address != address:
        with pytest.raises(ValueError, match="host bits"):
            tuning.prefix_bounds(f"{address}/{length}")
    for bad in ("10.0.0.0", "10.0.0.0/33", "10.0.0/8", "x/8", "::/129"):
        with pytest.raises(ValueError, match="not an IP prefix"):
            tuning.prefix_bounds(bad)
