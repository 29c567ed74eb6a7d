"""Fuzz harness: message bodies (``replicad/messages.py``, ``from_wire``).

The first input byte is the frame kind (any 0..255), the rest one msgpack
object (decoded as a frame's body is, with its bounds). Checks:
``from_wire`` returns a message or raises
:class:`~replicad.errors.ProtocolError` (never a TypeError, IndexError,
ValueError or another error class), and a message it returns goes back to
the wire and returns unchanged.
"""

from __future__ import annotations

import sys

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    import msgpack

    from replicad.errors import FrameFormatError, ProtocolError
    from replicad.frames import decode_body
    from replicad.merkle import Digest, LeafAnswer, LeafQuery, NodeAnswer, NodeQuery
    from replicad.messages import (
        Ack,
        Cursor,
        CursorUnservable,
        DiffPush,
        DiffRequest,
        DiffResponse,
        Hint,
        MerkleLeavesRequest,
        MerkleLeavesResponse,
        MerkleNodesRequest,
        MerkleNodesResponse,
        Message,
        MetaBlob,
        SnapshotChunk,
        SnapshotRequest,
        from_wire,
        to_wire,
    )


def _packed(body: object) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def one_input(data: bytes) -> None:
    if not data:
        return
    kind = data[0]
    try:
        body = decode_body(data[1:], 0, max_bytes=1 << 16)
    except FrameFormatError:
        return  # not one msgpack object: the frame layer's refusal
    try:
        msg = from_wire(kind, body)
    except ProtocolError:
        return
    again_kind, again_body = to_wire(msg)
    if again_kind != kind:
        raise driver.FuzzFindingError(f"kind {kind} came back as {again_kind}")
    back = from_wire(
        again_kind, msgpack.unpackb(_packed(again_body), raw=False, strict_map_key=False)
    )
    if _packed(to_wire(back)[1]) != _packed(again_body):
        raise driver.FuzzFindingError(f"{type(msg).__name__} does not round-trip")


def sample_messages() -> list[Message]:
    c = Cursor(bytes(range(16)), 7)
    c2 = Cursor(bytes(range(16)), 9)
    d = Digest(2, 12345)
    recs = ((b"a", b"1"), (b"b", b"2"))
    return [
        DiffRequest("up", c, 3, (b"x",)),
        SnapshotRequest("up", b"k", 100, True),
        MerkleNodesRequest("up", NodeQuery(1, (0, 3), 2)),
        MerkleLeavesRequest("up", LeafQuery((1, 2, 3))),
        DiffResponse("up", c, d, recs, (b"c",), MetaBlob(2, b"meta")),
        CursorUnservable("up", "floor", c, d),
        SnapshotChunk("up", c, d, recs, None, None),
        MerkleNodesResponse("up", c, d, NodeAnswer(1, 1, ((b"\x00" * 8,) * 2,)), (16, 4)),
        MerkleLeavesResponse("up", c, d, LeafAnswer(((5, [(b"k", 2**127)]),))),
        Hint("up", c, d),
        Ack("host", "up", c, d, {"ready": True}),
        DiffPush("up", c, c2, d, recs, (b"z",), 1, None),
    ]


def seeds() -> list[bytes]:
    out = []
    for msg in sample_messages():
        kind, body = to_wire(msg)
        out.append(bytes([kind]) + _packed(body))
    return out


SEEDS = seeds()

if __name__ == "__main__":
    sys.exit(driver.main("fuzz_messages", one_input, SEEDS))
