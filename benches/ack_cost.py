"""Acks, measured apart (issue 20: "acks cost at most 5%"), node to node in one process over loopback.

Why a script of its own: acks cannot simply be switched off. The sender's in-flight window waits for them,
and "sent" means acknowledged, so a run without acks is not the same protocol; and the tree before acks
(861c860, "Honest delivery" in benches/README.md) is too old to compare with a data path that has changed
since. So this measures the same `Node` to `Node` run as `bench_transport.py` three ways, interleaved round
by round (the machine is shared and noisy: ratios from neighbouring rounds are what counts):

- `now`: production code, untouched. On this path (a library sink, no TUN) the receiver writes the ack
  after every read whose packets the sink took (`_Pump.readable` -> `_Pump._flush`: one `send` of a 9-byte
  record, a TLS record in key mode), and the sender reads it in one readiness callback per arrival
  (`_Link._readable`: one native `SendSession.pump`, then `TcpStream._on_acked`).
- `coalesced`: a bench-only injection, no production knob: `_Pump._flush` is patched in this process so
  that an ack write waits `--delay` seconds (2 ms by default) and every ack of the reads meanwhile leaves in
  that one write. The sender wakes about once per delay per connection instead of once per read. What
  `coalesced` still pays: the core still queues a 9-byte record per read (in key mode sealed as its own TLS
  record, which the sender opens), and a fifth to a third of the ack writes remain (`cpu_cost_all_writes`
  scales the difference by them); so `now - coalesced` is a lower bound of what acks cost.
- `timed`: production behaviour with the two ack handlers wrapped in `time.perf_counter()` pairs (the
  receiver's `_Pump._flush` and the sender's `_Link._readable`): the time spent in them per packet, against
  the round's CPU time. An upper bound rather than the cost: on loopback the ack's `send` runs the sender
  socket's TCP input (the TCP ACK of the data rides on the ack and frees the acknowledged buffers), work a
  pure TCP ACK would do without app acks. It misses the event loop's own cost per readiness event and
  includes the wrappers' (`--calibrate` prints it: 0.3-0.4 us a call on the shared 2-core machine).

Every round also reports `window_waits` (a writer waited for acks: the in-flight window was full) and the
share of packets the dispatcher's fast path wrote. At 1400 B with the default 4 MiB window both move with
the variant (the window binds in process); `--window` (the production `Tuning.window`) takes it out of the
comparison.

Per round: packets/s (wall clock, first send to the last packet in B's sink, as bench_transport.py) and CPU
per packet (`time.process_time()`: both nodes, user and system, this process; loopback's TCP work runs
inside the system calls here, charged to it; what softirq threads do elsewhere is not). "acks cost" is then
`1 - pps(now) / pps(coalesced)` (throughput lost) and `1 - cpu(coalesced) / cpu(now)` (share of the CPU per
packet), from medians over the rounds.

    python benches/ack_cost.py --rounds 9 --repeat 3 --json acks.json   # 64 and 1400 B, both modes: ~1.5 min
    python benches/ack_cost.py --size 1400 --window 33554432 --rounds 9 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vpn_packet.node.node import Node
from vpn_packet.testutil.keys import key_securities
from vpn_packet.testutil.packets import UDP, ipv4_packet
from vpn_packet.transport import receiver as receiver_module
from vpn_packet.transport import tcp as tcp_module
from vpn_packet.transport.discovery import Peer
from vpn_packet.transport.handshake import Security

SIZES = (64, 1400)
MODES = ("insecure", "key")
MODE_NAMES = {"insecure": "plaintext", "key": "TLS"}
VARIANTS = ("now", "coalesced", "timed")
PACKETS = {64: 400_000, 1400: 80_000}  # per round: about 0.1 s each on this machine
BATCH = 1024
DESTINATIONS = 16
WINDOW = 8 * BATCH  # packets between A's dispatch and B's sink at most, as bench_transport.py
DELAY = 0.002
A_NETS = ["10.1.0.0/16"]
B_NETS = ["10.2.0.0/16"]


@dataclass(slots=True)
class Round:
    """One timed round of one variant."""

    variant: str
    seconds: float
    cpu_seconds: float
    packets: int
    ack_writes: int = 0  # coalesced and timed: the receiver's ack writes (timed: `_flush` calls)
    ack_reads: int = 0  # coalesced and timed: the sender's ack readiness callbacks
    flush_seconds: float = 0.0  # timed: inside the receiver's `_flush`
    read_seconds: float = 0.0  # timed: inside the sender's `_Link._readable`
    window_waits: int = 0  # a writer waited for acks (the in-flight window was full)
    fast_packets: int = 0  # written by the dispatcher's fast path (the rest by its workers)
    run: int = 0  # which pass over the sizes and modes (`--repeat`)

    @property
    def pps(self) -> float:
        return self.packets / self.seconds

    @property
    def cpu_ns(self) -> float:
        return self.cpu_seconds / self.packets * 1e9


@dataclass(slots=True)
class Counters:
    """What the injected wrappers count during a round."""

    ack_writes: int = 0
    ack_reads: int = 0
    flush_seconds: float = 0.0
    read_seconds: float = 0.0
    window_waits: int = 0


@dataclass(slots=True)
class Result:
    size: int
    mode: str
    rounds: list[Round] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average before and after each pass


# --- the injections (bench-only: they patch this process's classes, nothing of the package changes) ------

_ORIGINAL_FLUSH = receiver_module._Pump._flush
_ORIGINAL_NEXT_ACK = tcp_module.TcpStream._next_ack


class Injection:
    """Switches the receiver's ack writes and the sender's ack reads between the three variants between
    rounds. The sender's readiness callback is a bound method registered with the loop when the connection
    was made, so it is swapped in the loop's selector (an asyncio internal: acceptable for a bench only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.counters = Counters()
        self.variant = "now"
        counters = self.counters

        def next_ack(stream: tcp_module.TcpStream) -> asyncio.Future[None]:
            counters.window_waits += 1
            return _ORIGINAL_NEXT_ACK(stream)

        tcp_module.TcpStream._next_ack = next_ack  # type: ignore[method-assign, assignment]

    def close(self) -> None:
        self.set("now")
        tcp_module.TcpStream._next_ack = _ORIGINAL_NEXT_ACK  # type: ignore[method-assign]

    def reset(self) -> Counters:
        done = Counters(**asdict(self.counters))
        for name in ("ack_writes", "ack_reads", "window_waits"):
            setattr(self.counters, name, 0)
        self.counters.flush_seconds = self.counters.read_seconds = 0.0
        return done

    def set(self, variant: str) -> None:
        self.variant = variant
        receiver_module._Pump._flush = self._flush_of(variant)  # type: ignore[method-assign, assignment]
        for fd, link in self._links():
            self.loop.remove_reader(fd)
            self.loop.add_reader(fd, self._readable_of(variant, link))

    def _links(self) -> Iterator[tuple[int, tcp_module._Link]]:
        selector = getattr(self.loop, "_selector", None)
        if selector is None:
            raise RuntimeError("the injection needs asyncio's selector event loop")
        for fd, key in list(selector.get_map().items()):
            reader = key.data[0]
            if reader is None:
                continue
            callback = reader._callback
            link = getattr(callback, "__self__", None) or getattr(callback, "link", None)
            if isinstance(link, tcp_module._Link):
                yield fd, link

    def _readable_of(self, variant: str, link: tcp_module._Link) -> Callable[[], None]:
        counters = self.counters
        readable = link._readable
        if variant == "now":
            return readable
        clock = time.perf_counter

        def counted() -> None:
            counters.ack_reads += 1
            readable()

        def timed() -> None:
            start = clock()
            readable()
            counters.read_seconds += clock() - start
            counters.ack_reads += 1

        wrapper = counted if variant == "coalesced" else timed
        wrapper.link = link  # type: ignore[attr-defined]  # found again by `_links`
        return wrapper

    def _flush_of(self, variant: str) -> Callable[[receiver_module._Pump], int | None]:
        counters = self.counters
        if variant == "now":
            return _ORIGINAL_FLUSH
        if variant == "timed":
            clock = time.perf_counter

            def timed(pump: receiver_module._Pump) -> int | None:
                start = clock()
                unsent = _ORIGINAL_FLUSH(pump)
                counters.flush_seconds += clock() - start
                counters.ack_writes += 1
                return unsent

            return timed
        loop, delay = self.loop, self.delay
        pending: dict[int, asyncio.TimerHandle] = {}

        def write_later(pump: receiver_module._Pump) -> None:
            del pending[id(pump)]
            if not pump.done.done():
                counters.ack_writes += 1
                _ORIGINAL_FLUSH(pump)

        def coalesced(pump: receiver_module._Pump) -> int | None:
            # Only the library path's write after a read is deferred; a write for room (`_writable`), at
            # the end, or anything else while output waits goes as it does in production.
            if pump._writing or pump.done.done():
                return _ORIGINAL_FLUSH(pump)
            if id(pump) not in pending:
                pending[id(pump)] = loop.call_later(delay, write_later, pump)
            return pump.conn.session.unsent

        return coalesced


