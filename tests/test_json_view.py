"""The mirror's JSON view (``json_views``): typed records also stored as the
socket's HGET replies, kept exact through diffs, snapshot loads, schema
evolution, dictionary growth, epoch changes and restarts; read by the
Reader and the socket's commands. Real origin store, real LMDB files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

from replicad.loopback import LoopbackDriver
from replicad.messages import Hint
from replicad.origin_types import DatasetSpec, WriteBatch
from replicad.replica import ReplicaSync
from replicad.sample import seed_like_record, seed_like_schema
from replicad.schema import Field, FieldType, Schema
from replicad.store import OriginStore
from sidecar.json_render import RENDERING, JsonRenderer, bulk, renders_alike, to_json
from sidecar.mirror import Mirror
from sidecar.reader import Reader, codec_from_definition
from sidecar.resp_commands import Dispatcher, ServerFacts, Session
from tests.procs import run_python
from tests.test_mirror import connect, ok


@pytest.fixture
def origin(tmp_path: Path) -> OriginStore:
    store = OriginStore(tmp_path / "origin", durable=False)
    store.create_dataset(DatasetSpec("up", seed_like_schema()))
    ok(store.commit([WriteBatch("up", {b"u%05d" % i: seed_like_record(i) for i in range(300)})])[0])
    return store


def synced(
    path: Path, origin: OriginStore, **options: Any
) -> tuple[Mirror, ReplicaSync, LoopbackDriver]:
    """A mirror of ``origin`` keeping a JSON view of ``up`` (``options``:
    more Mirror settings), bootstrapped: (mirror, sync, driver)."""
    mirror = Mirror(path, durable=False, json_views=["up"], **options)
    sync, driver = connect(mirror, origin)
    driver.run(0.0)
    return mirror, sync, driver


def follow(sync: ReplicaSync, driver: LoopbackDriver, origin: OriginStore, now: float) -> None:
    info = origin.info("up")
    sync.hint(Hint("up", info.cursor, info.digest), now)
    driver.run(now)


def rows(mirror: Mirror) -> dict[bytes, bytes]:
    """The live slot's JSON view rows."""
    db = mirror._state("up").live.json
    assert db is not None
    with mirror.read() as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}


def expected(mirror: Mirror) -> dict[bytes, bytes]:
    """Every record's HGET reply, rendered from the records as the socket
    renders them without a view."""
    definition = mirror.definition("up")
    assert definition is not None
    render = JsonRenderer(codec_from_definition(definition))
    return {k: bulk(render(v)) for k, v in mirror.items("up").items()}


def assert_right(mirror: Mirror, *, built: bool) -> None:
    """Every row present is the record's reply; a built view has them all."""
    have, want = rows(mirror), expected(mirror)
    assert all(want.get(k) == v for k, v in have.items())
    assert (mirror.json_view_state("up") == "built") is built
    if built:
        assert have == want


def build(mirror: Mirror, limit: int = 50) -> int:
    steps = 1
    while mirror.json_step("up", limit):
        steps += 1
    return steps


def test_a_bootstrap_builds_the_view_after_the_load_and_diffs_keep_it_exact(
    tmp_path: Path, origin: OriginStore
) -> None:
    mirror, sync, driver = synced(tmp_path / "m", origin)
    # a snapshot load writes no rows: built afterwards, in steps
    assert mirror.json_unbuilt() == ["up"]
    assert rows(mirror) == {}
    assert build(mirror, limit=50) == 6  # 300 records, 50 a step
    assert_right(mirror, built=True)
    # diffs: upserts, deletes, a new key, a dictionary string never seen
    new_city = {**seed_like_record(7), "city": "atlantis"}
    ok(
        origin.commit(
            [
                WriteBatch(
                    "up",
                    {b"u00001": seed_like_record(999), b"new": new_city},
                    [b"u00002", b"absent"],
                )
            ]
        )[0]
    )
    follow(sync, driver, origin, 1.0)
    assert mirror.json_view_state("up") == "built"  # a dictionary that grew renders alike
    assert_right(mirror, built=True)
    assert b"u00002" not in rows(mirror)
    assert b'"city":"atlantis"' in rows(mirror)[b"new"]
    mirror.close()


