"""A relay's history of one dataset, sans-IO: what lets it serve diffs and
pass pushes on to the replicas below it.

Theory of operation
-------------------
A relay is a replica whose mirror is served with the origin's own responder.
Diffs need history, so the relay keeps a :class:`VersionQueue` fed by its own
commits: every committed *diff* or *push* batch that moves the live cursor
forward in the same epoch advances the queue by one entry (the batch's keys,
covering the versions it spanned), and that batch, as applied, is exactly the
:class:`~replicad.messages.DiffPush` from the previous cursor to the new one,
so it is returned for the relay to pass on. Any other commit -- a Merkle
repair, a promoted snapshot, another epoch -- and every relay restart start
the queue afresh at the relay's cursor: a replica below with an older cursor
then gets ``CursorUnservable`` and repairs with Merkle against the relay.

The queue object is replaced, never mutated, so a view that captured it keeps
one consistent history while a commit moves on. The sidecar's LMDB relay
(``sidecar/relay.py``) and the simulation's relay both run this class.
"""

from __future__ import annotations

from replicad.messages import Cursor, DiffPush
from replicad.replica import Apply, SyncKind, Target
from replicad.version_queue import VersionQueue


class RelayHistory:
    """The history of one dataset of a relay standing at ``cursor`` (None:
    not synced yet, no history)."""

    def __init__(
        self,
        name: str,
        cursor: Cursor | None,
        *,
        max_entries: int = 1024,
        push_max_bytes: int = 256 << 10,
    ) -> None:
        self.name = name
        self.max_entries = max_entries
        self.push_max_bytes = push_max_bytes
        self.queue: VersionQueue | None = None
        self.reset(cursor)

    def reset(self, cursor: Cursor | None) -> None:
        """Start afresh at ``cursor`` (a restart, or a commit the queue
        cannot describe)."""
        self.queue = (
            None
            if cursor is None
            else VersionQueue(cursor.epoch, floor=cursor.version, max_entries=self.max_entries)
        )

    def observe(self, batch: Apply, meta_revision: int) -> DiffPush | None:
        """Account for ``batch``, which the relay's mirror has just committed
        (``meta_revision``: the mirror's definition revision after it).
        Returns the push to pass on, or None (nothing visible changed, the
        batch is too large, or the history started afresh)."""
        cursor = batch.cursor
        if cursor is None:  # a staged snapshot chunk: nothing visible changed
            return None
        queue = self.queue
        if (
            batch.kind in (SyncKind.DIFF, SyncKind.PUSH)
            and batch.target is Target.LIVE
            and queue is not None
            and queue.epoch == cursor.epoch
            and cursor.version >= queue.version
        ):
            if cursor.version == queue.version:
                return None
            since = Cursor(queue.epoch, queue.version)
            keys = [k for k, _ in batch.upserts]
            keys.extend(batch.deletes)
            queue = queue.copy()
            queue.advance(cursor.version, keys)
            self.queue = queue
            if batch.expected_digest is None:
                return None
            push = DiffPush(
                self.name,
                since,
                cursor,
                batch.expected_digest,
                tuple(batch.upserts),
                tuple(batch.deletes),
                meta_revision,
                batch.meta,
            )
            return push if push.size <= self.push_max_bytes else None
        self.reset(cursor)
        return None
