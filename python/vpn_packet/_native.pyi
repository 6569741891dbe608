"""Type stubs of the native module `vpn_packet._native` (hand-written; checked by mypy.stubtest)."""

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar, final

from typing_extensions import Buffer

from vpn_packet.errors import PacketError

__all__ = [
    "__version__",
    "PacketInfo",
    "extract_ip_and_ports",
    "destination_key",
    "destination_key_and_ip",
    "extract_batch",
    "extract_batch_from_buffer",
    "group_by_destination",
]

__version__: str

_P = TypeVar("_P", bound=Buffer)

@final
class PacketInfo:
    """Addresses, ports and protocol of an IP packet. Frozen, hashable, equal by value, picklable."""

    def __new__(
        cls,
        version: int,
        src_ip: str | bytes | IPv4Address | IPv6Address,
        dst_ip: str | bytes | IPv4Address | IPv6Address,
        src_port: int | None,
        dst_port: int | None,
        protocol: int,
    ) -> PacketInfo: ...
    @property
    def version(self) -> int: ...
    @property
    def src_ip(self) -> IPv4Address | IPv6Address: ...
    @property
    def dst_ip(self) -> IPv4Address | IPv6Address: ...
    @property
    def src_port(self) -> int | None: ...
    @property
    def dst_port(self) -> int | None: ...
    @property
    def protocol(self) -> int: ...
    @property
    def destination_key(self) -> str: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[Any, ...]: ...

def extract_ip_and_ports(packet: Buffer) -> PacketInfo: ...
def destination_key(packet: Buffer) -> str: ...
def destination_key_and_ip(packet: Buffer) -> tuple[str, str]: ...
def extract_batch(packets: Iterable[Buffer]) -> list[PacketInfo | PacketError]: ...
def extract_batch_from_buffer(buffer: Buffer, lengths: Sequence[int]) -> list[PacketInfo | PacketError]: ...
def group_by_destination(
    packets: Iterable[_P],
) -> tuple[list[tuple[str, str, list[_P]]], list[tuple[int, PacketError]]]: ...
