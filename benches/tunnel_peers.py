"""The tunnels that `tunnel.py` compares, each in its own pair of namespaces (`TunnelLab`: veth underlay
172.31.255.1/30 <-> .2, MTU 1500), each with the same tunnel addresses (10.8.0.1 in A, 10.8.0.2 in B) and
tunnel MTU (1400 unless told otherwise).

A `Tunnel` is set up once (namespaces, keys), then started fresh and stopped again for every round, so that
each round's first ping goes to a freshly started tunnel and a tunnel that is not being measured uses no CPU.
"Ready" means what each program says: both vpn-packet nodes logged "running", both boringtun processes
logged that they started and `wg set`/`ip` configured them, both OpenVPN processes logged "Initialization
Sequence Completed". Whatever a tunnel does on demand after that (a connection, a handshake) is part of the
first ping.

- `BareVeth`: no tunnel, the veth pair itself (MTU 1500): the ceiling.
- `VpnPacket`: two `vpn-packet node` processes from TOML, as `TunnelLab` starts them; `insecure=True` is
  `[node] insecure = true` (plaintext), otherwise the default (TLS 1.3, keys from `vpn-packet genkey`).
- `Boringtun`, `WireguardGo`: userspace WireGuard (`boringtun-cli --foreground`, its default 4 threads;
  `wireguard-go -f`), configured with `wg` from wireguard-tools; keys from `wg genkey`.
- `OpenVpn`: OpenVPN 2.6 in TLS mode (a throwaway CA and two certificates made here, ECDHE, `--dh none`),
  data channel AES-256-GCM, point-to-point, data channel offload off (`--disable-dco`); `OpenVpn` over UDP
  (OpenVPN's default and fastest), `OpenVpnTcp` over TCP (vpn-packet's transport).

Keys and certificates live in the run's temporary directory and go with it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from tunnel_measure import cpu_seconds
from vpn_packet.testutil.netns import TUNNEL_A, TUNNEL_B, UNDERLAY_A, UNDERLAY_B, TunnelLab

REPO = Path(__file__).resolve().parent.parent


def find_command(name: str) -> str | None:
    """`name` on PATH, or in cargo's bin directory (where `cargo install` puts boringtun-cli)."""
    found = shutil.which(name)
    if found is not None:
        return found
    cargo_bin = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / name
    return str(cargo_bin) if cargo_bin.is_file() and os.access(cargo_bin, os.X_OK) else None


def _run(argv: list[str], *, input_text: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input_text, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _dig(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    """`tree[path[0]][path[1]]...`, or None where the metrics do not have it (their layout may change)."""
    node: Any = tree
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node


class Tunnel:
    """One implementation under test: a lab of its own, started and stopped per round."""

    key: ClassVar[str]  # the --impl name
    commands: ClassVar[tuple[str, ...]] = ()  # programs it needs besides ip, iperf3 and ping
    server_ip = TUNNEL_B  # the address in namespace B that the clients in A measure against

    def __init__(self, workdir: Path, *, mtu: int = 1400, insecure_lab: bool = True) -> None:
        self.workdir = workdir
        self.mtu = mtu
        workdir.mkdir(parents=True, exist_ok=True)
        self.lab = TunnelLab(workdir, mtu=mtu, start_nodes=False, insecure=insecure_lab)
        self.label = self.key

    def __enter__(self) -> Tunnel:
        self.lab.__enter__()
        try:
            self.prepare()
        except BaseException:
            self.lab.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.lab.cleanup()

    def prepare(self) -> None:
        """One-time set-up besides the namespaces (keys, certificates)."""

    def start(self) -> None:
        """Starts the tunnel and returns when it is ready (see the module docstring)."""

    def stop(self) -> None:
        for which in list(self.lab.nodes):
            self.lab.stop_node(which)

    def pids(self) -> list[int]:
        return [
            n.process.pid
            for n in self.lab.nodes.values()
            if n.process is not None and n.process.poll() is None
        ]

    def cpu(self) -> float:
        """CPU seconds used so far by the tunnel's processes (both ends)."""
        return sum(cpu_seconds(pid) for pid in self.pids())

    def round_info(self) -> dict[str, Any]:
        """Anything worth recording after a round (the tunnel still running): drops, counters."""
        return {}

    def devices(self) -> dict[str, str]:
        """The tunnel's network device in each namespace ("a", "b"): where the kernel counts its drops."""
        raise NotImplementedError

    def device_drops(self) -> dict[str, dict[str, int]]:
        """The kernel's rx/tx dropped and error counters of the tunnel devices (absolute values)."""
        out: dict[str, dict[str, int]] = {}
        for side, device in self.devices().items():
            ns = self.lab.ns_a if side == "a" else self.lab.ns_b
            stats = json.loads(_run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", device]))[0][
                "stats64"
            ]
            out[side] = {f"{d}_{k}": int(stats[d][k]) for d in ("rx", "tx") for k in ("dropped", "errors")}
        return out

    def version(self) -> str:
        return ""


class BareVeth(Tunnel):
    key = "veth"
    server_ip = UNDERLAY_B

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu)
        self.label = "bare veth (MTU 1500)"

    def devices(self) -> dict[str, str]:
        return {"a": self.lab.veth_a, "b": self.lab.veth_b}

    def version(self) -> str:
        return f"Linux {os.uname().release} veth"


class VpnPacket(Tunnel):
    def __init__(self, workdir: Path, *, mtu: int = 1400, insecure: bool) -> None:
        super().__init__(workdir, mtu=mtu, insecure_lab=insecure)
        self.label = "vpn-packet plaintext" if insecure else "vpn-packet TLS"

    def start(self) -> None:
        self.lab.start_node("a")
        self.lab.start_node("b")
        self.lab.wait_ready("a")
        self.lab.wait_ready("b")

    def devices(self) -> dict[str, str]:
        return {"a": "vpn0", "b": "vpn0"}  # the [interface] name of TunnelLab's node TOML

    def round_info(self) -> dict[str, Any]:
        """The nodes' own drop counters (to set beside the kernel's on their TUN devices)."""
        counters = {
            "rejected": ("node", "dispatcher", "rejected"),
            "failed": ("node", "dispatcher", "failed"),
            "spoofed": ("node", "receiver", "spoofed_dropped"),
            "tun_write_dropped": ("tun", "write_dropped"),
            "tun_packets_read": ("tun", "packets_read"),
        }
        return {
            which: {name: _dig(metrics, path) for name, path in counters.items()}
            for which, metrics in ((w, self.lab.metrics(w)) for w in ("a", "b"))
        }

    def version(self) -> str:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        return f"vpn-packet {importlib.metadata.version('vpn-packet')} (commit {commit or 'unknown'})"


class VpnPacketPlain(VpnPacket):
    key = "plain"

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu, insecure=True)


