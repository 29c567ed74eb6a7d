"""A relay's serving side: a :class:`~replicad.responder.DatasetView` over a
:class:`~replicad.memory.MemoryMirror`.

Theory of operation
-------------------
A relay is a sidecar whose mirror is served to the replicas below it with the
origin's own :func:`~replicad.responder.respond`. ``replicad.memory`` has no
view over a mirror, so this module is the simulation's adapter; it follows the
sidecar's LMDB relay (``sidecar/relay.py``) rule for rule:

* cursors pass through unchanged (the relay's mirror is at an origin cursor,
  and so are the replicas below it);
* diffs need history: the real :class:`~replicad.relay_history.RelayHistory`
  (a diff or push batch advances it, anything else and every relay restart
  start it afresh at the relay's cursor, so a replica below with an older
  cursor gets ``CursorUnservable`` and repairs with Merkle against the relay);
* a snapshot scans the live records in key order (the position token is the
  key), the sorted key list being rebuilt lazily once per live commit.

The view reads the mirror's *live* area at the moment of each call; the
simulation is single-threaded, so one :func:`respond` call sees one version.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection

from replicad.errors import EpochMismatchError
from replicad.memory import MemoryMirror
from replicad.merkle import Digest, LeafEntries, MerkleTree
from replicad.messages import Cursor, MetaBlob, Record
from replicad.relay_history import RelayHistory
from replicad.replica import Apply

_NO_META = MetaBlob(0, b"")


class MirrorView:
    """The DatasetView a relay serves for one dataset of its mirror."""

    def __init__(self, name: str, mirror: MemoryMirror, *, max_entries: int = 1024) -> None:
        self._name = name
        self.mirror = mirror
        self.history = RelayHistory(name, mirror.cursor, max_entries=max_entries)
        self._sorted: list[bytes] = []
        self._sorted_at = -1

    # --- history

    def reset(self) -> None:
        """Start the history afresh at the mirror's cursor (relay start-up)."""
        self.history.reset(self.mirror.cursor)

    def observe(self, batch: Apply) -> None:
        """Account for ``batch``, which the mirror has just committed (the
        simulated relays pass no pushes on)."""
        self.history.observe(batch, self.meta.revision)

    # --- DatasetView

    @property
    def ready(self) -> bool:
        """True once the mirror holds a synced dataset to serve."""
        return self.mirror.cursor is not None

    @property
    def name(self) -> str:
        return self._name

    @property
    def cursor(self) -> Cursor:
        cursor = self.mirror.cursor
        assert cursor is not None, "serving a dataset the relay has not synced"
        return cursor

    @property
    def digest(self) -> Digest:
        return self.mirror.live.tree.digest

    @property
    def meta(self) -> MetaBlob:
        return self.mirror.meta or _NO_META

    @property
    def tree(self) -> MerkleTree:
        return self.mirror.live.tree

    def get(self, key: bytes) -> bytes | None:
        return self.mirror.live.records.get(key)

    def keys_since(self, since: Cursor) -> Collection[bytes]:
        queue = self.history.queue
        if queue is None:
            raise EpochMismatchError("the relay holds no history for this dataset")
        return queue.keys_since(since.epoch, since.version)

    def leaf_entries(self, leaf: int) -> LeafEntries:
        return self.mirror.live.leaves.leaf_entries(leaf)

    def scan(self, after: bytes | None, limit: int) -> tuple[list[Record], bytes | None]:
        """Records in key order; a record's position token is its key."""
        records = self.mirror.live.records
        if self._sorted_at != self.mirror.live_commits or len(self._sorted) != len(records):
            self._sorted = sorted(records)
            self._sorted_at = self.mirror.live_commits
        keys = self._sorted
        start = 0 if after is None else bisect.bisect_right(keys, after)
        chunk = keys[start : start + limit]
        more = start + limit < len(keys)
        return [(k, records[k]) for k in chunk], (chunk[-1] if more and chunk else None)
