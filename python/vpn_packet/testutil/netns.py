"""Two network namespaces joined by a veth pair, a `vpn-packet node` in each: for the end-to-end test and the
tunnel benchmark (root only).

    with TunnelLab(tmp_path) as lab:      # namespaces, veth 172.31.255.1/30 <-> .2, nodes A and B started
        lab.run_python(lab.ns_a, ICMP_ECHO_SCRIPT, "10.8.0.2", "1", "2")
        lab.metrics("b")                    # SIGUSR1 to node B, then its metrics file

The nodes run the contract config (docs/config.md): each has a key made with `vpn-packet genkey`
(`lab.keys`: node name -> public key string), `[node] key`, and its peer's `public_key`; no `[node] id` (it
comes from the key file). `TunnelLab(..., insecure=True)` runs them with `[node] insecure = true` instead
(plaintext, for comparisons).

Everything is created with names unique to the process and removed on exit (also after a failure): node
processes are terminated (then killed), the namespaces deleted (which deletes the veth pair and the TUNs).
The underlay addresses exist only inside the two namespaces.

A node's output goes through a pipe read by a thread that copies it to the node's log file and wakes whoever
waits for a line: `wait_ready` waits for the "running" line and `metrics` for the "metrics {...}" line that
SIGUSR1 makes the node log, instead of polling files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

__all__ = [
    "ICMP_ECHO_SCRIPT",
    "IMPOSTOR_SCRIPT",
    "RAW_SEND_SCRIPT",
    "TCP_SINK_SCRIPT",
    "TCP_SOURCE_SCRIPT",
    "UDP_SINK_SCRIPT",
    "NodeProcess",
    "TunnelLab",
    "netns_unavailable",
    "skip_or_fail",
]

UNDERLAY_A = "172.31.255.1"
UNDERLAY_B = "172.31.255.2"
TUNNEL_A = "10.8.0.1"
TUNNEL_B = "10.8.0.2"
PORT = 7000


def netns_unavailable() -> str | None:
    """Why the lab cannot run here (None when it can): no /dev/net/tun, not root, no `ip`, no netns."""
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    if os.geteuid() != 0:
        return "not root (network namespaces and TUN devices need root)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    name = f"vpnp-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add fails: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def skip_or_fail(reason: str) -> NoReturn:
    """Skips the calling test because `reason` (root, TUN, netns missing) - or fails it when `CI=true`, where
    every prerequisite must be there (a skipped privileged test must not pass CI unnoticed)."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class NodeProcess:
    """A `vpn-packet node` running in a namespace; its output is copied, line by line, to a log file."""

    name: str
    netns: str
    config: Path
    log: Path
    metrics_file: Path
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    output: str = field(default="")
    _lines: list[str] = field(default_factory=list, repr=False)
    _eof: bool = field(default=False, repr=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _copier: threading.Thread | None = field(default=None, repr=False)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def follow(self, pipe: IO[bytes]) -> None:
        """Starts the thread copying `pipe` (the process's output) to the log file, one line at a time."""
        self._copier = threading.Thread(target=self._copy, args=(pipe,), name=f"log-{self.name}", daemon=True)
        self._copier.start()

    def _copy(self, pipe: IO[bytes]) -> None:
        with pipe, self.log.open("ab") as out:
            for raw in iter(pipe.readline, b""):
                out.write(raw)
                out.flush()
                with self._changed:
                    self._lines.append(raw.decode(errors="replace"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def line_count(self) -> int:
        """Lines logged so far (pass it as `after` to wait for a line logged from now on)."""
        with self._changed:
            return len(self._lines)

    def wait_for_line(self, predicate: Callable[[str], bool], *, after: int = 0, timeout: float) -> str:
        """The first line from index `after` on that satisfies `predicate`, waiting for it to be logged.

        Raises `RuntimeError` (with the log) when the output ends (the process exited) or after `timeout`
        seconds (a hang guard: the line never came)."""
        index = after
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while index < len(self._lines):
                    line = self._lines[index]
                    index += 1
                    if predicate(line):
                        return line
                if self._eof:
                    raise RuntimeError(f"{self.name} exited ({self.exit_code_now()}):\n{self.log_text()}")
                if not self._changed.wait(deadline - time.monotonic()):
                    raise RuntimeError(f"{self.name}: no such line within {timeout}s:\n{self.log_text()}")

    def exit_code_now(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_output_closed(self, timeout: float = 10.0) -> None:
        """After the process exits: until every line it wrote is in the log file."""
        if self._copier is not None:
            self._copier.join(timeout)


def node_toml(
    *,
    node_id: str,
    peer_id: str,
    address: str,
    listen: str,
    peer_endpoint: str,
    peer_allowed: str,
    metrics_file: Path,
    mtu: int,
    key: str | None = None,
    peer_public_key: str | None = None,
    extra: str = "",
    log_level: str = os.environ.get("VPN_PACKET_LAB_LOG_LEVEL", "info"),
) -> str:
    """A node's TOML: the contract config with `key` (this node's key file; its id is the name in it) and
    the peer's `peer_public_key`; without them `[node] insecure = true` and `id = node_id`. The log level
    comes from `VPN_PACKET_LAB_LOG_LEVEL` (default info: `debug` when a lab test needs its story)."""
    if key is not None:
        if peer_public_key is None:
            raise ValueError("key mode needs the peer's public key")
        identity = f'key = "{key}"'
        peer_key = f'public_key = "{peer_public_key}"\n'
    else:
        identity = f'id = "{node_id}"\ninsecure = true'
        peer_key = ""
    return f"""\
[interface]
name = "vpn0"
address = "{address}/24"
mtu = {mtu}
txqueuelen = 4000

[listen]
address = "{listen}:{PORT}"

[node]
{identity}
log_level = "{log_level}"
metrics_file = "{metrics_file}"
shutdown_timeout = 5.0
drop_log_interval = 2.0

[[peers]]
id = "{peer_id}"
endpoint = "{peer_endpoint}:{PORT}"
allowed_ips = ["{peer_allowed}/32"]
{peer_key}{extra}"""


# `python -m vpn_packet.cli` runs cli.py as `__main__`, a second module whose registry lacks the subcommands
# of EXTENSION_MODULES (they register into `vpn_packet.cli`); this runs the real entry point.
_CLI = "import sys; from vpn_packet.cli import main; sys.exit(main())"


_instances = itertools.count()


class TunnelLab:
    """Namespaces `ns_a`/`ns_b`, veth underlay, a node in each (unless `start_nodes=False`)."""

    def __init__(
        self,
        workdir: Path,
        *,
        mtu: int = 1400,
        start_nodes: bool = True,
        tuning: str = "",
        insecure: bool = False,
    ) -> None:
        tag = f"{os.getpid()}{next(_instances)}"  # unique per process and instance
        self.workdir = workdir
        self.mtu = mtu
        self.start_nodes = start_nodes
        self.tuning = tuning
        self.insecure = insecure
        self.keys: dict[str, str] = {}  # "node-a" -> its public key string (what genkey printed)
        self.ns_a = f"vpnp-a-{tag}"
        self.ns_b = f"vpnp-b-{tag}"
        self.veth_a = f"vpa{tag}"[:15]
        self.veth_b = f"vpb{tag}"[:15]
        self.nodes: dict[str, NodeProcess] = {}
        self._namespaces: list[str] = []

    # --- setup and teardown ---------------------------------------------------------------------------------

    def __enter__(self) -> TunnelLab:
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def genkey(self, name: str) -> str:
        """`vpn-packet genkey NAME --dir WORKDIR`, as a user runs it; returns the public key printed last."""
        result = subprocess.run(
            [sys.executable, "-c", _CLI, "genkey", name, "--dir", str(self.workdir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"vpn-packet genkey {name} failed: {result.stderr.strip()}")
        return result.stdout.strip().splitlines()[-1]

    def setup(self) -> None:
        if not self.insecure:
            for name in ("node-a", "node-b"):
                self.keys[name] = self.genkey(name)
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            self._namespaces.append(ns)
        _ip("link", "add", self.veth_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.veth_b,
            "netns", self.ns_b)  # fmt: skip
        for ns, dev, addr in ((self.ns_a, self.veth_a, UNDERLAY_A), (self.ns_b, self.veth_b, UNDERLAY_B)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        if self.start_nodes:
            self.start_node("a")
            self.start_node("b")
            self.wait_ready("a")
            self.wait_ready("b")

    def start_node(self, which: str) -> NodeProcess:
        a = which == "a"
        me, peer = ("node-a", "node-b") if a else ("node-b", "node-a")
        metrics_file = self.workdir / f"metrics-{which}.json"
        config = self.workdir / f"node-{which}.toml"
        config.write_text(
            node_toml(
                node_id=me,
                peer_id=peer,
                address=TUNNEL_A if a else TUNNEL_B,
                listen=UNDERLAY_A if a else UNDERLAY_B,
                peer_endpoint=UNDERLAY_B if a else UNDERLAY_A,
                peer_allowed=TUNNEL_B if a else TUNNEL_A,
                metrics_file=metrics_file,
                mtu=self.mtu,
                key=None if self.insecure else f"{me}.key",  # relative to the config file, beside it
                peer_public_key=self.keys.get(peer),
                extra=self.tuning,
            )
        )
        log = self.workdir / f"node-{which}.log"
        node = NodeProcess(f"node-{which}", self.ns_a if a else self.ns_b, config, log, metrics_file)
        log.write_bytes(b"")
        node.process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                sys.executable,
                "-c",
                _CLI,
                "node",
                "--config",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        assert node.process.stdout is not None
        node.follow(node.process.stdout)
        self.nodes[which] = node
        return node

    def start_program(
        self, which: str, netns: str, argv: list[str], *, env: dict[str, str] | None = None
    ) -> NodeProcess:
        """Starts any program (another VPN, for comparisons) in `netns`, followed like a node: its output goes
        to `WORKDIR/<which>.log` and `wait_for_line` works on it; `stop_node(which)` stops it and `cleanup`
        stops it with the nodes. A `NodeProcess` whose `config` and `metrics_file` are the log (unused)."""
        log = self.workdir / f"{which}.log"
        log.write_bytes(b"")
        process = NodeProcess(which, netns, log, log, log)
        process.process = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert process.process.stdout is not None
        process.follow(process.process.stdout)
        self.nodes[which] = process
        return process

    def wait_ready(self, which: str, timeout: float = 20.0) -> None:
        """Until the node logs that it runs (its TUN is up and it listens); raises with its log if it exits
        first (or, as a hang guard, after `timeout` seconds)."""
        self.nodes[which].wait_for_line(lambda line: " running: " in line, timeout=timeout)

    def stop_node(self, which: str, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int:
        """Sends `sig` (SIGTERM), waits; returns the exit status (kills it after `timeout`)."""
        node = self.nodes[which]
        proc = node.process
        if proc is None:
            return -1
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        node.wait_output_closed()
        node.exit_code = proc.returncode
        return proc.returncode

    def cleanup(self) -> None:
        for which in list(self.nodes):
            with contextlib.suppress(Exception):
                self.stop_node(which, timeout=8.0)
        for ns in self._namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()

    # --- running things in the namespaces -------------------------------------------------------------------

    def python(self, netns: str, script: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", netns, sys.executable, "-c", script, *args]

    def run_python(self, netns: str, script: str, *args: str, timeout: float = 30.0) -> dict[str, Any]:
        """Runs a script in the namespace; its last stdout line is JSON and is returned."""
        result = subprocess.run(
            self.python(netns, script, *args), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"script failed ({result.returncode}): {result.stderr.strip()}")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def start_python(self, netns: str, script: str, *args: str) -> subprocess.Popen[str]:
        """Starts a script in the namespace (stdout piped, text)."""
        return subprocess.Popen(
            self.python(netns, script, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def metrics(self, which: str, timeout: float = 10.0) -> dict[str, Any]:
        """Fresh metrics: sends SIGUSR1 and waits for the "metrics {...}" line the node logs in answer (it
        then writes the same snapshot to its metrics file). `timeout` is a hang guard."""
        node = self.nodes[which]
        assert node.process is not None
        after = node.line_count()
        node.process.send_signal(signal.SIGUSR1)
        line = node.wait_for_line(lambda text: _METRICS_MARK in text, after=after, timeout=timeout)
        return dict(json.loads(line[line.index(_METRICS_MARK) + len("metrics ") :]))


_METRICS_MARK = "metrics {"


def transfer(
    lab: TunnelLab,
    server_ip: str,
    nbytes: int,
    *,
    port: int = 5001,
    verify: bool = True,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A TCP transfer of `nbytes` from namespace A to a server on `server_ip` in namespace B; returns
    `{"sent": {...}, "received": {...}}` (bytes, sha256 when `verify`, seconds)."""
    mode = "verify" if verify else "count"
    server = lab.start_python(lab.ns_b, TCP_SINK_SCRIPT, server_ip, str(port), mode)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(
                f"TCP sink did not start: {line!r} {server.stderr.read() if server.stderr else ''}"
            )
        sent = lab.run_python(
            lab.ns_a, TCP_SOURCE_SCRIPT, server_ip, str(port), str(nbytes), mode, timeout=timeout
        )
        out, err = server.communicate(timeout=timeout)
        if server.returncode != 0:
            raise RuntimeError(f"TCP sink failed: {err.strip()}")
        received = json.loads(out.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return {"sent": sent, "received": received}


ICMP_ECHO_SCRIPT = r"""
import json, os, socket, struct, sys, time
dst, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(timeout)
ident = os.getpid() & 0xFFFF
rtts = []
for seq in range(1, count + 1):
    payload = b"vpn-packet-e2e" + struct.pack("!d", time.time())
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload
    start = time.perf_counter()
    sock.sendto(packet, (dst, 0))
    while True:
        try:
            data, addr = sock.recvfrom(65535)
        except socket.timeout:
            break
        ihl = (data[0] & 0x0F) * 4
        kind, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind == 0 and rid == ident and rseq == seq and addr[0] == dst:
            rtts.append((time.perf_counter() - start) * 1000)
            break
print(json.dumps({"sent": count, "received": len(rtts), "rtt_ms": rtts}))
"""

TCP_SINK_SCRIPT = r"""
import hashlib, json, socket, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(60)
print("listening", flush=True)
conn, _ = srv.accept()
conn.settimeout(60)
digest = hashlib.sha256()
buf = bytearray(1 << 20)
view = memoryview(buf)
total = 0
start = None
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    if start is None:
        start = time.perf_counter()
    total += n
    if mode == "verify":
        digest.update(view[:n])
seconds = time.perf_counter() - (start or time.perf_counter())
result = {"bytes": total, "sha256": digest.hexdigest() if mode == "verify" else None, "seconds": seconds}
print(json.dumps(result))
"""

TCP_SOURCE_SCRIPT = r"""
import hashlib, json, random, socket, sys, time
host, port, nbytes, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = 1 << 20
rng = random.Random(20260)
blocks = [rng.randbytes(chunk) for _ in range(4)] if mode == "verify" else [bytes(chunk)]
digest = hashlib.sha256()
sock = socket.create_connection((host, port), timeout=10)
sock.settimeout(60)
start = time.perf_counter()
sent = 0
i = 0
while sent < nbytes:
    block = blocks[i % len(blocks)][: nbytes - sent]
    i += 1
    if mode == "verify":
        digest.update(block)
    sock.sendall(block)
    sent += len(block)
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
seconds = time.perf_counter() - start
sock.close()
result = {"bytes": sent, "sha256": digest.hexdigest() if mode == "verify" else None, "seconds": seconds}
print(json.dumps(result))
"""

UDP_SINK_SCRIPT = r"""
import json, socket, sys
host, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((host, port))
sock.settimeout(timeout)
print("listening", flush=True)
got = []
while len(got) < count:
    try:
        data, addr = sock.recvfrom(65535)
    except socket.timeout:
        break
    got.append({"from": addr[0], "payload": data.decode(errors="replace")})
print(json.dumps({"datagrams": got}))
"""

# Raw IPv4 packets built here (source address included: IP_HDRINCL), sent into the routing table of the
# namespace: with a destination in the tunnel's subnet they go into the TUN device, so the node reads them
# as it reads anything a local program sends. Arguments: dst, then (src, dport, payload) triples.
RAW_SEND_SCRIPT = r"""
import json, socket, sys
from vpn_packet.packets import UDP, ipv4_packet
dst, rest = sys.argv[1], sys.argv[2:]
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
sent = []
for i in range(0, len(rest), 3):
    src, dport, payload = rest[i], int(rest[i + 1]), rest[i + 2].encode()
    sock.sendto(ipv4_packet(src, dst, UDP, 40000 + i // 3, dport, payload), (dst, 0))
    sent.append(src)
print(json.dumps({"sent": sent}))
"""

# What an attacker on the underlay can do against a node in key mode: connect with TLS, present its own key
# (any key file), claim a configured peer's id in a signed hello, and send a data frame right behind the
# hello without waiting for the answer (so a receiver that read frames before judging the hello would be
# caught). Prints the answer's reason and then waits until the node closes the connection (refused) or, when
# accepted, closes it itself after the frame. Arguments: host, port, key file, claimed id, src, dst, dport.
IMPOSTOR_SCRIPT = r"""
import json, socket, sys
from vpn_packet._native import ANSWER_REASONS, encode_hello, hello_transcript, parse_answer, parse_challenge
from vpn_packet.packets import UDP, ipv4_packet
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import new_epoch
from vpn_packet.transport.identity import certificate_public_key, load_identity
from vpn_packet.transport.tls import key_client_context
host, port, key_file, claimed_id, src, dst, dport = sys.argv[1:8]
identity = load_identity(key_file)
packet = ipv4_packet(src, dst, UDP, 4444, int(dport), b"injected")
conn = key_client_context(identity).wrap_socket(
    socket.create_connection((host, int(port)), timeout=10), server_hostname=None
)
def read_message(parse):
    data = b""
    while True:
        message, needed = parse(data)
        if message is not None:
            return message
        while needed:
            chunk = conn.recv(needed)
            if not chunk:
                raise EOFError("closed during the handshake")
            data += chunk
            needed -= len(chunk)
nonce = read_message(parse_challenge)
server_key = certificate_public_key(conn.getpeercert(binary_form=True))
epoch = new_epoch()
transcript = hello_transcript(nonce, server_key, claimed_id, epoch, identity.public_key_bytes)
hello = encode_hello(claimed_id, epoch, identity.public_key_bytes, identity.sign(transcript))
conn.sendall(hello + encode_frames([packet]))
code, text = read_message(parse_answer)
reason = ANSWER_REASONS[code]
closed_by_peer = False
if reason != "accepted":
    try:
        closed_by_peer = conn.recv(1) == b""
    except (ConnectionError, OSError):
        closed_by_peer = True
conn.close()
print(json.dumps({"answer": reason, "text": text, "closed_by_peer": closed_by_peer}))
"""
