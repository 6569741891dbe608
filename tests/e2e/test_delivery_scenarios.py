"""Honest delivery (issue 11), with a real peer: a receiving `Node` in a subprocess
(`vpn_packet.testutil.peer_process`) that we freeze (SIGSTOP), resume, terminate and kill, while an in-process
sending `Node` pushes marked packets to it (per destination a sequence number; the peer checks the order).

Every scenario compares the peer's OWN count of delivered packets with our `sent`, exactly, and checks the
accounting identity (accepted = sent + failed + discarded + queued + in_flight) at every sample:

1. a peer frozen right after its handshake: nothing ever acknowledged, so `sent` stays 0; `in_flight` stays
   within the window; the ack watchdog declares the connection dead while the peer is still frozen; at stop
   every written packet is failed `lost_in_flight`; the peer (resumed, terminated) delivered 0;
2. a peer that stalls and then dies (SIGKILL while frozen): what it delivered (its shared counts file,
   which survives the kill) equals our `sent`;
3. SIGTERM to the peer under load: its final report equals our `sent`;
4. a freeze of 3 x ack_timeout while we keep sending, then resume: the connection is replaced, the peer sees
   0 out-of-order packets per destination, and its delivered count equals our `sent`;
5. our stop during a freeze: we give up on the unacknowledged packets (reset); the resumed peer discards
   what it had not taken (`discarded_after_reset` > 0) and its delivered count equals our `sent`.

Each scenario runs in plaintext and with TLS (key mode: the sending side on the native core's
`SendSession`, the peer's receiver on its `ReceiveSession`).

Waiting is for events (counters, the peer's reports, process states); the only durations are the
configured timeouts under test and guards against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vpn_packet.metrics import DispatcherMetrics
from vpn_packet.node.node import Node
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.testutil.peer_process import PeerProcess, mark_packet
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.tcp import TcpStream

ACK_TIMEOUT = 0.5
SIZE = 200  # bytes per packet
DESTINATIONS = 8
BATCH = 256  # packets per send_batch
SLOW_SINK = 100  # CRC-32 passes per packet at the slow peer
GUARD = 60.0  # seconds: only against a hang
A_NETS = ["10.1.0.0/16"]
B_NETS = ["10.2.0.0/16"]
FRAME = len(encode_frames([bytes(SIZE)]))  # bytes on the wire per packet


@dataclass
class Sender:
    """An in-process sending node, its marked workload, and the samples of its dispatcher's metrics."""

    node: Node
    templates: list[bytes]
    seq: list[int] = field(default_factory=lambda: [0] * DESTINATIONS)
    samples: int = 0
    max_in_flight: int = 0
    sent_values: set[int] = field(default_factory=set)

    def send(self, n: int = BATCH) -> int:
        packets = []
        for i in range(n):
            d = (self.samples + i) % DESTINATIONS
            packets.append(mark_packet(self.templates[d], d, self.seq[d]))
            self.seq[d] += 1
        return self.node.send_batch(packets)

    def sample(self) -> DispatcherMetrics:
        m = self.node.metrics().dispatcher
        assert m.accounting_ok, m
        self.samples += 1
        self.max_in_flight = max(self.max_in_flight, m.in_flight)
        self.sent_values.add(m.sent)
        return m

    async def drive(
        self,
        until: Callable[[DispatcherMetrics], bool],
        check: Callable[[DispatcherMetrics], None] | None = None,
    ) -> DispatcherMetrics:
        """Send batches and sample until `until(metrics)`; `check(metrics)` at every sample."""
        async with asyncio.timeout(GUARD):
            while True:
                m = self.sample()
                if check is not None:
                    check(m)
                if until(m):
                    return m
                self.send()
                await asyncio.sleep(0.001)  # let the workers, the streams and the receiver's acks run

    async def wait(self, until: Callable[[DispatcherMetrics], bool]) -> DispatcherMetrics:
        """Sample (without sending) until `until(metrics)`."""
        async with asyncio.timeout(GUARD):
            while not until(m := self.sample()):  # noqa: ASYNC110 - metrics have no event to wait on
                await asyncio.sleep(0.001)
        return m

    async def stop(self, timeout: float = 5.0) -> DispatcherMetrics:  # noqa: ASYNC109 - Node.stop's drain bound
        await self.node.stop(timeout)
        m = self.sample()
        assert m.in_flight == 0, m
        assert m.queued == 0, m
        assert m.accepted == m.sent + m.failed + m.discarded, m
        return m


