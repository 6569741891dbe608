"""The receiver's admission policy on its own (`vpn_packet.transport.admission`), and when the heap is given
back (`vpn_packet.heap`): who is closed to make room, never the newcomer, never a connection for making
progress; and a release after a burst, not per connection."""

from __future__ import annotations

import asyncio

import pytest

from vpn_packet.heap import HeapRelease
from vpn_packet.testutil.fakes import ManualClock
from vpn_packet.transport.admission import Admission, Ticket


def admission(
    silent: int = 4, silent_per_source: int = 2, pending: int = 3, per_source: int = 2
) -> Admission:
    return Admission(
        max_silent=silent,
        max_silent_per_source=silent_per_source,
        max_pending=pending,
        max_pending_per_source=per_source,
    )


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending must be at least 1"):
        admission(pending=0)


def test_silent_connections_displace_the_oldest_silent_one_never_the_newcomer() -> None:
    a = admission(silent=3, silent_per_source=8)
    first, _ = a.arrive("10.0.0.1")
    second, _ = a.arrive("10.0.0.2")
    third, _ = a.arrive("10.0.0.3")
    fourth, evicted = a.arrive("10.0.0.4")
    assert evicted == [first]
    assert not first.held
    assert fourth.held
    assert (a.silent, a.handshaking) == (3, 0)
    assert a.leave(first) is False  # already out: leaving again is a no-op
    assert a.tickets() == [second, third, fourth]


def test_one_address_at_its_silent_limit_displaces_its_own_oldest_only() -> None:
    a = admission(silent=10, silent_per_source=2)
    other, _ = a.arrive("10.0.0.9")
    mine = [a.arrive("10.0.0.1")[0] for _ in range(2)]
    newcomer, evicted = a.arrive("10.0.0.1")
    assert evicted == [mine[0]]  # not the other address's, though it is older
    assert other.held
    assert newcomer.held
    assert a.held_by("10.0.0.1") == (2, 0)


def test_silent_connections_never_displace_handshaking_ones() -> None:
    a = admission(silent=2, silent_per_source=2, pending=2, per_source=2)
    talking = [a.arrive(f"10.0.1.{i}")[0] for i in range(2)]
    for ticket in talking:
        assert a.start(ticket) == []
    for i in range(10):  # a flood of silent ones
        a.arrive(f"10.0.2.{i}")
    assert all(t.held and t.tier == "handshaking" for t in talking)
    assert (a.silent, a.handshaking) == (2, 2)


def test_at_the_handshaking_limit_the_stalest_goes() -> None:
    a = admission(pending=3, per_source=3)
    t1, _ = a.enter("10.0.0.1")
    t2, _ = a.enter("10.0.0.2")
    t3, _ = a.enter("10.0.0.3")
    a.progress(t1)  # t1 finished TLS: now t2 is the longest without a step
    t4, evicted = a.enter("10.0.0.4")
    assert evicted == [t2]
    assert t1.steps == 1
    a.progress(t3)
    a.progress(t4)
    _t5, evicted = a.enter("10.0.0.5")
    assert evicted == [t1]  # its step is now the oldest
    assert t4.held
    assert t3.held


def test_a_peer_that_makes_progress_outlasts_connections_held_open() -> None:
    """The attack of issue 22: connections finish TLS and are held; a peer finishing TLS among them, then
    sending its hello, is never the one displaced while attackers keep arriving."""
    a = admission(pending=8, per_source=8)
    for i in range(8):  # held connections, each past TLS
        ticket, _ = a.enter(f"10.1.0.{i}")
        a.progress(ticket)
    peer, _ = a.enter("127.0.0.1")
    for step in range(3):  # TLS done, hello header, hello body; attackers arrive between the steps
        for i in range(7):
            attacker, evicted = a.enter(f"10.2.{step}.{i}")
            a.progress(attacker)
            assert peer not in evicted
        a.progress(peer)
    assert peer.held


def test_a_source_at_its_handshaking_limit_displaces_its_own_stalest() -> None:
    a = admission(pending=10, per_source=2)
    other, _ = a.enter("10.0.0.9")
    mine = [a.enter("10.0.0.1")[0] for _ in range(2)]
    a.progress(mine[0])
    _new, evicted = a.enter("10.0.0.1")
    assert evicted == [mine[1]]
    assert other.held
    assert mine[0].held


def test_start_moves_a_silent_ticket_and_ignores_one_displaced_meanwhile() -> None:
    a = admission(silent=1, pending=1)
    first, _ = a.arrive("10.0.0.1")
    _second, evicted = a.arrive("10.0.0.2")
    assert evicted == [first]
    assert a.start(first) == []  # it was displaced: it stays out
    assert not first.held
    assert first.tier == "silent"
    assert a.handshaking == 0


def test_next_silent_evictions_names_who_would_go() -> None:
    a = admission(silent=3, silent_per_source=2)
    assert a.next_silent_evictions("10.0.0.1", 4) == []
    mine = [a.arrive("10.0.0.1")[0] for _ in range(2)]
    assert a.next_silent_evictions("10.0.0.1", 4) == mine  # this source is at its own limit
    other, _ = a.arrive("10.0.0.2")
    assert a.next_silent_evictions("10.0.0.3", 1) == [mine[0]]  # all are at the total limit
    assert a.oldest_silent() is mine[0]
    a.leave(mine[0])
    assert a.tickets() == [mine[1], other]
    assert Ticket("x").held


async def test_the_heap_is_released_after_a_burst_not_per_connection() -> None:
    clock = ManualClock()
    released: list[float] = []
    heap = HeapRelease(
        churn=3, interval=1.0, delay=0.0, release=lambda: released.append(clock()), clock=clock
    )
    heap.note_closed()
    heap.release_soon()  # one connection went and nothing is pending: not worth a walk of the heap
    await asyncio.sleep(0)
    assert released == []
    heap.note_closed(2)  # a burst
    heap.release_soon()
    heap.release_soon()  # once, however often the pending set empties meanwhile
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(released) == 1
    # During a long flood: every `interval` at most, whatever the churn.
    heap.note_closed(10)
    assert len(released) == 1
    clock.advance(1.0)
    heap.note_closed(3)
    assert len(released) == 2
    heap.release_now()
    assert heap.releases == 3


def test_connections_from_favoured_addresses_go_last_under_the_total_bounds() -> None:
    peers = {"192.0.2.7"}
    a = Admission(
        max_silent=2,
        max_silent_per_source=2,
        max_pending=2,
        max_pending_per_source=2,
        favoured=peers.__contains__,
    )
    peer, _ = a.enter("192.0.2.7")  # the oldest and stalest, but from a configured peer's address
    stranger, _ = a.enter("10.0.0.1")
    _newcomer, evicted = a.enter("10.0.0.2")
    assert evicted == [stranger]
    assert peer.held
    # Silent ones likewise, and the receiver is told whom to look at first.
    quiet_peer, _ = a.arrive("192.0.2.7")
    quiet, _ = a.arrive("10.0.0.3")
    assert a.next_silent_evictions("10.0.0.4", 4) == [quiet, quiet_peer]
    _, evicted = a.arrive("10.0.0.4")
    assert evicted == [quiet]
    # Only when every one is favoured does a favoured one go (the oldest), and the per-address bounds
    # hold for a favoured address as for any.
    both = Admission(
        max_silent=1,
        max_silent_per_source=1,
        max_pending=1,
        max_pending_per_source=1,
        favoured=peers.__contains__,
    )
    first, _ = both.enter("192.0.2.7")
    _, evicted = both.enter("192.0.2.7")
    assert evicted == [first]
