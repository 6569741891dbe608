"""Clients that misbehave, over real sockets, for the tests of the receiving side's handshake and limits.

Each speaks just enough of the wire protocol (`rust/core/src/handshake.rs`) to attempt one attack, and
reports what the receiver answered, so a test can assert both what the attacker saw and what the receiver
counted:

- `claim(address, peer_id, ...)`: TLS (or plaintext) with whatever key it has, then a hello claiming
  `peer_id`, optionally carrying another node's public key or a signature by the wrong key; then it writes
  frames anyway (`inject`), as an attacker would, and reads until the receiver closes.
- `blind_plaintext(address, peer_id, frames)`: never starts TLS; writes a hello and frames at once.
- `after_challenge(address, data, tls=...)`: reads the challenge, then sends `data` (a v1 hello, junk).
- `silent_socket(address, source=...)`: a TCP connection (bound to `source` first) that never sends a byte.
- `attacker_tls()`: a TLS client context that trusts anything and presents no certificate.
- `misconfigured(address, security, peer_id)`: a whole client on Python's `ssl` that dials with whatever
  certificate and id its `Security` has (the native sending side refuses, before dialling, a certificate
  that does not chain to its CA or does not name its id); raises `HandshakeRefusedError` when refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vpn_packet._native import (
    ANSWER_REASONS,
    CHALLENGE_LEN,
    MAX_ANSWER_LEN,
    encode_hello,
    hello_transcript,
    parse_answer,
    parse_challenge,
)
from vpn_packet.transport.framing import encode_frames
from vpn_packet.transport.handshake import Security, client_handshake, read_message, server_public_key

__all__ = [
    "Answer",
    "Attempt",
    "after_challenge",
    "attacker_tls",
    "blind_plaintext",
    "claim",
    "connect",
    "misconfigured",
    "read_until_closed",
    "silent_socket",
]

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Answer:
    """The receiver's answer to a hello: its reason name (`accepted`, `key_mismatch`, ...) and text."""

    reason: str
    text: str

    @property
    def accepted(self) -> bool:
        return self.reason == "accepted"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What an attacker saw: the answer (None when the receiver sent none) and the bytes after it."""

    answer: Answer | None
    trailing: bytes


def attacker_tls() -> ssl.SSLContext:
    """A TLS client context that checks nothing and presents no certificate (an attacker's)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect(
    address: Address, *, tls: ssl.SSLContext | None = None, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `address`, from `source` (an address to bind first) when given, TLS when `tls`."""
    return await asyncio.open_connection(
        address[0],
        address[1],
        ssl=tls,
        server_hostname="" if tls is not None else None,
        local_addr=(source, 0) if source is not None else None,
    )


async def read_until_closed(reader: asyncio.StreamReader, limit: int = 1 << 20) -> bytes:
    """Everything the other side sends until it closes (a reset or TLS error counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        while len(data) < limit:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    return data


async def _read_answer(reader: asyncio.StreamReader) -> Answer | None:
    try:
        (code, text), _ = await read_message(reader.readexactly, parse_answer, MAX_ANSWER_LEN)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return None
    reason = ANSWER_REASONS[code] if code < len(ANSWER_REASONS) else f"code_{code}"
    return Answer(reason, str(text))


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully (what was written is flushed first), whatever state the other side left it in."""
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def claim(
    address: Address,
    peer_id: str,
    *,
    tls: ssl.SSLContext | None = None,
    public_key: bytes | None = None,
    sign: Callable[[bytes], bytes] | None = None,
    inject: Sequence[bytes] = (),
    epoch: int = 1,
) -> Attempt:
    """Connect (TLS when `tls`), read the challenge, send a hello claiming `peer_id` with `public_key` (any
    key: its own, or another node's) signed by `sign` (any signer) over the transcript a real client signs,
    read the answer, then write `inject` as frames whatever the answer was, and read until closed."""
    reader, writer = await connect(address, tls=tls)
    try:
        nonce, _ = await read_message(reader.readexactly, parse_challenge, CHALLENGE_LEN)
        signature = None
        if public_key is not None and sign is not None:
            server_key = server_public_key(writer.get_extra_info("ssl_object")) or bytes(32)
            signature = sign(hello_transcript(nonce, server_key, peer_id, epoch, public_key))
        writer.write(encode_hello(peer_id, epoch, public_key, signature))
        answer = await _read_answer(reader)
        if inject:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                writer.write(encode_frames(list(inject)))
                await writer.drain()
        trailing = b"" if answer is not None and answer.accepted else await read_until_closed(reader)
        return Attempt(answer, trailing)
    finally:
        await _close(writer)


async def misconfigured(address: Address, security: Security, peer_id: str) -> str:
    """TLS with `security`'s Python context (CA mode: the server must be `peer_id`), then the whole client
    handshake claiming `security.local_id`. Returns the server's id when accepted; raises
    `HandshakeRefusedError` with the receiver's reason when refused."""
    assert security.client_context is not None
    reader, writer = await asyncio.open_connection(
        address[0], address[1], ssl=security.client_context, server_hostname=peer_id
    )
    try:
        return await client_handshake(security, peer_id, reader.readexactly, writer.write, None, 1)
    finally:
        await _close(writer)


async def blind_plaintext(address: Address, peer_id: str, inject: Sequence[bytes] = ()) -> bytes:
    """Never starts TLS: writes a v2 hello claiming `peer_id` and frames at once, then reads until the
    receiver closes; returns what it sent back."""
    reader, writer = await connect(address)
    try:
        writer.write(encode_hello(peer_id, 1) + (encode_frames(list(inject)) if inject else b""))
        return await read_until_closed(reader)
    finally:
        await _close(writer)


async def after_challenge(address: Address, data: bytes, *, tls: ssl.SSLContext | None = None) -> Attempt:
    """Reads the challenge, sends `data` instead of a hello, and returns the answer (if any) and the rest."""
    reader, writer = await connect(address, tls=tls)
    try:
        await read_message(reader.readexactly, parse_challenge, CHALLENGE_LEN)
        writer.write(data)
        answer = await _read_answer(reader)
        return Attempt(answer, await read_until_closed(reader))
    finally:
        await _close(writer)


async def silent_socket(address: Address, *, source: str | None = None) -> socket.socket:
    """A TCP connection to `address` (bound to `source` first) that never sends a byte; the caller closes
    it."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