def lost(m: DispatcherMetrics) -> int:
    return int(m.failed_by_reason.get("lost_in_flight", 0))


@dataclass(frozen=True)
class Mode:
    """Plaintext, or TLS in key mode: the sender's `Security` and what the peer process is started with."""

    sender: Security
    peer_key_file: Path | None = None  # the peer's key file (None: plaintext)
    sender_key: str = ""  # the sender's public key, for the peer's config

    async def start_peer(self, sink_work: int = 0) -> PeerProcess:
        return await PeerProcess.start(
            sender_prefixes=A_NETS, sink_work=sink_work, key=self.peer_key_file, peer_key=self.sender_key
        )


@pytest.fixture(params=["insecure", "key"])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> Mode:
    if request.param == "insecure":
        return Mode(Security.insecure("node-a"))
    ids = identities(tmp_path, "node-a", "node-b")
    return Mode(
        Security.with_keys(ids["node-a"], {"node-b": ids["node-b"].public_key_bytes}),
        ids["node-b"].path,
        ids["node-a"].public_key,
    )


@pytest.fixture
async def peer(mode: Mode) -> AsyncIterator[PeerProcess]:
    process = await mode.start_peer()
    try:
        yield process
    finally:
        await process.close()


def make_sender(peer: PeerProcess, mode: Mode, **changes: object) -> Sender:
    settings: dict[str, object] = {
        "ack_timeout": ACK_TIMEOUT,
        "connect_timeout": 1.0,
        "worker_buffer_size": 1024,
    }
    settings.update(changes)
    node = Node(mode.sender, ("127.0.0.1", 0), [Peer("node-b", peer.endpoint, B_NETS)], **settings)
    # Node does not hand `ack_timeout` and `window` to its TcpStreamService (node.py builds the service
    # without them, so Tuning's values are ignored): set them where the streams read them.
    node.stream_service.ack_timeout = node.tuning.ack_timeout
    node.stream_service.window = node.tuning.window
    templates = [
        ipv4_packet("10.1.0.1", f"10.2.0.{d + 1}", UDP, 4000, 53, bytes(SIZE - 28))
        for d in range(DESTINATIONS)
    ]
    return Sender(node, templates)


@contextlib.asynccontextmanager
async def running(sender: Sender) -> AsyncIterator[Sender]:
    await sender.node.start()
    try:
        yield sender
    finally:
        await sender.node.stop(1.0)


async def test_peer_frozen_after_handshake_acknowledges_nothing_and_nothing_is_sent(
    peer: PeerProcess, mode: Mode
) -> None:
    window = 64 * 1024
    buffer = 64
    sender = make_sender(peer, mode, window=window, worker_buffer_size=buffer)
    # In flight at most: the window, plus the one batch a worker may write while it is not full yet.
    bound = window // FRAME + buffer
    async with running(sender):
        node = sender.node
        lease = await node.pool.get_stream("node-b")  # the handshake, before any packet
        stream = lease.stream
        assert isinstance(stream, TcpStream)
        node.pool.release_stream("node-b", lease, True)
        await peer.freeze()

        def check(m: DispatcherMetrics) -> None:
            assert m.sent == 0, m
            assert m.in_flight <= bound, (m.in_flight, bound)

        # The watchdog declares the connection dead while the peer is still frozen and we are still sending.
        m = await sender.drive(lambda m: lost(m) > 0, check)
        assert stream.closed
        assert stream.acknowledged == 0
        # The window was reached (less one batch: a write that would cross it waits): the bound was exercised.
        assert (stream.packets_sent + buffer) * FRAME > window
        for _ in range(20):  # and it stays so: the replacement cannot come up with a frozen peer
            m = await sender.drive(lambda m: True, check)
            sender.send()
            await asyncio.sleep(0.001)
        m = await sender.stop(2.0)
        assert m.sent == 0
        assert lost(m) == stream.packets_sent, m  # every written packet, failed as lost in flight
        assert node.stream_service.connects == 1
    final = await peer.terminate()
    assert final["delivered"] == m.sent == 0, final
    assert sender.max_in_flight <= bound


