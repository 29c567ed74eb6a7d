"""Messages of the sync protocol, and their wire shapes.

Theory of operation
-------------------
Both sides speak in small frozen dataclasses. A message turns into a plain
msgpack-able list with :func:`to_wire` and back with :func:`from_wire`; the
frame layer (:mod:`replicad.frames`) carries that list with a checksum, and the
frame's ``kind`` byte is the message's :data:`KIND`. ``from_wire`` is the single
entry point for a peer's bytes: anything that does not have the documented
shape raises :class:`~replicad.errors.ProtocolError`, never a ``TypeError`` or
``IndexError``.

Requests (replica -> origin or relay):

* :class:`DiffRequest` -- "what changed since my cursor?", optionally with extra
  keys whose current values the replica wants in the same consistent read
  (the last step of a Merkle repair).
* :class:`SnapshotRequest` -- a chunk of all records in key order, after a key.
* :class:`MerkleNodesRequest` / :class:`MerkleLeavesRequest` -- Merkle queries.

Responses carry the origin's cursor and digest *at the moment of the read*, so
every answer says which origin version it describes:

* :class:`DiffResponse`, :class:`CursorUnservable`, :class:`SnapshotChunk`,
  :class:`MerkleNodesResponse`, :class:`MerkleLeavesResponse`.

Push: :class:`Hint` (lossy, only a trigger to pull). Report: :class:`Ack`
(a replica's cursor, for the origin's fleet view).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeAlias, TypeVar

from replicad.errors import MerkleError, ProtocolError
from replicad.merkle import Digest, LeafAnswer, LeafQuery, NodeAnswer, NodeQuery

EPOCH_BYTES = 16

Record: TypeAlias = tuple[bytes, bytes]


@dataclass(frozen=True, order=True)
class Cursor:
    """Where a replica stands: an origin epoch and a version within it.

    ``version`` counts committed write batches since the dataset was created in
    this epoch (0 = empty). Cursors of different epochs are not comparable.
    """

    epoch: bytes
    version: int

    def __post_init__(self) -> None:
        if len(self.epoch) != EPOCH_BYTES:
            raise ProtocolError(f"epoch must be {EPOCH_BYTES} bytes, got {len(self.epoch)}")
        if self.version < 0:
            raise ProtocolError(f"version must be >= 0, got {self.version}")

    def __str__(self) -> str:
        return f"{self.epoch.hex()[:8]}:{self.version}"


@dataclass(frozen=True)
class MetaBlob:
    """A dataset's metadata (schemas, dictionary, Merkle geometry) as the origin
    serialized it. The protocol core passes it through untouched; ``revision``
    grows whenever the metadata changes, so a replica can say which one it has.
    """

    revision: int
    body: bytes


# --- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class DiffRequest:
    dataset: str
    since: Cursor
    meta_revision: int = 0
    extra_keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class SnapshotRequest:
    dataset: str
    after: bytes | None = None
    limit: int = 10_000
    stream: bool = False


@dataclass(frozen=True)
class MerkleNodesRequest:
    dataset: str
    query: NodeQuery


@dataclass(frozen=True)
class MerkleLeavesRequest:
    dataset: str
    query: LeafQuery


Request: TypeAlias = DiffRequest | SnapshotRequest | MerkleNodesRequest | MerkleLeavesRequest
REQUEST_TYPES = (DiffRequest, SnapshotRequest, MerkleNodesRequest, MerkleLeavesRequest)


# --- responses ---------------------------------------------------------------


@dataclass(frozen=True)
class DiffResponse:
    """The records that changed in ``(since, cursor]`` (plus any extra keys
    asked for), read in one transaction at ``cursor``. ``upserts`` hold the
    current bytes; ``deletes`` are tombstones (keys absent at ``cursor``; the
    replica may never have had them). ``meta`` is present when the replica's
    ``meta_revision`` differs from the origin's.
    """

    dataset: str
    cursor: Cursor
    digest: Digest
    upserts: tuple[Record, ...] = ()
    deletes: tuple[bytes, ...] = ()
    meta: MetaBlob | None = None


@dataclass(frozen=True)
class CursorUnservable:
    """The origin cannot serve a diff from the replica's cursor (another epoch,
    history merged away past the queue's floor, a cursor ahead of the origin, or
    a diff too large to ship). The replica falls back to Merkle or snapshot."""

    dataset: str
    reason: str
    cursor: Cursor
    digest: Digest


@dataclass(frozen=True)
class SnapshotChunk:
    """Records after the request's position ``after``, in the server's stable
    order, read at ``cursor``. ``next_after`` is the opaque position token to
    resume after, or None when this chunk ends the dataset."""

    dataset: str
    cursor: Cursor
    digest: Digest
    records: tuple[Record, ...]
    next_after: bytes | None
    meta: MetaBlob | None = None


@dataclass(frozen=True)
class MerkleNodesResponse:
    dataset: str
    cursor: Cursor
    digest: Digest
    answer: NodeAnswer
    geometry: tuple[int, int] = (16, 4)


@dataclass(frozen=True)
class MerkleLeavesResponse:
    dataset: str
    cursor: Cursor
    digest: Digest
    answer: LeafAnswer


Response: TypeAlias = (
    DiffResponse | CursorUnservable | SnapshotChunk | MerkleNodesResponse | MerkleLeavesResponse
)


# --- push and report ---------------------------------------------------------


@dataclass(frozen=True)
class Hint:
    """The origin announces a dataset's new cursor. Lossy by design."""

    dataset: str
    cursor: Cursor
    digest: Digest


