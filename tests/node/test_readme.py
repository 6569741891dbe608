"""The README's examples, run (issue 22: nothing ran them, and the Dispatcher example used names it never
defined).

- Every ```python block runs as a script in a fresh interpreter and must exit 0.
- Every `vpn-packet ...` command of the ```sh blocks: those that need no root, no TUN and no running node
  (`genkey`, `pubkey`, `example-config`, `sample-capture`, `inspect`, `demo`, `sign`, `revoke`) run for
  real, in order, in a scratch directory, as the README shows them (pipes and redirections included); those
  that need root, a TUN device or a running node (`node`, `status`, `reload`), and the demo of a million
  packets (minutes of CPU on a busy machine, the same code as the demo that runs), are checked by the
  command's own argument parser only. Other shell commands (pip, venv, systemctl, ping, cargo, ...) are not
  ours and are not run.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vpn_packet.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
RUN = {"genkey", "pubkey", "example-config", "sample-capture", "inspect", "demo", "sign", "revoke"}
PARSE_ONLY = {"node", "status", "reload"}
MAX_DEMO_PACKETS = 200_000  # the default; more is only parsed (see the module docstring)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda code: code.splitlines()[0][:40])
def test_python_example_runs(code: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr


def vpn_packet_commands() -> list[tuple[str, list[str]]]:
    """(the README line, the vpn-packet arguments) of every vpn-packet command in the ```sh blocks."""
    found = []
    for block in blocks("sh"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word.endswith("vpn-packet"):
                    end = next(
                        (j for j in range(i + 1, len(words)) if words[j] in {"&&", "|", ">"}), len(words)
                    )
                    found.append((line, words[i + 1 : end]))
    return found


def _demo_packets(args: list[str]) -> int:
    return int(args[args.index("--packets") + 1]) if "--packets" in args else MAX_DEMO_PACKETS


def test_every_vpn_packet_command_of_the_readme_is_known() -> None:
    commands = vpn_packet_commands()
    assert len(commands) >= 15
    for line, args in commands:
        assert args[0] in RUN | PARSE_ONLY, line


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (line, args)
        for line, args in vpn_packet_commands()
        if args[0] in PARSE_ONLY or (args[0] == "demo" and _demo_packets(args) > MAX_DEMO_PACKETS)
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_commands_that_need_root_parse(line: str, args: list[str]) -> None:
    build_parser().parse_args(args)  # SystemExit (a usage error) fails the test


def test_commands_that_need_no_root_run_as_shown(tmp_path: Path) -> None:
    """In README order, in one scratch directory (genkey's key files are what pubkey reads)."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    program = Path(sys.executable).with_name("vpn-packet")
    assert program.exists(), program
    (bin_dir / "vpn-packet").symlink_to(program)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # The inputs the capture examples name: a capture, and a gzip-compressed one.
    subprocess.run([program, "sample-capture", "capture.pcap", "--packets", "500"], cwd=tmp_path, check=True)
    (tmp_path / "big.pcap.gz").write_bytes(gzip.compress((tmp_path / "capture.pcap").read_bytes()))
    ran = []
    for line, args in vpn_packet_commands():
        if args[0] not in RUN or (args[0] == "demo" and _demo_packets(args) > MAX_DEMO_PACKETS):
            continue
        # The line as written, from its vpn-packet command on (what comes before is venv setup), with a
        # pipe's producer kept: `gunzip -c big.pcap.gz | vpn-packet inspect -`.
        command = shlex.split(line, comments=True)
        start = max(i for i, word in enumerate(command) if word == "&&") + 1 if "&&" in command else 0
        shell = shlex.join(command[start:]).replace("'|'", "|").replace("'>'", ">")
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {shell}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
        ran.append(args[0])
    assert {"genkey", "pubkey", "example-config", "sample-capture", "inspect", "demo"} <= set(ran)
    assert (tmp_path / "node-a.key").exists()
    assert "[interface]" in (tmp_path / "node-a.toml").read_text()
