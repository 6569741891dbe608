"""Transport hot paths beside plain Python, in one run.

- framing: `encode_frames` vs a `struct` + `b"".join` framer; `FrameDecoder.feed` (fed 64 KiB reads) vs a
  plain-Python `struct` deframer with a carry-over buffer; 64-byte and 1400-byte packets. `extra_info`
  carries packets and bytes per round, so packets/s and MB/s follow from the mean.
- longest-prefix match: `PrefixTable.lookup` with 10,000 IPv4 prefixes vs an `ipaddress`-based match that
  probes one dict per prefix length (the good plain-Python way; a linear scan would be far slower).
- receiving over loopback TCP: `Receiver` (native decode + native source check, batches to a sink) vs a
  plain asyncio receiver (`readexactly` per frame, `struct`, the dict-per-length match), 50,000 packets of one
  sender per round, server start-up included. The `Receiver` is insecure (plaintext: the bench is about
  decoding and filtering, not TLS) and its sender does the real plaintext handshake (challenge, hello,
  answer) before the frames; the plain receiver reads a one-byte-length id as its whole hello.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
from typing import Any

import pytest

from vpn_packet._native import FrameDecoder, PrefixTable, encode_frames

PACKETS = 4096
READ = 64 * 1024
_LEN = struct.Struct("!I")


def py_encode(packets: list[bytes]) -> bytes:
    pack = _LEN.pack
    return b"".join(pack(len(p)) + p for p in packets)


class PyDeframer:
    """A plain-Python incremental deframer: carry-over buffer, struct length prefix, the same limits."""

    def __init__(self, max_frame_size: int = 65535) -> None:
        self.buf = b""
        self.max = max_frame_size

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data if self.buf else data
        out = []
        pos, end = 0, len(buf)
        unpack = _LEN.unpack_from
        while end - pos >= 4:
            (n,) = unpack(buf, pos)
            if n == 0 or n > self.max:
                raise ValueError("bad frame length")
            if end - pos - 4 < n:
                break
            out.append(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
        self.buf = buf[pos:]
        return out


def make_packets(size: int) -> list[bytes]:
    rng = random.Random(size)
    return [rng.randbytes(size) for _ in range(PACKETS)]


@pytest.mark.benchmark(group="framing-encode")
@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.parametrize("impl", ["vpn_packet.encode_frames", "python-struct"])
def test_encode(benchmark: Any, impl: str, size: int) -> None:
    packets = make_packets(size)
    fn = encode_frames if impl.startswith("vpn_packet") else py_encode
    benchmark.extra_info.update(packets_per_round=PACKETS, bytes_per_round=PACKETS * (size + 4))
    assert benchmark(fn, packets) == py_encode(packets)


@pytest.mark.benchmark(group="framing-decode")
@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.parametrize("impl", ["vpn_packet.FrameDecoder", "python-struct"])
def test_decode(benchmark: Any, impl: str, size: int) -> None:
    packets = make_packets(size)
    wire = encode_frames(packets)
    reads = [wire[i : i + READ] for i in range(0, len(wire), READ)]  # frames split across reads
    make = FrameDecoder if impl.startswith("vpn_packet") else PyDeframer

    def run() -> int:
        decoder = make()
        count = 0
        for chunk in reads:
            count += len(decoder.feed(chunk))
        return count

    benchmark.extra_info.update(packets_per_round=PACKETS, bytes_per_round=len(wire))
    assert benchmark(run) == PACKETS


PREFIXES = 10_000
LOOKUPS = 10_000


@pytest.fixture(scope="module")
def prefix_data() -> tuple[list[tuple[str, int]], list[str]]:
    rng = random.Random(10)
    seen: set[str] = set()
    entries: list[tuple[str, int]] = []
    while len(entries) < PREFIXES:
        length = rng.choice([8, 12, 16, 20, 22, 24, 24, 24, 28, 32])
        bits = rng.getrandbits(32) & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
        text = str(ipaddress.IPv4Network((bits, length)))
        if text not in seen:
            seen.add(text)
            entries.append((text, len(entries)))
    # Half the lookups inside a known prefix, half random.
    addrs = []
    for i in range(LOOKUPS):
        if i % 2:
            net = ipaddress.IPv4Network(entries[rng.randrange(PREFIXES)][0])
            addrs.append(str(net.network_address + rng.randrange(net.num_addresses)))
        else:
            addrs.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
    return entries, addrs


class PyPrefixTable:
    """Plain-Python longest-prefix match with `ipaddress`: one dict per prefix length, longest first."""

    def __init__(self, entries: list[tuple[str, int]]) -> None:
        self.by_len: dict[int, dict[int, int]] = {}
        for text, value in entries:
            net = ipaddress.ip_network(text)
            self.by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = value
        self.lengths = sorted(self.by_len, reverse=True)

    def lookup(self, ip: str) -> int | None:
        addr = int(ipaddress.IPv4Address(ip))
        for length in self.lengths:
            value = self.by_len[length].get(addr & ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF))
            if value is not None:
                return value
        return None


@pytest.mark.benchmark(group="prefix-lookup-10k")
@pytest.mark.parametrize("impl", ["vpn_packet.PrefixTable", "python-ipaddress"])
def test_prefix_lookup(
    benchmark: Any, impl: str, prefix_data: tuple[list[tuple[str, int]], list[str]]
) -> None:
    entries, addrs = prefix_data
    if impl.startswith("vpn_packet"):
        table: Any = PrefixTable()
        for text, value in entries:
            table.insert(text, value)
    else:
        table = PyPrefixTable(entries)
    lookup = table.lookup

    def run() -> int:
        return sum(1 for ip in addrs if lookup(ip) is not None)

    benchmark.extra_info.update(lookups_per_round=LOOKUPS, prefixes=PREFIXES)
    reference = PyPrefixTable(entries)
    assert [table.lookup(ip) for ip in addrs[:500]] == [reference.lookup(ip) for ip in addrs[:500]]
    benchmark(run)


# --- receiving over loopback ------------------------------------------------------------------------------

RECV_PACKETS = 50_000


def _recv_packets(size: int) -> list[bytes]:
    from vpn_packet.testutil.packets import ipv4_packet

    return [
        ipv4_packet("10.8.0.2", "10.8.0.1", src_port=i & 0xFFFF, dst_port=7, payload=bytes(size - 28))
        for i in range(RECV_PACKETS)
    ]


async def _send(host: str, port: int, data: bytes, *, handshake: bool) -> None:
    """Connects, does the plaintext handshake as node-a when `handshake` (else `data` carries its own
    preamble), then writes `data`."""
    from vpn_packet._native import AckDecoder
    from vpn_packet.transport.handshake import Security, client_handshake, new_epoch

    reader, writer = await asyncio.open_connection(host, port)
    if handshake:
        security = Security.insecure("node-a")
        await client_handshake(security, "node-b", reader.readexactly, writer.write, None, new_epoch())
    writer.write(data)
    await writer.drain()
    if handshake:
        # A vpn-packet receiver acknowledges what it took; closing with its acks unread would reset the
        # connection (the kernel sends RST for unread data), and a reset tells it to discard the rest.
        acks, frames = AckDecoder(), RECV_PACKETS
        while acks.taken < frames:
            chunk = await reader.read(65536)
            if not chunk:
                break
            acks.feed(chunk)
    writer.close()


async def _receive_native(wire: bytes) -> int:
    from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
    from vpn_packet.transport.handshake import Security
    from vpn_packet.transport.receiver import Receiver

    done = asyncio.Event()
    count = 0

    def sink(peer_id: str, packets: list[bytes]) -> None:
        nonlocal count
        count += len(packets)
        if count >= RECV_PACKETS:
            done.set()

    discovery = StaticPeerDiscovery([Peer("node-a", "127.0.0.1:1", ["10.8.0.2/32"])])
    async with Receiver(discovery, sink, security=Security.insecure("node-b")) as rx:
        async with asyncio.timeout(120):  # a hang guard: a benchmark must end even when delivery breaks
            await _send(*rx.address, wire, handshake=True)
            await done.wait()
    return count


async def _receive_plain(wire: bytes) -> int:
    """A plain asyncio receiver: readexactly per frame, struct lengths, source checked in a dict-per-length
    longest-prefix match, batches of 256 to the sink."""
    table = PyPrefixTable([("10.8.0.2/32", 0)])
    done = asyncio.Event()
    count = 0

    def sink(peer_id: str, packets: list[bytes]) -> None:
        nonlocal count
        count += len(packets)
        if count >= RECV_PACKETS:
            done.set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (id_len,) = await reader.readexactly(1)
        peer_id = (await reader.readexactly(id_len)).decode()
        batch: list[bytes] = []
        try:
            while True:
                (n,) = _LEN.unpack(await reader.readexactly(4))
                if n == 0 or n > 65535:
                    break
                packet = await reader.readexactly(n)
                src_ok = len(packet) >= 20 and packet[0] >> 4 == 4
                if src_ok and table.lookup(str(ipaddress.IPv4Address(packet[12:16]))) == 0:
                    batch.append(packet)
                if len(batch) >= 256:
                    sink(peer_id, batch)
                    batch = []
        except asyncio.IncompleteReadError:
            pass
        finally:
            if batch:
                sink(peer_id, batch)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        await _send(host, port, b"\x06node-a" + wire, handshake=False)
        await done.wait()
    return count


@pytest.mark.benchmark(group="receive-loopback")
@pytest.mark.parametrize("size", [64, 1400])
@pytest.mark.parametrize("impl", ["vpn_packet.Receiver", "plain-asyncio"])
def test_receive(benchmark: Any, impl: str, size: int) -> None:
    wire = encode_frames(_recv_packets(size))
    run = _receive_native if impl.startswith("vpn_packet") else _receive_plain
    benchmark.extra_info.update(packets_per_round=RECV_PACKETS, bytes_per_round=len(wire))
    result = benchmark.pedantic(lambda: asyncio.run(run(wire)), rounds=3, iterations=1, warmup_rounds=1)
    assert result == RECV_PACKETS
