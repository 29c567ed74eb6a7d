"""Tests of replicad.version_queue: the diff property for any history and any
merge, incremental persistence, serialization, and every error path."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicad.errors import (
    ConfigError,
    CorruptStateError,
    CursorAheadError,
    EpochMismatchError,
    HistoryTruncatedError,
    VersionOrderError,
)
from replicad.version_queue import (
    DEFAULT_POLICY,
    POLICIES,
    BinaryCounterPolicy,
    Entry,
    HalvingPolicy,
    MergePolicy,
    OldestFirstPolicy,
    QueueDelta,
    VersionQueue,
    decode_entry,
    encode_entry,
    policy_by_name,
)

EPOCH = bytes(range(16))
OTHER_EPOCH = bytes(16)

POLICY_FACTORIES: dict[str, Callable[[], MergePolicy]] = {
    **POLICIES,
    "binary-counter k=1": lambda: BinaryCounterPolicy(1),
    "binary-counter k=2": lambda: BinaryCounterPolicy(2),
}

KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"])
OPS = st.tuples(KEYS, st.none() | st.binary(min_size=1, max_size=2))
BATCHES = st.lists(st.lists(OPS, max_size=4), max_size=40)
Batch = list[tuple[bytes, bytes | None]]


def apply_delta(model: dict[int, Entry], delta: QueueDelta) -> None:
    for version in delta.removed:
        model.pop(version, None)
    for entry in delta.added:
        model[entry.version] = entry


def apply_batch(state: dict[bytes, bytes], batch: Batch) -> set[bytes]:
    touched: set[bytes] = set()
    for key, value in batch:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
        touched.add(key)
    return touched


def single_key_batches(q: VersionQueue, n: int) -> None:
    for _ in range(n):
        v = q.version + 1
        q.push(v, [b"k%d" % v])


def spans(q: VersionQueue) -> list[int]:
    versions = [q.floor] + [e.version for e in q.entries]
    return [b - a for a, b in itertools.pairwise(versions)]


# --- the diff property --------------------------------------------------------


@settings(max_examples=600, deadline=None)
@given(
    batches=BATCHES,
    policy=st.sampled_from(sorted(POLICY_FACTORIES)),
    max_entries=st.integers(1, 8),
    max_keys=st.none() | st.integers(1, 20),
    floor=st.integers(0, 3),
)
def test_diff_since_any_version_yields_the_origin_state(
    batches: list[Batch], policy: str, max_entries: int, max_keys: int | None, floor: int
) -> None:
    q = VersionQueue(
        EPOCH,
        floor=floor,
        max_entries=max_entries,
        max_keys=max_keys,
        policy=POLICY_FACTORIES[policy](),
    )
    origin: dict[bytes, bytes] = {}
    states: dict[int, dict[bytes, bytes]] = {floor: {}}
    touched_at: dict[int, set[bytes]] = {}
    persisted: dict[int, Entry] = {}
    for i, batch in enumerate(batches):
        version = floor + i + 1
        touched_at[version] = apply_batch(origin, batch)
        states[version] = dict(origin)
        delta = q.push(version, touched_at[version])
        # The delta reproduces the queue in a per-entry store.
        apply_delta(persisted, delta)
        assert tuple(persisted[v] for v in sorted(persisted)) == q.entries
        assert delta.floor == q.floor
        assert not set(delta.removed) & {e.version for e in delta.added}
        # Invariants of the structure.
        assert q.version == version
        assert len(q.entries) <= max_entries
        assert q.total_keys() == sum(len(e.keys) for e in q.entries)
        if max_keys is not None:
            assert q.total_keys() <= max_keys
        assert all(q.floor < e.version <= version for e in q.entries)
        # The property, for every replica version the queue can serve.
        for since in range(q.floor, version + 1):
            diff = q.keys_since(EPOCH, since)
            replica = dict(states[since])
            for key in diff:
                if key in origin:
                    replica[key] = origin[key]
                else:
                    replica.pop(key, None)
            assert replica == origin
            changed = set().union(*(touched_at[v] for v in range(since + 1, version + 1)))
            assert changed <= diff
        for since in range(floor, q.floor):
            with pytest.raises(HistoryTruncatedError):
                q.keys_since(EPOCH, since)


@settings(max_examples=100, deadline=None)
@given(batches=BATCHES, policy=st.sampled_from(sorted(POLICY_FACTORIES)))
def test_keys_since_is_exact_without_merging(batches: list[Batch], policy: str) -> None:
    q = VersionQueue(EPOCH, max_entries=64, policy=POLICY_FACTORIES[policy]())
    touched_at = [apply_batch({}, b) for b in batches]
    for version, touched in enumerate(touched_at, 1):
        q.push(version, touched)
    for since in range(q.version + 1):
        assert q.keys_since(EPOCH, since) == set().union(*touched_at[since:])


@settings(max_examples=100, deadline=None)
@given(
    first=BATCHES,
    then=BATCHES,
    policy=st.sampled_from(sorted(POLICY_FACTORIES)),
    max_entries=st.integers(1, 8),
    max_keys=st.none() | st.integers(1, 20),
)
def test_reloaded_queues_behave_identically(
    first: list[Batch], then: list[Batch], policy: str, max_entries: int, max_keys: int | None
) -> None:
    def make() -> MergePolicy:
        return POLICY_FACTORIES[policy]()

    q = VersionQueue(EPOCH, max_entries=max_entries, max_keys=max_keys, policy=make())
    persisted: dict[int, Entry] = {}
    floor = 0
    for b in first:
        delta = q.push(q.version + 1, apply_batch({}, b))
        apply_delta(persisted, delta)
        floor = delta.floor
    config = {"max_entries": max_entries, "max_keys": max_keys}
    copies = [
        VersionQueue.from_bytes(q.to_bytes(), policy=make(), **config),  # type: ignore[arg-type]
        VersionQueue.from_entries(
            EPOCH,
            floor,
            q.version,
            reversed([decode_entry(encode_entry(e)) for e in persisted.values()]),
            policy=make(),
            **config,  # type: ignore[arg-type]
        ),
    ]
    for c in copies:
        assert (c.epoch, c.floor, c.version, c.entries) == (q.epoch, q.floor, q.version, q.entries)
        assert c.total_keys() == q.total_keys()
    for b in then:
        touched = apply_batch({}, b)
        deltas = {q.push(q.version + 1, touched)} | {c.push(c.version + 1, touched) for c in copies}
        assert len(deltas) == 1
        assert all(c.entries == q.entries for c in copies)


# --- policies -----------------------------------------------------------------


def test_policy_registry() -> None:
    assert set(POLICIES) == {"halving", "oldest-first", "binary-counter"}
    for name in POLICIES:
        assert policy_by_name(name).name == name
    assert DEFAULT_POLICY in POLICIES
    assert VersionQueue(EPOCH).policy.name == DEFAULT_POLICY


def test_halving_merges_pairs_like_the_seed() -> None:
    q = VersionQueue(EPOCH, max_entries=4, policy=HalvingPolicy())
    single_key_batches(q, 5)
    assert q.entries == (
        Entry(2, frozenset({b"k1", b"k2"})),
        Entry(4, frozenset({b"k3", b"k4"})),
        Entry(5, frozenset({b"k5"})),
    )


def test_oldest_first_keeps_the_newest_exact() -> None:
    q = VersionQueue(EPOCH, max_entries=4, policy=OldestFirstPolicy())
    single_key_batches(q, 10)
    assert spans(q) == [7, 1, 1, 1]
    assert q.entries[0].keys == {b"k%d" % v for v in range(1, 8)}


def test_oldest_first_state_matches_the_benchmark_shortcut() -> None:
    """benchmarks/bench_version_queue.py builds this state directly."""
    batches = [frozenset({b"k%d" % (v % 7), b"x%d" % v}) for v in range(1, 60)]
    for max_entries in (1, 2, 5, 16, 100):
        q = VersionQueue(EPOCH, max_entries=max_entries, policy=OldestFirstPolicy())
        for v, keys in enumerate(batches, 1):
            q.push(v, keys)
        n = len(batches)
        expected = [Entry(v, batches[v - 1]) for v in range(1, n + 1)]
        if n > max_entries:
            cut = n - max_entries + 1
            expected = [Entry(cut, frozenset().union(*batches[:cut])), *expected[cut:]]
        assert list(q.entries) == expected


@pytest.mark.parametrize("k", [2, 3, 5])
def test_binary_counter_layout(k: int) -> None:
    q = VersionQueue(EPOCH, max_entries=64, policy=BinaryCounterPolicy(k))
    for n in (65, 300, 5000):
        single_key_batches(q, n - q.version)
        s = spans(q)
        classes = [x.bit_length() - 1 for x in s]
        assert classes == sorted(classes, reverse=True)  # coarser towards the past
        assert s[-1] == 1  # the newest entry is exact
        for c in set(classes[1:]):  # the oldest entry may absorb the fallback
            assert classes[1:].count(c) <= k or c == 0  # class 0 refills between passes


def test_binary_counter_auto_covers_history_with_relative_precision() -> None:
    q = VersionQueue(EPOCH, max_entries=64, policy=BinaryCounterPolicy())
    single_key_batches(q, 20_000)
    versions = [q.floor] + [e.version for e in q.entries]
    for lower, upper in itertools.pairwise(versions[1:]):
        age = q.version - lower  # the lag of a replica at this entry's lower bound
        assert upper - lower <= age  # span <= age: at most 2x redundancy, any lag
    assert len(q.entries) <= 64


def test_binary_counter_with_irregular_spans() -> None:
    q = VersionQueue(EPOCH, max_entries=8, policy=BinaryCounterPolicy(2))
    for v in range(1, 400):
        q.push(v, [b"k"] if v % 37 == 0 or v % 5 == 0 or v > 390 else [])
        assert len(q.entries) <= 8
    assert q.keys_since(EPOCH, 395) == {b"k"}


def test_policies_return_short_lists_unchanged() -> None:
    entries = [Entry(1, frozenset({b"a"}))]
    for factory in POLICY_FACTORIES.values():
        assert factory().merge(entries, 4) is entries


def test_policies_handle_lists_far_over_the_bound() -> None:
    entries = [Entry(v, frozenset({b"k%d" % v})) for v in range(1, 101)]
    for factory in POLICY_FACTORIES.values():
        merged = factory().merge(entries, 3)
        assert len(merged) <= 3
        assert merged[-1].version == 100
        assert frozenset().union(*(e.keys for e in merged)) == {b"k%d" % v for v in range(1, 101)}


# --- pushes, floors, truncation -------------------------------------------------


def test_empty_batch_bumps_the_version_only() -> None:
    q = VersionQueue(EPOCH, floor=10)
    assert q.version == 10
    assert q.push(11, []) == QueueDelta((), (), 10)
    assert q.version == 11
    assert q.entries == ()
    assert q.keys_since(EPOCH, 10) == frozenset()
    q.push(12, {b"a"})
    assert q.keys_since(EPOCH, 10) == {b"a"}
    assert q.keys_since(EPOCH, 12) == frozenset()


def test_max_keys_drops_oldest_and_raises_the_floor() -> None:
    q = VersionQueue(EPOCH, max_entries=100, max_keys=5)
    q.push(1, [b"a", b"b"])
    q.push(2, [b"c", b"d"])
    delta = q.push(3, [b"e", b"f"])
    assert delta == QueueDelta((1,), (Entry(3, frozenset({b"e", b"f"})),), 1)
    assert q.floor == 1
    assert q.total_keys() == 4
    with pytest.raises(HistoryTruncatedError):
        q.keys_since(EPOCH, 0)
    assert q.keys_since(EPOCH, 1) == {b"c", b"d", b"e", b"f"}


def test_batch_larger_than_max_keys_empties_the_queue() -> None:
    q = VersionQueue(EPOCH, max_keys=2)
    q.push(1, [b"a"])
    delta = q.push(2, [b"a", b"b", b"c"])
    assert delta == QueueDelta((1, 2), (), 2)
    assert (q.floor, q.version, q.entries, q.total_keys()) == (2, 2, (), 0)
    assert q.keys_since(EPOCH, 2) == frozenset()
    with pytest.raises(HistoryTruncatedError):
        q.keys_since(EPOCH, 1)


def test_entries_is_a_snapshot() -> None:
    q = VersionQueue(EPOCH)
    q.push(1, [b"a"])
    snapshot = q.entries
    q.push(2, [b"b"])
    assert snapshot == (Entry(1, frozenset({b"a"})),)
    assert "version=2" in repr(q)
    assert q.max_entries == 1024
    assert q.max_keys is None


# --- error paths ------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 3, True, 2.0, "2"])
def test_push_out_of_order_is_rejected_and_changes_nothing(version: object) -> None:
    q = VersionQueue(EPOCH)
    q.push(1, [b"a"])
    with pytest.raises(VersionOrderError):
        q.push(version, [b"b"])  # type: ignore[arg-type]
    assert (q.version, q.entries) == (1, (Entry(1, frozenset({b"a"})),))


def test_keys_since_errors() -> None:
    q = VersionQueue(EPOCH, floor=5)
    q.push(6, [b"a"])
    with pytest.raises(EpochMismatchError):
        q.keys_since(OTHER_EPOCH, 6)
    with pytest.raises(CursorAheadError):
        q.keys_since(EPOCH, 7)
    with pytest.raises(HistoryTruncatedError):
        q.keys_since(EPOCH, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epoch": b"short"},
        {"epoch": "x" * 16},
        {"floor": -1},
        {"floor": 1.5},
        {"max_entries": 0},
        {"max_entries": 2.0},
        {"max_keys": 0},
    ],
)
def test_bad_configuration(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"epoch": EPOCH, **kwargs}
    with pytest.raises(ConfigError):
        VersionQueue(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_bad_per_class(bad: object) -> None:
    with pytest.raises(ConfigError):
        BinaryCounterPolicy(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nope", "", None])
def test_unknown_policy_name(name: object) -> None:
    with pytest.raises(ConfigError):
        policy_by_name(name)  # type: ignore[arg-type]


class _GreedyPolicy:
    name = "greedy"

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        return list(entries)  # ignores the bound


class _ForgetfulPolicy:
    name = "forgetful"

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        return entries[:max_entries]  # drops the newest


class _BrokenPolicy:
    name = "broken"

    def merge(self, entries: list[Entry], max_entries: int) -> list[Entry]:
        raise ConfigError("broken on purpose")


@pytest.mark.parametrize("policy", [_GreedyPolicy(), _ForgetfulPolicy(), _BrokenPolicy()])
def test_policy_breaking_its_contract(policy: MergePolicy) -> None:
    q = VersionQueue(EPOCH, max_entries=2, policy=policy)
    q.push(1, [b"a"])
    q.push(2, [b"b"])
    before = (q.version, q.entries, q.total_keys())
    with pytest.raises(ConfigError):
        q.push(3, [b"c"])
    assert (q.version, q.entries, q.total_keys()) == before


# --- serialization ----------------------------------------------------------------


def _queue() -> VersionQueue:
    q = VersionQueue(EPOCH, floor=3, max_entries=4, policy=HalvingPolicy())
    for v in range(4, 14):
        q.push(v, [b"k%d" % (v % 3), b"\x00\xff"])
    q.push(14, [])
    return q


def test_to_bytes_round_trip_and_is_canonical() -> None:
    q = _queue()
    data = q.to_bytes()
    r = VersionQueue.from_bytes(data, max_entries=4, policy=HalvingPolicy())
    assert (r.epoch, r.floor, r.version, r.entries) == (EPOCH, 3, 14, q.entries)
    assert r.to_bytes() == data


def test_encode_entry_round_trip() -> None:
    e = Entry(7, frozenset({b"", b"z", b"\x00" * 511}))
    assert decode_entry(encode_entry(e)) == e
    assert encode_entry(e) == encode_entry(Entry(7, frozenset(sorted(e.keys, reverse=True))))


def _doc(*fields: object) -> bytes:
    return bytes(msgpack.packb(list(fields), use_bin_type=True))


CORRUPT_DOCUMENTS = {
    "not msgpack": b"\xc1",
    "truncated": _queue().to_bytes()[:-3],
    "trailing bytes": _queue().to_bytes() + b"\x00",
    "not a list": _doc() + b"",
    "wrong format": _doc(2, EPOCH, 0, 0, []),
    "short": _doc(1, EPOCH, 0, 0),
    "short epoch": _doc(1, b"x", 0, 0, []),
    "str epoch": _doc(1, "x" * 16, 0, 0, []),
    "negative floor": _doc(1, EPOCH, -1, 0, []),
    "version below floor": _doc(1, EPOCH, 5, 4, []),
    "entries not a list": _doc(1, EPOCH, 0, 3, {}),
    "entry not a pair": _doc(1, EPOCH, 0, 3, [[1]]),
    "entry version zero": _doc(1, EPOCH, 0, 3, [[0, []]]),
    "entry version bool": _doc(1, EPOCH, 0, 3, [[True, []]]),
    "entry keys not bytes": _doc(1, EPOCH, 0, 3, [[1, ["a"]]]),
    "entry keys not a list": _doc(1, EPOCH, 0, 3, [[1, b"a"]]),
    "entry above version": _doc(1, EPOCH, 0, 3, [[4, [b"a"]]]),
    "entry at floor": _doc(1, EPOCH, 2, 3, [[2, [b"a"]]]),
    "duplicate versions": _doc(1, EPOCH, 0, 3, [[2, [b"a"]], [2, [b"b"]]]),
    "ext type": bytes(msgpack.packb(msgpack.ExtType(1, b"x"))),
    "map with int key": b"\x81\x01\x02",
}


@pytest.mark.parametrize("name", sorted(CORRUPT_DOCUMENTS))
def test_from_bytes_rejects_corrupt_state(name: str) -> None:
    with pytest.raises(CorruptStateError):
        VersionQueue.from_bytes(CORRUPT_DOCUMENTS[name])


def test_from_bytes_rejects_non_bytes() -> None:
    with pytest.raises(CorruptStateError):
        VersionQueue.from_bytes("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", _doc(1), _doc(0, []), _doc(1, [b"a"], 3), _doc("1", [b"a"]), _doc(2, [1])],
)
def test_decode_entry_rejects_garbage(data: bytes) -> None:
    with pytest.raises(CorruptStateError):
        decode_entry(data)


def _entries(*versions: int) -> Iterable[Entry]:
    return [Entry(v, frozenset({b"k"})) for v in versions]


@pytest.mark.parametrize(
    ("floor", "version", "entries"),
    [
        (5, 4, []),
        (-1, 4, []),
        (0, 4, _entries(2, 2)),
        (0, 4, _entries(5)),
        (2, 4, _entries(2)),
        (0, 4, [Entry(1, frozenset({"k"}))]),  # type: ignore[arg-type]
        (0, 4, [Entry(1, {b"k"})]),  # type: ignore[arg-type]
        (0, 4, [(1, frozenset({b"k"}))]),
    ],
)
def test_from_entries_rejects_inconsistent_state(
    floor: int, version: int, entries: Iterable[Entry]
) -> None:
    with pytest.raises(CorruptStateError):
        VersionQueue.from_entries(EPOCH, floor, version, entries)


def test_from_entries_rejects_bad_epoch_and_config() -> None:
    with pytest.raises(CorruptStateError):
        VersionQueue.from_entries(b"short", 0, 0, [])
    with pytest.raises(ConfigError):
        VersionQueue.from_entries(EPOCH, 0, 0, [], max_entries=0)


def test_reloaded_queue_over_the_bound_shrinks_at_next_push() -> None:
    q = VersionQueue.from_entries(EPOCH, 0, 10, _entries(*range(1, 11)), max_entries=3)
    assert len(q.entries) == 10
    q.push(11, [b"x"])
    assert len(q.entries) <= 3
    assert q.keys_since(EPOCH, 0) == {b"k", b"x"}


def test_advance_covers_several_versions_in_one_entry() -> None:
    q = VersionQueue(b"e" * 16)
    q.push(1, [b"a"])
    q.advance(5, [b"b", b"c"])  # versions 2..5 arrived as one diff
    assert q.version == 5
    assert q.keys_since(b"e" * 16, 1) == {b"b", b"c"}
    assert q.keys_since(b"e" * 16, 3) == {b"b", b"c"}  # inside the span: a superset
    assert q.keys_since(b"e" * 16, 0) == {b"a", b"b", b"c"}
    for bad in (5, 4):
        with pytest.raises(VersionOrderError):
            q.advance(bad, [b"x"])
    assert q.version == 5 and q.keys_since(b"e" * 16, 5) == frozenset()
