"""Messages as real wire frames: the byte counts the reports are made of.

Theory of operation
-------------------
Every message the simulated network carries is encoded exactly as the
networked adapters encode it: :func:`replicad.messages.to_wire` then
:func:`replicad.frames.encode_frame` (msgpack, Snappy when it pays, xxh3
checksum). The frame's length is what the network charges for transfer time
and what the reports count as bytes shipped.

Decoding every frame back would double the cost of a large simulation without
changing any outcome (a clean frame decodes to an equal message: that round
trip is the frame and message modules' own tested property). So a receiver
takes the sender's message object unless the network *touched the bytes*:
a corrupted frame (one byte flipped) and a duplicated frame are always
decoded through :class:`~replicad.frames.FrameDecoder` and
:func:`~replicad.messages.from_wire`, and a scenario can ask for every frame
to be decoded (``decode_all``). A frame that fails to decode raises
:class:`WireError` at the receiver, which treats it as the adapters do: a
failed request, never a half-applied answer.
"""

from __future__ import annotations

import random

from replicad.errors import FrameError, ProtocolError
from replicad.frames import FrameDecoder, encode_frame
from replicad.messages import Message, from_wire, to_wire


class WireError(Exception):
    """A frame could not be decoded (checksum, format or message shape)."""


def encode(msg: Message) -> bytes:
    """The frame bytes of ``msg``, exactly as the HTTP adapters send them."""
    kind, body = to_wire(msg)
    return encode_frame(kind, body)


def decode(data: bytes) -> Message:
    """Decode one whole frame; raises :class:`WireError` if it is not one
    valid frame holding one valid message."""
    decoder = FrameDecoder()
    try:
        decoder.receive_data(data)
        frame = decoder.next_frame()
        decoder.close()
        if frame is None:
            raise WireError("truncated frame")
        return from_wire(frame.kind, frame.body)
    except (FrameError, ProtocolError) as exc:
        raise WireError(f"{type(exc).__name__}: {exc}") from exc


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """``data`` with one byte flipped at a random position (never a no-op)."""
    i = rng.randrange(len(data))
    flipped = data[i] ^ rng.randrange(1, 256)
    return data[:i] + bytes((flipped,)) + data[i + 1 :]