@dataclass(frozen=True)
class DiffPush:
    """A hint that carries its diff: the records that changed in
    ``(since, cursor]``, pushed by the origin right after the commit. A
    replica standing exactly at ``since`` (with definition revision
    ``meta_revision``, or taking ``meta``) applies it without a request;
    any other replica treats it as a plain :class:`Hint` and pulls. Lossy
    and advisory like hints: the digest check after applying keeps it honest.
    """

    dataset: str
    since: Cursor
    cursor: Cursor
    digest: Digest
    upserts: tuple[Record, ...] = ()
    deletes: tuple[bytes, ...] = ()
    meta_revision: int = 0
    meta: MetaBlob | None = None

    @property
    def hint(self) -> Hint:
        return Hint(self.dataset, self.cursor, self.digest)

    @property
    def size(self) -> int:
        """Payload bytes (keys and values), for size limits."""
        return sum(len(k) + len(v) for k, v in self.upserts) + sum(map(len, self.deletes))

    def follow(self, later: DiffPush, max_bytes: int | None = None) -> DiffPush | None:
        """One push equal to this one followed by ``later`` (which must start
        where this one ends), or None if it does not, or if the merged push
        would carry more than ``max_bytes`` (see :attr:`size`)."""
        if later.dataset != self.dataset or later.since != self.cursor:
            return None
        merged = merge_pushes((self, later))
        return merged if max_bytes is None or merged.size <= max_bytes else None


def merge_pushes(chain: Sequence[DiffPush]) -> DiffPush:
    """One push equal to ``chain`` (non-empty, each push starting where the
    one before it ends) applied in order: the last write of each key wins,
    the cursor, digest and definition revision are the last push's, ``meta``
    the newest any of them carries. One pass over all of them (merging a
    long chain with :meth:`DiffPush.follow`, two at a time, would copy the
    merge so far at every step)."""
    first, last = chain[0], chain[-1]
    if len(chain) == 1:
        return first
    ops: dict[bytes, bytes | None] = {}
    meta = None
    for p in chain:
        for k, v in p.upserts:
            ops[k] = v
        for k in p.deletes:
            ops[k] = None
        if p.meta is not None:
            meta = p.meta
    return DiffPush(
        first.dataset,
        first.since,
        last.cursor,
        last.digest,
        tuple((k, v) for k, v in ops.items() if v is not None),
        tuple(k for k, v in ops.items() if v is None),
        last.meta_revision,
        meta,
    )


@dataclass(frozen=True)
class Ack:
    """A replica reports where it stands, for the origin's fleet view."""

    replica: str
    dataset: str
    cursor: Cursor
    digest: Digest
    extra: dict[str, Any] = field(default_factory=dict)


