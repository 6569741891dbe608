"""A receiving `Node` in a subprocess, for tests that freeze, stop and kill a real peer and compare its own
count of what it received with the sender's.

    peer = await PeerProcess.start(sender="node-a", sender_prefixes=["10.1.0.0/16"])
    sender = Node(Security.insecure("node-a"), peers=[Peer("node-b", peer.endpoint, ["10.2.0.0/16"])])
    ...
    peer.freeze()                       # SIGSTOP (returns once the kernel shows it stopped)
    peer.resume()                       # SIGCONT
    report = await peer.report()        # SIGUSR1: the next JSON report line
    final = await peer.terminate()      # SIGTERM: the node stops gracefully, its final report
    peer.kill(); peer.counts()          # SIGKILL; the counts it had delivered when it died

The child (`python -m vpn_packet.testutil.peer_process ...`) runs `Node` on 127.0.0.1 with insecure security
(or keys: `--key FILE --peer-key BASE64`) and one peer, the sender. Its sink counts packets and checks order
per destination: every test packet ends with two big-endian u32, its destination index and its sequence
number within that destination (`mark_packet`, the layout of `vpn_packet.node.demo`'s workload); a sequence
number at or below one already delivered for that destination is counted `out_of_order` (a gap is not: the
sender counts the packets it lost); `sink_work` makes it slower than its sender (CPU work per packet, not
a sleep), so that its buffers hold data when it is stopped. It writes one JSON line to stdout when ready,
one per SIGUSR1, and a final one after SIGTERM/SIGINT; and it keeps `delivered` and `out_of_order` in a
small shared file (`counts_path`) updated before each acknowledgement can leave, so that even after SIGKILL
the test knows what the peer delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import signal
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["COUNTS", "PeerProcess", "PeerSink", "mark_packet", "read_counts", "unmark"]

_MARK = struct.Struct("!II")  # destination index, sequence number: the last 8 bytes of every test packet
COUNTS = struct.Struct("<QQQ")  # delivered, out_of_order, sink batches: the shared counts file


def mark_packet(template: bytes, index: int, seq: int) -> bytes:
    """`template` with its last 8 bytes replaced by (destination `index`, sequence number `seq`)."""
    return template[:-8] + _MARK.pack(index, seq)


def unmark(packet: bytes) -> tuple[int, int]:
    """(destination index, sequence number) of a marked packet."""
    index, seq = _MARK.unpack_from(packet, len(packet) - 8)
    return int(index), int(seq)


def read_counts(path: Path) -> dict[str, int]:
    """The shared counts file: `delivered`, `out_of_order`, `batches` (readable after the child died)."""
    delivered, out_of_order, batches = COUNTS.unpack(Path(path).read_bytes()[: COUNTS.size])
    return {"delivered": delivered, "out_of_order": out_of_order, "batches": batches}


@dataclass
class PeerSink:
    """Counts delivered packets per destination and checks their order; mirrors the totals into `shared`."""

    shared: mmap.mmap | None = None
    work: int = 0  # CRC-32 passes over each packet: a peer that is slower than its sender
    delivered: int = 0
    out_of_order: int = 0
    gaps: int = 0
    batches: int = 0
    per_destination: dict[int, int] = field(default_factory=dict)
    last_seq: dict[int, int] = field(default_factory=dict)

    def __call__(self, peer_id: str, packets: list[bytes]) -> None:
        per, last = self.per_destination, self.last_seq
        for packet in packets:
            for _ in range(self.work):
                zlib.crc32(packet)
            index, seq = unmark(packet)
            previous = last.get(index, -1)
            if seq <= previous:
                self.out_of_order += 1
            elif seq > previous + 1:
                self.gaps += 1
            last[index] = max(seq, previous)
            per[index] = per.get(index, 0) + 1
        self.delivered += len(packets)
        self.batches += 1
        if self.shared is not None:  # before the receiver's ack for these packets can be written
            COUNTS.pack_into(self.shared, 0, self.delivered, self.out_of_order, self.batches)

    def report(self, event: str, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": event,
            "delivered": self.delivered,
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
            "batches": self.batches,
            "per_destination": {str(k): v for k, v in sorted(self.per_destination.items())},
        }
        if metrics is not None:
            receiver = metrics["receiver"]
            out["receiver"] = {
                key: receiver[key]
                for key in (
                    "packets_delivered",
                    "active_connections",
                    "frames",
                    "discarded_after_reset",
                    "unacknowledged",
                    "spoofed_dropped",
                    "unparsable_dropped",
                    "offload_invalid",
                    "sink_raised",
                    "protocol_errors",
                    "pending",
                    "evicted_pending",
                    "handshake_failures",
                )
            }
        return out


async def _serve(args: argparse.Namespace) -> None:
    from vpn_packet.node.node import Node
    from vpn_packet.transport.discovery import Peer
    from vpn_packet.transport.handshake import Security
    from vpn_packet.transport.identity import decode_public_key, load_identity

    if args.key:
        security = Security.with_keys(
            load_identity(args.key), {args.sender: decode_public_key(args.peer_key)}
        )
    else:
        security = Security.insecure(args.id)
    shared = None
    if args.counts:
        fd = os.open(args.counts, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            shared = mmap.mmap(fd, mmap.PAGESIZE)
        finally:
            os.close(fd)
    sink = PeerSink(shared, args.sink_work)
    changes = json.loads(args.tuning) if args.tuning else {}
    node = Node(
        security,
        ("127.0.0.1", args.port),
        [Peer(args.sender, args.sender_endpoint, args.sender_prefix)],
        sink,
        **changes,
    )

    def emit(event: str) -> None:
        sys.stdout.write(json.dumps(sink.report(event, node.metrics().as_dict())) + "\n")
        sys.stdout.flush()

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, emit, "report")
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await node.start()
    address = node.address
    assert address is not None
    sys.stdout.write(json.dumps({"event": "ready", "port": address[1], "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    try:
        await stopping.wait()
    finally:
        await node.stop()
    emit("final")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", default="node-b")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sender", default="node-a")
    parser.add_argument("--sender-prefix", action="append", default=None)
    parser.add_argument("--sender-endpoint", default="127.0.0.1:9", help="the sender's configured endpoint")
    parser.add_argument("--counts", default="", help="shared counts file (survives SIGKILL)")
    parser.add_argument("--tuning", default="", help="JSON object of Tuning field changes")
    parser.add_argument("--sink-work", type=int, default=0, help="CRC-32 passes per packet (a slow peer)")
    parser.add_argument("--key", default="", help="identity file (key mode); default: insecure")
    parser.add_argument("--peer-key", default="", help="the sender's public key (base64), with --key")
    args = parser.parse_args(argv)
    if args.sender_prefix is None:
        args.sender_prefix = ["10.1.0.0/16"]
    asyncio.run(_serve(args))


class PeerProcess:
    """The parent's handle on a peer subprocess (see the module docstring); `await PeerProcess.start()`."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, counts_path: Path, tmp: Any) -> None:
        self.proc = proc
        self.port = port
        self.counts_path = counts_path
        self._tmp = tmp
        self.reports: list[dict[str, Any]] = []

    @classmethod
    async def start(
        cls,
        *,
        peer_id: str = "node-b",
        sender: str = "node-a",
        sender_prefixes: Sequence[str] = ("10.1.0.0/16",),
        tuning: dict[str, Any] | None = None,
        key: Path | None = None,
        peer_key: str = "",
        sink_work: int = 0,
        sender_endpoint: str = "127.0.0.1:9",
        ready_timeout: float = 30.0,
    ) -> PeerProcess:
        tmp = tempfile.TemporaryDirectory(prefix="vpn-packet-peer-")
        counts = Path(tmp.name) / "counts"
        cmd = [sys.executable, "-m", "vpn_packet.testutil.peer_process", "--id", peer_id, "--sender", sender]
        for prefix in sender_prefixes:
            cmd += ["--sender-prefix", prefix]
        cmd += ["--counts", str(counts), "--sender-endpoint", sender_endpoint]
        if sink_work:
            cmd += ["--sink-work", str(sink_work)]
        if tuning:
            cmd += ["--tuning", json.dumps(tuning)]
        if key is not None:
            cmd += ["--key", str(key), "--peer-key", peer_key]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        peer = cls(proc, 0, counts, tmp)
        try:
            ready = await peer._next_line(ready_timeout)
        except BaseException:
            peer.kill()
            raise
        peer.port = int(ready["port"])
        return peer

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _next_line(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 - guards a hang only
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise EOFError(f"peer process {self.pid} ended (status {self.proc.returncode}) without a report")
        out: dict[str, Any] = json.loads(line)
        self.reports.append(out)
        return out

    def state(self) -> str:
        """The kernel's process state letter (`R`, `S`, `T` stopped, `Z`...), or "" once reaped."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return ""
        return stat.rsplit(")", 1)[1].split()[0]

    async def freeze(self) -> None:
        """SIGSTOP; returns once the kernel shows the process stopped."""
        os.kill(self.pid, signal.SIGSTOP)
        while self.state() not in ("T", "t", ""):  # noqa: ASYNC110 - polling the kernel's state, no event
            await asyncio.sleep(0.001)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    async def report(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109 - guards a hang only
        """SIGUSR1, then the report it writes."""
        os.kill(self.pid, signal.SIGUSR1)
        return await self._next_line(timeout)

    async def terminate(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109 - guards a hang only
        """SIGTERM (and SIGCONT, in case it is frozen): its final report after a graceful stop."""
        os.kill(self.pid, signal.SIGTERM)
        os.kill(self.pid, signal.SIGCONT)
        final = await self._next_line(timeout)
        async with asyncio.timeout(timeout):
            await self.proc.wait()
        return final

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109 - guards a hang only
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    def counts(self) -> dict[str, int]:
        """What the shared counts file says (also after SIGKILL)."""
        return read_counts(self.counts_path)

    async def close(self) -> None:
        """Kill it if it still runs, reap it, remove its files."""
        self.kill()
        with contextlib.suppress(Exception):
            await self.wait()
        self._tmp.cleanup()


if __name__ == "__main__":
    main()
