"""The sidecar's LMDB mirror, driven by the real replica state machine from
the real origin store (both on real LMDB files)."""

from __future__ import annotations

import random
from pathlib import Path

import lmdb
import msgpack
import pytest

from replicad.errors import StorageError
from replicad.loopback import LoopbackDriver
from replicad.merkle import Geometry, entry_hash
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync, SyncConfig
from replicad.sample import seed_like_record, seed_like_schema
from replicad.store import OriginStore
from sidecar.mirror import Mirror


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


@pytest.fixture
def origin(tmp_path: Path) -> OriginStore:
    store = OriginStore(tmp_path / "origin", durable=False)
    store.create_dataset(DatasetSpec("up", seed_like_schema()))
    for s in range(0, 600, 200):
        ok(
            store.commit(
                [WriteBatch("up", {b"u%05d" % i: seed_like_record(i) for i in range(s, s + 200)})]
            )[0]
        )
    return store


def origin_records(store: OriginStore, name: str = "up") -> dict[bytes, bytes]:
    with store.view(name) as view:
        return dict(view.scan(None, 10**9)[0])


def connect(
    mirror: Mirror,
    origin: OriginStore,
    *,
    now: float = 0.0,
    chunk: int = 50,
    stream: bool = True,
    name: str = "up",
) -> tuple[ReplicaSync, LoopbackDriver]:
    handle = mirror.ensure(name)
    sync = ReplicaSync(
        name,
        state=handle.state(),
        local=handle,
        rng=random.Random(5),
        now=now,
        config=SyncConfig(snapshot_chunk=chunk, snapshot_stream=stream),
    )
    return sync, LoopbackDriver(sync, handle, origin)


def test_bootstrap_follow_and_reopen(tmp_path: Path, origin: OriginStore) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False)
    sync, driver = connect(mirror, origin)
    driver.run(0.0)
    assert mirror.items("up") == origin_records(origin)
    assert mirror.cursor("up") == origin.info("up").cursor
    assert mirror.digest("up") == origin.info("up").digest
    assert mirror.definition("up") is not None
    ok(origin.commit([WriteBatch("up", {b"u00001": seed_like_record(9)}, [b"u00002"])])[0])
    sync.hint(Hint("up", origin.info("up").cursor, origin.info("up").digest), 1.0)
    driver.run(1.0)
    assert mirror.items("up") == origin_records(origin)
    mirror.close()
    again = Mirror(tmp_path / "mirror", durable=False)
    assert again.cursor("up") == origin.info("up").cursor
    assert again.digest("up") == origin.info("up").digest  # tree rebuilt from the leaf index
    assert again.items("up") == origin_records(origin)
    again.close()


def test_old_generation_is_emptied_and_readers_see_whole_versions(
    tmp_path: Path, origin: OriginStore
) -> None:
    # a small Merkle geometry: 600 changed keys touch most leaves -> snapshot
    origin.create_dataset(DatasetSpec("small", seed_like_schema(), geometry=Geometry(16, 2)))
    ok(
        origin.commit(
            [WriteBatch("small", {b"u%05d" % i: seed_like_record(i) for i in range(600)})]
        )[0]
    )
    mirror = Mirror(tmp_path / "mirror", durable=False)
    sync, driver = connect(mirror, origin, name="small")
    driver.run(0.0)
    # a reader that began before a re-snapshot keeps its version (an app
    # process opens the same files; in this process, the mirror's own env)
    env = mirror._env
    txn = env.begin()
    meta = env.open_db(b"meta", txn=txn, create=False)
    doc = msgpack.unpackb(txn.get(b"ds/small", db=meta), raw=False)
    gen_before = doc["gen"]
    records = env.open_db(f"d/small/{gen_before % 2}".encode(), txn=txn, create=False)
    before = {bytes(k): bytes(v) for k, v in txn.cursor(db=records)}
    assert before == origin_records(origin, "small")
    origin.reset_history("small")
    new = {b"z%05d" % i: seed_like_record(i) for i in range(600)}
    ok(origin.commit([WriteBatch("small", new, replace=True)])[0])
    sync.request_pull()
    driver.run(1.0)
    assert sync.stats.syncs.get("snapshot") == 2  # everything differed: a snapshot
    # the old reader still sees the old version, whole
    assert {bytes(k): bytes(v) for k, v in txn.cursor(db=records)} == before
    txn.abort()
    with env.begin() as txn2:
        doc2 = msgpack.unpackb(txn2.get(b"ds/small", db=meta), raw=False)
        assert doc2["gen"] == gen_before + 1
        assert doc2["version"] == origin.info("small").cursor.version
        assert txn2.stat(records)["entries"] == 0  # the old slot was emptied
    assert mirror.items("small") == origin_records(origin, "small")
    mirror.close()