# --- the run ---------------------------------------------------------------------------------------------


def _batches(size: int, count: int) -> list[list[bytes]]:
    templates = [
        ipv4_packet("10.1.0.1", f"10.2.0.{d + 1}", UDP, 4000, 53, bytes(size - 28))
        for d in range(DESTINATIONS)
    ]
    packets = [templates[i % DESTINATIONS] for i in range(count)]
    return [packets[i : i + BATCH] for i in range(0, len(packets), BATCH)]


class _Sink:
    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.event = asyncio.Event()

    def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        self.count += len(packets)
        if self.count >= self.target:
            self.event.set()

    async def reach(self, count: int) -> None:
        self.target = count
        self.event.clear()
        if self.count < count:
            async with asyncio.timeout(60):
                await self.event.wait()


def _fast_written(a: Node) -> int:
    """Packets node A's dispatcher wrote on its fast path so far, acknowledged or in flight (a private
    counter: the fast path's share tells whether a round ran as the others did)."""
    in_flight, sent, _bytes, lost = a.dispatcher._queues.fast_totals.counts()
    return int(in_flight + sent + lost)


async def _one_round(a: Node, sink: _Sink, batches: Sequence[list[bytes]]) -> tuple[float, float, int]:
    """Node A's `send_batch` until node B's sink has every packet (bench_transport.py's round)."""
    start_count = sink.count
    sent = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        accepted = a.send_batch(batch)
        if accepted != len(batch):
            raise RuntimeError(f"A refused packets: {a.dispatcher.metrics().rejected_by_reason}")
        sent += accepted
        if sent - (sink.count - start_count) > WINDOW:
            await sink.reach(start_count + sent - WINDOW // 2)
        else:
            await asyncio.sleep(0)
    await sink.reach(start_count + sent)
    return time.perf_counter() - wall, time.process_time() - cpu, sent


async def _measure(
    securities: dict[str, Security],
    size: int,
    count: int,
    rounds: int,
    injection: Injection,
    window: int | None,
) -> list[Round]:
    sink = _Sink()
    b = Node(securities["node-b"], ("127.0.0.1", 0), [Peer("node-a", "127.0.0.1:9", A_NETS)], sink)
    await b.start()
    changes: dict[str, Any] = {"worker_buffer_size": WINDOW + BATCH}
    if window:
        changes["window"] = window
    a = Node(securities["node-a"], ("127.0.0.1", 0), [Peer("node-b", b.endpoint, B_NETS)], **changes)
    await a.start()
    batches = _batches(size, count)
    out: list[Round] = []
    try:
        for variant in VARIANTS:  # warm-up: connections made, caches warm, one round of each
            injection.set(variant)
            await _one_round(a, sink, batches)
            await asyncio.sleep(0.01)
        for i in range(rounds):
            order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]  # rotated: no variant always first after a pause
            for variant in order:
                injection.set(variant)
                await asyncio.sleep(0.01)  # the previous round's deferred acks leave
                gc.collect()
                injection.reset()
                fast = _fast_written(a)
                seconds, cpu, packets = await _one_round(a, sink, batches)
                c = injection.reset()
                fast = _fast_written(a) - fast
                out.append(
                    Round(
                        variant,
                        seconds,
                        cpu,
                        packets,
                        c.ack_writes,
                        c.ack_reads,
                        c.flush_seconds,
                        c.read_seconds,
                        c.window_waits,
                        fast,
                    )
                )
        injection.set("now")
        if a.metrics().refusals or b.metrics().receiver.refused:
            raise RuntimeError("refusals during the run")
    finally:
        injection.set("now")
        await a.stop()
        await b.stop()
    return out


