"""Tests of replicad.frames: layout, round trips under any chunking, and every
corruption, truncation and limit path of the decoder."""

from __future__ import annotations

import itertools
import random
import struct
from typing import Any

import msgpack
import pytest
import snappy
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.errors import (
    ConfigError,
    FrameChecksumError,
    FrameError,
    FrameFormatError,
    FrameTooLargeError,
    FrameTruncatedError,
)
from replicad.frames import (
    FLAG_SNAPPY,
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    decode_body,
    encode_frame,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = (
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
BODIES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=8) | INT64, children, max_size=6)
    ),
    max_leaves=25,
)
FRAMES = st.lists(
    st.tuples(st.integers(0, 255), BODIES, st.sampled_from([None, True, False])),
    min_size=1,
    max_size=5,
)


def frame_with(
    payload: bytes, *, flags: int = 0, kind: int = 1, length: int | None = None
) -> bytes:
    """A frame with a correct checksum around an arbitrary payload."""
    n = len(payload) if length is None else length
    prefix = struct.pack(">2sBBI", b"RF", flags, kind, n)
    check = xxhash.xxh3_64(prefix + payload).digest()
    return prefix + check + payload


def decode_all(chunks: list[bytes], **kw: Any) -> list[Frame]:
    decoder = FrameDecoder(**kw)
    out: list[Frame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        out.extend(decoder.frames())
    decoder.close()
    return out


def outcome(data: bytes, **kw: Any) -> tuple[list[Frame], FrameError | None]:
    """Frames handed out and the error raised, feeding byte by byte then closing."""
    decoder = FrameDecoder(**kw)
    got: list[Frame] = []
    try:
        for i in range(len(data)):
            decoder.receive_data(data[i : i + 1])
            got.extend(decoder.frames())
        decoder.close()
    except FrameError as exc:
        return got, exc
    return got, None


# --- layout -----------------------------------------------------------------


def test_layout_is_as_documented() -> None:
    body = ["dataset", 7, b"\x00\x01"]
    data = encode_frame(42, body, compress=False)
    payload = msgpack.packb(body, use_bin_type=True)
    assert data[0:2] == b"RF"
    assert data[2] == 0
    assert data[3] == 42
    assert struct.unpack(">I", data[4:8])[0] == len(payload)
    assert data[8:16] == xxhash.xxh3_64_intdigest(data[0:8] + payload).to_bytes(8, "big")
    assert data[HEADER_BYTES:] == payload


def test_compressed_payload_is_raw_snappy() -> None:
    body = ["x" * 1000]
    data = encode_frame(1, body)
    assert data[2] == FLAG_SNAPPY
    assert msgpack.unpackb(snappy.uncompress(data[HEADER_BYTES:])) == body


def test_compress_when_it_pays() -> None:
    assert encode_frame(1, "a" * 100)[2] == 0  # below 256 bytes
    assert encode_frame(1, "a" * 300)[2] == FLAG_SNAPPY
    noise = random.Random(1).randbytes(2000)
    assert encode_frame(1, noise)[2] == 0  # does not save 10%
    assert encode_frame(1, noise, compress=True)[2] == FLAG_SNAPPY
    assert encode_frame(1, "a" * 300, compress=False)[2] == 0
    assert encode_frame(1, "a", compress=True)[2] == FLAG_SNAPPY


# --- round trips ------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(FRAMES, st.data())
def test_same_frames_from_any_chunking(
    frames: list[tuple[int, Any, bool | None]], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(k, b, compress=c) for k, b, c in frames)
    expected = [Frame(k, b) for k, b, _ in frames]
    assert decode_all([stream]) == expected
    assert decode_all([stream[i : i + 1] for i in range(len(stream))]) == expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode_all(chunks) == expected


def test_many_frames_through_a_compacting_buffer() -> None:
    rng = random.Random(7)
    bodies = [[i, rng.randbytes(rng.randrange(0, 600))] for i in range(1000)]
    stream = b"".join(encode_frame(i % 256, b) for i, b in enumerate(bodies))
    assert len(stream) > 3 * 64 * 1024
    chunks = [stream[i : i + 997] for i in range(0, len(stream), 997)]
    assert [f.body for f in decode_all(chunks)] == bodies


def test_buffered_counts_unconsumed_bytes() -> None:
    one = encode_frame(1, [1, 2, 3])
    decoder = FrameDecoder()
    decoder.receive_data(one + one[:5])
    assert decoder.buffered == len(one) + 5
    assert decoder.next_frame() == Frame(1, [1, 2, 3])
    assert decoder.buffered == 5
    assert decoder.next_frame() is None
    decoder.receive_data(one[5:])
    assert decoder.next_frame() == Frame(1, [1, 2, 3])
    assert decoder.buffered == 0
    decoder.close()
    decoder.close()  # a closed decoder on a frame boundary stays usable


# --- corruption and truncation ----------------------------------------------

SAMPLES = [
    encode_frame(0, None),
    encode_frame(7, ["dataset", 12, b"k" * 30, {"a": 1, 2: [True, 1.5]}], compress=False),
    encode_frame(200, ["v" * 400, list(range(50))], compress=True),
    encode_frame(255, [b"\x00" * 700, "z" * 100]),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=["tiny", "plain", "snappy", "auto"])
def test_every_single_byte_corruption_is_rejected(frame: bytes) -> None:
    rng = random.Random(frame)
    for pos in range(len(frame)):
        for _ in range(2):
            bad = bytearray(frame)
            bad[pos] ^= rng.randrange(1, 256)
            got, err = outcome(bytes(bad))
            assert got == [], (pos, got)
            assert err is not None, pos


def test_corruption_in_a_later_frame_keeps_earlier_frames() -> None:
    first, second = SAMPLES[1], SAMPLES[2]
    rng = random.Random(3)
    for pos in range(len(second)):
        bad = bytearray(second)
        bad[pos] ^= rng.randrange(1, 256)
        got, err = outcome(first + bytes(bad))
        assert got == [Frame(7, ["dataset", 12, b"k" * 30, {"a": 1, 2: [True, 1.5]}])]
        assert err is not None


@pytest.mark.parametrize("frame", SAMPLES, ids=["tiny", "plain", "snappy", "auto"])
def test_every_truncation_waits_then_fails_on_close(frame: bytes) -> None:
    for cut in range(1, len(frame)):
        decoder = FrameDecoder()
        decoder.receive_data(frame[:cut])
        assert decoder.next_frame() is None
        assert list(decoder.frames()) == []
        with pytest.raises(FrameTruncatedError):
            decoder.close()


def test_unread_complete_frame_at_close_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLES[0])
    with pytest.raises(FrameTruncatedError):
        decoder.close()


