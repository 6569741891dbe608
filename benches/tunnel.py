"""vpn-packet beside real VPNs between two network namespaces: iperf3, ping and CPU, in one run (root).

    sudo python benches/tunnel.py --rounds 3 --json out.json        # every implementation, ~7 minutes
    sudo python benches/tunnel.py --quick                           # 1 round, short tests: ~1-2 minutes
    sudo python benches/tunnel.py --impl plain --impl boringtun     # a selection (repeatable --impl)

Implementations (`--impl`, see `tunnel_peers.py`): `veth` (bare veth pair, MTU 1500), `plain` (vpn-packet,
`[node] insecure = true`), `tls` (vpn-packet's default: TLS 1.3, keys from `vpn-packet genkey`), `boringtun`
and `wireguard-go` (userspace WireGuard), `openvpn` and `openvpn-tcp` (OpenVPN 2.6, AES-256-GCM, over UDP /
TCP). Each has its own pair of namespaces joined by a veth pair (MTU 1500); tunnel MTU 1400.

Each round visits every implementation, in an order rotated by one each round (interleaved, so that a
slow spell of the shared machine does not land on one implementation); for each: start the tunnel fresh
(neighbour caches flushed), then
1. first ping: one echo request right after the tunnel reports ready (what it does on demand counts),
2. ping series (`--ping-count` at `--ping-interval`, 300 by default: p99 of fewer is noise here): p50, p99,
   average; the same series again while another process keeps one core busy (`--no-busy` skips it); and
   pings after a pause (`--idle-ping-count` at 0.2 s apart: what interactive traffic sees),
3. redis: `redis-benchmark` GET against a `redis-server` in B, one client (each request waits a round trip)
   and 50 clients pipelining 16 (`--redis-requests`),
4. iperf3 TCP, 1 stream, `--duration` s (the receiver's rate), with the CPU time of the tunnel processes
   (both ends, user + system, all threads) per GB received,
5. iperf3 TCP, 4 streams,
6. iperf3 UDP flood of 64-byte IP packets (`-b 0 -l 36`, `--udp-duration` s): packets per second delivered
   and the loss, as the iperf3 server counted them,
then stop it. The table shows medians over the rounds and, per column, how many times better than
boringtun each row is (throughput: value / boringtun's; latency and CPU: boringtun's / value).

Missing programs are installed from the package registries (`apt-get install -y iperf3 iputils-ping
redis-server redis-tools openvpn wireguard-tools wireguard-go`, `cargo install boringtun-cli --locked`)
unless `--no-install`, which names the missing command and the command that installs it and leaves that
implementation out. Benchmark, not test: it reports and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tunnel_measure import (
    cpu_hog,
    first_ping,
    iperf3_tcp,
    iperf3_udp,
    percentile,
    ping_series,
    redis_requests,
    udp_receive_buffer_errors,
)
from tunnel_peers import IMPLEMENTATIONS, Tunnel, find_command
from vpn_packet.testutil.netns import netns_unavailable

BASELINE = "boringtun"

# command -> how to install it (one source of truth for the script, the smoke test and the README)
INSTALL: dict[str, list[str]] = {
    "iperf3": ["apt-get", "install", "-y", "iperf3"],
    "ping": ["apt-get", "install", "-y", "iputils-ping"],
    "redis-server": ["apt-get", "install", "-y", "redis-server"],
    "redis-benchmark": ["apt-get", "install", "-y", "redis-tools"],
    "wg": ["apt-get", "install", "-y", "wireguard-tools"],
    "openvpn": ["apt-get", "install", "-y", "openvpn"],
    "wireguard-go": ["apt-get", "install", "-y", "wireguard-go"],
    "boringtun-cli": ["cargo", "install", "boringtun-cli", "--locked"],
}
ALWAYS_NEEDED = ("iperf3", "ping", "redis-server", "redis-benchmark")


@dataclass(frozen=True)
class Settings:
    impls: tuple[str, ...] = tuple(IMPLEMENTATIONS)
    rounds: int = 3
    duration: int = 5  # seconds per TCP test
    udp_duration: int = 5
    udp_bitrate: str = "0"  # iperf3 -b for the UDP test: "0" floods; e.g. "20M" offers a fixed rate
    ping_count: int = 300
    ping_interval: float = 0.01
    busy_pings: bool = True  # the ping series again with one core kept busy by another process
    idle_ping_count: int = 50
    idle_ping_interval: float = 0.2
    redis_requests: int = 100_000  # for 50 clients pipelining 16; one client gets a tenth
    mtu: int = 1400


QUICK = Settings(
    rounds=1, duration=2, udp_duration=2, ping_count=100, idle_ping_count=10, redis_requests=20_000
)


def missing_commands(impls: tuple[str, ...]) -> dict[str, list[str]]:
    """Commands the selected implementations need that are not installed -> the command that installs each."""
    needed = list(ALWAYS_NEEDED) + [c for key in impls for c in IMPLEMENTATIONS[key].commands]
    return {c: INSTALL[c] for c in dict.fromkeys(needed) if find_command(c) is None}


def install(missing: dict[str, list[str]], log: Callable[[str], None]) -> None:
    """Installs what is missing: apt packages in one go (after `apt-get update`), cargo crates one by one."""
    apt = [argv[-1] for argv in missing.values() if argv[0] == "apt-get"]
    if apt:
        log(f"installing with apt-get: {' '.join(apt)}")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True, env=env)
    for argv in missing.values():
        if argv[0] == "cargo":
            log(f"building: {' '.join(argv)} (a few minutes)")
            subprocess.run(argv, check=True)


def _make(key: str, workdir: Path, settings: Settings) -> Tunnel:
    return IMPLEMENTATIONS[key](workdir, mtu=settings.mtu)


def _flush_neighbours(tunnel: Tunnel) -> None:
    for ns in (tunnel.lab.ns_a, tunnel.lab.ns_b):
        subprocess.run(["ip", "-n", ns, "neigh", "flush", "all"], capture_output=True)


class _Round:
    """The figures of one round of one tunnel; a step that fails records its error and the round goes on."""

    def __init__(self, tunnel: Tunnel, settings: Settings) -> None:
        self.tunnel = tunnel
        self.settings = settings
        self.ns_a, self.ns_b, self.target = tunnel.lab.ns_a, tunnel.lab.ns_b, tunnel.server_ip
        self.result: dict[str, Any] = {"errors": {}}

    def step(self, name: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except Exception as error:
            self.result["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            return None

    def pings(self) -> None:
        self.result["first_ping_ms"] = self.step("first_ping", lambda: first_ping(self.ns_a, self.target))
        settings = self.settings
        self._ping_series("ping", settings.ping_count, settings.ping_interval)
        if settings.busy_pings:
            with cpu_hog():
                self._ping_series("ping_busy", settings.ping_count, settings.ping_interval)
        if settings.idle_ping_count:
            self._ping_series("ping_idle", settings.idle_ping_count, settings.idle_ping_interval)

    def _ping_series(self, name: str, count: int, interval: float) -> None:
        pings = self.step(name, lambda: ping_series(self.ns_a, self.target, count=count, interval=interval))
        if pings is not None:
            rtts = pings["rtt_ms"]
            self.result.update(
                {
                    f"{name}_p50_ms": percentile(rtts, 0.50),
                    f"{name}_p99_ms": percentile(rtts, 0.99),
                    f"{name}_avg_ms": statistics.fmean(rtts) if rtts else None,
                    f"{name}_lost": pings["sent"] - pings["received"],
                }
            )

    def redis(self) -> None:
        """Request/response: one client, then 50 clients pipelining 16 (redis-benchmark's requests/s)."""
        total = self.settings.redis_requests
        if not total:
            return
        for name, clients, pipeline, requests in (("redis1", 1, 1, total // 10), ("redis50", 50, 16, total)):
            measured = self.step(
                name,
                partial(
                    redis_requests,
                    self.ns_a,
                    self.ns_b,
                    self.target,
                    clients=clients,
                    pipeline=pipeline,
                    requests=requests,
                ),
            )
            if measured is not None:
                self.result[f"{name}_rps"] = measured["requests_per_s"]

    def tcp(self, streams: int, name: str) -> None:
        cpu_before = self.tunnel.cpu()
        tcp = self.step(
            name,
            partial(
                iperf3_tcp,
                self.ns_a,
                self.ns_b,
                self.target,
                streams=streams,
                duration=self.settings.duration,
            ),
        )
        cpu = self.tunnel.cpu() - cpu_before
        if tcp is not None:
            self.result[f"{name}_gbps"] = tcp["gbps"]
            self.result[f"{name}_retransmits"] = tcp["retransmits"]
            if self.tunnel.pids():
                self.result[f"{name}_cpu_s_per_gb"] = cpu / (tcp["bytes"] / 1e9)

    def udp(self) -> None:
        cpu_before = self.tunnel.cpu()
        rcvbuf_before = self.step("udp_rcvbuf", partial(udp_receive_buffer_errors, self.ns_b))
        udp = self.step(
            "udp64",
            partial(
                iperf3_udp,
                self.ns_a,
                self.ns_b,
                self.target,
                duration=self.settings.udp_duration,
                bitrate=self.settings.udp_bitrate,
            ),
        )
        cpu = self.tunnel.cpu() - cpu_before
        rcvbuf_after = self.step("udp_rcvbuf", partial(udp_receive_buffer_errors, self.ns_b))
        if rcvbuf_before is not None and rcvbuf_after is not None:
            self.result["udp64_rcvbuf_errors_b"] = (
                rcvbuf_after - rcvbuf_before
            )  # iperf3's or a tunnel's socket
        if udp is not None:
            self.result.update(
                udp64_pps=udp["delivered_pps"],
                udp64_loss=udp["loss"],
                udp64_sent=udp["sent"],
                udp64_delivered=udp["delivered"],
            )
            if self.tunnel.pids() and udp["delivered"]:
                self.result["udp64_cpu_us_per_packet"] = cpu / udp["delivered"] * 1e6


def measure_round(tunnel: Tunnel, settings: Settings) -> dict[str, Any]:
    """One round of every measurement on a freshly started `tunnel` (stopped again at the end)."""
    this = _Round(tunnel, settings)
    _flush_neighbours(tunnel)
    this.step("start", tunnel.start)
    try:
        if "start" in this.result["errors"]:
            return this.result
        drops_before = this.step("device_drops", tunnel.device_drops)
        this.pings()
        this.redis()
        this.tcp(1, "tcp1")
        this.tcp(4, "tcp4")
        this.udp()
        drops_after = this.step("device_drops", tunnel.device_drops)
        if drops_before and drops_after:  # the kernel's counters on the tunnel devices, during this round
            this.result["device_drops"] = {
                side: {k: v - drops_before[side][k] for k, v in counters.items()}
                for side, counters in drops_after.items()
            }
        info = this.step("round_info", tunnel.round_info)
        if info:
            this.result["info"] = info
        return this.result
    finally:
        this.step("stop", tunnel.stop)


METRICS = (
    "tcp1_gbps",
    "tcp4_gbps",
    "udp64_pps",
    "udp64_loss",
    "ping_p50_ms",
    "ping_p99_ms",
    "ping_avg_ms",
    "ping_busy_p50_ms",
    "ping_busy_p99_ms",
    "ping_busy_avg_ms",
    "ping_idle_p50_ms",
    "ping_idle_avg_ms",
    "first_ping_ms",
    "redis1_rps",
    "redis50_rps",
    "tcp1_cpu_s_per_gb",
    "tcp4_cpu_s_per_gb",
    "udp64_cpu_us_per_packet",
)


def medians(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in METRICS:
        values = [r[metric] for r in rounds if r.get(metric) is not None]
        out[metric] = statistics.median(values) if values else None
    return out


def conditions(settings: Settings, tunnels: list[Tunnel]) -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    def version(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else "unknown"

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": version(["iperf3", "--version"]),
        "ping": version(["ping", "-V"]),
        "settings": settings.__dict__ | {"impls": list(settings.impls)},
        "peers": {t.key: t.version() for t in tunnels},
        "labels": {t.key: t.label for t in tunnels},
    }


def run(settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every round of every selected implementation; the raw rounds, their medians and the conditions."""
    with tempfile.TemporaryDirectory(prefix="vpnp-tunnel-bench-") as tmp, contextlib.ExitStack() as stack:
        tunnels = [stack.enter_context(_make(key, Path(tmp) / key, settings)) for key in settings.impls]
        report: dict[str, Any] = {"conditions": conditions(settings, tunnels)}
        rounds: dict[str, list[dict[str, Any]]] = {t.key: [] for t in tunnels}
        for r in range(settings.rounds):
            shift = r % len(tunnels)
            for tunnel in tunnels[shift:] + tunnels[:shift]:
                started = time.monotonic()
                result = measure_round(tunnel, settings)
                rounds[tunnel.key].append(result)
                errors = f", errors: {result['errors']}" if result["errors"] else ""
                took = time.monotonic() - started
                log(f"round {r + 1}/{settings.rounds} {tunnel.label}: {took:.0f} s{errors}")
        report["rounds"] = rounds
        report["medians"] = {key: medians(results) for key, results in rounds.items()}
        report["conditions"]["load_average_at_end"] = os.getloadavg()
    return report


# --- the table ----------------------------------------------------------------------------------------------


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return f"{text}{unit}"


def _pps(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1000:.0f}k"


def _rps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


# (metric, column title, format, higher is better)
COLUMNS: tuple[tuple[str, str, Callable[[float | None], str], bool], ...] = (
    ("tcp1_gbps", "TCP 1 stream (Gbit/s)", _num, True),
    ("tcp4_gbps", "TCP 4 streams (Gbit/s)", _num, True),
    ("udp64_pps", "UDP 64 B delivered (pps)", _pps, True),
    ("ping_avg_ms", "ping avg (ms)", _num, False),
    ("ping_p99_ms", "ping p99 (ms)", _num, False),
    ("ping_busy_avg_ms", "ping avg, a core busy (ms)", _num, False),
    ("ping_busy_p99_ms", "ping p99, a core busy (ms)", _num, False),
    ("ping_idle_avg_ms", "ping avg, 0.2 s apart (ms)", _num, False),
    ("first_ping_ms", "first ping (ms)", _num, False),
    ("redis1_rps", "redis GET/s, 1 client", _rps, True),
    ("redis50_rps", "redis GET/s, 50 clients x 16", _rps, True),
    ("tcp1_cpu_s_per_gb", "CPU s per GB", _num, False),
)


def table(report: dict[str, Any]) -> str:
    """The medians as a Markdown table, then how each row compares with boringtun's."""
    labels = report["conditions"]["labels"]
    med = report["medians"]
    head = "| | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for key, values in med.items():
        cells = []
        for metric, _, fmt, _ in COLUMNS:
            cell = fmt(values[metric])
            if metric == "udp64_pps" and values["udp64_loss"] is not None:
                cell += f" ({values['udp64_loss']:.0%} lost)"
            cells.append(cell)
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    base = med.get(BASELINE)
    if base is not None:
        lines += [
            "",
            f"vs {BASELINE} (times better: throughput value / {BASELINE}'s, latency and CPU "
            f"{BASELINE}'s / value):",
            "",
            head,
            rule,
        ]
        for key, values in med.items():
            cells = []
            for metric, _, _, higher in COLUMNS:
                ours, theirs = values[metric], base[metric]
                if ours is None or theirs is None or ours == 0 or theirs == 0:
                    cells.append("")
                else:
                    cells.append(f"{(ours / theirs) if higher else (theirs / ours):.2f}x")
            lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drops_summary(report: dict[str, Any]) -> list[str]:
    """Per implementation, the kernel's drop and error counters on its tunnel devices and B's UDP receive
    buffer drops (median per round, the non-zero ones): where the UDP flood's loss happened (A tx dropped: the
    sending TUN's queue was full; B receive buffers: iperf3's socket, or a UDP tunnel's own, overflowed)."""
    lines = []
    labels = report["conditions"]["labels"]
    for key, rounds in report["rounds"].items():
        per_round = [r["device_drops"] for r in rounds if "device_drops" in r]
        counts = {
            f"{side.upper()} {counter.replace('_', ' ')}": statistics.median(
                r[side][counter] for r in per_round
            )
            for side in ("a", "b")
            for counter in (per_round[0][side] if per_round else {})
        }
        rcvbuf = [r["udp64_rcvbuf_errors_b"] for r in rounds if "udp64_rcvbuf_errors_b" in r]
        if rcvbuf:
            counts["B UDP receive buffers full (UDP test)"] = statistics.median(rcvbuf)
        shown = ", ".join(f"{name} {value:.0f}" for name, value in counts.items() if value) or "none"
        lines.append(f"- {labels[key]}: {shown}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--impl",
        action="append",
        choices=list(IMPLEMENTATIONS),
        help="implementation to run (repeatable; default all)",
    )
    parser.add_argument("--rounds", type=int, help=f"default {Settings.rounds}")
    parser.add_argument("--duration", type=int, help=f"seconds per TCP test (default {Settings.duration})")
    parser.add_argument("--udp-duration", type=int, help="seconds of the UDP flood (default: --duration)")
    parser.add_argument(
        "--udp-bitrate",
        default=Settings.udp_bitrate,
        help="iperf3 -b (UDP payload bits/s) for the 64 B test; default 0: as fast as the client can",
    )
    parser.add_argument("--ping-count", type=int, help=f"default {Settings.ping_count}")
    parser.add_argument("--ping-interval", type=float, default=Settings.ping_interval, help="seconds")
    parser.add_argument(
        "--idle-ping-count", type=int, help=f"pings 0.2 s apart (default {Settings.idle_ping_count}; 0: none)"
    )
    parser.add_argument("--no-busy", action="store_true", help="no ping series with one core kept busy")
    parser.add_argument(
        "--redis-requests",
        type=int,
        help=f"GETs for 50 clients pipelining 16, a tenth for one client (default {Settings.redis_requests})",
    )
    parser.add_argument("--mtu", type=int, default=Settings.mtu, help="tunnel MTU (underlay: 1500)")
    parser.add_argument(
        "--quick", action="store_true", help="defaults of 1 round, 2 s tests, 100 pings (~1-2 minutes)"
    )
    parser.add_argument("--no-install", action="store_true", help="say what is missing instead of installing")
    parser.add_argument("--json", type=Path, help="write the raw rounds, medians and conditions here")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    reason = netns_unavailable()
    if reason is not None:
        log(f"tunnel.py: cannot run: {reason}")
        return 2
    impls = tuple(args.impl or IMPLEMENTATIONS)
    missing = missing_commands(impls)
    if missing and not args.no_install:
        try:
            install(missing, log)
        except (OSError, subprocess.CalledProcessError) as error:
            log(f"tunnel.py: installing failed: {error}")
        missing = missing_commands(impls)
    for command, how in missing.items():
        log(f"tunnel.py: missing command {command!r} (install: {' '.join(how)})")
    if any(c in missing for c in ALWAYS_NEEDED):
        return 2
    impls = tuple(k for k in impls if not any(c in missing for c in IMPLEMENTATIONS[k].commands))
    defaults = QUICK if args.quick else Settings()
    duration = args.duration or defaults.duration
    settings = Settings(
        impls=impls,
        rounds=args.rounds or defaults.rounds,
        duration=duration,
        udp_duration=args.udp_duration or duration,
        udp_bitrate=args.udp_bitrate,
        ping_count=args.ping_count or defaults.ping_count,
        ping_interval=args.ping_interval,
        busy_pings=not args.no_busy,
        idle_ping_count=defaults.idle_ping_count if args.idle_ping_count is None else args.idle_ping_count,
        redis_requests=defaults.redis_requests if args.redis_requests is None else args.redis_requests,
        mtu=args.mtu,
    )
    report = run(settings, log)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    c = report["conditions"]
    print(
        f"{c['date']}, {c['cpu']} ({c['cpus']} CPUs), kernel {c['kernel']}, tunnel MTU {settings.mtu}, "
        f"medians of {settings.rounds} interleaved rounds, {settings.duration} s TCP / "
        f"{settings.udp_duration} s UDP tests (iperf3 -b {settings.udp_bitrate}),\n"
        f"{settings.ping_count} pings every {settings.ping_interval:g} s (again with a core busy: "
        f"{settings.busy_pings}), {settings.idle_ping_count} pings {settings.idle_ping_interval:g} s apart, "
        f"redis-benchmark GET x {settings.redis_requests}\n"
    )
    print(table(report))
    print()
    for key, version in c["peers"].items():
        print(f"- {c['labels'][key]}: {version}")
    print("\nKernel drops per round (median; whole round for the devices, UDP test for receive buffers):")
    print("\n".join(drops_summary(report)))
    for key, rounds in report["rounds"].items():
        for i, r in enumerate(rounds):
            if r["errors"]:
                print(f"- {c['labels'][key]} round {i + 1} errors: {r['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
