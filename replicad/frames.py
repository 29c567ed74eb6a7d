"""Wire frames: checksummed, length-prefixed msgpack bodies, Snappy where it pays.

Theory of operation
-------------------
Every message on the wire travels in one frame. The encoder packs the body with
msgpack, compresses it with raw Snappy when that pays, and prefixes a 16-byte
header; the decoder is a sans-IO state machine fed with bytes
(:meth:`FrameDecoder.receive_data`) that hands out complete frames
(:meth:`FrameDecoder.next_frame`). A frame is handed out only after its
checksum has been verified and its body fully decoded, so a corrupt or
truncated frame is never half-applied: the caller gets a :class:`Frame` or an
error, never a partial body.

Frame layout (all integers big-endian)::

    offset  size  field
    0       2     magic    b"RF"
    2       1     flags    bit 0: the payload is raw-Snappy compressed;
                           bits 1-7 must be 0
    3       1     kind     message kind, 0..255 (chosen by the caller)
    4       4     length   payload length in bytes, as sent (after compression)
    8       8     check    xxh3_64 of header bytes [0:8] followed by the payload
    16      length payload msgpack body, raw-Snappy compressed if flags bit 0

The payload, once decompressed, is exactly one msgpack object (packed with
``use_bin_type=True``: bytes stay bytes, str stays str). Compression is "raw"
Snappy (the block format, no framing/stream header): a varint of the
uncompressed length followed by the compressed block.

Limits: a frame's declared ``length`` and its decompressed body are each at
most ``max_frame_bytes`` (:data:`MAX_FRAME_BYTES`, 64 MiB, by default).

* The declared length is checked as soon as the 8 header bytes are buffered,
  before the body is waited for.
* The Snappy header's claimed uncompressed length is checked before
  decompressing, against the limit and against Snappy's maximum compression
  ratio (~21x), so a few bytes cannot make the decompressor allocate megabytes.
* msgpack decoding is bounded by the body's size: no string, bin, array or map
  may claim more items than the body has bytes, and every extension type
  (timestamps included) is rejected. Every decoded object takes at least one
  byte of the body, so a body of n bytes makes at most n Python objects (a few
  dozen bytes each): choose ``max_frame_bytes`` with that factor in mind.
* Map keys may be str or int (msgpack's ``strict_map_key`` is off so that int
  keys work; other hashable scalars pass too, the protocol layer checks
  shapes); an unhashable key is a format error.

Errors, all :class:`~replicad.errors.FrameError`:

* :class:`~replicad.errors.FrameFormatError` -- bad magic, unknown flag bits,
  undecodable Snappy or msgpack, extension types, trailing bytes after the
  msgpack object, a claimed decompressed size above the limit or above what
  Snappy can produce from the payload;
* :class:`~replicad.errors.FrameChecksumError` -- the checksum does not match;
* :class:`~replicad.errors.FrameTooLargeError` -- a declared length above the
  limit;
* :class:`~replicad.errors.FrameTruncatedError` -- :meth:`FrameDecoder.close`
  while bytes of an incomplete frame remain.

After an error the decoder is poisoned: every later call to
:meth:`~FrameDecoder.receive_data`, :meth:`~FrameDecoder.next_frame`,
:meth:`~FrameDecoder.frames` or :meth:`~FrameDecoder.close` raises the same
error class again (chained to the original). Frames handed out before the
error were valid; the request that produced the stream should be retried as a
whole with a new decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cramjam
import msgpack
import xxhash

from replicad.errors import (
    ConfigError,
    FrameChecksumError,
    FrameError,
    FrameFormatError,
    FrameTooLargeError,
    FrameTruncatedError,
)

__all__ = [
    "FLAG_SNAPPY",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_FRAME_BYTES",
    "Frame",
    "FrameDecoder",
    "decode_body",
    "encode_frame",
]

MAGIC = b"RF"
"""The first two bytes of every frame."""

FLAG_SNAPPY = 0x01
"""Flags bit 0: the payload is raw-Snappy compressed."""

HEADER_BYTES = 16
"""Bytes before the payload: magic, flags, kind, length, check."""

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Default limit on a frame's payload and on its decompressed body (64 MiB)."""