def calibrate() -> float:
    """Seconds one timing wrapper adds to a call (two perf_counter calls, an add, a count)."""
    clock = time.perf_counter
    total = [0.0, 0]

    def inner() -> None:
        return None

    def wrapped() -> None:
        start = clock()
        inner()
        total[0] += clock() - start
        total[1] += 1

    n = 200_000
    start = clock()
    for _ in range(n):
        inner()
    bare = clock() - start
    start = clock()
    for _ in range(n):
        wrapped()
    return max(0.0, (clock() - start - bare) / n)


def _median(rounds: list[Round], value: Callable[[Round], float]) -> float:
    return statistics.median(value(r) for r in rounds)


def _spread(rounds: list[Round], value: Callable[[Round], float]) -> tuple[float, float]:
    values = [value(r) for r in rounds]
    return min(values), max(values)


def summarize(result: Result) -> dict[str, Any]:
    """Medians and spreads per variant, and what the acks cost."""
    by = {v: [r for r in result.rounds if r.variant == v] for v in VARIANTS}
    out: dict[str, Any] = {"size": result.size, "mode": MODE_NAMES[result.mode], "load": result.load}
    for variant, rounds in by.items():
        out[variant] = {
            "rounds": len(rounds),
            "mpps": _median(rounds, lambda r: r.pps) / 1e6,
            "mpps_spread": [x / 1e6 for x in _spread(rounds, lambda r: r.pps)],
            "cpu_ns_per_packet": _median(rounds, lambda r: r.cpu_ns),
            "cpu_ns_spread": list(_spread(rounds, lambda r: r.cpu_ns)),
            "packets_per_ack_write": _median(
                rounds, lambda r: r.packets / r.ack_writes if r.ack_writes else 0
            ),
            "packets_per_ack_read": _median(rounds, lambda r: r.packets / r.ack_reads if r.ack_reads else 0),
            "window_waits": sum(r.window_waits for r in rounds),
            "fast_share": _median(rounds, lambda r: r.fast_packets / r.packets),
        }
    timed = by["timed"]
    out["timed"]["ack_ns_per_packet"] = _median(
        timed, lambda r: (r.flush_seconds + r.read_seconds) / r.packets * 1e9
    )
    out["timed"]["ack_write_ns_per_packet"] = _median(timed, lambda r: r.flush_seconds / r.packets * 1e9)
    out["timed"]["ack_read_ns_per_packet"] = _median(timed, lambda r: r.read_seconds / r.packets * 1e9)
    out["timed"]["ack_share_of_cpu"] = _median(
        timed, lambda r: (r.flush_seconds + r.read_seconds) / r.cpu_seconds
    )
    now, coalesced = out["now"], out["coalesced"]
    out["throughput_cost"] = 1 - now["mpps"] / coalesced["mpps"]
    out["cpu_cost"] = 1 - coalesced["cpu_ns_per_packet"] / now["cpu_ns_per_packet"]
    # The same two, from the rounds paired by position (now and coalesced of the same rotation): the
    # spread of the per-pair figures says how far the medians can be trusted on a shared machine.
    runs = sorted({r.run for r in result.rounds})
    out["cpu_cost_per_run"] = [
        1
        - _median([r for r in by["coalesced"] if r.run == run], lambda r: r.cpu_ns)
        / _median([r for r in by["now"] if r.run == run], lambda r: r.cpu_ns)
        for run in runs
    ]
    pairs = list(zip(by["now"], by["coalesced"], strict=True))
    out["throughput_cost_pairs"] = sorted(1 - n.pps / c.pps for n, c in pairs)
    out["cpu_cost_pairs"] = sorted(1 - c.cpu_ns / n.cpu_ns for n, c in pairs)
    # `coalesced` still writes some acks: `left` of them per `now`'s (the timed rounds count `now`'s writes).
    # Were the cost proportional to the writes, all of it would be the measured difference / (1 - left).
    per_write_now, per_write_coalesced = (
        out["timed"]["packets_per_ack_write"],
        coalesced["packets_per_ack_write"],
    )
    left = per_write_now / per_write_coalesced if per_write_coalesced else 0.0
    out["ack_writes_left"] = left
    out["cpu_cost_all_writes"] = out["cpu_cost"] / (1 - left) if left < 1 else None
    return out