Message: TypeAlias = Request | Response | Hint | DiffPush | Ack


# --- wire shapes -------------------------------------------------------------

KIND: dict[type, int] = {
    DiffRequest: 1,
    DiffResponse: 2,
    CursorUnservable: 3,
    SnapshotRequest: 4,
    SnapshotChunk: 5,
    MerkleNodesRequest: 6,
    MerkleNodesResponse: 7,
    MerkleLeavesRequest: 8,
    MerkleLeavesResponse: 9,
    Hint: 10,
    Ack: 11,
    DiffPush: 12,
}
_BY_KIND: dict[int, type] = {v: k for k, v in KIND.items()}


def _cursor(c: Cursor) -> list[Any]:
    return [c.epoch, c.version]


def _meta(m: MetaBlob | None) -> list[Any] | None:
    return None if m is None else [m.revision, m.body]


def _records(rs: tuple[Record, ...]) -> list[Any]:
    return list(chain.from_iterable(rs))


def to_wire(msg: Message) -> tuple[int, list[Any]]:
    """Return ``(kind, body)``: the frame kind and a msgpack-able body."""
    kind = KIND[type(msg)]
    body: list[Any]
    match msg:
        case DiffRequest():
            body = [msg.dataset, _cursor(msg.since), msg.meta_revision, list(msg.extra_keys)]
        case SnapshotRequest():
            body = [msg.dataset, msg.after, msg.limit, msg.stream]
        case MerkleNodesRequest():
            q = msg.query
            body = [msg.dataset, q.level, list(q.indices), q.levels_down]
        case MerkleLeavesRequest():
            body = [msg.dataset, list(msg.query.leaves)]
        case DiffResponse():
            body = [
                msg.dataset,
                _cursor(msg.cursor),
                msg.digest.to_bytes(),
                _records(msg.upserts),
                list(msg.deletes),
                _meta(msg.meta),
            ]
        case CursorUnservable():
            body = [msg.dataset, msg.reason, _cursor(msg.cursor), msg.digest.to_bytes()]
        case SnapshotChunk():
            body = [
                msg.dataset,
                _cursor(msg.cursor),
                msg.digest.to_bytes(),
                _records(msg.records),
                msg.next_after,
                _meta(msg.meta),
            ]
        case MerkleNodesResponse():
            a = msg.answer
            body = [
                msg.dataset,
                _cursor(msg.cursor),
                msg.digest.to_bytes(),
                a.level,
                a.levels_down,
                [b"".join(ds) for ds in a.digests],
                list(msg.geometry),
            ]
        case MerkleLeavesResponse():
            leaves: list[Any] = []
            for leaf, entries in msg.answer.entries:
                flat: list[Any] = []
                for k, h in entries:
                    flat.append(k)
                    flat.append(h.to_bytes(16, "big"))
                leaves.append([leaf, flat])
            body = [msg.dataset, _cursor(msg.cursor), msg.digest.to_bytes(), leaves]
        case Hint():
            body = [msg.dataset, _cursor(msg.cursor), msg.digest.to_bytes()]
        case DiffPush():
            body = [
                msg.dataset,
                _cursor(msg.since),
                _cursor(msg.cursor),
                msg.digest.to_bytes(),
                _records(msg.upserts),
                list(msg.deletes),
                msg.meta_revision,
                _meta(msg.meta),
            ]
        case Ack():
            body = [
                msg.replica,
                msg.dataset,
                _cursor(msg.cursor),
                msg.digest.to_bytes(),
                msg.extra,
            ]
    return kind, body


# --- decoding: every check raises ProtocolError ------------------------------

_T = TypeVar("_T")


def _typed(value: object, typ: type[_T], what: str) -> _T:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def _list(value: object, what: str, length: int | None = None) -> list[Any]:
    lst = _typed(value, list, what)
    if length is not None and len(lst) != length:
        raise ProtocolError(f"{what}: expected {length} items, got {len(lst)}")
    return lst


