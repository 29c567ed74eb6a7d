"""In-memory origin dataset and replica mirror, for tests and the simulation.

These are complete, honest implementations of the two storage roles with plain
dicts in place of LMDB: :class:`MemoryDataset` is an origin dataset (records,
version queue, Merkle tree and leaf index, epoch) that implements
:class:`~replicad.responder.DatasetView`; :class:`MemoryMirror` is a replica's
storage that executes :class:`~replicad.replica.Apply` batches with the same
contract the LMDB mirror honours (all or nothing, digest verified before
commit, staging promoted atomically). The simulation runs the real protocol
core against them; the LMDB adapters are tested against the same contract.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from replicad.merkle import (
    Digest,
    Geometry,
    LeafEntries,
    MemoryLeafIndex,
    MerkleTree,
)
from replicad.messages import Cursor, DiffPush, MetaBlob, Record
from replicad.replica import Apply, ReplicaState, SnapshotProgress, Target
from replicad.version_queue import MergePolicy, VersionQueue

Change: TypeAlias = tuple[bytes, bytes | None, bytes | None]


class MemoryDataset:
    """An origin dataset held in memory. Single-threaded: every read sees the
    state after the last completed write, so the object is its own view."""

    def __init__(
        self,
        name: str,
        epoch: bytes,
        *,
        geometry: Geometry | None = None,
        max_entries: int = 1024,
        max_keys: int | None = None,
        policy: MergePolicy | None = None,
        meta: MetaBlob | None = None,
    ) -> None:
        self._name = name
        self._geometry = geometry or Geometry()
        self._max_entries = max_entries
        self._max_keys = max_keys
        self._policy = policy
        self.records: dict[bytes, bytes] = {}
        self._sorted: list[bytes] = []
        self._tree = MerkleTree(self._geometry)
        self._leaves = MemoryLeafIndex(self._geometry)
        self.queue = VersionQueue(epoch, max_entries=max_entries, max_keys=max_keys, policy=policy)
        self._meta = meta or MetaBlob(1, b"")
        self.last_push: DiffPush | None = None
        """The last write as the origin would push it (see DiffPush)."""

    # --- DatasetView

    @property
    def name(self) -> str:
        return self._name

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.queue.epoch, self.queue.version)

    @property
    def digest(self) -> Digest:
        return self._tree.digest

    @property
    def meta(self) -> MetaBlob:
        return self._meta

    @property
    def tree(self) -> MerkleTree:
        return self._tree

    def get(self, key: bytes) -> bytes | None:
        return self.records.get(key)

    def keys_since(self, since: Cursor) -> Collection[bytes]:
        return self.queue.keys_since(since.epoch, since.version)

    def leaf_entries(self, leaf: int) -> LeafEntries:
        return self._leaves.leaf_entries(leaf)

    def scan(self, after: bytes | None, limit: int) -> tuple[list[Record], bytes | None]:
        """Records in key order; a record's position token is its key."""
        start = 0 if after is None else bisect.bisect_right(self._sorted, after)
        keys = self._sorted[start : start + limit]
        more = start + limit < len(self._sorted)
        return [(k, self.records[k]) for k in keys], (keys[-1] if more and keys else None)

    # --- writes

    def write(self, upserts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> Cursor:
        """Commit one batch as one new version; returns the new cursor.

        A key both upserted and deleted in one batch ends deleted. Deleting an
        absent key is recorded (replicas get a harmless tombstone).
        """
        since = self.cursor
        touched: set[bytes] = set()
        for key, value in upserts.items():
            self._put(key, value)
            touched.add(key)
        deleted = dict.fromkeys(deletes)
        for key in deleted:
            self._put(key, None)
            touched.add(key)
        self.queue.push(self.queue.version + 1, touched)
        self.last_push = DiffPush(
            self._name,
            since,
            self.cursor,
            self.digest,
            tuple((k, v) for k, v in upserts.items() if k not in deleted),
            tuple(deleted),
            self._meta.revision,
        )
        return self.cursor

    def replace_all(self, records: Mapping[bytes, bytes]) -> Cursor:
        """Bulk replace: make ``records`` the whole dataset, publishing only the
        keys that changed or disappeared, as one version."""
        upserts = {k: v for k, v in records.items() if self.records.get(k) != v}
        deletes = [k for k in self.records if k not in records]
        return self.write(upserts, deletes)

    def set_meta(self, body: bytes) -> None:
        self._meta = MetaBlob(self._meta.revision + 1, body)

    def lose_history(self, new_epoch: bytes) -> None:
        """The origin restarted without its version queue: a new epoch whose
        history starts at the current version (its floor)."""
        self.queue = VersionQueue(
            new_epoch,
            floor=self.queue.version,
            max_entries=self._max_entries,
            max_keys=self._max_keys,
            policy=self._policy,
        )

    def _put(self, key: bytes, value: bytes | None) -> None:
        old = self.records.get(key)
        if old == value:
            return
        self._tree.update(key, old, value)
        self._leaves.update(key, old, value)
        if value is None:
            del self.records[key]
            i = bisect.bisect_left(self._sorted, key)
            del self._sorted[i]
        else:
            if old is None:
                bisect.insort(self._sorted, key)
            self.records[key] = value


@dataclass
class _Area:
    records: dict[bytes, bytes]
    tree: MerkleTree
    leaves: MemoryLeafIndex


class MemoryMirror:
    """A replica's storage in memory, honouring the Apply contract.

    Only committed state lives here; a simulated crash keeps this object and
    builds a new state machine from :meth:`state`.
    """

    def __init__(self, geometry: Geometry | None = None) -> None:
        self.geometry = geometry or Geometry()
        self.live = self._area()
        self.staging = self._area()
        self.cursor: Cursor | None = None
        self.meta: MetaBlob | None = None
        self.staging_meta: MetaBlob | None = None
        self.progress: SnapshotProgress | None = None
        self.applied_batches = 0
        self.live_commits = 0
        """Commits that changed what readers see (live applies, promotions)."""

    def _area(self) -> _Area:
        return _Area({}, MerkleTree(self.geometry), MemoryLeafIndex(self.geometry))

    @property
    def tree(self) -> MerkleTree:
        return self.live.tree

    @property
    def leaves(self) -> MemoryLeafIndex:
        return self.live.leaves

    def state(self) -> ReplicaState:
        return ReplicaState(
            self.cursor,
            0 if self.meta is None else self.meta.revision,
            self.progress,
        )

    def apply(self, batch: Apply) -> bool:
        """Execute ``batch`` all or nothing; False (and no change) when the
        digest after it would not equal ``batch.expected_digest``."""
        if batch.target is Target.LIVE:
            changes = self._changes(self.live, batch)
            staged = self.live.tree.stage(changes)
            if batch.expected_digest is not None and staged.digest_after != batch.expected_digest:
                return False
            staged.commit()
            self._write(self.live, changes)
            self.cursor = batch.cursor
            if batch.meta is not None:
                self.meta = batch.meta
            self.applied_batches += 1
            self.live_commits += 1
            return True
        area = self._area() if batch.reset_staging else self.staging
        changes = self._changes(area, batch)
        staged = area.tree.stage(changes)
        if batch.promote and staged.digest_after != batch.expected_digest:
            return False
        staged.commit()
        self._write(area, changes)
        self.staging = area
        if batch.reset_staging:
            self.staging_meta = None
        if batch.meta is not None:
            self.staging_meta = batch.meta
        if batch.promote:
            self.live, self.staging = self.staging, self._area()
            self.cursor = batch.cursor
            self.meta = self.staging_meta or self.meta
            self.staging_meta = None
            self.progress = None
            self.live_commits += 1
        else:
            self.progress = batch.progress
        self.applied_batches += 1
        return True

    @staticmethod
    def _changes(area: _Area, batch: Apply) -> list[Change]:
        final: dict[bytes, bytes | None] = {}
        for key, value in batch.upserts:
            final[key] = value
        for key in batch.deletes:
            final[key] = None
        return [(k, area.records.get(k), v) for k, v in final.items() if area.records.get(k) != v]

    @staticmethod
    def _write(area: _Area, changes: list[Change]) -> None:
        for key, old, new in changes:
            area.leaves.update(key, old, new)
            if new is None:
                del area.records[key]
            else:
                area.records[key] = new