class VpnPacketTls(VpnPacket):
    key = "tls"

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu, insecure=False)


class VpnPacketTlsOnLoop(VpnPacket):
    """TLS with `[tuning] data_plane_threads = 0`: every packet handled on the event loop, as before the data
    plane's thread (its before/after in one run)."""

    key = "tls-loop"

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu, insecure=False)
        self.lab.tuning = "\n[tuning]\ndata_plane_threads = 0\n"
        self.label = "vpn-packet TLS, on the loop"


WG_PORT = 51820


class UserspaceWireGuard(Tunnel):
    """A userspace WireGuard daemon in each namespace, configured with `wg set` over its control socket."""

    program: ClassVar[str]
    ready_text: ClassVar[str]  # the line the daemon logs once its control socket listens
    env: ClassVar[dict[str, str]] = {}

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu)
        tag = self.lab.veth_a[3:]  # unique per lab: the control socket /var/run/wireguard/NAME.sock is global
        self.ifaces = {"a": f"{self.key[:2]}a{tag}"[:15], "b": f"{self.key[:2]}b{tag}"[:15]}
        self.public: dict[str, str] = {}

    def argv(self, binary: str, iface: str) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        for side in ("a", "b"):
            private = _run(["wg", "genkey"]).strip()
            key_file = self.workdir / f"wg-{side}.key"
            key_file.touch(mode=0o600)
            key_file.write_text(private + "\n")
            self.public[side] = _run(["wg", "pubkey"], input_text=private).strip()

    def _remove_sockets(self) -> None:
        for iface in self.ifaces.values():
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{iface}.sock").unlink()

    def start(self) -> None:
        binary = find_command(self.program)
        assert binary is not None
        self._remove_sockets()  # left by a killed run
        for side in ("a", "b"):
            ns = self.lab.ns_a if side == "a" else self.lab.ns_b
            argv = self.argv(binary, self.ifaces[side])
            self.lab.start_program(f"{self.key}-{side}", ns, argv, env={**os.environ, **self.env})
        for side in ("a", "b"):
            self.lab.nodes[f"{self.key}-{side}"].wait_for_line(
                lambda line: self.ready_text in line, timeout=20
            )
        for side, ns, address, peer, endpoint, allowed in (
            ("a", self.lab.ns_a, TUNNEL_A, "b", UNDERLAY_B, TUNNEL_B),
            ("b", self.lab.ns_b, TUNNEL_B, "a", UNDERLAY_A, TUNNEL_A),
        ):
            iface, key_file = self.ifaces[side], str(self.workdir / f"wg-{side}.key")
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "wg",
                    "set",
                    iface,
                    "private-key",
                    key_file,
                    "listen-port",
                    str(WG_PORT),
                    "peer",
                    self.public[peer],
                    "endpoint",
                    f"{endpoint}:{WG_PORT}",
                    "allowed-ips",
                    f"{allowed}/32",
                ]
            )
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", iface])
            _run(["ip", "-n", ns, "link", "set", iface, "mtu", str(self.mtu), "up"])

    def devices(self) -> dict[str, str]:
        return dict(self.ifaces)

    def stop(self) -> None:
        super().stop()
        self._remove_sockets()

    def version(self) -> str:
        binary = find_command(self.program) or self.program
        return f"{_first_line([binary, '--version'])}; {_first_line(['wg', '--version']).split(' - ')[0]}"


