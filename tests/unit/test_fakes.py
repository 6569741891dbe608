"""The fakes and fixtures of vpn_packet.testutil."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vpn_packet.errors import PeerNotFoundError
from vpn_packet.testutil import (
    FailureInjector,
    FakePeerDiscovery,
    FakeStream,
    FakeStreamPool,
    FakeStreamService,
    Gate,
    ManualClock,
    RecordingSleep,
)


def test_failure_injector_rules() -> None:
    inj = FailureInjector(seed=1)
    inj.fail_next(KeyError, times=2)
    inj.fail_on(4, error=ValueError("fourth"))
    raised = []
    for _ in range(5):
        try:
            inj.check()
        except Exception as exc:
            raised.append(type(exc).__name__)
        else:
            raised.append("ok")
    assert raised == ["KeyError", "KeyError", "ok", "ValueError", "ok"]
    assert (inj.calls, inj.failures) == (5, 3)


def test_failure_injector_is_deterministic_for_a_seed() -> None:
    def pattern(seed: int) -> list[bool]:
        inj = FailureInjector(seed)
        inj.fail_randomly(0.3, lambda: TimeoutError("t"))
        out = []
        for _ in range(200):
            try:
                inj.check()
                out.append(False)
            except TimeoutError:
                out.append(True)
        return out

    assert pattern(7) == pattern(7) != pattern(8)
    assert 30 < sum(pattern(7)) < 90
    inj = FailureInjector()
    inj.fail_randomly(1.0)
    inj.clear()
    inj.check()


async def test_fake_stream_records_fails_and_blocks() -> None:
    log: list[bytes] = []
    stream = FakeStream("p", log=log)
    await stream.write(b"a")
    await stream.write_many([b"b", b"c"])
    assert stream.written == [b"a", b"b", b"c"]
    assert stream.batches == [[b"a"], [b"b", b"c"]]
    assert log == stream.written
    stream.failures.fail_next(ConnectionResetError("boom"))
    with pytest.raises(ConnectionResetError, match="boom"):
        await stream.write_many([b"d"])
    assert stream.written == [b"a", b"b", b"c"]  # a failed call writes nothing
    stream.gate.close()
    pending = asyncio.ensure_future(stream.write(b"e"))
    await asyncio.sleep(0)  # one loop iteration: the write starts and blocks on the gate
    assert not pending.done()
    assert stream.gate.waiting == 1
    stream.gate.open()
    await pending
    await stream.close()
    with pytest.raises(BrokenPipeError):
        await stream.write(b"f")


async def test_latency_goes_through_the_injected_sleep() -> None:
    clock = ManualClock()
    sleep = RecordingSleep(clock)
    stream = FakeStream(latency=0.25, sleep=sleep)
    await stream.write(b"x")
    await stream.write(b"y")
    assert sleep.delays == [0.25, 0.25]
    assert clock() == 0.5


async def test_fake_peer_discovery_lookups() -> None:
    d = FakePeerDiscovery(
        {"10.0.0.1": "exact", "2001:DB8::1": "v6"},
        prefixes={"10.0.0.0/8": "wide", "10.1.0.0/16": "narrow"},
    )
    assert await d.get_peer_id("10.0.0.1") == "exact"
    assert await d.get_peer_id("2001:db8::1") == "v6"
    assert await d.get_peer_id("10.1.2.3") == "narrow"  # longest prefix wins
    assert await d.get_peer_id("10.9.9.9") == "wide"
    with pytest.raises(PeerNotFoundError):
        await d.get_peer_id("192.0.2.1")
    d.default = "fallback"
    assert await d.get_peer_id("192.0.2.1") == "fallback"
    assert d.calls == ["10.0.0.1", "2001:db8::1", "10.1.2.3", "10.9.9.9", "192.0.2.1", "192.0.2.1"]
    d.failures.fail_next(RuntimeError)
    with pytest.raises(RuntimeError):
        await d.get_peer_id("10.0.0.1")
    gate = d.gate_for("10.0.0.1")
    gate.close()
    blocked = asyncio.ensure_future(d.get_peer_id("10.0.0.1"))
    assert await d.get_peer_id("10.9.9.9") == "wide"  # only that address waits
    assert not blocked.done()
    gate.open()
    assert await blocked == "exact"


async def test_fake_pool_lends_reuses_and_tracks_leaks() -> None:
    service = FakeStreamService(seed=0)
    pool = FakeStreamPool(service)
    a = await pool.get_stream("p")
    b = await pool.get_stream("p")
    assert a is not b
    assert pool.outstanding == 2
    pool.release_stream("p", a, True)
    assert await pool.get_stream("p") is a  # a healthy stream is lent again
    pool.release_stream("p", a, True)
    pool.release_stream("p", b, False)
    assert isinstance(b, FakeStream)
    assert b.closed
    assert pool.outstanding == 0
    assert pool.unhealthy_releases == 1
    pool.assert_no_leaks()
    with pytest.raises(ValueError, match="not lent"):
        pool.release_stream("p", b, True)
    await pool.get_stream("q")
    with pytest.raises(AssertionError, match="never released"):
        pool.assert_no_leaks()
    pool.failures.fail_next(TimeoutError)
    with pytest.raises(TimeoutError):
        await pool.get_stream("p")


async def test_stream_service_random_write_failures_and_per_peer_gates() -> None:
    service = FakeStreamService(seed=5, write_failure_rate=0.5)
    stream = await service.create_stream("p")
    outcomes = []
    for i in range(40):
        try:
            await stream.write(bytes([i]))
            outcomes.append(True)
        except ConnectionResetError:
            outcomes.append(False)
    assert 5 < outcomes.count(False) < 35
    assert service.written("p") == service.log == stream.written
    assert service.gate_for("p") is stream.gate
    assert service.gate_for("q") is not stream.gate


def test_gate_and_clock_basics() -> None:
    gate = Gate()
    assert gate.is_open
    gate.close()
    assert not gate.is_open
    clock = ManualClock(10)
    assert clock.advance(5) == 15 == clock()


def test_the_fixtures_plugin_works_in_a_users_suite(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["vpn_packet.testutil.fixtures"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            import pytest

            from vpn_packet.testutil.fixtures import settle

            @pytest.mark.asyncio
            async def test_with_fixtures(dispatcher, fake_pool, make_packet, no_task_leaks):
                assert dispatcher.dispatch(make_packet("10.0.0.2", 80))
                assert dispatcher.dispatch(make_packet("2001:db8::2", 53))
                await dispatcher.flush()
                assert len(fake_pool.written("peer-1")) == 2

            @pytest.mark.asyncio
            async def test_factory_and_clock(dispatcher_factory, manual_clock, fake_stream_service):
                d = await dispatcher_factory(worker_idle_timeout=5)
                d.dispatch_packet("k", "10.0.0.1", b"x")
                await d.flush()
                manual_clock.advance(6)
                assert d.run_cleanup() == 1
                fake_stream_service.gate_for("peer-1").close()
                d.dispatch_packet("k", "10.0.0.1", b"y")
                await settle()
                fake_stream_service.gate_for("peer-1").open()
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=strict",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


async def test_fake_acking_stream_resolves_receipts_like_a_tcp_stream() -> None:
    from vpn_packet.testutil import FakeAckingStream

    stream = FakeAckingStream("p")
    first = await stream.write_many([b"a", b"b"])
    second = await stream.write_many([b"c", b"d", b"e"])
    assert await (await stream.write_many([])) == 0
    assert stream.ack(1) == 1  # inside the first batch: nothing resolves yet
    assert not first.done()
    assert stream.ack_to(3) == 3  # covers the first batch, ends inside the second
    assert (first.result(), second.done(), stream.unacked) == (2, False, 2)
    assert stream.ack_to(2) == 3  # stale: changes nothing
    with pytest.raises(ValueError, match="only 5"):
        stream.ack_to(6)
    second.give_up()  # a stop gives up: resolved with the acknowledged part, the rest lost
    assert (second.result(), stream.lost, stream.gave_up, stream.delivered) == (1, 2, 1, [b"a", b"b", b"c"])
    with pytest.raises(ConnectionResetError):
        await stream.write(b"late")
    auto = FakeAckingStream("p", auto_ack=True)
    assert await (await auto.write_many([b"x", b"y"])) == 2
    released = FakeAckingStream("p")
    receipt = await released.write(b"z")
    released.closed = True  # what a pool does with an unhealthy stream: the connection ends
    assert (receipt.result(), released.lost) == (0, 1)
    with pytest.raises(BrokenPipeError if released.close_calls else ConnectionResetError):
        await released.write(b"late")


async def test_fake_stream_service_makes_acking_streams() -> None:
    from vpn_packet.testutil import FakeAckingStream

    service = FakeStreamService(seed=0, acks=True, auto_ack=True)
    stream = await service.create_stream("p")
    assert isinstance(stream, FakeAckingStream)
    assert await (await stream.write_many([b"x"])) == 1
    assert service.log == [b"x"]