def test_a_schema_evolution_empties_the_view_and_it_is_built_again(
    tmp_path: Path, origin: OriginStore
) -> None:
    mirror, sync, driver = synced(tmp_path / "m", origin)
    build(mirror)
    old = seed_like_schema()
    fields = (*old.fields, Field("score", FieldType.FLOAT, nullable=True, default=0.5))
    origin.evolve_schema("up", Schema(old.version + 1, fields))
    ok(origin.commit([WriteBatch("up", {b"u00003": {**seed_like_record(3), "score": 2.0}})])[0])
    follow(sync, driver, origin, 1.0)
    # the old rows lack "score": emptied, the diff's own row is right
    assert mirror.json_view_state("up") == "building"
    assert set(rows(mirror)) == {b"u00003"}
    assert_right(mirror, built=False)
    build(mirror)
    assert_right(mirror, built=True)
    assert b'"score":0.5}' in rows(mirror)[b"u00004"]  # an old record, its default
    mirror.close()


def test_an_epoch_change_empties_the_view(tmp_path: Path, origin: OriginStore) -> None:
    """A Merkle repair against a new origin epoch is a diff, but the new
    epoch's dictionary may give the same codes other strings."""
    mirror, sync, driver = synced(tmp_path / "m", origin)
    build(mirror)
    origin.reset_history("up")
    ok(origin.commit([WriteBatch("up", {b"u00010": seed_like_record(1)}, [b"u00011"])])[0])
    sync.request_pull()
    driver.run(1.0)
    assert sync.stats.syncs.get("merkle") == 1
    assert mirror.json_view_state("up") == "building"
    assert_right(mirror, built=False)
    build(mirror)
    assert_right(mirror, built=True)
    mirror.close()


def test_the_view_starts_stops_and_resumes_its_build_across_restarts(
    tmp_path: Path, origin: OriginStore
) -> None:
    path = tmp_path / "m"
    mirror = Mirror(path, durable=False)
    _, driver = connect(mirror, origin)
    driver.run(0.0)
    assert mirror.json_view_state("up") == "off"
    mirror.close()
    # started on an existing mirror: built from the first record, and a
    # build cut short by a restart resumes where it stopped
    mirror = Mirror(path, durable=False, json_views=["up"])
    assert mirror.json_step("up", 100)
    assert len(rows(mirror)) == 100
    mirror.close()
    mirror = Mirror(path, durable=False, json_views=["up"])
    assert mirror.json_view_state("up") == "building"
    assert len(rows(mirror)) == 100
    assert build(mirror, limit=100) == 2
    assert_right(mirror, built=True)
    mirror.close()
    # stopped: emptied (the databases stay: readers may hold handles), and
    # the dataset record says so
    mirror = Mirror(path, durable=False)
    assert mirror.json_view_state("up") == "off"
    with mirror.read() as txn:
        doc = msgpack.unpackb(txn.get(b"ds/up", db=mirror._meta), raw=False)
        assert doc["json"] is None
        assert txn.stat(mirror.env.open_db(b"j/up/0", txn=txn))["entries"] == 0
        assert txn.stat(mirror.env.open_db(b"j/up/1", txn=txn))["entries"] == 0
    mirror.close()


def test_a_record_that_does_not_render_gets_no_row(tmp_path: Path, origin: OriginStore) -> None:
    """A stored value that does not decode (the origin would never send one)
    has no row, so a reader renders it itself and reports what is wrong."""
    mirror, *_ = synced(tmp_path / "m", origin)
    db = mirror._state("up").live.records
    with mirror.env.begin(write=True) as txn:
        txn.put(b"u00005", b"\x20\x01", db=db)  # a typed header, then too short
    build(mirror)
    assert b"u00005" not in rows(mirror)
    assert len(rows(mirror)) == 299
    mirror.close()


