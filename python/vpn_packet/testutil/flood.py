"""A connection flood without any key, run as its own process (the attacker's), for the tests and the
benchmark of the receiver's admission policy (`vpn_packet.transport.admission`).

    python -m vpn_packet.testutil.flood 127.0.0.1:7000 --mode tls --sources 127.1.0.0/16 --addresses 200 \\
        --hold 2000 --count 20000 --duration 30

Modes (what each connection does, then it holds the connection open until the receiver closes it; a
connection the receiver closed is replaced by a new one at once, so the flood keeps up to `--hold` open):

- `silent`: TCP connect, then nothing (it never starts TLS);
- `tls`: TCP connect and a full TLS handshake (no certificate, trusting anything), then it reads the
  challenge and never sends a hello: the most a client without a key can do that costs us a TLS handshake.

Source addresses: `--sources 127.0.0.1` (one, e.g. the peer's own), or a loopback network with
`--addresses N` (the first N host addresses of it, e.g. 127.1.0.0/16; Linux answers for all of 127/8, so
binding them needs no setup). New connections go round-robin over them, as fast as this one process can
make them (`--connectors` at once) unless `--rate` caps the rate.

It prints one JSON line when the first `--warm` connections are open (`{"ready": ...}`) and one when it
stops (`{"done": ...}`: connections opened, failed to open, closed by the receiver), on SIGTERM/SIGINT,
`--linger` seconds after its `--count`-th connection attempt ended, or after `--duration` seconds (a
bound, so a forgotten flood ends).

The parent's side: `FloodProcess.start(...)` runs it and returns once it is ready, `await flood.stop()`
ends it and returns its `FloodStats`. `legit_rounds(...)` is the key-holding peer measured meanwhile: fresh
connections, one after another, each sending a few batches and waiting for each batch's acknowledgement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vpn_packet._native import CHALLENGE_LEN, parse_challenge
from vpn_packet.testutil.attackers import attacker_tls
from vpn_packet.transport.handshake import read_message

__all__ = ["FloodProcess", "FloodStats", "LegitResult", "legit_rounds", "main", "source_addresses"]


@dataclass
class FloodStats:
    """What the flood did: connections `opened`, `failed` to open (refused, reset, timed out), `closed` by
    the receiver while held, and `held` at the end; `seconds` it ran."""

    opened: int = 0
    failed: int = 0
    closed: int = 0
    held: int = 0
    seconds: float = 0.0


def source_addresses(sources: str, count: int) -> list[str]:
    """`sources` as a list: one address, or the first `count` host addresses of a network."""
    if "/" not in sources:
        return [sources]
    network = ipaddress.ip_network(sources, strict=False)
    return [str(ip) for ip in itertools.islice(network.hosts(), count)]


class _Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        host, _, port = args.target.rpartition(":")
        self.target = (host, int(port))
        self.mode: str = args.mode
        self.sources = source_addresses(args.sources, args.addresses)
        self.hold: int = args.hold
        self.count: int = args.count
        self.rate: float = args.rate
        self.connectors: int = args.connectors
        self.warm: int = min(args.warm, args.count)
        self.linger: float = args.linger
        self.stats = FloodStats()
        self.tls = attacker_tls() if self.mode == "tls" else None
        self.slots = asyncio.Semaphore(self.hold)
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.holders: set[asyncio.Task[None]] = set()
        self._next_source: Iterator[str] = itertools.cycle(self.sources)
        self._started = time.monotonic()
        self._attempts = 0

    async def run(self) -> None:
        connectors = [asyncio.create_task(self._connector()) for _ in range(self.connectors)]
        stopped = asyncio.create_task(self.stop.wait())
        connecting = asyncio.gather(*connectors)
        # Until stopped, or until every connector is done (`count` attempts made, each finished) and what
        # is open was held `linger` seconds more.
        either: set[asyncio.Future[Any]] = {stopped, connecting}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done() and self.linger:
            await asyncio.wait({stopped}, timeout=self.linger)
        stopped.cancel()
        for task in connectors:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connecting
        self.stats.held = len(self.holders)
        for task in list(self.holders):
            task.cancel()
        await asyncio.gather(*connectors, *self.holders, return_exceptions=True)
        self.stats.seconds = round(time.monotonic() - self._started, 3)

    async def _connector(self) -> None:
        while not self.stop.is_set():
            await self.slots.acquire()
            if self._attempts >= self.count:
                self.slots.release()
                return
            self._attempts += 1
            if self.rate:
                # Paced: attempt n starts at n / rate seconds.
                delay = self._started + self._attempts / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            source = next(self._next_source)
            try:
                held = await self._open(source)
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError, EOFError):
                self.stats.failed += 1
                self.slots.release()
                continue
            self.stats.opened += 1
            if self.stats.opened >= self.warm:
                self.ready.set()
            task = asyncio.create_task(held.hold())
            self.holders.add(task)
            task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self.holders.discard(task)
        self.slots.release()
        if not task.cancelled():
            self.stats.closed += 1

    async def _open(self, source: str) -> _Held:
        loop = asyncio.get_running_loop()
        if self.mode == "silent":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.bind((source, 0))
                async with asyncio.timeout(5):
                    await loop.sock_connect(sock, self.target)
            except BaseException:
                sock.close()
                raise
            return _Held(sock=sock)
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                *self.target, ssl=self.tls, server_hostname="", local_addr=(source, 0)
            )
            try:
                await read_message(reader.readexactly, parse_challenge, CHALLENGE_LEN)
            except BaseException:
                writer.transport.abort()
                raise
        return _Held(reader=reader, writer=writer)


@dataclass
class _Held:
    """One open connection, held until the receiver closes it (`hold` returns then)."""

    sock: socket.socket | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    async def hold(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    while await loop.sock_recv(self.sock, 4096):
                        pass
            else:
                assert self.reader is not None
                with contextlib.suppress(OSError, ssl.SSLError):
                    while await self.reader.read(4096):
                        pass
        finally:
            # Closed with a reset, as an attacker would: no TIME_WAIT left on thousands of local ports
            # (a test after this one binding a port on all addresses would find it taken).
            sock = self.sock if self.sock is not None else _socket_of(self.writer)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            if self.sock is not None:
                self.sock.close()
            if self.writer is not None:
                self.writer.transport.abort()


_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 seconds: close() sends a reset


def _socket_of(writer: asyncio.StreamWriter | None) -> Any:
    return writer.get_extra_info("socket") if writer is not None else None


async def _main(args: argparse.Namespace) -> FloodStats:
    flood = _Flood(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, flood.stop.set)
    loop.call_later(args.duration, flood.stop.set)
    run = asyncio.create_task(flood.run())
    ready = asyncio.create_task(flood.ready.wait())
    await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
    print(json.dumps({"ready": asdict(flood.stats)}), flush=True)
    await run
    ready.cancel()
    return flood.stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpn_packet.testutil.flood", description=__doc__)
    parser.add_argument("target", help="host:port of the receiver")
    parser.add_argument("--mode", choices=("silent", "tls"), default="silent")
    parser.add_argument("--sources", default="127.0.0.1", help="an address, or a network (see --addresses)")
    parser.add_argument("--addresses", type=int, default=100, help="how many addresses of --sources' network")
    parser.add_argument("--hold", type=int, default=1000, help="connections held open at once at most")
    parser.add_argument("--count", type=int, default=10_000, help="connections opened in all at most")
    parser.add_argument("--rate", type=float, default=0.0, help="new connections per second (0: at will)")
    parser.add_argument("--connectors", type=int, default=64, help="connections being opened at once")
    parser.add_argument("--warm", type=int, default=1, help="connections open before saying ready")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to hold on after --count")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds at most")
    args = parser.parse_args(argv)
    stats = asyncio.run(_main(args))
    print(json.dumps({"done": asdict(stats)}), flush=True)
    return 0


class FloodProcess:
    """The parent's handle on a flood subprocess: `await FloodProcess.start(target, mode=..., ...)` returns
    once its first `warm` connections are open; `await stop()` ends it (SIGTERM) and returns its stats."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: FloodStats) -> None:
        self.proc = proc
        self.ready = ready
        self._done: FloodStats | None = None

    @classmethod
    async def start(
        cls,
        target: tuple[str, int],
        *,
        mode: str,
        sources: str = "127.0.0.1",
        addresses: int = 100,
        hold: int = 1000,
        count: int = 10_000,
        rate: float = 0.0,
        connectors: int = 64,
        warm: int = 1,
        linger: float = 0.0,
        duration: float = 60.0,
        ready_timeout: float = 60.0,
    ) -> FloodProcess:
        cmd = [
            sys.executable,
            "-m",
            "vpn_packet.testutil.flood",
            f"{target[0]}:{target[1]}",
            f"--mode={mode}",
            f"--sources={sources}",
            f"--addresses={addresses}",
            f"--hold={hold}",
            f"--count={count}",
            f"--rate={rate}",
            f"--connectors={connectors}",
            f"--warm={warm}",
            f"--linger={linger}",
            f"--duration={duration}",
        ]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        try:
            line = await cls._line(proc, ready_timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        return cls(proc, FloodStats(**line["ready"]))

    @staticmethod
    async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):  # guards a hang only
            line = await proc.stdout.readline()
        if not line:
            raise EOFError(f"flood process {proc.pid} ended (status {await proc.wait()}) without a report")
        out: dict[str, Any] = json.loads(line)
        return out

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, timeout: float = 60.0) -> FloodStats:  # noqa: ASYNC109 - guards a hang only
        """SIGTERM; its final stats once it closed every connection it held."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        return await self.finished(timeout)

    async def finished(self, timeout: float = 120.0) -> FloodStats:  # noqa: ASYNC109 - guards a hang only
        """Its final stats, once it ended by itself (`count` connections made, or `duration`) or was
        stopped, and closed every connection it held."""
        if self._done is not None:
            return self._done
        try:
            done = await self._line(self.proc, timeout)
        finally:
            await self.close()
        self._done = FloodStats(**done["done"])
        return self._done

    async def close(self) -> None:
        """Kill it if it still runs, and reap it (cleanup; `stop` ends it in order)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


