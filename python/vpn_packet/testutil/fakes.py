"""In-memory fakes of the dispatcher's four services, with failure, latency and blocking injection.

- `FakePeerDiscovery`: exact addresses and prefixes (longest match) to peer ids, an optional default peer.
- `FakeStream`: records what is written (`written`, `batches`); can fail, be slow or block.
- `FakeAckingStream`: a `FakeStream` whose peer acknowledges, like a `TcpStream`'s: each write returns a
  receipt; the test plays the peer (`ack`, `reset`), so partial acknowledgements, losses and stops can be
  driven without sockets.
- `FakeFramedStream`: a `FakeStream` that also takes framed buffers (`write_framed`, as the TCP stream does):
  records each buffer as it came (`framed`) and its packets like `FakeStream` does.
- `FakeStreamService`: creates `FakeStream`s (or `FakeAckingStream`s, with `acks=True`) and remembers them
  per peer; can make every stream it creates fail writes at random (seeded).
- `FakeStreamPool`: lends streams (reusing healthy ones), records every release with its `healthy` flag and
  tracks `outstanding` streams so that a leak is visible.

Injection is the same everywhere: each fake has a `failures` (`FailureInjector`: fail the next call, the Nth
call, or at random with a seeded generator), a `latency` awaited through an injectable `sleep`, and a `gate`
(`Gate`): close it and calls wait until it is opened. Together with `ManualClock` and `RecordingSleep` tests
never need real time. Everything is deterministic for a given `seed`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeAlias

from vpn_packet._native import split_framed
from vpn_packet.api import Stream
from vpn_packet.errors import PeerNotFoundError
from vpn_packet.transport.delivery import Receipt

__all__ = [
    "FailureInjector",
    "FakeAckingStream",
    "FakeFramedStream",
    "FakePeerDiscovery",
    "FakeStream",
    "FakeStreamPool",
    "FakeStreamService",
    "Gate",
    "LoopbackEndpoint",
    "ManualClock",
    "RecordingSleep",
]

ErrorSpec: TypeAlias = BaseException | type[BaseException] | Callable[[], BaseException]
"""An exception to raise: an instance, a class (instantiated without arguments) or a factory."""

Sleep = Callable[[float], Awaitable[None]]


def _make_error(spec: ErrorSpec) -> BaseException:
    if isinstance(spec, BaseException):
        return spec.with_traceback(None)
    return spec()


class LoopbackEndpoint:
    """An `EndpointResolver` (`vpn_packet.transport.tcp`) that sends every peer to one port on loopback: a
    `TcpStreamService` dialling a test's one `Receiver`."""

    def __init__(self, port: int) -> None:
        self.port = port

    def endpoint(self, peer_id: str) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


class ManualClock:
    """A clock that only moves when told: pass it as `clock=` and call `advance(seconds)`."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds`; returns the new time."""
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now})"


class RecordingSleep:
    """A `sleep` that records each delay, advances an optional `ManualClock` and only yields once to the loop.

    Give it to `ResilienceService(sleep=...)` or a fake's `sleep=` so backoffs and latencies cost no time.
    """

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.clock is not None:
            self.clock.advance(delay)
        await asyncio.sleep(0)