def _int(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    i = _typed(value, int, what)
    if not lo <= i <= hi:
        raise ProtocolError(f"{what}: {i} outside [{lo}, {hi}]")
    return i


def _opt_bytes(value: object, what: str) -> bytes | None:
    return None if value is None else _typed(value, bytes, what)


def _bytes_list(value: object, what: str) -> tuple[bytes, ...]:
    return tuple(_typed(b, bytes, what) for b in _list(value, what))


def _dec_cursor(value: object) -> Cursor:
    epoch, version = _list(value, "cursor", 2)
    return Cursor(_typed(epoch, bytes, "cursor epoch"), _int(version, "cursor version"))


def _dec_digest(value: object) -> Digest:
    try:
        return Digest.from_bytes(_typed(value, bytes, "digest"))
    except MerkleError as exc:
        raise ProtocolError(f"digest: {exc}") from exc


def _dec_meta(value: object) -> MetaBlob | None:
    if value is None:
        return None
    rev, body = _list(value, "meta", 2)
    return MetaBlob(_int(rev, "meta revision"), _typed(body, bytes, "meta body"))


def _dec_records(value: object) -> tuple[Record, ...]:
    flat = _list(value, "records")
    if len(flat) % 2:
        raise ProtocolError("records: odd number of items")
    if not set(map(type, flat)) <= {bytes}:  # one C-level pass; the loop finds the culprit
        for item in flat:
            _typed(item, bytes, "record key/value")
    return tuple(zip(flat[0::2], flat[1::2], strict=True))


def _dec_str(value: object, what: str) -> str:
    return _typed(value, str, what)


def _d_diff_request(b: list[Any]) -> Message:
    ds, since, rev, extra = _list(b, "DiffRequest", 4)
    return DiffRequest(
        _dec_str(ds, "dataset"),
        _dec_cursor(since),
        _int(rev, "meta_revision"),
        _bytes_list(extra, "extra_keys"),
    )


def _d_snapshot_request(b: list[Any]) -> Message:
    ds, after, limit, stream = _list(b, "SnapshotRequest", 4)
    return SnapshotRequest(
        _dec_str(ds, "dataset"),
        _opt_bytes(after, "after"),
        _int(limit, "limit", 1, 10_000_000),
        _typed(stream, bool, "stream"),
    )


def _d_nodes_request(b: list[Any]) -> Message:
    ds, level, indices, down = _list(b, "MerkleNodesRequest", 4)
    idx = tuple(_int(i, "index") for i in _list(indices, "indices"))
    q = NodeQuery(_int(level, "level", 0, 64), idx, _int(down, "levels_down", 0, 64))
    return MerkleNodesRequest(_dec_str(ds, "dataset"), q)


def _d_leaves_request(b: list[Any]) -> Message:
    ds, leaves = _list(b, "MerkleLeavesRequest", 2)
    q = LeafQuery(tuple(_int(i, "leaf") for i in _list(leaves, "leaves")))
    return MerkleLeavesRequest(_dec_str(ds, "dataset"), q)


def _d_diff_response(b: list[Any]) -> Message:
    ds, cur, dig, ups, dels, meta = _list(b, "DiffResponse", 6)
    return DiffResponse(
        _dec_str(ds, "dataset"),
        _dec_cursor(cur),
        _dec_digest(dig),
        _dec_records(ups),
        _bytes_list(dels, "deletes"),
        _dec_meta(meta),
    )


def _d_unservable(b: list[Any]) -> Message:
    ds, reason, cur, dig = _list(b, "CursorUnservable", 4)
    return CursorUnservable(
        _dec_str(ds, "dataset"), _dec_str(reason, "reason"), _dec_cursor(cur), _dec_digest(dig)
    )


def _d_snapshot_chunk(b: list[Any]) -> Message:
    ds, cur, dig, recs, nxt, meta = _list(b, "SnapshotChunk", 6)
    return SnapshotChunk(
        _dec_str(ds, "dataset"),
        _dec_cursor(cur),
        _dec_digest(dig),
        _dec_records(recs),
        _opt_bytes(nxt, "next_after"),
        _dec_meta(meta),
    )


def _d_nodes_response(b: list[Any]) -> Message:
    from replicad.merkle import DIGEST_BYTES

    ds, cur, dig, level, down, blobs, geometry = _list(b, "MerkleNodesResponse", 7)
    groups: list[tuple[bytes, ...]] = []
    for blob in _list(blobs, "digests"):
        raw = _typed(blob, bytes, "digest group")
        if len(raw) % DIGEST_BYTES:
            raise ProtocolError("digest group: length not a multiple of the digest size")
        groups.append(tuple(raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)))
    fan, depth = _list(geometry, "geometry", 2)
    answer = NodeAnswer(
        _int(level, "level", 0, 64), _int(down, "levels_down", 0, 64), tuple(groups)
    )
    return MerkleNodesResponse(
        _dec_str(ds, "dataset"),
        _dec_cursor(cur),
        _dec_digest(dig),
        answer,
        (_int(fan, "fanout", 2, 256), _int(depth, "depth", 1, 64)),
    )


