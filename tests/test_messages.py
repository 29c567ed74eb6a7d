"""Wire shapes of the sync messages: round trips, and every malformed body is
a ProtocolError (never another exception)."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.errors import ProtocolError
from replicad.merkle import Digest, LeafAnswer, LeafQuery, NodeAnswer, NodeQuery
from replicad.messages import (
    KIND,
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

C = Cursor(b"e" * 16, 42)
D = Digest(3, 2**127 + 5)

SAMPLES: list[Message] = [
    DiffRequest("ds", C, 3, (b"a", b"b")),
    DiffRequest("ds", C),
    SnapshotRequest("ds", None, 100, True),
    SnapshotRequest("ds", b"after", 5, False),
    MerkleNodesRequest("ds", NodeQuery(2, (0, 7), 2)),
    MerkleLeavesRequest("ds", LeafQuery((1, 2, 3))),
    DiffResponse("ds", C, D, ((b"k", b"v"), (b"k2", b"")), (b"gone",), MetaBlob(2, b"{}")),
    DiffResponse("ds", C, D),
    CursorUnservable("ds", "epoch mismatch", C, D),
    SnapshotChunk("ds", C, D, ((b"a", b"1"),), b"a", MetaBlob(1, b"m")),
    SnapshotChunk("ds", C, D, (), None),
    MerkleNodesResponse("ds", C, D, NodeAnswer(0, 2, ((b"12345678", b"abcdefgh"),)), (16, 4)),
    MerkleLeavesResponse("ds", C, D, LeafAnswer(((3, [(b"k", 2**100)]), (4, [])))),
    Hint("ds", C, D),
    DiffPush("ds", C, Cursor(C.epoch, 44), D, ((b"k", b"v"),), (b"gone",), 3, None),
    DiffPush("ds", C, Cursor(C.epoch, 43), D, (), (), 0, MetaBlob(4, b"def")),
    Ack("sidecar-1", "ds", C, D, {"lag": 0}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_msgpack(msg: Message) -> None:
    kind, body = to_wire(msg)
    assert kind == KIND[type(msg)]
    body2 = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)
    assert from_wire(kind, body2) == msg


def test_unknown_kind() -> None:
    with pytest.raises(ProtocolError, match="unknown message kind"):
        from_wire(200, [])


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_field_of_wrong_type_is_a_protocol_error(msg: Message) -> None:
    kind, body = to_wire(msg)
    body = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)
    for i in range(len(body)):
        for bad in (None, 1.5, "x", b"x", [1], {"a": 1}, True, -1):
            mutated = list(body)
            mutated[i] = bad
            try:
                decoded = from_wire(kind, mutated)
            except ProtocolError:
                continue
            # some substitutions are legal (an optional field set to None, ...)
            assert isinstance(decoded, type(msg))
    with pytest.raises(ProtocolError):
        from_wire(kind, body[:-1])
    with pytest.raises(ProtocolError):
        from_wire(kind, "not a list")


def test_bad_epoch_and_digest_lengths() -> None:
    with pytest.raises(ProtocolError):
        from_wire(KIND[Hint], ["ds", [b"short", 1], D.to_bytes()])
    with pytest.raises(ProtocolError):
        from_wire(KIND[Hint], ["ds", [b"e" * 16, 1], b"123"])
    with pytest.raises(ProtocolError):
        from_wire(KIND[Hint], ["ds", [b"e" * 16, -1], D.to_bytes()])


msgpackable: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=20)
    | st.text(max_size=5)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=7),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(KIND.values())), body=msgpackable)
def test_arbitrary_bodies_never_raise_anything_but_protocol_error(kind: int, body: Any) -> None:
    with contextlib.suppress(ProtocolError):
        from_wire(kind, body)


def test_a_push_must_move_forward_in_one_epoch() -> None:
    body = to_wire(DiffPush("ds", C, Cursor(C.epoch, 43), D))[1]
    body[2] = [C.epoch, 42]
    with pytest.raises(ProtocolError, match="does not follow"):
        from_wire(KIND[DiffPush], body)
    body[2] = [b"f" * 16, 50]
    with pytest.raises(ProtocolError, match="does not follow"):
        from_wire(KIND[DiffPush], body)
    with pytest.raises(ProtocolError):
        from_wire(KIND[DiffPush], body[:7])


def test_following_pushes_merge_into_one_with_the_later_values() -> None:
    c1, c2, c3 = (Cursor(C.epoch, v) for v in (43, 44, 45))
    first = DiffPush("ds", C, c1, D, ((b"a", b"1"), (b"b", b"1")), (b"x",), 1)
    second = DiffPush("ds", c1, c2, D, ((b"a", b"2"), (b"x", b"2")), (b"b",), 2, MetaBlob(2, b"m"))
    merged = first.follow(second)
    assert merged is not None
    assert merged.since == C and merged.cursor == c2 and merged.meta == MetaBlob(2, b"m")
    assert dict(merged.upserts) == {b"a": b"2", b"x": b"2"}
    assert set(merged.deletes) == {b"b"}
    assert merged.meta_revision == 2
    assert first.follow(DiffPush("ds", c2, c3, D)) is None  # a gap
    assert first.follow(DiffPush("other", c1, c2, D)) is None
    assert merged.hint == Hint("ds", c2, D)
    assert first.follow(second, max_bytes=merged.size) == merged
    assert first.follow(second, max_bytes=merged.size - 1) is None  # too large merged
    assert first.size == 1 + 1 + 1 + 1 + 1
