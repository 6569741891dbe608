"""Stream framing: the wire protocol between nodes, encoded and decoded natively.

A stream is one-way: the connecting side writes, the receiving side only reads (and may close).

    hello:  b"VPNP" | version (1 byte, = 1) | L (1 byte, 1..255) | L bytes: the sender's peer id (UTF-8)
    frame:  N (4 bytes, big-endian, 1..max_frame_size) | N bytes: one IP packet

The hello comes once, first; frames follow until the stream ends. A frame length of 0 or above the
receiver's `max_frame_size` (default 65535) is a protocol error: the stream cannot be resynchronised, so the
receiver counts it and closes the connection. A stream that ends inside a frame is counted as truncated.

- `encode_frames(packets, max_frame_size=65535) -> bytes`: a batch in one buffer; refuses (with
  `FramingError`) an empty packet or one larger than `max_frame_size`, which the receiver would refuse.
- `FrameDecoder(max_frame_size=65535)`: `feed(data) -> list[bytes]` splits a byte stream into packets across
  any read boundaries. It keeps at most one partial frame (`buffered <= max_frame_size + 4`) and checks a
  length prefix as soon as its 4 bytes arrive, before buffering any of the payload: a 4 GB length prefix is
  refused at once. On a bad prefix `feed` raises `FramingError` whose `frames` holds the packets that came
  before it in that chunk; the decoder then stays failed.
- `encode_hello(peer_id) -> bytes`, `parse_hello(data) -> (peer_id | None, consumed | needed)` and the
  asyncio helper `read_hello(reader, timeout)`.
"""

from __future__ import annotations

import asyncio
from typing import Final

from vpn_packet._native import FrameDecoder, encode_frames, encode_hello, parse_hello
from vpn_packet.errors import FramingError, HelloTimeoutError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HELLO_MAGIC",
    "HELLO_VERSION",
    "LENGTH_PREFIX_LEN",
    "MAX_HELLO_LEN",
    "FrameDecoder",
    "FramingError",
    "HelloTimeoutError",
    "encode_frames",
    "encode_hello",
    "parse_hello",
    "read_hello",
]

DEFAULT_MAX_FRAME_SIZE: Final = 65535
LENGTH_PREFIX_LEN: Final = 4
HELLO_MAGIC: Final = b"VPNP"
HELLO_VERSION: Final = 1
HELLO_HEADER_LEN: Final = 6
MAX_HELLO_LEN: Final = HELLO_HEADER_LEN + 255


async def read_hello(reader: asyncio.StreamReader, timeout: float | None) -> str:  # noqa: ASYNC109
    """Reads the hello at the start of a stream and returns the sender's peer id.

    Reads exactly the hello's bytes (frames after it stay in `reader`). Raises `FramingError` for bytes that
    are not a hello (reason `bad_magic`, `unsupported_version`, `empty_peer_id`, `invalid_peer_id`) or a
    stream that ends inside it (reason `hello_truncated`), and `HelloTimeoutError` (a `FramingError` and a
    `TimeoutError`) when it is not complete within `timeout` seconds (`None`: no limit).
    """
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            data = b""
            while True:
                peer_id, count = parse_hello(data)
                if peer_id is not None:
                    return peer_id
                try:
                    data += await reader.readexactly(count)
                except asyncio.IncompleteReadError as exc:
                    raise FramingError(
                        f"stream ended inside the hello after {len(data) + len(exc.partial)} bytes",
                        "hello_truncated",
                    ) from None
    except TimeoutError:
        if not deadline.expired():
            raise  # a socket timeout (ETIMEDOUT), not ours
        raise HelloTimeoutError(timeout if timeout is not None else 0.0) from None
