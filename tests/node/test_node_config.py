"""Node configuration: the DESIGN.md section 6 contract parses; every bad value is refused with the key named;
`vpn-packet node` turns a bad file into one line on stderr and exit status 2.

Secure by default (issue 10): a node needs `[node] key` and every peer's `public_key`, or a CA (`[tls]` with
`ca`, `cert`, `key` and `[node] id`), or `[node] insecure = true` (which the node warns about at every
start); a file with none of them is refused with a line that says how to make keys."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.node.config import (
    NODE_RESILIENCE,
    ConfigError,
    Tuning,
    load_config,
    parse_config,
    start_warnings,
)
from vpn_packet.node.tun_node import INSECURE_WARNING, TunNode
from vpn_packet.resilience import ResilienceConfig
from vpn_packet.testutil.faketun import FakeTun
from vpn_packet.transport.identity import NodeIdentity, generate_identity, load_identity

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CONTRACT = """\
[interface]
name = "vpn0"
address = "10.8.0.1/24"
mtu = 1400

[listen]
address = "0.0.0.0:7000"

[node]
key = "node-a.key"

[[peers]]
id = "node-b"
endpoint = "192.168.77.2:7000"
allowed_ips = ["10.8.0.2/32"]
public_key = "{public_key}"
"""


def _identity(directory: Path, name: str) -> NodeIdentity:
    """`directory/name.key`, made on first use."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.key"
    return load_identity(path) if path.exists() else generate_identity(name, directory)


def contract(directory: Path) -> Path:
    """The contract file in `directory`, node-a.key beside it, node-b's real public key (its key file is
    on the other host: `directory/elsewhere`) in it."""
    _identity(directory, "node-a")
    path = directory / "node.toml"
    path.write_text(CONTRACT.format(public_key=_identity(directory / "elsewhere", "node-b").public_key))
    return path


def base(directory: Path) -> dict[str, Any]:
    """Parsed TOML of a valid key-mode config (node-a.key in `directory`) with two peers and their keys."""
    _identity(directory, "node-a")
    return {
        "interface": {"name": "vpn0", "address": "10.8.0.1/24", "mtu": 1400},
        "listen": {"address": "0.0.0.0:7000"},
        "node": {"key": "node-a.key"},
        "peers": [
            {
                "id": "node-b",
                "endpoint": "192.168.77.2:7000",
                "allowed_ips": ["10.8.0.2/32"],
                "public_key": _identity(directory / "peers", "node-b").public_key,
            },
            {
                "id": "node-c",
                "endpoint": "[fd00::3]:7000",
                "allowed_ips": ["10.8.0.3/32", "fd00:8::/64"],
                "public_key": _identity(directory / "peers", "node-c").public_key,
            },
        ],
    }


def test_contract_example_parses(tmp_path: Path) -> None:
    config = load_config(contract(tmp_path))
    assert config.interface.name == "vpn0"
    assert config.interface.addresses == ("10.8.0.1/24",)
    assert config.interface.mtu == 1400
    assert config.interface.txqueuelen == 1000
    assert config.listen == ("0.0.0.0", 7000)
    assert [(p.id, p.endpoint, p.allowed_ips) for p in config.peers] == [
        ("node-b", "192.168.77.2:7000", ("10.8.0.2/32",))
    ]
    assert config.node.id == "node-a"  # no [node] id: the name genkey put in the key file
    assert config.node.key == tmp_path / "node-a.key"  # relative to the config file
    assert config.mode == "key"
    assert config.tls is None
    assert config.tuning == Tuning()
    assert config.peers[0].to_peer().allowed_ips == ("10.8.0.2/32",)
    node_b = load_identity(tmp_path / "elsewhere" / "node-b.key")
    assert config.peers[0].public_key == node_b.public_key_bytes
    security = config.security()
    assert (security.mode, security.local_id, security.encrypted) == ("key", "node-a", True)
    assert security.identity is not None
    assert security.identity.public_key == load_identity(tmp_path / "node-a.key").public_key
    assert security.peer_keys == {"node-b": node_b.public_key_bytes}
    assert security.peer_of_key(node_b.public_key_bytes) == "node-b"


