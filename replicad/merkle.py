"""The incremental Merkle tree of a dataset, and the sans-IO comparison step.

Theory of operation
-------------------
Every entry ``(key, value)`` has a 128-bit *entry hash* (:func:`entry_hash`).
A key belongs to one leaf, chosen by the top bits of ``xxh3_64(key)``
(:meth:`Geometry.leaf_of`). A leaf keeps only two numbers: the XOR of the
entry hashes of its keys and how many keys it holds. XOR is commutative and
self-inverse, so a write is O(1): XOR the old entry hash out, the new one in,
adjust the count, and mark the leaf dirty. The tree never stores keys; the
listings of a leaf come from storage through a :class:`LeafSource`.

The whole-dataset :class:`Digest` (entry count and XOR of all entry hashes)
is kept the same way and is O(1) to read: two replicas whose digests agree
hold the same data (up to a 128-bit collision).

Node digests are 64-bit (:data:`DIGEST_BYTES`). A leaf's digest is
``xxh3_64(xor as 16 bytes BE + count as 4 bytes BE)``; an inner node's digest
is ``xxh3_64`` of its children's digests concatenated in order. Inner nodes
are recomputed lazily: reading any node digest first recomputes the dirty
leaves and their ancestors (or the whole tree when most leaves are dirty).
The same set of entries always gives the same digests, whatever the order of
the writes that produced it.

Comparison (replica side, :class:`MerkleComparison`) is a pure state machine:
it asks the remote tree for the digests of the descendants of the nodes that
differ, several levels per round trip (:class:`NodeQuery`), compares them with
the local digests, descends only into the nodes that differ, and at the leaf
level asks for the listings of the differing leaves (:class:`LeafQuery`). The
listings, compared with the local ones, give exactly the keys that differ and
the entry hash the remote holds for each. The server side is
:func:`answer_nodes` and :func:`answer_leaves`. With the default geometry
(fan-out 16, depth 4) and two levels per query, any difference is found in
three round trips.

Nothing here does I/O. The messages are plain frozen dataclasses; their wire
form belongs to the message codec (entry hashes are 128-bit, wider than a
msgpack integer, so they travel as :data:`HASH_BYTES` bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

from xxhash import xxh3_64_digest, xxh3_64_intdigest, xxh3_128_intdigest

from replicad.errors import MerkleError, ProtocolError

__all__ = [
    "DIGEST_BYTES",
    "EMPTY_DIGEST",
    "HASH_BYTES",
    "Digest",
    "Geometry",
    "LeafAnswer",
    "LeafEntries",
    "LeafQuery",
    "LeafSource",
    "MemoryLeafIndex",
    "MerkleComparison",
    "MerkleTree",
    "NodeAnswer",
    "NodeQuery",
    "StagedUpdate",
    "answer_leaves",
    "answer_nodes",
    "entry_hash",
]

DIGEST_BYTES = 8
"""Size of a node (leaf or inner) digest on the wire: 64 bits."""

HASH_BYTES = 16
"""Size of an entry hash on the wire: 128 bits, big-endian."""

_HASH_LIMIT = 1 << 128
_COUNT_LIMIT = 1 << 64
_LOW64 = (1 << 64) - 1
_LEAF_COUNT_MASK = 0xFFFFFFFF
_MAX_LEAVES = 1 << 20

LeafEntries = list[tuple[bytes, int]]
"""The (key, entry hash) pairs of one leaf, sorted by key."""


def entry_hash(key: bytes, value: bytes) -> int:
    """The 128-bit hash of one entry: ``xxh3_128(key + value, seed=len(key))``.

    Seeding with the key's length makes the encoding unambiguous
    (``(b"ab", b"c")`` and ``(b"a", b"bc")`` hash differently) without building
    a length prefix on the write path. Any xxh3 implementation reproduces it.
    """
    return xxh3_128_intdigest(key + value, len(key))


def _leaf_digest(xor: int, count: int) -> bytes:
    return xxh3_64_digest(xor.to_bytes(16, "big") + (count & _LEAF_COUNT_MASK).to_bytes(4, "big"))


_EMPTY_LEAF_DIGEST = _leaf_digest(0, 0)


@cache
def _zeros(n: int) -> bytes:
    return bytes(n)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- geometry ----------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The shape of a tree: ``fanout`` children per inner node, ``depth`` levels.

    Level 0 is the root (one node); level ``depth`` holds the
    ``fanout ** depth`` leaves. ``fanout`` is a power of two in 2..256,
    ``depth`` is at least 1 and there are at most 2**20 leaves. Construction
    raises :class:`MerkleError` for anything else.
    """

    fanout: int = 16
    depth: int = 4
    _bits: int = field(init=False, repr=False, compare=False)
    _shift: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fanout, depth = self.fanout, self.depth
        if not _is_int(fanout) or not 2 <= fanout <= 256 or fanout & (fanout - 1):
            raise MerkleError(f"fanout must be a power of two in 2..256, not {fanout!r}")
        if not _is_int(depth) or depth < 1:
            raise MerkleError(f"depth must be an integer >= 1, not {depth!r}")
        bits = fanout.bit_length() - 1
        if bits * depth > 20:
            raise MerkleError(
                f"fanout {fanout} and depth {depth} give {fanout**depth} leaves (limit 2**20)"
            )
        object.__setattr__(self, "_bits", bits)
        object.__setattr__(self, "_shift", 64 - bits * depth)

    @property
    def leaves(self) -> int:
        """Number of leaves, ``fanout ** depth``."""
        return 1 << (self._bits * self.depth)

    def level_size(self, level: int) -> int:
        """Number of nodes at ``level`` (0 = root ... ``depth`` = leaves).

        Raises :class:`MerkleError` for a level outside ``0..depth``.
        """
        self._check_level(level)
        return 1 << (self._bits * level)

    def leaf_of(self, key: bytes) -> int:
        """The leaf holding ``key``: the top bits of ``xxh3_64(key)``, in ``[0, leaves)``."""
        return xxh3_64_intdigest(key) >> self._shift

    def children(self, level: int, index: int) -> range:
        """Indices at ``level + 1`` of the children of node ``index`` at ``level``.

        Raises :class:`MerkleError` if ``level`` is the leaf level or outside
        the tree, or ``index`` is not a node of ``level``.
        """
        return self.descendants(level, index, 1)

    def descendants(self, level: int, index: int, levels_down: int) -> range:
        """Indices at ``level + levels_down`` of the descendants of node ``index``.

        ``levels_down == 0`` gives the node itself. Raises :class:`MerkleError`
        when the level, index or ``levels_down`` do not fit the geometry.
        """
        self._check_node(level, index)
        if not _is_int(levels_down) or levels_down < 0 or level + levels_down > self.depth:
            raise MerkleError(
                f"cannot go {levels_down!r} levels down from level {level} (depth {self.depth})"
            )
        span = self._bits * levels_down
        return range(index << span, (index + 1) << span)

    def to_json(self) -> dict[str, int]:
        """A JSON-ready dict ``{"fanout": ..., "depth": ...}``."""
        return {"fanout": self.fanout, "depth": self.depth}

    @classmethod
    def from_json(cls, obj: object) -> Geometry:
        """The geometry described by a dict from :meth:`to_json`.

        Raises :class:`MerkleError` if ``obj`` is not such a mapping (missing or
        extra keys, non-integers) or describes an invalid geometry.
        """
        if not isinstance(obj, Mapping) or set(obj) != {"fanout", "depth"}:
            raise MerkleError(f"not a geometry: {obj!r}")
        return cls(fanout=obj["fanout"], depth=obj["depth"])

    def _check_level(self, level: int) -> None:
        if not _is_int(level) or not 0 <= level <= self.depth:
            raise MerkleError(f"level {level!r} outside 0..{self.depth}")

    def _check_node(self, level: int, index: int) -> None:
        self._check_level(level)
        if not _is_int(index) or not 0 <= index < 1 << (self._bits * level):
            raise MerkleError(f"index {index!r} is not a node of level {level}")


