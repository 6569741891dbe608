"""Node configuration: the DESIGN.md section 6 contract parses; every bad value is refused with the key named;
`vpn-packet node` turns a bad file into one line on stderr and exit status 2."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.cli import main
from vpn_packet.node.config import NODE_RESILIENCE, ConfigError, Tuning, load_config, parse_config

CONTRACT = """\
[interface]
name = "vpn0"
address = "10.8.0.1/24"
mtu = 1400

[listen]
address = "0.0.0.0:7000"

[[peers]]
id = "node-b"
endpoint = "192.168.77.2:7000"
allowed_ips = ["10.8.0.2/32"]
"""


def base() -> dict[str, Any]:
    return {
        "interface": {"name": "vpn0", "address": "10.8.0.1/24", "mtu": 1400},
        "listen": {"address": "0.0.0.0:7000"},
        "node": {"id": "node-a"},
        "peers": [
            {"id": "node-b", "endpoint": "192.168.77.2:7000", "allowed_ips": ["10.8.0.2/32"]},
            {"id": "node-c", "endpoint": "[fd00::3]:7000", "allowed_ips": ["10.8.0.3/32", "fd00:8::/64"]},
        ],
    }


def test_contract_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(CONTRACT)
    config = load_config(path)
    assert config.interface.name == "vpn0"
    assert config.interface.addresses == ("10.8.0.1/24",)
    assert config.interface.mtu == 1400
    assert config.interface.txqueuelen == 1000
    assert config.listen == ("0.0.0.0", 7000)
    assert [(p.id, p.endpoint, p.allowed_ips) for p in config.peers] == [
        ("node-b", "192.168.77.2:7000", ("10.8.0.2/32",))
    ]
    assert config.node.id  # the host name by default
    assert config.tls is None
    assert config.tuning == Tuning()
    assert config.peers[0].to_peer().allowed_ips == ("10.8.0.2/32",)


def test_examples_parse() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    a = load_config(examples / "node-a.toml")
    b = load_config(examples / "node-b.toml")
    assert (a.node.id, b.node.id) == ("node-a", "node-b")
    assert a.peers[0].id == b.node.id
    assert b.peers[0].id == a.node.id


def test_optional_tables(tmp_path: Path) -> None:
    data = base()
    data["interface"]["address"] = ["10.8.0.1/24", "fd00:8::1/64"]
    data["interface"]["txqueuelen"] = 5000
    data["node"].update(log_level="DEBUG", metrics_file="m.json", shutdown_timeout=2, drop_log_interval=1.5)
    data["tuning"] = {"worker_buffer_size": 8192, "read_batch": 64, "coalesce": 0, "write_timeout": 3}
    config = parse_config(data, base=tmp_path)
    assert config.interface.addresses == ("10.8.0.1/24", "fd00:8::1/64")
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
        ("tls", {"key": "k.pem"}, "tls.cert: missing"),
        ("tls", {"cert": "nope.pem", "key": "k.pem"}, "tls.cert: file not found"),
        ("extra", 1, "extra: unknown key"),
        ("resilience", {"reset_timeout": -1}, "resilience.reset_timeout: -1 must be 0 or more"),
        ("resilience", {"max_attempts": 0}, "resilience.max_attempts: 0 is out of range"),
        ("resilience", {"max_interval": 0.01}, "resilience.max_interval: must be at least"),
        ("resilience", {"max_elapsed": 0}, "resilience.max_elapsed: 0 must be positive"),
        ("resilience", {"jitter": 1}, "resilience.jitter: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, path: str, value: object, message: str) -> None:
    data = base()
    _set(data, path, value)
    with pytest.raises(ConfigError) as info:
        parse_config(data, base=tmp_path)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.key == message.split(":")[0]


def test_resilience_defaults_and_keys(tmp_path: Path) -> None:
    config = parse_config(base(), base=tmp_path)
    assert config.resilience == NODE_RESILIENCE
    assert config.resilience.reset_timeout == 2.0  # a restarted peer is found again within seconds
    data = base()
    data["resilience"] = {"failure_threshold": 3, "reset_timeout": 0.5, "max_attempts": 1, "max_elapsed": 4}
    r = parse_config(data, base=tmp_path).resilience
    assert (r.failure_threshold, r.reset_timeout, r.max_attempts, r.max_elapsed) == (3, 0.5, 1, 4.0)


def test_tls_pinned_needs_every_peer_cert(tmp_path: Path) -> None:
    for name in ("a.pem", "a.key", "b.pem"):
        (tmp_path / name).write_text("x")
    data = base()
    data["tls"] = {"cert": "a.pem", "key": "a.key"}
    data["peers"][0]["cert"] = "b.pem"
    with pytest.raises(ConfigError, match=r"^peers\[1\]\.cert: missing"):
        parse_config(data, base=tmp_path)
    data["peers"].pop()
    config = parse_config(data, base=tmp_path)
    assert config.tls is not None
    assert config.tls.ca is None
    assert config.peers[0].cert == tmp_path / "b.pem"
    data["tls"]["ca"] = "missing-ca.pem"
    with pytest.raises(ConfigError, match=r"^tls\.ca: file not found"):
        parse_config(data, base=tmp_path)


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
        ("[interface\n", "not valid TOML"),
    ],
)
def test_cli_bad_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "node.toml"
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