@dataclass
class LegitResult:
    """What the key-holding peer saw: packets `attempted`, `sent` (acknowledged by the receiver) and
    `failed` (not acknowledged: a connection refused, reset or closed under it); `connects` made and
    `connect_errors` (their text); per connection the seconds to connect (`connect_seconds`), per batch the
    seconds from write to acknowledgement (`ack_seconds`)."""

    attempted: int = 0
    sent: int = 0
    failed: int = 0
    connects: int = 0
    connect_errors: list[str] = field(default_factory=list)
    connect_seconds: list[float] = field(default_factory=list)
    ack_seconds: list[float] = field(default_factory=list)


async def legit_rounds(
    open_stream: Callable[[], Any],
    packet: Callable[[int], bytes],
    *,
    rounds: int,
    batches: int,
    batch: int,
    result: LegitResult | None = None,
) -> LegitResult:
    """`rounds` fresh connections, one after another (`await open_stream()` makes one: a `TcpStream`), each
    sending `batches` batches of `batch` packets (`packet(n)` makes the n-th) and waiting for each batch's
    acknowledgement before the next. Nothing is retried: a packet not acknowledged counts as failed."""
    out = result if result is not None else LegitResult()
    n = 0
    for _ in range(rounds):
        started = time.perf_counter()
        out.attempted += batches * batch
        try:
            stream = await open_stream()
        except Exception as exc:  # counted and reported: the tests assert there are none
            out.connect_errors.append(f"{type(exc).__name__}: {exc}")
            out.failed += batches * batch
            n += batches * batch
            continue
        out.connects += 1
        out.connect_seconds.append(time.perf_counter() - started)
        try:
            for _ in range(batches):
                packets = [packet(n + i) for i in range(batch)]
                n += batch
                written = time.perf_counter()
                try:
                    receipt = await stream.write_many(packets)
                    acked = int(await receipt)
                except Exception as exc:  # counted and reported
                    out.connect_errors.append(f"{type(exc).__name__}: {exc}")
                    acked = 0
                out.ack_seconds.append(time.perf_counter() - written)
                out.sent += acked
                out.failed += batch - acked
        finally:
            await stream.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
