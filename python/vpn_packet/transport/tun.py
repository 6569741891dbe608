"""A Linux TUN device (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): raw IP packets in and out, in batches.

    tun = TunDevice.open("vpn0", address="10.8.0.1/24", mtu=1400, txqueuelen=1000, offload=True)
    tun.start_reading(reader)            # every readiness event: reader.take_read(io, ...), one native call
    tun.write_batch(packets)             # one native call; no room -> dropped and counted, no backlog
    tun.kernel_counters()                # the kernel's own drop and error counters of the device
    tun.close()                          # idempotent; the device disappears with its file descriptor

`open` creates the interface (ioctl `TUNSETIFF`), makes the descriptor non-blocking and configures the
interface with `pyroute2` (address, MTU, `txqueuelen`, up). An interface given no IPv6 address has IPv6
disabled (no link-local address, so no router solicitations or MLD reports sent into the tunnel). Creating
the interface needs root or `CAP_NET_ADMIN`: without, it raises `PermissionError` saying so. Opening
`/dev/net/tun` needs read and write permission on that file, which CAP_NET_ADMIN does not give: when its mode
refuses us (some distributions ship it 0600 root:root) the `PermissionError` names the file's mode and owner
and what to do. Without `/dev/net/tun` it raises `FileNotFoundError` saying so.

This class is the one owner of the TUN in Python: a node reads it here and hands each read straight to the
dispatcher's native queues; the receive path writes to its descriptor natively (`ReceiveSession`). The
system calls are the Rust core's (`rust/core/src/tun.rs`); `vpn_packet._native.TunIo` only converts. Tests
use the same class on a `SOCK_SEQPACKET` socket pair (`vpn_packet.testutil.faketun`), not a fake of it.

Reading: on each readiness event the reader (a `TunReader`) is handed the device's `TunIo` and makes one
native call that reads until `EAGAIN` (or `max_packets` / `max_bytes`, the GIL released) into one reused
buffer and takes what it read: a node's dispatcher routes it into its native queues in that call
(`Dispatcher.take_read`, `TunIo.read_into`), whose fast path writes an established destination's packets
into its connection there too: no Python object and no copy per packet or read. `BufferReader` hands a
callback the read as two buffers instead (the packets back to back and their u32 lengths), for tools and
tests; `read_buffer` does one such read now.

On the data plane (`start_reading(..., plane=...)`, a node's): when the reader has native queues to take
reads (`TunReader.plane_queues`), the reads happen on the plane's thread instead of the loop (a
`TunFeed`): a read whose every packet is for a destination on the fast path is pushed there, written into
its connection, with no Python code run; any other read is handed back to the loop, where the reader takes
it (`TunReader.take_parked`) as it takes one on the loop. The reads then stay on the loop until the flow
is steady again (`TunReader.plane_ready`: no worker busy), so that a bulk transfer whose fast route comes and
goes (the window fills) is not handed back and forth at every read.

Offloads (`offload=True`): the device is opened with `IFF_VNET_HDR` and asked (`TUNSETOFFLOAD`) for checksum
offload, TSO4/TSO6 and, where the kernel has it, UDP segmentation offload (USO). Bulk TCP then arrives as
super-packets up to 64 KB, each preceded by a 10-byte virtio_net_hdr (every entry of a read has one, all zero
for a plain packet), and writes take the same header. What the kernel refuses is logged once and left off:
the device still works, with plain packets.

Writing (`write_batch`, for tools and tests; a node's receive path writes natively): one native call per
batch (one `write`, or `writev` with a zero virtio header, per packet). A device without room (`EAGAIN`)
drops the rest of the batch, counted in `write_dropped`, as its own full queue would: there is no backlog
(a TUN write goes into the kernel's input queue and practically never blocks; a Python backlog only added
memory and a second code path). A packet the kernel refuses (`EINVAL`, ...) is counted in `write_errors`.

Kernel counters: drops inside the kernel (our reader too slow: `tx_dropped`; a packet we wrote dropped:
`rx_dropped`) are not seen by any of the above; `kernel_counters()` reads them from `/proc/net/dev` (of the
reading process's network namespace, as the device is). `close()` reads them one last time before the
device goes, and `kernel_counters()` returns those final values afterwards, so an exit summary written
after the close still includes every drop up to the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import grp
import ipaddress
import logging
import os
import pwd
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from vpn_packet import tuning
from vpn_packet._native import TUN_FATAL_ERRNOS, VNET_HDR_LEN, DestinationQueues, TunFeed, TunIo
from vpn_packet.transport.plane import Plane

__all__ = ["TUN_PATH", "BufferReader", "TunDevice", "TunMetrics", "TunReader"]

_log = logging.getLogger(__name__)

TUN_PATH: Final = "/dev/net/tun"
_TUNSETIFF: Final = 0x400454CA
_IFF_TUN: Final = 0x0001
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_TUNSETOFFLOAD: Final = 0x400454D0
_TUN_F_CSUM: Final = 0x01
_TUN_F_TSO4: Final = 0x02
_TUN_F_TSO6: Final = 0x04
_TUN_F_USO4: Final = 0x20
_TUN_F_USO6: Final = 0x40
# What to ask for, best first: TCP and UDP segmentation, then TCP only (kernels before 6.2 lack USO).
_OFFLOAD_CHOICES: Final = (
    ("csum tso4 tso6 uso4 uso6", _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6 | _TUN_F_USO4 | _TUN_F_USO6),
    ("csum tso4 tso6", _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6),
)
_OFFLOAD_READ_SIZE: Final = VNET_HDR_LEN + 65535  # a header and the largest super-packet
_NEEDS_ROOT: Final = "needs root or CAP_NET_ADMIN"
# The device is gone (deleted with `ip link del`, or the descriptor is closed): reading cannot recover.
_FATAL: Final = frozenset(TUN_FATAL_ERRNOS)

BufferCallback = Callable[[bytes, bytes], object]
"""`on_buffer(data, lengths)`: one read, the packets back to back and their native-endian u32 lengths."""


class TunReader(Protocol):
    """Takes one read of a TUN device: `take_read` reads with `io` (one native call) and returns
    `(packets, bytes, errno)`: what it read (bytes with the virtio headers, if any) and the errno that stopped
    the read (0: none)."""

    def take_read(
        self, io: TunIo, *, vnet_header: bool, max_packets: int, max_bytes: int
    ) -> tuple[int, int, int]: ...

    def plane_queues(self) -> DestinationQueues | None:
        """The native queues a data plane's thread may push reads into itself (None: reads stay on the
        loop)."""
        ...

    def take_parked(self, feed: TunFeed) -> tuple[int, int, int]:
        """Takes what the data plane's thread handed back (`TunFeed.take_parked`), as `take_read` takes a
        read: `(packets, bytes, errno)`."""
        ...

    def plane_ready(self) -> bool:
        """Whether the flow is steady enough for the reads to go (back) to the thread: nothing waits on the
        loop (a node: no worker busy), so the next reads are likely for the fast path."""
        ...


class BufferReader:
    """A `TunReader` that hands each read to `on_buffer(data, lengths)` (only with at least one packet)."""

    __slots__ = ("on_buffer",)

    def __init__(self, on_buffer: BufferCallback) -> None:
        self.on_buffer = on_buffer

    def take_read(
        self, io: TunIo, *, vnet_header: bool, max_packets: int, max_bytes: int
    ) -> tuple[int, int, int]:
        data, lengths, error = io.read_batch(max_packets, max_bytes)
        n = len(lengths) // 4
        if n:
            self.on_buffer(data, lengths)
        return n, len(data), error

    def plane_queues(self) -> DestinationQueues | None:
        return None  # the callback wants every read: on the loop

    def take_parked(self, feed: TunFeed) -> tuple[int, int, int]:  # pragma: no cover - never on a plane
        raise RuntimeError("a BufferReader reads on the loop")

    def plane_ready(self) -> bool:
        return False


KernelCounters = Callable[[str], dict[str, int]]
"""`read(name)`: the kernel's drop and error counters of interface `name` (`read_kernel_counters`)."""