def test_snapshot_resumes_after_a_crash(tmp_path: Path, origin: OriginStore) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False)
    _, driver = connect(mirror, origin, stream=False)
    driver.fail_request = lambda n: n == 5  # the 5th chunk request dies
    driver.run(0.0)
    assert mirror.cursor("up") is None and mirror.state("up").staging is not None
    mirror.close()  # the process dies; the staged chunks are committed
    ok(origin.commit([WriteBatch("up", {b"u00003": seed_like_record(77)})])[0])
    mirror2 = Mirror(tmp_path / "mirror", durable=False)
    sync2, driver2 = connect(mirror2, origin, now=5.0, stream=False)
    driver2.run(5.0)
    # 600 records = 12 chunks of 50; 4 were staged before the crash, so the
    # resumed load asks for the other 8 only
    assert driver2.request_kinds.count("SnapshotRequest") == 8
    assert mirror2.items("up") == origin_records(origin)
    assert mirror2.cursor("up") == origin.info("up").cursor
    assert sync2.stats.digest_mismatches == 0
    mirror2.close()


def test_merkle_repair_after_an_epoch_change(tmp_path: Path, origin: OriginStore) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False)
    sync, driver = connect(mirror, origin)
    driver.run(0.0)
    origin.reset_history("up")
    ok(origin.commit([WriteBatch("up", {b"u00010": seed_like_record(1)}, [b"u00011"])])[0])
    applied = sync.stats.records_applied
    sync.request_pull()
    driver.run(1.0)
    assert sync.stats.syncs.get("merkle") == 1
    assert sync.stats.records_applied - applied == 2
    assert mirror.items("up") == origin_records(origin)
    mirror.close()


def test_a_full_map_grows(tmp_path: Path, origin: OriginStore) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False, map_size=256 << 10)
    _, driver = connect(mirror, origin)
    driver.run(0.0)
    assert mirror.items("up") == origin_records(origin)
    mirror.close()


def test_a_view_that_cannot_begin_does_not_block_growth(tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False)
    mirror.ensure("up")

    class Refusing:
        def __init__(self, env: object) -> None:
            self._env = env

        def begin(self, *a: object, **k: object) -> object:
            raise lmdb.ReadersFullError("no reader slot")

        def __getattr__(self, name: str) -> object:
            return getattr(self._env, name)

    real = mirror._env
    mirror._env = Refusing(real)  # type: ignore[assignment]
    with pytest.raises(lmdb.ReadersFullError), mirror.view("up"):
        pass
    mirror._env = real
    assert mirror._readers == 0
    mirror.close()


def test_max_datasets_bounds_the_mirror_and_is_checked_at_open(tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "m", durable=False, max_datasets=2)
    mirror.ensure("a")
    mirror.ensure("b")
    with pytest.raises(StorageError, match="at most 2 datasets"):
        mirror.ensure("c")
    mirror.close()
    with pytest.raises(StorageError, match="holds 2 datasets, more than max_datasets"):
        Mirror(tmp_path / "m", durable=False, max_datasets=1)
    # the refused open released the environment: a proper one opens fine
    again = Mirror(tmp_path / "m", durable=False, max_datasets=2)
    assert again.names() == ["a", "b"]
    again.close()


