"""Real etcd servers for tests: Debian's `etcd-server` (3.4), on loopback, free ports, a temporary data dir.

`EtcdCluster.start(directory, members=1)` runs one member (most tests) or three (the test of a cluster
losing one); `client_urls` are what `[discovery] etcd` takes. A member is ready when it logs "serving client
traffic" (read from its output: an event, no polling). `stop(i)` kills one member; `close()` all.
Tests that need etcd skip when the binary is missing (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ETCD", "EtcdCluster"]

#: The etcd binary, or None when it is not installed.
ETCD = shutil.which("etcd") or (  # Debian installs it in /usr/bin; some images only in /usr/sbin
    "/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None
)
# etcd 3.4 (zap) logs this once the member is published to the cluster and its client listener serves.
_READY = b"serving client traffic"
_START_GUARD = 30.0  # a hang guard, not an assertion: a member that never logs ready fails the test


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class EtcdCluster:
    """Members on `host` (loopback by default), inside network namespace `netns` when given."""

    directory: Path
    client_ports: list[int]
    peer_ports: list[int]
    processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    host: str = "127.0.0.1"
    netns: str | None = None
    #: TLS for clients: (server certificate, its key, the CA client certificates must chain to). The
    #: certificate names "localhost", which `client_urls` then use.
    tls: tuple[Path, Path, Path] | None = None

    @property
    def client_urls(self) -> list[str]:
        if self.tls is not None:
            return [f"https://localhost:{port}" for port in self.client_ports]
        return [f"http://{self.host}:{port}" for port in self.client_ports]

    @classmethod
    def start(
        cls,
        directory: Path,
        members: int = 1,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> EtcdCluster:
        if ETCD is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        # In a fresh namespace every port is free; on the host, ports nobody holds now.
        if netns is not None:
            ports = [*range(2379, 2379 + members), *range(2480, 2480 + members)]
        else:
            ports = _free_ports(2 * members)
        cluster = cls(Path(directory), ports[:members], ports[members:], host=host, netns=netns, tls=tls)
        cluster.directory.mkdir(parents=True, exist_ok=True)
        try:
            cluster.processes = [None] * members
            cluster._run(range(members))
        except BaseException:
            cluster.close()
            raise
        return cluster

    def restart(self, i: int) -> None:
        """Starts member `i` again, on its ports and data dir (after `stop(i)`), and waits until it serves."""
        self._run([i])

    def _run(self, members: range | list[int]) -> None:
        ready = {}
        for i in members:
            process = self.processes[i] = self._spawn(i)
            ready[i] = threading.Event()
            log = self._log(i)
            threading.Thread(target=_watch_output, args=(process, ready[i], log), daemon=True).start()
        for i, event in ready.items():
            if not event.wait(_START_GUARD):
                raise RuntimeError(f"etcd member {i} did not become ready; see {self._log(i)}")

    def _log(self, i: int) -> Path:
        return self.directory / f"m{i}.log"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        assert ETCD is not None
        host = self.host
        initial = ",".join(f"m{k}=http://{host}:{port}" for k, port in enumerate(self.peer_ports))
        data = self.directory / f"m{i}.etcd"
        inside = ["ip", "netns", "exec", self.netns] if self.netns is not None else []
        scheme, secure = "http", []
        if self.tls is not None:
            cert, key, ca = self.tls
            scheme = "https"
            secure = [
                f"--cert-file={cert}",
                f"--key-file={key}",
                f"--trusted-ca-file={ca}",
                "--client-cert-auth",
            ]
        return subprocess.Popen(
            [
                *inside,
                ETCD,
                f"--name=m{i}",
                f"--data-dir={data}",
                f"--listen-client-urls={scheme}://{host}:{self.client_ports[i]}",
                f"--advertise-client-urls={scheme}://{host}:{self.client_ports[i]}",
                *secure,
                f"--listen-peer-urls=http://{host}:{self.peer_ports[i]}",
                f"--initial-advertise-peer-urls=http://{host}:{self.peer_ports[i]}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                "--initial-cluster-token=vpn-packet-test",
                "--heartbeat-interval=50",
                "--election-timeout=500",
                "--logger=zap",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self, i: int) -> None:
        """Kills member `i` (SIGKILL: a crash, not a goodbye)."""
        process = self.processes[i]
        if process is not None:
            process.kill()
            process.wait()
            self.processes[i] = None

    def close(self) -> None:
        for i in range(len(self.processes)):
            self.stop(i)


def _watch_output(process: subprocess.Popen[bytes], ready: threading.Event, log: Path) -> None:
    """Reads a member's log until it ends (so the pipe never fills), setting `ready` at the ready line."""
    assert process.stderr is not None
    with log.open("ab") as out:
        for line in process.stderr:
            out.write(line)
            if _READY in line:
                ready.set()