def serve(path: Path, commands: list[list[bytes]]) -> tuple[bytes, bool]:
    """The replies of a socket worker's dispatcher reading ``path`` (and
    whether its snapshot offered a JSON view)."""
    reader = Reader(path, idle_release=0)
    try:
        d = Dispatcher(
            facts=ServerFacts(mirror=str(path)),
            datasets=reader.datasets,
            sync_status=lambda: None,
            stats=dict,
            clock=lambda: 0.0,
            cache_entries=0,
        )
        with reader.snapshot(buffers=False) as snap:
            return d.execute_many(commands, lambda: snap, Session(1)), (
                snap.json_fetcher("up") is not None
            )
    finally:
        reader.close()


def test_readers_and_the_socket_commands_serve_the_view(
    tmp_path: Path, origin: OriginStore
) -> None:
    """HGET and HMGET give the same bytes with a view as without: a row, a
    record the view has no row for (rendered from its stored bytes), a
    miss; a row changed by hand shows which path answered."""
    path = tmp_path / "m"
    mirror, *_ = synced(path, origin)
    build(mirror)
    marked = bulk(b'{"from":"the view"}')
    with mirror.env.begin(write=True) as txn:
        txn.delete(b"u00009", db=mirror._state("up").live.json)
        txn.put(b"u00008", marked, db=mirror._state("up").live.json)
    mirror.close()
    keys = [b"u00007", b"u00008", b"u00009", b"nope"]
    commands = [[b"HGET", b"up", k] for k in keys] + [[b"HMGET", b"up", *keys]]
    viewed, offered = serve(path, commands)
    assert offered
    Mirror(path, durable=False).close()  # the view stopped
    plain, offered = serve(path, commands)
    assert not offered
    eight = bulk(to_json(origin_record(origin, b"u00008")))
    assert plain.count(eight) == 2
    assert viewed == plain.replace(eight, marked)


def origin_record(store: OriginStore, key: bytes) -> dict[str, Any]:
    raw, _ = store.get("up", key)
    assert raw is not None
    record: dict[str, Any] = store.codec("up").decode(raw)
    return record


def test_renders_alike() -> None:
    def definition(schemas: list[Any], cities: list[str]) -> bytes:
        doc = {"schemas": schemas, "dictionary": {"fields": {"city": cities}}}
        packed: bytes = msgpack.packb(doc, use_bin_type=True)
        return packed

    a = definition([{"version": 1}], ["x", "y"])
    grown = definition([{"version": 1}], ["x", "y", "z"])
    other = definition([{"version": 1}], ["y", "x"])
    evolved = definition([{"version": 1}, {"version": 2}], ["x", "y"])
    e1, e2 = b"1" * 16, b"2" * 16
    assert renders_alike(a, e1, a, e1)
    assert renders_alike(a, e1, grown, e1)
    assert not renders_alike(grown, e1, a, e1)  # a code lost its string
    assert not renders_alike(a, e1, other, e1)
    assert not renders_alike(a, e1, evolved, e1)
    assert not renders_alike(a, e1, a, e2)
    assert not renders_alike(None, None, a, e1)
    assert renders_alike(None, None, None, None)