def _print(summary: dict[str, Any]) -> None:
    load = summary["load"]
    print(f"\n{summary['size']} B, {summary['mode']}, load {min(load):.2f}-{max(load):.2f}")
    for variant in VARIANTS:
        s = summary[variant]
        lo, hi = s["mpps_spread"]
        clo, chi = s["cpu_ns_spread"]
        acks = f"{s['packets_per_ack_write']:.0f} packets/ack write" if s["packets_per_ack_write"] else ""
        print(
            f"  {variant:9s} {s['mpps']:6.3f} Mpps ({lo:.3f}-{hi:.3f})"
            f"  CPU {s['cpu_ns_per_packet']:7.1f} ns/packet ({clo:.1f}-{chi:.1f})"
            f"  {acks}  window waits {s['window_waits']}, fast path {s['fast_share']:.0%}"
        )
    t = summary["timed"]
    print(
        f"  timed: ack work {t['ack_ns_per_packet']:.1f} ns/packet (write {t['ack_write_ns_per_packet']:.1f},"
        f" read and settle {t['ack_read_ns_per_packet']:.1f}) = {t['ack_share_of_cpu']:.1%} of the CPU"
    )
    tp, cp = summary["throughput_cost_pairs"], summary["cpu_cost_pairs"]
    print(
        f"  acks cost: throughput {summary['throughput_cost']:.1%} (pairs {tp[0]:.1%}..{tp[-1]:.1%}),"
        f" CPU per packet {summary['cpu_cost']:.1%} (pairs {cp[0]:.1%}..{cp[-1]:.1%});"
        f" coalesced kept {summary['ack_writes_left']:.0%} of the ack writes"
    )
    if len(summary["cpu_cost_per_run"]) > 1:
        per_run = ", ".join(f"{x:.1%}" for x in summary["cpu_cost_per_run"])
        print(f"  CPU per packet cost per pass: {per_run}")


