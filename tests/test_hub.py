"""Hint fan-out: a slow subscriber keeps one event per dataset, merging
pushes that follow each other."""

from __future__ import annotations

from replicad.hub import Subscription
from replicad.merkle import Digest
from replicad.messages import Cursor, DiffPush, Hint

E = b"e" * 16
D = Digest(1, 1)


def push(since: int, to: int, key: bytes, value: bytes = b"v") -> DiffPush:
    return DiffPush("ds", Cursor(E, since), Cursor(E, to), D, ((key, value),), (), 1)


async def test_pending_pushes_merge_gaps_and_size_replace_and_hints_stay_hints() -> None:
    sub = Subscription(None, diffs=True, max_push_bytes=6)
    sub.offer(push(1, 2, b"a"))
    sub.offer(push(2, 3, b"b"))
    merged = await sub.__anext__()
    assert isinstance(merged, DiffPush)
    assert (merged.since.version, merged.cursor.version) == (1, 3)
    assert dict(merged.upserts) == {b"a": b"v", b"b": b"v"}
    sub.offer(push(3, 4, b"c"))
    sub.offer(push(9, 10, b"d"))  # a gap: the newer replaces the pending one
    assert await sub.__anext__() == push(9, 10, b"d")
    sub.offer(push(10, 11, b"e"))
    sub.offer(push(11, 12, b"f", b"too-long"))  # the merge would outgrow 6 bytes
    assert await sub.__anext__() == push(11, 12, b"f", b"too-long")
    plain = Subscription(frozenset({"ds"}), diffs=False)
    plain.offer(push(1, 2, b"a"))
    plain.offer(Hint("other", Cursor(E, 5), D))  # not subscribed
    assert await plain.__anext__() == Hint("ds", Cursor(E, 2), D)
