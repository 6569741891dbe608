"""A TUN device without root: the real `TunDevice` on one end of a `SOCK_SEQPACKET` socket pair.

Why a socket pair and not a Python fake of the class: a TUN descriptor keeps packet boundaries (one packet
per `read`, one per `write`), and so does a `SOCK_SEQPACKET` socket. So the node, its receiver's native
writes and `TunDevice` itself run exactly the code they run on a real device (the same native reads and
writes, the same callbacks): tests and production take one path. Only the other end differs: here the test
plays the kernel.

    tun = FakeTun.open("tun-a", address=["10.8.0.1/24"], mtu=1400, offload=True)
    tun.inject([packet])            # as if the kernel routed `packet` into the interface: the node reads it
    tun.written                     # what the node wrote to the device (plain packets, headers stripped)
    tun.kernel["tx_dropped"] = 3    # what /proc/net/dev would say about the device

`FakeTun.open` takes `TunDevice.open`'s arguments (a node's `tun_factory`); `opened_with` keeps them.
With `offload` the device takes virtio headers like a real one opened with `IFF_VNET_HDR`: injected packets
get an all-zero header, and headers are stripped from what the node wrote (kept in `written_headers`).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable
from typing import Any

from vpn_packet._native import VNET_HDR_LEN
from vpn_packet.transport.tun import TunDevice, TunReader

__all__ = ["FakeTun", "split_packets"]

_ZERO_HEADER = bytes(VNET_HDR_LEN)


def split_packets(data: bytes, lengths: bytes) -> list[bytes]:
    """The packets of one `TunDevice` read (`BufferReader`'s `on_buffer(data, lengths)`), as a list: for
    tests that look at them one by one (the node never makes an object per packet)."""
    view = memoryview(data)
    packets: list[bytes] = []
    start = 0
    for length in memoryview(lengths).cast("I"):
        packets.append(bytes(view[start : start + length]))
        start += length
    return packets


class FakeTun(TunDevice):
    """A `TunDevice` whose "kernel" is the test; see the module docstring."""

    def __init__(self, name: str, *, mtu: int = 1400, offload: bool = False, **opened_with: Any) -> None:
        ours, self._kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # as a TUN descriptor is opened (O_NONBLOCK)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.kernel: dict[str, int] = {"rx_dropped": 0, "rx_errors": 0, "tx_dropped": 0, "tx_errors": 0}
        self.opened_with: dict[str, Any] = {"mtu": mtu, "offload": offload, **opened_with}
        self.events: list[str] = []  # start_reading, stop_reading, close: in the order they happened
        self._lock = threading.Lock()
        self._written: list[bytes] = []
        self.written_headers: list[bytes] = []
        super().__init__(
            ours.detach(),  # the device owns the descriptor now, and closes it
            name,
            mtu=mtu,
            vnet_header=offload,
            offloads="csum tso4 tso6" if offload else "",
            read_counters=lambda _name: dict(self.kernel),
        )
        self._drain = threading.Thread(target=self._drain_written, name=f"faketun-{name}", daemon=True)
        self._drain.start()

    @classmethod
    def open(cls, name: str, *, mtu: int = 1400, offload: bool = False, **kwargs: Any) -> FakeTun:
        """`TunDevice.open`'s signature, without root: no interface is made."""
        return cls(name, mtu=mtu, offload=offload, **kwargs)

    # --- the kernel's side ----------------------------------------------------------------------------------

    def inject(self, packets: Iterable[bytes]) -> None:
        """The kernel routes `packets` into the interface: the node reads them (at its next readiness
        event), each as one read, with an all-zero virtio header when the device takes them."""
        header = _ZERO_HEADER if self.vnet_header else b""
        for packet in packets:
            self._kernel_end.send(header + packet)

    def unplug(self) -> None:
        """The device goes away under the node (`ip link del`): from now on writes to its descriptor fail
        with `EBADF` and reads with `EBADF`, as on a TUN whose interface was deleted. The descriptor number
        stays taken (a read-only /dev/null is put in its place), so nothing else can reuse it meanwhile."""
        read_only = os.open(os.devnull, os.O_RDONLY)
        os.dup2(read_only, self.fd)
        os.close(read_only)
        self._kernel_end.shutdown(socket.SHUT_RDWR)  # the drain ends: nothing more comes through

    @property
    def written(self) -> list[bytes]:
        """Every packet written to the device so far, in order (virtio headers stripped)."""
        with self._lock:
            return list(self._written)

    def _drain_written(self) -> None:
        """Takes every write as the kernel would, at once (so the device never runs out of room)."""
        header_len = VNET_HDR_LEN if self.vnet_header else 0
        while True:
            try:
                message = self._kernel_end.recv(1 << 17)
            except OSError:
                return
            if not message:  # our end was closed
                return
            with self._lock:
                self.written_headers.append(message[:header_len])
                self._written.append(message[header_len:])

    # --- recorded for tests ---------------------------------------------------------------------------------

    def start_reading(self, reader: TunReader, **kwargs: Any) -> None:
        self.events.append("start_reading")
        super().start_reading(reader, **kwargs)

    def stop_reading(self) -> None:
        if self._reading:
            self.events.append("stop_reading")
        super().stop_reading()

    def close(self) -> None:
        if not self.closed:
            self.events.append("close")
        super().close()
        self._drain.join(timeout=5)  # a hang guard: the drain ends at our end's close
        self._kernel_end.close()