def test_examples_parse_once_keys_are_filled_in(tmp_path: Path) -> None:
    """examples/node-a.toml and node-b.toml, as a user would use them: genkey on each host, the other's
    public key pasted over the placeholder line."""
    keys = {name: generate_identity(name, tmp_path) for name in ("node-a", "node-b")}
    configs = {}
    for me, other in (("node-a", "node-b"), ("node-b", "node-a")):
        text = (EXAMPLES / f"{me}.toml").read_text()
        lines = text.splitlines(keepends=True)
        placeholders = [i for i, line in enumerate(lines) if "PASTE" in line]
        assert len(placeholders) == 1, text
        assert lines[placeholders[0]].startswith("public_key = ")
        lines[placeholders[0]] = f'public_key = "{keys[other].public_key}"\n'
        path = tmp_path / f"{me}.toml"
        path.write_text("".join(lines))
        configs[me] = load_config(path)
    a, b = configs["node-a"], configs["node-b"]
    assert (a.node.id, b.node.id) == ("node-a", "node-b")
    assert (a.mode, b.mode) == ("key", "key")
    assert a.peers[0].id == b.node.id
    assert b.peers[0].id == a.node.id
    assert a.peers[0].public_key == keys["node-b"].public_key_bytes
    assert b.peers[0].public_key == keys["node-a"].public_key_bytes
    assert a.security().peer_keys == {"node-b": keys["node-b"].public_key_bytes}


def test_examples_as_shipped_are_refused_naming_the_placeholder(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "node-a.toml", tmp_path)
    generate_identity("node-a", tmp_path)
    with pytest.raises(ConfigError, match=r"^peers\[0\]\.public_key: .*is not a public key"):
        load_config(tmp_path / "node-a.toml")


