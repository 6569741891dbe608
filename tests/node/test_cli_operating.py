"""Operating a node (issue 12, items 4 and 5): `vpn-packet example-config` prints a config that parses once
its keys are filled in, and is the one source of `examples/`; the node's logging keeps libraries (pyroute2)
at WARNING unless asked; the systemd unit runs with CAP_NET_ADMIN and no other root power, and ships in the
sdist.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import logging
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vpn_packet.cli import build_parser, main
from vpn_packet.cli.example_config import EXAMPLES, render
from vpn_packet.cli.node import setup_logging
from vpn_packet.node.config import load_config
from vpn_packet.transport.identity import NodeIdentity, generate_identity

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "vpn-packet@.service"


# --- example-config ---------------------------------------------------------------------------------------


def _example_config(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["example-config", *args]) == 0
    return capsys.readouterr().out


def _fill_in(text: str, public_key: str) -> str:
    """What the user does: the peer's public key over the one placeholder line."""
    lines = text.splitlines(keepends=True)
    placeholders = [i for i, line in enumerate(lines) if "PASTE" in line]
    assert len(placeholders) == 1, text
    assert lines[placeholders[0]].startswith("public_key = ")
    lines[placeholders[0]] = f'public_key = "{public_key}"\n'
    return "".join(lines)


def _uncomment(text: str, table: str) -> str:
    """`text` with the commented-out `[table]` and its keys (up to the next blank line) uncommented."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f"# [{table}]\n")
    end = start
    while end < len(lines) and lines[end].strip():
        lines[end] = lines[end].removeprefix("# ")
        end += 1
    return "".join(lines)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, NodeIdentity]:
    return {name: generate_identity(name, tmp_path) for name in ("node-a", "node-b")}


def test_example_config_parses_once_the_keys_are_filled_in(
    tmp_path: Path, keys: dict[str, NodeIdentity], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _example_config(capsys)
    for table in ("interface", "listen", "node", "[peers]"):
        assert f"\n[{table}]\n" in text
    for table in ("tls", "tuning", "resilience"):
        assert f"\n# [{table}]\n" in text  # the alternatives, commented out
    path = tmp_path / "node-a.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^peers\[0\]\.public_key: "):
        load_config(path)  # the placeholder is refused, naming its key

    path.write_text(_fill_in(text, keys["node-b"].public_key))
    config = load_config(path)
    assert config.mode == "key"
    assert config.node.id == "node-a"  # from the key file
    assert config.node.key == tmp_path / "node-a.key"
    assert config.interface.addresses == ("10.8.0.1/24",)
    assert [(p.id, p.endpoint, p.allowed_ips) for p in config.peers] == [
        ("node-b", "192.168.77.2:7000", ("10.8.0.2/32",))
    ]
    assert config.peers[0].public_key == keys["node-b"].public_key_bytes
    assert config.security().peer_keys == {"node-b": keys["node-b"].public_key_bytes}


def test_example_config_commented_tables_parse_when_uncommented(
    tmp_path: Path, keys: dict[str, NodeIdentity], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _fill_in(_example_config(capsys), keys["node-b"].public_key)
    path = tmp_path / "node-a.toml"
    path.write_text(_uncomment(_uncomment(text, "tuning"), "resilience"))
    config = load_config(path)
    assert (config.tuning.worker_buffer_size, config.tuning.read_batch) == (4096, 256)
    assert (config.resilience.failure_threshold, config.resilience.reset_timeout) == (5, 2.0)
    assert config.resilience.max_attempts == 3

    # The CA alternative, done as its comment says: no [node] key, no public_key, [node] id set.
    for name in ("node-a.pem", "node-a-cert.key", "ca.pem"):
        (tmp_path / name).write_text("")
    lines = [
        line
        for line in _uncomment(_example_config(capsys), "tls").splitlines(keepends=True)
        if not line.startswith(('key = "node-a.key"', "public_key = "))
    ]
    lines[lines.index("[node]\n")] = '[node]\nid = "node-a"\n'
    path.write_text("".join(lines))
    config = load_config(path)
    assert config.mode == "ca"
    assert config.tls is not None
    assert config.tls.ca == tmp_path / "ca.pem"


def test_example_config_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--name", "gw", "--peer", "branch-1", "--address", "fd00:8::1/64"]
    args += ["--peer-address", "fd00:8::2", "--endpoint", "[2001:db8::2]:7000"]
    text = _example_config(capsys, *args)
    generate_identity("gw", tmp_path)
    (tmp_path / "elsewhere").mkdir()
    peer = generate_identity("branch-1", tmp_path / "elsewhere")
    path = tmp_path / "gw.toml"
    path.write_text(_fill_in(text, peer.public_key))
    config = load_config(path)
    assert config.node.id == "gw"
    assert config.interface.addresses == ("fd00:8::1/64",)
    assert config.peers[0].allowed_ips == ("fd00:8::2/128",)
    assert config.peers[0].endpoint == "[2001:db8::2]:7000"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "x", "--peer", "x"], "--peer: 'x' is also --name"),
        (["--address", "10.8.0.1"], "--address: "),
        (["--peer-address", "10.8.0.300"], "--peer-address: "),
        (["--endpoint", "nowhere"], "--endpoint: "),
        (["--peer-address", "10.8.0.1"], "contains this node's own address"),
        (["--name", 'a"b'], "no quotes"),
    ],
)
def test_example_config_refuses_options_the_node_would_refuse(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["example-config", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vpn-packet example-config: error: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_the_output_of_example_config(name: str) -> None:
    """One source: examples/ is what the command prints. After changing the template, regenerate them:
    `vpn-packet example-config [ARGS] > examples/NAME`, with the ARGS of `EXAMPLES`."""
    args = EXAMPLES[name]
    parsed = build_parser().parse_args(["example-config", *args])
    expected = render(parsed.name, parsed.peer, parsed.address, parsed.peer_address, parsed.endpoint)
    assert (ROOT / "examples" / name).read_text() == expected, (
        f"examples/{name} differs from `vpn-packet example-config {' '.join(args)}`: regenerate it"
    )


# --- logging ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def bare_logging() -> Iterator[None]:
    """The root logger as in a fresh process (no handlers), restored afterwards with the levels touched.
    A context manager in the test's body: pytest adds its handlers to the root logger after fixtures ran."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = ("vpn_packet", "pyroute2", "asyncio")
    levels = {name: logging.getLogger(name).level for name in names}
    root.handlers.clear()
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, saved in levels.items():
            logging.getLogger(name).setLevel(saved)


