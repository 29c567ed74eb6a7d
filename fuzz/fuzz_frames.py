"""Fuzz harness: wire frames (``replicad/frames.py``).

The first input byte picks how the rest is cut into reads (1 to 17 bytes
each, or all at once); the rest is the byte stream. Checks:

* the decoder accepts or raises :class:`~replicad.errors.FrameError`,
  nothing else, and stays poisoned after an error;
* it gives the same frames (or the same error class) whether the stream
  arrives whole or in pieces;
* every frame it accepts re-encodes to a frame that decodes to the same body;
* ``decode_body`` on the raw stream (both flag values) raises only
  FrameFormatError.

``python -m fuzz.fuzz_frames --random --inputs 1000000`` or, with atheris,
``python -m fuzz.fuzz_frames -atheris_runs=1000000``.
"""

from __future__ import annotations

import contextlib
import sys

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    import msgpack

    from replicad.errors import FrameError, FrameFormatError
    from replicad.frames import FLAG_SNAPPY, Frame, FrameDecoder, decode_body, encode_frame
    from replicad.merkle import Digest
    from replicad.messages import Cursor, DiffRequest, Hint, Message, SnapshotChunk, to_wire

LIMIT = 1 << 16


def _decode(stream: bytes, step: int) -> tuple[list[Frame], type[FrameError] | None]:
    decoder = FrameDecoder(max_frame_bytes=LIMIT)
    frames: list[Frame] = []
    try:
        for i in range(0, len(stream), step):
            decoder.receive_data(stream[i : i + step])
            frames.extend(decoder.frames())
        decoder.close()
    except FrameError as exc:
        try:
            decoder.next_frame()
        except FrameError:
            pass
        else:
            raise driver.FuzzFindingError("the decoder is not poisoned after an error") from exc
        return frames, type(exc)
    return frames, None


def _packed(body: object) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def one_input(data: bytes) -> None:
    if not data:
        return
    stream = data[1:]
    step = data[0] % 18 or len(stream) + 1
    frames, error = _decode(stream, step)
    whole, whole_error = _decode(stream, len(stream) + 1)
    if error is None and whole_error is None:
        same = [(f.kind, _packed(f.body)) for f in frames] == [
            (f.kind, _packed(f.body)) for f in whole
        ]
    else:
        # an error may surface after different numbers of frames (a header
        # error is raised as soon as its bytes arrive), but the class is the same
        same = error == whole_error
    if not same:
        raise driver.FuzzFindingError(f"pieces of {step} bytes: {error}, whole: {whole_error}")
    for frame in frames:
        again = FrameDecoder(max_frame_bytes=LIMIT)
        again.receive_data(encode_frame(frame.kind, frame.body))
        back = again.next_frame()
        if back is None or _packed(back.body) != _packed(frame.body) or back.kind != frame.kind:
            raise driver.FuzzFindingError("a decoded frame does not survive re-encoding")
    for flags in (0, FLAG_SNAPPY):
        with contextlib.suppress(FrameFormatError):
            decode_body(stream, flags, max_bytes=LIMIT)


def seeds() -> list[bytes]:
    cursor = Cursor(bytes(range(16)), 42)
    digest = Digest(3, 2**100 + 7)
    msgs: list[Message] = [
        DiffRequest("up", cursor, 1, (b"a", b"b")),
        Hint("up", cursor, digest),
        SnapshotChunk(
            "up", cursor, digest, tuple((b"k%d" % i, b"v" * 40) for i in range(30)), b"k"
        ),
    ]
    out = []
    for msg in msgs:
        for compress in (False, True):
            frame = encode_frame(*to_wire(msg), compress=compress)
            out.append(b"\x00" + frame)
            out.append(b"\x03" + frame + frame[:20])
    return out


SEEDS = seeds()

if __name__ == "__main__":
    sys.exit(driver.main("fuzz_frames", one_input, SEEDS))