def test_optional_tables(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["interface"]["address"] = ["10.8.0.1/24", "fd00:9::1/64"]  # fd00:8::/64 is node-c's
    data["interface"]["txqueuelen"] = 5000
    data["node"].update(log_level="DEBUG", metrics_file="m.json", shutdown_timeout=2, drop_log_interval=1.5)
    data["tuning"] = {"worker_buffer_size": 8192, "read_batch": 64, "coalesce": 0, "write_timeout": 3}
    config = parse_config(data, base=tmp_path)
    assert config.interface.addresses == ("10.8.0.1/24", "fd00:9::1/64")
    assert config.interface.txqueuelen == 5000
    assert config.node.log_level == "debug"
    assert config.node.metrics_file == tmp_path / "m.json"
    assert config.node.shutdown_timeout == 2.0
    assert config.node.metrics_listen is None
    data["node"]["metrics_listen"] = "127.0.0.1:9108"
    assert parse_config(data, base=tmp_path).node.metrics_listen == ("127.0.0.1", 9108)
    assert config.tuning.worker_buffer_size == 8192
    assert config.tuning.read_batch == 64
    assert config.tuning.coalesce == 0
    assert config.tuning.write_timeout == 3.0


def _set(data: dict[str, Any], path: str, value: object) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
    target: Any = data
    for key in keys[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "peers.1.allowed_ips",
            ["10.8.0.300/32"],
            "peers[1].allowed_ips[0]: '10.8.0.300/32' is not an IP prefix",
        ),
        ("peers.0.allowed_ips", ["10.8.0.1/24"], "peers[0].allowed_ips[0]: '10.8.0.1/24' has host bits set"),
        ("peers.1.allowed_ips", ["10.8.0.2/32"], "peers[1].allowed_ips[0]: 10.8.0.2/32 is already given to"),
        ("peers.0.allowed_ips", "10.8.0.2/32", "peers[0].allowed_ips: expected an array"),
        ("peers.0.allowed_ips", [7], "peers[0].allowed_ips[0]: 7 is not an IP prefix"),
        ("peers.0.allowed_ips", _DELETE, "peers[0].allowed_ips: missing"),
        ("peers.1.id", "node-b", "peers[1].id: 'node-b' is already the id of peers[0]"),
        ("peers.0.id", "", "peers[0].id: expected a non-empty string"),
        (
            "peers.0.endpoint",
            "192.168.77.2",
            "peers[0].endpoint: endpoint '192.168.77.2': expected host:port",
        ),
        ("peers.0.endpoint", "10.0.0.1:70000", "peers[0].endpoint:"),
        ("peers.0.colour", "blue", "peers[0].colour: unknown key"),
        ("peers", {"id": "x"}, "peers: expected an array of tables"),
        ("interface.name", "a-very-long-interface-name", "interface.name:"),
        ("interface.address", "10.8.0.1", "interface.address: '10.8.0.1' needs a prefix length"),
        ("interface.address", "10.8.0.999/24", "interface.address: '10.8.0.999/24' is not an address"),
        ("interface.address", ["10.8.0.1/24", 5], "interface.address[1]:"),
        ("interface.address", _DELETE, "interface.address: missing"),
        ("interface.mtu", 100, "interface.mtu: 100 is out of range 576..65535"),
        ("interface.mtu", "1400", "interface.mtu: expected an integer"),
        ("interface.mtu", True, "interface.mtu: expected an integer"),
        ("interface.txqueuelen", 0, "interface.txqueuelen: 0 is out of range"),
        ("interface.mode", "tap", "interface.mode: unknown key"),
        ("interface", _DELETE, "interface: missing table"),
        ("interface", "vpn0", "interface: expected a table, got a string"),
        ("listen", _DELETE, "listen: missing table"),
        ("listen.address", "0.0.0.0", "listen.address: '0.0.0.0' is not an IP address and port"),
        ("listen.address", "example.org:7000", "listen.address: 'example.org:7000' is not an IP address"),
        ("node.id", "node-b", "node.id: 'node-b' is also the id of a peer"),
        ("tuning", {"ack_timeout": 0.001}, "tuning.ack_timeout: 0.001 is below 0.1 seconds: no ack"),
        (
            "tuning",
            {"receive_idle_timeout": 20},
            "tuning.receive_idle_timeout: 20 is not above tuning.keepalive_interval (25 s): a quiet peer",
        ),
        (
            "tuning",
            {"keepalive_interval": 60, "receive_idle_timeout": 60},
            "tuning.receive_idle_timeout: 60 is not above tuning.keepalive_interval (60 s)",
        ),
        (
            "tuning",
            {"idle_close": 25},
            "tuning.idle_close: 25 is not above tuning.keepalive_interval (25 s): a peer in occasional use",
        ),
        ("tuning", {"warm_peers": -1}, "tuning.warm_peers: -1 is out of range 0..1048576"),
        ("node.key", "absent.key", "node.key: file not found"),
        ("node.insecure", "yes", "node.insecure: expected true or false"),
        ("peers.0.public_key", _DELETE, "peers[0].public_key: missing"),
        ("peers.1.public_key", "", "peers[1].public_key: expected a non-empty string"),
        ("peers.0.public_key", "bm90IGEga2V5", "peers[0].public_key: 'bm90IGEga2V5' decodes to 9 bytes"),
        ("peers.0.public_key", "not a key!", "peers[0].public_key: 'not a key!' is not a public key"),
        ("peers.0.cert", "node-b.pem", "peers[0].cert: unknown key"),
        ("node.log_level", "loud", "node.log_level: 'loud': expected one of"),
        ("node.shutdown_timeout", 0, "node.shutdown_timeout: 0 must be positive"),
        ("node.metrics_interval", -1, "node.metrics_interval: -1 must be 0 or more"),
        (
            "node.metrics_listen",
            "localhost:9108",
            "node.metrics_listen: 'localhost:9108' is not an IP address",
        ),
        ("tuning", {"worker_buffer_size": 0}, "tuning.worker_buffer_size: 0 is out of range"),
        ("tuning", {"write_timeout": "fast"}, "tuning.write_timeout: expected a number of seconds"),
        ("tuning", {"turbo": True}, "tuning.turbo: unknown key"),
        ("tls", {"key": "k.pem", "ca": "ca.pem"}, "tls.cert: missing"),
        ("tls", {"cert": "nope.pem", "key": "k.pem", "ca": "ca.pem"}, "tls.cert: file not found"),
        ("extra", 1, "extra: unknown key"),
        ("resilience", {"reset_timeout": -1}, "resilience.reset_timeout: -1 must be 0 or more"),
        ("resilience", {"max_attempts": 0}, "resilience.max_attempts: 0 is out of range"),
        ("resilience", {"max_interval": 0.01}, "resilience.max_interval: must be at least"),
        ("resilience", {"max_elapsed": 0}, "resilience.max_elapsed: 0 must be positive"),
        ("resilience", {"jitter": 1}, "resilience.jitter: unknown key"),
        # Values each fine alone that cannot work (issue 11).
        ("interface.address", "0.0.0.0/0", "interface.address: '0.0.0.0/0': a /0 prefix covers every"),
        ("interface.address", "10.8.0.1/0", "interface.address: '10.8.0.1/0': a /0 prefix"),
        ("interface.address", ["10.8.0.1/24", "::/0"], "interface.address[1]: '::/0': a /0 prefix"),
        ("interface.address", "0.0.0.0/8", "interface.address: '0.0.0.0/8': 0.0.0.0 is the unspecified"),
        ("interface.address", "10.8.0.0/24", "interface.address: '10.8.0.0/24': 10.8.0.0 is the network"),
        ("interface.address", "10.8.0.255/24", "interface.address: '10.8.0.255/24': 10.8.0.255 is the broad"),
        ("interface.address", "fd00:9::/64", "interface.address: 'fd00:9::/64': fd00:9:: is the network"),
        ("interface.address", "127.0.0.2/8", "interface.address: '127.0.0.2/8': 127.0.0.2 is a loopback"),
        ("interface.address", "224.0.0.1/24", "interface.address: '224.0.0.1/24': 224.0.0.1 is a multicast"),
        ("peers", [], "peers: empty: a node without [[peers]] has nobody to forward packets to"),
        ("peers", _DELETE, "peers: missing: a node without [[peers]]"),
        ("peers.0.allowed_ips", [], "peers[0].allowed_ips: empty: a peer that owns no prefix"),
        (
            "peers.0.allowed_ips",
            ["10.8.0.0/24"],
            "peers[0].allowed_ips[0]: 10.8.0.0/24 contains this node's own address 10.8.0.1 "
            "(interface.address): packets from it would be dropped by the kernel as martians",
        ),
        (
            "peers.1.allowed_ips",
            ["10.8.0.3/32", "10.8.0.1/32"],
            "peers[1].allowed_ips[1]: 10.8.0.1/32 contains this node's own address 10.8.0.1",
        ),
        (
            "peers.0.allowed_ips",
            ["10.8.0.2/32", "192.168.77.0/24"],
            "peers[0].allowed_ips[1]: 192.168.77.0/24 contains 192.168.77.2, the endpoint of peer 'node-b' "
            "(peers[0].endpoint): the tunnel would route its own traffic to that peer into itself",
        ),
        (
            "peers.1.allowed_ips",
            ["10.8.0.3/32", "192.168.0.0/16"],
            "peers[1].allowed_ips[1]: 192.168.0.0/16 contains 192.168.77.2, the endpoint of peer 'node-b'",
        ),
        (
            "peers.0.allowed_ips",
            ["10.8.0.2/32", "fd00::/64"],
            "peers[0].allowed_ips[1]: fd00::/64 contains fd00::3, the endpoint of peer 'node-c'",
        ),
        (
            "peers.0.endpoint",
            "127.0.0.1:7000",
            "peers[0].endpoint: 127.0.0.1:7000 is this node's own listen address "
            "(0.0.0.0:7000, listen.address): the node would connect to itself",
        ),
        ("peers.0.endpoint", "localhost:7000", "peers[0].endpoint: localhost:7000 is this node's own listen"),
        ("peers.0.endpoint", "10.8.0.1:7000", "peers[0].endpoint: 10.8.0.1:7000 is this node's own listen"),
        ("peers.1.endpoint", "0.0.0.0:7000", "peers[1].endpoint: 0.0.0.0:7000 is this node's own listen"),
        ("listen.address", "192.168.77.2:7000", "peers[0].endpoint: 192.168.77.2:7000 is this node's own"),
        (
            "peers.1.endpoint",
            "192.168.77.2:7000",
            "peers[1].endpoint: 192.168.77.2:7000 is already the endpoint of peers[0] ('node-b')",
        ),
        (
            "peers.0.endpoint",
            "[fd00:0::3]:7000",
            "peers[1].endpoint: [fd00::3]:7000 is already the endpoint of peers[0] ('node-b')",
        ),
        ("tuning", {"write_timeout": 1e308}, "tuning.write_timeout: 1e+308 is more than 86400 seconds"),
        ("tuning", {"idle_timeout": 86401}, "tuning.idle_timeout: 86401 is more than 86400 seconds"),
        ("node.shutdown_timeout", 1e9, "node.shutdown_timeout: 1000000000.0 is more than 86400 seconds"),
        ("resilience", {"reset_timeout": 1e308}, "resilience.reset_timeout: 1e+308 is more than 86400"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, path: str, value: object, message: str) -> None:
    data = base(tmp_path)
    _set(data, path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(data, base=tmp_path)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.key == message.split(":")[0]


def test_what_can_work_is_still_accepted(tmp_path: Path) -> None:
    """The issue-11 rules refuse only what cannot work: the neighbours of each refused case parse."""
    accepted: list[tuple[str, object]] = [
        ("interface.address", "10.8.0.1/32"),  # a host route
        ("interface.address", "10.8.0.0/31"),  # RFC 3021: both addresses of a /31 are hosts
        ("interface.address", ["10.8.0.1/24", "fd00:9::1/64"]),
        ("peers.0.allowed_ips", ["10.8.0.2/32", "10.9.0.0/16"]),  # a routed network behind the peer
        # A gateway peer: a prefix wider than our whole subnet holds our address, but the subnet's own
        # route is more specific (only a peer forging our address as its source could be dropped).
        ("peers.0.allowed_ips", ["10.0.0.0/8"]),
        ("peers.0.endpoint", "127.0.0.1:7001"),  # another port on this host: another node
        ("peers.0.endpoint", "node-b.example:7000"),  # a host name: checked when connecting
        ("listen.address", "127.0.0.1:7000"),  # not the peers' addresses
    ]
    for path, value in accepted:
        data = base(tmp_path)
        _set(data, path, value)
        parse_config(data, base=tmp_path)
    data = base(tmp_path)
    data["listen"]["address"] = "127.0.0.1:7000"
    data["peers"][0]["endpoint"] = "127.0.0.2:7000"  # another loopback address: another socket
    parse_config(data, base=tmp_path)
    data["listen"]["address"] = "0.0.0.0:7000"
    data["peers"][0]["endpoint"] = "[::1]:7000"  # 0.0.0.0 does not take IPv6 connections
    parse_config(data, base=tmp_path)
    data["tuning"] = {"write_timeout": 86400}  # one day is the most
    assert parse_config(data, base=tmp_path).tuning.write_timeout == 86400.0


def test_an_endpoint_on_the_wildcard_listen_port_is_this_node(tmp_path: Path) -> None:
    """Listening on :: takes IPv4 connections too (dual stack): 127.0.0.1 on the listen port is this node."""
    data = base(tmp_path)
    data["listen"]["address"] = "[::]:7000"
    data["peers"][1]["endpoint"] = "127.0.0.1:7000"
    error = _refused(data, tmp_path)
    assert error.key == "peers[1].endpoint"
    assert str(error).startswith(
        "peers[1].endpoint: 127.0.0.1:7000 is this node's own listen address ([::]:7000"
    )
    data["peers"][1]["endpoint"] = "[::1]:7000"
    assert _refused(data, tmp_path).key == "peers[1].endpoint"
    data["peers"][1]["endpoint"] = "[::1]:7001"
    parse_config(data, base=tmp_path)


def test_resilience_defaults_and_keys(tmp_path: Path) -> None:
    config = parse_config(base(tmp_path), base=tmp_path)
    assert config.resilience == NODE_RESILIENCE == ResilienceConfig()  # one source: the library's default
    assert config.resilience.reset_timeout == 2.0  # a restarted peer is found again within seconds
    data = base(tmp_path)
    data["resilience"] = {"failure_threshold": 3, "reset_timeout": 0.5, "max_attempts": 1, "max_elapsed": 4}
    r = parse_config(data, base=tmp_path).resilience
    assert (r.failure_threshold, r.reset_timeout, r.max_attempts, r.max_elapsed) == (3, 0.5, 1, 4.0)


# --- secure by default ------------------------------------------------------------------------------------


def _refused(data: dict[str, Any], directory: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base=directory)
    return info.value


def test_no_identity_is_refused_saying_how_to_make_keys(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["node"]["key"]
    for peer in data["peers"]:
        del peer["public_key"]
    error = _refused(data, tmp_path)
    assert error.key == "node.key"
    assert "vpn-packet genkey" in str(error)
    assert "insecure = true" in str(error)
    assert "\n" not in str(error)


def test_cli_without_keys_is_one_line_that_says_how_to_make_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = CONTRACT.replace('key = "node-a.key"\n', "").replace('public_key = "{public_key}"\n', "")
    path = tmp_path / "node.toml"
    path.write_text(text)
    assert "key" not in text.replace("[node]", "")
    assert main(["node", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1, err
    assert err.startswith(f"vpn-packet node: error: {path}: node.key: missing")
    assert "vpn-packet genkey" in err
    assert "insecure" in err


def test_a_peer_without_public_key_is_refused(tmp_path: Path) -> None:
    data = base(tmp_path)
    del data["peers"][0]["public_key"]
    error = _refused(data, tmp_path)
    assert error.key == "peers[0].public_key"
    assert str(error).startswith("peers[0].public_key: missing")
    assert "node-b" in str(error)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("AAAA", "decodes to 3 bytes"),
        ("@" * 44, "is not a public key"),
        ("A" * 43 + "=" + "A", "is not a public key"),
        ("QUFB" * 12, "decodes to 36 bytes"),
    ],
)
def test_a_malformed_public_key_is_refused(tmp_path: Path, bad: str, expected: str) -> None:
    data = base(tmp_path)
    data["peers"][1]["public_key"] = bad
    error = _refused(data, tmp_path)
    assert error.key == "peers[1].public_key"
    assert expected in str(error)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["peers"][1]["public_key"] = data["peers"][0]["public_key"]
    error = _refused(data, tmp_path)
    assert (error.key, str(error)) == (
        "peers[1].public_key",
        "peers[1].public_key: the same key as peer 'node-b'",
    )
    data = base(tmp_path)
    data["peers"][0]["public_key"] = load_identity(tmp_path / "node-a.key").public_key
    error = _refused(data, tmp_path)
    assert error.key == "peers[0].public_key"
    assert "the same key as this node" in str(error)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    data = base(tmp_path)
    key = tmp_path / "node-a.key"
    key.chmod(0o644)
    error = _refused(data, tmp_path)
    assert error.key == "node.key"
    assert "permissions -rw-r--r--" in str(error)
    assert f"chmod 600 {key}" in str(error)
    key.chmod(0o600)
    assert parse_config(data, base=tmp_path).mode == "key"


def test_node_id_defaults_to_the_name_in_the_key_file(tmp_path: Path) -> None:
    generate_identity("alpha", tmp_path)
    data = base(tmp_path)
    data["node"]["key"] = "alpha.key"
    assert parse_config(data, base=tmp_path).node.id == "alpha"
    data["node"]["id"] = "node-a"  # an explicit id wins: the key proves who we are, the id is a label
    config = parse_config(data, base=tmp_path)
    assert config.node.id == "node-a"
    assert config.security().local_id == "node-a"
    data["node"]["id"] = "node-c"
    assert _refused(data, tmp_path).key == "node.id"  # still not a peer's id


def test_ca_mode_needs_ca_cert_key_and_node_id(tmp_path: Path) -> None:
    from vpn_packet.testutil.certs import write_test_pki

    pki = write_test_pki(tmp_path / "pki", ["node-a", "node-b"])
    creds = pki.nodes["node-a"]
    tls = {"cert": str(creds.cert), "key": str(creds.key), "ca": str(pki.ca_cert)}
    data = base(tmp_path)
    del data["node"]["key"]
    for peer in data["peers"]:
        del peer["public_key"]
    data["node"]["id"] = "node-a"
    data["tls"] = dict(tls)
    config = parse_config(data, base=tmp_path)
    assert config.mode == "ca"
    assert config.tls is not None
    assert config.tls.ca == pki.ca_cert
    security = config.security()
    assert (security.mode, security.local_id, security.encrypted) == ("ca", "node-a", True)
    for missing in ("ca", "cert", "key"):
        data["tls"] = {k: v for k, v in tls.items() if k != missing}
        error = _refused(data, tmp_path)
        assert error.key == f"tls.{missing}"
        assert str(error).startswith(f"tls.{missing}: missing")
    data["tls"] = dict(tls)
    del data["node"]["id"]
    error = _refused(data, tmp_path)
    assert error.key == "node.id"
    assert "certificate" in str(error)
    data["node"]["id"] = "node-a"
    data["node"]["key"] = "node-a.key"
    assert _refused(data, tmp_path).key == "node.key"  # keys or a CA, not both
    del data["node"]["key"]
    data["peers"][0]["public_key"] = load_identity(tmp_path / "peers" / "node-b.key").public_key
    assert _refused(data, tmp_path).key == "peers[0].public_key"


def test_insecure_is_accepted_with_an_id_and_nothing_else(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["node"] = {"id": "node-a", "insecure": True}
    for peer in data["peers"]:
        del peer["public_key"]
    config = parse_config(data, base=tmp_path)
    assert config.mode == "insecure"
    assert config.identity is None
    security = config.security()
    assert (security.mode, security.local_id, security.encrypted) == ("insecure", "node-a", False)
    assert security.server_context is None
    assert security.client_context is None

    data["node"]["key"] = "node-a.key"  # insecure + key: which one is meant?
    error = _refused(data, tmp_path)
    assert error.key == "node.key"
    assert "insecure" in str(error)
    del data["node"]["key"]
    data["peers"][0]["public_key"] = load_identity(tmp_path / "peers" / "node-b.key").public_key
    assert _refused(data, tmp_path).key == "peers[0].public_key"
    del data["peers"][0]["public_key"]
    del data["node"]["id"]
    assert _refused(data, tmp_path).key == "node.id"


@pytest.mark.parametrize("insecure", [True, False])
async def test_an_insecure_node_warns_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, insecure: bool
) -> None:
    data = base(tmp_path)
    if insecure:
        data["node"] = {"id": "node-a", "insecure": True}
        for peer in data["peers"]:
            del peer["public_key"]
    config = dataclasses.replace(parse_config(data, base=tmp_path), listen=("127.0.0.1", 0))  # any free port
    node = TunNode(config, tun_factory=FakeTun.open)
    with caplog.at_level(logging.INFO, logger="vpn_packet.node"):
        await node.start()
        try:
            assert node.running
        finally:
            assert await node.shutdown()
    warnings = [r for r in caplog.records if r.getMessage() == INSECURE_WARNING]
    assert [r.levelno for r in warnings] == ([logging.WARNING] if insecure else [])
    assert "plaintext" in INSECURE_WARNING
    assert "vpn-packet genkey" in INSECURE_WARNING
    running = [r.getMessage() for r in caplog.records if " running: " in r.getMessage()]
    assert len(running) == 1
    assert ("PLAINTEXT" in running[0]) == insecure


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[interface\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CONTRACT.replace('"10.8.0.2/32"', '"10.8.0.300/32"'), "peers[0].allowed_ips[0]: '10.8.0.300/32'"),
        (CONTRACT.replace("mtu = 1400", "mtu = 1"), "interface.mtu: 1 is out of range"),
        (CONTRACT.replace("{public_key}", "short"), "peers[0].public_key: 'short' is not a public key"),
        (CONTRACT.replace("node-a.key", "absent.key"), "node.key: file not found"),
        ("[interface\n", "not valid TOML"),
    ],
)
def test_cli_bad_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "node.toml"
    text = text.replace("{public_key}", _identity(tmp_path / "elsewhere", "node-b").public_key)
    _identity(tmp_path, "node-a")
    path.write_text(textwrap.dedent(text))
    assert main(["node", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("vpn-packet node: error: ")
    assert expected in err


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--config", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert "none.toml" in err
    assert err.count("\n") == 1


# ---- issue 22: settings that cannot work, said at start naming the key ----


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ("[tuning]\nack_timeout = 0.0.1\n", "tuning.ack_timeout", "line 2, column 18"),
        (
            '[[peers]]\nid = "a"\n[[peers]]\nid = "b"\nallowed_ips = ["10.8.0.2/32",\n',
            "peers[1].allowed_ips",
            "",
        ),
        ("[node]\nlog_level = info\n", "node.log_level", "line 2"),
        ('[interface]\nname = "vpn0"\nname = "vpn1"\n', "interface.name", "line 3"),
        ("[node\nid = 1\n", "", "line 1"),  # a broken table header: no key to name
    ],
)
def test_a_toml_syntax_error_names_the_key(tmp_path: Path, text: str, key: str, where: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}: not valid TOML: " if key else f"{path}: not valid TOML: ")
    assert where in message


def test_the_node_command_names_the_file_and_the_key_of_a_toml_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[tuning]\nack_timeout = 0.0.1\n")
    assert main(["node", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"vpn-packet node: error: {path}: tuning.ack_timeout: not valid TOML: Expected newline or end of "
        "document after a statement (at line 2, column 18)\n"
    )


def test_a_metrics_file_the_node_cannot_write_is_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: `/run/vpn0.json` under the shipped unit (only /run/vpn-packet writable) failed at exit."""
    data = base(tmp_path)
    data["node"]["metrics_file"] = str(tmp_path / "missing" / "m.json")
    error = _refused(data, tmp_path)
    assert error.key == "node.metrics_file"
    assert f"the directory {tmp_path / 'missing'} does not exist" in str(error)
    data["node"]["metrics_file"] = str(tmp_path)
    assert "is a directory" in str(_refused(data, tmp_path))
    locked = tmp_path / "locked"
    locked.mkdir()
    data["node"]["metrics_file"] = str(locked / "m.json")
    assert parse_config(data, base=tmp_path).node.metrics_file == locked / "m.json"
    # A directory this process may not write to (root may write anywhere, so the answer of access(2) is
    # given here): refused with the reason and the way out under the systemd unit.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    error = _refused(data, tmp_path)
    assert error.key == "node.metrics_file"
    assert (
        f"cannot write {locked / 'm.json'}: this process (uid {os.getuid()}) may not create files in"
        in str(error)
    )
    assert "only /run/vpn-packet is writable" in str(error)


def test_start_warnings_name_the_key(tmp_path: Path) -> None:
    """Valid settings that may not work as meant: said at start (issue 22)."""
    data = base(tmp_path)
    forwarding_off = {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"}.get
    # node-c's fd00:8::/64 is beyond an interface without IPv6: a network behind node-c.
    (warning,) = start_warnings(parse_config(data, base=tmp_path), read_sysctl=forwarding_off)
    assert warning.startswith("peers[1].allowed_ips: 'node-c' owns fd00:8::/64, beyond this tunnel's")
    # Every peer inside the tunnel's subnets: nothing to say.
    data["interface"]["address"] = ["10.8.0.1/24", "fd00::1/16"]
    assert start_warnings(parse_config(data, base=tmp_path), read_sysctl=forwarding_off) == []

    # A gateway peer: node-b owns two networks behind it.
    data["peers"][0]["allowed_ips"] = ["10.8.0.2/32", "192.168.50.0/24", "198.51.100.0/24"]
    config = parse_config(data, base=tmp_path)
    (warning,) = start_warnings(config, read_sysctl=forwarding_off)
    assert warning.startswith("peers[0].allowed_ips: 'node-b' owns 192.168.50.0/24, 198.51.100.0/24, beyond")
    assert "net.ipv4.ip_forward is 0 here (sysctl -w net.ipv4.ip_forward=1" in warning
    assert "node-b needs it too" in warning
    forwarding_on = {"net.ipv4.ip_forward": "1"}.get
    assert start_warnings(config, read_sysctl=forwarding_on) == []
    # IPv6 beyond the subnets, with IPv6 forwarding off.
    data["peers"][1]["allowed_ips"] = ["10.8.0.3/32", "2001:db8::/32"]
    warnings = start_warnings(parse_config(data, base=tmp_path), read_sysctl=forwarding_off)
    assert [w.split(":")[0] for w in warnings] == ["peers[0].allowed_ips", "peers[1].allowed_ips"]
    assert "net.ipv6.conf.all.forwarding is 0 here" in warnings[1]


def test_a_node_id_other_than_the_key_name_is_warned(tmp_path: Path) -> None:
    data = base(tmp_path)
    data["node"]["id"] = "gateway"
    config = parse_config(data, base=tmp_path)  # the id is a label: it runs
    (warning,) = start_warnings(config, read_sysctl=lambda _: "1")
    assert warning.startswith(f"node.id: 'gateway' is not the name in the key file {tmp_path / 'node-a.key'}")
    data["node"]["id"] = "node-a"
    assert start_warnings(parse_config(data, base=tmp_path), read_sysctl=lambda _: "1") == []