def test_debug_level_keeps_pyroute2_at_warning() -> None:
    with bare_logging():
        setup_logging("debug", stream=io.StringIO())
        assert logging.getLogger("pyroute2").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("pyroute2.netlink.nlsocket").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("asyncio").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("vpn_packet.transport.receiver").getEffectiveLevel() == logging.DEBUG
        # pyroute2 sets its logger's level to NOTSET when imported: it still inherits WARNING.
        logging.getLogger("pyroute2").setLevel(logging.NOTSET)
        assert logging.getLogger("pyroute2").getEffectiveLevel() == logging.WARNING


def test_log_libraries_gives_them_the_level_and_a_higher_level_applies_to_all() -> None:
    with bare_logging():
        setup_logging("debug", libraries=True, stream=io.StringIO())
        assert logging.getLogger("pyroute2").getEffectiveLevel() == logging.DEBUG
    with bare_logging():
        setup_logging("error", stream=io.StringIO())
        assert logging.getLogger("pyroute2").getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("vpn_packet").getEffectiveLevel() == logging.ERROR


def test_log_format_is_one_line_per_event() -> None:
    with bare_logging():
        stream = io.StringIO()
        setup_logging("info", stream=stream)
        logging.getLogger("vpn_packet.transport.receiver").info(
            "peer %s connected from %s (%s)", "b", "x", "TLS"
        )
        logging.getLogger("vpn_packet.node").debug("not at info")
        logging.getLogger("pyroute2.ndb").info("library chatter")
        logging.getLogger("pyroute2.ndb").warning("library trouble")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 2, lines
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    vpn_packet\.transport\.receiver: "
            r"peer b connected from x \(TLS\)",
            lines[0],
        )
        assert lines[1].endswith("WARNING pyroute2.ndb: library trouble")