@dataclass(frozen=True, slots=True)
class TunMetrics:
    """Counters of a TUN device: packets and bytes read/written, read events and batches, write drops."""

    name: str
    packets_read: int
    bytes_read: int
    read_events: int
    read_errors: int
    packets_written: int
    bytes_written: int
    write_errors: int
    write_dropped: int
    max_batch_seen: int
    offloads: str  # what the kernel granted ("csum tso4 tso6 uso4 uso6", ...), "" without IFF_VNET_HDR

    @property
    def backlog(self) -> int:
        """Deprecated (warned once): always 0, there is no write backlog any more."""
        from vpn_packet.deprecation import warn_once

        warn_once("TunMetrics.backlog", "TunMetrics.backlog is always 0: the TUN has no write backlog")
        return 0


class TunDevice:
    """An open TUN interface; see the module docstring. Create it with `TunDevice.open`."""

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        mtu: int,
        vnet_header: bool = False,
        offloads: str = "",
        read_counters: KernelCounters | None = None,
    ) -> None:
        self.fd = fd
        self.name = name
        self.mtu = mtu
        self.vnet_header = vnet_header
        self.offloads = offloads
        # A read returns one packet (or super-packet); never cut one short.
        self._read_size = _OFFLOAD_READ_SIZE if vnet_header else max(mtu, 1500) + 64
        self._io = TunIo(fd, vnet_header=vnet_header, packet_size=self._read_size)
        self._header_len = VNET_HDR_LEN if vnet_header else 0
        self._read_counters = read_counters if read_counters is not None else read_kernel_counters
        self._final_counters: dict[str, int] = {}  # read by close(), before the device goes
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._reader: TunReader | None = None
        self._on_error: Callable[[OSError], object] | None = None
        self._plane: Plane | None = None
        self._feed: TunFeed | None = None  # the reads on the plane's thread, once made
        self._on_loop = False  # read by the loop's readiness callback now (else by the plane, if reading)
        self.error: OSError | None = None  # set when reading failed for good
        self._max_packets = tuning.READ_BATCH
        self._max_bytes = 4 << 20
        self.packets_read = 0
        self.bytes_read = 0
        self.read_events = 0
        self.read_errors = 0
        self.packets_written = 0
        self.bytes_written = 0
        self.write_errors = 0
        self.write_dropped = 0
        self.max_batch_seen = 0

    # --- opening --------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        name: str,
        *,
        address: str | Iterable[str] | None = None,
        mtu: int = tuning.MTU,
        txqueuelen: int = tuning.TXQUEUELEN,
        max_backlog: int | None = None,
        path: str = TUN_PATH,
        offload: bool = False,
    ) -> TunDevice:
        """Creates the TUN interface `name`, configures it (addresses like `"10.8.0.1/24"`, MTU,
        `txqueuelen`) and brings it up; with `offload`, with virtio headers and the offloads the kernel
        grants (see the module docstring). Raises `PermissionError` without root/`CAP_NET_ADMIN` or when
        the mode of `/dev/net/tun` refuses us (the message names it), `FileNotFoundError` without
        `/dev/net/tun`, `ValueError` for a bad name, address or MTU (the rules of `vpn_packet.tuning`, the
        same as the node configuration's). `max_backlog` is deprecated and ignored (there is no write
        backlog any more)."""
        if max_backlog is not None:
            from vpn_packet.deprecation import warn_once

            warn_once(
                "TunDevice.open(max_backlog=...)",
                "TunDevice.open(max_backlog=...) is deprecated and ignored: the TUN has no write backlog",
            )
        try:
            tuning.check_interface_name(name)
        except ValueError as exc:
            raise ValueError(f"interface name: {exc}") from None
        addresses = [address] if isinstance(address, str) else list(address or ())
        interfaces = [ipaddress.ip_interface(a) for a in addresses]  # ValueError for a bad one
        try:
            tuning.check_mtu(mtu, ipv6=any(i.version == 6 for i in interfaces))
        except ValueError as exc:
            raise ValueError(f"mtu {exc}") from None
        try:
            tuning.check_int(txqueuelen, 1, tuning.MAX_TXQUEUELEN)
        except ValueError as exc:
            raise ValueError(f"txqueuelen {exc}") from None
        encoded = name.encode()
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "the TUN device is missing: no TUN driver here (modprobe tun)", path
            ) from None
        except PermissionError:
            raise PermissionError(
                errno.EACCES, f"cannot open the TUN device: {_open_refused(path)}", path
            ) from None
        try:
            flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if offload else 0)
            ifr = struct.pack("16sH22x", encoded, flags)
            try:
                result = fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except PermissionError:
                raise PermissionError(errno.EPERM, f"creating TUN interface {name!r} {_NEEDS_ROOT}") from None
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise OSError(
                        errno.EBUSY, f"TUN interface {name!r} is already open in another process"
                    ) from None
                if exc.errno == errno.EINVAL:  # the name is taken by a device that is not a TUN
                    raise OSError(
                        errno.EINVAL, f"interface {name!r} exists and is not a TUN device (Invalid argument)"
                    ) from None
                raise
            actual = result[: tuning.IFNAMSIZ].rstrip(b"\0").decode()
            offloads = _enable_offloads(fd, actual) if offload else ""
            _configure(actual, interfaces, mtu, txqueuelen)
        except BaseException:
            os.close(fd)
            raise
        _log.info(
            "TUN %s up: %s mtu %d txqueuelen %d offloads %s",
            actual,
            ", ".join(str(i) for i in interfaces) or "no address",
            mtu,
            txqueuelen,
            offloads or "none",
        )
        return cls(fd, actual, mtu=mtu, vnet_header=offload, offloads=offloads)

    # --- reading --------------------------------------------------------------------------------------------

    def read_buffer(
        self, max_packets: int = tuning.READ_BATCH, max_bytes: int = 4 << 20
    ) -> tuple[bytes, bytes]:
        """Every packet ready now (until `EAGAIN`), at most `max_packets` or about `max_bytes`, in one native
        call: `(data, lengths)`, `lengths` being native-endian u32 per packet (virtio header included when
        `vnet_header`)."""
        data, lengths, error = self._io.read_batch(max_packets, max_bytes)
        self._count_read(len(lengths) // 4, len(data), error)
        return data, lengths

    def _count_read(self, n: int, nbytes: int, error: int) -> None:
        if error:
            self.read_errors += 1
            exc = OSError(error, os.strerror(error))
            if error in _FATAL:
                self.error = exc
            else:
                _log.debug("TUN %s read error: %r", self.name, exc)
        if n:
            self.packets_read += n
            self.bytes_read += nbytes - n * self._header_len
            if n > self.max_batch_seen:
                self.max_batch_seen = n

    def start_reading(
        self,
        reader: TunReader,
        *,
        max_packets: int = tuning.READ_BATCH,
        max_bytes: int = 4 << 20,
        on_error: Callable[[OSError], object] | None = None,
        plane: Plane | None = None,
    ) -> None:
        """On every readiness event: `reader.take_read(io, ...)`, one native call that reads what is ready
        and takes it; with `plane`, on its thread when the reader can take reads there (see the module
        docstring).

        When the device fails for good (it was deleted: `EBADFD`; `EIO`, ...) reading stops, `error` is set
        and `on_error(error)` is called once (otherwise the error state would wake the loop forever)."""
        if self._closed:
            raise RuntimeError(f"TUN {self.name} is closed")
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._on_error = on_error
        self._max_packets = max_packets
        self._max_bytes = max_bytes
        self._plane = plane
        if not self._reading:
            self._reading = True
            if not self._to_plane():
                self._to_loop()

    def _to_loop(self) -> None:
        assert self._loop is not None
        self._loop.add_reader(self.fd, self._on_readable)
        self._on_loop = True

    def _to_plane(self) -> bool:
        """Reads on the plane's thread from now on, when there is one and the reader can take reads there."""
        if self._plane is None or self._reader is None:
            return False
        queues = self._reader.plane_queues()
        if queues is None:
            return False
        feed = self._feed
        if feed is None:
            feed = self._feed = TunFeed(
                self.fd,
                queues,
                vnet_header=self.vnet_header,
                packet_size=self._read_size,
                max_packets=self._max_packets,
                max_bytes=self._max_bytes,
                flood_batch=tuning.FLOOD_BATCH,
                flood_pause=tuning.FLOOD_PAUSE,
            )
        return self._plane.watch_tun(feed, self._parked)

    def stop_reading(self) -> None:
        """Stops reading (packets then wait in the kernel queue, up to `txqueuelen`). Idempotent. A read the
        plane's thread had made and not pushed is taken first: read packets are never dropped silently."""
        if self._reading and self._loop is not None:
            self._reading = False
            if self._on_loop:
                self._on_loop = False
                if not self._loop.is_closed():
                    self._loop.remove_reader(self.fd)
            elif self._feed is not None and self._plane is not None:
                self._plane.unwatch_tun(self._feed)
                self._take_parked()

    def _parked(self) -> None:
        """The plane's thread handed the reads back: the read it left is taken (even after a stop: read
        packets are never dropped silently), and the reads stay on the loop until the flow is steady again
        (`_on_readable`), or stop when the device failed."""
        self._take_parked()
        if not self._reading:
            return
        if self.error is not None:
            self._failed()
        else:
            self._to_loop()

    def _take_parked(self) -> None:
        """Takes what the thread left in the feed, if anything (a second call finds nothing)."""
        feed, reader = self._feed, self._reader
        if feed is None or reader is None:
            return
        try:
            n, nbytes, error = reader.take_parked(feed)
        except Exception:
            _log.exception("TUN %s: the reader failed", self.name)
            return
        if n or error:
            self.read_events += 1
            self._count_read(n, nbytes, error)

    def _failed(self) -> None:
        error = self.error
        assert error is not None
        self.stop_reading()
        _log.error("TUN %s failed: %s; stopped reading", self.name, error)
        if self._on_error is not None:
            self._on_error(error)

    def _on_readable(self) -> None:
        self.read_events += 1
        reader = self._reader
        if reader is None:
            return
        try:
            n, nbytes, error = reader.take_read(
                self._io,
                vnet_header=self.vnet_header,
                max_packets=self._max_packets,
                max_bytes=self._max_bytes,
            )
        except Exception:
            _log.exception("TUN %s: the reader failed", self.name)
            return
        self._count_read(n, nbytes, error)
        if self.error is not None:
            self._failed()
        elif self._plane is not None and reader.plane_ready():  # steady again: back to the thread
            assert self._loop is not None
            self._loop.remove_reader(self.fd)
            self._on_loop = False
            if not self._to_plane():
                self._to_loop()

    # --- writing --------------------------------------------------------------------------------------------

    def write_batch(self, packets: Iterable[bytes]) -> int:
        """Writes packets to the device in order, in one native call; returns how many it took. Packets it
        had no room for (the rest of the batch from the first `EAGAIN`), or that came after it was gone or
        closed, are dropped and counted (`write_dropped`); refused ones are counted in `write_errors`."""
        batch = packets if isinstance(packets, list) else list(packets)
        if self._closed:
            self.write_dropped += len(batch)
            return 0
        written, nbytes, refused, dropped, fatal = self._io.write_packets(batch)
        self.packets_written += written
        self.bytes_written += nbytes
        self.write_errors += refused + (1 if fatal else 0)
        self.write_dropped += dropped
        if fatal:
            _log.debug("TUN %s write failed: %s", self.name, os.strerror(fatal))
        return written

    # --- closing and metrics --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops reading and closes the descriptor (the interface goes away). Idempotent. The kernel's
        counters are read just before, so `kernel_counters()` still answers with them afterwards."""
        if self._closed:
            return
        self.stop_reading()
        self._final_counters = self._read_counters(self.name)
        self._closed = True
        with contextlib.suppress(OSError):
            os.close(self.fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _sync_feed(self) -> None:
        """Counts the reads the plane's thread pushed itself (it counts natively)."""
        if self._feed is not None:
            events, packets, nbytes, max_batch = self._feed.take_stats()
            self.read_events += events
            self.packets_read += packets
            self.bytes_read += nbytes - packets * self._header_len
            self.max_batch_seen = max(self.max_batch_seen, max_batch)

    def metrics(self) -> TunMetrics:
        self._sync_feed()
        return TunMetrics(
            name=self.name,
            packets_read=self.packets_read,
            bytes_read=self.bytes_read,
            read_events=self.read_events,
            read_errors=self.read_errors,
            packets_written=self.packets_written,
            bytes_written=self.bytes_written,
            write_errors=self.write_errors,
            write_dropped=self.write_dropped,
            max_batch_seen=self.max_batch_seen,
            offloads=self.offloads,
        )

    def kernel_counters(self) -> dict[str, int]:
        """The kernel's own counters of this device (`rx_dropped`, `rx_errors`, `tx_dropped`, `tx_errors`;
        "tx" is toward us: `tx_dropped` counts packets the kernel dropped because we did not read them in
        time). After `close()`: their values at the close. Empty when the device is not in `/proc/net/dev`
        (another network namespace)."""
        if self._closed:
            return dict(self._final_counters)
        return self._read_counters(self.name)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<TunDevice {self.name} {state} mtu={self.mtu} read={self.packets_read} "
            f"written={self.packets_written} dropped={self.write_dropped}>"
        )