def test_a_snapshot_chunk_repeating_a_staged_key_keeps_the_tree_true(tmp_path: Path) -> None:
    from replicad.merkle import Digest, entry_hash
    from replicad.messages import Cursor
    from replicad.replica import Apply, SnapshotProgress, SyncKind, Target

    mirror = Mirror(tmp_path / "m", durable=False)
    handle = mirror.ensure("d")
    base = Cursor(b"e" * 16, 3)

    def chunk(records: tuple[tuple[bytes, bytes], ...], *, reset: bool, after: bytes) -> Apply:
        return Apply(
            "d", SyncKind.SNAPSHOT, Target.STAGING, records, (), None, None,
            reset_staging=reset, progress=SnapshotProgress(base, after),
        )  # fmt: skip

    assert handle.apply(chunk(((b"a", b"1"), (b"b", b"2")), reset=True, after=b"b"))
    # a server repeating "b" with another value: the general path replaces it
    assert handle.apply(chunk(((b"b", b"3"), (b"c", b"4")), reset=False, after=b"c"))
    # new keys out of order: not appendable, inserted one by one
    assert handle.apply(chunk(((b"e", b"5"), (b"d", b"6")), reset=False, after=b"e"))
    # the usual chunk: ascending, after the last staged key (appended)
    assert handle.apply(chunk(((b"f", b"7"), (b"g", b"8")), reset=False, after=b"g"))
    want = {b"a": b"1", b"b": b"3", b"c": b"4", b"d": b"6", b"e": b"5", b"f": b"7", b"g": b"8"}
    h = {k: entry_hash(k, v) for k, v in want.items()}
    xor = 0
    for v in h.values():
        xor ^= v
    expected = Digest(len(want), xor)
    final = Apply(
        "d", SyncKind.SNAPSHOT, Target.STAGING, (), (), base, expected, promote=True,
    )  # fmt: skip
    assert handle.apply(final)
    assert mirror.items("d") == want
    assert mirror.digest("d") == expected
    geometry = handle.tree.geometry
    for key in want:  # listings hold every entry's hash (the index is not built yet)
        assert (key, h[key]) in mirror.leaf_entries("d", geometry.leaf_of(key)), key
    mirror.close()


def test_the_map_is_reserved_on_disk_before_it_is_written_in_place(tmp_path: Path) -> None:
    """The mirror writes pages in place (MDB_WRITEMAP): every block of the
    map is allocated up front and before each growth, so a full disk fails a
    growth cleanly instead of a write into a hole raising SIGBUS."""
    import os

    mirror = Mirror(tmp_path / "m", durable=False, map_size=1 << 20, max_map_size=1 << 30)
    data = tmp_path / "m" / "data.mdb"

    def reserved() -> int:
        return os.stat(data).st_blocks * 512

    assert reserved() >= 1 << 20
    mirror._grow(4 << 20)
    assert reserved() >= 4 << 20
    assert mirror.env.info()["map_size"] == 4 << 20
    assert mirror.env.flags()["writemap"]
    mirror.close()


def leaf_rows(mirror: Mirror, name: str) -> dict[bytes, bytes]:
    """The live generation's leaf index, row by row."""
    with mirror.read() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=mirror._state(name).live.leaves)}


def expected_rows(mirror: Mirror, name: str) -> dict[bytes, bytes]:
    """What a complete leaf index holds for the live records."""
    leaf_of = mirror._state(name).live.tree.geometry.leaf_of
    return {
        leaf_of(k).to_bytes(4, "big") + k: entry_hash(k, v).to_bytes(16, "big")
        for k, v in mirror.items(name).items()
    }


def assert_leaf_entries_exact(mirror: Mirror, name: str, leaves: set[int]) -> None:
    geometry = mirror._state(name).live.tree.geometry
    items = mirror.items(name)
    for leaf in leaves:
        want = sorted(
            (k, entry_hash(k, v)) for k, v in items.items() if geometry.leaf_of(k) == leaf
        )
        with mirror.view(name) as view:  # (Mirror.leaf_entries would complete the index)
            assert view.leaf_entries(leaf) == want, leaf