# --- digest ------------------------------------------------------------------


@dataclass(frozen=True)
class Digest:
    """The whole-dataset checksum: entry ``count`` and ``xor`` of all entry hashes.

    Construction raises :class:`MerkleError` unless ``0 <= count < 2**64`` and
    ``0 <= xor < 2**128``.
    """

    count: int
    xor: int

    def __post_init__(self) -> None:
        if not _is_int(self.count) or not 0 <= self.count < _COUNT_LIMIT:
            raise MerkleError(f"digest count {self.count!r} outside 0..2**64-1")
        if not _is_int(self.xor) or not 0 <= self.xor < _HASH_LIMIT:
            raise MerkleError(f"digest xor {self.xor!r} outside 0..2**128-1")

    def to_bytes(self) -> bytes:
        """24 bytes: count (8 bytes BE) then xor (16 bytes BE)."""
        return self.count.to_bytes(8, "big") + self.xor.to_bytes(16, "big")

    @classmethod
    def from_bytes(cls, b: bytes | bytearray | memoryview) -> Digest:
        """The digest of :meth:`to_bytes`; :class:`MerkleError` unless ``b`` has 24 bytes."""
        if not isinstance(b, bytes | bytearray | memoryview) or len(b) != 24:
            raise MerkleError("a digest is exactly 24 bytes")
        raw = bytes(b)
        return cls(int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big"))

    def hex(self) -> str:
        """The 24 bytes of :meth:`to_bytes` in hex, for logs."""
        return self.to_bytes().hex()


EMPTY_DIGEST = Digest(0, 0)
"""The digest of an empty dataset."""


# --- the tree ----------------------------------------------------------------

_MAGIC = b"RMKT"
_FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBHB")  # magic, format version, fanout, depth


class StagedUpdate:
    """Changes computed against a tree but not applied to it (see :meth:`MerkleTree.stage`).

    ``digest_before`` and ``digest_after`` are the tree's digest when staged and
    the digest it will have once :meth:`commit` has applied the changes (if
    nothing else changes the tree in between).
    """

    __slots__ = ("_committed", "_deltas", "_tree", "digest_after", "digest_before")

    def __init__(
        self,
        tree: MerkleTree,
        deltas: dict[int, tuple[int, int]],
        before: Digest,
        after: Digest,
    ) -> None:
        self._tree = tree
        self._deltas = deltas
        self._committed = False
        self.digest_before = before
        self.digest_after = after

    @property
    def committed(self) -> bool:
        """Whether :meth:`commit` has run."""
        return self._committed

    def commit(self) -> None:
        """Apply the staged changes to the tree: O(1) per touched leaf, no hashing.

        Raises :class:`MerkleError` if already committed, or if a leaf's count
        would go below zero (the tree changed since staging in a way that
        contradicts the changes); the tree is then left unchanged.
        """
        if self._committed:
            raise MerkleError("staged update already committed")
        self._tree._apply_deltas(self._deltas)
        self._committed = True


class MerkleTree:
    """An incremental Merkle tree over a dataset's entries (no per-key storage).

    Writes are O(1) (:meth:`update`); node digests are recomputed lazily on
    read. Memory is per leaf (an int XOR and an int count) plus one 8-byte
    digest per node, independent of the number of entries.
    """

    __slots__ = ("_count", "_counts", "_dirty", "_levels", "_shift", "_xor", "_xors", "geometry")

    def __init__(self, geometry: Geometry = Geometry()) -> None:
        self.geometry = geometry
        self._shift = geometry._shift
        self._xors: list[int] = []
        self._counts: list[int] = []
        self._levels: list[list[bytes]] = []
        self._dirty = bytearray()  # one flag byte per leaf
        self._xor = 0
        self._count = 0
        self.clear()

    def clear(self) -> None:
        """Forget every entry: the tree becomes the empty tree of its geometry."""
        g = self.geometry
        n = g.leaves
        self._xors = [0] * n
        self._counts = [0] * n
        self._xor = 0
        self._count = 0
        self._dirty = bytearray(n)
        levels: list[list[bytes]] = [[_EMPTY_LEAF_DIGEST] * n]
        node = _EMPTY_LEAF_DIGEST
        for level in range(g.depth - 1, -1, -1):
            node = xxh3_64_digest(node * g.fanout)
            levels.append([node] * (1 << (g._bits * level)))
        levels.reverse()
        self._levels = levels

    @property
    def digest(self) -> Digest:
        """The whole-dataset :class:`Digest`, O(1)."""
        return Digest(self._count, self._xor)

    def __len__(self) -> int:
        """Number of entries."""
        return self._count

    def update(self, key: bytes, old_value: bytes | None, new_value: bytes | None) -> None:
        """Record that ``key`` changed from ``old_value`` to ``new_value``, in O(1).

        ``old_value`` None is an insert, ``new_value`` None a delete. The caller
        guarantees ``old_value`` is what the tree currently holds for ``key``.
        Both None is a no-op. Raises :class:`MerkleError` (tree unchanged) when
        a delete would take the key's leaf below zero entries, which proves
        that guarantee broken.
        """
        n = len(key)
        if old_value is not None:
            delta = xxh3_128_intdigest(key + old_value, n)
            if new_value is not None:
                delta ^= xxh3_128_intdigest(key + new_value, n)
                dc = 0
            else:
                dc = -1
        elif new_value is not None:
            delta = xxh3_128_intdigest(key + new_value, n)
            dc = 1
        else:
            return
        leaf = xxh3_64_intdigest(key) >> self._shift
        if dc:
            counts = self._counts
            c = counts[leaf] + dc
            if c < 0:
                raise MerkleError(f"delete from empty leaf {leaf}: old value is not in the tree")
            counts[leaf] = c
            self._count += dc
        self._xors[leaf] ^= delta
        self._xor ^= delta
        self._dirty[leaf] = 1

    def update_hashes(self, key: bytes, old_hash: int | None, new_hash: int | None) -> None:
        """:meth:`update` with entry hashes (:func:`entry_hash`) instead of values.

        Raises :class:`MerkleError` (tree unchanged) for a hash outside
        ``0..2**128-1`` or a delete from an empty leaf.
        """
        delta = 0
        dc = 0
        if old_hash is not None:
            if not 0 <= old_hash < _HASH_LIMIT:
                raise MerkleError(f"entry hash {old_hash!r} outside 0..2**128-1")
            delta = old_hash
            dc = -1
        if new_hash is not None:
            if not 0 <= new_hash < _HASH_LIMIT:
                raise MerkleError(f"entry hash {new_hash!r} outside 0..2**128-1")
            delta ^= new_hash
            dc += 1
        elif old_hash is None:
            return
        self._apply(xxh3_64_intdigest(key) >> self._shift, delta, dc)

    def update_leaf(self, leaf: int, old_hash: int | None, new_hash: int | None) -> None:
        """:meth:`update_hashes` for a caller that already knows the key's
        leaf (``geometry.leaf_of(key)``): saves hashing the key again. The
        hashes are trusted (no range check); the leaf is checked."""
        if not 0 <= leaf < len(self._counts):
            raise MerkleError(f"no leaf {leaf!r}")
        delta = 0 if old_hash is None else old_hash
        dc = 0 if old_hash is None else -1
        if new_hash is not None:
            delta ^= new_hash
            dc += 1
        self._apply(leaf, delta, dc)

    def update_leaves(self, changes: Iterable[tuple[int, int | None, int | None]]) -> None:
        """:meth:`update_leaf` for many ``(leaf, old hash, new hash)``
        changes, in order, in one call (a snapshot chunk's worth). Raises
        :class:`MerkleError` like :meth:`update_leaf`; the changes before the
        offending one stay applied."""
        counts, xors, dirty = self._counts, self._xors, self._dirty
        size = len(counts)
        count, xor = self._count, self._xor
        try:
            for leaf, old_hash, new_hash in changes:
                if not 0 <= leaf < size:
                    raise MerkleError(f"no leaf {leaf!r}")
                if old_hash is None:
                    delta, dc = 0, 0
                else:
                    delta, dc = old_hash, -1
                if new_hash is not None:
                    delta ^= new_hash
                    dc += 1
                if dc:
                    c = counts[leaf] + dc
                    if c < 0:
                        raise MerkleError(
                            f"delete from empty leaf {leaf}: old hash is not in the tree"
                        )
                    counts[leaf] = c
                    count += dc
                xors[leaf] ^= delta
                xor ^= delta
                dirty[leaf] = 1
        finally:
            self._count, self._xor = count, xor

    def insert_many(self, leaves: Sequence[int], hashes: Sequence[int]) -> None:
        """Add new entries, ``hashes[i]`` under ``leaves[i]`` (keys that were
        not in the tree: a snapshot chunk's worth), in one call: the same as
        :meth:`update_leaves` with ``(leaf, None, hash)`` changes, in a
        tighter loop. Raises :class:`MerkleError`, changing nothing, for a
        leaf outside the tree or sequences of different lengths."""
        if len(leaves) != len(hashes):
            raise MerkleError(f"{len(leaves)} leaves for {len(hashes)} hashes")
        if not leaves:
            return
        if min(leaves) < 0 or max(leaves) >= len(self._counts):
            raise MerkleError("a leaf outside the tree")
        counts, xors, dirty = self._counts, self._xors, self._dirty
        xor = self._xor
        for leaf, h in zip(leaves, hashes, strict=True):
            counts[leaf] += 1
            xors[leaf] ^= h
            dirty[leaf] = 1
            xor ^= h
        self._xor = xor
        self._count += len(leaves)

    def _apply(self, leaf: int, delta: int, dc: int) -> None:
        if dc:
            c = self._counts[leaf] + dc
            if c < 0:
                raise MerkleError(f"delete from empty leaf {leaf}: old hash is not in the tree")
            self._counts[leaf] = c
            self._count += dc
        self._xors[leaf] ^= delta
        self._xor ^= delta
        self._dirty[leaf] = 1

    def stage(self, changes: Iterable[tuple[bytes, bytes | None, bytes | None]]) -> StagedUpdate:
        """Compute the digest after ``changes`` without touching the tree.

        ``changes`` are ``(key, old_value, new_value)`` triples with the meaning
        of :meth:`update`, applied in order (a key may appear several times).
        The returned :class:`StagedUpdate` carries ``digest_after``; its
        ``commit()`` applies the changes without hashing again. Raises
        :class:`MerkleError` if the changes would take a leaf below zero
        entries; the tree is never changed by this method.
        """
        shift = self._shift
        deltas: dict[int, tuple[int, int]] = {}
        for key, old_value, new_value in changes:
            n = len(key)
            delta = 0
            dc = 0
            if old_value is not None:
                delta = xxh3_128_intdigest(key + old_value, n)
                dc = -1
            if new_value is not None:
                delta ^= xxh3_128_intdigest(key + new_value, n)
                dc += 1
            leaf = xxh3_64_intdigest(key) >> shift
            prev = deltas.get(leaf)
            if prev is None:
                deltas[leaf] = (delta, dc)
            else:
                deltas[leaf] = (prev[0] ^ delta, prev[1] + dc)
        xor = self._xor
        count = self._count
        counts = self._counts
        for leaf, (dx, dc) in deltas.items():
            if counts[leaf] + dc < 0:
                raise MerkleError(f"staged changes take leaf {leaf} below zero entries")
            xor ^= dx
            count += dc
        return StagedUpdate(self, deltas, self.digest, Digest(count, xor))

    def _apply_deltas(self, deltas: dict[int, tuple[int, int]]) -> None:
        counts = self._counts
        for leaf, (_, dc) in deltas.items():
            if counts[leaf] + dc < 0:
                raise MerkleError(f"staged changes take leaf {leaf} below zero entries")
        xors = self._xors
        xor = self._xor
        count = self._count
        for leaf, (dx, dc) in deltas.items():
            xors[leaf] ^= dx
            counts[leaf] += dc
            xor ^= dx
            count += dc
        self._xor = xor
        self._count = count
        dirty = self._dirty
        for leaf in deltas:
            dirty[leaf] = 1

    # -- reading digests --

    def _flush(self) -> None:
        """Recompute the digests of dirty leaves and their ancestors."""
        dirty = self._dirty
        stale_count = dirty.count(1)
        if not stale_count:
            return
        g = self.geometry
        levels = self._levels
        xors = self._xors
        counts = self._counts
        fanout = g.fanout
        bits = g._bits
        if stale_count * 4 >= g.leaves:
            # Most of the tree: rebuild every level in one sweep.
            levels[g.depth] = [_leaf_digest(x, c) for x, c in zip(xors, counts, strict=True)]
            for level in range(g.depth - 1, -1, -1):
                child = levels[level + 1]
                levels[level] = [
                    xxh3_64_digest(b"".join(child[i : i + fanout]))
                    for i in range(0, len(child), fanout)
                ]
        else:
            leaf_level = levels[g.depth]
            nodes: set[int] = set()
            find = dirty.find
            leaf = find(1)
            while leaf >= 0:
                leaf_level[leaf] = _leaf_digest(xors[leaf], counts[leaf])
                nodes.add(leaf >> bits)
                leaf = find(1, leaf + 1)
            for level in range(g.depth - 1, -1, -1):
                child = levels[level + 1]
                cur = levels[level]
                for p in nodes:
                    start = p << bits
                    cur[p] = xxh3_64_digest(b"".join(child[start : start + fanout]))
                nodes = {p >> bits for p in nodes}
        dirty[:] = _zeros(g.leaves)

    def root(self) -> bytes:
        """The root digest (:data:`DIGEST_BYTES` bytes), recomputing dirty nodes first."""
        self._flush()
        return self._levels[0][0]

    def node_digests(self, level: int, indices: Sequence[int]) -> list[bytes]:
        """The digests of the nodes ``indices`` of ``level``, in the same order.

        Raises :class:`MerkleError` for a level outside ``0..depth`` or an
        index outside the level; the tree is unchanged apart from the lazy
        recomputation.
        """
        size = self.geometry.level_size(level)
        for i in indices:
            if not _is_int(i) or not 0 <= i < size:
                raise MerkleError(f"index {i!r} is not a node of level {level}")
        self._flush()
        nodes = self._levels[level]
        return [nodes[i] for i in indices]

    def level_digests(self, level: int) -> list[bytes]:
        """A copy of every digest of ``level``; :class:`MerkleError` for a bad level."""
        self.geometry.level_size(level)
        self._flush()
        return list(self._levels[level])

    def leaf_digest(self, leaf: int) -> bytes:
        """The digest of one leaf, in O(1); :class:`MerkleError` if no such leaf."""
        if not _is_int(leaf) or not 0 <= leaf < self.geometry.leaves:
            raise MerkleError(f"no leaf {leaf!r}")
        return _leaf_digest(self._xors[leaf], self._counts[leaf])

    def leaf_state(self, leaf: int) -> tuple[int, int]:
        """``(xor, count)`` of one leaf; :class:`MerkleError` if no such leaf."""
        if not _is_int(leaf) or not 0 <= leaf < self.geometry.leaves:
            raise MerkleError(f"no leaf {leaf!r}")
        return self._xors[leaf], self._counts[leaf]

    # -- persistence --

    def to_bytes(self) -> bytes:
        """The tree's geometry and per-leaf state, checksummed.

        Layout: ``b"RMKT"``, format version (1 byte), fanout (2 bytes BE),
        depth (1 byte), then per leaf ``xor`` (16 bytes BE) and ``count``
        (8 bytes BE), then ``xxh3_64`` of everything before (8 bytes).
        """
        g = self.geometry
        flat: list[int] = []
        append = flat.append
        for x, c in zip(self._xors, self._counts, strict=True):
            append(x >> 64)
            append(x & _LOW64)
            append(c)
        body = _HEADER.pack(_MAGIC, _FORMAT_VERSION, g.fanout, g.depth) + struct.pack(
            f">{len(flat)}Q", *flat
        )
        return body + xxh3_64_digest(body)

    @classmethod
    def from_bytes(cls, b: bytes | bytearray | memoryview) -> MerkleTree:
        """The tree saved by :meth:`to_bytes`.

        Raises :class:`MerkleError` for anything else: wrong magic, format
        version or length, invalid geometry, or a checksum mismatch.
        """
        if not isinstance(b, bytes | bytearray | memoryview):
            raise MerkleError("saved tree must be bytes")
        raw = bytes(b)
        if len(raw) < _HEADER.size + 8:
            raise MerkleError("saved tree is truncated")
        magic, version, fanout, depth = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise MerkleError("not a saved Merkle tree (bad magic)")
        if version != _FORMAT_VERSION:
            raise MerkleError(f"unknown saved tree format version {version}")
        geometry = Geometry(fanout, depth)
        n = geometry.leaves
        if len(raw) != _HEADER.size + 24 * n + 8:
            raise MerkleError(
                f"saved tree has {len(raw)} bytes, expected {_HEADER.size + 24 * n + 8}"
            )
        if xxh3_64_digest(raw[:-8]) != raw[-8:]:
            raise MerkleError("saved tree checksum mismatch")
        flat = struct.unpack_from(f">{3 * n}Q", raw, _HEADER.size)
        tree = cls(geometry)
        xors = [(hi << 64) | lo for hi, lo in zip(flat[0::3], flat[1::3], strict=True)]
        counts = list(flat[2::3])
        xor = 0
        for x in xors:
            xor ^= x
        count = sum(counts)
        if count >= _COUNT_LIMIT:
            raise MerkleError("saved tree holds more than 2**64-1 entries")
        tree._xors = xors
        tree._counts = counts
        tree._xor = xor
        tree._count = count
        tree._dirty = bytearray(b"\x01") * n
        return tree


# --- leaf listings -----------------------------------------------------------


class LeafSource(Protocol):
    """Where leaf listings come from (the tree stores no keys)."""

    def leaf_entries(self, leaf: int) -> LeafEntries:
        """The ``(key, entry hash)`` pairs of ``leaf``, sorted by key.

        Must raise :class:`MerkleError` for a leaf outside the geometry.
        """
        ...


class MemoryLeafIndex:
    """An in-memory :class:`LeafSource`: ``leaf -> {key: entry hash}``.

    For tests and the simulation; it holds every key, so it is not meant for
    large datasets in production.
    """

    __slots__ = ("_count", "_leaves", "geometry")

    def __init__(self, geometry: Geometry = Geometry()) -> None:
        self.geometry = geometry
        self._leaves: dict[int, dict[bytes, int]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Number of keys indexed."""
        return self._count

    def update(self, key: bytes, old_value: bytes | None, new_value: bytes | None) -> None:
        """Record ``key`` changing to ``new_value`` (None: deleted).

        ``old_value`` is accepted for symmetry with :meth:`MerkleTree.update`
        and not checked.
        """
        self.update_hashes(key, None, None if new_value is None else entry_hash(key, new_value))

    def update_hashes(self, key: bytes, old_hash: int | None, new_hash: int | None) -> None:
        """Record ``key`` now having entry hash ``new_hash`` (None: deleted)."""
        leaf = self.geometry.leaf_of(key)
        entries = self._leaves.get(leaf)
        if new_hash is None:
            if entries is not None and entries.pop(key, None) is not None:
                self._count -= 1
                if not entries:
                    del self._leaves[leaf]
            return
        if entries is None:
            entries = self._leaves[leaf] = {}
        if key not in entries:
            self._count += 1
        entries[key] = new_hash

    def get_hash(self, key: bytes) -> int | None:
        """The entry hash held for ``key``, or None."""
        entries = self._leaves.get(self.geometry.leaf_of(key))
        return None if entries is None else entries.get(key)

    def leaf_entries(self, leaf: int) -> LeafEntries:
        """The sorted ``(key, entry hash)`` pairs of ``leaf``; :class:`MerkleError` if no leaf."""
        if not _is_int(leaf) or not 0 <= leaf < self.geometry.leaves:
            raise MerkleError(f"no leaf {leaf!r}")
        entries = self._leaves.get(leaf)
        return sorted(entries.items()) if entries else []

    def copy(self) -> MemoryLeafIndex:
        """An independent copy."""
        other = MemoryLeafIndex(self.geometry)
        other._leaves = {leaf: dict(d) for leaf, d in self._leaves.items()}
        other._count = self._count
        return other


# --- messages ----------------------------------------------------------------


@dataclass(frozen=True)
class NodeQuery:
    """For each node ``indices`` of ``level``: the digests ``levels_down`` levels below."""

    level: int
    indices: tuple[int, ...]
    levels_down: int


@dataclass(frozen=True)
class LeafQuery:
    """The listings of ``leaves``."""

    leaves: tuple[int, ...]


@dataclass(frozen=True)
class NodeAnswer:
    """Answer to a :class:`NodeQuery`: one tuple of digests per queried index."""

    level: int
    levels_down: int
    digests: tuple[tuple[bytes, ...], ...]


@dataclass(frozen=True)
class LeafAnswer:
    """Answer to a :class:`LeafQuery`: ``(leaf, listing)`` per queried leaf, in order."""

    entries: tuple[tuple[int, LeafEntries], ...]


def _check_increasing(values: Sequence[int], limit: int, what: str) -> None:
    prev = -1
    for v in values:
        if not _is_int(v) or not prev < v < limit:
            raise MerkleError(f"{what} must be strictly increasing integers in 0..{limit - 1}")
        prev = v


def answer_nodes(tree: MerkleTree, q: NodeQuery) -> NodeAnswer:
    """Server side of a :class:`NodeQuery`.

    Raises :class:`MerkleError` if the level or ``levels_down`` do not fit the
    tree (``levels_down >= 1``, ``level + levels_down <= depth``) or the indices
    are not strictly increasing nodes of the level (which also bounds the
    answer to one level's worth of digests).
    """
    g = tree.geometry
    g._check_level(q.level)
    down = q.levels_down
    if not _is_int(down) or down < 1 or q.level + down > g.depth:
        raise MerkleError(f"cannot go {down!r} levels down from level {q.level} (depth {g.depth})")
    _check_increasing(q.indices, g.level_size(q.level), "node indices")
    tree._flush()
    target = tree._levels[q.level + down]
    span = g._bits * down
    width = 1 << span
    return NodeAnswer(
        q.level,
        down,
        tuple(tuple(target[i << span : (i << span) + width]) for i in q.indices),
    )


def answer_leaves(source: LeafSource, q: LeafQuery) -> LeafAnswer:
    """Server side of a :class:`LeafQuery`: the listing of each leaf, in query order.

    Raises :class:`MerkleError` if the leaves are not strictly increasing
    non-negative integers, or (from ``source``) a leaf is outside the geometry.
    """
    _check_increasing(q.leaves, _MAX_LEAVES, "leaves")
    return LeafAnswer(tuple((leaf, source.leaf_entries(leaf)) for leaf in q.leaves))


# --- comparison --------------------------------------------------------------


class MerkleComparison:
    """Find the keys in which a local tree differs from a remote one (replica side).

    Drive it with ``q = next_query()``, send ``q``, ``feed(answer)``, until
    ``next_query()`` returns None (``done``). Both trees must have the same
    geometry (the caller checks that first), and the local tree and leaves
    should not change during the comparison.

    When done, ``differing_keys`` holds exactly the keys whose presence or
    entry hash differs, and ``remote_hashes`` the remote entry hash of those
    present remotely. If more than ``max_leaves`` leaves differ, the
    comparison stops early with ``too_many`` set (and no keys): the replica
    should prefer a snapshot. ``round_trips`` counts the answers fed.
    """

    def __init__(
        self,
        local: MerkleTree,
        local_leaves: LeafSource,
        *,
        levels_per_query: int = 2,
        max_leaves: int | None = None,
        max_per_query: int | None = None,
    ) -> None:
        """Raises :class:`MerkleError` if ``levels_per_query < 1``,
        ``max_leaves < 0`` or ``max_per_query < 1``. ``max_per_query``
        bounds the nodes or leaves one query names (a server's limit): a
        level with more is asked in several queries."""
        if max_per_query is not None and (not _is_int(max_per_query) or max_per_query < 1):
            raise MerkleError(f"max_per_query must be None or >= 1, not {max_per_query!r}")
        self._max_per_query = max_per_query
        self._rest: tuple[int, ...] = ()
        """Indices of the current level still to ask about."""
        self._acc_nodes: list[int] = []
        self._acc_keys: set[bytes] = set()
        self._acc_hashes: dict[bytes, int] = {}
        if not _is_int(levels_per_query) or levels_per_query < 1:
            raise MerkleError(f"levels_per_query must be >= 1, not {levels_per_query!r}")
        if max_leaves is not None and (not _is_int(max_leaves) or max_leaves < 0):
            raise MerkleError(f"max_leaves must be None or >= 0, not {max_leaves!r}")
        self._local = local
        self._leaves = local_leaves
        self._geometry = local.geometry
        self._per_query = levels_per_query
        self._max_leaves = max_leaves
        self.done = False
        self.too_many = False
        self.round_trips = 0
        self.differing_keys: frozenset[bytes] = frozenset()
        self.remote_hashes: dict[bytes, int] = {}
        self._pending: NodeQuery | LeafQuery | None = NodeQuery(
            0, (0,), min(levels_per_query, self._geometry.depth)
        )

    def next_query(self) -> NodeQuery | LeafQuery | None:
        """The query to send next (the same one until it is answered), or None when done."""
        return self._pending

    def feed(self, answer: NodeAnswer | LeafAnswer) -> None:
        """Take the answer to the pending query and plan the next step.

        Raises :class:`ProtocolError` if there is no pending query or
        ``answer`` does not answer it (wrong type, level, counts, digest sizes,
        leaves, unsorted or misplaced keys, bad hashes); the comparison is then
        unchanged and the same query is still pending.
        """
        q = self._pending
        if q is None:
            raise ProtocolError("merkle answer received but no query is pending")
        if isinstance(q, NodeQuery):
            if not isinstance(answer, NodeAnswer):
                raise ProtocolError("expected a node answer")
            self._feed_nodes(q, answer)
        else:
            if not isinstance(answer, LeafAnswer):
                raise ProtocolError("expected a leaf answer")
            self._feed_leaves(q, answer)
        self.round_trips += 1

    def _finish(self) -> None:
        self._pending = None
        self.done = True

    def _split(self, indices: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(this query's indices, the rest) under ``max_per_query``."""
        n = self._max_per_query
        if n is None or len(indices) <= n:
            return indices, ()
        return indices[:n], indices[n:]

    def _feed_nodes(self, q: NodeQuery, a: NodeAnswer) -> None:
        g = self._geometry
        if a.level != q.level or a.levels_down != q.levels_down:
            raise ProtocolError("node answer is for another level")
        if len(a.digests) != len(q.indices):
            raise ProtocolError(
                f"node answer has {len(a.digests)} groups for {len(q.indices)} nodes"
            )
        target_level = q.level + q.levels_down
        span = g._bits * q.levels_down
        width = 1 << span
        self._local._flush()
        local = self._local._levels[target_level]
        differing: list[int] = []
        for index, group in zip(q.indices, a.digests, strict=True):
            if len(group) != width:
                raise ProtocolError(f"node answer group has {len(group)} digests, not {width}")
            base = index << span
            for offset, d in enumerate(group):
                if not isinstance(d, bytes) or len(d) != DIGEST_BYTES:
                    raise ProtocolError("node digest is not 8 bytes")
                if d != local[base + offset]:
                    differing.append(base + offset)
        self._acc_nodes.extend(differing)
        if self._rest:  # more nodes of this level to ask about
            now, self._rest = self._split(self._rest)
            self._pending = NodeQuery(q.level, now, q.levels_down)
            return
        differing, self._acc_nodes = self._acc_nodes, []
        if not differing:
            self._finish()
            return
        if self._max_leaves is not None and len(differing) > self._max_leaves:
            # Each differing node has at least one differing leaf below it.
            self.too_many = True
            self._finish()
            return
        now, self._rest = self._split(tuple(differing))
        if target_level == g.depth:
            self._pending = LeafQuery(now)
        else:
            self._pending = NodeQuery(
                target_level, now, min(self._per_query, g.depth - target_level)
            )

    def _feed_leaves(self, q: LeafQuery, a: LeafAnswer) -> None:
        if len(a.entries) != len(q.leaves):
            raise ProtocolError(f"leaf answer has {len(a.entries)} leaves, not {len(q.leaves)}")
        shift = self._geometry._shift
        differing: set[bytes] = set()
        remote_hashes: dict[bytes, int] = {}
        for leaf, item in zip(q.leaves, a.entries, strict=True):
            if not isinstance(item, tuple | list) or len(item) != 2 or item[0] != leaf:
                raise ProtocolError(f"leaf answer out of order: expected leaf {leaf}")
            remote: dict[bytes, int] = {}
            prev: bytes | None = None
            for entry in item[1]:
                if not isinstance(entry, tuple | list) or len(entry) != 2:
                    raise ProtocolError("leaf entry is not a (key, hash) pair")
                key, h = entry
                if not isinstance(key, bytes) or not _is_int(h) or not 0 <= h < _HASH_LIMIT:
                    raise ProtocolError("leaf entry is not (bytes, 128-bit int)")
                if prev is not None and key <= prev:
                    raise ProtocolError(f"leaf {leaf} listing is not sorted by key")
                if xxh3_64_intdigest(key) >> shift != leaf:
                    raise ProtocolError(f"key {key!r} does not belong to leaf {leaf}")
                prev = key
                remote[key] = h
            local = dict(self._leaves.leaf_entries(leaf))
            for key, h in remote.items():
                if local.get(key) != h:
                    differing.add(key)
                    remote_hashes[key] = h
            differing.update(key for key in local if key not in remote)
        self._acc_keys |= differing
        self._acc_hashes.update(remote_hashes)
        if self._rest:  # more leaves to list
            now, self._rest = self._split(self._rest)
            self._pending = LeafQuery(now)
            return
        self.differing_keys = frozenset(self._acc_keys)
        self.remote_hashes = self._acc_hashes
        self._finish()
