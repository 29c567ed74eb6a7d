"""The serving side of the sync protocol, with no I/O.

Theory of operation
-------------------
:func:`respond` turns one request into one answer, reading a
:class:`DatasetView`: a consistent, read-only view of one dataset at one
version. The origin's LMDB adapter implements the view over one read
transaction, a relay over its mirror's read transaction, the simulation over
plain dicts; so every server answers with exactly the same logic, and every
answer describes exactly one version (the view's ``cursor``).

A diff unions :meth:`DatasetView.keys_since` (the version queue) with the
request's extra keys and ships each key's current bytes, or a tombstone when
the key is absent. A cursor the view cannot serve -- another epoch, older
than the queue's floor, ahead of the origin, or a diff above
``max_diff_keys`` -- gets :class:`~replicad.messages.CursorUnservable`, which
sends the replica to Merkle sync or a snapshot.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from replicad.errors import CursorError, MerkleError, ProtocolError
from replicad.merkle import Digest, LeafEntries, MerkleTree, answer_leaves, answer_nodes
from replicad.messages import (
    Cursor,
    CursorUnservable,
    DiffRequest,
    DiffResponse,
    MerkleLeavesRequest,
    MerkleLeavesResponse,
    MerkleNodesRequest,
    MerkleNodesResponse,
    MetaBlob,
    Record,
    Request,
    Response,
    SnapshotChunk,
    SnapshotRequest,
)


class DatasetView(Protocol):
    """A consistent read-only view of one dataset at one version."""

    @property
    def name(self) -> str: ...
    @property
    def cursor(self) -> Cursor: ...
    @property
    def digest(self) -> Digest: ...
    @property
    def meta(self) -> MetaBlob: ...
    @property
    def tree(self) -> MerkleTree: ...

    def get(self, key: bytes) -> bytes | None:
        """The key's current bytes, or None when absent."""
        ...

    def keys_since(self, since: Cursor) -> Collection[bytes]:
        """A superset of the keys changed after ``since``; raises CursorError."""
        ...

    def leaf_entries(self, leaf: int) -> LeafEntries:
        """(key, entry hash) pairs of one Merkle leaf, sorted by key."""
        ...

    def scan(self, after: bytes | None, limit: int) -> tuple[list[Record], bytes | None]:
        """Up to ``limit`` records after position ``after`` (from the start
        when None), in the store's stable order, and the position token to
        resume after them -- None when the scan reached the end.

        Tokens are opaque to the replica (it only echoes the last one back to
        resume), so a store may order records however it likes (by key, by
        Merkle leaf then key, ...) as long as the order is stable.
        """
        ...


@dataclass(frozen=True)
class ResponderConfig:
    max_diff_keys: int = 250_000
    """Above this many keys a diff is refused (CursorUnservable) in favour of
    Merkle sync or a snapshot, which bound their answers."""
    max_snapshot_chunk: int = 50_000
    max_merkle_indices: int = 4_096
    """Nodes or leaves one Merkle request may name."""


def respond(view: DatasetView, request: Request, config: ResponderConfig | None = None) -> Response:
    """Answer ``request`` from ``view``.

    Raises :class:`~replicad.errors.ProtocolError` for a request that names
    another dataset or asks for more than the configured bounds, and
    :class:`~replicad.errors.MerkleError` for a Merkle query that does not fit
    the tree. Reads only; the view is left as it was.
    """
    cfg = config or ResponderConfig()
    if request.dataset != view.name:
        raise ProtocolError(f"request for dataset {request.dataset!r} sent to {view.name!r}")
    match request:
        case DiffRequest():
            return _diff(view, request, cfg)
        case SnapshotRequest():
            return snapshot_chunk(view, request.after, min(request.limit, cfg.max_snapshot_chunk))
        case MerkleNodesRequest():
            if len(request.query.indices) > cfg.max_merkle_indices:
                raise ProtocolError("too many Merkle nodes in one request")
            g = view.tree.geometry
            return MerkleNodesResponse(
                view.name,
                view.cursor,
                view.digest,
                answer_nodes(view.tree, request.query),
                (g.fanout, g.depth),
            )
        case MerkleLeavesRequest():
            leaves = request.query.leaves
            if len(leaves) > cfg.max_merkle_indices:
                raise ProtocolError("too many Merkle leaves in one request")
            if any(not 0 <= leaf < view.tree.geometry.leaves for leaf in leaves):
                raise MerkleError("leaf index outside the tree")
            return MerkleLeavesResponse(
                view.name, view.cursor, view.digest, answer_leaves(_Leaves(view), request.query)
            )


class _Leaves:
    def __init__(self, view: DatasetView) -> None:
        self._view = view

    def leaf_entries(self, leaf: int) -> LeafEntries:
        return self._view.leaf_entries(leaf)


def _diff(view: DatasetView, req: DiffRequest, cfg: ResponderConfig) -> Response:
    try:
        changed = view.keys_since(req.since)
    except CursorError as exc:
        return CursorUnservable(view.name, str(exc), view.cursor, view.digest)
    keys = set(changed)
    keys.update(req.extra_keys)
    if len(keys) > cfg.max_diff_keys:
        reason = f"diff of {len(keys)} keys exceeds the limit of {cfg.max_diff_keys}"
        return CursorUnservable(view.name, reason, view.cursor, view.digest)
    upserts: list[Record] = []
    deletes: list[bytes] = []
    for key in sorted(keys):
        value = view.get(key)
        if value is None:
            deletes.append(key)
        else:
            upserts.append((key, value))
    meta = view.meta
    return DiffResponse(
        view.name,
        view.cursor,
        view.digest,
        tuple(upserts),
        tuple(deletes),
        None if meta.revision == req.meta_revision else meta,
    )


def snapshot_chunk(view: DatasetView, after: bytes | None, limit: int) -> SnapshotChunk:
    """One chunk of the snapshot: up to ``limit`` records after position ``after``.

    ``next_after`` is the position token of the last record shipped, or None
    when the chunk reaches the end of the dataset. The first chunk of a load
    (``after`` None) carries the dataset's metadata.
    """
    records, next_after = view.scan(after, limit)
    return SnapshotChunk(
        view.name,
        view.cursor,
        view.digest,
        tuple(records),
        next_after,
        view.meta if after is None else None,
    )