def _d_leaves_response(b: list[Any]) -> Message:
    ds, cur, dig, leaves = _list(b, "MerkleLeavesResponse", 4)
    out: list[tuple[int, list[tuple[bytes, int]]]] = []
    for item in _list(leaves, "leaves"):
        leaf, flat = _list(item, "leaf", 2)
        pairs = _dec_records(flat)
        entries: list[tuple[bytes, int]] = []
        for k, h in pairs:
            if len(h) != 16:
                raise ProtocolError("leaf entry hash must be 16 bytes")
            entries.append((k, int.from_bytes(h, "big")))
        out.append((_int(leaf, "leaf"), entries))
    return MerkleLeavesResponse(
        _dec_str(ds, "dataset"), _dec_cursor(cur), _dec_digest(dig), LeafAnswer(tuple(out))
    )


def _d_hint(b: list[Any]) -> Message:
    ds, cur, dig = _list(b, "Hint", 3)
    return Hint(_dec_str(ds, "dataset"), _dec_cursor(cur), _dec_digest(dig))


def _d_push(b: list[Any]) -> Message:
    ds, since, cur, dig, ups, dels, rev, meta = _list(b, "DiffPush", 8)
    since_c, cur_c = _dec_cursor(since), _dec_cursor(cur)
    if cur_c.epoch != since_c.epoch or cur_c.version <= since_c.version:
        raise ProtocolError(f"DiffPush: cursor {cur_c} does not follow {since_c}")
    return DiffPush(
        _dec_str(ds, "dataset"),
        since_c,
        cur_c,
        _dec_digest(dig),
        _dec_records(ups),
        _bytes_list(dels, "deletes"),
        _int(rev, "meta_revision"),
        _dec_meta(meta),
    )


def _d_ack(b: list[Any]) -> Message:
    rep, ds, cur, dig, extra = _list(b, "Ack", 5)
    extra_d = _typed(extra, dict, "extra")
    return Ack(
        _dec_str(rep, "replica"),
        _dec_str(ds, "dataset"),
        _dec_cursor(cur),
        _dec_digest(dig),
        extra_d,
    )


_DECODERS: dict[type, Callable[[list[Any]], Message]] = {
    DiffRequest: _d_diff_request,
    SnapshotRequest: _d_snapshot_request,
    MerkleNodesRequest: _d_nodes_request,
    MerkleLeavesRequest: _d_leaves_request,
    DiffResponse: _d_diff_response,
    CursorUnservable: _d_unservable,
    SnapshotChunk: _d_snapshot_chunk,
    MerkleNodesResponse: _d_nodes_response,
    MerkleLeavesResponse: _d_leaves_response,
    Hint: _d_hint,
    Ack: _d_ack,
    DiffPush: _d_push,
}


def from_wire(kind: int, body: object) -> Message:
    """Rebuild a message from a frame's kind and decoded body.

    Raises :class:`ProtocolError` for an unknown kind or a body of the wrong
    shape. Nothing is retained on error.
    """
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}")
    try:
        return _DECODERS[cls](_list(body, cls.__name__))
    except ValueError as exc:  # tuple unpacking of a wrong-length list
        raise ProtocolError(f"{cls.__name__}: {exc}") from exc