COMPRESS_MIN_BYTES = 256
"""With ``compress=None``, bodies shorter than this are sent uncompressed."""

_KNOWN_FLAGS = FLAG_SNAPPY
# Snappy's best case is a 3-byte copy tag producing 64 bytes (~21x): a payload
# claiming more than 32x its size is malformed, and is rejected before the
# decompressor allocates the claimed length.
_SNAPPY_MAX_RATIO = 32
# cramjam's raw Snappy is the block format; python-snappy 0.7's compress and
# uncompress are these same functions plus a bytes() copy of the result, which
# a multi-megabyte snapshot frame should not pay.
_compress_raw = cramjam.snappy.compress_raw
_decompress_raw = cramjam.snappy.decompress_raw

_PREFIX = struct.Struct(">2sBBI")  # magic, flags, kind, length: header bytes [0:8]
_COMPACT_BYTES = 64 * 1024  # drop consumed buffer bytes once this many pile up


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: the message ``kind`` and the msgpack-decoded ``body``."""

    kind: int
    body: Any


def _checksum(prefix: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_64(prefix)
    h.update(payload)
    return h.digest()  # big-endian, as the layout says


def encode_frame(
    kind: int,
    body: Any,
    *,
    compress: bool | None = None,
    max_bytes: int = MAX_FRAME_BYTES,
) -> bytes:
    """Encode ``body`` (any msgpack-able object) as one frame of ``kind``.

    ``compress``: True always compresses, False never, None (the default)
    compresses when it pays -- the packed body is at least 256 bytes and
    compression saves at least 10%. Raises :class:`FrameFormatError` if
    ``kind`` is not in 0..255 or the body cannot be packed with msgpack, and
    :class:`FrameTooLargeError` if the packed body or the payload is above
    ``max_bytes`` (a decoder with the same limit would reject it).
    """
    if type(kind) is not int or not 0 <= kind <= 255:
        raise FrameFormatError(f"frame kind must be an int in 0..255, got {kind!r}")
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameFormatError(f"body cannot be packed: {exc}") from exc
    if len(raw) > max_bytes:
        raise FrameTooLargeError(f"packed body is {len(raw)} bytes, limit {max_bytes}")
    payload = raw
    flags = 0
    if compress or (compress is None and len(raw) >= COMPRESS_MIN_BYTES):
        packed = _compress_raw(raw)  # a buffer; joined below without a copy
        if compress or len(packed) * 10 <= len(raw) * 9:
            payload = packed
            flags = FLAG_SNAPPY
    if len(payload) > max_bytes:
        raise FrameTooLargeError(f"payload is {len(payload)} bytes, limit {max_bytes}")
    prefix = _PREFIX.pack(MAGIC, flags, kind, len(payload))
    return b"".join((prefix, _checksum(prefix, payload), payload))


def _snappy_length(payload: bytes | memoryview) -> int:
    """The uncompressed length a raw-Snappy block claims (its varint header)."""
    result = 0
    for i in range(min(5, len(payload))):
        byte = payload[i]
        result |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if result > 0xFFFFFFFF:
                break
            return result
    raise FrameFormatError("malformed snappy length header")


def decode_body(
    payload: bytes | memoryview, flags: int, *, max_bytes: int = MAX_FRAME_BYTES
) -> Any:
    """Decompress (if ``flags`` says so) and unpack a checksum-verified payload.

    Raises :class:`FrameFormatError` for unknown flags, a claimed decompressed
    size above ``max_bytes``, undecodable Snappy, or anything but exactly one
    msgpack object without extension types.
    """
    if flags & ~_KNOWN_FLAGS:
        raise FrameFormatError(f"unknown frame flags 0x{flags:02x}")
    data: bytes | memoryview = payload
    if flags & FLAG_SNAPPY:
        claimed = _snappy_length(payload)
        if claimed > max_bytes:
            raise FrameFormatError(f"body decompresses to {claimed} bytes, limit {max_bytes}")
        if claimed > _SNAPPY_MAX_RATIO * len(payload):
            raise FrameFormatError(
                f"snappy payload of {len(payload)} bytes cannot decompress to {claimed}"
            )
        try:
            data = memoryview(_decompress_raw(payload))
        except (cramjam.DecompressionError, ValueError, TypeError) as exc:
            raise FrameFormatError(f"undecodable snappy payload: {exc}") from exc
        if len(data) != claimed:  # pragma: no cover - the decompressor checks this
            raise FrameFormatError("snappy payload length mismatch")
    n = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameFormatError(f"undecodable msgpack body: {exc}") from exc


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` objects; see the module docstring.

    Feed bytes with :meth:`receive_data`, then take frames with
    :meth:`next_frame` (or :meth:`frames`) until it returns None; call
    :meth:`close` at the end of input. Bytes are buffered in one ``bytearray``
    with a read offset, so feeding one byte at a time costs O(1) per byte.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        """``max_frame_bytes`` limits each frame's payload and decompressed body;
        raises :class:`ConfigError` if it is not an int >= 1."""
        if type(max_frame_bytes) is not int or max_frame_bytes < 1:
            raise ConfigError(f"max_frame_bytes must be an int >= 1, got {max_frame_bytes!r}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buf) - self._pos

    def _poisoned(self) -> None:
        err = self._error
        if err is not None:
            raise type(err)(f"decoder unusable after an earlier error: {err}") from err

    def _fail(self, err: FrameError) -> FrameError:
        self._error = err
        return err

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the buffer. Raises the poisoning error class if an
        earlier call failed (the data is then ignored)."""
        self._poisoned()
        if self._pos and self._pos >= _COMPACT_BYTES and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed.

        Raises a :class:`FrameError` (and poisons the decoder) if the buffered
        bytes cannot start or form a valid frame; frames returned earlier
        stay valid. Header errors (magic, flags, length) are raised as soon as
        the bytes carrying them arrive, before waiting for the body.
        """
        self._poisoned()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail == 0:
            return None
        # Validate the header as far as it has arrived.
        if buf[pos] != MAGIC[0] or (avail >= 2 and buf[pos + 1] != MAGIC[1]):
            raise self._fail(FrameFormatError("bad frame magic"))
        if avail < 3:
            return None
        flags = buf[pos + 2]
        if flags & ~_KNOWN_FLAGS:
            raise self._fail(FrameFormatError(f"unknown frame flags 0x{flags:02x}"))
        if avail < 8:
            return None
        _, _, kind, length = _PREFIX.unpack_from(buf, pos)
        if length > self.max_frame_bytes:
            raise self._fail(
                FrameTooLargeError(
                    f"frame declares {length} payload bytes, limit {self.max_frame_bytes}"
                )
            )
        end = pos + HEADER_BYTES + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            prefix = view[pos : pos + 8]
            check = view[pos + 8 : pos + HEADER_BYTES]
            payload = view[pos + HEADER_BYTES : end]
            try:
                if _checksum(prefix, payload) != check:
                    raise FrameChecksumError("frame checksum mismatch")
                body = decode_body(payload, flags, max_bytes=self.max_frame_bytes)
            except FrameError as exc:
                self._error = exc
                raise
            finally:
                prefix.release()
                check.release()
                payload.release()
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        return Frame(kind, body)

    def frames(self) -> Iterator[Frame]:
        """Yield every complete buffered frame (stops when more bytes are needed)."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def close(self) -> None:
        """Declare the end of input: every received byte must have been handed
        out as a frame. Raises :class:`FrameTruncatedError` (and poisons the
        decoder) if bytes remain -- an incomplete frame, or complete frames the
        caller has not taken with :meth:`next_frame` (take them first). Does
        nothing else; the decoder stays usable after a successful close."""
        self._poisoned()
        if self.buffered:
            raise self._fail(
                FrameTruncatedError(
                    f"input ended with {self.buffered} bytes not handed out as frames"
                )
            )
