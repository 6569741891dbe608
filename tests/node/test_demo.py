"""`vpn-packet demo`, run in-process with a small workload: exit status, summary, verification."""

from __future__ import annotations

import logging

import pytest

from vpn_packet.cli import main
from vpn_packet.node import demo


def _transport_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("transport")]
    return line


def test_demo_is_secure_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--packets", "4000", "--destinations", "120", "--seed", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "OK: all 4,000 packets arrived intact and in order per destination" in out
    assert "busiest workers" in out
    assert "pps" in out
    assert "Mbit/s" in out
    assert "drops" in out
    transport = _transport_line(out)
    assert "TLS 1.3, keys" in transport
    assert "PLAINTEXT" not in out
    assert "TLS 1.3 (throwaway keys)" in out.splitlines()[0]


def test_demo_insecure_runs_plaintext_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--packets", "1000", "--destinations", "50", "--insecure"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "OK: all 1,000 packets" in out
    transport = _transport_line(out)
    assert "PLAINTEXT, unauthenticated" in transport
    assert "TLS" not in transport
    assert "plaintext TCP (--insecure)" in out.splitlines()[0]


def test_the_old_tls_flag_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--packets", "10", "--tls"]) == 2  # TLS is the default now
    assert "--tls" in capsys.readouterr().err


@pytest.mark.parametrize("secure", [True, False])
async def test_run_demo_result(secure: bool) -> None:
    result = await demo.run_demo(3000, 200, seed=5, secure=secure)
    assert result.secure is secure
    assert result.ok
    assert result.received == 3000
    assert (result.corrupt, result.out_of_order, result.missing) == (0, 0, 0)
    assert not any(result.drops.values())
    assert result.top_workers
    assert result.top_workers[0][1] >= result.top_workers[-1][1]
    assert result.receiver["receiver"]["packets_delivered"] == 3000
    assert result.receiver["receiver"]["refused"] == {}
    assert result.receiver["receiver"]["handshake_failures"] == {}


async def test_run_demo_is_secure_unless_asked() -> None:
    assert (await demo.run_demo(50, 5)).secure is True


def test_workload_is_realistic() -> None:
    workload = demo.Workload(5000, 300, seed=1)
    packets = [p for chunk in workload.chunks(1000) for p in chunk]
    assert len(packets) == 5000
    assert min(map(len, packets)) >= 40
    assert max(map(len, packets)) <= 1400
    assert {p[0] >> 4 for p in packets} == {4, 6}
    assert {f.protocol for f in workload.flows} == {6, 17}
    assert len({f.key for f in workload.flows}) == 300
    assert sum(workload.sent) == 5000
    assert sum(len(c) for c in workload.crcs) == 5000


def test_a_lost_packet_fails_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    original = demo.Verifier.__call__
    dropped: list[bool] = []

    def lossy(self: demo.Verifier, peer_id: str, packets: list[bytes]) -> None:
        if not dropped:
            dropped.append(True)
            packets = packets[1:]  # the first packet never "arrives"
            self.target -= 1  # do not wait for it
        original(self, peer_id, packets)

    monkeypatch.setattr(demo.Verifier, "__call__", lossy)
    status = main(["demo", "--packets", "500", "--destinations", "20"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAILED" in out


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--packets", "0"]) == 2
    assert main(["demo", "--destinations", "70000"]) == 2
    assert "at most 60000" in capsys.readouterr().err


async def test_lost_packets_are_detected_without_waiting_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    original = demo.Verifier.__call__

    def drop_first_of_each_batch(self: demo.Verifier, peer_id: str, packets: list[bytes]) -> None:
        original(self, peer_id, packets[1:])

    monkeypatch.setattr(demo.Verifier, "__call__", drop_first_of_each_batch)
    result = await demo.run_demo(400, 10, stall_timeout=0.05)
    assert not result.ok
    assert result.received < 400
    assert result.missing > 0 or result.out_of_order > 0


def test_ipv6_keys_are_printed_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    """Keys such as [fd00:b::1]:853 are neither rich markup nor emoji codes (":b:")."""
    assert main(["demo", "--packets", "300", "--destinations", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "[fd00:b::" in out


def test_demo_both_ways(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    status = main(["demo", "--packets", "2000", "--destinations", "60", "--both-ways"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "A -> B and B -> A" in out
    assert "OK: all 4,000 packets" in out
    # Nothing logged at ERROR level (both nodes stop sending before either receiver stops).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("extra", [[], ["--both-ways"]])
def test_a_clean_demo_prints_no_error(extra: list[str]) -> None:
    """Issue 22: every clean run printed `cannot open a stream to node-a at 127.0.0.1:9 (connect):
    ECONNREFUSED`: node B, which only receives, dialled node A's placeholder endpoint. The real process,
    whose stderr is what a user sees."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "vpn_packet.cli", "demo", "--packets", "2000", "--destinations", "50", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: all" in result.stdout
    assert "ECONNREFUSED" not in result.stdout + result.stderr
    assert "cannot open a stream" not in result.stdout + result.stderr
    assert result.stderr == ""