async def test_peer_that_stalls_then_dies_got_exactly_what_we_counted_sent(
    peer: PeerProcess, mode: Mode
) -> None:
    sender = make_sender(peer, mode)
    async with running(sender):
        await sender.drive(lambda m: m.sent >= 20_000)
        await peer.freeze()
        m = await sender.drive(lambda m: lost(m) > 0)  # declared dead by the watchdog
        peer.kill()
        await peer.wait()
        m = await sender.stop(2.0)
    counts = peer.counts()
    assert counts["out_of_order"] == 0
    assert counts["delivered"] == m.sent, (counts, m)
    assert lost(m) > 0


async def test_sigterm_to_the_peer_under_load(mode: Mode) -> None:
    # A peer slower than we are (CPU work per packet), so that its buffers hold data when it stops.
    peer = await mode.start_peer(sink_work=SLOW_SINK)
    try:
        sender = make_sender(peer, mode, ack_timeout=2.0)
        async with running(sender):
            await sender.drive(lambda m: m.sent >= 20_000)
            load = asyncio.ensure_future(sender.drive(lambda m: False))
            try:
                final = await peer.terminate()
            finally:
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
            m = await sender.stop(2.0)
    finally:
        await peer.close()
    assert final["out_of_order"] == 0
    assert final["delivered"] == m.sent, (final, m)
    assert lost(m) > 0  # there was data in flight when it stopped: the comparison means something


async def test_freeze_longer_than_ack_timeout_then_resume_keeps_order_and_counts(
    peer: PeerProcess, mode: Mode
) -> None:
    sender = make_sender(peer, mode)
    loop = asyncio.get_running_loop()
    async with running(sender):
        await sender.drive(lambda m: m.sent >= 10_000)
        await peer.freeze()
        frozen_at = loop.time()
        await sender.drive(lambda m: lost(m) > 0 and loop.time() - frozen_at >= 3 * ACK_TIMEOUT)
        peer.resume()
        resumed = sender.sample().sent
        await sender.drive(lambda m: m.sent >= resumed + 10_000)  # delivery goes on, on a new connection
        assert sender.node.stream_service.connects >= 2
        m = await sender.stop(5.0)
    final = await peer.terminate()
    assert final["out_of_order"] == 0, final
    # A freeze can land between a delivery and its ack: the peer counts what it took but could not ack.
    assert final["delivered"] == m.sent + final["receiver"]["unacknowledged"], (final, m)
    assert lost(m) > 0


async def test_stop_during_a_freeze_counts_exactly(peer: PeerProcess, mode: Mode) -> None:
    # The watchdog must not be what resets the connection here: our stop gives up on it.
    sender = make_sender(peer, mode, ack_timeout=60.0)
    async with running(sender):
        await sender.drive(lambda m: m.sent >= 10_000)
        await peer.freeze()
        before = await sender.drive(lambda m: m.in_flight > 0 and m.queued > 0)
        assert lost(before) == 0
        m = await sender.stop(0.5)
    assert lost(m) > 0
    peer.resume()
    async with asyncio.timeout(GUARD):
        report = await peer.report()
        while report["receiver"]["active_connections"]:  # until it found the reset and closed it
            report = await peer.report()
    assert report["receiver"]["discarded_after_reset"] > 0, report
    # The freeze may have landed between a delivery and its ack (the ack then finds the reset): the peer
    # counts those frames `unacknowledged`, and our `sent` plus them is exactly what it delivered.
    unacknowledged = report["receiver"]["unacknowledged"]
    assert report["delivered"] == m.sent + unacknowledged, (report, m)
    final = await peer.terminate()
    assert final["delivered"] == m.sent + unacknowledged
    assert final["out_of_order"] == 0


def test_node_hands_its_ack_settings_to_its_streams() -> None:
    node = Node(Security.insecure("node-a"), ack_timeout=0.5, window=128 * 1024)
    assert (node.stream_service.ack_timeout, node.stream_service.window) == (0.5, 128 * 1024)