def _open_refused(path: str) -> str:
    """Why opening the TUN device file was refused, for the error message. Opening it is a file permission
    (CAP_NET_ADMIN does not override a file's mode; creating the interface afterwards is what needs it), so
    name the file's mode and owner and what to do, when its mode does not grant us read and write."""
    try:
        st = os.stat(path)
    except OSError:
        return _NEEDS_ROOT
    mode = stat.S_IMODE(st.st_mode)
    owner = _user_name(st.st_uid)
    group = _group_name(st.st_gid)
    return (
        f"{path} is mode {mode:04o} owned by {owner}:{group}, which does not let this user "
        f"(uid {os.geteuid()}) open it; CAP_NET_ADMIN does not override a file's mode. Run as root, or give "
        f"the file the usual mode (chmod 0666 {path}): creating the interface then still {_NEEDS_ROOT}, "
        f"and a restart alone does not fix this"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_PROC_NET_DEV: Final = "/proc/net/dev"
# /proc/net/dev columns after "name:": rx bytes packets errs drop fifo frame compressed multicast, then tx
# bytes packets errs drop fifo colls carrier compressed.
_KERNEL_COLUMNS: Final = {"rx_errors": 2, "rx_dropped": 3, "tx_errors": 10, "tx_dropped": 11}


def read_kernel_counters(name: str, path: str = _PROC_NET_DEV) -> dict[str, int]:
    """The drop and error counters of interface `name` from `/proc/net/dev` ({} if it is not there)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return {}
    for line in lines[2:]:
        iface, sep, rest = line.partition(":")
        if sep and iface.strip() == name:
            fields = rest.split()
            try:
                return {key: int(fields[column]) for key, column in _KERNEL_COLUMNS.items()}
            except (IndexError, ValueError):
                return {}
    return {}


def _enable_offloads(fd: int, name: str) -> str:
    """Asks the kernel for the offloads of `_OFFLOAD_CHOICES`, best first; returns what was granted ("" for
    none). Logged once per device: a kernel without them still works, with plain packets."""
    for label, flags in _OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, _TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                continue
            _log.warning("TUN %s: no offloads (%s); plain packets only", name, exc.strerror or exc)
            return ""
        return label
    _log.warning("TUN %s: the kernel refused TSO offloads; plain packets only", name)
    return ""


Interfaces = list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]


def _configure(name: str, interfaces: Interfaces, mtu: int, txqueuelen: int) -> None:
    """Addresses, MTU, txqueuelen and up, with pyroute2; netlink EPERM becomes a clear PermissionError.

    pyroute2's synchronous `IPRoute` runs an event loop of its own, which it cannot do inside a running one:
    from asyncio code the netlink work runs in a short-lived thread (a few milliseconds, once at startup)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _configure_sync(name, interfaces, mtu, txqueuelen)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tun-configure") as pool:
        pool.submit(_configure_sync, name, interfaces, mtu, txqueuelen).result()


def _configure_sync(name: str, interfaces: Interfaces, mtu: int, txqueuelen: int) -> None:
    from pyroute2 import IPRoute  # type: ignore[import-untyped]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    try:
        with IPRoute() as ipr:
            links: Any = ipr.link_lookup(ifname=name)
            if not links:
                raise OSError(errno.ENODEV, f"TUN interface {name!r} vanished before it was configured")
            index = int(links[0])
            ipr.link("set", index=index, mtu=mtu, txqlen=txqueuelen)
            for interface in interfaces:
                ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            if not any(interface.version == 6 for interface in interfaces):
                _disable_ipv6(name)
            ipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        code = int(exc.code)
        if code in (errno.EPERM, errno.EACCES):
            raise PermissionError(code, f"configuring interface {name!r} {_NEEDS_ROOT}") from None
        raise OSError(code, f"configuring interface {name!r}: {os.strerror(code)}") from None


def _disable_ipv6(name: str) -> None:
    """No IPv6 on an interface configured without IPv6 addresses: otherwise the kernel gives it a link-local
    address and sends router solicitations and MLD reports into the tunnel, which no peer owns (each would be
    counted as a `no_peer` failure). Best effort: without IPv6 in the kernel there is nothing to disable."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError as exc:
        _log.debug("TUN %s: cannot disable IPv6: %s", name, exc)