# --- header errors ----------------------------------------------------------


def test_declared_length_above_limit_is_rejected_from_the_header() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">2sBBI", b"RF", 0, 1, MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()


def test_custom_limit_applies_to_payload() -> None:
    data = encode_frame(1, b"x" * 200, compress=False)
    with pytest.raises(FrameTooLargeError):
        decode_all([data], max_frame_bytes=100)
    assert decode_all([data], max_frame_bytes=len(data) - HEADER_BYTES) == [Frame(1, b"x" * 200)]


def test_decompressed_size_above_limit_is_rejected() -> None:
    data = encode_frame(1, b"\x00" * 10_000, compress=True)
    assert len(data) - HEADER_BYTES < 1000
    with pytest.raises(FrameFormatError, match="decompresses"):
        decode_all([data], max_frame_bytes=1000)


@pytest.mark.parametrize("pos", [0, 1])
def test_bad_magic(pos: int) -> None:
    data = bytearray(SAMPLES[1])
    data[pos] = ord("X")
    decoder = FrameDecoder()
    decoder.receive_data(bytes(data[: pos + 1]))  # rejected as soon as the byte arrives
    with pytest.raises(FrameFormatError, match="magic"):
        decoder.next_frame()


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFF])
def test_unknown_flags(flags: int) -> None:
    with pytest.raises(FrameFormatError, match="flags"):
        decode_all([frame_with(msgpack.packb(1), flags=flags)])
    with pytest.raises(FrameFormatError, match="flags"):
        decode_body(msgpack.packb(1), flags)


def test_checksum_mismatch() -> None:
    data = bytearray(SAMPLES[1])
    data[-1] ^= 1
    with pytest.raises(FrameChecksumError):
        decode_all([bytes(data)])


# --- payload errors (valid checksum, bad contents) ----------------------------

