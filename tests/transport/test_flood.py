"""No one without a key keeps a key-holding peer out, and memory comes back after a flood (issue 22).

Real processes and sockets: the receiver is a `Node` in its own process (`PeerProcess`, key mode: TLS 1.3 and
a signed hello), the attacker another (`vpn_packet.testutil.flood`), and the peer is this one: it opens a
fresh connection after another for as long as the flood lasts (so each connection is made under the flood,
as a peer that reconnects would), sends batches on each and waits for every acknowledgement, retrying
nothing. Asserted: the peer failed no packet, and the receiver's sink counted at least 99% of what it sent
(here all of it: what was acknowledged was taken); and the flood was real: it pressed the receiver's limits
(connections closed to make room) while the peer was connecting.

The issue's floods, scaled to a 2-core CI machine:

- same address: the issue held 16 silent connections on the peer's address and reopened each as it closed,
  for 12,000 packets; here 64 (beyond the 32 per address the receiver would keep silent), reopened as they
  close, for 3 s;
- many addresses: the issue made about 800 connections a second, held open; here as many TLS handshakes as
  one process makes (300-1,100 a second on the CI machine), 3,000 in all from 200 addresses, each held open
  after TLS without a hello (what costs the receiver most); the receiver's 128 handshaking places are full
  and it evicts while the peer connects (asserted);
- never TLS: the issue's 4,000 connections from 200 addresses, opened as fast as one process can, then held
  3 s.

With TLS the receiver's kernel holds a connection that has sent nothing (`TCP_DEFER_ACCEPT`), so the silent
floods mostly never reach the receiver's process; the admission policy for those that do is tested on its
own (`tests/unit/test_admission.py`) and in plaintext, where no deferral applies (`test_receiver.py`,
`test_preauth_limits.py`). The peer's connections here number 50-400 per test, 2,500-20,000 packets.

Memory: the receiver's RSS six seconds after a TLS flood ends is within 25 MB of where it was before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vpn_packet.testutil.flood import FloodProcess, FloodStats, LegitResult, legit_rounds
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.packets import ipv4_packet
from vpn_packet.testutil.peer_process import PeerProcess, mark_packet
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStream, TcpStreamService

MB = 1_000_000
TEMPLATE = ipv4_packet("10.1.0.2", "10.2.0.1", src_port=4000, dst_port=7, payload=bytes(64))
BATCHES = 5  # per connection
BATCH = 10  # packets per batch
MIN_ROUNDS = 10  # connections the peer makes at least, flood or not
FLOOD_SECONDS = 3.0  # how long the floods bounded by time last (the peer connects all along)


def packet(n: int) -> bytes:
    return mark_packet(TEMPLATE, 0, n)


def rss(pid: int) -> int:
    """VmRSS of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Victim:
    """The receiving node's process, and the key-holding peer's way in."""

    process: PeerProcess
    service: TcpStreamService

    @property
    def target(self) -> tuple[str, int]:
        return ("127.0.0.1", self.process.port)

    async def open_stream(self) -> TcpStream:
        return await self.service.create_stream("node-b")

    async def receiver(self) -> dict[str, Any]:
        """The receiver's counters now, and the packets its sink counted (`delivered`)."""
        report = await self.process.report()
        out: dict[str, Any] = report["receiver"]
        out["delivered"] = report["delivered"]
        return out


@pytest.fixture
async def victim(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Victim]:
    """The receiving node, default tuning. Its peer node-a is configured at 127.0.0.9: not the address it
    connects from (127.0.0.1), so the peer gets no favour for its address (`vpn_packet.transport.admission`);
    `@pytest.mark.parametrize("victim", [(endpoint, tuning)], indirect=True)` changes both."""
    endpoint, tuning = getattr(request, "param", ("127.0.0.9:9", None))
    ids = identities(tmp_path, "node-a", "node-b")
    process = await PeerProcess.start(
        key=ids["node-b"].path, peer_key=ids["node-a"].public_key, sender_endpoint=endpoint, tuning=tuning
    )
    try:
        security = Security.with_keys(ids["node-a"], {"node-b": ids["node-b"].public_key_bytes})
        discovery = StaticPeerDiscovery([Peer("node-b", process.endpoint, ["10.2.0.0/16"])])
        yield Victim(process, TcpStreamService(discovery, security))
    finally:
        await process.close()


async def peer_during(victim: Victim, flood: FloodProcess) -> tuple[LegitResult, FloodStats, int, int]:
    """The peer connects again and again until the flood has ended by itself; returns what it saw, the
    flood's stats, and the receiver's evictions while the peer was connecting and its delivered count."""
    before = await victim.receiver()
    result = LegitResult()
    pressed = 0
    done = asyncio.create_task(flood.finished())
    try:
        rounds = 0
        while not done.done() or rounds < MIN_ROUNDS:
            await legit_rounds(
                victim.open_stream, packet, rounds=1, batches=BATCHES, batch=BATCH, result=result
            )
            rounds += 1
            if rounds == MIN_ROUNDS:  # the evictions while the peer was connecting (the flood goes on)
                pressed = (await victim.receiver())["evicted_pending"] - before["evicted_pending"]
        stats = await done
    finally:
        done.cancel()
        await flood.close()
    after = await victim.receiver()
    delivered = after["delivered"] - before["delivered"]
    return result, stats, pressed, delivered