def run(
    sizes: Sequence[int],
    modes: Sequence[str],
    rounds: int,
    delay: float,
    window: int | None = None,
    packets: Mapping[int, int] = PACKETS,
    repeat: int = 1,
) -> list[Result]:
    """Every (size, mode) in turn, a fresh node pair each, the variants interleaved round by round;
    `packets[size]` packets per round; the whole `repeat` times (a busy spell of the machine then falls on
    one pass of a configuration, not on all its rounds). One `Result` per (size, mode)."""
    results: dict[tuple[int, str], Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = key_securities(Path(tmp), "node-a", "node-b")
        securities = {
            "key": keys,
            "insecure": {name: Security.insecure(name) for name in ("node-a", "node-b")},
        }
        for run in range(repeat):
            for size in sizes:
                for mode in modes:
                    result = results.setdefault((size, mode), Result(size, mode))
                    loop = asyncio.new_event_loop()
                    injection = Injection(loop, delay)
                    try:
                        result.load.append(os.getloadavg()[0])
                        done = loop.run_until_complete(
                            _measure(securities[mode], size, packets[size], rounds, injection, window)
                        )
                        result.load.append(os.getloadavg()[0])
                    finally:
                        injection.close()
                        loop.close()
                    for r in done:
                        r.run = run
                    result.rounds += done
    return list(results.values())


@contextmanager
def _quiet_gc() -> Iterator[None]:
    """No automatic collection during the run (each round starts after a full collection): a collection
    inside one round and not in its neighbour would be noise."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each variant (default 9)")
    parser.add_argument("--size", type=int, action="append", choices=SIZES, help="packet size (repeatable)")
    parser.add_argument("--mode", action="append", choices=MODES, help="insecure or key (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over every configuration (default 1)")
    parser.add_argument("--delay", type=float, default=DELAY, help="coalesced: seconds an ack write waits")
    parser.add_argument(
        "--window", type=int, help="node A's in-flight window in bytes (Tuning.window; default its default)"
    )
    parser.add_argument("--json", type=Path, help="write every round and the summaries here")
    parser.add_argument("--calibrate", action="store_true", help="print the timing wrapper's own cost")
    args = parser.parse_args(argv)
    if args.calibrate:
        print(f"timing wrapper: {calibrate() * 1e9:.0f} ns per call")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with _quiet_gc():
        results = run(
            args.size or SIZES, args.mode or MODES, args.rounds, args.delay, args.window, repeat=args.repeat
        )
    summaries = [summarize(r) for r in results]
    print(f"started {started}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for summary in summaries:
        _print(summary)
    if args.json:
        document = {
            "started": started,
            "delay": args.delay,
            "window": args.window,
            "rounds": args.rounds,
            "repeat": args.repeat,
            "summaries": summaries,
            "raw": [
                {"size": r.size, "mode": r.mode, "load": r.load, "rounds": [asdict(x) for x in r.rounds]}
                for r in results
            ],
        }
        args.json.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