def test_logging_setup_leaves_configured_logging_alone() -> None:
    """Like basicConfig: a program (or pytest) that configured logging keeps its handlers and levels."""
    root = logging.getLogger()
    assert root.handlers  # pytest's
    before = (root.handlers[:], root.level, logging.getLogger("vpn_packet").level)
    setup_logging("debug")
    assert (root.handlers, root.level, logging.getLogger("vpn_packet").level) == before


def test_node_command_sets_up_logging_with_the_rule(
    tmp_path: Path,
    keys: dict[str, NodeIdentity],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`vpn-packet node --log-level debug` (the node itself replaced: it needs root) wires the same rule."""
    from vpn_packet.node import tun_node

    seen: list[tuple[int, int]] = []

    async def fake_run_node(config: object) -> int:
        seen.append(
            (
                logging.getLogger("pyroute2").getEffectiveLevel(),
                logging.getLogger("vpn_packet.node").getEffectiveLevel(),
            )
        )
        return 0

    monkeypatch.setattr(tun_node, "run_node", fake_run_node)
    path = tmp_path / "node-a.toml"
    path.write_text(_fill_in(_example_config(capsys), keys["node-b"].public_key))
    with bare_logging():
        assert main(["node", "--config", str(path), "--log-level", "debug"]) == 0
    with bare_logging():
        assert main(["node", "--config", str(path), "--log-level", "debug", "--log-libraries"]) == 0
    assert seen == [(logging.WARNING, logging.DEBUG), (logging.DEBUG, logging.DEBUG)]


def test_node_help_states_the_logging_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--log-libraries" in text
    assert "libraries (pyroute2's netlink, asyncio) log only warnings and errors" in text


# --- the systemd unit -------------------------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_runs_the_instance_config_with_cap_net_admin_only() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"].split()[1:] == ["node", "--config", "/etc/vpn-packet/%i.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["User"] == "vpn-packet"
    assert "DynamicUser" not in service
    assert service["AmbientCapabilities"] == "CAP_NET_ADMIN"
    assert service["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "vpn-packet",
        "RuntimeDirectoryMode": "0700",
        "StateDirectory": "vpn-packet",  # [discovery] state (issue 21)
        "StateDirectoryMode": "0700",
        "DevicePolicy": "closed",
        "DeviceAllow": "/dev/net/tun rw",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert "PrivateDevices" not in service  # it would hide /dev/net/tun
    assert "AF_NETLINK" in service["RestrictAddressFamilies"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_documents_every_setting() -> None:
    """Every setting sits in a paragraph that starts with a comment saying what it does."""
    commented = False
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("["):
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            assert commented, f"{UNIT.name}:{number}: {line!r} has no comment above it"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    program = shutil.which("vpn-packet")
    if program is None:
        pytest.skip("the vpn-packet command is not installed")
    # verify wants ExecStart's program to exist: the one installed here instead of /opt/vpn-packet's.
    text = UNIT.read_text().replace("/opt/vpn-packet/bin/vpn-packet", program)
    (tmp_path / UNIT.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "vpn-packet@vpn0.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "vpn-packet@" not in result.stderr, result.stderr


def test_sdist_includes_packaging_and_examples() -> None:
    maturin = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["maturin"]
    included = {item["path"] for item in maturin["include"] if item.get("format") == "sdist"}
    assert {"packaging/**/*", "examples/**/*"} <= included
    assert UNIT.is_file()
    assert (ROOT / "packaging" / "README.md").is_file()