def test_a_snapshot_load_leaves_its_leaf_index_to_a_stepwise_build_that_survives_restarts(
    tmp_path: Path, origin: OriginStore
) -> None:
    """Staged chunks write no leaf index rows; index_step adds them in key
    order, resumably; applies meanwhile keep the rows of the keys they touch,
    and leaf entries are exact at every point."""
    mirror = Mirror(tmp_path / "mirror", durable=False)
    sync, driver = connect(mirror, origin)
    driver.run(0.0)
    assert mirror.digest("up") == origin.info("up").digest
    assert not mirror.index_complete("up") and mirror.unindexed() == ["up"]
    assert leaf_rows(mirror, "up") == {}
    geometry = mirror._state("up").live.tree.geometry
    keys = sorted(mirror.items("up"))
    some_leaves = {geometry.leaf_of(k) for k in keys[::37]}
    assert_leaf_entries_exact(mirror, "up", some_leaves)

    assert mirror.index_step("up", 100)  # the first 100 keys, more to come
    assert set(leaf_rows(mirror, "up").items()) <= set(expected_rows(mirror, "up").items())
    assert len(leaf_rows(mirror, "up")) == 100
    mirror.close()

    # a restart mid-build: the tree comes from the records, the walk resumes
    mirror = Mirror(tmp_path / "mirror", durable=False)
    assert not mirror.index_complete("up")
    assert mirror.digest("up") == origin.info("up").digest
    sync, driver = connect(mirror, origin)
    # changes on both sides of the walk's position (key 100) while it is built
    changed = {b"u00003": seed_like_record(7001), b"u00450": seed_like_record(7002)}
    changed[b"u99999"] = seed_like_record(7003)
    ok(origin.commit([WriteBatch("up", changed, [b"u00004", b"u00451"])])[0])
    sync.hint(Hint("up", origin.info("up").cursor, origin.info("up").digest), 1.0)
    driver.run(1.0)
    assert mirror.items("up") == origin_records(origin)
    touched = {geometry.leaf_of(k) for k in [*changed, b"u00004", b"u00451"]}
    assert_leaf_entries_exact(mirror, "up", touched | some_leaves)
    mirror.close()  # a restart after a diff, the index still incomplete
    mirror = Mirror(tmp_path / "mirror", durable=False)
    assert not mirror.index_complete("up")
    assert mirror.digest("up") == origin.info("up").digest
    assert_leaf_entries_exact(mirror, "up", touched)
    steps = 1
    while mirror.index_step("up", 100):
        steps += 1
        assert_leaf_entries_exact(mirror, "up", touched)
    assert steps == 5  # 599 records after key 100 (the walk resumed, not restarted)
    assert mirror.index_complete("up") and mirror.unindexed() == []
    assert leaf_rows(mirror, "up") == expected_rows(mirror, "up")
    assert not mirror.index_step("up")
    mirror.close()
    again = Mirror(tmp_path / "mirror", durable=False)  # the tree from the complete index
    assert again.index_complete("up")
    assert again.digest("up") == origin.info("up").digest
    again.close()


def test_leaf_entries_during_the_build_add_the_unindexed_records(
    tmp_path: Path, origin: OriginStore
) -> None:
    mirror = Mirror(tmp_path / "mirror", durable=False)
    _, driver = connect(mirror, origin)
    driver.run(0.0)
    assert mirror.index_step("up", 100) and not mirror.index_complete("up")
    geometry = mirror._state("up").live.tree.geometry
    records = origin_records(origin)
    for key in (b"u00001", b"u00300"):  # one indexed, one not
        leaf = geometry.leaf_of(key)
        want = sorted(
            (k, entry_hash(k, v)) for k, v in records.items() if geometry.leaf_of(k) == leaf
        )
        assert mirror.leaf_entries("up", leaf) == want
    assert not mirror.index_complete("up")  # a read: it builds nothing
    mirror.close()


def test_a_diff_repeating_a_key_or_deleting_one_it_wrote_ends_like_one_write_after_another(
    tmp_path: Path,
) -> None:
    """The live path writes a batch's values, then its index rows, then its
    deletes, in passes: a key written twice ends with its last value and
    one index row, a key written then deleted ends absent with none."""
    from replicad.merkle import Digest
    from replicad.messages import Cursor
    from replicad.replica import Apply, SyncKind, Target

    mirror = Mirror(tmp_path / "m", durable=False)
    handle = mirror.ensure("d")
    epoch = b"e" * 16

    def live(upserts: tuple[tuple[bytes, bytes], ...], deletes: tuple[bytes, ...], v: int) -> bool:
        want = dict(mirror.items("d"))
        for k, val in upserts:
            want[k] = val
        for k in deletes:
            want.pop(k, None)
        xor = 0
        for k, val in want.items():
            xor ^= entry_hash(k, val)
        return handle.apply(
            Apply("d", SyncKind.DIFF, Target.LIVE, upserts, deletes, Cursor(epoch, v),
                  Digest(len(want), xor))
        )  # fmt: skip

    assert live(((b"a", b"1"), (b"b", b"2"), (b"c", b"3")), (), 1)
    assert live(((b"a", b"4"), (b"b", b"5"), (b"a", b"6"), (b"c", b"3")), (b"b",), 2)
    assert mirror.items("d") == {b"a": b"6", b"c": b"3"}
    assert leaf_rows(mirror, "d") == expected_rows(mirror, "d")
    wrong = Apply("d", SyncKind.DIFF, Target.LIVE, ((b"a", b"7"),), (), Cursor(epoch, 3),
                  Digest(2, 0))  # fmt: skip
    assert not handle.apply(wrong)  # refused whole: nothing written
    assert mirror.items("d") == {b"a": b"6", b"c": b"3"}
    assert leaf_rows(mirror, "d") == expected_rows(mirror, "d")
    mirror.close()
