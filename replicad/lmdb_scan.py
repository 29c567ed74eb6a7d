"""LMDB reads shared by the origin store and the sidecar mirror (both
adapters, so this module may touch LMDB objects; it imports nothing from lmdb
itself): cursor walks, and :class:`LmdbDatasetView`, the
:class:`~replicad.responder.DatasetView` both serve sync requests from.

Both keep a dataset in two databases: records (key -> value bytes, in key
order) and the Merkle leaf index (leaf, 4 bytes big-endian, + key -> the
16-byte big-endian entry hash). The sidecar's leaf index may be incomplete
for a while after a snapshot load (it is built in the background from a
position on, ``unindexed_from``): the rows it has are right, and records
from that key on are hashed where a leaf is asked for."""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Iterator
from itertools import islice
from typing import Any

from replicad.errors import HistoryTruncatedError, MerkleError, UnknownDatasetError
from replicad.merkle import Digest, LeafEntries, MerkleTree, entry_hash
from replicad.messages import Cursor, MetaBlob, Record
from replicad.version_queue import VersionQueue

LEAF_PREFIX = struct.Struct(">I")
"""The leaf index's key prefix."""


def scan_after(
    cursor: Any, after: bytes | None, limit: int
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Up to ``limit`` (key, value) pairs with keys after ``after`` (from the
    first when None), in key order, and the key to resume after -- None when
    the walk reached the end of the database.

    The cursor's transaction must be opened with ``buffers=False``: the pairs
    are the ``bytes`` LMDB hands out, kept without another copy (a snapshot
    chunk of 5,000 records spent 40% of its scan time re-copying them)."""
    if after is None:
        found = cursor.first()
    else:
        found = cursor.set_range(after)
        if found and cursor.key() == after:
            found = cursor.next()
    if not found:
        return [], None
    rows: list[tuple[bytes, bytes]] = list(islice(cursor.iternext(), limit))
    more = cursor.next() if len(rows) == limit else False
    return rows, (rows[-1][0] if more else None)


def with_prefix(cursor: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key without the prefix, value) whose key starts with ``prefix``."""
    n = len(prefix)
    if cursor.set_range(prefix):
        for k, v in cursor:
            if k[:n] != prefix:
                return
            yield bytes(k[n:]), bytes(v)


def unindexed_leaf_entries(
    indexed: LeafEntries,
    records: Any,
    start: bytes,
    leaf: int,
    leaf_of: Callable[[bytes], int],
) -> LeafEntries:
    """One leaf's entries when the leaf index holds rows only for certain
    records: ``indexed`` (the leaf's rows, all right) plus every record
    from key ``start`` on that falls in ``leaf`` and has no row, hashed
    here (a walk over the unindexed keys, reading only the values of that
    leaf), in key order. ``records`` is a cursor over the records, its
    transaction opened with ``buffers=False``."""
    have = {k for k, _ in indexed}
    out = list(indexed)
    if records.set_range(start):
        for k in records.iternext(keys=True, values=False):
            if k not in have and leaf_of(k) == leaf:
                out.append((k, entry_hash(k, records.value())))
    out.sort()
    return out


class LmdbDatasetView:
    """One dataset at one version: its records and leaf index read in the
    given read transactions, with the cursor, digest, definition, tree and
    version queue captured at the same moment (the caller's lock makes them
    one version). ``cursor`` None means not synced yet (a relay's mirror);
    ``queue`` None means no history (diffs are refused as truncated)."""

    def __init__(
        self,
        name: str,
        *,
        records: tuple[Any, Any],
        leaves: tuple[Any, Any],
        cursor: Cursor | None,
        digest: Digest,
        meta: MetaBlob,
        tree: MerkleTree,
        queue: VersionQueue | None,
        unindexed_from: bytes | None = None,
    ) -> None:
        self._name = name
        self._records_txn, self._records_db = records
        self._leaves_txn, self._leaves_db = leaves
        self._cursor = cursor
        self._digest = digest
        self._meta = meta
        self._tree = tree
        self.queue = queue
        self._unindexed_from = unindexed_from

    @property
    def name(self) -> str:
        return self._name

    @property
    def cursor(self) -> Cursor:
        if self._cursor is None:
            raise UnknownDatasetError(f"dataset {self._name!r} has not been synced yet")
        return self._cursor

    @property
    def digest(self) -> Digest:
        return self._digest

    @property
    def meta(self) -> MetaBlob:
        return self._meta

    @property
    def tree(self) -> MerkleTree:
        """The live tree: read it only under the owner's lock."""
        return self._tree

    def get(self, key: bytes) -> bytes | None:
        value = self._records_txn.get(key, db=self._records_db)
        return None if value is None else bytes(value)

    def keys_since(self, since: Cursor) -> Collection[bytes]:
        if self.queue is None:
            raise HistoryTruncatedError(f"no history is kept for {self._name!r}")
        return self.queue.keys_since(since.epoch, since.version)

    def leaf_entries(self, leaf: int) -> LeafEntries:
        if not 0 <= leaf < self._tree.geometry.leaves:
            raise MerkleError(f"leaf {leaf} outside the tree")
        cur = self._leaves_txn.cursor(db=self._leaves_db)
        prefix = LEAF_PREFIX.pack(leaf)
        entries = [(k, int.from_bytes(h, "big")) for k, h in with_prefix(cur, prefix)]
        if self._unindexed_from is None:
            return entries
        return unindexed_leaf_entries(
            entries,
            self._records_txn.cursor(db=self._records_db),
            self._unindexed_from,
            leaf,
            self._tree.geometry.leaf_of,
        )

    def scan(self, after: bytes | None, limit: int) -> tuple[list[Record], bytes | None]:
        """Records in key order; the position token is the last key."""
        return scan_after(self._records_txn.cursor(db=self._records_db), after, limit)
