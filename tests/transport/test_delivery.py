"""The acknowledgement window, without sockets.

1. `InFlight` (pure bookkeeping) as a hypothesis state machine against a model: random writes, cumulative
   acks (stale and duplicate ones too), acks beyond what was written, connection resets and a final stop.
2. The dispatcher over `FakeAckingStream`s (the test plays the peer): random dispatches, partial acks,
   resets, write failures and `stop()`. The accounting identity holds at every step; after `stop()` nothing
   is in flight, every future resolved once (None exactly for the packets the peer acknowledged), the peer
   has exactly what we count sent, and `lost_in_flight` is what was written and never acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vpn_packet._native import destination_key_and_ip
from vpn_packet.dispatcher import Dispatcher
from vpn_packet.errors import DispatcherStoppedError, NetworkError
from vpn_packet.resilience import ResilienceConfig, ResilienceService
from vpn_packet.testutil.fakes import (
    FakeAckingStream,
    FakePeerDiscovery,
    FakeStreamPool,
    FakeStreamService,
    ManualClock,
    RecordingSleep,
)
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport.delivery import InFlight, Receipt

# --- 1. InFlight --------------------------------------------------------------------------------------------


class CountingReceipt(Receipt):
    """A receipt that counts how often it is resolved (a second resolution would be a bookkeeping bug)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(lambda: None, loop=loop)
        self.resolutions = 0

    def set_result(self, result: int, /) -> None:
        self.resolutions += 1
        super().set_result(result)


@dataclass
class Batch:
    conn: int  # index of the connection (InFlight) it was written on
    end: int  # frames written on that connection after it
    frames: int
    size: int
    receipt: CountingReceipt


class InFlightMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.batches: list[Batch] = []
        self.conns: list[InFlight] = []
        self.failed_at: dict[int, int] = {}  # connection -> frames acknowledged when it failed
        self.stopped = False

    @initialize(window=st.integers(1, 200_000))
    def connect(self, window: int) -> None:
        self.window = window
        self.conns.append(InFlight(window))

    @property
    def conn(self) -> InFlight:
        return self.conns[-1]

    def _open(self) -> list[Batch]:
        n = len(self.conns) - 1
        return [b for b in self.batches if b.conn == n and not b.receipt.done()]

    @precondition(lambda self: not self.stopped)
    @rule(frames=st.integers(1, 64), size=st.integers(1, 70_000))
    def write(self, frames: int, size: int) -> None:
        receipt = CountingReceipt(self.loop)
        self.conn.add(frames, size, receipt)
        self.batches.append(Batch(len(self.conns) - 1, self.conn.written, frames, size, receipt))

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        conn = self.conn
        before = conn.acked
        # Half the time a stale or duplicate count (at most what was acknowledged), else any valid one.
        stale = data.draw(st.booleans())
        taken = data.draw(st.integers(0, before) if stale else st.integers(0, conn.written))
        newly = conn.ack(taken)
        assert newly == max(0, taken - before)
        assert conn.acked == max(before, taken)

    @rule(extra=st.integers(1, 1000))
    def ack_beyond_written(self, extra: int) -> None:
        conn = self.conn
        state = (conn.written, conn.acked, conn.bytes, len(conn))
        with pytest.raises(ValueError, match="acknowledged"):
            conn.ack(conn.written + extra)
        assert (conn.written, conn.acked, conn.bytes, len(conn)) == state  # nothing changed

    def _fail(self) -> None:
        conn = self.conn
        expected_lost = conn.written - conn.acked
        assert conn.fail() == expected_lost
        self.failed_at[len(self.conns) - 1] = conn.acked
        assert (conn.frames, conn.bytes, len(conn), conn.full) == (0, 0, 0, False)
        assert conn.fail() == 0  # a second failure finds nothing

    @precondition(lambda self: not self.stopped)
    @rule()
    def reset(self) -> None:
        """The connection died (reset, or the watchdog gave up): the next writes go on a new one."""
        self._fail()
        self.conns.append(InFlight(self.window))

    @precondition(lambda self: not self.stopped)
    @rule()
    def stop(self) -> None:
        """A stop gave up on the connection: no more writes; late (stale) acks change nothing."""
        self._fail()
        self.stopped = True

    @invariant()
    def receipts_resolve_once_with_the_acknowledged_part(self) -> None:
        for b in self.batches:
            assert b.receipt.resolutions <= 1
            acked = self.failed_at.get(b.conn)
            if acked is None:  # the live connection: resolved exactly when an ack covered the batch
                acked = self.conns[b.conn].acked
                assert b.receipt.done() == (b.end <= acked)
            else:
                assert b.receipt.done()
            if b.receipt.done():
                taken = b.receipt.result()
                assert taken == min(b.frames, max(0, b.frames - (b.end - acked)))
                assert (taken == b.frames) == (b.end <= acked)  # full iff the ack covered it

    @invariant()
    def window_bookkeeping(self) -> None:
        conn = self.conn
        open_batches = self._open()
        assert conn.bytes == sum(b.size for b in open_batches)
        assert conn.full == (conn.bytes >= self.window)
        assert conn.frames == conn.written - conn.acked >= 0
        assert len(conn) == len(open_batches)

    @invariant()
    def taken_counts_add_up_to_the_acks(self) -> None:
        resolved = sum(b.receipt.result() for b in self.batches if b.receipt.done())
        # The acknowledged parts of batches still open (only the live connection has any).
        partial = sum(min(b.frames, max(0, self.conn.acked - (b.end - b.frames))) for b in self._open())
        assert resolved + partial == sum(c.acked for c in self.conns)
        if not self._open():
            assert resolved == sum(c.acked for c in self.conns)

    def teardown(self) -> None:
        if self.conns and not self.stopped:
            self._fail()
        for b in self.batches:
            assert b.receipt.resolutions == 1
        assert sum(b.receipt.result() for b in self.batches) == sum(c.acked for c in self.conns)
        self.loop.close()


InFlightMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestInFlight = InFlightMachine.TestCase


def test_window_must_hold_a_byte() -> None:
    with pytest.raises(ValueError, match="window"):
        InFlight(0)


# --- 2. the dispatcher over acknowledging streams ---------------------------------------------------------


def _packet(dest: int, seq: int) -> bytes:
    return ipv4_packet("10.9.0.1", f"10.0.0.{dest + 1}", UDP, 1000, 80, struct.pack("!I", seq))


_op = st.one_of(
    st.tuples(st.just("dispatch"), st.integers(0, 3), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("yield"), st.just(0), st.just(0), st.just(False)),
    # Acknowledge up to n more packets of one stream (a partial ack may end inside a batch).
    st.tuples(st.just("ack"), st.integers(0, 7), st.integers(0, 9), st.just(False)),
    st.tuples(st.just("reset"), st.integers(0, 7), st.just(0), st.just(False)),
    st.tuples(st.just("fail_write"), st.integers(0, 7), st.just(0), st.just(False)),
)


@given(
    ops=st.lists(_op, max_size=80),
    peer_acks_at_stop=st.booleans(),
    seed=st.integers(0, 99),
)
@settings(max_examples=150, deadline=None)
def test_dispatcher_accounting_under_partial_acks_losses_and_stop(
    ops: list[tuple[str, int, int, bool]], peer_acks_at_stop: bool, seed: int
) -> None:
    """`peer_acks_at_stop`: the peer acknowledges everything while `stop()` waits for it (the stop ends
    because all was acknowledged); else it acknowledges nothing more and `stop(timeout=0)` gives up on the
    open receipts at once (their unacknowledged packets are lost in flight)."""

    async def scenario() -> None:
        clock = ManualClock()
        sleep = RecordingSleep(clock)
        service = FakeStreamService(seed=seed, sleep=sleep, acks=True)
        resilience = ResilienceService(
            ResilienceConfig(failure_threshold=1000),
            clock=clock,
            sleep=sleep,
            random=random.Random(seed).random,
        )
        d = Dispatcher(
            FakePeerDiscovery(prefixes={"10.0.0.0/31": "p1", "10.0.0.0/24": "p2"}),
            None,
            FakeStreamPool(service),
            worker_buffer_size=10_000,
            resilience_service=resilience,
            clock=clock,
        )
        futures: dict[bytes, asyncio.Future[None]] = {}
        resolutions: Counter[bytes] = Counter()
        seq = 0

        def streams() -> list[FakeAckingStream]:
            out = []
            for s in service.created:
                assert isinstance(s, FakeAckingStream)
                out.append(s)
            return out

        await d.start()
        for op, a, b, with_callback in ops:
            if op == "dispatch":
                for _ in range(b):
                    p = _packet(a, seq)
                    seq += 1
                    key, ip = destination_key_and_ip(p)
                    if with_callback:
                        f = futures[p] = d.dispatch_packet_with_callback(key, ip, p)
                        f.add_done_callback(lambda _f, p=p: resolutions.update([p]))
                    else:
                        assert d.dispatch_packet(key, ip, p)
            elif op == "yield":
                await asyncio.sleep(0)  # one loop iteration: drains and receipt callbacks progress
            elif streams():
                s = streams()[a % len(streams())]
                if op == "ack":
                    s.ack(min(b, s.unacked))
                elif op == "reset":
                    s.reset()
                else:
                    s.failures.fail_next(ConnectionResetError)
            d.check_accounting()  # accepted = sent + failed + discarded + queued + in_flight, at every step
        lost_before_stop = sum(s.lost for s in streams())
        if peer_acks_at_stop:
            stopping = asyncio.ensure_future(d.stop(timeout=60.0))  # a hang guard: the acks end it first
            while not stopping.done():
                for s in streams():
                    s.ack()
                await asyncio.sleep(0)
            await stopping
        else:
            # stop() may find drains still running: it gives up on receipts only once no drain is left to
            # write another batch (test_a_drain_running_while_stop_gives_up_leaves_nothing_in_flight).
            await d.stop(timeout=0)
        await asyncio.sleep(0)  # the futures' done callbacks run
        m = d.check_accounting()
        assert m.in_flight == 0
        assert m.queued == 0
        assert m.accepted == seq
        written = sum(len(s.written) for s in streams())
        acked = sum(s.acked for s in streams())
        # The peer has exactly what we count sent; what it never acknowledged is lost in flight.
        assert m.sent == acked
        assert m.failed_by_reason["lost_in_flight"] == written - acked
        assert all(s.unacked == 0 or s.closed for s in streams())  # nothing left unaccounted on a stream
        delivered = {p for s in streams() for p in s.delivered}
        for p, f in futures.items():
            assert f.done()
            assert resolutions[p] == 1
            if f.cancelled():
                continue
            if f.exception() is None:
                assert p in delivered
            else:
                assert p not in delivered
                assert isinstance(f.exception(), (NetworkError, DispatcherStoppedError))
        if peer_acks_at_stop:  # nothing was given up on: only the resets before the stop lost packets
            assert sum(s.gave_up for s in streams()) == 0
            assert m.failed_by_reason["lost_in_flight"] == lost_before_stop
        else:
            assert m.failed_by_reason["lost_in_flight"] == sum(s.lost for s in streams())

    asyncio.run(scenario())


async def test_a_drain_running_while_stop_gives_up_leaves_nothing_in_flight() -> None:
    clock = ManualClock()
    service = FakeStreamService(seed=0, acks=True)  # a peer that acknowledges nothing
    pool = FakeStreamPool(service)
    d = Dispatcher(
        FakePeerDiscovery(prefixes={"10.0.0.0/31": "p1", "10.0.0.0/24": "p2"}),
        None,
        pool,
        resilience_service=ResilienceService(clock=clock, sleep=RecordingSleep(clock)),
        clock=clock,
    )
    await d.start()
    first, second = _packet(0, 0), _packet(1, 1)
    d.dispatch_packet(*destination_key_and_ip(first), first)
    await wait_until(lambda: d.metrics().in_flight == 1)  # written to p1, waiting for its ack
    d.dispatch_packet(*destination_key_and_ip(second), second)  # p2's drain is pending
    await d.stop(timeout=0)
    await asyncio.sleep(0)  # receipt callbacks run
    m = d.check_accounting()
    streams = [s for s in service.created if isinstance(s, FakeAckingStream)]
    assert m.in_flight == 0  # whether the second batch was written before the stop or discarded by it
    assert m.failed_by_reason["lost_in_flight"] == sum(len(s.written) for s in streams)
