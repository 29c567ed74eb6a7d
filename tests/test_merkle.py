"""Tests of the Merkle tree and the sans-IO comparison step (replicad.merkle)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_digest, xxh3_128_intdigest

from replicad.errors import MerkleError, ProtocolError
from replicad.merkle import (
    DIGEST_BYTES,
    EMPTY_DIGEST,
    Digest,
    Geometry,
    LeafAnswer,
    LeafQuery,
    MemoryLeafIndex,
    MerkleComparison,
    MerkleTree,
    NodeAnswer,
    NodeQuery,
    answer_leaves,
    answer_nodes,
    entry_hash,
)

SMALL = Geometry(fanout=4, depth=3)  # 64 leaves: keys collide in leaves
TINY = Geometry(fanout=2, depth=1)  # 2 leaves
DEFAULT = Geometry()

keys_st = st.binary(min_size=1, max_size=12)
values_st = st.binary(max_size=16)
dicts_st = st.dictionaries(keys_st, values_st, max_size=60)
geometries_st = st.sampled_from([SMALL, TINY, DEFAULT, Geometry(fanout=256, depth=2)])


def build(geometry: Geometry, data: dict[bytes, bytes]) -> tuple[MerkleTree, MemoryLeafIndex]:
    tree = MerkleTree(geometry)
    index = MemoryLeafIndex(geometry)
    for k, v in data.items():
        tree.update(k, None, v)
        index.update(k, None, v)
    return tree, index


def junk(x: object) -> Any:
    """An ill-typed value for error tests, hidden from mypy."""
    return x


def compare(
    local: tuple[MerkleTree, MemoryLeafIndex],
    remote: tuple[MerkleTree, MemoryLeafIndex],
    **kwargs: Any,
) -> MerkleComparison:
    cmp = MerkleComparison(local[0], local[1], **kwargs)
    for _ in range(2000):
        q = cmp.next_query()
        if q is None:
            break
        answer: NodeAnswer | LeafAnswer
        if isinstance(q, NodeQuery):
            answer = answer_nodes(remote[0], q)
        else:
            answer = answer_leaves(remote[1], q)
        cmp.feed(answer)
    assert cmp.done
    assert cmp.next_query() is None
    return cmp


# --- entry hash and geometry -------------------------------------------------


def test_entry_hash_is_unambiguous_and_documented() -> None:
    assert entry_hash(b"ab", b"c") != entry_hash(b"a", b"bc")
    assert entry_hash(b"key", b"value") == xxh3_128_intdigest(b"keyvalue", 3)
    assert entry_hash(b"k", b"") != 0


def test_default_geometry() -> None:
    g = Geometry()
    assert (g.fanout, g.depth, g.leaves) == (16, 4, 65536)
    assert [g.level_size(level) for level in range(5)] == [1, 16, 256, 4096, 65536]
    assert g.children(0, 0) == range(16)
    assert g.children(2, 3) == range(48, 64)
    assert g.descendants(1, 2, 2) == range(512, 768)
    assert g.descendants(3, 7, 0) == range(7, 8)
    assert g.descendants(0, 0, 4) == range(65536)


@given(keys_st, geometries_st)
@settings(max_examples=100, deadline=None)
def test_leaf_of_is_in_range_and_descends_from_root(key: bytes, g: Geometry) -> None:
    leaf = g.leaf_of(key)
    assert 0 <= leaf < g.leaves
    assert leaf in g.descendants(0, 0, g.depth)


def test_geometry_json_round_trip() -> None:
    for g in (DEFAULT, SMALL, TINY):
        assert Geometry.from_json(g.to_json()) == g


@pytest.mark.parametrize(
    ("fanout", "depth"),
    [(3, 2), (1, 2), (0, 2), (512, 1), (-4, 2), (16, 0), (16, -1), (256, 3), (2, 21), (True, 2)],
)
def test_bad_geometry(fanout: int, depth: int) -> None:
    with pytest.raises(MerkleError):
        Geometry(fanout, depth)


def test_largest_geometry_is_allowed() -> None:
    assert Geometry(2, 20).leaves == 2**20
    assert Geometry(256, 2).leaves == 65536


@pytest.mark.parametrize(
    "obj",
    [None, "x", {"fanout": 16}, {"fanout": 16, "depth": 4, "x": 1}, {"fanout": 3, "depth": 2}],
)
def test_bad_geometry_json(obj: object) -> None:
    with pytest.raises(MerkleError):
        Geometry.from_json(obj)


@pytest.mark.parametrize(
    ("level", "index", "down"),
    [(-1, 0, 1), (5, 0, 0), (0, 1, 1), (2, 256, 1), (2, -1, 1), (3, 0, 2), (1, 0, -1)],
)
def test_bad_descendants(level: int, index: int, down: int) -> None:
    with pytest.raises(MerkleError):
        DEFAULT.descendants(level, index, down)


def test_bad_children_and_level_size() -> None:
    with pytest.raises(MerkleError):
        DEFAULT.children(4, 0)  # leaves have no children
    with pytest.raises(MerkleError):
        DEFAULT.level_size(5)
    with pytest.raises(MerkleError):
        DEFAULT.level_size(-1)


# --- digest ------------------------------------------------------------------


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**128 - 1))
@settings(max_examples=100, deadline=None)
def test_digest_bytes_round_trip(count: int, xor: int) -> None:
    d = Digest(count, xor)
    raw = d.to_bytes()
    assert len(raw) == 24
    assert Digest.from_bytes(raw) == d
    assert d.hex() == raw.hex()


def test_empty_digest() -> None:
    assert Digest(0, 0) == EMPTY_DIGEST
    assert EMPTY_DIGEST.to_bytes() == bytes(24)
    assert MerkleTree().digest == EMPTY_DIGEST


@pytest.mark.parametrize("raw", [b"", bytes(23), bytes(25), "x" * 24])
def test_digest_bad_length(raw: Any) -> None:
    with pytest.raises(MerkleError):
        Digest.from_bytes(raw)


@pytest.mark.parametrize(("count", "xor"), [(-1, 0), (2**64, 0), (0, -1), (0, 2**128)])
def test_digest_bad_values(count: int, xor: int) -> None:
    with pytest.raises(MerkleError):
        Digest(count, xor)


# --- the tree ----------------------------------------------------------------


def test_digest_formulas() -> None:
    g = SMALL
    tree = MerkleTree(g)
    empty_leaf = xxh3_64_digest(bytes(20))
    assert tree.leaf_digest(5) == empty_leaf
    tree.update(b"k", None, b"v")
    leaf = g.leaf_of(b"k")
    h = entry_hash(b"k", b"v")
    expected_leaf = xxh3_64_digest(h.to_bytes(16, "big") + (1).to_bytes(4, "big"))
    assert tree.leaf_digest(leaf) == expected_leaf
    assert tree.level_digests(3)[leaf] == expected_leaf
    for level in range(g.depth):
        digests = tree.level_digests(level)
        below = tree.level_digests(level + 1)
        for i, d in enumerate(digests):
            children = g.children(level, i)
            assert d == xxh3_64_digest(b"".join(below[children.start : children.stop]))
    assert len(tree.root()) == DIGEST_BYTES
    assert tree.digest == Digest(1, h)
    assert len(tree) == 1


@given(
    st.lists(st.tuples(keys_st, st.one_of(st.none(), values_st)), max_size=80),
    geometries_st,
    st.randoms(use_true_random=False),
)
@settings(max_examples=60, deadline=None)
def test_digests_are_order_independent(
    ops: list[tuple[bytes, bytes | None]], g: Geometry, rnd: random.Random
) -> None:
    tree = MerkleTree(g)
    model: dict[bytes, bytes] = {}
    for i, (key, value) in enumerate(ops):
        tree.update(key, model.get(key), value)
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
        if i % 7 == 0:
            tree.root()  # interleave lazy recomputation with writes
    items = list(model.items())
    rnd.shuffle(items)
    fresh = MerkleTree(g)
    for key, value in items:
        fresh.update_hashes(key, None, entry_hash(key, value))
    assert (
        tree.digest
        == fresh.digest
        == Digest(len(model), _xor_all(entry_hash(k, v) for k, v in model.items()))
    )
    assert tree.root() == fresh.root()
    for level in range(g.depth + 1):
        assert tree.level_digests(level) == fresh.level_digests(level)
    assert tree.to_bytes() == fresh.to_bytes()


def _xor_all(hashes: Any) -> int:
    x = 0
    for h in hashes:
        x ^= h
    return x


def test_empty_tree_after_deleting_everything_and_clear() -> None:
    empty = MerkleTree(SMALL)
    tree = MerkleTree(SMALL)
    tree.update(b"a", None, b"1")
    tree.update(b"b", None, b"2")
    assert tree.root() != empty.root()
    tree.update(b"a", b"1", None)
    tree.update(b"b", b"2", None)
    assert tree.root() == empty.root()
    assert tree.digest == EMPTY_DIGEST
    tree.update(b"c", None, b"3")
    tree.clear()
    assert tree.root() == empty.root()
    assert tree.digest == EMPTY_DIGEST
    tree.update(b"k", None, None)  # no-op
    assert tree.root() == empty.root()


def test_delete_from_empty_leaf_raises_and_leaves_tree_unchanged() -> None:
    tree = MerkleTree(SMALL)
    tree.update(b"a", None, b"1")
    before = (tree.digest, tree.to_bytes())
    other = next(
        k for k in (b"%d" % i for i in range(1000)) if SMALL.leaf_of(k) != SMALL.leaf_of(b"a")
    )
    with pytest.raises(MerkleError):
        tree.update(other, b"x", None)
    assert (tree.digest, tree.to_bytes()) == before


def test_update_hashes_errors() -> None:
    tree = MerkleTree(TINY)
    with pytest.raises(MerkleError):
        tree.update_hashes(b"a", None, -1)
    with pytest.raises(MerkleError):
        tree.update_hashes(b"a", None, 2**128)
    with pytest.raises(MerkleError):
        tree.update_hashes(b"a", 2**128, None)
    with pytest.raises(MerkleError):
        tree.update_hashes(b"a", 5, None)  # empty leaf
    tree.update_hashes(b"a", None, None)
    assert tree.digest == EMPTY_DIGEST


def test_node_access_errors() -> None:
    tree = MerkleTree(SMALL)
    with pytest.raises(MerkleError):
        tree.node_digests(4, [0])
    with pytest.raises(MerkleError):
        tree.node_digests(1, [4])
    with pytest.raises(MerkleError):
        tree.node_digests(1, [-1])
    with pytest.raises(MerkleError):
        tree.level_digests(-1)
    with pytest.raises(MerkleError):
        tree.leaf_digest(64)
    with pytest.raises(MerkleError):
        tree.leaf_state(-1)
    assert tree.node_digests(1, [3, 0]) == [tree.level_digests(1)[3], tree.level_digests(1)[0]]
    assert tree.leaf_state(0) == (0, 0)


changes_st = st.lists(st.tuples(keys_st, st.one_of(st.none(), values_st)), max_size=40)


@given(dicts_st, changes_st, geometries_st)
@settings(max_examples=60, deadline=None)
def test_stage_then_commit_equals_sequential_updates(
    data: dict[bytes, bytes], ops: list[tuple[bytes, bytes | None]], g: Geometry
) -> None:
    staged_tree, _ = build(g, data)
    seq_tree, _ = build(g, data)
    model = dict(data)
    changes: list[tuple[bytes, bytes | None, bytes | None]] = []
    for key, value in ops:
        changes.append((key, model.get(key), value))
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    before_bytes = staged_tree.to_bytes()
    before = staged_tree.digest
    staged = staged_tree.stage(changes)
    assert staged_tree.to_bytes() == before_bytes  # staging changes nothing
    assert staged.digest_before == before
    assert not staged.committed
    for key, old, new in changes:
        seq_tree.update(key, old, new)
    assert staged.digest_after == seq_tree.digest
    staged.commit()
    assert staged.committed
    assert staged_tree.digest == staged.digest_after
    assert staged_tree.root() == seq_tree.root()
    assert staged_tree.to_bytes() == seq_tree.to_bytes()
    assert staged_tree.root() == build(g, model)[0].root()


def test_stage_errors() -> None:
    tree = MerkleTree(TINY)
    tree.update(b"a", None, b"1")
    with pytest.raises(MerkleError):
        tree.stage([(b"a", b"1", None), (b"a", b"1", None)])  # leaf goes below zero
    staged = tree.stage([(b"a", b"1", b"2")])
    staged.commit()
    with pytest.raises(MerkleError):
        staged.commit()
    # A commit contradicted by a change made after staging is refused whole.
    staged = tree.stage([(b"a", b"2", None)])
    tree.update(b"a", b"2", None)
    before = tree.to_bytes()
    with pytest.raises(MerkleError):
        staged.commit()
    assert tree.to_bytes() == before
    assert not staged.committed


@given(dicts_st, geometries_st)
@settings(max_examples=40, deadline=None)
def test_tree_bytes_round_trip(data: dict[bytes, bytes], g: Geometry) -> None:
    tree, _ = build(g, data)
    copy = MerkleTree.from_bytes(tree.to_bytes())
    assert copy.geometry == g
    assert copy.digest == tree.digest
    assert copy.root() == tree.root()
    assert copy.level_digests(g.depth) == tree.level_digests(g.depth)
    for k, v in data.items():  # the copy keeps working incrementally
        copy.update(k, v, None)
    assert copy.digest == EMPTY_DIGEST
    assert copy.root() == MerkleTree(g).root()


def _resign(body: bytes) -> bytes:
    return body + xxh3_64_digest(body)


def test_tree_from_bad_bytes() -> None:
    good = MerkleTree(TINY).to_bytes()
    body = good[:-8]
    bad: list[Any] = [
        b"",
        good[:8],
        good[:-1],
        good + b"\0",
        "not bytes",
        _resign(b"XXXX" + body[4:]),  # magic
        _resign(body[:4] + b"\x02" + body[5:]),  # format version
        _resign(body[:5] + (3).to_bytes(2, "big") + body[7:]),  # fanout 3
        _resign(body[:5] + (4).to_bytes(2, "big") + body[7:]),  # valid geometry, wrong length
        _resign(body[:8] + (bytes(16) + (2**63).to_bytes(8, "big")) * 2),  # 2**64 entries
        good[:-8] + bytes(8),  # checksum
        body[:-1] + b"\x01" + good[-8:],  # corrupted body
    ]
    for raw in bad:
        with pytest.raises(MerkleError):
            MerkleTree.from_bytes(raw)
    assert MerkleTree.from_bytes(bytearray(good)).root() == MerkleTree(TINY).root()


# --- leaf index --------------------------------------------------------------


def test_memory_leaf_index() -> None:
    index = MemoryLeafIndex(TINY)
    index.update(b"b", None, b"2")
    index.update(b"a", None, b"1")
    index.update(b"c", None, b"3")
    index.update(b"c", b"3", b"4")
    assert len(index) == 3
    assert index.get_hash(b"c") == entry_hash(b"c", b"4")
    assert index.get_hash(b"zz") is None
    listing = index.leaf_entries(0) + index.leaf_entries(1)
    assert sorted(listing) == sorted(
        [
            (b"a", entry_hash(b"a", b"1")),
            (b"b", entry_hash(b"b", b"2")),
            (b"c", entry_hash(b"c", b"4")),
        ]
    )
    for leaf in (0, 1):
        entries = index.leaf_entries(leaf)
        assert entries == sorted(entries)
        assert all(TINY.leaf_of(k) == leaf for k, _ in entries)
    copy = index.copy()
    index.update(b"a", b"1", None)
    index.update(b"never", None, None)
    assert len(index) == 2
    assert len(copy) == 3
    assert index.get_hash(b"a") is None
    assert copy.get_hash(b"a") == entry_hash(b"a", b"1")
    with pytest.raises(MerkleError):
        index.leaf_entries(2)
    with pytest.raises(MerkleError):
        index.leaf_entries(-1)


# --- comparison --------------------------------------------------------------


def expected_diff(local: dict[bytes, bytes], remote: dict[bytes, bytes]) -> set[bytes]:
    return {k for k in local.keys() | remote.keys() if local.get(k) != remote.get(k)}


@given(dicts_st, dicts_st, geometries_st, st.integers(1, 4))
@settings(max_examples=80, deadline=None)
def test_comparison_finds_exactly_the_differing_keys(
    local_data: dict[bytes, bytes],
    remote_data: dict[bytes, bytes],
    g: Geometry,
    per_query: int,
) -> None:
    local = build(g, local_data)
    remote = build(g, remote_data)
    cmp = compare(local, remote, levels_per_query=per_query)
    diff = expected_diff(local_data, remote_data)
    assert cmp.differing_keys == diff
    assert not cmp.too_many
    assert cmp.remote_hashes == {k: entry_hash(k, remote_data[k]) for k in diff if k in remote_data}
    if not diff:
        assert cmp.round_trips == 1
    else:
        # ceil(depth / per_query) node rounds plus one leaf round
        assert cmp.round_trips == -(-g.depth // per_query) + 1


@given(dicts_st, st.lists(st.tuples(keys_st, st.one_of(st.none(), values_st)), max_size=5))
@settings(max_examples=60, deadline=None)
def test_few_edits_default_geometry_three_round_trips(
    data: dict[bytes, bytes], edits: list[tuple[bytes, bytes | None]]
) -> None:
    remote_data = dict(data)
    for k, v in edits:
        if v is None:
            remote_data.pop(k, None)
        else:
            remote_data[k] = v
    cmp = compare(build(DEFAULT, data), build(DEFAULT, remote_data))
    diff = expected_diff(data, remote_data)
    assert cmp.differing_keys == diff
    assert cmp.round_trips == (3 if diff else 1)


def test_comparison_with_updates_between_replicas_through_trees() -> None:
    rnd = random.Random(7)
    data = {b"key:%d" % i: b"v%d" % i for i in range(3000)}
    origin = build(DEFAULT, data)
    replica = (MerkleTree.from_bytes(origin[0].to_bytes()), origin[1].copy())
    changed = rnd.sample(sorted(data), 20)
    for k in changed:
        origin[0].update(k, data[k], b"new")
        origin[1].update(k, data[k], b"new")
    origin[0].update(b"brand-new", None, b"x")
    origin[1].update(b"brand-new", None, b"x")
    cmp = compare(replica, origin)
    assert cmp.differing_keys == {*changed, b"brand-new"}
    assert cmp.round_trips == 3
    assert cmp.remote_hashes[b"brand-new"] == entry_hash(b"brand-new", b"x")


def test_max_leaves_sets_too_many() -> None:
    local = build(SMALL, {})
    remote_data = {b"k%d" % i: b"v" for i in range(200)}
    remote = build(SMALL, remote_data)
    cmp = compare(local, remote, max_leaves=3)
    assert cmp.too_many
    assert cmp.done
    assert cmp.differing_keys == frozenset()
    small = build(SMALL, {b"k1": b"w"})
    cmp = compare(build(SMALL, {b"k1": b"v"}), small, max_leaves=1)
    assert not cmp.too_many
    assert cmp.differing_keys == {b"k1"}
    cmp = compare(build(SMALL, {b"k1": b"v"}), small, max_leaves=0)
    assert cmp.too_many


def test_comparison_constructor_errors() -> None:
    tree, index = build(TINY, {})
    with pytest.raises(MerkleError):
        MerkleComparison(tree, index, levels_per_query=0)
    with pytest.raises(MerkleError):
        MerkleComparison(tree, index, max_leaves=-1)


def _differing_pair() -> tuple[
    tuple[MerkleTree, MemoryLeafIndex], tuple[MerkleTree, MemoryLeafIndex]
]:
    local = build(SMALL, {b"a": b"1", b"b": b"2", b"c": b"3"})
    remote = build(SMALL, {b"a": b"1", b"b": b"x", b"c": b"3", b"d": b"4"})
    return local, remote


def test_wrong_node_answers_raise_protocol_error_and_keep_the_query() -> None:
    local, remote = _differing_pair()
    cmp = MerkleComparison(*local, levels_per_query=2)
    q = cmp.next_query()
    assert isinstance(q, NodeQuery)
    good = answer_nodes(remote[0], q)
    group = good.digests[0]
    bad_answers: list[Any] = [
        LeafAnswer(()),
        NodeAnswer(q.level + 1, q.levels_down, good.digests),
        NodeAnswer(q.level, q.levels_down + 1, good.digests),
        NodeAnswer(q.level, q.levels_down, ()),
        NodeAnswer(q.level, q.levels_down, (group, group)),
        NodeAnswer(q.level, q.levels_down, (group[:-1],)),
        NodeAnswer(q.level, q.levels_down, ((b"short", *group[1:]),)),
        NodeAnswer(q.level, q.levels_down, ((junk("not bytes"), *group[1:]),)),
    ]
    for bad in bad_answers:
        with pytest.raises(ProtocolError):
            cmp.feed(bad)
        assert cmp.next_query() == q
        assert cmp.round_trips == 0
    cmp.feed(good)
    assert cmp.round_trips == 1


def test_wrong_leaf_answers_raise_protocol_error_and_keep_the_query() -> None:
    local, remote = _differing_pair()
    cmp = MerkleComparison(*local, levels_per_query=3)
    q0 = cmp.next_query()
    assert isinstance(q0, NodeQuery)
    cmp.feed(answer_nodes(remote[0], q0))
    q = cmp.next_query()
    assert isinstance(q, LeafQuery)
    good = answer_leaves(remote[1], q)
    leaf, listing = good.entries[0]
    k0 = listing[0][0]
    wrong_leaf_key = next(k for k in (b"%d" % i for i in range(1000)) if SMALL.leaf_of(k) != leaf)
    rest = good.entries[1:]
    bad_answers: list[Any] = [
        NodeAnswer(0, 1, ()),
        LeafAnswer(good.entries[:-1]),
        LeafAnswer((*good.entries, (leaf, []))),
        LeafAnswer(((leaf + 1, listing), *rest)),
        LeafAnswer(((leaf, [(wrong_leaf_key, 1)]), *rest)),
        LeafAnswer(((leaf, [(k0, 1), (k0, 1)]), *rest)),
        LeafAnswer(((leaf, [(k0, -1)]), *rest)),
        LeafAnswer(((leaf, [(k0, 2**128)]), *rest)),
        LeafAnswer(((leaf, [junk(("str", 1))]), *rest)),
        LeafAnswer(((leaf, [junk((k0,))]), *rest)),
        LeafAnswer((junk((leaf,)), *rest)),
    ]
    if len(listing) > 1:
        bad_answers.append(LeafAnswer(((leaf, listing[::-1]), *rest)))
    for bad in bad_answers:
        with pytest.raises(ProtocolError):
            cmp.feed(bad)
        assert cmp.next_query() == q
        assert not cmp.done
    cmp.feed(good)
    assert cmp.done
    assert cmp.differing_keys == {b"b", b"d"}
    with pytest.raises(ProtocolError):
        cmp.feed(good)  # nothing pending any more


def test_answer_nodes_errors() -> None:
    tree = MerkleTree(SMALL)
    for q in [
        NodeQuery(-1, (0,), 1),
        NodeQuery(3, (0,), 1),
        NodeQuery(0, (0,), 0),
        NodeQuery(1, (0,), 3),
        NodeQuery(1, (4,), 1),
        NodeQuery(1, (1, 1), 1),
        NodeQuery(1, (2, 1), 1),
        NodeQuery(1, (-1,), 1),
    ]:
        with pytest.raises(MerkleError):
            answer_nodes(tree, q)
    a = answer_nodes(tree, NodeQuery(1, (1, 3), 2))
    assert a.level == 1
    assert a.levels_down == 2
    assert [len(d) for d in a.digests] == [16, 16]
    assert a.digests[1] == tuple(tree.level_digests(3)[48:64])
    assert answer_nodes(tree, NodeQuery(1, (), 1)).digests == ()


def test_answer_leaves_errors() -> None:
    index = MemoryLeafIndex(SMALL)
    for q in [LeafQuery((-1,)), LeafQuery((3, 2)), LeafQuery((1, 1)), LeafQuery((64,))]:
        with pytest.raises(MerkleError):
            answer_leaves(index, q)
    assert answer_leaves(index, LeafQuery((0, 63))).entries == ((0, []), (63, []))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 15), st.booleans(), st.booleans(), st.integers(1, 2**128 - 1)),
        max_size=60,
    )
)
def test_update_leaves_equals_update_leaf_one_by_one(
    ops: list[tuple[int, bool, bool, int]],
) -> None:
    geometry = Geometry(fanout=4, depth=2)
    one, many = MerkleTree(geometry), MerkleTree(geometry)
    live: dict[int, list[int]] = {}
    changes: list[tuple[int, int | None, int | None]] = []
    for leaf, remove, add, h in ops:
        old = live[leaf].pop() if remove and live.get(leaf) else None
        new = h if add else None
        if new is not None:
            live.setdefault(leaf, []).append(new)
        changes.append((leaf, old, new))
        one.update_leaf(leaf, old, new)
    many.update_leaves(changes)
    assert many.digest == one.digest and many.root() == one.root()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 15), st.integers(1, 2**128 - 1)), max_size=60),
    st.lists(st.tuples(st.integers(0, 15), st.integers(1, 2**128 - 1)), max_size=20),
)
def test_insert_many_equals_update_leaves_of_inserts(
    before: list[tuple[int, int]], entries: list[tuple[int, int]]
) -> None:
    geometry = Geometry(fanout=4, depth=2)
    one, many = MerkleTree(geometry), MerkleTree(geometry)
    for tree in (one, many):
        tree.update_leaves([(leaf, None, h) for leaf, h in before])
        tree.root()  # digests computed, so the inserts must mark leaves dirty
    one.update_leaves([(leaf, None, h) for leaf, h in entries])
    many.insert_many([leaf for leaf, _ in entries], [h for _, h in entries])
    assert many.digest == one.digest and many.root() == one.root()
    assert [many.leaf_digest(i) for i in range(16)] == [one.leaf_digest(i) for i in range(16)]


def test_insert_many_refuses_bad_input_changing_nothing() -> None:
    tree = MerkleTree(Geometry(fanout=4, depth=2))
    tree.insert_many([1], [5])
    for leaves, hashes in (([2, 16], [7, 8]), ([-1], [7]), ([2, 3], [7])):
        with pytest.raises(MerkleError):
            tree.insert_many(leaves, hashes)
        assert tree.digest == Digest(1, 5)


def test_update_leaves_stops_at_a_bad_change_with_the_earlier_ones_applied() -> None:
    tree = MerkleTree(Geometry(fanout=4, depth=2))
    with pytest.raises(MerkleError, match="no leaf"):
        tree.update_leaves([(1, None, 5), (99, None, 6)])
    assert tree.digest == Digest(1, 5)
    with pytest.raises(MerkleError, match="delete from empty leaf"):
        tree.update_leaves([(2, None, 7), (3, 9, None)])
    assert tree.digest == Digest(2, 5 ^ 7)


@given(dicts_st, dicts_st, st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_queries_split_at_max_per_query_find_the_same_keys(
    local_data: dict[bytes, bytes], remote_data: dict[bytes, bytes], per_query: int
) -> None:
    g = Geometry(fanout=4, depth=3)
    local, remote = build(g, local_data), build(g, remote_data)
    whole = compare(local, remote)
    split = MerkleComparison(local[0], local[1], max_per_query=per_query)
    while (q := split.next_query()) is not None:
        indices = q.indices if isinstance(q, NodeQuery) else q.leaves
        assert len(indices) <= per_query
        if isinstance(q, NodeQuery):
            split.feed(answer_nodes(remote[0], q))
        else:
            split.feed(answer_leaves(remote[1], q))
    assert split.differing_keys == whole.differing_keys == expected_diff(local_data, remote_data)
    assert split.remote_hashes == whole.remote_hashes
    with pytest.raises(MerkleError, match="max_per_query"):
        MerkleComparison(local[0], local[1], max_per_query=0)