BAD_PAYLOADS = {
    "not msgpack": (b"\xc1", 0),
    "trailing bytes": (b"\x01\x02", 0),
    "incomplete msgpack": (b"\x92\x01", 0),
    "empty payload": (b"", 0),
    "ext type": (msgpack.packb(msgpack.ExtType(5, b"abc")), 0),
    "timestamp": (msgpack.packb(msgpack.Timestamp(1, 2)), 0),
    "huge array header": (b"\xdd\xff\xff\xff\xff", 0),
    "huge str header": (b"\xdb\xff\xff\xff\xff", 0),
    "unhashable map key": (b"\x81\x91\x01\x02", 0),
    "bad utf-8": (b"\xa2\xff\xfe", 0),
    "bad snappy": (b"\x05\xff\xff\xff\xff\xff", FLAG_SNAPPY),
    "snappy length varint too long": (b"\xff\xff\xff\xff\xff\x01", FLAG_SNAPPY),
    "snappy length above 32 bits": (b"\xff\xff\xff\xff\x7f", FLAG_SNAPPY),
    "empty snappy": (b"", FLAG_SNAPPY),
    "snappy claiming an impossible ratio": (b"\x80\x80\x40" + b"\x00" * 10, FLAG_SNAPPY),
    "snappy of garbage msgpack": (snappy.compress(b"\xc1" * 300), FLAG_SNAPPY),
}


@pytest.mark.parametrize("name", sorted(BAD_PAYLOADS))
def test_bad_payload_with_valid_checksum(name: str) -> None:
    payload, flags = BAD_PAYLOADS[name]
    with pytest.raises(FrameFormatError):
        decode_all([frame_with(payload, flags=flags)])


def test_int_and_str_map_keys_decode() -> None:
    body = {1: "a", "b": 2, -5: [None]}
    assert decode_all([encode_frame(9, body)]) == [Frame(9, body)]


# --- poisoning --------------------------------------------------------------

POISONS: list[tuple[bytes, type[FrameError], dict[str, int]]] = [
    (b"XX", FrameFormatError, {}),
    (frame_with(b"\x01", flags=0x04), FrameFormatError, {}),
    (frame_with(b"\xc1"), FrameFormatError, {}),
    (SAMPLES[1][:-1] + bytes([SAMPLES[1][-1] ^ 1]), FrameChecksumError, {}),
    (SAMPLES[1], FrameTooLargeError, {"max_frame_bytes": 10}),
]


@pytest.mark.parametrize(("data", "cls", "kw"), POISONS)
def test_decoder_is_poisoned_after_an_error(
    data: bytes, cls: type[FrameError], kw: dict[str, int]
) -> None:
    decoder = FrameDecoder(**kw)
    decoder.receive_data(data)
    with pytest.raises(cls):
        decoder.next_frame()
    with pytest.raises(cls):
        decoder.next_frame()
    with pytest.raises(cls):
        decoder.receive_data(SAMPLES[0])
    with pytest.raises(cls):
        list(decoder.frames())
    with pytest.raises(cls):
        decoder.close()


def test_decoder_is_poisoned_after_truncation() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(SAMPLES[0][:3])
    with pytest.raises(FrameTruncatedError):
        decoder.close()
    with pytest.raises(FrameTruncatedError):
        decoder.receive_data(SAMPLES[0][3:])
    with pytest.raises(FrameTruncatedError):
        decoder.next_frame()


# --- encoder errors ---------------------------------------------------------


@pytest.mark.parametrize("kind", [-1, 256, "1", True, 1.0])
def test_encode_rejects_bad_kind(kind: Any) -> None:
    with pytest.raises(FrameFormatError):
        encode_frame(kind, None)


@pytest.mark.parametrize("body", [object(), {1, 2}, 2**64, [b"x", object()]])
def test_encode_rejects_unpackable_body(body: Any) -> None:
    with pytest.raises(FrameFormatError):
        encode_frame(1, body)


def test_encode_rejects_bodies_above_the_limit() -> None:
    with pytest.raises(FrameTooLargeError):
        encode_frame(1, b"a" * 1000, max_bytes=500)  # the packed body, compressible or not
    noise = random.Random(2).randbytes(1000)
    raw = len(msgpack.packb(noise))
    with pytest.raises(FrameTooLargeError):
        encode_frame(1, noise, compress=True, max_bytes=raw)  # snappy grows noise
    assert encode_frame(1, noise, max_bytes=raw)[2] == 0


def test_decoder_rejects_bad_limit() -> None:
    with pytest.raises(ConfigError):
        FrameDecoder(max_frame_bytes=0)