def check(result: LegitResult, delivered: int) -> None:
    assert result.connect_errors == []
    assert result.failed == 0
    assert result.sent == result.attempted
    assert delivered >= 0.99 * result.sent
    assert delivered == result.sent  # acknowledged means taken: nothing counted sent is missing


async def test_silent_connections_on_the_peers_own_address_do_not_keep_it_out(victim: Victim) -> None:
    flood = await FloodProcess.start(
        victim.target, mode="silent", hold=64, count=10**6, warm=64, duration=FLOOD_SECONDS
    )  # from 127.0.0.1, the peer's own address
    result, stats, _pressed, delivered = await peer_during(victim, flood)
    print(f"same address: {stats}, peer {result.sent}/{result.attempted} in {result.connects} connections")
    assert stats.opened >= 64  # it held 64 connections on the peer's address while the peer connected
    check(result, delivered)


async def test_a_flood_of_tls_handshakes_from_many_addresses_does_not_keep_a_peer_out(victim: Victim) -> None:
    flood = await FloodProcess.start(
        victim.target,
        mode="tls",
        sources="127.1.0.0/16",
        addresses=200,
        hold=4000,
        count=3000,
        warm=200,  # more than the receiver's 128 handshaking places: it is evicting when the peer starts
        duration=60,  # a bound: 3,000 handshakes take 3-10 s on the CI machine
    )
    result, stats, pressed, delivered = await peer_during(victim, flood)
    print(f"TLS flood: {stats}, peer {result.sent}/{result.attempted} in {result.connects} connections")
    assert pressed > 0  # the receiver's limits were reached while the peer connected
    assert stats.opened + stats.failed == 3000
    check(result, delivered)


# The receiver's handshaking places turn over about 8 times faster (16 instead of 128), as under a faster
# attacker or a slower receiver: the stalest-first order alone lost 1-3% of the peer's connections then;
# from the address of its configured endpoint the peer goes last, and loses none.
@pytest.mark.parametrize("victim", [("127.0.0.1:9", {"max_pending": 16})], indirect=True)
async def test_a_peer_connecting_from_its_configured_address_outlasts_a_tls_flood(victim: Victim) -> None:
    flood = await FloodProcess.start(
        victim.target,
        mode="tls",
        sources="127.1.0.0/16",
        addresses=200,
        hold=4000,
        count=3000,
        warm=100,
        duration=60,
    )
    result, stats, pressed, delivered = await peer_during(victim, flood)
    print(f"TLS flood, 16 places: {stats}, peer {result.sent}/{result.attempted} in {result.connects} conns")
    assert pressed > 0
    check(result, delivered)


async def test_4000_connections_that_never_start_tls_do_not_keep_a_peer_out(victim: Victim) -> None:
    flood = await FloodProcess.start(
        victim.target,
        mode="silent",
        sources="127.2.0.0/16",
        addresses=200,
        hold=4000,
        count=4000,
        warm=1000,
        linger=FLOOD_SECONDS,  # opened in a second or two, then held
        duration=60,  # a bound
    )
    result, stats, _pressed, delivered = await peer_during(victim, flood)
    print(f"silent flood: {stats}, peer {result.sent}/{result.attempted} in {result.connects} connections")
    assert stats.opened == 4000
    check(result, delivered)


async def test_six_seconds_after_a_flood_memory_is_within_25_mb_of_before(victim: Victim) -> None:
    # One connection first: the receiver's one-off allocations (TLS, the peer's tables) are not the flood's.
    await legit_rounds(victim.open_stream, packet, rounds=1, batches=1, batch=1)
    before = rss(victim.process.pid)
    flood = await FloodProcess.start(
        victim.target, mode="tls", sources="127.1.0.0/16", addresses=200, hold=4000, count=1500, warm=200
    )
    peak = before
    done = asyncio.create_task(flood.finished())
    try:
        while not done.done():  # the peak, for the report: the kernel's count has no event to wait on
            peak = max(peak, rss(victim.process.pid))
            await asyncio.wait({done}, timeout=0.05)
        stats = await done
    finally:
        done.cancel()
        await flood.close()
    await asyncio.sleep(6.0)  # the measuring point the issue sets: six seconds after the flood ended
    after = rss(victim.process.pid)
    print(f"RSS before {before / MB:.1f} MB, peak {peak / MB:.1f}, 6 s after {after / MB:.1f}: {stats}")
    assert stats.opened > 0
    assert after - before <= 25 * MB, f"{(after - before) / MB:.1f} MB above where it was before the flood"
