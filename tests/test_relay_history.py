"""The relay's history rules (sans-IO), shared by the sidecar relay and the
simulation."""

from __future__ import annotations

from replicad.merkle import Digest
from replicad.messages import Cursor, MetaBlob
from replicad.relay_history import RelayHistory
from replicad.replica import Apply, SnapshotProgress, SyncKind, Target

E = b"e" * 16
D = Digest(1, 7)


def batch(kind: SyncKind, version: int, upserts: tuple[tuple[bytes, bytes], ...] = ()) -> Apply:
    return Apply("ds", kind, Target.LIVE, upserts, (b"gone",), Cursor(E, version), D)


def test_diffs_and_pushes_advance_the_history_and_are_passed_on() -> None:
    h = RelayHistory("ds", Cursor(E, 5), push_max_bytes=100)
    push = h.observe(batch(SyncKind.DIFF, 8, ((b"a", b"1"),)), 3)
    assert push is not None
    assert (push.since, push.cursor, push.meta_revision) == (Cursor(E, 5), Cursor(E, 8), 3)
    assert push.upserts == ((b"a", b"1"),) and push.deletes == (b"gone",) and push.digest == D
    before = h.queue
    push = h.observe(batch(SyncKind.PUSH, 9, ((b"b", b"2"),)), 3)
    assert push is not None and push.since == Cursor(E, 8)
    assert h.queue is not before  # replaced, never mutated: views keep theirs
    assert h.queue is not None and set(h.queue.keys_since(E, 5)) == {b"a", b"b", b"gone"}
    # the same version again changes nothing; a large batch advances but is not pushed
    assert h.observe(batch(SyncKind.DIFF, 9), 3) is None
    big = h.observe(batch(SyncKind.DIFF, 10, ((b"c", b"x" * 200),)), 3)
    assert big is None and h.queue.version == 10


def test_anything_else_starts_the_history_afresh() -> None:
    h = RelayHistory("ds", Cursor(E, 5))
    chunk = Apply(
        "ds", SyncKind.SNAPSHOT, Target.STAGING, ((b"a", b"1"),), (), None, None,
        progress=SnapshotProgress(Cursor(E, 5), b"a"),
    )  # fmt: skip
    assert h.observe(chunk, 1) is None and h.queue is not None and h.queue.version == 5
    merkle = Apply("ds", SyncKind.MERKLE, Target.LIVE, (), (), Cursor(E, 12), D, MetaBlob(2, b"m"))
    assert h.observe(merkle, 2) is None
    assert h.queue is not None and (h.queue.floor, h.queue.version) == (12, 12)
    other_epoch = Apply("ds", SyncKind.DIFF, Target.LIVE, (), (), Cursor(b"f" * 16, 13), D)
    assert h.observe(other_epoch, 2) is None and h.queue.epoch == b"f" * 16
    assert RelayHistory("ds", None).queue is None
