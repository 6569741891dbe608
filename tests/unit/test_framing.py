"""Framing: native encode/decode round trips, every chunking, bad lengths (the handshake before the frames
is tested in test_handshake_codec)."""

from __future__ import annotations

import itertools
import pickle
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vpn_packet.errors import FramingError, VpnPacketError
from vpn_packet.transport.framing import KEEPALIVE_FRAME, FrameDecoder, encode_frames

packets_st = st.lists(st.binary(min_size=1, max_size=300), max_size=40)


def reference_encode(packets: list[bytes]) -> bytes:
    return b"".join(struct.pack("!I", len(p)) + p for p in packets)


def test_encode_matches_struct_and_takes_any_buffer() -> None:
    packets = [b"a", b"hello", bytes(1400)]
    assert encode_frames(packets) == reference_encode(packets)
    assert encode_frames([bytearray(b"xy"), memoryview(b"z")]) == reference_encode([b"xy", b"z"])
    assert encode_frames(iter([b"q"])) == reference_encode([b"q"])
    assert encode_frames([]) == b""


def test_encode_refuses_what_a_receiver_would() -> None:
    with pytest.raises(FramingError) as info:
        encode_frames([b"ok", b""])
    assert info.value.reason == "zero_length"
    with pytest.raises(FramingError) as info:
        encode_frames([bytes(11)], max_frame_size=10)
    assert (info.value.reason, info.value.length) == ("too_large", 11)
    assert encode_frames([bytes(10)], max_frame_size=10) == reference_encode([bytes(10)])
    with pytest.raises(TypeError):
        encode_frames([1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="max_frame_size"):
        encode_frames([b"x"], max_frame_size=0)


def test_decoder_splits_across_reads() -> None:
    wire = encode_frames([b"abc", b"de", b"f"])
    decoder = FrameDecoder()
    assert decoder.feed(wire[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(wire[2:9]) == [b"abc"]
    assert decoder.feed(memoryview(wire)[9:]) == [b"de", b"f"]
    assert (decoder.buffered, decoder.frames, decoder.payload_bytes, decoder.at_boundary) == (0, 3, 6, True)
    assert decoder.error is None
    assert "frames=3" in repr(decoder)


def test_a_zero_length_prefix_is_a_keepalive() -> None:
    """Wire version 3: a length of 0 keeps an idle connection alive; it is neither a frame nor an error."""
    wire = KEEPALIVE_FRAME + encode_frames([b"ok"]) + KEEPALIVE_FRAME[:1]
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [b"ok"]
    assert decoder.feed(KEEPALIVE_FRAME[1:] + encode_frames([b"x"])) == [b"x"]
    assert (decoder.frames, decoder.keepalives, decoder.at_boundary) == (2, 2, True)


@pytest.mark.parametrize(
    ("prefix", "reason", "length"),
    [
        (b"\x80\0\0\x03", "short_offload", 3),  # bit 31: an offload frame, shorter than its header
        (b"\x7f\xff\xff\xff", "too_large", 0x7FFFFFFF),
        (b"\xff\xff\xff\xff", "too_large", 0x7FFFFFFF),  # an offload frame above 10 + 65535
    ],
)
def test_bad_length_fails_at_once_keeping_earlier_frames(prefix: bytes, reason: str, length: int) -> None:
    decoder = FrameDecoder()
    with pytest.raises(FramingError) as info:
        decoder.feed(encode_frames([b"ok"]) + prefix + b"junk")
    err = info.value
    assert isinstance(err, VpnPacketError)
    assert isinstance(err, ValueError)
    assert (err.reason, err.length, err.frames) == (reason, length, [b"ok"])
    assert not err.retriable
    # Nothing of the announced frame is buffered, and the decoder stays failed.
    assert decoder.buffered == 0
    assert decoder.error == reason
    assert not decoder.at_boundary
    with pytest.raises(FramingError):
        decoder.feed(b"")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.reason, again.length, str(again)) == (FramingError, reason, length, str(err))


def test_configured_maximum() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    assert decoder.max_frame_size == 10
    assert decoder.feed(encode_frames([bytes(10)], max_frame_size=10)) == [bytes(10)]
    with pytest.raises(FramingError, match="above the maximum frame size 10"):
        decoder.feed(struct.pack("!I", 11))
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=0)


def test_partial_frame_is_the_only_memory() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    wire = encode_frames([bytes(1000)], max_frame_size=1000)
    for i in range(len(wire) - 1):
        assert decoder.feed(wire[i : i + 1]) == []
        assert decoder.buffered == i + 1 <= 1004
    assert decoder.feed(wire[-1:]) == [bytes(1000)]
    assert decoder.buffered == 0


@given(packets_st, st.lists(st.integers(min_value=0), max_size=20))
def test_every_chunking_decodes_the_same(packets: list[bytes], cuts: list[int]) -> None:
    wire = encode_frames(packets)
    assert wire == reference_encode(packets)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = FrameDecoder(max_frame_size=300)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out.extend(decoder.feed(wire[a:b]))
        assert decoder.buffered <= 304
    assert out == packets
    assert decoder.at_boundary


@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_random_bytes_give_frames_or_a_framing_error(data: bytes, step: int) -> None:
    decoder = FrameDecoder(max_frame_size=500)
    reason = None
    for i in range(0, len(data), step):
        try:
            frames = decoder.feed(data[i : i + step])
        except FramingError as exc:
            reason = exc.reason
            break
        assert all(0 < len(f) <= 500 for f in frames)  # offload frames: none valid in 2000 random bytes
        assert decoder.buffered <= 4 + 10 + 65535  # one partial frame at most (an offload frame's bound)
    assert reason in {None, "short_offload", "too_large"}
    assert decoder.error == reason