class Gate:
    """Open by default; `close()` makes `wait()` block until `open()`. `waiting` counts blocked callers."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._event.set()
        self.waiting = 0

    @property
    def is_open(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        self._event.clear()

    def open(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        if self._event.is_set():
            return
        self.waiting += 1
        try:
            await self._event.wait()
        finally:
            self.waiting -= 1


class FailureInjector:
    """Decides whether a call fails: `check()` counts the call and raises the injected error, if any.

    Rules, first match wins: errors queued by `fail_next`; a call number given to `fail_on` (1-based, counted
    from the injector's creation); a probability set by `fail_randomly`, drawn from `random.Random(seed)`.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.random = random.Random(seed)
        self.calls = 0
        self.failures = 0
        self._next: deque[ErrorSpec] = deque()
        self._on_calls: dict[int, ErrorSpec] = {}
        self._probability = 0.0
        self._random_error: ErrorSpec = ConnectionResetError

    def fail_next(self, error: ErrorSpec, times: int = 1) -> None:
        """The next `times` calls raise `error`."""
        self._next.extend([error] * times)

    def fail_on(self, *calls: int, error: ErrorSpec) -> None:
        """The calls with these numbers (1 is the first call ever) raise `error`."""
        for n in calls:
            self._on_calls[n] = error

    def fail_randomly(self, probability: float, error: ErrorSpec = ConnectionResetError) -> None:
        """Each call raises `error` with `probability` (0 turns it off)."""
        self._probability = probability
        self._random_error = error

    def clear(self) -> None:
        """No more injected failures (the counters stay)."""
        self._next.clear()
        self._on_calls.clear()
        self._probability = 0.0

    def check(self) -> None:
        """Count a call; raise if a rule says it fails."""
        self.calls += 1
        spec: ErrorSpec | None = None
        if self._next:
            spec = self._next.popleft()
        elif self.calls in self._on_calls:
            spec = self._on_calls.pop(self.calls)
        elif self._probability and self.random.random() < self._probability:
            spec = self._random_error
        if spec is not None:
            self.failures += 1
            raise _make_error(spec)

    def __repr__(self) -> str:
        return f"FailureInjector(calls={self.calls}, failures={self.failures})"


class _Injectable:
    """Latency, gate and failures shared by the fakes."""

    def __init__(self, *, seed: int | None, latency: float, sleep: Sleep | None, gate: Gate | None) -> None:
        self.failures = FailureInjector(seed)
        self.latency = latency
        self.sleep: Sleep = sleep if sleep is not None else asyncio.sleep
        self.gate = gate if gate is not None else Gate()

    async def _before(self) -> None:
        if not self.gate.is_open:
            await self.gate.wait()
        if self.latency:
            await self.sleep(self.latency)
        self.failures.check()


class FakeStream(_Injectable):
    """A stream that records packets: `written` (all, in order) and `batches` (one list per call).

    A failed call writes nothing. Writing to a closed stream raises `BrokenPipeError`. When `log` is given,
    successful writes are appended to it too (a log shared by streams gives the order across streams).
    """

    def __init__(
        self,
        peer_id: str = "",
        *,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
        log: list[bytes] | None = None,
    ) -> None:
        super().__init__(seed=seed, latency=latency, sleep=sleep, gate=gate)
        self.peer_id = peer_id
        self.log = log
        self.written: list[bytes] = []
        self.batches: list[list[bytes]] = []
        self.closed = False
        self.close_calls = 0

    async def write(self, packet: bytes) -> Awaitable[int] | None:
        return await self.write_many((packet,))

    async def write_many(self, packets: Sequence[bytes]) -> Awaitable[int] | None:
        """Records `packets`; None: no acknowledgements, written is sent."""
        await self._before()
        self._check_open()
        self.written.extend(packets)
        self.batches.append(list(packets))
        if self.log is not None:
            self.log.extend(packets)
        return None

    async def close(self) -> None:
        self.closed = True
        self.close_calls += 1

    def _check_open(self) -> None:
        if self.closed:
            raise BrokenPipeError(f"stream to {self.peer_id!r} is closed")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<FakeStream to {self.peer_id!r} {state} written={len(self.written)}>"


class FakeAckingStream(FakeStream):
    """A `FakeStream` whose peer acknowledges what it takes, as a `TcpStream`'s receiver does.

    `write_many` returns a `vpn_packet.transport.delivery.Receipt`: it resolves with the batch's size once an
    acknowledgement covers the batch, or, when the connection ends first, with how many of its packets (from
    the first) were acknowledged by then. The test plays the peer:

    - `ack(n)` acknowledges `n` more packets (default: everything written); `ack_to(total)` is the
      cumulative form the wire uses (a stale or duplicate count changes nothing; beyond what was written
      raises `ValueError`). With `auto_ack=True` every batch is acknowledged as it is written.
    - `reset()` ends the connection (the peer died, or the watchdog gave up): open receipts resolve with
      their acknowledged part and later writes raise `ConnectionResetError`. A stop's `Receipt.give_up()`
      does the same (`gave_up` counts those), and so do `close()` and a pool's release as unhealthy
      (`closed = True`), like a `TcpStream` closed with packets unacknowledged.

    `acked` counts the packets acknowledged, `unacked` those written and not (yet) acknowledged, `lost` those
    that were unacknowledged when the connection ended; `delivered` is what the peer has (`written[:acked]`),
    and `receipts` every receipt returned, in order.
    """

    def __init__(
        self,
        peer_id: str = "",
        *,
        auto_ack: bool = False,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
        log: list[bytes] | None = None,
    ) -> None:
        self._ended = False
        self._open: deque[tuple[int, int, Receipt]] = deque()  # (written after the batch, size, receipt)
        super().__init__(peer_id, seed=seed, latency=latency, sleep=sleep, gate=gate, log=log)
        self.auto_ack = auto_ack
        self.acked = 0
        self.lost = 0
        self.resets = 0
        self.gave_up = 0
        self.receipts: list[Receipt] = []

    @property
    def closed(self) -> bool:
        return self._ended

    @closed.setter
    def closed(self, value: bool) -> None:
        if value:
            self._end()

    @property
    def unacked(self) -> int:
        return len(self.written) - self.acked

    @property
    def delivered(self) -> list[bytes]:
        return self.written[: self.acked]

    async def write_many(self, packets: Sequence[bytes]) -> Receipt:
        """Records `packets` and returns their receipt (resolved at once for an empty batch)."""
        await super().write_many(packets)
        receipt = Receipt(self._give_up)
        self.receipts.append(receipt)
        if not packets:
            receipt.set_result(0)
            return receipt
        self._open.append((len(self.written), len(packets), receipt))
        if self.auto_ack:
            self.ack()
        return receipt

    async def write(self, packet: bytes) -> Receipt:
        return await self.write_many((packet,))

    def ack(self, n: int | None = None) -> int:
        """The peer acknowledges `n` more packets (all written ones when None); returns the new total."""
        return self.ack_to(len(self.written) if n is None else self.acked + n)

    def ack_to(self, total: int) -> int:
        """The peer says it has taken `total` packets in all; returns the acknowledged total."""
        if total > len(self.written):
            raise ValueError(f"ack of {total} packets, only {len(self.written)} were written")
        if self._ended or total <= self.acked:
            return self.acked
        self.acked = total
        while self._open and self._open[0][0] <= total:
            _end, size, receipt = self._open.popleft()
            if not receipt.done():
                receipt.set_result(size)
        return self.acked

    def reset(self) -> None:
        """The connection ends now: what is unacknowledged is lost."""
        self.resets += 1
        self._end()

    async def close(self) -> None:
        self.close_calls += 1
        self._end()

    def _give_up(self) -> None:
        self.gave_up += 1
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.lost += self.unacked
        while self._open:
            end, size, receipt = self._open.popleft()
            if not receipt.done():
                receipt.set_result(max(0, size - (end - self.acked)))

    def _check_open(self) -> None:
        if self._ended:
            if self.close_calls:
                raise BrokenPipeError(f"stream to {self.peer_id!r} is closed")
            raise ConnectionResetError(f"connection to {self.peer_id!r} was reset")

    def __repr__(self) -> str:
        state = "closed" if self._ended else "open"
        return (
            f"<FakeAckingStream to {self.peer_id!r} {state} written={len(self.written)} acked={self.acked} "
            f"lost={self.lost}>"
        )


class FakeFramedStream(FakeStream):
    """A `FakeStream` with `write_framed(data, count)`, the zero-copy write a drain prefers when a stream has
    it: `data` is `count` frames as the dispatcher's native queues hold them (see
    `vpn_packet._native.DestinationQueues`). Each call is recorded in `framed` as `(data, count)`; its packets
    are recorded in `written` and `batches` (offload frames without their virtio header), so the tests of
    `FakeStream` read the same. `write_many` still works (`framed_calls` / `list_calls` count each kind).
    """

    def __init__(
        self,
        peer_id: str = "",
        *,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
        log: list[bytes] | None = None,
    ) -> None:
        super().__init__(peer_id, seed=seed, latency=latency, sleep=sleep, gate=gate, log=log)
        self.framed: list[tuple[bytes, int]] = []
        self.framed_calls = 0
        self.list_calls = 0

    async def write_many(self, packets: Sequence[bytes]) -> Awaitable[int] | None:
        self.list_calls += 1
        return await super().write_many(packets)

    async def write_framed(self, data: bytes, count: int) -> Awaitable[int] | None:
        """Records the framed buffer; None: no acknowledgements, written is sent."""
        self.framed_calls += 1
        await self._before()
        self._check_open()
        packets = split_framed(data)
        if len(packets) != count:
            raise ValueError(f"write_framed: {len(packets)} frames in the buffer, count says {count}")
        self.framed.append((bytes(data), count))
        self.written.extend(packets)
        self.batches.append(packets)
        if self.log is not None:
            self.log.extend(packets)
        return None


class FakeStreamService(_Injectable):
    """Creates `FakeStream`s; `failures`, `latency` and `gate` apply to `create_stream`.

    With `acks=True` it creates `FakeAckingStream`s (acknowledging each batch as it is written when
    `auto_ack` is true as well).

    `write_failure_rate` makes every stream it creates fail writes at random (with `write_error`), seeded from
    `seed`. Streams to one peer share the gate `gate_for(peer_id)` (close it to block that peer's writes), or
    `stream_gate` when given (one gate for all). `log` has every packet written through any of its streams,
    in the order of the writes; `stream_latency` is given to every stream.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
        write_failure_rate: float = 0.0,
        write_error: ErrorSpec = ConnectionResetError,
        stream_gate: Gate | None = None,
        stream_latency: float = 0.0,
        acks: bool = False,
        auto_ack: bool = False,
    ) -> None:
        super().__init__(seed=seed, latency=latency, sleep=sleep, gate=gate)
        self.acks = acks
        self.auto_ack = auto_ack
        self._seeds = random.Random(seed)
        self.stream_latency = stream_latency
        self.log: list[bytes] = []
        self.write_failure_rate = write_failure_rate
        self.write_error = write_error
        self.stream_gate = stream_gate
        self.created: list[FakeStream] = []
        self.calls: list[str] = []
        self._peer_gates: dict[str, Gate] = {}

    def gate_for(self, peer_id: str) -> Gate:
        """The gate of the streams to `peer_id` (existing and future ones)."""
        if self.stream_gate is not None:
            return self.stream_gate
        gate = self._peer_gates.get(peer_id)
        if gate is None:
            gate = self._peer_gates[peer_id] = Gate()
        return gate

    async def create_stream(self, peer_id: str) -> FakeStream:
        self.calls.append(peer_id)
        await self._before()
        seed = self._seeds.randrange(2**32)
        stream: FakeStream
        if self.acks:
            stream = FakeAckingStream(
                peer_id,
                auto_ack=self.auto_ack,
                seed=seed,
                latency=self.stream_latency,
                sleep=self.sleep,
                gate=self.gate_for(peer_id),
                log=self.log,
            )
        else:
            stream = FakeStream(
                peer_id,
                seed=seed,
                latency=self.stream_latency,
                sleep=self.sleep,
                gate=self.gate_for(peer_id),
                log=self.log,
            )
        if self.write_failure_rate:
            stream.failures.fail_randomly(self.write_failure_rate, self.write_error)
        self.created.append(stream)
        return stream

    def streams(self, peer_id: str) -> list[FakeStream]:
        """The streams created for `peer_id`, oldest first."""
        return [s for s in self.created if s.peer_id == peer_id]

    def written(self, peer_id: str | None = None) -> list[bytes]:
        """Everything written to `peer_id` (or to anyone), stream by stream in creation order."""
        return [p for s in self.created if peer_id is None or s.peer_id == peer_id for p in s.written]


class FakeStreamPool(_Injectable):
    """A pool over a `FakeStreamService`: lends an idle healthy stream of the peer, else a new one.

    `failures`, `latency` and `gate` apply to `get_stream`. Every release is recorded in `releases` as
    `(peer_id, stream, healthy)`; an unhealthy stream is closed and never lent again. `outstanding` is the
    number of streams lent and not given back (0 when nothing leaked); releasing a stream that is not lent
    raises `ValueError`.
    """

    def __init__(
        self,
        service: FakeStreamService | None = None,
        *,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
        reuse: bool = True,
    ) -> None:
        super().__init__(seed=seed, latency=latency, sleep=sleep, gate=gate)
        self.service = service if service is not None else FakeStreamService(seed=seed)
        self.reuse = reuse
        self._idle: dict[str, list[FakeStream]] = {}
        self._lent: dict[int, Stream] = {}
        self.gets = 0
        self.releases: list[tuple[str, Stream, bool]] = []

    async def get_stream(self, peer_id: str) -> FakeStream:
        self.gets += 1
        await self._before()
        idle = self._idle.get(peer_id)
        stream = idle.pop() if idle else await self.service.create_stream(peer_id)
        self._lent[id(stream)] = stream
        return stream

    def release_stream(self, peer_id: str, stream: Stream, healthy: bool) -> None:
        if self._lent.pop(id(stream), None) is None:
            raise ValueError(f"release of a stream that is not lent: {stream!r}")
        self.releases.append((peer_id, stream, healthy))
        assert isinstance(stream, FakeStream)
        if healthy and self.reuse:
            self._idle.setdefault(peer_id, []).append(stream)
        else:
            stream.closed = True

    @property
    def outstanding(self) -> int:
        """Streams lent and not released."""
        return len(self._lent)

    @property
    def unhealthy_releases(self) -> int:
        return sum(1 for *_, healthy in self.releases if not healthy)

    def assert_no_leaks(self) -> None:
        """Raise `AssertionError` if a stream is still lent."""
        if self._lent:
            raise AssertionError(f"{len(self._lent)} stream(s) never released: {list(self._lent.values())}")

    def written(self, peer_id: str | None = None) -> list[bytes]:
        """Everything written through streams of `peer_id` (or of anyone)."""
        return self.service.written(peer_id)


class FakePeerDiscovery(_Injectable):
    """Looks peers up in `peers` (exact address), then `prefixes` (longest match), then `default`.

    Addresses are normalised (`2001:DB8::1` matches `2001:db8::1`). Raises `PeerNotFoundError` when nothing
    matches. Every call is recorded in `calls`. Besides the shared `gate`, `gate_for(dest_ip)` blocks the
    lookups of one address.
    """

    def __init__(
        self,
        peers: Mapping[str, str] | None = None,
        *,
        prefixes: Mapping[str, str] | None = None,
        default: str | None = None,
        seed: int | None = None,
        latency: float = 0.0,
        sleep: Sleep | None = None,
        gate: Gate | None = None,
    ) -> None:
        super().__init__(seed=seed, latency=latency, sleep=sleep, gate=gate)
        self.peers = {_normalise(ip): peer for ip, peer in (peers or {}).items()}
        self._prefixes: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for prefix, peer in (prefixes or {}).items():
            self.add_prefix(prefix, peer)
        self.default = default
        self.calls: list[str] = []
        self._address_gates: dict[str, Gate] = {}

    def gate_for(self, dest_ip: str) -> Gate:
        """A gate that only the lookups of `dest_ip` wait for."""
        ip = _normalise(dest_ip)
        gate = self._address_gates.get(ip)
        if gate is None:
            gate = self._address_gates[ip] = Gate()
        return gate

    def set_peer(self, dest_ip: str, peer_id: str) -> None:
        self.peers[_normalise(dest_ip)] = peer_id

    def remove_peer(self, dest_ip: str) -> None:
        self.peers.pop(_normalise(dest_ip), None)

    def add_prefix(self, prefix: str, peer_id: str) -> None:
        self._prefixes.append((ipaddress.ip_network(prefix, strict=False), peer_id))
        self._prefixes.sort(key=lambda item: item[0].prefixlen, reverse=True)

    def lookup(self, dest_ip: str) -> str | None:
        """The answer `get_peer_id` would give, without injection or recording."""
        ip = _normalise(dest_ip)
        peer = self.peers.get(ip)
        if peer is not None:
            return peer
        if self._prefixes:
            address = ipaddress.ip_address(ip)
            for network, peer_id in self._prefixes:
                if address.version == network.version and address in network:
                    return peer_id
        return self.default

    async def get_peer_id(self, dest_ip: str) -> str:
        self.calls.append(dest_ip)
        if self._address_gates:
            gate = self._address_gates.get(_normalise(dest_ip))
            if gate is not None:
                await gate.wait()
        await self._before()
        peer = self.lookup(dest_ip)
        if peer is None:
            raise PeerNotFoundError(dest_ip)
        return peer


def _normalise(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip
