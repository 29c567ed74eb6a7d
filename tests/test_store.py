"""The origin's LMDB store, on real LMDB files."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from replicad.errors import (
    BadRequestError,
    DatasetExistsError,
    FieldTypeError,
    MapFullError,
    SchemaError,
    StorageError,
    UnknownDatasetError,
)
from replicad.loopback import LoopbackDriver
from replicad.memory import MemoryMirror
from replicad.merkle import Geometry, MerkleTree
from replicad.messages import Cursor, CursorUnservable, DiffRequest, DiffResponse, Hint
from replicad.origin_types import DatasetSpec, WriteBatch, WriteResult
from replicad.replica import ReplicaSync, SyncConfig
from replicad.schema import Field, FieldType, Schema
from replicad.store import OriginStore

SCHEMA = Schema(
    1,
    (
        Field("age", FieldType.INT),
        Field("city", FieldType.STR, dictionary=True),
        Field("ctr", FieldType.FLOAT, nullable=True),
    ),
)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "origin"


@pytest.fixture
def store(store_path: Path) -> Iterator[OriginStore]:
    s = OriginStore(store_path, durable=False, map_size=4 << 20)
    s.create_dataset(DatasetSpec("up", SCHEMA))
    yield s
    s.close()


def rec(i: int, city: str = "beijing") -> dict[str, object]:
    return {"age": i, "city": city, "ctr": i / 100}


def ok(result: WriteResult | Exception) -> WriteResult:
    assert isinstance(result, WriteResult), result
    return result


def records_of(store: OriginStore, name: str) -> dict[bytes, bytes]:
    with store.view(name) as view:
        return dict(view.scan(None, 10**9)[0])


def test_create_write_read_and_versions(store: OriginStore) -> None:
    with pytest.raises(DatasetExistsError):
        store.create_dataset(DatasetSpec("up", SCHEMA))
    with pytest.raises(BadRequestError):
        store.create_dataset(DatasetSpec("bad name!", SCHEMA))
    r1 = ok(store.commit([WriteBatch("up", {b"a": rec(1), b"b": rec(2)})])[0])
    assert r1.cursor.version == 1 and (r1.upserted, r1.deleted) == (2, 0)
    r2 = ok(store.commit([WriteBatch("up", {b"a": rec(1)}, [b"b", b"never"])])[0])
    assert r2.cursor.version == 2 and (r2.upserted, r2.deleted, r2.unchanged) == (0, 1, 1)
    value, cursor = store.get("up", b"a")
    assert value is not None and store.codec("up").decode(value) == rec(1)
    assert cursor == r2.cursor
    assert store.get("up", b"b")[0] is None
    info = store.info("up")
    assert info.digest.count == 1 and info.cursor == r2.cursor
    with pytest.raises(UnknownDatasetError):
        store.info("nope")


def test_a_rejected_batch_writes_nothing_and_the_group_goes_on(store: OriginStore) -> None:
    results = store.commit(
        [
            WriteBatch("up", {b"x": rec(1)}),
            WriteBatch("up", {b"y": rec(2), b"z": {"age": "old", "city": "x"}}),
            WriteBatch("up", {b"k": rec(3)}, [b"k"]),
            WriteBatch("nope", {b"q": rec(1)}),
            WriteBatch("up", {b"w": rec(4)}),
        ]
    )
    assert isinstance(results[1], FieldTypeError)
    assert isinstance(results[2], BadRequestError)
    assert isinstance(results[3], UnknownDatasetError)
    assert ok(results[0]).cursor.version == 1
    assert ok(results[4]).cursor.version == 2
    assert set(records_of(store, "up")) == {b"x", b"w"}


def test_replace_publishes_only_changes(store: OriginStore) -> None:
    ok(store.commit([WriteBatch("up", {b"k%d" % i: rec(i) for i in range(10)})])[0])
    new = {b"k%d" % i: rec(i) for i in range(3, 12)}
    new[b"k5"] = rec(55)
    r = ok(store.commit([WriteBatch("up", new, replace=True)])[0])
    assert (r.upserted, r.deleted, r.unchanged) == (3, 3, 6)  # k5,k10,k11 | k0,k1,k2
    with store.view("up") as view:
        assert set(view.keys_since(Cursor(r.cursor.epoch, 1))) == {
            b"k5",
            b"k10",
            b"k11",
            b"k0",
            b"k1",
            b"k2",
        }
    assert set(records_of(store, "up")) == set(new)
    with pytest.raises(BadRequestError):
        raise store.commit([WriteBatch("up", {}, [b"k3"], replace=True)])[0]  # type: ignore[misc]


def test_reopen_keeps_everything_with_or_without_the_saved_tree(store_path: Path) -> None:
    s = OriginStore(store_path, durable=False)
    s.create_dataset(DatasetSpec("up", SCHEMA))
    for i in range(5):
        ok(s.commit([WriteBatch("up", {b"k%d" % j: rec(i, f"c{j}") for j in range(50)})])[0])
    before = s.info("up")
    s.close()
    s2 = OriginStore(store_path, durable=False)  # saved tree path
    assert s2.info("up") == before
    ok(s2.commit([WriteBatch("up", {b"new": rec(9, "c7")})])[0])
    after = s2.info("up")
    # crash: no close, so the saved tree is stale (older version) -> rebuilt
    del s2
    s3 = OriginStore(store_path, durable=False)
    assert s3.info("up") == after
    with s3.view("up") as view:  # history survived: a diff from version 1
        assert len(view.keys_since(Cursor(after.cursor.epoch, 1))) == 51
    value = s3.get("up", b"k3")[0]
    assert value is not None and s3.codec("up").decode(value)["city"] == "c3"
    s3.close()


def test_lost_history_on_disk_means_a_new_epoch(store_path: Path) -> None:
    s = OriginStore(store_path, durable=False)
    s.create_dataset(DatasetSpec("up", SCHEMA))
    ok(s.commit([WriteBatch("up", {b"a": rec(1)})])[0])
    before = s.info("up")
    s.close()
    env = lmdb.open(str(store_path / "origin.lmdb"), max_dbs=10)
    qdb = env.open_db(b"q/up")
    with env.begin(write=True) as txn:
        txn.put(b"\xff" * 8, b"garbage", db=qdb)
    env.close()
    s2 = OriginStore(store_path, durable=False)
    info = s2.info("up")
    assert info.cursor.epoch != before.cursor.epoch
    assert (info.cursor.version, info.queue_floor, info.digest) == (1, 1, before.digest)
    s2.close()
    s3 = OriginStore(store_path, durable=False)  # the new epoch was persisted
    assert s3.info("up").cursor == info.cursor
    s3.close()


def test_reset_history_and_schema_evolution(store: OriginStore) -> None:
    ok(store.commit([WriteBatch("up", {b"a": rec(1)})])[0])
    old = store.info("up")
    info = store.reset_history("up")
    assert info.cursor.epoch != old.cursor.epoch and info.queue_floor == 1
    resp = store.answer(DiffRequest("up", old.cursor))
    assert isinstance(resp, CursorUnservable)
    evolved = Schema(2, (*SCHEMA.fields, Field("vip", FieldType.BOOL, default=False)))
    info2 = store.evolve_schema("up", evolved)
    assert info2.schema_versions == 2 and info2.meta_revision == info.meta_revision + 1
    value = store.get("up", b"a")[0]
    assert value is not None and store.codec("up").decode(value)["vip"] is False
    with pytest.raises(SchemaError):
        store.evolve_schema("up", Schema(3, SCHEMA.fields[:1]))


def test_dictionary_growth_bumps_the_meta_revision(store: OriginStore) -> None:
    r0 = store.info("up").meta_revision
    ok(store.commit([WriteBatch("up", {b"a": rec(1, "shanghai")})])[0])
    assert store.info("up").meta_revision == r0 + 1
    ok(store.commit([WriteBatch("up", {b"b": rec(2, "shanghai")})])[0])
    assert store.info("up").meta_revision == r0 + 1
    resp = store.answer(DiffRequest("up", store.info("up").cursor, meta_revision=r0))
    assert isinstance(resp, DiffResponse) and resp.meta is not None
    # a rejected batch rolls its dictionary additions back
    bad = store.commit([WriteBatch("up", {b"c": rec(3, "wuhan"), b"d": {"age": "x"}})])[0]
    assert isinstance(bad, FieldTypeError)
    assert "wuhan" not in store.codec("up").dictionary.strings("city")


def test_the_map_grows_and_a_full_map_writes_nothing(tmp_path: Path) -> None:
    s = OriginStore(tmp_path / "o", durable=False, map_size=1 << 20, max_map_size=16 << 20)
    s.create_dataset(DatasetSpec("blobs", None, compress=False))
    big = random.Random(1).randbytes(100_000)
    for i in range(40):  # 4 MB: needs growth
        ok(s.commit([WriteBatch("blobs", {b"b%d" % i: big})])[0])
    assert s.info("blobs").digest.count == 40
    before = s.info("blobs")
    with s.view("blobs"):
        pass
    results = s.commit([WriteBatch("blobs", {b"x%d" % i: big for i in range(200)})])
    assert isinstance(results[0], MapFullError)
    assert s.info("blobs") == before
    assert len(records_of(s, "blobs")) == 40
    ok(s.commit([WriteBatch("blobs", {}, [b"b0", b"b1"])])[0])  # still usable
    s.close()


def test_views_are_consistent_while_commits_run(store: OriginStore) -> None:
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            with store.view("up") as view:
                tree = MerkleTree(Geometry())
                for k, v in view.scan(None, 10**9)[0]:
                    tree.update(k, None, v)
                if tree.digest != view.digest:
                    errors.append(f"view at {view.cursor} has another digest")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(60):
            ok(
                store.commit(
                    [WriteBatch("up", {b"k%d" % (j % 37): rec(i + j) for j in range(i, i + 9)})]
                )[0]
            )
    finally:
        stop.set()
        t.join()
    assert not errors


def test_a_replica_follows_the_store_and_repairs_with_merkle(store: OriginStore) -> None:
    for i in range(4):
        ok(store.commit([WriteBatch("up", {b"u%04d" % j: rec(i * j) for j in range(300)})])[0])
    mirror = MemoryMirror(Geometry())
    sync = ReplicaSync(
        "up",
        state=mirror.state(),
        local=mirror,
        rng=random.Random(3),
        now=0.0,
        config=SyncConfig(snapshot_chunk=64),
    )
    driver = LoopbackDriver(sync, mirror, store)
    driver.run(0.0)
    assert mirror.live.records == records_of(store, "up")
    assert mirror.cursor == store.info("up").cursor
    ok(store.commit([WriteBatch("up", {b"u0001": rec(7)}, [b"u0002"])])[0])
    sync.hint(Hint("up", store.info("up").cursor, store.info("up").digest), 1.0)
    driver.run(1.0)
    assert mirror.live.records == records_of(store, "up")
    store.reset_history("up")
    ok(store.commit([WriteBatch("up", {b"u0003": rec(8)})])[0])
    applied = sync.stats.records_applied
    sync.request_pull()
    driver.run(2.0)
    assert mirror.live.records == records_of(store, "up")
    assert mirror.cursor == store.info("up").cursor
    assert sync.stats.syncs.get("merkle") == 1
    assert sync.stats.records_applied - applied == 1
    assert sync.stats.digest_mismatches == 0


def _fill(store: OriginStore, name: str) -> None:
    blob = random.Random(2).randbytes(50_000)
    for i in range(1000):
        if isinstance(store.commit([WriteBatch(name, {b"f%d" % i: blob})])[0], MapFullError):
            return
    raise AssertionError("the map never filled")


def test_schema_changes_on_a_full_map_fail_instead_of_hanging(tmp_path: Path) -> None:
    s = OriginStore(tmp_path / "o", durable=False, map_size=1 << 20, max_map_size=1 << 20)
    s.create_dataset(DatasetSpec("up", SCHEMA))
    s.create_dataset(DatasetSpec("blobs", None, compress=False))
    _fill(s, "blobs")
    done: list[object] = []

    evolved = Schema(2, (*SCHEMA.fields, Field("x", FieldType.INT, default=0)))
    ops: list[Callable[[], object]] = [
        lambda: s.reset_history("up"),
        lambda: s.evolve_schema("up", evolved),
    ]

    def attempt() -> None:
        for op in ops:
            try:
                done.append(op())
            except MapFullError as exc:
                done.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a schema change on a full map hung"
    assert len(done) == 2
    s.close()


def test_map_growth_waits_for_open_views_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import replicad.store as store_module

    monkeypatch.setattr(store_module, "GROW_WAIT", 0.2)
    s = OriginStore(tmp_path / "o", durable=False, map_size=1 << 20, max_map_size=64 << 20)
    s.create_dataset(DatasetSpec("blobs", None, compress=False))
    blob = random.Random(3).randbytes(400_000)
    with s.view("blobs"):  # a long snapshot stream, say
        results = [s.commit([WriteBatch("blobs", {b"b%d" % i: blob})])[0] for i in range(4)]
    assert any(isinstance(r, MapFullError) for r in results)  # failed, retriable; no hang
    ok(s.commit([WriteBatch("blobs", {b"later": blob})])[0])  # the view closed: it grows
    s.close()


def test_a_failure_after_the_commit_stops_writes_until_restart(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = OriginStore(store_path, durable=False)
    s.create_dataset(DatasetSpec("up", SCHEMA))

    def broken(*args: object) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(MerkleTree, "update_leaves", broken)
    result = s.commit([WriteBatch("up", {b"a": rec(1, "chengdu")})])[0]
    assert isinstance(result, StorageError)
    monkeypatch.undo()
    assert "chengdu" in s.codec("up").dictionary.strings("city")  # codes not handed out twice
    refused = s.commit([WriteBatch("up", {b"b": rec(2)})])[0]
    assert isinstance(refused, StorageError) and "restarted" in str(refused)
    s._env.close()  # the process restarts (no clean close): memory is rebuilt from disk
    s._index.close()
    s2 = OriginStore(store_path, durable=False)
    value = s2.get("up", b"a")[0]
    assert value is not None and s2.codec("up").decode(value)["city"] == "chengdu"
    ok(s2.commit([WriteBatch("up", {b"b": rec(2, "chengdu")})])[0])
    s2.close()


def _leaf_listing(s: OriginStore, name: str = "up") -> dict[int, list[tuple[bytes, int]]]:
    leaves = s.info(name).geometry.leaves
    with s.view(name) as view:
        return {leaf: sorted(view.leaf_entries(leaf)) for leaf in range(leaves)}


def _expected_listing(s: OriginStore, name: str = "up") -> dict[int, list[tuple[bytes, int]]]:
    from replicad.merkle import entry_hash

    geometry = s.info(name).geometry
    out: dict[int, list[tuple[bytes, int]]] = {leaf: [] for leaf in range(geometry.leaves)}
    with s.view(name) as view:
        for key, value in view.scan(None, 10**9)[0]:
            out[geometry.leaf_of(key)].append((key, entry_hash(key, value)))
    return {leaf: sorted(entries) for leaf, entries in out.items()}


def test_the_leaf_index_is_rebuilt_after_a_crash_and_trusted_after_a_clean_close(
    store_path: Path,
) -> None:
    s = OriginStore(store_path, durable=False)
    s.create_dataset(DatasetSpec("up", SCHEMA, geometry=Geometry(4, 2)))
    ok(s.commit([WriteBatch("up", {b"k%03d" % i: rec(i) for i in range(300)})])[0])
    ok(s.commit([WriteBatch("up", {b"k001": rec(9)}, [b"k002"])])[0])
    assert _leaf_listing(s) == _expected_listing(s)
    digest = s.info("up").digest
    # a crash: no clean close; and the derived index lost its last writes
    s._env.close()
    with s._index.begin(write=True) as itxn:
        itxn.drop(s._datasets["up"].leaves_db, delete=False)
    s._index.close()
    s2 = OriginStore(store_path, durable=False)
    assert s2.info("up").digest == digest
    assert _leaf_listing(s2) == _expected_listing(s2)
    s2.close()
    s3 = OriginStore(store_path, durable=False)  # after a clean close: index and tree kept
    assert s3.info("up").digest == digest and _leaf_listing(s3) == _expected_listing(s3)
    s3.close()


def test_records_are_kept_in_key_order_and_a_format_1_store_is_converted(
    store_path: Path,
) -> None:
    s = OriginStore(store_path, durable=False)
    s.create_dataset(DatasetSpec("up", SCHEMA))
    ok(s.commit([WriteBatch("up", {b"k%03d" % i: rec(i) for i in range(50)})])[0])
    with s.view("up") as view:
        rows, token = view.scan(None, 10)
        assert [k for k, _ in rows] == [b"k%03d" % i for i in range(10)] and token == b"k009"
        assert [k for k, _ in view.scan(token, 3)[0]] == [b"k010", b"k011", b"k012"]
        records = dict(view.scan(None, 10**9)[0])
    digest = s.info("up").digest
    geometry = s.info("up").geometry
    s.close()
    # rewrite it the way format 1 kept records: leaf prefix + key, no marker
    env = lmdb.open(str(store_path / "origin.lmdb"), max_dbs=10)
    rdb, meta = env.open_db(b"r/up"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.drop(rdb, delete=False)
        for key, value in records.items():
            txn.put(geometry.leaf_of(key).to_bytes(4, "big") + key, value, db=rdb)
        txn.delete(b"format", db=meta)
    env.close()
    s2 = OriginStore(store_path, durable=False)
    assert s2.info("up").digest == digest
    with s2.view("up") as view:
        assert dict(view.scan(None, 10**9)[0]) == records
    assert _leaf_listing(s2) == _expected_listing(s2)
    s2.close()


def test_info_answers_while_a_commit_holds_the_state_lock(tmp_path: Path) -> None:
    """A commit holds the state lock through its fsync; info() and infos()
    (asked by the HTTP event loop on every write) must not wait for it, and
    they show the state after the last finished commit."""
    store = OriginStore(tmp_path / "s", durable=False)
    store.create_dataset(DatasetSpec("up", None))
    result = store.commit([WriteBatch("up", {b"k": b"v"})])[0]
    assert isinstance(result, WriteResult)
    answers: list[object] = []
    with store.locked():
        asker = threading.Thread(target=lambda: answers.extend([store.info("up"), store.infos()]))
        asker.start()
        asker.join(5)
        assert not asker.is_alive(), "info() waited for the state lock"
    info, infos = answers
    assert info == infos[0]  # type: ignore[index]
    assert info.cursor == result.cursor and info.digest == result.digest  # type: ignore[attr-defined]
    store.close()