class Boringtun(UserspaceWireGuard):
    """Cloudflare's boringtun (Rust), its defaults: 4 threads, multi-queue TUN, connected UDP sockets."""

    key = "boringtun"
    commands = ("boringtun-cli", "wg")
    program = "boringtun-cli"
    ready_text = "started successfully"
    env: ClassVar[dict[str, str]] = {"WG_SUDO": "1"}  # as root: keep privileges (= --disable-drop-privileges)

    def argv(self, binary: str, iface: str) -> list[str]:
        return [binary, "--foreground", "--disable-drop-privileges", "--verbosity", "info", iface]


class WireguardGo(UserspaceWireGuard):
    """The Go reference implementation as Debian 12 ships it (2022: no TUN offloads, no UDP GSO/GRO)."""

    key = "wireguard-go"
    commands = ("wireguard-go", "wg")
    program = "wireguard-go"
    ready_text = "UAPI listener started"
    env: ClassVar[dict[str, str]] = {"LOG_LEVEL": "verbose"}  # logs the ready line (and handshakes only)

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu)
        self.label = "wireguard-go (2022)"

    def argv(self, binary: str, iface: str) -> list[str]:
        return [binary, "-f", iface]


OPENVPN_PORT = 1194


class OpenVpn(Tunnel):
    key = "openvpn"
    commands = ("openvpn",)
    proto = "udp"

    def __init__(self, workdir: Path, *, mtu: int = 1400) -> None:
        super().__init__(workdir, mtu=mtu)
        self.label = f"OpenVPN AES-256-GCM ({self.proto.upper()})"
        self.pki_dir = workdir / "pki"

    def prepare(self) -> None:
        from vpn_packet.testutil.certs import write_test_pki

        self.pki = write_test_pki(self.pki_dir, ["openvpn-server", "openvpn-client"], ca_name="bench CA")

    def _argv(self, side: str) -> list[str]:
        server = side == "b"
        creds = self.pki.nodes["openvpn-server" if server else "openvpn-client"]
        local, remote = (UNDERLAY_B, UNDERLAY_A) if server else (UNDERLAY_A, UNDERLAY_B)
        me, peer = (TUNNEL_B, TUNNEL_A) if server else (TUNNEL_A, TUNNEL_B)
        binary = find_command("openvpn") or "openvpn"
        argv = [
            binary,
            "--dev",
            f"ovpn{side}",
            "--dev-type",
            "tun",
            "--ifconfig",
            me,
            peer,
            "--tun-mtu",
            str(self.mtu),
            "--disable-dco",
            "--data-ciphers",
            "AES-256-GCM",
            "--ca",
            str(self.pki.ca_cert),
            "--cert",
            str(creds.cert),
            "--key",
            str(creds.key),
            "--verb",
            "3",
        ]
        argv += ["--tls-server", "--dh", "none"] if server else ["--tls-client"]
        if self.proto == "udp":
            argv += [
                "--proto",
                "udp",
                "--local",
                local,
                "--lport",
                str(OPENVPN_PORT),
                "--remote",
                remote,
                str(OPENVPN_PORT),
            ]
        elif server:
            argv += ["--proto", "tcp-server", "--local", local, "--lport", str(OPENVPN_PORT)]
        else:
            argv += [
                "--proto",
                "tcp-client",
                "--remote",
                remote,
                str(OPENVPN_PORT),
                "--nobind",
                "--connect-retry",
                "1",
            ]
        return argv

    def start(self) -> None:
        self.lab.start_program("openvpn-b", self.lab.ns_b, self._argv("b"))
        self.lab.start_program("openvpn-a", self.lab.ns_a, self._argv("a"))
        for which in ("openvpn-a", "openvpn-b"):
            self.lab.nodes[which].wait_for_line(
                lambda line: "Initialization Sequence Completed" in line, timeout=30
            )

    def devices(self) -> dict[str, str]:
        return {"a": "ovpna", "b": "ovpnb"}

    def round_info(self) -> dict[str, Any]:
        log = self.lab.nodes["openvpn-a"].log_text()
        ciphers = sorted(
            {
                line.split("Data Channel: ", 1)[1].strip()
                for line in log.splitlines()
                if "Data Channel: " in line
            }
        )
        return {"data_channel": ciphers}

    def version(self) -> str:
        binary = find_command("openvpn") or "openvpn"
        lines = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()
        head = " ".join(lines[0].split()[:2]) if lines else "OpenVPN unknown"
        library = (
            lines[1].split(":", 1)[1].split(",")[0].strip() if len(lines) > 1 and ":" in lines[1] else ""
        )
        return f"{head} ({library})" if library else head


class OpenVpnTcp(OpenVpn):
    """OpenVPN over TCP, the transport vpn-packet uses."""

    key = "openvpn-tcp"
    proto = "tcp"


IMPLEMENTATIONS: dict[str, type[Tunnel]] = {
    cls.key: cls
    for cls in (
        BareVeth,
        VpnPacketPlain,
        VpnPacketTls,
        VpnPacketTlsOnLoop,
        Boringtun,
        WireguardGo,
        OpenVpn,
        OpenVpnTcp,
    )
}
