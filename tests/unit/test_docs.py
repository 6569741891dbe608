"""docs/ holds the contracts the code and the README cite (issue 22): the keys it lists are the ones the code
has. Each check reads the code's own answer (the config parser's list of known keys, a node's snapshot, the
command table, the root's `__all__`), so a key added, renamed or removed on one side fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import vpn_packet
from vpn_packet.errors import ConfigError
from vpn_packet.node.config import parse_config

DOCS = Path(__file__).resolve().parents[2] / "docs"

_SECTION = re.compile(r"^## `?\[{1,2}(\w+)\]{1,2}`?")
_HEADING = re.compile(r"^## (.+)$")
_ROW_KEYS = re.compile(r"^\| ((?:`[\w.\[\]]+`(?:, )?)+) \|")


def documented_keys(name: str) -> dict[str, set[str]]:
    """Per `## ...` section of docs/NAME, the keys in the first column of its tables (`key` cells)."""
    sections: dict[str, set[str]] = {}
    current = ""
    for line in (DOCS / name).read_text().splitlines():
        heading = _HEADING.match(line)
        if heading:
            table = _SECTION.match(line)
            current = table[1] if table else heading[1]
            sections.setdefault(current, set())
            continue
        row = _ROW_KEYS.match(line)
        if row and current:
            sections[current] |= set(re.findall(r"`([\w.\[\]]+)`", row[1]))
    return sections


def _known_keys(data: dict[str, Any], where: str) -> set[str]:
    """The keys the parser accepts at `where`, from its refusal of an unknown one."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.key == f"{where}.zzz_not_a_key", info.value
    listed = re.search(r"expected one of: (.*)\)", str(info.value))
    assert listed is not None, info.value
    return set(listed[1].split(", "))


def _insecure_config() -> dict[str, Any]:
    return {
        "interface": {"name": "vpn0", "address": "10.8.0.1/24"},
        "listen": {"address": "0.0.0.0:7000"},
        "node": {"id": "node-a", "insecure": True},
        "peers": [{"id": "node-b", "endpoint": "192.168.77.2:7000", "allowed_ips": ["10.8.0.2/32"]}],
    }


@pytest.mark.parametrize(
    "table", ["interface", "listen", "node", "tls", "tuning", "resilience", "peers", "discovery"]
)
def test_the_documented_config_keys_are_the_parsers(table: str) -> None:
    data = _insecure_config()
    if table == "peers":
        data["peers"][0]["zzz_not_a_key"] = 1
        where = "peers[0]"
    else:
        data.setdefault(table, {})["zzz_not_a_key"] = 1
        where = table
    assert documented_keys("config.md")[table] == _known_keys(data, where)


def test_every_config_table_is_documented() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"zzz": 1})
    tables = re.search(r"expected (.*)\)", str(info.value))
    assert tables is not None
    assert set(tables[1].split(", ")) == {
        "interface",
        "listen",
        "peers",
        "node",
        "tls",
        "tuning",
        "resilience",
        "discovery",
    }
    documented = set(documented_keys("config.md"))
    assert {"interface", "listen", "peers", "node", "tls", "tuning", "resilience", "discovery"} <= documented


def test_the_documented_tuning_defaults_are_the_codes() -> None:
    from vpn_packet.tuning import DEFAULT_TUNING, Tuning

    text = (DOCS / "config.md").read_text()
    for name in Tuning.names():
        row = re.search(rf"^\| `{name}` \| ([\d,.]+) \|", text, re.MULTILINE)
        assert row is not None, name
        assert float(row[1].replace(",", "")) == getattr(DEFAULT_TUNING, name), name


async def test_the_documented_status_keys_are_a_snapshots() -> None:
    """A node's own peer status and totals (what `status --json` puts under `peers` and `totals`)."""
    from vpn_packet.node.node import Node
    from vpn_packet.transport import Peer, Security

    documented = documented_keys("status-json.md")
    node = Node(Security.insecure("node-a"), peers=[Peer("node-b", "127.0.0.1:9", ["10.8.0.2/32"])])
    async with node:
        (peer,) = node.peer_status()
        totals = node.totals()
    assert documented["Each peer (`peers[]`)"] == set(peer)
    assert documented["`totals`"] == set(totals)


def test_the_documented_top_level_status_keys() -> None:
    """The top level is the TUN node's (a real one is in tests/node/test_status.py, which checks its keys
    against this list too): the contract keys, besides the detailed `node` and `tun`."""
    assert documented_keys("status-json.md")["Top level"] == STATUS_TOP_LEVEL


STATUS_TOP_LEVEL = {
    "id",
    "interface",
    "listen",
    "state",
    "uptime",
    "peers",
    "totals",
    "discovery",
    "data_plane",
    "deprecated",
}


def test_the_documented_commands_are_the_cli_s() -> None:
    from vpn_packet.cli import commands

    text = (DOCS / "commands.md").read_text()
    documented = set(re.findall(r"^\| `([\w-]+)` \|", text, re.MULTILINE))
    assert documented == set(commands())


def test_the_documented_library_names_are_the_roots() -> None:
    text = (DOCS / "library.md").read_text()
    names = set(re.findall(r"`(\w+)`", text))
    assert set(vpn_packet.__all__) - {"__version__"} <= names


def test_the_code_cites_docs_not_a_file_outside_the_repository() -> None:
    """Issue 22: the README, `help(vpn_packet)`, cli/status.py and node/config.py cited DESIGN.md, which is
    not in the repository or the sdist."""
    root = DOCS.parent
    for path in [root / "README.md", *sorted((root / "python" / "vpn_packet").rglob("*.py"))]:
        assert "DESIGN" not in path.read_text(), path
    for cited in set(re.findall(r"docs/([\w-]+\.md)", (root / "README.md").read_text())):
        assert (DOCS / cited).is_file(), cited
