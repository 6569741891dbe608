"""The v3 handshake messages (challenge, hello, answer) through the native codec: round trips, incremental
parsing one byte at a time, every error with its `reason`, and what the hello's signature covers.

The wire format is drawn once, in rust/core/src/handshake.rs; these tests hold the Python binding to it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet._native import (
    ANSWER_REASONS,
    CHALLENGE_LEN,
    MAX_ANSWER_LEN,
    MAX_HELLO_LEN,
    MAX_PEER_ID_LEN,
    NONCE_LEN,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    encode_answer,
    encode_challenge,
    encode_hello,
    hello_transcript,
    parse_answer,
    parse_challenge,
    parse_hello,
)
from vpn_packet.errors import FramingError, VpnPacketError

NONCE = bytes(range(NONCE_LEN))
KEY = bytes(range(100, 100 + PUBLIC_KEY_LEN))
SIGNATURE = bytes(range(SIGNATURE_LEN))
HEADER = PROTOCOL_MAGIC + bytes([PROTOCOL_VERSION])

Parser = Callable[[Any], tuple[Any, int]]


def test_constants() -> None:
    assert (PROTOCOL_MAGIC, PROTOCOL_VERSION) == (b"VPNP", 3)
    assert (NONCE_LEN, CHALLENGE_LEN) == (32, 6 + 32)
    assert (PUBLIC_KEY_LEN, SIGNATURE_LEN, MAX_PEER_ID_LEN) == (32, 64, 255)
    assert MAX_HELLO_LEN == 6 + 8 + 1 + 255 + 1 + 32 + 1 + 64
    assert MAX_ANSWER_LEN == 6 + 2 + 255
    assert ANSWER_REASONS[0] == "accepted"
    assert len(set(ANSWER_REASONS)) == len(ANSWER_REASONS)
    for reason in ("unknown_peer", "key_mismatch", "unsupported_version", "too_many_connections"):
        assert reason in ANSWER_REASONS


def test_challenge_round_trip() -> None:
    wire = encode_challenge(NONCE)
    assert wire == HEADER + b"C" + NONCE
    assert len(wire) == CHALLENGE_LEN
    assert parse_challenge(wire) == (NONCE, CHALLENGE_LEN)
    assert parse_challenge(bytearray(wire) + b"next") == (NONCE, CHALLENGE_LEN)  # stops at its end
    with pytest.raises(ValueError, match="32 bytes"):
        encode_challenge(NONCE[:-1])


@pytest.mark.parametrize(
    ("peer_id", "epoch", "key", "signature"),
    [
        ("node-a", 0x0102030405060708, KEY, SIGNATURE),  # key mode
        ("n", 0, None, None),  # CA or insecure: no key, no signature
        ("é" * 127, 2**64 - 1, None, None),  # UTF-8, the largest epoch
        ("x" * MAX_PEER_ID_LEN, 1, KEY, SIGNATURE),  # the longest hello
    ],
)
def test_hello_round_trip(peer_id: str, epoch: int, key: bytes | None, signature: bytes | None) -> None:
    wire = encode_hello(peer_id, epoch, key, signature)
    encoded_id = peer_id.encode()
    assert wire[:6] == HEADER + b"H"
    assert wire[6:14] == epoch.to_bytes(8, "big")
    assert wire[14] == len(encoded_id)
    assert len(wire) == 6 + 8 + 1 + len(encoded_id) + 1 + len(key or b"") + 1 + len(signature or b"")
    assert len(wire) <= MAX_HELLO_LEN
    assert parse_hello(wire + b"\x00\x00\x00\x05frame") == ((peer_id, epoch, key, signature), len(wire))
    assert parse_hello(memoryview(wire)) == ((peer_id, epoch, key, signature), len(wire))


def test_longest_hello_is_max_hello_len() -> None:
    assert len(encode_hello("x" * MAX_PEER_ID_LEN, 0, KEY, SIGNATURE)) == MAX_HELLO_LEN


@pytest.mark.parametrize("code", range(len(ANSWER_REASONS)))
def test_answer_round_trip_of_every_code(code: int) -> None:
    wire = encode_answer(code, f"because {ANSWER_REASONS[code]}")
    assert wire[:6] == HEADER + b"A"
    assert parse_answer(wire + b"more") == ((code, f"because {ANSWER_REASONS[code]}"), len(wire))


def test_answer_text_is_cut_at_255_bytes_on_a_character_boundary() -> None:
    parsed, consumed = parse_answer(encode_answer(0, "é" * 200))  # 400 bytes of UTF-8
    assert parsed == (0, "é" * 127)  # 254 bytes: the 128th "é" would split at 255
    assert consumed <= MAX_ANSWER_LEN
    assert parse_answer(encode_answer(1, "x" * 300))[0] == (1, "x" * 255)
    assert parse_answer(encode_answer(2, ""))[0] == (2, "")
    with pytest.raises(OverflowError):
        encode_answer(256, "a code is one byte")


def _messages() -> list[tuple[str, bytes, Parser, object]]:
    return [
        ("challenge", encode_challenge(NONCE), parse_challenge, NONCE),
        ("hello-key", encode_hello("node-a", 7, KEY, SIGNATURE), parse_hello, ("node-a", 7, KEY, SIGNATURE)),
        ("hello-plain", encode_hello("node-b", 8), parse_hello, ("node-b", 8, None, None)),
        ("answer", encode_answer(2, "not your key"), parse_answer, (2, "not your key")),
    ]


@pytest.mark.parametrize(
    ("wire", "parse", "message"), [m[1:] for m in _messages()], ids=[m[0] for m in _messages()]
)
def test_every_prefix_asks_for_more_without_overshooting(wire: bytes, parse: Parser, message: object) -> None:
    """Byte by byte: each proper prefix is a valid beginning, and the bytes it asks for never go past the
    end of the message, so a reader that reads exactly `needed` never takes a byte of what follows."""
    for cut in range(len(wire)):
        parsed, needed = parse(wire[:cut])
        assert parsed is None, cut
        assert 1 <= needed <= len(wire) - cut, cut
    assert parse(wire) == (message, len(wire))


@pytest.mark.parametrize(
    ("wire", "parse", "message"), [m[1:] for m in _messages()], ids=[m[0] for m in _messages()]
)
def test_reading_what_the_parser_asks_stops_exactly_at_the_message(
    wire: bytes, parse: Parser, message: object
) -> None:
    """What `handshake.read_message` does: read `needed` bytes at a time, parse again."""
    stream = wire + encode_frames_marker()
    data = b""
    reads = 0
    while True:
        parsed, count = parse(data)
        if parsed is not None:
            break
        data += stream[len(data) : len(data) + count]
        reads += 1
    assert (parsed, count) == (message, len(wire))
    assert data == wire  # nothing of the next message was read
    # Header, epoch, then a length byte and its field per field: a few reads per message, not one per byte.
    assert reads <= 8


def encode_frames_marker() -> bytes:
    """Bytes that follow a handshake message on the wire (a frame), which a parser must not consume."""
    return b"\x00\x00\x00\x03abc"


@pytest.mark.parametrize(
    ("parse", "data", "reason"),
    [
        (parse_hello, b"GET / HTTP/1.1\r\n", "bad_magic"),
        (parse_hello, b"V\x00", "bad_magic"),
        (parse_challenge, b"SSH-2.0-OpenSSH", "bad_magic"),
        (parse_hello, b"\x16\x03\x01\x02\x00\x01", "tls_expected_plaintext"),  # a TLS ClientHello record
        (parse_challenge, b"\x16\x03\x03\x00\x7a", "tls_expected_plaintext"),  # a TLS ServerHello record
        (parse_answer, b"\x16\x03", "tls_expected_plaintext"),
        (parse_hello, b"VPNP\x01\x06node-a", "unsupported_version"),  # a v1 hello
        (parse_challenge, b"VPNP\x04C", "unsupported_version"),  # a future version
        (parse_hello, encode_challenge(NONCE), "unexpected_message"),
        (parse_challenge, encode_hello("node-a", 1), "unexpected_message"),
        (parse_answer, encode_hello("node-a", 1), "unexpected_message"),
        (parse_hello, HEADER + b"H" + bytes(8) + b"\x01a" + b"\x05" + bytes(5) + b"\x00", "bad_field_length"),
        (
            parse_hello,
            HEADER + b"H" + bytes(8) + b"\x01a" + b"\x00" + b"\x10" + bytes(16),
            "bad_field_length",
        ),
        (parse_hello, HEADER + b"H" + bytes(8) + b"\x00", "empty_peer_id"),
        (parse_hello, HEADER + b"H" + bytes(8) + b"\x02\xff\xfe", "invalid_utf8"),
        (parse_answer, HEADER + b"A\x00\x02\xff\xfe", "invalid_utf8"),
    ],
)
def test_parse_errors_name_their_reason(parse: Parser, data: bytes, reason: str) -> None:
    with pytest.raises(FramingError) as info:
        parse(data)
    err = info.value
    assert err.reason == reason
    assert isinstance(err, VpnPacketError)
    assert not err.retriable
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.reason, str(copy)) == (FramingError, reason, str(err))


def test_errors_are_found_as_soon_as_the_bytes_show_them() -> None:
    """A wrong first byte is refused at once, without waiting for a whole header."""
    with pytest.raises(FramingError, match="VPNP") as info:
        parse_hello(b"X")
    assert info.value.reason == "bad_magic"
    with pytest.raises(FramingError) as info:
        parse_hello(b"VPNP\x01")  # the version byte is enough
    assert info.value.reason == "unsupported_version"
    assert "version 1" in str(info.value)


@pytest.mark.parametrize(
    ("peer_id", "key", "signature", "reason"),
    [
        ("", None, None, "empty_peer_id"),
        ("x" * (MAX_PEER_ID_LEN + 1), None, None, "peer_id_too_long"),
        ("é" * 128, None, None, "peer_id_too_long"),  # 256 bytes of UTF-8
        ("node-a", KEY[:31], SIGNATURE, "bad_field_length"),
        ("node-a", KEY, SIGNATURE + b"!", "bad_field_length"),
    ],
)
def test_encode_hello_refuses_what_a_parser_would(
    peer_id: str, key: bytes | None, signature: bytes | None, reason: str
) -> None:
    with pytest.raises(FramingError) as info:
        encode_hello(peer_id, 1, key, signature)
    assert info.value.reason == reason


def test_hello_transcript_covers_every_field() -> None:
    base = (NONCE, KEY, "node-a", 42, bytes(32))
    transcript = hello_transcript(*base)
    assert hello_transcript(*base) == transcript  # deterministic
    assert NONCE in transcript
    assert KEY in transcript
    changed = [
        (bytes(NONCE_LEN), KEY, "node-a", 42, bytes(32)),  # another connection's nonce
        (NONCE, bytes(reversed(KEY)), "node-a", 42, bytes(32)),  # another server
        (NONCE, KEY, "node-b", 42, bytes(32)),  # another claimed id
        (NONCE, KEY, "node-a", 43, bytes(32)),  # another epoch
        (NONCE, KEY, "node-a", 42, b"\x01" + bytes(31)),  # another client key
        (NONCE, KEY, "node-a2", 42, bytes(32)[1:] + b"\x00"),
    ]
    transcripts = {hello_transcript(*fields) for fields in changed}
    assert transcript not in transcripts
    assert len(transcripts) == len(changed)
    with pytest.raises(ValueError, match="32 bytes"):
        hello_transcript(NONCE[:-1], KEY, "node-a", 42, bytes(32))
    with pytest.raises(FramingError) as info:
        hello_transcript(NONCE, KEY, "", 42, bytes(32))
    assert info.value.reason == "empty_peer_id"


def test_transcript_ids_cannot_run_into_each_other() -> None:
    """The id is length-prefixed, so moving bytes between the id and what follows changes the transcript."""
    assert hello_transcript(NONCE, KEY, "ab", 1, KEY) != hello_transcript(NONCE, KEY, "a", 1, KEY)


@given(
    st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= MAX_PEER_ID_LEN),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.booleans(),
    st.binary(max_size=80),
    st.integers(min_value=0, max_value=400),
)
def test_any_hello_parses_back_at_any_cut(
    peer_id: str, epoch: int, with_key: bool, tail: bytes, cut: int
) -> None:
    key, signature = (KEY, SIGNATURE) if with_key else (None, None)
    wire = encode_hello(peer_id, epoch, key, signature)
    cut = min(cut, len(wire))
    parsed, needed = parse_hello(wire[:cut])
    if cut < len(wire):
        assert parsed is None
        assert 1 <= needed <= len(wire) - cut
    assert parse_hello(wire + tail) == ((peer_id, epoch, key, signature), len(wire))


@given(st.binary(max_size=400))
def test_random_bytes_never_crash_a_parser(data: bytes) -> None:
    reasons = {
        "bad_magic",
        "tls_expected_plaintext",
        "unsupported_version",
        "unexpected_message",
        "bad_field_length",
        "empty_peer_id",
        "peer_id_too_long",
        "invalid_utf8",
    }
    for parse in (parse_challenge, parse_hello, parse_answer):
        reason: str | None = None
        try:
            parsed, count = parse(data)
        except FramingError as exc:
            reason = exc.reason
        if reason is not None:
            assert reason in reasons
            continue
        assert count >= 1
        if parsed is not None:
            assert count <= len(data)
