"""The control socket of a running node: what `vpn-packet status` and `vpn-packet reload` talk to.

A unix stream socket, by default `/run/vpn-packet/NAME.sock` (NAME: the interface name) in the host's network
namespace and `/run/vpn-packet/NAME@NETNS.sock` in any other (NETNS: its `ip netns` name, else `net-INODE`),
or `[node] control_socket`. Why the namespace: interface names are per namespace and /run is usually shared,
so two nodes in two namespaces may both run `vpn0`; with one path the second ran without a control socket
(issue 22). `vpn-packet status NAME`, run in the same namespace, finds the same path.

Root only: the socket is created mode 0600 (under a umask, so never wider, not even
for an instant) in a directory the node makes mode 0700; a client whose uid (`SO_PEERCRED`) is neither 0 nor
the node's is refused anyway.

The protocol is one request and one answer per connection, each one line of JSON (UTF-8, `\\n`-terminated):

    -> {"command": "status"}
    <- {"ok": true, "status": {...}}                 # the node's snapshot (see `vpn_packet.cli.status`)
    -> {"command": "reload"}
    <- {"ok": true, "reload": {"applied": true, "message": "...", "added": [...], ...}}
    <- {"ok": false, "error": "one line"}            # a bad request, or a refused reload

A request is at most `MAX_REQUEST` bytes and must arrive within `REQUEST_TIMEOUT` seconds; the server closes
the connection otherwise. The handler runs on the node's loop, so the snapshot is consistent.

`ControlServer` is the node's side; `request()` the client's (blocking, for the command line). A path whose
socket answers nobody (a node that died) is stale: the next node removes it; one that answers belongs to a
running node and is never taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from vpn_packet.errors import UsageError

__all__ = [
    "CONTROL_DIR",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "ControlServer",
    "default_socket_path",
    "find_sockets",
    "interface_of",
    "netns_suffix",
    "request",
    "sudo_hint",
]

_log = logging.getLogger("vpn_packet.node")

#: Where nodes put their control sockets unless configured otherwise.
CONTROL_DIR: Final = Path("/run/vpn-packet")
#: Bytes of one request at most (a request is a few dozen bytes).
MAX_REQUEST: Final = 4096
#: Seconds a client has to send its request.
REQUEST_TIMEOUT: Final = 5.0
#: Seconds the client waits for an answer (a reload closes connections and waits for acks: a few seconds).
ANSWER_TIMEOUT: Final = 30.0
#: Bytes of one answer at most (a snapshot of thousands of peers is a few MB).
MAX_ANSWER: Final = 64 * 1024 * 1024

Handler = Callable[[str], Awaitable[Mapping[str, Any]]]
"""`handler(command)`: the answer's body (`{"status": ...}`); raises `UsageError` (one line) to refuse."""


def netns_suffix() -> str:
    """The empty string in the host's network namespace, else `@NAME` (the namespace's `ip netns` name,
    found in /run/netns) or `@net-INODE` (a namespace without a name, known not to be PID 1's).

    The host's namespace is PID 1's when this process may look at it; where it may not (a container, or
    not root), a namespace named in /run/netns is still told apart, and any other counts as the host's."""
    try:
        own = os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    own_id = (own.st_dev, own.st_ino)
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:
        init_id = None
    else:
        init_id = (init.st_dev, init.st_ino)
        if init_id == own_id:
            return ""
    with contextlib.suppress(OSError):
        for entry in sorted(Path("/run/netns").iterdir()):
            with contextlib.suppress(OSError):
                found = entry.stat()
                if (found.st_dev, found.st_ino) == own_id:
                    return f"@{entry.name}"
    return "" if init_id is None else f"@net-{own.st_ino}"


def default_socket_path(interface: str) -> Path:
    """The control socket of the node on interface `interface` in this network namespace."""
    return CONTROL_DIR / f"{interface}{netns_suffix()}.sock"


