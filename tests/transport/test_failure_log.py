"""Failed connections are logged with one budget for all peers and a periodic summary (issue 21 item 8): with
1,000 peers down, a bounded number of lines and one summary (by reason), not a line per peer and retry.

Real connection attempts to a loopback port where nothing listens (refused at once); the log's clock is
injected, so the budget and the summary are driven without waiting."""

from __future__ import annotations

import logging
import socket

import pytest

from vpn_packet.errors import NetworkError
from vpn_packet.ratelimit import FailureLog
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStreamService

TCP = "vpn_packet.transport.tcp"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Closed:
    """Every peer at one loopback port where nothing listens."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        return "127.0.0.1", self.port


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TCP and r.levelno >= logging.WARNING]


async def test_a_thousand_unreachable_peers_log_a_bounded_number_of_lines_and_a_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = FailureLog(logging.getLogger(TCP), rate=0.5, burst=10, summary_interval=60, clock=clock)
    service = TcpStreamService(Closed(), Security.insecure("node-a"), failure_log=log)
    peers = [f"peer-{i}" for i in range(1000)]
    caplog.set_level(logging.WARNING, logger=TCP)
    # Two rounds of attempts to every peer over 20 s (one every 10 ms).
    for _ in range(2):
        for peer_id in peers:
            with pytest.raises(NetworkError):
                await service.create_stream(peer_id)
            clock.now += 0.01
    lines = records(caplog)
    # The burst, then half a line a second while new peers fail (the first round: 10 s); the second round
    # is no news (the same peers, the same reason): no line at all.
    assert 10 <= len(lines) <= 10 + 0.5 * 10 + 1
    assert all(line.startswith("cannot open a stream to peer-") for line in lines)
    assert all("ECONNREFUSED" in line for line in lines)
    # The per-peer detail is in the status, for every peer.
    assert all(service.peer_stats[p].failures == {"ECONNREFUSED": 2} for p in peers)
    assert service.connect_failures == 2000
    # The summary: once the interval is over, one line with the count by reason and what was held back.
    clock.now = 1000.0 + 60
    assert log.tick()
    summary = records(caplog)[-1]
    assert summary.startswith("1000 peers unreachable (ECONNREFUSED 1000); 2000 failed connection attempts")
    assert f"{1000 - len(lines)} lines held back" in summary
    assert log.lines == len(lines) + 1
    # Nothing failed since: no summary next time.
    clock.now += 60
    assert not log.tick()
    assert len(records(caplog)) == len(lines) + 1


def test_a_peer_back_up_leaves_the_summary_and_a_new_reason_is_news() -> None:
    clock = Clock()
    logger = logging.getLogger("test.failure_log")
    log = FailureLog(logger, rate=1, burst=2, summary_interval=10, clock=clock)
    assert log.failed("a", "ECONNREFUSED", "a down")
    assert not log.failed("a", "ECONNREFUSED", "a down")  # the same reason: not news
    assert log.failed("b", "ETIMEDOUT", "b down")
    assert not log.failed("c", "ETIMEDOUT", "c down")  # the budget is spent: held back
    assert log.held == 1
    clock.now += 1  # one line a second comes back
    assert log.failed("a", "refused:key_mismatch", "a refuses us")  # a new reason is news
    log.succeeded("b")
    clock.now += 10
    assert log.summary().startswith("2 peers unreachable (ETIMEDOUT 1, refused:key_mismatch 1)")
    assert log.tick()
    log.forget("a")
    assert log.unreachable == {"c": "ETIMEDOUT"}