def test_a_definition_the_view_cannot_read_empties_it_and_stops_nothing(
    tmp_path: Path, origin: OriginStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A definition this sidecar cannot build a codec from (say, an origin
    newer than it) must not stop the sync: the view is emptied (its rows
    may be wrong now) and holds nothing while it lasts."""
    mirror, sync, driver = synced(tmp_path / "m", origin)
    build(mirror)
    old = seed_like_schema()
    origin.evolve_schema(
        "up", Schema(old.version + 1, (*old.fields, Field("x", FieldType.INT, nullable=True)))
    )
    ok(origin.commit([WriteBatch("up", {b"u00003": {**seed_like_record(3), "x": 1}})])[0])
    evolved = origin.codec("up")
    real = codec_from_definition

    def unreadable(definition: bytes) -> Any:
        if b"\xa1x" in definition:  # the field "x", a msgpack string
            raise ValueError("field type 'uuid' is unknown")
        return real(definition)

    monkeypatch.setattr("sidecar.mirror.codec_from_definition", unreadable)
    follow(sync, driver, origin, 1.0)
    assert mirror.cursor("up") == origin.info("up").cursor
    assert rows(mirror) == {}
    build(mirror)
    assert rows(mirror) == {} and mirror.json_view_state("up") == "built"
    assert evolved.decode(mirror.items("up")[b"u00003"])["x"] == 1
    mirror.close()


def test_a_view_made_by_another_renderer_is_built_again(
    tmp_path: Path, origin: OriginStore
) -> None:
    """Rows rendered by another release or encoder (orjson and the standard
    library spell some numbers differently) are not served: the view is
    emptied at open and built again."""
    path = tmp_path / "m"
    mirror, *_ = synced(path, origin)
    build(mirror)
    with mirror.env.begin(write=True) as txn:
        doc = msgpack.unpackb(txn.get(b"ds/up", db=mirror._meta), raw=False)
        assert doc["json"]["rendering"] == RENDERING
        doc["json"]["rendering"] = "0 an older renderer"
        txn.put(b"ds/up", msgpack.packb(doc, use_bin_type=True), db=mirror._meta)
    mirror.close()
    mirror = Mirror(path, durable=False, json_views=["up"])
    assert mirror.json_view_state("up") == "building" and rows(mirror) == {}
    build(mirror)
    assert_right(mirror, built=True)
    mirror.close()
    mirror = Mirror(path, durable=False, json_views=["up"])  # its own: kept
    assert mirror.json_view_state("up") == "built"
    mirror.close()


def test_a_full_map_drops_the_views_instead_of_the_sync(
    tmp_path: Path, origin: OriginStore
) -> None:
    """At its maximum size, a map that cannot take a diff with the views
    takes it without them: the views are emptied and stopped until the next
    start, which builds them again."""
    path = tmp_path / "m"
    mirror, sync, driver = synced(path, origin, map_size=1 << 20, max_map_size=1 << 20)
    build(mirror)
    upserts = {b"v%05d" % i: seed_like_record(i) for i in range(2000)}
    ok(origin.commit([WriteBatch("up", upserts)])[0])
    follow(sync, driver, origin, 1.0)
    assert mirror.cursor("up") == origin.info("up").cursor
    assert mirror.json_view_state("up") == "dropped"
    with mirror.read() as txn:
        assert msgpack.unpackb(txn.get(b"ds/up", db=mirror._meta), raw=False)["json"] is None
    mirror.close()
    reader = Reader(path, idle_release=0)
    try:
        with reader.snapshot() as snap:
            assert snap.json_fetcher("up") is None
    finally:
        reader.close()
    mirror = Mirror(path, durable=False, json_views=["up"], map_size=8 << 20)
    assert mirror.json_view_state("up") == "building"
    build(mirror)
    assert_right(mirror, built=True)
    mirror.close()


def test_a_reader_open_before_the_view_began_takes_it_up(
    tmp_path: Path, origin: OriginStore
) -> None:
    """A reader (a socket worker, an app) that opened the dataset before its
    view existed reads the records meanwhile, and the view from its next
    snapshot on."""
    path = tmp_path / "m"
    mirror = Mirror(path, durable=False)
    _, driver = connect(mirror, origin)
    driver.run(0.0)
    mirror.close()
    reader = Reader(path, idle_release=0)
    try:
        with reader.snapshot() as snap:
            assert snap.json_fetcher("up") is None  # no view yet
        # the sidecar restarted with the view (another process: LMDB opens
        # an environment once per process)
        script = (
            "import sys; from sidecar.mirror import Mirror\n"
            "m = Mirror(sys.argv[1], durable=False, json_views=['up'])\n"
            "while m.json_step('up'): pass\n"
            "m.close()\n"
        )
        run_python(script, str(path))
        with reader.snapshot() as older:  # begun before the handles open
            with reader.snapshot() as snap:
                assert snap.json_fetcher("up") is None  # found, not yet open
            with reader.snapshot() as snap:
                assert snap.json_fetcher("up") is not None  # opened before it began
            # LMDB does not let a transaction use a handle opened after it
            # began: the older snapshot reads the records, without the view
            assert older.json_fetcher("up") is None
            assert older.raw("up", b"u00004") is not None
        with reader.snapshot() as snap:
            fetch = snap.json_fetcher("up")
            assert fetch is not None
            raw = snap.raw("up", b"u00004")
            assert raw is not None
            assert fetch(b"u00004") == bulk(JsonRenderer(origin.codec("up"))(bytes(raw)))
    finally:
        reader.close()


def interleave(mirror: Mirror, between: Any) -> None:
    """Run ``between()`` once, after a build step rendered (outside the
    write lock) and before it writes."""
    real = mirror._writing
    pending = [between]

    def writing(write: Any) -> bool:
        if pending:
            pending.pop()()
        return real(write)

    mirror._writing = writing  # type: ignore[method-assign]


def test_a_build_step_keeps_out_what_an_apply_changed_meanwhile(
    tmp_path: Path, origin: OriginStore
) -> None:
    """A step renders outside the write lock; a diff applied meanwhile wrote
    its own rows (or deleted them), which the step must not overwrite."""
    mirror, sync, driver = synced(tmp_path / "m", origin)
    upserts = {b"u00001": seed_like_record(4001), b"u00003": seed_like_record(4003)}
    ok(origin.commit([WriteBatch("up", upserts, [b"u00002"])])[0])
    interleave(mirror, lambda: follow(sync, driver, origin, 1.0))
    assert not mirror.json_step("up", 10_000)  # rendered all 300, then the diff
    assert mirror.cursor("up") == origin.info("up").cursor
    assert_right(mirror, built=True)
    assert b'"age":' in rows(mirror)[b"u00001"] and b"u00002" not in rows(mirror)
    mirror.close()


def test_a_build_step_writes_nothing_when_the_view_was_emptied_meanwhile(
    tmp_path: Path, origin: OriginStore
) -> None:
    mirror, sync, driver = synced(tmp_path / "m", origin)
    old = seed_like_schema()
    origin.evolve_schema("up", Schema(2, (*old.fields, Field("y", FieldType.INT, default=3))))
    ok(origin.commit([WriteBatch("up", {b"u00001": {**seed_like_record(1), "y": 9}})])[0])
    interleave(mirror, lambda: follow(sync, driver, origin, 1.0))
    assert mirror.json_step("up", 10_000)  # wrote nothing: the view starts again
    assert set(rows(mirror)) == {b"u00001"}  # the diff's row alone
    assert_right(mirror, built=False)
    build(mirror)
    assert_right(mirror, built=True)
    assert rows(mirror)[b"u00004"].endswith(b',"y":3}\r\n')
    mirror.close()


def test_a_reader_opens_view_handles_only_where_a_view_is(
    tmp_path: Path, origin: OriginStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start a reader opens the JSON view's databases of the datasets
    whose record says they have one, and tries none for the others."""
    path = tmp_path / "m"
    mirror, *_ = synced(path, origin)
    mirror.ensure("plain")  # no view
    build(mirror)
    mirror.close()
    asked: list[bytes] = []
    real_open = lmdb.open

    class Counting:
        def __init__(self, env: Any) -> None:
            self._env = env

        def open_db(self, name: bytes, **options: Any) -> Any:
            asked.append(name)
            return self._env.open_db(name, **options)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._env, attr)

    monkeypatch.setattr("sidecar.reader.lmdb.open", lambda *a, **k: Counting(real_open(*a, **k)))
    reader = Reader(path, idle_release=0)
    try:
        views = sorted(n for n in asked if n.startswith(b"j/"))
        assert views == [b"j/up/0", b"j/up/1"]
        assert {b"d/plain/0", b"d/plain/1"} <= set(asked)
        with reader.snapshot() as snap:
            assert snap.json_fetcher("up") is not None
            assert snap.json_fetcher("plain") is None
        assert sorted(n for n in asked if n.startswith(b"j/")) == views  # nothing more
    finally:
        reader.close()