def interface_of(path: Path) -> str:
    """The interface name in a default socket path (`vpn0` for `vpn0.sock` and `vpn0@blue.sock`)."""
    return path.stem.partition("@")[0]


def find_sockets(directory: Path | None = None) -> list[Path]:
    """The control sockets of this network namespace's nodes in `directory` (default `CONTROL_DIR`), by
    name. Raises `PermissionError` when the directory exists but this process may not read it (it is the
    nodes' own, mode 0700): that is not "no node"."""
    directory = CONTROL_DIR if directory is None else directory
    try:
        entries = sorted(directory.iterdir())
    except PermissionError:
        raise
    except OSError:
        return []
    suffix = netns_suffix()
    return [
        p for p in entries if p.suffix == ".sock" and p.stem.partition("@")[2] == suffix[1:] and p.is_socket()
    ]


def sudo_hint(command: str) -> str:
    """`sudo /full/path/vpn-packet COMMAND`: sudo does not keep a venv's PATH, so the program is named by
    its path when it was started by one."""
    import sys

    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    shown = str(program.resolve()) if program is not None and program.name == "vpn-packet" else "vpn-packet"
    return f"sudo {shown} {command}"


def _answers(path: Path) -> bool:
    """Whether a node answers on the socket at `path` (it accepts a connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves `handler` on a unix socket at `path`; see the module docstring. `start()` raises `OSError`
    (e.g. `EADDRINUSE` when another node answers on the path); `stop()` removes the socket. Idempotent."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._server is not None:
            return
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # mkdir's mode is cut by the umask; never widened by it though
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                raise FileExistsError(17, f"{self.path} exists and is not a socket")
            if _answers(self.path):
                raise OSError(98, f"{self.path} is the control socket of a running node")
            self.path.unlink()  # stale: its node is gone
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        _log.info("control socket %s (vpn-packet status, vpn-packet reload)", self.path)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(set(self._clients), timeout=1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()
        with contextlib.suppress(OSError):  # remove it unless another node has put its own there meanwhile
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return False
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid in (0, os.getuid())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer, separators=(",", ":"), default=str).encode() + b"\n")
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        if not self._allowed(writer):
            return {"ok": False, "error": "permission denied: root only"}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        except TimeoutError:
            return {"ok": False, "error": f"no request within {REQUEST_TIMEOUT:g}s"}
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"ok": False, "error": "the request is not one line of JSON"}
        command = message.get("command") if isinstance(message, dict) else None
        if not isinstance(command, str):
            return {"ok": False, "error": 'expected {"command": "status"} or {"command": "reload"}'}
        try:
            body = await self._handler(command)
        except UsageError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            _log.exception("control request %r failed", command)
            return {"ok": False, "error": f"{command} failed: {type(exc).__name__}: {exc}"}
        return {"ok": True, **body}


def request(path: Path, command: str, *, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Sends `command` to the node at `path` and returns its answer's body (`{"ok": true, ...}`).
    Raises `ConnectionError` with one line when no node answers there, and `UsageError` with the node's
    one line when it refused the request."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ConnectionError(f"no node: {path} does not exist") from None
        except ConnectionRefusedError:
            raise ConnectionError(f"no node answers on {path} (stale: the node is not running)") from None
        except PermissionError:
            raise ConnectionError(
                f"{path}: permission denied: the control socket is root-only (run it as root: "
                f"{sudo_hint(command)})"
            ) from None
        except OSError as exc:
            raise ConnectionError(f"cannot reach the node on {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise UsageError(f"the answer from {path} is larger than {MAX_ANSWER} bytes")
        except TimeoutError:
            raise ConnectionError(f"the node on {path} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise ConnectionError(f"the node on {path} hung up: {exc.strerror or exc}") from None
    try:
        answer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConnectionError(f"the node on {path} gave no answer (it may be shutting down)") from None
    if not isinstance(answer, dict):
        raise UsageError(f"the node on {path} answered something else than an object")
    if not answer.get("ok"):
        raise UsageError(str(answer.get("error") or "refused"))
    return answer
